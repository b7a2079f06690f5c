// Switch layer: the kinds of port a bridge has. `system` ports are kernel interfaces (a veth end)
// read and written through an AF_PACKET socket; `internal` ports are TAP devices the switch
// creates and names after the port; `tap` ports attach to an existing TAP; `MemoryPort`s are
// in-process (VMs' virtio-net devices, and tests); `dgram` ports exchange frames with another
// program over Unix datagrams. Sockets and TAPs carry virtio-net headers, so TSO frames and
// partial checksums cross the switch whole.
import Glibc
import LinuxSystem
import Synchronization

/// A kernel interface reached through an AF_PACKET socket.
public final class SystemPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the socket is used only by the datapath thread once the port is added.
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    let socket: FrameSocket
    private let coalescer = UDPCoalescer()

    public init(name: String, ofport: UInt32) throws(SystemError) {
        try NetworkInterface.setUp(name)
        socket = try FrameSocket(interface: name, vnetHeader: true)
        self.name = name
        self.ofport = ofport
    }

    public var pollDescriptor: Int32 { socket.descriptor.rawValue }
    public func receive(into batch: FrameBatch) -> Int { (try? batch.receive(from: socket)) ?? 0 }
    public func send(_ frames: [FrameRef]) -> Int {
        coalescer.send(frames) { [socket] outgoing in
            let sent = socket.send(outgoing)
            return (sent, socket.lastSendError)
        }
    }
}

/// A `dgram` port: frames as Unix datagrams to and from another program, typically a VM monitor
/// (QEMU's `-netdev dgram` with unix local and remote addresses, or nimbus-vmm's `"type": "dgram"`
/// uplink), so a VM joins the bridge without a TAP. The switch binds `options:local_path` and sends
/// to `options:remote_path`; once that socket exists the port connects to it, which makes it the
/// only source the kernel accepts. `options:vnet_hdr=true` puts a 10-byte virtio-net header before
/// each frame (nimbus-vmm does), so TSO frames and partial checksums cross whole.
public final class DatagramPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the socket and `connected` are used only by the datapath thread once the
    // port is added.
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    let socket: FrameSocket
    private var connected = false
    private var lastAttempt: UInt64 = 0
    /// Segments of the frames being sent (without virtio-net headers, offloads are done here);
    /// made on first use, so a port with headers never has one.
    private lazy var scratch = FrameBatch(capacity: 256, frameCapacity: 9216)

    public init(name: String, ofport: UInt32, localPath: String, remotePath: String, vnetHeader: Bool) throws(SystemError) {
        socket = try FrameSocket(unixDatagram: localPath, remotePath: remotePath, vnetHeader: vnetHeader)
        self.name = name
        self.ofport = ofport
        connected = (try? socket.connect()) != nil
    }

    /// What is wrong with a `dgram` interface's options, or nil.
    public static func optionsProblem(_ options: [String: String]) -> String? {
        for key in ["local_path", "remote_path"] {
            guard let path = options[key], !path.isEmpty else { return "dgram type requires '\(key)' argument" }
            guard path.hasPrefix("/"), path.utf8.count < 108 else { return "\(key) \(path) is not an absolute path of under 108 bytes" }
        }
        if let header = options["vnet_hdr"], header != "true", header != "false" { return "vnet_hdr=\(header) is not true or false" }
        return nil
    }

    public var pollDescriptor: Int32 { socket.descriptor.rawValue }

    public func receive(into batch: FrameBatch) -> Int {
        let received = (try? batch.receive(from: socket)) ?? 0
        // Until the peer is connected any local program could send here: such frames are dropped
        // (the first frames of a peer that has just started, too; the kernel filters after that).
        guard connected else {
            _ = connectNow()
            batch.reset()
            return 0
        }
        return received
    }

    public func send(_ frames: [FrameRef]) -> Int {
        guard connected || connectNow() else { return 0 }
        guard !socket.vnetHeader, frames.contains(where: { $0.batch.headers[$0.index].hasOffloads }) else {
            return transmit(frames) ? frames.count : 0
        }
        // Without headers the peer gets wire-ready frames only: segmented, checksums complete. A
        // TSO frame makes up to 45 segments, so the scratch batch is sent whenever it fills.
        var outgoing: [FrameRef] = []
        scratch.reset()
        for frame in frames {
            let header = frame.batch.headers[frame.index]
            guard header.hasOffloads else {
                outgoing.append(frame)
                continue
            }
            let bytes = frame.batch.bytes(frame.index, 0..<frame.batch.length(frame.index))
            for segment in Offload.wireReady(bytes, header) {
                if scratch.count == scratch.capacity {
                    guard transmit(outgoing) else { return 0 }
                    outgoing.removeAll(keepingCapacity: true)
                    scratch.reset()
                }
                if scratch.append(segment) { outgoing.append(FrameRef(scratch, scratch.count - 1)) }
            }
        }
        return transmit(outgoing) ? frames.count : 0
    }

    /// How long a send waits in all for the peer to drain its queue. A Unix datagram queue holds
    /// only `net.unix.max_dgram_qlen` datagrams (10 by default), fewer than one TSO frame's
    /// segments, so the port waits for room (briefly, as a NIC's queue would back-pressure) before
    /// it drops.
    static let drainWaitMilliseconds: Int32 = 20

    /// Sends frames; false when the peer's socket is gone (the VM stopped): a new one at the same
    /// path is connected to on a later try. What the peer has no room for within the wait is dropped.
    private func transmit(_ frames: [FrameRef]) -> Bool {
        var rest = frames[...]
        let deadline = Host.monotonicNanoseconds() &+ UInt64(Self.drainWaitMilliseconds) * 1_000_000
        while !rest.isEmpty {
            let sent = socket.send(Array(rest))
            rest = rest.dropFirst(sent)
            guard !rest.isEmpty else { break }
            if [ECONNREFUSED, ENOTCONN].contains(socket.lastSendError) {
                connected = false
                return false
            }
            let now = Host.monotonicNanoseconds()
            // A frame the kernel refuses outright (a bad header from a hostile peer) is skipped.
            if socket.lastSendError != 0 {
                rest = rest.dropFirst()
                continue
            }
            guard now < deadline, socket.waitWritable(milliseconds: Int32(max(1, (deadline - now) / 1_000_000))) else { break }
        }
        return true
    }

    /// Tries to connect, at most once a second.
    private func connectNow() -> Bool {
        let now = Host.monotonicNanoseconds()
        guard now &- lastAttempt >= 1_000_000_000 else { return false }
        lastAttempt = now
        connected = (try? socket.connect()) != nil
        return connected
    }
}

/// A TAP device: created by the switch for `internal` ports, or an existing one for `tap` ports.
public final class TapPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the descriptor is used only by the datapath thread once the port is added.
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    let descriptor: OwnedFileDescriptor
    private let coalescer = UDPCoalescer()

    public init(name: String, ofport: UInt32) throws(SystemError) {
        descriptor = try TapDevice.open(name, vnetHeaderSize: Int32(VirtioNetHeader.size))
        try TapDevice.setOffloads(descriptor, [.checksum, .tso4, .tso6, .tsoECN])
        try NetworkInterface.setUp(name)
        self.name = name
        self.ofport = ofport
    }

    public var pollDescriptor: Int32 { descriptor.rawValue }
    public func receive(into batch: FrameBatch) -> Int { (try? batch.receive(fromTap: descriptor)) ?? 0 }
    public func send(_ frames: [FrameRef]) -> Int { coalescer.send(frames) { [descriptor] in TapDevice.send(descriptor, $0) } }
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
