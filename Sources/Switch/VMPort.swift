// Switch layer: the in-process port for a VM. A virtio-net device in the same process plugs into a
// bridge through `VMPort.backend`, with no TAP in between. Frames cross between the device's thread
// and the datapath thread through two bounded queues, each with an eventfd that its reader polls,
// and keep their virtio-net header, so a guest's TSO frames and partial checksums cross the switch
// whole. Frames the guest cannot take with offloads pending (it did not negotiate them) are
// segmented and checksummed here first.
import LinuxSystem
import NIOCore
import Synchronization
import Virtio

/// A queue of frames from one thread to another; its eventfd is readable while frames may wait.
final class FrameQueue: Sendable {
    typealias Item = (frame: [UInt8], header: VirtioNetHeader)
    let ready: EventFD
    let limit: Int
    private let items = Mutex(CircularBuffer<Item>(initialCapacity: 64))

    init(limit: Int) throws(SystemError) {
        self.limit = limit
        ready = try EventFD(nonBlocking: true)
    }

    /// Appends what fits under the limit; returns how many were taken. Only a push into an empty
    /// queue signals: while the queue is not empty, its reader is either signalled already or
    /// still taking frames and will look again before it sleeps.
    func push(_ new: [Item]) -> Int {
        let (taken, wasEmpty) = items.withLock { items -> (Int, Bool) in
            let wasEmpty = items.isEmpty
            let room = min(new.count, max(0, limit - items.count))
            items.append(contentsOf: new.prefix(room))
            return (room, wasEmpty)
        }
        if taken > 0, wasEmpty { try? ready.signal() }
        return taken
    }

    /// Takes up to `max` frames, or none. The eventfd stays readable while frames wait: it is
    /// drained only when the queue looked empty, and then the queue is looked at again (a push
    /// in between is not missed) and re-signalled if frames are left behind.
    func pop(max: Int) -> [Item] {
        let first = take(max)
        if !first.taken.isEmpty { return first.taken }
        _ = try? ready.wait()
        let second = take(max)
        if second.more { try? ready.signal() }
        return second.taken
    }

    private func take(_ max: Int) -> (taken: [Item], more: Bool) {
        items.withLock { items in
            var taken: [Item] = []
            taken.reserveCapacity(min(max, items.count))
            while taken.count < max, let item = items.popFirst() { taken.append(item) }
            return (taken, !items.isEmpty)
        }
    }
}

/// A bridge port whose other end is a virtio-net device in this process.
public final class VMPort: DatapathPort, Sendable {
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    /// The device's side: give it to `VirtioNet(backend:)`.
    public let backend: Backend
    /// Frames a queue holds before more are dropped (as a full TAP would).
    public static let queueLimit = 1024

    public init(name: String, ofport: UInt32) throws(SystemError) {
        self.name = name
        self.ofport = ofport
        backend = try Backend(name: name)
    }

    public var pollDescriptor: Int32 { backend.toSwitch.ready.rawValue }

    public func receive(into batch: FrameBatch) -> Int {
        // A frame from the device is at most VirtioNet.maxFrame bytes, which always fits a slot.
        for item in backend.toSwitch.pop(max: batch.capacity) { _ = batch.append(item.frame, header: item.header) }
        return batch.count
    }

    public func send(_ frames: [FrameRef]) -> Int {
        let accepts = backend.guestOffloads.load(ordering: .relaxed)
        var items: [FrameQueue.Item] = []
        items.reserveCapacity(frames.count)
        for frame in frames {
            let bytes = frame.batch.bytes(frame.index, 0..<frame.batch.length(frame.index))
            let header = frame.batch.headers[frame.index]
            if !header.hasOffloads || Backend.guestTakes(header, accepts) {
                items.append((bytes, header))
            } else {
                for segment in Offload.wireReady(bytes, header) { items.append((segment, VirtioNetHeader())) }
            }
        }
        let pushed = backend.toGuest.push(items)
        return pushed == items.count ? frames.count : min(frames.count, pushed)
    }

    /// The virtio-net device's end of the port.
    public final class Backend: NetworkBackend, Sendable {
        public let name: String
        let toSwitch: FrameQueue
        let toGuest: FrameQueue
        /// Offloads the guest driver accepts on receive: bit 0 checksum, 1 TSO4, 2 TSO6.
        let guestOffloads = Atomic<UInt8>(0)

        init(name: String) throws(SystemError) {
            self.name = "switch port \(name)"
            toSwitch = try FrameQueue(limit: VMPort.queueLimit)
            toGuest = try FrameQueue(limit: VMPort.queueLimit)
        }

        static func guestTakes(_ header: VirtioNetHeader, _ accepts: UInt8) -> Bool {
            guard accepts & 1 != 0 else { return false }
            switch header.gsoType {
            case VirtioNetHeader.gsoNone: return true
            case VirtioNetHeader.gsoTCPv4: return accepts & 2 != 0
            case VirtioNetHeader.gsoTCPv6: return accepts & 4 != 0
            default: return false
            }
        }

        public var readinessDescriptor: Int32 { toGuest.ready.rawValue }

        /// A frame from the guest: its 12-byte virtio-net header, then the frame.
        public func send(_ buffers: [UnsafeRawBufferPointer]) throws -> TransferResult {
            // The header's 10 bytes of offload state, then the frame, each gathered once.
            let header = VirtioNetHeader(wire: RawBytes.gather(buffers, count: VirtioNetHeader.size))
            let frame = RawBytes.gather(buffers, from: VirtioNet.headerSize)
            guard let header, frame.count >= 14 else {
                let total = buffers.reduce(0) { $0 + $1.count }
                throw SwitchError("a frame from the guest is \(total) bytes, shorter than a header and an Ethernet header")
            }
            return toSwitch.push([(frame, header)]) == 1 ? .done(VirtioNet.headerSize + frame.count) : .wouldBlock
        }

        /// A frame for the guest, header first; `.wouldBlock` when none is waiting.
        public func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> TransferResult {
            while let item = toGuest.pop(max: 1).first {
                // The 12-byte header: the 10 bytes of offload state, then num_buffers (the device fills it in).
                if let length = RawBytes.scatter([item.header.wire, [0, 0], item.frame], into: buffer) { return .done(length) }
            }
            return .wouldBlock
        }

        public func guestAccepts(checksum: Bool, tso4: Bool, tso6: Bool) throws {
            guestOffloads.store((checksum ? 1 : 0) | (checksum && tso4 ? 2 : 0) | (checksum && tso6 ? 4 : 0), ordering: .relaxed)
        }
    }
}
