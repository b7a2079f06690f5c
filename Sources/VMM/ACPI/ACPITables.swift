// VMM (layer 3): the ACPI tables a stock distribution kernel needs to find its CPUs, its
// virtio-mmio devices and its power-off register: RSDP → XSDT → {FADT → DSDT, MADT}.
// Hardware-reduced ACPI (no PM timer, no SCI, no FACS), as Firecracker and Cloud Hypervisor do.
import Devices

/// A virtio-mmio device slot to describe in the DSDT.
public struct VirtioMMIODescription: Sendable, Equatable {
    public let base: UInt64
    public let size: UInt64
    public let gsi: UInt32
    public init(base: UInt64, size: UInt64 = Layout.virtioMMIOSlotSize, gsi: UInt32) {
        self.base = base
        self.size = size
        self.gsi = gsi
    }
}

public enum ACPITables {
    static let oemID = Array("NIMBUS".utf8)
    static let oemTableID = Array("NIMBUSVM".utf8)
    static let creatorID = Array("NMBS".utf8)

    /// Sums `bytes` modulo 256; a valid table sums to zero.
    public static func checksum(_ bytes: [UInt8]) -> UInt8 {
        bytes.reduce(0, &+)
    }

    /// A System Description Table: the 36-byte header followed by `body`, checksummed.
    public static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var w = ByteWriter(size: 36)
        w.put(Array(signature.utf8.prefix(4)), at: 0)
        w.put(UInt32(36 + body.count), at: 4)
        w.put(revision, at: 8)
        w.put(oemID, at: 10)
        w.put(oemTableID, at: 16)
        w.put(UInt32(1), at: 24)
        w.put(creatorID, at: 28)
        w.put(UInt32(1), at: 32)
        var bytes = w.bytes + body
        bytes[9] = 0 &- checksum(bytes)
        return bytes
    }

    /// The DSDT: `_S5_` for power-off and one `LNRO0005` device per virtio-mmio slot.
    public static func dsdt(devices: [VirtioMMIODescription]) -> [UInt8] {
        var terms: [AML] = [
            AML.name("\\_S5_", AML.package([AML.integer(UInt64(5)), AML.integer(0), AML.integer(0), AML.integer(0)]))
        ]
        let virtio = devices.enumerated().map { index, d -> AML in
            AML.device(
                String(format4("VR", index)),
                [
                    AML.name("_HID", AML.string("LNRO0005")),
                    AML.name("_UID", AML.integer(UInt64(index))),
                    AML.name("_CCA", AML.integer(1)),
                    AML.name(
                        "_CRS",
                        AML.resourceTemplate([
                            AML.memory32Fixed(base: UInt32(truncatingIfNeeded: d.base), length: UInt32(truncatingIfNeeded: d.size)),
                            AML.extendedInterrupt(d.gsi),
                        ])),
                ])
        }
        // Legacy devices: hardware-reduced ACPI gives Linux no legacy PIC and so no ISA IRQ
        // mappings; describing the UART and keyboard controller here makes ACPI map their IRQs.
        let legacy = [
            AML.device(
                "COM1",
                [
                    AML.name("_HID", AML.eisaID("PNP0501")),
                    AML.name("_UID", AML.integer(0)),
                    AML.name(
                        "_CRS",
                        AML.resourceTemplate([
                            AML.ioPort(base: UInt16(Layout.serialPort), length: 8), AML.irq(UInt8(Layout.serialIRQ)),
                        ])),
                ]),
            AML.device(
                "PS2K",
                [
                    AML.name("_HID", AML.eisaID("PNP0303")),
                    AML.name(
                        "_CRS",
                        AML.resourceTemplate([
                            AML.ioPort(base: UInt16(Layout.i8042Port), length: 1), AML.ioPort(base: UInt16(Layout.i8042Port + 4), length: 1),
                            AML.irq(UInt8(Layout.i8042IRQ)),
                        ])),
                ]),
        ]
        terms.append(AML.scope("\\_SB_", legacy + virtio))
        return table("DSDT", revision: 2, body: terms.flatMap(\.bytes))
    }

    /// "VR00".."VRZZ": a 4-character name for device `index` (base 36 suffix).
    static func format4(_ prefix: String, _ index: Int) -> String {
        let digits = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        return prefix + String(digits[(index / 36) % 36]) + String(digits[index % 36])
    }

    /// A Generic Address Structure for an I/O port register of `bitWidth` bits.
    static func ioGAS(_ port: UInt64, bitWidth: UInt8) -> [UInt8] {
        var w = ByteWriter(size: 12)
        w.put(UInt8(1), at: 0)  // system I/O space
        w.put(bitWidth, at: 1)
        w.put(UInt8(0), at: 2)
        w.put(UInt8(1), at: 3)  // byte access
        w.put(port, at: 4)
        return w.bytes
    }

    /// FADT revision 6 (276 bytes), hardware-reduced, pointing at the DSDT and the power port.
    public static func fadt(dsdtAddress: UInt64) -> [UInt8] {
        var w = ByteWriter(size: 276 - 36)
        func at(_ offset: Int) -> Int { offset - 36 }
        w.put(UInt32(truncatingIfNeeded: dsdtAddress), at: at(40))
        w.put(UInt16(0), at: at(46))  // SCI_INT: none in hardware-reduced mode
        // IAPC_BOOT_ARCH: 8042 present, VGA not present, MSI not supported, CMOS RTC not present.
        w.put(UInt16((1 << 1) | (1 << 2) | (1 << 3) | (1 << 5)), at: at(109))
        // Flags: WBINVD, RESET_REG_SUP, HW_REDUCED_ACPI.
        w.put(UInt32((1 << 0) | (1 << 10) | (1 << 20)), at: at(112))
        w.put(ioGAS(Layout.acpiPowerPort, bitWidth: 8), at: at(116))
        w.put(ACPIPowerDevice.resetValue, at: at(128))
        w.put(UInt8(5), at: at(131))  // FADT minor version: ACPI 6.5
        w.put(dsdtAddress, at: at(140))
        w.put(ioGAS(Layout.acpiPowerPort, bitWidth: 8), at: at(244))  // SLEEP_CONTROL_REG
        w.put(ioGAS(Layout.acpiPowerPort + 1, bitWidth: 8), at: at(256))  // SLEEP_STATUS_REG
        w.put(Array("NIMBUSVM".utf8), at: at(268))  // hypervisor vendor identity
        return table("FACP", revision: 6, body: w.bytes)
    }

    /// MADT: one enabled local APIC per vCPU (APIC ID = index) and the IOAPIC at GSI 0.
    public static func madt(vcpuCount: Int) -> [UInt8] {
        var body: [UInt8] = []
        var header = ByteWriter(size: 8)
        header.put(UInt32(truncatingIfNeeded: Layout.lapicAddress), at: 0)
        header.put(UInt32(1), at: 4)  // PCAT_COMPAT: there are 8259s too
        body += header.bytes
        for cpu in 0..<vcpuCount {
            body += [0, 8, UInt8(cpu), UInt8(cpu), 1, 0, 0, 0]
        }
        var ioapic = ByteWriter(size: 12)
        ioapic.put(UInt8(1), at: 0)
        ioapic.put(UInt8(12), at: 1)
        ioapic.put(UInt8(vcpuCount), at: 2)  // IOAPIC ID after the CPUs' APIC IDs
        ioapic.put(UInt32(truncatingIfNeeded: Layout.ioapicAddress), at: 4)
        ioapic.put(UInt32(0), at: 8)
        body += ioapic.bytes
        return table("APIC", revision: 6, body: body)
    }

    /// XSDT listing `tables` by address.
    public static func xsdt(_ tables: [UInt64]) -> [UInt8] {
        var w = ByteWriter(size: tables.count * 8)
        for (i, t) in tables.enumerated() { w.put(t, at: i * 8) }
        return table("XSDT", revision: 1, body: w.bytes)
    }

    /// RSDP revision 2 (36 bytes) pointing at the XSDT, with both checksums.
    public static func rsdp(xsdtAddress: UInt64) -> [UInt8] {
        var w = ByteWriter(size: 36)
        w.put(Array("RSD PTR ".utf8), at: 0)
        w.put(oemID, at: 9)
        w.put(UInt8(2), at: 15)
        w.put(UInt32(36), at: 20)
        w.put(xsdtAddress, at: 24)
        var bytes = w.bytes
        bytes[8] = 0 &- checksum(Array(bytes[0..<20]))
        bytes[32] = 0 &- checksum(bytes)
        return bytes
    }

    /// Lays out every table from `Layout.acpiStart`: RSDP first (where a legacy scan finds it).
    /// Returns the blocks to write and the RSDP's address.
    public static func build(vcpuCount: Int, devices: [VirtioMMIODescription]) -> (blocks: [(address: UInt64, bytes: [UInt8])], rsdp: UInt64) {
        func align(_ v: UInt64) -> UInt64 { (v + 15) & ~15 }
        let rsdpAddress = Layout.acpiStart
        let dsdtAddress = align(rsdpAddress + 36)
        let dsdt = dsdt(devices: devices)
        let fadtAddress = align(dsdtAddress + UInt64(dsdt.count))
        let fadt = fadt(dsdtAddress: dsdtAddress)
        let madtAddress = align(fadtAddress + UInt64(fadt.count))
        let madt = madt(vcpuCount: vcpuCount)
        let xsdtAddress = align(madtAddress + UInt64(madt.count))
        let xsdt = xsdt([fadtAddress, madtAddress])
        return (
            [
                (rsdpAddress, rsdp(xsdtAddress: xsdtAddress)), (dsdtAddress, dsdt), (fadtAddress, fadt),
                (madtAddress, madt), (xsdtAddress, xsdt),
            ], rsdpAddress
        )
    }
}
