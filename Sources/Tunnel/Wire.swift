// Tunnel layer: the wire codec between nimbus-tunnel client and server. Pure: bytes in, frames out,
// no sockets, so it is tested and fuzzed alone.
//
// Every frame is a 10-byte header and a payload:
//   type u8 | flags u8 | stream u32 (big-endian) | length u32 (big-endian) | payload
// Stream 0 carries the handshake and control messages; other streams carry proxied connections.
import Crypto
import Foundation
import NIOCore

/// Flags on data frames.
public enum FrameFlags {
    /// The payload is a u32 uncompressed length followed by raw deflate.
    public static let compressed: UInt8 = 0x01
}

/// One decoded frame.
public struct Frame: Sendable {
    public var type: FrameType
    public var flags: UInt8
    public var stream: UInt32
    public var payload: ByteBuffer

    public init(type: FrameType, flags: UInt8 = 0, stream: UInt32 = 0, payload: ByteBuffer = ByteBuffer()) {
        self.type = type
        self.flags = flags
        self.stream = stream
        self.payload = payload
    }

    public static let headerSize = FrameHeader.size
    /// The largest payload accepted: a data frame carries at most `maxData`; control messages are small.
    public static let maxPayload = FrameHeader.maxPayload
    /// The largest data frame a sender produces.
    public static let maxData = 64 * 1024

    /// Writes the header for a payload of `length` bytes.
    public static func writeHeader(_ type: FrameType, flags: UInt8 = 0, stream: UInt32, length: Int, into buffer: inout ByteBuffer) {
        buffer.writeInteger(type.rawValue)
        buffer.writeInteger(flags)
        buffer.writeInteger(stream)
        buffer.writeInteger(UInt32(length))
    }

    /// Encodes a whole frame into `buffer`.
    public func encode(into buffer: inout ByteBuffer) {
        Frame.writeHeader(type, flags: flags, stream: stream, length: payload.readableBytes, into: &buffer)
        var payload = payload
        buffer.writeBuffer(&payload)
    }

    /// Takes one frame off the front of `buffer`, or returns nil if it is not all there yet.
    /// Throws for an unknown type or an oversized length: the connection must then be closed.
    public static func decode(from buffer: inout ByteBuffer) throws -> Frame? {
        // Read in place (this runs for every frame), checked as `FrameHeader.parse` checks.
        let start = buffer.readerIndex
        guard buffer.readableBytes >= headerSize, let rawType = buffer.getInteger(at: start, as: UInt8.self),
            let flags = buffer.getInteger(at: start + 1, as: UInt8.self), let stream = buffer.getInteger(at: start + 2, as: UInt32.self),
            let length = buffer.getInteger(at: start + 6, as: UInt32.self)
        else { return nil }
        let header = try FrameHeader.validated(rawType: rawType, flags: flags, stream: stream, length: length)
        guard buffer.readableBytes >= headerSize + header.length else { return nil }
        buffer.moveReaderIndex(forwardBy: headerSize)
        guard let payload = buffer.readSlice(length: header.length) else { return nil }
        return Frame(type: header.type, flags: header.flags, stream: header.stream, payload: payload)
    }
}

// MARK: - Handshake

/// The first frame's payload: magic, version, the server's nonce.
public struct Challenge: Sendable, Equatable {
    public static let magic = WireParse.magic
    public static let version = WireParse.version
    public var nonce: [UInt8]

    public init(nonce: [UInt8]) { self.nonce = nonce }

    public static func random() -> Challenge { Challenge(nonce: randomBytes(32)) }

    public func encode() -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeBytes(Challenge.magic)
        buffer.writeInteger(Challenge.version)
        buffer.writeBytes(nonce)
        return buffer
    }

    public static func decode(_ payload: ByteBuffer) throws -> Challenge {
        Challenge(nonce: try WireParse.challengeNonce(Array(payload.readableBytesView)))
    }
}

/// The client's login: an HMAC over both nonces proves it holds the token without sending it, and
/// the fresh server nonce makes a recorded login useless on any other connection.
public struct LoginRequest: Codable, Sendable, Equatable {
    public var version: Int
    public var user: String
    public var hostname: String
    public var runID: String
    public var clientNonce: String
    public var mac: String
    public var poolCount: Int
}

public struct LoginResult: Codable, Sendable, Equatable {
    public var ok: Bool
    public var error: String?
    public var runID: String?
    /// The server's proof that it holds the token too (so a client is not fooled by an impostor).
    public var serverProof: String?
}

/// Messages on the control stream.
public struct ControlMessage: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable { case newProxy, newProxyResult, closeProxy }
    public var kind: Kind
    public var proxy: ProxyConfig?
    public var name: String?
    public var error: String?
    public var remoteAddr: String?
    public var proxyID: UInt32?

    public init(
        kind: Kind, proxy: ProxyConfig? = nil, name: String? = nil, error: String? = nil, remoteAddr: String? = nil,
        proxyID: UInt32? = nil
    ) {
        self.kind = kind
        self.proxy = proxy
        self.name = name
        self.error = error
        self.remoteAddr = remoteAddr
        self.proxyID = proxyID
    }
}

/// Opens a stream. Server → client: a user connected to `proxy`; the addresses are the user's
/// and the server's, for PROXY protocol headers. Client → server: a visitor asks for `proxy` and
/// proves it knows its secret key.
public struct OpenRequest: Codable, Sendable, Equatable {
    public var proxy: String
    public var srcAddr: String
    public var srcPort: Int
    public var dstAddr: String
    public var dstPort: Int
    public var visitorProof: String?

    public init(proxy: String, srcAddr: String, srcPort: Int, dstAddr: String, dstPort: Int, visitorProof: String? = nil) {
        self.proxy = proxy
        self.srcAddr = srcAddr
        self.srcPort = srcPort
        self.dstAddr = dstAddr
        self.dstPort = dstPort
        self.visitorProof = visitorProof
    }
}

/// The JSON payloads are small; a cap keeps a hostile peer from making the decoder work hard.
let maxJSONPayload = 64 * 1024

func encodeJSON<T: Encodable>(_ value: T) -> ByteBuffer {
    // Encoding these plain structs cannot fail; an empty object is sent if it ever did.
    let data = (try? JSONEncoder().encode(value)) ?? Data("{}".utf8)
    return ByteBuffer(bytes: data)
}

func decodeJSON<T: Decodable>(_ type: T.Type, _ payload: ByteBuffer, what: String) throws -> T {
    guard payload.readableBytes <= maxJSONPayload else { throw WireError("\(what) is too large") }
    do {
        return try JSONDecoder().decode(T.self, from: Data(payload.readableBytesView))
    } catch {
        throw WireError("malformed \(what): \(error)")
    }
}

// MARK: - Authentication

/// HMAC-SHA256 proofs used by the handshake and by stcp visitors.
public enum TunnelAuth {
    static func mac(key: String, label: String, _ parts: [[UInt8]]) -> [UInt8] {
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: Array(key.utf8)))
        hmac.update(data: Array(label.utf8) + [0])
        for part in parts { hmac.update(data: part) }
        return Array(hmac.finalize())
    }

    /// What the client sends to log in.
    public static func loginMAC(token: String, serverNonce: [UInt8], clientNonce: [UInt8]) -> [UInt8] {
        mac(key: token, label: "nimbus-tunnel login v1", [serverNonce, clientNonce])
    }

    /// What the server sends back to show it knows the token as well.
    public static func serverProof(token: String, serverNonce: [UInt8], clientNonce: [UInt8]) -> [UInt8] {
        mac(key: token, label: "nimbus-tunnel server v1", [clientNonce, serverNonce])
    }

    /// An stcp visitor's proof for one stream of one session.
    public static func visitorProof(secretKey: String, sessionNonce: [UInt8], stream: UInt32) -> [UInt8] {
        let streamBytes = withUnsafeBytes(of: stream.bigEndian) { Array($0) }
        return mac(key: secretKey, label: "nimbus-tunnel stcp v1", [sessionNonce, streamBytes])
    }

    /// Compares in constant time.
    public static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for index in a.indices { diff |= a[index] ^ b[index] }
        return diff == 0
    }
}

func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}

extension Array where Element == UInt8 {
    var base64: String { Data(self).base64EncodedString() }
    init?(base64: String) {
        guard let data = Data(base64Encoded: base64) else { return nil }
        self = Array(data)
    }
}

// MARK: - Datagrams

/// A UDP datagram with the user's address, as carried in `datagram` frames.
public struct Datagram: Sendable, Equatable {
    public var address: [UInt8]
    public var port: UInt16
    public var data: ByteBuffer

    public init(address: [UInt8], port: UInt16, data: ByteBuffer) {
        self.address = address
        self.port = port
        self.data = data
    }

    public func encode() -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(3 + address.count + data.readableBytes)
        buffer.writeInteger(UInt8(address.count))
        buffer.writeBytes(address)
        buffer.writeInteger(port)
        var data = data
        buffer.writeBuffer(&data)
        return buffer
    }

    public static func decode(_ payload: ByteBuffer) throws -> Datagram {
        let header = try WireParse.datagramHeader(payload.readableBytesView.prefix(19))
        var payload = payload
        payload.moveReaderIndex(forwardBy: header.dataOffset)
        return Datagram(address: header.address, port: header.port, data: payload)
    }
}
