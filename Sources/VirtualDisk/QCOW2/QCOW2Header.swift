// VirtualDisk (layer 2): the qcow2 header (versions 2 and 3) and its extensions, parsed with
// every field validated against the file, and serialized back.

/// Big-endian field access with bounds checks.
struct BigEndianReader {
    let bytes: [UInt8]
    func u8(_ at: Int) throws -> UInt8 {
        guard at >= 0, at < bytes.count else { throw DiskError("qcow2 header is truncated at byte \(at)") }
        return bytes[at]
    }
    func u16(_ at: Int) throws -> UInt16 { UInt16(try u8(at)) << 8 | UInt16(try u8(at + 1)) }
    func u32(_ at: Int) throws -> UInt32 { UInt32(try u16(at)) << 16 | UInt32(try u16(at + 2)) }
    func u64(_ at: Int) throws -> UInt64 { UInt64(try u32(at)) << 32 | UInt64(try u32(at + 4)) }
}

/// Big-endian field writes into a growable buffer.
struct BigEndianWriter {
    var bytes: [UInt8]
    init(size: Int = 0) { bytes = [UInt8](repeating: 0, count: size) }
    mutating func put<T: FixedWidthInteger>(_ v: T, at: Int) {
        let n = MemoryLayout<T>.size
        if bytes.count < at + n { bytes += [UInt8](repeating: 0, count: at + n - bytes.count) }
        for i in 0..<n { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * (n - 1 - i))) }
    }
    mutating func put(_ data: [UInt8], at: Int) {
        if bytes.count < at + data.count { bytes += [UInt8](repeating: 0, count: at + data.count - bytes.count) }
        bytes.replaceSubrange(at..<at + data.count, with: data)
    }
}

public struct QCOW2Header: Sendable, Equatable {
    public static let magicBytes: [UInt8] = [0x51, 0x46, 0x49, 0xFB]  // "QFI\xfb"

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = 72
    public var compressionType: UInt8 = 0
    /// The backing file name, if any.
    public var backingFile: String?
    /// The backing format from the 0xE2792ACA extension, if present.
    public var backingFormat: String?
    /// Extensions this implementation does not interpret, kept verbatim (type, data).
    public var otherExtensions: [(type: UInt32, data: [UInt8])] = []

    public static func == (a: QCOW2Header, b: QCOW2Header) -> Bool {
        a.serialize() == b.serialize()
    }

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var refcountBits: Int { 1 << Int(refcountOrder) }

    // Incompatible feature bits.
    public static let dirtyBit: UInt64 = 1 << 0
    public static let corruptBit: UInt64 = 1 << 1
    public static let externalDataBit: UInt64 = 1 << 2
    public static let compressionTypeBit: UInt64 = 1 << 3
    public static let extendedL2Bit: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = 0x1F

    static let backingFormatExtension: UInt32 = 0xE279_2ACA
    static let featureTableExtension: UInt32 = 0x6803_F857

    public init(version: UInt32 = 3, clusterBits: UInt32 = 16, size: UInt64) {
        self.version = version
        self.clusterBits = clusterBits
        self.size = size
        backingFileOffset = 0
        backingFileSize = 0
        cryptMethod = 0
        l1Size = 0
        l1TableOffset = 0
        refcountTableOffset = 0
        refcountTableClusters = 0
        snapshotCount = 0
        snapshotsOffset = 0
        headerLength = version >= 3 ? 112 : 72
    }

    /// Parses the header from the image's first bytes (at least one cluster or the whole file
    /// when shorter), checking every offset against `fileSize`.
    public init(_ bytes: [UInt8], fileSize: UInt64) throws {
        let r = BigEndianReader(bytes: bytes)
        guard bytes.count >= 72 else { throw DiskError("qcow2 header is truncated: \(bytes.count) bytes, at least 72 needed") }
        guard Array(bytes[0..<4]) == Self.magicBytes else { throw DiskError("not a qcow2 image (bad magic)") }
        version = try r.u32(4)
        guard version == 2 || version == 3 else { throw DiskError("qcow2 version \(version) is not supported (only 2 and 3)") }
        backingFileOffset = try r.u64(8)
        backingFileSize = try r.u32(16)
        clusterBits = try r.u32(20)
        guard (9...21).contains(clusterBits) else { throw DiskError("qcow2 cluster_bits \(clusterBits) is outside 9..21 (512 B to 2 MiB)") }
        size = try r.u64(24)
        cryptMethod = try r.u32(32)
        l1Size = try r.u32(36)
        l1TableOffset = try r.u64(40)
        refcountTableOffset = try r.u64(48)
        refcountTableClusters = try r.u32(56)
        snapshotCount = try r.u32(60)
        snapshotsOffset = try r.u64(64)
        if version >= 3 {
            incompatibleFeatures = try r.u64(72)
            compatibleFeatures = try r.u64(80)
            autoclearFeatures = try r.u64(88)
            refcountOrder = try r.u32(96)
            headerLength = try r.u32(100)
            guard headerLength >= 104, headerLength % 8 == 0 || headerLength == 104, Int(headerLength) <= bytes.count else {
                throw DiskError("qcow2 header_length \(headerLength) is invalid")
            }
            if headerLength > 104 { compressionType = try r.u8(104) }
        }
        try validate(fileSize: fileSize)
        try parseExtensions(r, fileSize: fileSize)
        if backingFileOffset != 0 {
            guard backingFileSize > 0, backingFileSize <= 1023 else {
                throw DiskError("qcow2 backing file name length \(backingFileSize) is invalid (1..1023)")
            }
            let end = Int(backingFileOffset) + Int(backingFileSize)
            guard backingFileOffset < UInt64(bytes.count), end <= bytes.count else {
                throw DiskError("qcow2 backing file name at \(backingFileOffset) lies outside the header cluster")
            }
            backingFile = String(decoding: bytes[Int(backingFileOffset)..<end], as: UTF8.self)
        }
    }

    func validate(fileSize: UInt64) throws {
        let unknown = incompatibleFeatures & ~Self.knownIncompatible
        if unknown != 0 { throw DiskError("qcow2 image uses unknown incompatible features 0x\(String(unknown, radix: 16)); refusing to open it") }
        if incompatibleFeatures & Self.externalDataBit != 0 { throw DiskError("qcow2 external data files are not supported") }
        if incompatibleFeatures & Self.extendedL2Bit != 0 { throw DiskError("qcow2 extended L2 entries (subclusters) are not supported") }
        if incompatibleFeatures & Self.compressionTypeBit != 0 || compressionType != 0 {
            throw DiskError("qcow2 compression type \(compressionType) (zstd) is not supported, only zlib")
        }
        if cryptMethod != 0 { throw DiskError("encrypted qcow2 images are not supported (crypt_method \(cryptMethod))") }
        guard refcountOrder <= 6 else { throw DiskError("qcow2 refcount_order \(refcountOrder) is invalid (at most 6)") }
        let cs = UInt64(clusterSize)
        func aligned(_ v: UInt64) -> Bool { v % cs == 0 }
        guard aligned(l1TableOffset), aligned(refcountTableOffset), aligned(snapshotsOffset) else {
            throw DiskError("qcow2 table offsets are not cluster aligned")
        }
        guard refcountTableOffset != 0, refcountTableClusters > 0 else { throw DiskError("qcow2 image has no refcount table") }
        guard refcountTableOffset < fileSize, refcountTableOffset + UInt64(refcountTableClusters) * cs <= fileSize + cs else {
            throw DiskError("qcow2 refcount table at \(refcountTableOffset) lies past the end of the file (\(fileSize) bytes)")
        }
        guard refcountTableClusters <= 1 << 23 else { throw DiskError("qcow2 refcount table of \(refcountTableClusters) clusters is too large") }
        let l2Entries = UInt64(clusterSize / 8)
        let span = cs * l2Entries  // bytes one L1 entry maps; `size` may be anything up to UInt64.max
        let needed = size / span + (size % span == 0 ? 0 : 1)
        guard UInt64(l1Size) >= needed else { throw DiskError("qcow2 L1 table of \(l1Size) entries cannot map a \(size)-byte disk (\(needed) needed)") }
        guard l1Size <= 1 << 25 else { throw DiskError("qcow2 L1 table of \(l1Size) entries is too large") }
        if l1Size > 0 {
            guard l1TableOffset != 0, l1TableOffset <= fileSize, UInt64(l1Size) * 8 <= fileSize - l1TableOffset else {
                throw DiskError("qcow2 L1 table at \(l1TableOffset) lies past the end of the file (\(fileSize) bytes)")
            }
        }
        if snapshotCount > 0 {
            guard snapshotCount <= 65536, snapshotsOffset != 0, snapshotsOffset < fileSize else {
                throw DiskError("qcow2 snapshot table at \(snapshotsOffset) lies past the end of the file")
            }
        }
    }

    mutating func parseExtensions(_ r: BigEndianReader, fileSize: UInt64) throws {
        var at = version >= 3 ? Int(headerLength) : 72
        let limit = min(r.bytes.count, clusterSize)
        while at + 8 <= limit {
            let type = try r.u32(at)
            let length = Int(try r.u32(at + 4))
            if type == 0 { return }
            guard at + 8 + length <= limit else { throw DiskError("qcow2 header extension 0x\(String(type, radix: 16)) runs past the header cluster") }
            let data = Array(r.bytes[(at + 8)..<(at + 8 + length)])
            switch type {
            case Self.backingFormatExtension: backingFormat = String(decoding: data, as: UTF8.self)
            case Self.featureTableExtension: break  // names only; regenerated on write
            default: otherExtensions.append((type, data))
            }
            at += 8 + ((length + 7) & ~7)
        }
    }

    /// The header cluster's bytes: header, extensions, backing file name.
    public func serialize() -> [UInt8] {
        var w = BigEndianWriter()
        w.put(Self.magicBytes, at: 0)
        w.put(version, at: 4)
        w.put(clusterBits, at: 20)
        w.put(size, at: 24)
        w.put(cryptMethod, at: 32)
        w.put(l1Size, at: 36)
        w.put(l1TableOffset, at: 40)
        w.put(refcountTableOffset, at: 48)
        w.put(refcountTableClusters, at: 56)
        w.put(snapshotCount, at: 60)
        w.put(snapshotsOffset, at: 64)
        var at = 72
        if version >= 3 {
            w.put(incompatibleFeatures, at: 72)
            w.put(compatibleFeatures, at: 80)
            w.put(autoclearFeatures, at: 88)
            w.put(refcountOrder, at: 96)
            w.put(headerLength, at: 100)
            if headerLength > 104 { w.put(compressionType, at: 104) }
            at = Int(headerLength)
            w.put([UInt8](repeating: 0, count: max(0, at - w.bytes.count)), at: w.bytes.count)
        }
        func ext(_ type: UInt32, _ data: [UInt8]) {
            w.put(type, at: at)
            w.put(UInt32(data.count), at: at + 4)
            w.put(data + [UInt8](repeating: 0, count: ((data.count + 7) & ~7) - data.count), at: at + 8)
            at += 8 + ((data.count + 7) & ~7)
        }
        if let backingFormat { ext(Self.backingFormatExtension, Array(backingFormat.utf8)) }
        if version >= 3 { ext(Self.featureTableExtension, Self.featureNameTable) }
        for e in otherExtensions { ext(e.type, e.data) }
        w.put(UInt64(0), at: at)  // end of extensions
        at += 8
        if let backingFile {
            let name = Array(backingFile.utf8)
            w.put(UInt64(at), at: 8)
            w.put(UInt32(name.count), at: 16)
            w.put(name, at: at)
        }
        return w.bytes
    }

    static var featureNameTable: [UInt8] {
        var out: [UInt8] = []
        func entry(_ type: UInt8, _ bit: UInt8, _ name: String) {
            var e = [type, bit] + Array(name.utf8.prefix(46))
            e += [UInt8](repeating: 0, count: 48 - e.count)
            out += e
        }
        entry(0, 0, "dirty bit")
        entry(0, 1, "corrupt bit")
        entry(0, 2, "external data file")
        entry(0, 3, "compression type")
        entry(0, 4, "extended L2 entries")
        entry(1, 0, "lazy refcounts")
        entry(2, 0, "bitmaps")
        entry(2, 1, "raw external data")
        return out
    }
}
