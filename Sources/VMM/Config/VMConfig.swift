// VMM (layer 3): the Firecracker-format VM configuration (config file and API bodies).

/// `boot-source`.
public struct BootSource: Sendable, Equatable {
    public var kernelImagePath: String
    public var bootArgs: String?
    public var initrdPath: String?

    public init(kernelImagePath: String, bootArgs: String? = nil, initrdPath: String? = nil) {
        self.kernelImagePath = kernelImagePath
        self.bootArgs = bootArgs
        self.initrdPath = initrdPath
    }

    /// The command line used when `boot_args` is absent.
    public static let defaultBootArgs = "console=ttyS0 reboot=k panic=1 pci=off"

    public init(json: JSONValue) throws(ConfigError) {
        var r = try ObjectReader(json, context: "boot-source")
        kernelImagePath = try r.requiredString("kernel_image_path")
        bootArgs = try r.string("boot_args")
        initrdPath = try r.string("initrd_path")
        try r.finish()
        guard !kernelImagePath.isEmpty else { throw ConfigError("boot-source: `kernel_image_path` is empty") }
    }

    public var json: JSONValue {
        var o: [String: JSONValue] = ["kernel_image_path": .string(kernelImagePath)]
        if let bootArgs { o["boot_args"] = .string(bootArgs) }
        if let initrdPath { o["initrd_path"] = .string(initrdPath) }
        return .object(o)
    }
}

/// `machine-config`.
public struct MachineConfig: Sendable, Equatable {
    public var vcpuCount: Int = 1
    public var memSizeMiB: Int = 128
    public var smt: Bool = false
    public var trackDirtyPages: Bool = false

    public static let maxVCPUs = 32

    public init() {}

    /// Parses a full (`PUT`) or partial (`PATCH`) body over `base`.
    public init(json: JSONValue, base: MachineConfig = MachineConfig(), partial: Bool = false) throws(ConfigError) {
        self = base
        var r = try ObjectReader(json, context: "machine-config")
        let vcpus = try r.integer("vcpu_count")
        let mem = try r.integer("mem_size_mib")
        let smt = try r.bool("smt")
        let ht = try r.bool("ht_enabled")  // the field's name before Firecracker 1.0
        let dirty = try r.bool("track_dirty_pages")
        if let template = try r.string("cpu_template"), template != "None" {
            throw ConfigError("machine-config: `cpu_template` \"\(template)\" is not supported by nimbus-vmm (only \"None\")")
        }
        if let huge = try r.string("huge_pages"), huge != "None" {
            throw ConfigError("machine-config: `huge_pages` \"\(huge)\" is not supported by nimbus-vmm (only \"None\")")
        }
        try r.finish()
        if !partial {
            guard let vcpus else { throw ConfigError("machine-config: missing field `vcpu_count`") }
            guard let mem else { throw ConfigError("machine-config: missing field `mem_size_mib`") }
            _ = (vcpus, mem)
        }
        if let vcpus { vcpuCount = Int(clamping: vcpus) }
        if let mem { memSizeMiB = Int(clamping: mem) }
        if let v = smt ?? ht { self.smt = v }
        if let dirty { trackDirtyPages = dirty }
        try validate()
    }

    /// Checks the values that do not depend on the host.
    public func validate() throws(ConfigError) {
        guard (1...Self.maxVCPUs).contains(vcpuCount) else {
            throw ConfigError("machine-config: `vcpu_count` must be between 1 and \(Self.maxVCPUs), not \(vcpuCount)")
        }
        guard memSizeMiB >= 1 else { throw ConfigError("machine-config: `mem_size_mib` must be at least 1, not \(memSizeMiB)") }
        guard memSizeMiB <= 1 << 30 else { throw ConfigError("machine-config: `mem_size_mib` \(memSizeMiB) is absurdly large") }
        if smt && vcpuCount > 1 && vcpuCount % 2 != 0 {
            throw ConfigError("machine-config: with `smt` the vcpu_count must be 1 or even, not \(vcpuCount)")
        }
    }

    public var json: JSONValue {
        .object([
            "vcpu_count": .integer(Int64(vcpuCount)), "mem_size_mib": .integer(Int64(memSizeMiB)),
            "smt": .bool(smt), "track_dirty_pages": .bool(trackDirtyPages), "huge_pages": .string("None"),
        ])
    }
}

/// An entry of `drives` (served by the virtio-blk device).
public struct DriveConfig: Sendable, Equatable {
    public var driveID: String
    public var pathOnHost: String
    public var isRootDevice: Bool
    public var isReadOnly: Bool
    public var cacheType: String
    public var partUUID: String?

    public init(json: JSONValue, context: String = "drive") throws(ConfigError) {
        var r = try ObjectReader(json, context: context)
        driveID = try r.requiredString("drive_id")
        pathOnHost = try r.requiredString("path_on_host")
        isRootDevice = try r.bool("is_root_device") ?? false
        isReadOnly = try r.bool("is_read_only") ?? false
        cacheType = try r.string("cache_type") ?? "Unsafe"
        partUUID = try r.string("partuuid")
        _ = try r.string("io_engine")
        _ = r.value("rate_limiter")
        try r.finish()
        guard ["Unsafe", "Writeback"].contains(cacheType) else {
            throw ConfigError("\(context): `cache_type` must be \"Unsafe\" or \"Writeback\", not \"\(cacheType)\"")
        }
        try validateID(driveID, field: "drive_id", context: context)
    }

    public var json: JSONValue {
        var o: [String: JSONValue] = [
            "drive_id": .string(driveID), "path_on_host": .string(pathOnHost), "is_root_device": .bool(isRootDevice),
            "is_read_only": .bool(isReadOnly), "cache_type": .string(cacheType),
        ]
        if let partUUID { o["partuuid"] = .string(partUUID) }
        return .object(o)
    }
}

/// An entry of `network-interfaces` (served by the virtio-net device). Its frames go either to a
/// TAP device (`host_dev_name`, as in Firecracker) or, a Nimbus extension, through a switch bridge
/// inside nimbus-vmm to an `uplink`, with no TAP in between.
public struct NetworkInterfaceConfig: Sendable, Equatable {
    public var ifaceID: String
    public var hostDevName: String?
    public var uplink: UplinkConfig?
    public var guestMAC: String?

    public init(json: JSONValue, context: String = "network-interface") throws(ConfigError) {
        var r = try ObjectReader(json, context: context)
        ifaceID = try r.requiredString("iface_id")
        hostDevName = try r.string("host_dev_name")
        uplink = try r.value("uplink").map { json throws(ConfigError) in try UplinkConfig(json: json, context: "\(context) uplink") }
        guestMAC = try r.string("guest_mac")
        _ = r.value("rx_rate_limiter")
        _ = r.value("tx_rate_limiter")
        try r.finish()
        try validateID(ifaceID, field: "iface_id", context: context)
        switch (hostDevName, uplink) {
        case (nil, nil):
            throw ConfigError("\(context): give `host_dev_name` (a TAP device) or `uplink` (Nimbus's in-process switch)")
        case (.some, .some):
            throw ConfigError("\(context): give `host_dev_name` or `uplink`, not both")
        default:
            break
        }
        if let guestMAC, !Self.isMAC(guestMAC) {
            throw ConfigError("\(context): `guest_mac` \"\(guestMAC)\" is not a MAC address like AA:FC:00:00:00:01")
        }
    }

    static func isMAC(_ s: String) -> Bool {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        return parts.count == 6 && parts.allSatisfy { $0.count == 2 && UInt8($0, radix: 16) != nil }
    }

    /// What the interface's frames go to, for messages and duplicate checks.
    var hostSide: String {
        if let hostDevName { return "TAP \(hostDevName)" }
        return uplink?.description ?? "nothing"
    }

    public var json: JSONValue {
        var o: [String: JSONValue] = ["iface_id": .string(ifaceID)]
        if let hostDevName { o["host_dev_name"] = .string(hostDevName) }
        if let uplink { o["uplink"] = uplink.json }
        if let guestMAC { o["guest_mac"] = .string(guestMAC) }
        return .object(o)
    }
}

/// Where a network interface's in-process switch bridge sends what is not for the guest: an
/// existing kernel interface (`"type": "system"`, read and written through an AF_PACKET socket,
/// e.g. one end of a veth pair), a VXLAN tunnel (`"type": "vxlan"`), or a `dgram` port of
/// nimbus-switchd (`"type": "dgram"`: Unix datagrams between `local_path`, bound here, and the
/// switch's `remote_path`, with virtio-net headers unless `vnet_hdr` is false).
public struct UplinkConfig: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case system(interface: String)
        case vxlan(remoteIP: String, key: UInt32, port: UInt16)
        case datagram(localPath: String, remotePath: String, vnetHeader: Bool)
    }
    public var kind: Kind

    public init(json: JSONValue, context: String) throws(ConfigError) {
        var r = try ObjectReader(json, context: context)
        let type = try r.requiredString("type")
        switch type {
        case "system":
            let name = try r.requiredString("name")
            guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.contains(" ") else {
                throw ConfigError("\(context): `name` \"\(name)\" is not a network interface name (1 to 15 characters, no / or space)")
            }
            kind = .system(interface: name)
        case "vxlan":
            let remote = try r.requiredString("remote_ip")
            let parts = remote.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4, parts.allSatisfy({ UInt8($0) != nil }) else {
                throw ConfigError("\(context): `remote_ip` \"\(remote)\" is not an IPv4 address")
            }
            let key = try r.integer("key") ?? 0
            guard (0..<(1 << 24)).contains(key) else { throw ConfigError("\(context): `key` \(key) is not a 24-bit VNI") }
            let port = try r.integer("dst_port") ?? 4789
            guard (1...65535).contains(port) else { throw ConfigError("\(context): `dst_port` \(port) is not a UDP port") }
            kind = .vxlan(remoteIP: remote, key: UInt32(key), port: UInt16(port))
        case "dgram":
            var paths: [String] = []
            for key in ["local_path", "remote_path"] {
                let path = try r.requiredString(key)
                guard path.hasPrefix("/"), path.utf8.count < 108 else {
                    throw ConfigError("\(context): `\(key)` \"\(path)\" is not an absolute path of under 108 bytes")
                }
                paths.append(path)
            }
            kind = .datagram(localPath: paths[0], remotePath: paths[1], vnetHeader: try r.bool("vnet_hdr") ?? true)
        default:
            throw ConfigError("\(context): `type` \"\(type)\" is not an uplink type (system, vxlan or dgram)")
        }
        try r.finish()
    }

    public var description: String {
        switch kind {
        case .system(let interface): "uplink \(interface)"
        case .vxlan(let remote, let key, let port): "VXLAN uplink to \(remote):\(port) key \(key)"
        case .datagram(let local, let remote, _): "datagram uplink \(local) to \(remote)"
        }
    }

    public var json: JSONValue {
        switch kind {
        case .system(let interface): .object(["type": .string("system"), "name": .string(interface)])
        case .vxlan(let remote, let key, let port):
            .object(["type": .string("vxlan"), "remote_ip": .string(remote), "key": .integer(Int64(key)), "dst_port": .integer(Int64(port))])
        case .datagram(let local, let remote, let header):
            .object(["type": .string("dgram"), "local_path": .string(local), "remote_path": .string(remote), "vnet_hdr": .bool(header)])
        }
    }
}

/// `vsock` (served by the virtio-vsock device).
public struct VsockConfig: Sendable, Equatable {
    public var guestCID: UInt64
    public var udsPath: String
    public var vsockID: String?

    public init(json: JSONValue, context: String = "vsock") throws(ConfigError) {
        var r = try ObjectReader(json, context: context)
        let cid = try r.integer("guest_cid")
        udsPath = try r.requiredString("uds_path")
        vsockID = try r.string("vsock_id")
        try r.finish()
        guard let cid else { throw ConfigError("\(context): missing field `guest_cid`") }
        guard cid >= 3, cid <= Int64(UInt32.max) else {
            throw ConfigError("\(context): `guest_cid` must be between 3 and \(UInt32.max) (0-2 are reserved), not \(cid)")
        }
        guestCID = UInt64(cid)
        guard !udsPath.isEmpty, udsPath.utf8.count < 100 else {
            throw ConfigError("\(context): `uds_path` must be a path of 1 to 99 bytes (Unix socket paths are short)")
        }
    }

    public var json: JSONValue {
        var o: [String: JSONValue] = ["guest_cid": .integer(Int64(guestCID)), "uds_path": .string(udsPath)]
        if let vsockID { o["vsock_id"] = .string(vsockID) }
        return .object(o)
    }
}

/// `entropy` (served by the virtio-rng device). Firecracker's only field is a rate limiter.
public struct EntropyConfig: Sendable, Equatable {
    public init() {}

    public init(json: JSONValue, context: String = "entropy") throws(ConfigError) {
        var r = try ObjectReader(json, context: context)
        if let limiter = r.value("rate_limiter"), limiter != .null {
            throw ConfigError("\(context): `rate_limiter` is not supported by nimbus-vmm yet")
        }
        try r.finish()
    }

    public var json: JSONValue { .object([:]) }
}

func validateID(_ id: String, field: String, context: String) throws(ConfigError) {
    guard !id.isEmpty, id.count <= 64, id.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") }) else {
        throw ConfigError("\(context): `\(field)` \"\(id)\" must be 1 to 64 letters, digits, '_' or '-'")
    }
}

/// The whole VM configuration, as in Firecracker's `--config-file` and `GET /vm/config`.
public struct VMConfig: Sendable, Equatable {
    public var bootSource: BootSource?
    public var machine = MachineConfig()
    public var drives: [DriveConfig] = []
    public var networkInterfaces: [NetworkInterfaceConfig] = []
    public var vsock: VsockConfig?
    public var entropy: EntropyConfig?

    public init() {}

    /// Sections Firecracker has that nimbus-vmm does not implement (yet).
    static let unsupportedSections = ["balloon", "mmds-config", "cpu-config", "logger", "metrics", "serial"]

    /// Parses a Firecracker config file.
    public init(fileContents: [UInt8]) throws(ConfigError) {
        let json = try JSONValue.parse(fileContents)
        var r = try ObjectReader(json, context: "config file")
        guard let boot = r.value("boot-source") else { throw ConfigError("config file: missing section `boot-source`") }
        bootSource = try BootSource(json: boot)
        if let m = r.value("machine-config") { machine = try MachineConfig(json: m) }
        if let d = r.value("drives") {
            guard case .array(let list) = d else { throw ConfigError("config file: `drives` must be an array") }
            for (i, item) in list.enumerated() { try addDrive(DriveConfig(json: item, context: "drives[\(i)]")) }
        }
        if let n = r.value("network-interfaces") {
            guard case .array(let list) = n else { throw ConfigError("config file: `network-interfaces` must be an array") }
            for (i, item) in list.enumerated() { try addNetworkInterface(NetworkInterfaceConfig(json: item, context: "network-interfaces[\(i)]")) }
        }
        if let v = r.value("vsock"), v != .null { vsock = try VsockConfig(json: v) }
        if let e = r.value("entropy"), e != .null { entropy = try EntropyConfig(json: e) }
        for section in Self.unsupportedSections where r.value(section) != nil {
            throw ConfigError("config file: section `\(section)` is not supported by nimbus-vmm yet")
        }
        try r.finish()
    }

    /// Adds or replaces (same `drive_id`) a drive; only one may be the root device.
    public mutating func addDrive(_ drive: DriveConfig) throws(ConfigError) {
        if drive.isRootDevice, drives.contains(where: { $0.isRootDevice && $0.driveID != drive.driveID }) {
            throw ConfigError("drive `\(drive.driveID)`: a root device is already configured")
        }
        if let i = drives.firstIndex(where: { $0.driveID == drive.driveID }) { drives[i] = drive } else { drives.append(drive) }
    }

    /// How many virtio-mmio slots the configuration needs.
    public var virtioDeviceCount: Int { drives.count + networkInterfaces.count + (vsock == nil ? 0 : 1) + (entropy == nil ? 0 : 1) }

    /// Adds or replaces (same `iface_id`) a network interface.
    public mutating func addNetworkInterface(_ iface: NetworkInterfaceConfig) throws(ConfigError) {
        if networkInterfaces.contains(where: { $0.hostSide == iface.hostSide && $0.ifaceID != iface.ifaceID }) {
            throw ConfigError("network interface `\(iface.ifaceID)`: \(iface.hostSide) is already used")
        }
        if let i = networkInterfaces.firstIndex(where: { $0.ifaceID == iface.ifaceID }) {
            networkInterfaces[i] = iface
        } else {
            networkInterfaces.append(iface)
        }
    }

    public var json: JSONValue {
        var o: [String: JSONValue] = [
            "machine-config": machine.json,
            "drives": .array(drives.map(\.json)),
            "network-interfaces": .array(networkInterfaces.map(\.json)),
        ]
        o["boot-source"] = bootSource?.json ?? .null
        o["vsock"] = vsock?.json ?? .null
        o["entropy"] = entropy?.json ?? .null
        return .object(o)
    }
}
