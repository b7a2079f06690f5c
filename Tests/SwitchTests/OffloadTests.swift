// Software offloads: the segmentation a port does itself when its far end cannot take a
// super-frame (a VXLAN peer, QEMU's -netdev dgram, a guest that did not negotiate the offload).
import Glibc
import LinuxSystem
import Testing

@testable import Switch

@Suite struct OffloadTests {
    static let payload = (0..<3500).map { UInt8(truncatingIfNeeded: $0 &* 7) }

    /// A UDP super-frame as a UDP_SEGMENT sender's stack leaves it: one IP header and one UDP
    /// header over the whole payload, optionally VLAN-tagged, IPv4 or IPv6.
    static func udpSuperFrame(v6: Bool, vlan: Bool = false) -> [UInt8] {
        var frame: [UInt8] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]
        if vlan { frame += [0x81, 0x00, 0x00, 0x0A] }
        let udpLength = 8 + payload.count
        if v6 {
            frame += [0x86, 0xDD, 0x60, 0, 0, 0, UInt8(udpLength >> 8), UInt8(udpLength & 0xFF), 17, 64]
            frame += [0xFD, 0] + [UInt8](repeating: 0, count: 13) + [1]
            frame += [0xFD, 0] + [UInt8](repeating: 0, count: 13) + [2]
        } else {
            let total = 20 + udpLength
            frame += [0x08, 0x00, 0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0x12, 0x34, 0x40, 0, 64, 17, 0, 0]
            frame += [10, 0, 0, 1, 10, 0, 0, 2]
        }
        frame += [0x30, 0x39, 0x01, 0xBB, UInt8(udpLength >> 8), UInt8(udpLength & 0xFF), 0, 0]
        return frame + payload
    }

    static func u16(_ bytes: [UInt8], _ at: Int) -> Int { Int(bytes[at]) << 8 | Int(bytes[at + 1]) }

    /// Checks every datagram's lengths and checksums and returns the payloads in order.
    static func checkDatagrams(_ segments: [[UInt8]], l3: Int, v6: Bool, firstID: Int = 0x1234) -> [UInt8] {
        let l4 = l3 + (v6 ? 40 : 20)
        var joined: [UInt8] = []
        for (number, segment) in segments.enumerated() {
            let udpLength = segment.count - l4
            #expect(u16(segment, l4 + 4) == udpLength)
            var pseudo: UInt32
            if v6 {
                #expect(u16(segment, l3 + 4) == udpLength)
                pseudo = Offload.sum(segment[(l3 + 8)..<(l3 + 40)])
            } else {
                #expect(u16(segment, l3 + 2) == 20 + udpLength)
                #expect(u16(segment, l3 + 4) == firstID + number, "IPv4 IDs count up")
                #expect(Offload.fold(Offload.sum(segment[l3..<l4])) == 0xFFFF, "IPv4 header checksum")
                pseudo = Offload.sum(segment[(l3 + 12)..<(l3 + 20)])
            }
            pseudo &+= 17 &+ UInt32(udpLength)
            #expect(Offload.fold(Offload.sum(segment[l4...], initial: pseudo)) == 0xFFFF, "UDP checksum of datagram \(number)")
            joined += segment[(l4 + 8)...]
        }
        return joined
    }

    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func udpSuperFramesBecomeDatagrams(v6: Bool, vlan: Bool) throws {
        let frame = Self.udpSuperFrame(v6: v6, vlan: vlan)
        let l3 = vlan ? 18 : 14
        let l4 = l3 + (v6 ? 40 : 20)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: UInt16(l4 + 8), gsoSize: 1000,
            checksumStart: UInt16(l4), checksumOffset: 6)
        let segments = Offload.wireReady(frame, header)
        #expect(segments.map { $0.count - l4 - 8 } == [1000, 1000, 1000, 500])
        #expect(Self.checkDatagrams(segments, l3: l3, v6: v6) == Self.payload)
        #expect(segments.allSatisfy { $0[0..<l3] == frame[0..<l3] }, "Ethernet header and tag kept")
    }

    @Test func aSmallUDPFrameOnlyGetsItsChecksum() {
        var frame = Self.udpSuperFrame(v6: false)
        frame.removeLast(3000)
        frame[16] = UInt8((frame.count - 14) >> 8)
        frame[17] = UInt8((frame.count - 14) & 0xFF)
        frame[38] = UInt8((frame.count - 34) >> 8)
        frame[39] = UInt8((frame.count - 34) & 0xFF)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42, gsoSize: 1000, checksumStart: 34,
            checksumOffset: 6)
        let segments = Offload.wireReady(frame, header)
        #expect(segments.count == 1)
        #expect(segments.first?.count == frame.count)
    }

    @Test func tcpWithTheECNBitIsStillSegmented() {
        var frame: [UInt8] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]
        let total = 40 + 3000
        frame += [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]
        frame += [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x98, 0xFF, 0xFF, 0, 0, 0, 0]
        frame += [UInt8](repeating: 0xAB, count: 3000)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoTCPv4 | VirtioNetHeader.gsoECN, headerLength: 54,
            gsoSize: 1000, checksumStart: 34, checksumOffset: 16)
        let segments = Offload.wireReady(frame, header)
        #expect(segments.count == 3)
        #expect(segments.first.map { $0[47] & 0x80 != 0 } == true, "CWR stays on the first segment")
        #expect(segments.dropFirst().allSatisfy { $0[47] & 0x80 == 0 }, "and only there")
    }

    @Test func aSuperFrameOfTooManyDatagramsIsDropped() {
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42, gsoSize: 10, checksumStart: 34,
            checksumOffset: 6)
        #expect(Offload.wireReady(Self.udpSuperFrame(v6: false), header).isEmpty, "350 datagrams of 10 bytes")
    }

    @Test func truncatedSuperFramesAreLeftAlone() {
        let frame = Array(Self.udpSuperFrame(v6: false).prefix(40))
        let header = VirtioNetHeader(
            flags: 0, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42, gsoSize: 1000, checksumStart: 34, checksumOffset: 6)
        #expect(Offload.wireReady(frame, header) == [frame])
    }
}

@Suite struct UDPCoalescerTests {
    /// An untagged IPv4 UDP datagram from 10.0.0.1:`port` to 10.0.0.2:443 as the sender's stack
    /// hands it to a veth: checksum partial (the field holds the pseudo-header sum).
    static func datagram(_ payload: [UInt8], port: UInt16 = 12345, id: UInt16 = 1) -> ([UInt8], VirtioNetHeader) {
        let udpLength = 8 + payload.count
        var frame: [UInt8] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]
        frame += [0x45, 0, UInt8((20 + udpLength) >> 8), UInt8((20 + udpLength) & 0xFF), UInt8(id >> 8), UInt8(id & 0xFF), 0x40, 0, 64, 17, 0, 0]
        frame += [10, 0, 0, 1, 10, 0, 0, 2, UInt8(port >> 8), UInt8(port & 0xFF), 0x01, 0xBB, UInt8(udpLength >> 8), UInt8(udpLength & 0xFF)]
        let pseudo = Offload.fold(0x0A00 &+ 0x0001 &+ 0x0A00 &+ 0x0002 &+ 17 &+ UInt32(udpLength))
        frame += [UInt8(pseudo >> 8), UInt8(pseudo & 0xFF)] + payload
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: 0, headerLength: 0, gsoSize: 0, checksumStart: 34, checksumOffset: 6)
        return (frame, header)
    }

    static func batch(_ frames: [([UInt8], VirtioNetHeader)]) -> (FrameBatch, [FrameRef]) {
        let batch = FrameBatch(capacity: frames.count)
        for (frame, header) in frames { batch.append(frame, header: header) }
        return (batch, (0..<frames.count).map { FrameRef(batch, $0) })
    }

    static func payload(_ count: Int, _ seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0) &+ seed } }

    @Test func aRunOfOneFlowLeavesAsOneSuperFrameThatSplitsBackIntoTheSameDatagrams() throws {
        let payloads = [Self.payload(100, 0), Self.payload(100, 1), Self.payload(100, 2), Self.payload(40, 3)]
        let (batch, frames) = Self.batch(payloads.enumerated().map { Self.datagram($0.element, id: UInt16($0.offset)) })
        let coalescer = UDPCoalescer()
        var seen: [(bytes: [UInt8], header: VirtioNetHeader)] = []
        let sent = coalescer.send(frames) { outgoing in
            seen = outgoing.map { ($0.batch.bytes($0.index, 0..<$0.batch.length($0.index)), $0.batch.headers[$0.index]) }
            return (outgoing.count, 0)
        }
        #expect(sent == 4, "every datagram counts as sent")
        try #require(seen.count == 1)
        let merged = seen[0]
        #expect(merged.bytes.count == 42 + 340)
        #expect(merged.header.gsoType == VirtioNetHeader.gsoUDPL4 && merged.header.gsoSize == 100)
        #expect(Offload.fold(Offload.sum(merged.bytes[14..<34])) == 0xFFFF, "IPv4 header checksum")
        // What the receiving stack makes of it: the four datagrams, checksums complete.
        let datagrams = Offload.wireReady(merged.bytes, merged.header)
        #expect(datagrams.map { Array($0[42...]) } == payloads)
        #expect(OffloadTests.checkDatagrams(datagrams, l3: 14, v6: false, firstID: 0).count == 340)
        #expect(datagrams.allSatisfy { $0[0..<14] == batch.bytes(0, 0..<14)[...] && $0[26..<38] == batch.bytes(0, 26..<38)[...] })
    }

    @Test func otherFlowsAndOddFramesBreakRuns() {
        var wrongChecksum = Self.datagram(Self.payload(50, 9))
        wrongChecksum.1 = VirtioNetHeader()  // claims a complete checksum, but the field holds a partial sum
        let (_, frames) = Self.batch([
            Self.datagram(Self.payload(50, 0)), Self.datagram(Self.payload(50, 1)), Self.datagram(Self.payload(50, 2), port: 999),
            Self.datagram(Self.payload(50, 3)), wrongChecksum, Self.datagram(Self.payload(50, 4)), Self.datagram(Self.payload(20, 5)),
            Self.datagram(Self.payload(50, 6)),
        ])
        var shapes: [Int] = []
        let sent = UDPCoalescer().send(frames) { outgoing in
            shapes = outgoing.map { $0.batch.length($0.index) }
            return (outgoing.count, 0)
        }
        #expect(sent == 8)
        // The first two merge; a datagram to another port, the one after it (its neighbour is
        // the bad checksum) and the bad one go alone; a shorter payload ends the last run.
        #expect(shapes == [42 + 100, 92, 92, 92, 42 + 50 + 20, 92])
    }

    @Test(arguments: [0, 5, 11, 12, 15, 20, 22, 29, 33, 35, 37])
    func eachFlowFieldBreaksARun(offset: Int) {
        // Two datagrams that differ in one byte of the Ethernet header, TOS, flags, TTL,
        // addresses or ports stay two; differing only in the IP ID, they merge.
        var other = Self.datagram(Self.payload(50, 1), id: 2)
        other.0[offset] ^= 0x01
        let (_, frames) = Self.batch([Self.datagram(Self.payload(50, 0)), other, Self.datagram(Self.payload(50, 2), id: 3)])
        var shapes: [Int] = []
        _ = UDPCoalescer().send(frames) { outgoing in
            shapes = outgoing.map { $0.batch.length($0.index) }
            return (outgoing.count, 0)
        }
        #expect(shapes == [92, 92, 92])
        let (_, same) = Self.batch([Self.datagram(Self.payload(50, 0)), Self.datagram(Self.payload(50, 1), id: 2)])
        _ = UDPCoalescer().send(same) { outgoing in
            shapes = outgoing.map { $0.batch.length($0.index) }
            return (outgoing.count, 0)
        }
        #expect(shapes == [42 + 100])
    }

    @Test func byteComparisonsStayInsideBothFrames() {
        let batch = FrameBatch(capacity: 2)
        batch.append([1, 2, 3, 4, 5, 6])
        batch.append([1, 2, 3, 4])
        #expect(batch.equalBytes(0, 0..<4, batch, 1))
        #expect(!batch.equalBytes(0, 0..<5, batch, 1), "past the end of the shorter frame")
        #expect(!batch.equalBytes(0, -1..<2, batch, 1))
        #expect(batch.equalBytes(0, 2..<2, batch, 1))
        #expect(batch.u16(0, 4) == 0x0506 && batch.u16(0, 5) == 0x0600 && batch.u16(0, -1) == 0x0001)
    }

    @Test func aKernelThatRefusesSuperFramesGetsTheDatagrams() {
        let (_, frames) = Self.batch((0..<5).map { Self.datagram(Self.payload(30, UInt8($0))) })
        let coalescer = UDPCoalescer()
        var calls: [[Int]] = []
        let transmit: ([FrameRef]) -> (sent: Int, error: Int32) = { outgoing in
            calls.append(outgoing.map { $0.batch.length($0.index) })
            if let refused = outgoing.firstIndex(where: { $0.batch.headers[$0.index].gsoType != 0 }) { return (refused, EINVAL) }
            return (outgoing.count, 0)
        }
        #expect(coalescer.send(frames, transmit: transmit) == 5)
        #expect(calls == [[42 + 150], [72, 72, 72, 72, 72]])
        #expect(!coalescer.enabled)
        calls = []
        #expect(coalescer.send(frames, transmit: transmit) == 5)
        #expect(calls == [[72, 72, 72, 72, 72]], "no more super-frames on this port")
    }

    @Test func partialSendsCountWholeRuns() {
        let (_, frames) = Self.batch(
            [Self.datagram(Self.payload(30, 0)), Self.datagram(Self.payload(30, 1)), Self.datagram(Self.payload(30, 2), port: 7)])
        #expect(UDPCoalescer().send(frames) { _ in (1, 0) } == 2)
        #expect(UDPCoalescer().send(frames) { _ in (0, 0) } == 0)
    }
}
