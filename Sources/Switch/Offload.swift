// Switch layer: software versions of the offloads a TAP or packet socket would have done
// (TCP segmentation, checksum completion), for ports that carry only wire-ready frames (VXLAN),
// and the repair of frames a local peer left with offloads pending. Pure functions over bytes.
import LinuxSystem

/// Parses a dotted IPv4 address into a host-order integer.
func parseIPv4(_ text: String) -> UInt32? {
    let parts = text.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count == 4 else { return nil }
    var value: UInt32 = 0
    for part in parts {
        guard let byte = UInt8(part) else { return nil }
        value = value << 8 | UInt32(byte)
    }
    return value
}

/// Software versions of the offloads a TAP or packet socket would have done.
enum Offload {
    /// The frame as wire-ready frames: TSO and UDP super-frames split into segments, partial
    /// checksums completed (nothing for a UDP super-frame of more datagrams than a kernel makes).
    static func wireReady(_ frame: [UInt8], _ header: VirtioNetHeader) -> [[UInt8]] {
        if header.gsoSize > 0 {
            let segments: [[UInt8]]?
            switch header.gsoType & ~VirtioNetHeader.gsoECN {
            case VirtioNetHeader.gsoTCPv4, VirtioNetHeader.gsoTCPv6: segments = segmentTCP(frame, mss: Int(header.gsoSize))
            case VirtioNetHeader.gsoUDPL4: segments = segmentUDP(frame, size: Int(header.gsoSize))
            default: segments = nil
            }
            if let segments { return segments }
        }
        if header.flags & VirtioNetHeader.needsChecksum != 0 {
            var copy = frame
            completeChecksum(&copy, start: Int(header.checksumStart), offset: Int(header.checksumOffset))
            return [copy]
        }
        return [frame]
    }

    /// A sender on the same host (a Linux vxlan device over veth) may leave the inner TCP/UDP
    /// checksum partial: the field holds only the pseudo-header sum, and local delivery of the
    /// UDP datagram never finishes it. Such frames get NEEDS_CSUM so the egress port finishes it.
    static func repairOffloads(_ batch: FrameBatch, _ index: Int) {
        let length = batch.length(index)
        var l3 = 14
        var type = batch.u16(index, 12)
        if type == EtherType.vlan {
            type = batch.u16(index, 16)
            l3 = 18
        }
        let l4: Int
        let proto: UInt8
        if type == EtherType.ipv4 {
            l4 = l3 + Int(batch.byte(index, l3) & 0x0F) * 4
            proto = batch.byte(index, l3 + 9)
        } else if type == EtherType.ipv6 {
            l4 = l3 + 40
            proto = batch.byte(index, l3 + 6)
        } else {
            return
        }
        let checksumOffset: Int
        switch proto {
        case IPProtocol.tcp: checksumOffset = 16
        case IPProtocol.udp: checksumOffset = 6
        default: return
        }
        guard length >= l4 + checksumOffset + 2 else { return }
        let pseudo = pseudoHeaderSum(batch, index, l3: l3, isV4: type == EtherType.ipv4, proto: proto, length: length - l4)
        let field = batch.u16(index, l4 + checksumOffset)
        // A TCP frame larger than a wire frame is a TSO super-frame that reached us unsegmented;
        // hand it on as one, segmented for the 1450-byte MTU VXLAN overlays use, with its
        // checksum field turned into the partial sum the segmentation expects.
        let tcpLength = Int(batch.byte(index, l4 + 12) >> 4) * 4
        if proto == IPProtocol.tcp, length > l3 + 1500, tcpLength >= 20 {
            batch.setU16(index, l4 + checksumOffset, fold(pseudo))
            var header = VirtioNetHeader()
            header.flags = VirtioNetHeader.needsChecksum
            header.gsoType = type == EtherType.ipv4 ? VirtioNetHeader.gsoTCPv4 : VirtioNetHeader.gsoTCPv6
            header.gsoSize = UInt16(1450 - (l4 - l3) - tcpLength)
            header.headerLength = UInt16(l4 + tcpLength)
            header.checksumStart = UInt16(l4)
            header.checksumOffset = UInt16(checksumOffset)
            batch.headers[index] = header
            return
        }
        guard field == fold(pseudo) else { return }
        // The field looks partial; a full checksum that happens to equal it would verify.
        let segment = batch.bytes(index, l4..<length)
        guard fold(sum(segment[...], initial: pseudo)) != 0xFFFF else { return }
        var header = VirtioNetHeader()
        header.flags = VirtioNetHeader.needsChecksum
        header.checksumStart = UInt16(l4)
        header.checksumOffset = UInt16(checksumOffset)
        batch.headers[index] = header
    }

    /// The one's-complement sum of the IPv4 or IPv6 pseudo-header (addresses, protocol, length)
    /// of a `length`-byte transport segment in frame `index`, whose IP header starts at `l3`.
    static func pseudoHeaderSum(_ batch: FrameBatch, _ index: Int, l3: Int, isV4: Bool, proto: UInt8, length: Int) -> UInt32 {
        var total = UInt32(proto) &+ UInt32(length)
        let addresses = isV4 ? (l3 + 12)..<(l3 + 20) : (l3 + 8)..<(l3 + 40)
        for offset in stride(from: addresses.lowerBound, to: addresses.upperBound, by: 2) { total &+= UInt32(batch.u16(index, offset)) }
        return total
    }

    /// One's-complement sum of 16-bit words.
    static func sum(_ bytes: ArraySlice<UInt8>, initial: UInt32 = 0) -> UInt32 {
        var total = initial
        var index = bytes.startIndex
        while index + 1 < bytes.endIndex {
            total &+= UInt32(bytes[index]) << 8 | UInt32(bytes[index + 1])
            index += 2
        }
        if index < bytes.endIndex { total &+= UInt32(bytes[index]) << 8 }
        return total
    }

    static func fold(_ value: UInt32) -> UInt16 {
        var total = value
        while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
        return UInt16(total)
    }

    /// Completes a checksum the sender left partial: the field holds the pseudo-header sum and
    /// the sum of everything from `start` goes into it.
    static func completeChecksum(_ frame: inout [UInt8], start: Int, offset: Int) {
        let field = start + offset
        guard start >= 0, field + 1 < frame.count else { return }
        let checksum = ~fold(sum(frame[start...]))
        frame[field] = UInt8(checksum >> 8)
        frame[field + 1] = UInt8(checksum & 0xFF)
    }

    /// Where a frame's IP and transport headers start (after an optional VLAN tag), for IPv4
    /// and IPv6 frames carrying `proto` with at least `transportBytes` of its header.
    private static func layers(_ frame: [UInt8], proto: UInt8, transportBytes: Int) -> (l3: Int, l4: Int, isV4: Bool)? {
        var l3 = 14
        guard frame.count > 14 else { return nil }
        var type = UInt16(frame[12]) << 8 | UInt16(frame[13])
        if type == EtherType.vlan {
            guard frame.count > 18 else { return nil }
            type = UInt16(frame[16]) << 8 | UInt16(frame[17])
            l3 = 18
        }
        let isV4 = type == EtherType.ipv4
        guard isV4 || type == EtherType.ipv6, frame.count >= l3 + (isV4 ? 20 : 40) else { return nil }
        let ipLength = isV4 ? Int(frame[l3] & 0x0F) * 4 : 40
        guard ipLength >= 20, frame[l3 + (isV4 ? 9 : 6)] == proto, frame.count >= l3 + ipLength + transportBytes else { return nil }
        return (l3, l3 + ipLength, isV4)
    }

    /// Splits a UDP super-frame (GSO_UDP_L4; IPv4 or IPv6, optionally VLAN-tagged) into datagrams
    /// of at most `size` payload bytes, each with its own lengths, IPv4 ID and checksums.
    static func segmentUDP(_ frame: [UInt8], size: Int) -> [[UInt8]]? {
        guard let found = layers(frame, proto: IPProtocol.udp, transportBytes: 8), size > 0 else { return nil }
        let payloadCount = frame.count - found.l4 - 8
        if payloadCount <= size { return nil }
        // More datagrams than the kernel's UDP_MAX_SEGMENTS: no sender's stack makes that; drop it.
        guard (payloadCount + size - 1) / size <= 128 else { return [] }
        return cut(frame, found, payloadStart: found.l4 + 8, size: size, proto: IPProtocol.udp) { segment, _, length, _ in
            segment[found.l4 + 4] = UInt8((8 + length) >> 8)
            segment[found.l4 + 5] = UInt8((8 + length) & 0xFF)
        }
    }

    /// Splits a TCP super-frame (IPv4 or IPv6, optionally VLAN-tagged) into segments of at most
    /// `mss` payload bytes with their own lengths, IDs, sequence numbers and checksums.
    static func segmentTCP(_ frame: [UInt8], mss: Int) -> [[UInt8]]? {
        guard let found = layers(frame, proto: IPProtocol.tcp, transportBytes: 20) else { return nil }
        let l4 = found.l4
        let tcpLength = Int(frame[l4 + 12] >> 4) * 4
        let payloadStart = l4 + tcpLength
        guard tcpLength >= 20, frame.count >= payloadStart, mss > 0, frame.count - payloadStart > mss else { return nil }
        let sequence = UInt32(frame[l4 + 4]) << 24 | UInt32(frame[l4 + 5]) << 16 | UInt32(frame[l4 + 6]) << 8 | UInt32(frame[l4 + 7])
        return cut(frame, found, payloadStart: payloadStart, size: mss, proto: IPProtocol.tcp) { segment, offset, length, number in
            let seq = sequence &+ UInt32(offset)
            for byte in 0..<4 { segment[l4 + 4 + byte] = UInt8(truncatingIfNeeded: seq >> (24 - 8 * byte)) }
            var flags = segment[l4 + 13]
            if offset + length < frame.count - payloadStart { flags &= ~(0x01 | 0x08) }  // FIN and PSH only on the last segment
            if number > 0 { flags &= ~0x80 }  // CWR only on the first
            segment[l4 + 13] = flags
        }
    }

    /// Cuts the payload from `payloadStart` on into pieces of at most `size` bytes, each behind a
    /// copy of the headers with its IP length, IPv4 ID and header checksum; `transport` fixes each
    /// piece's transport header (given the piece's offset in the payload, its length and number)
    /// before its checksum is computed.
    private static func cut(
        _ frame: [UInt8], _ found: (l3: Int, l4: Int, isV4: Bool), payloadStart: Int, size: Int, proto: UInt8,
        transport: (inout [UInt8], _ offset: Int, _ length: Int, _ number: UInt16) -> Void
    ) -> [[UInt8]] {
        let (l3, l4, isV4) = found
        let payload = frame[payloadStart...]
        let firstID = isV4 ? UInt16(frame[l3 + 4]) << 8 | UInt16(frame[l3 + 5]) : 0
        let checksumAt = l4 + (proto == IPProtocol.udp ? 6 : 16)
        var segments: [[UInt8]] = []
        var offset = 0
        var number: UInt16 = 0
        while offset < payload.count {
            let length = min(size, payload.count - offset)
            var segment = Array(frame[0..<payloadStart]) + payload[(payload.startIndex + offset)..<(payload.startIndex + offset + length)]
            func put16(_ at: Int, _ value: UInt16) {
                segment[at] = UInt8(value >> 8)
                segment[at + 1] = UInt8(value & 0xFF)
            }
            if isV4 {
                put16(l3 + 2, UInt16(segment.count - l3))
                put16(l3 + 4, firstID &+ number)
                put16(l3 + 10, 0)
                put16(l3 + 10, ~fold(sum(segment[l3..<l4])))
            } else {
                put16(l3 + 4, UInt16(segment.count - l4))
            }
            transport(&segment, offset, length, number)
            put16(checksumAt, 0)
            var pseudo: UInt32 = isV4 ? sum(segment[(l3 + 12)..<(l3 + 20)]) : sum(segment[(l3 + 8)..<(l3 + 40)])
            pseudo &+= UInt32(proto) &+ UInt32(segment.count - l4)
            let checksum = ~fold(sum(segment[l4...], initial: pseudo))
            put16(checksumAt, proto == IPProtocol.udp && checksum == 0 ? 0xFFFF : checksum)  // UDP: 0 means "none"
            segments.append(segment)
            offset += length
            number &+= 1
        }
        return segments
    }
}
