// NBD (layer 2): removing the Unix socket file on shutdown.
import LinuxSystem

enum UnixSocketCleanup {
    static func remove(_ path: String) { UnixSocketPath.remove(path) }
}
