// LinuxSystem (layer 1): facts about the host machine.
import Glibc

public enum Host {
    /// Physical RAM of the host in bytes.
    public static var memoryBytes: UInt64 {
        UInt64(max(0, sysconf(Int32(_SC_PHYS_PAGES)))) * UInt64(max(0, sysconf(Int32(_SC_PAGESIZE))))
    }

    /// Monotonic time in nanoseconds.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Sleeps the calling thread for `microseconds`.
    public static func sleep(microseconds: UInt32) {
        usleep(microseconds)
    }
}

/// Helpers for Unix socket paths.
public enum UnixSocketPath {
    /// Removes `path` if it is a socket no process listens on; fails if it is anything else.
    public static func removeStale(_ path: String) throws(SystemError) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else { throw SystemError(call: "bind", subject: "\(path) (exists and is not a socket)", errno: EEXIST) }
        unlink(path)
    }

    public static func remove(_ path: String) { unlink(path) }
}
