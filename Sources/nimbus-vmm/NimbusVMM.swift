// nimbus-vmm: one process per microVM, started with Firecracker's flags.
import ArgumentParser
import Dispatch
import KVM
import LinuxSystem
import Logging
import VMM

@main
struct NimbusVMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nimbus-vmm",
        abstract: "A KVM microVM monitor: one process per VM, Firecracker-compatible.",
        discussion: """
            Boot from a Firecracker-format config file:
              nimbus-vmm --no-api --config-file vm.json
            Or serve Firecracker's REST API on a Unix socket and configure the VM through it:
              nimbus-vmm --api-sock /tmp/vm.sock [--config-file vm.json]

            The guest's serial console (ttyS0) is connected to this process's stdin and stdout
            (or --serial-out FILE). The process exits 0 when the guest powers off or resets,
            1 when the VM cannot be built or KVM fails, and 2 when the guest crashes (triple fault).
            """,
        version: VMMController.version)

    @Option(name: .customLong("api-sock"), help: "Path of the API Unix socket.")
    var apiSock: String = "/run/nimbus-vmm.socket"

    @Option(name: .customLong("config-file"), help: "Firecracker-format JSON config; the VM starts at once.")
    var configFile: String?

    @Flag(name: .customLong("no-api"), help: "Do not serve the API (needs --config-file).")
    var noAPI = false

    @Option(name: .customLong("id"), help: "Instance ID reported by GET /.")
    var id = "anonymous-instance"

    @Option(name: .customLong("serial-out"), help: "Write the guest console to FILE instead of stdout.")
    var serialOut: String?

    @Option(name: .customLong("level"), help: "Log level: Error, Warning, Info, Debug, Trace.")
    var level = "Warning"

    @Option(name: .customLong("kvm-device"), help: .hidden)
    var kvmDevice = "/dev/kvm"

    @Flag(name: .customLong("no-seccomp"), help: "Accepted for Firecracker compatibility; nimbus-vmm installs no seccomp filter yet.")
    var noSeccomp = false

    func validate() throws {
        if noAPI && configFile == nil {
            throw ValidationError("--no-api needs --config-file: without the API there is no other way to configure the VM")
        }
        guard Self.logLevel(level) != nil else { throw ValidationError("unknown --level \(level)") }
    }

    static func logLevel(_ name: String) -> Logger.Level? {
        switch name.lowercased() {
        case "error": return .error
        case "warning", "warn": return .warning
        case "info": return .info
        case "debug": return .debug
        case "trace": return .trace
        case "off": return .critical
        default: return nil
        }
    }

    func run() throws {
        let level = Self.logLevel(level) ?? .warning
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "nimbus-vmm")

        var config = VMConfig()
        if let configFile {
            do {
                config = try VMConfig(fileContents: try readWholeFile(configFile))
            } catch {
                throw Failure("config file \(configFile): \(error)")
            }
        }
        let sinkFD: OwnedFileDescriptor
        if let serialOut {
            sinkFD = try OwnedFileDescriptor.open(serialOut, flags: O_WRONLY_CREAT_TRUNC)
        } else {
            sinkFD = try OwnedFileDescriptor.duplicate(1)
        }
        let console = Console(sink: sinkFD, logger: logger)
        let launcher = Launcher(kvmDevice: kvmDevice, console: console, logger: logger)
        let controller = VMMController(instanceID: id, config: config, launcher: launcher)

        let server: APIServer? = noAPI ? nil : try APIServer(socketPath: apiSock, controller: controller, logger: logger)
        if let server { console.onExit { server.close() } }
        let terminate = DispatchSource.makeSignalSource(signal: SIGTERM_NUMBER, queue: .global())
        ignoreSIGTERM()
        terminate.setEventHandler {
            if let machine = launcher.current { machine.stop() } else { console.finish(.stopped) }
        }
        terminate.resume()

        if configFile != nil {
            do {
                try controller.start()
            } catch {
                server?.close()
                throw Failure("cannot start the VM: \(error)")
            }
        }
        dispatchMain()
    }
}

/// A startup failure: printed as one line on stderr, exit status 1.
struct Failure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
