// GuestMemory (layer 2): the guest's physical RAM, with every access bounds-checked.
//
// All guest RAM is one anonymous host mapping; `regions` place slices of it at guest-physical
// addresses (below and above the MMIO hole). Nothing above this layer sees a host pointer.
import LinuxSystem

/// An access to guest memory that fell outside guest RAM.
public enum GuestMemoryError: Error, CustomStringConvertible, Sendable, Equatable {
    case outOfBounds(address: UInt64, length: UInt64)
    case invalidLayout(String)

    public var description: String {
        switch self {
        case .outOfBounds(let address, let length):
            return "guest memory access of \(length) bytes at 0x\(String(address, radix: 16)) is outside guest RAM"
        case .invalidLayout(let why):
            return "invalid guest memory layout: \(why)"
        }
    }
}

/// One contiguous range of guest-physical RAM.
public struct GuestRegion: Sendable, Equatable {
    /// Guest-physical start address.
    public let guestAddress: UInt64
    /// Size in bytes.
    public let size: UInt64
    /// Offset of this region inside the host mapping.
    public let hostOffset: UInt64

    public var end: UInt64 { guestAddress + size }
}

/// Guest-physical memory backed by one host mapping.
public final class GuestMemory: Sendable {
    public let regions: [GuestRegion]
    @usableFromInline let mapping: MappedRegion

    /// Creates zeroed guest memory made of `ranges` (guest-physical start, size), which must be
    /// page aligned, non-empty, sorted and non-overlapping.
    public init(ranges: [(start: UInt64, size: UInt64)]) throws {
        var regions: [GuestRegion] = []
        var offset: UInt64 = 0
        var previousEnd: UInt64 = 0
        for (start, size) in ranges {
            guard size > 0, start % 4096 == 0, size % 4096 == 0 else {
                throw GuestMemoryError.invalidLayout("region at 0x\(String(start, radix: 16)) of \(size) bytes is not page aligned")
            }
            guard start >= previousEnd, start.addingReportingOverflow(size).overflow == false else {
                throw GuestMemoryError.invalidLayout("region at 0x\(String(start, radix: 16)) overlaps or wraps")
            }
            regions.append(GuestRegion(guestAddress: start, size: size, hostOffset: offset))
            offset += size
            previousEnd = start + size
        }
        guard offset > 0 else { throw GuestMemoryError.invalidLayout("no memory") }
        guard offset <= UInt64(Int.max) else { throw GuestMemoryError.invalidLayout("too large") }
        self.mapping = try MappedRegion(anonymousSize: Int(offset))
        self.regions = regions
    }

    /// Total bytes of guest RAM.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// The host virtual address of `region`'s first byte, for registering it with KVM.
    public func hostAddress(of region: GuestRegion) -> UInt64 {
        mapping.address + region.hostOffset
    }

    /// Returns the host offset for `[address, address+length)` if it lies wholly inside one region.
    /// (Inlinable, like the accessors below, so that virtio's per-descriptor loads compile to a
    /// few instructions instead of unspecialized generic calls across the module boundary.)
    @inlinable
    public func hostOffset(for address: UInt64, length: UInt64) throws(GuestMemoryError) -> Int {
        for region in regions where address >= region.guestAddress && address < region.end {
            let (end, overflow) = address.addingReportingOverflow(length)
            guard !overflow, end <= region.end else { break }
            return Int(region.hostOffset + (address - region.guestAddress))
        }
        throw .outOfBounds(address: address, length: length)
    }

    /// Whether `[address, address+length)` is guest RAM.
    @inlinable
    public func contains(_ address: UInt64, length: UInt64) -> Bool {
        (try? hostOffset(for: address, length: length)) != nil
    }

    /// Copies `count` bytes out of guest memory.
    public func read(_ count: Int, at address: UInt64) throws(GuestMemoryError) -> [UInt8] {
        guard count >= 0 else { throw .outOfBounds(address: address, length: 0) }
        let offset = try hostOffset(for: address, length: UInt64(count))
        return [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            // SAFETY: [offset, offset+count) was checked to lie inside the mapping above.
            if let dst = buffer.baseAddress, count > 0 {
                dst.update(from: mapping.base.advanced(by: offset).assumingMemoryBound(to: UInt8.self), count: count)
            }
            initialized = count
        }
    }

    /// Copies `bytes` into guest memory at `address`.
    public func write(_ bytes: [UInt8], at address: UInt64) throws(GuestMemoryError) {
        try write(bytes[...], at: address)
    }

    /// Copies a slice of bytes into guest memory at `address`.
    public func write(_ bytes: ArraySlice<UInt8>, at address: UInt64) throws(GuestMemoryError) {
        let offset = try hostOffset(for: address, length: UInt64(bytes.count))
        bytes.withUnsafeBytes { source in
            // SAFETY: the destination range was checked above; the source is the array's buffer.
            if let src = source.baseAddress, !source.isEmpty {
                mapping.base.advanced(by: offset).copyMemory(from: src, byteCount: source.count)
            }
        }
    }

    /// Sets `count` bytes at `address` to zero.
    public func zero(_ count: Int, at address: UInt64) throws(GuestMemoryError) {
        let offset = try hostOffset(for: address, length: UInt64(count))
        // SAFETY: the range was checked above.
        mapping.base.advanced(by: offset).initializeMemory(as: UInt8.self, repeating: 0, count: count)
    }

    /// Reads a little-endian integer.
    @inlinable
    public func load<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: UInt64) throws(GuestMemoryError) -> T {
        let size = MemoryLayout<T>.size
        let offset = try hostOffset(for: address, length: UInt64(size))
        // SAFETY: the range was checked above; loadUnaligned has no alignment requirement.
        return T(littleEndian: mapping.base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    /// Writes a little-endian integer.
    @inlinable
    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(GuestMemoryError) {
        let size = MemoryLayout<T>.size
        let offset = try hostOffset(for: address, length: UInt64(size))
        // SAFETY: the range was checked above; storeBytes(toByteOffset:) allows unaligned stores.
        mapping.base.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
    }

    /// Calls `body` with a host buffer for `[address, address+length)`, for bulk file I/O.
    /// The buffer must not escape `body`.
    public func withHostBuffer<R>(
        at address: UInt64, length: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R
    ) throws -> R {
        let offset = try hostOffset(for: address, length: UInt64(length))
        // SAFETY: the range was checked above and the mapping outlives the call.
        return try body(UnsafeMutableRawBufferPointer(start: mapping.base.advanced(by: offset), count: length))
    }

    /// Calls `body` with host buffers for each guest range (each checked), for vectored I/O.
    /// The buffers must not escape `body`.
    public func withHostBuffers<R>(
        _ ranges: [(address: UInt64, length: Int)], _ body: ([UnsafeMutableRawBufferPointer]) throws -> R
    ) throws -> R {
        var buffers: [UnsafeMutableRawBufferPointer] = []
        buffers.reserveCapacity(ranges.count)
        for range in ranges {
            let offset = try hostOffset(for: range.address, length: UInt64(range.length))
            // SAFETY: the range was checked above and the mapping outlives the call.
            buffers.append(UnsafeMutableRawBufferPointer(start: mapping.base.advanced(by: offset), count: range.length))
        }
        return try body(buffers)
    }
}
