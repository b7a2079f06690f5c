// nimbus disk: qemu-img-shaped commands over the VirtualDisk library.
import ArgumentParser
import Foundation
import VirtualDisk

struct Disk: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create, inspect, check and convert qcow2 and raw disk images (qemu-img compatible).",
        subcommands: [
            Create.self, Info.self, Check.self, Convert.self, MapCommand.self, Compare.self, Snapshot.self, Resize.self, Commit.self,
            Rebase.self, Serve.self,
        ])
}

/// Parses sizes like 10G, 512M, 4096, 1.5G (binary units, as qemu-img does).
func parseSize(_ text: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50]
    var digits = Substring(text)
    var scale: UInt64 = 1
    if let last = text.last, let u = units[last] {
        scale = u
        digits = digits.dropLast()
    } else if text.hasSuffix("B") || text.hasSuffix("b") {
        digits = digits.dropLast()
    }
    guard let value = Double(digits), value >= 0, value * Double(scale) < 9.2e18 else {
        throw ValidationError("invalid size \"\(text)\": use bytes or a number with k, M, G, T (e.g. 10G)")
    }
    return UInt64(value * Double(scale))
}

/// Parses qemu-img style `-o key=value[,key=value]` options for a new qcow2 image.
func parseCreateOptions(_ items: [String]) throws -> QCOW2Image.CreateOptions {
    var options = QCOW2Image.CreateOptions()
    for item in items.flatMap({ $0.split(separator: ",") }) {
        let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
        guard kv.count == 2 else { throw ValidationError("option \"\(item)\" must be key=value") }
        switch kv[0] {
        case "cluster_size": options.clusterSize = Int(try parseSize(kv[1]))
        case "compat": options.version = kv[1] == "0.10" ? 2 : 3
        case "refcount_bits": options.refcountBits = Int(kv[1]) ?? 0
        default: throw ValidationError("unknown option \"\(kv[0])\" (cluster_size, compat, refcount_bits)")
        }
    }
    return options
}

func parseFormat(_ text: String?) throws -> DiskFormat? {
    guard let text else { return nil }
    guard let f = DiskFormat(rawValue: text) else { throw ValidationError("unknown format \"\(text)\": use raw or qcow2") }
    return f
}

func printJSON(_ value: Any) {
    if let data = try? JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys]),
        let s = String(data: data, encoding: .utf8)
    {
        print(s)
    }
}

/// Runs `body`, turning library errors into one line on stderr and exit status 1.
func reportingErrors<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as DiskError {
        FileHandle.standardError.write(Data("nimbus disk: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

/// A progress line on stderr for long work (only on a terminal, or with -p).
struct Progress {
    let enabled: Bool
    var lastPercent = -1
    mutating func update(_ done: UInt64, of total: UInt64) {
        guard enabled, total > 0 else { return }
        let percent = Int(done * 100 / total)
        if percent != lastPercent {
            lastPercent = percent
            FileHandle.standardError.write(Data("\r    (\(percent).00/100%)".utf8))
            if percent == 100 { FileHandle.standardError.write(Data("\n".utf8)) }
        }
    }
}

extension Disk {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a disk image.",
            discussion: "Example: nimbus disk create -f qcow2 -b base.qcow2 -F qcow2 -o cluster_size=65536 top.qcow2 10G")
        @Option(name: .short, help: "Format: qcow2 or raw.") var f = "qcow2"
        @Option(name: .short, help: "Backing file (qcow2 only); relative names are relative to FILE's directory.") var b: String?
        @Option(name: .customShort("F"), help: "Format of the backing file.") var backingFormat: String?
        @Option(name: .short, help: "Options: cluster_size=N, compat=0.10|1.1, refcount_bits=N.") var o: [String] = []
        @Argument(help: "The image to create.") var file: String
        @Argument(help: "Virtual size (e.g. 10G); defaults to the backing file's.") var size: String?

        func run() throws {
            try reportingErrors {
                guard let format = try parseFormat(f) else { return }
                var options = try parseCreateOptions(o)
                var virtualSize = try size.map(parseSize)
                if let b {
                    guard format == .qcow2 else { throw ValidationError("a backing file needs the qcow2 format") }
                    let resolved = DiskOpener.resolve(backing: b, of: file)
                    let base = try DiskOpener.open(resolved, format: try parseFormat(backingFormat), readOnly: true)
                    options.backingFile = b
                    options.backingFormat = try parseFormat(backingFormat) ?? base.format
                    if virtualSize == nil { virtualSize = base.virtualSize }
                }
                guard let virtualSize else { throw ValidationError("a size is needed (or a backing file to take it from)") }
                switch format {
                case .raw: try RawImage.create(path: file, size: virtualSize)
                case .qcow2: try QCOW2Image.create(path: file, size: virtualSize, options: options)
                }
                print("Formatting '\(file)', fmt=\(format.rawValue) size=\(virtualSize)")
            }
        }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show an image's format, sizes and backing chain.")
        @Option(name: .short, help: "Format (probed when absent).") var f: String?
        @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.") var backingChain = false
        @Flag(help: "Print JSON like `qemu-img info --output=json`.") var json = false
        @Option(name: .customLong("output"), help: "human or json (qemu-img spelling).") var output: String?
        @Argument var file: String

        func run() throws {
            try reportingErrors {
                let top = try DiskOpener.open(file, format: try parseFormat(f), readOnly: true)
                var chain: [any DiskImage] = [top]
                while backingChain, let next = chain.last?.backing { chain.append(next) }
                let infos = try chain.map(describe)
                if json || output == "json" {
                    printJSON(backingChain ? infos as Any : infos[0] as Any)
                } else {
                    for (i, info) in infos.enumerated() {
                        if i > 0 { print("") }
                        print("image: \(info["filename"] ?? "")")
                        print("file format: \(info["format"] ?? "")")
                        print("virtual size: \(info["virtual-size"] ?? 0) bytes")
                        print("disk size: \(info["actual-size"] ?? 0) bytes")
                        if let cs = info["cluster-size"] { print("cluster_size: \(cs)") }
                        if let b = info["backing-filename"] { print("backing file: \(b)") }
                        if let bf = info["backing-filename-format"] { print("backing file format: \(bf)") }
                        if let snaps = info["snapshots"] as? [[String: Any]], !snaps.isEmpty {
                            print("Snapshot list:")
                            for s in snaps { print("\(s["id"] ?? "")\t\(s["name"] ?? "")") }
                        }
                    }
                }
            }
        }

        func describe(_ image: any DiskImage) throws -> [String: Any] {
            var info: [String: Any] = [
                "filename": image.path, "format": image.format.rawValue, "virtual-size": image.virtualSize,
                "actual-size": try image.allocatedBytes(), "dirty-flag": false,
            ]
            if let q = image as? QCOW2Image {
                let h = q.currentHeader
                info["cluster-size"] = h.clusterSize
                if let b = h.backingFile {
                    info["backing-filename"] = b
                    info["full-backing-filename"] = DiskOpener.resolve(backing: b, of: image.path)
                }
                if let bf = h.backingFormat { info["backing-filename-format"] = bf }
                info["format-specific"] = [
                    "type": "qcow2",
                    "data": ["compat": h.version >= 3 ? "1.1" : "0.10", "refcount-bits": h.refcountBits, "corrupt": false, "extended-l2": false],
                ]
                let snaps = try q.snapshots()
                if !snaps.isEmpty {
                    info["snapshots"] = snaps.map { ["id": $0.id, "name": $0.name, "date-sec": $0.dateSeconds, "vm-state-size": $0.vmStateSize] }
                }
            }
            return info
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a qcow2 image for errors and leaks; -r leaks|all repairs.",
            discussion: "Exit status as qemu-img: 0 clean, 2 corruptions, 3 only leaked clusters, 1 the check itself failed.")
        @Option(name: .short, help: "Repair: leaks or all.") var r: String?
        @Option(name: .short, help: "Format (probed when absent).") var f: String?
        @Flag(help: "Print JSON.") var json = false
        @Option(name: .customLong("output"), help: "human or json.") var output: String?
        @Argument var file: String

        func run() throws {
            let mode: RepairMode
            switch r {
            case nil: mode = .none
            case "leaks": mode = .leaks
            case "all": mode = .all
            default: throw ValidationError("-r takes leaks or all")
            }
            let result: CheckResult = try reportingErrors {
                let image = try DiskOpener.open(file, format: try parseFormat(f), readOnly: mode == .none)
                guard let q = image as? QCOW2Image else {
                    throw DiskError("\(file): format \(image.format.rawValue) has nothing to check")
                }
                return try q.check(repair: mode)
            }
            if json || output == "json" {
                printJSON([
                    "filename": file, "format": "qcow2", "check-errors": 0, "corruptions": result.corruptions - result.corruptionsFixed,
                    "leaks": result.leaks - result.leaksFixed, "corruptions-fixed": result.corruptionsFixed, "leaks-fixed": result.leaksFixed,
                    "allocated-clusters": result.allocatedClusters, "total-clusters": result.totalClusters,
                    "image-end-offset": result.imageEndOffset,
                ])
            } else {
                for m in result.messages { FileHandle.standardError.write(Data("\(m)\n".utf8)) }
                let leaks = result.leaks - result.leaksFixed
                let corruptions = result.corruptions - result.corruptionsFixed
                if result.leaksFixed > 0 || result.corruptionsFixed > 0 {
                    print(
                        "The following inconsistencies were found and repaired:\n\n    \(result.leaksFixed) leaked clusters\n    \(result.corruptionsFixed) corruptions\n"
                    )
                }
                if corruptions == 0 && leaks == 0 { print("No errors were found on the image.") }
                if corruptions > 0 {
                    print("\n\(corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.")
                }
                if leaks > 0 { print("\n\(leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.") }
                print("\(result.allocatedClusters) allocated clusters; image end offset: \(result.imageEndOffset)")
            }
            if result.exitCode != 0 { throw ExitCode(result.exitCode) }
        }
    }
}
