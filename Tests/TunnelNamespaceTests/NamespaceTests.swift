// nimbus-tunnel across network namespaces with the real peer tools: scripts/tunnel-e2e/run puts
// the server in one namespace and the client behind a stateful firewall in another, then drives
// iperf3 (tcp and udp proxies), curl (two http and two https domains on shared vhost ports), an
// stcp visitor, a wrong token, allowPorts, the status API and a server restart mid-transfer.
// Needs root; with NIMBUS_REQUIRE_PRIVILEGED=1 a missing privilege fails instead of skipping.
import Foundation
import Testing

enum NamespaceHost {
    static var root: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }
    static var tunnel: String {
        ProcessInfo.processInfo.environment["NIMBUS_TUNNEL_BIN"] ?? root.appendingPathComponent(".build/debug/nimbus-tunnel").path
    }
    static var required: Bool { ProcessInfo.processInfo.environment["NIMBUS_REQUIRE_PRIVILEGED"] == "1" }
    static var isRoot: Bool { getuid() == 0 }
    static var enabled: Bool { required || isRoot }
}

@Suite(.enabled(if: NamespaceHost.enabled, "needs root for network namespaces"), .serialized)
struct TunnelNamespaceTests {
    @Test func tunnelAcrossNamespacesWithPeerTools() throws {
        try #require(NamespaceHost.isRoot, "network namespaces need root")
        try #require(FileManager.default.isExecutableFile(atPath: NamespaceHost.tunnel), "build nimbus-tunnel first (scripts/test does)")
        let process = Process()
        process.executableURL = NamespaceHost.root.appendingPathComponent("scripts/tunnel-e2e/run")
        process.arguments = ["--tunnel", NamespaceHost.tunnel]
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("tunnel-e2e-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        defer { try? FileManager.default.removeItem(at: log) }
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        try handle.close()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 0, "tunnel e2e failed (status \(process.terminationStatus)):\n\(output.suffix(6000))")
        for case_ in [
            "PASS isolation", "PASS allowPorts", "PASS iperf3 tcp through", "PASS iperf3 tcp reverse", "PASS iperf3 udp",
            "PASS http vhost", "PASS https vhost", "PASS stcp visitor", "PASS a wrong token", "PASS status API",
            "PASS server restarted mid-transfer",
        ] {
            #expect(output.contains(case_), "missing \(case_) in:\n\(output.suffix(4000))")
        }
        #expect(output.contains("ALL PASSED"))
    }
}
