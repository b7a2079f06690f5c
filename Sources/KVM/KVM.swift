// KVM (layer 1): the only caller of KVM ioctls. `KVM` → `VirtualMachine` → `VCPU`.
import CNimbusLinux
import Glibc
import LinuxSystem

/// Something KVM refused or could not do, with the operation and the reason.
public enum KVMError: Error, CustomStringConvertible, Sendable {
    case system(SystemError)
    case unsupported(String)
    case apiVersion(Int32)

    public var description: String {
        switch self {
        case .system(let error): return "KVM: \(error)"
        case .unsupported(let what): return "KVM on this host does not support \(what)"
        case .apiVersion(let v): return "KVM API version \(v) is not the expected \(NIMBUS_KVM_API_VERSION)"
        }
    }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ name: String, _ request: UInt, _ argument: UnsafeMutableRawPointer?) throws(KVMError) -> Int32 {
    do {
        return try retryingSyscall("ioctl(\(name))") { nimbus_ioctl_ptr(fd, request, argument) }
    } catch {
        throw .system(error)
    }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ name: String, _ request: UInt, value: UInt) throws(KVMError) -> Int32 {
    do {
        return try retryingSyscall("ioctl(\(name))") { nimbus_ioctl_val(fd, request, value) }
    } catch {
        throw .system(error)
    }
}

/// One CPUID leaf as KVM reports and accepts it.
public struct CPUIDEntry: Sendable, Equatable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the leaf has sub-leaves selected by ECX.
    public static let significantIndex: UInt32 = 1
}

/// The host's KVM: `/dev/kvm`.
public final class KVM: Sendable {
    let fd: OwnedFileDescriptor
    /// Size of each vCPU's shared `kvm_run` area.
    public let vcpuMmapSize: Int

    /// Opens `/dev/kvm` (or `path`) and checks the API version and the capabilities Nimbus needs.
    public init(path: String = "/dev/kvm") throws {
        do {
            fd = try OwnedFileDescriptor.open(path, flags: O_RDWR)
        } catch {
            throw KVMError.system(error)
        }
        let version = try kvmIoctl(fd.rawValue, "KVM_GET_API_VERSION", NIMBUS_KVM_GET_API_VERSION, value: 0)
        guard version == NIMBUS_KVM_API_VERSION else { throw KVMError.apiVersion(version) }
        let required: [(Int32, String)] = [
            (NIMBUS_KVM_CAP_USER_MEMORY, "user memory regions"),
            (NIMBUS_KVM_CAP_IRQCHIP, "an in-kernel irqchip"),
            (NIMBUS_KVM_CAP_SET_TSS_ADDR, "KVM_SET_TSS_ADDR"),
            (NIMBUS_KVM_CAP_EXT_CPUID, "KVM_GET_SUPPORTED_CPUID"),
            (NIMBUS_KVM_CAP_IRQFD, "irqfd"),
            (NIMBUS_KVM_CAP_IOEVENTFD, "ioeventfd"),
            (NIMBUS_KVM_CAP_IMMEDIATE_EXIT, "immediate_exit"),
        ]
        for (cap, name) in required where try kvmIoctl(fd.rawValue, "KVM_CHECK_EXTENSION", NIMBUS_KVM_CHECK_EXTENSION, value: UInt(cap)) <= 0 {
            throw KVMError.unsupported(name)
        }
        vcpuMmapSize = Int(try kvmIoctl(fd.rawValue, "KVM_GET_VCPU_MMAP_SIZE", NIMBUS_KVM_GET_VCPU_MMAP_SIZE, value: 0))
    }

    /// The largest number of vCPUs one VM may have on this host.
    public func maxVCPUs() -> Int {
        let max = (try? kvmIoctl(fd.rawValue, "KVM_CHECK_EXTENSION", NIMBUS_KVM_CHECK_EXTENSION, value: UInt(NIMBUS_KVM_CAP_MAX_VCPUS))) ?? 0
        if max > 0 { return Int(max) }
        let recommended = (try? kvmIoctl(fd.rawValue, "KVM_CHECK_EXTENSION", NIMBUS_KVM_CHECK_EXTENSION, value: UInt(NIMBUS_KVM_CAP_NR_VCPUS))) ?? 4
        return Int(recommended > 0 ? recommended : 4)
    }

    /// The CPUID leaves this host's KVM can expose to a guest.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity: UInt32 = 128
        while true {
            guard let cpuid = nimbus_cpuid2_alloc(capacity) else { throw .system(SystemError(call: "calloc", errno: ENOMEM)) }
            defer { free(cpuid) }
            let result = nimbus_ioctl_ptr(fd.rawValue, NIMBUS_KVM_GET_SUPPORTED_CPUID, cpuid)
            if result < 0 {
                if errno == E2BIG && capacity < 4096 { capacity *= 2; continue }
                throw .system(SystemError(call: "ioctl(KVM_GET_SUPPORTED_CPUID)", errno: errno))
            }
            let entries = nimbus_cpuid2_entries(cpuid)
            // SAFETY: KVM wrote `nent` entries into the array we allocated with `capacity` slots.
            return (0..<Int(cpuid.pointee.nent)).map { i in
                let e = entries.advanced(by: i).pointee
                return CPUIDEntry(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
            }
        }
    }

    /// Creates a new, empty virtual machine.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let vmfd = try kvmIoctl(fd.rawValue, "KVM_CREATE_VM", NIMBUS_KVM_CREATE_VM, value: 0)
        return VirtualMachine(fd: OwnedFileDescriptor(taking: vmfd), kvm: self)
    }
}
