// nimbus pool: directory storage pools of named volumes.
import ArgumentParser
import Foundation
import VirtualDisk

struct Pool: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage a directory storage pool: volumes, linked clones, capacity.",
        subcommands: [List.self, Create.self, Clone.self, Delete.self, Info.self])

    struct Options: ParsableArguments {
        @Option(help: "The pool's directory.") var pool: String
    }

    static func describe(_ v: Volume) -> [String: Any] {
        var d: [String: Any] = ["name": v.name, "path": v.path, "format": v.format.rawValue, "capacity": v.capacity, "allocation": v.allocation]
        if let b = v.backingVolume { d["backing-volume"] = b }
        return d
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List volumes.")
        @OptionGroup var options: Options
        @Flag(help: "Print JSON.") var json = false
        func run() throws {
            try reportingErrors {
                let volumes = try StoragePool(directory: options.pool).list()
                if json {
                    printJSON(volumes.map(Pool.describe))
                } else {
                    for v in volumes { print("\(v.name)\t\(v.format.rawValue)\t\(v.capacity)\t\(v.allocation)\t\(v.backingVolume ?? "-")") }
                }
            }
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an empty volume.")
        @OptionGroup var options: Options
        @Option(name: .short, help: "qcow2 or raw.") var f = "qcow2"
        @Argument var name: String
        @Argument var size: String
        func run() throws {
            try reportingErrors {
                let v = try StoragePool(directory: options.pool).create(name, size: try parseSize(size), format: try parseFormat(f) ?? .qcow2)
                print("created volume \(v.name) (\(v.capacity) bytes) at \(v.path)")
            }
        }
    }

    struct Clone: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a linked clone (qcow2 overlay) of a volume.")
        @OptionGroup var options: Options
        @Argument var base: String
        @Argument var name: String
        func run() throws {
            try reportingErrors {
                let v = try StoragePool(directory: options.pool).clone(name, from: base)
                print("created linked clone \(v.name) of \(base) at \(v.path)")
            }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a volume (refused while clones use it).")
        @OptionGroup var options: Options
        @Argument var name: String
        func run() throws {
            try reportingErrors { try StoragePool(directory: options.pool).delete(name) }
        }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the pool's capacity and allocation.")
        @OptionGroup var options: Options
        @Flag(help: "Print JSON.") var json = false
        func run() throws {
            try reportingErrors {
                let c = try StoragePool(directory: options.pool).capacity()
                let d: [String: Any] = ["capacity": c.total, "available": c.available, "allocation": c.allocated, "provisioned": c.provisioned]
                if json {
                    printJSON(d)
                } else {
                    print("capacity: \(c.total)\navailable: \(c.available)\nallocation: \(c.allocated)\nprovisioned: \(c.provisioned)")
                }
            }
        }
    }
}
