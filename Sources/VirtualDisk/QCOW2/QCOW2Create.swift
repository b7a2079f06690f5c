// VirtualDisk (layer 2): creating qcow2 images: header cluster, refcount table and blocks
// covering all metadata, and an empty L1 table, laid out like qemu-img does.
import LinuxSystem

extension QCOW2Image {
    /// Options for a new image.
    public struct CreateOptions: Sendable {
        public var version: UInt32 = 3
        public var clusterSize: Int = 65536
        public var refcountBits: Int = 16
        public var backingFile: String?
        public var backingFormat: DiskFormat?
        public init() {}
    }

    /// Creates a qcow2 image of `size` bytes at `path` (replacing a file that is there).
    public static func create(path: String, size: UInt64, options: CreateOptions = CreateOptions()) throws {
        let cs = options.clusterSize
        guard cs >= 512, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw DiskError("cluster size \(cs) must be a power of two from 512 to 2097152")
        }
        guard options.refcountBits >= 1, options.refcountBits <= 64, options.refcountBits & (options.refcountBits - 1) == 0 else {
            throw DiskError("refcount bits \(options.refcountBits) must be a power of two from 1 to 64")
        }
        guard options.version == 3 || options.refcountBits == 16 else { throw DiskError("qcow2 version 2 supports only 16-bit refcounts") }
        guard options.version == 2 || options.version == 3 else { throw DiskError("qcow2 version must be 2 or 3") }
        let clusterBits = UInt32(cs.trailingZeroBitCount)
        var header = QCOW2Header(version: options.version, clusterBits: clusterBits, size: size)
        header.refcountOrder = UInt32(options.refcountBits.trailingZeroBitCount)
        header.backingFile = options.backingFile
        header.backingFormat = options.backingFile == nil ? nil : options.backingFormat?.rawValue
        let l2Entries = UInt64(cs / 8)
        let l1Size = (size + UInt64(cs) * l2Entries - 1) / (UInt64(cs) * l2Entries)
        guard l1Size <= 1 << 25 else { throw DiskError("a \(size)-byte disk needs too large an L1 table for \(cs)-byte clusters") }
        let l1Clusters = Int((l1Size * 8 + UInt64(cs) - 1) / UInt64(cs))
        let refsPerBlock = cs * 8 / options.refcountBits
        var tableClusters = 1
        var blocks = 1
        while true {
            let total = 1 + tableClusters + blocks + l1Clusters
            let neededBlocks = (total + refsPerBlock - 1) / refsPerBlock
            let neededTable = (neededBlocks * 8 + cs - 1) / cs
            if neededBlocks == blocks && neededTable == tableClusters { break }
            blocks = max(blocks, neededBlocks)
            tableClusters = max(tableClusters, neededTable)
        }
        header.refcountTableOffset = UInt64(cs)
        header.refcountTableClusters = UInt32(tableClusters)
        header.l1Size = UInt32(l1Size)
        header.l1TableOffset = UInt64((1 + tableClusters + blocks) * cs)
        let headerBytes = header.serialize()
        guard headerBytes.count <= cs else {
            throw DiskError("the header and backing file name (\(headerBytes.count) bytes) do not fit in one \(cs)-byte cluster")
        }
        let total = 1 + tableClusters + blocks + l1Clusters
        // Built under a temporary name and renamed into place, so that a crash never leaves a
        // half-written image under the real name.
        let temporary = path + ".nimbus-creating"
        do {
            let fd = try OwnedFileDescriptor.openReadWrite(temporary, create: true)
            try fd.write(headerBytes, at: 0)
            let table = (0..<blocks).map { UInt64((1 + tableClusters + $0) * cs) }
            try fd.write(encodeU64(table), at: cs)
            for b in 0..<blocks {
                var block = [UInt64](repeating: 0, count: refsPerBlock)
                for c in (b * refsPerBlock)..<min(total, (b + 1) * refsPerBlock) { block[c - b * refsPerBlock] = 1 }
                try fd.write(encodeBlock(block, bits: options.refcountBits, clusterSize: cs), at: (1 + tableClusters + b) * cs)
            }
            try fd.truncate(to: total * cs)
            try fd.sync()
            try renameFile(temporary, to: path)
        } catch {
            removeFile(temporary)
            throw DiskError("cannot create qcow2 image \(path): \(error)")
        }
    }
}
