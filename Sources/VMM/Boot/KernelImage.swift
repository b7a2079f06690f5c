// VMM (layer 3): parsing the two kernel formats nimbus-vmm boots directly: a bzImage (Linux
// x86 boot protocol, 64-bit entry) and an ELF vmlinux (PVH entry when it has one, else 64-bit).
/// A kernel image that cannot be booted, and why.
public struct BootError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Random access to a kernel image without holding all of it in memory.
public protocol ImageSource {
    /// Size of the image in bytes.
    var size: Int { get }
    /// Reads `count` bytes at `offset`; fails if the range is not inside the image.
    func read(_ count: Int, at offset: Int) throws(BootError) -> [UInt8]
}

extension Array: ImageSource where Element == UInt8 {
    public var size: Int { count }
    public func read(_ count: Int, at offset: Int) throws(BootError) -> [UInt8] {
        guard offset >= 0, count >= 0, offset <= self.count, count <= self.count - offset else {
            throw BootError("image is truncated: \(count) bytes at offset \(offset) are past its \(self.count) bytes")
        }
        return Array(self[offset..<offset + count])
    }
}

/// Little-endian field access over a window of an image at absolute offsets, with bounds checks.
struct ByteReader {
    let bytes: [UInt8]
    var base = 0

    func u8(_ at: Int) throws(BootError) -> UInt8 {
        guard at >= base, at - base < bytes.count else { throw BootError("image is truncated: offset \(at) is past the data read") }
        return bytes[at - base]
    }
    func u16(_ at: Int) throws(BootError) -> UInt16 { UInt16(try u8(at)) | UInt16(try u8(at + 1)) << 8 }
    func u32(_ at: Int) throws(BootError) -> UInt32 { UInt32(try u16(at)) | UInt32(try u16(at + 2)) << 16 }
    func u64(_ at: Int) throws(BootError) -> UInt64 { UInt64(try u32(at)) | UInt64(try u32(at + 4)) << 32 }
}

/// One piece of the kernel to copy into guest memory.
public struct LoadSegment: Sendable, Equatable {
    public let guestAddress: UInt64
    /// Byte range of the image file to copy.
    public let fileRange: Range<Int>
    /// Total size in guest memory; bytes past the file range are zero.
    public let memorySize: UInt64
}

/// How the vCPU enters the kernel.
public enum KernelEntry: Sendable, Equatable {
    /// 64-bit long mode with identity paging, `rsi` pointing at the zero page.
    case linux64(UInt64)
    /// PVH: 32-bit protected mode without paging, `ebx` pointing at `hvm_start_info`.
    case pvh(UInt64)
}

/// A parsed kernel image ready to be loaded.
public struct KernelImage: Sendable {
    public enum Format: String, Sendable { case bzImage, elf }

    public let format: Format
    public let segments: [LoadSegment]
    public let entry: KernelEntry
    /// For a bzImage, the setup header bytes (0x1f1 up to its end) to copy into the zero page.
    public let setupHeader: [UInt8]
    /// Highest address the initrd may end at (from the header; 2 GiB - 1 by default).
    public let initrdAddressMax: UInt64
    /// First byte past what the kernel needs in memory (its load end, or load + init_size).
    public let memoryEnd: UInt64

    public static let bzImageSetupHeaderStart = 0x1f1

    /// Parses `bytes` as a bzImage or an ELF vmlinux. `preferPVH` picks the PVH entry of an ELF
    /// that has one.
    public static func parse(_ source: some ImageSource, preferPVH: Bool = true) throws(BootError) -> KernelImage {
        let head = try source.read(min(source.size, 0x1000), at: 0)
        if head.count >= 4 && head[0] == 0x7f && head[1] == 0x45 && head[2] == 0x4c && head[3] == 0x46 {
            return try parseELF(source, head: head, preferPVH: preferPVH)
        }
        if head.count >= 0x206, head[0x202] == 0x48, head[0x203] == 0x64, head[0x204] == 0x72, head[0x205] == 0x53 {
            return try parseBzImage(head, size: source.size)
        }
        throw BootError("not a kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" setup header)")
    }

    static func parseBzImage(_ bytes: [UInt8], size: Int) throws(BootError) -> KernelImage {
        let r = ByteReader(bytes: bytes)
        guard try r.u16(0x1fe) == 0xAA55 else { throw BootError("bzImage has no 0xAA55 boot signature") }
        let version = try r.u16(0x206)
        guard version >= 0x020c else {
            throw BootError("bzImage boot protocol \(version >> 8).\(version & 0xff) is too old: 2.12 or newer is needed for a 64-bit entry")
        }
        let loadFlags = try r.u8(0x211)
        guard loadFlags & 0x01 != 0 else { throw BootError("bzImage is not loaded high (LOADED_HIGH is clear)") }
        let xloadFlags = try r.u16(0x236)
        guard xloadFlags & 0x01 != 0 else { throw BootError("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)") }
        var setupSectors = Int(try r.u8(0x1f1))
        if setupSectors == 0 { setupSectors = 4 }
        let setupSize = (setupSectors + 1) * 512
        guard setupSize < size else { throw BootError("bzImage is truncated: no protected-mode kernel after \(setupSize) setup bytes") }
        let headerEnd = 0x202 + Int(try r.u8(0x201))
        guard headerEnd <= bytes.count, headerEnd > 0x202 else { throw BootError("bzImage setup header length is invalid") }
        let initSize = UInt64(try r.u32(0x260))
        let payload = size - setupSize
        let maxInitrd = UInt64(try r.u32(0x22c))
        return KernelImage(
            format: .bzImage,
            segments: [LoadSegment(guestAddress: Layout.kernelStart, fileRange: setupSize..<size, memorySize: UInt64(payload))],
            entry: .linux64(Layout.kernelStart + 0x200),
            setupHeader: Array(bytes[bzImageSetupHeaderStart..<headerEnd]),
            initrdAddressMax: maxInitrd == 0 ? 0x37ff_ffff : maxInitrd,
            memoryEnd: Layout.kernelStart + max(UInt64(payload), initSize))
    }

    static func parseELF(_ source: some ImageSource, head: [UInt8], preferPVH: Bool) throws(BootError) -> KernelImage {
        let r = ByteReader(bytes: head)
        let fileSize = source.size
        guard try r.u8(4) == 2 else { throw BootError("ELF kernel is not 64-bit") }
        guard try r.u8(5) == 1 else { throw BootError("ELF kernel is not little endian") }
        guard try r.u16(18) == 62 else { throw BootError("ELF kernel is not for x86-64 (e_machine \(try r.u16(18)))") }
        let type = try r.u16(16)
        guard type == 2 else { throw BootError("ELF kernel is not an executable (e_type \(type))") }
        let phoff = try r.u64(32)
        let phentsize = Int(try r.u16(54))
        let phnum = Int(try r.u16(56))
        guard phentsize >= 56, phnum > 0, phnum <= 64 else { throw BootError("ELF kernel has invalid program headers (\(phnum) of \(phentsize) bytes)") }
        guard phoff < UInt64(fileSize), Int(phoff) + phnum * phentsize <= fileSize else {
            throw BootError("ELF program headers lie past the end of the file")
        }
        let ph = ByteReader(bytes: try source.read(phnum * phentsize, at: Int(phoff)), base: Int(phoff))
        var segments: [LoadSegment] = []
        var pvhEntry: UInt64?
        var end: UInt64 = 0
        for i in 0..<phnum {
            let h = Int(phoff) + i * phentsize
            let ptype = try ph.u32(h)
            let offset = try ph.u64(h + 8)
            let paddr = try ph.u64(h + 24)
            let filesz = try ph.u64(h + 32)
            let memsz = try ph.u64(h + 40)
            guard offset <= UInt64(fileSize), filesz <= UInt64(fileSize) - offset else {
                throw BootError("ELF segment \(i) (offset \(offset), \(filesz) bytes) lies past the end of the file")
            }
            switch ptype {
            case 1:  // PT_LOAD
                guard memsz >= filesz else { throw BootError("ELF segment \(i) is smaller in memory than in the file") }
                guard paddr >= Layout.kernelStart, paddr.addingReportingOverflow(memsz).overflow == false else {
                    throw BootError("ELF segment \(i) at 0x\(String(paddr, radix: 16)) is below 1 MiB or wraps")
                }
                segments.append(LoadSegment(guestAddress: paddr, fileRange: Int(offset)..<Int(offset + filesz), memorySize: memsz))
                end = max(end, paddr + memsz)
            case 4 where filesz <= 1 << 20:  // PT_NOTE (a larger one is not a kernel's)
                let notes = ByteReader(bytes: try source.read(Int(filesz), at: Int(offset)), base: Int(offset))
                if let entry = try findPVHNote(notes, offset: Int(offset), size: Int(filesz)) { pvhEntry = entry }
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw BootError("ELF kernel has no loadable segment") }
        let entry: KernelEntry
        if preferPVH, let pvhEntry {
            entry = .pvh(pvhEntry)
        } else {
            var e = try r.u64(24)
            // vmlinux's e_entry is physical; accept a virtual one in the kernel map too.
            if e >= 0xffff_ffff_8000_0000 { e -= 0xffff_ffff_8000_0000 }
            entry = .linux64(e)
        }
        return KernelImage(format: .elf, segments: segments, entry: entry, setupHeader: [], initrdAddressMax: 0x37ff_ffff, memoryEnd: end)
    }

    /// Looks for XEN_ELFNOTE_PHYS32_ENTRY (type 18, owner "Xen") in a note segment.
    static func findPVHNote(_ r: ByteReader, offset: Int, size: Int) throws(BootError) -> UInt64? {
        var at = offset
        let end = offset + size
        while at + 12 <= end {
            let namesz = Int(try r.u32(at))
            let descsz = Int(try r.u32(at + 4))
            let type = try r.u32(at + 8)
            let nameStart = at + 12
            let descStart = nameStart + ((namesz + 3) & ~3)
            let next = descStart + ((descsz + 3) & ~3)
            guard namesz <= size, descsz <= size, next <= end, next > at else { return nil }
            if type == 18, namesz == 4, try r.u8(nameStart) == 0x58, try r.u8(nameStart + 1) == 0x65, try r.u8(nameStart + 2) == 0x6e {
                if descsz >= 8 { return try r.u64(descStart) }
                if descsz >= 4 { return UInt64(try r.u32(descStart)) }
            }
            at = next
        }
        return nil
    }
}
