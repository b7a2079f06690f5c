// nimbus-switchd with the real tools across network namespaces: scripts/switch-e2e/run drives
// ping, iperf3, VLAN access and trunk ports, an ovs-ofctl drop rule with counters, a restart, a
// dgram port to QEMU's -netdev dgram, and VXLAN between two daemons and to a Linux vxlan device. Needs root; with
// NIMBUS_REQUIRE_PRIVILEGED=1 (CI) a missing privilege fails instead of skipping.
import Foundation
import Testing

@Suite(.enabled(if: OVSTools.required || getuid() == 0, "needs root for network namespaces"), .serialized)
struct SwitchNamespaceTests {
    @Test func switchAcrossNamespacesWithPeerTools() throws {
        try #require(getuid() == 0, "network namespaces need root")
        try #require(OVSTools.installed, "install openvswitch-switch (ovs-vsctl, ovs-ofctl)")
        try #require(FileManager.default.isExecutableFile(atPath: OVSTools.switchd), "build nimbus-switchd first (scripts/test does)")
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("switch-e2e-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: log) }
        let handle = try FileHandle(forWritingTo: log)
        let process = Process()
        process.executableURL = OVSTools.root.appendingPathComponent("scripts/switch-e2e/run")
        process.arguments = ["--switchd", OVSTools.switchd]
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        try handle.close()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 0, "switch e2e failed (status \(process.terminationStatus)):\n\(output.suffix(6000))")
        for name in [
            "PASS ping veth to veth", "PASS ping veth to internal (TAP) port", "PASS ping veth to an existing TAP (type=tap)",
            "PASS iperf3 tcp veth to veth",
            "PASS access VLANs 10 and 20 cannot reach each other", "PASS trunk carries VLAN 10 tagged",
            "PASS an ovs-ofctl drop rule stops ICMP", "PASS dump-flows counts the dropped packets", "PASS del-flows restores ICMP",
            "PASS dump-tables counts lookups and misses", "PASS ovs-appctl fdb/show and dpif/show",
            "PASS ovs-ofctl mod-port down stops a port, up restores it", "PASS PORT_STATUS for ports added, changed by mod-port and deleted",
            "PASS mtu_request sets a port's MTU; Interface.mtu, mac_in_use and ifindex report the device",
            "PASS ports survive a restart", "PASS flows survive a restart", "PASS ping across VXLAN between two switch daemons",
            "PASS ping to a Linux vxlan device", "PASS iperf3 -R with a Linux vxlan peer",
            "PASS ping QEMU's user network through a dgram port", "PASS an 8 MB HTTP download from QEMU's user network through a dgram port",
            "PASS an 8 MB TCP upload to QEMU's user network", "PASS a dgram port whose options change is reopened",
        ] {
            #expect(output.contains(name), "missing \(name) in:\n\(output.suffix(4000))")
        }
        #expect(output.contains("ALL PASSED"))
    }
}
