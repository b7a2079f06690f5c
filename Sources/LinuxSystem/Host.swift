// LinuxSystem (layer 1): facts about the host machine.
import CNimbusLinux
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

    /// Wall-clock time in milliseconds since the Unix epoch.
    public static func wallClockMilliseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
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

/// Space on the file system holding a path.
public struct FileSystemSpace: Sendable {
    public let totalBytes: UInt64
    public let availableBytes: UInt64
}

/// statvfs(2) for `path`.
public func fileSystemSpace(_ path: String) throws(SystemError) -> FileSystemSpace {
    var s = statvfs()
    try syscallOnce("statvfs", subject: path) { statvfs(path, &s) }
    return FileSystemSpace(totalBytes: UInt64(s.f_blocks) * UInt64(s.f_frsize), availableBytes: UInt64(s.f_bavail) * UInt64(s.f_frsize))
}

/// Names of the entries of a directory (without "." and "..").
public func directoryEntries(_ path: String) throws(SystemError) -> [String] {
    guard let dir = opendir(path) else { throw SystemError(call: "opendir", subject: path, errno: errno) }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            // SAFETY: d_name is a NUL-terminated array inside the dirent readdir returned.
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// Creates a directory (and its parents) if it does not exist.
public func makeDirectories(_ path: String) throws(SystemError) {
    var current = path.hasPrefix("/") ? "" : "."
    for part in path.split(separator: "/") {
        current += "/" + part
        if mkdir(current, 0o755) != 0 && errno != EEXIST { throw SystemError(call: "mkdir", subject: current, errno: errno) }
    }
}

extension Host {
    /// Makes glibc keep large buffers (up to 64 MiB) on its heap instead of mapping and unmapping
    /// each one: a disk tool that allocates a 1 MiB buffer per chunk otherwise spends most of its
    /// time in page faults.
    public static func keepLargeAllocationsOnHeap() {
        nimbus_keep_allocations_on_heap(64 << 20)
    }
}

extension OwnedFileDescriptor {
    /// The data (non-hole) ranges of the file within `[from, to)`, from SEEK_DATA/SEEK_HOLE;
    /// nil when the file system cannot tell.
    public func dataRanges(from: Int, to: Int) -> [Range<Int>]? {
        var result: [Range<Int>] = []
        var at = from
        while at < to {
            let data = nimbus_seek_data_or_hole(rawValue, Int64(at), 1)
            if data < 0 { return errno == ENXIO ? result : nil }
            if Int(data) >= to { break }
            let hole = nimbus_seek_data_or_hole(rawValue, data, 0)
            if hole < 0 { return nil }
            result.append(Int(data)..<min(Int(hole), to))
            at = Int(hole)
        }
        return result
    }
}
