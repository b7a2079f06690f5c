// The NBD protocol state machine and the threaded server, without peers or privileges: a mock
// image in memory and a raw client on a Unix socket.
import Foundation
import LinuxSystem
import Logging
import NIOCore
import Synchronization
import Testing

@testable import NBD
@testable import VirtualDisk

/// An in-memory image whose reads fail at and past `failAt`; counts flushes.
final class MockImage: DiskImage {
    let bytes: Mutex<[UInt8]>
    let flushes = Mutex(0)
    let failAt: UInt64
    init(size: Int, failAt: UInt64 = .max) {
        bytes = Mutex([UInt8](repeating: 0, count: size))
        self.failAt = failAt
    }
    var format: DiskFormat { .raw }
    var path: String { "mock" }
    var virtualSize: UInt64 { UInt64(bytes.withLock { $0.count }) }
    var isReadOnly: Bool { false }
    var backing: (any DiskImage)? { nil }
    /// Set when the server asked for a range outside the image (which it must never do).
    let outOfRange = Mutex(false)
    func check(_ offset: UInt64, _ count: Int) throws {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= virtualSize else {
            outOfRange.withLock { $0 = true }
            throw DiskError("mock: \(count) bytes at \(offset) are outside the image")
        }
    }
    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        try check(offset, count)
        if offset + UInt64(count) > failAt { throw DiskError("mock read failure at \(offset)") }
        return bytes.withLock { Array($0[Int(offset)..<Int(offset) + count]) }
    }
    func write(_ data: [UInt8], at offset: UInt64) throws {
        try check(offset, data.count)
        bytes.withLock { $0.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
    }
    func writeZeroes(at offset: UInt64, length: UInt64) throws { try write([UInt8](repeating: 0, count: Int(length)), at: offset) }
    func discard(at offset: UInt64, length: UInt64) throws { try writeZeroes(at: offset, length: length) }
    func flush() throws { flushes.withLock { $0 += 1 } }
    func map(at offset: UInt64, length: UInt64) throws -> [Extent] {
        try check(offset, Int(clamping: length))
        return [Extent(start: offset, length: length, depth: 0, present: true, zero: false, data: true, offset: nil)]
    }
    func allocatedBytes() throws -> UInt64 { virtualSize }
}

/// Client-side encoders for the messages the tests send.
enum NBDClient {
    static func option(_ type: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt64(0x4948_4156_454f_5054))
        b.writeInteger(type)
        b.writeInteger(UInt32(data.count))
        b.writeBytes(data)
        return Array(b.readableBytesView)
    }
    static func go(_ name: String = "") -> [UInt8] {
        var d = ByteBuffer()
        d.writeInteger(UInt32(name.utf8.count))
        d.writeString(name)
        d.writeInteger(UInt16(0))
        return option(7, Array(d.readableBytesView))
    }
    static func request(_ type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(0x2560_9513))
        b.writeInteger(UInt16(0))
        b.writeInteger(type)
        b.writeInteger(cookie)
        b.writeInteger(offset)
        b.writeInteger(length)
        b.writeBytes(payload)
        return Array(b.readableBytesView)
    }
}

@Suite struct NBDSessionTests {
    /// Feeds `bytes` to the session and returns everything it answered.
    func feed(_ session: NBDSession, _ bytes: [UInt8]) throws -> ByteBuffer {
        var input = ByteBuffer(bytes: bytes)
        var out = ByteBuffer()
        while try session.process(&input, into: &out) {}
        #expect(input.readableBytes == 0)
        return out
    }

    @Test func structuredRepliesForDataErrorsAndAFailedRead() throws {
        let image = MockImage(size: 1 << 20, failAt: 512 << 10)
        let session = NBDSession(export: NBDExport(name: "", image: image, readOnly: false), logger: Logger(label: "test"))
        var hello = ByteBuffer()
        session.greeting(into: &hello)
        #expect(hello.readInteger(as: UInt64.self) == NBD.initMagic)
        var out = try feed(session, [0, 0, 0, 3] + NBDClient.option(8) + NBDClient.go())
        #expect(session.phase == .transmission && session.structured)
        #expect(out.readableBytes > 0)

        // A write then a read of the same bytes: a done OFFSET_DATA chunk carrying them.
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        out = try feed(
            session, NBDClient.request(1, cookie: 1, offset: 8192, length: 4096, payload: data) + NBDClient.request(0, cookie: 2, offset: 8192, length: 4096))
        #expect(out.readInteger(as: UInt32.self) == NBD.structuredReplyMagic)
        #expect(out.readInteger(as: UInt16.self) == NBD.replyFlagDone && out.readInteger(as: UInt16.self) == NBD.replyNone)
        #expect(out.readInteger(as: UInt64.self) == 1 && out.readInteger(as: UInt32.self) == 0)
        #expect(out.readInteger(as: UInt32.self) == NBD.structuredReplyMagic)
        #expect(out.readInteger(as: UInt16.self) == NBD.replyFlagDone && out.readInteger(as: UInt16.self) == NBD.replyOffsetData)
        #expect(out.readInteger(as: UInt64.self) == 2 && out.readInteger(as: UInt32.self) == 8 + 4096)
        #expect(out.readInteger(as: UInt64.self) == 8192 && out.readBytes(length: 4096) == data)
        #expect(out.readableBytes == 0)

        // A read the image fails: only an error chunk goes out, not the data header before it.
        out = try feed(session, NBDClient.request(0, cookie: 3, offset: 600 << 10, length: 4096))
        #expect(out.readInteger(as: UInt32.self) == NBD.structuredReplyMagic)
        #expect(out.readInteger(as: UInt16.self) == NBD.replyFlagDone && out.readInteger(as: UInt16.self) == NBD.replyError)
        #expect(out.readInteger(as: UInt64.self) == 3)
        let length = out.readInteger(as: UInt32.self) ?? 0
        #expect(out.readInteger(as: UInt32.self) == NBD.EIO)
        #expect(out.readableBytes == Int(length) - 4)

        // Past the end of the export: EINVAL. DISC flushes and asks for the connection to close.
        out = try feed(session, NBDClient.request(0, cookie: 4, offset: 1 << 20, length: 1))
        out.moveReaderIndex(forwardBy: 20)
        #expect(out.readInteger(as: UInt32.self) == NBD.EINVAL)
        _ = try feed(session, NBDClient.request(2, cookie: 5, offset: 0, length: 0))
        #expect(session.closing && image.flushes.withLock { $0 } == 1)
    }

    @Test func aWriteSplitAcrossReadsWaitsForItsPayload() throws {
        let image = MockImage(size: 64 << 10)
        let session = NBDSession(export: NBDExport(name: "", image: image, readOnly: false), logger: Logger(label: "test"))
        _ = try feed(session, [0, 0, 0, 3] + NBDClient.go())
        let message = NBDClient.request(1, cookie: 9, offset: 0, length: 8192, payload: [UInt8](repeating: 0xAB, count: 8192))
        var input = ByteBuffer(bytes: message[0..<5000])
        var out = ByteBuffer()
        #expect(try session.process(&input, into: &out) == false)
        #expect(input.readableBytes == 5000 && out.readableBytes == 0)
        input.writeBytes(message[5000...])
        #expect(try session.process(&input, into: &out))
        #expect(input.readableBytes == 0 && out.readableBytes == 16)  // a simple reply
        #expect(try image.read(at: 0, count: 8192) == [UInt8](repeating: 0xAB, count: 8192))
    }

    @Test func anIdleClientBlocksNeitherOthersNorShutdown() throws {
        let dir = try TempDir()
        let socket = dir.path("s.sock")
        let image = MockImage(size: 1 << 20)
        let server = try NBDServer(
            export: NBDExport(name: "", image: image, readOnly: false), address: .unix(socket), logger: Logger(label: "test"))
        // One client connects and never says anything.
        let idle = try UnixStream.connect(socket)
        // Another one negotiates and reads while the first one sits there.
        let client = try UnixStream.connect(socket)
        try client.setNonBlocking(false)
        func receive(_ count: Int) throws -> [UInt8] {
            var got: [UInt8] = []
            while got.count < count {
                let chunk = try client.read(upTo: count - got.count)
                if chunk.isEmpty { break }
                got += chunk
            }
            return got
        }
        #expect(try receive(18).count == 18)
        try client.writeAll([0, 0, 0, 3] + NBDClient.option(1))  // EXPORT_NAME "": size and flags
        #expect(try receive(10).count == 10)
        try image.write([UInt8](repeating: 0x42, count: 512), at: 4096)
        try client.writeAll(NBDClient.request(0, cookie: 7, offset: 4096, length: 512))
        let reply = try receive(16 + 512)
        #expect(reply.count == 528 && reply[16...].allSatisfy { $0 == 0x42 })
        try server.shutdown()
        #expect(image.flushes.withLock { $0 } >= 1)
        #expect(try client.read(upTo: 1).isEmpty)  // the server closed the connection
        #expect(!FileManager.default.fileExists(atPath: socket))
        _ = idle
    }
}

extension NBDSessionTests {
    @Test func clientsPastTheCapAreClosedOnArrival() throws {
        let dir = try TempDir()
        let socket = dir.path("cap.sock")
        let server = try NBDServer(
            export: NBDExport(name: "", image: MockImage(size: 4096), readOnly: true), address: .unix(socket), maxConnections: 1,
            logger: Logger(label: "test"))
        defer { try? server.shutdown() }
        let first = try UnixStream.connect(socket)
        try first.setNonBlocking(false)
        var greeting: [UInt8] = []
        while greeting.count < 18 {
            let chunk = try first.read(upTo: 18 - greeting.count)
            if chunk.isEmpty { break }
            greeting += chunk
        }
        #expect(greeting.count == 18)  // the first client is being served
        let second = try UnixStream.connect(socket)
        try second.setNonBlocking(false)
        #expect(try second.read(upTo: 18).isEmpty)  // closed without a greeting
        _ = first
    }
}

/// A small deterministic generator (SplitMix64), so a failing input can be reproduced from its seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct NBDSessionRandomInputTests {
    /// Mutates a valid conversation (handshake, then requests of every kind) byte by byte, and
    /// sends random requests with valid magic: the session answers or throws a protocol error,
    /// never crashes, and never writes past the export.
    @Test func mutatedAndRandomConversationsNeverCrash() throws {
        var rng = SeededGenerator(state: 0x4E42_44)
        let valid: [UInt8] =
            [0, 0, 0, 3] + NBDClient.option(8) + NBDClient.option(10, Array("\0\0\0\0\0\0\0\u{1}\0\0\0\u{f}base:allocation".utf8))
            + NBDClient.go() + NBDClient.request(1, cookie: 1, offset: 0, length: 512, payload: [UInt8](repeating: 1, count: 512))
            + NBDClient.request(0, cookie: 2, offset: 0, length: 4096) + NBDClient.request(7, cookie: 3, offset: 0, length: 65536)
            + NBDClient.request(6, cookie: 4, offset: 4096, length: 4096) + NBDClient.request(4, cookie: 5, offset: 8192, length: 4096)
            + NBDClient.request(3, cookie: 6, offset: 0, length: 0) + NBDClient.request(2, cookie: 7, offset: 0, length: 0)
        var reachedTransmission = 0
        for round in 0..<3000 {
            let image = MockImage(size: 64 << 10)
            let session = NBDSession(export: NBDExport(name: "", image: image, readOnly: round % 5 == 0), logger: Logger(label: "fuzz"))
            var bytes = valid
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                let at = Int.random(in: 0..<bytes.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: bytes[at] = UInt8.random(in: 0...255, using: &rng)
                case 1: bytes.insert(UInt8.random(in: 0...255, using: &rng), at: at)
                default: bytes.remove(at: at)
                }
            }
            // Random requests with a valid magic after the handshake, at random offsets and lengths.
            if round % 2 == 0 {
                for _ in 0..<8 {
                    let type = UInt16.random(in: 0...9, using: &rng)
                    let length = UInt32.random(in: 0...(1 << 17), using: &rng)
                    let offset = [UInt64.random(in: 0...(1 << 17), using: &rng), .max - UInt64(length) / 2, .max][Int.random(in: 0..<3, using: &rng)]
                    bytes += NBDClient.request(
                        type, cookie: UInt64(round), offset: offset, length: length,
                        payload: type == 1 ? [UInt8](repeating: 7, count: Int(length)) : [])
                }
            }
            var input = ByteBuffer(bytes: bytes)
            var out = ByteBuffer()
            do {
                while !session.closing, try session.process(&input, into: &out) {}
            } catch is NBDProtocolError {
                // The connection would be closed.
            }
            #expect(!image.outOfRange.withLock { $0 }, "round \(round)")
            if session.phase == .transmission { reachedTransmission += 1 }
        }
        // Enough of the conversations survive their mutations to exercise the request handlers.
        #expect(reachedTransmission > 600, "\(reachedTransmission) of 3000 reached the transmission phase")
    }
}
