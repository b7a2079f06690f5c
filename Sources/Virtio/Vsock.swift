// Virtio (layer 2): virtio-vsock with Firecracker's host side: guest streams map to Unix sockets.
//
// Host to guest: a host process connects to `uds_path` and writes `CONNECT <port>\n`; the device
// asks the guest to accept on <port> and answers `OK <local port>\n` once it has. Guest to host:
// a guest connection to (CID 2, port P) becomes a connection to the Unix socket `<uds_path>_P`.
// Data moves under virtio-vsock's credit flow control in both directions; one device thread
// serves the queues, the listener and every connection (edge-triggered epoll).
import GuestMemory
import LinuxSystem
import Logging
import Synchronization

/// A virtio-vsock device.
public final class VirtioVsock: VirtioBackend {
    public static let hostCID: UInt64 = 2
    public static let queueSize: UInt16 = 256

    public let guestCID: UInt64
    public let udsPath: String
    let listener: OwnedFileDescriptor
    private let worker = WorkerSlot()
    let logger: Logger

    /// Starts listening on `udsPath` for host-initiated connections.
    public init(guestCID: UInt64, udsPath: String, logger: Logger) throws {
        guard guestCID >= 3, guestCID <= UInt64(UInt32.max) else {
            throw VirtioError("vsock: `guest_cid` must be between 3 and \(UInt32.max), not \(guestCID)")
        }
        self.guestCID = guestCID
        self.udsPath = udsPath
        self.logger = logger
        do {
            try UnixSocketPath.removeStale(udsPath)
            listener = try UnixStream.listen(udsPath)
        } catch {
            throw VirtioError("vsock: cannot listen on \(udsPath): \(error)")
        }
    }

    deinit { UnixSocketPath.remove(udsPath) }

    public var deviceID: UInt32 { 19 }
    public var queueSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.queueSize] }
    public var features: UInt64 { VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors }

    public func readConfig(offset: Int, count: Int) -> [UInt8] {
        var config: [UInt8] = []
        config.appendLittleEndian(guestCID)
        return configSlice(config, offset: offset, count: count)
    }

    public func writeConfig(offset: Int, data: [UInt8]) {}

    public func activate(_ a: VirtioActivation) throws {
        let listener = self.listener
        let (guestCID, udsPath, logger) = (self.guestCID, self.udsPath, self.logger)
        try worker.start(name: "vsock", activation: a, extra: [(listener.rawValue, Epoll.input, VsockLoop.listenerToken)]) { epoll in
            VsockLoop(activation: a, epoll: epoll, listener: listener, guestCID: guestCID, udsPath: udsPath, logger: logger)
        }
    }

    public func reset() { worker.stop() }
}

/// The virtio-vsock packet header (44 bytes, little endian).
struct VsockHeader: Equatable {
    static let size = 44
    enum Op {
        static let request: UInt16 = 1
        static let response: UInt16 = 2
        static let reset: UInt16 = 3
        static let shutdown: UInt16 = 4
        static let readWrite: UInt16 = 5
        static let creditUpdate: UInt16 = 6
        static let creditRequest: UInt16 = 7
    }
    static let streamType: UInt16 = 1
    static let shutdownReceive: UInt32 = 1
    static let shutdownSend: UInt32 = 2

    var sourceCID: UInt64 = 0
    var destinationCID: UInt64 = 0
    var sourcePort: UInt32 = 0
    var destinationPort: UInt32 = 0
    var length: UInt32 = 0
    var type: UInt16 = streamType
    var op: UInt16 = 0
    var flags: UInt32 = 0
    var bufferAllocation: UInt32 = 0
    var forwardCount: UInt32 = 0

    init() {}

    init(_ bytes: [UInt8]) {
        func at<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T { bytes.littleEndian(T.self, at: offset) }
        sourceCID = at(0, UInt64.self)
        destinationCID = at(8, UInt64.self)
        sourcePort = at(16, UInt32.self)
        destinationPort = at(20, UInt32.self)
        length = at(24, UInt32.self)
        type = at(28, UInt16.self)
        op = at(30, UInt16.self)
        flags = at(32, UInt32.self)
        bufferAllocation = at(36, UInt32.self)
        forwardCount = at(40, UInt32.self)
    }

    var bytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.size)
        func put<T: FixedWidthInteger>(_ v: T) { out.appendLittleEndian(v) }
        put(sourceCID)
        put(destinationCID)
        put(sourcePort)
        put(destinationPort)
        put(length)
        put(type)
        put(op)
        put(flags)
        put(bufferAllocation)
        put(forwardCount)
        return out
    }
}

/// One stream between a guest port and a host Unix socket.
final class VsockConnection {
    enum State {
        /// Host-initiated, waiting for the `CONNECT <port>` line.
        case awaitingConnectLine
        /// Host-initiated, REQUEST sent to the guest, waiting for its RESPONSE.
        case connecting
        case established
    }
    let id: UInt64
    let socket: OwnedFileDescriptor
    var state: State
    /// Our port (the host side of the stream) and the guest's.
    var localPort: UInt32
    var peerPort: UInt32
    var line: [UInt8] = []
    var peerBufferAllocation: UInt32 = 0
    var peerForwardCount: UInt32 = 0
    /// Bytes we sent to the guest.
    var sent: UInt32 = 0
    /// Bytes of guest data we wrote to the socket.
    var forwarded: UInt32 = 0
    var advertisedForward: UInt32 = 0
    /// Guest data the socket has not taken yet.
    var outbound: [UInt8] = []
    /// The socket may have data to read (edge-triggered readiness not yet consumed).
    var readable = false
    var socketEOF = false
    var guestStoppedSending = false

    init(id: UInt64, socket: OwnedFileDescriptor, state: State, localPort: UInt32, peerPort: UInt32) {
        self.id = id
        self.socket = socket
        self.state = state
        self.localPort = localPort
        self.peerPort = peerPort
    }

    /// Bytes the guest can still take on this stream.
    var peerCredit: Int { Int(peerBufferAllocation) - Int(sent &- peerForwardCount) }
}

/// The vsock device's thread state.
final class VsockLoop: DeviceLoop {
    static let rxToken: UInt64 = 0
    static let txToken: UInt64 = 1
    static let eventToken: UInt64 = 2
    static let listenerToken: UInt64 = 3
    static let firstConnectionToken: UInt64 = 16
    /// What we let the guest have in flight towards each socket.
    static let bufferAllocation: UInt32 = 256 << 10
    static let maxConnections = 1024
    static let maxPayload = 64 << 10

    let activation: VirtioActivation
    let epoll: Epoll
    let listener: OwnedFileDescriptor
    let guestCID: UInt64
    let udsPath: String
    let logger: Logger
    var rx: Virtqueue
    var tx: Virtqueue
    var connections: [UInt64: VsockConnection] = [:]
    /// (local port, peer port) → connection id, for established and connecting streams.
    var byPorts: [UInt64: UInt64] = [:]
    var nextID = firstConnectionToken
    var nextLocalPort: UInt32 = 1 << 30
    /// Control packets (no payload) waiting for receive buffers.
    var control: [VsockHeader] = []

    init(activation: VirtioActivation, epoll: Epoll, listener: OwnedFileDescriptor, guestCID: UInt64, udsPath: String, logger: Logger) {
        self.activation = activation
        self.epoll = epoll
        self.listener = listener
        self.guestCID = guestCID
        self.udsPath = udsPath
        self.logger = logger
        rx = activation.queues[0]
        tx = activation.queues[1]
    }

    static func key(_ local: UInt32, _ peer: UInt32) -> UInt64 { UInt64(local) << 32 | UInt64(peer) }

    /// Most control packets kept while the guest posts no receive buffers: a guest that floods
    /// the device with bad packets and never reads the answers cannot make the host hoard them.
    static let maxQueuedControl = 1024

    private func queueControl(_ h: VsockHeader) {
        guard control.count < Self.maxQueuedControl else {
            logger.debug("vsock: the guest reads no control packets; dropping one")
            return
        }
        control.append(h)
    }

    func handle(_ event: Epoll.Event) throws {
        switch event.token {
        case Self.rxToken:
            _ = try? activation.notifiers[0].wait()
        case Self.txToken:
            _ = try? activation.notifiers[1].wait()
            try processTransmit()
        case Self.eventToken:
            _ = try? activation.notifiers[2].wait()
        case Self.listenerToken:
            try acceptConnections()
        default:
            guard let c = connections[event.token] else { return }
            if event.writable { flushOutbound(c) }
            if event.readable || event.hangup {
                if c.state == .awaitingConnectLine { readConnectLine(c) } else { c.readable = true }
            }
        }
        try fillReceive()
    }

    // MARK: host side

    private func acceptConnections() throws {
        while let socket = try UnixStream.accept(listener) {
            guard connections.count < Self.maxConnections else {
                logger.warning("vsock: \(Self.maxConnections) connections open; refusing a new host connection")
                continue
            }
            let c = VsockConnection(id: nextID, socket: socket, state: .awaitingConnectLine, localPort: 0, peerPort: 0)
            nextID += 1
            try register(c)
        }
    }

    private func register(_ c: VsockConnection) throws {
        try epoll.add(c.socket.rawValue, events: Epoll.input | Epoll.output | Epoll.peerClosed | Epoll.edgeTriggered, token: c.id)
        connections[c.id] = c
    }

    private func close(_ c: VsockConnection) {
        epoll.remove(c.socket.rawValue)
        connections[c.id] = nil
        if byPorts[Self.key(c.localPort, c.peerPort)] == c.id { byPorts[Self.key(c.localPort, c.peerPort)] = nil }
    }

    private func readConnectLine(_ c: VsockConnection) {
        var byte: [UInt8] = [0]
        while true {
            let r = try? byte.withUnsafeMutableBytes { try c.socket.readSome(into: $0) }
            guard let r else { return close(c) }
            switch r {
            case .wouldBlock: return
            case .done(0): return close(c)
            case .done:
                if byte[0] != UInt8(ascii: "\n") {
                    c.line.append(byte[0])
                    if c.line.count > 64 { return close(c) }
                    continue
                }
                let text = String(decoding: c.line, as: UTF8.self).trimmingSuffix()
                let parts = text.split(separator: " ")
                guard parts.count == 2, parts[0] == "CONNECT", let port = UInt32(parts[1]) else {
                    logger.info("vsock: host connection sent \"\(text)\" instead of CONNECT <port>; closed")
                    return close(c)
                }
                c.localPort = allocateLocalPort(peer: port)
                c.peerPort = port
                c.state = .connecting
                byPorts[Self.key(c.localPort, c.peerPort)] = c.id
                var h = header(for: c, op: VsockHeader.Op.request)
                h.length = 0
                queueControl(h)
                return
            }
        }
    }

    private func allocateLocalPort(peer: UInt32) -> UInt32 {
        repeat {
            nextLocalPort = nextLocalPort == UInt32.max ? 1 << 30 : nextLocalPort + 1
        } while byPorts[Self.key(nextLocalPort, peer)] != nil
        return nextLocalPort
    }

    private func header(for c: VsockConnection, op: UInt16) -> VsockHeader {
        var h = VsockHeader()
        h.sourceCID = VirtioVsock.hostCID
        h.destinationCID = guestCID
        h.sourcePort = c.localPort
        h.destinationPort = c.peerPort
        h.op = op
        h.bufferAllocation = Self.bufferAllocation
        h.forwardCount = c.forwarded
        c.advertisedForward = c.forwarded
        return h
    }

    private func resetPacket(to source: VsockHeader) -> VsockHeader {
        var h = VsockHeader()
        h.sourceCID = VirtioVsock.hostCID
        h.destinationCID = guestCID
        h.sourcePort = source.destinationPort
        h.destinationPort = source.sourcePort
        h.op = VsockHeader.Op.reset
        return h
    }

    private func flushOutbound(_ c: VsockConnection) {
        guard !c.outbound.isEmpty else { return }
        let r = try? c.outbound.withUnsafeBytes { try c.socket.writeSome($0) }
        switch r {
        case .done(let n)?:
            c.outbound.removeFirst(n)
            c.forwarded &+= UInt32(n)
        case .wouldBlock?: break
        case nil:
            queueControl(header(for: c, op: VsockHeader.Op.reset))
            return close(c)
        }
        if c.outbound.isEmpty && c.guestStoppedSending { c.socket.shutdownWrite() }
        maybeCreditUpdate(c)
    }

    private func maybeCreditUpdate(_ c: VsockConnection) {
        if c.forwarded &- c.advertisedForward >= Self.bufferAllocation / 4 {
            queueControl(header(for: c, op: VsockHeader.Op.creditUpdate))
        }
    }

    // MARK: guest to host

    private func processTransmit() throws {
        let memory = activation.memory
        try tx.drain(interrupt: activation.interrupt) { chain in
            guard chain.readableLength >= VsockHeader.size else { return 0 }
            let h = VsockHeader(try memory.gather(chain.readable, count: VsockHeader.size))
            guard h.sourceCID == guestCID, h.destinationCID == VirtioVsock.hostCID, h.type == VsockHeader.streamType else {
                if h.op != VsockHeader.Op.reset { queueControl(resetPacket(to: h)) }
                return 0
            }
            let payloadLength = min(Int(h.length), chain.readableLength - VsockHeader.size)
            try handleGuestPacket(h, payload: chain.readable, payloadLength: payloadLength, memory: memory)
            return 0
        }
    }

    private func handleGuestPacket(_ h: VsockHeader, payload: [GuestBuffer], payloadLength: Int, memory: GuestMemory) throws {
        let key = Self.key(h.destinationPort, h.sourcePort)
        guard let id = byPorts[key], let c = connections[id] else {
            if h.op == VsockHeader.Op.request { return connectToHost(h) }
            if h.op != VsockHeader.Op.reset { queueControl(resetPacket(to: h)) }
            return
        }
        c.peerBufferAllocation = h.bufferAllocation
        c.peerForwardCount = h.forwardCount
        switch h.op {
        case VsockHeader.Op.response:
            guard c.state == .connecting else { return }
            c.state = .established
            let reply = Array("OK \(c.localPort)\n".utf8)
            _ = try? reply.withUnsafeBytes { try c.socket.writeSome($0) }
            c.readable = true
        case VsockHeader.Op.readWrite:
            guard c.state == .established, payloadLength > 0 else { return }
            // Checked before copying anything: the guest cannot make the host buffer more than the
            // credit it was given.
            guard payloadLength <= Self.maxPayload, c.outbound.count + payloadLength <= Int(Self.bufferAllocation) else {
                logger.warning("vsock: guest port \(c.peerPort) overran its credit; connection reset")
                queueControl(header(for: c, op: VsockHeader.Op.reset))
                return close(c)
            }
            c.outbound += try memory.gather(payload, from: VsockHeader.size, count: payloadLength)
            flushOutbound(c)
        case VsockHeader.Op.shutdown:
            if h.flags & VsockHeader.shutdownSend != 0 {
                c.guestStoppedSending = true
                if c.outbound.isEmpty { c.socket.shutdownWrite() }
            }
            if h.flags & (VsockHeader.shutdownSend | VsockHeader.shutdownReceive) == VsockHeader.shutdownSend | VsockHeader.shutdownReceive {
                queueControl(header(for: c, op: VsockHeader.Op.reset))
                close(c)
            }
        case VsockHeader.Op.reset:
            close(c)
        case VsockHeader.Op.creditRequest:
            queueControl(header(for: c, op: VsockHeader.Op.creditUpdate))
        case VsockHeader.Op.creditUpdate:
            break
        case VsockHeader.Op.request:
            queueControl(header(for: c, op: VsockHeader.Op.reset))
            close(c)
        default:
            queueControl(header(for: c, op: VsockHeader.Op.reset))
            close(c)
        }
    }

    /// A guest connection to host port P: connect to `<uds_path>_P`.
    private func connectToHost(_ h: VsockHeader) {
        guard connections.count < Self.maxConnections, let socket = try? UnixStream.connect("\(udsPath)_\(h.destinationPort)") else {
            queueControl(resetPacket(to: h))
            return
        }
        let c = VsockConnection(id: nextID, socket: socket, state: .established, localPort: h.destinationPort, peerPort: h.sourcePort)
        nextID += 1
        c.peerBufferAllocation = h.bufferAllocation
        c.peerForwardCount = h.forwardCount
        do { try register(c) } catch {
            queueControl(resetPacket(to: h))
            return
        }
        byPorts[Self.key(c.localPort, c.peerPort)] = c.id
        queueControl(header(for: c, op: VsockHeader.Op.response))
        c.readable = true
    }

    // MARK: host to guest

    /// Fills receive buffers: control packets first, then data from readable sockets with credit.
    private func fillReceive() throws {
        let memory = activation.memory
        var added = false
        defer { if added, (try? rx.needsInterrupt()) == true { activation.interrupt.signalUsedBuffers() } }
        while true {
            let candidates = connections.values.filter { $0.state == .established && $0.readable && $0.peerCredit > 0 }
            if control.isEmpty && candidates.isEmpty { return }
            guard let chain = try rx.pop() else {
                if try rx.enableNotifications() { continue }
                return
            }
            guard chain.writableLength >= VsockHeader.size else {
                try rx.addUsed(head: chain.head, length: 0)
                added = true
                continue
            }
            if !control.isEmpty {
                let h = control.removeFirst()
                try memory.scatter(h.bytes, into: chain.writable)
                try rx.addUsed(head: chain.head, length: VsockHeader.size)
                added = true
                continue
            }
            var used = false
            for c in candidates {
                if let length = try readSocket(c, into: chain, memory: memory) {
                    try rx.addUsed(head: chain.head, length: length)
                    added = true
                    used = true
                    break
                }
            }
            if !used {
                // No socket had data for this buffer (or the buffer had no room): keep it for later.
                rx.undoPop()
                return
            }
        }
    }

    /// Reads from `c`'s socket into `chain` as one RW packet; nil when the socket had nothing.
    private func readSocket(_ c: VsockConnection, into chain: DescriptorChain, memory: GuestMemory) throws -> Int? {
        let room = min(chain.writableLength - VsockHeader.size, c.peerCredit, Self.maxPayload)
        guard room > 0 else { return nil }
        let target = chain.writable.slice(from: VsockHeader.size, count: room)
        let result = try? memory.withHostBuffers(target.ranges) { try c.socket.readVector($0) }
        switch result {
        case .done(let n)? where n > 0:
            var h = header(for: c, op: VsockHeader.Op.readWrite)
            h.length = UInt32(n)
            c.sent &+= UInt32(n)
            try memory.scatter(h.bytes, into: chain.writable)
            return VsockHeader.size + n
        case .wouldBlock?:
            c.readable = false
            return nil
        default:
            // End of stream or an error: tell the guest that the host side is done.
            c.readable = false
            c.socketEOF = true
            var h = header(for: c, op: VsockHeader.Op.shutdown)
            h.flags = VsockHeader.shutdownSend | VsockHeader.shutdownReceive
            try memory.scatter(h.bytes, into: chain.writable)
            return VsockHeader.size
        }
    }
}

extension String {
    fileprivate func trimmingSuffix() -> String {
        var s = self
        while let last = s.last, last == "\r" || last == " " { s.removeLast() }
        return s
    }
}
