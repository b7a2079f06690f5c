// Each virtio device driven by the mock driver over in-memory guest RAM.
import Foundation
import GuestMemory
import LinuxSystem
import Logging
import Testing
import VirtualDisk

@testable import Virtio

let logger = Logger(label: "virtio-test")

@Suite struct TransportTests {
    @Test func identityAndFeatureNegotiation() throws {
        let d = try MockDriver(VirtioRNG(), start: false)
        #expect(d.reg(0x000) == 0x7472_6976)
        #expect(d.reg(0x004) == 2)
        #expect(d.reg(0x008) == 4)
        #expect(d.offered & VirtioFeature.version1 != 0)
        // A feature that was not offered: FEATURES_OK does not stick.
        #expect(d.negotiate(d.offered | 1 << 40) == false)
        d.shutdown()
        #expect(d.reg(0x070) == 0)
        // Without VERSION_1 (a legacy driver): refused too.
        #expect(d.negotiate(VirtioFeature.eventIndex) == false)
        d.shutdown()
        #expect(d.negotiate(VirtioFeature.version1))
        d.poke(0x30, 0)
        #expect(d.reg(0x034) == 256)
        d.poke(0x30, 7)
        #expect(d.reg(0x034) == 0)
    }

    @Test func badRingAddressesAtDriverOKNeedReset() throws {
        let d = try MockDriver(VirtioRNG(), start: false)
        #expect(d.negotiate(d.offered))
        d.poke(0x30, 0)
        d.poke(0x38, 16)
        d.poke(0x80, 0xFFFF_0000)
        d.poke(0x84, 0x10)
        d.poke(0x44, 1)
        d.poke(0x70, 3 | 8 | 4)
        #expect(d.reg(0x070) & VirtioStatus.needsReset != 0)
        #expect(d.reg(0x060) & 2 != 0)
        #expect(d.line.count.load(ordering: .relaxed) > 0)
        d.poke(0x64, 2)
        #expect(d.reg(0x060) == 0)
        d.shutdown()
        #expect(d.reg(0x070) == 0)
    }
}

@Suite struct RNGTests {
    @Test func fillsWritableBuffers() throws {
        let d = try MockDriver(VirtioRNG())
        defer { d.shutdown() }
        let a = d.allocate(64)
        let b = d.allocate(64)
        try d.submit(0, [(a, 64, true), (b, 32, true)])
        let (_, length) = try d.waitUsed(0)
        #expect(length == 96)
        #expect(try d.memory.read(64, at: a) != [UInt8](repeating: 0, count: 64))
        #expect(d.line.count.load(ordering: .relaxed) > 0)
    }

    @Test func hostileChainMarksNeedsResetAndHostSurvives() throws {
        let d = try MockDriver(VirtioRNG())
        defer { d.shutdown() }
        try d.writeDescriptor(0, 0, address: 0x8000, length: 8, flags: 1 | 2, next: 0)
        try d.publish(0, head: 0)
        #expect(d.waitNeedsReset())
        // After a reset the device works again.
        d.shutdown()
        let again = try MockDriver(VirtioRNG())
        defer { again.shutdown() }
        try again.submit(0, [(again.allocate(8), 8, true)])
        #expect(try again.waitUsed(0).1 == 8)
    }
}

@Suite struct BlockTests {
    /// Sends one request; returns (status byte, used length, bytes read).
    func request(
        _ d: MockDriver, type: UInt32, sector: UInt64, data: [UInt8]? = nil, readLength: Int = 0, indirect: Bool = false
    ) throws -> (UInt8, Int, [UInt8]) {
        let header = try d.buffer(le(type) + le(UInt32(0)) + le(sector))
        var buffers: [(UInt64, Int, Bool)] = [(header, 16, false)]
        if let data { buffers.append((try d.buffer(data), data.count, false)) }
        var readAt: UInt64 = 0
        if readLength > 0 {
            readAt = d.allocate(readLength)
            buffers.append((readAt, readLength, true))
        }
        let status = d.allocate(1)
        try d.memory.store(UInt8(0xFF), at: status)
        buffers.append((status, 1, true))
        try d.submit(0, buffers, indirect: indirect)
        let (_, length) = try d.waitUsed(0)
        return (try d.memory.load(UInt8.self, at: status), length, readLength > 0 ? try d.memory.read(readLength, at: readAt) : [])
    }

    func rawDisk(sectors: Int) throws -> String {
        let path = temporaryPath("disk.raw")
        try RawImage.create(path: path, size: UInt64(sectors * 512))
        return path
    }

    @Test func readWriteFlushIDDiscardWriteZeroes() throws {
        let path = try rawDisk(sectors: 64)
        defer { removeFile(path) }
        let block = VirtioBlock(driveID: "rootfs", disk: try DiskOpener.open(path), readOnly: false, flushes: true, logger: logger)
        let d = try MockDriver(block)
        defer { d.shutdown() }
        #expect(d.offered & VirtioBlock.Feature.flush != 0)
        #expect(d.device.read(offset: 0x100, size: 8) == le(UInt64(64)))
        let pattern = (0..<1024).map { UInt8($0 % 251) }
        #expect(try request(d, type: 1, sector: 2, data: pattern).0 == 0)
        let (status, length, back) = try request(d, type: 0, sector: 2, readLength: 1024, indirect: true)
        #expect(status == 0 && length == 1025 && back == pattern)
        #expect(try request(d, type: 4, sector: 0).0 == 0)
        let id = try request(d, type: 8, sector: 0, readLength: 20)
        #expect(id.0 == 0 && Array(id.2.prefix(6)) == Array("rootfs".utf8))
        // Past the end, unaligned, and unknown requests.
        #expect(try request(d, type: 0, sector: 63, readLength: 1024).0 == 1)
        #expect(try request(d, type: 0, sector: UInt64.max / 2, readLength: 512).0 == 1)
        #expect(try request(d, type: 1, sector: 0, data: [1, 2, 3]).0 == 1)
        #expect(try request(d, type: 99, sector: 0).0 == 2)
        // Write zeroes and discard over the pattern.
        let segment = le(UInt64(2)) + le(UInt32(1)) + le(UInt32(0))
        #expect(try request(d, type: 13, sector: 0, data: segment).0 == 0)
        #expect(try request(d, type: 0, sector: 2, readLength: 512).2 == [UInt8](repeating: 0, count: 512))
        #expect(try request(d, type: 11, sector: 0, data: le(UInt64(3)) + le(UInt32(1)) + le(UInt32(0))).0 == 0)
        #expect(try request(d, type: 0, sector: 3, readLength: 512).2 == [UInt8](repeating: 0, count: 512))
        #expect(try request(d, type: 11, sector: 0, data: le(UInt64(64)) + le(UInt32(1)) + le(UInt32(0))).0 == 1)
        // Too many ranges in one request: refused without reading them all.
        #expect(try request(d, type: 11, sector: 0, data: [UInt8](repeating: 0, count: 16 * 257)).0 == 1)
        d.shutdown()
        #expect(try RawImage(path: path, readOnly: true).read(at: 1024, count: 1024) == [UInt8](repeating: 0, count: 1024))
    }

    @Test func readOnlyDriveRefusesWrites() throws {
        let path = try rawDisk(sectors: 8)
        defer { removeFile(path) }
        let block = VirtioBlock(driveID: "ro", disk: try DiskOpener.open(path, readOnly: true), readOnly: true, flushes: false, logger: logger)
        let d = try MockDriver(block)
        defer { d.shutdown() }
        #expect(d.offered & VirtioBlock.Feature.readOnly != 0)
        #expect(d.offered & VirtioBlock.Feature.discard == 0)
        #expect(try request(d, type: 1, sector: 0, data: [UInt8](repeating: 7, count: 512)).0 == 1)
        #expect(try request(d, type: 13, sector: 0, data: le(UInt64(0)) + le(UInt32(1)) + le(UInt32(0))).0 == 1)
        #expect(try request(d, type: 0, sector: 0, readLength: 512).0 == 0)
    }

    @Test func qcow2OverlayKeepsBackingUnchanged() throws {
        let base = try rawDisk(sectors: 128)
        let overlay = temporaryPath("overlay.qcow2")
        defer {
            removeFile(base)
            removeFile(overlay)
        }
        try RawImage(path: base, readOnly: false).write([UInt8](repeating: 0xAB, count: 4096), at: 0)
        var options = QCOW2Image.CreateOptions()
        options.backingFile = base
        options.backingFormat = .raw
        try QCOW2Image.create(path: overlay, size: 128 * 512, options: options)
        let block = VirtioBlock(driveID: "ov", disk: try DiskOpener.open(overlay), readOnly: false, flushes: true, logger: logger)
        let d = try MockDriver(block)
        #expect(try request(d, type: 0, sector: 0, readLength: 512).2 == [UInt8](repeating: 0xAB, count: 512))
        #expect(try request(d, type: 1, sector: 1, data: [UInt8](repeating: 0x11, count: 512)).0 == 0)
        #expect(try request(d, type: 0, sector: 0, readLength: 1024).2 == [UInt8](repeating: 0xAB, count: 512) + [UInt8](repeating: 0x11, count: 512))
        d.shutdown()
        #expect(try RawImage(path: base, readOnly: true).read(at: 512, count: 512) == [UInt8](repeating: 0xAB, count: 512))
        #expect(try DiskOpener.open(overlay, readOnly: true).read(at: 512, count: 512) == [UInt8](repeating: 0x11, count: 512))
    }

    @Test func replacingTheImageRaisesAConfigChange() throws {
        let a = try rawDisk(sectors: 8)
        let b = try rawDisk(sectors: 16)
        defer {
            removeFile(a)
            removeFile(b)
        }
        let block = VirtioBlock(driveID: "d", disk: try DiskOpener.open(a), readOnly: false, flushes: false, logger: logger)
        let d = try MockDriver(block)
        defer { d.shutdown() }
        let generation = d.reg(0xfc)
        block.replaceImage(try DiskOpener.open(b))
        #expect(d.device.read(offset: 0x100, size: 8) == le(UInt64(16)))
        #expect(d.reg(0xfc) != generation)
        #expect(d.reg(0x60) & 2 != 0)
    }

    @Test func chainWithoutStatusOrHeaderIsAnsweredSafely() throws {
        let path = try rawDisk(sectors: 8)
        defer { removeFile(path) }
        let d = try MockDriver(VirtioBlock(driveID: "x", disk: try DiskOpener.open(path), readOnly: false, flushes: false, logger: logger))
        defer { d.shutdown() }
        // Header only, no writable status: used with length 0, nothing written.
        try d.submit(0, [(try d.buffer([UInt8](repeating: 0, count: 16)), 16, false)])
        #expect(try d.waitUsed(0).1 == 0)
        // A 4-byte header: IOERR.
        let status = d.allocate(1)
        try d.submit(0, [(try d.buffer([0, 0, 0, 0]), 4, false), (status, 1, true)])
        #expect(try d.waitUsed(0).1 == 1)
        #expect(try d.memory.load(UInt8.self, at: status) == 1)
    }
}
