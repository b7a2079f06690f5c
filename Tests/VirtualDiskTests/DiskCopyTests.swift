// DiskCopy (the convert path): contents, thinness of the target, and errors from the writer.
import Testing
import VirtualDisk

@Suite struct DiskCopyTests {
    /// A 4 MiB qcow2 over a backing file, with data in the base, the top, a zero cluster and a
    /// compressed cluster, so that every read path feeds the copy.
    func mixedSource(_ dir: TempDir) throws -> (any DiskImage, [UInt8]) {
        let size = 4 << 20
        var pattern = Pattern(state: 11)
        try QCOW2Image.create(path: dir.path("base.qcow2"), size: UInt64(size))
        let base = try DiskOpener.open(dir.path("base.qcow2"))
        var expected = [UInt8](repeating: 0, count: size)
        let baseData = pattern.bytes(300_000)
        try base.write(baseData, at: 100_000)
        expected.replaceSubrange(100_000..<400_000, with: baseData)
        var options = QCOW2Image.CreateOptions()
        options.backingFile = "base.qcow2"
        options.backingFormat = .qcow2
        try QCOW2Image.create(path: dir.path("top.qcow2"), size: UInt64(size), options: options)
        let top = try DiskOpener.open(dir.path("top.qcow2"))
        let topData = pattern.bytes(70_000)
        try top.write(topData, at: 2 << 20)
        expected.replaceSubrange((2 << 20)..<(2 << 20) + 70_000, with: topData)
        try top.writeZeroes(at: 196_608, length: 65_536)  // a zero cluster over base data
        expected.replaceSubrange(196_608..<262_144, with: [UInt8](repeating: 0, count: 65_536))
        guard let q = top as? QCOW2Image else { throw DiskError("not qcow2") }
        let compressible = [UInt8](repeating: 0x42, count: 65_536)
        try q.writeCompressed(compressible, at: 3 << 20)
        expected.replaceSubrange((3 << 20)..<(3 << 20) + 65_536, with: compressible)
        return (top, expected)
    }

    @Test(arguments: [DiskFormat.raw, .qcow2])
    func copyKeepsContentsAndLeavesZeroPiecesUnwritten(target format: DiskFormat) throws {
        let dir = try TempDir()
        let (source, expected) = try mixedSource(dir)
        #expect(try source.read(at: 0, count: expected.count) == expected)
        let path = dir.path("out.\(format.rawValue)")
        if format == .raw {
            try RawImage.create(path: path, size: source.virtualSize)
        } else {
            try QCOW2Image.create(path: path, size: source.virtualSize)
        }
        let target = try DiskOpener.open(path, format: format)
        var calls: [UInt64] = []
        try DiskCopy.copyData(from: source, to: target) { done, total in
            #expect(total == source.virtualSize)
            calls.append(done)
        }
        #expect(calls == calls.sorted() && calls.last == source.virtualSize)
        #expect(try target.read(at: 0, count: expected.count) == expected)
        // Only the 64 KiB pieces holding data were written: the zero cluster in the middle of
        // the base data and the tail of the disk are holes in a qcow2 target.
        if format == .qcow2 {
            let data = try target.map(at: 0, length: target.virtualSize).filter(\.data)
            let written = data.reduce(0) { $0 + $1.length }
            #expect(written == 5 * 65_536 + 2 * 65_536 + 65_536)  // base 100k-400k less the zero cluster, top 70k, compressed
            #expect(!data.contains { $0.start <= 196_608 && $0.start + $0.length > 196_608 })
        }
    }

    @Test func smallerTargetIsRefused() throws {
        let dir = try TempDir()
        try RawImage.create(path: dir.path("a.raw"), size: 1 << 20)
        try RawImage.create(path: dir.path("b.raw"), size: 1 << 19)
        let a = try DiskOpener.open(dir.path("a.raw"))
        let b = try DiskOpener.open(dir.path("b.raw"))
        #expect(throws: DiskError.self) { try DiskCopy.copyData(from: a, to: b) { _, _ in } }
    }

    @Test func writerFailureStopsTheCopy() throws {
        let dir = try TempDir()
        let size = 8 << 20
        try RawImage.create(path: dir.path("a.raw"), size: UInt64(size))
        let a = try DiskOpener.open(dir.path("a.raw"))
        var pattern = Pattern(state: 3)
        try a.write(pattern.bytes(size), at: 0)
        try RawImage.create(path: dir.path("b.raw"), size: UInt64(size))
        let readOnly = try DiskOpener.open(dir.path("b.raw"), readOnly: true)
        let error = #expect(throws: DiskError.self) { try DiskCopy.copyData(from: a, to: readOnly) { _, _ in } }
        #expect(error?.description.contains("read-only") == true)
    }

    @Test func zeroDetection() {
        #expect(DiskCopy.isAllZero([UInt8](repeating: 0, count: 13)))
        var bytes = [UInt8](repeating: 0, count: 4099)
        #expect(DiskCopy.isAllZero(bytes))
        bytes[4098] = 1
        #expect(!DiskCopy.isAllZero(bytes))
        bytes[4098] = 0
        bytes[8] = 1
        #expect(!DiskCopy.isAllZero(bytes))
        #expect(DiskCopy.isAllZero([]))
    }
}
