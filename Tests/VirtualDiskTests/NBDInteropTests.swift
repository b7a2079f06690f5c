// The NBD export against the real clients: nbdinfo, qemu-io, qemu-img, nbdcopy and fio.
import Foundation
import NIOCore
import Testing

@testable import NBD
@testable import VirtualDisk

enum NBDPeers {
    static var enabled: Bool {
        Peer.required || ["/usr/bin/nbdinfo", "/usr/bin/qemu-io", "/usr/bin/fio"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }
}

@Suite(.enabled(if: NBDPeers.enabled, "needs nbdinfo, qemu-io, nbdcopy, fio"), .serialized)
struct NBDInteropTests {
    /// Starts `nimbus disk serve` and waits for its socket.
    func serve(_ args: [String], socket: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Peer.nimbus)
        p.arguments = ["disk", "serve"] + args
        p.standardError = FileHandle.nullDevice
        try p.run()
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { Thread.sleep(forTimeInterval: 0.02) }
        return p
    }

    @Test func realClientsReadWriteMapAndCopy() throws {
        let dir = try TempDir()
        let image = dir.path("d.qcow2"), socket = dir.path("nbd.sock")
        let uri = "nbd+unix:///vm1?socket=\(socket)"
        try QCOW2Image.create(path: image, size: 32 << 20)
        let disk = try DiskOpener.open(image)
        try disk.write([UInt8](repeating: 0x5A, count: 2 << 20), at: 1 << 20)
        try disk.flush()
        let server = try serve([image, "--socket", socket, "--export-name", "vm1"], socket: socket)
        defer { if server.isRunning { server.terminate() } }

        var (status, text) = try Peer.run("nbdinfo", [uri])
        #expect(status == 0 && text.contains("export-size: 33554432") && text.contains("base:allocation"), "\(text)")
        (status, text) = try Peer.run("nbdinfo", ["--map", uri])
        #expect(status == 0 && text.contains("1048576     2097152    0  data"), "\(text)")
        (status, text) = try Peer.run("nbdinfo", ["--list", "nbd+unix:///?socket=\(socket)"])
        #expect(status == 0 && text.contains("vm1"), "\(text)")
        (status, text) = try Peer.run(
            "qemu-io", ["-f", "raw", "-c", "write -P 0x66 10M 1M", "-c", "read -P 0x5a 1M 2M", "-c", "write -z 1M 64k", "-c", "discard 2M 64k", uri])
        #expect(status == 0 && !text.contains("fail") && !text.contains("error"), "\(text)")
        (status, text) = try Peer.run(
            "fio",
            [
                "--name=t", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=8M", "--io_size=4M", "--verify=crc32c",
                "--verify_state_save=0",
            ])
        #expect(status == 0 && text.contains("err= 0"), "\(text.suffix(1500))")
        (status, text) = try Peer.run("qemu-img", ["convert", "-f", "raw", "-O", "raw", uri, dir.path("via-nbd.raw")])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run("nbdcopy", [uri, dir.path("via-nbdcopy.raw")])
        #expect(status == 0, "\(text)")
        #expect(FileManager.default.contentsEqual(atPath: dir.path("via-nbd.raw"), andPath: dir.path("via-nbdcopy.raw")))
        (status, text) = try Peer.run("qemu-img", ["info", "-f", "raw", "nbd+unix:///nosuch?socket=\(socket)"])
        #expect(status != 0)

        server.terminate()
        server.waitUntilExit()
        #expect(server.terminationStatus == 0)
        (status, text) = try Peer.run("qemu-img", ["check", image])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, dir.path("via-nbd.raw")])
        #expect(status == 0, "\(text)")
    }

    @Test func readOnlyExportsRefuseWritesAndManyClientsWork() throws {
        let dir = try TempDir()
        let image = dir.path("r.raw"), socket = dir.path("r.sock")
        try Data([UInt8](repeating: 7, count: 4 << 20)).write(to: URL(fileURLWithPath: image))
        let server = try serve([image, "--socket", socket, "--read-only"], socket: socket)
        defer { if server.isRunning { server.terminate() } }
        let uri = "nbd+unix:///?socket=\(socket)"
        var (status, text) = try Peer.run("qemu-io", ["-f", "raw", "-c", "write 0 4k", uri])
        #expect(text.contains("Operation not permitted") || text.contains("read-only") || status != 0, "\(text)")
        let clients = (0..<6).map { _ in
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
            p.arguments = ["-r", "-f", "raw", "-c", "read -P 7 0 4M", uri]
            p.standardOutput = FileHandle.nullDevice
            return p
        }
        for c in clients { try c.run() }
        for c in clients { c.waitUntilExit(); #expect(c.terminationStatus == 0) }
        (status, text) = try Peer.run("nbdinfo", [uri])
        #expect(text.contains("is_read_only: true"))
    }

    @Test func decoderRejectsGarbage() throws {
        var bad = ByteBuffer(bytes: [UInt8](repeating: 0x41, count: 40))
        #expect(throws: NBDProtocolError.self) { _ = try NBDDecoder.decodeOne(&bad, phase: .transmission) }
        var short = ByteBuffer(bytes: [0x25, 0x60])
        #expect(try NBDDecoder.decodeOne(&short, phase: .transmission) == nil)
        var hugeWrite = ByteBuffer()
        hugeWrite.writeInteger(UInt32(0x2560_9513)); hugeWrite.writeInteger(UInt16(0)); hugeWrite.writeInteger(UInt16(1))
        hugeWrite.writeInteger(UInt64(1)); hugeWrite.writeInteger(UInt64(0)); hugeWrite.writeInteger(UInt32.max)
        #expect(throws: NBDProtocolError.self) { _ = try NBDDecoder.decodeOne(&hugeWrite, phase: .transmission) }
        var option = ByteBuffer()
        option.writeInteger(UInt64(0x4948_4156_454f_5054)); option.writeInteger(UInt32(7)); option.writeInteger(UInt32(1 << 30))
        #expect(throws: NBDProtocolError.self) { _ = try NBDDecoder.decodeOne(&option, phase: .options) }
    }
}
