// A real server and client in this process, joined over loopback, with blocking test services
// behind them. No privileges needed; the namespace tests with iperf3 and curl are in
// TunnelNamespaceTests.
import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import Tunnel

enum Harness {
    static let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)

    static var logger: Logger {
        var logger = Logger(label: "tunnel-test")
        let level = ProcessInfo.processInfo.environment["NIMBUS_TEST_LOG"].flatMap(Logger.Level.init(rawValue:))
        logger.logLevel = level ?? .critical
        return logger
    }

    static func server(_ change: (inout ServerConfig) -> Void = { _ in }) async throws -> TunnelServer {
        var config = ServerConfig()
        config.bindAddr = "127.0.0.1"
        config.bindPort = 0
        config.token = "tok"
        change(&config)
        return try await TunnelServer.start(config: config, group: group, logger: logger)
    }

    static func client(
        _ server: TunnelServer, proxies: [ProxyConfig] = [], visitors: [VisitorConfig] = [],
        _ change: (inout ClientConfig) -> Void = { _ in }
    ) async throws -> TunnelClient {
        var config = ClientConfig()
        config.serverAddr = "127.0.0.1"
        config.serverPort = server.controlPort
        config.token = "tok"
        config.tlsEnable = false
        config.proxies = proxies
        config.visitors = visitors
        change(&config)
        return try await TunnelClient.start(config: config, group: group, logger: logger)
    }

    static func tcp(_ name: String, local: Int, remote: Int, _ change: (inout ProxyConfig) -> Void = { _ in }) -> ProxyConfig {
        var proxy = ProxyConfig(name: name, type: .tcp)
        proxy.localPort = local
        proxy.remotePort = remote
        change(&proxy)
        return proxy
    }

    /// An stcp proxy for the service on `local`, reachable with `key`.
    static func stcp(_ name: String, local: Int, key: String) -> ProxyConfig {
        var proxy = ProxyConfig(name: name, type: .stcp)
        proxy.localPort = local
        proxy.secretKey = key
        return proxy
    }

    /// A visitor of the stcp proxy `proxy` with `key`, on a free local port.
    static func visitor(_ name: String, of proxy: String, key: String) throws -> VisitorConfig {
        var visitor = VisitorConfig(name: name)
        visitor.serverName = proxy
        visitor.secretKey = key
        visitor.bindPort = try freePort()
        return visitor
    }

    static func randomData(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var out = [UInt8](repeating: 0, count: count)
        var word: UInt64 = 0
        for index in 0..<count {
            if index % 8 == 0 { word = generator.next() }
            out[index] = UInt8(truncatingIfNeeded: word >> (UInt64(index % 8) * 8))
        }
        return out
    }

    /// Sends `data` through `port` to an echo service and checks it comes back whole.
    static func echoRoundTrip(port: Int, _ data: [UInt8]) throws -> Bool {
        let socket = try TestSocket.connect(port: port)
        let sender = Thread {
            try? socket.send(data)
            socket.shutdownWrite()
        }
        sender.start()
        let back = try socket.receiveAll()
        return back == data
    }
}

@Suite(.serialized) struct LoopbackTests {
    @Test func tcpProxyCarriesBothDirectionsWithHalfClose() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let remote = try freePort()
        let client = try await Harness.client(server, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)])
        #expect(try await client.proxyStates()["echo"] == .running(remoteAddr: ":\(remote)"))
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(3 << 20)))
        #expect(try Harness.echoRoundTrip(port: remote, Array("small".utf8)))
        let status = try await server.status()
        #expect(status.proxies.first?.trafficIn ?? 0 >= 3 << 20)
        // A client that goes away frees its ports at once.
        await client.stop()
        var freed = false
        for _ in 0..<20 where !freed {
            try await Task.sleep(for: .milliseconds(50))
            freed = (try? TestSocket.connect(port: remote)) == nil
        }
        #expect(freed)
        await server.stop()
    }

    @Test func bandwidthLimitSlowsAProxy() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let remote = try freePort()
        let client = try await Harness.client(
            server, proxies: [Harness.tcp("slow", local: echo.port, remote: remote) { $0.bandwidthLimit = 512 * 1024 }])
        let started = Date()
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(1 << 20)))
        // 1 MiB each way through a 512 KiB/s bucket shared by both directions. The bucket is
        // charged after each read batch, so the last batch (up to a few hundred KiB) and the
        // tenth-of-a-second burst go unpaid; the returning MiB alone still needs well over 1.2 s.
        let elapsed = Date().timeIntervalSince(started)
        #expect(elapsed > 1.2 && elapsed < 30)
        await client.stop()
        await server.stop()
    }

    @Test func compressedStreamsRoundTrip() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let remote = try freePort()
        let client = try await Harness.client(
            server, proxies: [Harness.tcp("zip", local: echo.port, remote: remote) { $0.useCompression = true }])
        let text = Array(String(repeating: "compressible line of text\n", count: 40000).utf8)
        #expect(try Harness.echoRoundTrip(port: remote, text))
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(200_000)))
        await client.stop()
        await server.stop()
    }

    @Test func aStalledStreamDoesNotStallTheOthers() async throws {
        // A service that accepts and never reads: its stream's window fills and stops there.
        let sink = try TestService { socket in Thread.sleep(forTimeInterval: 20) }
        defer { sink.stop() }
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let (stuckPort, echoPort) = (try freePort(), try freePort())
        let client = try await Harness.client(
            server, proxies: [Harness.tcp("stuck", local: sink.port, remote: stuckPort), Harness.tcp("echo", local: echo.port, remote: echoPort)])
        let stuck = try TestSocket.connect(port: stuckPort)
        let blob = [UInt8](repeating: 7, count: 32 << 20)
        Thread { try? stuck.send(blob) }.start()
        try await Task.sleep(for: .milliseconds(500))
        let started = Date()
        #expect(try Harness.echoRoundTrip(port: echoPort, Harness.randomData(4 << 20)))
        #expect(Date().timeIntervalSince(started) < 30)
        await client.stop()
        await server.stop()
    }

    @Test func httpIsRoutedByHostAndLocationWithForwardedFor() async throws {
        func responder(_ label: String) throws -> TestService {
            try TestService { socket in
                var head: [UInt8] = []
                while !String(decoding: head, as: UTF8.self).contains("\r\n\r\n"), let chunk = try? socket.receive(), !chunk.isEmpty {
                    head += chunk
                }
                let seen = String(decoding: head, as: UTF8.self).replacingOccurrences(of: "\r\n", with: "|")
                let body = "\(label) \(seen)"
                try? socket.send("HTTP/1.1 200 OK\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)")
            }
        }
        let (a, b, pics) = (try responder("A"), try responder("B"), try responder("PICS"))
        defer { [a, b, pics].forEach { $0.stop() } }
        let vhost = try freePort()
        let real = try await Harness.server {
            $0.vhostHTTPPort = vhost
            $0.subDomainHost = "tunnel.test"
        }
        func http(_ name: String, _ port: Int, domains: [String] = [], subdomain: String = "", locations: [String] = []) -> ProxyConfig {
            var proxy = ProxyConfig(name: name, type: .http)
            proxy.localPort = port
            proxy.customDomains = domains
            proxy.subdomain = subdomain
            proxy.locations = locations
            return proxy
        }
        let client = try await Harness.client(
            real,
            proxies: [
                http("a", a.port, domains: ["a.example.com"]), http("b", b.port, subdomain: "bee"),
                http("pics", pics.port, domains: ["a.example.com"], locations: ["/pic"]),
            ])
        func get(_ host: String, _ path: String) throws -> String {
            let socket = try TestSocket.connect(port: vhost)
            try socket.send("GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUser-Agent: test\r\n\r\n")
            return String(decoding: try socket.receiveAll(), as: UTF8.self)
        }
        let fromA = try get("a.example.com", "/index.html")
        #expect(fromA.contains("200 OK") && fromA.contains("A GET /index.html"))
        #expect(fromA.contains("X-Forwarded-For: 127.0.0.1"))
        #expect(try get("A.EXAMPLE.COM:\(vhost)", "/pic/cat.png").contains("PICS GET /pic/cat.png"))
        #expect(try get("bee.tunnel.test", "/").contains("B GET /"))
        #expect(try get("nobody.example.com", "/").contains("404 Not Found"))
        await client.stop()
        await real.stop()
    }

    @Test func httpsIsRoutedByServerNameUntouched() async throws {
        let (one, two) = (try TestService.echo(), try TestService.echo())
        defer { [one, two].forEach { $0.stop() } }
        let vhost = try freePort()
        let server = try await Harness.server { $0.vhostHTTPSPort = vhost }
        func https(_ name: String, _ port: Int, _ domain: String) -> ProxyConfig {
            var proxy = ProxyConfig(name: name, type: .https)
            proxy.localPort = port
            proxy.customDomains = [domain]
            return proxy
        }
        let client = try await Harness.client(server, proxies: [https("one", one.port, "one.test"), https("two", two.port, "two.test")])
        for name in ["one.test", "two.test"] {
            let hello = SniffTests.clientHello(serverName: name)
            let socket = try TestSocket.connect(port: vhost)
            try socket.send(hello)
            #expect(try socket.receive(exactly: hello.count) == hello)
        }
        let stranger = try TestSocket.connect(port: vhost)
        try stranger.send(SniffTests.clientHello(serverName: "three.test"))
        #expect(try stranger.receiveAll().isEmpty)
        await client.stop()
        await server.stop()
    }

    @Test func stcpNeedsTheSecretKey() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let owner = try await Harness.client(server, proxies: [Harness.stcp("secret-echo", local: echo.port, key: "opensesame")])
        let good = try Harness.visitor("v1", of: "secret-echo", key: "opensesame")
        let bad = try Harness.visitor("v2", of: "secret-echo", key: "guess")
        let visitor = try await Harness.client(server, visitors: [good, bad])
        try await Task.sleep(for: .milliseconds(200))
        #expect(try Harness.echoRoundTrip(port: good.bindPort, Harness.randomData(1 << 20)))
        let refused = try TestSocket.connect(port: bad.bindPort)
        try? refused.send("hello")
        // Closed on us; a reset is fine too (the visitor did not read what was sent).
        #expect(((try? refused.receiveAll()) ?? []).isEmpty)
        await visitor.stop()
        await owner.stop()
        await server.stop()
    }

    @Test func aFloodOfRefusedStreamOpensCutsTheClientOffAlone() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server()
        let remote = try freePort()
        let owner = try await Harness.client(
            server, proxies: [Harness.stcp("secret-echo", local: echo.port, key: "opensesame"), Harness.tcp("echo", local: echo.port, remote: remote)])
        let bad = try Harness.visitor("guesser", of: "secret-echo", key: "guess")
        let visitor = try await Harness.client(server, visitors: [bad])
        func visitorAddress() async throws -> String? {
            try await server.status().clients.first { $0.proxies.isEmpty }?.address
        }
        let before = try #require(try await visitorAddress())
        // Each connection to the visitor opens a stream the server refuses; past the limit the
        // server closes the visitor's whole session.
        for _ in 0...MuxSession.maxRefusedOpens {
            let socket = try TestSocket.connect(port: bad.bindPort)
            try? socket.send("guess")
            // Closed on us; a reset is fine too (the visitor did not read what was sent).
            #expect(((try? socket.receiveAll()) ?? []).isEmpty)
        }
        var after: String?
        for _ in 0..<100 {
            after = try await visitorAddress()
            if let after, after != before { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(after != nil && after != before, "the visitor was cut off and came back with a new session")
        // The owner, on the same server, never noticed.
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(100_000)))
        #expect(try await owner.isConnected())
        await visitor.stop()
        await owner.stop()
        await server.stop()
    }

    @Test func udpProxyCarriesDatagramsBothWays() async throws {
        let echo = try UDPEchoService()
        let server = try await Harness.server()
        let remote = try freePort()
        var proxy = ProxyConfig(name: "dns", type: .udp)
        proxy.localPort = echo.port
        proxy.remotePort = remote
        let client = try await Harness.client(server, proxies: [proxy])
        for size in [1, 512, 1400, 9000] {
            let payload = Harness.randomData(size)
            #expect(try UDPEchoService.roundTrip(payload, port: remote) == payload)
        }
        await client.stop()
        await server.stop()
    }

    @Test func proxyProtocolTellsTheServiceWhoConnected() async throws {
        let received = LockedBytes()
        let service = try TestService { socket in
            received.set((try? socket.receive(exactly: 28 + 4)) ?? [])
        }
        defer { service.stop() }
        let server = try await Harness.server()
        let remote = try freePort()
        let client = try await Harness.client(
            server, proxies: [Harness.tcp("pp", local: service.port, remote: remote) { $0.proxyProtocolVersion = 2 }])
        let socket = try TestSocket.connect(port: remote)
        try socket.send("data")
        _ = try? socket.receiveAll()
        let header = received.get()
        #expect(header.count == 32)
        #expect(Array(header.prefix(12)) == [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
        #expect(Array(header[16..<24]) == [127, 0, 0, 1, 127, 0, 0, 1])
        #expect(Int(header[26]) << 8 | Int(header[27]) == remote)
        #expect(Array(header.suffix(4)) == Array("data".utf8))
        await client.stop()
        await server.stop()
    }

    @Test func aWrongTokenEndsTheClient() async throws {
        let server = try await Harness.server()
        await #expect(throws: LoginFailed.self) {
            _ = try await Harness.client(server) { $0.token = "not-the-token" }
        }
        #expect(try await server.status().clientCount == 0)
        await server.stop()
    }

    @Test func aReplayedLoginIsRefused() async throws {
        let server = try await Harness.server()
        func open() throws -> (TestSocket, Challenge) {
            let socket = try TestSocket.connect(port: server.controlPort)
            var hello = ByteBuffer()
            hello.writeBytes(Challenge.magic)
            hello.writeInteger(Challenge.version)
            var out = ByteBuffer()
            Frame(type: .hello, payload: hello).encode(into: &out)
            try socket.send(Array(out.readableBytesView))
            var inbound = ByteBuffer(bytes: try socket.receive(exactly: Frame.headerSize + 37))
            let frame = try #require(try Frame.decode(from: &inbound))
            return (socket, try Challenge.decode(frame.payload))
        }
        func loginFrame(for challenge: Challenge) -> [UInt8] {
            let nonce = randomBytes(32)
            let mac = TunnelAuth.loginMAC(token: "tok", serverNonce: challenge.nonce, clientNonce: nonce)
            let login = LoginRequest(
                version: 1, user: "", hostname: "h", runID: "", clientNonce: nonce.base64, mac: mac.base64, poolCount: 1)
            var out = ByteBuffer()
            Frame(type: .login, payload: encodeJSON(login)).encode(into: &out)
            return Array(out.readableBytesView)
        }
        func result(_ socket: TestSocket) throws -> LoginResult {
            var inbound = ByteBuffer(bytes: try socket.receive(exactly: Frame.headerSize))
            let length = Int(inbound.getInteger(at: 6, as: UInt32.self) ?? 0)
            inbound.writeBytes(try socket.receive(exactly: length))
            let frame = try #require(try Frame.decode(from: &inbound))
            return try decodeJSON(LoginResult.self, frame.payload, what: "result")
        }
        let (first, challenge) = try open()
        let recorded = loginFrame(for: challenge)
        try first.send(recorded)
        #expect(try result(first).ok)
        // The same bytes, seen on the wire and sent again on a new connection, get nowhere.
        let (second, _) = try open()
        try second.send(recorded)
        let replay = try result(second)
        #expect(!replay.ok && replay.error == "authentication failed")
        #expect(try second.receiveAll().isEmpty)
        await server.stop()
    }

    @Test func aPortOutsideAllowPortsIsRefused() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let allowed = try freePort()
        let server = try await Harness.server { $0.allowPorts = [PortRange(allowed, allowed)] }
        let outside = allowed == 65000 ? 65001 : 65000
        let client = try await Harness.client(
            server,
            proxies: [Harness.tcp("in", local: echo.port, remote: allowed), Harness.tcp("out", local: echo.port, remote: outside)])
        let states = try await client.proxyStates()
        #expect(states["in"] == .running(remoteAddr: ":\(allowed)"))
        #expect(states["out"] == .refused("port \(outside) is not allowed by the server's allowPorts"))
        #expect(try Harness.echoRoundTrip(port: allowed, Array("ok".utf8)))
        await client.stop()
        await server.stop()
    }

    @Test func maxPortsPerClientCapsAClient() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server { $0.maxPortsPerClient = 1 }
        let (first, second) = (try freePort(), try freePort())
        let client = try await Harness.client(
            server, proxies: [Harness.tcp("one", local: echo.port, remote: first), Harness.tcp("two", local: echo.port, remote: second)])
        let states = try await client.proxyStates()
        let refused = ProxyState.refused("the client already uses its 1 ports (maxPortsPerClient)")
        #expect([states["one"], states["two"]].filter { $0 == refused }.count == 1)
        await client.stop()
        await server.stop()
    }

    @Test func theClientComesBackAfterAServerRestart() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let control = try freePort()
        let remote = try freePort()
        let first = try await Harness.server { $0.bindPort = control }
        let client = try await Harness.client(first, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)])
        #expect(try Harness.echoRoundTrip(port: remote, Array("before".utf8)))
        await first.stop()
        try await Task.sleep(for: .milliseconds(300))
        let second = try await Harness.server { $0.bindPort = control }
        var back = false
        for _ in 0..<100 where !back {
            try await Task.sleep(for: .milliseconds(100))
            back = try await client.proxyStates()["echo"] == .running(remoteAddr: ":\(remote)")
        }
        #expect(back)
        #expect(try Harness.echoRoundTrip(port: remote, Array("after".utf8)))
        #expect(try await second.status().clientCount == 1)
        await client.stop()
        await second.stop()
    }

    @Test func garbageAndSilentClientsAreCutOffAlone() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server { $0.loginTimeout = 1 }
        let remote = try freePort()
        let client = try await Harness.client(server, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)])
        let garbage = try TestSocket.connect(port: server.controlPort)
        try garbage.send(Array(repeating: 0xEE, count: 4096))
        // Closed on us (a reset is fine too: the server did not read what was sent).
        #expect(((try? garbage.receiveAll()) ?? []).isEmpty)
        let silent = try TestSocket.connect(port: server.controlPort, timeout: 5)
        let started = Date()
        #expect(try silent.receiveAll().isEmpty)
        #expect(Date().timeIntervalSince(started) < 8)
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(100_000)))
        await client.stop()
        await server.stop()
    }

    @Test func statusAPIAndMetrics() async throws {
        let web = try freePort()
        let server = try await Harness.server {
            $0.webServerPort = web
            $0.enablePrometheus = true
            $0.webServerUser = "admin"
            $0.webServerPassword = "pw"
        }
        let echo = try TestService.echo()
        defer { echo.stop() }
        let remote = try freePort()
        let client = try await Harness.client(server, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)])
        #expect(try Harness.echoRoundTrip(port: remote, Array("count me".utf8)))
        func get(_ path: String, auth: Bool = true) throws -> String {
            let socket = try TestSocket.connect(port: web)
            let credentials = Data("admin:pw".utf8).base64EncodedString()
            try socket.send(
                "GET \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\(auth ? "Authorization: Basic \(credentials)\r\n" : "")\r\n")
            return String(decoding: try socket.receiveAll(), as: UTF8.self)
        }
        #expect(try get("/api/status", auth: false).contains("401"))
        let status = try get("/api/status")
        #expect(status.contains("\"clientCount\" : 1") && status.contains("\"name\" : \"echo\""))
        let metrics = try get("/metrics")
        #expect(metrics.contains("frp_server_traffic_in{name=\"echo\",type=\"tcp\"} 8"))
        #expect(metrics.contains("frp_server_client_counts 1"))
        #expect(try get("/").contains("<title>nimbus-tunnel</title>"))
        await client.stop()
        await server.stop()
    }

    @Test func tlsSessionsWithASelfSignedServer() async throws {
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server { $0.tlsForce = true }
        let remote = try freePort()
        let client = try await Harness.client(server, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)]) {
            $0.tlsEnable = true
        }
        #expect(try Harness.echoRoundTrip(port: remote, Harness.randomData(1 << 20)))
        await #expect(throws: LoginFailed.self) {
            _ = try await Harness.client(server) { $0.tlsEnable = false }
        }
        await client.stop()
        await server.stop()
    }
}

extension LoopbackTests {
    /// Runs openssl with `arguments` in `directory`.
    static func openssl(_ arguments: [String], in directory: URL) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        process.currentDirectoryURL = directory
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw SocketFailure(description: "openssl \(arguments.joined(separator: " ")) failed")
        }
    }

    /// A CA and a server and a client certificate signed by it, made with the openssl CLI.
    static func makeCertificates() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tunnel-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        try openssl(["req", "-x509"] + key + ["-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem"], in: directory)
        try "subjectAltName=DNS:tunnel.test\n".write(to: directory.appendingPathComponent("san.ext"), atomically: true, encoding: .utf8)
        for name in ["server", "client"] {
            try openssl(["req"] + key + ["-subj", "/CN=\(name)", "-keyout", "\(name).key", "-out", "\(name).csr"], in: directory)
            try openssl(
                [
                    "x509", "-req", "-in", "\(name).csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
                    "-extfile", "san.ext", "-out", "\(name).pem",
                ], in: directory)
        }
        return directory
    }

    @Test func mutualTLSWithACAFile() async throws {
        let directory = try Self.makeCertificates()
        defer { try? FileManager.default.removeItem(at: directory) }
        func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
        let echo = try TestService.echo()
        defer { echo.stop() }
        let server = try await Harness.server {
            $0.tlsForce = true
            $0.tls = TLSFiles(certFile: path("server.pem"), keyFile: path("server.key"), trustedCaFile: path("ca.pem"))
        }
        let remote = try freePort()
        let client = try await Harness.client(server, proxies: [Harness.tcp("echo", local: echo.port, remote: remote)]) {
            $0.tlsEnable = true
            $0.tls = TLSFiles(
                certFile: path("client.pem"), keyFile: path("client.key"), trustedCaFile: path("ca.pem"), serverName: "tunnel.test")
        }
        #expect(try Harness.echoRoundTrip(port: remote, Array("mutual".utf8)))
        // No client certificate: the handshake fails and the login with it.
        await #expect(throws: LoginFailed.self) {
            _ = try await Harness.client(server) { $0.tlsEnable = true }
        }
        // The client checks the server against its CA and name.
        await #expect(throws: LoginFailed.self) {
            _ = try await Harness.client(server) {
                $0.tlsEnable = true
                $0.tls = TLSFiles(
                    certFile: path("client.pem"), keyFile: path("client.key"), trustedCaFile: path("ca.pem"),
                    serverName: "other.test")
            }
        }
        await client.stop()
        await server.stop()
    }
}

final class LockedBytes: @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []
    func set(_ value: [UInt8]) {
        lock.lock()
        bytes = value
        lock.unlock()
    }
    func get() -> [UInt8] {
        lock.lock()
        defer { lock.unlock() }
        return bytes
    }
}
