// VMM (layer 3): the data structures a directly booted kernel reads: the e820 memory map, the
// Linux zero page (struct boot_params), PVH's hvm_start_info, the boot GDT and page tables.

/// One e820 memory-map entry.
public struct E820Entry: Sendable, Equatable {
    public enum Kind: UInt32, Sendable { case ram = 1, reserved = 2, acpi = 3 }
    public let address: UInt64
    public let size: UInt64
    public let kind: Kind
}

/// Little-endian writes into a fixed-size byte buffer.
struct ByteWriter {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        var v = value.littleEndian
        for i in 0..<MemoryLayout<T>.size {
            bytes[offset + i] = UInt8(truncatingIfNeeded: v)
            v >>= 8
        }
    }
    mutating func put(_ data: [UInt8], at offset: Int) {
        bytes.replaceSubrange(offset..<offset + data.count, with: data)
    }
}

public enum BootParams {
    /// The e820 map for guest RAM `ranges`: low RAM up to the EBDA, the ACPI area as reserved,
    /// then RAM from 1 MiB (and above 4 GiB).
    public static func e820(ranges: [(start: UInt64, size: UInt64)]) -> [E820Entry] {
        var map: [E820Entry] = [E820Entry(address: 0, size: Layout.ebdaStart, kind: .ram)]
        map.append(E820Entry(address: Layout.acpiStart, size: Layout.acpiEnd - Layout.acpiStart, kind: .reserved))
        for (start, size) in ranges {
            let from = max(start, Layout.kernelStart)
            let to = start + size
            if to > from { map.append(E820Entry(address: from, size: to - from, kind: .ram)) }
        }
        return map
    }

    // Offsets inside struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
    static let acpiRSDPOffset = 0x070
    static let e820EntriesOffset = 0x1e8
    static let e820TableOffset = 0x2d0
    static let e820TableMax = 128
    static let typeOfLoaderOffset = 0x210
    static let loadFlagsOffset = 0x211
    static let heapEndOffset = 0x224
    static let ramdiskImageOffset = 0x218
    static let ramdiskSizeOffset = 0x21c
    static let cmdLinePointerOffset = 0x228
    static let cmdLineSizeOffset = 0x238
    static let vidModeOffset = 0x1fa

    /// Builds the 4 KiB zero page for a 64-bit Linux entry.
    public static func zeroPage(
        setupHeader: [UInt8], commandLineAddress: UInt64, commandLineSize: Int,
        initrd: (address: UInt64, size: UInt64)?, e820: [E820Entry], rsdp: UInt64
    ) -> [UInt8] {
        var w = ByteWriter(size: 4096)
        if setupHeader.isEmpty {
            // An ELF vmlinux has no setup header: write the fields Linux checks.
            w.put(UInt16(0xAA55), at: 0x1fe)
            w.put(UInt32(0x5372_6448), at: 0x202)  // "HdrS"
            w.put(UInt32(0x0100_0000), at: 0x230)  // kernel_alignment
        } else {
            w.put(Array(setupHeader.prefix(4096 - KernelImage.bzImageSetupHeaderStart)), at: KernelImage.bzImageSetupHeaderStart)
        }
        w.put(UInt16(0xFFFF), at: vidModeOffset)  // "normal" video mode
        w.put(UInt8(0xFF), at: typeOfLoaderOffset)  // undefined boot loader
        w.bytes[loadFlagsOffset] |= 0x80  // CAN_USE_HEAP
        w.put(UInt16(0xFE00), at: heapEndOffset)
        w.put(UInt32(truncatingIfNeeded: commandLineAddress), at: cmdLinePointerOffset)
        w.put(UInt32(commandLineSize), at: cmdLineSizeOffset)
        if let initrd {
            w.put(UInt32(truncatingIfNeeded: initrd.address), at: ramdiskImageOffset)
            w.put(UInt32(truncatingIfNeeded: initrd.size), at: ramdiskSizeOffset)
        }
        w.put(rsdp, at: acpiRSDPOffset)
        let entries = e820.prefix(e820TableMax)
        w.put(UInt8(entries.count), at: e820EntriesOffset)
        for (i, e) in entries.enumerated() {
            let at = e820TableOffset + i * 20
            w.put(e.address, at: at)
            w.put(e.size, at: at + 8)
            w.put(e.kind.rawValue, at: at + 16)
        }
        return w.bytes
    }

    /// XEN_HVM_START_MAGIC_VALUE.
    public static let pvhMagic: UInt32 = 0x336e_c578

    /// Builds hvm_start_info (version 1) and, at the fixed addresses in `Layout`, its module list
    /// (the initrd) and memory map. Returns (address, bytes) blocks to write.
    public static func pvhStartInfo(
        commandLineAddress: UInt64, initrd: (address: UInt64, size: UInt64)?, e820: [E820Entry], rsdp: UInt64
    ) -> [(address: UInt64, bytes: [UInt8])] {
        var info = ByteWriter(size: 56)
        info.put(pvhMagic, at: 0)
        info.put(UInt32(1), at: 4)  // version 1: has the memory map fields
        info.put(UInt32(initrd == nil ? 0 : 1), at: 12)
        info.put(initrd == nil ? UInt64(0) : Layout.pvhModuleList, at: 16)
        info.put(commandLineAddress, at: 24)
        info.put(rsdp, at: 32)
        info.put(Layout.pvhMemoryMap, at: 40)
        let entries = Array(e820.prefix(Int((Layout.zeroPage - Layout.pvhMemoryMap) / 24)))
        info.put(UInt32(entries.count), at: 48)
        var blocks: [(UInt64, [UInt8])] = [(Layout.pvhStartInfo, info.bytes)]
        if let initrd {
            var module = ByteWriter(size: 32)
            module.put(initrd.address, at: 0)
            module.put(initrd.size, at: 8)
            blocks.append((Layout.pvhModuleList, module.bytes))
        }
        var map = ByteWriter(size: entries.count * 24)
        for (i, e) in entries.enumerated() {
            map.put(e.address, at: i * 24)
            map.put(e.size, at: i * 24 + 8)
            map.put(e.kind.rawValue, at: i * 24 + 16)
        }
        blocks.append((Layout.pvhMemoryMap, map.bytes))
        return blocks
    }

    /// Encodes a GDT descriptor from access/flags (`0xF0FF` mask: flags nibble, access byte).
    public static func gdtEntry(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        let b = UInt64(base), l = UInt64(limit), f = UInt64(flags)
        return ((b & 0xff00_0000) << 32) | ((f & 0xf0ff) << 40) | ((l & 0x000f_0000) << 32) | ((b & 0x00ff_ffff) << 16) | (l & 0xffff)
    }

    /// The boot GDT: null, code, data, TSS. 64-bit code for a Linux entry, 32-bit for PVH.
    public static func gdt(longMode: Bool) -> [UInt64] {
        if longMode {
            return [
                0, gdtEntry(flags: 0xa09b, base: 0, limit: 0xfffff), gdtEntry(flags: 0xc093, base: 0, limit: 0xfffff),
                gdtEntry(flags: 0x808b, base: 0, limit: 0xfffff),
            ]
        }
        return [
            0, gdtEntry(flags: 0xc09b, base: 0, limit: 0xffff_ffff), gdtEntry(flags: 0xc093, base: 0, limit: 0xffff_ffff),
            gdtEntry(flags: 0x008b, base: 0, limit: 0x67),
        ]
    }

    /// Identity page tables for the first `Layout.identityMappedGiB` GiB with 2 MiB pages, as
    /// (address, bytes) blocks: PML4, PDPT, then the page directories.
    public static func identityPageTables() -> [(address: UInt64, bytes: [UInt8])] {
        var pml4 = ByteWriter(size: 4096)
        pml4.put(Layout.pdpt | 0x3, at: 0)
        var pdpt = ByteWriter(size: 4096)
        var blocks: [(UInt64, [UInt8])] = [(Layout.pml4, pml4.bytes)]
        for gib in 0..<Layout.identityMappedGiB {
            let directory = Layout.pageDirectories + gib * 4096
            pdpt.put(directory | 0x3, at: Int(gib) * 8)
            var pd = ByteWriter(size: 4096)
            for entry in 0..<UInt64(512) {
                pd.put(((gib * 512 + entry) << 21) | 0x83, at: Int(entry) * 8)  // present, writable, 2 MiB
            }
            blocks.append((directory, pd.bytes))
        }
        blocks.insert((Layout.pdpt, pdpt.bytes), at: 1)
        return blocks
    }
}
