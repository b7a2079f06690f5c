// VMM (layer 3): one microVM: guest memory, the loaded kernel, devices, and vCPU threads.
//
// Threads: each vCPU runs KVM_RUN on its own native thread and handles its own port/MMIO exits
// through the buses; control (pause, resume, stop) goes through `control` and kicks the vCPUs
// out of KVM_RUN with a signal. The first exit request wins and is what `waitForExit` returns.
import Devices
import GuestMemory
import KVM
import LinuxSystem
import Logging
import Synchronization
import Virtio
import VirtualDisk

/// How a VM ended.
public enum MachineExit: Sendable, Equatable {
    /// The guest reset itself (i8042 or ACPI reset): for a microVM, the end of its life.
    case reset
    /// The guest powered off through ACPI.
    case powerOff
    /// A vCPU triple-faulted.
    case tripleFault(vcpu: UInt32, rip: UInt64)
    /// The host side failed or the guest did something KVM cannot run.
    case failure(String)
    /// Stopped from the host (SIGTERM, API).
    case stopped

    /// The VMM's process exit status for this ending.
    public var exitCode: Int32 {
        switch self {
        case .reset, .powerOff, .stopped: return 0
        case .tripleFault: return 2
        case .failure: return 1
        }
    }

    public var message: String {
        switch self {
        case .reset: return "guest reset: the VM has ended"
        case .powerOff: return "guest powered off"
        case .tripleFault(let vcpu, let rip):
            return "guest triple fault on vCPU \(vcpu) at rip 0x\(String(rip, radix: 16)): the VM has crashed"
        case .failure(let why): return "VM failed: \(why)"
        case .stopped: return "VM stopped by the host"
        }
    }
}

/// An edge-triggered interrupt delivered through an irqfd.
struct IRQFDLine: InterruptLine {
    let eventfd: EventFD
    func trigger() { try? eventfd.signal() }
}

/// A configured, runnable microVM.
public final class Machine: Sendable {
    public let config: VMConfig
    public let memory: GuestMemory
    let vm: VirtualMachine
    let vcpus: [VCPU]
    let portBus = Bus()
    let mmioBus = Bus()
    let serial: Serial16550
    let i8042: I8042
    let virtio: VirtioSet
    let logger: Logger

    struct Control {
        var exit: MachineExit?
        var paused = false
        var parked = 0
        var threads: [NativeThread] = []
        var started = false
    }
    final class ControlBox: Sendable {
        let state = Mutex(Control())
    }
    private let control: ControlBox
    private let exitSignal: EventFD
    private let interruptFDs: [EventFD]

    /// Builds the VM from `config`: validates it against the host, loads the kernel and initrd,
    /// writes boot structures and ACPI tables, and configures every vCPU. Nothing runs yet.
    public init(config: VMConfig, kvm: KVM, serialSink: @escaping SerialSink, logger: Logger) throws {
        self.config = config
        self.logger = logger
        guard let boot = config.bootSource else { throw ConfigError("no boot source: set `boot-source` before starting the VM") }
        let machineConfig = config.machine
        try machineConfig.validate()
        let maxVCPUs = min(kvm.maxVCPUs(), MachineConfig.maxVCPUs)
        guard machineConfig.vcpuCount <= maxVCPUs else {
            throw ConfigError("machine-config: `vcpu_count` \(machineConfig.vcpuCount) is more than this host's KVM allows (\(maxVCPUs))")
        }
        let memBytes = UInt64(machineConfig.memSizeMiB) << 20
        let hostBytes = Host.memoryBytes
        guard memBytes <= hostBytes else {
            throw ConfigError("machine-config: `mem_size_mib` \(machineConfig.memSizeMiB) is more than the host's \(hostBytes >> 20) MiB of RAM")
        }

        // Kernel, command line, initrd.
        let kernelFile = try ImageFile(path: boot.kernelImagePath, what: "kernel image")
        let kernel: KernelImage
        do { kernel = try KernelImage.parse(kernelFile) } catch {
            throw BootError("kernel image \(boot.kernelImagePath): \(error)")
        }
        let ranges = Layout.ramRanges(bytes: memBytes)
        let lowEnd = ranges[0].start + ranges[0].size
        guard kernel.memoryEnd <= lowEnd else {
            throw BootError(
                "kernel image \(boot.kernelImagePath) needs \((kernel.memoryEnd + (1 << 20) - 1) >> 20) MiB of guest memory, the VM has \(machineConfig.memSizeMiB) MiB"
            )
        }
        let memory = try GuestMemory(ranges: ranges)
        self.memory = memory
        for segment in kernel.segments {
            guard memory.contains(segment.guestAddress, length: segment.memorySize) else {
                throw BootError(
                    "kernel segment at 0x\(String(segment.guestAddress, radix: 16)) of \(segment.memorySize) bytes does not fit in \(machineConfig.memSizeMiB) MiB of guest memory"
                )
            }
            try kernelFile.load(segment.fileRange, into: memory, at: segment.guestAddress)
        }
        let commandLine = Array(VirtioSet.commandLine(boot.bootArgs ?? BootSource.defaultBootArgs, config: config).utf8)
        guard commandLine.count < Layout.commandLineMax else {
            throw ConfigError("boot-source: `boot_args` is \(commandLine.count) bytes, the limit is \(Layout.commandLineMax - 1)")
        }
        guard !commandLine.contains(0) else { throw ConfigError("boot-source: `boot_args` contains a NUL byte") }
        try memory.write(commandLine + [0], at: Layout.commandLine)

        var initrd: (address: UInt64, size: UInt64)?
        if let initrdPath = boot.initrdPath {
            let initrdFile = try ImageFile(path: initrdPath, what: "initrd")
            let top = min(lowEnd, kernel.initrdAddressMax + 1)
            let size = UInt64(initrdFile.size)
            let kernelEnd = (kernel.memoryEnd + 0xFFF) & ~0xFFF
            guard size > 0 else { throw BootError("initrd \(initrdPath) is empty") }
            guard top > kernelEnd, size <= top - kernelEnd else {
                throw BootError(
                    "initrd \(initrdPath) (\(size >> 20) MiB) does not fit in guest memory above the kernel: \(top > kernelEnd ? (top - kernelEnd) >> 20 : 0) MiB free of \(machineConfig.memSizeMiB) MiB"
                )
            }
            let address = (top - size) & ~0xFFF
            try initrdFile.load(0..<initrdFile.size, into: memory, at: address)
            initrd = (address, size)
        }

        // Boot structures.
        let e820 = BootParams.e820(ranges: ranges)
        let slots = (0..<min(config.virtioDeviceCount, VirtioSet.maxDevices)).map(VirtioSet.description(slot:))
        let acpi = ACPITables.build(vcpuCount: machineConfig.vcpuCount, devices: slots)
        for block in acpi.blocks { try memory.write(block.bytes, at: block.address) }
        let gdt = BootParams.gdt(longMode: { if case .linux64 = kernel.entry { return true } else { return false } }())
        for (i, entry) in gdt.enumerated() { try memory.store(entry, at: Layout.gdtAddress + UInt64(i) * 8) }
        try memory.store(UInt64(0), at: Layout.idtAddress)
        switch kernel.entry {
        case .linux64:
            for block in BootParams.identityPageTables() { try memory.write(block.bytes, at: block.address) }
            let zeroPage = BootParams.zeroPage(
                setupHeader: kernel.setupHeader, commandLineAddress: Layout.commandLine, commandLineSize: commandLine.count,
                initrd: initrd, e820: e820, rsdp: acpi.rsdp)
            try memory.write(zeroPage, at: Layout.zeroPage)
        case .pvh:
            for block in BootParams.pvhStartInfo(commandLineAddress: Layout.commandLine, initrd: initrd, e820: e820, rsdp: acpi.rsdp) {
                try memory.write(block.bytes, at: block.address)
            }
        }

        // KVM VM, interrupt controllers, memory slots.
        let vm = try kvm.createVM()
        self.vm = vm
        try vm.setTSSAddress(Layout.tssAddress)
        try vm.setIdentityMapAddress(Layout.identityMapAddress)
        try vm.createIRQChip()
        try vm.createPIT()
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.guestAddress, size: region.size, hostAddress: memory.hostAddress(of: region))
        }

        // Legacy devices.
        let serialFD = try EventFD()
        let keyboardFD = try EventFD()
        try vm.registerIRQFD(serialFD, gsi: Layout.serialIRQ)
        try vm.registerIRQFD(keyboardFD, gsi: Layout.i8042IRQ)
        interruptFDs = [serialFD, keyboardFD]
        let exitSignal = try EventFD()
        self.exitSignal = exitSignal
        let control = ControlBox()
        self.control = control
        let requestHandler: MachineRequestHandler = { request in
            Machine.recordExit(request == .powerOff ? .powerOff : .reset, control: control, signal: exitSignal)
        }
        serial = Serial16550(interrupt: IRQFDLine(eventfd: serialFD), sink: serialSink)
        i8042 = I8042(interrupt: IRQFDLine(eventfd: keyboardFD), onRequest: requestHandler)
        try portBus.insert(serial, base: Layout.serialPort, length: 8)
        try portBus.insert(i8042, base: Layout.i8042Port, length: 5)
        try portBus.insert(ACPIPowerDevice(onRequest: requestHandler), base: Layout.acpiPowerPort, length: 2)
        virtio = try VirtioSet.build(config: config, memory: memory, vm: vm, bus: mmioBus, logger: logger)

        // vCPUs.
        let supported = try kvm.supportedCPUID()
        var vcpus: [VCPU] = []
        for index in 0..<machineConfig.vcpuCount {
            let vcpu = try vm.createVCPU(id: UInt32(index))
            try vcpu.setCPUID(CPUIDPolicy.normalize(supported, vcpuIndex: index, vcpuCount: machineConfig.vcpuCount, smt: machineConfig.smt))
            for msr in BootCPUState.msrs {
                do { try vcpu.setMSRs([msr]) } catch {
                    logger.debug("vCPU \(index): KVM did not take MSR 0x\(String(msr.index, radix: 16)): \(error)")
                }
            }
            try vcpu.setLAPIC(BootCPUState.wireLAPIC(try vcpu.lapic()))
            try vcpu.setFPU(controlWord: 0x37f, mxcsr: 0x1f80)
            if index == 0 {
                try vcpu.setSpecialRegisters(BootCPUState.specialRegisters(try vcpu.specialRegisters(), entry: kernel.entry))
                try vcpu.setRegisters(BootCPUState.registers(entry: kernel.entry))
            }
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        logger.info("VM ready: \(kernel.format.rawValue) kernel, \(machineConfig.vcpuCount) vCPUs, \(machineConfig.memSizeMiB) MiB")
    }

    static func recordExit(_ exit: MachineExit, control: ControlBox, signal: EventFD) {
        let threads: [NativeThread]? = control.state.withLock { c in
            guard c.exit == nil else { return nil }
            c.exit = exit
            return c.threads
        }
        guard let threads else { return }
        for t in threads { t.kick() }
        try? signal.signal()
    }

    private func requestExit(_ exit: MachineExit) {
        for vcpu in vcpus { vcpu.requestImmediateExit(true) }
        Machine.recordExit(exit, control: control, signal: exitSignal)
    }

    /// Starts the vCPU threads.
    public func start() throws {
        try KickSignal.install()
        try control.state.withLock { c in
            guard !c.started else { throw ConfigError("the VM is already running") }
            c.started = true
            for vcpu in vcpus {
                let thread = try NativeThread.start(name: "vcpu\(vcpu.id)") { [self] in runLoop(vcpu) }
                c.threads.append(thread)
            }
        }
    }

    /// Blocks until the VM ends, joins the vCPU threads, and says how it ended.
    public func waitForExit() -> MachineExit {
        while true {
            if let exit = control.state.withLock({ $0.exit }) {
                for vcpu in vcpus { vcpu.requestImmediateExit(true) }
                let threads = control.state.withLock { $0.threads }
                for t in threads { t.kick() }
                for t in threads { t.join() }
                virtio.shutdown(logger: logger)
                return exit
            }
            _ = try? exitSignal.wait()
        }
    }

    /// The exit, if the VM has ended.
    public var exitStatus: MachineExit? { control.state.withLock { $0.exit } }

    /// Stops the VM from the host side.
    public func stop() { requestExit(.stopped) }

    /// Pauses every vCPU and returns once all are out of the guest.
    public func pause() throws {
        let threads = control.state.withLock { c -> [NativeThread] in
            c.paused = true
            return c.threads
        }
        for vcpu in vcpus { vcpu.requestImmediateExit(true) }
        for t in threads { t.kick() }
        let deadline = Host.monotonicNanoseconds() + 5_000_000_000
        while control.state.withLock({ $0.parked < vcpus.count && $0.exit == nil }) {
            guard Host.monotonicNanoseconds() < deadline else { throw ConfigError("vCPUs did not pause within 5 s") }
            Host.sleep(microseconds: 500)
        }
    }

    /// Lets paused vCPUs run again.
    public func resume() {
        control.state.withLock { $0.paused = false }
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard controller.
    public func sendCtrlAltDel() { i8042.sendCtrlAltDel() }

    /// Points a drive at a new image (`PATCH /drives/{id}`); the guest sees a configuration change.
    public func replaceDrive(_ driveID: String, pathOnHost: String) throws {
        guard let block = virtio.blocks[driveID] else { throw ConfigError("drive `\(driveID)` does not exist") }
        let image: any DiskImage
        do { image = try DiskOpener.open(pathOnHost, readOnly: block.isReadOnly) } catch {
            throw ConfigError("drive `\(driveID)`: \(error)")
        }
        block.replaceImage(image)
    }

    /// Queues console input for the guest's serial port.
    public func sendSerialInput(_ bytes: [UInt8]) { serial.enqueueInput(bytes) }

    /// Whether the serial port still holds input the guest has not read (for back-pressure).
    public var serialInputBacklog: Int { serial.bufferedInputCount }

    private func runLoop(_ vcpu: VCPU) {
        KickSignal.unblockInCurrentThread()
        var wasParked = false
        while true {
            let (exit, paused) = control.state.withLock { c -> (Bool, Bool) in
                if c.paused != wasParked {
                    c.parked += c.paused ? 1 : -1
                    wasParked = c.paused
                }
                return (c.exit != nil, c.paused)
            }
            if exit { return }
            if paused {
                Host.sleep(microseconds: 1000)
                continue
            }
            let result: VCPUExit
            do {
                result = try vcpu.run()
            } catch {
                requestExit(.failure("\(error)"))
                return
            }
            switch result {
            case .ioOut(let port, let size, let data):
                var offset = 0
                while offset + size <= data.count {
                    portBus.write(UInt64(port), data: Array(data[offset..<offset + size]))
                    offset += size
                }
            case .ioIn(let port, let size, let count):
                var bytes: [UInt8] = []
                bytes.reserveCapacity(size * count)
                for _ in 0..<count { bytes += portBus.read(UInt64(port), size: size) }
                vcpu.completeIORead(bytes)
            case .mmioWrite(let address, let data):
                mmioBus.write(address, data: data)
            case .mmioRead(let address, let length):
                vcpu.completeMMIORead(mmioBus.read(address, size: length))
            case .interrupted:
                vcpu.requestImmediateExit(false)
            case .hlt:
                requestExit(.failure("vCPU \(vcpu.id) halted with interrupts it can never receive"))
            case .shutdown:
                let rip = (try? vcpu.registers().rip) ?? 0
                requestExit(.tripleFault(vcpu: vcpu.id, rip: rip))
            case .systemEvent(let type):
                requestExit(type == VCPU.systemEventReset ? .reset : .powerOff)
            case .internalError(let suberror):
                let rip = (try? vcpu.registers().rip) ?? 0
                requestExit(
                    .failure("KVM internal error \(suberror) on vCPU \(vcpu.id) at rip 0x\(String(rip, radix: 16)) (an instruction KVM could not emulate)"))
            case .failEntry(let reason):
                requestExit(.failure("KVM could not enter vCPU \(vcpu.id): hardware reason 0x\(String(reason, radix: 16))"))
            case .unknown(let reason):
                requestExit(.failure("vCPU \(vcpu.id) exited for an unhandled reason \(reason)"))
            }
        }
    }
}
