// virtio-vsock with Firecracker's Unix-socket host side, driven by the mock driver.
import Foundation
import GuestMemory
import LinuxSystem
import Testing

@testable import Virtio

@Suite struct VsockTests {
    static let guestCID: UInt64 = 7

    /// Reads one packet the device placed in a receive buffer.
    func receive(_ d: MockDriver) throws -> (VsockHeader, [UInt8]) {
        let buffer = d.allocate(4096)
        try d.submit(0, [(buffer, 4096, true)])
        let (_, length) = try d.waitUsed(0)
        let header = VsockHeader(try d.memory.read(VsockHeader.size, at: buffer))
        return (header, try d.memory.read(length - VsockHeader.size, at: buffer + UInt64(VsockHeader.size)))
    }

    func send(_ d: MockDriver, op: UInt16, sourcePort: UInt32, destinationPort: UInt32, payload: [UInt8] = [], flags: UInt32 = 0) throws {
        var h = VsockHeader()
        h.sourceCID = Self.guestCID
        h.destinationCID = 2
        h.sourcePort = sourcePort
        h.destinationPort = destinationPort
        h.op = op
        h.length = UInt32(payload.count)
        h.flags = flags
        h.bufferAllocation = 64 << 10
        let header = try d.buffer(h.bytes)
        var buffers: [(UInt64, Int, Bool)] = [(header, VsockHeader.size, false)]
        if !payload.isEmpty { buffers.append((try d.buffer(payload), payload.count, false)) }
        try d.submit(1, buffers)
        _ = try d.waitUsed(1)
    }

    func readAll(_ fd: OwnedFileDescriptor, count: Int, timeout: Double = 5) throws -> [UInt8] {
        var out: [UInt8] = []
        let deadline = Date().addingTimeInterval(timeout)
        var chunk = [UInt8](repeating: 0, count: 4096)
        while out.count < count {
            guard Date() < deadline else { throw TestError("socket: got \(out.count) of \(count) bytes") }
            let r = try chunk.withUnsafeMutableBytes { try fd.readSome(into: $0) }
            if case .done(let n) = r {
                if n == 0 { break }
                out += chunk[0..<n]
            } else {
                usleep(1000)
            }
        }
        return out
    }

    func accept(_ listener: OwnedFileDescriptor, timeout: Double = 5) throws -> OwnedFileDescriptor {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let c = try UnixStream.accept(listener) { return c }
            usleep(1000)
        }
        throw TestError("no connection")
    }

    @Test func guestConnectsToHostPort() throws {
        let uds = temporaryPath("v.sock")
        let hostListener = try UnixStream.listen("\(uds)_5000")
        defer { UnixSocketPath.remove("\(uds)_5000") }
        let d = try MockDriver(try VirtioVsock(guestCID: Self.guestCID, udsPath: uds, logger: logger))
        defer { d.shutdown() }
        #expect(d.device.read(offset: 0x100, size: 8) == le(Self.guestCID))
        try send(d, op: VsockHeader.Op.request, sourcePort: 1234, destinationPort: 5000)
        let (response, _) = try receive(d)
        #expect(response.op == VsockHeader.Op.response)
        #expect(response.sourcePort == 5000 && response.destinationPort == 1234 && response.destinationCID == Self.guestCID)
        let host = try accept(hostListener)
        try send(d, op: VsockHeader.Op.readWrite, sourcePort: 1234, destinationPort: 5000, payload: Array("ping\n".utf8))
        #expect(try readAll(host, count: 5) == Array("ping\n".utf8))
        _ = try Array("pong".utf8).withUnsafeBytes { try host.writeSome($0) }
        let (data, payload) = try receive(d)
        #expect(data.op == VsockHeader.Op.readWrite && payload == Array("pong".utf8) && data.length == 4)
        // The host closes: the guest is told the stream is shut down.
        host.shutdownWrite()
        let (shutdown, _) = try receive(d)
        #expect(shutdown.op == VsockHeader.Op.shutdown && shutdown.flags == 3)
        // A guest connection to a port nobody listens on is reset.
        try send(d, op: VsockHeader.Op.request, sourcePort: 1235, destinationPort: 5999)
        #expect(try receive(d).0.op == VsockHeader.Op.reset)
        // Data for a stream that does not exist is answered with RST.
        try send(d, op: VsockHeader.Op.readWrite, sourcePort: 9, destinationPort: 9, payload: [1])
        #expect(try receive(d).0.op == VsockHeader.Op.reset)
        // More data than the credit we granted: the stream is reset, nothing is buffered.
        try send(d, op: VsockHeader.Op.request, sourcePort: 1236, destinationPort: 5000)
        #expect(try receive(d).0.op == VsockHeader.Op.response)
        _ = try accept(hostListener)
        try send(d, op: VsockHeader.Op.readWrite, sourcePort: 1236, destinationPort: 5000, payload: [UInt8](repeating: 1, count: 300_000))
        let (reset, _) = try receive(d)
        #expect(reset.op == VsockHeader.Op.reset && reset.destinationPort == 1236)
    }

    @Test func hostConnectsToGuestPort() throws {
        let uds = temporaryPath("v.sock")
        let d = try MockDriver(try VirtioVsock(guestCID: Self.guestCID, udsPath: uds, logger: logger))
        defer { d.shutdown() }
        let host = try UnixStream.connect(uds)
        _ = try Array("CONNECT 52\n".utf8).withUnsafeBytes { try host.writeSome($0) }
        let (request, _) = try receive(d)
        #expect(request.op == VsockHeader.Op.request && request.destinationPort == 52 && request.sourceCID == 2)
        try send(d, op: VsockHeader.Op.response, sourcePort: 52, destinationPort: request.sourcePort)
        let ok = String(decoding: try readAll(host, count: "OK \(request.sourcePort)\n".utf8.count), as: UTF8.self)
        #expect(ok == "OK \(request.sourcePort)\n")
        _ = try Array("hello guest".utf8).withUnsafeBytes { try host.writeSome($0) }
        let (data, payload) = try receive(d)
        #expect(data.op == VsockHeader.Op.readWrite && payload == Array("hello guest".utf8))
        try send(d, op: VsockHeader.Op.readWrite, sourcePort: 52, destinationPort: request.sourcePort, payload: Array("hi host".utf8))
        #expect(try readAll(host, count: 7) == Array("hi host".utf8))
        // A malformed CONNECT line closes the host connection.
        let bad = try UnixStream.connect(uds)
        _ = try Array("HELLO\n".utf8).withUnsafeBytes { try bad.writeSome($0) }
        #expect(try readAll(bad, count: 1).isEmpty)
    }
}
