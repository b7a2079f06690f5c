// VirtualDisk (layer 2): consistency check and repair, as `qemu-img check` does it: recount
// every reference (header, refcount table and blocks, L1/L2 tables of the active state and of
// every snapshot, data and compressed clusters) and compare with the stored refcounts and the
// COPIED flags.

/// What `check` may repair.
public enum RepairMode: String, Sendable {
    case none, leaks, all
}

/// The outcome of a check.
public struct CheckResult: Sendable, Equatable {
    public var corruptions = 0
    public var leaks = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var messages: [String] = []
    public var allocatedClusters = 0
    public var totalClusters: UInt64 = 0
    public var imageEndOffset: UInt64 = 0

    /// `qemu-img check`'s exit status: 0 clean, 2 corruptions left, 3 only leaks left.
    public var exitCode: Int32 {
        if corruptions - corruptionsFixed > 0 { return 2 }
        if leaks - leaksFixed > 0 { return 3 }
        return 0
    }
}

extension QCOW2Image {
    /// Checks the image; with `repair`, fixes what it may and checks again.
    public func check(repair: RepairMode = .none) throws -> CheckResult {
        if repair != .none && isReadOnly { throw DiskError("\(path) is open read-only; cannot repair") }
        return try lock.withLock { _ in
            var result = try checkLocked(repair: repair)
            if repair != .none && (result.leaksFixed > 0 || result.corruptionsFixed > 0) {
                try flush()
                let again = try checkLocked(repair: .none)
                result.messages += again.messages
                result.corruptions = again.corruptions + result.corruptionsFixed
                result.leaks = again.leaks + result.leaksFixed
            }
            return result
        }
    }

    func checkLocked(repair: RepairMode) throws -> CheckResult {
        var result = CheckResult()
        let cs = UInt64(clusterSize)
        var computed = [UInt64](repeating: 0, count: Int(fileEnd / cs))
        func reference(_ offset: UInt64, _ what: String, clusters: UInt64 = 1) {
            guard offset % cs == 0 || what == "compressed" else {
                result.messages.append("ERROR \(what) at offset \(offset) is not cluster aligned")
                result.corruptions += 1
                return
            }
            for k in 0..<clusters {
                let c = Int(offset / cs + k)
                guard c < computed.count else {
                    result.messages.append("ERROR \(what) at offset \(offset) is past the end of the image file")
                    result.corruptions += 1
                    return
                }
                computed[c] += 1
            }
        }
        reference(0, "header")
        reference(header.refcountTableOffset, "refcount table", clusters: UInt64(header.refcountTableClusters))
        for entry in refcountTable where entry & Self.offsetMask != 0 { reference(entry & Self.offsetMask, "refcount block") }

        func walk(l1Table: [UInt64], l1Offset: UInt64, active: Bool) throws {
            reference(l1Offset, "L1 table", clusters: (UInt64(l1Table.count) * 8 + cs - 1) / cs)
            for (i, l1Entry) in l1Table.enumerated() {
                let l2Offset = l1Entry & Self.offsetMask
                if l2Offset == 0 { continue }
                reference(l2Offset, "L2 table")
                if active && repair != .all {
                    let stored = try refcount(cluster: l2Offset / cs)
                    if (stored == 1) != (l1Entry & Self.copiedFlag != 0) {
                        result.messages.append("ERROR OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(l1Entry, radix: 16)) refcount=\(stored)")
                        result.corruptions += 1
                    }
                }
                guard l2Offset + cs <= fileEnd else { continue }
                let table = try l2Table(at: l2Offset)
                for (j, entry) in table.enumerated() {
                    switch classify(entry) {
                    case .data(let host, let copied):
                        reference(host, "data cluster")
                        if active && repair != .all, host / cs < UInt64(computed.count) {
                            let stored = try refcount(cluster: host / cs)
                            if (stored == 1) != copied {
                                result.messages.append("ERROR OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(stored)")
                                result.corruptions += 1
                            }
                        }
                    case .zero(let host?):
                        reference(host, "preallocated zero cluster")
                    case .compressed(let host, let size):
                        let first = host / cs
                        let last = (host + UInt64(size) - 1) / cs
                        for c in first...last { reference(c * cs, "compressed") }
                    default:
                        _ = j
                    }
                }
            }
        }
        try walk(l1Table: l1, l1Offset: header.l1TableOffset, active: true)
        let snapshots = try readSnapshots()
        if !snapshots.isEmpty {
            reference(header.snapshotsOffset, "snapshot table", clusters: (UInt64(snapshotTableSize(snapshots)) + cs - 1) / cs)
        }
        for s in snapshots {
            let table = Self.decodeU64(try pread(Int(s.l1Size) * 8, at: s.l1TableOffset))
            try walk(l1Table: table, l1Offset: s.l1TableOffset, active: false)
        }

        // Compare with the stored refcounts.
        let covered = UInt64(refcountTable.count) * UInt64(refsPerBlock)
        for c in 0..<UInt64(computed.count) {
            let stored = c < covered ? try refcount(cluster: c) : 0
            let wanted = computed[Int(c)]
            if stored != 0 || wanted != 0 { result.allocatedClusters += 1 }
            guard stored != wanted else { continue }
            if stored < wanted {
                result.corruptions += 1
                if repair == .all {
                    try setRefcountForRepair(cluster: c, wanted)
                    result.corruptionsFixed += 1
                    result.messages.append("Repairing cluster \(c) refcount=\(stored) reference=\(wanted)")
                } else {
                    result.messages.append("ERROR cluster \(c) refcount=\(stored) reference=\(wanted)")
                }
            } else {
                result.leaks += 1
                if repair != .none {
                    try setRefcountForRepair(cluster: c, wanted)
                    result.leaksFixed += 1
                    result.messages.append("Repairing cluster \(c) refcount=\(stored) reference=\(wanted)")
                } else {
                    result.messages.append("Leaked cluster \(c) refcount=\(stored) reference=\(wanted)")
                }
            }
        }
        if repair == .all { try repairCopiedFlags(&result) }
        result.totalClusters = (header.size + cs - 1) / cs
        result.imageEndOffset = fileEnd
        return result
    }

    func setRefcountForRepair(cluster: UInt64, _ value: UInt64) throws {
        _ = try ensureRefcountBlock(for: cluster)
        try storeRefcount(cluster: cluster, value)
    }

    /// Sets every COPIED flag in the active tables to match the stored refcounts.
    func repairCopiedFlags(_ result: inout CheckResult) throws {
        let changed = try updateCopiedFlags()
        result.corruptions += changed
        result.corruptionsFixed += changed
    }
}
