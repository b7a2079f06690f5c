// qcow2 interoperability with the real qemu-img and qemu-io, both directions.
import Foundation
import Testing

@testable import VirtualDisk

@Suite(.enabled(if: Peer.enabled, "needs qemu-img (Debian qemu-utils)"), .serialized)
struct QemuInteropTests {
    func qemuRaw(_ image: String, _ dir: TempDir) throws -> [UInt8] {
        let out = dir.path("qemu-\(UUID().uuidString).raw")
        let (status, text) = try Peer.run("qemu-img", ["convert", "-O", "raw", image, out])
        try #require(status == 0, "qemu-img convert: \(text)")
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    @Test(arguments: [("0.10", "512"), ("1.1", "4096"), ("1.1", "65536"), ("0.10", "2M"), ("1.1", "2M")])
    func imagesQemuWritesReadTheSame(compat: String, clusterSize: String) throws {
        let dir = try TempDir()
        let base = dir.path("base.qcow2"), top = dir.path("top.qcow2")
        try Peer.run("qemu-img", ["create", "-f", "qcow2", "-o", "compat=\(compat),cluster_size=\(clusterSize)", base, "16M"])
        try Peer.run("qemu-io", ["-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 7M 123k", "-c", "write -z 1M 512k", base])
        try Peer.run("qemu-img", ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "compat=\(compat)", top])
        try Peer.run("qemu-io", ["-c", "write -P 0x33 100k 1M", "-c", "discard 0 64k", "-c", "write -z 2M 128k", top])
        try Peer.run("qemu-img", ["snapshot", "-c", "s1", top])
        try Peer.run("qemu-io", ["-c", "write -P 0x44 3M 200k", top])
        let image = try DiskOpener.open(top, readOnly: true)
        #expect(try image.read(at: 0, count: 16 << 20) == (try qemuRaw(top, dir)))
        let result = try #require(image as? QCOW2Image).check()
        #expect(result.corruptions == 0 && result.leaks == 0, "\(result.messages.prefix(5))")
    }

    @Test func compressedClustersRead() throws {
        let dir = try TempDir()
        var rng = Pattern(state: 7)
        let raw = dir.path("s.raw")
        var data = [UInt8](repeating: 0, count: 4 << 20)
        data.replaceSubrange(0..<100_000, with: rng.bytes(100_000))
        data.replaceSubrange(2_000_000..<2_300_000, with: [UInt8](repeating: 7, count: 300_000))
        try Data(data).write(to: URL(fileURLWithPath: raw))
        let c = dir.path("c.qcow2")
        try Peer.run("qemu-img", ["convert", "-c", "-O", "qcow2", raw, c])
        #expect(try DiskOpener.open(c, readOnly: true).read(at: 0, count: 4 << 20) == data)
        // Writing over a compressed cluster copies it out and frees it.
        let image = try DiskOpener.open(c)
        try image.write([9, 9], at: 2_000_010)
        try image.flush()
        data.replaceSubrange(2_000_010..<2_000_012, with: [9, 9])
        let (status, text) = try Peer.run("qemu-img", ["check", c])
        #expect(status == 0, "\(text)")
        #expect(try qemuRaw(c, dir) == data)
    }

    @Test func everythingNimbusWritesPassesQemuImgCheck() throws {
        let dir = try TempDir()
        for (compat, clusterSize) in [(UInt32(2), 65536), (3, 512), (3, 4096), (3, 2 << 20)] {
            let path = dir.path("n-\(compat)-\(clusterSize).qcow2")
            var options = QCOW2Image.CreateOptions()
            options.version = compat
            options.clusterSize = clusterSize
            try QCOW2Image.create(path: path, size: 20 << 20, options: options)
            let image = try DiskOpener.open(path)
            var model = [UInt8](repeating: 0, count: 20 << 20)
            var rng = Pattern(state: UInt64(clusterSize))
            for _ in 0..<30 {
                let at = Int(rng.bytes(3).reduce(0) { $0 << 8 | UInt64($1) } % (19 << 20))
                let bytes = rng.bytes(Int(rng.bytes(2).reduce(0) { $0 << 8 | UInt64($1) }) + 1)
                try image.write(bytes, at: UInt64(at))
                model.replaceSubrange(at..<at + bytes.count, with: bytes)
            }
            try image.discard(at: 0, length: 1 << 20)
            model.replaceSubrange(0..<(1 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
            try image.flush()
            let (status, text) = try Peer.run("qemu-img", ["check", path])
            #expect(status == 0 && text.contains("No errors"), "qemu-img check \(path): \(text)")
            #expect(try qemuRaw(path, dir) == model, "\(path) content")
        }
    }

    @Test func nimbusWritesIntoImagesWithQemuSnapshots() throws {
        let dir = try TempDir()
        let path = dir.path("s.qcow2")
        try Peer.run("qemu-img", ["create", "-f", "qcow2", path, "8M"])
        try Peer.run("qemu-io", ["-c", "write -P 0x55 0 2M", path])
        try Peer.run("qemu-img", ["snapshot", "-c", "before", path])
        let before = try qemuRaw(path, dir)
        let image = try DiskOpener.open(path)
        try image.write([UInt8](repeating: 0x66, count: 100_000), at: 50_000)
        try image.write([UInt8](repeating: 0x77, count: 10), at: 3 << 20)
        try image.flush()
        var (status, text) = try Peer.run("qemu-img", ["check", path])
        #expect(status == 0 && text.contains("No errors"), "after nimbus COW: \(text)")
        (status, text) = try Peer.run("qemu-img", ["snapshot", "-a", "before", path])
        #expect(status == 0, "\(text)")
        #expect(try qemuRaw(path, dir) == before)
    }

    @Test func cliConvertInfoCheckMapCompareMatchQemu() throws {
        let dir = try TempDir()
        var rng = Pattern(state: 99)
        var data = [UInt8](repeating: 0, count: 8 << 20)
        data.replaceSubrange(1 << 20..<(1 << 20) + 300_000, with: rng.bytes(300_000))
        let raw = dir.path("src.raw")
        try Data(data).write(to: URL(fileURLWithPath: raw))
        let q = dir.path("out.qcow2")
        var (status, text) = try Peer.run(Peer.nimbus, ["disk", "convert", "-O", "qcow2", raw, q])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run("qemu-img", ["compare", raw, q])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "compare", raw, q])
        #expect(status == 0 && text.contains("identical"))
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "info", "--json", q])
        #expect(status == 0 && text.contains("\"virtual-size\" : 8388608"), "\(text)")
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "check", q])
        #expect(status == 0 && text.contains("No errors"))
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "map", "--json", q])
        let (qs, qtext) = try Peer.run("qemu-img", ["map", "--output=json", q])
        #expect(status == 0 && qs == 0)
        // Same data extents (start/length of data) as qemu-img map reports.
        func dataRanges(_ json: String) throws -> [[UInt64]] {
            let list = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
            return list.filter { ($0["data"] as? Bool) == true }.map {
                [($0["start"] as? NSNumber)?.uint64Value ?? 0, ($0["length"] as? NSNumber)?.uint64Value ?? 0]
            }
        }
        #expect(try dataRanges(text) == dataRanges(qtext), "nimbus: \(text)\nqemu: \(qtext)")
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "create", "-f", "qcow2", "-b", "out.qcow2", "-F", "qcow2", dir.path("top.qcow2")])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run("qemu-img", ["info", "--backing-chain", dir.path("top.qcow2")])
        #expect(status == 0 && text.contains("backing file: out.qcow2"), "\(text)")
        let c = dir.path("c.qcow2")
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "convert", "-c", "-O", "qcow2", raw, c])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run("qemu-img", ["check", c])
        #expect(status == 0 && text.contains("compressed clusters") && !text.contains(" 0.00% compressed"), "\(text)")
        (status, text) = try Peer.run("qemu-img", ["compare", raw, c])
        #expect(status == 0, "\(text)")
        (status, text) = try Peer.run(Peer.nimbus, ["disk", "create", "-f", "qcow2", dir.path("bad.qcow2"), "12Q"])
        #expect(status != 0 && text.contains("invalid size"))
    }

    @Test func killedWritersLeaveImagesWithoutErrors() throws {
        let dir = try TempDir()
        var rng = Pattern(state: 5)
        let raw = dir.path("big.raw")
        try Data(rng.bytes(24 << 20)).write(to: URL(fileURLWithPath: raw))
        var killedMidWrite = 0
        for round in 0..<6 {
            let q = dir.path("k\(round).qcow2")
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Peer.nimbus)
            p.arguments = ["disk", "convert", "-O", "qcow2", "-o", "cluster_size=\(round % 2 == 0 ? 512 : 4096)", raw, q]
            try p.run()
            Thread.sleep(forTimeInterval: 0.05 + Double(round) * 0.07)
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            if p.terminationReason == .uncaughtSignal { killedMidWrite += 1 }
            guard FileManager.default.fileExists(atPath: q) else { continue }
            var (status, text) = try Peer.run("qemu-img", ["check", q])
            #expect(status == 0 || status == 3, "round \(round): qemu-img check found errors after a kill: \(text.prefix(2000))")
            (status, text) = try Peer.run(Peer.nimbus, ["disk", "check", "-r", "leaks", q])
            #expect(status == 0, "round \(round): repair: \(text.prefix(1000))")
            (status, text) = try Peer.run("qemu-img", ["check", q])
            #expect(status == 0, "round \(round): after repair: \(text.prefix(1000))")
        }
        #expect(killedMidWrite >= 3, "the writer finished before most kills; the test proved little")
    }
}

@Suite(.enabled(if: Peer.enabled, "needs qemu-img (Debian qemu-utils)"), .serialized)
struct QemuMaintenanceTests {
    func qemu(_ args: [String]) throws -> String {
        let (status, text) = try Peer.run(args[0].hasPrefix("/") ? args[0] : args[0], Array(args.dropFirst()))
        #expect(status == 0, "\(args.joined(separator: " ")): \(text)")
        return text
    }

    @Test func snapshotsInteroperateWithQemuImg() throws {
        let dir = try TempDir()
        let s = dir.path("s.qcow2"), n = Peer.nimbus
        _ = try qemu(["qemu-img", "create", "-f", "qcow2", s, "16M"])
        _ = try qemu(["qemu-io", "-c", "write -P 0x11 0 2M", s])
        _ = try qemu([n, "disk", "snapshot", "-c", "one", s])
        #expect(try qemu(["qemu-img", "check", s]).contains("No errors"))
        _ = try qemu(["qemu-io", "-c", "write -P 0x22 1M 2M", s])
        _ = try qemu([n, "disk", "snapshot", "-c", "two", s])
        let list = try qemu(["qemu-img", "snapshot", "-l", s])
        #expect(list.contains("one") && list.contains("two"))
        _ = try qemu(["qemu-img", "convert", "-O", "raw", s, dir.path("two.raw")])
        _ = try qemu([n, "disk", "snapshot", "-a", "one", s])
        #expect(try qemu(["qemu-img", "check", s]).contains("No errors"))
        #expect(try qemu(["qemu-io", "-c", "read -P 0x11 0 2M", s]).contains("read 2097152/2097152"))
        _ = try qemu(["qemu-img", "snapshot", "-a", "two", s])
        _ = try qemu(["qemu-img", "compare", dir.path("two.raw"), s])
        _ = try qemu([n, "disk", "snapshot", "-d", "one", s])
        _ = try qemu([n, "disk", "snapshot", "-d", "two", s])
        let check = try qemu(["qemu-img", "check", s])
        #expect(check.contains("No errors") && !check.contains("leaked"))
        _ = try qemu(["qemu-img", "snapshot", "-c", "q", s])
        #expect(try qemu([n, "disk", "snapshot", "-l", s]).contains("q"))
    }

    @Test func resizeCommitAndRebaseKeepContent() throws {
        let dir = try TempDir()
        let base = dir.path("b.qcow2"), top = dir.path("t.qcow2"), n = Peer.nimbus
        _ = try qemu(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", base, "8M"])
        _ = try qemu(["qemu-io", "-c", "write -P 0x31 0 3M", base])
        _ = try qemu([n, "disk", "resize", base, "+600M"])
        #expect(try qemu(["qemu-img", "info", base]).contains("637534208 bytes"))
        #expect(try qemu(["qemu-img", "check", base]).contains("No errors"))
        _ = try qemu(["qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top])
        _ = try qemu(["qemu-io", "-c", "write -P 0x77 2M 2M", top])
        _ = try qemu(["qemu-img", "convert", "-O", "raw", top, dir.path("t.raw")])
        _ = try qemu([n, "disk", "commit", top])
        _ = try qemu(["qemu-img", "compare", dir.path("t.raw"), base])
        _ = try qemu(["qemu-img", "compare", dir.path("t.raw"), top])
        #expect(try qemu(["qemu-img", "check", base]).contains("No errors"))
        _ = try qemu(["qemu-img", "create", "-f", "qcow2", dir.path("other.qcow2"), "637534208"])
        _ = try qemu([n, "disk", "rebase", "-b", "other.qcow2", "-F", "qcow2", top])
        _ = try qemu(["qemu-img", "compare", dir.path("t.raw"), top])
        #expect(try qemu(["qemu-img", "info", top]).contains("backing file: other.qcow2"))
        #expect(try qemu(["qemu-img", "check", top]).contains("No errors"))
        let (status, text) = try Peer.run(n, ["disk", "resize", base, "1M"])
        #expect(status != 0 && text.contains("--shrink"))
    }
}
