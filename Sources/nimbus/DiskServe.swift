// nimbus disk serve: export an image over NBD until SIGTERM or SIGINT.
import ArgumentParser
import Dispatch
import Foundation
import Logging
import NBD
import VirtualDisk

extension Disk {
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Export an image over NBD (fixed newstyle, structured replies, base:allocation).",
            discussion: """
                Examples:
                  nimbus disk serve disk.qcow2 --socket /tmp/disk.sock
                  nimbus disk serve disk.qcow2 --port 10809 --bind 127.0.0.1 --export-name vm1 --read-only
                Clients: qemu-img/qemu-io (nbd+unix:///NAME?socket=PATH), nbdinfo, nbdcopy, fio --ioengine=nbd.
                SIGTERM or SIGINT closes every connection, flushes the image and exits 0.
                """)
        @Option(help: "Listen on this Unix socket.") var socket: String?
        @Option(help: "Listen on this TCP port.") var port: Int?
        @Option(help: "Address to bind the TCP port to.") var bind = "127.0.0.1"
        @Option(name: .customLong("export-name"), help: "Export name clients ask for (empty: the default export).") var exportName = ""
        @Flag(name: .customLong("read-only"), help: "Refuse writes.") var readOnly = false
        @Option(
            name: .customLong("max-connections"),
            help: "Clients served at once (each has its own thread); more are closed on arrival.")
        var maxConnections = 128
        @Option(name: .short, help: "Format (probed when absent).") var f: String?
        @Argument var file: String

        func validate() throws {
            guard (socket == nil) != (port == nil) else { throw ValidationError("give either --socket PATH or --port N") }
            if let port, !(0...65535).contains(port) { throw ValidationError("--port must be 0 to 65535") }
            guard (1...65536).contains(maxConnections) else { throw ValidationError("--max-connections must be 1 to 65536") }
        }

        func run() throws {
            LoggingSystem.bootstrap { label in
                var h = StreamLogHandler.standardError(label: label)
                h.logLevel = .warning
                return h
            }
            let server: NBDServer = try reportingErrors {
                let image = try DiskOpener.open(file, format: try parseFormat(f), readOnly: readOnly)
                let export = NBDExport(name: exportName, image: image, readOnly: readOnly)
                let address: NBDServer.Address = socket.map { .unix($0) } ?? .tcp(host: bind, port: port ?? 10809)
                return try NBDServer(export: export, address: address, maxConnections: maxConnections, logger: Logger(label: "nimbus-nbd"))
            }
            let where_ = socket ?? "\(bind):\(server.port ?? port ?? 0)"
            FileHandle.standardError.write(Data("nimbus disk serve: exporting \(file) as \"\(exportName)\" on \(where_)\n".utf8))
            signal(SIGTERM, SIG_IGN)
            signal(SIGINT, SIG_IGN)
            let sources = [SIGTERM, SIGINT].map { DispatchSource.makeSignalSource(signal: $0, queue: .global()) }
            for source in sources {
                source.setEventHandler {
                    do {
                        try server.shutdown()
                        Foundation.exit(0)
                    } catch {
                        FileHandle.standardError.write(Data("nimbus disk serve: flushing on shutdown failed: \(error)\n".utf8))
                        Foundation.exit(1)
                    }
                }
                source.resume()
            }
            dispatchMain()
        }
    }
}
