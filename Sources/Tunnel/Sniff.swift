// Tunnel layer: the pure parsers for the shared vhost ports (an HTTP request head, a TLS
// ClientHello's SNI) and the PROXY protocol headers written to local services. No sockets.

import Foundation

/// The largest request head or ClientHello looked at before giving up.
public let maxSniffBytes = 16 * 1024

/// The bytes of an HTTP/1.x request head, parsed just enough to route and rewrite it.
public struct HTTPHead: Equatable, Sendable {
    public var requestLine: String
    public var headers: [(name: String, value: String)]
    /// Bytes of the head including the blank line.
    public var length: Int

    public static func == (a: HTTPHead, b: HTTPHead) -> Bool {
        a.requestLine == b.requestLine && a.length == b.length && a.headers.elementsEqual(b.headers, by: { $0 == $1 })
    }

    public var path: String {
        let parts = requestLine.split(separator: " ")
        guard parts.count >= 2 else { return "/" }
        var target = String(parts[1])
        if let schemeEnd = target.range(of: "://"), let slash = target[schemeEnd.upperBound...].firstIndex(of: "/") {
            target = String(target[slash...])
        }
        if let query = target.firstIndex(where: { $0 == "?" || $0 == "#" }) { target = String(target[..<query]) }
        return target.isEmpty ? "/" : target
    }

    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }

    /// The Host header without port, lowercased.
    public var host: String? {
        guard let value = header("Host") else { return nil }
        return normalizeHost(value)
    }

    /// Parses a head from the start of `bytes`, or says more are needed.
    public static func parse(_ bytes: [UInt8]) -> Result<HTTPHead, SniffError>? {
        let limit = min(bytes.count, maxSniffBytes)
        var end: Int?
        if limit >= 4 {
            for index in 3..<limit
            where bytes[index] == 10 && bytes[index - 1] == 13 && bytes[index - 2] == 10 && bytes[index - 3] == 13 {
                end = index + 1
                break
            }
        }
        guard let end else {
            return bytes.count >= maxSniffBytes ? .failure(SniffError("the request head is larger than 16 KiB")) : nil
        }
        guard let text = String(validating: bytes[..<end], as: UTF8.self) else {
            return .failure(SniffError("the request head is not UTF-8"))
        }
        var lines = text.components(separatedBy: "\r\n")
        let requestLine = lines.removeFirst()
        let parts = requestLine.split(separator: " ")
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else {
            return .failure(SniffError("not an HTTP/1.x request"))
        }
        var headers: [(String, String)] = []
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else { return .failure(SniffError("a header line has no colon")) }
            let name = String(line[..<colon]).trimmingSpaces
            let value = String(line[line.index(after: colon)...]).trimmingSpaces
            guard !name.isEmpty else { return .failure(SniffError("a header has an empty name")) }
            headers.append((name, value))
        }
        return .success(HTTPHead(requestLine: requestLine, headers: headers, length: end))
    }

    /// The head as bytes, with `X-Forwarded-For` (appended to, or added) and an optional new Host.
    public func rewritten(forwardedFor client: String, hostRewrite: String) -> [UInt8] {
        var out = requestLine + "\r\n"
        var sawForwarded = false
        for (name, value) in headers {
            let lower = name.lowercased()
            if lower == "x-forwarded-for" {
                out += "\(name): \(value), \(client)\r\n"
                sawForwarded = true
            } else if lower == "host", !hostRewrite.isEmpty {
                out += "\(name): \(hostRewrite)\r\n"
            } else {
                out += "\(name): \(value)\r\n"
            }
        }
        if !sawForwarded { out += "X-Forwarded-For: \(client)\r\n" }
        if header("X-Real-IP") == nil { out += "X-Real-IP: \(client)\r\n" }
        out += "\r\n"
        return Array(out.utf8)
    }
}

public struct SniffError: Error, Equatable, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Lowercases a host and drops a `:port` (IPv6 literals keep their brackets).
public func normalizeHost(_ value: String) -> String {
    var host = value.trimmingSpaces.lowercased()
    if host.hasPrefix("[") {
        if let close = host.firstIndex(of: "]") { host = String(host[...close]) }
    } else if let colon = host.lastIndex(of: ":") {
        host = String(host[..<colon])
    }
    if host.hasSuffix(".") { host.removeLast() }
    return host
}

extension String {
    var trimmingSpaces: String {
        var slice = Substring(self)
        while let first = slice.first, first == " " || first == "\t" { slice.removeFirst() }
        while let last = slice.last, last == " " || last == "\t" { slice.removeLast() }
        return String(slice)
    }
}

/// Finds the server name in a TLS ClientHello at the start of `bytes`.
public func sniffSNI(_ bytes: [UInt8]) -> Result<String, SniffError>? {
    guard bytes.count >= 5 else { return nil }
    guard bytes[0] == 0x16 else { return .failure(SniffError("not a TLS handshake")) }
    let recordLength = Int(bytes[3]) << 8 | Int(bytes[4])
    guard recordLength <= maxSniffBytes else { return .failure(SniffError("the TLS record is too large")) }
    guard bytes.count >= 5 + recordLength else { return nil }
    var reader = ByteReader(bytes: bytes[5..<(5 + recordLength)])
    guard reader.u8() == 1, let helloLength = reader.u24(), helloLength <= reader.remaining else {
        return .failure(SniffError("the first TLS message is not a whole ClientHello"))
    }
    guard reader.skip(2 + 32), let sessionLength = reader.u8(), reader.skip(Int(sessionLength)),
        let suitesLength = reader.u16(), reader.skip(Int(suitesLength)),
        let compressionLength = reader.u8(), reader.skip(Int(compressionLength))
    else { return .failure(SniffError("the ClientHello is malformed")) }
    guard let extensionsLength = reader.u16(), var extensions = reader.sub(Int(extensionsLength)) else {
        return .failure(SniffError("the ClientHello has no server name"))
    }
    while extensions.remaining > 0 {
        guard let type = extensions.u16(), let length = extensions.u16(), var body = extensions.sub(Int(length)) else {
            return .failure(SniffError("the ClientHello's extensions are malformed"))
        }
        guard type == 0 else { continue }
        guard let listLength = body.u16(), var list = body.sub(Int(listLength)) else { break }
        while list.remaining > 0 {
            guard let nameType = list.u8(), let nameLength = list.u16(), let name = list.sub(Int(nameLength)) else { break }
            if nameType == 0, let host = String(validating: name.bytes, as: UTF8.self), !host.isEmpty {
                return .success(normalizeHost(host))
            }
        }
    }
    return .failure(SniffError("the ClientHello has no server name"))
}

/// A bounds-checked reader over a byte slice.
struct ByteReader {
    var bytes: ArraySlice<UInt8>
    var remaining: Int { bytes.count }
    mutating func u8() -> UInt8? { bytes.popFirst() }
    mutating func u16() -> Int? {
        guard bytes.count >= 2 else { return nil }
        defer { bytes = bytes.dropFirst(2) }
        return Int(bytes[bytes.startIndex]) << 8 | Int(bytes[bytes.startIndex + 1])
    }
    mutating func u24() -> Int? {
        guard bytes.count >= 3 else { return nil }
        defer { bytes = bytes.dropFirst(3) }
        let start = bytes.startIndex
        return Int(bytes[start]) << 16 | Int(bytes[start + 1]) << 8 | Int(bytes[start + 2])
    }
    mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, bytes.count >= count else { return false }
        bytes = bytes.dropFirst(count)
        return true
    }
    mutating func sub(_ count: Int) -> ByteReader? {
        guard count >= 0, bytes.count >= count else { return nil }
        defer { bytes = bytes.dropFirst(count) }
        return ByteReader(bytes: bytes.prefix(count))
    }
}

// MARK: - PROXY protocol

/// A connection's endpoints as the PROXY protocol reports them.
public struct ProxyEndpoints: Sendable, Equatable {
    public var sourceAddress: String
    public var sourcePort: Int
    public var destinationAddress: String
    public var destinationPort: Int
    public init(sourceAddress: String, sourcePort: Int, destinationAddress: String, destinationPort: Int) {
        self.sourceAddress = sourceAddress
        self.sourcePort = sourcePort
        self.destinationAddress = destinationAddress
        self.destinationPort = destinationPort
    }
}

/// The PROXY protocol header (version 1 text or version 2 binary) for a TCP connection.
public func proxyProtocolHeader(version: Int, _ endpoints: ProxyEndpoints) -> [UInt8] {
    let source = parseIPAddress(endpoints.sourceAddress)
    let destination = parseIPAddress(endpoints.destinationAddress)
    let sameFamily = source != nil && destination != nil && source?.count == destination?.count
    if version == 1 {
        guard sameFamily, let source else { return Array("PROXY UNKNOWN\r\n".utf8) }
        let family = source.count == 4 ? "TCP4" : "TCP6"
        let line =
            "PROXY \(family) \(endpoints.sourceAddress) \(endpoints.destinationAddress) \(endpoints.sourcePort) \(endpoints.destinationPort)\r\n"
        return Array(line.utf8)
    }
    var header: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    guard sameFamily, let source, let destination else {
        header += [0x20, 0x00, 0x00, 0x00]  // LOCAL, unspecified
        return header
    }
    header.append(0x21)  // version 2, PROXY
    header.append(source.count == 4 ? 0x11 : 0x21)  // TCP over IPv4 / IPv6
    let length = source.count * 2 + 4
    header += [UInt8(length >> 8), UInt8(length & 0xff)]
    header += source + destination
    header += [UInt8(endpoints.sourcePort >> 8 & 0xff), UInt8(endpoints.sourcePort & 0xff)]
    header += [UInt8(endpoints.destinationPort >> 8 & 0xff), UInt8(endpoints.destinationPort & 0xff)]
    return header
}

/// Parses a dotted IPv4 or an IPv6 address into 4 or 16 bytes.
public func parseIPAddress(_ text: String) -> [UInt8]? {
    if text.contains(":") {
        return parseIPv6(text)
    }
    let parts = text.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count == 4 else { return nil }
    var out: [UInt8] = []
    for part in parts {
        guard let value = UInt8(part) else { return nil }
        out.append(value)
    }
    return out
}

private func parseIPv6(_ text: String) -> [UInt8]? {
    var text = text
    if let percent = text.firstIndex(of: "%") { text = String(text[..<percent]) }
    let halves = text.components(separatedBy: "::")
    guard halves.count <= 2 else { return nil }
    func groups(_ part: String) -> [UInt16]? {
        if part.isEmpty { return [] }
        var out: [UInt16] = []
        for group in part.split(separator: ":", omittingEmptySubsequences: false) {
            if group.contains("."), let v4 = parseIPAddress(String(group)) {
                out.append(UInt16(v4[0]) << 8 | UInt16(v4[1]))
                out.append(UInt16(v4[2]) << 8 | UInt16(v4[3]))
            } else {
                guard group.count <= 4, let value = UInt16(group, radix: 16) else { return nil }
                out.append(value)
            }
        }
        return out
    }
    guard let head = groups(halves[0]) else { return nil }
    var all = head
    if halves.count == 2 {
        guard let tail = groups(halves[1]), head.count + tail.count < 8 else { return nil }
        all += Array(repeating: 0, count: 8 - head.count - tail.count) + tail
    }
    guard all.count == 8 else { return nil }
    return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] }
}
