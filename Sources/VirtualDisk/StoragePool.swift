// VirtualDisk (layer 2): a directory storage pool: named volumes (one image file each), linked
// clones as qcow2 overlays on a base volume, capacity and allocation accounting, and refusal to
// delete a volume that another one uses as its backing file. The control plane manages pools
// through this type.
import LinuxSystem

/// One volume of a pool.
public struct Volume: Sendable, Equatable {
    public let name: String
    public let path: String
    public let format: DiskFormat
    public let capacity: UInt64
    public let allocation: UInt64
    /// The pool volume this one is a linked clone of, if any.
    public let backingVolume: String?
}

public final class StoragePool: Sendable {
    public let directory: String

    /// Opens (creating if needed) the pool in `directory`.
    public init(directory: String) throws {
        do { try makeDirectories(directory) } catch { throw DiskError("cannot create pool directory \(directory): \(error)") }
        self.directory = directory.hasSuffix("/") ? String(directory.dropLast()) : directory
    }

    static func validate(_ name: String) throws {
        guard !name.isEmpty, name.count <= 128, !name.hasPrefix("."),
            name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) })
        else { throw DiskError("volume name \"\(name)\" must be 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'") }
    }

    func fileName(_ name: String, _ format: DiskFormat) -> String { "\(name).\(format.rawValue)" }

    func existing(_ name: String) -> (path: String, format: DiskFormat)? {
        for format in DiskFormat.allCases {
            let path = "\(directory)/\(fileName(name, format))"
            if (try? fileSize(path)) != nil { return (path, format) }
        }
        return nil
    }

    /// Creates an empty volume.
    @discardableResult
    public func create(_ name: String, size: UInt64, format: DiskFormat = .qcow2) throws -> Volume {
        try Self.validate(name)
        guard existing(name) == nil else { throw DiskError("pool \(directory) already has a volume named \"\(name)\"") }
        let path = "\(directory)/\(fileName(name, format))"
        switch format {
        case .raw: try RawImage.create(path: path, size: size)
        case .qcow2: try QCOW2Image.create(path: path, size: size)
        }
        return try volume(name)
    }

    /// Creates `name` as a linked clone of `base`: a qcow2 overlay whose backing file is the base.
    @discardableResult
    public func clone(_ name: String, from base: String) throws -> Volume {
        try Self.validate(name)
        guard existing(name) == nil else { throw DiskError("pool \(directory) already has a volume named \"\(name)\"") }
        guard let source = existing(base) else { throw DiskError("pool \(directory) has no volume named \"\(base)\"") }
        let baseImage = try DiskOpener.open(source.path, format: source.format, readOnly: true)
        var options = QCOW2Image.CreateOptions()
        options.backingFile = fileName(base, source.format)
        options.backingFormat = source.format
        try QCOW2Image.create(path: "\(directory)/\(fileName(name, .qcow2))", size: baseImage.virtualSize, options: options)
        return try volume(name)
    }

    /// Describes one volume.
    public func volume(_ name: String) throws -> Volume {
        guard let found = existing(name) else { throw DiskError("pool \(directory) has no volume named \"\(name)\"") }
        let image = try DiskOpener.open(found.path, format: found.format, readOnly: true)
        var backingVolume: String?
        if let q = image as? QCOW2Image, let b = q.currentHeader.backingFile, !b.contains("/") {
            backingVolume = b.split(separator: ".").dropLast().joined(separator: ".")
        }
        return Volume(
            name: name, path: found.path, format: found.format, capacity: image.virtualSize,
            allocation: try image.allocatedBytes(), backingVolume: backingVolume)
    }

    /// Every volume, by name.
    public func list() throws -> [Volume] {
        let names: [String]
        do { names = try directoryEntries(directory) } catch { throw DiskError("cannot list pool \(directory): \(error)") }
        let volumeNames = names.compactMap { file -> String? in
            for format in DiskFormat.allCases where file.hasSuffix(".\(format.rawValue)") { return String(file.dropLast(format.rawValue.count + 1)) }
            return nil
        }
        return try volumeNames.sorted().map(volume)
    }

    /// Deletes a volume unless another volume is a linked clone of it.
    public func delete(_ name: String) throws {
        guard let found = existing(name) else { throw DiskError("pool \(directory) has no volume named \"\(name)\"") }
        let dependents = try list().filter { $0.backingVolume == name }.map(\.name)
        guard dependents.isEmpty else {
            throw DiskError("volume \"\(name)\" is the backing file of \(dependents.joined(separator: ", ")); delete those first")
        }
        removeFile(found.path)
    }

    /// Space of the pool's file system and what its volumes promise and use.
    public func capacity() throws -> (total: UInt64, available: UInt64, allocated: UInt64, provisioned: UInt64) {
        let space: FileSystemSpace
        do { space = try fileSystemSpace(directory) } catch { throw DiskError("cannot stat pool \(directory): \(error)") }
        let volumes = try list()
        return (space.totalBytes, space.availableBytes, volumes.reduce(0) { $0 + $1.allocation }, volumes.reduce(0) { $0 + $1.capacity })
    }
}
