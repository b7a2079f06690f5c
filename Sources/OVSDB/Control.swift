// OVSDB layer: the control socket that `ovs-appctl -t SOCKET COMMAND [ARG...]` talks to (OVS's
// "unixctl"): JSON-RPC 1.0 over a Unix stream socket. Each request names a command and carries its
// arguments as strings; the reply's result is the command's text output, or its error the message
// ovs-appctl prints before it exits with status 2. Commands are registered by the daemon.
import Logging
import NIOCore
import NIOPosix

/// A command's failure, reported to ovs-appctl as the reply's error.
public struct ControlError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One ovs-appctl command.
public struct ControlCommand: Sendable {
    /// The arguments as `list-commands` shows them, for example "[BRIDGE]".
    public var usage: String
    public var minArguments: Int
    public var maxArguments: Int
    /// Runs on the server's event loop; the future's value is the text ovs-appctl prints.
    public var run: @Sendable ([String]) -> EventLoopFuture<String>

    public init(usage: String = "", arguments: ClosedRange<Int> = 0...0, run: @escaping @Sendable ([String]) -> EventLoopFuture<String>) {
        self.usage = usage
        minArguments = arguments.lowerBound
        maxArguments = arguments.upperBound
        self.run = run
    }
}

public final class ControlServer: Sendable {
    private let channel: Channel

    private init(channel: Channel) { self.channel = channel }

    /// Listens on `path` (an existing socket file there is replaced). `list-commands` and
    /// `version` are added to `commands`.
    public static func start(
        path: String, loop: EventLoop, version: String, commands: [String: ControlCommand], logger: Logger
    ) async throws -> ControlServer {
        var all = commands
        all["version"] = ControlCommand { _ in loop.makeSucceededFuture(version + "\n") }
        let listing = all.keys.sorted().map { name in "  \(name)\(all[name].map { $0.usage.isEmpty ? "" : " " + $0.usage } ?? "")\n" }
        all["list-commands"] = ControlCommand { _ in loop.makeSucceededFuture("The available commands are:\n" + listing.joined()) }
        let table = all
        do {
            let channel = try await ServerBootstrap(group: loop)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ControlSession(commands: table, logger: logger))
                    }
                }
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            logger.info("control socket (ovs-appctl -t \(path)) listening")
            return ControlServer(channel: channel)
        } catch {
            throw ControlError("cannot listen on the control socket \(path): \(error)")
        }
    }

    public func stop() async { try? await channel.close() }
}

/// One ovs-appctl connection: requests in, one reply each, in order.
final class ControlSession: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let commands: [String: ControlCommand]
    private let logger: Logger
    private var framer = JSONFramer(maxMessage: 1 << 20)

    init(commands: [String: ControlCommand], logger: Logger) {
        self.commands = commands
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            for message in try framer.messages(in: unwrapInboundIn(data)) { handle(message, context: context) }
        } catch {
            logger.info("closing a control connection: \(error)")
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    private func handle(_ message: JSON, context: ChannelHandlerContext) {
        guard let method = message["method"]?.stringValue else { return }  // a reply: nothing to do
        let id = message["id"] ?? .null
        let outcome: EventLoopFuture<String>
        switch Self.validate(method, message["params"], commands: commands) {
        case .failure(let error): outcome = context.eventLoop.makeFailedFuture(error)
        case .success(let (command, arguments)): outcome = command.run(arguments)
        }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        outcome.whenComplete { result in
            let (session, context) = bound.value
            // Texts end with a newline, as ovs-vswitchd's do (ovs-appctl prints them as they are).
            func line(_ text: String) -> JSON { .string(text.isEmpty || text.hasSuffix("\n") ? text : text + "\n") }
            switch result {
            case .success(let text): session.write(.object(["id": id, "result": line(text), "error": .null]), context: context)
            case .failure(let error):
                let message = (error as? ControlError)?.message ?? "\(error)"
                session.write(.object(["id": id, "result": .null, "error": line(message)]), context: context)
            }
        }
    }

    /// The command and its string arguments, or the error ovs-appctl shows (OVS's wording).
    static func validate(_ method: String, _ params: JSON?, commands: [String: ControlCommand]) -> Result<(ControlCommand, [String]), ControlError> {
        guard let command = commands[method] else {
            return .failure(ControlError("\"\(method)\" is not a valid command (use \"list-commands\" to see a list of valid commands)"))
        }
        var arguments: [String] = []
        for param in params?.arrayValue ?? [] {
            guard let text = param.stringValue else { return .failure(ControlError("\"\(method)\" command has non-string argument")) }
            arguments.append(text)
        }
        if arguments.count < command.minArguments {
            return .failure(ControlError("\"\(method)\" command requires at least \(command.minArguments) arguments"))
        }
        if arguments.count > command.maxArguments {
            return .failure(ControlError("\"\(method)\" command takes at most \(command.maxArguments) arguments"))
        }
        return .success((command, arguments))
    }

    private func write(_ message: JSON, context: ChannelHandlerContext) {
        var bytes: [UInt8] = []
        message.write(into: &bytes)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: bytes)), promise: nil)
    }
}
