// nimbus-tunnel: the frp-class tunnel's executable. `server` runs on the public host, `client`
// behind NAT; both read frp's TOML files. A thin layer over the Tunnel library.
import ArgumentParser
import Foundation
import LinuxSystem
import Logging
import NIOCore
import NIOPosix
import Tunnel

@main
struct NimbusTunnel: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nimbus-tunnel",
        abstract: "Expose services behind NAT through a public server (an frp-compatible tunnel).",
        discussion: """
            The server (frps.toml) listens for clients on bindPort and for users on each proxy's port or on the \
            shared vhost ports. The client (frpc.toml) dials out to the server, logs in with a challenge-response \
            over auth.token, and forwards each user connection to its local service over one multiplexed, \
            optionally TLS-protected connection. Configuration keys are frp's; unsupported ones are named in errors.
            """,
        version: nimbusTunnelVersion,
        subcommands: [Server.self, Client.self, Verify.self])

    struct Server: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the public server.",
            discussion: "Runs until SIGTERM or SIGINT, which close every listener and session and exit 0.")
        @Option(name: .shortAndLong, help: "The server configuration (frps.toml).") var config: String
        @OptionGroup var memory: MemoryOptions

        func run() async throws {
            try await runUntilSignal(
                load: { try ServerConfig.load(path: config) }, logLevel: \.logLevel, memory: memory,
                start: { try await TunnelServer.start(config: $0, group: $1, logger: Logger(label: "nimbus-tunnel.server")) },
                stop: { await $0.stop() })
        }
    }

    struct Client: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the client behind NAT.",
            discussion: """
                With loginFailExit = true (the default, as in frp) a first login that fails ends the client with \
                status 1. Later losses of the session are retried with backoff, and proxies are registered again.
                """)
        @Option(name: .shortAndLong, help: "The client configuration (frpc.toml).") var config: String
        @OptionGroup var memory: MemoryOptions

        func run() async throws {
            try await runUntilSignal(
                load: { try ClientConfig.load(path: config) }, logLevel: \.logLevel, memory: memory,
                start: { try await TunnelClient.start(config: $0, group: $1, logger: Logger(label: "nimbus-tunnel.client")) },
                stop: { await $0.stop() })
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a server or client configuration file and exit.")
        @Option(name: .shortAndLong, help: "The configuration file.") var config: String
        @Flag(help: "Read it as a server configuration (default: guessed from proxies/bindPort keys).") var server = false
        @Flag(help: "Print the result as JSON.") var json = false

        func run() throws {
            do {
                let text = try String(contentsOfFile: config, encoding: .utf8)
                let isServer = server || (!text.contains("serverAddr") && !text.contains("[[proxies]]"))
                let summary: [String: String]
                if isServer {
                    let parsed = try ServerConfig.parse(text, file: config)
                    summary = ["kind": "server", "bindPort": "\(parsed.bindPort)", "file": config]
                } else {
                    let parsed = try ClientConfig.parse(text, file: config)
                    summary = [
                        "kind": "client", "proxies": "\(parsed.proxies.count)", "visitors": "\(parsed.visitors.count)", "file": config,
                    ]
                }
                if json {
                    let data = try JSONSerialization.data(withJSONObject: summary.merging(["ok": "true"]) { a, _ in a }, options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    print("\(config): the \(summary["kind"] ?? "") configuration is valid")
                }
            } catch {
                if json {
                    let data = try JSONSerialization.data(withJSONObject: ["ok": "false", "error": "\(error)"], options: [.sortedKeys])
                    print(String(decoding: data, as: UTF8.self))
                } else {
                    FileHandle.standardError.write(Data("nimbus-tunnel: \(config): \(error)\n".utf8))
                }
                throw ExitCode(1)
            }
        }
    }
}

/// How the process treats its code pages once it is up.
struct MemoryOptions: ParsableArguments {
    @Flag(
        help: ArgumentHelp(
            "Keep every code page the process has touched resident.",
            discussion: """
                By default, a few seconds after start the pages of the program's code and read-only data are handed \
                back to the kernel, with readahead off for them, so the resident set shrinks to the code that keeps \
                running (about 20 MiB less); the first later use of a cold code path reads its page from disk.
                """))
    var keepCodeResident = false

    /// Seconds after start at which the code pages are released (start-up and the first login are over).
    static let releaseDelay = 3
}

/// Loads a configuration, starts the side it describes on one event loop, and runs it until
/// SIGTERM or SIGINT. A bad configuration or a failed start prints one line and exits 1.
func runUntilSignal<Config, Side>(
    load: () throws -> Config, logLevel: (Config) -> String, memory: MemoryOptions, start: (Config, EventLoopGroup) async throws -> Side,
    stop: (Side) async -> Void
) async throws {
    let config = try loadOrExit(load)
    bootstrapLogging(logLevel(config))
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let side = try await loadOrExit { try await start(config, group) }
    if !memory.keepCodeResident {
        let logger = Logger(label: "nimbus-tunnel")
        group.next().scheduleTask(in: .seconds(Int64(MemoryOptions.releaseDelay))) {
            let released = Host.releaseCodePages()
            logger.debug("released the code pages of \(released.mappings) mappings (\(released.bytes >> 20) MiB mapped)")
        }
    }
    await waitForTermination()
    await stop(side)
}

/// Runs `body`; prints its error and exits 1 instead of dumping an ArgumentParser usage screen.
func loadOrExit<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch {
        FileHandle.standardError.write(Data("nimbus-tunnel: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

func loadOrExit<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write(Data("nimbus-tunnel: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

func bootstrapLogging(_ level: String) {
    let parsed: Logger.Level =
        switch level {
        case "trace": .trace
        case "debug": .debug
        case "warn": .warning
        case "error": .error
        default: .info
        }
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = parsed
        return handler
    }
}
