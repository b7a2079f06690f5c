// Switch layer: the OpenFlow pipeline (tables of prioritized flows with instructions and actions)
// and the NORMAL action (MAC learning per VLAN, access and trunk ports, flooding within a VLAN).
// Running the pipeline for one flow key gives a `FlowPlan`: what to do with every packet of that
// flow, and the mask of the fields the decision depended on, which is what the megaflow cache
// stores. Packets are never touched here; the datapath applies plans.
import Synchronization

/// The switch's OpenFlow tables: 0 to 253 (255 means "all" in requests).
public enum OFTable {
    public static let count = 254
}

/// OpenFlow 1.3 port configuration bits (PORT_MOD, port descriptions).
public enum OFPortConfig {
    public static let portDown: UInt32 = 1 << 0
    public static let noReceive: UInt32 = 1 << 2
    public static let noForward: UInt32 = 1 << 5
    public static let noPacketIn: UInt32 = 1 << 6
    public static let all = portDown | noReceive | noForward | noPacketIn
}

/// OpenFlow port numbers with special meaning.
public enum OFPort {
    public static let max: UInt32 = 0xFFFF_FF00
    public static let inPort: UInt32 = 0xFFFF_FFF8
    public static let table: UInt32 = 0xFFFF_FFF9
    public static let normal: UInt32 = 0xFFFF_FFFA
    public static let flood: UInt32 = 0xFFFF_FFFB
    public static let all: UInt32 = 0xFFFF_FFFC
    public static let controller: UInt32 = 0xFFFF_FFFD
    public static let local: UInt32 = 0xFFFF_FFFE
    public static let any: UInt32 = 0xFFFF_FFFF
}

/// A field a set_field action can write.
public enum SetField: Sendable, Hashable {
    case ethSrc(UInt64)
    case ethDst(UInt64)
    case vlanVID(UInt16)
    case vlanPCP(UInt8)
    case ipv4Src(UInt32)
    case ipv4Dst(UInt32)
    case ipDSCP(UInt8)
    case tpSrc(UInt16)
    case tpDst(UInt16)
    case tunnelID(UInt64)
    case metadata(UInt64)
}

public enum Action: Sendable, Hashable {
    case output(port: UInt32, maxLength: UInt16)
    case setField(SetField)
    case pushVLAN(UInt16)
    case popVLAN
    case decTTL
    case setQueue(UInt32)
    case group(UInt32)
}

public enum Instruction: Sendable, Hashable {
    case applyActions([Action])
    case writeActions([Action])
    case clearActions
    case gotoTable(UInt8)
    case writeMetadata(value: UInt64, mask: UInt64)
}

/// Per-flow counters, written by the datapath thread and read by OpenFlow requests.
public final class FlowCounters: Sendable {
    private let packetCount = Atomic<UInt64>(0)
    private let byteCount = Atomic<UInt64>(0)
    private let lastHit = Atomic<UInt64>(0)

    public init() {}

    public func count(packets: UInt64, bytes: UInt64, now: UInt64) {
        packetCount.wrappingAdd(packets, ordering: .relaxed)
        byteCount.wrappingAdd(bytes, ordering: .relaxed)
        lastHit.store(now, ordering: .relaxed)
    }

    public var packets: UInt64 { packetCount.load(ordering: .relaxed) }
    public var bytes: UInt64 { byteCount.load(ordering: .relaxed) }
    public var lastUsed: UInt64 { lastHit.load(ordering: .relaxed) }
}

/// Counters of one port (OpenFlow port statistics).
public final class PortCounters: Sendable {
    let rxPacketCount = Atomic<UInt64>(0)
    let rxByteCount = Atomic<UInt64>(0)
    let txPacketCount = Atomic<UInt64>(0)
    let txByteCount = Atomic<UInt64>(0)
    let txDropCount = Atomic<UInt64>(0)
    public init() {}
    public var rxPackets: UInt64 { rxPacketCount.load(ordering: .relaxed) }
    public var rxBytes: UInt64 { rxByteCount.load(ordering: .relaxed) }
    public var txPackets: UInt64 { txPacketCount.load(ordering: .relaxed) }
    public var txBytes: UInt64 { txByteCount.load(ordering: .relaxed) }
    public var txDropped: UInt64 { txDropCount.load(ordering: .relaxed) }
}

/// One OpenFlow flow.
public final class FlowEntry: Sendable {
    public let table: UInt8
    public let priority: UInt16
    /// `key & mask == value` selects the packets.
    public let value: FlowKey
    public let mask: FlowKey
    public let instructions: [Instruction]
    public let cookie: UInt64
    public let idleTimeout: UInt16
    public let hardTimeout: UInt16
    public let flags: UInt16
    /// Nanoseconds (monotonic) when the flow was added.
    public let created: UInt64
    public let counters: FlowCounters

    public init(
        table: UInt8, priority: UInt16, value: FlowKey, mask: FlowKey, instructions: [Instruction], cookie: UInt64 = 0,
        idleTimeout: UInt16 = 0, hardTimeout: UInt16 = 0, flags: UInt16 = 0, created: UInt64, counters: FlowCounters = FlowCounters()
    ) {
        self.table = table
        self.priority = priority
        self.value = value & mask
        self.mask = mask
        self.instructions = instructions
        self.cookie = cookie
        self.idleTimeout = idleTimeout
        self.hardTimeout = hardTimeout
        self.flags = flags
        self.created = created
        self.counters = counters
    }

    public func matches(_ key: FlowKey) -> Bool { (key & mask) == value }

    /// The same match (OpenFlow's "strict" comparison).
    public func sameMatch(_ other: FlowEntry) -> Bool { priority == other.priority && mask == other.mask && value == other.value }
}

/// How the NORMAL action treats a port's VLANs (Port.tag, trunks and vlan_mode).
public struct VLANConfig: Sendable, Equatable {
    public var tag: UInt16?
    public var trunks: Set<UInt16>
    public var mode: String?

    public init(tag: UInt16? = nil, trunks: Set<UInt16> = [], mode: String? = nil) {
        self.tag = tag
        self.trunks = trunks
        self.mode = mode
    }

    var isAccess: Bool { tag != nil && mode != "trunk" && mode != "native-tagged" && mode != "native-untagged" }

    /// The VLAN a frame arriving with `vid` (nil: untagged) belongs to, or nil to drop it.
    func ingress(_ vid: UInt16?) -> UInt16? {
        if isAccess { return vid == nil || vid == 0 ? tag : nil }
        let vlan = vid ?? tag ?? 0
        return carries(vlan) ? vlan : nil
    }

    func carries(_ vlan: UInt16) -> Bool {
        if isAccess { return vlan == tag }
        if let tag, vlan == tag { return true }
        return trunks.isEmpty || trunks.contains(vlan)
    }

    /// Whether frames of `vlan` leave this port untagged.
    func untagged(_ vlan: UInt16) -> Bool { isAccess || vlan == 0 || (tag == vlan && mode != "native-tagged") }
}

/// What to do with a packet on one output.
public struct OutputPlan: Sendable, Equatable {
    public enum Edit: Sendable, Equatable {
        case setField(SetField)
        case pushVLAN(tpid: UInt16)
        case popVLAN
        case decTTL
    }
    public var port: UInt32
    public var edits: [Edit]
    /// For CONTROLLER outputs: how many bytes to send.
    public var maxLength: UInt16 = 0
}

/// The decision for every packet of one flow.
public final class FlowPlan: Sendable {
    public let outputs: [OutputPlan]
    /// The OpenFlow flows that matched (their counters go up with each packet).
    public let rules: [FlowEntry]
    /// The fields the decision depended on.
    public let mask: FlowKey
    /// The miss counter of the table where the pipeline ended on a miss, if it did.
    public let missed: FlowCounters?

    public init(outputs: [OutputPlan], rules: [FlowEntry], mask: FlowKey, missed: FlowCounters? = nil) {
        self.outputs = outputs
        self.rules = rules
        self.mask = mask
        self.missed = missed
    }
}

/// Per-table counts of packets that matched no flow, for OpenFlow table statistics (a table's
/// lookups are its flows' packets plus these). They live as long as the bridge, across changes
/// of its tables.
public final class TableMisses: Sendable {
    private let tables: [FlowCounters]

    public init() { tables = (0..<OFTable.count).map { _ in FlowCounters() } }

    public func counters(_ table: UInt8) -> FlowCounters? { Int(table) < tables.count ? tables[Int(table)] : nil }

    public func packets(_ table: UInt8) -> UInt64 { counters(table)?.packets ?? 0 }
}

/// One learned address, as `ovs-appctl fdb/show` lists it.
public struct MACEntry: Sendable, Equatable {
    public var mac: UInt64
    public var vlan: UInt16
    public var port: UInt32
    /// Seconds since a frame from it was last seen.
    public var age: UInt64
}

/// The bridge's MAC table: (MAC, VLAN) → port, with aging. Owned by the datapath thread.
public final class MACTable {
    public struct Entry {
        public var port: UInt32
        public var lastSeen: UInt64
    }
    public private(set) var entries: [MACKey: Entry] = [:]
    public var agingNanoseconds: UInt64 = 300_000_000_000
    public var maxEntries = 8192
    /// Goes up whenever a decision based on the table could change (a new or moved address).
    public private(set) var generation: UInt64 = 0

    public struct MACKey: Hashable, Sendable {
        public var mac: UInt64
        public var vlan: UInt16
    }

    public init() {}

    /// Learns that `mac` on `vlan` is behind `port`.
    public func learn(_ mac: UInt64, vlan: UInt16, port: UInt32, now: UInt64) {
        guard mac & 0x0100_0000_0000 == 0 else { return }  // never learn multicast sources
        let key = MACKey(mac: mac, vlan: vlan)
        if let existing = entries[key], existing.port == port {
            entries[key]?.lastSeen = now
            return
        }
        if entries.count >= maxEntries, entries[key] == nil {
            // Full: drop the oldest entry.
            if let oldest = entries.min(by: { $0.value.lastSeen < $1.value.lastSeen })?.key { entries[oldest] = nil }
        }
        entries[key] = Entry(port: port, lastSeen: now)
        generation &+= 1
    }

    public func lookup(_ mac: UInt64, vlan: UInt16) -> UInt32? { entries[MACKey(mac: mac, vlan: vlan)]?.port }

    /// Drops entries not seen for the aging time; true if any went.
    @discardableResult
    public func expire(now: UInt64) -> Bool {
        let before = entries.count
        entries = entries.filter { now &- $0.value.lastSeen < agingNanoseconds }
        if entries.count != before { generation &+= 1 }
        return entries.count != before
    }

    /// Forgets everything (ovs-appctl fdb/flush).
    public func flush() {
        guard !entries.isEmpty else { return }
        entries.removeAll()
        generation &+= 1
    }

    /// The entries with their ages in seconds, by port, VLAN and MAC.
    public func snapshot(now: UInt64) -> [MACEntry] {
        entries.map { MACEntry(mac: $0.key.mac, vlan: $0.key.vlan, port: $0.value.port, age: (now &- $0.value.lastSeen) / 1_000_000_000) }
            .sorted { ($0.port, $0.vlan, $0.mac) < ($1.port, $1.vlan, $1.mac) }
    }

    /// Forgets everything learned on `port` (it went away).
    public func forget(port: UInt32) {
        let before = entries.count
        entries = entries.filter { $0.value.port != port }
        if entries.count != before { generation &+= 1 }
    }
}

/// An immutable snapshot of a bridge's forwarding configuration: its ports and flow tables.
public struct PipelineConfig: Sendable {
    /// ofport → VLAN configuration (ports not listed do not exist).
    public var ports: [UInt32: VLANConfig]
    /// Flow tables, each sorted by descending priority.
    public var tables: [UInt8: [FlowEntry]]
    /// Where table misses are counted.
    public var misses: TableMisses?
    /// ofport → OpenFlow port configuration (`OFPortConfig` bits; absent means none set).
    public var portConfig: [UInt32: UInt32] = [:]

    public init(
        ports: [UInt32: VLANConfig] = [:], tables: [UInt8: [FlowEntry]] = [:], misses: TableMisses? = nil, portConfig: [UInt32: UInt32] = [:]
    ) {
        self.ports = ports
        self.tables = tables
        self.misses = misses
        self.portConfig = portConfig
    }
}

public enum Pipeline {
    /// The mask NORMAL always depends on.
    static let normalMask = FlowKey.mask {
        $0.inPort = ~0
        $0.vlanVID = 0x1FFF
        $0.ethSrc = 0xFFFF_FFFF_FFFF
        $0.ethDst = 0xFFFF_FFFF_FFFF
    }

    /// Runs the pipeline for `key` from table 0, learning MACs as NORMAL does.
    public static func plan(_ key: FlowKey, config: PipelineConfig, macs: MACTable, now: UInt64) -> FlowPlan {
        let inConfig = config.portConfig[key.inPort] ?? 0
        if inConfig & (OFPortConfig.portDown | OFPortConfig.noReceive) != 0 {
            // A port that is down or does not receive drops what arrives on it, before learning.
            return FlowPlan(outputs: [], rules: [], mask: FlowKey.mask { $0.inPort = ~0 })
        }
        let planned = pipeline(key, config: config, macs: macs, now: now)
        guard !config.portConfig.isEmpty else { return planned }
        let outputs = planned.outputs.filter { output in
            let outConfig = config.portConfig[output.port] ?? 0
            if outConfig & (OFPortConfig.portDown | OFPortConfig.noForward) != 0 { return false }
            return output.port != OFPort.controller || inConfig & OFPortConfig.noPacketIn == 0
        }
        guard outputs.count != planned.outputs.count else { return planned }
        return FlowPlan(outputs: outputs, rules: planned.rules, mask: planned.mask, missed: planned.missed)
    }

    /// The OpenFlow tables from table 0 for `key`.
    private static func pipeline(_ key: FlowKey, config: PipelineConfig, macs: MACTable, now: UInt64) -> FlowPlan {
        var key = key
        var mask = FlowKey.mask { $0.inPort = ~0 }
        var outputs: [OutputPlan] = []
        var edits: [OutputPlan.Edit] = []
        var actionSet: [Action] = []
        var rules: [FlowEntry] = []
        var missed: FlowCounters?
        var table: UInt8? = 0
        var hops = 0
        while let current = table, hops < 255 {
            hops += 1
            table = nil
            var matched: FlowEntry?
            for flow in config.tables[current] ?? [] {
                mask = mask | flow.mask
                if flow.matches(key) {
                    matched = flow
                    break
                }
            }
            guard let flow = matched else {
                // A table miss drops (OpenFlow 1.3).
                missed = config.misses?.counters(current)
                break
            }
            rules.append(flow)
            for instruction in flow.instructions {
                switch instruction {
                case .applyActions(let actions):
                    for action in actions {
                        apply(action, key: &key, mask: &mask, edits: &edits, outputs: &outputs, config: config, macs: macs, now: now)
                    }
                case .writeActions(let actions):
                    for action in actions {
                        // The action set keeps one action of each kind; outputs replace outputs.
                        if case .output = action { actionSet.removeAll { if case .output = $0 { true } else { false } } }
                        actionSet.append(action)
                    }
                case .clearActions:
                    actionSet.removeAll()
                case .gotoTable(let next):
                    if next > current { table = next }
                case .writeMetadata(let value, let metadataMask):
                    key.metadata = (key.metadata & ~metadataMask) | (value & metadataMask)
                }
            }
        }
        // The action set runs at the end of the pipeline: edits first, then the output.
        let ordered = actionSet.filter { if case .output = $0 { false } else { true } } + actionSet.filter { if case .output = $0 { true } else { false } }
        for action in ordered {
            apply(action, key: &key, mask: &mask, edits: &edits, outputs: &outputs, config: config, macs: macs, now: now)
        }
        return FlowPlan(outputs: outputs, rules: rules, mask: mask, missed: missed)
    }

    private static func apply(
        _ action: Action, key: inout FlowKey, mask: inout FlowKey, edits: inout [OutputPlan.Edit], outputs: inout [OutputPlan],
        config: PipelineConfig, macs: MACTable, now: UInt64
    ) {
        let inPort = key.inPort
        switch action {
        case .output(let port, let maxLength):
            switch port {
            case OFPort.normal:
                normal(key, mask: &mask, edits: edits, outputs: &outputs, config: config, macs: macs, now: now)
            case OFPort.flood, OFPort.all:
                for target in config.ports.keys.sorted() where target != inPort {
                    outputs.append(OutputPlan(port: target, edits: edits))
                }
            case OFPort.inPort:
                outputs.append(OutputPlan(port: inPort, edits: edits))
            case OFPort.local:
                if inPort != OFPort.local { outputs.append(OutputPlan(port: OFPort.local, edits: edits)) }
            case OFPort.controller:
                outputs.append(OutputPlan(port: OFPort.controller, edits: edits, maxLength: maxLength))
            default:
                // OpenFlow never outputs to the input port unless asked with IN_PORT.
                if port != inPort, config.ports[port] != nil { outputs.append(OutputPlan(port: port, edits: edits)) }
            }
        case .setField(let field):
            edits.append(.setField(field))
            switch field {
            case .ethSrc(let value): key.ethSrc = value
            case .ethDst(let value): key.ethDst = value
            case .vlanVID(let value): key.vlanVID = value | 0x1000
            case .vlanPCP(let value): key.vlanPCP = value
            case .ipv4Src(let value): key.ipv4Src = value
            case .ipv4Dst(let value): key.ipv4Dst = value
            case .ipDSCP(let value): key.ipDSCP = value
            case .tpSrc(let value): key.tpSrc = value
            case .tpDst(let value): key.tpDst = value
            case .tunnelID(let value): key.tunnelID = value
            case .metadata(let value): key.metadata = value
            }
        case .pushVLAN(let tpid):
            edits.append(.pushVLAN(tpid: tpid))
            mask.vlanVID = 0x1FFF
            key.vlanVID = 0x1000 | (key.vlanVID & 0x0FFF)
        case .popVLAN:
            mask.vlanVID = 0x1FFF
            if key.vlanVID & 0x1000 != 0 {
                edits.append(.popVLAN)
                key.vlanVID = 0
            }
        case .decTTL:
            mask.ethType = 0xFFFF
            mask.ipTTL = 0xFF
            if key.ethType == EtherType.ipv4 || key.ethType == EtherType.ipv6 {
                if key.ipTTL <= 1 {
                    // An expiring TTL stops the packet here (no controller to tell).
                    edits.append(.decTTL)
                    outputs.removeAll()
                    return
                }
                edits.append(.decTTL)
                key.ipTTL -= 1
            }
        case .setQueue, .group:
            break
        }
    }

    /// The NORMAL action: a learning switch with VLANs.
    static func normal(
        _ key: FlowKey, mask: inout FlowKey, edits: [OutputPlan.Edit], outputs: inout [OutputPlan], config: PipelineConfig,
        macs: MACTable, now: UInt64
    ) {
        mask = mask | normalMask
        let inPort = key.inPort
        guard let inConfig = config.ports[inPort] else { return }
        let tagged = key.vlanVID & 0x1000 != 0
        guard let vlan = inConfig.ingress(tagged ? key.vlanVID & 0x0FFF : nil) else { return }
        // Frames to reserved multicast (802.1D: 01:80:c2:00:00:0x) are not forwarded.
        if key.ethDst & 0xFFFF_FFFF_FFF0 == 0x0180_C200_0000 { return }
        macs.learn(key.ethSrc, vlan: vlan, port: inPort, now: now)
        func egress(_ port: UInt32) {
            guard let portConfig = config.ports[port], portConfig.carries(vlan) else { return }
            var portEdits = edits
            let wantTagged = !portConfig.untagged(vlan)
            if tagged, !wantTagged {
                portEdits.append(.popVLAN)
            } else if !tagged, wantTagged {
                portEdits.append(.pushVLAN(tpid: EtherType.vlan))
                portEdits.append(.setField(.vlanVID(vlan)))
            } else if tagged, wantTagged, key.vlanVID & 0x0FFF != vlan {
                portEdits.append(.setField(.vlanVID(vlan)))
            }
            outputs.append(OutputPlan(port: port, edits: portEdits))
        }
        let multicast = key.ethDst & 0x0100_0000_0000 != 0
        if !multicast, let port = macs.lookup(key.ethDst, vlan: vlan) {
            if port != inPort { egress(port) }
            return
        }
        for port in config.ports.keys.sorted() where port != inPort { egress(port) }
    }
}

public struct SwitchError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
