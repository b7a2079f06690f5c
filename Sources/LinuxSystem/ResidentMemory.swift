// LinuxSystem (layer 1): handing a long-running process's code pages back to the kernel once
// start-up is over, so that its resident set is the code it keeps running.
import Glibc

/// What `Host.releaseCodePages` did.
public struct ReleasedCodePages: Sendable, Equatable {
    /// Read-only file mappings advised.
    public var mappings = 0
    /// Their total size in bytes (mapped, not necessarily resident).
    public var bytes = 0
}

/// One line of /proc/self/maps.
public struct MemoryMapping: Sendable, Equatable {
    public var start: UInt
    public var end: UInt
    public var readable: Bool
    public var writable: Bool
    public var executable: Bool
    public var inode: UInt64
    public var path: String

    /// Parses a line such as `55d0c3959000-55d0c5b2e000 r-xp 00000000 fe:00 5326693  /usr/bin/x`;
    /// nil for a line of another shape.
    public init?(line: Substring) {
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count >= 5 else { return nil }
        let range = fields[0].split(separator: "-")
        guard range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16), start < end else { return nil }
        let perms = Array(fields[1].utf8)
        guard perms.count == 4, let inode = UInt64(fields[4]) else { return nil }
        self.start = start
        self.end = end
        readable = perms[0] == UInt8(ascii: "r")
        writable = perms[1] == UInt8(ascii: "w")
        executable = perms[2] == UInt8(ascii: "x")
        self.inode = inode
        path = fields.count > 5 ? String(fields[5].drop { $0 == " " }) : ""
    }

    /// Read-only or executable pages of a file: what a process can hand back to the page cache
    /// without losing anything, since the file still holds them.
    public var isReadOnlyFileMapping: Bool { inode != 0 && path.hasPrefix("/") && !writable && (readable || executable) }
}

extension Host {
    /// The process's memory mappings, from /proc/self/maps.
    public static func memoryMappings() throws(SystemError) -> [MemoryMapping] {
        let fd = try OwnedFileDescriptor.openReadOnly("/proc/self/maps")
        var text: [UInt8] = []
        while true {
            let chunk = try fd.read(upTo: 64 << 10)
            if chunk.isEmpty { break }
            text += chunk
        }
        return String(decoding: text, as: UTF8.self).split(separator: "\n").compactMap { MemoryMapping(line: $0) }
    }

    /// Hands the pages of the process's read-only file mappings (its code and constant data, and
    /// the shared libraries') back to the kernel, and stops readahead on them.
    ///
    /// The kernel maps a file page with the 15 cached pages around it (fault-around) and reads
    /// ahead around every fault, so a program that has run 2 MiB of scattered code keeps 20 MiB
    /// of its binary resident. After this call the process maps none of those pages (MADV_PAGEOUT),
    /// the program file's pages that no other process maps leave the page cache (fadvise
    /// DONTNEED), and later faults read just the page they need (MADV_RANDOM), so the resident
    /// set becomes the code that keeps running. Nothing is lost: the pages are clean copies of the file. The cost is a disk read
    /// the first time a page is needed again. Writable mappings are never touched.
    @discardableResult
    public static func releaseCodePages() -> ReleasedCodePages {
        var result = ReleasedCodePages()
        guard let mappings = try? memoryMappings() else { return result }
        // A program file written moments ago (just installed or linked) still has dirty pages in
        // the cache, and reclaim skips dirty pages: write them back first.
        let executable = try? OwnedFileDescriptor.openReadOnly("/proc/self/exe")
        if let executable { _ = fdatasync(executable.rawValue) }
        for mapping in mappings where mapping.isReadOnlyFileMapping {
            let length = Int(mapping.end - mapping.start)
            guard let address = UnsafeMutableRawPointer(bitPattern: mapping.start) else { continue }
            // SAFETY: the range is a whole mapping of this process, read from /proc/self/maps;
            // MADV_RANDOM and MADV_PAGEOUT only change readahead and reclaim clean file pages,
            // never the mapping's contents.
            _ = madvise(address, length, MADV_RANDOM)
            _ = madvise(address, length, madvisePageout)
            result.mappings += 1
            result.bytes += length
        }
        // Fault-around maps whatever neighbours are cached, so the program file's cached pages
        // that no process maps any more are dropped too (its own file only: shared libraries'
        // pages belong to every process on the host).
        if let executable { _ = posix_fadvise(executable.rawValue, 0, 0, POSIX_FADV_DONTNEED) }
        return result
    }

    /// MADV_PAGEOUT (Linux 5.4), absent from older C headers.
    static let madvisePageout: Int32 = 21
}
