// VMM (layer 3): a small ACPI Machine Language encoder for the DSDT: just the terms a microVM's
// namespace needs (scopes, devices, names, integers, strings, packages, resource templates).

/// An encoded AML term.
public struct AML: Sendable, Equatable {
    public let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    /// PkgLength for `contentLength` bytes that follow it; the result counts itself.
    public static func packageLength(_ contentLength: Int) -> [UInt8] {
        if contentLength + 1 < 0x40 { return [UInt8(contentLength + 1)] }
        if contentLength + 2 < 0x1000 {
            let total = contentLength + 2
            return [0x40 | UInt8(total & 0xF), UInt8((total >> 4) & 0xFF)]
        }
        if contentLength + 3 < 0x10_0000 {
            let total = contentLength + 3
            return [0x80 | UInt8(total & 0xF), UInt8((total >> 4) & 0xFF), UInt8((total >> 12) & 0xFF)]
        }
        let total = contentLength + 4
        return [0xC0 | UInt8(total & 0xF), UInt8((total >> 4) & 0xFF), UInt8((total >> 12) & 0xFF), UInt8((total >> 20) & 0xFF)]
    }

    /// A NameString such as `_HID`, `\_SB_` or `\_SB_.VR00`; segments are padded with `_`.
    public static func nameString(_ path: String) -> [UInt8] {
        var out: [UInt8] = []
        var rest = Substring(path)
        if rest.hasPrefix("\\") {
            out.append(0x5C)
            rest = rest.dropFirst()
        }
        let segments = rest.split(separator: ".").map { seg -> [UInt8] in
            var s = Array(seg.utf8.prefix(4))
            while s.count < 4 { s.append(0x5F) }
            return s
        }
        switch segments.count {
        case 0: out.append(0x00)
        case 1: out += segments[0]
        case 2: out += [0x2E] + segments[0] + segments[1]
        default: out += [0x2F, UInt8(segments.count)] + segments.flatMap { $0 }
        }
        return out
    }

    public static func integer(_ value: UInt64) -> AML {
        switch value {
        case 0: return AML([0x00])
        case 1: return AML([0x01])
        case ...0xFF: return AML([0x0A, UInt8(value)])
        case ...0xFFFF: return AML([0x0B] + le(value, 2))
        case ...0xFFFF_FFFF: return AML([0x0C] + le(value, 4))
        default: return AML([0x0E] + le(value, 8))
        }
    }

    /// EISAID("PNP0501"): three letters and four hex digits compressed into a DWord.
    public static func eisaID(_ id: String) -> AML {
        let c = Array(id.utf8)
        guard c.count == 7 else { return integer(0) }
        func hex(_ b: UInt8) -> UInt32 { UInt32(UInt8(ascii: "0") <= b && b <= UInt8(ascii: "9") ? b - 48 : (b | 0x20) - 87) & 0xF }
        let l1 = UInt32(c[0] - 0x40) & 0x1F, l2 = UInt32(c[1] - 0x40) & 0x1F, l3 = UInt32(c[2] - 0x40) & 0x1F
        let byte0 = (l1 << 2) | (l2 >> 3)
        let byte1 = ((l2 & 7) << 5) | l3
        let byte2 = (hex(c[3]) << 4) | hex(c[4])
        let byte3 = (hex(c[5]) << 4) | hex(c[6])
        return AML([0x0C] + le(UInt64(byte0 | byte1 << 8 | byte2 << 16 | byte3 << 24), 4))
    }

    public static func string(_ value: String) -> AML { AML([0x0D] + Array(value.utf8) + [0x00]) }

    public static func name(_ path: String, _ value: AML) -> AML { AML([0x08] + nameString(path) + value.bytes) }

    public static func scope(_ path: String, _ terms: [AML]) -> AML {
        let body = nameString(path) + terms.flatMap(\.bytes)
        return AML([0x10] + packageLength(body.count) + body)
    }

    public static func device(_ path: String, _ terms: [AML]) -> AML {
        let body = nameString(path) + terms.flatMap(\.bytes)
        return AML([0x5B, 0x82] + packageLength(body.count) + body)
    }

    public static func package(_ elements: [AML]) -> AML {
        let body = [UInt8(elements.count)] + elements.flatMap(\.bytes)
        return AML([0x12] + packageLength(body.count) + body)
    }

    public static func buffer(_ data: [UInt8]) -> AML {
        let body = integer(UInt64(data.count)).bytes + data
        return AML([0x11] + packageLength(body.count) + body)
    }

    /// A ResourceTemplate: the descriptors followed by an end tag with a zero checksum.
    public static func resourceTemplate(_ descriptors: [[UInt8]]) -> AML {
        buffer(descriptors.flatMap { $0 } + [0x79, 0x00])
    }

    /// Memory32Fixed(ReadWrite, base, length).
    public static func memory32Fixed(base: UInt32, length: UInt32, writable: Bool = true) -> [UInt8] {
        [0x86, 0x09, 0x00, writable ? 1 : 0] + le(UInt64(base), 4) + le(UInt64(length), 4)
    }

    /// Interrupt(ResourceConsumer, Edge or Level, ActiveHigh, Exclusive) { gsi }.
    public static func extendedInterrupt(_ gsi: UInt32, edge: Bool = true) -> [UInt8] {
        let flags: UInt8 = 0x01 | (edge ? 0x02 : 0)
        return [0x89, 0x06, 0x00, flags, 0x01] + le(UInt64(gsi), 4)
    }

    /// IO(Decode16, base, base, 1, length).
    public static func ioPort(base: UInt16, length: UInt8) -> [UInt8] {
        [0x47, 0x01] + le(UInt64(base), 2) + le(UInt64(base), 2) + [0x01, length]
    }

    /// IRQNoFlags() { irq }.
    public static func irq(_ line: UInt8) -> [UInt8] {
        let mask = UInt16(1) << UInt16(line & 15)
        return [0x22] + le(UInt64(mask), 2)
    }

    static func le(_ value: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }
}
