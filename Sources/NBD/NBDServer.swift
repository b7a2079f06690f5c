// NBD (layer 2): an NBD server exporting one `DiskImage` over TCP or a Unix socket, to many
// clients at once: fixed-newstyle negotiation (EXPORT_NAME, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST/SET_META_CONTEXT with base:allocation), and READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
// BLOCK_STATUS, CACHE and DISC.
import LinuxSystem
import Logging
import NIOCore
import NIOPosix
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

final class NBDConnectionHandler: ChannelInboundHandler, @unchecked Sendable {
    // SAFETY (Sendable): NIO confines a handler to its channel's event loop.
    typealias InboundIn = NBDEvent
    typealias OutboundOut = ByteBuffer

    let export: NBDExport
    let decoder: NBDDecoder
    let logger: Logger
    var noZeroes = false
    var structured = false
    var metaContextBaseAllocation = false

    init(export: NBDExport, decoder: NBDDecoder, logger: Logger) {
        self.export = export
        self.decoder = decoder
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        var b = context.channel.allocator.buffer(capacity: 18)
        b.writeInteger(NBD.initMagic)
        b.writeInteger(NBD.optionMagic)
        b.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .clientFlags(let flags):
            noZeroes = flags & NBD.clientNoZeroes != 0
        case .option(let type, let payload):
            handleOption(context: context, type: type, data: payload)
        case .request(let request):
            handleRequest(context: context, request)
        }
    }

    /// Replies to a batch of pipelined requests go out in one flush.
    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.info("NBD client \(context.remoteAddress.map { "\($0)" } ?? "?"): \(error); closing")
        context.close(promise: nil)
    }

    // MARK: handshake

    func optionReply(_ context: ChannelHandlerContext, option: UInt32, type: UInt32, data: [UInt8] = [], flush: Bool = true) {
        var b = context.channel.allocator.buffer(capacity: 20 + data.count)
        b.writeInteger(NBD.optionReplyMagic)
        b.writeInteger(option)
        b.writeInteger(type)
        b.writeInteger(UInt32(data.count))
        b.writeBytes(data)
        if flush { context.writeAndFlush(wrapOutboundOut(b), promise: nil) } else { context.write(wrapOutboundOut(b), promise: nil) }
    }

    func errorReply(_ context: ChannelHandlerContext, option: UInt32, type: UInt32, _ message: String) {
        optionReply(context, option: option, type: type, data: Array(message.utf8))
    }

    func handleOption(context: ChannelHandlerContext, type: UInt32, data: [UInt8]) {
        var r = ByteBuffer(bytes: data)
        switch type {
        case NBD.optExportName:
            guard String(decoding: data, as: UTF8.self) == export.name || data.isEmpty else {
                context.close(promise: nil)  // EXPORT_NAME has no error reply: the spec says to disconnect
                return
            }
            var b = context.channel.allocator.buffer(capacity: 134)
            b.writeInteger(export.image.virtualSize)
            b.writeInteger(export.transmissionFlags)
            if !noZeroes { b.writeBytes([UInt8](repeating: 0, count: 124)) }
            context.writeAndFlush(wrapOutboundOut(b), promise: nil)
            decoder.phase = .transmission
        case NBD.optAbort:
            optionReply(context, option: type, type: NBD.repAck)
            context.close(promise: nil)
        case NBD.optList:
            guard data.isEmpty else { return errorReply(context, option: type, type: NBD.repErrInvalid, "LIST takes no data") }
            var entry = ByteBuffer()
            entry.writeInteger(UInt32(export.name.utf8.count))
            entry.writeString(export.name)
            entry.writeString(export.description)
            optionReply(context, option: type, type: NBD.repServer, data: Array(entry.readableBytesView), flush: false)
            optionReply(context, option: type, type: NBD.repAck)
        case NBD.optInfo, NBD.optGo:
            guard let nameLength = r.readInteger(as: UInt32.self), nameLength <= 4096, let name = r.readString(length: Int(nameLength)),
                let count = r.readInteger(as: UInt16.self), r.readableBytes == Int(count) * 2
            else { return errorReply(context, option: type, type: NBD.repErrInvalid, "malformed INFO/GO request") }
            guard name == export.name || name.isEmpty else {
                return errorReply(context, option: type, type: NBD.repErrUnknown, "no export named \"\(name)\"")
            }
            var info = ByteBuffer()
            info.writeInteger(NBD.infoExport)
            info.writeInteger(export.image.virtualSize)
            info.writeInteger(export.transmissionFlags)
            optionReply(context, option: type, type: NBD.repInfo, data: Array(info.readableBytesView), flush: false)
            var sizes = ByteBuffer()
            sizes.writeInteger(NBD.infoBlockSize)
            sizes.writeInteger(UInt32(1))
            sizes.writeInteger(UInt32(4096))
            sizes.writeInteger(UInt32(NBD.maxPayload))
            optionReply(context, option: type, type: NBD.repInfo, data: Array(sizes.readableBytesView), flush: false)
            optionReply(context, option: type, type: NBD.repAck)
            if type == NBD.optGo { decoder.phase = .transmission }
        case NBD.optStructuredReply:
            guard data.isEmpty else { return errorReply(context, option: type, type: NBD.repErrInvalid, "STRUCTURED_REPLY takes no data") }
            structured = true
            optionReply(context, option: type, type: NBD.repAck)
        case NBD.optListMetaContext, NBD.optSetMetaContext:
            guard structured || type == NBD.optListMetaContext else {
                return errorReply(context, option: type, type: NBD.repErrInvalid, "negotiate structured replies first")
            }
            guard let nameLength = r.readInteger(as: UInt32.self), nameLength <= 4096, let name = r.readString(length: Int(nameLength)),
                let queries = r.readInteger(as: UInt32.self), queries <= 256
            else { return errorReply(context, option: type, type: NBD.repErrInvalid, "malformed meta context request") }
            guard name == export.name || name.isEmpty else {
                return errorReply(context, option: type, type: NBD.repErrUnknown, "no export named \"\(name)\"")
            }
            var wanted = queries == 0 && type == NBD.optListMetaContext
            for _ in 0..<queries {
                guard let length = r.readInteger(as: UInt32.self), length <= 4096, let query = r.readString(length: Int(length)) else {
                    return errorReply(context, option: type, type: NBD.repErrInvalid, "malformed meta context query")
                }
                if query == "base:allocation" || (type == NBD.optListMetaContext && query == "base:") { wanted = true }
            }
            if wanted {
                var reply = ByteBuffer()
                reply.writeInteger(UInt32(1))
                reply.writeString("base:allocation")
                optionReply(context, option: type, type: NBD.repMetaContext, data: Array(reply.readableBytesView), flush: false)
            }
            if type == NBD.optSetMetaContext { metaContextBaseAllocation = wanted }
            optionReply(context, option: type, type: NBD.repAck)
        case NBD.optStartTLS:
            errorReply(context, option: type, type: NBD.repErrPolicy, "TLS is not offered by this server")
        default:
            errorReply(context, option: type, type: NBD.repErrUnsupported, "option \(type) is not supported")
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

    func simpleReply(_ context: ChannelHandlerContext, cookie: UInt64, error: UInt32) {
        var b = context.channel.allocator.buffer(capacity: 16)
        Self.writeSimpleHeader(&b, cookie: cookie, error: error)
        context.write(wrapOutboundOut(b), promise: nil)  // flushed in channelReadComplete
    }

    func chunk(_ context: ChannelHandlerContext, cookie: UInt64, type: UInt16, done: Bool, payload: ByteBuffer) {
        var b = context.channel.allocator.buffer(capacity: 20 + payload.readableBytes)
        Self.writeChunkHeader(&b, cookie: cookie, type: type, done: done, length: payload.readableBytes)
        var p = payload
        b.writeBuffer(&p)
        context.write(wrapOutboundOut(b), promise: nil)  // flushed in channelReadComplete
    }

    func reply(_ context: ChannelHandlerContext, _ request: NBDRequest, error: UInt32, message: String = "") {
        if structured && error != 0 {
            var p = ByteBuffer()
            p.writeInteger(error)
            p.writeInteger(UInt16(message.utf8.count))
            p.writeString(message)
            chunk(context, cookie: request.cookie, type: NBD.replyError, done: true, payload: p)
        } else if structured {
            chunk(context, cookie: request.cookie, type: NBD.replyNone, done: true, payload: ByteBuffer())
        } else {
            simpleReply(context, cookie: request.cookie, error: error)
        }
    }

    func handleRequest(context: ChannelHandlerContext, _ request: NBDRequest) {
        let image = export.image
        let size = image.virtualSize
        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        let ranged = [NBD.cmdRead, NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes, NBD.cmdBlockStatus, NBD.cmdCache].contains(request.type)
        if ranged && (overflow || end > size) {
            return reply(context, request, error: NBD.EINVAL, message: "request past the end of the export")
        }
        let writes = [NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes].contains(request.type)
        if writes && export.readOnly { return reply(context, request, error: NBD.EPERM, message: "the export is read-only") }
        do {
            switch request.type {
            case NBD.cmdRead:
                guard request.length <= NBD.maxPayload else { return reply(context, request, error: NBD.EINVAL, message: "read too large") }
                // The reply is built in one buffer and the image reads straight into it.
                let count = Int(request.length)
                var b = context.channel.allocator.buffer(capacity: 28 + count)
                if structured {
                    Self.writeChunkHeader(&b, cookie: request.cookie, type: NBD.replyOffsetData, done: true, length: 8 + count)
                    b.writeInteger(request.offset)
                } else {
                    Self.writeSimpleHeader(&b, cookie: request.cookie, error: 0)
                }
                try b.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<count]), at: request.offset)
                    return count
                }
                context.write(wrapOutboundOut(b), promise: nil)  // flushed in channelReadComplete
            case NBD.cmdWrite:
                try image.write(request.payload, at: request.offset)
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(context, request, error: 0)
            case NBD.cmdFlush:
                try image.flush()
                reply(context, request, error: 0)
            case NBD.cmdTrim:
                try image.discard(at: request.offset, length: UInt64(request.length))
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(context, request, error: 0)
            case NBD.cmdWriteZeroes:
                try image.writeZeroes(at: request.offset, length: UInt64(request.length))
                if request.flags & NBD.cmdFlagFUA != 0 { try image.flush() }
                reply(context, request, error: 0)
            case NBD.cmdCache:
                reply(context, request, error: 0)
            case NBD.cmdBlockStatus:
                guard structured && metaContextBaseAllocation else {
                    return reply(context, request, error: NBD.EINVAL, message: "negotiate base:allocation first")
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
                chunk(context, cookie: request.cookie, type: NBD.replyBlockStatus, done: true, payload: p)
            case NBD.cmdDisconnect:
                try? image.flush()
                context.flush()
                context.close(promise: nil)
            default:
                reply(context, request, error: NBD.EINVAL, message: "command \(request.type) is not supported")
            }
        } catch {
            logger.info("NBD request \(request.type) at \(request.offset) failed: \(error)")
            reply(context, request, error: NBD.EIO, message: "\(error)")
        }
    }
}

/// A listening NBD server.
public final class NBDServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channel: any Channel
    public let export: NBDExport
    let unixPath: String?

    public enum Address: Sendable {
        case unix(String)
        case tcp(host: String, port: Int)
    }

    public init(export: NBDExport, address: Address, threads: Int = System.coreCount, logger: Logger) throws {
        self.export = export
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let decoder = NBDDecoder()
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(decoder))
                    try channel.pipeline.syncOperations.addHandler(NBDConnectionHandler(export: export, decoder: decoder, logger: logger))
                }
            }
        do {
            switch address {
            case .unix(let path):
                unixPath = path
                channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
            case .tcp(let host, let port):
                unixPath = nil
                channel = try bootstrap.bind(host: host, port: port).wait()
            }
        } catch {
            try? group.syncShutdownGracefully()
            throw DiskError("cannot listen for NBD clients: \(error)")
        }
        self.group = group
    }

    /// The TCP port actually bound (useful with port 0).
    public var port: Int? { channel.localAddress?.port }

    /// Stops listening, closes every connection and flushes the image.
    public func shutdown() throws {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        if let unixPath { UnixSocketPath.remove(unixPath) }
        try export.image.flush()
    }
}
