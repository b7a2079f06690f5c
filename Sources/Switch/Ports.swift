// Switch layer: the kinds of port a bridge has. `system` ports are kernel interfaces (a veth end)
// read and written through an AF_PACKET socket; `internal` ports are TAP devices the switch
// creates and names after the port; `tap` ports attach to an existing TAP; `MemoryPort`s are
// in-process (VMs' virtio-net devices, and tests). Sockets and TAPs carry virtio-net headers, so
// TSO frames and partial checksums cross the switch whole.
import LinuxSystem
import Synchronization

/// A kernel interface reached through an AF_PACKET socket.
public final class SystemPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the socket is used only by the datapath thread once the port is added.
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    let socket: PacketSocket

    public init(name: String, ofport: UInt32) throws(SystemError) {
        try NetworkInterface.setUp(name)
        socket = try PacketSocket(interface: name, vnetHeader: true)
        self.name = name
        self.ofport = ofport
    }

    public var pollDescriptor: Int32 { socket.descriptor.rawValue }
    public func receive(into batch: FrameBatch) -> Int { (try? batch.receive(from: socket)) ?? 0 }
    public func send(_ frames: [FrameRef]) -> Int { socket.send(frames) }
}

/// A TAP device: created by the switch for `internal` ports, or an existing one for `tap` ports.
public final class TapPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the descriptor is used only by the datapath thread once the port is added.
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    let descriptor: OwnedFileDescriptor

    public init(name: String, ofport: UInt32) throws(SystemError) {
        descriptor = try TapDevice.open(name, vnetHeaderSize: Int32(VirtioNetHeader.size))
        try TapDevice.setOffloads(descriptor, [.checksum, .tso4, .tso6, .tsoECN])
        try NetworkInterface.setUp(name)
        self.name = name
        self.ofport = ofport
    }

    public var pollDescriptor: Int32 { descriptor.rawValue }
    public func receive(into batch: FrameBatch) -> Int { (try? batch.receive(fromTap: descriptor)) ?? 0 }
    public func send(_ frames: [FrameRef]) -> Int { TapDevice.send(descriptor, frames) }
}

/// An in-process port: frames sent to it queue up for its owner, and its owner injects frames.
public final class MemoryPort: DatapathPort, Sendable {
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    private let wake: EventFD
    private let inbound = Mutex<[[UInt8]]>([])
    private let outbound = Mutex<[[UInt8]]>([])
    /// Called (on the datapath thread) when frames were queued for the owner.
    let delivered: (@Sendable () -> Void)?

    public init(name: String, ofport: UInt32, delivered: (@Sendable () -> Void)? = nil) throws(SystemError) {
        self.name = name
        self.ofport = ofport
        self.delivered = delivered
        wake = try EventFD(nonBlocking: true)
    }

    public var pollDescriptor: Int32 { wake.rawValue }

    /// Hands a frame to the switch as if it arrived on this port.
    public func inject(_ frame: [UInt8]) {
        inbound.withLock { $0.append(frame) }
        try? wake.signal()
    }

    /// Frames the switch sent out of this port since the last call.
    public func take() -> [[UInt8]] {
        outbound.withLock { frames in
            defer { frames.removeAll() }; return frames
        }
    }

    public func receive(into batch: FrameBatch) -> Int {
        _ = try? wake.wait()
        let frames = inbound.withLock { frames -> [[UInt8]] in
            let taken = Array(frames.prefix(batch.capacity))
            frames.removeFirst(taken.count)
            return taken
        }
        for frame in frames { batch.append(frame) }
        if inbound.withLock({ !$0.isEmpty }) { try? wake.signal() }
        return batch.count
    }

    public func send(_ frames: [FrameRef]) -> Int {
        let copies = frames.map { $0.batch.bytes($0.index, 0..<$0.batch.length($0.index)) }
        outbound.withLock { $0.append(contentsOf: copies) }
        delivered?()
        return frames.count
    }
}
