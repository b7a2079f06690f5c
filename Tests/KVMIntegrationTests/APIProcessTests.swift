// nimbus-vmm's REST API on a Unix socket, driven with curl against this host's KVM and a tiny
// looping guest: configure, start, pause, resume, Ctrl-Alt-Del, errors, and SIGTERM.
import Foundation
import Testing

enum Curl {
    /// Calls the API and returns (HTTP status, body).
    static func call(_ socket: String, _ method: String, _ path: String, _ body: String? = nil) throws -> (Int, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        var args = ["-s", "-w", "\n%{http_code}", "--unix-socket", socket, "-X", method, "http://localhost\(path)"]
        if let body { args += ["-H", "Content-Type: application/json", "-d", body] }
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }
}

@Suite(.enabled(if: Privileged.runKVM, "needs /dev/kvm"), .serialized)
struct APIProcessTests {
    @Test func apiLifecycleOnARealVM() throws {
        #expect(FileManager.default.isExecutableFile(atPath: "/usr/bin/curl"), "curl is needed (installed by .ci/run)")
        let dir = try Scratch()
        let loop = try dir.file("loop.elf", TinyELF.make(code: [0xEB, 0xFE]))
        let socket = dir.url.appendingPathComponent("api.sock").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: VMMBinary.path)
        process.arguments = ["--api-sock", socket, "--id", "test-vm"]
        process.standardInput = FileHandle.nullDevice
        let err = Pipe()
        process.standardError = err
        try process.run()
        defer { if process.isRunning { process.terminate() } }
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: socket) { Thread.sleep(forTimeInterval: 0.02) }

        var r = try Curl.call(socket, "GET", "/")
        #expect(r.0 == 200 && r.1.contains(#""id":"test-vm""#) && r.1.contains("Not started"))
        #expect(try Curl.call(socket, "PATCH", "/vm", #"{"state": "Paused"}"#).0 == 400)
        #expect(try Curl.call(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).0 == 400)
        #expect(try Curl.call(socket, "PUT", "/boot-source", #"{"kernel_image_path": "\#(loop)"}"#).0 == 204)
        #expect(try Curl.call(socket, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 4200}"#).0 == 204)
        r = try Curl.call(socket, "PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 64, "smt": "yes"}"#)
        #expect(r.0 == 400 && r.1.contains("fault_message") && r.1.contains("`smt`"))
        #expect(try Curl.call(socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#).0 == 204)
        r = try Curl.call(socket, "GET", "/")
        #expect(r.1.contains(#""state":"Running""#))
        #expect(try Curl.call(socket, "PATCH", "/vm", #"{"state": "Paused"}"#).0 == 204)
        #expect(try Curl.call(socket, "GET", "/").1.contains(#""state":"Paused""#))
        #expect(try Curl.call(socket, "PATCH", "/vm", #"{"state": "Resumed"}"#).0 == 204)
        #expect(try Curl.call(socket, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).0 == 204)
        r = try Curl.call(socket, "GET", "/vm/config")
        #expect(r.0 == 200 && r.1.contains(#""mem_size_mib":4200"#))
        #expect(try Curl.call(socket, "GET", "/no/such/path").0 == 400)
        #expect(process.isRunning)

        process.terminate()  // SIGTERM: stop the VM, exit 0
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: socket), "the API socket is removed on exit")
    }
}
