// KVM (layer 1): one KVM virtual machine: memory slots, irqchip, PIT, interrupts, vCPUs.
import CNimbusLinux
import Glibc
import LinuxSystem

/// A KVM virtual machine file descriptor and what hangs off it.
public final class VirtualMachine: Sendable {
    let fd: OwnedFileDescriptor
    let kvm: KVM

    init(fd: OwnedFileDescriptor, kvm: KVM) {
        self.fd = fd
        self.kvm = kvm
    }

    /// Registers host memory at `hostAddress` as guest-physical `[guestAddress, guestAddress+size)`.
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UInt64) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: guestAddress, memory_size: size, userspace_addr: hostAddress)
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_USER_MEMORY_REGION", NIMBUS_KVM_SET_USER_MEMORY_REGION, &region)
    }

    /// Places the three pages KVM needs for real-mode emulation on Intel (harmless elsewhere).
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_TSS_ADDR", NIMBUS_KVM_SET_TSS_ADDR, value: UInt(address))
    }

    /// Places the identity-map page KVM needs on Intel without unrestricted guests.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var value = address
        _ = try kvmIoctl(fd.rawValue, "KVM_SET_IDENTITY_MAP_ADDR", NIMBUS_KVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// Creates the in-kernel PIC, IOAPIC and local APICs.
    public func createIRQChip() throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, "KVM_CREATE_IRQCHIP", NIMBUS_KVM_CREATE_IRQCHIP, value: 0)
    }

    /// Creates the in-kernel i8254 PIT (with a dummy speaker port).
    public func createPIT() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = NIMBUS_KVM_PIT_SPEAKER_DUMMY
        _ = try kvmIoctl(fd.rawValue, "KVM_CREATE_PIT2", NIMBUS_KVM_CREATE_PIT2, &config)
    }

    /// Sets the level of interrupt line `gsi`.
    public func setIRQLine(_ gsi: UInt32, level: Bool) throws(KVMError) {
        var irq = kvm_irq_level()
        irq.irq = gsi
        irq.level = level ? 1 : 0
        _ = try kvmIoctl(fd.rawValue, "KVM_IRQ_LINE", NIMBUS_KVM_IRQ_LINE, &irq)
    }

    /// Makes every signal of `eventfd` inject an edge on `gsi`.
    public func registerIRQFD(_ eventfd: EventFD, gsi: UInt32) throws(KVMError) {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: eventfd.rawValue)
        request.gsi = gsi
        _ = try kvmIoctl(fd.rawValue, "KVM_IRQFD", NIMBUS_KVM_IRQFD, &request)
    }

    /// Makes guest writes of `length` bytes to MMIO `address` (of the value `datamatch`, when
    /// given) signal `eventfd` instead of exiting.
    public func registerIOEventFD(_ eventfd: EventFD, mmioAddress address: UInt64, length: UInt32, datamatch: UInt64? = nil) throws(KVMError) {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = eventfd.rawValue
        if let datamatch {
            request.datamatch = datamatch
            request.flags = NIMBUS_KVM_IOEVENTFD_FLAG_DATAMATCH
        }
        _ = try kvmIoctl(fd.rawValue, "KVM_IOEVENTFD", NIMBUS_KVM_IOEVENTFD, &request)
    }

    /// Creates vCPU `id`, mapping its `kvm_run` area.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let vcpufd = try kvmIoctl(fd.rawValue, "KVM_CREATE_VCPU", NIMBUS_KVM_CREATE_VCPU, value: UInt(id))
        let owned = OwnedFileDescriptor(taking: vcpufd)
        do {
            let run = try MappedRegion(sharedFileDescriptor: vcpufd, size: kvm.vcpuMmapSize)
            return VCPU(id: id, fd: owned, run: run)
        } catch {
            throw .system(error)
        }
    }
}
