// KVM (layer 1): one virtual CPU: its registers and the KVM_RUN loop's exits.
import CNimbusLinux
import Glibc
import LinuxSystem

/// General-purpose registers.
public struct Registers: Sendable, Equatable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0, rflags: UInt64 = 2
    public init() {}
}

/// A segment register in KVM's expanded form.
public struct Segment: Sendable, Equatable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0
    public var selector: UInt16 = 0
    public var type: UInt8 = 0
    public var present: Bool = false
    public var dpl: UInt8 = 0
    public var db: Bool = false
    public var s: Bool = false
    public var l: Bool = false
    public var g: Bool = false
    public var avl: Bool = false
    public var unusable: Bool = false
    public init() {}

    /// Decodes a 64-bit GDT descriptor into KVM's form.
    public init(gdtEntry e: UInt64, selector: UInt16) {
        base = ((e >> 16) & 0xFF_FFFF) | (((e >> 56) & 0xFF) << 24)
        let rawLimit = UInt32(truncatingIfNeeded: (e & 0xFFFF) | (((e >> 48) & 0xF) << 16))
        g = (e >> 55) & 1 == 1
        limit = g ? (rawLimit << 12) | 0xFFF : rawLimit
        self.selector = selector
        type = UInt8((e >> 40) & 0xF)
        s = (e >> 44) & 1 == 1
        dpl = UInt8((e >> 45) & 3)
        present = (e >> 47) & 1 == 1
        avl = (e >> 52) & 1 == 1
        l = (e >> 53) & 1 == 1
        db = (e >> 54) & 1 == 1
        unusable = !present
    }
}

/// The special registers KVM_SET_SREGS takes. Fields not modelled keep KVM's values.
public struct SpecialRegisters: Sendable {
    var raw: kvm_sregs

    public var cs: Segment {
        get { Self.decode(raw.cs) }
        set { raw.cs = Self.encode(newValue) }
    }
    public var ds: Segment {
        get { Self.decode(raw.ds) }
        set { raw.ds = Self.encode(newValue) }
    }
    public var es: Segment {
        get { Self.decode(raw.es) }
        set { raw.es = Self.encode(newValue) }
    }
    public var fs: Segment {
        get { Self.decode(raw.fs) }
        set { raw.fs = Self.encode(newValue) }
    }
    public var gs: Segment {
        get { Self.decode(raw.gs) }
        set { raw.gs = Self.encode(newValue) }
    }
    public var ss: Segment {
        get { Self.decode(raw.ss) }
        set { raw.ss = Self.encode(newValue) }
    }
    public var tr: Segment {
        get { Self.decode(raw.tr) }
        set { raw.tr = Self.encode(newValue) }
    }
    public var gdtBase: UInt64 {
        get { raw.gdt.base }
        set { raw.gdt.base = newValue }
    }
    public var gdtLimit: UInt16 {
        get { raw.gdt.limit }
        set { raw.gdt.limit = newValue }
    }
    public var idtBase: UInt64 {
        get { raw.idt.base }
        set { raw.idt.base = newValue }
    }
    public var idtLimit: UInt16 {
        get { raw.idt.limit }
        set { raw.idt.limit = newValue }
    }
    public var cr0: UInt64 {
        get { raw.cr0 }
        set { raw.cr0 = newValue }
    }
    public var cr3: UInt64 {
        get { raw.cr3 }
        set { raw.cr3 = newValue }
    }
    public var cr4: UInt64 {
        get { raw.cr4 }
        set { raw.cr4 = newValue }
    }
    public var efer: UInt64 {
        get { raw.efer }
        set { raw.efer = newValue }
    }

    static func decode(_ s: kvm_segment) -> Segment {
        var r = Segment()
        r.base = s.base
        r.limit = s.limit
        r.selector = s.selector
        r.type = s.type
        r.present = s.present != 0
        r.dpl = s.dpl
        r.db = s.db != 0
        r.s = s.s != 0
        r.l = s.l != 0
        r.g = s.g != 0
        r.avl = s.avl != 0
        r.unusable = s.unusable != 0
        return r
    }

    static func encode(_ s: Segment) -> kvm_segment {
        var r = kvm_segment()
        r.base = s.base
        r.limit = s.limit
        r.selector = s.selector
        r.type = s.type
        r.present = s.present ? 1 : 0
        r.dpl = s.dpl
        r.db = s.db ? 1 : 0
        r.s = s.s ? 1 : 0
        r.l = s.l ? 1 : 0
        r.g = s.g ? 1 : 0
        r.avl = s.avl ? 1 : 0
        r.unusable = s.unusable ? 1 : 0
        return r
    }
}

/// Why KVM_RUN returned.
public enum VCPUExit: Sendable, Equatable {
    /// The guest wrote `data` (count × size bytes) to `port`.
    case ioOut(port: UInt16, size: Int, data: [UInt8])
    /// The guest reads `size` bytes `count` times from `port`; answer with `completeIORead`.
    case ioIn(port: UInt16, size: Int, count: Int)
    case mmioWrite(address: UInt64, data: [UInt8])
    /// The guest reads `length` bytes from MMIO `address`; answer with `completeMMIORead`.
    case mmioRead(address: UInt64, length: Int)
    case hlt
    /// Triple fault (or another shutdown condition).
    case shutdown
    case systemEvent(type: UInt32)
    case internalError(suberror: UInt32)
    case failEntry(reason: UInt64)
    /// KVM_RUN was interrupted by a signal or `immediate_exit`.
    case interrupted
    case unknown(reason: UInt32)
}

/// One virtual CPU. Its methods are called from the one thread that runs it.
public final class VCPU: @unchecked Sendable {
    // SAFETY: the kvm_run mapping is only touched by the thread that calls `run`, except for
    // `requestImmediateExit`, which writes a single byte the kernel documents as safe to set
    // from other threads before a kick.
    public let id: UInt32
    let fd: OwnedFileDescriptor
    let runArea: MappedRegion

    init(id: UInt32, fd: OwnedFileDescriptor, run: MappedRegion) {
        self.id = id
        self.fd = fd
        self.runArea = run
    }

    private var runState: UnsafeMutablePointer<kvm_run> { runArea.base.assumingMemoryBound(to: kvm_run.self) }

    public func registers() throws(KVMError) -> Registers {
        var r = kvm_regs()
        _ = try kvmIoctl(fd.rawValue, "KVM_GET_REGS", NIMBUS_KVM_GET_REGS, &r)
        var out = Registers()
        out.rax = r.rax; out.rbx = r.rbx; out.rcx = r.rcx; out.rdx = r.rdx
        out.rsi = r.rsi; out.rdi = r.rdi; out.rsp = r.rsp; out.rbp = r.rbp
        out.r8 = r.r8; out.r9 = r.r9; out.r10 = r.r10; out.r11 = r.r11
        out.r12 = r.r12; out.r13 = r.r13; out.r14 = r.r14; out.r15 = r.r15
        out.rip = r.rip; out.rflags = r.rflags
        return out
    }

    public func setRegisters(_ v: Registers) throws(KVMError) {
        var r = kvm_regs()
        r.rax = v.rax; r.rbx = v.rbx; r.rcx = v.rcx; r.rdx = v.rdx
        r.rsi = v.rsi; r.rdi = v.rdi; r.rsp = v.rsp; r.rbp = v.rbp
        r.r8 = v.r8; r.r9 = v.r9; r.r10 = v.r10; r.r11 = v.r11
        r.r12 = v.r12; r.r13 = v.r13; r.r14 = v.r14; r.r15 = v.r15
        r.rip = v.rip; r.rflags = v.rflags
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_REGS", NIMBUS_KVM_SET_REGS, &r)
    }

    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        var s = kvm_sregs()
        _ = try kvmIoctl(fd.rawValue, "KVM_GET_SREGS", NIMBUS_KVM_GET_SREGS, &s)
        return SpecialRegisters(raw: s)
    }

    public func setSpecialRegisters(_ s: SpecialRegisters) throws(KVMError) {
        var raw = s.raw
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_SREGS", NIMBUS_KVM_SET_SREGS, &raw)
    }

    /// Sets the x87 control word and MXCSR (the rest of the FPU state is zeroed).
    public func setFPU(controlWord: UInt16, mxcsr: UInt32) throws(KVMError) {
        var fpu = kvm_fpu()
        fpu.fcw = controlWord
        fpu.mxcsr = mxcsr
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_FPU", NIMBUS_KVM_SET_FPU, &fpu)
    }

    /// Writes model-specific registers; fails if KVM accepts fewer than all of them.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        guard let list = nimbus_msrs_alloc(UInt32(msrs.count)) else { throw .system(SystemError(call: "calloc", errno: ENOMEM)) }
        defer { free(list) }
        let entries = nimbus_msrs_entries(list)
        for (i, msr) in msrs.enumerated() {
            // SAFETY: `list` was allocated with msrs.count entries.
            entries.advanced(by: i).pointee.index = msr.index
            entries.advanced(by: i).pointee.data = msr.value
        }
        let written = try kvmIoctl(fd.rawValue, "KVM_SET_MSRS", NIMBUS_KVM_SET_MSRS, list)
        if Int(written) != msrs.count {
            let failed = msrs[Int(written)].index
            throw .unsupported("writing MSR 0x\(String(failed, radix: 16))")
        }
    }

    /// Sets the CPUID leaves the guest sees.
    public func setCPUID(_ leaves: [CPUIDEntry]) throws(KVMError) {
        guard let cpuid = nimbus_cpuid2_alloc(UInt32(leaves.count)) else { throw .system(SystemError(call: "calloc", errno: ENOMEM)) }
        defer { free(cpuid) }
        let entries = nimbus_cpuid2_entries(cpuid)
        for (i, leaf) in leaves.enumerated() {
            var e = kvm_cpuid_entry2()
            e.function = leaf.function
            e.index = leaf.index
            e.flags = leaf.flags
            e.eax = leaf.eax
            e.ebx = leaf.ebx
            e.ecx = leaf.ecx
            e.edx = leaf.edx
            // SAFETY: `cpuid` was allocated with leaves.count entries.
            entries.advanced(by: i).pointee = e
        }
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_CPUID2", NIMBUS_KVM_SET_CPUID2, cpuid)
    }

    /// The local APIC's 1 KiB register page.
    public func lapic() throws(KVMError) -> [UInt8] {
        var state = kvm_lapic_state()
        _ = try kvmIoctl(fd.rawValue, "KVM_GET_LAPIC", NIMBUS_KVM_GET_LAPIC, &state)
        return withUnsafeBytes(of: &state.regs) { Array($0) }
    }

    public func setLAPIC(_ registers: [UInt8]) throws(KVMError) {
        guard registers.count == 1024 else { throw .unsupported("a LAPIC page of \(registers.count) bytes") }
        var state = kvm_lapic_state()
        withUnsafeMutableBytes(of: &state.regs) { dst in
            // SAFETY: both buffers are exactly 1024 bytes.
            registers.withUnsafeBytes { dst.copyMemory(from: $0) }
        }
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_LAPIC", NIMBUS_KVM_SET_LAPIC, &state)
    }

    /// Asks the next (or current, after a kick) KVM_RUN to return at once.
    public func requestImmediateExit(_ value: Bool) {
        nimbus_run_set_immediate_exit(runState, value ? 1 : 0)
    }

    /// Runs the vCPU until the next exit that needs userspace.
    public func run() throws(KVMError) -> VCPUExit {
        let result = nimbus_ioctl_val(fd.rawValue, NIMBUS_KVM_RUN, 0)
        if result < 0 {
            let code = errno
            if code == EINTR || code == EAGAIN { return .interrupted }
            throw .system(SystemError(call: "ioctl(KVM_RUN)", subject: "vCPU \(id)", errno: code))
        }
        let reason = nimbus_run_exit_reason(runState)
        switch reason {
        case NIMBUS_KVM_EXIT_IO:
            let size = Int(nimbus_run_io_size(runState))
            let count = Int(nimbus_run_io_count(runState))
            let port = nimbus_run_io_port(runState)
            let offset = Int(nimbus_run_io_data_offset(runState))
            let total = size * count
            guard offset >= 0, offset + total <= runArea.size else { return .internalError(suberror: 0xFFFF) }
            if nimbus_run_io_direction(runState) == UInt8(NIMBUS_KVM_EXIT_IO_OUT) {
                // SAFETY: the data range was checked against the kvm_run mapping above.
                let data = Array(UnsafeRawBufferPointer(start: runArea.base.advanced(by: offset), count: total))
                return .ioOut(port: port, size: size, data: data)
            }
            return .ioIn(port: port, size: size, count: count)
        case NIMBUS_KVM_EXIT_MMIO:
            let address = nimbus_run_mmio_phys_addr(runState)
            let length = min(Int(nimbus_run_mmio_len(runState)), 8)
            if nimbus_run_mmio_is_write(runState) != 0 {
                // SAFETY: mmio.data is an 8-byte array inside kvm_run and length ≤ 8.
                let data = Array(UnsafeBufferPointer(start: nimbus_run_mmio_data(runState), count: length))
                return .mmioWrite(address: address, data: data)
            }
            return .mmioRead(address: address, length: length)
        case NIMBUS_KVM_EXIT_HLT: return .hlt
        case NIMBUS_KVM_EXIT_SHUTDOWN: return .shutdown
        case NIMBUS_KVM_EXIT_SYSTEM_EVENT: return .systemEvent(type: nimbus_run_system_event_type(runState))
        case NIMBUS_KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: nimbus_run_internal_suberror(runState))
        case NIMBUS_KVM_EXIT_FAIL_ENTRY: return .failEntry(reason: nimbus_run_fail_entry_reason(runState))
        case NIMBUS_KVM_EXIT_INTR: return .interrupted
        default: return .unknown(reason: reason)
        }
    }

    /// Supplies the bytes for the last `.ioIn` exit (count × size bytes; extra bytes are ignored).
    public func completeIORead(_ bytes: [UInt8]) {
        let offset = Int(nimbus_run_io_data_offset(runState))
        let total = Int(nimbus_run_io_size(runState)) * Int(nimbus_run_io_count(runState))
        let n = min(total, bytes.count)
        guard offset >= 0, offset + total <= runArea.size else { return }
        // SAFETY: the destination range was checked against the kvm_run mapping above.
        bytes.withUnsafeBytes { source in
            if let src = source.baseAddress, n > 0 { runArea.base.advanced(by: offset).copyMemory(from: src, byteCount: n) }
        }
    }

    /// Supplies the bytes for the last `.mmioRead` exit.
    public func completeMMIORead(_ bytes: [UInt8]) {
        let n = min(min(Int(nimbus_run_mmio_len(runState)), 8), bytes.count)
        let data = nimbus_run_mmio_data(runState)
        for i in 0..<n {
            // SAFETY: n ≤ 8, the size of kvm_run.mmio.data.
            data.advanced(by: i).pointee = bytes[i]
        }
    }

    public static let systemEventShutdown = NIMBUS_KVM_SYSTEM_EVENT_SHUTDOWN
    public static let systemEventReset = NIMBUS_KVM_SYSTEM_EVENT_RESET
}
