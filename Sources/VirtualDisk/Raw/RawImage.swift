// VirtualDisk (layer 2): a raw image: the virtual disk byte for byte; holes read as zeros.
import LinuxSystem

public final class RawImage: DiskImage {
    public let format = DiskFormat.raw
    public let path: String
    public let isReadOnly: Bool
    public var backing: (any DiskImage)? { nil }
    let file: OwnedFileDescriptor
    public let virtualSize: UInt64

    public init(path: String, readOnly: Bool = false) throws {
        self.path = path
        self.isReadOnly = readOnly
        do {
            file = readOnly ? try OwnedFileDescriptor.openReadOnly(path) : try OwnedFileDescriptor.openReadWrite(path)
            virtualSize = UInt64(try file.size())
        } catch {
            throw DiskError("cannot open raw image \(path): \(error)")
        }
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes.
    public static func create(path: String, size: UInt64) throws {
        do {
            let fd = try OwnedFileDescriptor.openReadWrite(path, create: true)
            try fd.truncate(to: Int(size))
        } catch {
            throw DiskError("cannot create raw image \(path): \(error)")
        }
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        try checkRange(self, offset, UInt64(count))
        do { return try file.readZeroFilled(count, at: Int(offset)) } catch { throw mapError("reading \(path)", error) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(self, offset, UInt64(buffer.count))
        do { try file.readFully(into: buffer, at: Int(offset)) } catch { throw mapError("reading \(path)", error) }
    }

    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, UInt64(buffer.count))
        do { try file.writeFully(buffer, at: Int(offset)) } catch { throw mapError("writing \(path)", error) }
    }

    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws {
        try checkRange(self, offset, UInt64(buffers.reduce(0) { $0 + $1.count }))
        do { try file.readFully(into: buffers, at: Int(offset)) } catch { throw mapError("reading \(path)", error) }
    }

    public func write(from buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, UInt64(buffers.reduce(0) { $0 + $1.count }))
        do { try file.writeFully(buffers, at: Int(offset)) } catch { throw mapError("writing \(path)", error) }
    }

    public func write(_ data: [UInt8], at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, UInt64(data.count))
        do { try file.write(data, at: Int(offset)) } catch { throw mapError("writing \(path)", error) }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        try checkRange(self, offset, length)
        if !file.punchHole(at: Int(offset), length: Int(length)) {
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(length - done, 1 << 20))
                try write([UInt8](repeating: 0, count: n), at: offset + done)
                done += UInt64(n)
            }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length)
    }

    public func flush() throws {
        guard !isReadOnly else { return }
        do { try file.sync() } catch { throw mapError("flushing \(path)", error) }
    }

    public func map(at offset: UInt64, length: UInt64) throws -> [Extent] {
        try checkRange(self, offset, length)
        let end = offset + length
        guard let ranges = file.dataRanges(from: Int(offset), to: Int(end)) else {
            return [Extent(start: offset, length: length, depth: 0, present: true, zero: false, data: true, offset: offset)]
        }
        // Holes read as zeros; data ranges as data, as `qemu-img map` reports a raw file.
        var extents: [Extent] = []
        var at = offset
        for r in ranges {
            if UInt64(r.lowerBound) > at {
                extents.append(Extent(start: at, length: UInt64(r.lowerBound) - at, depth: 0, present: true, zero: true, data: false, offset: at))
            }
            extents.append(
                Extent(start: UInt64(r.lowerBound), length: UInt64(r.count), depth: 0, present: true, zero: false, data: true, offset: UInt64(r.lowerBound)))
            at = UInt64(r.upperBound)
        }
        if at < end { extents.append(Extent(start: at, length: end - at, depth: 0, present: true, zero: true, data: false, offset: at)) }
        return extents
    }

    public func allocatedBytes() throws -> UInt64 {
        do { return try file.allocatedBytes() } catch { throw mapError("stat \(path)", error) }
    }

    public func resize(to size: UInt64) throws {
        guard !isReadOnly else { throw DiskError("\(path) is open read-only") }
        do { try file.truncate(to: Int(size)) } catch { throw mapError("resizing \(path)", error) }
    }
}
