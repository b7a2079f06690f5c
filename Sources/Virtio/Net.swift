// Virtio (layer 2): virtio-net on a TAP device, with the virtio-net header passed through so that
// checksum and segmentation offloads work end to end.
//
// TX: each chain (header + frame) is written to the TAP with one writev straight from guest
// memory. RX: a frame is read from the TAP into a 64 KiB buffer, then spread over as many
// receive chains as it needs (VIRTIO_NET_F_MRG_RXBUF). When the guest has no receive buffers
// the TAP is not polled until the guest adds some.
import GuestMemory
import LinuxSystem
import Logging
import Synchronization

/// A virtio-net device attached to a TAP interface.
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
    public let tapName: String
    public let mac: [UInt8]?
    let tap: OwnedFileDescriptor
    private let worker = WorkerSlot()
    let logger: Logger

    /// Opens TAP `tapName` (which must exist or be creatable by this process).
    public init(ifaceID: String, tapName: String, mac: [UInt8]?, logger: Logger) throws {
        self.ifaceID = ifaceID
        self.tapName = tapName
        self.mac = mac
        self.logger = logger
        do { tap = try TapDevice.open(tapName, vnetHeaderSize: Int32(Self.headerSize)) } catch {
            throw VirtioError("network interface \(ifaceID): cannot open TAP device \(tapName): \(error)")
        }
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
        var offloads: TapDevice.Offloads = []
        if a.features & Feature.guestChecksum != 0 {
            offloads.insert(.checksum)
            if a.features & Feature.guestTSO4 != 0 { offloads.insert(.tso4) }
            if a.features & Feature.guestTSO6 != 0 { offloads.insert(.tso6) }
        }
        try TapDevice.setOffloads(tap, offloads)
        let tap = self.tap
        let logger = self.logger
        try worker.start(name: "net-\(ifaceID)", activation: a, extra: [(tap.rawValue, Epoll.input, NetLoop.tapToken)]) { epoll in
            NetLoop(tap: tap, activation: a, epoll: epoll, logger: logger)
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
    static let tapToken: UInt64 = 2
    /// Frames moved per wake-up before interrupting the guest and looking at other work.
    static let batch = 64

    let tap: OwnedFileDescriptor
    let activation: VirtioActivation
    let epoll: Epoll
    let logger: Logger
    var rx: Virtqueue
    var tx: Virtqueue
    let mergeable: Bool
    /// Length of the frame in `frame` that did not fit in the guest's buffers yet (0: none).
    var pendingLength = 0
    var tapWatched = true
    var frame: [UInt8]

    init(tap: OwnedFileDescriptor, activation: VirtioActivation, epoll: Epoll, logger: Logger) {
        self.tap = tap
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
        let tap = self.tap
        let logger = self.logger
        try tx.drain(interrupt: activation.interrupt) { chain in
            guard chain.readableLength > VirtioNet.headerSize, chain.readableLength <= VirtioNet.maxFrame else {
                logger.debug("virtio-net: dropping a TX chain of \(chain.readableLength) bytes")
                return 0
            }
            let result = try memory.withHostBuffers(chain.readable.ranges) { buffers in
                try tap.writeVector(buffers.map { UnsafeRawBufferPointer($0) })
            }
            if result == .wouldBlock { logger.debug("virtio-net: TAP is full; a frame was dropped") }
            logger.trace("virtio-net: TX \(chain.readableLength) bytes in \(chain.readable.count) buffers: \(result)")
            return 0
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers.
    func receive() throws {
        var delivered = 0
        while delivered < Self.batch {
            if pendingLength == 0 {
                let result = try frame.withUnsafeMutableBytes { try tap.readSome(into: $0) }
                guard case .done(let n) = result, n > 0 else { break }
                pendingLength = n
            }
            if let exhaustedAt = try deliver() {
                // No room: wait for the guest to add buffers (the rx notification) before reading more.
                if try rx.enableNotifications(from: exhaustedAt) { continue }
                setTapWatched(false)
                break
            }
            pendingLength = 0
            delivered += 1
        }
        if pendingLength == 0 { setTapWatched(true) }
        logger.trace("virtio-net: RX delivered \(delivered), pending \(pendingLength), watching TAP \(tapWatched)")
        if delivered > 0, try rx.needsInterrupt() { activation.interrupt.signalUsedBuffers() }
    }

    private func setTapWatched(_ on: Bool) {
        guard on != tapWatched else { return }
        tapWatched = on
        try? epoll.modify(tap.rawValue, events: on ? Epoll.input : 0, token: Self.tapToken)
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
            for c in chains { try rx.addUsed(head: c.head, length: 0) }
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
            try memory.withHostBuffers(chain.writable.slice(from: 0, count: n).ranges) { buffers in
                var at = done
                frame.withUnsafeBytes { source in
                    for b in buffers {
                        b.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[at..<at + b.count]))
                        at += b.count
                    }
                }
            }
            try rx.addUsed(head: chain.head, length: n)
            done += n
        }
        return nil
    }
}
