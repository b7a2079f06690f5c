// Unit tests of the qcow2 implementation against an in-memory model; no peer tools needed.
import Foundation
import Testing

@testable import VirtualDisk

@Suite struct QCOW2Tests {
    /// Writes `writes` through a fresh image and through a byte-array model, then compares.
    func roundTrip(clusterSize: Int, version: UInt32 = 3, refcountBits: Int = 16, size: UInt64 = 8 << 20, writes: Int = 40) throws {
        let dir = try TempDir()
        var options = QCOW2Image.CreateOptions()
        options.clusterSize = clusterSize
        options.version = version
        options.refcountBits = refcountBits
        try QCOW2Image.create(path: dir.path("t.qcow2"), size: size, options: options)
        let image = try DiskOpener.open(dir.path("t.qcow2"))
        var model = [UInt8](repeating: 0, count: Int(size))
        var rng = Pattern(state: UInt64(clusterSize) ^ UInt64(refcountBits))
        for i in 0..<writes {
            let offset = Int(rng.bytes(4).reduce(0) { $0 << 8 | UInt64($1) } % (size - 70000))
            let data = rng.bytes(1 + Int(rng.bytes(2).reduce(0) { $0 << 8 | Int($1) }))
            try image.write(data, at: UInt64(offset))
            model.replaceSubrange(offset..<offset + data.count, with: data)
            if i % 7 == 3 {
                try image.writeZeroes(at: UInt64(offset / 2), length: UInt64(clusterSize * 2 + 100))
                model.replaceSubrange(offset / 2..<offset / 2 + clusterSize * 2 + 100, with: [UInt8](repeating: 0, count: clusterSize * 2 + 100))
            }
        }
        try image.flush()
        let reopened = try DiskOpener.open(dir.path("t.qcow2"), readOnly: true)
        #expect(try reopened.read(at: 0, count: Int(size)) == model)
        let result = try #require(reopened as? QCOW2Image).check()
        #expect(result.corruptions == 0 && result.leaks == 0, "\(result.messages.prefix(5))")
    }

    @Test(arguments: [512, 4096, 65536, 2 << 20])
    func writesReadBackAtEveryClusterSize(clusterSize: Int) throws {
        try roundTrip(clusterSize: clusterSize, size: clusterSize == 2 << 20 ? 32 << 20 : 8 << 20)
    }

    @Test(arguments: [1, 2, 4, 8, 32, 64])
    func everyRefcountWidth(bits: Int) throws {
        try roundTrip(clusterSize: 512, refcountBits: bits, size: 2 << 20, writes: 20)
    }

    /// A snapshot of a big image with tiny clusters copies an L1 table longer than one refcount
    /// block's range; the run must not be split by new refcount blocks (this used to loop forever,
    /// growing the file).
    @Test(arguments: [16, 64])
    func longAllocationsSpanRefcountBlockRanges(bits: Int) throws {
        let dir = try TempDir()
        var options = QCOW2Image.CreateOptions()
        options.clusterSize = 512
        options.refcountBits = bits
        try QCOW2Image.create(path: dir.path("big.qcow2"), size: 1 << 30, options: options)
        let image = try #require(try DiskOpener.open(dir.path("big.qcow2")) as? QCOW2Image)
        try image.write([UInt8](repeating: 5, count: 70_000), at: 512 << 20)
        try image.createSnapshot(name: "s1")
        try image.write([UInt8](repeating: 6, count: 4096), at: 512 << 20)
        try image.createSnapshot(name: "s2")
        try image.flush()
        #expect(try image.allocatedBytes() < 8 << 20)
        let result = try image.check()
        #expect(result.corruptions == 0 && result.leaks == 0, "\(result.messages.prefix(5))")
        #expect(try image.read(at: 512 << 20, count: 4096) == [UInt8](repeating: 6, count: 4096))
    }

    @Test func version2Images() throws {
        try roundTrip(clusterSize: 65536, version: 2)
    }

    @Test func backingChainCopyOnWriteLeavesTheBaseUnchanged() throws {
        let dir = try TempDir()
        try QCOW2Image.create(path: dir.path("base.qcow2"), size: 4 << 20)
        let base = try DiskOpener.open(dir.path("base.qcow2"))
        let baseData = [UInt8](repeating: 0xAB, count: 200_000)
        try base.write(baseData, at: 1000)
        try base.flush()
        var options = QCOW2Image.CreateOptions()
        options.backingFile = "base.qcow2"
        options.backingFormat = .qcow2
        options.clusterSize = 4096
        try QCOW2Image.create(path: dir.path("top.qcow2"), size: 4 << 20, options: options)
        let top = try DiskOpener.open(dir.path("top.qcow2"))
        #expect(top.backing != nil)
        try top.write([1, 2, 3], at: 5000)
        try top.writeZeroes(at: 8192, length: 4096)
        let got = try top.read(at: 1000, count: 200_000)
        var expected = baseData
        expected.replaceSubrange(4000..<4003, with: [1, 2, 3])
        expected.replaceSubrange(7192..<11288, with: [UInt8](repeating: 0, count: 4096))
        #expect(got == expected)
        #expect(try DiskOpener.open(dir.path("base.qcow2"), readOnly: true).read(at: 1000, count: 200_000) == baseData)
        let extents = try top.map(at: 0, length: 4 << 20)
        #expect(extents.contains { $0.depth == 1 && $0.data })
        #expect(extents.contains { $0.depth == 0 && $0.zero && $0.present })
    }

    @Test func checkFindsAndRepairsLeaks() throws {
        let dir = try TempDir()
        try QCOW2Image.create(path: dir.path("l.qcow2"), size: 1 << 20)
        let image = try #require(try DiskOpener.open(dir.path("l.qcow2")) as? QCOW2Image)
        try image.write([1], at: 0)
        // Leak: count a cluster nobody references.
        try image.lock.withLock { _ in _ = try image.allocateClusters(1) }
        var r = try image.check()
        #expect(r.leaks == 1 && r.corruptions == 0 && r.exitCode == 3)
        r = try image.check(repair: .leaks)
        #expect(r.leaksFixed == 1)
        #expect(try image.check().exitCode == 0)
    }

    @Test(arguments: [
        ("truncated", "truncated"), ("magic", "bad magic"), ("version", "version 4"), ("clusterBits", "cluster_bits"),
        ("l1past", "past the end"), ("incompatible", "unknown incompatible"), ("crypt", "encrypted"), ("refcountTable", "refcount table"),
    ])
    func corruptHeadersAreRefused(kind: String, reason: String) throws {
        let dir = try TempDir()
        let path = dir.path("c.qcow2")
        try QCOW2Image.create(path: path, size: 1 << 20)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        func put32(_ v: UInt32, _ at: Int) { for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) } }
        func put64(_ v: UInt64, _ at: Int) { for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) } }
        switch kind {
        case "truncated": bytes = Array(bytes.prefix(40))
        case "magic": bytes[0] = 0x51; bytes[3] = 0
        case "version": put32(4, 4)
        case "clusterBits": put32(30, 20)
        case "l1past": put64(1 << 40, 40)
        case "incompatible": put64(1 << 40, 72)
        case "crypt": put32(1, 32)
        default: put64(1 << 40, 48)
        }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        #expect {
            _ = try DiskOpener.open(path, format: .qcow2)
        } throws: { error in
            "\(error)".contains(reason)
        }
    }

    @Test func backingLoopsAndMissingBackingFilesAreClearErrors() throws {
        let dir = try TempDir()
        var options = QCOW2Image.CreateOptions()
        options.backingFile = "b.qcow2"
        options.backingFormat = .qcow2
        try QCOW2Image.create(path: dir.path("a.qcow2"), size: 1 << 20, options: options)
        #expect { _ = try DiskOpener.open(dir.path("a.qcow2")) } throws: { "\($0)".contains("missing") }
        options.backingFile = "a.qcow2"
        try QCOW2Image.create(path: dir.path("b.qcow2"), size: 1 << 20, options: options)
        #expect { _ = try DiskOpener.open(dir.path("a.qcow2")) } throws: { "\($0)".contains("loops") }
    }

    @Test func refcountTableGrowsForSmallClusters() throws {
        // 512-byte clusters: one refcount table cluster covers only 8 MiB of host file.
        try roundTrip(clusterSize: 512, size: 24 << 20, writes: 12)
    }
}

@Suite struct QCOW2EdgeTests {
    @Test func refcountOverflowIsAClearError() throws {
        let dir = try TempDir()
        var options = QCOW2Image.CreateOptions()
        options.refcountBits = 1
        try QCOW2Image.create(path: dir.path("o.qcow2"), size: 1 << 20, options: options)
        let image = try #require(try DiskOpener.open(dir.path("o.qcow2")) as? QCOW2Image)
        try image.write([1, 2, 3], at: 0)
        #expect { try image.createSnapshot(name: "s") } throws: { "\($0)".contains("overflow") }
    }

    @Test func compressedWritesReadBack() throws {
        let dir = try TempDir()
        try QCOW2Image.create(path: dir.path("c.qcow2"), size: 1 << 20)
        let image = try #require(try DiskOpener.open(dir.path("c.qcow2")) as? QCOW2Image)
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 / 100) }
        try image.writeCompressed(data, at: 65536)
        #expect(try image.read(at: 65536, count: 65536) == data)
        if case .compressed = image.classify(try image.l2Entry(forCluster: 1)) {} else { Issue.record("cluster 1 should be compressed") }
        #expect(try image.check().exitCode == 0)
    }
}
