// Tunnel layer: one multiplexed session over one TCP (or TLS) connection. It carries the control
// messages and every proxied connection as a stream with its own flow-control window, so one slow
// stream only stops itself. Everything here lives on the session channel's event loop.
import CNimbusZlib
import Logging
import NIOCore

/// The far end of a stream: a local socket, a connection still being made, or a spliced stream.
protocol StreamEndpoint: AnyObject {
    /// Bytes from the peer for this stream. Call `stream.consumed(n)` once they have left.
    func deliver(_ data: ByteBuffer)
    /// The peer will send nothing more.
    func deliverEnd()
    /// The stream was reset or its session is gone.
    func abort()
    /// The stream's send window grew by `bytes` (0: the session became writable).
    func windowGranted(_ bytes: Int)
    /// Push delivered bytes out (once per batch of frames).
    func flush()
}

/// Decides what to do with frames that are not stream traffic, and with streams the peer opens.
protocol MuxSessionDelegate: AnyObject {
    func sessionActive(_ session: MuxSession)
    /// challenge, login, loginResult, control and datagram frames. Throwing closes the session.
    func session(_ session: MuxSession, received frame: Frame) throws
    /// The peer opened `stream`; set its endpoint or reset it.
    func session(_ session: MuxSession, opened stream: MuxStream, request: OpenRequest)
    func sessionClosed(_ session: MuxSession)
}

/// One proxied connection inside a session.
final class MuxStream {
    let id: UInt32
    unowned let session: MuxSession
    var endpoint: StreamEndpoint?
    /// Bytes this side may still send before the peer grants more.
    private(set) var sendWindow = MuxSession.window
    /// Bytes received and not yet credited back; the peer may never push this past the window.
    private var inFlight = 0
    /// Bytes consumed by the endpoint and not yet credited.
    private var uncredited = 0
    private var queue = CircularBuffer<ByteBuffer>()
    private var finQueued = false
    private var resetAfterFin = false
    private(set) var finSent = false
    private(set) var finReceived = false
    private(set) var isClosed = false
    var compress = false
    /// Bytes counted for the status API.
    var meter: TrafficMeter?

    init(id: UInt32, session: MuxSession) {
        self.id = id
        self.session = session
    }

    /// True when the endpoint should read more from its source.
    var wantsMore: Bool { !isClosed && !finQueued && queue.isEmpty && sendWindow > 0 && session.isWritable }

    /// Sends bytes (queued while the window is closed).
    func send(_ data: ByteBuffer) {
        guard !isClosed, !finQueued, data.readableBytes > 0 else { return }
        meter?.countUp(data.readableBytes)
        queue.append(data)
        pump()
    }

    /// No more bytes will be sent (after the queued ones). With `thenReset`, the stream is reset
    /// once the end has gone out: the endpoint can take nothing more.
    func finish(thenReset: Bool = false) {
        guard !isClosed else { return }
        if thenReset { resetAfterFin = true }
        if finQueued {
            if finSent, resetAfterFin { reset("the connection closed") }
            return
        }
        finQueued = true
        pump()
    }

    private func pump() {
        while sendWindow > 0, var head = queue.popFirst() {
            let count = min(head.readableBytes, sendWindow, Frame.maxData)
            guard let chunk = head.readSlice(length: count) else { break }
            if head.readableBytes > 0 { queue.prepend(head) }
            sendWindow -= count
            session.sendData(stream: id, chunk, compress: compress)
        }
        if queue.isEmpty, finQueued, !finSent {
            finSent = true
            session.send(.fin, stream: id)
            if resetAfterFin, !finReceived {
                reset("the connection closed")
                return
            }
            removeIfDone()
        }
    }

    /// The endpoint has written `bytes` out; credit them back in batches.
    func consumed(_ bytes: Int) {
        guard !isClosed else { return }
        uncredited += bytes
        if uncredited >= MuxSession.window / 4 {
            var payload = ByteBuffer()
            payload.writeInteger(UInt32(uncredited))
            inFlight -= uncredited
            uncredited = 0
            session.send(.window, stream: id, payload: payload)
            session.flush()
        }
    }

    // MARK: frames from the peer

    func received(data: ByteBuffer, flags: UInt8) throws {
        guard !isClosed else { return }
        guard !finReceived else { throw WireError("data on stream \(id) after its end") }
        var data = data
        if flags & FrameFlags.compressed != 0 { data = try inflate(data) }
        inFlight += data.readableBytes
        guard inFlight <= MuxSession.window else {
            reset("the peer overran the stream window")
            return
        }
        meter?.countDown(data.readableBytes)
        endpoint?.deliver(data)
        session.markForFlush(self)
    }

    func received(window payload: ByteBuffer) throws {
        var payload = payload
        guard let grant: UInt32 = payload.readInteger(), grant > 0, grant <= MuxSession.window else {
            throw WireError("bad window update on stream \(id)")
        }
        guard !isClosed else { return }
        sendWindow += Int(grant)
        guard sendWindow <= MuxSession.window else { throw WireError("window overflow on stream \(id)") }
        pump()
        endpoint?.windowGranted(Int(grant))
    }

    func receivedFin() {
        guard !isClosed, !finReceived else { return }
        finReceived = true
        endpoint?.deliverEnd()
        session.markForFlush(self)
        removeIfDone()
    }

    func receivedReset() {
        guard !isClosed else { return }
        isClosed = true
        session.forget(self)
        endpoint?.abort()
        endpoint = nil
    }

    /// Aborts the stream in both directions and tells the peer.
    func reset(_ reason: String) {
        guard !isClosed else { return }
        isClosed = true
        session.send(.reset, stream: id, payload: ByteBuffer(string: reason))
        session.flush()
        session.forget(self)
        let endpoint = endpoint
        self.endpoint = nil
        endpoint?.abort()
    }

    /// Refuses a stream the peer opened (an stcp visitor without the right key): resets it and
    /// counts it against the peer, which is cut off if it keeps opening streams that are refused.
    func refuse(_ reason: String) {
        reset(reason)
        session.openRefused()
    }

    /// The session went away.
    func sessionLost() {
        guard !isClosed else { return }
        isClosed = true
        let endpoint = endpoint
        self.endpoint = nil
        endpoint?.abort()
    }

    private func removeIfDone() {
        guard finSent, finReceived, !isClosed else { return }
        isClosed = true
        session.forget(self)
        // The endpoint closes itself once its own output is flushed (deliverEnd did that).
    }

    private func inflate(_ data: ByteBuffer) throws -> ByteBuffer {
        var data = data
        guard let length: UInt32 = data.readInteger(), length > 0, Int(length) <= Frame.maxData else {
            throw WireError("bad compressed frame on stream \(id)")
        }
        let input = Array(data.readableBytesView)
        var output = [UInt8](repeating: 0, count: Int(length))
        // SAFETY: both buffers outlive the call, and the lengths passed are their own counts.
        let status = input.withUnsafeBufferPointer { source in
            output.withUnsafeMutableBufferPointer { target in
                nimbus_inflate_raw(source.baseAddress, source.count, target.baseAddress, target.count)
            }
        }
        guard status == 0 else { throw WireError("corrupt compressed data on stream \(id)") }
        return ByteBuffer(bytes: output)
    }
}

/// Counts a stream's bytes for the status API and metrics: up is toward the peer that opened
/// the proxy's listener (user → service), down the other way.
final class TrafficMeter {
    var up = 0
    var down = 0
    let onChange: (Int, Int) -> Void
    init(onChange: @escaping (Int, Int) -> Void = { _, _ in }) { self.onChange = onChange }
    func countUp(_ bytes: Int) {
        up += bytes
        onChange(bytes, 0)
    }
    func countDown(_ bytes: Int) {
        down += bytes
        onChange(0, bytes)
    }
}

/// The channel handler that owns a session's streams.
final class MuxSession: ChannelInboundHandler {
    /// Bytes of the session connection; frames are cut from them here, in place (a decoder stage
    /// in the pipeline would box every frame into the next handler's `NIOAny`).
    typealias InboundIn = ByteBuffer

    /// Each stream's flow-control window.
    static let window = 1 << 20

    enum Role { case server, client }

    let role: Role
    weak var delegate: MuxSessionDelegate?
    let logger: Logger
    private(set) var context: ChannelHandlerContext?
    private var streams: [UInt32: MuxStream] = [:]
    private var nextStreamID: UInt32
    private var needsFlush = false
    private var toFlush: [MuxStream] = []
    /// The start of a frame whose end has not arrived yet.
    private var partialFrame: ByteBuffer?
    private var lastHeard = NIODeadline.now()
    private var heartbeat: Scheduled<Void>?
    /// Streams the peer may have open at once; more are reset.
    var maxPeerStreams = 1024
    private var peerStreams = 0
    /// Stream opens refused (over `maxPeerStreams`, or by the delegate) that cut the peer off
    /// when passed within 10 s: a flood of opens then costs the other sessions nothing.
    static let maxRefusedOpens = 256
    private var refusedOpens = 0
    private var refusedSince = NIODeadline.now()
    /// Heartbeat: PING every `pingInterval`, close if nothing is heard for `idleTimeout`.
    var pingInterval: TimeAmount?
    var idleTimeout: TimeAmount?
    /// Set once the handshake is done; stream frames before that close the session.
    var established = false
    /// Nonce of this session's challenge (stcp visitor proofs are bound to it).
    var nonce: [UInt8] = []
    /// Whether the session is still usable.
    private(set) var isOpen = true

    init(role: Role, logger: Logger) {
        self.role = role
        self.logger = logger
        nextStreamID = role == .client ? 1 : 2
    }

    var isWritable: Bool { context?.channel.isWritable ?? false }
    var remoteAddress: SocketAddress? { context?.channel.remoteAddress }
    var eventLoop: EventLoop? { context?.eventLoop }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelActive(context: ChannelHandlerContext) {
        lastHeard = .now()
        scheduleHeartbeat()
        delegate?.sessionActive(self)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isOpen = false
        heartbeat?.cancel()
        let all = streams.values
        streams.removeAll()
        for stream in all { stream.sessionLost() }
        delegate?.sessionClosed(self)
        delegate = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.info("tunnel session closed: \(error)", metadata: ["peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if var partial = partialFrame {
            partialFrame = nil
            partial.writeBuffer(&buffer)
            buffer = partial
        }
        lastHeard = .now()
        do {
            while isOpen, let frame = try Frame.decode(from: &buffer) { try handle(frame) }
        } catch {
            logger.info("closing tunnel session: \(error)")
            context.close(promise: nil)
            return
        }
        if isOpen, buffer.readableBytes > 0 {
            buffer.discardReadBytes()
            partialFrame = buffer
        }
    }

    private func handle(_ frame: Frame) throws {
        logger.trace("frame in", metadata: ["type": "\(frame.type)", "stream": "\(frame.stream)", "length": "\(frame.payload.readableBytes)"])
        switch frame.type {
        case .ping:
            send(.pong, payload: frame.payload)
            flush()
        case .pong:
            break
        case .hello, .challenge, .login, .loginResult, .control, .datagram:
            try delegate?.session(self, received: frame)
        case .open:
            guard established else { throw WireError("a stream was opened before login") }
            try peerOpened(frame)
        case .data, .window, .fin, .reset:
            guard established else { throw WireError("stream traffic before login") }
            guard let stream = streams[frame.stream] else {
                // Frames for a stream this side already closed are normal; answer data with a reset.
                if frame.type == .data, frame.stream != 0 {
                    send(.reset, stream: frame.stream, payload: ByteBuffer(string: "unknown stream"))
                }
                return
            }
            switch frame.type {
            case .data: try stream.received(data: frame.payload, flags: frame.flags)
            case .window: try stream.received(window: frame.payload)
            case .fin: stream.receivedFin()
            default: stream.receivedReset()
            }
        }
    }

    private func peerOpened(_ frame: Frame) throws {
        let id = frame.stream
        let peerParity: UInt32 = role == .client ? 0 : 1
        guard id != 0, id % 2 == peerParity else { throw WireError("the peer opened stream \(id) with the wrong parity") }
        guard streams[id] == nil else { throw WireError("the peer reopened stream \(id)") }
        let request = try decodeJSON(OpenRequest.self, frame.payload, what: "stream open request")
        let stream = MuxStream(id: id, session: self)
        guard peerStreams < maxPeerStreams else {
            send(.reset, stream: id, payload: ByteBuffer(string: "too many streams"))
            openRefused()
            return
        }
        streams[id] = stream
        peerStreams += 1
        delegate?.session(self, opened: stream, request: request)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        let batch = toFlush
        toFlush.removeAll(keepingCapacity: true)
        for stream in batch { stream.endpoint?.flush() }
        flush()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            for stream in Array(streams.values) { stream.endpoint?.windowGranted(0) }
        }
        context.fireChannelWritabilityChanged()
    }

    // MARK: streams

    /// Reserves a stream id without sending the open (the caller needs the id to build the request).
    func makeStream() -> MuxStream {
        let stream = MuxStream(id: nextStreamID, session: self)
        nextStreamID &+= 2
        streams[stream.id] = stream
        return stream
    }

    func sendOpen(_ stream: MuxStream, _ request: OpenRequest) {
        send(.open, stream: stream.id, payload: encodeJSON(request))
    }

    func forget(_ stream: MuxStream) {
        guard streams.removeValue(forKey: stream.id) != nil else { return }
        let peerParity: UInt32 = role == .client ? 0 : 1
        if stream.id % 2 == peerParity { peerStreams -= 1 }
    }

    func markForFlush(_ stream: MuxStream) { toFlush.append(stream) }

    // MARK: sending

    func send(_ type: FrameType, flags: UInt8 = 0, stream: UInt32 = 0, payload: ByteBuffer = ByteBuffer()) {
        guard let context, isOpen else { return }
        var header = context.channel.allocator.buffer(capacity: Frame.headerSize + min(payload.readableBytes, 512))
        Frame.writeHeader(type, flags: flags, stream: stream, length: payload.readableBytes, into: &header)
        if payload.readableBytes <= 512 {
            var payload = payload
            header.writeBuffer(&payload)
            context.write(NIOAny(header), promise: nil)
        } else {
            context.write(NIOAny(header), promise: nil)
            context.write(NIOAny(payload), promise: nil)
        }
        needsFlush = true
    }

    func sendData(stream: UInt32, _ chunk: ByteBuffer, compress: Bool) {
        if compress, chunk.readableBytes > 64, let packed = deflate(chunk) {
            send(.data, flags: FrameFlags.compressed, stream: stream, payload: packed)
        } else {
            send(.data, stream: stream, payload: chunk)
        }
    }

    func sendControl(_ message: ControlMessage) {
        send(.control, payload: encodeJSON(message))
        flush()
    }

    func flush() {
        guard needsFlush, let context else { return }
        needsFlush = false
        context.flush()
    }

    func close() {
        context?.close(promise: nil)
    }

    /// Counts a stream open that was refused; past `maxRefusedOpens` within 10 s the session is
    /// closed.
    func openRefused() {
        let now = NIODeadline.now()
        if now - refusedSince > .seconds(10) {
            refusedSince = now
            refusedOpens = 0
        }
        refusedOpens += 1
        guard refusedOpens > Self.maxRefusedOpens, isOpen else { return }
        logger.warning(
            "cutting off the peer: more than \(Self.maxRefusedOpens) stream opens refused within 10 s",
            metadata: ["peer": "\(remoteAddress.map { "\($0)" } ?? "?")"])
        close()
    }

    private func deflate(_ chunk: ByteBuffer) -> ByteBuffer? {
        let input = Array(chunk.readableBytesView)
        var output = [UInt8](repeating: 0, count: input.count)
        // SAFETY: both buffers outlive the call, and the lengths passed are their own counts.
        let size = input.withUnsafeBufferPointer { source in
            output.withUnsafeMutableBufferPointer { target in
                nimbus_deflate_raw(source.baseAddress, source.count, target.baseAddress, target.count)
            }
        }
        guard size > 0, size + 4 < input.count else { return nil }
        var packed = ByteBuffer()
        packed.writeInteger(UInt32(input.count))
        packed.writeBytes(output[0..<size])
        return packed
    }

    // MARK: heartbeat

    private func scheduleHeartbeat() {
        guard let context else { return }
        let period = pingInterval ?? idleTimeout.map { TimeAmount.nanoseconds($0.nanoseconds / 3) }
        guard let period, period.nanoseconds > 0 else { return }
        heartbeat = context.eventLoop.assumeIsolated().scheduleTask(in: period) { [self] in
            guard isOpen else { return }
            if let idleTimeout, NIODeadline.now() - lastHeard > idleTimeout {
                logger.info("tunnel session timed out: nothing heard for \(idleTimeout.nanoseconds / 1_000_000_000) s")
                close()
                return
            }
            if pingInterval != nil {
                send(.ping, payload: ByteBuffer(string: "hb"))
                flush()
            }
            scheduleHeartbeat()
        }
    }
}
