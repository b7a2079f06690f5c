// Tunnel layer: the public side. It accepts client sessions on bindPort, checks their login,
// listens for users on the proxies' ports (and the shared vhost ports), and opens a stream on the
// owning client's session for each user connection. All state lives on one event loop.
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// A running server.
public final class TunnelServer: Sendable {
    public let config: ServerConfig
    let loop: EventLoop
    let core: NIOLoopBound<ServerCore>
    /// Ports actually bound (useful when the configuration asked for port 0).
    public let controlPort: Int
    public let vhostHTTPPort: Int
    public let vhostHTTPSPort: Int
    public let webServerPort: Int

    private init(
        config: ServerConfig, loop: EventLoop, core: NIOLoopBound<ServerCore>, ports: (Int, Int, Int, Int)
    ) {
        self.config = config
        self.loop = loop
        self.core = core
        (controlPort, vhostHTTPPort, vhostHTTPSPort, webServerPort) = ports
    }

    /// Binds every listener and starts serving.
    public static func start(config: ServerConfig, group: EventLoopGroup, logger: Logger) async throws -> TunnelServer {
        let loop = group.next()
        let tls = try TunnelTLS.serverContext(config.tls)
        let core = try await loop.submit {
            NIOLoopBound(ServerCore(config: config, loop: loop, logger: logger), eventLoop: loop)
        }.get()
        func bind(_ what: String, _ host: String, _ port: Int, _ initializer: @escaping @Sendable (Channel) throws -> Void)
            async throws -> Channel
        {
            do {
                return try await ServerBootstrap(group: loop)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 1024)
                    .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                    .childChannelOption(.autoRead, value: what == "control" || what == "webServer")
                    .childChannelOption(.allowRemoteHalfClosure, value: what != "control" && what != "webServer")
                    .childChannelOption(.writeBufferWaterMark, value: .init(low: 256 * 1024, high: 1024 * 1024))
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture { try initializer(channel) }
                    }
                    .bind(host: host, port: port).get()
            } catch {
                throw ConfigError("cannot listen for \(what) on \(host):\(port): \(error)")
            }
        }
        var channels: [Channel] = []
        do {
            let control = try await bind("control", config.bindAddr, config.bindPort) { channel in
                try core.value.acceptControl(channel, tls: tls)
            }
            channels.append(control)
            var httpPort = 0
            var httpsPort = 0
            var webPort = 0
            if config.vhostHTTPPort > 0 {
                let channel = try await bind("vhostHTTPPort", config.effectiveProxyBindAddr, config.vhostHTTPPort) { channel in
                    try core.value.acceptVHost(channel, https: false)
                }
                channels.append(channel)
                httpPort = channel.localAddress?.port ?? 0
            }
            if config.vhostHTTPSPort > 0 {
                let channel = try await bind("vhostHTTPSPort", config.effectiveProxyBindAddr, config.vhostHTTPSPort) { channel in
                    try core.value.acceptVHost(channel, https: true)
                }
                channels.append(channel)
                httpsPort = channel.localAddress?.port ?? 0
            }
            if config.webServerPort > 0 {
                let channel = try await bind("webServer", config.webServerAddr, config.webServerPort) { channel in
                    try core.value.acceptWeb(channel)
                }
                channels.append(channel)
                webPort = channel.localAddress?.port ?? 0
            }
            let ports = (control.localAddress?.port ?? 0, httpPort, httpsPort, webPort)
            let listening = channels
            try await loop.submit { core.value.listeners = listening }.get()
            logger.info(
                "nimbus-tunnel server listening",
                metadata: ["bind": "\(config.bindAddr):\(ports.0)", "vhostHTTP": "\(ports.1)", "vhostHTTPS": "\(ports.2)"])
            return TunnelServer(config: config, loop: loop, core: core, ports: ports)
        } catch {
            for channel in channels { try? await channel.close() }
            throw error
        }
    }

    /// Closes every listener and session.
    public func stop() async {
        let core = core
        _ = try? await loop.flatSubmit { core.value.shutdown() }.get() as Void
    }

    /// A snapshot for the status API.
    public func status() async throws -> ServerStatus {
        try await loop.submit { self.core.value.status() }.get()
    }
}

/// One proxy registered by a client.
final class ServerProxy {
    let id: UInt32
    let config: ProxyConfig
    unowned let owner: ServerConnection
    var listener: Channel?
    var remotePort = 0
    var domains: [String] = []
    var connections = 0
    var trafficIn = 0
    var trafficOut = 0
    var metrics: ProxyMetrics?

    init(id: UInt32, config: ProxyConfig, owner: ServerConnection) {
        self.id = id
        self.config = config
        self.owner = owner
    }

    func makeMeter() -> TrafficMeter {
        TrafficMeter { [weak self] up, down in
            guard let self else { return }
            trafficIn += up
            trafficOut += down
            metrics?.traffic(in: up, out: down)
        }
    }
}

/// One logged-in (or logging-in) client.
final class ServerConnection: MuxSessionDelegate {
    unowned let core: ServerCore
    var session: MuxSession?
    let challenge = Challenge.random()
    var authenticated = false
    var challengeSent = false
    var runID = ""
    var user = ""
    var hostname = ""
    let connectedAt = Date()
    var proxies: [String: ServerProxy] = [:]
    /// tcp and udp proxies whose port is being bound (they count toward maxPortsPerClient).
    var bindingPorts = 0
    var address = ""

    init(core: ServerCore) { self.core = core }

    func sessionActive(_ session: MuxSession) {
        address = session.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
        session.nonce = challenge.nonce
        let timeout = TimeAmount.seconds(Int64(core.config.loginTimeout))
        session.eventLoop?.assumeIsolated().scheduleTask(in: timeout) { [weak self, weak session] in
            guard let self, let session, !authenticated else { return }
            core.logger.info("client \(address) did not log in within \(core.config.loginTimeout) s; closing")
            session.close()
        }
    }

    func session(_ session: MuxSession, received frame: Frame) throws {
        switch frame.type {
        case .hello:
            guard !challengeSent else { throw WireError("second hello on one session") }
            try WireParse.checkHello(Array(frame.payload.readableBytesView))
            challengeSent = true
            session.send(.challenge, payload: challenge.encode())
            session.flush()
        case .login:
            guard challengeSent, !authenticated else { throw WireError("second login on one session") }
            try login(session, try decodeJSON(LoginRequest.self, frame.payload, what: "login"))
        case .control:
            guard authenticated else { throw WireError("control message before login") }
            let message = try decodeJSON(ControlMessage.self, frame.payload, what: "control message")
            switch message.kind {
            case .newProxy:
                guard let proxy = message.proxy else { throw WireError("newProxy without a proxy") }
                core.register(proxy, owner: self)
            case .closeProxy:
                if let name = message.name, let proxy = proxies[name] { core.remove(proxy) }
            case .newProxyResult:
                throw WireError("newProxyResult from a client")
            }
        case .datagram:
            guard authenticated else { throw WireError("datagram before login") }
            core.datagramFromClient(self, proxyID: frame.stream, payload: frame.payload)
        default:
            throw WireError("unexpected \(frame.type) frame from a client")
        }
    }

    private func login(_ session: MuxSession, _ request: LoginRequest) throws {
        guard request.version == 1, let clientNonce = [UInt8](base64: request.clientNonce),
            (16...64).contains(clientNonce.count), let mac = [UInt8](base64: request.mac)
        else { throw WireError("malformed login") }
        let expected = TunnelAuth.loginMAC(token: core.config.token, serverNonce: challenge.nonce, clientNonce: clientNonce)
        guard TunnelAuth.equal(mac, expected) else {
            core.logger.warning("login refused from \(address): authentication failed (wrong token, or a replayed login)")
            core.metrics?.loginFailures.increment()
            session.send(.loginResult, payload: encodeJSON(LoginResult(ok: false, error: "authentication failed")))
            session.flush()
            session.close()
            return
        }
        authenticated = true
        session.established = true
        runID = request.runID.isEmpty ? randomBytes(8).map { String(format: "%02x", $0) }.joined() : String(request.runID.prefix(64))
        user = String(request.user.prefix(64))
        hostname = String(request.hostname.prefix(256))
        let proof = TunnelAuth.serverProof(token: core.config.token, serverNonce: challenge.nonce, clientNonce: clientNonce)
        session.send(.loginResult, payload: encodeJSON(LoginResult(ok: true, runID: runID, serverProof: proof.base64)))
        session.flush()
        core.clientLoggedIn(self)
    }

    func session(_ session: MuxSession, opened stream: MuxStream, request: OpenRequest) {
        core.visit(from: self, stream: stream, request: request)
    }

    func sessionClosed(_ session: MuxSession) {
        core.connectionClosed(self)
        self.session = nil
    }
}

/// The server's state, confined to its event loop.
final class ServerCore {
    let config: ServerConfig
    let loop: EventLoop
    let logger: Logger
    var listeners: [Channel] = []
    private var connections: [ObjectIdentifier: ServerConnection] = [:]
    private var proxies: [String: ServerProxy] = [:]
    private var proxiesByID: [UInt32: ServerProxy] = [:]
    /// Ports in use, as "tcp:N" and "udp:N" (a tcp and a udp proxy may share a number).
    private var ports: Set<String> = []
    private var httpRoutes: [String: [ServerProxy]] = [:]
    private var httpsRoutes: [String: ServerProxy] = [:]
    private var reservedNames: Set<String> = []
    private var nextProxyID: UInt32 = 1
    private(set) var activeConnections = 0
    let metrics: ServerMetrics?
    let startedAt = Date()

    init(config: ServerConfig, loop: EventLoop, logger: Logger) {
        self.config = config
        self.loop = loop
        self.logger = logger
        metrics = config.enablePrometheus ? ServerMetrics() : nil
    }

    // MARK: control connections

    func acceptControl(_ channel: Channel, tls: NIOSSLContext) throws {
        let connection = ServerConnection(core: self)
        let session = MuxSession(role: .server, logger: logger)
        session.delegate = connection
        connection.session = session
        if config.heartbeatTimeout > 0 { session.idleTimeout = .seconds(Int64(config.heartbeatTimeout)) }
        session.maxPeerStreams = min(config.connectionCap, 4096)
        connections[ObjectIdentifier(connection)] = connection
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(TLSDetector(context: tls, force: config.tlsForce))
        try pipeline.addHandler(session)
    }

    func clientLoggedIn(_ connection: ServerConnection) {
        logger.info("client logged in", metadata: ["addr": "\(connection.address)", "runID": "\(connection.runID)"])
        metrics?.clients.set(Int64(connections.values.filter(\.authenticated).count))
    }

    func connectionClosed(_ connection: ServerConnection) {
        connections.removeValue(forKey: ObjectIdentifier(connection))
        for proxy in Array(connection.proxies.values) { remove(proxy) }
        if connection.authenticated {
            logger.info("client disconnected; its proxies are closed", metadata: ["runID": "\(connection.runID)"])
        }
        metrics?.clients.set(Int64(connections.values.filter(\.authenticated).count))
    }

    // MARK: proxies

    func register(_ proxyConfig: ProxyConfig, owner: ServerConnection) {
        func reply(_ error: String?, remoteAddr: String? = nil, id: UInt32? = nil) {
            if let error { logger.warning("proxy \(proxyConfig.name) refused: \(error)") }
            owner.session?.sendControl(
                ControlMessage(kind: .newProxyResult, name: proxyConfig.name, error: error, remoteAddr: remoteAddr, proxyID: id))
        }
        let name = proxyConfig.name
        guard !name.isEmpty, name.count <= 256 else { return reply("the proxy name must be 1 to 256 characters") }
        guard proxies[name] == nil, !reservedNames.contains(name) else {
            return reply("proxy name \"\(name)\" is already in use")
        }
        guard owner.proxies.count < 1024 else { return reply("a client may register at most 1024 proxies") }
        let id = nextProxyID
        nextProxyID &+= 1
        let proxy = ServerProxy(id: id, config: proxyConfig, owner: owner)
        switch proxyConfig.type {
        case .tcp, .udp:
            let portProxies = owner.proxies.values.filter { $0.config.type == .tcp || $0.config.type == .udp }
            if config.maxPortsPerClient > 0, portProxies.count + owner.bindingPorts >= config.maxPortsPerClient {
                return reply("the client already uses its \(config.maxPortsPerClient) ports (maxPortsPerClient)")
            }
            let port = proxyConfig.remotePort
            if port != 0 {
                guard config.allows(port: port) else { return reply("port \(port) is not allowed by the server's allowPorts") }
                guard !ports.contains(portKey(proxyConfig.type, port)) else {
                    return reply("\(proxyConfig.type.rawValue) port \(port) is already used by another proxy")
                }
            } else if !config.allowPorts.isEmpty {
                return reply("remotePort 0 (any port) is not allowed when the server sets allowPorts")
            }
            // The name and port are held while the port is bound, so a second request for either
            // (a hostile client can send both at once) is refused rather than racing.
            owner.bindingPorts += 1
            reservedNames.insert(name)
            if port != 0 { ports.insert(portKey(proxyConfig.type, port)) }
            bindProxy(proxy, port: port) { [self] result in
                owner.bindingPorts -= 1
                reservedNames.remove(name)
                if port != 0 { ports.remove(portKey(proxyConfig.type, port)) }
                switch result {
                case .failure(let error):
                    reply("cannot listen on port \(port): \(error)")
                case .success(let channel):
                    guard owner.session?.isOpen == true else {
                        channel.close(promise: nil)
                        return
                    }
                    proxy.listener = channel
                    proxy.remotePort = channel.localAddress?.port ?? port
                    ports.insert(portKey(proxyConfig.type, proxy.remotePort))
                    add(proxy)
                    reply(nil, remoteAddr: ":\(proxy.remotePort)", id: id)
                }
            }
        case .http, .https:
            let https = proxyConfig.type == .https
            guard (https ? config.vhostHTTPSPort : config.vhostHTTPPort) > 0 else {
                return reply("the server has no \(https ? "vhostHTTPSPort" : "vhostHTTPPort") configured")
            }
            var domains = proxyConfig.customDomains.map(normalizeHost)
            if !proxyConfig.subdomain.isEmpty {
                guard !config.subDomainHost.isEmpty else { return reply("subdomain needs subDomainHost on the server") }
                guard !proxyConfig.subdomain.contains(".") else { return reply("subdomain must not contain a dot") }
                domains.append("\(proxyConfig.subdomain.lowercased()).\(config.subDomainHost.lowercased())")
            }
            for domain in domains {
                if https {
                    if httpsRoutes[domain] != nil { return reply("domain \(domain) is already used by another https proxy") }
                } else {
                    let locations = proxyConfig.locations.isEmpty ? [""] : proxyConfig.locations
                    for other in httpRoutes[domain] ?? [] {
                        let taken = other.config.locations.isEmpty ? [""] : other.config.locations
                        if let clash = locations.first(where: taken.contains) {
                            return reply("domain \(domain) location \"\(clash)\" is already used by proxy \(other.config.name)")
                        }
                    }
                }
            }
            proxy.domains = domains
            for domain in domains {
                if https { httpsRoutes[domain] = proxy } else { httpRoutes[domain, default: []].append(proxy) }
            }
            add(proxy)
            reply(nil, remoteAddr: domains.joined(separator: ","), id: id)
        case .stcp:
            add(proxy)
            reply(nil, id: id)
        }
    }

    private func add(_ proxy: ServerProxy) {
        proxies[proxy.config.name] = proxy
        proxiesByID[proxy.id] = proxy
        proxy.owner.proxies[proxy.config.name] = proxy
        proxy.metrics = metrics?.proxy(name: proxy.config.name, type: proxy.config.type.rawValue)
        metrics?.proxyCount(type: proxy.config.type.rawValue, delta: 1)
        logger.info("proxy \(proxy.config.name) (\(proxy.config.type.rawValue)) is up", metadata: ["port": "\(proxy.remotePort)"])
    }

    func remove(_ proxy: ServerProxy) {
        guard proxies[proxy.config.name] === proxy else { return }
        proxies.removeValue(forKey: proxy.config.name)
        proxiesByID.removeValue(forKey: proxy.id)
        proxy.owner.proxies.removeValue(forKey: proxy.config.name)
        if proxy.remotePort != 0 { ports.remove(portKey(proxy.config.type, proxy.remotePort)) }
        proxy.listener?.close(promise: nil)
        proxy.listener = nil
        for domain in proxy.domains {
            if proxy.config.type == .https {
                if httpsRoutes[domain] === proxy { httpsRoutes.removeValue(forKey: domain) }
            } else {
                httpRoutes[domain]?.removeAll { $0 === proxy }
                if httpRoutes[domain]?.isEmpty == true { httpRoutes.removeValue(forKey: domain) }
            }
        }
        metrics?.proxyCount(type: proxy.config.type.rawValue, delta: -1)
    }

    private func portKey(_ type: ProxyConfig.Kind, _ port: Int) -> String { "\(type == .udp ? "udp" : "tcp"):\(port)" }

    private func bindProxy(_ proxy: ServerProxy, port: Int, done: @escaping (Result<Channel, Error>) -> Void) {
        let bound = NIOLoopBound(self, eventLoop: loop)
        let boundProxy = NIOLoopBound(proxy, eventLoop: loop)
        let host = config.effectiveProxyBindAddr
        let future: EventLoopFuture<Channel>
        if proxy.config.type == .udp {
            future = DatagramBootstrap(group: loop)
                .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
                // Room for bursts while the loop is busy (the kernel caps it at net.core.rmem_max).
                .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
                .channelOption(.socketOption(.so_reuseaddr), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(UDPListener(proxy: boundProxy.value))
                    }
                }
                .bind(host: host, port: port)
        } else {
            future = LocalRelay.listen(on: loop, host: host, port: port) { channel, relay in
                bound.value.openUserStream(boundProxy.value, channel: channel, relay: relay, initial: nil)
            }
        }
        future.assumeIsolated().whenComplete(done)
    }

    /// A user connected to `proxy`: open a stream on its owner's session and relay.
    func openUserStream(_ proxy: ServerProxy, channel: Channel, relay: LocalRelay, initial: ByteBuffer?) {
        guard proxies[proxy.config.name] === proxy, let session = proxy.owner.session, session.isOpen else {
            channel.close(promise: nil)
            return
        }
        guard activeConnections < config.connectionCap else {
            logger.warning("connection to \(proxy.config.name) refused: \(config.connectionCap) connections are open (maxConnections)")
            channel.close(promise: nil)
            return
        }
        activeConnections += 1
        proxy.connections += 1
        proxy.metrics?.connections(delta: 1)
        relay.onClose = { [weak self, weak proxy] in
            self?.activeConnections -= 1
            proxy?.connections -= 1
            proxy?.metrics?.connections(delta: -1)
        }
        let stream = session.makeStream()
        stream.compress = proxy.config.useCompression
        stream.meter = proxy.makeMeter()
        let remote = channel.remoteAddress
        let local = channel.localAddress
        session.sendOpen(
            stream,
            OpenRequest(
                proxy: proxy.config.name, srcAddr: remote?.ipAddress ?? "", srcPort: remote?.port ?? 0,
                dstAddr: local?.ipAddress ?? "", dstPort: local?.port ?? 0))
        if let initial { stream.send(initial) }
        relay.attach(stream)
        session.flush()
    }

    // MARK: vhost

    func acceptVHost(_ channel: Channel, https: Bool) throws {
        try channel.pipeline.syncOperations.addHandler(VHostSniffer(core: self, https: https))
    }

    /// The http proxy for a host and path: exact domain, then a wildcard, longest location first.
    func routeHTTP(host: String, path: String) -> ServerProxy? {
        var candidates = httpRoutes[host] ?? []
        if candidates.isEmpty, let dot = host.firstIndex(of: ".") {
            candidates = httpRoutes["*" + host[dot...]] ?? []
        }
        var best: (ServerProxy, Int)?
        for proxy in candidates {
            let locations = proxy.config.locations.isEmpty ? [""] : proxy.config.locations
            for location in locations where path.hasPrefix(location) || location.isEmpty || location == "/" {
                if best == nil || location.count > (best?.1 ?? 0) { best = (proxy, location.count) }
            }
        }
        return best?.0
    }

    func routeHTTPS(host: String) -> ServerProxy? {
        if let proxy = httpsRoutes[host] { return proxy }
        if let dot = host.firstIndex(of: ".") { return httpsRoutes["*" + host[dot...]] }
        return nil
    }

    // MARK: stcp

    /// A visitor opened a stream asking for an stcp proxy: check its proof and splice it to a new
    /// stream on the owner's session.
    func visit(from connection: ServerConnection, stream: MuxStream, request: OpenRequest) {
        guard let proxy = proxies[request.proxy], proxy.config.type == .stcp,
            let proof = request.visitorProof.flatMap({ [UInt8](base64: $0) }),
            TunnelAuth.equal(
                proof,
                TunnelAuth.visitorProof(secretKey: proxy.config.secretKey, sessionNonce: connection.challenge.nonce, stream: stream.id))
        else {
            logger.warning("stcp visitor from \(connection.address) refused: unknown proxy \(request.proxy) or wrong secret key")
            stream.refuse("stcp: unknown proxy or wrong secret key")
            return
        }
        guard let ownerSession = proxy.owner.session, ownerSession.isOpen else {
            stream.reset("stcp: the proxy's client is offline")
            return
        }
        let target = ownerSession.makeStream()
        target.compress = proxy.config.useCompression
        target.meter = proxy.makeMeter()
        ownerSession.sendOpen(
            target,
            OpenRequest(
                proxy: proxy.config.name, srcAddr: request.srcAddr, srcPort: request.srcPort, dstAddr: request.dstAddr,
                dstPort: request.dstPort))
        SpliceEndpoint.join(stream, target)
        ownerSession.flush()
    }

    // MARK: udp

    func datagramFromUser(_ proxy: ServerProxy, _ envelope: AddressedEnvelope<ByteBuffer>) {
        guard let session = proxy.owner.session, session.isOpen,
            let address = envelope.remoteAddress.ipAddress.flatMap(parseIPAddress), let port = envelope.remoteAddress.port
        else { return }
        proxy.trafficIn += envelope.data.readableBytes
        proxy.metrics?.traffic(in: envelope.data.readableBytes, out: 0)
        let datagram = Datagram(address: address, port: UInt16(port), data: envelope.data)
        session.send(.datagram, stream: proxy.id, payload: datagram.encode())
    }

    func datagramFromClient(_ connection: ServerConnection, proxyID: UInt32, payload: ByteBuffer) {
        guard let proxy = proxiesByID[proxyID], proxy.owner === connection, proxy.config.type == .udp,
            let listener = proxy.listener, let datagram = try? Datagram.decode(payload),
            let address = try? SocketAddress(packedIPAddress: ByteBuffer(bytes: datagram.address), port: Int(datagram.port))
        else { return }
        proxy.trafficOut += datagram.data.readableBytes
        proxy.metrics?.traffic(in: 0, out: datagram.data.readableBytes)
        listener.writeAndFlush(AddressedEnvelope(remoteAddress: address, data: datagram.data), promise: nil)
    }

    // MARK: status and shutdown

    func acceptWeb(_ channel: Channel) throws {
        try channel.pipeline.syncOperations.configureHTTPServerPipeline()
        try channel.pipeline.syncOperations.addHandler(StatusHTTPHandler(core: self))
    }

    func status() -> ServerStatus {
        let clients = connections.values.filter(\.authenticated).map {
            ServerStatus.Client(
                runID: $0.runID, user: $0.user, hostname: $0.hostname, address: $0.address,
                connectedAt: ISO8601DateFormatter().string(from: $0.connectedAt), proxies: $0.proxies.keys.sorted())
        }
        let proxies = proxies.values.sorted { $0.config.name < $1.config.name }.map {
            ServerStatus.Proxy(
                name: $0.config.name, type: $0.config.type.rawValue, remotePort: $0.remotePort, domains: $0.domains,
                client: $0.owner.runID, connections: $0.connections, trafficIn: $0.trafficIn, trafficOut: $0.trafficOut)
        }
        return ServerStatus(
            version: nimbusTunnelVersion, bindPort: listeners.first?.localAddress?.port ?? config.bindPort,
            vhostHTTPPort: config.vhostHTTPPort, vhostHTTPSPort: config.vhostHTTPSPort, clientCount: clients.count,
            connections: activeConnections, uptimeSeconds: Int(Date().timeIntervalSince(startedAt)), clients: clients,
            proxies: proxies)
    }

    func shutdown() -> EventLoopFuture<Void> {
        let all = listeners + connections.values.compactMap { $0.session?.context?.channel }
        listeners = []
        for proxy in Array(proxies.values) { remove(proxy) }
        let futures = all.map { $0.close().recover { _ in } }
        return EventLoopFuture.andAllComplete(futures, on: loop)
    }
}

/// Receives users' datagrams for a udp proxy.
final class UDPListener: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    unowned let proxy: ServerProxy
    private var pending = false

    init(proxy: ServerProxy) { self.proxy = proxy }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        proxy.owner.core.datagramFromUser(proxy, unwrapInboundIn(data))
        pending = true
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if pending { proxy.owner.session?.flush() }
        pending = false
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {}
}

/// Reads the first bytes of a connection on a vhost port, routes it by Host header (http) or TLS
/// server name (https), then hands the socket to a `LocalRelay`.
final class VHostSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    unowned let core: ServerCore
    let https: Bool
    private var bytes: [UInt8] = []
    private var done = false
    private var timeout: Scheduled<Void>?

    init(core: ServerCore, https: Bool) {
        self.core = core
        self.https = https
    }

    func channelActive(context: ChannelHandlerContext) {
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(10)) { [weak self] in
            guard let self, !done else { return }
            done = true
            context.close(promise: nil)
        }
        context.read()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        bytes += unwrapInboundIn(data).readableBytesView
        if https {
            switch sniffSNI(bytes) {
            case nil: return
            case .failure(let error): fail(context, error.description, status: nil)
            case .success(let host):
                guard let proxy = core.routeHTTPS(host: host) else { return fail(context, "no https proxy for \(host)", status: nil) }
                hand(context, to: proxy, initial: bytes)
            }
        } else {
            switch HTTPHead.parse(bytes) {
            case nil: return
            case .failure(let error): fail(context, error.description, status: "400 Bad Request")
            case .success(let head):
                guard let host = head.host else { return fail(context, "no Host header", status: "400 Bad Request") }
                guard let proxy = core.routeHTTP(host: host, path: head.path) else {
                    return fail(context, "no http proxy for \(host)\(head.path)", status: "404 Not Found")
                }
                let client = context.remoteAddress?.ipAddress ?? "unknown"
                let rest = bytes[head.length...]
                hand(context, to: proxy, initial: head.rewritten(forwardedFor: client, hostRewrite: proxy.config.hostHeaderRewrite) + rest)
            }
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !done { context.read() }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }

    private func hand(_ context: ChannelHandlerContext, to proxy: ServerProxy, initial: [UInt8]) {
        done = true
        timeout?.cancel()
        let relay = LocalRelay()
        do {
            try context.pipeline.syncOperations.addHandler(relay, position: .after(self))
        } catch {
            context.close(promise: nil)
            return
        }
        let channel = context.channel
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        core.openUserStream(proxy, channel: channel, relay: relay, initial: channel.allocator.buffer(bytes: initial))
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String, status: String?) {
        done = true
        core.logger.debug("vhost connection refused: \(reason)")
        if let status {
            let body = "<html><body><h1>\(status)</h1><p>nimbus-tunnel: \(htmlEscape(reason))</p></body></html>\n"
            let response =
                "HTTP/1.1 \(status)\r\nContent-Type: text/html\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(string: response))).assumeIsolated()
                .whenComplete { _ in context.close(promise: nil) }
        } else {
            context.close(promise: nil)
        }
    }
}

func htmlEscape(_ text: String) -> String {
    text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
}

public let nimbusTunnelVersion = "0.1.0"
