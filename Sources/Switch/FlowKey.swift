// Switch layer: the flow key, every header field a flow can match on, packed into sixteen
// 64-bit words so that masking (for the megaflow cache and OpenFlow matches) is one SIMD AND and
// hashing is over a fixed-size value. `parse` fills it from a frame; nothing else reads packets.
import LinuxSystem

public struct FlowKey: Hashable, Sendable {
    public var words: SIMD16<UInt64>

    public init() { words = .zero }
    public init(words: SIMD16<UInt64>) { self.words = words }

    public static func & (a: FlowKey, b: FlowKey) -> FlowKey { FlowKey(words: a.words & b.words) }
    public static func | (a: FlowKey, b: FlowKey) -> FlowKey { FlowKey(words: a.words | b.words) }

    /// Equal when every word is: one XOR and OR over the words, with no early exit, which the
    /// compiler turns into a few vector instructions (the synthesized == compares word by word).
    public static func == (a: FlowKey, b: FlowKey) -> Bool {
        let difference = a.words ^ b.words
        var any: UInt64 = 0
        for index in 0..<16 { any |= difference[index] }
        return any == 0
    }

    // MARK: fields (word, shift, width)

    @inline(__always) func get(_ word: Int, _ shift: UInt64, _ width: UInt64) -> UInt64 {
        (words[word] >> shift) & (width == 64 ? ~0 : (1 << width) - 1)
    }

    @inline(__always) mutating func set(_ word: Int, _ shift: UInt64, _ width: UInt64, _ value: UInt64) {
        let mask: UInt64 = (width == 64 ? ~0 : (1 << width) - 1) << shift
        words[word] = (words[word] & ~mask) | ((value << shift) & mask)
    }

    public var inPort: UInt32 {
        get { UInt32(get(0, 0, 32)) }
        set { set(0, 0, 32, UInt64(newValue)) }
    }
    /// OpenFlow's vlan_vid: the VID with 0x1000 (OFPVID_PRESENT) set when the frame is tagged.
    public var vlanVID: UInt16 {
        get { UInt16(get(0, 32, 13)) }
        set { set(0, 32, 13, UInt64(newValue)) }
    }
    public var vlanPCP: UInt8 {
        get { UInt8(get(0, 45, 3)) }
        set { set(0, 45, 3, UInt64(newValue)) }
    }
    public var ethType: UInt16 {
        get { UInt16(get(0, 48, 16)) }
        set { set(0, 48, 16, UInt64(newValue)) }
    }
    public var ethSrc: UInt64 {
        get { get(1, 0, 48) }
        set { set(1, 0, 48, newValue) }
    }
    public var ipProto: UInt8 {
        get { UInt8(get(1, 48, 8)) }
        set { set(1, 48, 8, UInt64(newValue)) }
    }
    public var ipDSCP: UInt8 {
        get { UInt8(get(1, 56, 6)) }
        set { set(1, 56, 6, UInt64(newValue)) }
    }
    public var ipECN: UInt8 {
        get { UInt8(get(1, 62, 2)) }
        set { set(1, 62, 2, UInt64(newValue)) }
    }
    public var ethDst: UInt64 {
        get { get(2, 0, 48) }
        set { set(2, 0, 48, newValue) }
    }
    public var ipTTL: UInt8 {
        get { UInt8(get(2, 48, 8)) }
        set { set(2, 48, 8, UInt64(newValue)) }
    }
    /// ARP opcode.
    public var arpOp: UInt16 {
        get { UInt16(get(2, 56, 8)) }
        set { set(2, 56, 8, UInt64(newValue)) }
    }
    /// IPv4 source (or ARP SPA).
    public var ipv4Src: UInt32 {
        get { UInt32(get(3, 0, 32)) }
        set { set(3, 0, 32, UInt64(newValue)) }
    }
    /// IPv4 destination (or ARP TPA).
    public var ipv4Dst: UInt32 {
        get { UInt32(get(3, 32, 32)) }
        set { set(3, 32, 32, UInt64(newValue)) }
    }
    /// TCP/UDP/SCTP source port, or ICMP type.
    public var tpSrc: UInt16 {
        get { UInt16(get(4, 0, 16)) }
        set { set(4, 0, 16, UInt64(newValue)) }
    }
    /// TCP/UDP/SCTP destination port, or ICMP code.
    public var tpDst: UInt16 {
        get { UInt16(get(4, 16, 16)) }
        set { set(4, 16, 16, UInt64(newValue)) }
    }
    public var tcpFlags: UInt16 {
        get { UInt16(get(4, 32, 12)) }
        set { set(4, 32, 12, UInt64(newValue)) }
    }
    public var ipv6SrcHigh: UInt64 {
        get { words[5] }
        set { words[5] = newValue }
    }
    public var ipv6SrcLow: UInt64 {
        get { words[6] }
        set { words[6] = newValue }
    }
    public var ipv6DstHigh: UInt64 {
        get { words[7] }
        set { words[7] = newValue }
    }
    public var ipv6DstLow: UInt64 {
        get { words[8] }
        set { words[8] = newValue }
    }
    public var arpSHA: UInt64 {
        get { get(9, 0, 48) }
        set { set(9, 0, 48, newValue) }
    }
    public var arpTHA: UInt64 {
        get { get(10, 0, 48) }
        set { set(10, 0, 48, newValue) }
    }
    public var tunnelID: UInt64 {
        get { words[11] }
        set { words[11] = newValue }
    }
    public var tunnelSrc: UInt32 {
        get { UInt32(get(12, 0, 32)) }
        set { set(12, 0, 32, UInt64(newValue)) }
    }
    public var tunnelDst: UInt32 {
        get { UInt32(get(12, 32, 32)) }
        set { set(12, 32, 32, UInt64(newValue)) }
    }
    public var metadata: UInt64 {
        get { words[13] }
        set { words[13] = newValue }
    }

    /// A mask with every bit of the named fields set.
    public static func mask(_ fields: (inout FlowKey) -> Void) -> FlowKey {
        var key = FlowKey()
        fields(&key)
        return key
    }
}

/// Ethernet types and IP protocols the parser knows.
public enum EtherType {
    public static let ipv4: UInt16 = 0x0800
    public static let arp: UInt16 = 0x0806
    public static let vlan: UInt16 = 0x8100
    public static let ipv6: UInt16 = 0x86DD
}

public enum IPProtocol {
    public static let icmp: UInt8 = 1
    public static let tcp: UInt8 = 6
    public static let udp: UInt8 = 17
    public static let icmpv6: UInt8 = 58
    public static let sctp: UInt8 = 132
}

extension FlowKey {
    /// Parses frame `index` of `batch` (already carrying its VLAN tag in-band) received on `port`.
    /// Truncated headers leave the remaining fields zero; nothing is read past the frame.
    public static func parse(_ batch: FrameBatch, _ index: Int, inPort: UInt32) -> FlowKey {
        var key = FlowKey()
        key.inPort = inPort
        let length = batch.length(index)
        guard length >= 14 else { return key }
        key.ethDst = UInt64(batch.u16(index, 0)) << 32 | UInt64(batch.u32(index, 2))
        key.ethSrc = UInt64(batch.u16(index, 6)) << 32 | UInt64(batch.u32(index, 8))
        var type = batch.u16(index, 12)
        var offset = 14
        if type == EtherType.vlan, length >= 18 {
            let tci = batch.u16(index, 14)
            key.vlanVID = (tci & 0x0FFF) | 0x1000
            key.vlanPCP = UInt8(tci >> 13)
            type = batch.u16(index, 16)
            offset = 18
        }
        key.ethType = type
        switch type {
        case EtherType.ipv4:
            guard length >= offset + 20 else { return key }
            let versionIHL = batch.byte(index, offset)
            let headerLength = Int(versionIHL & 0x0F) * 4
            guard versionIHL >> 4 == 4, headerLength >= 20, length >= offset + headerLength else { return key }
            let tos = batch.byte(index, offset + 1)
            key.ipDSCP = tos >> 2
            key.ipECN = tos & 3
            key.ipTTL = batch.byte(index, offset + 8)
            key.ipProto = batch.byte(index, offset + 9)
            key.ipv4Src = batch.u32(index, offset + 12)
            key.ipv4Dst = batch.u32(index, offset + 16)
            let fragment = batch.u16(index, offset + 6) & 0x1FFF
            guard fragment == 0 else { return key }
            parseTransport(batch, index, at: offset + headerLength, proto: key.ipProto, into: &key)
        case EtherType.ipv6:
            guard length >= offset + 40 else { return key }
            let first = batch.u32(index, offset)
            let trafficClass = UInt8((first >> 20) & 0xFF)
            key.ipDSCP = trafficClass >> 2
            key.ipECN = trafficClass & 3
            key.ipProto = batch.byte(index, offset + 6)
            key.ipTTL = batch.byte(index, offset + 7)
            key.ipv6SrcHigh = UInt64(batch.u32(index, offset + 8)) << 32 | UInt64(batch.u32(index, offset + 12))
            key.ipv6SrcLow = UInt64(batch.u32(index, offset + 16)) << 32 | UInt64(batch.u32(index, offset + 20))
            key.ipv6DstHigh = UInt64(batch.u32(index, offset + 24)) << 32 | UInt64(batch.u32(index, offset + 28))
            key.ipv6DstLow = UInt64(batch.u32(index, offset + 32)) << 32 | UInt64(batch.u32(index, offset + 36))
            parseTransport(batch, index, at: offset + 40, proto: key.ipProto, into: &key)
        case EtherType.arp:
            guard length >= offset + 28, batch.u16(index, offset) == 1, batch.u16(index, offset + 2) == EtherType.ipv4 else { return key }
            key.arpOp = UInt16(min(batch.u16(index, offset + 6), 255))
            key.arpSHA = UInt64(batch.u16(index, offset + 8)) << 32 | UInt64(batch.u32(index, offset + 10))
            key.ipv4Src = batch.u32(index, offset + 14)
            key.arpTHA = UInt64(batch.u16(index, offset + 18)) << 32 | UInt64(batch.u32(index, offset + 20))
            key.ipv4Dst = batch.u32(index, offset + 24)
        default:
            break
        }
        return key
    }

    private static func parseTransport(_ batch: FrameBatch, _ index: Int, at offset: Int, proto: UInt8, into key: inout FlowKey) {
        let length = batch.length(index)
        switch proto {
        case IPProtocol.tcp:
            guard length >= offset + 20 else { return }
            key.tpSrc = batch.u16(index, offset)
            key.tpDst = batch.u16(index, offset + 2)
            key.tcpFlags = batch.u16(index, offset + 12) & 0x0FFF
        case IPProtocol.udp, IPProtocol.sctp:
            guard length >= offset + 8 else { return }
            key.tpSrc = batch.u16(index, offset)
            key.tpDst = batch.u16(index, offset + 2)
        case IPProtocol.icmp, IPProtocol.icmpv6:
            guard length >= offset + 4 else { return }
            key.tpSrc = UInt16(batch.byte(index, offset))
            key.tpDst = UInt16(batch.byte(index, offset + 1))
        default:
            break
        }
    }
}
