// LinuxSystem (layer 1): an owned file descriptor that closes itself.
import CNimbusLinux
import Glibc

/// A file descriptor owned by this object and closed when it is released.
public final class OwnedFileDescriptor: Sendable {
    /// The raw descriptor number. Valid for the lifetime of this object.
    public let rawValue: Int32

    /// Takes ownership of `rawValue`.
    public init(taking rawValue: Int32) {
        self.rawValue = rawValue
    }

    deinit {
        _ = Glibc.close(rawValue)
    }

    /// Opens `path` with `flags` (O_CLOEXEC is always added).
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws(SystemError) -> OwnedFileDescriptor {
        let fd = try retryingSyscall("open", subject: path) { Glibc.open(path, flags | O_CLOEXEC, mode) }
        return OwnedFileDescriptor(taking: fd)
    }

    /// Opens `path` for reading.
    public static func openReadOnly(_ path: String) throws(SystemError) -> OwnedFileDescriptor {
        try open(path, flags: O_RDONLY)
    }

    /// Writes all of `bytes`, retrying short writes and EINTR.
    public func writeAll(_ bytes: [UInt8]) throws(SystemError) {
        var offset = 0
        while offset < bytes.count {
            let written = try retryingSyscall("write") {
                bytes.withUnsafeBytes { buffer in
                    // SAFETY: the pointer and count come from a live array buffer and stay in bounds.
                    Glibc.write(rawValue, buffer.baseAddress?.advanced(by: offset), buffer.count - offset)
                }
            }
            offset += written
        }
    }

    /// Reads up to `count` bytes; an empty result means end of file.
    public func read(upTo count: Int) throws(SystemError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        let got = try retryingSyscall("read") {
            buffer.withUnsafeMutableBytes { raw in
                // SAFETY: reading at most raw.count bytes into a buffer we own.
                Glibc.read(rawValue, raw.baseAddress, raw.count)
            }
        }
        buffer.removeLast(count - got)
        return buffer
    }
}

/// Reads a whole regular file into memory.
public func readWholeFile(_ path: String, limit: Int = 1 << 31) throws(SystemError) -> [UInt8] {
    let fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY)
    var info = stat()
    try syscallOnce("fstat", subject: path) { fstat(fd.rawValue, &info) }
    if (info.st_mode & S_IFMT) == S_IFDIR {
        throw SystemError(call: "read", subject: path, errno: EISDIR)
    }
    let size = Int(info.st_size)
    if size > limit { throw SystemError(call: "read", subject: path, errno: EFBIG) }
    var result = [UInt8](repeating: 0, count: size)
    var offset = 0
    while offset < size {
        let got = try retryingSyscall("pread", subject: path) {
            result.withUnsafeMutableBytes { raw in
                // SAFETY: the destination range [offset, size) lies inside the array we own.
                Glibc.pread(fd.rawValue, raw.baseAddress?.advanced(by: offset), size - offset, off_t(offset))
            }
        }
        if got == 0 { break }
        offset += got
    }
    if offset < size { result.removeLast(size - offset) }
    return result
}

/// The size of a file in bytes, without reading it.
public func fileSize(_ path: String) throws(SystemError) -> UInt64 {
    var info = stat()
    try syscallOnce("stat", subject: path) { stat(path, &info) }
    return UInt64(info.st_size)
}

extension OwnedFileDescriptor {
    /// Size of the open file in bytes.
    public func size() throws(SystemError) -> Int {
        var info = stat()
        try syscallOnce("fstat") { fstat(rawValue, &info) }
        if (info.st_mode & S_IFMT) == S_IFDIR { throw SystemError(call: "read", subject: "a directory", errno: EISDIR) }
        return Int(info.st_size)
    }

    /// Fills `buffer` from the file at `offset`; fails with EIO if the file ends first.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let got = try retryingSyscall("pread") {
                // SAFETY: writes at most buffer.count - done bytes inside `buffer`.
                Glibc.pread(rawValue, buffer.baseAddress?.advanced(by: done), buffer.count - done, off_t(offset + done))
            }
            if got == 0 { throw SystemError(call: "pread", subject: "offset \(offset + done) (file ended early)", errno: EIO) }
            done += got
        }
    }

    /// Reads exactly `count` bytes at `offset`.
    public func read(_ count: Int, at offset: Int) throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: SystemError?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(SystemError) { try readFully(into: buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }
}

extension OwnedFileDescriptor {
    /// Opens (and with `create`, creates or truncates) a file for reading and writing.
    public static func openReadWrite(_ path: String, create: Bool = false, exclusive: Bool = false) throws(SystemError) -> OwnedFileDescriptor {
        var flags = O_RDWR
        if create { flags |= O_CREAT | (exclusive ? O_EXCL : O_TRUNC) }
        return try open(path, flags: flags)
    }

    /// Writes all of `buffer` at `offset`.
    public func writeFully(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let wrote = try retryingSyscall("pwrite") {
                // SAFETY: reads at most buffer.count - done bytes inside `buffer`.
                Glibc.pwrite(rawValue, buffer.baseAddress?.advanced(by: done), buffer.count - done, off_t(offset + done))
            }
            done += wrote
        }
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: Int) throws(SystemError) {
        var failure: SystemError?
        bytes.withUnsafeBytes { buffer in
            do throws(SystemError) { try writeFully(buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Reads up to `count` bytes at `offset`; bytes past the end of the file read as zero.
    public func readZeroFilled(_ count: Int, at offset: Int) throws(SystemError) -> [UInt8] {
        var failure: SystemError?
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            var done = 0
            while done < count {
                // SAFETY: writes at most count - done bytes inside the array's fresh storage.
                let got = Glibc.pread(rawValue, buffer.baseAddress?.advanced(by: done), count - done, off_t(offset + done))
                if got < 0 {
                    if errno == EINTR { continue }
                    failure = SystemError(call: "pread", subject: "offset \(offset + done)", errno: errno)
                    break
                }
                if got == 0 { break }
                done += got
            }
            // Only the part past the end of the file is zeroed: no memset of what pread fills.
            UnsafeMutableBufferPointer(rebasing: buffer[done...]).initialize(repeating: 0)
            initialized = count
        }
        if let failure { throw failure }
        return bytes
    }

    /// Flushes the file's data and metadata to stable storage.
    public func sync() throws(SystemError) {
        try retryingSyscall("fsync") { fsync(rawValue) }
    }

    /// Sets the file's length.
    public func truncate(to length: Int) throws(SystemError) {
        try retryingSyscall("ftruncate") { ftruncate(rawValue, off_t(length)) }
    }

    /// Bytes the file occupies on disk (st_blocks × 512).
    public func allocatedBytes() throws(SystemError) -> UInt64 {
        var info = stat()
        try syscallOnce("fstat") { fstat(rawValue, &info) }
        return UInt64(info.st_blocks) * 512
    }

    /// Punches a hole (deallocates) `[offset, offset+length)`, keeping the size. Returns false
    /// when the filesystem cannot.
    @discardableResult
    public func punchHole(at offset: Int, length: Int) -> Bool {
        nimbus_punch_hole(rawValue, Int64(offset), Int64(length)) == 0
    }
}

/// The canonical absolute path of an existing file.
public func realPath(_ path: String) throws(SystemError) -> String {
    guard let resolved = realpath(path, nil) else { throw SystemError(call: "realpath", subject: path, errno: errno) }
    defer { free(resolved) }
    return String(cString: resolved)
}

/// Atomically replaces `to` with `from` (rename(2)).
public func renameFile(_ from: String, to: String) throws(SystemError) {
    try syscallOnce("rename", subject: "\(from) -> \(to)") { rename(from, to) }
}

/// Removes a file; a missing file is not an error.
public func removeFile(_ path: String) {
    unlink(path)
}

/// True if `path` names an existing file or directory (symbolic links followed).
public func fileExists(_ path: String) -> Bool {
    access(path, F_OK) == 0
}
