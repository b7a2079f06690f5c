// VirtualDisk (layer 2): resize, commit into the backing file, and rebase onto another backing
// file — the qcow2 operations that change an image's shape or chain.
import CNimbusZlib

extension QCOW2Image {
    /// Changes the virtual size. Growing may move the L1 table; shrinking needs `allowShrink`
    /// and frees every cluster past the new end.
    public func resize(to newSize: UInt64, allowShrink: Bool = false) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        let old = virtualSize
        if newSize < old {
            guard allowShrink else { throw DiskError("shrinking \(path) from \(old) to \(newSize) bytes loses data; pass --shrink to do it") }
            let cs = UInt64(clusterSize)
            let firstWhole = (newSize + cs - 1) / cs * cs
            if firstWhole < old { try deallocate(at: firstWhole, length: old - firstWhole, keepBacking: true) }
            if firstWhole > newSize { try write([UInt8](repeating: 0, count: Int(firstWhole - newSize)), at: newSize) }
        }
        try lock.withLock { _ in
            let cs = UInt64(clusterSize)
            let needed = Int((newSize + cs * UInt64(l2Entries) - 1) / (cs * UInt64(l2Entries)))
            if needed > l1.count {
                let table = l1 + [UInt64](repeating: 0, count: needed - l1.count)
                let bytes = Self.encodeU64(table)
                let clusters = (bytes.count + clusterSize - 1) / clusterSize
                let offset = try allocateClusters(clusters)
                try pwrite(bytes + [UInt8](repeating: 0, count: clusters * clusterSize - bytes.count), at: offset)
                try flush()
                let oldOffset = header.l1TableOffset
                let oldClusters = (UInt64(l1.count) * 8 + cs - 1) / cs
                header.l1Size = UInt32(needed)
                header.l1TableOffset = offset
                try writeHeaderFields(36..<48)
                l1 = table
                if oldOffset != 0 { try releaseClusters(at: oldOffset, count: oldClusters) }
            }
            header.size = newSize
            try writeHeaderFields(24..<32)
        }
    }

    /// Copies every range this image holds into its backing file (opened writable through
    /// `openWritable`), then empties this image so it reads through to the backing file.
    public func commit(into target: any DiskImage, keepTop: Bool = false, progress: (UInt64, UInt64) -> Void = { _, _ in }) throws {
        let size = min(virtualSize, target.virtualSize)
        var done: UInt64 = 0
        for extent in try map(at: 0, length: virtualSize) where extent.depth == 0 && extent.present {
            let end = min(extent.start + extent.length, size)
            var at = extent.start
            while at < end {
                let n = Int(min(1 << 20, end - at))
                if extent.zero && !extent.data {
                    try target.writeZeroes(at: at, length: UInt64(n))
                } else {
                    try target.write(try read(at: at, count: n), at: at)
                }
                at += UInt64(n)
                done += UInt64(n)
                progress(done, size)
            }
        }
        try target.flush()
        if !keepTop {
            try deallocate(at: 0, length: virtualSize, keepBacking: true)
            try flush()
        }
    }

    /// Points this image at a new backing file. Unless `unsafe`, first copies into this image
    /// every range where the old and new backing chains differ, so the content is unchanged.
    public func rebase(to newBacking: String?, format: DiskFormat?, unsafe: Bool, openNew: (String, DiskFormat?) throws -> (any DiskImage)?) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        let newImage = try newBacking.flatMap { try openNew(DiskOpener.resolve(backing: $0, of: path), format) }
        if !unsafe {
            let size = virtualSize
            for extent in try map(at: 0, length: size) where extent.depth > 0 || !extent.present {
                var at = extent.start
                let end = extent.start + extent.length
                while at < end {
                    let n = Int(min(1 << 20, end - at))
                    let old = try read(at: at, count: n)
                    var new = [UInt8](repeating: 0, count: n)
                    if let newImage, at < newImage.virtualSize {
                        let m = Int(min(UInt64(n), newImage.virtualSize - at))
                        new.replaceSubrange(0..<m, with: try newImage.read(at: at, count: m))
                    }
                    if old != new { try write(old, at: at) }
                    at += UInt64(n)
                }
            }
            try flush()
        }
        try lock.withLock { _ in
            var updated = header
            updated.backingFile = newBacking
            updated.backingFormat = newBacking == nil ? nil : (format ?? newImage?.format)?.rawValue
            let bytes = updated.serialize()
            guard bytes.count <= clusterSize else { throw DiskError("the new backing file name does not fit in the header cluster") }
            try pwrite(bytes + [UInt8](repeating: 0, count: max(0, header.serialize().count - bytes.count)), at: 0)
            try flush()
            header = updated
        }
    }
}

extension QCOW2Image {
    /// Writes one whole guest cluster compressed (raw deflate), as `qemu-img convert -c` does.
    /// Data that does not shrink is written normally. `offset` must be cluster aligned and
    /// `data` exactly one cluster.
    public func writeCompressed(_ data: [UInt8], at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        guard data.count == clusterSize, offset % UInt64(clusterSize) == 0 else {
            throw DiskError("compressed writes must cover exactly one aligned \(clusterSize)-byte cluster")
        }
        try checkRange(self, offset, UInt64(data.count))
        var compressed = [UInt8](repeating: 0, count: clusterSize)
        let size = data.withUnsafeBufferPointer { src in
            compressed.withUnsafeMutableBufferPointer { dst in
                // SAFETY: both buffers are live arrays and their exact lengths are passed.
                nimbus_deflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count - 512)
            }
        }
        guard size > 0 else { return try write(data, at: offset) }
        try lock.withLock { _ in
            let cluster = offset / UInt64(clusterSize)
            let (l2Offset, index) = try writableL2(forCluster: cluster)
            let old = classify(try l2Table(at: l2Offset)[index])
            let host = try allocateClusters(1)
            let x = UInt64(62 - (clusterBits - 8))
            guard host < 1 << x else { throw DiskError("\(path): compressed cluster offset \(host) does not fit the L2 entry") }
            let sectors = UInt64((size + 511) / 512 - 1)
            try pwrite(Array(compressed[0..<size]), at: host)
            try setL2Entry(l2Offset, index, Self.compressedFlag | (sectors << x) | host)
            try release(old)
        }
    }
}
