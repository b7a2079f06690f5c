// Switch layer: keeps one datapath per bridge in step with the reconciled configuration: opens
// and closes ports, turns Port.tag/trunks/vlan_mode into the NORMAL action's VLAN rules, and owns
// each bridge's OpenFlow tables (a new bridge starts with `priority=0 actions=NORMAL`).
// Runs on the control loop; datapaths are told through their control queues.
import Glibc
import LinuxSystem
import Logging

public final class BridgeManager: @unchecked Sendable {
    // SAFETY (@unchecked): used only on the control event loop.
    let logger: Logger
    public private(set) var datapaths: [String: Datapath] = [:]
    private var openPorts: [String: [String: (port: DatapathPort, type: String, options: [String: String])]] = [:]
    private var vlanConfigs: [String: [UInt32: VLANConfig]] = [:]
    /// The Interface.mtu_request last applied to each kernel device: bridge → interface → MTU.
    private var appliedMTU: [String: [String: Int]] = [:]
    /// Sets a kernel device's MTU (replaceable in tests).
    public var setMTU: (String, Int) throws -> Void = { name, mtu in try NetworkInterface.setMTU(name, mtu) }
    public private(set) var tables: [String: FlowTables] = [:]
    /// OpenFlow port configuration set by PORT_MOD: bridge → ofport → `OFPortConfig` bits. A port
    /// opened anew starts with none, as in OVS.
    private var portConfigs: [String: [UInt32: UInt32]] = [:]
    /// Each bridge's table-miss counters (OpenFlow table statistics).
    public private(set) var misses: [String: TableMisses] = [:]
    /// Opens a port's I/O (replaceable in tests); nil: kernel interfaces, TAPs and VXLAN.
    public var openPort: ((SwitchPort, String) throws -> DatapathPort)?
    /// Called when a bridge is created or removed (the OpenFlow layer adds or drops its socket).
    public var bridgesChanged: (([String]) -> Void)?
    /// Flow tables a new bridge starts with (saved ones), instead of `priority=0 actions=NORMAL`.
    public var initialTables: ((String) -> FlowTables?)?
    /// Called with each new datapath before its thread starts.
    public var datapathCreated: ((String, Datapath) -> Void)?

    public init(logger: Logger) { self.logger = logger }

    /// The datapath's number for a port: the bridge's own port is OpenFlow's LOCAL.
    public static func datapathNumber(_ ofport: Int) -> UInt32 { ofport == Reconciler.localPort ? OFPort.local : UInt32(ofport) }

    /// VXLAN sockets by UDP port; one bridge owns each.
    private var vxlanSockets: [UInt16: VXLANSocket] = [:]

    public func openKernelPort(_ port: SwitchPort, bridge: String) throws -> DatapathPort {
        let ofport = Self.datapathNumber(port.ofport)
        switch port.type {
        case "", "system": return try SystemPort(name: port.name, ofport: ofport)
        case "internal", "tap": return try TapPort(name: port.name, ofport: ofport)
        case "vxlan":
            guard let remote = port.options["remote_ip"] else { throw SwitchError("\(port.name): vxlan needs options:remote_ip") }
            let key = port.options["key"] ?? "0"
            guard let vni = UInt32(key) else { throw SwitchError("\(port.name): key=\(key) is not supported (a number is)") }
            let udpPort = port.options["dst_port"].flatMap { UInt16($0) } ?? VXLANPort.defaultPort
            if let socket = vxlanSockets[udpPort], socket.isUnused { vxlanSockets[udpPort] = nil }
            let socket = try vxlanSockets[udpPort] ?? VXLANSocket(bridge: bridge, port: udpPort)
            guard socket.bridge == bridge else {
                throw SwitchError("UDP port \(udpPort) carries the VXLAN ports of bridge \(socket.bridge)")
            }
            vxlanSockets[udpPort] = socket
            return try VXLANPort(name: port.name, ofport: ofport, remote: remote, vni: vni, socket: socket)
        case "dgram":
            if let problem = DatagramPort.optionsProblem(port.options) { throw SwitchError("\(port.name): \(problem)") }
            // The port this one replaces (its options changed) holds the path until the datapath
            // thread has dropped it, which takes a moment: a live socket there is waited for.
            func open() throws(SystemError) -> DatagramPort {
                try DatagramPort(
                    name: port.name, ofport: ofport, localPath: port.options["local_path"] ?? "",
                    remotePath: port.options["remote_path"] ?? "", vnetHeader: port.options["vnet_hdr"] == "true")
            }
            for _ in 0..<50 {
                do {
                    return try open()
                } catch {
                    guard error.errno == EADDRINUSE else { throw error }
                }
                Host.sleep(microseconds: 10_000)
            }
            return try open()
        default: throw SwitchError("ports of type \(port.type) are not supported by this datapath yet")
        }
    }

    /// Applies the reconciled bridges; returns the ports that failed to open.
    public func apply(_ bridges: [String: SwitchBridge]) -> [String: [String: String]] {
        var failures: [String: [String: String]] = [:]
        for name in datapaths.keys where bridges[name] == nil {
            for open in openPorts[name]?.values ?? [:].values { (open.port as? VXLANPort)?.detach() }
            datapaths[name]?.stop()
            datapaths[name] = nil
            openPorts[name] = nil
            vlanConfigs[name] = nil
            appliedMTU[name] = nil
            portConfigs[name] = nil
            tables[name] = nil
            misses[name] = nil
            logger.info("bridge \(name) removed")
        }
        for (name, bridge) in bridges {
            let datapath: Datapath
            if let existing = datapaths[name] {
                datapath = existing
            } else {
                do {
                    datapath = try Datapath(name: name, logger: logger)
                    datapathCreated?(name, datapath)
                    try datapath.start()
                } catch {
                    logger.error("bridge \(name): cannot start its datapath: \(error)")
                    continue
                }
                datapaths[name] = datapath
                tables[name] = initialTables?(name) ?? FlowTables.normalOnly()
                misses[name] = TableMisses()
                logger.info("bridge \(name) created")
            }
            var current = openPorts[name] ?? [:]
            for (interface, open) in current {
                let wanted = bridge.ports[interface]
                // A port whose type or options changed (a VXLAN remote_ip, a dgram path) is opened anew.
                if wanted == nil || wanted?.error != nil || wanted.map({ Self.datapathNumber($0.ofport) }) != open.port.ofport
                    || wanted?.type != open.type || wanted?.options != open.options
                {
                    datapath.remove(ofport: open.port.ofport)
                    (open.port as? VXLANPort)?.detach()
                    current[interface] = nil
                    appliedMTU[name]?[interface] = nil  // a device opened anew may be a new device
                    portConfigs[name]?[open.port.ofport] = nil
                }
            }
            // Let go of removed ports now: one reopened with new options may need what they hold.
            openPorts[name] = current
            var vlans: [UInt32: VLANConfig] = [:]
            for (interface, port) in bridge.ports where port.error == nil && port.ofport > 0 {
                if current[interface] == nil {
                    do {
                        let opened = try openPort?(port, name) ?? openKernelPort(port, bridge: name)
                        datapath.add(opened)
                        current[interface] = (opened, port.type, port.options)
                    } catch {
                        failures[name, default: [:]][interface] = "could not open network device \(interface) (\(error))"
                        continue
                    }
                }
                applyMTU(port, bridge: name)
                vlans[Self.datapathNumber(port.ofport)] = VLANConfig(
                    tag: port.tag.map { UInt16($0) }, trunks: Set(port.trunks.map { UInt16($0) }), mode: port.vlanMode)
            }
            openPorts[name] = current
            vlanConfigs[name] = vlans
            push(name)
        }
        bridgesChanged?(datapaths.keys.sorted())
        return failures
    }

    /// Sets a kernel device's MTU to its Interface.mtu_request once per new value, as
    /// ovs-vswitchd does; a refusal is logged and the port keeps working with the MTU it has.
    private func applyMTU(_ port: SwitchPort, bridge: String) {
        guard ["", "system", "internal", "tap"].contains(port.type) else { return }
        guard let mtu = port.mtuRequest else {
            appliedMTU[bridge]?[port.name] = nil
            return
        }
        guard appliedMTU[bridge]?[port.name] != mtu else { return }
        appliedMTU[bridge, default: [:]][port.name] = mtu
        do {
            try setMTU(port.name, mtu)
            logger.info("\(port.name): MTU set to \(mtu)")
        } catch {
            logger.warning("\(port.name): cannot set the MTU to \(mtu): \(error)")
        }
    }

    /// Sends a bridge's current ports and tables to its datapath.
    public func push(_ bridge: String) {
        guard let datapath = datapaths[bridge] else { return }
        datapath.configure(
            PipelineConfig(
                ports: vlanConfigs[bridge] ?? [:], tables: tables[bridge]?.snapshot() ?? [:], misses: misses[bridge],
                portConfig: portConfigs[bridge] ?? [:]))
    }

    /// A port's OpenFlow configuration bits.
    public func portConfig(_ bridge: String, _ ofport: UInt32) -> UInt32 { portConfigs[bridge]?[ofport] ?? 0 }

    /// Sets the bits of `mask` in a port's OpenFlow configuration to those of `config` (PORT_MOD).
    public func modifyPort(_ bridge: String, _ ofport: UInt32, config: UInt32, mask: UInt32) {
        let old = portConfig(bridge, ofport)
        let new = (old & ~mask) | (config & mask)
        guard new != old else { return }
        portConfigs[bridge, default: [:]][ofport] = new == 0 ? nil : new
        logger.info("bridge \(bridge): port \(ofport) OpenFlow config 0x\(String(new, radix: 16))")
        push(bridge)
    }

    /// Changes a bridge's flow tables and pushes them.
    public func modifyTables(_ bridge: String, _ body: (inout FlowTables) throws -> Void) rethrows {
        guard var current = tables[bridge] else { return }
        try body(&current)
        tables[bridge] = current
        push(bridge)
    }

    public func port(_ bridge: String, ofport: UInt32) -> DatapathPort? {
        openPorts[bridge]?.values.first { $0.port.ofport == ofport }?.port
    }

    public func ports(_ bridge: String) -> [DatapathPort] {
        (openPorts[bridge]?.values.map(\.port) ?? []).sorted { $0.ofport < $1.ofport }
    }

    /// A bridge's open ports with their Interface types, by number.
    public func portTypes(_ bridge: String) -> [(name: String, ofport: UInt32, type: String)] {
        (openPorts[bridge] ?? [:]).map { (name: $0.key, ofport: $0.value.port.ofport, type: $0.value.type) }.sorted { $0.ofport < $1.ofport }
    }

    /// Every open port's counters, by interface name (names are unique across bridges).
    public func interfaceCounters() -> [String: PortCounters] {
        var out: [String: PortCounters] = [:]
        for ports in openPorts.values { for (name, open) in ports { out[name] = open.port.counters } }
        return out
    }

    public func stopAll() {
        for datapath in datapaths.values { datapath.stop() }
        datapaths.removeAll()
        openPorts.removeAll()
    }
}

/// A bridge's OpenFlow tables.
public struct FlowTables: Sendable {
    public private(set) var flows: [UInt8: [FlowEntry]] = [:]

    public init() {}

    public static func normalOnly() -> FlowTables {
        var tables = FlowTables()
        tables.add(
            FlowEntry(
                table: 0, priority: 0, value: FlowKey(), mask: FlowKey(),
                instructions: [.applyActions([.output(port: OFPort.normal, maxLength: 0)])], created: Host.monotonicNanoseconds()))
        return tables
    }

    /// Adds a flow, replacing one with the same table, priority and match.
    public mutating func add(_ flow: FlowEntry) {
        var list = flows[flow.table] ?? []
        list.removeAll { $0.sameMatch(flow) }
        let index = list.firstIndex { $0.priority < flow.priority } ?? list.count
        list.insert(flow, at: index)
        flows[flow.table] = list
    }

    /// Removes flows for which `predicate` holds; returns them.
    @discardableResult
    public mutating func remove(where predicate: (FlowEntry) -> Bool) -> [FlowEntry] {
        var removed: [FlowEntry] = []
        for (table, list) in flows {
            removed += list.filter(predicate)
            flows[table] = list.filter { !predicate($0) }
        }
        return removed
    }

    public var all: [FlowEntry] { flows.keys.sorted().flatMap { flows[$0] ?? [] } }

    public func snapshot() -> [UInt8: [FlowEntry]] { flows }
}
