// VMM (layer 3): the guest-physical memory map every Nimbus microVM uses.
//
//   0x0000_0500  GDT              0x0000_0520  IDT (empty)
//   0x0000_6000  PVH start info, module list and memory map
//   0x0000_7000  zero page (struct boot_params)
//   0x0000_8ff0  boot stack top
//   0x0000_9000  PML4, then PDPT (0xa000), then four page directories (0xb000..0xefff)
//   0x0002_0000  kernel command line
//   0x0009_fc00  end of low RAM (EBDA and legacy ROM area above it are not RAM)
//   0x000e_0000  ACPI RSDP and tables (reserved in the e820 map)
//   0x0010_0000  kernel (bzImage protected-mode part; ELF segments at their own addresses)
//   0xc000_0000  MMIO hole: virtio-mmio slots from 0xd000_0000, IOAPIC, LAPIC; RAM resumes at 4 GiB
public enum Layout {
    public static let gdtAddress: UInt64 = 0x500
    public static let idtAddress: UInt64 = 0x520
    public static let pvhStartInfo: UInt64 = 0x6000
    public static let pvhModuleList: UInt64 = 0x6040
    public static let pvhMemoryMap: UInt64 = 0x6080
    public static let zeroPage: UInt64 = 0x7000
    public static let bootStack: UInt64 = 0x8ff0
    public static let pml4: UInt64 = 0x9000
    public static let pdpt: UInt64 = 0xa000
    public static let pageDirectories: UInt64 = 0xb000
    /// Number of 2 MiB-page directories in the boot identity map (each maps 1 GiB).
    public static let identityMappedGiB: UInt64 = 4
    public static let commandLine: UInt64 = 0x20000
    /// Linux's x86 COMMAND_LINE_SIZE, including the terminating NUL.
    public static let commandLineMax = 2048
    public static let ebdaStart: UInt64 = 0x9fc00
    public static let acpiStart: UInt64 = 0xe0000
    public static let acpiEnd: UInt64 = 0x100000
    public static let kernelStart: UInt64 = 0x100000
    public static let mmioHoleStart: UInt64 = 0xc000_0000
    public static let fourGiB: UInt64 = 0x1_0000_0000
    public static let virtioMMIOBase: UInt64 = 0xd000_0000
    public static let virtioMMIOSlotSize: UInt64 = 0x1000
    public static let ioapicAddress: UInt64 = 0xfec0_0000
    public static let lapicAddress: UInt64 = 0xfee0_0000
    public static let tssAddress: UInt64 = 0xfffb_d000
    public static let identityMapAddress: UInt64 = 0xfffb_c000

    // Legacy I/O ports.
    public static let serialPort: UInt64 = 0x3f8
    public static let serialIRQ: UInt32 = 4
    public static let i8042Port: UInt64 = 0x60
    public static let i8042IRQ: UInt32 = 1
    /// Hardware-reduced ACPI sleep control/status and reset register.
    public static let acpiPowerPort: UInt64 = 0x600
    /// First and last GSI handed to virtio-mmio devices.
    public static let firstDeviceIRQ: UInt32 = 5
    public static let lastDeviceIRQ: UInt32 = 23

    /// Guest RAM ranges for `bytes` of memory: below the MMIO hole, and the rest above 4 GiB.
    public static func ramRanges(bytes: UInt64) -> [(start: UInt64, size: UInt64)] {
        if bytes <= mmioHoleStart { return [(0, bytes)] }
        return [(0, mmioHoleStart), (fourGiB, bytes - mmioHoleStart)]
    }
}
