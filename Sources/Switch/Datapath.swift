// Switch layer: the datapath of one bridge. One thread polls the bridge's ports (epoll), reads
// frames in batches, looks each flow up in an exact-match cache, then in the megaflow cache
// (one hash table per distinct mask), and only on a miss runs the OpenFlow pipeline (an
// "upcall") and caches the plan under the fields it depended on. Caches are dropped whenever
// the configuration, the flow tables or the MAC table change. Frames leave in per-port batches;
// a frame goes out without being copied unless two outputs need it edited differently.
import LinuxSystem
import Logging
import Synchronization

/// A switch port as the datapath drives it.
public protocol DatapathPort: AnyObject, Sendable {
    var ofport: UInt32 { get }
    var name: String { get }
    /// The descriptor epoll waits on.
    var pollDescriptor: Int32 { get }
    var counters: PortCounters { get }
    /// Reads a batch; returns how many frames arrived.
    func receive(into batch: FrameBatch) -> Int
    /// Sends frames; returns how many went.
    func send(_ frames: [FrameRef]) -> Int
}

/// A frame handed to the control side (an OpenFlow packet-in).
public struct PacketIn: Sendable {
    public var inPort: UInt32
    public var table: UInt8
    public var cookie: UInt64
    public var frame: [UInt8]
    public var totalLength: Int
}

public final class Datapath: @unchecked Sendable {
    // SAFETY (@unchecked): everything below `control` is touched only by the datapath thread;
    // the control side talks to it only through `control` (a Mutex) and the `wake` eventfd.
    public let name: String
    let logger: Logger
    private let epoll: Epoll
    private let wake: EventFD

    struct Control {
        var addPorts: [DatapathPort] = []
        var removePorts: [UInt32] = []
        var config: PipelineConfig?
        var packetOuts: [(frame: [UInt8], inPort: UInt32, actions: [Action])] = []
        var stop = false
        var flushCaches = false
        var flushMACs = false
        var macQueries: [@Sendable ([MACEntry]) -> Void] = []
    }
    private let control = Mutex(Control())
    /// Packet-ins for the control side (drained by `takePacketIns`).
    private let packetIns = Mutex<[PacketIn]>([])
    public var onPacketIn: (@Sendable () -> Void)?

    // Datapath-thread state. SAFETY (exclusivity unchecked): only the datapath thread touches
    // these, and never re-entrantly.
    @exclusivity(unchecked) private var ports: [UInt32: DatapathPort] = [:]
    @exclusivity(unchecked) private var config = PipelineConfig()
    private let macs = MACTable()
    @exclusivity(unchecked) private var exact: [FlowKey: FlowPlan] = [:]
    /// The last flow looked up, in front of `exact`: the frames of a batch mostly share one flow,
    /// and comparing keys is cheaper than hashing one. Emptied with the caches.
    @exclusivity(unchecked) private var lastKey = FlowKey()
    @exclusivity(unchecked) private var lastPlan: FlowPlan?
    @exclusivity(unchecked) private var megaflows: [(mask: FlowKey, flows: [FlowKey: FlowPlan])] = []
    @exclusivity(unchecked) private var cachedGeneration: UInt64 = 0
    private let input = FrameBatch(capacity: 32)
    private let copies = FrameBatch(capacity: 64)
    private let injected = FrameBatch(capacity: 16)
    @exclusivity(unchecked) private var queues: [UInt32: [FrameRef]] = [:]
    private var thread: NativeThread?
    private let statsLock = Mutex<DatapathStats>(DatapathStats())

    /// Megaflows kept before the cache starts over.
    static let maxCachedFlows = 65536
    @exclusivity(unchecked) private var cachedFlowCount = 0

    /// How long after the last frame the thread polls before it sleeps in epoll.
    static let busyPollNanoseconds: UInt64 = 200_000

    public struct DatapathStats: Sendable {
        public var exactHits: UInt64 = 0
        public var megaflowHits: UInt64 = 0
        public var upcalls: UInt64 = 0
        public var megaflowMasks = 0
        public var cachedFlows = 0
        /// Ports no longer polled: their descriptor kept reporting an error or hang-up with
        /// nothing to read (a TAP whose device was deleted, say with its namespace).
        public var deadPorts = 0
    }

    public init(name: String, logger: Logger) throws(SystemError) {
        self.name = name
        self.logger = logger
        epoll = try Epoll()
        wake = try EventFD(nonBlocking: true)
        try epoll.add(wake.rawValue, events: Epoll.input, token: UInt64.max)
    }

    // MARK: control side

    public func start() throws(SystemError) {
        thread = try NativeThread.start(name: "dp-\(name)") { [self] in run() }
    }

    public func stop() {
        control.withLock { $0.stop = true }
        try? wake.signal()
        thread?.join()
        thread = nil
    }

    public func add(_ port: DatapathPort) {
        control.withLock { $0.addPorts.append(port) }
        try? wake.signal()
    }

    public func remove(ofport: UInt32) {
        control.withLock { $0.removePorts.append(ofport) }
        try? wake.signal()
    }

    public func configure(_ config: PipelineConfig) {
        control.withLock { $0.config = config }
        try? wake.signal()
    }

    /// Sends a frame through `actions` as if it had arrived on `inPort` (OpenFlow packet-out).
    public func packetOut(_ frame: [UInt8], inPort: UInt32, actions: [Action]) {
        control.withLock { $0.packetOuts.append((frame, inPort, actions)) }
        try? wake.signal()
    }

    /// Hands a snapshot of the MAC table to `reply`, on the datapath thread.
    public func macEntries(_ reply: @escaping @Sendable ([MACEntry]) -> Void) {
        control.withLock { $0.macQueries.append(reply) }
        try? wake.signal()
    }

    /// Forgets every learned address.
    public func flushMACs() {
        control.withLock { $0.flushMACs = true }
        try? wake.signal()
    }

    public func takePacketIns() -> [PacketIn] {
        packetIns.withLock { ins in
            defer { ins.removeAll() }; return ins
        }
    }

    public var stats: DatapathStats { statsLock.withLock { $0 } }

    // MARK: the datapath thread

    private func run() {
        var lastAging = Host.monotonicNanoseconds()
        var lastTraffic: UInt64 = 0
        var local = DatapathStats()
        var events = Epoll.Events(capacity: 64)
        while true {
            if applyControl() { break }
            // After traffic, poll without sleeping for a short while: a frame often follows
            // within microseconds, and a sleep and wake-up costs more than that.
            var ready = (try? epoll.wait(into: &events, timeoutMilliseconds: 0)) ?? 0
            if ready == 0, Host.monotonicNanoseconds() &- lastTraffic < Self.busyPollNanoseconds {
                var spins = 0
                while ready == 0, spins < 64 {
                    ready = (try? epoll.wait(into: &events, timeoutMilliseconds: 0)) ?? 0
                    spins += 1
                }
            }
            if ready == 0 { ready = (try? epoll.wait(into: &events, timeoutMilliseconds: 1000)) ?? 0 }
            if ready > 0 { lastTraffic = Host.monotonicNanoseconds() }
            let now = Host.monotonicNanoseconds()
            var woken = false
            for index in 0..<ready {
                let token = events[index].token
                if token == UInt64.max {
                    woken = true
                    continue
                }
                guard let port = ports[UInt32(truncatingIfNeeded: token)] else { continue }
                var total = 0
                for _ in 0..<8 {
                    input.reset()
                    let received = port.receive(into: input)
                    guard received > 0 else { break }
                    total += received
                    process(input, from: port, now: now, stats: &local)
                    if received < input.capacity { break }
                }
                if total == 0, events[index].hangup { noteFailing(port, now: now, stats: &local) }
            }
            if woken { _ = try? wake.wait() }
            if now &- lastAging > 1_000_000_000 {
                lastAging = now
                macs.expire(now: now)
                local.megaflowMasks = megaflows.count
                local.cachedFlows = megaflows.reduce(0) { $0 + $1.flows.count }
                let snapshot = local
                statsLock.withLock { $0 = snapshot }
            }
        }
        for port in ports.values { epoll.remove(port.pollDescriptor) }
        ports.removeAll()
    }

    /// Descriptors that reported an error or hang-up with nothing to read: how often, since when.
    private var failing: [Int32: (count: Int, since: UInt64)] = [:]

    /// A descriptor whose error or hang-up does not go away (a detached TAP stays "readable" with
    /// EPOLLERR forever) would keep this thread spinning: after 1,000 such wake-ups within a
    /// second it is no longer polled. A one-time error (an interface set down) never gets there.
    private func noteFailing(_ port: DatapathPort, now: UInt64, stats: inout DatapathStats) {
        let fd = port.pollDescriptor
        var entry = failing[fd] ?? (0, now)
        if now &- entry.since > 1_000_000_000 { entry = (0, now) }
        entry.count += 1
        guard entry.count >= 1000 else {
            failing[fd] = entry
            return
        }
        failing[fd] = nil
        epoll.remove(fd)
        stats.deadPorts += 1
        logger.warning("bridge \(name): port \(port.name) keeps reporting an error with nothing to read (its device is gone?); no longer polled")
    }

    /// Applies pending control requests; true when the thread should stop.
    private func applyControl() -> Bool {
        let pending = control.withLock { state -> Control in
            defer { state = Control(stop: state.stop) }
            return state
        }
        if pending.stop { return true }
        var changed = false
        // Ports may share one descriptor (VXLAN ports share their UDP socket): it is polled once,
        // under the token of a port that uses it, and dropped from epoll with its last user.
        func unpoll(_ port: DatapathPort) {
            let fd = port.pollDescriptor
            if let other = ports.values.first(where: { $0.pollDescriptor == fd }) {
                try? epoll.modify(fd, events: Epoll.input, token: UInt64(other.ofport))
            } else {
                epoll.remove(fd)
            }
        }
        for ofport in pending.removePorts {
            if let port = ports.removeValue(forKey: ofport) {
                unpoll(port)
                macs.forget(port: ofport)
                changed = true
            }
        }
        for port in pending.addPorts {
            if let old = ports.removeValue(forKey: port.ofport) { unpoll(old) }
            let shared = ports.values.contains { $0.pollDescriptor == port.pollDescriptor }
            ports[port.ofport] = port
            if !shared {
                do {
                    try epoll.add(port.pollDescriptor, events: Epoll.input, token: UInt64(port.ofport))
                } catch {
                    logger.error("bridge \(name): cannot poll port \(port.name): \(error)")
                }
            }
            changed = true
        }
        if let config = pending.config {
            self.config = config
            changed = true
        }
        if pending.flushMACs { macs.flush() }
        if !pending.macQueries.isEmpty {
            let entries = macs.snapshot(now: Host.monotonicNanoseconds())
            for reply in pending.macQueries { reply(entries) }
        }
        if changed || pending.flushCaches { flushCaches() }
        var unused = DatapathStats()
        for out in pending.packetOuts {
            injected.reset()
            guard injected.append(out.frame) else { continue }
            let key = FlowKey.parse(injected, 0, inPort: out.inPort)
            var packetConfig = config
            packetConfig.tables = [
                0: [FlowEntry(table: 0, priority: 0, value: FlowKey(), mask: FlowKey(), instructions: [.applyActions(out.actions)], created: 0)]
            ]
            let plan = Pipeline.plan(key, config: packetConfig, macs: macs, now: Host.monotonicNanoseconds())
            execute(plan, batch: injected, index: 0, key: key, now: 0, stats: &unused)
            flushQueues()
        }
        return false
    }

    private func flushCaches() {
        lastPlan = nil
        exact.removeAll(keepingCapacity: true)
        megaflows.removeAll(keepingCapacity: true)
        cachedFlowCount = 0
        cachedGeneration = macs.generation
    }

    private func lookup(_ key: FlowKey, now: UInt64, stats: inout DatapathStats) -> FlowPlan {
        if macs.generation != cachedGeneration { flushCaches() }
        if let plan = lastPlan, lastKey == key {
            stats.exactHits &+= 1
            return plan
        }
        let plan = cachedOrPlanned(key, now: now, stats: &stats)
        (lastKey, lastPlan) = (key, plan)
        return plan
    }

    /// The plan from the exact-match table, else a megaflow, else a pipeline run (then cached).
    private func cachedOrPlanned(_ key: FlowKey, now: UInt64, stats: inout DatapathStats) -> FlowPlan {
        if let plan = exact[key] {
            stats.exactHits &+= 1
            return plan
        }
        for subtable in megaflows {
            if let plan = subtable.flows[key & subtable.mask] {
                stats.megaflowHits &+= 1
                if exact.count > 16384 { exact.removeAll(keepingCapacity: true) }
                exact[key] = plan
                return plan
            }
        }
        stats.upcalls &+= 1
        let plan = Pipeline.plan(key, config: config, macs: macs, now: now)
        if macs.generation != cachedGeneration { flushCaches() }
        let masked = key & plan.mask
        // A port that sends endless distinct flows (spoofed addresses) must not grow the cache
        // without bound: past the limit it starts over.
        cachedFlowCount += 1
        if cachedFlowCount > Self.maxCachedFlows {
            flushCaches()
            cachedFlowCount = 1
        }
        if let index = megaflows.firstIndex(where: { $0.mask == plan.mask }) {
            megaflows[index].flows[masked] = plan
        } else {
            megaflows.append((plan.mask, [masked: plan]))
        }
        exact[key] = plan
        return plan
    }

    private func process(_ batch: FrameBatch, from port: DatapathPort, now: UInt64, stats: inout DatapathStats) {
        copies.reset()
        var bytes: UInt64 = 0
        for index in 0..<batch.count where batch.length(index) >= 14 {
            // Put a tag the kernel took off back into the frame: flows see frames as on the wire.
            let tag = batch.kernelTags[index]
            if tag & 0x10000 != 0 {
                if batch.insert(index, at: 12, [0x81, 0x00, UInt8((tag >> 8) & 0xFF), UInt8(tag & 0xFF)]) {
                    shiftOffloadOffsets(batch, index, by: 4)
                }
            }
            bytes &+= UInt64(batch.length(index))
            let inPort = batch.inPorts[index] == 0 ? port.ofport : batch.inPorts[index]
            let key = FlowKey.parse(batch, index, inPort: inPort)
            let plan = lookup(key, now: now, stats: &stats)
            execute(plan, batch: batch, index: index, key: key, now: now, stats: &stats)
        }
        port.counters.rxPacketCount.wrappingAdd(UInt64(batch.count), ordering: .relaxed)
        port.counters.rxByteCount.wrappingAdd(bytes, ordering: .relaxed)
        flushQueues()
    }

    private func execute(_ plan: FlowPlan, batch: FrameBatch, index: Int, key: FlowKey, now: UInt64, stats: inout DatapathStats) {
        let length = UInt64(batch.length(index))
        for rule in plan.rules { rule.counters.count(packets: 1, bytes: length, now: now) }
        plan.missed?.count(packets: 1, bytes: length, now: now)
        let outputs = plan.outputs
        if outputs.count == 1 {
            let output = outputs[0]
            if !output.edits.isEmpty { applyEdits(output.edits, batch, index) }
            enqueue(output, FrameRef(batch, index), key: key)
            return
        }
        for output in outputs {
            if output.edits.isEmpty {
                enqueue(output, FrameRef(batch, index), key: key)
            } else {
                var copy = copies.appendCopy(of: index, from: batch)
                if copy == nil {
                    // Every copy is queued (a burst flooded to many ports with edits): send what is
                    // queued, in order, and reuse the copies.
                    flushQueues()
                    copies.reset()
                    copy = copies.appendCopy(of: index, from: batch)
                }
                guard let copy else { continue }
                applyEdits(output.edits, copies, copy)
                enqueue(output, FrameRef(copies, copy), key: key)
            }
        }
    }

    private func enqueue(_ output: OutputPlan, _ frame: FrameRef, key: FlowKey) {
        if output.port == OFPort.controller {
            let length = frame.batch.length(frame.index)
            let keep = output.maxLength == 0xFFFF || output.maxLength == 0 ? length : min(length, Int(output.maxLength))
            let packet = PacketIn(
                inPort: key.inPort, table: 0, cookie: 0, frame: frame.batch.bytes(frame.index, 0..<keep), totalLength: length)
            packetIns.withLock { $0.count < 1024 ? $0.append(packet) : () }
            onPacketIn?()
            return
        }
        queues[output.port, default: []].append(frame)
    }

    private func flushQueues() {
        for (ofport, frames) in queues where !frames.isEmpty {
            guard let port = ports[ofport] else { continue }
            let sent = port.send(frames)
            var bytes: UInt64 = 0
            for frame in frames.prefix(sent) { bytes &+= UInt64(frame.batch.length(frame.index)) }
            port.counters.txPacketCount.wrappingAdd(UInt64(sent), ordering: .relaxed)
            port.counters.txByteCount.wrappingAdd(bytes, ordering: .relaxed)
            if sent < frames.count { port.counters.txDropCount.wrappingAdd(UInt64(frames.count - sent), ordering: .relaxed) }
            queues[ofport]?.removeAll(keepingCapacity: true)
        }
    }

    // MARK: editing frames

    private func shiftOffloadOffsets(_ batch: FrameBatch, _ index: Int, by delta: Int) {
        var header = batch.headers[index]
        if header.flags & VirtioNetHeader.needsChecksum != 0 {
            header.checksumStart = UInt16(clamping: Int(header.checksumStart) + delta)
        }
        if header.headerLength > 0 { header.headerLength = UInt16(clamping: Int(header.headerLength) + delta) }
        batch.headers[index] = header
    }

    func applyEdits(_ edits: [OutputPlan.Edit], _ batch: FrameBatch, _ index: Int) {
        FrameEditor.apply(edits, batch, index) { delta in shiftOffloadOffsets(batch, index, by: delta) }
    }
}

/// Applies output edits to a frame, keeping IPv4, TCP and UDP checksums right (RFC 1624).
enum FrameEditor {
    static func apply(_ edits: [OutputPlan.Edit], _ batch: FrameBatch, _ index: Int, shifted: (Int) -> Void) {
        for edit in edits {
            let tagged = batch.u16(index, 12) == EtherType.vlan
            let l3 = tagged ? 18 : 14
            let type = batch.u16(index, l3 - 2)
            switch edit {
            case .popVLAN:
                if tagged {
                    batch.remove(index, at: 12, count: 4)
                    shifted(-4)
                }
            case .pushVLAN(let tpid):
                let tci: UInt16 = tagged ? batch.u16(index, 14) : 0
                if batch.insert(index, at: 12, [UInt8(tpid >> 8), UInt8(tpid & 0xFF), UInt8(tci >> 8), UInt8(tci & 0xFF)]) {
                    shifted(4)
                }
            case .decTTL:
                if type == EtherType.ipv4 {
                    let ttl = batch.byte(index, l3 + 8)
                    if ttl > 0 {
                        replace16(batch, index, at: l3 + 8, with: UInt16(ttl - 1) << 8 | UInt16(batch.byte(index, l3 + 9)), checksumAt: [l3 + 10])
                    }
                } else if type == EtherType.ipv6 {
                    let hops = batch.byte(index, l3 + 7)
                    if hops > 0 { batch.setByte(index, l3 + 7, hops - 1) }
                }
            case .setField(let field):
                set(field, batch, index, l3: l3, type: type, tagged: tagged)
            }
        }
    }

    private static func set(_ field: SetField, _ batch: FrameBatch, _ index: Int, l3: Int, type: UInt16, tagged: Bool) {
        let ihl = Int(batch.byte(index, l3) & 0x0F) * 4
        let l4 = l3 + ihl
        let proto = batch.byte(index, l3 + 9)
        let transportChecksum: [Int] =
            type != EtherType.ipv4 ? [] : proto == IPProtocol.tcp ? [l4 + 16] : proto == IPProtocol.udp && batch.u16(index, l4 + 6) != 0 ? [l4 + 6] : []
        switch field {
        case .ethSrc(let mac):
            batch.setU16(index, 6, UInt16(mac >> 32))
            batch.setU32(index, 8, UInt32(mac & 0xFFFF_FFFF))
        case .ethDst(let mac):
            batch.setU16(index, 0, UInt16(mac >> 32))
            batch.setU32(index, 2, UInt32(mac & 0xFFFF_FFFF))
        case .vlanVID(let vid):
            if tagged { batch.setU16(index, 14, (batch.u16(index, 14) & 0xF000) | (vid & 0x0FFF)) }
        case .vlanPCP(let pcp):
            if tagged { batch.setU16(index, 14, (batch.u16(index, 14) & 0x1FFF) | UInt16(pcp & 7) << 13) }
        case .ipv4Src(let address):
            guard type == EtherType.ipv4 else { return }
            replace32(batch, index, at: l3 + 12, with: address, checksumAt: [l3 + 10] + transportChecksum)
        case .ipv4Dst(let address):
            guard type == EtherType.ipv4 else { return }
            replace32(batch, index, at: l3 + 16, with: address, checksumAt: [l3 + 10] + transportChecksum)
        case .ipDSCP(let dscp):
            guard type == EtherType.ipv4 else { return }
            let word = batch.u16(index, l3)
            replace16(batch, index, at: l3, with: (word & 0xFF03) | UInt16(dscp & 0x3F) << 2, checksumAt: [l3 + 10])
        case .tpSrc(let port):
            guard type == EtherType.ipv4, proto == IPProtocol.tcp || proto == IPProtocol.udp else { return }
            replace16(batch, index, at: l4, with: port, checksumAt: transportChecksum)
        case .tpDst(let port):
            guard type == EtherType.ipv4, proto == IPProtocol.tcp || proto == IPProtocol.udp else { return }
            replace16(batch, index, at: l4 + 2, with: port, checksumAt: transportChecksum)
        case .tunnelID, .metadata:
            break
        }
    }

    /// Writes a 16-bit word and updates the one's-complement checksums at `checksumAt`.
    static func replace16(_ batch: FrameBatch, _ index: Int, at offset: Int, with new: UInt16, checksumAt: [Int]) {
        let old = batch.u16(index, offset)
        batch.setU16(index, offset, new)
        for position in checksumAt {
            let checksum = batch.u16(index, position)
            var sum = UInt32(~checksum & 0xFFFF) + UInt32(~old & 0xFFFF) + UInt32(new)
            sum = (sum & 0xFFFF) + (sum >> 16)
            sum = (sum & 0xFFFF) + (sum >> 16)
            batch.setU16(index, position, ~UInt16(sum & 0xFFFF))
        }
    }

    static func replace32(_ batch: FrameBatch, _ index: Int, at offset: Int, with new: UInt32, checksumAt: [Int]) {
        replace16(batch, index, at: offset, with: UInt16(new >> 16), checksumAt: checksumAt)
        replace16(batch, index, at: offset + 2, with: UInt16(new & 0xFFFF), checksumAt: checksumAt)
    }
}
