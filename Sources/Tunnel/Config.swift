// Tunnel layer: frps.toml / frpc.toml, read with frp's own key names. Every key is checked: a key
// Nimbus does not know, or a feature it does not implement, is named in the error instead of being
// silently ignored.
import Foundation
import TOMLKit

/// A configuration file could not be used.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// TLS material for one side of the control connection (`transport.tls.*`).
public struct TLSFiles: Sendable, Equatable {
    public var certFile: String?
    public var keyFile: String?
    public var trustedCaFile: String?
    public var serverName: String?
    public init(certFile: String? = nil, keyFile: String? = nil, trustedCaFile: String? = nil, serverName: String? = nil) {
        self.certFile = certFile
        self.keyFile = keyFile
        self.trustedCaFile = trustedCaFile
        self.serverName = serverName
    }
}

/// A range of ports a server lets clients listen on (`allowPorts`).
public struct PortRange: Sendable, Equatable {
    public var lower: Int
    public var upper: Int
    public init(_ lower: Int, _ upper: Int) {
        self.lower = lower
        self.upper = upper
    }
    public func contains(_ port: Int) -> Bool { port >= lower && port <= upper }
}

/// `frps.toml`: the public side.
public struct ServerConfig: Sendable, Equatable {
    public var bindAddr = "0.0.0.0"
    public var bindPort = 7000
    public var proxyBindAddr: String?
    public var token = ""
    public var vhostHTTPPort = 0
    public var vhostHTTPSPort = 0
    public var subDomainHost = ""
    public var allowPorts: [PortRange] = []
    public var maxPortsPerClient = 0
    public var maxPoolCount = 5
    public var heartbeatTimeout = 90
    public var tlsForce = false
    public var tls = TLSFiles()
    public var webServerAddr = "127.0.0.1"
    public var webServerPort = 0
    public var webServerUser = ""
    public var webServerPassword = ""
    public var enablePrometheus = false
    /// Nimbus's own cap on concurrent proxied connections across the server (0: 65536).
    public var maxConnections = 0
    /// Seconds a new control connection has to finish its login.
    public var loginTimeout = 10
    public var logLevel = "info"

    public init() {}

    /// The address proxies listen on.
    public var effectiveProxyBindAddr: String { proxyBindAddr ?? bindAddr }
    public var connectionCap: Int { maxConnections > 0 ? maxConnections : 65536 }

    public func allows(port: Int) -> Bool {
        allowPorts.isEmpty || allowPorts.contains { $0.contains(port) }
    }
}

/// One `[[proxies]]` entry of `frpc.toml`.
public struct ProxyConfig: Sendable, Equatable, Codable {
    public enum Kind: String, Sendable, Codable, CaseIterable { case tcp, udp, http, https, stcp }
    public var name: String
    public var type: Kind
    public var localIP = "127.0.0.1"
    public var localPort = 0
    public var remotePort = 0
    public var customDomains: [String] = []
    public var subdomain = ""
    public var locations: [String] = []
    public var hostHeaderRewrite = ""
    public var secretKey = ""
    public var useCompression = false
    /// 0: off, 1 or 2: PROXY protocol version written before the stream's data.
    public var proxyProtocolVersion = 0
    /// Bytes per second, 0 for no limit.
    public var bandwidthLimit = 0

    public init(name: String, type: Kind) {
        self.name = name
        self.type = type
    }
}

/// One `[[visitors]]` entry of `frpc.toml` (stcp only).
public struct VisitorConfig: Sendable, Equatable {
    public var name: String
    public var serverName = ""
    public var secretKey = ""
    public var bindAddr = "127.0.0.1"
    public var bindPort = 0
    public init(name: String) { self.name = name }
}

/// `frpc.toml`: the side behind NAT.
public struct ClientConfig: Sendable, Equatable {
    public var serverAddr = "0.0.0.0"
    public var serverPort = 7000
    public var token = ""
    public var user = ""
    public var tlsEnable = true
    public var tls = TLSFiles()
    public var poolCount = 1
    public var loginFailExit = true
    public var heartbeatInterval = 30
    public var heartbeatTimeout = 90
    public var proxies: [ProxyConfig] = []
    public var visitors: [VisitorConfig] = []
    public var logLevel = "info"
    public init() {}
}

// MARK: - Reading

/// Walks a TOML table, handing out typed values and remembering which keys were used, so that
/// whatever is left over can be reported.
struct TableReader {
    let table: TOMLTable
    let path: String
    private(set) var used: Set<String> = []

    init(_ table: TOMLTable, path: String) {
        self.table = table
        self.path = path
    }

    func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    mutating func string(_ key: String) throws -> String? {
        guard let value = table[key] else { return nil }
        used.insert(key)
        guard let string = value.string else { throw ConfigError("\(name(key)) must be a string") }
        return string
    }

    mutating func int(_ key: String, in range: ClosedRange<Int>? = nil) throws -> Int? {
        guard let value = table[key] else { return nil }
        used.insert(key)
        guard let int = value.int else { throw ConfigError("\(name(key)) must be an integer") }
        if let range, !range.contains(int) {
            throw ConfigError("\(name(key)) must be between \(range.lowerBound) and \(range.upperBound), not \(int)")
        }
        return int
    }

    mutating func bool(_ key: String) throws -> Bool? {
        guard let value = table[key] else { return nil }
        used.insert(key)
        guard let bool = value.bool else { throw ConfigError("\(name(key)) must be true or false") }
        return bool
    }

    mutating func strings(_ key: String) throws -> [String]? {
        guard let value = table[key] else { return nil }
        used.insert(key)
        guard let array = value.array else { throw ConfigError("\(name(key)) must be an array of strings") }
        return try array.map {
            guard let string = $0.string else { throw ConfigError("\(name(key)) must be an array of strings") }
            return string
        }
    }

    mutating func table(_ key: String) throws -> TableReader? {
        guard let value = table[key] else { return nil }
        used.insert(key)
        guard let sub = value.table else { throw ConfigError("\(name(key)) must be a table") }
        return TableReader(sub, path: name(key))
    }

    mutating func tables(_ key: String) throws -> [TableReader] {
        guard let value = table[key] else { return [] }
        used.insert(key)
        guard let array = value.array else { throw ConfigError("\(name(key)) must be an array of tables ([[\(key)]])") }
        return try array.enumerated().map { index, element in
            guard let sub = element.table else { throw ConfigError("\(name(key))[\(index)] must be a table") }
            return TableReader(sub, path: "\(name(key))[\(index)]")
        }
    }

    /// Marks a key as accepted without reading it (options with no effect here, such as log files).
    mutating func accept(_ key: String) { if table[key] != nil { used.insert(key) } }

    /// Throws for the first key that was not read, saying whether Nimbus lacks the feature.
    func finish(unsupported: [String: String] = [:]) throws {
        for key in table.keys.sorted() where !used.contains(key) {
            if let why = unsupported[key] {
                throw ConfigError("\(name(key)) is not supported by nimbus-tunnel: \(why)")
            }
            throw ConfigError("unknown key \(name(key))")
        }
    }
}

private func parseTOML(_ text: String, file: String) throws -> TOMLTable {
    do {
        return try TOMLTable(string: text)
    } catch let error as TOMLParseError {
        throw ConfigError("\(file): line \(error.source.begin.line), column \(error.source.begin.column): \(error.description)")
    }
}

private let portRange = 0...65535

/// Reads `transport.tls` certificate keys shared by both sides.
private func readTLSFiles(_ tls: inout TableReader) throws -> TLSFiles {
    TLSFiles(
        certFile: try tls.string("certFile"), keyFile: try tls.string("keyFile"),
        trustedCaFile: try tls.string("trustedCaFile"), serverName: try tls.string("serverName"))
}

private func readAuth(_ root: inout TableReader) throws -> String {
    guard var auth = try root.table("auth") else { return "" }
    if let method = try auth.string("method"), method != "token" {
        throw ConfigError("auth.method \"\(method)\" is not supported by nimbus-tunnel: only \"token\" is")
    }
    let token = try auth.string("token") ?? ""
    try auth.finish(unsupported: [
        "oidc": "only token authentication is implemented",
        "additionalScopes": "heartbeats and work streams travel inside the authenticated session already",
        "tokenSource": "put the token in auth.token",
    ])
    return token
}

private func readLog(_ root: inout TableReader) throws -> String {
    guard var log = try root.table("log") else { return "info" }
    let level = try log.string("level") ?? "info"
    guard ["trace", "debug", "info", "warn", "error"].contains(level) else {
        throw ConfigError("log.level must be trace, debug, info, warn or error, not \"\(level)\"")
    }
    log.accept("to")
    log.accept("maxDays")
    log.accept("disablePrintColor")
    try log.finish()
    return level
}

extension ServerConfig {
    /// Parses `frps.toml` text.
    public static func parse(_ text: String, file: String = "server config") throws -> ServerConfig {
        var root = TableReader(try parseTOML(text, file: file), path: "")
        var config = ServerConfig()
        config.bindAddr = try root.string("bindAddr") ?? config.bindAddr
        config.bindPort = try root.int("bindPort", in: 1...65535) ?? config.bindPort
        config.proxyBindAddr = try root.string("proxyBindAddr")
        config.vhostHTTPPort = try root.int("vhostHTTPPort", in: portRange) ?? 0
        config.vhostHTTPSPort = try root.int("vhostHTTPSPort", in: portRange) ?? 0
        config.subDomainHost = try root.string("subDomainHost") ?? ""
        config.maxPortsPerClient = try root.int("maxPortsPerClient", in: 0...65535) ?? 0
        config.enablePrometheus = try root.bool("enablePrometheus") ?? false
        config.maxConnections = try root.int("maxConnections", in: 0...1_000_000) ?? 0
        config.token = try readAuth(&root)
        config.logLevel = try readLog(&root)
        for (index, var entry) in try root.tables("allowPorts").enumerated() {
            if let single = try entry.int("single", in: portRange) {
                config.allowPorts.append(PortRange(single, single))
            } else if let start = try entry.int("start", in: portRange) {
                let end = try entry.int("end", in: portRange) ?? start
                guard end >= start else { throw ConfigError("allowPorts[\(index)]: end \(end) is below start \(start)") }
                config.allowPorts.append(PortRange(start, end))
            } else {
                throw ConfigError("allowPorts[\(index)] needs single = PORT or start = PORT, end = PORT")
            }
            try entry.finish()
        }
        if var transport = try root.table("transport") {
            config.maxPoolCount = try transport.int("maxPoolCount", in: 0...1024) ?? config.maxPoolCount
            config.heartbeatTimeout = try transport.int("heartbeatTimeout", in: -1...86400) ?? config.heartbeatTimeout
            transport.accept("tcpMux")
            transport.accept("tcpKeepalive")
            transport.accept("tcpMuxKeepaliveInterval")
            if var tls = try transport.table("tls") {
                config.tlsForce = try tls.bool("force") ?? false
                config.tls = try readTLSFiles(&tls)
                try tls.finish()
            }
            config.loginTimeout = try transport.int("loginTimeout", in: 1...3600) ?? config.loginTimeout
            try transport.finish(unsupported: [
                "quic": "the control connection is TCP (optionally TLS) only"
            ])
        }
        if var web = try root.table("webServer") {
            config.webServerAddr = try web.string("addr") ?? config.webServerAddr
            config.webServerPort = try web.int("port", in: portRange) ?? 0
            config.webServerUser = try web.string("user") ?? ""
            config.webServerPassword = try web.string("password") ?? ""
            try web.finish(unsupported: [
                "tls": "serve the dashboard behind a TLS reverse proxy",
                "assetsDir": "the dashboard is built in",
                "pprofEnable": "there is no Go runtime to profile",
            ])
        }
        try root.finish(unsupported: [
            "kcpBindPort": "KCP transport is not implemented",
            "quicBindPort": "QUIC transport is not implemented",
            "tcpmuxHTTPConnectPort": "tcpmux proxies are not implemented",
            "httpPlugins": "server plugins are not implemented",
            "sshTunnelGateway": "the SSH tunnel gateway is not implemented",
            "natholeAnalysisDataReserveHours": "xtcp (P2P) is not implemented",
            "custom404Page": "the built-in 404 page is used",
        ])
        if config.tls.certFile != nil, config.tls.keyFile == nil {
            throw ConfigError("transport.tls.certFile is set but transport.tls.keyFile is not")
        }
        return config
    }

    /// Reads and parses a file.
    public static func load(path: String) throws -> ServerConfig {
        try parse(try readConfigFile(path), file: path)
    }
}

func readConfigFile(_ path: String) throws -> String {
    do {
        return try String(contentsOfFile: path, encoding: .utf8)
    } catch {
        throw ConfigError("cannot read \(path): \(error.localizedDescription)")
    }
}

/// Parses frp's bandwidth strings: `"1MB"`, `"500KB"` (bytes per second).
func parseBandwidth(_ text: String, key: String) throws -> Int {
    let units: [(String, Int)] = [("MB", 1 << 20), ("KB", 1 << 10)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        if let number = Int(text.dropLast(suffix.count)), number > 0 { return number * scale }
    }
    throw ConfigError("\(key) must look like \"500KB\" or \"10MB\", not \"\(text)\"")
}

extension ClientConfig {
    /// Parses `frpc.toml` text.
    public static func parse(_ text: String, file: String = "client config") throws -> ClientConfig {
        var root = TableReader(try parseTOML(text, file: file), path: "")
        var config = ClientConfig()
        config.serverAddr = try root.string("serverAddr") ?? config.serverAddr
        config.serverPort = try root.int("serverPort", in: 1...65535) ?? config.serverPort
        config.user = try root.string("user") ?? ""
        config.loginFailExit = try root.bool("loginFailExit") ?? true
        config.token = try readAuth(&root)
        config.logLevel = try readLog(&root)
        if var transport = try root.table("transport") {
            if let proto = try transport.string("protocol"), proto != "tcp" {
                throw ConfigError("transport.protocol \"\(proto)\" is not supported by nimbus-tunnel: only \"tcp\" is")
            }
            config.poolCount = try transport.int("poolCount", in: 0...1024) ?? config.poolCount
            config.heartbeatInterval = try transport.int("heartbeatInterval", in: -1...86400) ?? config.heartbeatInterval
            config.heartbeatTimeout = try transport.int("heartbeatTimeout", in: -1...86400) ?? config.heartbeatTimeout
            transport.accept("tcpMux")
            transport.accept("tcpKeepalive")
            transport.accept("dialServerTimeout")
            transport.accept("tcpMuxKeepaliveInterval")
            if var tls = try transport.table("tls") {
                config.tlsEnable = try tls.bool("enable") ?? true
                config.tls = try readTLSFiles(&tls)
                tls.accept("disableCustomTLSFirstByte")
                try tls.finish()
            }
            try transport.finish(unsupported: [
                "proxyURL": "dialing the server through an HTTP or SOCKS proxy is not implemented",
                "quic": "QUIC transport is not implemented",
                "connectServerLocalIP": "binding the outbound connection is not implemented",
            ])
        }
        var names = Set<String>()
        for var entry in try root.tables("proxies") {
            let proxy = try readProxy(&entry)
            guard names.insert(proxy.name).inserted else { throw ConfigError("proxy name \"\(proxy.name)\" is used twice") }
            config.proxies.append(proxy)
        }
        for var entry in try root.tables("visitors") {
            let visitor = try readVisitor(&entry)
            guard names.insert(visitor.name).inserted else { throw ConfigError("name \"\(visitor.name)\" is used twice") }
            config.visitors.append(visitor)
        }
        root.accept("start")
        try root.finish(unsupported: [
            "webServer": "the client has no admin API; the server's dashboard shows its proxies",
            "includes": "put the proxies in this file",
            "metadatas": "login metadata is not implemented",
            "natHoleStunServer": "xtcp (P2P) is not implemented",
            "udpPacketSize": "UDP datagrams of up to 64 KiB are carried as they are",
            "featureGates": "there are no feature gates",
        ])
        return config
    }

    public static func load(path: String) throws -> ClientConfig {
        try parse(try readConfigFile(path), file: path)
    }

    private static func readProxy(_ entry: inout TableReader) throws -> ProxyConfig {
        guard let name = try entry.string("name"), !name.isEmpty else { throw ConfigError("\(entry.path): name is required") }
        let where_ = "proxy \"\(name)\""
        guard let typeName = try entry.string("type") else { throw ConfigError("\(where_): type is required") }
        guard let kind = ProxyConfig.Kind(rawValue: typeName) else {
            throw ConfigError("\(where_): type \"\(typeName)\" is not supported by nimbus-tunnel (tcp, udp, http, https, stcp are)")
        }
        var proxy = ProxyConfig(name: name, type: kind)
        proxy.localIP = try entry.string("localIP") ?? proxy.localIP
        proxy.localPort = try entry.int("localPort", in: portRange) ?? 0
        proxy.remotePort = try entry.int("remotePort", in: portRange) ?? 0
        proxy.customDomains = try entry.strings("customDomains") ?? []
        proxy.subdomain = try entry.string("subdomain") ?? ""
        proxy.locations = try entry.strings("locations") ?? []
        proxy.hostHeaderRewrite = try entry.string("hostHeaderRewrite") ?? ""
        proxy.secretKey = try entry.string("secretKey") ?? ""
        entry.accept("allowUsers")
        if var transport = try entry.table("transport") {
            proxy.useCompression = try transport.bool("useCompression") ?? false
            if let version = try transport.string("proxyProtocolVersion") {
                switch version {
                case "v1": proxy.proxyProtocolVersion = 1
                case "v2": proxy.proxyProtocolVersion = 2
                case "": proxy.proxyProtocolVersion = 0
                default: throw ConfigError("\(where_): transport.proxyProtocolVersion must be \"v1\" or \"v2\", not \"\(version)\"")
                }
            }
            if let limit = try transport.string("bandwidthLimit"), !limit.isEmpty {
                proxy.bandwidthLimit = try parseBandwidth(limit, key: "\(where_): transport.bandwidthLimit")
            }
            if let mode = try transport.string("bandwidthLimitMode"), mode != "client" {
                throw ConfigError("\(where_): transport.bandwidthLimitMode \"\(mode)\" is not supported: the limit is applied by the client")
            }
            // The whole session is inside TLS when transport.tls.enable is set; nothing more to do.
            _ = try transport.bool("useEncryption")
            try transport.finish(unsupported: ["bandwidthLimitMode": "only client mode is implemented"])
        }
        if entry.table["plugin"] != nil {
            throw ConfigError("\(where_): plugin is not supported by nimbus-tunnel")
        }
        if entry.table["healthCheck"] != nil {
            throw ConfigError("\(where_): healthCheck is not supported by nimbus-tunnel")
        }
        entry.accept("annotations")
        entry.accept("metadatas")
        try entry.finish(unsupported: [
            "loadBalancer": "proxy groups are not implemented",
            "requestHeaders": "header rewriting beyond hostHeaderRewrite is not implemented",
            "responseHeaders": "response header rewriting is not implemented",
            "httpUser": "HTTP basic auth on the vhost is not implemented",
            "httpPassword": "HTTP basic auth on the vhost is not implemented",
            "routeByHTTPUser": "routing by HTTP user is not implemented",
        ])
        switch kind {
        case .tcp, .udp:
            guard proxy.localPort > 0 else { throw ConfigError("\(where_): localPort is required") }
        case .http, .https:
            guard proxy.localPort > 0 else { throw ConfigError("\(where_): localPort is required") }
            guard !proxy.customDomains.isEmpty || !proxy.subdomain.isEmpty else {
                throw ConfigError("\(where_): customDomains or subdomain is required for \(kind.rawValue) proxies")
            }
        case .stcp:
            guard proxy.localPort > 0 else { throw ConfigError("\(where_): localPort is required") }
            guard !proxy.secretKey.isEmpty else { throw ConfigError("\(where_): secretKey is required for stcp proxies") }
        }
        if kind == .https, !proxy.locations.isEmpty {
            throw ConfigError("\(where_): locations only apply to http proxies")
        }
        if kind == .udp, proxy.proxyProtocolVersion != 0 {
            throw ConfigError("\(where_): proxyProtocolVersion does not apply to \(kind.rawValue) proxies")
        }
        return proxy
    }

    private static func readVisitor(_ entry: inout TableReader) throws -> VisitorConfig {
        guard let name = try entry.string("name"), !name.isEmpty else { throw ConfigError("\(entry.path): name is required") }
        let where_ = "visitor \"\(name)\""
        let type = try entry.string("type") ?? ""
        guard type == "stcp" else {
            throw ConfigError("\(where_): type \"\(type)\" is not supported by nimbus-tunnel (stcp is)")
        }
        var visitor = VisitorConfig(name: name)
        guard let server = try entry.string("serverName"), !server.isEmpty else {
            throw ConfigError("\(where_): serverName is required")
        }
        visitor.serverName = server
        visitor.secretKey = try entry.string("secretKey") ?? ""
        guard !visitor.secretKey.isEmpty else { throw ConfigError("\(where_): secretKey is required") }
        visitor.bindAddr = try entry.string("bindAddr") ?? visitor.bindAddr
        guard let port = try entry.int("bindPort", in: 1...65535) else { throw ConfigError("\(where_): bindPort is required") }
        visitor.bindPort = port
        entry.accept("serverUser")
        try entry.finish(unsupported: ["transport": "visitor transport options are not implemented"])
        return visitor
    }
}
