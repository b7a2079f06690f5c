// VMM (layer 4): turns the configuration's drives, network interfaces, vsock and entropy sections
// into virtio-mmio devices: one 4 KiB slot and one GSI each, described in the DSDT, with an irqfd
// for the interrupt and one ioeventfd per queue for notifications. A network interface with an
// `uplink` gets its own switch bridge in this process: the device's port and the uplink, NORMAL
// forwarding (MAC learning), on a datapath thread.
import Devices
import GuestMemory
import KVM
import LinuxSystem
import Logging
import Switch
import Virtio
import VirtualDisk

/// The virtio devices of one VM.
struct VirtioSet: Sendable {
    var transports: [VirtioMMIODevice] = []
    var blocks: [String: VirtioBlock] = [:]
    var interruptFDs: [EventFD] = []
    var bridges: [Datapath] = []

    /// Drives in slot order: the root device first, as Firecracker orders them (it becomes /dev/vda).
    static func orderedDrives(_ config: VMConfig) -> [DriveConfig] {
        config.drives.filter(\.isRootDevice) + config.drives.filter { !$0.isRootDevice }
    }

    /// Where slot `index` lives.
    static func description(slot index: Int) -> VirtioMMIODescription {
        VirtioMMIODescription(
            base: Layout.virtioMMIOBase + UInt64(index) * Layout.virtioMMIOSlotSize, gsi: Layout.firstDeviceIRQ + UInt32(index))
    }

    static var maxDevices: Int { Int(Layout.lastDeviceIRQ - Layout.firstDeviceIRQ + 1) }

    /// The kernel command line with `root=` added for a root drive, unless the user set one.
    static func commandLine(_ base: String, config: VMConfig) -> String {
        guard let root = orderedDrives(config).first, root.isRootDevice, !base.split(separator: " ").contains(where: { $0.hasPrefix("root=") }) else {
            return base
        }
        let device = root.partUUID.map { "PARTUUID=\($0)" } ?? "/dev/vda"
        return base + " root=\(device) " + (root.isReadOnly ? "ro" : "rw")
    }

    /// Opens every backend (disk images, TAP devices, the vsock socket) and wires the devices into
    /// the VM. Throws with the device and the reason when a backend cannot be opened.
    static func build(config: VMConfig, memory: GuestMemory, vm: VirtualMachine, bus: Bus, logger: Logger) throws -> VirtioSet {
        var backends: [any VirtioBackend] = []
        var set = VirtioSet()
        for drive in orderedDrives(config) {
            let image: any DiskImage
            do { image = try DiskOpener.open(drive.pathOnHost, readOnly: drive.isReadOnly) } catch {
                throw ConfigError("drive `\(drive.driveID)`: \(error)")
            }
            let block = VirtioBlock(
                driveID: drive.driveID, disk: image, readOnly: drive.isReadOnly, flushes: drive.cacheType == "Writeback", logger: logger)
            set.blocks[drive.driveID] = block
            backends.append(block)
        }
        for iface in config.networkInterfaces {
            let mac = iface.guestMAC.map { $0.split(separator: ":").compactMap { UInt8($0, radix: 16) } }
            let backend: any NetworkBackend
            if let uplink = iface.uplink {
                let (bridge, port) = try uplinkBridge(iface.ifaceID, uplink, logger: logger)
                set.bridges.append(bridge)
                backend = port.backend
            } else {
                let name = iface.hostDevName ?? ""
                do { backend = try TapBackend(name: name) } catch {
                    throw ConfigError("network interface `\(iface.ifaceID)`: cannot open TAP device \(name): \(error)")
                }
            }
            backends.append(VirtioNet(ifaceID: iface.ifaceID, backend: backend, mac: mac, logger: logger))
        }
        if let vsock = config.vsock {
            backends.append(try VirtioVsock(guestCID: vsock.guestCID, udsPath: vsock.udsPath, logger: logger))
        }
        if config.entropy != nil { backends.append(VirtioRNG()) }
        guard backends.count <= maxDevices else {
            throw ConfigError("the configuration has \(backends.count) virtio devices; nimbus-vmm has \(maxDevices) slots")
        }
        for (index, backend) in backends.enumerated() {
            let slot = description(slot: index)
            let irq = try EventFD()
            try vm.registerIRQFD(irq, gsi: slot.gsi)
            let transport = try VirtioMMIODevice(
                backend: backend, memory: memory, interrupt: VirtioInterrupt(line: IRQFDLine(eventfd: irq)), logger: logger)
            for (queue, notifier) in transport.notifiers.enumerated() {
                try vm.registerIOEventFD(
                    notifier, mmioAddress: slot.base + VirtioMMIODevice.queueNotifyOffset, length: 4, datamatch: UInt64(queue))
            }
            try bus.insert(transport, base: slot.base, length: slot.size)
            set.transports.append(transport)
            set.interruptFDs.append(irq)
        }
        return set
    }

    /// A bridge of two ports, the device's (ofport 1) and the uplink (ofport 2), forwarding NORMAL.
    static func uplinkBridge(_ ifaceID: String, _ uplink: UplinkConfig, logger: Logger) throws -> (Datapath, VMPort) {
        let context = "network interface `\(ifaceID)`"
        do {
            let bridge = try Datapath(name: "vm-\(ifaceID)", logger: logger)
            let port = try VMPort(name: ifaceID, ofport: 1)
            let outside: any DatapathPort
            switch uplink.kind {
            case .system(let interface):
                outside = try SystemPort(name: interface, ofport: 2)
            case .vxlan(let remote, let key, let udpPort):
                let socket = try VXLANSocket(bridge: "vm-\(ifaceID)", port: udpPort)
                outside = try VXLANPort(name: "vxlan-\(ifaceID)", ofport: 2, remote: remote, vni: key, socket: socket)
            case .datagram(let local, let remote, let header):
                outside = try DatagramPort(name: "dgram-\(ifaceID)", ofport: 2, localPath: local, remotePath: remote, vnetHeader: header)
            }
            bridge.add(port)
            bridge.add(outside)
            bridge.configure(PipelineConfig(ports: [1: VLANConfig(), 2: VLANConfig()], tables: FlowTables.normalOnly().snapshot()))
            try bridge.start()
            return (bridge, port)
        } catch {
            throw ConfigError("\(context): cannot make its \(uplink): \(error)")
        }
    }

    /// Stops every device thread and flushes the disks (the VM has ended).
    func shutdown(logger: Logger) {
        for t in transports { t.backend.reset() }
        for bridge in bridges { bridge.stop() }
        for (id, block) in blocks {
            do { try block.image.flush() } catch { logger.error("drive `\(id)`: flushing at exit failed: \(error)") }
        }
    }
}
