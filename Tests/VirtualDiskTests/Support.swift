import Foundation
import Testing
import VirtualDisk

/// A scratch directory removed at deinit.
final class TempDir {
    let url: URL
    init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("nimbus-disk-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(at: url) }
    func path(_ name: String) -> String { url.appendingPathComponent(name).path }
}

/// Deterministic pseudo-random bytes.
struct Pattern {
    var state: UInt64
    mutating func bytes(_ n: Int) -> [UInt8] {
        (0..<n).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 33)
        }
    }
}

enum Peer {
    static var required: Bool { ProcessInfo.processInfo.environment["NIMBUS_REQUIRE_PRIVILEGED"] == "1" }
    static var qemuImgAvailable: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img") }
    static var enabled: Bool { qemuImgAvailable || required }

    /// Runs a tool and returns (status, stdout + stderr).
    @discardableResult
    static func run(_ tool: String, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool.hasPrefix("/") ? tool : "/usr/bin/\(tool)")
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    static var nimbus: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent(".build/debug/nimbus").path
    }
}
