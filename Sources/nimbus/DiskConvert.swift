// nimbus disk convert / map / compare.
import ArgumentParser
import Foundation
import VirtualDisk

extension Disk {
    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy an image into a new one of another (or the same) format.",
            discussion: "Zero and unallocated ranges stay unallocated in the target. -p shows progress.")
        @Option(name: .short, help: "Source format (probed when absent).") var f: String?
        @Option(name: .customShort("O"), help: "Target format: qcow2 or raw.") var outputFormat = "raw"
        @Option(name: .short, help: "Target options: cluster_size=N, compat=0.10|1.1, refcount_bits=N.") var o: [String] = []
        @Flag(name: .short, help: "Show a progress line.") var p = false
        @Flag(name: .short, help: "Compress the target's clusters (qcow2 only).") var c = false
        @Flag(help: "fsync the target before exiting (qemu-img's default cache mode, unsafe, does not).") var sync = false
        @Argument var source: String
        @Argument var target: String

        func run() throws {
            try reportingErrors {
                guard let format = try parseFormat(outputFormat) else { return }
                let src = try DiskOpener.open(source, format: try parseFormat(f), readOnly: true)
                let size = src.virtualSize
                switch format {
                case .raw: try RawImage.create(path: target, size: size)
                case .qcow2:
                    let options = try parseCreateOptions(o)
                    try QCOW2Image.create(path: target, size: size, options: options)
                }
                var progress = Progress(enabled: p)
                let dst = try DiskOpener.open(target, format: format)
                if c {
                    guard let q = dst as? QCOW2Image else { throw DiskError("-c needs the qcow2 target format") }
                    try Disk.convertCompressed(from: src, to: q, progress: &progress)
                    return
                }
                try DiskCopy.copyData(from: src, to: dst) { progress.update($0, of: $1) }
                if sync { try dst.flush() }
                progress.update(size, of: size)
            }
        }
    }

    /// Copies `src` into `dst` one cluster at a time, compressing every non-zero cluster.
    static func convertCompressed(from src: any DiskImage, to dst: QCOW2Image, progress: inout Progress) throws {
        let cs = UInt64(dst.currentHeader.clusterSize)
        let size = src.virtualSize
        var at: UInt64 = 0
        while at < size {
            let n = Int(min(cs, size - at))
            var bytes = try src.read(at: at, count: n)
            if !DiskCopy.isAllZero(bytes) {
                if n < Int(cs) {
                    try dst.write(bytes, at: at)
                } else {
                    try dst.writeCompressed(bytes, at: at)
                }
            }
            bytes.removeAll()
            at += UInt64(n)
            progress.update(at, of: size)
        }
    }

    struct MapCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "map", abstract: "Show where an image's data is (like qemu-img map).")
        @Option(name: .short, help: "Format (probed when absent).") var f: String?
        @Flag(help: "Print JSON like `qemu-img map --output=json`.") var json = false
        @Option(name: .customLong("output"), help: "human or json.") var output: String?
        @Argument var file: String

        func run() throws {
            try reportingErrors {
                let image = try DiskOpener.open(file, format: try parseFormat(f), readOnly: true)
                let extents = try image.map(at: 0, length: image.virtualSize)
                if json || output == "json" {
                    printJSON(
                        extents.map { e -> [String: Any] in
                            var d: [String: Any] = [
                                "start": e.start, "length": e.length, "depth": e.depth, "present": e.present, "zero": e.zero, "data": e.data,
                            ]
                            if let o = e.offset { d["offset"] = o }
                            return d
                        })
                } else {
                    print("Offset          Length          Mapped to       File")
                    for e in extents where e.data {
                        let hex = { (v: UInt64) in "0x" + String(v, radix: 16) }
                        print(
                            "\(hex(e.start).padding(toLength: 16, withPad: " ", startingAt: 0))\(hex(e.length).padding(toLength: 16, withPad: " ", startingAt: 0))\((e.offset.map(hex) ?? "-").padding(toLength: 16, withPad: " ", startingAt: 0))\(file)"
                        )
                    }
                }
            }
        }
    }

    struct Compare: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare the contents of two images.",
            discussion: "Exit status: 0 identical, 1 different, 2 error (as qemu-img compare).")
        @Option(name: .short, help: "Format of the first image.") var f: String?
        @Option(name: .customShort("F"), help: "Format of the second image.") var secondFormat: String?
        @Argument var first: String
        @Argument var second: String

        func run() throws {
            let identical: Bool
            do {
                let a = try DiskOpener.open(first, format: try parseFormat(f), readOnly: true)
                let b = try DiskOpener.open(second, format: try parseFormat(secondFormat), readOnly: true)
                let size = max(a.virtualSize, b.virtualSize)
                var at: UInt64 = 0
                var mismatch: UInt64?
                while at < size, mismatch == nil {
                    let n = Int(min(1 << 20, size - at))
                    func bytes(_ image: any DiskImage) throws -> [UInt8] {
                        guard at < image.virtualSize else { return [UInt8](repeating: 0, count: n) }
                        let m = Int(min(UInt64(n), image.virtualSize - at))
                        return try image.read(at: at, count: m) + [UInt8](repeating: 0, count: n - m)
                    }
                    let x = try bytes(a), y = try bytes(b)
                    if x != y, let i = zip(x, y).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
                        mismatch = at + UInt64(i)
                    }
                    at += UInt64(n)
                }
                if let mismatch { print("Content mismatch at offset \(mismatch).") } else { print("Images are identical.") }
                identical = mismatch == nil
            } catch {
                FileHandle.standardError.write(Data("nimbus disk: \(error)\n".utf8))
                throw ExitCode(2)
            }
            if !identical { throw ExitCode(1) }
        }
    }
}
