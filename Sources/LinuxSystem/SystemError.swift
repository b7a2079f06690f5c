// LinuxSystem (layer 1): errors from system calls, carrying the call's name and errno.
import Glibc

/// A failed system call: which call, on what, and the errno it returned.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The system call or library function that failed, e.g. `ioctl(KVM_RUN)`.
    public let call: String
    /// What the call was acting on, e.g. a path; may be empty.
    public let subject: String
    /// The errno value.
    public let errno: Int32

    public init(call: String, subject: String = "", errno: Int32) {
        self.call = call
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        let reason = String(cString: strerror(errno))
        return subject.isEmpty ? "\(call) failed: \(reason) (errno \(errno))" : "\(call) on \(subject) failed: \(reason) (errno \(errno))"
    }
}

/// Runs a system call that returns -1 and sets errno on failure, retrying on EINTR.
@discardableResult
public func retryingSyscall<T: FixedWidthInteger>(
    _ call: @autoclosure () -> String, subject: @autoclosure () -> String = "", _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(call: call(), subject: subject(), errno: code)
    }
}

/// Runs a system call once; EINTR is reported to the caller as an error like any other.
@discardableResult
public func syscallOnce<T: FixedWidthInteger>(
    _ call: @autoclosure () -> String, subject: @autoclosure () -> String = "", _ body: () -> T
) throws(SystemError) -> T {
    let result = body()
    if result != -1 { return result }
    throw SystemError(call: call(), subject: subject(), errno: Glibc.errno)
}
