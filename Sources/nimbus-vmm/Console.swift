// nimbus-vmm: the guest console on this process's terminal, and how the process ends.
import Glibc
import KVM
import LinuxSystem
import Logging
import Synchronization
import VMM

let O_WRONLY_CREAT_TRUNC = O_WRONLY | O_CREAT | O_TRUNC
let SIGTERM_NUMBER = SIGTERM

func ignoreSIGTERM() { signal(SIGTERM, SIG_IGN) }

/// Owns stdin/stdout for the guest console and ends the process when the VM ends.
final class Console: Sendable {
    let sink: OwnedFileDescriptor
    let logger: Logger
    private let state = Mutex<(terminal: termios?, cleanups: [@Sendable () -> Void])>((nil, []))

    init(sink: OwnedFileDescriptor, logger: Logger) {
        self.sink = sink
        self.logger = logger
    }

    var serialSink: @Sendable ([UInt8]) -> Void {
        { [sink] bytes in try? sink.writeAll(bytes) }
    }

    func onExit(_ cleanup: @escaping @Sendable () -> Void) {
        state.withLock { $0.cleanups.append(cleanup) }
    }

    /// Connects host stdin to `machine`'s serial port (raw mode when it is a terminal).
    func attachInput(to machine: Machine) {
        let raw = Terminal.makeRaw(0)
        state.withLock { $0.terminal = raw }
        _ = try? NativeThread.start(name: "console-in") {
            let stdin = OwnedFileDescriptor(taking: dup(0))
            while let bytes = try? stdin.read(upTo: 64), !bytes.isEmpty {
                while machine.serialInputBacklog > 4096 { Host.sleep(microseconds: 1000) }
                machine.sendSerialInput(bytes)
            }
        }
    }

    /// Restores the terminal, runs cleanups, reports how the VM ended and exits.
    func finish(_ exit: MachineExit) -> Never {
        let (terminal, cleanups) = state.withLock { ($0.terminal, $0.cleanups) }
        if let terminal { Terminal.restore(0, terminal) }
        for c in cleanups { c() }
        if exit.exitCode == 0 {
            logger.info("\(exit.message)")
        } else {
            let line = "nimbus-vmm: \(exit.message)\n"
            _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
        }
        exitProcess(exit.exitCode)
    }
}

/// Builds and starts the real `Machine` for the API controller, and ends the process with it.
final class Launcher: MachineLauncher {
    let kvmDevice: String
    let console: Console
    let logger: Logger
    private let machine = Mutex<Machine?>(nil)

    init(kvmDevice: String, console: Console, logger: Logger) {
        self.kvmDevice = kvmDevice
        self.console = console
        self.logger = logger
    }

    var current: Machine? { machine.withLock { $0 } }

    func launch(_ config: VMConfig) throws -> any RunningMachine {
        let kvm = try KVM(path: kvmDevice)
        let vm = try Machine(config: config, kvm: kvm, serialSink: console.serialSink, logger: logger)
        try vm.start()
        machine.withLock { $0 = vm }
        console.attachInput(to: vm)
        let console = self.console
        _ = try NativeThread.start(name: "vm-wait") {
            console.finish(vm.waitForExit())
        }
        return vm
    }
}
