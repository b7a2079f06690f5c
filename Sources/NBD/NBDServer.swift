// NBD (layer 2): an NBD server exporting one `DiskImage` over TCP or a Unix socket, to many
// clients at once: fixed-newstyle negotiation (EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST/SET_META_CONTEXT with base:allocation), and READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
// BLOCK_STATUS, CACHE and DISC.
import Dispatch
import LinuxSystem
import Logging
import NIOCore
import Synchronization
import VirtualDisk

/// What is exported, and how.
public struct NBDExport: Sendable {
    public let name: String
    public let description: String
    public let image: any DiskImage
    public let readOnly: Bool

    public init(name: String, description: String = "", image: any DiskImage, readOnly: Bool) {
        self.name = name
        self.description = description
        self.image = image
        self.readOnly = readOnly || image.isReadOnly
    }

    var transmissionFlags: UInt16 {
        var f = NBD.hasFlags | NBD.sendFlush | NBD.sendFUA | NBD.sendCache | NBD.canMultiConn | NBD.sendDF
        if readOnly { f |= NBD.readOnly } else { f |= NBD.sendTrim | NBD.sendWriteZeroes | NBD.sendFastZero }
        return f
    }
}

/// One client's protocol state, independent of the transport: the connection's thread feeds it
/// the bytes it received and sends what it appends to `out`.
final class NBDSession {
    let export: NBDExport
    let logger: Logger
    var phase: NBDDecoder.Phase = .clientFlags
    var noZeroes = false
    var structured = false
    var metaContextBaseAllocation = false
    /// Set when the connection is to be closed once `out` has been sent.
    var closing = false

    init(export: NBDExport, logger: Logger) {
        self.export = export
        self.logger = logger
    }

    /// The server's first message.
    func greeting(into out: inout ByteBuffer) {
        out.writeInteger(NBD.initMagic)
        out.writeInteger(NBD.optionMagic)
        out.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
    }

    /// Handles the next complete message in `input`, appending replies to `out`. Returns false
    /// (consuming nothing) when `input` does not hold a whole message yet. A WRITE's payload is
    /// handed to the image straight from `input`.
    func process(_ input: inout ByteBuffer, into out: inout ByteBuffer) throws -> Bool {
        guard phase == .transmission else {
            guard let event = try NBDDecoder.decodeOne(&input, phase: phase) else { return false }
            switch event {
            case .clientFlags(let flags):
                noZeroes = flags & NBD.clientNoZeroes != 0
                phase = .options
            case .option(let type, let payload):
                handleOption(type: type, data: payload, into: &out)
            case .request:
                break  // decodeOne returns requests only in the transmission phase
            }
            return true
        }
        guard let request = try NBDDecoder.decodeRequestHeader(&input) else { return false }
        let payloadLength = request.type == NBD.cmdWrite ? Int(request.length) : 0
        input.withUnsafeReadableBytes { raw in
            handleRequest(request, payload: UnsafeRawBufferPointer(rebasing: raw[0..<payloadLength]), into: &out)
        }
        input.moveReaderIndex(forwardBy: payloadLength)
        return true
    }

    // MARK: handshake

    func optionReply(_ out: inout ByteBuffer, option: UInt32, type: UInt32, data: [UInt8] = []) {
        out.writeInteger(NBD.optionReplyMagic)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(data.count))
        out.writeBytes(data)
    }

    func errorReply(_ out: inout ByteBuffer, option: UInt32, type: UInt32, _ message: String) {
        optionReply(&out, option: option, type: type, data: Array(message.utf8))
    }

    func handleOption(type: UInt32, data: [UInt8], into out: inout ByteBuffer) {
        var r = ByteBuffer(bytes: data)
        switch type {
        case NBD.optExportName:
            guard String(decoding: data, as: UTF8.self) == export.name || data.isEmpty else {
                closing = true  // EXPORT_NAME has no error reply: the spec says to disconnect
                return
            }
            out.writeInteger(export.image.virtualSize)
            out.writeInteger(export.transmissionFlags)
            if !noZeroes { out.writeRepeatingByte(0, count: 124) }
            phase = .transmission
        case NBD.optAbort:
            optionReply(&out, option: type, type: NBD.repAck)
            closing = true
        case NBD.optList:
            guard data.isEmpty else { return errorReply(&out, option: type, type: NBD.repErrInvalid, "LIST takes no data") }
            var entry = ByteBuffer()
            entry.writeInteger(UInt32(export.name.utf8.count))
            entry.writeString(export.name)
            entry.writeString(export.description)
            optionReply(&out, option: type, type: NBD.repServer, data: Array(entry.readableBytesView))
            optionReply(&out, option: type, type: NBD.repAck)
        case NBD.optInfo, NBD.optGo:
            guard let nameLength = r.readInteger(as: UInt32.self), nameLength <= 4096, let name = r.readString(length: Int(nameLength)),
                let count = r.readInteger(as: UInt16.self), r.readableBytes == Int(count) * 2
            else { return errorReply(&out, option: type, type: NBD.repErrInvalid, "malformed INFO/GO request") }
            guard name == export.name || name.isEmpty else {
                return errorReply(&out, option: type, type: NBD.repErrUnknown, "no export named \"\(name)\"")
            }
            var info = ByteBuffer()
            info.writeInteger(NBD.infoExport)
            info.writeInteger(export.image.virtualSize)
            info.writeInteger(export.transmissionFlags)
            optionReply(&out, option: type, type: NBD.repInfo, data: Array(info.readableBytesView))
            var sizes = ByteBuffer()
            sizes.writeInteger(NBD.infoBlockSize)
            sizes.writeInteger(UInt32(1))
            sizes.writeInteger(UInt32(4096))
            sizes.writeInteger(UInt32(NBD.maxPayload))
            optionReply(&out, option: type, type: NBD.repInfo, data: Array(sizes.readableBytesView))
            optionReply(&out, option: type, type: NBD.repAck)
            if type == NBD.optGo { phase = .transmission }
        case NBD.optStructuredReply:
            guard data.isEmpty else { return errorReply(&out, option: type, type: NBD.repErrInvalid, "STRUCTURED_REPLY takes no data") }
            structured = true
            optionReply(&out, option: type, type: NBD.repAck)
        case NBD.optListMetaContext, NBD.optSetMetaContext:
            guard structured || type == NBD.optListMetaContext else {
                return errorReply(&out, option: type, type: NBD.repErrInvalid, "negotiate structured replies first")
            }
            guard let nameLength = r.readInteger(as: UInt32.self), nameLength <= 4096, let name = r.readString(length: Int(nameLength)),
                let queries = r.readInteger(as: UInt32.self), queries <= 256
            else { return errorReply(&out, option: type, type: NBD.repErrInvalid, "malformed meta context request") }
            guard name == export.name || name.isEmpty else {
                return errorReply(&out, option: type, type: NBD.repErrUnknown, "no export named \"\(name)\"")
            }
            var wanted = queries == 0 && type == NBD.optListMetaContext
            for _ in 0..<queries {
                guard let length = r.readInteger(as: UInt32.self), length <= 4096, let query = r.readString(length: Int(length)) else {
                    return errorReply(&out, option: type, type: NBD.repErrInvalid, "malformed meta context query")
                }
                if query == "base:allocation" || (type == NBD.optListMetaContext && query == "base:") { wanted = true }
            }
            if wanted {
                var reply = ByteBuffer()
                reply.writeInteger(UInt32(1))
                reply.writeString("base:allocation")
                optionReply(&out, option: type, type: NBD.repMetaContext, data: Array(reply.readableBytesView))
            }
            if type == NBD.optSetMetaContext { metaContextBaseAllocation = wanted }
            optionReply(&out, option: type, type: NBD.repAck)
        case NBD.optStartTLS:
            errorReply(&out, option: type, type: NBD.repErrPolicy, "TLS is not offered by this server")
        default:
            errorReply(&out, option: type, type: NBD.repErrUnsupported, "option \(type) is not supported")
        }
    }

    // MARK: transmission

    /// The 16-byte header of a simple reply.
    static func writeSimpleHeader(_ b: inout ByteBuffer, cookie: UInt64, error: UInt32) {
        b.writeInteger(NBD.simpleReplyMagic)
        b.writeInteger(error)
        b.writeInteger(cookie)
    }

    /// The 20-byte header of a structured reply chunk carrying `length` payload bytes.
    static func writeChunkHeader(_ b: inout ByteBuffer, cookie: UInt64, type: UInt16, done: Bool, length: Int) {
        b.writeInteger(NBD.structuredReplyMagic)
        b.writeInteger(done ? NBD.replyFlagDone : 0)
        b.writeInteger(type)
        b.writeInteger(cookie)
        b.writeInteger(UInt32(length))
    }

    func chunk(_ out: inout ByteBuffer, cookie: UInt64, type: UInt16, payload: ByteBuffer) {
        Self.writeChunkHeader(&out, cookie: cookie, type: type, done: true, length: payload.readableBytes)
        var p = payload
        out.writeBuffer(&p)
    }

    func reply(_ out: inout ByteBuffer, _ request: NBDRequest, error: UInt32, message: String = "") {
        if structured && error != 0 {
            let text = message.utf8.prefix(4096)
            var p = ByteBuffer()
            p.writeInteger(error)
            p.writeInteger(UInt16(text.count))
            p.writeBytes(text)
            chunk(&out, cookie: request.cookie, type: NBD.replyError, payload: p)
        } else if structured {
            chunk(&out, cookie: request.cookie, type: NBD.replyNone, payload: ByteBuffer())
        } else {
            Self.writeSimpleHeader(&out, cookie: request.cookie, error: error)
        }
    }

    func handleRequest(_ request: NBDRequest, payload: UnsafeRawBufferPointer, into out: inout ByteBuffer) {
        let image = export.image
        let size = image.virtualSize
        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        let ranged = [NBD.cmdRead, NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes, NBD.cmdBlockStatus, NBD.cmdCache].contains(request.type)
        if ranged && (overflow || end > size) {
            return reply(&out, request, error: NBD.EINVAL, message: "request past the end of the export")
        }
        let writes = [NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes].contains(request.type)
        if writes && export.readOnly { return reply(&out, request, error: NBD.EPERM, message: "the export is read-only") }
        var mark: Int?
        do {
            switch request.type {
            case NBD.cmdRead:
                guard request.length <= NBD.maxPayload else { return reply(&out, request, error: NBD.EINVAL, message: "read too large") }
                // The header goes out first and the image reads straight in behind it; a failed
                // read takes the header back before the error reply.
                let count = Int(request.length)
                mark = out.writerIndex
                if structured {
                    Self.writeChunkHeader(&out, cookie: request.cookie, type: NBD.replyOffsetData, done: true, length: 8 + count)
                    out.writeInteger(request.offset)
                } else {
                    Self.writeSimpleHeader(&out, cookie: request.cookie, error: 0)
                }
                try out.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<count]), at: request.offset)
                    return count
                }
            case NBD.cmdWrite:
                try image.write(from: payload, at: request.offset)
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(&out, request, error: 0)
            case NBD.cmdFlush:
                try image.flush()
                reply(&out, request, error: 0)
            case NBD.cmdTrim:
                try image.discard(at: request.offset, length: UInt64(request.length))
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(&out, request, error: 0)
            case NBD.cmdWriteZeroes:
                try image.writeZeroes(at: request.offset, length: UInt64(request.length))
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(&out, request, error: 0)
            case NBD.cmdCache:
                reply(&out, request, error: 0)
            case NBD.cmdBlockStatus:
                guard structured && metaContextBaseAllocation else {
                    return reply(&out, request, error: NBD.EINVAL, message: "negotiate base:allocation first")
                }
                var extents = try image.map(at: request.offset, length: UInt64(max(request.length, 1)))
                if request.flags & NBD.cmdFlagReqOne != 0 { extents = Array(extents.prefix(1)) }
                var p = ByteBuffer()
                p.writeInteger(UInt32(1))
                for e in extents.prefix(1 << 16) {
                    var length = e.length
                    while length > 0 {
                        let n = UInt32(min(length, 0x8000_0000))
                        p.writeInteger(n)
                        p.writeInteger((e.data ? 0 : NBD.stateHole) | (e.zero ? NBD.stateZero : 0))
                        length -= UInt64(n)
                    }
                }
                chunk(&out, cookie: request.cookie, type: NBD.replyBlockStatus, payload: p)
            case NBD.cmdDisconnect:
                try? image.flush()
                closing = true
            default:
                reply(&out, request, error: NBD.EINVAL, message: "command \(request.type) is not supported")
            }
        } catch {
            logger.info("NBD request \(request.type) at \(request.offset) failed: \(error)")
            if let mark { out.moveWriterIndex(to: mark) }
            reply(&out, request, error: NBD.EIO, message: "\(error)")
        }
    }
}

/// A listening NBD server. Each connection gets its own thread that blocks in recv, handles every
/// request that arrived in one read, and sends their replies in one send: a request costs a recv,
/// the image's I/O and a send, with no event loop between them.
public final class NBDServer: Sendable {
    public let export: NBDExport
    let listener: StreamListener
    let logger: Logger
    let maxConnections: Int
    let acceptor = Mutex<NativeThread?>(nil)
    let state = Mutex(State())
    let finished = DispatchGroup()

    struct State {
        var connections: [Int: OwnedFileDescriptor] = [:]
        var nextID = 0
        var stopping = false
    }

    public enum Address: Sendable {
        case unix(String)
        case tcp(host: String, port: Int)
    }

    /// Replies are sent once this much has accumulated, even mid-batch.
    static let sendThreshold = 1 << 20
    /// The receive buffer always has room for at least this much.
    static let receiveChunk = 256 << 10

    /// At most `maxConnections` clients are served at once; more are closed on arrival.
    public init(export: NBDExport, address: Address, maxConnections: Int = 128, logger: Logger) throws {
        self.export = export
        self.logger = logger
        self.maxConnections = max(1, maxConnections)
        do {
            switch address {
            case .unix(let path): listener = try StreamListener.unix(path: path, backlog: 64)
            case .tcp(let host, let port): listener = try StreamListener.tcp(host: host, port: port, backlog: 64)
            }
        } catch {
            throw DiskError("cannot listen for NBD clients: \(error)")
        }
        do {
            let thread = try NativeThread.start(name: "nbd-accept") { [self] in acceptLoop() }
            acceptor.withLock { $0 = thread }
        } catch {
            listener.close()
            throw DiskError("cannot start the NBD accept thread: \(error)")
        }
    }

    /// The TCP port actually bound (useful with port 0).
    public var port: Int? { listener.port }

    func acceptLoop() {
        while true {
            let connection: OwnedFileDescriptor
            do {
                guard let accepted = try listener.accept() else { return }
                connection = accepted
            } catch {
                logger.error("NBD accept failed: \(error); no longer accepting clients")
                return
            }
            enum Admission { case admitted(Int), full, stopping }
            let admission: Admission = state.withLock { state in
                guard !state.stopping else { return .stopping }
                guard state.connections.count < maxConnections else { return .full }
                state.nextID += 1
                state.connections[state.nextID] = connection
                return .admitted(state.nextID)
            }
            let id: Int
            switch admission {
            case .stopping: return
            case .full:
                // Each client costs a thread; past the cap a new one is closed straight away.
                logger.warning("NBD client refused: already serving \(maxConnections) clients")
                continue
            case .admitted(let admitted): id = admitted
            }
            finished.enter()
            do {
                let thread = try NativeThread.start(name: "nbd-conn-\(id)") { [self] in
                    serve(connection)
                    state.withLock { _ = $0.connections.removeValue(forKey: id) }
                    finished.leave()
                }
                thread.detach()
            } catch {
                logger.warning("NBD client refused: \(error)")
                state.withLock { _ = $0.connections.removeValue(forKey: id) }
                finished.leave()
            }
        }
    }

    /// One client, from greeting to disconnect.
    func serve(_ connection: OwnedFileDescriptor) {
        let session = NBDSession(export: export, logger: logger)
        let allocator = ByteBufferAllocator()
        var input = allocator.buffer(capacity: Self.receiveChunk)
        var output = allocator.buffer(capacity: 64 << 10)
        func send() throws {
            try output.withUnsafeReadableBytes { try connection.sendAll($0) }
            output.clear()
            if output.capacity > 4 * Self.sendThreshold { output = allocator.buffer(capacity: 64 << 10) }
        }
        do {
            session.greeting(into: &output)
            try send()
            while !session.closing {
                if input.readableBytes == 0 {
                    // A large WRITE grew the buffer; an idle connection gives that memory back.
                    if input.capacity > 4 * Self.sendThreshold { input = allocator.buffer(capacity: Self.receiveChunk) } else { input.clear() }
                } else if input.writableBytes < Self.receiveChunk {
                    input.discardReadBytes()
                }
                // Room for the rest of a WRITE whose payload is still arriving, read in one go.
                let missing = session.phase == .transmission ? NBDDecoder.missingRequestBytes(input) : 0
                let room = max(Self.receiveChunk, missing)
                let received = try input.writeWithUnsafeMutableBytes(minimumWritableBytes: room) { try connection.receiveSome(into: $0) }
                if received == 0 { break }
                while !session.closing, try session.process(&input, into: &output) {
                    if output.readableBytes >= Self.sendThreshold { try send() }
                }
                if output.readableBytes > 0 { try send() }
            }
        } catch let error as NBDProtocolError {
            logger.info("NBD client: \(error); closing")
        } catch {
            logger.info("NBD client connection ended: \(error)")
        }
        connection.shutdownBoth()
    }

    /// Stops listening, closes every connection (waiting for requests in progress) and flushes
    /// the image.
    public func shutdown() throws {
        listener.close()
        let open = state.withLock { state in
            state.stopping = true
            return Array(state.connections.values)
        }
        for connection in open { connection.shutdownBoth() }
        acceptor.withLock { $0 }?.join()
        if finished.wait(timeout: .now() + 30) == .timedOut { logger.warning("NBD connections still busy after 30 s; flushing anyway") }
        try export.image.flush()
    }
}
