// Switch layer: OpenFlow 1.3 connections. Each bridge listens on RUNDIR/BRIDGE.mgmt (where
// `ovs-ofctl` looks, as with OVS) and on every `ptcp:` target of its Controller rows. Messages
// are handled on the control event loop, next to the BridgeManager whose flow tables they change;
// flow changes are saved to a file so flows survive a restart, and timeouts are enforced here.
import LinuxSystem
import Logging
import NIOCore
import NIOPosix

public final class OpenFlowServer: @unchecked Sendable {
    // SAFETY (@unchecked): all state is touched only on `loop`.
    let loop: EventLoop
    let manager: BridgeManager
    let rundir: String
    let flowFile: String?
    let logger: Logger
    private var listeners: [String: [String: Channel]] = [:]
    var connections: [ObjectIdentifier: OpenFlowConnection] = [:]
    /// The open ports each bridge's controllers were last told of (ofport → name), for PORT_STATUS.
    private var announcedPorts: [String: [UInt32: String]] = [:]
    private var expiry: RepeatedTask?
    private let started = Host.monotonicNanoseconds()

    public init(loop: EventLoop, manager: BridgeManager, rundir: String, flowFile: String?, logger: Logger) {
        self.loop = loop
        self.manager = manager
        self.rundir = rundir
        self.flowFile = flowFile
        self.logger = logger
        expiry = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [weak self] _ in self?.expireFlows() }
    }

    /// Flows saved by an earlier run, by bridge.
    public func savedTables() -> [String: FlowTables] {
        guard let flowFile, fileExists(flowFile), let bytes = try? readWholeFile(flowFile, limit: 256 << 20) else { return [:] }
        var tables: [String: FlowTables] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count == 2, let body = hexBytes(parts[1]) else { continue }
            do {
                let mod = try FlowMod(body: body)
                var table = tables[String(parts[0])] ?? FlowTables()
                table.add(mod.entry(now: Host.monotonicNanoseconds()))
                tables[String(parts[0])] = table
            } catch {
                logger.warning("\(flowFile): skipping a saved flow: \(error)")
            }
        }
        return tables
    }

    func saveFlows() {
        guard let flowFile else { return }
        var text = ""
        for (bridge, tables) in manager.tables.sorted(by: { $0.key < $1.key }) {
            for flow in tables.all {
                text += bridge + " " + FlowMod.addBody(flow).map { String($0, radix: 16).leftPadded(to: 2) }.joined() + "\n"
            }
        }
        let temporary = flowFile + ".tmp"
        do {
            removeFile(temporary)
            let descriptor = try OwnedFileDescriptor.openReadWrite(temporary, create: true, exclusive: true)
            try descriptor.write(Array(text.utf8), at: 0)
            try descriptor.sync()
            try renameFile(temporary, to: flowFile)
        } catch {
            logger.error("cannot save flows to \(flowFile): \(error)")
        }
    }

    /// Opens and closes listeners to match the bridges and their controller targets.
    public func update(bridges: [String: SwitchBridge]) {
        for name in listeners.keys where bridges[name] == nil {
            for channel in listeners[name]?.values ?? [:].values { channel.close(promise: nil) }
            listeners[name] = nil
            removeFile("\(rundir)/\(name).mgmt")
        }
        for (name, bridge) in bridges {
            var wanted = ["punix:\(rundir)/\(name).mgmt"]
            wanted += bridge.controllers.filter { $0.hasPrefix("ptcp:") }
            var current = listeners[name] ?? [:]
            for (target, channel) in current where !wanted.contains(target) {
                channel.close(promise: nil)
                current[target] = nil
            }
            listeners[name] = current
            for target in wanted where current[target] == nil { listen(bridge: name, target: target) }
        }
        announcePorts()
    }

    /// Tells each bridge's controllers of ports opened or closed since the last call (PORT_STATUS
    /// ADD and DELETE), as ovs-vswitchd does.
    private func announcePorts() {
        for name in announcedPorts.keys where manager.datapaths[name] == nil { announcedPorts[name] = nil }
        for name in manager.datapaths.keys {
            let current = Dictionary(manager.ports(name).map { ($0.ofport, $0.name) }, uniquingKeysWith: { first, _ in first })
            let before = announcedPorts[name] ?? [:]
            for (number, portName) in before where current[number] != portName {
                portStatus(bridge: name, reason: .delete, number: number, name: portName)
            }
            for (number, portName) in current.sorted(by: { $0.key < $1.key }) where before[number] != portName {
                portStatus(bridge: name, reason: .add, number: number, name: portName)
            }
            announcedPorts[name] = current
        }
    }

    enum PortReason: UInt8 { case add = 0, delete = 1, modify = 2 }

    /// Sends PORT_STATUS for one port to the bridge's connections that take asynchronous messages.
    func portStatus(bridge: String, reason: PortReason, number: UInt32, name: String) {
        var writer = OFWriter()
        writer.u8(reason.rawValue)
        writer.zeros(7)
        writer.bytes += OFBodies.port(number: number, name: name, config: reason == .delete ? 0 : manager.portConfig(bridge, number))
        let message = OFMessage(type: .portStatus, xid: 0, body: writer.bytes)
        for connection in connections.values where connection.bridge == bridge && connection.wantsPacketIns {
            connection.send(message)
        }
    }

    private func listen(bridge: String, target: String) {
        let bootstrap = ServerBootstrap(group: loop)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let connection = OpenFlowConnection(server: self, bridge: bridge)
                    try channel.pipeline.syncOperations.addHandler(connection)
                }
            }
        let future: EventLoopFuture<Channel>
        if target.hasPrefix("punix:") {
            future = bootstrap.bind(unixDomainSocketPath: String(target.dropFirst(6)), cleanupExistingSocketFile: true)
        } else {
            let parts = target.dropFirst(5).split(separator: ":", maxSplits: 1).map(String.init)
            guard let port = parts.first.flatMap({ Int($0) }) else {
                logger.error("bridge \(bridge): bad controller target \(target)")
                return
            }
            future = bootstrap.bind(host: parts.count > 1 ? parts[1] : "0.0.0.0", port: port)
        }
        future.whenComplete { [self] result in
            switch result {
            case .success(let channel):
                if listeners[bridge] != nil {
                    listeners[bridge]?[target] = channel
                    logger.info("bridge \(bridge): OpenFlow on \(target)")
                } else {
                    channel.close(promise: nil)
                }
            case .failure(let error):
                logger.error("bridge \(bridge): cannot listen on \(target): \(error)")
            }
        }
    }

    public func stop() {
        expiry?.cancel()
        for channels in listeners.values { for channel in channels.values { channel.close(promise: nil) } }
        listeners.removeAll()
    }

    /// Sends packet-ins waiting in a bridge's datapath to its controllers.
    public func deliverPacketIns(bridge: String) {
        guard let datapath = manager.datapaths[bridge] else { return }
        let packets = datapath.takePacketIns()
        guard !packets.isEmpty else { return }
        for connection in connections.values where connection.bridge == bridge && connection.wantsPacketIns {
            for packet in packets { connection.sendPacketIn(packet) }
        }
    }

    private func expireFlows() {
        let now = Host.monotonicNanoseconds()
        for bridge in manager.tables.keys {
            var removed: [FlowEntry] = []
            manager.modifyTables(bridge) { tables in
                removed = tables.remove { flow in
                    if flow.hardTimeout > 0, now &- flow.created > UInt64(flow.hardTimeout) * 1_000_000_000 { return true }
                    if flow.idleTimeout > 0 {
                        let last = max(flow.created, flow.counters.lastUsed)
                        if now &- last > UInt64(flow.idleTimeout) * 1_000_000_000 { return true }
                    }
                    return false
                }
            }
            if !removed.isEmpty { saveFlows() }
        }
    }

    var uptime: UInt64 { Host.monotonicNanoseconds() &- started }
}

func hexBytes(_ text: Substring) -> [UInt8]? {
    let chars = Array(text.utf8)
    guard chars.count % 2 == 0 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(chars.count / 2)
    var index = 0
    while index < chars.count {
        guard let high = hexValue(chars[index]), let low = hexValue(chars[index + 1]) else { return nil }
        out.append(high << 4 | low)
        index += 2
    }
    return out
}

private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
    default: nil
    }
}

/// One OpenFlow connection (ovs-ofctl on the mgmt socket, or a controller).
final class OpenFlowConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    unowned let server: OpenFlowServer
    let bridge: String
    private var context: ChannelHandlerContext?
    private var pending: [UInt8] = []
    private var negotiated = false
    private(set) var wantsPacketIns = false
    private var missSendLength: UInt16 = 128

    init(server: OpenFlowServer, bridge: String) {
        self.server = server
        self.bridge = bridge
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        server.connections[ObjectIdentifier(self)] = self
    }

    func channelActive(context: ChannelHandlerContext) {
        // Our HELLO: version 1.3, with a version bitmap saying so.
        var writer = OFWriter()
        writer.u16(1)
        writer.u16(8)
        writer.u32(1 << 4)
        send(OFMessage(type: .hello, xid: 0, body: writer.bytes))
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        server.connections[ObjectIdentifier(self)] = nil
        self.context = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        pending += buffer.readableBytesView
        while let length = OFMessage.length(ofHeader: pending.prefix(8)) {
            guard length >= 8 else {
                context.close(promise: nil)
                return
            }
            guard pending.count >= length else { break }
            let bytes = Array(pending.prefix(length))
            pending.removeFirst(length)
            handle(bytes)
            if self.context == nil { return }
        }
    }

    func send(_ message: OFMessage) {
        guard let context else { return }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: message.bytes)), promise: nil)
    }

    func sendPacketIn(_ packet: PacketIn) {
        var writer = OFWriter()
        writer.u32(0xFFFF_FFFF)  // no buffer
        writer.u16(UInt16(clamping: packet.totalLength))
        writer.u8(1)  // reason: action
        writer.u8(packet.table)
        writer.u64(packet.cookie)
        var key = FlowKey()
        key.inPort = packet.inPort
        OXM.write(value: key, mask: FlowKey.mask { $0.inPort = ~0 }, into: &writer)
        writer.zeros(2)
        let keep = missSendLength == 0xFFFF ? packet.frame.count : min(packet.frame.count, Int(missSendLength))
        writer.bytes += packet.frame.prefix(keep)
        send(OFMessage(type: .packetIn, xid: 0, body: writer.bytes))
    }

    private func handle(_ bytes: [UInt8]) {
        let message: OFMessage
        do {
            message = try OFMessage.parse(bytes)
        } catch {
            context?.close(promise: nil)
            return
        }
        if message.type == OFType.hello.rawValue {
            // Version bitmap element (type 1), if any; else the header's version.
            var supports13 = message.version >= OFMessage.version
            var reader = OFReader(message.body)
            while reader.remaining >= 4, let type = try? reader.u16(), let length = try? reader.u16(), length >= 4 {
                guard let element = try? reader.sub(Int(length) - 4) else { break }
                if type == 1 {
                    var bitmap = element
                    supports13 = (try? bitmap.u32()).map { $0 & (1 << 4) != 0 } ?? supports13
                }
                try? reader.skip((8 - Int(length) % 8) % 8)
            }
            guard supports13 else {
                var writer = OFWriter()
                writer.u16(0)
                writer.u16(0)
                writer.bytes += Array("nimbus-switchd speaks OpenFlow 1.3 only (use ovs-ofctl -O OpenFlow13)".utf8)
                var failure = OFMessage(type: .error, xid: message.xid, body: writer.bytes)
                failure.version = min(message.version, OFMessage.version)
                send(failure)
                context?.close(promise: nil)
                return
            }
            negotiated = true
            return
        }
        guard message.version == OFMessage.version else {
            send(.error(.badRequest(0, "version \(message.version)"), replyingTo: bytes, xid: message.xid))
            return
        }
        do {
            try dispatch(message, bytes: bytes)
        } catch let error as OpenFlowError {
            server.logger.debug("bridge \(bridge): \(error)")
            send(.error(error, replyingTo: bytes, xid: message.xid))
        } catch {
            send(.error(.badRequest(1, "\(error)"), replyingTo: bytes, xid: message.xid))
        }
    }

    private func dispatch(_ message: OFMessage, bytes: [UInt8]) throws {
        guard let type = OFType(rawValue: message.type) else { throw OpenFlowError.badRequest(1, "message type \(message.type)") }
        let manager = server.manager
        switch type {
        case .echoRequest:
            send(OFMessage(type: .echoReply, xid: message.xid, body: message.body))
        case .echoReply, .error:
            break
        case .featuresRequest:
            var writer = OFWriter()
            let datapathID = manager.datapaths[bridge].map { _ in UInt64(truncatingIfNeeded: bridge.hashValue) & 0xFFFF_FFFF_FFFF } ?? 0
            writer.u64(datapathID)
            writer.u32(0)  // buffers
            writer.u8(UInt8(OFTable.count))  // tables
            writer.u8(0)
            writer.zeros(2)
            writer.u32(0x1 | 0x2 | 0x4 | 0x8)  // flow, table, port stats, group stats
            writer.u32(0)
            send(OFMessage(type: .featuresReply, xid: message.xid, body: writer.bytes))
        case .getConfigRequest:
            var writer = OFWriter()
            writer.u16(0)
            writer.u16(missSendLength)
            send(OFMessage(type: .getConfigReply, xid: message.xid, body: writer.bytes))
        case .setConfig:
            var reader = OFReader(message.body)
            _ = try reader.u16()
            missSendLength = try reader.u16()
            wantsPacketIns = true
        case .barrierRequest:
            send(OFMessage(type: .barrierReply, xid: message.xid))
        case .roleRequest:
            var reader = OFReader(message.body)
            let role = try reader.u32()
            var writer = OFWriter()
            writer.u32(role == 0 ? 1 : role)
            writer.zeros(4)
            writer.u64(0)
            send(OFMessage(type: .roleReply, xid: message.xid, body: writer.bytes))
        case .flowMod:
            try flowMod(try FlowMod(body: message.body))
        case .packetOut:
            try packetOut(message.body)
        case .portMod:
            try portMod(message.body)
        case .multipartRequest:
            try multipart(message)
        case .getAsyncRequest:
            var writer = OFWriter()
            for value: UInt32 in [0x7, 0x7, 0x7, 0x7, 0xF, 0xF] { writer.u32(value) }
            send(OFMessage(type: .getAsyncReply, xid: message.xid, body: writer.bytes))
        case .setAsync:
            wantsPacketIns = true
        default:
            throw OpenFlowError.badRequest(1, "message type \(type) is not supported")
        }
    }

    /// PORT_MOD: sets or clears a port's PORT_DOWN, NO_RECV, NO_FWD and NO_PACKET_IN bits.
    private func portMod(_ body: [UInt8]) throws {
        var reader = OFReader(body)
        let number = try reader.u32()
        try reader.skip(4)
        var address: UInt64 = 0
        for byte in try reader.take(6) { address = address << 8 | UInt64(byte) }
        try reader.skip(2)
        let config = try reader.u32()
        let mask = try reader.u32()
        let manager = server.manager
        guard let port = manager.ports(bridge).first(where: { $0.ofport == number }) else {
            throw OpenFlowError.portModFailed(0, "bridge \(bridge) has no port \(number)")
        }
        guard address == OFBodies.portAddress(number) else {
            throw OpenFlowError.portModFailed(1, "port \(number)'s hardware address is not \(String(address, radix: 16))")
        }
        guard mask & ~OFPortConfig.all == 0 else {
            throw OpenFlowError.portModFailed(2, "config bits 0x\(String(mask & ~OFPortConfig.all, radix: 16)) are not supported")
        }
        let before = manager.portConfig(bridge, number)
        manager.modifyPort(bridge, number, config: config, mask: mask)
        if manager.portConfig(bridge, number) != before {
            server.portStatus(bridge: bridge, reason: .modify, number: number, name: port.name)
        }
    }

    private func flowMod(_ mod: FlowMod) throws {
        let manager = server.manager
        guard manager.tables[bridge] != nil else { throw OpenFlowError.flowModFailed(0, "bridge \(bridge) is gone") }
        let now = Host.monotonicNanoseconds()
        try manager.modifyTables(bridge) { tables in
            switch mod.command {
            case .add:
                guard tables.all.count < 100_000 else { throw OpenFlowError.flowModFailed(1, "the flow tables are full") }
                let reset = mod.flags & 0x4 != 0
                let existing = tables.all.first { $0.table == mod.table && $0.priority == mod.priority && $0.mask == mod.mask && $0.value == mod.value }
                tables.add(mod.entry(now: now, counters: reset ? FlowCounters() : existing?.counters ?? FlowCounters()))
            case .modify, .modifyStrict:
                let strict = mod.command == .modifyStrict
                let targets = tables.all.filter { (mod.table == 255 || $0.table == mod.table) && mod.selects($0, strict: strict) }
                for flow in targets {
                    tables.add(
                        FlowEntry(
                            table: flow.table, priority: flow.priority, value: flow.value, mask: flow.mask, instructions: mod.instructions,
                            cookie: flow.cookie, idleTimeout: flow.idleTimeout, hardTimeout: flow.hardTimeout, flags: flow.flags,
                            created: flow.created, counters: mod.flags & 0x4 != 0 ? FlowCounters() : flow.counters))
                }
            case .delete, .deleteStrict:
                let strict = mod.command == .deleteStrict
                tables.remove { (mod.table == 255 || $0.table == mod.table) && mod.selects($0, strict: strict) }
            }
        }
        server.saveFlows()
    }

    private func packetOut(_ body: [UInt8]) throws {
        var reader = OFReader(body)
        let bufferID = try reader.u32()
        let inPort = try reader.u32()
        let actionsLength = Int(try reader.u16())
        try reader.skip(6)
        var actionsReader = try reader.sub(actionsLength)
        let actions = try OFActions.parse(&actionsReader)
        let frame = try reader.take(reader.remaining)
        guard bufferID == 0xFFFF_FFFF else { throw OpenFlowError.badRequest(7, "no buffered packets (buffer_id must be none)") }
        guard frame.count >= 14 else { throw OpenFlowError.badRequest(6, "packet_out needs a frame of at least 14 bytes") }
        server.manager.datapaths[bridge]?.packetOut(frame, inPort: inPort, actions: actions)
    }

    private func multipart(_ message: OFMessage) throws {
        var reader = OFReader(message.body)
        let typeValue = try reader.u16()
        _ = try reader.u16()
        try reader.skip(4)
        guard let type = OFMultipart(rawValue: typeValue) else { throw OpenFlowError.badRequest(2, "multipart type \(typeValue)") }
        let manager = server.manager
        let now = Host.monotonicNanoseconds()
        var parts: [[UInt8]] = []
        switch type {
        case .desc:
            var writer = OFWriter()
            writer.string("Nimbus", width: 256)
            writer.string("nimbus-switchd userspace datapath", width: 256)
            writer.string("nimbus-switchd 0.1", width: 256)
            writer.string("None", width: 32)
            writer.string("bridge \(bridge)", width: 256)
            parts = [writer.bytes]
        case .flow:
            let request = try FlowStatsRequest(&reader)
            parts = (manager.tables[bridge]?.all ?? []).filter(request.selects).map { OFBodies.flowStats($0, now: now) }
        case .aggregate:
            let request = try FlowStatsRequest(&reader)
            let flows = (manager.tables[bridge]?.all ?? []).filter(request.selects)
            var writer = OFWriter()
            writer.u64(flows.reduce(0) { $0 &+ $1.counters.packets })
            writer.u64(flows.reduce(0) { $0 &+ $1.counters.bytes })
            writer.u32(UInt32(flows.count))
            writer.zeros(4)
            parts = [writer.bytes]
        case .table:
            let all = manager.tables[bridge]?.all ?? []
            let misses = manager.misses[bridge]
            var writer = OFWriter()
            for table in 0..<UInt8(OFTable.count) {
                let flows = all.filter { $0.table == table }
                let matched = flows.reduce(0) { $0 &+ $1.counters.packets }
                writer.u8(table)
                writer.zeros(3)
                writer.u32(UInt32(flows.count))
                writer.u64(matched &+ (misses?.packets(table) ?? 0))  // lookups
                writer.u64(matched)
            }
            parts = [writer.bytes]
        case .portStats:
            let wanted = try reader.u32()
            for port in manager.ports(bridge) where wanted == OFPort.any || wanted == port.ofport {
                parts.append(OFBodies.portStats(number: port.ofport, counters: port.counters, age: server.uptime))
            }
        case .portDesc:
            for port in manager.ports(bridge) {
                parts.append(OFBodies.port(number: port.ofport, name: port.name, config: manager.portConfig(bridge, port.ofport)))
            }
        case .tableFeatures:
            guard reader.remaining == 0 else { throw OpenFlowError.badRequest(11, "setting table features is not supported") }
            for table in 0..<UInt8(OFTable.count) { parts.append(OFBodies.tableFeatures(table)) }
        case .groupDesc, .group, .meter, .meterConfig, .queue:
            parts = []
        case .groupFeatures, .meterFeatures:
            parts = [Array(repeating: 0, count: type == .groupFeatures ? 40 : 16)]
        }
        sendMultipart(type: typeValue, xid: message.xid, parts: parts)
    }

    /// Sends a multipart reply, split into messages under 64 KiB (REPLY_MORE on all but the last).
    private func sendMultipart(type: UInt16, xid: UInt32, parts: [[UInt8]]) {
        var chunks: [[UInt8]] = [[]]
        for part in parts {
            if let last = chunks.last, last.count + part.count > 60_000, !last.isEmpty { chunks.append([]) }
            chunks[chunks.count - 1] += part
        }
        for (index, chunk) in chunks.enumerated() {
            var writer = OFWriter()
            writer.u16(type)
            writer.u16(index < chunks.count - 1 ? 1 : 0)
            writer.zeros(4)
            writer.bytes += chunk
            send(OFMessage(type: .multipartReply, xid: xid, body: writer.bytes))
        }
    }
}
