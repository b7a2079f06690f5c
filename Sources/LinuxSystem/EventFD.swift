// LinuxSystem (layer 1): eventfd, used for irqfd interrupts and ioeventfd notifications.
import CNimbusLinux
import Glibc

/// A Linux eventfd counter.
public final class EventFD: Sendable {
    public let descriptor: OwnedFileDescriptor

    public init(nonBlocking: Bool = false) throws(SystemError) {
        let flags = Int32(EFD_CLOEXEC) | (nonBlocking ? Int32(EFD_NONBLOCK) : 0)
        let fd = try syscallOnce("eventfd") { eventfd(0, flags) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    public var rawValue: Int32 { descriptor.rawValue }

    /// Adds `value` to the counter, waking readers.
    public func signal(_ value: UInt64 = 1) throws(SystemError) {
        var v = value
        // SAFETY: writes exactly 8 bytes from a local.
        try retryingSyscall("write(eventfd)") { Glibc.write(descriptor.rawValue, &v, 8) }
    }

    /// Reads and resets the counter (blocks unless non-blocking).
    public func wait() throws(SystemError) -> UInt64 {
        var v: UInt64 = 0
        // SAFETY: reads exactly 8 bytes into a local.
        try retryingSyscall("read(eventfd)") { Glibc.read(descriptor.rawValue, &v, 8) }
        return v
    }
}
