// LinuxSystem (layer 1): the controlling terminal, put in raw mode while a guest console owns it.
import Glibc

public enum Terminal {
    /// Whether `fd` is a terminal.
    public static func isTerminal(_ fd: Int32) -> Bool { isatty(fd) == 1 }

    /// Puts `fd` in raw mode (no echo, no line editing, no signals from keys) and returns the
    /// previous settings for `restore`. Returns nil if `fd` is not a terminal.
    public static func makeRaw(_ fd: Int32) -> termios? {
        var original = termios()
        guard isatty(fd) == 1, tcgetattr(fd, &original) == 0 else { return nil }
        var raw = original
        cfmakeraw(&raw)
        raw.c_oflag |= tcflag_t(OPOST | ONLCR)  // keep host newline translation for our own messages
        _ = tcsetattr(fd, TCSANOW, &raw)
        return original
    }

    public static func restore(_ fd: Int32, _ settings: termios) {
        var s = settings
        _ = tcsetattr(fd, TCSANOW, &s)
    }
}

extension OwnedFileDescriptor {
    /// A new descriptor for the same open file as `fd` (e.g. stdout), owned by the result.
    public static func duplicate(_ fd: Int32) throws(SystemError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try syscallOnce("dup") { fcntl(fd, F_DUPFD_CLOEXEC, 0) })
    }
}

/// Ends the process at once with `status` (no unwinding), after the caller has cleaned up.
public func exitProcess(_ status: Int32) -> Never {
    exit(status)
}
