// The Tunnel layer's pure parts, with no sockets: frp config files, the frame codec, the login
// proofs, the vhost sniffers and the PROXY protocol headers.
import Crypto
import NIOCore
import Testing

@testable import Tunnel

@Suite struct ConfigTests {
    @Test func frpsKeysAreRead() throws {
        let config = try ServerConfig.parse(
            """
            bindAddr = "0.0.0.0"
            bindPort = 7000
            vhostHTTPPort = 8080
            vhostHTTPSPort = 8443
            subDomainHost = "example.com"
            maxPortsPerClient = 3
            enablePrometheus = true
            allowPorts = [ { start = 2000, end = 3000 }, { single = 3001 } ]
            auth.method = "token"
            auth.token = "s3cret"
            transport.maxPoolCount = 10
            transport.tls.force = true
            webServer.addr = "127.0.0.1"
            webServer.port = 7500
            webServer.user = "admin"
            webServer.password = "pw"
            log.level = "warn"
            log.to = "console"
            """)
        #expect(config.bindPort == 7000)
        #expect(config.token == "s3cret")
        #expect(config.allowPorts == [PortRange(2000, 3000), PortRange(3001, 3001)])
        #expect(config.allows(port: 2500) && config.allows(port: 3001) && !config.allows(port: 3002))
        #expect(config.tlsForce && config.enablePrometheus && config.maxPoolCount == 10)
        #expect(config.webServerPort == 7500 && config.webServerUser == "admin")
        #expect(config.subDomainHost == "example.com" && config.maxPortsPerClient == 3)
    }

    @Test func frpcKeysAreRead() throws {
        let config = try ClientConfig.parse(
            """
            serverAddr = "x.example.com"
            serverPort = 7000
            auth.token = "s3cret"
            loginFailExit = false
            transport.tls.enable = false
            transport.poolCount = 5

            [[proxies]]
            name = "ssh"
            type = "tcp"
            localIP = "127.0.0.1"
            localPort = 22
            remotePort = 6000
            transport.useCompression = true
            transport.proxyProtocolVersion = "v2"
            transport.bandwidthLimit = "1MB"

            [[proxies]]
            name = "web"
            type = "http"
            localPort = 80
            customDomains = ["www.example.com"]
            locations = ["/", "/pic"]

            [[proxies]]
            name = "secret"
            type = "stcp"
            secretKey = "abc"
            localPort = 22

            [[visitors]]
            name = "secret_visitor"
            type = "stcp"
            serverName = "secret"
            secretKey = "abc"
            bindAddr = "127.0.0.1"
            bindPort = 9000
            """)
        #expect(config.serverAddr == "x.example.com" && !config.loginFailExit && !config.tlsEnable)
        #expect(config.proxies.map(\.name) == ["ssh", "web", "secret"])
        let ssh = config.proxies[0]
        #expect(ssh.useCompression && ssh.proxyProtocolVersion == 2 && ssh.bandwidthLimit == 1 << 20 && ssh.remotePort == 6000)
        #expect(config.proxies[1].locations == ["/", "/pic"])
        #expect(config.visitors.first?.bindPort == 9000 && config.visitors.first?.serverName == "secret")
    }

    @Test func unknownAndUnsupportedKeysAreNamed() {
        #expect(throws: ConfigError("unknown key bindPrt")) { try ServerConfig.parse("bindPrt = 7000") }
        #expect(throws: ConfigError("kcpBindPort is not supported by nimbus-tunnel: KCP transport is not implemented")) {
            try ServerConfig.parse("kcpBindPort = 7000")
        }
        #expect(throws: ConfigError("bindPort must be an integer")) { try ServerConfig.parse("bindPort = \"x\"") }
        #expect(throws: ConfigError("bindPort must be between 1 and 65535, not 70000")) { try ServerConfig.parse("bindPort = 70000") }
        #expect(throws: ConfigError("proxy \"a\": type \"xtcp\" is not supported by nimbus-tunnel (tcp, udp, http, https, stcp are)")) {
            try ClientConfig.parse("[[proxies]]\nname = \"a\"\ntype = \"xtcp\"\n")
        }
        #expect(throws: ConfigError("proxy \"a\": localPort is required")) {
            try ClientConfig.parse("[[proxies]]\nname = \"a\"\ntype = \"tcp\"\n")
        }
        #expect(throws: ConfigError("proxy \"w\": customDomains or subdomain is required for http proxies")) {
            try ClientConfig.parse("[[proxies]]\nname = \"w\"\ntype = \"http\"\nlocalPort = 80\n")
        }
        #expect(throws: ConfigError("proxy name \"a\" is used twice")) {
            try ClientConfig.parse(
                "[[proxies]]\nname = \"a\"\ntype = \"tcp\"\nlocalPort = 1\n[[proxies]]\nname = \"a\"\ntype = \"tcp\"\nlocalPort = 2\n")
        }
        #expect(throws: ConfigError("proxy \"a\": transport.bandwidthLimit must look like \"500KB\" or \"10MB\", not \"fast\"")) {
            try ClientConfig.parse(
                "[[proxies]]\nname = \"a\"\ntype = \"tcp\"\nlocalPort = 1\ntransport.bandwidthLimit = \"fast\"\n")
        }
        #expect(throws: ConfigError("auth.method \"oidc\" is not supported by nimbus-tunnel: only \"token\" is")) {
            try ClientConfig.parse("auth.method = \"oidc\"")
        }
        #expect(throws: ConfigError.self) { try ServerConfig.parse("bindPort = = 3") }
    }
}

@Suite struct WireTests {
    @Test func framesRoundTripAndWaitForWholeFrames() throws {
        var buffer = ByteBuffer()
        Frame(type: .data, flags: 1, stream: 7, payload: ByteBuffer(string: "hello")).encode(into: &buffer)
        Frame(type: .fin, stream: 7).encode(into: &buffer)
        var partial = buffer.getSlice(at: 0, length: 12) ?? ByteBuffer()
        #expect(try Frame.decode(from: &partial) == nil)
        let first = try #require(try Frame.decode(from: &buffer))
        #expect(first.type == .data && first.flags == 1 && first.stream == 7 && first.payload == ByteBuffer(string: "hello"))
        let second = try #require(try Frame.decode(from: &buffer))
        #expect(second.type == .fin && second.payload.readableBytes == 0)
        #expect(try Frame.decode(from: &buffer) == nil)
    }

    @Test func badFramesAreRefused() {
        var unknown = ByteBuffer(bytes: [99, 0, 0, 0, 0, 1, 0, 0, 0, 0])
        #expect(throws: WireError("unknown frame type 99")) { try Frame.decode(from: &unknown) }
        var huge = ByteBuffer(bytes: [6, 0, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff])
        #expect(throws: WireError.self) { try Frame.decode(from: &huge) }
        #expect(throws: WireError.self) { try Challenge.decode(ByteBuffer(string: "HTTP/1.1 400")) }
        #expect(throws: WireError.self) { try Datagram.decode(ByteBuffer(bytes: [5, 1, 2])) }
        #expect(throws: WireError.self) { try decodeJSON(LoginRequest.self, ByteBuffer(string: "{\"x\":1}"), what: "login") }
    }

    @Test func datagramsRoundTrip() throws {
        let datagram = Datagram(address: [10, 0, 0, 1], port: 5353, data: ByteBuffer(string: "q"))
        #expect(try Datagram.decode(datagram.encode()) == datagram)
    }

    @Test func aLoginProofIsBoundToItsServerNonce() {
        let client = randomBytes(32)
        let first = Challenge.random()
        let second = Challenge.random()
        let mac = TunnelAuth.loginMAC(token: "t", serverNonce: first.nonce, clientNonce: client)
        #expect(TunnelAuth.equal(mac, TunnelAuth.loginMAC(token: "t", serverNonce: first.nonce, clientNonce: client)))
        // A recorded login does not match the next connection's challenge, nor another token.
        #expect(!TunnelAuth.equal(mac, TunnelAuth.loginMAC(token: "t", serverNonce: second.nonce, clientNonce: client)))
        #expect(!TunnelAuth.equal(mac, TunnelAuth.loginMAC(token: "u", serverNonce: first.nonce, clientNonce: client)))
        // The proofs are HMAC-SHA256 over a label and both nonces.
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: Array("t".utf8)))
        hmac.update(data: Array("nimbus-tunnel login v1".utf8) + [0] + first.nonce + client)
        #expect(Array(hmac.finalize()) == mac)
    }
}

@Suite struct SniffTests {
    @Test func httpHeadsAreRoutedAndRewritten() throws {
        let request = Array("GET /pic/a.png?x=1 HTTP/1.1\r\nHost: WWW.Example.com:8080\r\nX-Forwarded-For: 1.1.1.1\r\n\r\nBODY".utf8)
        #expect(HTTPHead.parse(Array(request[0..<20])) == nil)
        let head = try #require(try HTTPHead.parse(request)?.get())
        #expect(head.host == "www.example.com" && head.path == "/pic/a.png" && head.length == request.count - 4)
        let rewritten = String(decoding: head.rewritten(forwardedFor: "9.9.9.9", hostRewrite: "inner"), as: UTF8.self)
        #expect(rewritten.contains("X-Forwarded-For: 1.1.1.1, 9.9.9.9\r\n"))
        #expect(rewritten.contains("Host: inner\r\n") && rewritten.contains("X-Real-IP: 9.9.9.9\r\n"))
        #expect(rewritten.hasSuffix("\r\n\r\n"))
        guard case .failure = HTTPHead.parse(Array("\u{16}\u{3}\u{1}garbage\r\n\r\n".utf8)) else {
            Issue.record("garbage parsed as HTTP")
            return
        }
    }

    /// A minimal TLS 1.2 ClientHello with one server_name extension.
    static func clientHello(serverName: String) -> [UInt8] {
        let name = Array(serverName.utf8)
        let serverNameList: [UInt8] = [0] + be16(name.count) + name
        let sniExtension: [UInt8] = be16(0) + be16(serverNameList.count + 2) + be16(serverNameList.count) + serverNameList
        var body: [UInt8] = [3, 3] + [UInt8](repeating: 7, count: 32) + [0]
        body += be16(2) + [0x13, 0x01] + [1, 0]
        body += be16(sniExtension.count) + sniExtension
        let handshake: [UInt8] = [1, 0] + be16(body.count) + body
        return [0x16, 3, 1] + be16(handshake.count) + handshake
    }

    static func be16(_ value: Int) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xff)] }

    @Test func sniIsFoundInAClientHello() throws {
        let hello = Self.clientHello(serverName: "Secure.Example.com")
        #expect(sniffSNI(Array(hello[0..<10])) == nil)
        #expect(try sniffSNI(hello)?.get() == "secure.example.com")
        guard case .failure = sniffSNI(Array("GET / HTTP/1.1\r\n".utf8)) else {
            Issue.record("HTTP taken for TLS")
            return
        }
        // Truncated inner lengths are reported, never read past.
        var broken = hello
        broken[broken.count - 3] = 0xff
        guard case .failure = sniffSNI(broken) else {
            Issue.record("a broken ClientHello was accepted")
            return
        }
    }

    @Test func proxyProtocolHeaders() {
        let endpoints = ProxyEndpoints(sourceAddress: "192.168.1.2", sourcePort: 51000, destinationAddress: "10.0.0.1", destinationPort: 80)
        #expect(String(decoding: proxyProtocolHeader(version: 1, endpoints), as: UTF8.self) == "PROXY TCP4 192.168.1.2 10.0.0.1 51000 80\r\n")
        let v2 = proxyProtocolHeader(version: 2, endpoints)
        #expect(v2.count == 16 + 12)
        #expect(Array(v2[12..<16]) == [0x21, 0x11, 0, 12])
        #expect(Array(v2[16..<24]) == [192, 168, 1, 2, 10, 0, 0, 1])
        #expect(Array(v2[24..<28]) == [0xc7, 0x38, 0, 80])
        #expect(parseIPAddress("::1") == [UInt8](repeating: 0, count: 15) + [1])
        #expect(parseIPAddress("2001:db8::ff00:42:8329")?.count == 16)
        #expect(parseIPAddress("300.1.1.1") == nil)
    }
}
