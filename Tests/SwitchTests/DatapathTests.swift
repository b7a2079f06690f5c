// Unit tests for the switch without privileges: flow keys, the pipeline (NORMAL, VLANs, OpenFlow
// tables), and a running datapath thread over in-process ports.
import Foundation
import LinuxSystem
import Logging
import OVSDB
import Synchronization
import Testing

@testable import Switch

/// Builds Ethernet frames for tests.
enum Frames {
    static func mac(_ last: UInt8) -> [UInt8] { [0x02, 0, 0, 0, 0, last] }
    static let broadcast: [UInt8] = Array(repeating: 0xFF, count: 6)

    /// An IPv4/UDP frame from host `src` to host `dst` (10.0.0.x), optionally VLAN-tagged.
    static func udp(from src: UInt8, to dst: UInt8, dstMAC: [UInt8]? = nil, vlan: UInt16? = nil, port: UInt16 = 9) -> [UInt8] {
        var frame = (dstMAC ?? mac(dst)) + mac(src)
        if let vlan { frame += [0x81, 0x00, UInt8(vlan >> 8), UInt8(vlan & 0xFF)] }
        frame += [0x08, 0x00]
        var ip: [UInt8] = [0x45, 0, 0, 30, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, src, 10, 0, 0, dst]
        var sum: UInt32 = 0
        for index in stride(from: 0, to: 20, by: 2) { sum += UInt32(ip[index]) << 8 | UInt32(ip[index + 1]) }
        while sum > 0xFFFF { sum = (sum & 0xFFFF) + (sum >> 16) }
        let checksum = ~UInt16(sum)
        ip[10] = UInt8(checksum >> 8)
        ip[11] = UInt8(checksum & 0xFF)
        frame += ip
        frame += [0x30, 0x39, UInt8(port >> 8), UInt8(port & 0xFF), 0, 10, 0, 0, 0x68, 0x69]
        return frame
    }

    static func key(_ frame: [UInt8], inPort: UInt32) -> FlowKey {
        let batch = FrameBatch(capacity: 1, frameCapacity: 2048)
        batch.append(frame)
        return FlowKey.parse(batch, 0, inPort: inPort)
    }
}

@Suite struct FlowKeyTests {
    @Test func parsesTheHeaders() {
        let key = Frames.key(Frames.udp(from: 1, to: 2, vlan: 10, port: 53), inPort: 3)
        #expect(key.inPort == 3)
        #expect(key.vlanVID == 0x1000 | 10)
        #expect(key.ethType == EtherType.ipv4)
        #expect(key.ipProto == IPProtocol.udp)
        #expect(key.ipv4Src == 0x0A00_0001 && key.ipv4Dst == 0x0A00_0002)
        #expect(key.tpSrc == 12345 && key.tpDst == 53)
        #expect(key.ethSrc == 0x0200_0000_0001 && key.ethDst == 0x0200_0000_0002)
    }

    @Test func truncatedFramesLeaveFieldsZero() {
        let full = Frames.udp(from: 1, to: 2)
        for length in [0, 5, 13, 14, 20, 33, 40] {
            let key = Frames.key(Array(full.prefix(length)), inPort: 1)
            #expect(key.tpDst == 0)
        }
    }
}

@Suite struct PipelineTests {
    let now: UInt64 = 1_000_000_000

    func config(_ ports: [UInt32: VLANConfig], flows: [FlowEntry]? = nil) -> PipelineConfig {
        var tables = FlowTables.normalOnly()
        if let flows {
            tables = FlowTables()
            for flow in flows { tables.add(flow) }
        }
        return PipelineConfig(ports: ports, tables: tables.snapshot())
    }

    @Test func normalLearnsAndFloods() {
        let macs = MACTable()
        let setup = config([1: VLANConfig(), 2: VLANConfig(), 3: VLANConfig()])
        // Unknown destination: flood to every other port.
        var plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2), inPort: 1), config: setup, macs: macs, now: now)
        #expect(plan.outputs.map(\.port) == [2, 3])
        // The reply goes straight back to the learned port.
        plan = Pipeline.plan(Frames.key(Frames.udp(from: 2, to: 1), inPort: 2), config: setup, macs: macs, now: now)
        #expect(plan.outputs.map(\.port) == [1])
        #expect(plan.mask.ethSrc == 0xFFFF_FFFF_FFFF && plan.mask.ethDst == 0xFFFF_FFFF_FFFF)
        // Broadcast floods.
        plan = Pipeline.plan(
            Frames.key(Frames.udp(from: 2, to: 9, dstMAC: Frames.broadcast), inPort: 2), config: setup, macs: macs, now: now)
        #expect(plan.outputs.map(\.port) == [1, 3])
    }

    @Test func vlansSeparateAccessPortsAndTrunksCarryTags() {
        let macs = MACTable()
        let setup = config([
            1: VLANConfig(tag: 10), 2: VLANConfig(tag: 20), 3: VLANConfig(tag: 10), 4: VLANConfig(trunks: [10, 20]),
        ])
        // From an access port in VLAN 10: only the other VLAN 10 access port (untagged) and the trunk (tagged).
        var plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2), inPort: 1), config: setup, macs: macs, now: now)
        #expect(plan.outputs.map(\.port) == [3, 4])
        #expect(plan.outputs[0].edits.isEmpty)
        #expect(plan.outputs[1].edits == [.pushVLAN(tpid: EtherType.vlan), .setField(.vlanVID(10))])
        // A tagged frame from the trunk in VLAN 20 reaches port 2 untagged, nothing else.
        plan = Pipeline.plan(Frames.key(Frames.udp(from: 7, to: 8, vlan: 20), inPort: 4), config: setup, macs: macs, now: now)
        #expect(plan.outputs.map(\.port) == [2])
        #expect(plan.outputs[0].edits == [.popVLAN])
        // Tagged frames on an access port, and VLANs the trunk does not carry, are dropped.
        plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2, vlan: 10), inPort: 1), config: setup, macs: macs, now: now)
        #expect(plan.outputs.isEmpty)
        plan = Pipeline.plan(Frames.key(Frames.udp(from: 7, to: 8, vlan: 30), inPort: 4), config: setup, macs: macs, now: now)
        #expect(plan.outputs.isEmpty)
    }

    @Test func openFlowTablesMatchByPriorityAndGoto() {
        let macs = MACTable()
        var udp53 = FlowKey()
        udp53.ethType = EtherType.ipv4
        udp53.ipProto = IPProtocol.udp
        udp53.tpDst = 53
        let udp53Mask = FlowKey.mask {
            $0.ethType = 0xFFFF
            $0.ipProto = 0xFF
            $0.tpDst = 0xFFFF
        }
        let flows = [
            FlowEntry(table: 0, priority: 0, value: FlowKey(), mask: FlowKey(), instructions: [.gotoTable(1)], created: 0),
            FlowEntry(table: 0, priority: 100, value: udp53, mask: udp53Mask, instructions: [], created: 0),
            FlowEntry(
                table: 1, priority: 5, value: FlowKey(), mask: FlowKey(),
                instructions: [.applyActions([.setField(.ethDst(0x0200_0000_0099)), .output(port: 2, maxLength: 0)])], created: 0),
        ]
        let setup = config([1: VLANConfig(), 2: VLANConfig()], flows: flows)
        var plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2, port: 53), inPort: 1), config: setup, macs: macs, now: now)
        #expect(plan.outputs.isEmpty)
        #expect(plan.rules.count == 1)
        plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2, port: 80), inPort: 1), config: setup, macs: macs, now: now)
        #expect(plan.outputs == [OutputPlan(port: 2, edits: [.setField(.ethDst(0x0200_0000_0099))])])
        #expect(plan.rules.count == 2)
        // The megaflow mask covers the port field the higher-priority flow looked at.
        #expect(plan.mask.tpDst == 0xFFFF)
        #expect(plan.missed == nil)
    }

    @Test func portConfigurationStopsReceivingForwardingAndPacketIns() {
        let macs = MACTable()
        let toController = FlowEntry(
            table: 0, priority: 5, value: FlowKey(), mask: FlowKey(),
            instructions: [.applyActions([.output(port: OFPort.normal, maxLength: 0), .output(port: OFPort.controller, maxLength: 128)])],
            created: 0)
        var setup = config([1: VLANConfig(), 2: VLANConfig(), 3: VLANConfig()], flows: [toController])
        func outputs(from port: UInt32) -> [UInt32] {
            Pipeline.plan(Frames.key(Frames.udp(from: UInt8(port), to: 9), inPort: port), config: setup, macs: macs, now: now).outputs.map(\.port)
        }
        #expect(outputs(from: 1) == [2, 3, OFPort.controller])
        setup.portConfig = [2: OFPortConfig.noForward, 3: OFPortConfig.noReceive | OFPortConfig.noPacketIn]
        #expect(outputs(from: 1) == [3, OFPort.controller])
        #expect(outputs(from: 3).isEmpty)
        setup.portConfig = [1: OFPortConfig.noPacketIn, 3: OFPortConfig.portDown]
        #expect(outputs(from: 1) == [2])
        #expect(outputs(from: 3).isEmpty)
        // A port that does not receive learns nothing either.
        #expect(macs.lookup(0x0200_0000_0003, vlan: 0) == nil)
    }

    @Test func aTableMissIsCountedForItsTable() {
        var tcp = FlowKey()
        tcp.ethType = EtherType.ipv4
        tcp.ipProto = IPProtocol.tcp
        let tcpMask = FlowKey.mask {
            $0.ethType = 0xFFFF
            $0.ipProto = 0xFF
        }
        let flows = [
            FlowEntry(table: 0, priority: 0, value: FlowKey(), mask: FlowKey(), instructions: [.gotoTable(3)], created: 0),
            FlowEntry(table: 3, priority: 1, value: tcp, mask: tcpMask, instructions: [.applyActions([.output(port: 2, maxLength: 0)])], created: 0),
        ]
        var setup = config([1: VLANConfig(), 2: VLANConfig()], flows: flows)
        let misses = TableMisses()
        setup.misses = misses
        let plan = Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2, port: 53), inPort: 1), config: setup, macs: MACTable(), now: now)
        #expect(plan.outputs.isEmpty)
        #expect(plan.missed === misses.counters(3))
        // A table with no flows at all misses too.
        setup.tables[0] = nil
        #expect(Pipeline.plan(Frames.key(Frames.udp(from: 1, to: 2), inPort: 1), config: setup, macs: MACTable(), now: now).missed === misses.counters(0))
        #expect(misses.counters(254) == nil)
    }
}

@Suite(.serialized) struct DatapathTests {
    func waitFor(_ port: MemoryPort, count: Int = 1) -> [[UInt8]] {
        var frames: [[UInt8]] = []
        for _ in 0..<200 {
            frames += port.take()
            if frames.count >= count { break }
            Thread.sleep(forTimeInterval: 0.005)
        }
        return frames
    }

    /// A datapath over `ports` with these VLAN settings and NORMAL only, its thread started.
    func started(_ name: String, _ ports: [any DatapathPort], vlans: [UInt32: VLANConfig]) throws -> Datapath {
        let datapath = try Datapath(name: name, logger: Logger(label: "test"))
        for port in ports { datapath.add(port) }
        datapath.configure(PipelineConfig(ports: vlans, tables: FlowTables.normalOnly().snapshot()))
        try datapath.start()
        return datapath
    }

    /// The MAC table as the datapath thread hands it over (ovs-appctl fdb/show).
    func macEntries(_ datapath: Datapath) throws -> [MACEntry] {
        let box = Mutex<[MACEntry]?>(nil)
        datapath.macEntries { entries in box.withLock { $0 = entries } }
        for _ in 0..<400 {
            if let entries = box.withLock({ $0 }) { return entries }
            Thread.sleep(forTimeInterval: 0.005)
        }
        throw SwitchError("the datapath thread did not answer")
    }

    @Test func theMACTableCanBeListedAndFlushed() throws {
        let first = try MemoryPort(name: "a", ofport: 1)
        let second = try MemoryPort(name: "b", ofport: 2)
        let datapath = try started("fdb", [first, second], vlans: [1: VLANConfig(tag: 10), 2: VLANConfig(tag: 10)])
        defer { datapath.stop() }
        first.inject(Frames.udp(from: 1, to: 2))
        #expect(waitFor(second).count == 1)
        second.inject(Frames.udp(from: 2, to: 1))
        #expect(waitFor(first).count == 1)
        let entries = try macEntries(datapath)
        #expect(entries.map(\.port) == [1, 2] && entries.map(\.vlan) == [10, 10])
        #expect(entries.map(\.mac) == [0x0200_0000_0001, 0x0200_0000_0002])
        #expect(
            SwitchControl.fdbTable(entries)
                == " port  VLAN  MAC                Age\n    1    10  02:00:00:00:00:01    0\n    2    10  02:00:00:00:00:02    0\n")
        datapath.flushMACs()
        #expect(try macEntries(datapath).isEmpty)
        // Flushed means forgotten: the next frame to host 1 is flooded again, and relearned.
        second.inject(Frames.udp(from: 2, to: 1))
        #expect(waitFor(first).count == 1)
        #expect(try macEntries(datapath).map(\.port) == [2])
    }

    @Test func forwardsLearnsAndRetagsBetweenMemoryPorts() throws {
        let access = try MemoryPort(name: "a", ofport: 1)
        let other = try MemoryPort(name: "b", ofport: 2)
        let trunk = try MemoryPort(name: "t", ofport: 3)
        let datapath = try started("test", [access, other, trunk], vlans: [1: VLANConfig(tag: 10), 2: VLANConfig(tag: 20), 3: VLANConfig()])
        defer { datapath.stop() }
        access.inject(Frames.udp(from: 1, to: 2))
        // Only the trunk gets it, tagged with VLAN 10; the VLAN 20 port gets nothing.
        let tagged = waitFor(trunk)
        #expect(tagged == [Frames.udp(from: 1, to: 2, vlan: 10)])
        #expect(other.take().isEmpty)
        // The answer from the trunk is untagged on the way to the learned access port.
        trunk.inject(Frames.udp(from: 2, to: 1, vlan: 10))
        #expect(waitFor(access) == [Frames.udp(from: 2, to: 1)])
        // Many frames in a row keep their order and all arrive (cache hits after the first).
        for index in 0..<200 { access.inject(Frames.udp(from: 1, to: 2, port: UInt16(1000 + index))) }
        let burst = waitFor(trunk, count: 200)
        #expect(burst.count == 200)
        #expect(burst.first == Frames.udp(from: 1, to: 2, vlan: 10, port: 1000))
        #expect(datapath.stats.upcalls < 210)
    }

    @Test func aBurstFloodedToManyTrunksReachesEveryOne() throws {
        // 32 broadcasts from an access port in one batch, each flooded to four trunks with a tag
        // pushed: 128 edited copies, more than one round of copies holds. None may be lost.
        let access = try MemoryPort(name: "a", ofport: 1)
        let trunks = try (2...5).map { try MemoryPort(name: "t\($0)", ofport: UInt32($0)) }
        var vlans: [UInt32: VLANConfig] = [1: VLANConfig(tag: 10)]
        for ofport in 2...5 { vlans[UInt32(ofport)] = VLANConfig() }
        // Queued before the thread starts, so that it reads all 32 in one batch.
        for index in 0..<32 { access.inject(Frames.udp(from: 1, to: 2, dstMAC: Frames.broadcast, port: UInt16(index))) }
        let datapath = try started("flood", [access] + trunks, vlans: vlans)
        defer { datapath.stop() }
        for trunk in trunks {
            let frames = waitFor(trunk, count: 32)
            #expect(frames.count == 32, "port \(trunk.name)")
            #expect(frames.last == Frames.udp(from: 1, to: 2, dstMAC: Frames.broadcast, vlan: 10, port: 31))
        }
    }

    @Test func aNewFlowTableAppliesToTheFlowJustForwarded() throws {
        // The last flow's plan is kept in front of the caches; a table change must drop it too.
        let one = try MemoryPort(name: "one", ofport: 1)
        let two = try MemoryPort(name: "two", ofport: 2)
        let ports: [UInt32: VLANConfig] = [1: VLANConfig(), 2: VLANConfig()]
        let datapath = try started("retable", [one, two], vlans: ports)
        defer { datapath.stop() }
        let frame = Frames.udp(from: 1, to: 2)
        one.inject(frame)
        #expect(waitFor(two) == [frame])
        var dropAll = FlowTables()
        dropAll.add(FlowEntry(table: 0, priority: 100, value: FlowKey(), mask: FlowKey(), instructions: [], created: 0))
        datapath.configure(PipelineConfig(ports: ports, tables: dropAll.snapshot()))
        Thread.sleep(forTimeInterval: 0.1)
        one.inject(frame)
        Thread.sleep(forTimeInterval: 0.1)
        #expect(two.take().isEmpty, "dropped by the new table")
        datapath.configure(PipelineConfig(ports: ports, tables: FlowTables.normalOnly().snapshot()))
        Thread.sleep(forTimeInterval: 0.1)
        one.inject(frame)
        #expect(waitFor(two) == [frame])
    }

    /// A port whose descriptor hangs up for good: the read end of a pipe whose writer is closed.
    final class HungUpPort: DatapathPort, @unchecked Sendable {
        let ofport: UInt32 = 7
        let name = "gone"
        let counters = PortCounters()
        let pollDescriptor: Int32

        init() {
            var ends: [Int32] = [-1, -1]
            _ = pipe(&ends)
            close(ends[1])
            pollDescriptor = ends[0]
        }

        deinit { close(pollDescriptor) }
        func receive(into batch: FrameBatch) -> Int { 0 }
        func send(_ frames: [FrameRef]) -> Int { 0 }
    }

    @Test func aPortThatKeepsHangingUpIsNoLongerPolled() throws {
        // Before, such a port (a TAP deleted with its namespace) kept the thread spinning at 100 %.
        let port = HungUpPort()
        let live = try MemoryPort(name: "live", ofport: 1)
        let other = try MemoryPort(name: "other", ofport: 2)
        let datapath = try started("hup", [port, live, other], vlans: [1: VLANConfig(), 2: VLANConfig(), 7: VLANConfig()])
        defer { datapath.stop() }
        var dead = 0
        for _ in 0..<80 where dead == 0 {
            Thread.sleep(forTimeInterval: 0.05)
            dead = datapath.stats.deadPorts
        }
        #expect(dead == 1)
        // The other ports still forward.
        live.inject(Frames.udp(from: 1, to: 2))
        #expect(waitFor(other) == [Frames.udp(from: 1, to: 2)])
    }
}

@Suite struct BridgeManagerTests {
    @Test func aPortWhoseOptionsChangeIsOpenedAnew() throws {
        let manager = BridgeManager(logger: Logger(label: "test"))
        defer { manager.stopAll() }
        let opened = Mutex<[String: [String: String]]>([:])
        manager.openPort = { port, _ in
            opened.withLock { $0[port.name] = port.options }
            return try MemoryPort(name: port.name, ofport: UInt32(port.ofport))
        }
        func bridge(_ options: [String: String]) -> [String: SwitchBridge] {
            let port = SwitchPort(name: "vx", type: "vxlan", ofport: 1, tag: nil, trunks: [], vlanMode: nil, options: options, error: nil)
            return ["br0": SwitchBridge(name: "br0", uuid: RowUUID(high: 1, low: 2), ports: ["vx": port], controllers: [], datapathID: "1")]
        }
        #expect(manager.apply(bridge(["remote_ip": "192.0.2.1"])).isEmpty)
        #expect(opened.withLock { $0["vx"] } == ["remote_ip": "192.0.2.1"])
        // The same configuration again keeps the port; a new remote_ip reopens it.
        opened.withLock { $0 = [:] }
        _ = manager.apply(bridge(["remote_ip": "192.0.2.1"]))
        #expect(opened.withLock { $0.isEmpty })
        _ = manager.apply(bridge(["remote_ip": "192.0.2.9"]))
        #expect(opened.withLock { $0["vx"] } == ["remote_ip": "192.0.2.9"])
    }

    @Test func mtuRequestsAreAppliedOncePerValueToKernelDevices() throws {
        let manager = BridgeManager(logger: Logger(label: "test"))
        defer { manager.stopAll() }
        manager.openPort = { port, _ in try MemoryPort(name: port.name, ofport: UInt32(port.ofport)) }
        let set = Mutex<[String]>([])
        manager.setMTU = { name, mtu in
            set.withLock { $0.append("\(name)=\(mtu)") }
            if mtu > 9000 { throw SwitchError("refused") }
        }
        func bridge(_ mtu: Int?, vxlan: Int? = nil) -> [String: SwitchBridge] {
            var veth = SwitchPort(name: "veth0", type: "", ofport: 1, tag: nil, trunks: [], vlanMode: nil, options: [:], error: nil)
            veth.mtuRequest = mtu
            var tunnel = SwitchPort(name: "vx", type: "vxlan", ofport: 2, tag: nil, trunks: [], vlanMode: nil, options: ["remote_ip": "192.0.2.1"])
            tunnel.mtuRequest = vxlan
            return ["br0": SwitchBridge(name: "br0", uuid: RowUUID(high: 1, low: 2), ports: ["veth0": veth, "vx": tunnel], controllers: [], datapathID: "1")]
        }
        _ = manager.apply(bridge(1400, vxlan: 1400))
        _ = manager.apply(bridge(1400, vxlan: 1400))
        // A refused value is tried once too, and the port stays open; a cleared request sets nothing.
        _ = manager.apply(bridge(9500))
        _ = manager.apply(bridge(9500))
        _ = manager.apply(bridge(nil))
        _ = manager.apply(bridge(1500))
        #expect(set.withLock { $0 } == ["veth0=1400", "veth0=9500", "veth0=1500"])
        #expect(manager.ports("br0").map(\.name) == ["veth0", "vx"])
    }
}
