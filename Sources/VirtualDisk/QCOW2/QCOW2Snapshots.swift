// VirtualDisk (layer 2): the qcow2 internal snapshot table (read side; check walks every
// snapshot's L1 table).

/// One internal snapshot.
public struct QCOW2Snapshot: Sendable, Equatable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt32
    public var extraData: [UInt8]
    /// Bytes this entry occupies in the table (8-byte aligned).
    public var encodedSize: Int { (40 + extraData.count + id.utf8.count + name.utf8.count + 7) & ~7 }
}

extension QCOW2Image {
    /// Parses the snapshot table.
    func readSnapshots() throws -> [QCOW2Snapshot] {
        guard header.snapshotCount > 0 else { return [] }
        var result: [QCOW2Snapshot] = []
        var at = header.snapshotsOffset
        for i in 0..<Int(header.snapshotCount) {
            let fixed = BigEndianReader(bytes: try pread(40, at: at))
            let extraSize = Int(try fixed.u32(36))
            let idSize = Int(try fixed.u16(12))
            let nameSize = Int(try fixed.u16(14))
            guard extraSize <= 1024, at + 40 + UInt64(extraSize + idSize + nameSize) <= fileEnd else {
                throw DiskError("\(path): snapshot \(i) of the snapshot table lies past the end of the file")
            }
            let rest = try pread(extraSize + idSize + nameSize, at: at + 40)
            let snapshot = QCOW2Snapshot(
                l1TableOffset: try fixed.u64(0), l1Size: try fixed.u32(8),
                id: String(decoding: rest[extraSize..<extraSize + idSize], as: UTF8.self),
                name: String(decoding: rest[(extraSize + idSize)...], as: UTF8.self),
                dateSeconds: try fixed.u32(16), dateNanoseconds: try fixed.u32(20), vmClockNanoseconds: try fixed.u64(24),
                vmStateSize: try fixed.u32(32), extraData: Array(rest[0..<extraSize]))
            guard snapshot.l1TableOffset % UInt64(clusterSize) == 0, snapshot.l1TableOffset + UInt64(snapshot.l1Size) * 8 <= fileEnd else {
                throw DiskError("\(path): snapshot \"\(snapshot.name)\" has an L1 table past the end of the file")
            }
            result.append(snapshot)
            at += UInt64(snapshot.encodedSize)
        }
        return result
    }

    /// The internal snapshots.
    public func snapshots() throws -> [QCOW2Snapshot] {
        try lock.withLock { _ in try readSnapshots() }
    }

    /// Bytes the snapshot table occupies.
    func snapshotTableSize(_ snapshots: [QCOW2Snapshot]) -> Int { snapshots.reduce(0) { $0 + $1.encodedSize } }
}

extension QCOW2Image {
    /// Adds `delta` to the refcount of every L2 table and data cluster reachable from `table`.
    func adjustRefcounts(l1Table table: [UInt64], by delta: Int) throws {
        let cs = UInt64(clusterSize)
        for l1Entry in table {
            let l2Offset = l1Entry & Self.offsetMask
            if l2Offset == 0 { continue }
            for entry in try l2Table(at: l2Offset) {
                switch classify(entry) {
                case .data(let host, _): try changeRefcount(cluster: host / cs, by: delta)
                case .zero(let host?): try changeRefcount(cluster: host / cs, by: delta)
                case .compressed(let host, let size):
                    for c in (host / cs)...((host + UInt64(size) - 1) / cs) { try changeRefcount(cluster: c, by: delta) }
                default: break
                }
            }
            try changeRefcount(cluster: l2Offset / cs, by: delta)
        }
    }

    /// Sets the COPIED flags of the active L1 and L2 tables from the stored refcounts; returns
    /// how many entries changed.
    @discardableResult
    func updateCopiedFlags() throws -> Int {
        let cs = UInt64(clusterSize)
        var changed = 0
        for (i, l1Entry) in l1.enumerated() {
            let l2Offset = l1Entry & Self.offsetMask
            if l2Offset == 0 { continue }
            guard l2Offset + cs <= fileEnd else { continue }
            let table = try l2Table(at: l2Offset)
            for (j, entry) in table.enumerated() {
                guard case .data(let host, let copied) = classify(entry) else { continue }
                let want = try refcount(cluster: host / cs) == 1
                if want != copied {
                    try setL2Entry(l2Offset, j, want ? entry | Self.copiedFlag : entry & ~Self.copiedFlag)
                    changed += 1
                }
            }
            let wantCopied = try refcount(cluster: l2Offset / cs) == 1
            if wantCopied != (l1Entry & Self.copiedFlag != 0) {
                l1[i] = wantCopied ? l1Entry | Self.copiedFlag : l1Entry & ~Self.copiedFlag
                try pwrite(Self.encodeU64([l1[i]]), at: header.l1TableOffset + UInt64(i) * 8)
                changed += 1
            }
        }
        return changed
    }

    func encodeSnapshot(_ s: QCOW2Snapshot) -> [UInt8] {
        var w = BigEndianWriter(size: 40)
        w.put(s.l1TableOffset, at: 0)
        w.put(s.l1Size, at: 8)
        w.put(UInt16(s.id.utf8.count), at: 12)
        w.put(UInt16(s.name.utf8.count), at: 14)
        w.put(s.dateSeconds, at: 16)
        w.put(s.dateNanoseconds, at: 20)
        w.put(s.vmClockNanoseconds, at: 24)
        w.put(s.vmStateSize, at: 32)
        w.put(UInt32(s.extraData.count), at: 36)
        var bytes = w.bytes + s.extraData + Array(s.id.utf8) + Array(s.name.utf8)
        bytes += [UInt8](repeating: 0, count: ((bytes.count + 7) & ~7) - bytes.count)
        return bytes
    }

    /// Writes `snapshots` as a new table and switches the header to it in one write, then frees
    /// the old table.
    func replaceSnapshotTable(_ snapshots: [QCOW2Snapshot]) throws {
        let cs = UInt64(clusterSize)
        let old = try readSnapshots()
        let oldOffset = header.snapshotsOffset
        let oldClusters = (UInt64(snapshotTableSize(old)) + cs - 1) / cs
        var newOffset: UInt64 = 0
        if !snapshots.isEmpty {
            let bytes = snapshots.flatMap(encodeSnapshot)
            newOffset = try allocateClusters((bytes.count + clusterSize - 1) / clusterSize)
            try pwrite(bytes, at: newOffset)
        }
        try flush()
        header.snapshotCount = UInt32(snapshots.count)
        header.snapshotsOffset = newOffset
        try writeHeaderFields(60..<72)
        if !old.isEmpty { try releaseClusters(at: oldOffset, count: oldClusters) }
    }

    func findSnapshot(_ nameOrID: String, in list: [QCOW2Snapshot]) throws -> Int {
        if let i = list.firstIndex(where: { $0.name == nameOrID }) ?? list.firstIndex(where: { $0.id == nameOrID }) { return i }
        throw DiskError("\(path) has no snapshot named \"\(nameOrID)\"")
    }

    /// Creates an internal snapshot of the current disk state.
    public func createSnapshot(name: String, date: (seconds: UInt32, nanoseconds: UInt32) = (0, 0)) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        guard !name.isEmpty, name.utf8.count <= 1024 else { throw DiskError("snapshot name must be 1 to 1024 bytes") }
        try lock.withLock { _ in
            var list = try readSnapshots()
            guard !list.contains(where: { $0.name == name }) else { throw DiskError("\(path) already has a snapshot named \"\(name)\"") }
            let l1Bytes = Self.encodeU64(l1)
            let clusters = max(1, (l1Bytes.count + clusterSize - 1) / clusterSize)
            let l1Offset = try allocateClusters(clusters)
            try pwrite(l1Bytes, at: l1Offset)
            try adjustRefcounts(l1Table: l1, by: 1)
            try updateCopiedFlags()
            let nextID = (list.compactMap { Int($0.id) }.max() ?? 0) + 1
            var extra = BigEndianWriter(size: 16)
            extra.put(UInt64(0), at: 0)
            extra.put(header.size, at: 8)
            list.append(
                QCOW2Snapshot(
                    l1TableOffset: l1Offset, l1Size: UInt32(l1.count), id: String(nextID), name: name,
                    dateSeconds: date.seconds, dateNanoseconds: date.nanoseconds, vmClockNanoseconds: 0, vmStateSize: 0,
                    extraData: header.version >= 3 ? extra.bytes : []))
            try replaceSnapshotTable(list)
        }
    }

    /// Reverts the disk to snapshot `nameOrID`.
    public func applySnapshot(_ nameOrID: String) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try lock.withLock { _ in
            let list = try readSnapshots()
            let snapshot = list[try findSnapshot(nameOrID, in: list)]
            var table = Self.decodeU64(try pread(Int(snapshot.l1Size) * 8, at: snapshot.l1TableOffset))
            guard table.count <= l1.count else {
                throw DiskError("snapshot \"\(snapshot.name)\" has a larger L1 table than the image; resize the image first")
            }
            table += [UInt64](repeating: 0, count: l1.count - table.count)
            try adjustRefcounts(l1Table: table, by: 1)
            let old = l1
            l1 = table.map { $0 & ~Self.copiedFlag }
            try pwrite(Self.encodeU64(l1), at: header.l1TableOffset)
            try flush()
            try adjustRefcounts(l1Table: old, by: -1)
            try updateCopiedFlags()
            if snapshot.extraData.count >= 16 {
                let size = try BigEndianReader(bytes: snapshot.extraData).u64(8)
                if size != header.size {
                    header.size = size
                    try writeHeaderFields(24..<32)
                }
            }
        }
    }

    /// Deletes snapshot `nameOrID`, freeing what only it used.
    public func deleteSnapshot(_ nameOrID: String) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try lock.withLock { _ in
            var list = try readSnapshots()
            let snapshot = list.remove(at: try findSnapshot(nameOrID, in: list))
            try replaceSnapshotTable(list)
            let table = Self.decodeU64(try pread(Int(snapshot.l1Size) * 8, at: snapshot.l1TableOffset))
            try adjustRefcounts(l1Table: table, by: -1)
            let cs = UInt64(clusterSize)
            let clusters = max(1, (UInt64(snapshot.l1Size) * 8 + cs - 1) / cs)
            try releaseClusters(at: snapshot.l1TableOffset, count: clusters)
            try updateCopiedFlags()
        }
    }
}
