// Switch layer: VXLAN ports (RFC 7348), interoperable with Linux `vxlan` devices and other
// switches. Each port has a UDP socket connected to its `remote_ip`, so the kernel hands it only
// that peer's datagrams; the VNI (`options:key`) is checked on the way in and stamped on the way
// out. Frames that arrive with offloads pending (a TSO super-frame, a partial checksum) are
// segmented and checksummed in software first, since a tunnel carries only wire-ready frames.
import LinuxSystem
import Synchronization

/// The UDP socket the VXLAN ports of one bridge share, and which remote and VNI maps to which port.
public final class VXLANSocket: Sendable {
    struct Route: Hashable {
        var remote: UInt32
        var vni: UInt32
    }
    public let port: UInt16
    public let bridge: String
    let descriptor: OwnedFileDescriptor
    let routes = Mutex<[Route: UInt32]>([:])

    public init(bridge: String, port: UInt16) throws(SystemError) {
        descriptor = try UDPSocket.bind(port: port)
        self.port = port
        self.bridge = bridge
    }

    var isUnused: Bool { routes.withLock { $0.isEmpty } }
}

public final class VXLANPort: DatapathPort, @unchecked Sendable {
    // SAFETY (@unchecked): the scratch batch is used only by the datapath thread.
    public static let defaultPort: UInt16 = 4789
    public let ofport: UInt32
    public let name: String
    public let counters = PortCounters()
    public let vni: UInt32
    /// The remote's IPv4 address, network byte order.
    let remote: UInt32
    let socket: VXLANSocket
    private let scratch = FrameBatch(capacity: 64, frameCapacity: 9216)

    /// `remote` is a dotted IPv4 address.
    public init(name: String, ofport: UInt32, remote: String, vni: UInt32, socket: VXLANSocket) throws {
        guard let address = parseIPv4(remote) else { throw SwitchError("\(name): remote_ip \(remote) is not an IPv4 address") }
        guard vni < 1 << 24 else { throw SwitchError("\(name): key \(vni) is not a 24-bit VNI") }
        let route = VXLANSocket.Route(remote: address.bigEndian, vni: vni)
        let taken = socket.routes.withLock { routes -> Bool in
            if routes[route] != nil { return true }
            routes[route] = ofport
            return false
        }
        guard !taken else { throw SwitchError("\(name): another port already tunnels VNI \(vni) to \(remote)") }
        self.remote = address.bigEndian
        self.socket = socket
        self.name = name
        self.ofport = ofport
        self.vni = vni
    }

    /// Stops receiving for this port (it is being removed).
    public func detach() {
        _ = socket.routes.withLock { $0.removeValue(forKey: VXLANSocket.Route(remote: remote, vni: vni)) }
    }

    public var pollDescriptor: Int32 { socket.descriptor.rawValue }

    /// Reads datagrams for every VXLAN port of the bridge and marks each frame with its port.
    public func receive(into batch: FrameBatch) -> Int {
        guard let count = try? batch.receive(fromUDP: socket.descriptor), count > 0 else { return 0 }
        let routes = socket.routes.withLock { $0 }
        for index in 0..<count {
            // Flags with the I bit and a known (remote, VNI); anything else is dropped.
            let vni = batch.u32(index, 4) >> 8
            guard batch.length(index) >= 8 + 14, batch.byte(index, 0) & 0x08 != 0,
                let target = routes[VXLANSocket.Route(remote: batch.sources[index], vni: vni)]
            else {
                batch.truncate(index, to: 0)
                continue
            }
            batch.remove(index, at: 0, count: 8)
            batch.inPorts[index] = target
            Offload.repairOffloads(batch, index)
        }
        return count
    }

    public func send(_ frames: [FrameRef]) -> Int {
        let header: [UInt8] = [0x08, 0, 0, 0, UInt8((vni >> 16) & 0xFF), UInt8((vni >> 8) & 0xFF), UInt8(vni & 0xFF), 0]
        scratch.reset()
        func flush() {
            UDPSocket.send(socket.descriptor, (0..<scratch.count).map { (FrameRef(scratch, $0), remote) }, port: socket.port)
            scratch.reset()
        }
        for frame in frames {
            let bytes = frame.batch.bytes(frame.index, 0..<frame.batch.length(frame.index))
            for segment in Offload.wireReady(bytes, frame.batch.headers[frame.index]) {
                if scratch.count == scratch.capacity { flush() }
                guard scratch.append(segment), scratch.insert(scratch.count - 1, at: 0, header) else { continue }
            }
        }
        if scratch.count > 0 { flush() }
        return frames.count
    }
}
