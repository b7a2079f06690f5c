// nimbus-switchd driven by the stock Open vSwitch tools (Debian's openvswitch-switch and
// openvswitch-common): ovs-vsctl without --no-wait (so the switch must report cur_cfg),
// ovsdb-client for raw transactions and monitors, ovsdb-tool reading the database file, and a
// restart that keeps everything. No root needed: `lo` stands in for a system interface.
// With NIMBUS_REQUIRE_PRIVILEGED=1 (CI) missing tools fail instead of skipping.
import Foundation
import Testing

enum OVSTools {
    static var root: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }
    static var switchd: String {
        ProcessInfo.processInfo.environment["NIMBUS_SWITCHD_BIN"] ?? root.appendingPathComponent(".build/debug/nimbus-switchd").path
    }
    static var required: Bool { ProcessInfo.processInfo.environment["NIMBUS_REQUIRE_PRIVILEGED"] == "1" }
    static var installed: Bool {
        ["/usr/bin/ovs-vsctl", "/usr/bin/ovsdb-client", "/usr/bin/ovsdb-tool"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }
    static var enabled: Bool { required || installed }

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    @discardableResult
    static func run(_ tool: String, _ arguments: [String], input: String? = nil) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool.hasPrefix("/") ? tool : "/usr/bin/\(tool)")
        process.arguments = arguments
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Output(
            status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self), stderr: String(decoding: stderr, as: UTF8.self))
    }
}

/// A nimbus-switchd process on a private directory.
final class SwitchDaemon {
    let directory: String
    let process = Process()
    var socket: String { directory + "/db.sock" }
    var database: String { directory + "/conf.db" }

    init(directory: String) throws {
        self.directory = directory
        process.executableURL = URL(fileURLWithPath: OVSTools.switchd)
        process.arguments = ["--db", directory + "/conf.db", "--rundir", directory, "--remote", "punix:" + directory + "/db.sock"]
        let log = FileHandle(forWritingAtPath: "/dev/null")
        process.standardOutput = log
        process.standardError = FileHandle(forWritingAtPath: directory + "/switchd.log") ?? log
        try process.run()
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: socket) { Thread.sleep(forTimeInterval: 0.05) }
        Thread.sleep(forTimeInterval: 0.1)
    }

    func vsctl(_ arguments: String...) throws -> OVSTools.Output {
        try OVSTools.run("ovs-vsctl", ["--db=unix:" + socket, "--timeout=10"] + arguments)
    }

    func stop() -> Int32 {
        process.terminate()
        process.waitUntilExit()
        return process.terminationStatus
    }
}

@Suite(.enabled(if: OVSTools.enabled, "needs Open vSwitch's tools (openvswitch-switch)"), .serialized)
struct OVSToolsTests {
    func makeDirectory() throws -> String {
        let path = NSTemporaryDirectory() + "nimbus-switchd-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        // The log file must exist before the daemon opens it.
        _ = FileManager.default.createFile(atPath: path + "/switchd.log", contents: nil)
        return path
    }

    @Test func ovsVsctlDrivesTheSwitch() throws {
        try #require(OVSTools.installed, "install openvswitch-switch (ovs-vsctl, ovsdb-client, ovsdb-tool)")
        try #require(FileManager.default.isExecutableFile(atPath: OVSTools.switchd), "build nimbus-switchd first (scripts/test does)")
        let directory = try makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try SwitchDaemon(directory: directory)

        // Plain ovs-vsctl waits until the switch has applied the change (cur_cfg = next_cfg).
        #expect(try daemon.vsctl("add-br", "nvs0").status == 0)
        #expect(try daemon.vsctl("add-port", "nvs0", "lo").status == 0)
        let missing = try daemon.vsctl("add-port", "nvs0", "ghost0")
        #expect(missing.stderr.contains("could not open network device ghost0 (No such device)"))
        #expect(try daemon.vsctl("set", "Port", "lo", "tag=10").status == 0)
        #expect(try daemon.vsctl("set", "Port", "lo", "trunks=10,20").status == 0)
        #expect(
            try daemon.vsctl(
                "add-port", "nvs0", "vx1", "--", "set", "Interface", "vx1", "type=vxlan", "options:remote_ip=10.0.0.2", "options:key=100"
            ).status == 0)
        #expect(try daemon.vsctl("set-controller", "nvs0", "ptcp:16653:127.0.0.1").status == 0)
        #expect(try daemon.vsctl("list-br").stdout == "nvs0\n")
        #expect(try daemon.vsctl("list-ports", "nvs0").stdout == "ghost0\nlo\nvx1\n")
        let show = try daemon.vsctl("show").stdout
        for expected in ["Bridge nvs0", "Controller \"ptcp:16653:127.0.0.1\"", "tag: 10", "trunks: [10, 20]", "type: vxlan", "type: internal"] {
            #expect(show.contains(expected), "\(expected) missing from:\n\(show)")
        }
        #expect(try daemon.vsctl("get", "Interface", "lo", "ofport").stdout == "1\n")
        // What the kernel reports for the device.
        let loMTU = (try? String(contentsOfFile: "/sys/class/net/lo/mtu", encoding: .utf8)) ?? "?"
        #expect(try daemon.vsctl("get", "Interface", "lo", "mtu").stdout == loMTU)
        #expect(try daemon.vsctl("get", "Interface", "lo", "ifindex").stdout == "1\n")
        #expect(try daemon.vsctl("get", "Interface", "lo", "mac_in_use").stdout == "\"00:00:00:00:00:00\"\n")
        // The bridge's own port is a TAP; opening one needs root (elsewhere it fails with -1).
        #expect(try daemon.vsctl("get", "Interface", "nvs0", "ofport").stdout == (getuid() == 0 ? "65534\n" : "-1\n"))
        #expect(try daemon.vsctl("get", "Interface", "ghost0", "ofport").stdout == "-1\n")
        #expect(try daemon.vsctl("del-port", "nvs0", "ghost0").status == 0)
        #expect(try daemon.vsctl("add-br", "nvs1").status == 0)
        #expect(try daemon.vsctl("del-br", "nvs1").status == 0)
        #expect(try daemon.vsctl("br-exists", "nvs1").status == 2)
        let interfaces = try daemon.vsctl("--columns=name", "list", "Interface").stdout
        #expect(interfaces.components(separatedBy: "name").count - 1 == 3)

        // Raw RFC 7047 through ovsdb-client: errors are named, and rolled back.
        let socket = "unix:" + daemon.socket
        #expect(try OVSTools.run("ovsdb-client", ["list-dbs", socket]).stdout == "Open_vSwitch\n_Server\n")
        let bad = try OVSTools.run(
            "ovsdb-client",
            [
                "transact", socket,
                #"["Open_vSwitch",{"op":"insert","table":"Bridge","row":{"name":"x","ports":["uuid","11111111-1111-1111-1111-111111111111"]}}]"#,
            ])
        #expect(bad.stdout.contains("referential integrity violation"))
        let syntax = try OVSTools.run("ovsdb-client", ["transact", socket, #"["Open_vSwitch",{"op":"select","table":"Nope","where":[]}]"#])
        #expect(syntax.stdout.contains("syntax error"))
        // A client that sends garbage is cut off; the daemon goes on.
        let garbage = try OVSTools.run(
            "/usr/bin/python3",
            [
                "-c",
                """
                import socket; s = socket.socket(socket.AF_UNIX); s.connect("\(daemon.socket)"); s.sendall(b'}}}{'); print(s.recv(10))
                """,
            ])
        #expect(garbage.stdout == "b''\n")
        #expect(try daemon.vsctl("list-br").stdout == "nvs0\n")

        // ovs-appctl on the daemon's control socket.
        let appctl = ["-t", directory + "/nimbus-switchd.ctl"]
        #expect(try OVSTools.run("ovs-appctl", appctl + ["version"]).stdout.hasPrefix("nimbus-switchd "))
        let listing = try OVSTools.run("ovs-appctl", appctl + ["list-commands"]).stdout
        #expect(["fdb/show BRIDGE", "fdb/flush [BRIDGE]", "dpif/show", "exit"].allSatisfy { listing.contains($0) }, "\(listing)")
        #expect(try OVSTools.run("ovs-appctl", appctl + ["fdb/show", "nvs0"]).stdout.hasPrefix(" port  VLAN  MAC                Age\n"))
        #expect(try OVSTools.run("ovs-appctl", appctl + ["fdb/flush"]).stdout == "table successfully flushed\n")
        let dpif = try OVSTools.run("ovs-appctl", appctl + ["dpif/show"]).stdout
        #expect(dpif.contains("  nvs0:\n") && dpif.contains("    vx1 2: (vxlan)\n"), "\(dpif)")
        let noBridge = try OVSTools.run("ovs-appctl", appctl + ["fdb/show", "nope"])
        #expect(noBridge.status == 2 && noBridge.stderr.hasPrefix("no such bridge\n"), "\(noBridge)")
        let noCommand = try OVSTools.run("ovs-appctl", appctl + ["fdb/nothing"])
        #expect(noCommand.status == 2 && noCommand.stderr.contains("is not a valid command"), "\(noCommand)")

        // SIGTERM stops it cleanly; ovsdb-tool reads the file it left.
        #expect(daemon.stop() == 0)
        let query = try OVSTools.run(
            "ovsdb-tool",
            ["query", daemon.database, #"["Open_vSwitch",{"op":"select","table":"Port","where":[["name","==","lo"]],"columns":["tag","trunks"]}]"#])
        #expect(query.stdout.contains(#""tag":10"#), "\(query)")

        // A restart serves the same configuration, with the same port numbers.
        let again = try SwitchDaemon(directory: directory)
        #expect(try again.vsctl("list-ports", "nvs0").stdout == "lo\nvx1\n")
        #expect(try again.vsctl("get", "Interface", "lo", "ofport").stdout == "1\n")
        #expect(try again.vsctl("get", "Interface", "vx1", "ofport").stdout == "2\n")
        // ovs-appctl exit stops it as SIGTERM does.
        #expect(try OVSTools.run("ovs-appctl", appctl + ["exit"]).status == 0)
        again.process.waitUntilExit()
        #expect(again.process.terminationStatus == 0)
    }

    @Test func ovsOfctlManagesFlowTables() throws {
        try #require(OVSTools.installed, "install openvswitch-switch (ovs-vsctl, ovs-ofctl)")
        try #require(FileManager.default.isExecutableFile(atPath: OVSTools.switchd), "build nimbus-switchd first (scripts/test does)")
        let directory = try makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let daemon = try SwitchDaemon(directory: directory)
        defer { _ = daemon.stop() }
        // No ports are needed to drive the tables (without root the bridge's own port cannot open).
        _ = try daemon.vsctl("add-br", "brt")
        let controllerPort = 16_000 + Int.random(in: 0..<2000)
        _ = try daemon.vsctl("set-controller", "brt", "ptcp:\(controllerPort):127.0.0.1")
        let mgmt = "unix:\(directory)/brt.mgmt"
        func ofctl(_ arguments: String...) throws -> OVSTools.Output {
            try OVSTools.run("ovs-ofctl", ["-O", "OpenFlow13"] + arguments)
        }
        // A new bridge starts with priority=0 actions=NORMAL.
        #expect(try ofctl("dump-flows", mgmt).stdout.contains("priority=0 actions=NORMAL"))
        for flow in [
            "table=0,priority=10,cookie=0x5,in_port=1,dl_src=02:00:00:00:00:01/ff:ff:ff:00:00:00,actions=goto_table:1",
            "table=1,priority=20,tcp,nw_src=10.0.0.0/8,tp_dst=80,actions=mod_dl_dst:02:00:00:00:00:09,push_vlan:0x8100,set_field:100->vlan_vid,output:2",
            "priority=7,arp,arp_op=1,actions=FLOOD,IN_PORT,LOCAL,ALL",
            "priority=6,ip,actions=dec_ttl,controller",
            "priority=8,udp,hard_timeout=1,actions=drop",
        ] {
            let added = try ofctl("add-flow", mgmt, flow)
            #expect(added.status == 0, "add-flow \(flow): \(added.stderr)")
        }
        var flows = try ofctl("dump-flows", mgmt).stdout
        for expected in [
            "cookie=0x5", "priority=10,in_port=1,dl_src=02:00:00:00:00:00/ff:ff:ff:00:00:00 actions=goto_table:1",
            "priority=20,tcp,nw_src=10.0.0.0/8,tp_dst=80 actions=set_field:02:00:00:00:00:09->eth_dst,push_vlan:0x8100",
            "priority=7,arp,arp_op=1 actions=FLOOD,IN_PORT,LOCAL,ALL", "priority=6,ip actions=dec_ttl,CONTROLLER",
            "hard_timeout=1, priority=8,udp actions=drop",
        ] {
            #expect(flows.contains(expected), "\(expected) missing from:\n\(flows)")
        }
        // The hard timeout removes its flow.
        Thread.sleep(forTimeInterval: 2.5)
        #expect(!(try ofctl("dump-flows", mgmt).stdout.contains("hard_timeout")))
        // modify (non-strict), strict delete, delete by cookie, then delete everything (table 255).
        #expect(try ofctl("mod-flows", mgmt, "table=1,tcp,actions=output:3").status == 0)
        #expect(try ofctl("dump-flows", mgmt, "table=1").stdout.contains("tp_dst=80 actions=output:3"))
        #expect(try ofctl("--strict", "del-flows", mgmt, "priority=7,arp,arp_op=1").status == 0)
        #expect(try ofctl("del-flows", mgmt, "cookie=0x5/-1").status == 0)
        flows = try ofctl("dump-flows", mgmt).stdout
        #expect(!flows.contains("arp_op=1") && !flows.contains("cookie=0x5"))
        #expect(try ofctl("dump-aggregate", mgmt).stdout.contains("flow_count=3"))
        #expect(try ofctl("dump-tables", mgmt).stdout.contains("table 1:"))
        #expect(try ofctl("dump-ports-desc", mgmt).status == 0)
        #expect(try ofctl("show", mgmt).stdout.contains("n_tables:254"))
        let packetOut = try ofctl(
            "packet-out", mgmt,
            "in_port=controller packet=ffffffffffff020000000001080600010800060400010200000000010101010100000000000001010102 actions=FLOOD")
        #expect(packetOut.status == 0, "\(packetOut.stderr)")
        // The controller target from set-controller speaks OpenFlow too.
        var viaTCP = try ofctl("dump-flows", "tcp:127.0.0.1:\(controllerPort)")
        for _ in 0..<20 where viaTCP.status != 0 {
            Thread.sleep(forTimeInterval: 0.1)
            viaTCP = try ofctl("dump-flows", "tcp:127.0.0.1:\(controllerPort)")
        }
        #expect(viaTCP.stdout.contains("priority=0 actions=NORMAL"))
        // Garbage on the OpenFlow socket closes that connection only.
        let garbage = try OVSTools.run(
            "/usr/bin/python3",
            [
                "-c",
                """
                import socket; s = socket.socket(socket.AF_UNIX); s.connect("\(directory)/brt.mgmt"); s.settimeout(3)
                s.sendall(b'\\x04\\x0e\\x00\\x04' + b'\\xff' * 64)
                while True:
                    chunk = s.recv(100)
                    if not chunk: break
                print(True)
                """,
            ])
        #expect(garbage.stdout == "True\n", "\(garbage)")
        // Bad requests get OpenFlow errors; OpenFlow 1.0 is refused at HELLO.
        let bad = try ofctl("add-flow", mgmt, "table=300,actions=drop")
        #expect(bad.status != 0)
        #expect(try OVSTools.run("ovs-ofctl", ["dump-flows", mgmt]).stderr.contains("version negotiation failed"))
        #expect(try ofctl("del-flows", mgmt).status == 0)
        #expect(!(try ofctl("dump-flows", mgmt).stdout.contains("priority")))
    }

    @Test func servesAFileOvsdbServerWrote() throws {
        try #require(OVSTools.installed, "install openvswitch-switch (ovs-vsctl, ovsdb-client, ovsdb-tool)")
        try #require(FileManager.default.isExecutableFile(atPath: OVSTools.switchd), "build nimbus-switchd first (scripts/test does)")
        let directory = try makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // ovsdb-tool writes the file exactly as ovsdb-server would.
        #expect(try OVSTools.run("ovsdb-tool", ["create", directory + "/conf.db", "/usr/share/openvswitch/vswitch.ovsschema"]).status == 0)
        let insert =
            #"["Open_vSwitch",{"op":"insert","table":"Open_vSwitch","row":{"bridges":["named-uuid","b"]}},"#
            + #"{"op":"insert","table":"Bridge","uuid-name":"b","row":{"name":"legacy"}}]"#
        #expect(try OVSTools.run("ovsdb-tool", ["transact", directory + "/conf.db", insert]).status == 0)
        let daemon = try SwitchDaemon(directory: directory)
        #expect(try daemon.vsctl("list-br").stdout == "legacy\n")
        #expect(try daemon.vsctl("add-port", "legacy", "lo").status == 0)
        #expect(daemon.stop() == 0)
        #expect(try OVSTools.run("ovsdb-tool", ["show-log", directory + "/conf.db"]).status == 0)
    }
}
