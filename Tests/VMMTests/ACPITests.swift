import Testing

@testable import VMM

@Suite struct AMLTests {
    @Test func packageLengthEncodings() {
        #expect(AML.packageLength(0) == [0x01])
        #expect(AML.packageLength(0x3E) == [0x3F])
        // 0x3F content bytes need two length bytes: total 0x41.
        #expect(AML.packageLength(0x3F) == [0x41, 0x04])
        #expect(AML.packageLength(0xFFD) == [0x4F, 0xFF])
        let big = AML.packageLength(0x1000)
        #expect(big.count == 3)
        #expect(Int(big[0] & 0x0F) | Int(big[1]) << 4 | Int(big[2]) << 12 == 0x1003)
    }

    @Test func nameStrings() {
        #expect(AML.nameString("_HID") == Array("_HID".utf8))
        #expect(AML.nameString("\\_SB_") == [0x5C] + Array("_SB_".utf8))
        #expect(AML.nameString("\\_SB_.COM1") == [0x5C, 0x2E] + Array("_SB_COM1".utf8))
        #expect(AML.nameString("AB") == Array("AB__".utf8))
        #expect(AML.nameString("\\A.B.C") == [0x5C, 0x2F, 3] + Array("A___B___C___".utf8))
    }

    @Test func integersUseTheSmallestEncoding() {
        #expect(AML.integer(0).bytes == [0x00])
        #expect(AML.integer(1).bytes == [0x01])
        #expect(AML.integer(5).bytes == [0x0A, 5])
        #expect(AML.integer(0x1234).bytes == [0x0B, 0x34, 0x12])
        #expect(AML.integer(0xD000_0000).bytes == [0x0C, 0, 0, 0, 0xD0])
        #expect(AML.integer(0x1_0000_0000).bytes == [0x0E, 0, 0, 0, 0, 1, 0, 0, 0])
    }

    @Test func eisaIDMatchesTheACPICompiler() {
        // iasl compiles EISAID("PNP0501") to 0x0105D041 and EISAID("PNP0303") to 0x0303D041.
        #expect(AML.eisaID("PNP0501").bytes == [0x0C, 0x41, 0xD0, 0x05, 0x01])
        #expect(AML.eisaID("PNP0303").bytes == [0x0C, 0x41, 0xD0, 0x03, 0x03])
    }

    @Test func stringAndPackage() {
        #expect(AML.string("LNRO0005").bytes == [0x0D] + Array("LNRO0005".utf8) + [0])
        #expect(AML.package([AML.integer(5), AML.integer(0)]).bytes == [0x12, 0x05, 0x02, 0x0A, 0x05, 0x00])
    }

    @Test func resourceTemplateForAVirtioSlot() {
        let t = AML.resourceTemplate([AML.memory32Fixed(base: 0xD000_0000, length: 0x1000), AML.extendedInterrupt(5)])
        // Buffer op, length, size 12+9+2 = 23 bytes as a byte integer.
        #expect(t.bytes[0] == 0x11)
        #expect(Array(t.bytes[2...3]) == [0x0A, 23])
        #expect(Array(t.bytes[4...7]) == [0x86, 0x09, 0x00, 0x01])
        #expect(Array(t.bytes.suffix(2)) == [0x79, 0x00])
        #expect(Array(t.bytes[16...24]) == [0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0])
    }
}

@Suite struct ACPITableTests {
    let layout = ACPITables.build(vcpuCount: 3, devices: [VirtioMMIODescription(base: 0xD000_0000, gsi: 5)])

    func block(_ signature: String) -> [UInt8]? {
        layout.blocks.first { Array($0.bytes.prefix(4)) == Array(signature.utf8.prefix(4)) }?.bytes
    }

    @Test func everyTableChecksumsToZero() throws {
        for name in ["DSDT", "FACP", "APIC", "XSDT"] {
            let t = try #require(block(name), "\(name) missing")
            #expect(ACPITables.checksum(t) == 0, "\(name) checksum")
            let length = Int(t[4]) | Int(t[5]) << 8 | Int(t[6]) << 16 | Int(t[7]) << 24
            #expect(length == t.count, "\(name) length field")
        }
    }

    @Test func rsdpHasBothChecksumsAndPointsAtTheXSDT() throws {
        let r = try #require(block("RSD "))
        #expect(r.count == 36)
        #expect(ACPITables.checksum(Array(r[0..<20])) == 0)
        #expect(ACPITables.checksum(r) == 0)
        #expect(r[15] == 2)
        let xsdt = r[24..<32].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        let xsdtBlock = try #require(layout.blocks.first { $0.address == xsdt })
        #expect(Array(xsdtBlock.bytes.prefix(4)) == Array("XSDT".utf8))
        #expect(layout.rsdp == Layout.acpiStart)
    }

    @Test func tablesFitTheReservedArea() {
        for b in layout.blocks {
            #expect(b.address >= Layout.acpiStart)
            #expect(b.address + UInt64(b.bytes.count) <= Layout.acpiEnd)
        }
    }

    @Test func fadtIsHardwareReducedAndNamesThePowerPort() throws {
        let f = try #require(block("FACP"))
        #expect(f.count == 276)
        #expect(f[8] == 6)
        let flags = UInt32(f[112]) | UInt32(f[113]) << 8 | UInt32(f[114]) << 16 | UInt32(f[115]) << 24
        #expect(flags & (1 << 20) != 0)
        #expect(f[244] == 1)  // sleep control: system I/O
        #expect(UInt16(f[248]) | UInt16(f[249]) << 8 == 0x600)
        #expect(f[128] == 1)  // reset value
    }

    @Test func madtListsEveryCPUAndTheIOAPIC() throws {
        let m = try #require(block("APIC"))
        var at = 44
        var cpus: [UInt8] = []
        var ioapics = 0
        while at < m.count {
            let type = m[at], length = Int(m[at + 1])
            if type == 0 { cpus.append(m[at + 3]); #expect(m[at + 4] & 1 == 1) }
            if type == 1 { ioapics += 1 }
            at += length
        }
        #expect(cpus == [0, 1, 2])
        #expect(ioapics == 1)
    }

    @Test func dsdtDescribesVirtioLegacyDevicesAndS5() throws {
        let d = try #require(block("DSDT"))
        func contains(_ needle: [UInt8]) -> Bool {
            guard d.count >= needle.count else { return false }
            return (0...(d.count - needle.count)).contains { Array(d[$0..<$0 + needle.count]) == needle }
        }
        #expect(contains(Array("_S5_".utf8)))
        #expect(contains(Array("LNRO0005".utf8)))
        #expect(contains(Array("VR00".utf8)))
        #expect(contains(Array("COM1".utf8)))
        #expect(contains([0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xD0]))
    }
}
