// Scatter-gather reads and writes (the path virtio-blk uses) against the plain byte API.
import Testing
import VirtualDisk

@Suite struct VectoredIOTests {
    @Test(arguments: [DiskFormat.raw, .qcow2])
    func scatterGatherRoundTrip(format: DiskFormat) throws {
        let dir = try TempDir()
        let path = dir.path("v.\(format.rawValue)")
        if format == .raw { try RawImage.create(path: path, size: 1 << 20) } else { try QCOW2Image.create(path: path, size: 1 << 20) }
        let image = try DiskOpener.open(path)
        var pattern = Pattern(state: 7)
        let sizes = [512, 4096, 1, 4095, 0, 4096 + 512]
        let data = pattern.bytes(sizes.reduce(0, +))
        // Write from buffers of uneven sizes, read the plain way.
        var copy = data
        try copy.withUnsafeMutableBytes { whole in
            var at = 0
            var parts: [UnsafeRawBufferPointer] = []
            for s in sizes {
                parts.append(UnsafeRawBufferPointer(rebasing: whole[at..<at + s]))
                at += s
            }
            try image.write(from: parts, at: 8192)
        }
        #expect(try image.read(at: 8192, count: data.count) == data)
        // Read into buffers of uneven sizes.
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { whole in
            var at = 0
            var parts: [UnsafeMutableRawBufferPointer] = []
            for s in sizes.reversed() {
                parts.append(UnsafeMutableRawBufferPointer(rebasing: whole[at..<at + s]))
                at += s
            }
            try image.read(into: parts, at: 8192)
        }
        #expect(back == data)
        #expect(throws: DiskError.self) {
            try back.withUnsafeMutableBytes { try image.read(into: [$0], at: (1 << 20) - 512) }
        }
    }
}
