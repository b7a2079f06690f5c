// VirtualDisk (layer 2): a qcow2 image: two-level cluster mapping (L1 → L2 → data), refcounted
// allocation, copy-on-write from the backing chain and from shared (snapshot) clusters, zero and
// compressed clusters.
//
// Crash safety by write ordering (no dirty bit): a cluster's refcount is raised before anything
// points at it, and lowered only after the last pointer is gone. A process killed between two
// writes can therefore leave a cluster counted but unreferenced (a leak, which
// `nimbus disk check -r leaks` repairs), never referenced but uncounted.
import CNimbusZlib
import LinuxSystem
import Synchronization

/// How one guest cluster is stored.
enum ClusterMapping: Equatable {
    case unallocated
    case zero(host: UInt64?)
    case data(host: UInt64, copied: Bool)
    case compressed(host: UInt64, size: Int)
}

public final class QCOW2Image: DiskImage, @unchecked Sendable {
    // SAFETY (Sendable): all mutable state below `lock` is touched only inside `lock.withLock`.
    public let format = DiskFormat.qcow2
    public let path: String
    public let isReadOnly: Bool
    public let backing: (any DiskImage)?
    let file: OwnedFileDescriptor
    let lock = Mutex<Void>(())

    var header: QCOW2Header
    var l1: [UInt64]
    var refcountTable: [UInt64]
    var l2Cache: [UInt64: [UInt64]] = [:]
    var refblockCache: [UInt64: [UInt64]] = [:]
    var fileEnd: UInt64
    var freeHint: UInt64 = 0

    let clusterSize: Int
    let clusterBits: Int
    let l2Entries: Int
    let refcountBits: Int
    let refsPerBlock: Int

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1

    /// Opens `path`; `openBacking` opens the named backing file (path resolved, format or nil).
    public init(path: String, readOnly: Bool = false, openBacking: (String, DiskFormat?) throws -> any DiskImage) throws {
        self.path = path
        self.isReadOnly = readOnly
        do {
            file = readOnly ? try OwnedFileDescriptor.openReadOnly(path) : try OwnedFileDescriptor.openReadWrite(path)
        } catch {
            throw DiskError("cannot open qcow2 image \(path): \(error)")
        }
        let fileSize: UInt64
        do {
            fileSize = UInt64(try file.size())
            header = try QCOW2Header(try file.readZeroFilled(Int(min(fileSize, 1 << 21)), at: 0), fileSize: fileSize)
        } catch let error as DiskError {
            throw DiskError("\(path): \(error)")
        }
        if !readOnly && header.incompatibleFeatures & QCOW2Header.corruptBit != 0 {
            throw DiskError("\(path) is marked corrupt; open it read-only or repair it with `nimbus disk check -r all`")
        }
        if !readOnly && header.incompatibleFeatures & QCOW2Header.dirtyBit != 0 {
            throw DiskError("\(path) has the dirty bit set (lazy refcounts); repair it with `nimbus disk check -r all` first")
        }
        clusterSize = header.clusterSize
        clusterBits = Int(header.clusterBits)
        l2Entries = clusterSize / 8
        refcountBits = header.refcountBits
        refsPerBlock = clusterSize * 8 / refcountBits
        fileEnd = (fileSize + UInt64(clusterSize) - 1) / UInt64(clusterSize) * UInt64(clusterSize)
        let l1Bytes = try file.readZeroFilled(Int(header.l1Size) * 8, at: Int(header.l1TableOffset))
        l1 = Self.decodeU64(l1Bytes)
        let tableBytes = try file.readZeroFilled(Int(header.refcountTableClusters) * clusterSize, at: Int(header.refcountTableOffset))
        refcountTable = Self.decodeU64(tableBytes)
        if let name = header.backingFile {
            var format: DiskFormat?
            if let f = header.backingFormat {
                guard let known = DiskFormat(rawValue: f) else { throw DiskError("\(path): backing format \"\(f)\" is not supported") }
                format = known
            }
            backing = try openBacking(DiskOpener.resolve(backing: name, of: path), format)
        } else {
            backing = nil
        }
    }

    public var virtualSize: UInt64 { lock.withLock { _ in header.size } }
    /// The parsed header (a snapshot of it).
    public var currentHeader: QCOW2Header { lock.withLock { _ in header } }

    static func decodeU64(_ bytes: [UInt8]) -> [UInt64] {
        var out = [UInt64](repeating: 0, count: bytes.count / 8)
        for i in 0..<out.count {
            var v: UInt64 = 0
            for b in 0..<8 { v = v << 8 | UInt64(bytes[i * 8 + b]) }
            out[i] = v
        }
        return out
    }

    static func encodeU64(_ values: [UInt64]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: values.count * 8)
        for (i, v) in values.enumerated() {
            for b in 0..<8 { out[i * 8 + b] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(b))) }
        }
        return out
    }

    // MARK: file access

    func pread(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        do { return try file.readZeroFilled(count, at: Int(offset)) } catch { throw mapError("reading \(path)", error) }
    }

    func pwrite(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try pwrite($0, at: offset) }
    }

    func pwrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        do { try file.writeFully(bytes, at: Int(offset)) } catch { throw mapError("writing \(path)", error) }
        fileEnd = max(fileEnd, (offset + UInt64(bytes.count) + UInt64(clusterSize) - 1) / UInt64(clusterSize) * UInt64(clusterSize))
    }

    /// Makes the file at least `size` bytes long (the new bytes are a hole).
    func extendFile(to size: UInt64) throws {
        do {
            if try file.size() < Int(size) { try file.truncate(to: Int(size)) }
        } catch { throw mapError("extending \(path)", error) }
        fileEnd = max(fileEnd, size)
    }

    // MARK: mapping

    func l2Table(at offset: UInt64) throws -> [UInt64] {
        if let cached = l2Cache[offset] { return cached }
        guard offset % UInt64(clusterSize) == 0, offset + UInt64(clusterSize) <= fileEnd else {
            throw DiskError("\(path): L2 table at \(offset) lies past the end of the file or is misaligned")
        }
        let table = Self.decodeU64(try pread(clusterSize, at: offset))
        if l2Cache.count > 4096 { l2Cache.removeAll(keepingCapacity: true) }
        l2Cache[offset] = table
        return table
    }

    func l2Entry(forCluster cluster: UInt64) throws -> UInt64 {
        let l1Index = Int(cluster / UInt64(l2Entries))
        guard l1Index < l1.count else { return 0 }
        let l2Offset = l1[l1Index] & Self.offsetMask
        if l2Offset == 0 { return 0 }
        return try l2Table(at: l2Offset)[Int(cluster % UInt64(l2Entries))]
    }

    func classify(_ entry: UInt64) -> ClusterMapping {
        if entry & Self.compressedFlag != 0 {
            let x = 62 - (clusterBits - 8)
            let host = entry & ((1 << UInt64(x)) - 1)
            let sectors = Int((entry >> UInt64(x)) & ((1 << UInt64(62 - x)) - 1))
            return .compressed(host: host, size: (sectors + 1) * 512 - Int(host & 511))
        }
        let host = entry & Self.offsetMask
        if version3 && entry & Self.zeroFlag != 0 { return .zero(host: host == 0 ? nil : host) }
        if host == 0 { return .unallocated }
        return .data(host: host, copied: entry & Self.copiedFlag != 0)
    }

    var version3: Bool { header.version >= 3 }

    func decompress(host: UInt64, size: Int) throws -> [UInt8] {
        let input = try pread(size, at: host)
        var output = [UInt8](repeating: 0, count: clusterSize)
        let rc = input.withUnsafeBufferPointer { src in
            output.withUnsafeMutableBufferPointer { dst in
                // SAFETY: both buffers are live arrays and their exact lengths are passed.
                nimbus_inflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count)
            }
        }
        guard rc == 0 else { throw DiskError("\(path): compressed cluster at \(host) is corrupt") }
        return output
    }

    /// The current contents of guest cluster `cluster` (for copy-on-write and reads).
    func clusterContents(_ mapping: ClusterMapping, cluster: UInt64) throws -> [UInt8] {
        switch mapping {
        case .zero: return [UInt8](repeating: 0, count: clusterSize)
        case .data(let host, _): return try pread(clusterSize, at: host)
        case .compressed(let host, let size): return try decompress(host: host, size: size)
        case .unallocated:
            return try backingBytes(at: cluster * UInt64(clusterSize), count: clusterSize)
        }
    }

    /// Fills `buffer` from the backing chain at `offset` (zeros past its end or without one).
    func backingBytes(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let backing, offset < backing.virtualSize else {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let n = Int(min(UInt64(buffer.count), backing.virtualSize - offset))
        try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset)
        if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
    }

    func backingBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try backingBytes(into: UnsafeMutableRawBufferPointer(buffer), at: offset)
            initialized = count
        }
    }

    // MARK: DiskImage

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        try checkRange(self, offset, UInt64(count))
        return try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            // The whole buffer is written by `read(into:)` (data, decompressed or zero bytes)
            // before it is counted as initialized; a failed read throws and leaves it at 0.
            try read(into: UnsafeMutableRawBufferPointer(buffer), at: offset)
            initialized = count
        }
    }

    /// Reads straight into `buffer`: runs of clusters stored contiguously in the file take one
    /// pread each; zero and unallocated clusters are zero-filled; compressed clusters are inflated.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(self, offset, UInt64(buffer.count))
        try lock.withLock { _ in
            var run: (host: UInt64, bufferOffset: Int, count: Int)?
            func flushRun() throws {
                guard let r = run else { return }
                run = nil
                try readHost(into: buffer, bufferOffset: r.bufferOffset, count: r.count, at: r.host)
            }
            for p in pieces(offset: offset, count: buffer.count, clusterSize: clusterSize) {
                let mapping = classify(try l2Entry(forCluster: p.cluster))
                if case .data(let host, _) = mapping {
                    let at = host + UInt64(p.offsetInCluster)
                    if let r = run, r.host + UInt64(r.count) == at {
                        run = (r.host, r.bufferOffset, r.count + p.count)
                    } else {
                        try flushRun()
                        run = (at, p.bufferOffset, p.count)
                    }
                    continue
                }
                try flushRun()
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[p.bufferOffset..<p.bufferOffset + p.count])
                switch mapping {
                case .data: continue
                case .zero: slice.initializeMemory(as: UInt8.self, repeating: 0)
                case .unallocated:
                    try backingBytes(into: slice, at: offset + UInt64(p.bufferOffset))
                case .compressed(let host, let size):
                    let bytes = try decompress(host: host, size: size)
                    slice.copyBytes(from: bytes[p.offsetInCluster..<p.offsetInCluster + p.count])
                }
            }
            try flushRun()
        }
    }

    /// Reads `count` bytes at host `offset` into `out[bufferOffset...]`; bytes past the end of
    /// the file read as zero.
    func readHost(into out: UnsafeMutableRawBufferPointer, bufferOffset: Int, count: Int, at offset: UInt64) throws {
        let slice = UnsafeMutableRawBufferPointer(rebasing: out[bufferOffset..<bufferOffset + count])
        let available = fileEnd > offset ? Int(min(UInt64(count), fileEnd - offset)) : 0
        if available < count {
            UnsafeMutableRawBufferPointer(rebasing: slice[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        guard available > 0 else { return }
        let target = UnsafeMutableRawBufferPointer(rebasing: slice[0..<available])
        do { try file.readFully(into: target, at: Int(offset)) } catch {
            // fileEnd is rounded up to a cluster, so a short last cluster ends the read early:
            // the zero-filling read covers exactly that case.
            let bytes = try pread(available, at: offset)
            target.copyBytes(from: bytes)
        }
    }

    public func write(_ data: [UInt8], at offset: UInt64) throws {
        try data.withUnsafeBytes { try write(from: $0, at: offset) }
    }

    /// Writes `data` at `offset`: runs of whole empty clusters become one allocation, clusters
    /// this image owns are overwritten in place, others are copied on write.
    public func write(from data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, UInt64(data.count))
        try lock.withLock { _ in
            let list = pieces(offset: offset, count: data.count, clusterSize: clusterSize)
            var i = 0
            while i < list.count {
                let run = try freshRun(list, from: i)
                if run.count > 1 {
                    try writeFreshRun(data, list[i..<i + run.count], l2Offset: run.l2Offset)
                    i += run.count
                } else {
                    let p = list[i]
                    try writePiece(UnsafeRawBufferPointer(rebasing: data[p.bufferOffset..<p.bufferOffset + p.count]), p)
                    i += 1
                }
            }
        }
    }

    /// Longest run (up to 256) of whole-cluster pieces from `start`, in one L2 table, whose clusters
    /// hold nothing yet (unallocated, or a zero marker without storage): those are written as one
    /// contiguous allocation.
    func freshRun(_ list: [ClusterPiece], from start: Int) throws -> (count: Int, l2Offset: UInt64) {
        guard list[start].count == clusterSize else { return (0, 0) }
        let l1Index = list[start].cluster / UInt64(l2Entries)
        var n = 0
        while start + n < list.count, n < 256 {
            let p = list[start + n]
            guard p.count == clusterSize, p.cluster / UInt64(l2Entries) == l1Index else { break }
            n += 1
        }
        guard n > 1 else { return (0, 0) }
        let (l2Offset, firstIndex) = try writableL2(forCluster: list[start].cluster)
        let table = try l2Table(at: l2Offset)
        var fresh = 0
        while fresh < n {
            switch classify(table[firstIndex + fresh]) {
            case .unallocated, .zero(nil): fresh += 1
            default: return (fresh, l2Offset)
            }
        }
        return (fresh, l2Offset)
    }

    /// Writes whole, empty clusters as one allocation: refcounts, then the data in one write, then
    /// the L2 entries in one write (the order of `writePiece`, so a crash leaks at most).
    func writeFreshRun(_ data: UnsafeRawBufferPointer, _ run: ArraySlice<ClusterPiece>, l2Offset: UInt64) throws {
        guard let first = run.first else { return }
        let host = try allocateClusters(run.count)
        try pwrite(UnsafeRawBufferPointer(rebasing: data[first.bufferOffset..<first.bufferOffset + run.count * clusterSize]), at: host)
        let firstIndex = Int(first.cluster % UInt64(l2Entries))
        let entries = (0..<run.count).map { (host + UInt64($0 * clusterSize)) | Self.copiedFlag }
        if l2Cache[l2Offset] == nil { _ = try l2Table(at: l2Offset) }
        for (k, e) in entries.enumerated() { l2Cache[l2Offset]?[firstIndex + k] = e }
        try pwrite(Self.encodeU64(entries), at: l2Offset + UInt64(firstIndex) * 8)
    }

    func writePiece(_ bytes: [UInt8], _ p: ClusterPiece) throws {
        try bytes.withUnsafeBytes { try writePiece($0, p) }
    }

    func writePiece(_ bytes: UnsafeRawBufferPointer, _ p: ClusterPiece) throws {
        let (l2Offset, index) = try writableL2(forCluster: p.cluster)
        let old = try l2Table(at: l2Offset)[index]
        let mapping = classify(old)
        if case .data(let host, true) = mapping {
            try pwrite(bytes, at: host + UInt64(p.offsetInCluster))
            return
        }
        let endBefore = fileEnd
        let host = try allocateClusters(1)
        let readsAsZeros: Bool
        switch mapping {
        case .zero: readsAsZeros = true
        case .unallocated: readsAsZeros = backing == nil
        case .data, .compressed: readsAsZeros = false
        }
        if p.count == clusterSize {
            try pwrite(bytes, at: host)
        } else if readsAsZeros && host >= endBefore {
            // A new cluster past the old end of the file is a hole that reads as zeros: only
            // the piece is written (not a whole cluster of zeros), and the file is extended to
            // cover the cluster so that no table points past its end.
            try pwrite(bytes, at: host + UInt64(p.offsetInCluster))
            try extendFile(to: host + UInt64(clusterSize))
        } else {
            var content = try clusterContents(mapping, cluster: p.cluster)
            content.replaceSubrange(p.offsetInCluster..<p.offsetInCluster + p.count, with: bytes)
            try pwrite(content, at: host)
        }
        try setL2Entry(l2Offset, index, host | Self.copiedFlag)
        try release(mapping)
    }

    /// Drops this image's reference to the storage of `mapping`.
    func release(_ mapping: ClusterMapping) throws {
        switch mapping {
        case .data(let host, _): try changeRefcount(cluster: host / UInt64(clusterSize), by: -1)
        case .zero(let host?): try changeRefcount(cluster: host / UInt64(clusterSize), by: -1)
        case .compressed(let host, let size):
            let first = host / UInt64(clusterSize)
            let last = (host + UInt64(size) - 1) / UInt64(clusterSize)
            for c in first...last { try changeRefcount(cluster: c, by: -1) }
        case .zero(nil), .unallocated: break
        }
    }

    /// The L2 table for `cluster`, made private to the active L1 (allocated or copied).
    func writableL2(forCluster cluster: UInt64) throws -> (UInt64, Int) {
        let l1Index = Int(cluster / UInt64(l2Entries))
        guard l1Index < l1.count else { throw DiskError("\(path): cluster \(cluster) is beyond the L1 table") }
        let entry = l1[l1Index]
        let current = entry & Self.offsetMask
        let index = Int(cluster % UInt64(l2Entries))
        if current != 0 && entry & Self.copiedFlag != 0 { return (current, index) }
        let fresh = try allocateClusters(1)
        let table = current == 0 ? [UInt64](repeating: 0, count: l2Entries) : try l2Table(at: current)
        try pwrite(Self.encodeU64(table), at: fresh)
        l2Cache[fresh] = table
        l1[l1Index] = fresh | Self.copiedFlag
        try pwrite(Self.encodeU64([l1[l1Index]]), at: header.l1TableOffset + UInt64(l1Index) * 8)
        if current != 0 { try changeRefcount(cluster: current / UInt64(clusterSize), by: -1) }
        return (fresh, index)
    }

    func setL2Entry(_ l2Offset: UInt64, _ index: Int, _ value: UInt64) throws {
        if l2Cache[l2Offset] == nil { _ = try l2Table(at: l2Offset) }
        l2Cache[l2Offset]?[index] = value  // in place: no copy of the table
        try pwrite(Self.encodeU64([value]), at: l2Offset + UInt64(index) * 8)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try deallocate(at: offset, length: length, keepBacking: false)
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try deallocate(at: offset, length: length, keepBacking: !version3)
    }

    /// Full clusters become zero (or unallocated) entries; partial ones get zeros written.
    func deallocate(at offset: UInt64, length: UInt64, keepBacking: Bool) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, length)
        let cs = UInt64(clusterSize)
        try lock.withLock { _ in
            var at = offset
            let end = offset + length
            while at < end {
                let cluster = at / cs
                let inCluster = at % cs
                let n = min(cs - inCluster, end - at)
                if n < cs {
                    let piece = ClusterPiece(cluster: cluster, offsetInCluster: Int(inCluster), count: Int(n), bufferOffset: 0)
                    if !keepBacking { try writePiece([UInt8](repeating: 0, count: Int(n)), piece) }
                } else {
                    let current = classify(try l2Entry(forCluster: cluster))
                    let target: UInt64 = (backing == nil || keepBacking) ? 0 : Self.zeroFlag
                    let alreadyDone = current == .unallocated && (backing == nil || keepBacking) || current == .zero(host: nil) && target == Self.zeroFlag
                    if !alreadyDone {
                        if target == Self.zeroFlag && !version3 {
                            let piece = ClusterPiece(cluster: cluster, offsetInCluster: 0, count: clusterSize, bufferOffset: 0)
                            try writePiece([UInt8](repeating: 0, count: clusterSize), piece)
                        } else {
                            let (l2Offset, index) = try writableL2(forCluster: cluster)
                            try setL2Entry(l2Offset, index, target)
                            try release(current)
                        }
                    }
                }
                at += n
            }
        }
    }

    public func flush() throws {
        guard !isReadOnly else { return }
        do { try file.sync() } catch { throw mapError("flushing \(path)", error) }
    }

    public func allocatedBytes() throws -> UInt64 {
        do { return try file.allocatedBytes() } catch { throw mapError("stat \(path)", error) }
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [Extent] {
        try checkRange(self, offset, length)
        let cs = UInt64(clusterSize)
        var result: [Extent] = []
        var at = offset
        let end = offset + length
        while at < end {
            let n = min(cs - at % cs, end - at)
            let mapping = try lock.withLock { _ in classify(try l2Entry(forCluster: at / cs)) }
            var pieces: [Extent]
            switch mapping {
            case .data(let host, _):
                pieces = [Extent(start: at, length: n, depth: 0, present: true, zero: false, data: true, offset: host + at % cs)]
            case .compressed:
                pieces = [Extent(start: at, length: n, depth: 0, present: true, zero: false, data: true, offset: nil)]
            case .zero:
                pieces = [Extent(start: at, length: n, depth: 0, present: true, zero: true, data: false, offset: nil)]
            case .unallocated:
                if let backing, at < backing.virtualSize {
                    let inBacking = min(n, backing.virtualSize - at)
                    pieces = try backing.map(at: at, length: inBacking).map {
                        var e = $0; e.depth += 1; return e
                    }
                    if inBacking < n {
                        pieces.append(Extent(start: at + inBacking, length: n - inBacking, depth: 1, present: false, zero: true, data: false, offset: nil))
                    }
                } else {
                    pieces = [Extent(start: at, length: n, depth: backing == nil ? 0 : 1, present: false, zero: true, data: false, offset: nil)]
                }
            }
            for e in pieces { Self.append(e, to: &result) }
            at += n
        }
        return result
    }

    static func append(_ e: Extent, to list: inout [Extent]) {
        if var last = list.last, last.depth == e.depth, last.present == e.present, last.zero == e.zero, last.data == e.data,
            last.start + last.length == e.start,
            (last.offset == nil && e.offset == nil) || (last.offset.map { $0 + last.length } == e.offset && e.offset != nil)
        {
            last.length += e.length
            list[list.count - 1] = last
        } else {
            list.append(e)
        }
    }
}
