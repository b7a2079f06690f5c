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
