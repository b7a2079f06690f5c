// VirtualDisk (layer 2): virtual disks independent of any VMM: the `DiskImage` protocol, the raw
// and qcow2 formats, backing chains, and opening images by probing their format.
import LinuxSystem

/// A disk image that cannot be used, and why.
public struct DiskError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Supported on-disk formats.
public enum DiskFormat: String, Sendable, CaseIterable {
    case raw, qcow2
}

/// A run of the virtual disk with the same allocation status, as `qemu-img map` reports it.
public struct Extent: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    /// How deep in the backing chain the data lives (0: this image).
    public var depth: Int
    /// Whether any image in the chain holds data or a zero marker for the range.
    public var present: Bool
    /// Whether the range reads as zeros.
    public var zero: Bool
    /// Whether the range is stored as data (not a zero marker or a hole).
    public var data: Bool
    /// Host file offset of the data, when it is stored contiguously and uncompressed.
    public var offset: UInt64?
}

/// A virtual block device backed by an image file.
public protocol DiskImage: AnyObject, Sendable {
    var format: DiskFormat { get }
    var path: String { get }
    var virtualSize: UInt64 { get }
    var isReadOnly: Bool { get }
    /// The image below this one in the backing chain.
    var backing: (any DiskImage)? { get }

    func read(at offset: UInt64, count: Int) throws -> [UInt8]
    func write(_ data: [UInt8], at offset: UInt64) throws
    /// Makes the range read as zeros, deallocating where possible.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Deallocates the range; afterwards it reads as zeros (or, for qcow2 v2 with a backing
    /// file, may read the backing data).
    func discard(at offset: UInt64, length: UInt64) throws
    func flush() throws
    /// Allocation status of `[offset, offset+length)` in extents, merging the backing chain.
    func map(at offset: UInt64, length: UInt64) throws -> [Extent]
    /// Bytes the image file occupies on the host.
    func allocatedBytes() throws -> UInt64
    /// Reads `buffer.count` bytes at `offset` straight into `buffer` (a VMM's guest memory).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Writes `buffer` at `offset`.
    func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Reads consecutive bytes at `offset` into `buffers` in order (a guest's scatter list).
    func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws
    /// Writes `buffers` in order as consecutive bytes at `offset`.
    func write(from buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws
}

extension DiskImage {
    /// The generic path, through an intermediate array; formats with a direct path override it.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let bytes = try read(at: offset, count: buffer.count)
        buffer.copyBytes(from: bytes)
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try write(Array(buffer), at: offset)
    }

    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws {
        var at = offset
        for b in buffers {
            try read(into: b, at: at)
            at += UInt64(b.count)
        }
    }

    public func write(from buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws {
        var at = offset
        for b in buffers {
            try write(from: b, at: at)
            at += UInt64(b.count)
        }
    }
}

/// The byte range of a request that falls in one cluster.
struct ClusterPiece {
    let cluster: UInt64
    let offsetInCluster: Int
    let count: Int
    let bufferOffset: Int
}

func pieces(offset: UInt64, count: Int, clusterSize: Int) -> [ClusterPiece] {
    var result: [ClusterPiece] = []
    var done = 0
    while done < count {
        let at = offset + UInt64(done)
        let inCluster = Int(at % UInt64(clusterSize))
        let n = min(clusterSize - inCluster, count - done)
        result.append(ClusterPiece(cluster: at / UInt64(clusterSize), offsetInCluster: inCluster, count: n, bufferOffset: done))
        done += n
    }
    return result
}

func checkRange(_ image: any DiskImage, _ offset: UInt64, _ length: UInt64) throws {
    let (end, overflow) = offset.addingReportingOverflow(length)
    guard !overflow, end <= image.virtualSize else {
        throw DiskError("\(image.path): request of \(length) bytes at \(offset) is past the virtual size \(image.virtualSize)")
    }
}

func mapError(_ what: String, _ error: SystemError) -> DiskError {
    DiskError("\(what): \(error)")
}

/// Opens disk images, probing formats and following backing chains.
public enum DiskOpener {
    /// Deepest backing chain accepted.
    public static let maxChainDepth = 64

    /// Detects the format of the file at `path` from its first bytes.
    public static func probe(_ path: String) throws -> DiskFormat {
        let fd: OwnedFileDescriptor
        do { fd = try OwnedFileDescriptor.openReadOnly(path) } catch { throw DiskError("cannot open \(path): \(error)") }
        let magic = try fd.readZeroFilled(4, at: 0)
        return magic == QCOW2Header.magicBytes ? .qcow2 : .raw
    }

    /// Opens `path` as `format` (probed when nil) with its whole backing chain.
    public static func open(_ path: String, format: DiskFormat? = nil, readOnly: Bool = false) throws -> any DiskImage {
        try open(path, format: format, readOnly: readOnly, chain: [])
    }

    static func open(_ path: String, format: DiskFormat?, readOnly: Bool, chain: [String]) throws -> any DiskImage {
        let canonical: String
        do { canonical = try realPath(path) } catch {
            if chain.isEmpty { throw DiskError("cannot open \(path): \(error)") }
            throw DiskError("backing file \(path) of \(chain.last ?? "") is missing: \(error)")
        }
        guard !chain.contains(canonical) else {
            throw DiskError("backing chain loops: \((chain + [canonical]).joined(separator: " -> "))")
        }
        guard chain.count < maxChainDepth else { throw DiskError("backing chain of \(chain.first ?? path) is deeper than \(maxChainDepth)") }
        let actual = try format ?? probe(canonical)
        switch actual {
        case .raw:
            return try RawImage(path: path, readOnly: readOnly)
        case .qcow2:
            return try QCOW2Image(path: path, readOnly: readOnly) { backingPath, backingFormat in
                try open(backingPath, format: backingFormat, readOnly: true, chain: chain + [canonical])
            }
        }
    }

    /// Resolves a backing file name relative to the directory of the image that names it.
    public static func resolve(backing name: String, of imagePath: String) -> String {
        if name.hasPrefix("/") { return name }
        guard let slash = imagePath.lastIndex(of: "/") else { return name }
        return String(imagePath[...slash]) + name
    }
}
