// VirtualDisk (layer 2): qcow2 reference counts: reading and writing refcount entries of any
// width (1 to 64 bits), allocating clusters first-fit, creating refcount blocks inside the range
// they describe, and growing the refcount table. Called with the image's lock held.
extension QCOW2Image {
    func refcountBlock(at offset: UInt64) throws -> [UInt64] {
        if let cached = refblockCache[offset] { return cached }
        guard offset % UInt64(clusterSize) == 0, offset + UInt64(clusterSize) <= fileEnd else {
            throw DiskError("\(path): refcount block at \(offset) lies past the end of the file or is misaligned")
        }
        let bytes = try pread(clusterSize, at: offset)
        let block = (0..<refsPerBlock).map { Self.decodeRefcount(bytes, index: $0, bits: refcountBits) }
        if refblockCache.count > 1024 { refblockCache.removeAll(keepingCapacity: true) }
        refblockCache[offset] = block
        return block
    }

    static func decodeRefcount(_ bytes: [UInt8], index: Int, bits: Int) -> UInt64 {
        if bits >= 8 {
            let width = bits / 8
            var v: UInt64 = 0
            for i in 0..<width { v = v << 8 | UInt64(bytes[index * width + i]) }
            return v
        }
        let perByte = 8 / bits
        let byte = bytes[index / perByte]
        return UInt64((byte >> UInt8((index % perByte) * bits)) & UInt8((1 << bits) - 1))
    }

    /// The bytes of entry `index` (the whole byte for sub-byte widths) and where they go.
    static func encodeRefcount(_ block: [UInt64], index: Int, bits: Int) -> (byteOffset: Int, bytes: [UInt8]) {
        if bits >= 8 {
            let width = bits / 8
            let v = block[index]
            return (index * width, (0..<width).map { UInt8(truncatingIfNeeded: v >> UInt64(8 * (width - 1 - $0))) })
        }
        let perByte = 8 / bits
        let first = index / perByte * perByte
        var byte: UInt8 = 0
        for i in 0..<perByte { byte |= UInt8(truncatingIfNeeded: block[first + i]) << UInt8(i * bits) }
        return (index / perByte, [byte])
    }

    var maxRefcount: UInt64 { refcountBits == 64 ? UInt64.max : (1 << UInt64(refcountBits)) - 1 }

    /// The stored refcount of host cluster `cluster` (0 where no block describes it).
    func refcount(cluster: UInt64) throws -> UInt64 {
        let tableIndex = Int(cluster / UInt64(refsPerBlock))
        guard tableIndex < refcountTable.count else { return 0 }
        let blockOffset = refcountTable[tableIndex] & Self.offsetMask
        if blockOffset == 0 { return 0 }
        return try refcountBlock(at: blockOffset)[Int(cluster % UInt64(refsPerBlock))]
    }

    /// Sets the refcount of a cluster whose refcount block already exists.
    func storeRefcount(cluster: UInt64, _ value: UInt64) throws {
        let tableIndex = Int(cluster / UInt64(refsPerBlock))
        let blockOffset = refcountTable[tableIndex] & Self.offsetMask
        if refblockCache[blockOffset] == nil { _ = try refcountBlock(at: blockOffset) }
        let index = Int(cluster % UInt64(refsPerBlock))
        refblockCache[blockOffset]?[index] = value  // in place: no copy of the block
        let (at, bytes) = Self.encodeRefcount(refblockCache[blockOffset] ?? [], index: index, bits: refcountBits)
        try pwrite(bytes, at: blockOffset + UInt64(at))
        if value == 0 { freeHint = min(freeHint, cluster) }
    }

    /// Sets the refcounts of consecutive clusters whose refcount blocks exist, with one write per
    /// refcount block touched.
    func storeRefcounts(clusters: Range<UInt64>, _ value: UInt64) throws {
        let perBlock = UInt64(refsPerBlock)
        let perUnit = refcountBits >= 8 ? 1 : 8 / refcountBits
        var c = clusters.lowerBound
        while c < clusters.upperBound {
            let tableIndex = Int(c / perBlock)
            let blockOffset = refcountTable[tableIndex] & Self.offsetMask
            if refblockCache[blockOffset] == nil { _ = try refcountBlock(at: blockOffset) }
            let end = min(clusters.upperBound, UInt64(tableIndex + 1) * perBlock)
            let first = Int(c % perBlock)
            let last = Int((end - 1) % perBlock)
            for i in first...last { refblockCache[blockOffset]?[i] = value }
            let block = refblockCache[blockOffset] ?? []
            var bytes: [UInt8] = []
            var startByte: Int?
            var i = first - first % perUnit
            while i <= last {
                let (at, encoded) = Self.encodeRefcount(block, index: i, bits: refcountBits)
                if startByte == nil { startByte = at }
                bytes += encoded
                i += perUnit
            }
            try pwrite(bytes, at: blockOffset + UInt64(startByte ?? 0))
            if value == 0 { freeHint = min(freeHint, c) }
            c = end
        }
    }

    /// Adds `delta` to a cluster's refcount, creating its refcount block if needed.
    func changeRefcount(cluster: UInt64, by delta: Int) throws {
        if delta > 0 { _ = try ensureRefcountBlock(for: cluster) }
        let current = try refcount(cluster: cluster)
        if delta < 0 {
            guard current >= UInt64(-delta) else {
                throw DiskError("\(path): refcount of cluster \(cluster) would drop below zero (image is corrupt; run check)")
            }
            try storeRefcount(cluster: cluster, current - UInt64(-delta))
        } else {
            guard current <= maxRefcount - UInt64(delta) else {
                throw DiskError("\(path): refcount of cluster \(cluster) would overflow \(refcountBits) bits")
            }
            try storeRefcount(cluster: cluster, current + UInt64(delta))
        }
    }

    /// Writes bytes `range` of the in-memory header to the file in one write, then flushes: the
    /// switch-over point of every metadata change that moves a table.
    func writeHeaderFields(_ range: Range<Int>) throws {
        try pwrite(Array(header.serialize()[range]), at: UInt64(range.lowerBound))
        try flush()
    }

    /// Drops one reference from each of `count` clusters starting at host offset `offset`.
    func releaseClusters(at offset: UInt64, count: UInt64) throws {
        let first = offset / UInt64(clusterSize)
        for k in 0..<count { try changeRefcount(cluster: first + k, by: -1) }
    }

    /// Makes sure a refcount block describes `cluster`. Returns the cluster a new block took, if any.
    func ensureRefcountBlock(for cluster: UInt64) throws -> UInt64? {
        let tableIndex = Int(cluster / UInt64(refsPerBlock))
        if tableIndex >= refcountTable.count { try growRefcountTable(minEntries: tableIndex + 1) }
        if refcountTable[tableIndex] & Self.offsetMask != 0 { return nil }
        // Nothing in this block's range is counted yet, so its first cluster is free: put it there
        // and let it count itself.
        let blockCluster = UInt64(tableIndex) * UInt64(refsPerBlock)
        var block = [UInt64](repeating: 0, count: refsPerBlock)
        block[0] = 1
        let offset = blockCluster * UInt64(clusterSize)
        try pwrite(Self.encodeBlock(block, bits: refcountBits, clusterSize: clusterSize), at: offset)
        refblockCache[offset] = block
        refcountTable[tableIndex] = offset
        try pwrite(Self.encodeU64([offset]), at: header.refcountTableOffset + UInt64(tableIndex) * 8)
        return blockCluster
    }

    static func encodeBlock(_ block: [UInt64], bits: Int, clusterSize: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: clusterSize)
        var index = 0
        while index < block.count {
            let (at, b) = encodeRefcount(block, index: index, bits: bits)
            bytes.replaceSubrange(at..<at + b.count, with: b)
            index += bits >= 8 ? 1 : 8 / bits
        }
        return bytes
    }

    /// Allocates `count` contiguous free clusters with refcount 1; returns the host offset.
    func allocateClusters(_ count: Int) throws -> UInt64 {
        var start = freeHint
        while true {
            var run = 0
            var runStart = start
            var c = start
            while run < count {
                if try refcount(cluster: c) == 0 {
                    if run == 0 { runStart = c }
                    run += 1
                } else {
                    run = 0
                }
                c += 1
            }
            // A run longer than one refcount block's range cannot hold those blocks at the start
            // of their ranges (they would split it): give its ranges blocks placed after it.
            if count > 1 { try describeOutside(runStart..<runStart + UInt64(count)) }
            var tookOne = false
            for cluster in runStart..<runStart + UInt64(count) {
                if let taken = try ensureRefcountBlock(for: cluster), taken >= runStart, taken < runStart + UInt64(count) { tookOne = true }
            }
            var busy = tookOne
            for cluster in runStart..<runStart + UInt64(count) where !busy {
                busy = try refcount(cluster: cluster) != 0
            }
            if busy {
                start = runStart
                continue
            }
            try storeRefcounts(clusters: runStart..<runStart + UInt64(count), 1)
            if count == 1 || runStart == freeHint { freeHint = runStart + UInt64(count) }
            let offset = runStart * UInt64(clusterSize)
            fileEnd = max(fileEnd, offset + UInt64(count * clusterSize))
            return offset
        }
    }

    /// Gives every refcount-block range that `run` touches a block, placed outside `run`.
    func describeOutside(_ run: Range<UInt64>) throws {
        let perBlock = UInt64(refsPerBlock)
        for index in Int(run.lowerBound / perBlock)...Int((run.upperBound - 1) / perBlock) {
            if index >= refcountTable.count { try growRefcountTable(minEntries: index + 1) }
            if refcountTable[index] & Self.offsetMask != 0 { continue }
            // Counted first, then written, then pointed to: a crash in between only leaks.
            let offset = try freeClusterAfter(run) * UInt64(clusterSize)
            let block = [UInt64](repeating: 0, count: refsPerBlock)
            try pwrite(Self.encodeBlock(block, bits: refcountBits, clusterSize: clusterSize), at: offset)
            refblockCache[offset] = block
            refcountTable[index] = offset
            try pwrite(Self.encodeU64([offset]), at: header.refcountTableOffset + UInt64(index) * 8)
        }
    }

    /// Takes (refcount 1) the first free cluster from the first refcount-block range that starts
    /// at or after the end of `run`.
    func freeClusterAfter(_ run: Range<UInt64>) throws -> UInt64 {
        let perBlock = UInt64(refsPerBlock)
        var c = (run.upperBound + perBlock - 1) / perBlock * perBlock
        while true {
            _ = try ensureRefcountBlock(for: c)  // at the start of c's range, so outside `run`
            if try refcount(cluster: c) == 0 {
                try storeRefcount(cluster: c, 1)
                return c
            }
            c += 1
        }
    }

    /// Replaces the refcount table with a larger one placed at the end of the file, together with
    /// the new refcount blocks that describe it; the header switches to it in one write.
    func growRefcountTable(minEntries: Int) throws {
        let cs = UInt64(clusterSize)
        let perBlock = UInt64(refsPerBlock)
        var entries = max(minEntries, refcountTable.count * 2)
        while true {
            let tableClusters = (UInt64(entries) * 8 + cs - 1) / cs
            let first = fileEnd / cs
            var end = first + tableClusters
            var newBlocks: [Int: UInt64] = [:]
            while true {
                var added = false
                for index in Int(first / perBlock)...Int((end - 1) / perBlock) {
                    let exists = index < refcountTable.count && refcountTable[index] & Self.offsetMask != 0
                    if !exists && newBlocks[index] == nil {
                        newBlocks[index] = end
                        end += 1
                        added = true
                    }
                }
                if !added { break }
            }
            let highest = max(newBlocks.keys.max() ?? 0, Int((end - 1) / perBlock), minEntries - 1)
            if highest >= entries {
                entries = highest + 1 + entries / 2
                continue
            }
            // Write the new blocks, counting the new table and the blocks themselves.
            for (index, blockCluster) in newBlocks {
                var block = [UInt64](repeating: 0, count: refsPerBlock)
                let lo = max(first, UInt64(index) * perBlock)
                let hi = min(end, UInt64(index + 1) * perBlock)
                if lo < hi { for c in lo..<hi { block[Int(c - UInt64(index) * perBlock)] = 1 } }
                let offset = blockCluster * cs
                try pwrite(Self.encodeBlock(block, bits: refcountBits, clusterSize: clusterSize), at: offset)
                refblockCache[offset] = block
            }
            for c in first..<end where newBlocks[Int(c / perBlock)] == nil {
                try storeRefcount(cluster: c, 1)
            }
            var table = refcountTable + [UInt64](repeating: 0, count: entries - refcountTable.count)
            for (index, blockCluster) in newBlocks { table[index] = blockCluster * cs }
            var bytes = Self.encodeU64(table)
            bytes += [UInt8](repeating: 0, count: Int(tableClusters * cs) - bytes.count)
            try pwrite(bytes, at: first * cs)
            try flush()
            let oldOffset = header.refcountTableOffset
            let oldClusters = UInt64(header.refcountTableClusters)
            header.refcountTableOffset = first * cs
            header.refcountTableClusters = UInt32(tableClusters)
            try writeHeaderFields(48..<60)
            refcountTable = table
            fileEnd = max(fileEnd, end * cs)
            try releaseClusters(at: oldOffset, count: oldClusters)
            return
        }
    }
}
