// Switch layer: the OpenFlow 1.3 wire format (pure functions over bytes): message headers,
// OXM matches, actions and instructions, and the bodies of the messages nimbus-switchd answers.
// Every length is checked before it is used; a malformed message becomes an `OpenFlowError`
// carrying the error type and code OpenFlow defines, which the server returns to the peer.

public enum OFType: UInt8 {
    case hello = 0, error = 1, echoRequest = 2, echoReply = 3, experimenter = 4
    case featuresRequest = 5, featuresReply = 6, getConfigRequest = 7, getConfigReply = 8, setConfig = 9
    case packetIn = 10, flowRemoved = 11, portStatus = 12, packetOut = 13, flowMod = 14, groupMod = 15, portMod = 16
    case tableMod = 17, multipartRequest = 18, multipartReply = 19, barrierRequest = 20, barrierReply = 21
    case queueGetConfigRequest = 22, queueGetConfigReply = 23, roleRequest = 24, roleReply = 25
    case getAsyncRequest = 26, getAsyncReply = 27, setAsync = 28, meterMod = 29
}

public enum OFMultipart: UInt16 {
    case desc = 0, flow = 1, aggregate = 2, table = 3, portStats = 4, queue = 5, group = 6, groupDesc = 7
    case groupFeatures = 8, meter = 9, meterConfig = 10, meterFeatures = 11, tableFeatures = 12, portDesc = 13
}

/// An OpenFlow error: `type` and `code` as the spec numbers them.
public struct OpenFlowError: Error, Sendable, CustomStringConvertible {
    public var type: UInt16
    public var code: UInt16
    public var reason: String

    public init(_ type: UInt16, _ code: UInt16, _ reason: String) {
        self.type = type
        self.code = code
        self.reason = reason
    }

    static func badRequest(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(1, code, reason) }
    static func badAction(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(2, code, reason) }
    static func badInstruction(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(3, code, reason) }
    static func badMatch(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(4, code, reason) }
    static func flowModFailed(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(5, code, reason) }
    static func truncated(_ what: String) -> OpenFlowError { .badRequest(6, "\(what) is truncated") }
    static func portModFailed(_ code: UInt16, _ reason: String) -> OpenFlowError { OpenFlowError(7, code, reason) }

    public var description: String { "OpenFlow error type \(type) code \(code): \(reason)" }
}

// MARK: byte reading and writing

struct OFReader {
    let bytes: [UInt8]
    var offset: Int
    let end: Int

    init(_ bytes: [UInt8], from: Int = 0, to end: Int? = nil) {
        self.bytes = bytes
        offset = from
        self.end = min(end ?? bytes.count, bytes.count)
    }

    var remaining: Int { end - offset }

    mutating func u8() throws -> UInt8 {
        guard offset < end else { throw OpenFlowError.truncated("message") }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u16() throws -> UInt16 { UInt16(try u8()) << 8 | UInt16(try u8()) }
    mutating func u32() throws -> UInt32 { UInt32(try u16()) << 16 | UInt32(try u16()) }
    mutating func u64() throws -> UInt64 { UInt64(try u32()) << 32 | UInt64(try u32()) }

    mutating func skip(_ count: Int) throws {
        guard count >= 0, count <= remaining else { throw OpenFlowError.truncated("message") }
        offset += count
    }

    mutating func take(_ count: Int) throws -> [UInt8] {
        guard count >= 0, count <= remaining else { throw OpenFlowError.truncated("message") }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    /// A reader over the next `count` bytes; this one moves past them.
    mutating func sub(_ count: Int) throws -> OFReader {
        guard count >= 0, count <= remaining else { throw OpenFlowError.truncated("message") }
        defer { offset += count }
        return OFReader(bytes, from: offset, to: offset + count)
    }
}

struct OFWriter {
    var bytes: [UInt8] = []
    mutating func u8(_ value: UInt8) { bytes.append(value) }
    mutating func u16(_ value: UInt16) { bytes += [UInt8(value >> 8), UInt8(value & 0xFF)] }
    mutating func u32(_ value: UInt32) { u16(UInt16(value >> 16)); u16(UInt16(value & 0xFFFF)) }
    mutating func u64(_ value: UInt64) { u32(UInt32(value >> 32)); u32(UInt32(value & 0xFFFF_FFFF)) }
    mutating func zeros(_ count: Int) { bytes += Array(repeating: 0, count: count) }
    mutating func padTo8() { while bytes.count % 8 != 0 { bytes.append(0) } }
    mutating func string(_ text: String, width: Int) {
        let utf8 = Array(text.utf8.prefix(width - 1))
        bytes += utf8 + Array(repeating: 0, count: width - utf8.count)
    }
    mutating func setU16(at offset: Int, _ value: UInt16) {
        bytes[offset] = UInt8(value >> 8)
        bytes[offset + 1] = UInt8(value & 0xFF)
    }
}

/// A whole message: header plus body.
public struct OFMessage: Sendable {
    public static let version: UInt8 = 4
    public var version: UInt8
    public var type: UInt8
    public var xid: UInt32
    public var body: [UInt8]

    public init(type: OFType, xid: UInt32, body: [UInt8] = []) {
        version = Self.version
        self.type = type.rawValue
        self.xid = xid
        self.body = body
    }

    init(version: UInt8, type: UInt8, xid: UInt32, body: [UInt8]) {
        self.version = version
        self.type = type
        self.xid = xid
        self.body = body
    }

    public var bytes: [UInt8] {
        var writer = OFWriter()
        writer.u8(version)
        writer.u8(type)
        writer.u16(UInt16(clamping: 8 + body.count))
        writer.u32(xid)
        return writer.bytes + body
    }

    /// The length a buffer starting with a header says the message has, or nil if under 8 bytes.
    public static func length(ofHeader bytes: some Collection<UInt8>) -> Int? {
        guard bytes.count >= 8 else { return nil }
        let start = bytes.startIndex
        return Int(bytes[bytes.index(start, offsetBy: 2)]) << 8 | Int(bytes[bytes.index(start, offsetBy: 3)])
    }

    public static func parse(_ bytes: [UInt8]) throws -> OFMessage {
        guard bytes.count >= 8, let length = length(ofHeader: bytes), length == bytes.count else {
            throw OpenFlowError.badRequest(6, "bad message length")
        }
        return OFMessage(
            version: bytes[0], type: bytes[1], xid: UInt32(bytes[4]) << 24 | UInt32(bytes[5]) << 16 | UInt32(bytes[6]) << 8 | UInt32(bytes[7]),
            body: Array(bytes[8...]))
    }

    /// An OFPT_ERROR answering `offending` (its first 64 bytes are echoed).
    public static func error(_ error: OpenFlowError, replyingTo offending: [UInt8], xid: UInt32) -> OFMessage {
        var writer = OFWriter()
        writer.u16(error.type)
        writer.u16(error.code)
        writer.bytes += offending.prefix(64)
        return OFMessage(type: .error, xid: xid, body: writer.bytes)
    }
}

// MARK: OXM match

enum OXM {
    static let basicClass: UInt16 = 0x8000

    /// Reads an ofp_match (type 1, OXM) into a value and mask.
    static func parseMatch(_ reader: inout OFReader) throws -> (value: FlowKey, mask: FlowKey) {
        let start = reader.offset
        let type = try reader.u16()
        let length = Int(try reader.u16())
        guard type == 1 else { throw OpenFlowError.badMatch(0, "only OXM matches are supported") }
        guard length >= 4 else { throw OpenFlowError.badMatch(1, "match length \(length)") }
        var fields = try reader.sub(length - 4)
        var value = FlowKey()
        var mask = FlowKey()
        var seen: Set<UInt8> = []
        while fields.remaining > 0 {
            let oxmClass = try fields.u16()
            let fieldAndMask = try fields.u8()
            let payloadLength = Int(try fields.u8())
            var payload = try fields.sub(payloadLength)
            guard oxmClass == basicClass else { throw OpenFlowError.badMatch(5, "OXM class 0x\(String(oxmClass, radix: 16)) is not supported") }
            let field = fieldAndMask >> 1
            let hasMask = fieldAndMask & 1 != 0
            guard seen.insert(field).inserted else { throw OpenFlowError.badMatch(10, "field \(field) appears twice") }
            try apply(field: field, hasMask: hasMask, payload: &payload, length: payloadLength, value: &value, mask: &mask)
        }
        // ofp_match is padded to a multiple of 8.
        let padded = (length + 7) / 8 * 8
        try reader.skip(padded - (reader.offset - start))
        try checkPrerequisites(value: value, mask: mask)
        return (value & mask, mask)
    }

    private static func apply(
        field: UInt8, hasMask: Bool, payload: inout OFReader, length: Int, value: inout FlowKey, mask: inout FlowKey
    ) throws {
        func expect(_ width: Int) throws {
            guard length == (hasMask ? 2 * width : width) else { throw OpenFlowError.badMatch(1, "field \(field) has length \(length)") }
        }
        func read(_ width: Int) throws -> (UInt64, UInt64) {
            try expect(width)
            var v: UInt64 = 0
            for _ in 0..<width { v = v << 8 | UInt64(try payload.u8()) }
            var m: UInt64 = width == 8 ? ~0 : (1 << UInt64(width * 8)) - 1
            if hasMask {
                m = 0
                for _ in 0..<width { m = m << 8 | UInt64(try payload.u8()) }
            }
            return (v, m)
        }
        func noMask() throws { if hasMask { throw OpenFlowError.badMatch(8, "field \(field) cannot be masked") } }
        switch field {
        case 0:
            try noMask()
            let (v, _) = try read(4)
            value.inPort = UInt32(v)
            mask.inPort = ~0
        case 2:
            let (v, m) = try read(8)
            value.metadata = v
            mask.metadata = m
        case 3:
            let (v, m) = try read(6)
            value.ethDst = v
            mask.ethDst = m
        case 4:
            let (v, m) = try read(6)
            value.ethSrc = v
            mask.ethSrc = m
        case 5:
            try noMask()
            value.ethType = UInt16(try read(2).0)
            mask.ethType = 0xFFFF
        case 6:
            let (v, m) = try read(2)
            value.vlanVID = UInt16(v & 0x1FFF)
            mask.vlanVID = UInt16(m & 0x1FFF)
        case 7:
            try noMask()
            value.vlanPCP = UInt8(try read(1).0 & 7)
            mask.vlanPCP = 7
        case 8:
            try noMask()
            value.ipDSCP = UInt8(try read(1).0 & 0x3F)
            mask.ipDSCP = 0x3F
        case 9:
            try noMask()
            value.ipECN = UInt8(try read(1).0 & 3)
            mask.ipECN = 3
        case 10:
            try noMask()
            value.ipProto = UInt8(try read(1).0)
            mask.ipProto = 0xFF
        case 11, 22:
            let (v, m) = try read(4)
            value.ipv4Src = UInt32(v)
            mask.ipv4Src = UInt32(m)
        case 12, 23:
            let (v, m) = try read(4)
            value.ipv4Dst = UInt32(v)
            mask.ipv4Dst = UInt32(m)
        case 13, 15, 17:
            let (v, m) = try read(2)
            value.tpSrc = UInt16(v)
            mask.tpSrc = UInt16(m)
        case 14, 16, 18:
            let (v, m) = try read(2)
            value.tpDst = UInt16(v)
            mask.tpDst = UInt16(m)
        case 19, 29:
            try noMask()
            value.tpSrc = UInt16(try read(1).0)
            mask.tpSrc = 0xFF
        case 20, 30:
            try noMask()
            value.tpDst = UInt16(try read(1).0)
            mask.tpDst = 0xFF
        case 21:
            try noMask()
            let op = try read(2).0
            guard op <= 255 else { throw OpenFlowError.badMatch(7, "ARP opcode \(op) is out of range") }
            value.arpOp = UInt16(op)
            mask.arpOp = 0xFF
        case 24:
            let (v, m) = try read(6)
            value.arpSHA = v
            mask.arpSHA = m
        case 25:
            let (v, m) = try read(6)
            value.arpTHA = v
            mask.arpTHA = m
        case 26, 27:
            try expect(16)
            let high = try payload.u64()
            let low = try payload.u64()
            let maskHigh = hasMask ? try payload.u64() : ~0
            let maskLow = hasMask ? try payload.u64() : ~0
            if field == 26 {
                value.ipv6SrcHigh = high
                value.ipv6SrcLow = low
                mask.ipv6SrcHigh = maskHigh
                mask.ipv6SrcLow = maskLow
            } else {
                value.ipv6DstHigh = high
                value.ipv6DstLow = low
                mask.ipv6DstHigh = maskHigh
                mask.ipv6DstLow = maskLow
            }
        case 38:
            let (v, m) = try read(8)
            value.tunnelID = v
            mask.tunnelID = m
        default:
            throw OpenFlowError.badMatch(6, "OXM field \(field) is not supported")
        }
    }

    /// OpenFlow's prerequisites: L3 fields need eth_type, L4 fields need ip_proto.
    static func checkPrerequisites(value: FlowKey, mask: FlowKey) throws {
        let ipFields = mask.ipProto != 0 || mask.ipDSCP != 0 || mask.ipECN != 0
        let v4 = mask.ipv4Src != 0 || mask.ipv4Dst != 0
        let v6 = mask.ipv6SrcHigh | mask.ipv6SrcLow | mask.ipv6DstHigh | mask.ipv6DstLow != 0
        let arp = mask.arpOp != 0 || mask.arpSHA != 0 || mask.arpTHA != 0
        let transport = mask.tpSrc != 0 || mask.tpDst != 0
        let type = mask.ethType == 0xFFFF ? value.ethType : nil
        if ipFields || transport, type != EtherType.ipv4, type != EtherType.ipv6 {
            throw OpenFlowError.badMatch(9, "IP fields need eth_type 0x0800 or 0x86dd")
        }
        if v4, type != EtherType.ipv4, type != EtherType.arp { throw OpenFlowError.badMatch(9, "IPv4 addresses need eth_type 0x0800 or 0x0806") }
        if v6, type != EtherType.ipv6 { throw OpenFlowError.badMatch(9, "IPv6 addresses need eth_type 0x86dd") }
        if arp, type != EtherType.arp { throw OpenFlowError.badMatch(9, "ARP fields need eth_type 0x0806") }
        if transport, mask.ipProto != 0xFF { throw OpenFlowError.badMatch(9, "transport fields need ip_proto") }
    }

    /// Writes a match as ofp_match with OXM fields (padded to 8 bytes).
    static func write(value: FlowKey, mask: FlowKey, into writer: inout OFWriter) {
        var fields = OFWriter()
        func put(_ field: UInt8, _ width: Int, _ v: UInt64, _ m: UInt64, full: UInt64) {
            guard m != 0 else { return }
            let masked = m != full
            fields.u16(basicClass)
            fields.u8(field << 1 | (masked ? 1 : 0))
            fields.u8(UInt8(masked ? width * 2 : width))
            for shift in stride(from: (width - 1) * 8, through: 0, by: -8) { fields.u8(UInt8((v >> UInt64(shift)) & 0xFF)) }
            if masked { for shift in stride(from: (width - 1) * 8, through: 0, by: -8) { fields.u8(UInt8((m >> UInt64(shift)) & 0xFF)) } }
        }
        let type = value.ethType
        let proto = value.ipProto
        put(0, 4, UInt64(value.inPort), UInt64(mask.inPort), full: 0xFFFF_FFFF)
        put(2, 8, value.metadata, mask.metadata, full: ~0)
        put(3, 6, value.ethDst, mask.ethDst, full: 0xFFFF_FFFF_FFFF)
        put(4, 6, value.ethSrc, mask.ethSrc, full: 0xFFFF_FFFF_FFFF)
        put(5, 2, UInt64(type), UInt64(mask.ethType), full: 0xFFFF)
        put(6, 2, UInt64(value.vlanVID), UInt64(mask.vlanVID), full: 0x1FFF)
        put(7, 1, UInt64(value.vlanPCP), UInt64(mask.vlanPCP), full: 7)
        put(8, 1, UInt64(value.ipDSCP), UInt64(mask.ipDSCP), full: 0x3F)
        put(9, 1, UInt64(value.ipECN), UInt64(mask.ipECN), full: 3)
        put(10, 1, UInt64(proto), UInt64(mask.ipProto), full: 0xFF)
        let arp = type == EtherType.arp
        put(arp ? 22 : 11, 4, UInt64(value.ipv4Src), UInt64(mask.ipv4Src), full: 0xFFFF_FFFF)
        put(arp ? 23 : 12, 4, UInt64(value.ipv4Dst), UInt64(mask.ipv4Dst), full: 0xFFFF_FFFF)
        if arp {
            put(21, 2, UInt64(value.arpOp), UInt64(mask.arpOp), full: 0xFF)
            put(24, 6, value.arpSHA, mask.arpSHA, full: 0xFFFF_FFFF_FFFF)
            put(25, 6, value.arpTHA, mask.arpTHA, full: 0xFFFF_FFFF_FFFF)
        }
        switch proto {
        case IPProtocol.tcp:
            put(13, 2, UInt64(value.tpSrc), UInt64(mask.tpSrc), full: 0xFFFF)
            put(14, 2, UInt64(value.tpDst), UInt64(mask.tpDst), full: 0xFFFF)
        case IPProtocol.udp:
            put(15, 2, UInt64(value.tpSrc), UInt64(mask.tpSrc), full: 0xFFFF)
            put(16, 2, UInt64(value.tpDst), UInt64(mask.tpDst), full: 0xFFFF)
        case IPProtocol.sctp:
            put(17, 2, UInt64(value.tpSrc), UInt64(mask.tpSrc), full: 0xFFFF)
            put(18, 2, UInt64(value.tpDst), UInt64(mask.tpDst), full: 0xFFFF)
        case IPProtocol.icmp:
            put(19, 1, UInt64(value.tpSrc), UInt64(mask.tpSrc), full: 0xFF)
            put(20, 1, UInt64(value.tpDst), UInt64(mask.tpDst), full: 0xFF)
        case IPProtocol.icmpv6:
            put(29, 1, UInt64(value.tpSrc), UInt64(mask.tpSrc), full: 0xFF)
            put(30, 1, UInt64(value.tpDst), UInt64(mask.tpDst), full: 0xFF)
        default:
            break
        }
        if mask.ipv6SrcHigh | mask.ipv6SrcLow != 0 {
            writeIPv6(26, value.ipv6SrcHigh, value.ipv6SrcLow, mask.ipv6SrcHigh, mask.ipv6SrcLow, into: &fields)
        }
        if mask.ipv6DstHigh | mask.ipv6DstLow != 0 {
            writeIPv6(27, value.ipv6DstHigh, value.ipv6DstLow, mask.ipv6DstHigh, mask.ipv6DstLow, into: &fields)
        }
        put(38, 8, value.tunnelID, mask.tunnelID, full: ~0)
        writer.u16(1)
        writer.u16(UInt16(4 + fields.bytes.count))
        writer.bytes += fields.bytes
        writer.padTo8()
    }

    private static func writeIPv6(_ field: UInt8, _ high: UInt64, _ low: UInt64, _ maskHigh: UInt64, _ maskLow: UInt64, into fields: inout OFWriter) {
        let masked = maskHigh != ~0 || maskLow != ~0
        fields.u16(basicClass)
        fields.u8(field << 1 | (masked ? 1 : 0))
        fields.u8(masked ? 32 : 16)
        fields.u64(high)
        fields.u64(low)
        if masked {
            fields.u64(maskHigh)
            fields.u64(maskLow)
        }
    }
}

// MARK: actions and instructions

enum OFActions {
    static func parse(_ reader: inout OFReader) throws -> [Action] {
        var actions: [Action] = []
        while reader.remaining > 0 {
            let type = try reader.u16()
            let length = Int(try reader.u16())
            guard length >= 8, length % 8 == 0 else { throw OpenFlowError.badAction(1, "action length \(length)") }
            var body = try reader.sub(length - 4)
            switch type {
            case 0:
                guard length == 16 else { throw OpenFlowError.badAction(1, "output action length \(length)") }
                let port = try body.u32()
                let maxLength = try body.u16()
                guard port != 0, port != OFPort.any, port <= OFPort.max || port >= OFPort.inPort else {
                    throw OpenFlowError.badAction(4, "bad output port \(port)")
                }
                actions.append(.output(port: port, maxLength: maxLength))
            case 17:
                let tpid = try body.u16()
                guard tpid == 0x8100 || tpid == 0x88A8 else { throw OpenFlowError.badAction(5, "push_vlan ethertype 0x\(String(tpid, radix: 16))") }
                actions.append(.pushVLAN(tpid))
            case 18: actions.append(.popVLAN)
            case 21: actions.append(.setQueue(try body.u32()))
            case 22: actions.append(.group(try body.u32()))
            case 24: actions.append(.decTTL)
            case 25: actions.append(.setField(try setField(&body)))
            default: throw OpenFlowError.badAction(0, "action type \(type) is not supported")
            }
        }
        return actions
    }

    private static func setField(_ body: inout OFReader) throws -> SetField {
        let oxmClass = try body.u16()
        let fieldAndMask = try body.u8()
        let length = Int(try body.u8())
        guard oxmClass == OXM.basicClass, fieldAndMask & 1 == 0 else { throw OpenFlowError.badAction(5, "set_field needs an unmasked basic OXM field") }
        var payload = try body.sub(length)
        func value(_ width: Int) throws -> UInt64 {
            guard length == width else { throw OpenFlowError.badAction(1, "set_field length \(length)") }
            var v: UInt64 = 0
            for _ in 0..<width { v = v << 8 | UInt64(try payload.u8()) }
            return v
        }
        switch fieldAndMask >> 1 {
        case 2: return .metadata(try value(8))
        case 3: return .ethDst(try value(6))
        case 4: return .ethSrc(try value(6))
        case 6: return .vlanVID(UInt16(try value(2) & 0x0FFF))
        case 7: return .vlanPCP(UInt8(try value(1) & 7))
        case 8: return .ipDSCP(UInt8(try value(1) & 0x3F))
        case 11: return .ipv4Src(UInt32(try value(4)))
        case 12: return .ipv4Dst(UInt32(try value(4)))
        case 13, 15: return .tpSrc(UInt16(try value(2)))
        case 14, 16: return .tpDst(UInt16(try value(2)))
        case 38: return .tunnelID(try value(8))
        default: throw OpenFlowError.badAction(5, "set_field of OXM field \(fieldAndMask >> 1) is not supported")
        }
    }

    static func write(_ actions: [Action], into writer: inout OFWriter) {
        for action in actions {
            switch action {
            case .output(let port, let maxLength):
                writer.u16(0)
                writer.u16(16)
                writer.u32(port)
                writer.u16(maxLength)
                writer.zeros(6)
            case .pushVLAN(let tpid):
                writer.u16(17)
                writer.u16(8)
                writer.u16(tpid)
                writer.zeros(2)
            case .popVLAN:
                writer.u16(18)
                writer.u16(8)
                writer.zeros(4)
            case .setQueue(let queue):
                writer.u16(21)
                writer.u16(8)
                writer.u32(queue)
            case .group(let group):
                writer.u16(22)
                writer.u16(8)
                writer.u32(group)
            case .decTTL:
                writer.u16(24)
                writer.u16(8)
                writer.zeros(4)
            case .setField(let field):
                let (number, width, value): (UInt8, Int, UInt64) =
                    switch field {
                    case .metadata(let v): (2, 8, v)
                    case .ethDst(let v): (3, 6, v)
                    case .ethSrc(let v): (4, 6, v)
                    case .vlanVID(let v): (6, 2, UInt64(v) | 0x1000)
                    case .vlanPCP(let v): (7, 1, UInt64(v))
                    case .ipDSCP(let v): (8, 1, UInt64(v))
                    case .ipv4Src(let v): (11, 4, UInt64(v))
                    case .ipv4Dst(let v): (12, 4, UInt64(v))
                    case .tpSrc(let v): (13, 2, UInt64(v))
                    case .tpDst(let v): (14, 2, UInt64(v))
                    case .tunnelID(let v): (38, 8, v)
                    }
                let start = writer.bytes.count
                writer.u16(25)
                writer.u16(0)
                writer.u16(OXM.basicClass)
                writer.u8(number << 1)
                writer.u8(UInt8(width))
                for shift in stride(from: (width - 1) * 8, through: 0, by: -8) { writer.u8(UInt8((value >> UInt64(shift)) & 0xFF)) }
                writer.padTo8()
                writer.setU16(at: start + 2, UInt16(writer.bytes.count - start))
            }
        }
    }
}

enum OFInstructions {
    static func parse(_ reader: inout OFReader) throws -> [Instruction] {
        var instructions: [Instruction] = []
        while reader.remaining > 0 {
            let type = try reader.u16()
            let length = Int(try reader.u16())
            guard length >= 8 else { throw OpenFlowError.badInstruction(5, "instruction length \(length)") }
            var body = try reader.sub(length - 4)
            switch type {
            case 1:
                let table = try body.u8()
                guard table < 255 else { throw OpenFlowError.badInstruction(2, "goto_table \(table)") }
                instructions.append(.gotoTable(table))
            case 2:
                try body.skip(4)
                instructions.append(.writeMetadata(value: try body.u64(), mask: try body.u64()))
            case 3, 4:
                try body.skip(4)
                let actions = try OFActions.parse(&body)
                instructions.append(type == 3 ? .writeActions(actions) : .applyActions(actions))
            case 5: instructions.append(.clearActions)
            case 6: break  // meters are accepted and ignored
            default: throw OpenFlowError.badInstruction(0, "instruction type \(type) is not supported")
            }
        }
        return instructions
    }

    static func write(_ instructions: [Instruction], into writer: inout OFWriter) {
        for instruction in instructions {
            let start = writer.bytes.count
            switch instruction {
            case .gotoTable(let table):
                writer.u16(1)
                writer.u16(8)
                writer.u8(table)
                writer.zeros(3)
            case .writeMetadata(let value, let mask):
                writer.u16(2)
                writer.u16(24)
                writer.zeros(4)
                writer.u64(value)
                writer.u64(mask)
            case .writeActions(let actions), .applyActions(let actions):
                if case .writeActions = instruction { writer.u16(3) } else { writer.u16(4) }
                writer.u16(0)
                writer.zeros(4)
                OFActions.write(actions, into: &writer)
                writer.setU16(at: start + 2, UInt16(writer.bytes.count - start))
            case .clearActions:
                writer.u16(5)
                writer.u16(8)
                writer.zeros(4)
            }
        }
    }
}

// MARK: message bodies

public struct FlowMod: Sendable {
    public enum Command: UInt8, Sendable { case add = 0, modify = 1, modifyStrict = 2, delete = 3, deleteStrict = 4 }
    public var cookie: UInt64
    public var cookieMask: UInt64
    public var table: UInt8
    public var command: Command
    public var idleTimeout: UInt16
    public var hardTimeout: UInt16
    public var priority: UInt16
    public var bufferID: UInt32
    public var outPort: UInt32
    public var outGroup: UInt32
    public var flags: UInt16
    public var value: FlowKey
    public var mask: FlowKey
    public var instructions: [Instruction]

    public init(body: [UInt8]) throws {
        var reader = OFReader(body)
        cookie = try reader.u64()
        cookieMask = try reader.u64()
        table = try reader.u8()
        let commandValue = try reader.u8()
        guard let command = Command(rawValue: commandValue) else { throw OpenFlowError.flowModFailed(6, "flow_mod command \(commandValue)") }
        self.command = command
        idleTimeout = try reader.u16()
        hardTimeout = try reader.u16()
        priority = try reader.u16()
        bufferID = try reader.u32()
        outPort = try reader.u32()
        outGroup = try reader.u32()
        flags = try reader.u16()
        try reader.skip(2)
        (value, mask) = try OXM.parseMatch(&reader)
        instructions = try OFInstructions.parse(&reader)
        if command == .add || command == .modify || command == .modifyStrict {
            guard table < 255 else { throw OpenFlowError.flowModFailed(2, "table 255 is only for deletes") }
        }
    }

    /// The message body for an `add` of `flow` (how flows are saved across restarts).
    public static func addBody(_ flow: FlowEntry) -> [UInt8] {
        var writer = OFWriter()
        writer.u64(flow.cookie)
        writer.u64(0)
        writer.u8(flow.table)
        writer.u8(Command.add.rawValue)
        writer.u16(flow.idleTimeout)
        writer.u16(flow.hardTimeout)
        writer.u16(flow.priority)
        writer.u32(0xFFFF_FFFF)
        writer.u32(OFPort.any)
        writer.u32(0xFFFF_FFFF)
        writer.u16(flow.flags)
        writer.zeros(2)
        OXM.write(value: flow.value, mask: flow.mask, into: &writer)
        OFInstructions.write(flow.instructions, into: &writer)
        return writer.bytes
    }

    /// Whether `flow` is selected by this request's match (non-strict: the request's match is
    /// the same or more general).
    func selects(_ flow: FlowEntry, strict: Bool) -> Bool {
        if strict, flow.priority != priority || flow.mask != mask { return false }
        return flow.selected(value: value, mask: mask, cookie: cookie, cookieMask: cookieMask, outPort: outPort)
    }
}

extension FlowMod {
    func entry(now: UInt64, counters: FlowCounters = FlowCounters()) -> FlowEntry {
        FlowEntry(
            table: table, priority: priority, value: value, mask: mask, instructions: instructions, cookie: cookie, idleTimeout: idleTimeout,
            hardTimeout: hardTimeout, flags: flags, created: now, counters: counters)
    }
}

extension FlowEntry {
    /// OpenFlow's non-strict selection, shared by flow_mod and flow stats: the request's match is
    /// the same or more general, the cookie matches under its mask, and (unless ANY) the flow
    /// outputs to `outPort`. (With equal masks this is also the strict comparison of matches.)
    func selected(value: FlowKey, mask: FlowKey, cookie: UInt64, cookieMask: UInt64, outPort: UInt32) -> Bool {
        guard (self.mask & mask) == mask, (self.value & mask) == value else { return false }
        if cookieMask != 0, (self.cookie & cookieMask) != (cookie & cookieMask) { return false }
        return outPort == OFPort.any || outputs(to: outPort)
    }

    /// Whether any of the flow's actions outputs to `port`.
    func outputs(to port: UInt32) -> Bool {
        instructions.contains { instruction in
            switch instruction {
            case .applyActions(let actions), .writeActions(let actions):
                return actions.contains { if case .output(let p, _) = $0 { p == port } else { false } }
            default: return false
            }
        }
    }
}

/// A flow stats (or aggregate) request: which flows to report.
struct FlowStatsRequest {
    var table: UInt8
    var outPort: UInt32
    var cookie: UInt64
    var cookieMask: UInt64
    var value: FlowKey
    var mask: FlowKey

    init(_ reader: inout OFReader) throws {
        table = try reader.u8()
        try reader.skip(3)
        outPort = try reader.u32()
        _ = try reader.u32()
        try reader.skip(4)
        cookie = try reader.u64()
        cookieMask = try reader.u64()
        (value, mask) = try OXM.parseMatch(&reader)
    }

    func selects(_ flow: FlowEntry) -> Bool {
        if table != 0xFF, flow.table != table { return false }
        return flow.selected(value: value, mask: mask, cookie: cookie, cookieMask: cookieMask, outPort: outPort)
    }
}

enum OFBodies {
    static func flowStats(_ flow: FlowEntry, now: UInt64) -> [UInt8] {
        var writer = OFWriter()
        writer.u16(0)
        writer.u8(flow.table)
        writer.u8(0)
        let age = now &- flow.created
        writer.u32(UInt32(clamping: age / 1_000_000_000))
        writer.u32(UInt32(age % 1_000_000_000))
        writer.u16(flow.priority)
        writer.u16(flow.idleTimeout)
        writer.u16(flow.hardTimeout)
        writer.u16(flow.flags)
        writer.zeros(4)
        writer.u64(flow.cookie)
        writer.u64(flow.counters.packets)
        writer.u64(flow.counters.bytes)
        OXM.write(value: flow.value, mask: flow.mask, into: &writer)
        OFInstructions.write(flow.instructions, into: &writer)
        writer.setU16(at: 0, UInt16(clamping: writer.bytes.count))
        return writer.bytes
    }

    /// The hardware address a port's description shows (and a PORT_MOD must name).
    static func portAddress(_ number: UInt32) -> UInt64 { 0x0200_0000_0000 | UInt64(number) }

    static func port(number: UInt32, name: String, config: UInt32) -> [UInt8] {
        var writer = OFWriter()
        writer.u32(number)
        writer.zeros(4)
        let mac = portAddress(number)
        for shift in stride(from: 40, through: 0, by: -8) { writer.u8(UInt8((mac >> UInt64(shift)) & 0xFF)) }
        writer.zeros(2)
        writer.string(name, width: 16)
        writer.u32(config)
        writer.u32(config & OFPortConfig.portDown != 0 ? 1 : 4)  // state: link down, or live
        writer.u32(0x2000 | 0x0800)  // curr: 10 Gb full duplex, copper
        writer.u32(0)
        writer.u32(0)
        writer.u32(0)
        writer.u32(10_000_000)  // curr_speed kbps
        writer.u32(10_000_000)
        return writer.bytes
    }

    /// Matchable OXM fields: (field, payload length, maskable).
    static let matchFields: [(UInt8, Int, Bool)] = [
        (0, 4, false), (2, 8, true), (3, 6, true), (4, 6, true), (5, 2, false), (6, 2, true), (7, 1, false), (8, 1, false),
        (9, 1, false), (10, 1, false), (11, 4, true), (12, 4, true), (13, 2, true), (14, 2, true), (15, 2, true), (16, 2, true),
        (17, 2, true), (18, 2, true), (19, 1, false), (20, 1, false), (21, 2, false), (22, 4, true), (23, 4, true), (24, 6, true),
        (25, 6, true), (26, 16, true), (27, 16, true), (29, 1, false), (30, 1, false), (38, 8, true),
    ]
    static let settableFields: Set<UInt8> = [2, 3, 4, 6, 7, 8, 11, 12, 13, 14, 15, 16, 38]
    static let actionTypes: [UInt16] = [0, 17, 18, 21, 22, 24, 25]

    /// One table's features, with the eight properties OpenFlow 1.3 requires.
    static func tableFeatures(_ table: UInt8) -> [UInt8] {
        var writer = OFWriter()
        writer.u16(0)
        writer.u8(table)
        writer.zeros(5)
        writer.string("table\(table)", width: 32)
        writer.u64(~0)
        writer.u64(~0)
        writer.u32(0)
        writer.u32(1_000_000)
        func property(_ type: UInt16, _ body: (inout OFWriter) -> Void) {
            let start = writer.bytes.count
            writer.u16(type)
            writer.u16(0)
            body(&writer)
            writer.setU16(at: start + 2, UInt16(writer.bytes.count - start))
            writer.padTo8()
        }
        func oxm(_ field: UInt8, _ length: Int, _ masked: Bool) -> UInt32 {
            UInt32(OXM.basicClass) << 16 | UInt32(field) << 9 | (masked ? 1 << 8 : 0) | UInt32(masked ? length * 2 : length)
        }
        property(0) { w in for type: UInt16 in [1, 2, 3, 4, 5] { w.u16(type); w.u16(4) } }
        property(2) { w in for next in (Int(table) + 1)..<OFTable.count { w.u8(UInt8(next)) } }
        for type: UInt16 in [4, 6] { property(type) { w in for action in actionTypes { w.u16(action); w.u16(4) } } }
        property(8) { w in for (field, length, maskable) in matchFields { w.u32(oxm(field, length, maskable)) } }
        property(10) { w in for (field, length, _) in matchFields { w.u32(oxm(field, length, false)) } }
        for type: UInt16 in [12, 14] {
            property(type) { w in for (field, length, _) in matchFields where settableFields.contains(field) { w.u32(oxm(field, length, false)) } }
        }
        writer.setU16(at: 0, UInt16(writer.bytes.count))
        return writer.bytes
    }

    static func portStats(number: UInt32, counters: PortCounters, age: UInt64) -> [UInt8] {
        var writer = OFWriter()
        writer.u32(number)
        writer.zeros(4)
        writer.u64(counters.rxPackets)
        writer.u64(counters.txPackets)
        writer.u64(counters.rxBytes)
        writer.u64(counters.txBytes)
        writer.u64(0)
        writer.u64(counters.txDropped)
        for _ in 0..<6 { writer.u64(0) }
        writer.u32(UInt32(clamping: age / 1_000_000_000))
        writer.u32(UInt32(age % 1_000_000_000))
        return writer.bytes
    }
}
