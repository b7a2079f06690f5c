// VMM (layer 3): kernel and initrd files read straight into guest memory, never copied whole
// into the monitor's own heap (a 60 MiB vmlinux would otherwise count as monitor memory).
import GuestMemory
import LinuxSystem

/// An image file opened for loading.
public struct ImageFile: ImageSource {
    let descriptor: OwnedFileDescriptor
    public let path: String
    public let size: Int

    /// Opens `path`; `what` names the file in errors ("kernel image", "initrd").
    public init(path: String, what: String) throws(BootError) {
        do {
            descriptor = try OwnedFileDescriptor.openReadOnly(path)
            size = try descriptor.size()
        } catch {
            throw BootError("cannot read \(what) \(path): \(error)")
        }
        self.path = path
    }

    public func read(_ count: Int, at offset: Int) throws(BootError) -> [UInt8] {
        guard offset >= 0, count >= 0, offset <= size, count <= size - offset else {
            throw BootError("\(path) is truncated: \(count) bytes at offset \(offset) are past its \(size) bytes")
        }
        do { return try descriptor.read(count, at: offset) } catch { throw BootError("reading \(path): \(error)") }
    }

    /// Copies `range` of the file to guest-physical `address`.
    public func load(_ range: Range<Int>, into memory: GuestMemory, at address: UInt64) throws {
        guard range.lowerBound >= 0, range.upperBound <= size else { throw BootError("\(path): range \(range) is past its \(size) bytes") }
        try memory.withHostBuffer(at: address, length: range.count) { buffer in
            try descriptor.readFully(into: buffer, at: range.lowerBound)
        }
    }
}
