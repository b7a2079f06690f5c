// Tunnel layer: the server's status API, dashboard and Prometheus metrics on webServer.port.
// Metric names follow frps's so existing dashboards keep working.
import Foundation
import NIOCore
import NIOHTTP1
import Prometheus

/// What `/api/status` returns.
public struct ServerStatus: Codable, Sendable {
    public struct Client: Codable, Sendable {
        public var runID: String
        public var user: String
        public var hostname: String
        public var address: String
        public var connectedAt: String
        public var proxies: [String]
    }
    public struct Proxy: Codable, Sendable {
        public var name: String
        public var type: String
        public var remotePort: Int
        public var domains: [String]
        public var client: String
        public var connections: Int
        public var trafficIn: Int
        public var trafficOut: Int
    }
    public var version: String
    public var bindPort: Int
    public var vhostHTTPPort: Int
    public var vhostHTTPSPort: Int
    public var clientCount: Int
    public var connections: Int
    public var uptimeSeconds: Int
    public var clients: [Client]
    public var proxies: [Proxy]
}

private func metric(_ name: String, _ help: String, unit: String = "") -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: name, unitName: unit, helpText: help)
}

/// The server's Prometheus registry and its gauges and counters.
final class ServerMetrics {
    let registry = PrometheusCollectorRegistry()
    let clients: Gauge
    let loginFailures: Counter
    private var proxyCounts: [String: Int] = [:]

    init() {
        clients = registry.makeGauge(descriptor: metric("frp_server_client_counts", "Clients logged in"))
        loginFailures = registry.makeCounter(descriptor: metric("nimbus_tunnel_login_failures", "Refused logins", unit: "total"))
    }

    func proxy(name: String, type: String) -> ProxyMetrics {
        let labels = [("name", name), ("type", type)]
        return ProxyMetrics(
            connections: registry.makeGauge(
                descriptor: metric("frp_server_connection_counts", "Open user connections per proxy"), labels: labels),
            trafficIn: registry.makeCounter(descriptor: metric("frp_server_traffic_in", "Bytes from users"), labels: labels),
            trafficOut: registry.makeCounter(descriptor: metric("frp_server_traffic_out", "Bytes to users"), labels: labels))
    }

    func proxyCount(type: String, delta: Int) {
        proxyCounts[type, default: 0] += delta
        registry.makeGauge(descriptor: metric("frp_server_proxy_counts", "Proxies per type"), labels: [("type", type)])
            .set(Int64(proxyCounts[type] ?? 0))
    }
}

final class ProxyMetrics {
    let connectionsGauge: Gauge
    let trafficIn: Counter
    let trafficOut: Counter
    private var open = 0

    init(connections: Gauge, trafficIn: Counter, trafficOut: Counter) {
        connectionsGauge = connections
        self.trafficIn = trafficIn
        self.trafficOut = trafficOut
    }

    func connections(delta: Int) {
        open += delta
        connectionsGauge.set(Int64(open))
    }

    func traffic(in up: Int, out down: Int) {
        if up > 0 { trafficIn.increment(by: Int64(up)) }
        if down > 0 { trafficOut.increment(by: Int64(down)) }
    }
}

/// Serves `/api/status`, `/api/proxy/{type}`, `/metrics` and the dashboard page.
final class StatusHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    unowned let core: ServerCore
    private var head: HTTPRequestHead?

    init(core: ServerCore) { self.core = core }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            respond(context, head)
        }
    }

    private func authorized(_ head: HTTPRequestHead) -> Bool {
        let user = core.config.webServerUser
        let password = core.config.webServerPassword
        guard !user.isEmpty || !password.isEmpty else { return true }
        let expected = "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
        guard let given = head.headers.first(name: "authorization") else { return false }
        return TunnelAuth.equal(Array(given.utf8), Array(expected.utf8))
    }

    private func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead) {
        guard authorized(head) else {
            return send(
                context, head, status: .unauthorized, type: "text/plain", body: Array("unauthorized\n".utf8),
                extra: [("WWW-Authenticate", "Basic realm=\"nimbus-tunnel\"")])
        }
        guard head.method == .GET else {
            return send(context, head, status: .methodNotAllowed, type: "text/plain", body: Array("GET only\n".utf8))
        }
        let path = head.uri.split(separator: "?").first.map(String.init) ?? "/"
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        switch path {
        case "/api/status", "/api/serverinfo":
            let body = (try? encoder.encode(core.status())) ?? Data()
            send(context, head, status: .ok, type: "application/json", body: Array(body))
        case _ where path.hasPrefix("/api/proxy/"):
            let type = String(path.dropFirst("/api/proxy/".count))
            let proxies = core.status().proxies.filter { $0.type == type }
            let body = (try? encoder.encode(ProxyList(proxies: proxies))) ?? Data()
            send(context, head, status: .ok, type: "application/json", body: Array(body))
        case "/metrics":
            guard let metrics = core.metrics else {
                return send(context, head, status: .notFound, type: "text/plain", body: Array("enablePrometheus is off\n".utf8))
            }
            send(context, head, status: .ok, type: "text/plain; version=0.0.4", body: metrics.registry.emitToBuffer())
        case "/", "/index.html":
            send(context, head, status: .ok, type: "text/html; charset=utf-8", body: Array(dashboardPage.utf8))
        default:
            send(context, head, status: .notFound, type: "text/plain", body: Array("not found\n".utf8))
        }
    }

    private func send(
        _ context: ChannelHandlerContext, _ request: HTTPRequestHead, status: HTTPResponseStatus, type: String,
        body: [UInt8], extra: [(String, String)] = []
    ) {
        var headers = HTTPHeaders([("Content-Type", type), ("Content-Length", "\(body.count)")])
        for (name, value) in extra { headers.add(name: name, value: value) }
        let keepAlive = request.isKeepAlive
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive { done.assumeIsolated().whenComplete { _ in context.close(promise: nil) } }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}

private struct ProxyList: Encodable { var proxies: [ServerStatus.Proxy] }

private let dashboardPage = """
    <!doctype html>
    <html><head><meta charset="utf-8"><title>nimbus-tunnel</title>
    <style>
    body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}
    td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f0f0f0}
    </style></head><body>
    <h1>nimbus-tunnel</h1><p id="summary">loading…</p>
    <h2>Clients</h2><table id="clients"></table>
    <h2>Proxies</h2><table id="proxies"></table>
    <script>
    function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
    function table(id,cols,rows){document.getElementById(id).innerHTML='<tr>'+cols.map(c=>'<th>'+c[0]+'</th>').join('')+'</tr>'+
      rows.map(r=>'<tr>'+cols.map(c=>'<td>'+esc(c[1](r))+'</td>').join('')+'</tr>').join('')}
    async function refresh(){const s=await (await fetch('/api/status')).json();
      document.getElementById('summary').textContent=`version ${s.version}, port ${s.bindPort}, ${s.clientCount} clients, ${s.connections} connections, up ${s.uptimeSeconds} s`;
      table('clients',[['run id',c=>c.runID],['host',c=>c.hostname],['address',c=>c.address],['since',c=>c.connectedAt],['proxies',c=>c.proxies.join(', ')]],s.clients);
      table('proxies',[['name',p=>p.name],['type',p=>p.type],['port / domains',p=>p.remotePort||p.domains.join(', ')],['connections',p=>p.connections],['in',p=>p.trafficIn],['out',p=>p.trafficOut]],s.proxies);}
    refresh();setInterval(refresh,2000);
    </script></body></html>
    """
