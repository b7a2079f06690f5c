import LinuxSystem
// Switch layer: turns the Open_vSwitch, Bridge, Port and Interface tables into the switch's own
// model (bridges with numbered ports) and writes back what ovs-vswitchd would: Interface.ofport
// and error, Bridge.datapath_id, and cur_cfg = next_cfg once a configuration is applied, which is
// what a plain `ovs-vsctl` (without --no-wait) waits for.
import Logging
import OVSDB

/// One port as the switch sees it.
public struct SwitchPort: Sendable, Equatable {
    public var name: String
    public var type: String
    public var ofport: Int
    public var tag: Int?
    public var trunks: [Int]
    public var vlanMode: String?
    public var options: [String: String]
    public var error: String?
    /// Interface.mtu_request: the MTU to set on a kernel device (system, internal and tap ports).
    public var mtuRequest: Int? = nil
}

/// One bridge as the switch sees it.
public struct SwitchBridge: Sendable, Equatable {
    public var name: String
    public var uuid: RowUUID
    /// Interface name → port.
    public var ports: [String: SwitchPort]
    public var controllers: [String]
    public var datapathID: String
}

/// What the kernel reports for a network device (Interface.mtu, mac_in_use and ifindex).
public struct InterfaceFacts: Sendable, Equatable {
    public var mtu: Int
    public var mac: String
    public var index: Int

    public init(mtu: Int, mac: String, index: Int) {
        self.mtu = mtu
        self.mac = mac
        self.index = index
    }
}

/// Where an interface name exists on the host (a veth end or an existing TAP).
public protocol HostInterfaces {
    func exists(_ name: String) -> Bool
    /// The device's MTU, MAC and index, if it is visible here (not, say, moved to another namespace).
    func facts(_ name: String) -> InterfaceFacts?
}

extension HostInterfaces {
    public func facts(_ name: String) -> InterfaceFacts? { nil }
}

/// The host's network interfaces, as /sys/class/net lists them.
public struct SysfsInterfaces: HostInterfaces {
    public init() {}
    public func exists(_ name: String) -> Bool {
        !name.contains("/") && name != "." && name != ".." && fileExists("/sys/class/net/\(name)")
    }

    public func facts(_ name: String) -> InterfaceFacts? {
        guard exists(name) else { return nil }
        func read(_ file: String) -> String? {
            // Sysfs files claim a size of 4096; read what is there, up to the newline.
            guard let bytes = try? OwnedFileDescriptor.openReadOnly("/sys/class/net/\(name)/\(file)").read(upTo: 64) else { return nil }
            return String(decoding: bytes.prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        }
        guard let mtu = read("mtu").flatMap({ Int($0) }), let mac = read("address"), let index = read("ifindex").flatMap({ Int($0) })
        else { return nil }
        return InterfaceFacts(mtu: mtu, mac: mac, index: index)
    }
}

public final class Reconciler {
    public static let database = "Open_vSwitch"
    /// OpenFlow's LOCAL port, which a bridge's own internal interface takes (as in OVS).
    public static let localPort = 65534
    public static let supportedTypes: Set<String> = ["", "system", "internal", "tap", "vxlan", "dgram", "nimbus"]

    let logger: Logger
    let host: HostInterfaces
    /// The switch's view after the last reconciliation, by bridge name.
    public private(set) var bridges: [String: SwitchBridge] = [:]
    /// Ports keep their numbers across reconciliations: bridge → interface → ofport.
    private var assigned: [String: [String: Int]] = [:]
    /// Applies the new bridge set to the datapath after each reconciliation; returns errors of
    /// ports that could not be opened (bridge → interface → message).
    public var apply: (([String: SwitchBridge]) -> [String: [String: String]])?
    private var reconciling = false

    public init(host: HostInterfaces, logger: Logger) {
        self.host = host
        self.logger = logger
    }

    /// Called for every commit; reconciles when the switch's tables changed.
    public func committed(_ core: OVSDBCore, database: String, commit: Commit) {
        guard database == Self.database, !reconciling else { return }
        let relevant: Set<String> = ["Open_vSwitch", "Bridge", "Port", "Interface", "Controller"]
        guard commit.changes.keys.contains(where: relevant.contains) else { return }
        reconcile(core)
    }

    /// Sets the static facts ovs-vswitchd publishes at start.
    public func announce(_ core: OVSDBCore, version: String) {
        guard let db = core.database(Self.database) else { return }
        reconciling = true
        defer { reconciling = false }
        let row: JSON = .object([
            "ovs_version": .string(version),
            "db_version": .string(db.schema.version),
            "system_type": .string("nimbus"),
            "datapath_types": .array([.string("set"), .array([.string("netdev"), .string("system")])]),
            "iface_types": .array([.string("set"), .array(Self.supportedTypes.filter { !$0.isEmpty }.sorted().map { .string($0) })]),
        ])
        do {
            if db.rows("Open_vSwitch").isEmpty {
                try core.transact(Self.database, [.object(["op": .string("insert"), "table": .string("Open_vSwitch"), "row": row])])
            } else {
                try core.transact(
                    Self.database, [.object(["op": .string("update"), "table": .string("Open_vSwitch"), "where": .array([]), "row": row])])
            }
        } catch {
            logger.error("cannot write the Open_vSwitch row: \(error)")
        }
        reconcile(core)
    }

    public func reconcile(_ core: OVSDBCore) {
        guard let db = core.database(Self.database) else { return }
        reconciling = true
        defer { reconciling = false }
        let bridgeRows = Dictionary(uniqueKeysWithValues: db.rows("Bridge").map { ($0.uuid, $0) })
        let portRows = Dictionary(uniqueKeysWithValues: db.rows("Port").map { ($0.uuid, $0) })
        let interfaceRows = Dictionary(uniqueKeysWithValues: db.rows("Interface").map { ($0.uuid, $0) })
        let controllerRows = Dictionary(uniqueKeysWithValues: db.rows("Controller").map { ($0.uuid, $0) })
        guard let root = db.rows("Open_vSwitch").first else { return }

        var next: [String: SwitchBridge] = [:]
        var interfaceRowsByName: [String: [String: Row]] = [:]
        var interfaceUpdates: [(RowUUID, [String: JSON])] = []
        var bridgeUpdates: [(RowUUID, String)] = []
        for bridgeUUID in uuids(root["bridges"]) {
            guard let bridge = bridgeRows[bridgeUUID], let name = string(bridge["name"]) else { continue }
            var used = Set(assigned[name]?.values.map { $0 } ?? [])
            var numbers = assigned[name] ?? [:]
            var ports: [String: SwitchPort] = [:]
            // Ports in name order, so numbering does not depend on row UUIDs.
            let portUUIDs = uuids(bridge["ports"]).sorted { (string(portRows[$0]?["name"]) ?? "") < (string(portRows[$1]?["name"]) ?? "") }
            // Numbers the rows kept from before a restart are claimed before any new port is numbered.
            for portUUID in portUUIDs {
                for interfaceUUID in uuids(portRows[portUUID]?["interfaces"]) {
                    guard let interface = interfaceRows[interfaceUUID], let interfaceName = string(interface["name"]),
                        numbers[interfaceName] == nil, let previous = integer(interface["ofport"]), previous > 0,
                        previous < Self.localPort, !used.contains(previous)
                    else { continue }
                    numbers[interfaceName] = previous
                    used.insert(previous)
                }
            }
            for portUUID in portUUIDs {
                guard let port = portRows[portUUID] else { continue }
                let tag = integer(port["tag"])
                let trunks = (port["trunks"]?.keys ?? []).compactMap { if case .integer(let v) = $0 { Int(v) } else { nil } }
                let vlanMode = string(port["vlan_mode"])
                for interfaceUUID in uuids(port["interfaces"]) {
                    guard let interface = interfaceRows[interfaceUUID], let interfaceName = string(interface["name"]) else { continue }
                    let type = string(interface["type"]) ?? ""
                    var error: String?
                    let options = map(interface["options"])
                    if !Self.supportedTypes.contains(type) {
                        error = "could not add network device \(interfaceName) to ofproto (Invalid argument): type \(type) is not supported"
                    } else if type == "" || type == "system" || type == "tap", !host.exists(interfaceName) {
                        error = "could not open network device \(interfaceName) (No such device)"
                    } else if type == "vxlan", options["remote_ip"] == nil {
                        error = "\(interfaceName): vxlan type requires 'remote_ip' argument"
                    } else if type == "dgram", let problem = DatagramPort.optionsProblem(options) {
                        error = "\(interfaceName): \(problem)"
                    }
                    var ofport = -1
                    if error == nil {
                        if interfaceName == name, type == "internal" {
                            ofport = Self.localPort
                        } else if let existing = numbers[interfaceName] {
                            ofport = existing
                        } else {
                            let requested = integer(interface["ofport_request"])
                            if let requested, !used.contains(requested) {
                                ofport = requested
                            } else {
                                ofport = 1
                                while used.contains(ofport) { ofport += 1 }
                            }
                        }
                        numbers[interfaceName] = ofport
                        used.insert(ofport)
                    }
                    ports[interfaceName] = SwitchPort(
                        name: interfaceName, type: type, ofport: ofport, tag: tag, trunks: trunks, vlanMode: vlanMode, options: options,
                        error: error, mtuRequest: integer(interface["mtu_request"]))
                    interfaceRowsByName[name, default: [:]][interfaceName] = interface
                }
            }
            numbers = numbers.filter { ports[$0.key]?.error == nil && ports[$0.key] != nil }
            assigned[name] = numbers
            let controllers = uuids(bridge["controller"]).compactMap { controllerRows[$0].flatMap { string($0["target"]) } }
            let datapathID = String(bridgeUUID.low & 0xFFFF_FFFF_FFFF, radix: 16).leftPadded(to: 16)
            if string(bridge["datapath_id"]) != datapathID { bridgeUpdates.append((bridgeUUID, datapathID)) }
            next[name] = SwitchBridge(name: name, uuid: bridgeUUID, ports: ports, controllers: controllers, datapathID: datapathID)
        }
        for name in assigned.keys where next[name] == nil { assigned[name] = nil }
        if next != bridges {
            let failures = apply?(next) ?? [:]
            for (bridge, errors) in failures {
                for (interface, error) in errors {
                    next[bridge]?.ports[interface]?.error = error
                    next[bridge]?.ports[interface]?.ofport = -1
                    assigned[bridge]?[interface] = nil
                }
            }
            bridges = next
        }
        for (bridgeName, bridge) in bridges {
            for (interfaceName, port) in bridge.ports {
                guard let row = interfaceRowsByName[bridgeName]?[interfaceName] else { continue }
                var changes = factChanges(row, name: interfaceName, schema: db.schema)
                if integer(row["ofport"]) != port.ofport || string(row["error"]) != port.error {
                    changes["ofport"] = .int(Int64(port.ofport))
                    changes["error"] = port.error.map { .string($0) } ?? .array([.string("set"), .array([])])
                }
                if !changes.isEmpty { interfaceUpdates.append((row.uuid, changes)) }
            }
        }

        var operations: [JSON] = []
        for (uuid, changes) in interfaceUpdates {
            operations.append(
                .object(["op": .string("update"), "table": .string("Interface"), "where": whereUUID(uuid), "row": .object(changes)]))
        }
        for (uuid, datapathID) in bridgeUpdates {
            operations.append(
                .object([
                    "op": .string("update"), "table": .string("Bridge"), "where": whereUUID(uuid),
                    "row": .object(["datapath_id": .string(datapathID)]),
                ]))
        }
        let nextCfg = integer(root["next_cfg"]) ?? 0
        if integer(root["cur_cfg"]) != nextCfg {
            operations.append(
                .object([
                    "op": .string("update"), "table": .string("Open_vSwitch"), "where": whereUUID(root.uuid),
                    "row": .object(["cur_cfg": .int(Int64(nextCfg))]),
                ]))
        }
        guard !operations.isEmpty else { return }
        do {
            let results = try core.transact(Self.database, operations)
            if let failure = results.first(where: { $0["error"] != nil }) { logger.error("writing switch state failed: \(failure.text)") }
        } catch {
            logger.error("writing switch state failed: \(error)")
        }
    }

    /// Writes each open port's counters to Interface.statistics (an ephemeral column, so the
    /// file does not grow), with admin_state and link_state, as ovs-vswitchd does every few seconds.
    public func publishStatistics(_ core: OVSDBCore, counters: [String: PortCounters]) {
        guard let db = core.database(Self.database), db.schema.tables["Interface"]?.columns["statistics"] != nil else { return }
        reconciling = true
        defer { reconciling = false }
        var operations: [JSON] = []
        for row in db.rows("Interface") {
            guard let name = string(row["name"]) else { continue }
            let up = counters[name] != nil
            var statistics: [(String, Int64)] = []
            if let port = counters[name] {
                statistics = [
                    ("rx_packets", port.rxPackets), ("rx_bytes", port.rxBytes), ("tx_packets", port.txPackets),
                    ("tx_bytes", port.txBytes), ("tx_dropped", port.txDropped),
                ].map { ($0.0, Int64(truncatingIfNeeded: $0.1)) }
            }
            let datum = Datum(map: statistics.map { (Atom.string($0.0), Atom.integer($0.1)) })
            let state = Datum(Atom.string(up ? "up" : "down"))
            var changes = factChanges(row, name: name, schema: db.schema)
            if row["statistics"] != datum || row["link_state"] != state {
                changes["statistics"] = datum.json
                changes["link_state"] = state.json
                changes["admin_state"] = state.json
            }
            guard !changes.isEmpty else { continue }
            operations.append(
                .object(["op": .string("update"), "table": .string("Interface"), "where": whereUUID(row.uuid), "row": .object(changes)]))
        }
        guard !operations.isEmpty else { return }
        do {
            try core.transact(Self.database, operations)
        } catch {
            logger.error("writing interface statistics failed: \(error)")
        }
    }

    /// The Interface columns (mtu, mac_in_use, ifindex) that differ from what the kernel reports
    /// for the device, when it is visible here and the schema has them.
    private func factChanges(_ row: Row, name: String, schema: DatabaseSchema) -> [String: JSON] {
        guard let columns = schema.tables["Interface"]?.columns, let facts = host.facts(name) else { return [:] }
        var changes: [String: JSON] = [:]
        if columns["mtu"] != nil, integer(row["mtu"]) != facts.mtu { changes["mtu"] = .int(Int64(facts.mtu)) }
        if columns["mac_in_use"] != nil, string(row["mac_in_use"]) != facts.mac { changes["mac_in_use"] = .string(facts.mac) }
        if columns["ifindex"] != nil, integer(row["ifindex"]) != facts.index { changes["ifindex"] = .int(Int64(facts.index)) }
        return changes
    }

    private func whereUUID(_ uuid: RowUUID) -> JSON {
        .array([.array([.string("_uuid"), .string("=="), Atom.uuid(uuid).json])])
    }

    private func uuids(_ datum: Datum?) -> [RowUUID] { datum?.keys.compactMap(\.uuidValue) ?? [] }

    private func string(_ datum: Datum?) -> String? {
        if case .string(let value)? = datum?.keys.first { return value }
        return nil
    }

    private func integer(_ datum: Datum?) -> Int? {
        if case .integer(let value)? = datum?.keys.first { return Int(value) }
        return nil
    }

    private func map(_ datum: Datum?) -> [String: String] {
        var out: [String: String] = [:]
        for (key, value) in datum?.pairs ?? [] {
            if case .string(let k) = key, case .string(let v) = value { out[k] = v }
        }
        return out
    }
}
