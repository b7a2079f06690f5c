// OVSDB layer: the values stored in a database (RFC 7047 section 5.1): atoms of five types, and
// datums, which are sets of atoms or maps from atoms to atoms, always kept sorted and unique.

/// A row's identity. Formatted lowercase, as ovsdb-server does.
public struct RowUUID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    public static let zero = RowUUID(high: 0, low: 0)

    /// A random (version 4) UUID.
    public static func random() -> RowUUID {
        var generator = SystemRandomNumberGenerator()
        let high = generator.next() & ~UInt64(0xF000) | 0x4000
        let low = generator.next() & ~(UInt64(0xC) << 60) | (UInt64(0x8) << 60)
        return RowUUID(high: high, low: low)
    }

    public init?(_ text: String) {
        let bytes = Array(text.utf8)
        guard bytes.count == 36, bytes[8] == 0x2D, bytes[13] == 0x2D, bytes[18] == 0x2D, bytes[23] == 0x2D else { return nil }
        var digits: [UInt64] = []
        digits.reserveCapacity(32)
        for (position, byte) in bytes.enumerated() where ![8, 13, 18, 23].contains(position) {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digits.append(UInt64(byte - UInt8(ascii: "0")))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digits.append(UInt64(byte - UInt8(ascii: "a") + 10))
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digits.append(UInt64(byte - UInt8(ascii: "A") + 10))
            default: return nil
            }
        }
        high = digits[0..<16].reduce(0) { $0 << 4 | $1 }
        low = digits[16..<32].reduce(0) { $0 << 4 | $1 }
    }

    public var description: String {
        let hex = String(high, radix: 16).leftPadded(to: 16) + String(low, radix: 16).leftPadded(to: 16)
        let chars = Array(hex)
        return String(chars[0..<8]) + "-" + String(chars[8..<12]) + "-" + String(chars[12..<16]) + "-" + String(chars[16..<20]) + "-"
            + String(chars[20..<32])
    }

    public static func < (a: RowUUID, b: RowUUID) -> Bool { (a.high, a.low) < (b.high, b.low) }
}

extension String {
    /// The string with zeros in front up to `width` characters (hex dumps, IDs).
    public func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// The five atomic types.
public enum AtomicType: String, Sendable, Hashable {
    case integer, real, boolean, string, uuid
}

/// One value of an atomic type.
public enum Atom: Hashable, Comparable, Sendable, CustomStringConvertible {
    case integer(Int64)
    case real(Double)
    case boolean(Bool)
    case string(String)
    case uuid(RowUUID)

    public var type: AtomicType {
        switch self {
        case .integer: .integer
        case .real: .real
        case .boolean: .boolean
        case .string: .string
        case .uuid: .uuid
        }
    }

    public static func defaultValue(_ type: AtomicType) -> Atom {
        switch type {
        case .integer: .integer(0)
        case .real: .real(0)
        case .boolean: .boolean(false)
        case .string: .string("")
        case .uuid: .uuid(.zero)
        }
    }

    public static func < (a: Atom, b: Atom) -> Bool {
        switch (a, b) {
        case (.integer(let x), .integer(let y)): x < y
        case (.real(let x), .real(let y)): x < y
        case (.boolean(let x), .boolean(let y)): !x && y
        case (.string(let x), .string(let y)): Array(x.utf8).lexicographicallyPrecedes(Array(y.utf8))
        case (.uuid(let x), .uuid(let y)): x < y
        default: a.type.rawValue < b.type.rawValue
        }
    }

    public var json: JSON {
        switch self {
        case .integer(let value): .int(value)
        case .real(let value): .double(value)
        case .boolean(let value): .bool(value)
        case .string(let value): .string(value)
        case .uuid(let value): .array([.string("uuid"), .string(value.description)])
        }
    }

    public var description: String {
        switch self {
        case .integer(let value): String(value)
        case .real(let value): String(value)
        case .boolean(let value): String(value)
        case .string(let value): value
        case .uuid(let value): value.description
        }
    }

    public var uuidValue: RowUUID? {
        if case .uuid(let value) = self { return value }
        return nil
    }
}

/// An RFC 7047 error: the `error` string is one of the RFC's names, `details` says what and why.
public struct OVSDBError: Error, Sendable, CustomStringConvertible {
    public var error: String
    public var details: String
    public var syntax: JSON?

    public init(_ error: String, _ details: String, syntax: JSON? = nil) {
        self.error = error
        self.details = details
        self.syntax = syntax
    }

    static func syntax(_ details: String, _ json: JSON? = nil) -> OVSDBError { OVSDBError("syntax error", details, syntax: json) }
    static func constraint(_ details: String) -> OVSDBError { OVSDBError("constraint violation", details) }

    public var json: JSON {
        var members: [String: JSON] = ["error": .string(error), "details": .string(details)]
        if let syntax { members["syntax"] = .string(syntax.text) }
        return .object(members)
    }

    public var description: String { "\(error): \(details)" }
}

/// Resolves `["named-uuid", name]` references inside one transaction.
public protocol NamedUUIDResolver {
    func resolve(_ name: String) -> RowUUID?
}

/// The type of a set's elements or a map's keys or values, with its constraints.
public struct BaseType: Sendable, Hashable {
    public enum RefType: String, Sendable, Hashable { case strong, weak }

    public var type: AtomicType
    public var enumValues: [Atom]?
    public var minInteger: Int64?
    public var maxInteger: Int64?
    public var minReal: Double?
    public var maxReal: Double?
    public var minLength: Int?
    public var maxLength: Int?
    public var refTable: String?
    public var refType: RefType = .strong

    public init(_ type: AtomicType) { self.type = type }

    init(json: JSON) throws {
        if let name = json.stringValue {
            guard let type = AtomicType(rawValue: name) else { throw OVSDBError.syntax("unknown atomic type \(name)", json) }
            self.type = type
            return
        }
        guard let members = json.objectValue, let name = members["type"]?.stringValue, let type = AtomicType(rawValue: name) else {
            throw OVSDBError.syntax("a base type needs a \"type\" of integer, real, boolean, string or uuid", json)
        }
        self.type = type
        for key in members.keys
        where !["type", "enum", "minInteger", "maxInteger", "minReal", "maxReal", "minLength", "maxLength", "refTable", "refType"]
            .contains(key)
        {
            throw OVSDBError.syntax("unknown member \(key) in a base type", json)
        }
        if let values = members["enum"] {
            let plain = BaseType(type)
            let datum = try Datum(json: values, type: ColumnType(key: plain, value: nil, min: 0, max: Int.max), resolver: nil)
            enumValues = datum.keys
        }
        minInteger = members["minInteger"]?.intValue
        maxInteger = members["maxInteger"]?.intValue
        if let value = members["minReal"] { minReal = try Self.real(value) }
        if let value = members["maxReal"] { maxReal = try Self.real(value) }
        minLength = members["minLength"]?.intValue.map(Int.init)
        maxLength = members["maxLength"]?.intValue.map(Int.init)
        if let table = members["refTable"] {
            guard type == .uuid, let name = table.stringValue else { throw OVSDBError.syntax("refTable needs a uuid base type", json) }
            refTable = name
        }
        if let ref = members["refType"] {
            guard let name = ref.stringValue, let value = RefType(rawValue: name) else {
                throw OVSDBError.syntax("refType must be strong or weak", json)
            }
            refType = value
        }
    }

    private static func real(_ json: JSON) throws -> Double {
        switch json {
        case .int(let value): return Double(value)
        case .double(let value): return value
        default: throw OVSDBError.syntax("expected a real number", json)
        }
    }

    /// Parses one atom of this type.
    func atom(json: JSON, resolver: NamedUUIDResolver?) throws -> Atom {
        switch type {
        case .integer:
            guard case .int(let value) = json else { throw OVSDBError.syntax("expected integer", json) }
            return .integer(value)
        case .real:
            switch json {
            case .int(let value): return .real(Double(value))
            case .double(let value): return .real(value)
            default: throw OVSDBError.syntax("expected real", json)
            }
        case .boolean:
            guard case .bool(let value) = json else { throw OVSDBError.syntax("expected boolean", json) }
            return .boolean(value)
        case .string:
            guard case .string(let value) = json else { throw OVSDBError.syntax("expected string", json) }
            return .string(value)
        case .uuid:
            guard case .array(let pair) = json, pair.count == 2, let tag = pair[0].stringValue, let text = pair[1].stringValue else {
                throw OVSDBError.syntax("expected [\"uuid\", ...] or [\"named-uuid\", ...]", json)
            }
            if tag == "uuid", let uuid = RowUUID(text) { return .uuid(uuid) }
            if tag == "named-uuid" {
                guard let resolver else { throw OVSDBError.syntax("named-uuid is not allowed here", json) }
                guard let uuid = resolver.resolve(text) else { throw OVSDBError.syntax("unknown named-uuid \(text)", json) }
                return .uuid(uuid)
            }
            throw OVSDBError.syntax("expected [\"uuid\", ...] or [\"named-uuid\", ...]", json)
        }
    }

    /// Checks the atom against this type's constraints.
    func check(_ atom: Atom) throws {
        if let enumValues, !enumValues.contains(atom) {
            let allowed = enumValues.map(\.description).joined(separator: ", ")
            throw OVSDBError.constraint("\(atom) is not one of the allowed values ([\(allowed)])")
        }
        switch atom {
        case .integer(let value):
            if let minInteger, value < minInteger { throw OVSDBError.constraint("\(value) is less than minimum allowed value \(minInteger)") }
            if let maxInteger, value > maxInteger {
                throw OVSDBError.constraint("\(value) is greater than maximum allowed value \(maxInteger)")
            }
        case .real(let value):
            if let minReal, value < minReal { throw OVSDBError.constraint("\(value) is less than minimum allowed value \(minReal)") }
            if let maxReal, value > maxReal { throw OVSDBError.constraint("\(value) is greater than maximum allowed value \(maxReal)") }
        case .string(let value):
            let length = value.unicodeScalars.count
            if let minLength, length < minLength {
                throw OVSDBError.constraint("\"\(value)\" length \(length) is less than minimum allowed length \(minLength)")
            }
            if let maxLength, length > maxLength {
                throw OVSDBError.constraint("\"\(value)\" length \(length) is greater than maximum allowed length \(maxLength)")
            }
        default: break
        }
    }
}

/// A column's type: a set of `key` atoms, or a map from `key` to `value`, with `min`...`max` elements.
public struct ColumnType: Sendable, Hashable {
    public var key: BaseType
    public var value: BaseType?
    public var min: Int
    public var max: Int

    public init(key: BaseType, value: BaseType?, min: Int, max: Int) {
        self.key = key
        self.value = value
        self.min = min
        self.max = max
    }

    public var isMap: Bool { value != nil }
    public var isScalar: Bool { min == 1 && max == 1 && value == nil }

    init(json: JSON) throws {
        if json.stringValue != nil {
            self.init(key: try BaseType(json: json), value: nil, min: 1, max: 1)
            return
        }
        guard let members = json.objectValue, let keyJSON = members["key"] else {
            throw OVSDBError.syntax("a column type needs a \"key\"", json)
        }
        for name in members.keys where !["key", "value", "min", "max"].contains(name) {
            throw OVSDBError.syntax("unknown member \(name) in a column type", json)
        }
        let key = try BaseType(json: keyJSON)
        let value = try members["value"].map { try BaseType(json: $0) }
        let min = Int(members["min"]?.intValue ?? 1)
        var max = 1
        if let limit = members["max"] {
            if limit.stringValue == "unlimited" {
                max = Int.max
            } else if let count = limit.intValue, count >= 1 {
                max = Int(count)
            } else {
                throw OVSDBError.syntax("max must be a positive integer or \"unlimited\"", json)
            }
        }
        guard min == 0 || min == 1, min <= max else { throw OVSDBError.syntax("min must be 0 or 1 and not above max", json) }
        self.init(key: key, value: value, min: min, max: max)
    }

    /// The type with any number of elements (the operand of includes/excludes, mutations).
    var relaxed: ColumnType { ColumnType(key: key, value: value, min: 0, max: Int.max) }
}

/// A set or map value: keys sorted and unique, `values` parallel to `keys` for maps.
public struct Datum: Hashable, Sendable {
    public private(set) var keys: [Atom]
    public private(set) var values: [Atom]?

    public init(set atoms: [Atom]) {
        keys = Array(Set(atoms)).sorted()
        values = nil
    }

    public init(map pairs: [(Atom, Atom)]) {
        var unique: [Atom: Atom] = [:]
        for (key, value) in pairs { unique[key] = value }
        let sorted = unique.keys.sorted()
        keys = sorted
        values = sorted.map { unique[$0] ?? $0 }
    }

    public init(_ atom: Atom) {
        keys = [atom]
        values = nil
    }

    public static func empty(_ type: ColumnType) -> Datum { type.isMap ? Datum(map: []) : Datum(set: []) }

    /// The value a new row's column has when the insert does not name it.
    public static func defaultValue(_ type: ColumnType) -> Datum {
        guard type.min == 1 else { return empty(type) }
        let key = Atom.defaultValue(type.key.type)
        if let value = type.value { return Datum(map: [(key, Atom.defaultValue(value.type))]) }
        return Datum(key)
    }

    public var count: Int { keys.count }
    public var isMap: Bool { values != nil }
    public var pairs: [(Atom, Atom)] { values.map { Array(zip(keys, $0)) } ?? [] }

    public subscript(key: Atom) -> Atom? {
        guard let values, let index = keys.firstIndex(of: key) else { return nil }
        return values[index]
    }

    public func contains(_ key: Atom) -> Bool { keys.binarySearch(key) != nil }

    /// Parses a datum of `type`. Named UUIDs resolve through `resolver` when one is given.
    public init(json: JSON, type: ColumnType, resolver: NamedUUIDResolver?) throws {
        if type.isMap, let valueType = type.value {
            guard case .array(let pair) = json, pair.count == 2, pair[0].stringValue == "map", let items = pair[1].arrayValue else {
                throw OVSDBError.syntax("expected [\"map\", [...]]", json)
            }
            var seen: [Atom: Atom] = [:]
            for item in items {
                guard let kv = item.arrayValue, kv.count == 2 else { throw OVSDBError.syntax("a map element must be [key, value]", item) }
                let key = try type.key.atom(json: kv[0], resolver: resolver)
                guard seen[key] == nil else { throw OVSDBError.syntax("map contains duplicate key \(key)", json) }
                seen[key] = try valueType.atom(json: kv[1], resolver: resolver)
            }
            self.init(map: seen.map { ($0.key, $0.value) })
        } else if case .array(let pair) = json, pair.count == 2, pair[0].stringValue == "set" {
            guard let items = pair[1].arrayValue else { throw OVSDBError.syntax("expected [\"set\", [...]]", json) }
            let atoms = try items.map { try type.key.atom(json: $0, resolver: resolver) }
            guard Set(atoms).count == atoms.count else { throw OVSDBError.syntax("set contains duplicate value", json) }
            self.init(set: atoms)
        } else {
            self.init(try type.key.atom(json: json, resolver: resolver))
        }
        guard count >= type.min, count <= type.max else {
            throw OVSDBError.syntax("\(count) value(s) where the column takes \(type.min) to \(type.max == Int.max ? "unlimited" : String(type.max))", json)
        }
    }

    /// The RFC 7047 text: a bare atom for a one-element set, `["set", ...]` or `["map", ...]`.
    public var json: JSON {
        if let values {
            return .array([.string("map"), .array(zip(keys, values).map { .array([$0.json, $1.json]) })])
        }
        if keys.count == 1 { return keys[0].json }
        return .array([.string("set"), .array(keys.map(\.json))])
    }

    /// Checks element count and every atom's constraints (references are checked at commit).
    func check(_ type: ColumnType) throws {
        guard count >= type.min, count <= type.max else {
            throw OVSDBError.constraint(
                "\(count) value(s) where the column takes \(type.min) to \(type.max == Int.max ? "unlimited" : String(type.max))")
        }
        for key in keys { try type.key.check(key) }
        if let values, let valueType = type.value { for value in values { try valueType.check(value) } }
    }

    // MARK: set algebra for mutations, conditions and diffs

    /// True if every element (pair for maps) of `other` is in this datum.
    func includes(_ other: Datum) -> Bool {
        for (position, key) in other.keys.enumerated() {
            guard let index = keys.binarySearch(key) else { return false }
            if let values, let otherValues = other.values, values[index] != otherValues[position] { return false }
        }
        return true
    }

    /// True if no element (pair for maps) of `other` is in this datum.
    func excludes(_ other: Datum) -> Bool {
        for (position, key) in other.keys.enumerated() {
            guard let index = keys.binarySearch(key) else { continue }
            if let values, let otherValues = other.values, values[index] != otherValues[position] { continue }
            return false
        }
        return true
    }

    /// Adds the elements of `other`; for maps, keys already present keep their value.
    func inserting(_ other: Datum) -> Datum {
        if let values {
            var pairs = Array(zip(keys, values))
            for (key, value) in other.pairs where !contains(key) { pairs.append((key, value)) }
            return Datum(map: pairs)
        }
        return Datum(set: keys + other.keys)
    }

    /// Removes elements of `other`: for maps, `other` is either a set of keys or a map whose
    /// pairs are removed only where both key and value match.
    func deleting(_ other: Datum) -> Datum {
        if let values {
            let remove: (Atom, Atom) -> Bool =
                other.isMap ? { key, value in other[key] == value } : { key, _ in other.contains(key) }
            return Datum(map: zip(keys, values).filter { !remove($0, $1) })
        }
        return Datum(set: keys.filter { !other.contains($0) })
    }

    /// The update2 diff from `self` to `new`: for sets the symmetric difference; for maps the
    /// removed pairs (old values), the added pairs and the changed pairs (new values).
    func diff(to new: Datum) -> Datum {
        if let values {
            var pairs: [(Atom, Atom)] = []
            for (key, value) in zip(keys, values) where new[key] == nil { pairs.append((key, value)) }
            for (key, value) in new.pairs where self[key] != value { pairs.append((key, value)) }
            return Datum(map: pairs)
        }
        return Datum(set: keys.filter { !new.contains($0) } + new.keys.filter { !contains($0) })
    }

    /// Applies an update2 diff produced by `diff(to:)`.
    func applying(diff: Datum) -> Datum {
        if let values {
            var map: [Atom: Atom] = [:]
            for (key, value) in zip(keys, values) { map[key] = value }
            for (key, value) in diff.pairs {
                if map[key] == value { map[key] = nil } else { map[key] = value }
            }
            return Datum(map: map.map { ($0.key, $0.value) })
        }
        return Datum(set: keys.filter { !diff.contains($0) } + diff.keys.filter { !contains($0) })
    }

    /// Every UUID the datum holds that refers to `table` through `type`.
    func references(_ type: ColumnType) -> [(RowUUID, BaseType)] {
        var out: [(RowUUID, BaseType)] = []
        if type.key.refTable != nil { for key in keys { if let uuid = key.uuidValue { out.append((uuid, type.key)) } } }
        if let valueType = type.value, valueType.refTable != nil, let values {
            for value in values { if let uuid = value.uuidValue { out.append((uuid, valueType)) } }
        }
        return out
    }

    /// Drops elements (keys or values) that refer to rows for which `exists` is false.
    func droppingDangling(_ type: ColumnType, exists: (String, RowUUID) -> Bool) -> Datum {
        func alive(_ atom: Atom, _ base: BaseType) -> Bool {
            guard let table = base.refTable, base.refType == .weak, let uuid = atom.uuidValue else { return true }
            return exists(table, uuid)
        }
        if let values, let valueType = type.value {
            return Datum(map: zip(keys, values).filter { alive($0, type.key) && alive($1, valueType) })
        }
        return Datum(set: keys.filter { alive($0, type.key) })
    }
}

extension Array where Element == Atom {
    /// Index of `atom` in a sorted array.
    func binarySearch(_ atom: Atom) -> Int? {
        var low = 0
        var high = count
        while low < high {
            let mid = (low + high) / 2
            if self[mid] == atom { return mid }
            if self[mid] < atom { low = mid + 1 } else { high = mid }
        }
        return nil
    }
}
