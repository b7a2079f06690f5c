// Tunnel layer: the pure core of the wire codec: frame headers and the fixed-layout payloads,
// parsed from plain bytes with every length checked. Wire.swift wraps it for NIO's ByteBuffer;
// the fuzz target (Fuzz/TunnelFuzz.swift) compiles this file and Sniff.swift alone.

/// What a frame is.
public enum FrameType: UInt8, Sendable, CaseIterable {
    /// Client → server, first frame: protocol magic and version. The client speaks first so the
    /// server can tell a TLS handshake from a plain session by the first byte.
    case hello = 13
    /// Server → client, answer to hello: protocol magic, version and a fresh 32-byte nonce.
    case challenge = 1
    /// Client → server: JSON `LoginRequest`.
    case login = 2
    /// Server → client: JSON `LoginResult`.
    case loginResult = 3
    /// JSON `ControlMessage` on stream 0.
    case control = 4
    /// Opens a stream; payload is JSON `OpenRequest`.
    case open = 5
    /// Stream bytes.
    case data = 6
    /// Grants the peer more send window on a stream: u32 bytes.
    case window = 7
    /// The sender will send no more on this stream (half close).
    case fin = 8
    /// The stream is aborted in both directions; payload is a UTF-8 reason.
    case reset = 9
    /// Heartbeat request and answer (payload echoed).
    case ping = 10
    case pong = 11
    /// A UDP datagram for a udp proxy; the stream field is the proxy's id.
    case datagram = 12
}

/// A frame header: type u8 | flags u8 | stream u32 | length u32, big-endian.
public struct FrameHeader: Equatable, Sendable {
    public var type: FrameType
    public var flags: UInt8
    public var stream: UInt32
    public var length: Int

    public static let size = 10
    /// The largest payload accepted: data frames carry at most 64 KiB; control messages are small.
    public static let maxPayload = 256 * 1024

    /// Parses the header at the start of `bytes`, or returns nil if fewer than 10 bytes are there.
    /// Throws for an unknown type or an oversized length: the connection must then be closed.
    public static func parse<Bytes: Collection<UInt8>>(_ bytes: Bytes) throws -> FrameHeader? {
        guard bytes.count >= size else { return nil }
        let b = Array(bytes.prefix(size))
        let stream = UInt32(b[2]) << 24 | UInt32(b[3]) << 16 | UInt32(b[4]) << 8 | UInt32(b[5])
        let length = UInt32(b[6]) << 24 | UInt32(b[7]) << 16 | UInt32(b[8]) << 8 | UInt32(b[9])
        return try validated(rawType: b[0], flags: b[1], stream: stream, length: length)
    }

    /// Checks the header's fields once they have been read (by `parse`, or in place from a
    /// receive buffer): an unknown type or an oversized length throws.
    public static func validated(rawType: UInt8, flags: UInt8, stream: UInt32, length: UInt32) throws -> FrameHeader {
        guard let type = FrameType(rawValue: rawType) else { throw WireError("unknown frame type \(rawType)") }
        guard length <= maxPayload else {
            throw WireError("frame of \(length) bytes is larger than the \(maxPayload)-byte limit")
        }
        return FrameHeader(type: type, flags: flags, stream: stream, length: Int(length))
    }
}

/// A peer sent something the protocol does not allow.
public struct WireError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Parsers for the fixed-layout payloads.
public enum WireParse {
    public static let magic: [UInt8] = Array("NMBT".utf8)
    public static let version: UInt8 = 1

    /// A challenge: magic, version, 32-byte nonce. Returns the nonce.
    public static func challengeNonce(_ bytes: [UInt8]) throws -> [UInt8] {
        guard bytes.count >= 4, Array(bytes[0..<4]) == magic else {
            throw WireError("the server did not answer with the nimbus-tunnel protocol")
        }
        guard bytes.count >= 5, bytes[4] == version else { throw WireError("the server speaks an unsupported protocol version") }
        guard bytes.count == 5 + 32 else { throw WireError("the server's challenge has a bad nonce") }
        return Array(bytes[5...])
    }

    /// A hello: magic and version.
    public static func checkHello(_ bytes: [UInt8]) throws {
        guard bytes.count == 5, Array(bytes[0..<4]) == magic, bytes[4] == version else {
            throw WireError("the client does not speak this protocol version")
        }
    }

    /// A datagram's header: address length (4 or 16), address, port; the data follows.
    public static func datagramHeader<Bytes: Collection<UInt8>>(_ bytes: Bytes) throws -> (
        address: [UInt8], port: UInt16, dataOffset: Int
    ) {
        let b = Array(bytes.prefix(19))
        guard let length = b.first, length == 4 || length == 16, b.count >= 1 + Int(length) + 2 else {
            throw WireError("malformed datagram frame")
        }
        let address = Array(b[1...Int(length)])
        let port = UInt16(b[1 + Int(length)]) << 8 | UInt16(b[2 + Int(length)])
        return (address, port, 3 + Int(length))
    }
}
