// LinuxSystem (layer 1): anonymous and shared memory mappings.
import Glibc

/// A memory mapping owned by this object and unmapped when it is released.
///
/// The mapping's address is exposed as an integer so that callers above this layer never
/// hold raw pointers; `GuestMemory` turns it back into checked accesses.
public final class MappedRegion: @unchecked Sendable {
    // SAFETY: the base pointer is immutable after init and the mapping lives until deinit;
    // concurrent access to the bytes themselves is the caller's protocol (guest memory is
    // shared with the guest's vCPUs by design).
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of zeroed, private, anonymous memory that is not reserved up front.
    public init(anonymousSize size: Int) throws(SystemError) {
        guard size > 0 else { throw SystemError(call: "mmap", subject: "0 bytes", errno: EINVAL) }
        let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw SystemError(call: "mmap", subject: "\(size) bytes of anonymous memory", errno: Glibc.errno)
        }
        self.base = pointer
        self.size = size
    }

    /// Maps `size` bytes of `fd` shared, at offset 0 (used for the vCPU's `kvm_run` area).
    public init(sharedFileDescriptor fd: Int32, size: Int) throws(SystemError) {
        let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw SystemError(call: "mmap", subject: "descriptor \(fd)", errno: Glibc.errno)
        }
        self.base = pointer
        self.size = size
    }

    /// The mapping's address as an integer, for KVM's user memory region.
    public var address: UInt64 { UInt64(UInt(bitPattern: base)) }

    deinit {
        munmap(base, size)
    }
}
