// Tunnel layer: the stream endpoints. A `LocalRelay` joins a stream to a TCP socket (a user's
// connection on the server, the local service on the client, a visitor's user); a
// `PendingEndpoint` holds a stream's first bytes while its local connection is being made; a
// `SpliceEndpoint` joins two streams of two sessions (stcp visitor to stcp owner).
import Logging
import NIOCore
import NIOPosix

/// Reads from a socket into a stream only while the stream has window and the session can take
/// more; writes what the stream delivers and credits it back once it has left.
final class LocalRelay: ChannelInboundHandler, StreamEndpoint {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private(set) var stream: MuxStream?
    private var context: ChannelHandlerContext?
    private var pendingFlush = false
    /// Bytes written while the channel was writable, credited to the stream once flushed.
    private var creditAfterFlush = 0
    private var inputClosed = false
    private var outputClosed = false
    private var outputDrained = false
    private var aborted = false
    private var waitingForTokens = false
    private var reading = false
    let limiter: RateLimiter?
    /// Runs once when the socket closes.
    var onClose: (() -> Void)?

    init(limiter: RateLimiter? = nil) { self.limiter = limiter }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// Joins the socket to `stream` and starts reading.
    func attach(_ stream: MuxStream) {
        self.stream = stream
        stream.endpoint = self
        requestRead()
    }

    /// Reads while the stream can take more: the channel's autoRead is switched on and off only
    /// when that changes (a read() per batch would re-arm epoll on every read).
    private func requestRead() {
        // Before the channel is active the option cannot take effect; channelActive asks again.
        guard let context, context.channel.isActive else { return }
        let wanted = stream?.wantsMore == true && !inputClosed && !waitingForTokens
        guard wanted != reading else { return }
        reading = wanted
        try? context.channel.syncOptions?.setOption(.autoRead, value: wanted)
    }

    func channelActive(context: ChannelHandlerContext) {
        requestRead()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        limiter?.take(buffer.readableBytes)
        stream?.send(buffer)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        stream?.session.flush()
        if let limiter, let delay = limiter.delay() {
            waitingForTokens = true
            requestRead()
            context.eventLoop.assumeIsolated().scheduleTask(in: delay) { [self] in
                waitingForTokens = false
                requestRead()
            }
            return
        }
        requestRead()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        stream?.session.logger.trace("relay event \(event)", metadata: ["stream": "\(stream?.id ?? 0)"])
        if let event = event as? ChannelEvent, event == .inputClosed {
            inputClosed = true
            stream?.finish()
            stream?.session.flush()
            closeIfDone()
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        stream?.session.logger.trace("relay inactive", metadata: ["stream": "\(stream?.id ?? 0)", "in": "\(inputClosed)", "out": "\(outputDrained)"])
        // A socket that closes after its input ended leaves the stream to send what is still
        // queued (then a reset if the peer is still sending); any other close aborts the stream.
        if let stream, !stream.isClosed {
            if inputClosed || outputDrained {
                stream.finish(thenReset: !stream.finReceived)
                stream.session.flush()
            } else {
                stream.reset("the connection closed")
            }
        }
        stream = nil
        let onClose = onClose
        self.onClose = nil
        onClose?()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    // MARK: StreamEndpoint

    func deliver(_ data: ByteBuffer) {
        guard let context, !outputClosed else { return }
        let count = data.readableBytes
        if limiter == nil, context.channel.isWritable {
            // The socket takes it: credited at the next flush, without a promise per write. Once
            // the channel's buffer passes its high-water mark, writes wait for their promise.
            context.write(wrapOutboundOut(data), promise: nil)
            creditAfterFlush += count
            pendingFlush = true
            return
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.write(wrapOutboundOut(data), promise: promise)
        promise.futureResult.assumeIsolated().whenSuccess { [self] in
            guard let stream else { return }
            if let limiter {
                limiter.take(count)
                if let delay = limiter.delay() {
                    context.eventLoop.assumeIsolated().scheduleTask(in: delay) { stream.consumed(count) }
                    return
                }
            }
            stream.consumed(count)
        }
        pendingFlush = true
    }

    /// Writes bytes that are not stream data (a PROXY protocol header).
    func writeRaw(_ bytes: [UInt8]) {
        guard let context else { return }
        context.write(wrapOutboundOut(context.channel.allocator.buffer(bytes: bytes)), promise: nil)
        pendingFlush = true
    }

    func deliverEnd() {
        guard let context, !outputClosed else { return }
        outputClosed = true
        // Shut the output only after everything written before has left: an empty write's
        // promise completes in order behind them.
        pendingFlush = false
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated()
            .whenComplete { [self] result in
                stream?.session.logger.trace("relay drained \(result)", metadata: ["stream": "\(stream?.id ?? 0)"])
                outputDrained = true
                context.close(mode: .output, promise: nil)
                if aborted { context.close(promise: nil) }
                closeIfDone()
            }
    }

    func abort() {
        stream = nil
        aborted = true
        // Bytes already handed over with the end of the stream still go out first.
        if outputClosed, !outputDrained { return }
        context?.close(promise: nil)
    }

    func windowGranted(_ bytes: Int) { requestRead() }

    func flush() {
        guard pendingFlush, let context else { return }
        pendingFlush = false
        context.flush()
        if creditAfterFlush > 0, let stream {
            let count = creditAfterFlush
            creditAfterFlush = 0
            stream.consumed(count)
        }
    }

    private func closeIfDone() {
        guard inputClosed, outputDrained else { return }
        context?.close(promise: nil)
    }
}

extension LocalRelay {
    /// Listens on `host:port`; each accepted socket gets a `LocalRelay` (not yet reading) and is
    /// handed to `accepted` on the loop.
    static func listen(
        on loop: EventLoop, host: String, port: Int, accepted: @escaping @Sendable (Channel, LocalRelay) -> Void
    ) -> EventLoopFuture<Channel> {
        ServerBootstrap(group: loop)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let relay = LocalRelay()
                    try channel.pipeline.syncOperations.addHandler(relay)
                    accepted(channel, relay)
                }
            }
            .bind(host: host, port: port)
    }
}

/// Holds what arrives on a stream while its local connection is being made.
final class PendingEndpoint: StreamEndpoint {
    private(set) var buffered: [ByteBuffer] = []
    private(set) var ended = false
    private(set) var aborted = false

    func deliver(_ data: ByteBuffer) { buffered.append(data) }
    func deliverEnd() { ended = true }
    func abort() { aborted = true }
    func windowGranted(_ bytes: Int) {}
    func flush() {}

    /// Hands everything held to `relay`, which has just been attached to the stream.
    func drain(into relay: LocalRelay) {
        for data in buffered { relay.deliver(data) }
        buffered.removeAll()
        if ended { relay.deliverEnd() }
        relay.flush()
    }
}

/// Joins two streams: bytes arriving on `own` go out on `partner`, and `own` is credited as
/// `partner`'s peer credits `partner`, so the window holds end to end.
final class SpliceEndpoint: StreamEndpoint {
    private weak var partner: MuxStream?
    /// Held apart from `partner`: a stream that has sent its end may be gone (and `partner` nil)
    /// before the frame carrying that end has been flushed.
    private weak var partnerSession: MuxSession?

    init(partner: MuxStream) {
        self.partner = partner
        partnerSession = partner.session
    }

    func deliver(_ data: ByteBuffer) { partner?.send(data) }
    func deliverEnd() { partner?.finish() }
    func abort() { partner?.reset("the other side of the stcp stream closed") }
    func windowGranted(_ bytes: Int) {
        // `own`'s window grew because its peer consumed bytes that came from `partner`.
        if bytes > 0 { partner?.consumed(bytes) }
    }
    func flush() { partnerSession?.flush() }

    /// Splices two streams together.
    static func join(_ a: MuxStream, _ b: MuxStream) {
        a.endpoint = SpliceEndpoint(partner: b)
        b.endpoint = SpliceEndpoint(partner: a)
    }
}

/// A token bucket in bytes per second (`transport.bandwidthLimit`), shared by a proxy's streams.
final class RateLimiter {
    let rate: Int
    private var tokens: Double
    private var last = NIODeadline.now()

    init(bytesPerSecond: Int) {
        rate = bytesPerSecond
        tokens = Double(bytesPerSecond) / 10
    }

    func take(_ bytes: Int) {
        refill()
        tokens -= Double(bytes)
    }

    /// How long to wait before the bucket is back above zero, or nil if it is.
    func delay() -> TimeAmount? {
        refill()
        guard tokens < 0 else { return nil }
        return .nanoseconds(Int64(-tokens / Double(rate) * 1e9) + 1_000_000)
    }

    private func refill() {
        let now = NIODeadline.now()
        let elapsed = Double((now - last).nanoseconds) / 1e9
        last = now
        // Allow a burst of a tenth of a second.
        tokens = min(tokens + elapsed * Double(rate), Double(rate) / 10)
    }
}
