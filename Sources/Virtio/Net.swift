// Virtio (layer 2): virtio-net over a `NetworkBackend` (a TAP device today), with the virtio-net
// header passed through so that checksum and segmentation offloads work end to end.
//
// TX: each chain (header + frame) is handed to the backend in one vectored write straight from
// guest memory. RX: a frame is read from the backend into a 64 KiB buffer, then spread over as
// many receive chains as it needs (VIRTIO_NET_F_MRG_RXBUF), all published at once. When the
// guest has no receive buffers the backend is not polled until the guest adds some.
import GuestMemory
import LinuxSystem
import Logging
import Synchronization

/// Where a virtio-net device's frames go. Frames carry the 12-byte virtio-net header both ways.
/// A TAP device is one backend; a port of a Nimbus switch in the same process is meant to be
/// another (issue 5), with an eventfd as its readiness descriptor.
public protocol NetworkBackend: AnyObject, Sendable {
    /// What the backend is, for messages.
    var name: String { get }
    /// Polls readable while a frame is waiting to be received.
    var readinessDescriptor: Int32 { get }
    /// Sends one frame (header first), gathered from `buffers`.
    func send(_ buffers: [UnsafeRawBufferPointer]) throws -> TransferResult
    /// Receives one frame (header first) into `buffer`; `.wouldBlock` when none is waiting.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> TransferResult
    /// The guest accepts partially checksummed frames and, with them, these segmentation offloads.
    func guestAccepts(checksum: Bool, tso4: Bool, tso6: Bool) throws
}

/// A TAP interface opened with IFF_VNET_HDR.
public final class TapBackend: NetworkBackend {
    public let name: String
    let tap: OwnedFileDescriptor

    /// Opens TAP `name` (which must exist or be creatable by this process).
    public init(name: String) throws {
        self.name = "TAP \(name)"
        tap = try TapDevice.open(name, vnetHeaderSize: Int32(VirtioNet.headerSize))
    }

    public var readinessDescriptor: Int32 { tap.rawValue }
    public func send(_ buffers: [UnsafeRawBufferPointer]) throws -> TransferResult { try tap.writeVector(buffers) }
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> TransferResult { try tap.readSome(into: buffer) }

    public func guestAccepts(checksum: Bool, tso4: Bool, tso6: Bool) throws {
        var offloads: TapDevice.Offloads = []
        if checksum {
            offloads.insert(.checksum)
            if tso4 { offloads.insert(.tso4) }
            if tso6 { offloads.insert(.tso6) }
        }
        try TapDevice.setOffloads(tap, offloads)
    }
}

/// A virtio-net device.
public final class VirtioNet: VirtioBackend {
    enum Feature {
        static let checksum: UInt64 = 1 << 0
        static let guestChecksum: UInt64 = 1 << 1
        static let mac: UInt64 = 1 << 5
        static let guestTSO4: UInt64 = 1 << 7
        static let guestTSO6: UInt64 = 1 << 8
        static let hostTSO4: UInt64 = 1 << 11
        static let hostTSO6: UInt64 = 1 << 12
        static let mergeableRxBuffers: UInt64 = 1 << 15
    }
    /// virtio_net_hdr_v1: what both the guest (VERSION_1) and the TAP (TUNSETVNETHDRSZ) use.
    public static let headerSize = 12
    public static let queueSize: UInt16 = 256
    /// The largest frame a TAP with offloads hands over, plus the header.
    static let maxFrame = 65_562 + 12

    public let ifaceID: String
    public let backend: any NetworkBackend
    public let mac: [UInt8]?
    private let worker = WorkerSlot()
    let logger: Logger

    public init(ifaceID: String, backend: any NetworkBackend, mac: [UInt8]?, logger: Logger) {
        self.ifaceID = ifaceID
        self.backend = backend
        self.mac = mac
        self.logger = logger
    }

    public var deviceID: UInt32 { 1 }
    public var queueSizes: [UInt16] { [Self.queueSize, Self.queueSize] }
    public var features: UInt64 {
        var f = VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors | Feature.checksum | Feature.guestChecksum
        f |= Feature.guestTSO4 | Feature.guestTSO6 | Feature.hostTSO4 | Feature.hostTSO6 | Feature.mergeableRxBuffers
        if mac != nil { f |= Feature.mac }
        return f
    }

    public func readConfig(offset: Int, count: Int) -> [UInt8] {
        var config = [UInt8](repeating: 0, count: 12)
        if let mac { config.replaceSubrange(0..<6, with: mac) }
        config[8] = 1  // max_virtqueue_pairs
        return configSlice(config, offset: offset, count: count)
    }

    public func writeConfig(offset: Int, data: [UInt8]) {}

    public func activate(_ a: VirtioActivation) throws {
        try backend.guestAccepts(
            checksum: a.features & Feature.guestChecksum != 0, tso4: a.features & Feature.guestTSO4 != 0,
            tso6: a.features & Feature.guestTSO6 != 0)
        let (backend, logger) = (self.backend, self.logger)
        try worker.start(name: "net-\(ifaceID)", activation: a, extra: [(backend.readinessDescriptor, Epoll.input, NetLoop.backendToken)]) {
            epoll in NetLoop(backend: backend, activation: a, epoll: epoll, logger: logger)
        }
    }

    public func reset() { worker.stop() }
}

/// A device could not be set up.
public struct VirtioError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The net device's thread state.
final class NetLoop: DeviceLoop {
    static let rxToken: UInt64 = 0
    static let txToken: UInt64 = 1
    static let backendToken: UInt64 = 2
    /// Frames moved per wake-up before interrupting the guest and looking at other work.
    static let batch = 64

    let backend: any NetworkBackend
    let activation: VirtioActivation
    let epoll: Epoll
    let logger: Logger
    var rx: Virtqueue
    var tx: Virtqueue
    let mergeable: Bool
    /// Length of the frame in `frame` that did not fit in the guest's buffers yet (0: none).
    var pendingLength = 0
    var backendWatched = true
    var frame: [UInt8]

    init(backend: any NetworkBackend, activation: VirtioActivation, epoll: Epoll, logger: Logger) {
        self.backend = backend
        self.activation = activation
        self.epoll = epoll
        self.logger = logger
        rx = activation.queues[0]
        tx = activation.queues[1]
        mergeable = activation.features & VirtioNet.Feature.mergeableRxBuffers != 0
        frame = [UInt8](repeating: 0, count: VirtioNet.maxFrame)
    }

    func handle(_ event: Epoll.Event) throws {
        switch event.token {
        case Self.rxToken:
            _ = try? activation.notifiers[0].wait()
            try receive()
        case Self.txToken:
            _ = try? activation.notifiers[1].wait()
            try transmit()
        default:
            try receive()
        }
    }

    /// Sends every frame the guest queued.
    func transmit() throws {
        let memory = activation.memory
        let backend = self.backend
        let logger = self.logger
        try tx.drain(interrupt: activation.interrupt) { chain in
            guard chain.readableLength > VirtioNet.headerSize, chain.readableLength <= VirtioNet.maxFrame else {
                logger.debug("virtio-net: dropping a TX chain of \(chain.readableLength) bytes")
                return 0
            }
            // A backend's error refuses this one frame (EINVAL from a TAP for a malformed GSO
            // header, say): it is dropped. Only a chain outside guest memory is the device's error.
            let result = try memory.withHostBuffers(chain.readable.ranges) { buffers -> TransferResult in
                do {
                    return try backend.send(buffers.map { UnsafeRawBufferPointer($0) })
                } catch {
                    logger.debug("virtio-net: \(backend.name) refused a frame: \(error)")
                    return .done(0)
                }
            }
            if result == .wouldBlock { logger.debug("virtio-net: \(backend.name) is full; a frame was dropped") }
            logger.trace("virtio-net: TX \(chain.readableLength) bytes in \(chain.readable.count) buffers: \(result)")
            return 0
        }
    }

    /// Moves frames from the backend into the guest's receive buffers.
    func receive() throws {
        var delivered = 0
        while delivered < Self.batch {
            if pendingLength == 0 {
                let result = try frame.withUnsafeMutableBytes { try backend.receive(into: $0) }
                guard case .done(let n) = result, n > 0 else { break }
                pendingLength = n
            }
            if let exhaustedAt = try deliver() {
                // No room: wait for the guest to add buffers (the rx notification) before reading more.
                if try rx.enableNotifications(from: exhaustedAt) { continue }
                setBackendWatched(false)
                break
            }
            pendingLength = 0
            delivered += 1
        }
        if pendingLength == 0 { setBackendWatched(true) }
        logger.trace("virtio-net: RX delivered \(delivered), pending \(pendingLength), watching \(backend.name) \(backendWatched)")
        if delivered > 0, try rx.needsInterrupt() { activation.interrupt.signalUsedBuffers() }
    }

    private func setBackendWatched(_ on: Bool) {
        guard on != backendWatched else { return }
        backendWatched = on
        try? epoll.modify(backend.readinessDescriptor, events: on ? Epoll.input : 0, token: Self.backendToken)
    }

    /// Places the pending frame into receive chains. When the guest lacks the room, takes nothing
    /// and returns the available index at which the buffers ran out.
    private func deliver() throws -> UInt16? {
        let length = pendingLength
        var chains: [DescriptorChain] = []
        var capacity = 0
        while capacity < length {
            guard let chain = try rx.pop() else {
                let exhaustedAt = rx.lastAvailable
                rx.undoPop(chains.count)
                return exhaustedAt
            }
            chains.append(chain)
            capacity += chain.writableLength
            if !mergeable { break }
        }
        let memory = activation.memory
        if capacity < length || chains[0].writableLength < VirtioNet.headerSize {
            logger.debug("virtio-net: a \(length)-byte frame does not fit the guest's buffers; dropped")
            for c in chains { try rx.putUsed(head: c.head, length: 0) }
            try rx.publishUsed()
            return nil
        }
        if mergeable {
            let count = UInt16(chains.count)
            frame[10] = UInt8(count & 0xff)
            frame[11] = UInt8(count >> 8)
        }
        var done = 0
        for chain in chains {
            let n = min(chain.writableLength, length - done)
            try memory.scatter(frame[done..<done + n], into: chain.writable)
            try rx.putUsed(head: chain.head, length: n)
            done += n
        }
        // All buffers of the frame at once: the driver reads num_buffers from the first and
        // expects the rest to be there already.
        try rx.publishUsed()
        return nil
    }
}
