// VMM (layer 3): Firecracker's REST API over HTTP/1.1 on a Unix socket (SwiftNIO), handing each
// request to `VMMController`.
import LinuxSystem
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix

final class APIHandler: ChannelInboundHandler, @unchecked Sendable {
    // SAFETY (Sendable): NIO confines a handler to its channel's event loop.
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    static let maxBody = 1 << 20
    let controller: VMMController
    let logger: Logger
    var head: HTTPRequestHead?
    var body: [UInt8] = []
    var tooLarge = false

    init(controller: VMMController, logger: Logger) {
        self.controller = controller
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body = []
            tooLarge = false
        case .body(var buffer):
            if body.count + buffer.readableBytes > Self.maxBody {
                tooLarge = true
            } else if let bytes = buffer.readBytes(length: buffer.readableBytes) {
                body += bytes
            }
        case .end:
            guard let head else { return }
            self.head = nil
            let path = String(head.uri.split(separator: "?", maxSplits: 1).first ?? "")
            let response: APIResponse
            if tooLarge {
                response = .fault("request body is larger than \(Self.maxBody) bytes")
            } else {
                response = controller.handle(method: head.method.rawValue, path: path, body: body)
            }
            logger.info("API \(head.method.rawValue) \(path) -> \(response.status)")
            write(response, keepAlive: head.isKeepAlive, context: context)
        }
    }

    func write(_ response: APIResponse, keepAlive: Bool, context: ChannelHandlerContext) {
        let payload = response.body.map { Array($0.serialized().utf8) } ?? []
        var headers = HTTPHeaders()
        headers.add(name: "Server", value: "Nimbus API")
        headers.add(name: "Content-Length", value: String(payload.count))
        if !payload.isEmpty { headers.add(name: "Content-Type", value: "application/json") }
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let status = HTTPResponseStatus(statusCode: response.status)
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if !payload.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: payload.count)
            buffer.writeBytes(payload)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive { done.assumeIsolated().whenComplete { _ in context.close(promise: nil) } }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.info("API connection error: \(error)")
        context.close(promise: nil)
    }
}

/// The API socket server.
public final class APIServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channel: any Channel
    public let socketPath: String

    /// Binds `socketPath` (replacing a stale socket file) and serves `controller`.
    public init(socketPath: String, controller: VMMController, logger: Logger) throws {
        try UnixSocketPath.removeStale(socketPath)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            channel = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 16)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        try channel.pipeline.syncOperations.addHandler(APIHandler(controller: controller, logger: logger))
                    }
                }
                .bind(unixDomainSocketPath: socketPath)
                .wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw ConfigError("cannot serve the API on \(socketPath): \(error)")
        }
        self.group = group
        self.socketPath = socketPath
    }

    public func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        UnixSocketPath.remove(socketPath)
    }
}
