// VMM (layer 3): what each vCPU sees before its first instruction: CPUID, MSRs, LAPIC wiring,
// and the register state of the chosen entry (64-bit Linux or 32-bit PVH).
import KVM

public enum CPUIDPolicy {
    /// Adapts the host-supported CPUID leaves to vCPU `index` of `count`: APIC IDs, topology
    /// (one socket, `count` cores, or `count/2` cores × 2 threads with SMT), the hypervisor bit,
    /// and no performance-monitoring leaf.
    public static func normalize(_ supported: [CPUIDEntry], vcpuIndex index: Int, vcpuCount count: Int, smt: Bool) -> [CPUIDEntry] {
        let apicID = UInt32(index)
        let threadsPerCore: UInt32 = smt && count > 1 ? 2 : 1
        let cores = UInt32(max(1, count)) / threadsPerCore
        let threadShift = UInt32(threadsPerCore > 1 ? 1 : 0)
        let coreShift = threadShift + bitsNeeded(cores)
        var result: [CPUIDEntry] = []
        for var e in supported {
            switch e.function {
            case 0x1:
                e.ebx = (e.ebx & 0x0000_FFFF) | (apicID << 24) | (UInt32(min(count, 255)) << 16) | (8 << 8)
                e.ecx |= 1 << 31  // running under a hypervisor
                if count > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(1 << 28) }  // HTT: more than one logical CPU
            case 0x4:
                // Deterministic cache parameters: cores per package - 1 in EAX[31:26].
                e.eax = (e.eax & 0x03FF_FFFF) | ((cores - 1) << 26)
                let cacheLevel = (e.eax >> 5) & 0x7
                let sharing: UInt32 = cacheLevel >= 3 ? UInt32(count) : threadsPerCore
                e.eax = (e.eax & ~(0xFFF << 14)) | ((sharing - 1) << 14)
            case 0x6:
                e.ecx &= ~(1 << 3)  // no energy/performance bias MSR
            case 0xA:
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0  // no PMU
            case 0xB, 0x1F:
                e.edx = apicID
                switch e.index {
                case 0:
                    e.eax = threadShift
                    e.ebx = threadsPerCore
                    e.ecx = (1 << 8) | 0  // level 0: SMT
                case 1:
                    e.eax = coreShift
                    e.ebx = UInt32(count)
                    e.ecx = (2 << 8) | 1  // level 1: core
                default:
                    e.eax = 0; e.ebx = 0
                    e.ecx = e.index
                }
            case 0x8000_0008:
                e.ecx = (e.ecx & ~0xFF) | UInt32(count - 1)
            default:
                break
            }
            result.append(e)
        }
        return result
    }

    static func bitsNeeded(_ n: UInt32) -> UInt32 {
        n <= 1 ? 0 : UInt32(32 - (n - 1).leadingZeroBitCount)
    }
}

public enum BootCPUState {
    /// MSRs every vCPU starts with (values as Firecracker's boot MSRs).
    public static let msrs: [(index: UInt32, value: UInt64)] = [
        (0x174, 0), (0x175, 0), (0x176, 0),  // SYSENTER_CS/ESP/EIP
        (0xC000_0081, 0), (0xC000_0082, 0), (0xC000_0083, 0), (0xC000_0084, 0),  // STAR, LSTAR, CSTAR, SFMASK
        (0xC000_0102, 0),  // KERNEL_GS_BASE
        (0x10, 0),  // TSC
        (0x1A0, 1),  // MISC_ENABLE: fast strings
        (0x2FF, (1 << 11) | 6),  // MTRR default type: enabled, write-back
    ]

    /// The LAPIC page with LINT0 as ExtINT (the 8259s) and LINT1 as NMI.
    public static func wireLAPIC(_ page: [UInt8]) -> [UInt8] {
        var page = page
        func set(_ offset: Int, mode: UInt32) {
            var v = UInt32(page[offset]) | UInt32(page[offset + 1]) << 8 | UInt32(page[offset + 2]) << 16 | UInt32(page[offset + 3]) << 24
            v = (v & ~0x700) | (mode << 8)
            for i in 0..<4 { page[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
        }
        set(0x350, mode: 7)  // LVT LINT0: ExtINT
        set(0x360, mode: 4)  // LVT LINT1: NMI
        return page
    }

    /// Special registers for `entry`, starting from KVM's current ones.
    public static func specialRegisters(_ base: SpecialRegisters, entry: KernelEntry) -> SpecialRegisters {
        var s = base
        let longMode: Bool
        if case .linux64 = entry { longMode = true } else { longMode = false }
        let gdt = BootParams.gdt(longMode: longMode)
        s.gdtBase = Layout.gdtAddress
        s.gdtLimit = UInt16(gdt.count * 8 - 1)
        s.idtBase = Layout.idtAddress
        s.idtLimit = 7
        let code = Segment(gdtEntry: gdt[1], selector: 0x08)
        let data = Segment(gdtEntry: gdt[2], selector: 0x10)
        var tss = Segment(gdtEntry: gdt[3], selector: 0x18)
        tss.unusable = false
        s.cs = code
        s.ds = data
        s.es = data
        s.fs = data
        s.gs = data
        s.ss = data
        s.tr = tss
        if longMode {
            s.cr0 = 0x8000_0033  // PG | ET | MP | PE
            s.cr3 = Layout.pml4
            s.cr4 = 0x20  // PAE
            s.efer = 0x500  // LME | LMA
        } else {
            s.cr0 = 0x11  // ET | PE
            s.cr3 = 0
            s.cr4 = 0
            s.efer = 0
        }
        return s
    }

    /// General registers for `entry`.
    public static func registers(entry: KernelEntry) -> Registers {
        var r = Registers()
        r.rflags = 2
        switch entry {
        case .linux64(let rip):
            r.rip = rip
            r.rsp = Layout.bootStack
            r.rbp = Layout.bootStack
            r.rsi = Layout.zeroPage
        case .pvh(let rip):
            r.rip = rip
            r.rbx = Layout.pvhStartInfo
        }
        return r
    }
}
