// VMM (layer 3): a JSON value with strict, field-by-field readers, so that config files and API
// bodies reject unknown fields and wrong types with an error that names the field.
#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A parsed JSON document.
public enum JSONValue: Sendable, Equatable, Decodable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int64.self) {
            self = .integer(i)
        } else if let d = try? c.decode(Double.self) {
            self = .number(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    /// Parses `bytes` as JSON.
    public static func parse(_ bytes: [UInt8]) throws(ConfigError) -> JSONValue {
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch let DecodingError.dataCorrupted(context) {
            throw ConfigError("malformed JSON: \(context.underlyingError.map { "\($0)" } ?? context.debugDescription)")
        } catch {
            throw ConfigError("malformed JSON: \(error)")
        }
    }

    var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .integer, .number: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    /// Serializes with sorted keys, no spaces.
    public func serialized() -> String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .integer(let i): return String(i)
        case .number(let d): return d.isFinite ? "\(d)" : "null"
        case .string(let s): return Self.quote(s)
        case .array(let a): return "[" + a.map { $0.serialized() }.joined(separator: ",") + "]"
        case .object(let o):
            return "{" + o.keys.sorted().map { Self.quote($0) + ":" + (o[$0] ?? .null).serialized() }.joined(separator: ",") + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }
}

/// A config file or API body that cannot be used, and why.
public struct ConfigError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Reads the fields of one JSON object, then rejects any field nobody asked for.
public struct ObjectReader {
    let fields: [String: JSONValue]
    let context: String
    private(set) var known: [String] = []

    public init(_ value: JSONValue, context: String) throws(ConfigError) {
        guard case .object(let fields) = value else { throw ConfigError("\(context) must be a JSON object, not \(value.typeName)") }
        self.fields = fields
        self.context = context
    }

    mutating func raw(_ key: String) -> JSONValue? {
        known.append(key)
        if case .null? = fields[key] { return nil }
        return fields[key]
    }

    public mutating func string(_ key: String) throws(ConfigError) -> String? {
        guard let v = raw(key) else { return nil }
        guard case .string(let s) = v else { throw ConfigError("\(context): `\(key)` must be a string, not \(v.typeName)") }
        return s
    }

    public mutating func requiredString(_ key: String) throws(ConfigError) -> String {
        guard let s = try string(key) else { throw ConfigError("\(context): missing field `\(key)`") }
        return s
    }

    public mutating func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let v = raw(key) else { return nil }
        guard case .bool(let b) = v else { throw ConfigError("\(context): `\(key)` must be true or false, not \(v.typeName)") }
        return b
    }

    public mutating func integer(_ key: String) throws(ConfigError) -> Int64? {
        guard let v = raw(key) else { return nil }
        guard case .integer(let i) = v else { throw ConfigError("\(context): `\(key)` must be an integer, not \(v.typeName)") }
        return i
    }

    public mutating func value(_ key: String) -> JSONValue? { raw(key) }

    /// Fails if the object has a field that was never read.
    public func finish() throws(ConfigError) {
        let unknown = fields.keys.filter { !known.contains($0) }.sorted()
        if let first = unknown.first {
            throw ConfigError("\(context): unknown field `\(first)`, expected one of \(known.map { "`\($0)`" }.joined(separator: ", "))")
        }
    }
}
