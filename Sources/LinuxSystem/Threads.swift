// LinuxSystem (layer 1): native threads for vCPUs and the signal used to kick them.
import CNimbusLinux
import Glibc

/// A joinable POSIX thread running a Swift closure.
public final class NativeThread: @unchecked Sendable {
    // SAFETY: `handle` is written once in `start` before any other thread can observe this
    // object, and read only by `join`/`kick`, which are called after `start` returns.
    private var handle = pthread_t()

    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    private init() {}

    /// Starts a thread named `name` (at most 15 bytes are kept) running `body`.
    public static func start(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) -> NativeThread {
        let thread = NativeThread()
        let threadName = String(name.prefix(15))
        let box = Unmanaged.passRetained(
            Box({
                nimbus_set_thread_name(threadName)
                body()
            })
        ).toOpaque()
        let result = pthread_create(
            &thread.handle, nil,
            { argument in
                // SAFETY: `argument` is the retained Box passed below; we balance the retain here.
                guard let argument else { return nil }
                let box = Unmanaged<Box>.fromOpaque(argument).takeRetainedValue()
                box.body()
                return nil
            }, box)
        if result != 0 {
            // SAFETY: the thread was not created, so the retain is ours to release.
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError(call: "pthread_create", subject: name, errno: result)
        }
        return thread
    }

    /// Lets the thread's resources go when it ends, for a thread nobody will join.
    public func detach() {
        _ = pthread_detach(handle)
    }

    /// Waits for the thread to finish.
    public func join() {
        _ = pthread_join(handle, nil)
    }

    /// Sends the kick signal to the thread, interrupting a blocking system call with EINTR.
    public func kick() {
        _ = pthread_kill(handle, KickSignal.number)
    }
}

/// The real-time signal used to interrupt a vCPU thread's KVM_RUN.
public enum KickSignal {
    public static var number: Int32 { nimbus_sigrtmin() }

    /// Installs the no-op handler; call once at startup, before vCPU threads exist.
    public static func install() throws(SystemError) {
        try syscallOnce("sigaction", subject: "SIGRTMIN") { nimbus_install_kick_handler(number) }
    }

    /// Makes sure the calling thread can receive the kick signal: a process may inherit it
    /// blocked from its parent, and then a vCPU waiting in KVM_RUN could never be stopped.
    public static func unblockInCurrentThread() {
        _ = nimbus_unblock_signal(number)
    }
}
