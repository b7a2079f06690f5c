import Testing

@testable import VMM

/// A synthetic bzImage: setup header fields a real one has, and a small payload.
func makeBzImage(
    version: UInt16 = 0x020F, xloadflags: UInt16 = 1, loadflags: UInt8 = 1, setupSectors: UInt8 = 4, payload: Int = 4096, initSize: UInt32 = 0x200000
) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: (Int(setupSectors) + 1) * 512 + payload)
    func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
        var x = v.littleEndian
        for i in 0..<MemoryLayout<T>.size { b[at + i] = UInt8(truncatingIfNeeded: x); x >>= 8 }
    }
    b[0x1f1] = setupSectors
    put(UInt16(0xAA55), 0x1fe)
    b[0x200] = 0xEB
    b[0x201] = 0x6A  // header ends at 0x26C
    b.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
    put(version, 0x206)
    b[0x211] = loadflags
    put(UInt32(0x7fff_ffff), 0x22c)
    put(xloadflags, 0x236)
    put(initSize, 0x260)
    for i in 0..<payload { b[(Int(setupSectors) + 1) * 512 + i] = UInt8(truncatingIfNeeded: i) }
    return b
}

/// A synthetic ELF vmlinux with one PT_LOAD and optionally a Xen PVH note.
func makeVmlinux(pvhEntry: UInt32? = 0x100_0123, entry: UInt64 = 0x100_0000) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: 0x2000)
    func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
        var x = v.littleEndian
        for i in 0..<MemoryLayout<T>.size { b[at + i] = UInt8(truncatingIfNeeded: x); x >>= 8 }
    }
    b.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
    b[4] = 2; b[5] = 1
    put(UInt16(2), 16); put(UInt16(62), 18); put(entry, 24); put(UInt64(64), 32)
    put(UInt16(56), 54); put(UInt16(pvhEntry == nil ? 1 : 2), 56)
    put(UInt32(1), 64); put(UInt64(0x1000), 72); put(UInt64(0x100_0000), 88); put(UInt64(0x800), 96); put(UInt64(0x1000), 104)
    if let pvhEntry {
        let ph = 64 + 56
        put(UInt32(4), ph); put(UInt64(0x400), ph + 8); put(UInt64(20), ph + 32)
        put(UInt32(4), 0x400); put(UInt32(4), 0x404); put(UInt32(18), 0x408)
        b.replaceSubrange(0x40C..<0x410, with: Array("Xen\0".utf8))
        put(pvhEntry, 0x410)
    }
    return b
}

@Suite struct KernelImageTests {
    @Test func bzImageLoadsItsProtectedModePartAtOneMiB() throws {
        let image = makeBzImage()
        let k = try KernelImage.parse(image)
        #expect(k.format == .bzImage)
        #expect(k.entry == .linux64(0x100200))
        #expect(k.segments == [LoadSegment(guestAddress: 0x100000, fileRange: 2560..<image.count, memorySize: 4096)])
        #expect(k.setupHeader.count == 0x26C - 0x1f1)
        #expect(k.memoryEnd == 0x100000 + 0x200000)  // init_size dominates
    }

    @Test func zeroSetupSectorsMeansFour() throws {
        var image = makeBzImage(setupSectors: 4)
        image[0x1f1] = 0
        #expect(try KernelImage.parse(image).segments[0].fileRange.lowerBound == 2560)
    }

    @Test(arguments: [
        (makeBzImage(version: 0x0209), "too old"),
        (makeBzImage(xloadflags: 0), "64-bit entry"),
        (makeBzImage(loadflags: 0), "LOADED_HIGH"),
        (Array(makeBzImage().prefix(0x210)), "truncated"),
        ([UInt8](repeating: 0, count: 100), "not a kernel"),
    ])
    func badBzImagesAreRefused(image: [UInt8], reason: String) {
        #expect {
            _ = try KernelImage.parse(image)
        } throws: { error in
            "\(error)".contains(reason)
        }
    }

    @Test func vmlinuxPrefersThePVHEntry() throws {
        let k = try KernelImage.parse(makeVmlinux())
        #expect(k.format == .elf)
        #expect(k.entry == .pvh(0x100_0123))
        #expect(k.segments == [LoadSegment(guestAddress: 0x100_0000, fileRange: 0x1000..<0x1800, memorySize: 0x1000)])
        #expect(try KernelImage.parse(makeVmlinux(), preferPVH: false).entry == .linux64(0x100_0000))
    }

    @Test func vmlinuxWithoutNoteUses64BitEntryAndVirtualEntriesArePhysicalized() throws {
        #expect(try KernelImage.parse(makeVmlinux(pvhEntry: nil)).entry == .linux64(0x100_0000))
        #expect(try KernelImage.parse(makeVmlinux(pvhEntry: nil, entry: 0xffff_ffff_8100_0000)).entry == .linux64(0x100_0000))
    }

    @Test func elfWithSegmentsPastTheFileIsRefused() {
        var bad = makeVmlinux(pvhEntry: nil)
        bad[96] = 0xFF; bad[97] = 0xFF; bad[98] = 0xFF  // p_filesz huge
        #expect(throws: BootError.self) { try KernelImage.parse(bad) }
        var low = makeVmlinux(pvhEntry: nil)
        low[88 + 3] = 0  // paddr below 1 MiB
        #expect(throws: BootError.self) { try KernelImage.parse(low) }
    }
}

@Suite struct BootParamsTests {
    @Test func e820SmallMemory() {
        let map = BootParams.e820(ranges: Layout.ramRanges(bytes: 256 << 20))
        #expect(
            map == [
                E820Entry(address: 0, size: 0x9fc00, kind: .ram),
                E820Entry(address: 0xe0000, size: 0x20000, kind: .reserved),
                E820Entry(address: 0x100000, size: (256 << 20) - 0x100000, kind: .ram),
            ])
    }

    @Test func e820SplitsAroundTheMMIOHole() {
        let map = BootParams.e820(ranges: Layout.ramRanges(bytes: 4 << 30))
        #expect(map.count == 4)
        #expect(map[2] == E820Entry(address: 0x100000, size: 0xc000_0000 - 0x100000, kind: .ram))
        #expect(map[3] == E820Entry(address: 0x1_0000_0000, size: (4 << 30) - 0xc000_0000, kind: .ram))
    }

    @Test func zeroPageFields() {
        let header = Array(makeBzImage()[0x1f1..<0x26C])
        let e820 = BootParams.e820(ranges: Layout.ramRanges(bytes: 128 << 20))
        let p = BootParams.zeroPage(
            setupHeader: header, commandLineAddress: 0x20000, commandLineSize: 12,
            initrd: (0x7000000, 0x123456), e820: e820, rsdp: 0xe0000)
        func u32(_ at: Int) -> UInt32 { UInt32(p[at]) | UInt32(p[at + 1]) << 8 | UInt32(p[at + 2]) << 16 | UInt32(p[at + 3]) << 24 }
        #expect(p.count == 4096)
        #expect(Array(p[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(p[0x210] == 0xFF)
        #expect(p[0x211] & 0x81 == 0x81)
        #expect(u32(0x228) == 0x20000)
        #expect(u32(0x218) == 0x7000000)
        #expect(u32(0x21c) == 0x123456)
        #expect(u32(0x70) == 0xe0000)
        #expect(p[0x1e8] == 3)
        #expect(u32(0x2d0 + 20 * 2 + 16) == 1)
    }

    @Test func pvhStartInfo() {
        let e820 = BootParams.e820(ranges: Layout.ramRanges(bytes: 128 << 20))
        let blocks = BootParams.pvhStartInfo(commandLineAddress: 0x20000, initrd: (0x7000000, 4096), e820: e820, rsdp: 0xe0000)
        let info = blocks[0].bytes
        #expect(blocks[0].address == Layout.pvhStartInfo)
        #expect(Array(info[0..<4]) == [0x78, 0xc5, 0x6e, 0x33])
        #expect(info[12] == 1)  // one module
        #expect(info[48] == 3)  // memmap entries
        #expect(blocks[1].address == Layout.pvhModuleList)
        #expect(blocks[2].bytes.count == 3 * 24)
    }

    @Test func gdtEntriesMatchTheKnownDescriptors() {
        #expect(BootParams.gdt(longMode: true)[1] == 0x00af_9b00_0000_ffff)
        #expect(BootParams.gdt(longMode: true)[2] == 0x00cf_9300_0000_ffff)
        #expect(BootParams.gdt(longMode: false)[1] == 0x00cf_9b00_0000_ffff)
        #expect(BootParams.gdt(longMode: false)[3] == 0x0000_8b00_0000_0067)
    }

    @Test func identityPageTablesMapFourGiB() {
        let blocks = BootParams.identityPageTables()
        #expect(blocks.count == 2 + 4)
        #expect(blocks[0].address == Layout.pml4)
        #expect(blocks[0].bytes.prefix(8) == [0x03, 0xa0, 0, 0, 0, 0, 0, 0][...])
        let lastPD = blocks[5].bytes
        let lastEntry = lastPD[4088..<4096].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        #expect(lastEntry == (0xffe0_0000 | 0x83))
    }
}
