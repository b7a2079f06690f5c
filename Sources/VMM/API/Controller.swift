// VMM (layer 3): the Firecracker REST API's semantics, independent of HTTP: requests become
// typed actions on the pending configuration or the running machine. Only this object changes
// VM state on behalf of the API.
import Synchronization

/// A running VM as the API sees it.
public protocol RunningMachine: Sendable {
    func pause() throws
    func resume()
    func sendCtrlAltDel()
    /// Points drive `driveID` at a new image file (`PATCH /drives/{id}`).
    func replaceDrive(_ driveID: String, pathOnHost: String) throws
}

extension Machine: RunningMachine {}

/// Starts a VM from a configuration.
public protocol MachineLauncher: Sendable {
    func launch(_ config: VMConfig) throws -> any RunningMachine
}

/// An HTTP-independent API response.
public struct APIResponse: Sendable, Equatable {
    public let status: Int
    public let body: JSONValue?

    public static let noContent = APIResponse(status: 204, body: nil)
    public static func ok(_ body: JSONValue) -> APIResponse { APIResponse(status: 200, body: body) }
    public static func fault(_ message: String) -> APIResponse {
        APIResponse(status: 400, body: .object(["fault_message": .string(message)]))
    }
}

public final class VMMController: Sendable {
    public enum State: String, Sendable { case notStarted = "Not started", running = "Running", paused = "Paused" }

    struct Inner {
        var config: VMConfig
        var state: State = .notStarted
        var machine: (any RunningMachine)?
    }

    public let instanceID: String
    public static let version = "0.1.0"
    private let inner: Mutex<Inner>
    private let launcher: any MachineLauncher

    public init(instanceID: String, config: VMConfig = VMConfig(), launcher: any MachineLauncher) {
        self.instanceID = instanceID
        self.inner = Mutex(Inner(config: config))
        self.launcher = launcher
    }

    public var state: State { inner.withLock { $0.state } }
    public var config: VMConfig { inner.withLock { $0.config } }

    static let afterStart = "The requested operation is not supported after starting the microVM."
    static let beforeStart = "The requested operation is not supported before starting the microVM."

    /// Starts the VM with the current configuration (used by `InstanceStart` and `--config-file`).
    public func start() throws {
        try inner.withLock { s throws in
            guard s.state == .notStarted else { throw ConfigError("The microVM is already running.") }
            s.machine = try launcher.launch(s.config)
            s.state = .running
        }
    }

    /// Handles one request. `path` excludes any query string.
    public func handle(method: String, path: String, body: [UInt8]) -> APIResponse {
        do {
            return try route(method: method, path: path, body: body)
        } catch {
            return .fault("\(error)")
        }
    }

    private func parseBody(_ body: [UInt8]) throws(ConfigError) -> JSONValue {
        guard !body.isEmpty else { throw ConfigError("the request needs a JSON body") }
        return try JSONValue.parse(body)
    }

    private func preBoot(_ change: (inout VMConfig) throws -> Void) throws -> APIResponse {
        try inner.withLock { s throws in
            guard s.state == .notStarted else { throw ConfigError(Self.afterStart) }
            var copy = s.config
            try change(&copy)
            s.config = copy
        }
        return .noContent
    }

    private func route(method: String, path: String, body: [UInt8]) throws -> APIResponse {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        switch (method, parts.first ?? "", parts.count) {
        case ("GET", "", 0):
            let s = inner.withLock { $0.state }
            return .ok(
                .object([
                    "id": .string(instanceID), "state": .string(s.rawValue), "vmm_version": .string(Self.version),
                    "app_name": .string("Nimbus"),
                ]))
        case ("GET", "version", 1):
            return .ok(.object(["firecracker_version": .string(Self.version)]))
        case ("GET", "machine-config", 1):
            return .ok(inner.withLock { $0.config.machine.json })
        case ("PUT", "machine-config", 1), ("PATCH", "machine-config", 1):
            let json = try parseBody(body)
            return try preBoot { c in c.machine = try MachineConfig(json: json, base: c.machine, partial: method == "PATCH") }
        case ("PUT", "boot-source", 1):
            let json = try parseBody(body)
            return try preBoot { c in c.bootSource = try BootSource(json: json) }
        case ("PUT", "drives", 2):
            let drive = try DriveConfig(json: try parseBody(body))
            guard drive.driveID == parts[1] else { throw ConfigError("The id from the path does not match the id from the body.") }
            return try preBoot { c in try c.addDrive(drive) }
        case ("PATCH", "drives", 2):
            var r = try ObjectReader(try parseBody(body), context: "drive")
            let id = try r.requiredString("drive_id")
            let path = try r.string("path_on_host")
            _ = r.value("rate_limiter")
            try r.finish()
            guard id == parts[1] else { throw ConfigError("The id from the path does not match the id from the body.") }
            return try inner.withLock { s throws -> APIResponse in
                guard let machine = s.machine else { throw ConfigError(Self.beforeStart) }
                guard let index = s.config.drives.firstIndex(where: { $0.driveID == id }) else {
                    throw ConfigError("drive `\(id)` does not exist")
                }
                if let path {
                    try machine.replaceDrive(id, pathOnHost: path)
                    s.config.drives[index].pathOnHost = path
                }
                return .noContent
            }
        case ("PUT", "vsock", 1):
            let vsock = try VsockConfig(json: try parseBody(body))
            return try preBoot { c in c.vsock = vsock }
        case ("PUT", "entropy", 1):
            let entropy = try EntropyConfig(json: try parseBody(body))
            return try preBoot { c in c.entropy = entropy }
        case ("PUT", "network-interfaces", 2):
            let iface = try NetworkInterfaceConfig(json: try parseBody(body))
            guard iface.ifaceID == parts[1] else { throw ConfigError("The id from the path does not match the id from the body.") }
            return try preBoot { c in try c.addNetworkInterface(iface) }
        case ("GET", "vm", 2) where parts[1] == "config":
            return .ok(inner.withLock { $0.config.json })
        case ("PATCH", "vm", 1):
            var r = try ObjectReader(try parseBody(body), context: "vm")
            let wanted = try r.requiredString("state")
            try r.finish()
            return try setRunState(wanted)
        case ("PUT", "actions", 1):
            var r = try ObjectReader(try parseBody(body), context: "actions")
            let action = try r.requiredString("action_type")
            try r.finish()
            return try perform(action)
        default:
            return .fault("Invalid request method and/or path: \(method) \(path).")
        }
    }

    private func setRunState(_ wanted: String) throws -> APIResponse {
        guard wanted == "Paused" || wanted == "Resumed" else {
            throw ConfigError("vm: `state` must be \"Paused\" or \"Resumed\", not \"\(wanted)\"")
        }
        try inner.withLock { s throws in
            guard let machine = s.machine else { throw ConfigError(Self.beforeStart) }
            if wanted == "Paused" {
                try machine.pause()
                s.state = .paused
            } else {
                machine.resume()
                s.state = .running
            }
        }
        return .noContent
    }

    private func perform(_ action: String) throws -> APIResponse {
        switch action {
        case "InstanceStart":
            try start()
            return .noContent
        case "SendCtrlAltDel":
            let machine = inner.withLock { $0.machine }
            guard let machine else { throw ConfigError(Self.beforeStart) }
            machine.sendCtrlAltDel()
            return .noContent
        case "FlushMetrics":
            return .noContent
        default:
            throw ConfigError("actions: unknown `action_type` \"\(action)\", expected InstanceStart, SendCtrlAltDel or FlushMetrics")
        }
    }
}
