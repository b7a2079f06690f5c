// nimbus disk snapshot / resize / commit / rebase.
import ArgumentParser
import Foundation
import VirtualDisk

func openQCOW2(_ path: String, readOnly: Bool) throws -> QCOW2Image {
    let image = try DiskOpener.open(path, readOnly: readOnly)
    guard let q = image as? QCOW2Image else { throw DiskError("\(path) is \(image.format.rawValue); this needs a qcow2 image") }
    return q
}

extension Disk {
    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create (-c), list (-l), apply (-a) or delete (-d) internal snapshots.")
        @Option(name: .short, help: "Create a snapshot with this name.") var c: String?
        @Flag(name: .short, help: "List snapshots.") var l = false
        @Option(name: .short, help: "Revert the disk to this snapshot.") var a: String?
        @Option(name: .short, help: "Delete this snapshot.") var d: String?
        @Flag(help: "With -l, print JSON.") var json = false
        @Argument var file: String

        func validate() throws {
            guard [c != nil, l, a != nil, d != nil].filter({ $0 }).count == 1 else { throw ValidationError("give exactly one of -c, -l, -a, -d") }
        }

        func run() throws {
            try reportingErrors {
                let image = try openQCOW2(file, readOnly: l)
                if let c {
                    let now = Date().timeIntervalSince1970
                    try image.createSnapshot(name: c, date: (UInt32(now), UInt32((now - now.rounded(.down)) * 1e9)))
                } else if let a {
                    try image.applySnapshot(a)
                } else if let d {
                    try image.deleteSnapshot(d)
                } else {
                    let list = try image.snapshots()
                    if json {
                        printJSON(list.map { ["id": $0.id, "name": $0.name, "date-sec": $0.dateSeconds, "vm-state-size": $0.vmStateSize] })
                    } else {
                        print("Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK")
                        for s in list {
                            print(
                                "\(s.id.padding(toLength: 10, withPad: " ", startingAt: 0))\(s.name.padding(toLength: 18, withPad: " ", startingAt: 0))\(s.vmStateSize) B"
                            )
                        }
                    }
                }
                try image.flush()
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Change an image's virtual size (SIZE, +SIZE or -SIZE).")
        @Flag(help: "Allow shrinking (data past the new end is lost).") var shrink = false
        @Argument var file: String
        @Argument var size: String

        func run() throws {
            try reportingErrors {
                let image = try DiskOpener.open(file)
                var target: UInt64
                if size.hasPrefix("+") {
                    target = image.virtualSize + (try parseSize(String(size.dropFirst())))
                } else if size.hasPrefix("-") {
                    let delta = try parseSize(String(size.dropFirst()))
                    guard delta <= image.virtualSize else { throw DiskError("cannot shrink below zero") }
                    target = image.virtualSize - delta
                } else {
                    target = try parseSize(size)
                }
                if let q = image as? QCOW2Image {
                    try q.resize(to: target, allowShrink: shrink)
                } else if let r = image as? RawImage {
                    guard target >= r.virtualSize || shrink else { throw DiskError("shrinking loses data; pass --shrink") }
                    try r.resize(to: target)
                }
                print("Image resized.")
            }
        }
    }

    struct Commit: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Write an overlay's changes into its backing file and empty the overlay.")
        @Flag(name: .short, help: "Keep the overlay's data (do not empty it).") var d = false
        @Flag(name: .short, help: "Show a progress line.") var p = false
        @Argument var file: String

        func run() throws {
            try reportingErrors {
                let image = try openQCOW2(file, readOnly: false)
                let h = image.currentHeader
                guard let name = h.backingFile else { throw DiskError("\(file) has no backing file to commit into") }
                let target = try DiskOpener.open(DiskOpener.resolve(backing: name, of: file), format: h.backingFormat.flatMap(DiskFormat.init))
                var progress = Progress(enabled: p)
                try image.commit(into: target, keepTop: d) { progress.update($0, of: $1) }
                print("Image committed.")
            }
        }
    }

    struct Rebase: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change an image's backing file, keeping its content (or, with -u, just the name).")
        @Option(name: .short, help: "New backing file (\"\" for none).") var b: String
        @Option(name: .customShort("F"), help: "Format of the new backing file.") var backingFormat: String?
        @Flag(name: .short, help: "Unsafe: only rewrite the backing file name.") var u = false
        @Argument var file: String

        func run() throws {
            try reportingErrors {
                let image = try openQCOW2(file, readOnly: false)
                try image.rebase(to: b.isEmpty ? nil : b, format: try parseFormat(backingFormat), unsafe: u) { path, format in
                    try DiskOpener.open(path, format: format, readOnly: true)
                }
            }
        }
    }
}
