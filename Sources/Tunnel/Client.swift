// Tunnel layer: the side behind NAT. It dials the server (never listens for it), logs in with a
// challenge-response over the token, registers its proxies, connects to local services for the
// streams the server opens, runs stcp visitors, and reconnects with backoff when the session dies.
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// The state of one proxy as the server last answered.
public enum ProxyState: Sendable, Equatable {
    case pending
    case running(remoteAddr: String)
    case refused(String)
}

/// The first login failed and `loginFailExit` is set.
public struct LoginFailed: Error, CustomStringConvertible {
    public let description: String
}

/// A running client.
public final class TunnelClient: Sendable {
    public let config: ClientConfig
    let loop: EventLoop
    let core: NIOLoopBound<ClientCore>

    private init(config: ClientConfig, loop: EventLoop, core: NIOLoopBound<ClientCore>) {
        self.config = config
        self.loop = loop
        self.core = core
    }

    /// Starts the client and waits for the first login and the answers for every proxy. With
    /// `loginFailExit` a failed first login throws; without it the client keeps retrying.
    public static func start(config: ClientConfig, group: EventLoopGroup, logger: Logger) async throws -> TunnelClient {
        let loop = group.next()
        let tls = config.tlsEnable ? try TunnelTLS.clientContext(config.tls) : nil
        let core = try await loop.submit {
            NIOLoopBound(ClientCore(config: config, loop: loop, tls: tls, logger: logger), eventLoop: loop)
        }.get()
        let client = TunnelClient(config: config, loop: loop, core: core)
        try await loop.flatSubmit { core.value.begin(bound: core) }.get()
        return client
    }

    /// Each proxy's state.
    public func proxyStates() async throws -> [String: ProxyState] {
        try await loop.submit { self.core.value.states }.get()
    }

    /// Whether a session is logged in now.
    public func isConnected() async throws -> Bool {
        try await loop.submit { self.core.value.session?.established == true }.get()
    }

    /// Stops reconnecting and closes everything.
    public func stop() async {
        _ = try? await loop.flatSubmit { self.core.value.shutdown() }.get()
    }
}

/// A UDP flow from one user address through a udp proxy to the local service.
final class UDPFlow: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    struct Key: Hashable {
        var proxyID: UInt32
        var address: [UInt8]
        var port: UInt16
    }
    let key: Key
    unowned let core: ClientCore
    var channel: Channel?
    var target: SocketAddress?
    var queued: [ByteBuffer] = []
    var lastUsed = NIODeadline.now()

    init(key: Key, core: ClientCore) {
        self.key = key
        self.core = core
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastUsed = .now()
        let envelope = unwrapInboundIn(data)
        let datagram = Datagram(address: key.address, port: key.port, data: envelope.data)
        core.session?.send(.datagram, stream: key.proxyID, payload: datagram.encode())
    }

    func channelReadComplete(context: ChannelHandlerContext) { core.session?.flush() }

    func errorCaught(context: ChannelHandlerContext, error: Error) {}

    func send(_ data: ByteBuffer) {
        lastUsed = .now()
        guard let channel, let target else {
            if queued.count < 64 { queued.append(data) }
            return
        }
        channel.writeAndFlush(AddressedEnvelope(remoteAddress: target, data: data), promise: nil)
    }
}

/// The client's state, confined to its event loop.
final class ClientCore: MuxSessionDelegate {
    let config: ClientConfig
    let loop: EventLoop
    let tls: NIOSSLContext?
    let logger: Logger
    var session: MuxSession?
    private var bound: NIOLoopBound<ClientCore>?
    private var clientNonce: [UInt8] = []
    private(set) var states: [String: ProxyState] = [:]
    private var proxiesByName: [String: ProxyConfig] = [:]
    private var udpProxies: [UInt32: ProxyConfig] = [:]
    private var udpFlows: [UDPFlow.Key: UDPFlow] = [:]
    private var limiters: [String: RateLimiter] = [:]
    private var visitorListeners: [Channel] = []
    private var firstLogin: EventLoopPromise<Void>?
    private var backoff: TimeAmount = .seconds(1)
    private var stopped = false
    private var reconnectTask: Scheduled<Void>?
    private var sweepTask: Scheduled<Void>?

    init(config: ClientConfig, loop: EventLoop, tls: NIOSSLContext?, logger: Logger) {
        self.config = config
        self.loop = loop
        self.tls = tls
        self.logger = logger
        for proxy in config.proxies {
            proxiesByName[proxy.name] = proxy
            states[proxy.name] = .pending
            if proxy.bandwidthLimit > 0 { limiters[proxy.name] = RateLimiter(bytesPerSecond: proxy.bandwidthLimit) }
        }
    }

    /// Starts visitors and the first connection; the future completes once the first login is
    /// answered and every proxy has its answer.
    func begin(bound: NIOLoopBound<ClientCore>) -> EventLoopFuture<Void> {
        self.bound = bound
        let promise = loop.makePromise(of: Void.self)
        firstLogin = promise
        startVisitors()
        sweepUDP()
        connect()
        return promise.futureResult
    }

    private func connect() {
        guard !stopped, let bound else { return }
        let tls = tls
        let serverName = config.tls.serverName ?? config.serverAddr
        let sniName = parseIPAddress(serverName) == nil ? serverName : nil
        logger.debug("connecting to \(config.serverAddr):\(config.serverPort)")
        ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: .init(low: 256 * 1024, high: 1024 * 1024))
            .connectTimeout(.seconds(10))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let tls { try sync.addHandler(NIOSSLClientHandler(context: tls, serverHostname: sniName)) }
                    try sync.addHandler(bound.value.makeSession())
                }
            }
            .connect(host: config.serverAddr, port: config.serverPort)
            .assumeIsolated()
            .whenFailure { [self] error in
                loginFailed("cannot connect to \(config.serverAddr):\(config.serverPort): \(error)")
            }
    }

    func makeSession() -> MuxSession {
        let session = MuxSession(role: .client, logger: logger)
        session.delegate = self
        if config.heartbeatInterval > 0 { session.pingInterval = .seconds(Int64(config.heartbeatInterval)) }
        if config.heartbeatTimeout > 0 { session.idleTimeout = .seconds(Int64(config.heartbeatTimeout)) }
        session.maxPeerStreams = 65536
        self.session = session
        return session
    }

    private func loginFailed(_ reason: String) {
        if let promise = firstLogin, config.loginFailExit {
            firstLogin = nil
            logger.error("login failed: \(reason)")
            stopped = true
            promise.fail(LoginFailed(description: reason))
            return
        }
        logger.warning("login failed: \(reason); retrying in \(backoff.nanoseconds / 1_000_000_000) s")
        scheduleReconnect()
    }

    private func scheduleReconnect() {
        guard !stopped, reconnectTask == nil else { return }
        let delay = backoff
        backoff = .nanoseconds(min(backoff.nanoseconds * 2, TimeAmount.seconds(20).nanoseconds))
        reconnectTask = loop.assumeIsolated().scheduleTask(in: delay) { [self] in
            reconnectTask = nil
            connect()
        }
    }

    // MARK: session events

    func sessionActive(_ session: MuxSession) {
        var hello = ByteBuffer()
        hello.writeBytes(Challenge.magic)
        hello.writeInteger(Challenge.version)
        session.send(.hello, payload: hello)
        session.flush()
    }

    func session(_ session: MuxSession, received frame: Frame) throws {
        switch frame.type {
        case .challenge:
            guard clientNonce.isEmpty || !session.established else { throw WireError("second challenge") }
            let challenge = try Challenge.decode(frame.payload)
            session.nonce = challenge.nonce
            clientNonce = randomBytes(32)
            let mac = TunnelAuth.loginMAC(token: config.token, serverNonce: challenge.nonce, clientNonce: clientNonce)
            let login = LoginRequest(
                version: 1, user: config.user, hostname: ProcessInfo.processInfo.hostName, runID: "",
                clientNonce: clientNonce.base64, mac: mac.base64, poolCount: config.poolCount)
            session.send(.login, payload: encodeJSON(login))
            session.flush()
        case .loginResult:
            let result = try decodeJSON(LoginResult.self, frame.payload, what: "login result")
            guard result.ok else {
                session.close()
                loginFailed("the server refused the login: \(result.error ?? "no reason given")")
                return
            }
            let expected = TunnelAuth.serverProof(token: config.token, serverNonce: session.nonce, clientNonce: clientNonce)
            guard let proof = result.serverProof.flatMap({ [UInt8](base64: $0) }), TunnelAuth.equal(proof, expected) else {
                session.close()
                loginFailed("the server could not prove it knows the token")
                return
            }
            session.established = true
            backoff = .seconds(1)
            logger.info("logged in to \(config.serverAddr):\(config.serverPort)", metadata: ["runID": "\(result.runID ?? "")"])
            for proxy in config.proxies {
                states[proxy.name] = .pending
                session.sendControl(ControlMessage(kind: .newProxy, proxy: proxy))
            }
            checkReady()
        case .control:
            let message = try decodeJSON(ControlMessage.self, frame.payload, what: "control message")
            guard message.kind == .newProxyResult, let name = message.name, let proxy = proxiesByName[name] else { return }
            if let error = message.error {
                logger.error("proxy \(name) refused by the server: \(error)")
                states[name] = .refused(error)
            } else {
                logger.info("proxy \(name) is running", metadata: ["remote": "\(message.remoteAddr ?? "")"])
                states[name] = .running(remoteAddr: message.remoteAddr ?? "")
                if proxy.type == .udp, let id = message.proxyID { udpProxies[id] = proxy }
            }
            checkReady()
        case .datagram:
            datagramFromServer(proxyID: frame.stream, payload: frame.payload)
        default:
            throw WireError("unexpected \(frame.type) frame from the server")
        }
    }

    private func checkReady() {
        guard let promise = firstLogin, !states.values.contains(.pending) else { return }
        firstLogin = nil
        promise.succeed()
    }

    func session(_ session: MuxSession, opened stream: MuxStream, request: OpenRequest) {
        guard let proxy = proxiesByName[request.proxy], proxy.type != .udp else {
            stream.reset("no proxy \(request.proxy) on this client")
            return
        }
        stream.compress = proxy.useCompression
        let pending = PendingEndpoint()
        stream.endpoint = pending
        let limiter = limiters[proxy.name]
        ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.autoRead, value: false)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .connectTimeout(.seconds(10))
            .connect(host: proxy.localIP, port: proxy.localPort)
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .failure(let error):
                    logger.info("proxy \(proxy.name): cannot connect to \(proxy.localIP):\(proxy.localPort): \(error)")
                    stream.reset("cannot connect to the local service")
                case .success(let channel):
                    guard !pending.aborted, stream.endpoint === pending else {
                        channel.close(promise: nil)
                        return
                    }
                    let relay = LocalRelay(limiter: limiter)
                    do {
                        try channel.pipeline.syncOperations.addHandler(relay)
                    } catch {
                        channel.close(promise: nil)
                        stream.reset("cannot set up the local connection")
                        return
                    }
                    if proxy.proxyProtocolVersion > 0 {
                        relay.writeRaw(
                            proxyProtocolHeader(
                                version: proxy.proxyProtocolVersion,
                                ProxyEndpoints(
                                    sourceAddress: request.srcAddr, sourcePort: request.srcPort,
                                    destinationAddress: request.dstAddr, destinationPort: request.dstPort)))
                    }
                    relay.attach(stream)
                    pending.drain(into: relay)
                    session.flush()
                }
            }
    }

    func sessionClosed(_ session: MuxSession) {
        guard self.session === session else { return }
        self.session = nil
        udpProxies.removeAll()
        for flow in udpFlows.values { flow.channel?.close(promise: nil) }
        udpFlows.removeAll()
        guard !stopped else { return }
        if session.established {
            logger.warning("lost the session to \(config.serverAddr):\(config.serverPort); reconnecting")
            for name in states.keys { states[name] = .pending }
            scheduleReconnect()
        } else if firstLogin != nil || reconnectTask == nil {
            loginFailed("the server closed the connection during login")
        }
    }

    // MARK: udp

    private func datagramFromServer(proxyID: UInt32, payload: ByteBuffer) {
        guard let proxy = udpProxies[proxyID], let datagram = try? Datagram.decode(payload) else { return }
        let key = UDPFlow.Key(proxyID: proxyID, address: datagram.address, port: datagram.port)
        if let flow = udpFlows[key] {
            flow.send(datagram.data)
            return
        }
        guard udpFlows.count < 4096, let bound else { return }
        let flow = UDPFlow(key: key, core: self)
        udpFlows[key] = flow
        flow.send(datagram.data)
        let boundFlow = NIOLoopBound(flow, eventLoop: loop)
        let target: SocketAddress
        do {
            target = try SocketAddress.makeAddressResolvingHost(proxy.localIP, port: proxy.localPort)
        } catch {
            udpFlows.removeValue(forKey: key)
            return
        }
        let any = target.protocol == .inet6 ? "::" : "0.0.0.0"
        DatagramBootstrap(group: loop)
            .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 65536))
            .channelOption(.socketOption(.so_rcvbuf), value: 4 << 20)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(boundFlow.value) }
            }
            .bind(host: any, port: 0)
            .assumeIsolated()
            .whenComplete { result in
                _ = bound
                guard case .success(let channel) = result else { return }
                flow.channel = channel
                flow.target = target
                let queued = flow.queued
                flow.queued = []
                for data in queued { flow.send(data) }
            }
    }

    private func sweepUDP() {
        sweepTask = loop.assumeIsolated().scheduleTask(in: .seconds(15)) { [self] in
            let now = NIODeadline.now()
            for (key, flow) in udpFlows where now - flow.lastUsed > .seconds(60) {
                flow.channel?.close(promise: nil)
                udpFlows.removeValue(forKey: key)
            }
            if !stopped { sweepUDP() }
        }
    }

    // MARK: visitors

    private func startVisitors() {
        guard let bound else { return }
        for visitor in config.visitors {
            LocalRelay.listen(on: loop, host: visitor.bindAddr, port: visitor.bindPort) { channel, relay in
                bound.value.visit(visitor, channel: channel, relay: relay)
            }
            .assumeIsolated()
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    visitorListeners.append(channel)
                    logger.info("visitor \(visitor.name) listening on \(visitor.bindAddr):\(visitor.bindPort)")
                case .failure(let error):
                    logger.error("visitor \(visitor.name): cannot listen on \(visitor.bindAddr):\(visitor.bindPort): \(error)")
                }
            }
        }
    }

    private func visit(_ visitor: VisitorConfig, channel: Channel, relay: LocalRelay) {
        guard let session, session.established else {
            logger.info("visitor \(visitor.name): no session to the server; closing the connection")
            channel.close(promise: nil)
            return
        }
        let stream = session.makeStream()
        let proof = TunnelAuth.visitorProof(secretKey: visitor.secretKey, sessionNonce: session.nonce, stream: stream.id)
        let remote = channel.remoteAddress
        let local = channel.localAddress
        session.sendOpen(
            stream,
            OpenRequest(
                proxy: visitor.serverName, srcAddr: remote?.ipAddress ?? "", srcPort: remote?.port ?? 0,
                dstAddr: local?.ipAddress ?? "", dstPort: local?.port ?? 0, visitorProof: proof.base64))
        relay.attach(stream)
        session.flush()
    }

    func shutdown() -> EventLoopFuture<Void> {
        stopped = true
        reconnectTask?.cancel()
        sweepTask?.cancel()
        let channels = visitorListeners + [session?.context?.channel].compactMap { $0 } + udpFlows.values.compactMap(\.channel)
        visitorListeners = []
        if let promise = firstLogin {
            firstLogin = nil
            promise.fail(LoginFailed(description: "the client was stopped"))
        }
        return EventLoopFuture.andAllComplete(channels.map { $0.close().recover { _ in } }, on: loop)
    }
}
