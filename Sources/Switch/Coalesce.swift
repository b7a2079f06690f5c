// Switch (layer 3): software GRO for UDP. A run of small datagrams of one flow, queued for a port
// whose far end is the kernel (a veth end or a TAP, written with virtio-net headers), leaves as
// one UDP_SEGMENT super-frame: the receiving stack cuts it back into the same datagrams, so it
// runs its device, IP and routing work once per run instead of once per datagram. Frames that do
// not qualify, and runs of one, go as they are.
import Glibc
import LinuxSystem

final class UDPCoalescer {
    /// Segments per super-frame (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
    static let maxSegments = 64
    /// The largest super-frame; a larger run is cut into several.
    static let maxFrame = 16384
    /// Off after the kernel refused a super-frame (EINVAL: a kernel without UDP GSO from user
    /// space); the port then sends every datagram as it came.
    private(set) var enabled = true
    private lazy var scratch = FrameBatch(capacity: 16, frameCapacity: Self.maxFrame)
    // Kept between calls so that a send allocates nothing: the frames to send, and for each the
    // index in the caller's frames of its first datagram and how many datagrams it carries.
    private var outgoing: [FrameRef] = []
    private var firsts: [Int] = []
    private var spans: [Int] = []

    /// Sends `frames` through `transmit`, which returns how many of the frames it was given went
    /// and the errno that stopped it (0 if none). Returns how many of `frames` went: a prefix.
    func send(_ frames: [FrameRef], transmit: ([FrameRef]) -> (sent: Int, error: Int32)) -> Int {
        guard enabled, frames.count > 1 else { return transmit(frames).sent }
        outgoing.removeAll(keepingCapacity: true)
        firsts.removeAll(keepingCapacity: true)
        spans.removeAll(keepingCapacity: true)
        scratch.reset()
        var next = 0
        while next < frames.count {
            let (run, size) = runLength(frames, from: next)
            if run > 1, let merged = merge(frames[next..<(next + run)], size: size) {
                outgoing.append(merged)
                spans.append(run)
            } else {
                outgoing.append(frames[next])
                spans.append(1)
            }
            firsts.append(next)
            next += spans[spans.count - 1]
        }
        if outgoing.count == frames.count { return transmit(frames).sent }
        let (sent, error) = transmit(outgoing)
        var delivered = spans.prefix(sent).reduce(0, +)
        if sent < outgoing.count, error == EINVAL, spans[sent] > 1 {
            // This kernel does not take UDP GSO frames from user space: send as they came from now on.
            enabled = false
            delivered += transmit(Array(frames[firsts[sent]...])).sent
        }
        return delivered
    }

    /// How many frames from `start` on form one run (IPv4 UDP datagrams of one flow with equal
    /// payloads, the last may be shorter, within the segment and size limits), and that payload size.
    private func runLength(_ frames: [FrameRef], from start: Int) -> (count: Int, size: Int) {
        guard start + 1 < frames.count, let size = Self.payloadLength(frames[start]) else { return (1, 0) }
        var end = start + 1
        var total = 42 + size
        while end < frames.count, end - start < Self.maxSegments {
            guard let next = Self.payloadLength(frames[end]), next <= size, total + next <= Self.maxFrame,
                Self.sameFlow(frames[start], frames[end])
            else { break }
            total += next
            end += 1
            if next < size { break }
        }
        return (end - start, size)
    }

    /// The payload length of an untagged IPv4 UDP datagram that may join a run: no IP options or
    /// fragments, lengths that agree with the frame, no pending offload but a partial checksum,
    /// and a checksum that is partial (made on this host), already checked, absent or correct.
    static func payloadLength(_ frame: FrameRef) -> Int? {
        let batch = frame.batch
        let index = frame.index
        let length = batch.length(index)
        guard length > 42, batch.u16(index, 12) == EtherType.ipv4, batch.byte(index, 14) == 0x45, batch.byte(index, 23) == IPProtocol.udp,
            batch.u16(index, 20) & 0x3FFF == 0, Int(batch.u16(index, 16)) == length - 14, Int(batch.u16(index, 38)) == length - 34
        else { return nil }
        let header = batch.headers[index]
        guard header.gsoType == VirtioNetHeader.gsoNone else { return nil }
        if header.flags & VirtioNetHeader.needsChecksum != 0 {
            guard header.checksumStart == 34, header.checksumOffset == 6 else { return nil }
        } else if header.flags & VirtioNetHeader.dataValid == 0, batch.u16(index, 40) != 0 {
            // A complete checksum is merged away: only a correct one may be.
            let pseudo = Offload.pseudoHeaderSum(batch, index, l3: 14, isV4: true, proto: IPProtocol.udp, length: length - 34)
            guard Offload.fold(Offload.sum(batch.bytes(index, 34..<length)[...], initial: pseudo)) == 0xFFFF else { return nil }
        }
        return length - 42
    }

    /// Same Ethernet header, TOS, DF, TTL, addresses and ports (bytes 14, the version and header
    /// length, were checked by `payloadLength`).
    static func sameFlow(_ a: FrameRef, _ b: FrameRef) -> Bool {
        a.batch.equalBytes(a.index, 26..<38, b.batch, b.index) && a.batch.equalBytes(a.index, 0..<16, b.batch, b.index)
            && a.batch.equalBytes(a.index, 20..<24, b.batch, b.index)
    }

    /// One super-frame carrying the run's payloads (`size` bytes each, the last may be shorter) in
    /// order, in the scratch batch; nil if it has no room.
    private func merge(_ run: ArraySlice<FrameRef>, size: Int) -> FrameRef? {
        guard let first = run.first, let index = scratch.appendCopy(of: first.index, from: first.batch) else { return nil }
        for frame in run.dropFirst() where !scratch.extend(index, with: frame.batch, frame.index, from: 42) { return nil }
        let udpLength = scratch.length(index) - 34
        scratch.setU16(index, 16, UInt16(20 + udpLength))
        scratch.setU16(index, 24, 0)
        scratch.setU16(index, 24, ~Offload.fold(Offload.sum(scratch.bytes(index, 14..<34)[...])))
        scratch.setU16(index, 38, UInt16(udpLength))
        // The checksum field holds the pseudo-header sum; the kernel completes each datagram's.
        scratch.setU16(index, 40, Offload.fold(Offload.pseudoHeaderSum(scratch, index, l3: 14, isV4: true, proto: IPProtocol.udp, length: udpLength)))
        scratch.headers[index] = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42, gsoSize: UInt16(size),
            checksumStart: 34, checksumOffset: 6)
        return FrameRef(scratch, index)
    }
}
