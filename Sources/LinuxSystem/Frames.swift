// LinuxSystem (layer 1): Ethernet frames for the virtual switch. A `FrameBatch` owns the memory
// for a batch of frames and gives checked access to their bytes; AF_PACKET sockets, TAP devices
// and UDP sockets (VXLAN) fill batches and send frames from them in one system call per batch.
// Each frame sits after `headroom` bytes, so headers (a VLAN tag, a VXLAN encapsulation, the
// virtio-net header for offloads) can be put in front of it without copying the frame.
import CNimbusLinux
import Glibc

/// The 10-byte virtio-net header that carries checksum and segmentation offload state.
public struct VirtioNetHeader: Sendable, Equatable {
    public static let size = 10
    public static let needsChecksum: UInt8 = 1
    /// The receiving device already checked the frame's checksum.
    public static let dataValid: UInt8 = 2
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    /// UDP segmentation (UDP_SEGMENT senders, QUIC): the payload is cut into `gsoSize` datagrams.
    public static let gsoUDPL4: UInt8 = 5
    /// Set on `gsoType` with a TCP type when the segments carry ECN's CWR flag as the sender's stack left it.
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8 = 0
    public var gsoType: UInt8 = 0
    public var headerLength: UInt16 = 0
    public var gsoSize: UInt16 = 0
    public var checksumStart: UInt16 = 0
    public var checksumOffset: UInt16 = 0

    public init() {}

    public init(
        flags: UInt8, gsoType: UInt8, headerLength: UInt16, gsoSize: UInt16, checksumStart: UInt16, checksumOffset: UInt16
    ) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
    }

    /// Reads the header from the first 10 bytes of its little-endian wire form (nil if too short).
    public init?<Bytes: RandomAccessCollection>(wire bytes: Bytes) where Bytes.Element == UInt8, Bytes.Index == Int {
        guard bytes.count >= Self.size else { return nil }
        let base = bytes.startIndex
        func le16(_ at: Int) -> UInt16 { UInt16(bytes[base + at]) | UInt16(bytes[base + at + 1]) << 8 }
        self.init(
            flags: bytes[base], gsoType: bytes[base + 1], headerLength: le16(2), gsoSize: le16(4), checksumStart: le16(6),
            checksumOffset: le16(8))
    }

    /// Writes the 10-byte little-endian wire form at `offset` (which must leave room for it).
    public func store<Bytes: MutableCollection>(into bytes: inout Bytes, at offset: Int) where Bytes.Element == UInt8, Bytes.Index == Int {
        bytes[offset] = flags
        bytes[offset + 1] = gsoType
        for (at, value) in [(2, headerLength), (4, gsoSize), (6, checksumStart), (8, checksumOffset)] {
            bytes[offset + at] = UInt8(value & 0xFF)
            bytes[offset + at + 1] = UInt8(value >> 8)
        }
    }

    /// The 10-byte little-endian wire form.
    public var wire: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.size)
        store(into: &bytes, at: 0)
        return bytes
    }

    /// Whether the frame still needs a checksum completed or a segmentation done by its receiver.
    public var hasOffloads: Bool { flags & Self.needsChecksum != 0 || gsoType != Self.gsoNone }
}

/// Copies between Swift arrays and the raw buffers that device code hands around.
public enum RawBytes {
    /// Up to `count` bytes of `buffers`, in order, from byte `from` on, as one array.
    public static func gather(_ buffers: [UnsafeRawBufferPointer], from: Int = 0, count: Int = .max) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(min(count, max(0, buffers.reduce(0) { $0 + $1.count } - from)))
        var skip = max(0, from)
        // SAFETY: each buffer is a valid region for its count (the caller's contract); only read.
        for buffer in buffers where bytes.count < count {
            if skip >= buffer.count {
                skip -= buffer.count
                continue
            }
            let taken = min(buffer.count - skip, count - bytes.count)
            bytes.append(contentsOf: buffer[skip..<(skip + taken)])
            skip = 0
        }
        return bytes
    }

    /// Writes `parts` one after another at the start of `buffer`; nil (and nothing written) when
    /// they do not fit.
    public static func scatter(_ parts: [[UInt8]], into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        let total = parts.reduce(0) { $0 + $1.count }
        guard total <= buffer.count else { return nil }
        var offset = 0
        for part in parts {
            // SAFETY: offset + part.count <= total <= buffer.count, checked above.
            UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<(offset + part.count)]).copyBytes(from: part)
            offset += part.count
        }
        return total
    }
}

/// A batch of frames in one block of memory.
public final class FrameBatch {
    public static let headroom = 128
    /// Frames: how many the batch holds, and the largest one (a 64 KiB TSO frame plus headers).
    public let capacity: Int
    public let frameCapacity: Int
    private let slotSize: Int
    private let memory: UnsafeMutableRawBufferPointer
    // SAFETY (exclusivity unchecked on the per-frame arrays): a batch belongs to one thread, and
    // no method holds an access to one of them across a call that touches it again; the dynamic
    // exclusivity checks otherwise cost a tenth of the datapath's per-frame time.
    @exclusivity(unchecked) public private(set) var count = 0
    /// Offset of each frame's first byte (its Ethernet header) within its slot.
    @exclusivity(unchecked) private var starts: [Int]
    @exclusivity(unchecked) private var lengths: [Int]
    /// The VLAN tag the kernel took off the frame (bit 16 set when present).
    @exclusivity(unchecked) public private(set) var kernelTags: [UInt32]
    /// Each frame's offload state (all zero for sockets without virtio-net headers).
    @exclusivity(unchecked) public var headers: [VirtioNetHeader]
    /// For UDP batches: each datagram's source IPv4 address, network byte order.
    @exclusivity(unchecked) public private(set) var sources: [UInt32]
    /// The switch port each frame came in on, when the receiving port set it (0: the port itself).
    @exclusivity(unchecked) public var inPorts: [UInt32]

    public init(capacity: Int = 32, frameCapacity: Int = 65536 + 64) {
        self.capacity = capacity
        self.frameCapacity = frameCapacity
        slotSize = (Self.headroom + frameCapacity + 63) & ~63
        // SAFETY: a fresh allocation owned by this object and freed in deinit; every access goes
        // through `slot(_:)` bounds checks below.
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: slotSize * capacity, alignment: 64)
        starts = Array(repeating: Self.headroom, count: capacity)
        lengths = Array(repeating: 0, count: capacity)
        kernelTags = Array(repeating: 0, count: capacity)
        headers = Array(repeating: VirtioNetHeader(), count: capacity)
        sources = Array(repeating: 0, count: capacity)
        inPorts = Array(repeating: 0, count: capacity)
    }

    deinit { memory.deallocate() }

    public func length(_ index: Int) -> Int { lengths[index] }

    /// Forgets every frame.
    public func reset() { count = 0 }

    // MARK: checked access (offsets are relative to the frame's first byte)

    public func byte(_ index: Int, _ offset: Int) -> UInt8 {
        guard offset >= 0, offset < lengths[index] else { return 0 }
        return memory[index * slotSize + starts[index] + offset]
    }

    public func u16(_ index: Int, _ offset: Int) -> UInt16 {
        guard offset >= 0, offset + 2 <= lengths[index] else {
            return UInt16(byte(index, offset)) << 8 | UInt16(byte(index, offset + 1))
        }
        let at = index * slotSize + starts[index] + offset
        return UInt16(memory[at]) << 8 | UInt16(memory[at + 1])
    }

    public func u32(_ index: Int, _ offset: Int) -> UInt32 {
        UInt32(u16(index, offset)) << 16 | UInt32(u16(index, offset + 2))
    }

    public func setByte(_ index: Int, _ offset: Int, _ value: UInt8) {
        guard offset >= 0, offset < lengths[index] else { return }
        memory[index * slotSize + starts[index] + offset] = value
    }

    public func setU16(_ index: Int, _ offset: Int, _ value: UInt16) {
        setByte(index, offset, UInt8(value >> 8))
        setByte(index, offset + 1, UInt8(value & 0xFF))
    }

    public func setU32(_ index: Int, _ offset: Int, _ value: UInt32) {
        setU16(index, offset, UInt16(value >> 16))
        setU16(index, offset + 2, UInt16(value & 0xFFFF))
    }

    public func bytes(_ index: Int, _ range: Range<Int>) -> [UInt8] {
        let clamped = range.clamped(to: 0..<lengths[index])
        let base = index * slotSize + starts[index]
        return Array(memory[(base + clamped.lowerBound)..<(base + clamped.upperBound)])
    }

    /// Whether bytes `range` of frame `index` equal the same bytes of frame `otherIndex` of `other`;
    /// false when either frame is shorter than the range.
    public func equalBytes(_ index: Int, _ range: Range<Int>, _ other: FrameBatch, _ otherIndex: Int) -> Bool {
        guard range.lowerBound >= 0, range.upperBound <= lengths[index], range.upperBound <= other.lengths[otherIndex] else { return false }
        let mine = index * slotSize + starts[index] + range.lowerBound
        let theirs = otherIndex * other.slotSize + other.starts[otherIndex] + range.lowerBound
        // SAFETY: both ranges lie inside their frames (checked above), which lie inside their slots.
        let a = UnsafeRawBufferPointer(rebasing: memory[mine..<(mine + range.count)])
        let b = UnsafeRawBufferPointer(rebasing: other.memory[theirs..<(theirs + range.count)])
        guard let pa = a.baseAddress, let pb = b.baseAddress else { return range.isEmpty }
        return memcmp(pa, pb, range.count) == 0
    }

    /// Appends a frame with these bytes; false if the batch is full or the frame too large.
    @discardableResult
    public func append(_ frame: [UInt8], header: VirtioNetHeader = VirtioNetHeader()) -> Bool {
        guard count < capacity, frame.count <= frameCapacity else { return false }
        let index = count
        starts[index] = Self.headroom
        inPorts[index] = 0
        lengths[index] = frame.count
        headers[index] = header
        kernelTags[index] = 0
        let base = index * slotSize + Self.headroom
        // SAFETY: base + frame.count ≤ slot end, checked by the frameCapacity guard above.
        frame.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: memory[base..<(base + frame.count)]).copyMemory(from: $0) }
        count += 1
        return true
    }

    /// Copies frame `index` of `other` (with its header) into this batch; its new index, or nil if full.
    public func appendCopy(of index: Int, from other: FrameBatch) -> Int? {
        guard count < capacity, other.lengths[index] <= frameCapacity else { return nil }
        let target = count
        starts[target] = Self.headroom
        lengths[target] = other.lengths[index]
        headers[target] = other.headers[index]
        kernelTags[target] = 0
        let from = index * other.slotSize + other.starts[index]
        let to = target * slotSize + Self.headroom
        // SAFETY: both ranges lie inside their slots (lengths are bounded by frameCapacity).
        UnsafeMutableRawBufferPointer(rebasing: memory[to..<(to + lengths[target])])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: other.memory[from..<(from + lengths[target])]))
        count += 1
        return target
    }

    /// Appends bytes `offset...` of frame `otherIndex` of `other` to the end of frame `index` (the
    /// payload of one datagram after another's); false, and nothing changed, if it would not fit.
    @discardableResult
    public func extend(_ index: Int, with other: FrameBatch, _ otherIndex: Int, from offset: Int) -> Bool {
        let added = other.lengths[otherIndex] - offset
        guard offset >= 0, added >= 0, lengths[index] + added <= frameCapacity, starts[index] + lengths[index] + added <= slotSize else {
            return false
        }
        let to = index * slotSize + starts[index] + lengths[index]
        let from = otherIndex * other.slotSize + other.starts[otherIndex] + offset
        // SAFETY: the target range ends inside this frame's slot (checked above); the source range
        // lies inside the other frame, whose length is bounded by its slot.
        UnsafeMutableRawBufferPointer(rebasing: memory[to..<(to + added)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: other.memory[from..<(from + added)]))
        lengths[index] += added
        return true
    }

    /// Inserts `bytes` at `offset` (a VLAN tag after the MAC addresses, an encapsulation at 0) by
    /// moving the bytes before `offset` into the headroom. False if there is no room.
    @discardableResult
    public func insert(_ index: Int, at offset: Int, _ bytes: [UInt8]) -> Bool {
        guard offset >= 0, offset <= lengths[index], starts[index] - bytes.count >= VirtioNetHeader.size else { return false }
        let base = index * slotSize
        let oldStart = base + starts[index]
        let newStart = oldStart - bytes.count
        // SAFETY: newStart ≥ base + header size (checked); the moved range stays inside the slot.
        if offset > 0 {
            UnsafeMutableRawBufferPointer(rebasing: memory[newStart..<(newStart + offset)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory[oldStart..<(oldStart + offset)]))
        }
        for (position, byte) in bytes.enumerated() { memory[newStart + offset + position] = byte }
        starts[index] -= bytes.count
        lengths[index] += bytes.count
        return true
    }

    /// Removes `count` bytes at `offset` (a VLAN tag, an encapsulation) by moving the bytes before them.
    public func remove(_ index: Int, at offset: Int, count removed: Int) {
        guard offset >= 0, removed > 0, offset + removed <= lengths[index] else { return }
        let oldStart = index * slotSize + starts[index]
        let newStart = oldStart + removed
        if offset > 0 {
            // SAFETY: both ranges are inside the frame; copyMemory handles the overlap as memmove.
            UnsafeMutableRawBufferPointer(rebasing: memory[newStart..<(newStart + offset)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory[oldStart..<(oldStart + offset)]))
        }
        starts[index] += removed
        lengths[index] -= removed
    }

    /// Shortens frame `index` to `length` bytes.
    public func truncate(_ index: Int, to length: Int) {
        if length >= 0, length < lengths[index] { lengths[index] = length }
    }

    // MARK: I/O

    private func prepareReceive(_ frames: inout [nimbus_frame], headerBytes: Int) {
        frames.removeAll(keepingCapacity: true)
        for index in 0..<capacity {
            // SAFETY: each slot has slotSize bytes from its start; the kernel writes at most
            // frameCapacity + header bytes from headroom - header, which is inside the slot.
            let pointer = memory.baseAddress.map { $0 + index * slotSize + Self.headroom - headerBytes }
            frames.append(nimbus_frame(data: pointer?.assumingMemoryBound(to: UInt8.self), length: 0, vlan_tci: 0, tail: nil, tail_length: 0))
        }
    }

    private func finishReceive(_ frames: [nimbus_frame], received: Int, headerBytes: Int) {
        count = 0
        for index in 0..<received {
            let total = Int(frames[index].length)
            guard total >= headerBytes + 14 else { continue }
            let target = count
            if target != index {
                // Keep frames dense: move this one's bytes into the first free slot.
                let from = index * slotSize + Self.headroom - headerBytes
                let to = target * slotSize + Self.headroom - headerBytes
                // SAFETY: both ranges are inside their slots (total ≤ header + frameCapacity).
                UnsafeMutableRawBufferPointer(rebasing: memory[to..<(to + total)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory[from..<(from + total)]))
            }
            starts[target] = Self.headroom
            inPorts[target] = 0
            lengths[target] = total - headerBytes
            kernelTags[target] = frames[index].vlan_tci
            headers[target] = headerBytes > 0 ? readHeader(target) : VirtioNetHeader()
            count += 1
        }
    }

    private func readHeader(_ index: Int) -> VirtioNetHeader {
        let base = index * slotSize + starts[index] - VirtioNetHeader.size
        return VirtioNetHeader(wire: memory[base..<(base + VirtioNetHeader.size)]) ?? VirtioNetHeader()
    }

    /// Writes frame `index`'s header into the 10 bytes before it.
    fileprivate func writeHeader(_ index: Int) {
        var bytes = memory
        headers[index].store(into: &bytes, at: index * slotSize + starts[index] - VirtioNetHeader.size)
    }

    fileprivate func descriptor(_ index: Int, headerBytes: Int) -> nimbus_frame {
        if headerBytes > 0 { writeHeader(index) }
        let offset = index * slotSize + starts[index] - headerBytes
        // SAFETY: the pointer and length describe bytes inside this frame's slot.
        let pointer = memory.baseAddress.map { ($0 + offset).assumingMemoryBound(to: UInt8.self) }
        return nimbus_frame(data: pointer, length: UInt32(lengths[index] + headerBytes), vlan_tci: 0, tail: nil, tail_length: 0)
    }

    private var scratch: [nimbus_frame] = []
    private var scratchSources: [UInt32] = []

    /// Receives up to `capacity` frames from an AF_PACKET or Unix datagram socket; returns how many.
    public func receive(from socket: FrameSocket) throws(SystemError) -> Int {
        let headerBytes = socket.vnetHeader ? VirtioNetHeader.size : 0
        prepareReceive(&scratch, headerBytes: headerBytes)
        let capacityBytes = UInt32(frameCapacity + headerBytes)
        let received = try scratch.withUnsafeMutableBufferPointer { frames throws(SystemError) -> Int in
            // SAFETY: `frames` holds `capacity` descriptors, each pointing at capacityBytes of its slot.
            guard let base = frames.baseAddress else { return 0 }
            let result = nimbus_frames_recv(socket.descriptor.rawValue, base, Int32(capacity), capacityBytes)
            guard result >= 0 else { throw SystemError(call: "recvmmsg", subject: socket.name, errno: errno) }
            return Int(result)
        }
        finishReceive(scratch, received: received, headerBytes: headerBytes)
        return count
    }

    /// Reads up to `capacity` frames from a TAP device opened with 10-byte virtio-net headers.
    public func receive(fromTap tap: OwnedFileDescriptor) throws(SystemError) -> Int {
        prepareReceive(&scratch, headerBytes: VirtioNetHeader.size)
        var received = 0
        while received < capacity {
            guard let pointer = scratch[received].data else { break }
            // SAFETY: reads at most frameCapacity + header bytes into this frame's slot.
            let n = Glibc.read(tap.rawValue, pointer, frameCapacity + VirtioNetHeader.size)
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK { break }
                if errno == EINTR { continue }
                throw SystemError(call: "read", subject: "tap", errno: errno)
            }
            scratch[received].length = UInt32(n)
            received += 1
        }
        finishReceive(scratch, received: received, headerBytes: VirtioNetHeader.size)
        return count
    }

    /// Receives up to `capacity` UDP datagrams (VXLAN); `sources` gets each sender.
    public func receive(fromUDP socket: OwnedFileDescriptor) throws(SystemError) -> Int {
        prepareReceive(&scratch, headerBytes: 0)
        if scratchSources.count < capacity { scratchSources = Array(repeating: 0, count: capacity) }
        let capacityBytes = UInt32(frameCapacity)
        let received = try scratch.withUnsafeMutableBufferPointer { frames throws(SystemError) -> Int in
            try scratchSources.withUnsafeMutableBufferPointer { sources throws(SystemError) -> Int in
                // SAFETY: both arrays hold `capacity` entries; each frame points at its own slot.
                guard let base = frames.baseAddress, let addresses = sources.baseAddress else { return 0 }
                let result = nimbus_udp4_recv(socket.rawValue, base, addresses, Int32(capacity), capacityBytes)
                guard result >= 0 else { throw SystemError(call: "recvmmsg", subject: "udp", errno: errno) }
                return Int(result)
            }
        }
        // Datagrams have no minimum of 14 bytes here: keep all of them.
        count = 0
        for index in 0..<received where scratch[index].length > 0 {
            starts[count] = Self.headroom
            inPorts[count] = 0
            lengths[count] = Int(scratch[index].length)
            headers[count] = VirtioNetHeader()
            sources[count] = scratchSources[index]
            if count != index {
                let from = index * slotSize + Self.headroom
                let to = count * slotSize + Self.headroom
                // SAFETY: both ranges are inside their slots.
                UnsafeMutableRawBufferPointer(rebasing: memory[to..<(to + lengths[count])])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory[from..<(from + lengths[count])]))
            }
            count += 1
        }
        return count
    }
}

/// A frame inside some batch, queued for sending.
public struct FrameRef {
    public let batch: FrameBatch
    public let index: Int

    public init(_ batch: FrameBatch, _ index: Int) {
        self.batch = batch
        self.index = index
    }
}

/// A socket that carries one Ethernet frame per datagram: an AF_PACKET socket on one interface
/// (a veth end or any kernel interface), or an AF_UNIX datagram socket whose peer is another
/// program's socket (QEMU's `-netdev dgram`, or nimbus-vmm), each frame optionally after a
/// 10-byte virtio-net header.
public final class FrameSocket {
    public let name: String
    public let descriptor: OwnedFileDescriptor
    public let vnetHeader: Bool
    /// For a Unix socket: the path of the peer's socket.
    public let remotePath: String?
    /// The errno of the failure that ended the last `send` early (0 if it did not fail).
    public private(set) var lastSendError: Int32 = 0

    public init(interface name: String, vnetHeader: Bool = true) throws(SystemError) {
        let index = nimbus_if_index(name)
        guard index > 0 else { throw SystemError(call: "if_nametoindex", subject: name, errno: errno) }
        let fd = nimbus_packet_socket(index, vnetHeader ? 1 : 0)
        guard fd >= 0 else { throw SystemError(call: "socket(AF_PACKET)", subject: name, errno: errno) }
        self.name = name
        descriptor = OwnedFileDescriptor(taking: fd)
        self.vnetHeader = vnetHeader
        remotePath = nil
    }

    /// A Unix datagram socket bound at `localPath` (a stale socket there is replaced) whose frames
    /// go to the socket at `remotePath`; `connect()` makes that peer its only source and target.
    public init(unixDatagram localPath: String, remotePath: String, vnetHeader: Bool) throws(SystemError) {
        let fd = nimbus_unix_dgram_bind(localPath)
        guard fd >= 0 else { throw SystemError(call: "bind(AF_UNIX datagram)", subject: localPath, errno: errno) }
        name = localPath
        descriptor = OwnedFileDescriptor(taking: fd)
        self.vnetHeader = vnetHeader
        self.remotePath = remotePath
    }

    /// Waits up to `milliseconds` for the socket to take more (for a connected Unix datagram
    /// socket: for its peer's queue to have room); true when it can.
    public func waitWritable(milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: descriptor.rawValue, events: Int16(POLLOUT), revents: 0)
        // SAFETY: one pollfd on the stack, passed with its count.
        let result = Glibc.poll(&entry, 1, milliseconds)
        return result > 0 && entry.revents & Int16(POLLOUT) != 0
    }

    /// Connects a Unix datagram socket to its peer; fails while the peer's socket does not exist.
    public func connect() throws(SystemError) {
        guard let remotePath else { return }
        guard nimbus_unix_dgram_connect(descriptor.rawValue, remotePath) == 0 else {
            throw SystemError(call: "connect(AF_UNIX datagram)", subject: remotePath, errno: errno)
        }
    }

    private var pending: [nimbus_frame] = []

    /// Sends frames; returns how many went (the rest are dropped, as a full NIC queue would).
    @discardableResult
    public func send(_ frames: [FrameRef]) -> Int {
        let headerBytes = vnetHeader ? VirtioNetHeader.size : 0
        lastSendError = 0
        pending.removeAll(keepingCapacity: true)
        for frame in frames { pending.append(frame.batch.descriptor(frame.index, headerBytes: headerBytes)) }
        var sent = 0
        while sent < pending.count {
            let batch = min(64, pending.count - sent)
            let result = pending.withUnsafeBufferPointer { all -> Int32 in
                // SAFETY: `batch` descriptors from `sent` on, each pointing into a live FrameBatch.
                guard let base = all.baseAddress else { return 0 }
                return nimbus_frames_send(descriptor.rawValue, base + sent, Int32(batch))
            }
            if result < 0 { lastSendError = errno }
            if result <= 0 { break }
            sent += Int(result)
        }
        return sent
    }
}

extension TapDevice {
    /// Writes frames to a TAP opened with 10-byte virtio-net headers; returns how many went, and
    /// the errno of the write that stopped it (0 if none did).
    @discardableResult
    public static func send(_ tap: OwnedFileDescriptor, _ frames: [FrameRef]) -> (sent: Int, error: Int32) {
        var sent = 0
        for frame in frames {
            let descriptor = frame.batch.descriptor(frame.index, headerBytes: VirtioNetHeader.size)
            guard let data = descriptor.data else { continue }
            // SAFETY: `data` points at `length` bytes inside the frame's slot.
            let n = Glibc.write(tap.rawValue, data, Int(descriptor.length))
            if n < 0 { return (sent, errno) }
            sent += 1
        }
        return (sent, 0)
    }
}

/// A UDP socket for VXLAN.
public enum UDPSocket {
    public static func bind(port: UInt16) throws(SystemError) -> OwnedFileDescriptor {
        let fd = nimbus_udp4_socket(port)
        guard fd >= 0 else { throw SystemError(call: "bind(udp)", subject: "port \(port)", errno: errno) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// Sends each frame as one datagram to the paired IPv4 address (network order) and `port`.
    @discardableResult
    public static func send(_ socket: OwnedFileDescriptor, _ frames: [(FrameRef, UInt32)], port: UInt16) -> Int {
        var descriptors = frames.map { $0.0.batch.descriptor($0.0.index, headerBytes: 0) }
        var destinations = frames.map(\.1)
        var sent = 0
        while sent < descriptors.count {
            let batch = min(64, descriptors.count - sent)
            let result = descriptors.withUnsafeMutableBufferPointer { all -> Int32 in
                destinations.withUnsafeMutableBufferPointer { targets -> Int32 in
                    // SAFETY: `batch` entries from `sent` on in both arrays; frames point into live batches.
                    guard let base = all.baseAddress, let addresses = targets.baseAddress else { return 0 }
                    return nimbus_udp4_send(socket.rawValue, base + sent, addresses + sent, Int32(batch), port)
                }
            }
            if result <= 0 { break }
            sent += Int(result)
        }
        return sent
    }
}

/// Interface control for switch ports.
public enum NetworkInterface {
    public static func index(_ name: String) -> Int { Int(nimbus_if_index(name)) }

    public static func setUp(_ name: String) throws(SystemError) {
        guard nimbus_if_set_up(name) == 0 else { throw SystemError(call: "ioctl(SIOCSIFFLAGS)", subject: name, errno: errno) }
    }

    public static func setMTU(_ name: String, _ mtu: Int) throws(SystemError) {
        guard nimbus_if_set_mtu(name, Int32(mtu)) == 0 else { throw SystemError(call: "ioctl(SIOCSIFMTU)", subject: name, errno: errno) }
    }
}
