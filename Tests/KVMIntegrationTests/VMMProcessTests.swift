// nimbus-vmm as a process on this host's KVM, with tiny ELF guests: config file boot, serial
// output and input, i8042 reset and ACPI power-off (exit 0), triple fault (exit 2), bad input
// (exit 1 with a clear message), and the REST API on a Unix socket.
import Foundation
import Testing

/// Runs the built nimbus-vmm binary.
enum VMMBinary {
    static var packageRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    static var path: String {
        if let p = ProcessInfo.processInfo.environment["NIMBUS_VMM_BIN"] { return p }
        for config in ["debug", "release"] {
            let candidate = packageRoot.appendingPathComponent(".build/\(config)/nimbus-vmm").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return packageRoot.appendingPathComponent(".build/debug/nimbus-vmm").path
    }

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    static func run(_ arguments: [String], stdin: String? = nil, timeout: TimeInterval = 60) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let out = Pipe(), err = Pipe(), input = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if process.isRunning {
            process.terminate()
            Issue.record("nimbus-vmm \(arguments) did not finish within \(timeout) s")
        }
        process.waitUntilExit()
        let o = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let e = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return Result(status: process.terminationStatus, stdout: o, stderr: e)
    }
}

/// A scratch directory removed at deinit.
final class Scratch {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("nimbus-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: url) }

    func file(_ name: String, _ bytes: [UInt8]) throws -> String {
        let p = url.appendingPathComponent(name).path
        try Data(bytes).write(to: URL(fileURLWithPath: p))
        return p
    }

    func config(kernel: String, initrd: String? = nil, vcpus: Int = 1, mem: Int = 64, extra: String = "") throws -> String {
        let initrdField = initrd.map { ", \"initrd_path\": \"\($0)\"" } ?? ""
        let json = """
            {"boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "console=ttyS0"\(initrdField)},
             "machine-config": {"vcpu_count": \(vcpus), "mem_size_mib": \(mem)}\(extra)}
            """
        return try file("vm.json", Array(json.utf8))
    }
}

@Suite(.enabled(if: Privileged.runKVM, "needs /dev/kvm"), .serialized)
struct VMMProcessTests {
    @Test func tinyGuestPrintsAndResets() throws {
        let dir = try Scratch()
        let kernel = try dir.file("hello.elf", TinyELF.make(code: TinyELF.helloAndReset))
        let r = try VMMBinary.run(["--no-api", "--config-file", try dir.config(kernel: kernel)])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout == "OK\n")
    }

    @Test func acpiPowerOffEndsWithStatusZero() throws {
        let dir = try Scratch()
        let kernel = try dir.file("off.elf", TinyELF.make(code: TinyELF.acpiPowerOff))
        let r = try VMMBinary.run(["--no-api", "--config-file", try dir.config(kernel: kernel, vcpus: 2)])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout == "P")
    }

    @Test func tripleFaultIsNonZeroWithMessage() throws {
        let dir = try Scratch()
        let kernel = try dir.file("crash.elf", TinyELF.make(code: TinyELF.tripleFault))
        let r = try VMMBinary.run(["--no-api", "--config-file", try dir.config(kernel: kernel)], timeout: 30)
        #expect(r.status == 2, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("triple fault"))
    }

    @Test func serialInputReachesTheGuest() throws {
        let dir = try Scratch()
        let kernel = try dir.file("echo.elf", TinyELF.make(code: TinyELF.echoInput))
        let r = try VMMBinary.run(["--no-api", "--config-file", try dir.config(kernel: kernel)], stdin: "x")
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout == "xx")
    }

    @Test func serialOutputToFile() throws {
        let dir = try Scratch()
        let kernel = try dir.file("hello.elf", TinyELF.make(code: TinyELF.helloAndReset))
        let out = dir.url.appendingPathComponent("console.log").path
        let r = try VMMBinary.run(["--no-api", "--config-file", try dir.config(kernel: kernel), "--serial-out", out])
        #expect(r.status == 0)
        #expect(r.stdout == "")
        #expect(try String(contentsOfFile: out, encoding: .utf8) == "OK\n")
    }

    @Test(arguments: [
        ("missing kernel", "missing", "cannot read kernel image"),
        ("corrupt kernel", "corrupt", "not a kernel"),
        ("zero memory", "mem0", "mem_size_mib"),
        ("memory beyond host", "memhuge", "more than the host"),
        ("unknown field", "unknown", "unknown field `bogus`"),
        ("malformed json", "malformed", "malformed JSON"),
        ("initrd too big", "bigInitrd", "does not fit"),
        ("too many vcpus", "vcpus", "vcpu_count"),
    ])
    func badInputIsAClearError(name: String, kind: String, expected: String) throws {
        let dir = try Scratch()
        let good = try dir.file("hello.elf", TinyELF.make(code: TinyELF.helloAndReset))
        let config: String
        switch kind {
        case "missing": config = try dir.config(kernel: dir.url.appendingPathComponent("nope").path)
        case "corrupt": config = try dir.config(kernel: try dir.file("junk", [UInt8](repeating: 0x41, count: 5000)))
        case "mem0": config = try dir.config(kernel: good, mem: 0)
        case "memhuge": config = try dir.config(kernel: good, mem: 64 << 20)
        case "unknown": config = try dir.config(kernel: good, extra: ", \"bogus\": 1")
        case "malformed": config = try dir.file("vm.json", Array("{\"boot-source\": {".utf8))
        case "bigInitrd":
            let initrd = try dir.file("initrd", [UInt8](repeating: 1, count: 40 << 20))
            config = try dir.config(kernel: good, initrd: initrd, mem: 32)
        default: config = try dir.config(kernel: good, vcpus: 33)
        }
        let r = try VMMBinary.run(["--no-api", "--config-file", config])
        #expect(r.status != 0, "\(name) should fail")
        #expect(r.status != 2 && r.status < 128, "\(name) must not crash: status \(r.status)")
        #expect(r.stderr.contains(expected), "\(name): stderr was \(r.stderr)")
    }
}
