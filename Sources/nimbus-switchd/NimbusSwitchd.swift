// nimbus-switchd: the virtual switch daemon. It plays ovsdb-server and ovs-vswitchd in one
// process: it serves the configuration database to stock ovs-vsctl, keeps it in a file in
// ovsdb-server's format, and reconciles it into the switch. A thin layer over OVSDB and Switch.
import ArgumentParser
import LinuxSystem
import Logging
import NIOCore
import NIOPosix
import OVSDB
import Switch

@main
struct NimbusSwitchd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nimbus-switchd",
        abstract: "Run the Nimbus virtual switch: an OVSDB server and an Open vSwitch-class switch in one daemon.",
        discussion: """
            Point stock tools at it as you would at ovsdb-server:
              nimbus-switchd --remote punix:/run/nimbus/db.sock --db /var/lib/nimbus/conf.db --rundir /run/nimbus
              ovs-vsctl --db=unix:/run/nimbus/db.sock add-br br0
            The database file uses ovsdb-server's format: `ovsdb-tool show-log FILE` reads it, and a file \
            that ovsdb-server wrote can be served as it is. A missing file is created from --schema.
            """)

    @Option(name: .customLong("remote"), help: "Listen on punix:PATH or ptcp:PORT[:IP] (repeatable). Default: punix:RUNDIR/db.sock.")
    var remotes: [String] = []

    @Option(help: "The database file, created from --schema if missing. Without it the database lives in memory only.")
    var db: String?

    @Option(help: "The directory for run-time sockets (each bridge's BRIDGE.mgmt, as in OVS).")
    var rundir = "/var/run/nimbus"

    @Option(help: "The control socket for ovs-appctl -t PATH (fdb/show, dpif/show, ...). Default: RUNDIR/nimbus-switchd.ctl.")
    var unixctl: String?

    @Option(help: "The schema for a new database file.")
    var schema = "/usr/share/openvswitch/vswitch.ovsschema"

    @Option(help: "Log level: trace, debug, info, notice, warning, error or critical.")
    var logLevel = "info"

    static let version = "nimbus-switchd 0.1 (OVSDB schema 8.3.1 compatible)"

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("unknown log level \(logLevel)")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "nimbus-switchd")
        do {
            try await serve(logger: logger)
        } catch let error as OVSDBError {
            logger.critical("\(error)")
            throw ExitCode(1)
        } catch let error as ControlError {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
    }

    private func openDatabase(logger: Logger) throws -> ServedDatabase {
        guard let db else {
            logger.warning("no --db given: the configuration lives in memory and is lost when the daemon stops")
            return ServedDatabase(database: Database(schema: try loadSchema()), file: nil)
        }
        if fileExists(db) {
            let (file, database, warnings) = try DatabaseFile.open(path: db)
            for warning in warnings { logger.warning("\(warning)") }
            return ServedDatabase(database: database, file: file)
        }
        let schema = try loadSchema()
        logger.info("creating database \(db) from schema \(schema.name) \(schema.version)")
        return ServedDatabase(database: Database(schema: schema), file: try DatabaseFile.create(path: db, schema: schema))
    }

    private func loadSchema() throws -> DatabaseSchema {
        let bytes: [UInt8]
        do {
            bytes = try readWholeFile(schema, limit: 16 << 20)
        } catch {
            throw OVSDBError("I/O error", "cannot read schema \(schema): \(error)")
        }
        return try DatabaseSchema(text: String(decoding: bytes, as: UTF8.self))
    }

    private func serve(logger: Logger) async throws {
        let served = try openDatabase(logger: logger)
        guard served.database.schema.name == Reconciler.database else {
            throw OVSDBError("syntax error", "the database is \(served.database.schema.name); nimbus-switchd needs an Open_vSwitch database")
        }
        do {
            try makeDirectories(rundir)
        } catch {
            throw OVSDBError("I/O error", "cannot create run directory \(rundir): \(error)")
        }
        let parsed = try (remotes.isEmpty ? ["punix:\(rundir)/db.sock"] : remotes).map(Remote.init)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let server = try await OVSDBServer.start(databases: [served], remotes: parsed, group: group, logger: logger)
        let switchLogger = Logger(label: "nimbus-switchd.switch")
        let manager = BridgeManager(logger: switchLogger)
        let loop = server.loop
        let rundir = rundir
        let openFlow = OpenFlowServer(loop: loop, manager: manager, rundir: rundir, flowFile: db.map { $0 + ".flows" }, logger: switchLogger)
        try await server.withCore { core in
            let saved = openFlow.savedTables()
            manager.initialTables = { saved[$0] }
            manager.datapathCreated = { bridge, datapath in
                datapath.onPacketIn = { loop.execute { openFlow.deliverPacketIns(bridge: bridge) } }
            }
            let reconciler = Reconciler(host: SysfsInterfaces(), logger: switchLogger)
            reconciler.apply = { bridges in
                let failures = manager.apply(bridges)
                openFlow.update(bridges: bridges)
                return failures
            }
            core.commitObservers.append { [unowned core] database, commit in
                reconciler.committed(core, database: database, commit: commit)
            }
            reconciler.announce(core, version: Self.version)
            // Every 5 s, on the loop that owns the database.
            func publishStatistics() {
                loop.assumeIsolated().scheduleTask(in: .seconds(5)) { [unowned core] in
                    reconciler.publishStatistics(core, counters: manager.interfaceCounters())
                    publishStatistics()
                }
            }
            publishStatistics()
        }
        var commands = SwitchControl.commands(manager: manager, loop: loop)
        commands["exit"] = ControlCommand { _ in
            requestTermination()
            return loop.makeSucceededFuture("")
        }
        let control = try await ControlServer.start(
            path: unixctl ?? "\(rundir)/nimbus-switchd.ctl", loop: loop, version: Self.version, commands: commands, logger: logger)
        logger.info("nimbus-switchd ready")
        await waitForTermination()
        logger.info("shutting down")
        await control.stop()
        await server.stop()
        _ = try? await server.withCore { _ in
            openFlow.stop()
            manager.stopAll()
        }
        try? await group.shutdownGracefully()
    }
}
