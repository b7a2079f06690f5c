// virtio-net driven by the mock driver, with a datagram socket pair standing in for the TAP.
import Foundation
import Glibc
import LinuxSystem
import Testing

@testable import Virtio

final class SocketPairBackend: NetworkBackend {
    let device: OwnedFileDescriptor
    let peer: OwnedFileDescriptor
    init() throws {
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0 else {
            throw TestError("socketpair failed")
        }
        device = OwnedFileDescriptor(taking: pair[0])
        peer = OwnedFileDescriptor(taking: pair[1])
    }
    var name: String { "socket pair" }
    var readinessDescriptor: Int32 { device.rawValue }
    func send(_ buffers: [UnsafeRawBufferPointer]) throws -> TransferResult { try device.writeVector(buffers) }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> TransferResult { try device.readSome(into: buffer) }
    func guestAccepts(checksum: Bool, tso4: Bool, tso6: Bool) throws {}

    /// Reads one datagram the device sent.
    func peerReceive(timeout: Double = 5) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 70_000)
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if case .done(let n) = try buffer.withUnsafeMutableBytes({ try peer.readSome(into: $0) }) { return Array(buffer[0..<n]) }
            usleep(1000)
        }
        throw TestError("no frame from the device")
    }
}

@Suite struct NetTests {
    @Test func transmitAndMergeableReceive() throws {
        let backend = try SocketPairBackend()
        let net = VirtioNet(ifaceID: "eth0", backend: backend, mac: [6, 0, 0xac, 0x1e, 0, 2], logger: logger)
        let d = try MockDriver(net)
        defer { d.shutdown() }
        #expect(d.device.read(offset: 0x100, size: 6) == [6, 0, 0xac, 0x1e, 0, 2])
        #expect(d.offered & VirtioNet.Feature.mergeableRxBuffers != 0)

        // TX: header and frame in two buffers arrive as one datagram.
        let header = [UInt8](repeating: 0, count: 12)
        let frame = (0..<100).map { UInt8($0) }
        try d.submit(1, [(try d.buffer(header), 12, false), (try d.buffer(frame), 100, false)])
        _ = try d.waitUsed(1)
        #expect(try backend.peerReceive() == header + frame)

        // RX: a 3000-byte frame (header included) spread over two 1600-byte buffers.
        let incoming = [UInt8](repeating: 0, count: 12) + (0..<2988).map { UInt8(truncatingIfNeeded: $0 * 7) }
        _ = try incoming.withUnsafeBytes { try backend.peer.writeSome($0) }
        let first = d.allocate(1600)
        let second = d.allocate(1600)
        try d.submit(0, [(first, 1600, true)])
        try d.submit(0, [(second, 1600, true)])
        let (_, firstLength) = try d.waitUsed(0)
        let (_, secondLength) = try d.waitUsed(0)
        #expect(firstLength == 1600 && secondLength == 1400)
        #expect(try d.memory.load(UInt16.self, at: first + 10) == 2)  // num_buffers
        let got = try d.memory.read(1600, at: first) + d.memory.read(1400, at: second)
        #expect(Array(got[12...]) == Array(incoming[12...]))
    }

    @Test func frameWaitsForReceiveBuffers() throws {
        let backend = try SocketPairBackend()
        let d = try MockDriver(VirtioNet(ifaceID: "eth0", backend: backend, mac: nil, logger: logger))
        defer { d.shutdown() }
        #expect(d.offered & VirtioNet.Feature.mac == 0)
        let incoming = [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xEE, count: 500)
        _ = try incoming.withUnsafeBytes { try backend.peer.writeSome($0) }
        #expect(try d.nothingUsed(0))
        let buffer = d.allocate(2048)
        try d.submit(0, [(buffer, 2048, true)])
        #expect(try d.waitUsed(0).1 == 512)
        #expect(try d.memory.read(500, at: buffer + 12) == [UInt8](repeating: 0xEE, count: 500))
    }
}
