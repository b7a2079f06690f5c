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
    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        if offset + UInt64(count) > failAt { throw DiskError("mock read failure at \(offset)") }
        return bytes.withLock { Array($0[Int(offset)..<Int(offset) + count]) }
    }
    func write(_ data: [UInt8], at offset: UInt64) throws {
        bytes.withLock { $0.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
    }
    func writeZeroes(at offset: UInt64, length: UInt64) throws { try write([UInt8](repeating: 0, count: Int(length)), at: offset) }
    func discard(at offset: UInt64, length: UInt64) throws { try writeZeroes(at: offset, length: length) }
    func flush() throws { flushes.withLock { $0 += 1 } }
    func map(at offset: UInt64, length: UInt64) throws -> [Extent] {
        [Extent(start: offset, length: length, depth: 0, present: true, zero: false, data: true, offset: nil)]
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
