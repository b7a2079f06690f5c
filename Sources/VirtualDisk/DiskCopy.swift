// VirtualDisk (layer 2): copying one image's contents into another (convert), through a few reused
// buffers, leaving zero ranges unwritten so that a fresh target stays thin.
import Dispatch
import Synchronization

public enum DiskCopy {
    /// Bytes read per step.
    public static let chunkSize = 1 << 20
    /// Zero detection granularity inside a chunk: all-zero runs this long are not written.
    public static let zeroGranularity = 64 << 10

    /// Buffers in flight between the reading and the writing thread.
    static let depth = 4

    /// One chunk buffer, owned by exactly one thread at a time.
    final class Chunk: @unchecked Sendable {
        // SAFETY (Sendable): the reading thread fills it only after taking a `free` permit, and
        // the writing thread uses it only in the block that the reader enqueued after filling
        // it; the permit is returned when that block ends. Never touched by both at once.
        var bytes = [UInt8](repeating: 0, count: DiskCopy.chunkSize)
        var offset: UInt64 = 0
        var count = 0
    }

    /// Copies `source` into `target`, which must be freshly created (reading as zeros) and at
    /// least as large. Ranges the source maps as zero are skipped without reading; data ranges
    /// are read a chunk at a time and only their non-zero 64 KiB pieces are written. Reading
    /// and writing overlap: this thread reads while a second one writes the previous chunks.
    /// `progress(done, total)` is called after every chunk.
    public static func copyData(from source: any DiskImage, to target: any DiskImage, progress: (UInt64, UInt64) -> Void) throws {
        let size = source.virtualSize
        guard target.virtualSize >= size else {
            throw DiskError("\(target.path) (\(target.virtualSize) bytes) is smaller than \(source.path) (\(size) bytes)")
        }
        let writer = DispatchQueue(label: "nimbus.disk-copy.writer")
        let free = DispatchSemaphore(value: depth)
        let failure = Mutex<(any Error)?>(nil)
        let chunks = (0..<depth).map { _ in Chunk() }
        var next = 0
        var done: UInt64 = 0
        func readAll() throws {
            for extent in try source.map(at: 0, length: size) {
                if extent.zero && !extent.data {
                    done += extent.length
                    progress(done, size)
                    continue
                }
                var at = extent.start
                let end = extent.start + extent.length
                while at < end {
                    free.wait()
                    // A dispatch semaphore must be back at its initial value when it is freed: a
                    // permit not handed to the writer is returned on the way out.
                    var handedOver = false
                    defer { if !handedOver { free.signal() } }
                    if let error = failure.withLock({ $0 }) { throw error }
                    let chunk = chunks[next % depth]
                    next += 1
                    chunk.offset = at
                    chunk.count = Int(min(UInt64(chunkSize), end - at))
                    try chunk.bytes.withUnsafeMutableBytes { raw in
                        try source.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<chunk.count]), at: chunk.offset)
                    }
                    handedOver = true
                    writer.async {
                        defer { free.signal() }
                        guard failure.withLock({ $0 == nil }) else { return }
                        do {
                            try chunk.bytes.withUnsafeBytes { raw in
                                try writeNonZeroRuns(UnsafeRawBufferPointer(rebasing: raw[0..<chunk.count]), to: target, at: chunk.offset)
                            }
                        } catch {
                            failure.withLock { $0 = error }
                        }
                    }
                    at += UInt64(chunk.count)
                    done += UInt64(chunk.count)
                    progress(done, size)
                }
            }
        }
        // Every enqueued write ends before the buffers go away and before any error is reported.
        var readError: (any Error)?
        do { try readAll() } catch { readError = error }
        writer.sync {}
        if let error = failure.withLock({ $0 }) ?? readError { throw error }
    }

    /// Writes the pieces of `data` (cut at `zeroGranularity`) that hold a non-zero byte, joining
    /// neighbours into one write.
    static func writeNonZeroRuns(_ data: UnsafeRawBufferPointer, to target: any DiskImage, at offset: UInt64) throws {
        var runStart: Int?
        var piece = 0
        while piece < data.count {
            let pieceEnd = min(piece + zeroGranularity, data.count)
            let zero = isAllZero(UnsafeRawBufferPointer(rebasing: data[piece..<pieceEnd]))
            if zero, let start = runStart {
                try target.write(from: UnsafeRawBufferPointer(rebasing: data[start..<piece]), at: offset + UInt64(start))
                runStart = nil
            } else if !zero && runStart == nil {
                runStart = piece
            }
            piece = pieceEnd
        }
        if let start = runStart {
            try target.write(from: UnsafeRawBufferPointer(rebasing: data[start..<data.count]), at: offset + UInt64(start))
        }
    }

    /// Whether every byte of `bytes` is zero, checked eight bytes at a time.
    public static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        var i = 0
        while i < words {
            if bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
            i += 1
        }
        for j in (words * 8)..<bytes.count where bytes[j] != 0 { return false }
        return true
    }

    /// Whether every byte of `bytes` is zero.
    public static func isAllZero(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { isAllZero($0) }
    }
}
