import Testing

@testable import VirtualDisk

@Suite struct PoolTests {
    @Test func volumesClonesAccountingAndProtectedBases() throws {
        let dir = try TempDir()
        let pool = try StoragePool(directory: dir.path("pool"))
        let base = try pool.create("base", size: 8 << 20)
        #expect(base.format == .qcow2 && base.capacity == 8 << 20)
        let baseImage = try DiskOpener.open(base.path)
        try baseImage.write([UInt8](repeating: 3, count: 1 << 20), at: 0)
        try baseImage.flush()
        let clone = try pool.clone("vm1", from: "base")
        #expect(clone.backingVolume == "base")
        #expect(try DiskOpener.open(clone.path, readOnly: true).read(at: 0, count: 16) == [UInt8](repeating: 3, count: 16))
        try pool.create("scratch", size: 1 << 20, format: .raw)
        #expect(try pool.list().map(\.name) == ["base", "scratch", "vm1"])
        #expect { try pool.delete("base") } throws: { "\($0)".contains("backing file of vm1") }
        #expect { try pool.create("vm1", size: 1) } throws: { "\($0)".contains("already has") }
        #expect { try pool.create("../evil", size: 1) } throws: { "\($0)".contains("must be") }
        let c = try pool.capacity()
        #expect(c.provisioned == (8 << 20) * 2 + (1 << 20))
        #expect(c.allocated >= 1 << 20 && c.total > 0)
        try pool.delete("vm1")
        try pool.delete("base")
        #expect(try pool.list().map(\.name) == ["scratch"])
    }
}
