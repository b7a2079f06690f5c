// Virtio devices seen from a real Debian guest: nimbus-vmm boots the scripts/virtio-guest guest in
// the nested test host, which mounts ext4 from virtio-blk (raw, then a qcow2 overlay), checks a
// read-only drive, pings and sends a file over virtio-net on a TAP, talks vsock both ways through
// Firecracker's Unix-socket protocol and reads /dev/hwrng. The host side checks what was written.
// Three last boots do the network case again with the interface on nimbus-vmm's in-process switch
// and no TAP: its uplink is a veth, a VXLAN tunnel to a Linux vxlan device in another namespace,
// and a Unix datagram socket to QEMU's -netdev dgram.
import Foundation
import Testing

@Suite(.enabled(if: Nested.enabled, "needs qemu-system-x86_64 for the nested test host"), .serialized)
struct VirtioGuestTests {
    @Test func debianGuestUsesEveryVirtioDevice() throws {
        #expect(FileManager.default.isExecutableFile(atPath: Nested.vmm), "build nimbus-vmm first (scripts/test does)")
        let prepared = try Nested.run(["prepare"])
        try #require(prepared.status == 0, "nested-host prepare failed:\n\(prepared.output)")
        let process = Process()
        process.executableURL = Nested.root.appendingPathComponent("scripts/virtio-guest/run")
        process.arguments = ["--vmm", "nimbus", "--nimbus", Nested.vmm, "--qcow2-pass", "--switch-pass", "--timeout", "900"]
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("virtio-guest-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        defer { try? FileManager.default.removeItem(at: log) }
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        try handle.close()
        let output = ((try? String(contentsOf: log, encoding: .utf8)) ?? "").replacingOccurrences(of: "\r", with: "")
        let summary = output.components(separatedBy: "== virtio-guest summary").last ?? output
        #expect(process.terminationStatus == 0, "virtio guest run failed (status \(process.terminationStatus)):\n\(output.suffix(6000))")
        for marker in [
            "nimbus  BLK-READ-OK", "nimbus  BLK-WRITE-OK", "nimbus  BLK-RO-REFUSED", "nimbus  RNG-OK", "nimbus  NET-PING-OK",
            "nimbus  HOST-NET-TCP-RECV-OK", "nimbus  VSOCK-G2H-OK", "nimbus  HOST-VSOCK-H2G-OK", "nimbus  HOST-BLK-WRITTEN-OK",
            "nimbus  HOST-BLK-FSCK-OK", "nimbus  HOST-BLK-RO-UNCHANGED-OK", "nimbus-qcow2 BLK-WRITE-OK", "nimbus-qcow2 HOST-QCOW2-CHECK-OK",
            "nimbus-qcow2 HOST-QCOW2-BASE-UNCHANGED-OK", "nimbus-qcow2 HOST-BLK-WRITTEN-OK", "nimbus-switch NET-PING-OK",
            "nimbus-switch HOST-NET-TCP-RECV-OK", "nimbus-vxlan NET-PING-OK", "nimbus-vxlan HOST-NET-TCP-RECV-OK",
            "nimbus-dgram NET-PING-OK", "nimbus-dgram HOST-NET-TCP-RECV-OK",
        ] {
            #expect(summary.contains(marker), "missing \(marker) in:\n\(summary.suffix(4000))")
        }
        #expect(!summary.contains("-FAIL"), "a check failed:\n\(summary.suffix(4000))")
    }
}
