// OVSDB layer: the JSON-RPC server (RFC 7047 section 4) on Unix and TCP sockets. Every database,
// session, monitor and lock lives in one `OVSDBCore` on one event loop, so transactions are
// serialized without locks. After a commit: the file is appended and fsynced, monitors get their
// updates, and only then the transact reply goes out (clients rely on that order).
import LinuxSystem
import Logging
import NIOCore
import NIOPosix

/// Where the server listens: `punix:PATH` or `ptcp:PORT[:IP]`.
public enum Remote: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: Int)

    public init(_ text: String) throws {
        if text.hasPrefix("punix:") {
            let path = String(text.dropFirst(6))
            guard !path.isEmpty else { throw OVSDBError("syntax error", "\(text): punix: needs a socket path") }
            self = .unix(path: path)
        } else if text.hasPrefix("ptcp:") {
            let parts = text.dropFirst(5).split(separator: ":", maxSplits: 1).map(String.init)
            guard let first = parts.first, let port = Int(first), (0...65535).contains(port) else {
                throw OVSDBError("syntax error", "\(text): ptcp: needs a port number (ptcp:PORT[:IP])")
            }
            var host = parts.count > 1 ? parts[1] : "0.0.0.0"
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self = .tcp(host: host, port: port)
        } else {
            throw OVSDBError("syntax error", "\(text): a remote must be punix:PATH or ptcp:PORT[:IP] (active remotes are not supported)")
        }
    }

    public var description: String {
        switch self {
        case .unix(let path): "punix:\(path)"
        case .tcp(let host, let port): "ptcp:\(port):\(host)"
        }
    }
}

/// One database the server serves, with its file (nil: in memory only).
/// Carries a value the caller gives up across a `@Sendable` boundary to the one closure that uses it.
struct Handoff<Value>: @unchecked Sendable {
    // SAFETY (Sendable): the sender does not touch `value` after building the handoff, so only
    // the receiving closure's thread ever uses it.
    let value: Value
    init(_ value: Value) { self.value = value }
}

public struct ServedDatabase {
    public var database: Database
    public var file: DatabaseFile?
    var lastCommit: RowUUID = .zero

    public init(database: Database, file: DatabaseFile?) {
        self.database = database
        self.file = file
    }
}

/// The server's state. Confined to its event loop.
public final class OVSDBCore {
    public let loop: EventLoop
    let logger: Logger
    private(set) var databases: [String: ServedDatabase] = [:]
    var sessions: [ObjectIdentifier: RPCSession] = [:]
    /// Lock name → owner first, then waiters in order.
    var locks: [String: [ObjectIdentifier]] = [:]
    private var pending: [PendingTransact] = []
    /// Called after every commit (after monitors were told), for the switch's reconciliation.
    public var commitObservers: [(String, Commit) -> Void] = []
    /// Milliseconds since the epoch, for the file's `_date` (replaceable in tests).
    public var clock: () -> Int64 = { Host.wallClockMilliseconds() }

    init(loop: EventLoop, databases: [ServedDatabase], logger: Logger) throws {
        self.loop = loop
        self.logger = logger
        for served in databases { self.databases[served.database.schema.name] = served }
        let serverSchema = try DatabaseSchema(text: ServerSchema.text)
        var server = Database(schema: serverSchema)
        var rows: [String: [RowUUID: Row?]] = ["Database": [:]]
        for schema in databases.map(\.database.schema) + [serverSchema] {
            let uuid = RowUUID.random()
            rows["Database"]?[uuid] = Row(
                uuid: uuid, version: .random(),
                columns: [
                    "name": Datum(.string(schema.name)), "model": Datum(.string("standalone")),
                    "connected": Datum(.boolean(true)), "leader": Datum(.boolean(true)),
                    "schema": Datum(.string(schema.json.text)), "sid": Datum(set: []), "cid": Datum(set: []),
                    "index": Datum(set: []),
                ])
        }
        server.apply(rows)
        self.databases["_Server"] = ServedDatabase(database: server, file: nil)
    }

    public func database(_ name: String) -> Database? { databases[name]?.database }

    public var databaseNames: [String] { databases.keys.sorted() }

    // MARK: transactions

    /// Runs a transaction from inside the process (the switch writes its state this way); it
    /// goes through the same checks, file and monitors as a client's.
    @discardableResult
    public func transact(_ name: String, _ operations: [JSON]) throws -> [JSON] {
        guard databases[name] != nil, name != "_Server" else { throw OVSDBError("unknown database", "no database named \(name)") }
        switch run(name, operations, waitsMayBlock: false, session: nil) {
        case .done(let results, _): return results
        case .blocked: return []
        }
    }

    func run(_ name: String, _ operations: [JSON], waitsMayBlock: Bool, session: ObjectIdentifier?) -> TransactOutcome {
        guard var served = databases[name] else { return .done(results: [], commit: nil) }
        if name == "_Server" {
            let readOnly: Set<String> = ["select", "wait", "comment", "assert"]
            if let bad = operations.first(where: { !readOnly.contains($0["op"]?.stringValue ?? "") }) {
                return .done(results: [OVSDBError("not allowed", "the _Server database is read-only", syntax: bad).json], commit: nil)
            }
        }
        let outcome = served.database.transact(operations, waitsMayBlock: waitsMayBlock) { [locks] lock in
            session.map { locks[lock]?.first == $0 } ?? false
        }
        guard case .done(var results, let commit?) = outcome else { return outcome }
        if let file = served.file {
            do {
                try file.append(commit, schema: served.database.schema, date: clock())
                try file.compactIfNeeded(served.database, date: clock())
            } catch let error as OVSDBError {
                // Not durable: the commit is dropped and the client told.
                logger.error("\(error)")
                results.append(error.json)
                return .done(results: results, commit: nil)
            } catch {
                results.append(OVSDBError("I/O error", "\(error)").json)
                return .done(results: results, commit: nil)
            }
        }
        served.lastCommit = commit.id
        databases[name] = served
        for session in sessions.values { session.notify(database: name, commit: commit, schema: served.database.schema) }
        for observer in commitObservers { observer(name, commit) }
        retryPending(name)
        return .done(results: results, commit: commit)
    }

    struct PendingTransact {
        let session: ObjectIdentifier
        let id: JSON
        let database: String
        let operations: [JSON]
        let timeout: Scheduled<Void>?
        let token: Int
    }
    private var nextToken = 0

    func park(session: RPCSession, id: JSON, database: String, operations: [JSON], timeoutMs: Int?) {
        nextToken += 1
        let token = nextToken
        let timeout = timeoutMs.map { ms in
            loop.assumeIsolated().scheduleTask(in: .milliseconds(Int64(ms))) { [weak self] in
                guard let self, let index = pending.firstIndex(where: { $0.token == token }) else { return }
                let parked = pending.remove(at: index)
                if case .done(let results, _) = run(parked.database, parked.operations, waitsMayBlock: false, session: parked.session) {
                    sessions[parked.session]?.reply(id: parked.id, result: .array(results))
                }
            }
        }
        pending.append(
            PendingTransact(
                session: ObjectIdentifier(session), id: id, database: database, operations: operations, timeout: timeout, token: token))
    }

    private func retryPending(_ name: String) {
        let waiting = pending.filter { $0.database == name }
        guard !waiting.isEmpty else { return }
        pending.removeAll { $0.database == name }
        for parked in waiting {
            switch run(parked.database, parked.operations, waitsMayBlock: true, session: parked.session) {
            case .done(let results, _):
                parked.timeout?.cancel()
                sessions[parked.session]?.reply(id: parked.id, result: .array(results))
            case .blocked:
                pending.append(parked)
            }
        }
    }

    // MARK: sessions and locks

    func sessionClosed(_ session: RPCSession) {
        let id = ObjectIdentifier(session)
        sessions[id] = nil
        for parked in pending where parked.session == id { parked.timeout?.cancel() }
        pending.removeAll { $0.session == id }
        for name in Array(locks.keys) { unlock(name, session: id) }
    }

    /// Returns true if `session` holds the lock now.
    func lock(_ name: String, session: ObjectIdentifier, steal: Bool) -> Bool {
        var queue = locks[name] ?? []
        if steal {
            if let owner = queue.first, owner != session { sessions[owner]?.send(method: "stolen", params: .array([.string(name)])) }
            queue.removeAll { $0 == session }
            queue.insert(session, at: 0)
        } else if !queue.contains(session) {
            queue.append(session)
        }
        locks[name] = queue
        return queue.first == session
    }

    func unlock(_ name: String, session: ObjectIdentifier) {
        guard var queue = locks[name], let index = queue.firstIndex(of: session) else { return }
        queue.remove(at: index)
        locks[name] = queue.isEmpty ? nil : queue
        if index == 0, let next = queue.first { sessions[next]?.send(method: "locked", params: .array([.string(name)])) }
    }
}

/// The server: listeners on each remote, all sharing one `OVSDBCore`.
public final class OVSDBServer: Sendable {
    public let core: NIOLoopBound<OVSDBCore>
    private let channels: [Channel]

    private init(core: NIOLoopBound<OVSDBCore>, channels: [Channel]) {
        self.core = core
        self.channels = channels
    }

    public var loop: EventLoop { core.eventLoop }

    /// The TCP port a `ptcp:0` remote got (tests ask for a free one).
    public var boundPorts: [Int] { channels.compactMap { $0.localAddress?.port } }

    public static func start(
        databases: [ServedDatabase], remotes: [Remote], group: EventLoopGroup, logger: Logger
    ) async throws -> OVSDBServer {
        let loop = group.next()
        let handoff = Handoff(databases)
        let bound = try await loop.submit {
            NIOLoopBound(try OVSDBCore(loop: loop, databases: handoff.value, logger: logger), eventLoop: loop)
        }.get()
        var channels: [Channel] = []
        do {
            for remote in remotes {
                let bootstrap = ServerBootstrap(group: loop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            let session = RPCSession(core: bound.value, logger: logger)
                            try channel.pipeline.syncOperations.addHandler(session)
                        }
                    }
                let channel: Channel
                switch remote {
                case .unix(let path):
                    channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
                case .tcp(let host, let port):
                    channel = try await bootstrap.bind(host: host, port: port).get()
                }
                logger.info("OVSDB listening on \(remote)")
                channels.append(channel)
            }
        } catch {
            for channel in channels { try? await channel.close() }
            throw OVSDBError("I/O error", "cannot listen: \(error)")
        }
        return OVSDBServer(core: bound, channels: channels)
    }

    /// Runs `body` on the core's loop.
    public func withCore<T: Sendable>(_ body: @escaping @Sendable (OVSDBCore) throws -> T) async throws -> T {
        let core = core
        return try await core.eventLoop.submit { try body(core.value) }.get()
    }

    public func stop() async {
        for channel in channels { try? await channel.close() }
    }
}

extension JSONFramer {
    /// The JSON-RPC messages that `buffer`'s bytes complete.
    mutating func messages(in buffer: ByteBuffer) throws -> [JSON] {
        try feed(buffer.readableBytesView).map { text in
            do {
                return try JSON.parse(text)
            } catch {
                throw JSONError("bad JSON-RPC message: \(error)")
            }
        }
    }
}

/// One client connection: JSON-RPC requests in, replies and notifications out.
final class RPCSession: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let core: OVSDBCore
    private let logger: Logger
    private var framer = JSONFramer()
    private var context: ChannelHandlerContext?
    /// Monitor id (its JSON text) → database and request.
    private var monitors: [String: (id: JSON, database: String, request: MonitorRequest)] = [:]

    init(core: OVSDBCore, logger: Logger) {
        self.core = core
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        core.sessions[ObjectIdentifier(self)] = self
    }

    func channelInactive(context: ChannelHandlerContext) {
        core.sessionClosed(self)
        self.context = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            for message in try framer.messages(in: unwrapInboundIn(data)) { handle(message) }
        } catch {
            logger.info("closing OVSDB connection: \(error)", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "unix")"])
            context.close(promise: nil)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
        context.fireChannelReadComplete()
    }

    // MARK: output

    private func write(_ message: JSON) {
        guard let context else { return }
        var bytes: [UInt8] = []
        message.write(into: &bytes)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: bytes)), promise: nil)
    }

    func reply(id: JSON, result: JSON) { write(.object(["id": id, "result": result, "error": .null])) }

    func replyError(id: JSON, _ error: JSON) { write(.object(["id": id, "result": .null, "error": error])) }

    func send(method: String, params: JSON) { write(.object(["id": .null, "method": .string(method), "params": params])) }

    func notify(database: String, commit: Commit, schema: DatabaseSchema) {
        for monitor in monitors.values where monitor.database == database {
            guard let updates = monitor.request.update(commit, schema: schema) else { continue }
            switch monitor.request.version {
            case 1: send(method: "update", params: .array([monitor.id, updates]))
            case 2: send(method: "update2", params: .array([monitor.id, updates]))
            default: send(method: "update3", params: .array([monitor.id, .string(commit.id.description), updates]))
            }
        }
    }

    // MARK: requests

    private func handle(_ message: JSON) {
        guard let method = message["method"]?.stringValue else {
            // A reply to something we sent (an echo): nothing to do.
            return
        }
        let id = message["id"] ?? .null
        let params = message["params"]?.arrayValue ?? []
        do {
            let result = try dispatch(method, params: params, id: id)
            if let result, id != .null { reply(id: id, result: result) }
        } catch let error as OVSDBError {
            if id != .null { replyError(id: id, error.json) }
        } catch {
            if id != .null { replyError(id: id, OVSDBError("internal error", "\(error)").json) }
        }
    }

    private func database(_ params: [JSON], method: String) throws -> (String, Database) {
        guard let name = params.first?.stringValue else { throw OVSDBError.syntax("\(method) needs a database name") }
        guard let database = core.database(name) else {
            throw OVSDBError("unknown database", "\(method) request specifies unknown database \(name)", syntax: .array(params))
        }
        return (name, database)
    }

    /// Returns the result, or nil when the reply is sent later (a transact waiting on "wait").
    private func dispatch(_ method: String, params: [JSON], id: JSON) throws -> JSON? {
        switch method {
        case "echo": return .array(params)
        case "list_dbs": return .array(core.databaseNames.map { .string($0) })
        case "get_schema": return try database(params, method: method).1.schema.json
        case "transact":
            let (name, _) = try database(params, method: method)
            let operations = Array(params.dropFirst())
            switch core.run(name, operations, waitsMayBlock: true, session: ObjectIdentifier(self)) {
            case .done(let results, _): return .array(results)
            case .blocked(let timeoutMs):
                core.park(session: self, id: id, database: name, operations: operations, timeoutMs: timeoutMs)
                return nil
            }
        case "monitor", "monitor_cond", "monitor_cond_since":
            let version = method == "monitor" ? 1 : method == "monitor_cond" ? 2 : 3
            let (name, database) = try database(params, method: method)
            guard params.count >= 3 else { throw OVSDBError.syntax("\(method) needs [db, monitor-id, requests]", .array(params)) }
            let monitorID = params[1]
            guard monitors[monitorID.text] == nil else { throw OVSDBError("duplicate monitor ID", "monitor \(monitorID.text) exists") }
            let request = try MonitorRequest(json: params[2], schema: database.schema, version: version)
            monitors[monitorID.text] = (monitorID, name, request)
            let initial = request.initial(database)
            guard version == 3 else { return initial }
            let last = core.databases[name]?.lastCommit ?? .zero
            if params.count > 3, params[3].stringValue == last.description, last != .zero {
                return .array([.bool(true), .string(last.description), .object([:])])
            }
            return .array([.bool(false), .string(last.description), initial])
        case "monitor_cancel":
            guard let monitorID = params.first, monitors.removeValue(forKey: monitorID.text) != nil else {
                throw OVSDBError("unknown monitor", "no monitor with that ID")
            }
            return .object([:])
        case "lock", "steal":
            guard let name = params.first?.stringValue else { throw OVSDBError.syntax("\(method) needs a lock name") }
            return .object(["locked": .bool(core.lock(name, session: ObjectIdentifier(self), steal: method == "steal"))])
        case "unlock":
            guard let name = params.first?.stringValue else { throw OVSDBError.syntax("unlock needs a lock name") }
            core.unlock(name, session: ObjectIdentifier(self))
            return .object([:])
        case "set_db_change_aware": return .object([:])
        default:
            throw OVSDBError("unknown method", "\(method) is not a method of this server")
        }
    }
}
