// Virtio (layer 2): the virtio-mmio transport (version 2, "modern") that a device backend sits on.
//
// Register accesses arrive on vCPU threads; queue notifications arrive as eventfd signals (KVM
// ioeventfd, or the transport itself when a notify write exits to userspace). On DRIVER_OK the
// backend is handed its queues and starts its own thread; a status write of 0 stops it again.
import Devices
import GuestMemory
import LinuxSystem
import Logging
import Synchronization

/// Device status bits (virtio 1.x §2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt32 = 1
    public static let driver: UInt32 = 2
    public static let driverOK: UInt32 = 4
    public static let featuresOK: UInt32 = 8
    public static let needsReset: UInt32 = 64
    public static let failed: UInt32 = 128
}

/// A device's interrupt: the InterruptStatus register plus the line (irqfd) behind it.
public final class VirtioInterrupt: Sendable {
    let status = Atomic<UInt32>(0)
    let generation = Atomic<UInt32>(0)
    let line: any InterruptLine

    public init(line: any InterruptLine) { self.line = line }

    /// Tells the driver that used buffers are waiting.
    public func signalUsedBuffers() {
        status.bitwiseOr(1, ordering: .sequentiallyConsistent)
        line.trigger()
    }

    /// Tells the driver that the configuration space changed.
    public func signalConfigChange() {
        generation.add(1, ordering: .sequentiallyConsistent)
        status.bitwiseOr(2, ordering: .sequentiallyConsistent)
        line.trigger()
    }

    public var pending: UInt32 { status.load(ordering: .sequentiallyConsistent) }
}

/// What a backend gets when the driver sets DRIVER_OK.
public struct VirtioActivation: Sendable {
    public let memory: GuestMemory
    /// The features both sides agreed on.
    public let features: UInt64
    public let queues: [Virtqueue]
    /// One eventfd per queue, signalled when the driver notifies that queue.
    public let notifiers: [EventFD]
    public let interrupt: VirtioInterrupt
    /// Marks the device DEVICE_NEEDS_RESET (a broken ring, a failed backend) and tells the driver.
    public let fail: @Sendable (String) -> Void
}

/// A virtio device model behind the transport.
public protocol VirtioBackend: AnyObject, Sendable {
    /// Virtio device ID (2 block, 1 net, 4 entropy, 19 vsock).
    var deviceID: UInt32 { get }
    /// Maximum size of each queue.
    var queueSizes: [UInt16] { get }
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 is added by the transport).
    var features: UInt64 { get }
    func readConfig(offset: Int, count: Int) -> [UInt8]
    func writeConfig(offset: Int, data: [UInt8])
    /// Starts serving the queues.
    func activate(_ activation: VirtioActivation) throws
    /// Stops serving and forgets queue state; must be idempotent.
    func reset()
}

/// A virtio-mmio device slot: 0x100 bytes of registers, then the device's configuration space.
public final class VirtioMMIODevice: BusDevice {
    public static let magic: UInt32 = 0x7472_6976  // "virt"
    public static let vendorID: UInt32 = 0x4E49_4D42  // "NIMB"
    public static let queueNotifyOffset: UInt64 = 0x50

    public let backend: any VirtioBackend
    public let memory: GuestMemory
    public let interrupt: VirtioInterrupt
    /// Queue notification eventfds, one per queue, to register as ioeventfds.
    public let notifiers: [EventFD]
    let logger: Logger

    struct State {
        var status: UInt32 = 0
        var deviceFeaturesSelect: UInt32 = 0
        var driverFeaturesSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSelect: UInt32 = 0
        var queues: [QueueSetup]
        var ready: [Bool]
        var active = false
    }
    private let state: Mutex<State>

    public init(backend: any VirtioBackend, memory: GuestMemory, interrupt: VirtioInterrupt, logger: Logger) throws(SystemError) {
        self.backend = backend
        self.memory = memory
        self.interrupt = interrupt
        self.logger = logger
        notifiers = try backend.queueSizes.map { _ throws(SystemError) in try EventFD(nonBlocking: true) }
        state = Mutex(State(queues: backend.queueSizes.map { QueueSetup(size: $0) }, ready: backend.queueSizes.map { _ in false }))
    }

    /// Every feature offered, including the transport's own.
    public var offeredFeatures: UInt64 { backend.features | VirtioFeature.version1 }

    public var status: UInt32 { state.withLock { $0.status } }

    public func read(offset: UInt64, size: Int) -> [UInt8] {
        if offset >= 0x100 {
            return backend.readConfig(offset: Int(offset - 0x100), count: size)
        }
        guard size == 4, offset % 4 == 0 else { return [UInt8](repeating: 0, count: size) }
        let value: UInt32 = state.withLock { s in
            switch offset {
            case 0x000: return Self.magic
            case 0x004: return 2
            case 0x008: return backend.deviceID
            case 0x00c: return Self.vendorID
            case 0x010:
                let features = offeredFeatures
                return s.deviceFeaturesSelect == 0 ? UInt32(truncatingIfNeeded: features) : s.deviceFeaturesSelect == 1 ? UInt32(features >> 32) : 0
            case 0x034:
                return Int(s.queueSelect) < s.queues.count ? UInt32(backend.queueSizes[Int(s.queueSelect)]) : 0
            case 0x044:
                return Int(s.queueSelect) < s.queues.count && s.ready[Int(s.queueSelect)] ? 1 : 0
            case 0x060: return interrupt.pending
            case 0x070: return s.status
            case 0x0fc: return interrupt.generation.load(ordering: .sequentiallyConsistent)
            default: return 0
            }
        }
        var bytes: [UInt8] = []
        bytes.appendLittleEndian(value)
        return bytes
    }

    public func write(offset: UInt64, data: [UInt8]) {
        if offset >= 0x100 {
            backend.writeConfig(offset: Int(offset - 0x100), data: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else { return }
        let value = UInt32(data[0]) | UInt32(data[1]) << 8 | UInt32(data[2]) << 16 | UInt32(data[3]) << 24
        switch offset {
        case 0x050:
            if Int(value) < notifiers.count { try? notifiers[Int(value)].signal() }
        case 0x064:
            interrupt.status.bitwiseAnd(~value, ordering: .sequentiallyConsistent)
        case 0x070:
            writeStatus(value)
        default:
            state.withLock { s in writeRegister(&s, offset: offset, value: value) }
        }
    }

    private func writeRegister(_ s: inout State, offset: UInt64, value: UInt32) {
        let q = Int(s.queueSelect)
        let queueWritable = q < s.queues.count && !s.ready[q] && s.status & VirtioStatus.driverOK == 0
        func setLow(_ v: inout UInt64) { v = (v & 0xFFFF_FFFF_0000_0000) | UInt64(value) }
        func setHigh(_ v: inout UInt64) { v = (v & 0xFFFF_FFFF) | UInt64(value) << 32 }
        switch offset {
        case 0x014: s.deviceFeaturesSelect = value
        case 0x020:
            guard s.status & VirtioStatus.featuresOK == 0 else { return }
            if s.driverFeaturesSelect == 0 { setLow(&s.driverFeatures) } else if s.driverFeaturesSelect == 1 { setHigh(&s.driverFeatures) }
        case 0x024: s.driverFeaturesSelect = value
        case 0x030: s.queueSelect = value
        case 0x038:
            if queueWritable, value > 0, value <= UInt32(backend.queueSizes[q]), value & (value - 1) == 0 { s.queues[q].size = UInt16(value) }
        case 0x044:
            if q < s.queues.count, s.status & VirtioStatus.driverOK == 0 { s.ready[q] = value & 1 == 1 }
        case 0x080: if queueWritable { setLow(&s.queues[q].descriptorTable) }
        case 0x084: if queueWritable { setHigh(&s.queues[q].descriptorTable) }
        case 0x090: if queueWritable { setLow(&s.queues[q].availableRing) }
        case 0x094: if queueWritable { setHigh(&s.queues[q].availableRing) }
        case 0x0a0: if queueWritable { setLow(&s.queues[q].usedRing) }
        case 0x0a4: if queueWritable { setHigh(&s.queues[q].usedRing) }
        default: break
        }
    }

    private func writeStatus(_ value: UInt32) {
        if value == 0 {
            reset()
            return
        }
        var activation: VirtioActivation?
        let failure: String? = state.withLock { s in
            var new = value
            if new & VirtioStatus.featuresOK != 0 && s.status & VirtioStatus.featuresOK == 0 {
                let unknown = s.driverFeatures & ~offeredFeatures
                if unknown != 0 || s.driverFeatures & VirtioFeature.version1 == 0 {
                    logger.warning(
                        "virtio device \(backend.deviceID): driver asked for features 0x\(String(s.driverFeatures, radix: 16)), offered 0x\(String(offeredFeatures, radix: 16)); FEATURES_OK refused"
                    )
                    new &= ~VirtioStatus.featuresOK
                }
            }
            let wasOK = s.status & VirtioStatus.driverOK != 0
            s.status = new | (s.status & VirtioStatus.needsReset)
            guard !wasOK, new & VirtioStatus.driverOK != 0, !s.active else { return nil }
            guard new & VirtioStatus.featuresOK != 0 else { return "DRIVER_OK without FEATURES_OK" }
            var queues: [Virtqueue] = []
            for (index, setup) in s.queues.enumerated() {
                guard s.ready[index] else {
                    return "queue \(index) is not ready at DRIVER_OK"
                }
                do { queues.append(try Virtqueue(setup: setup, memory: memory, features: s.driverFeatures)) } catch {
                    return "queue \(index): \(error)"
                }
            }
            s.active = true
            activation = VirtioActivation(
                memory: memory, features: s.driverFeatures, queues: queues, notifiers: notifiers, interrupt: interrupt,
                fail: { [weak self] why in self?.markNeedsReset(why) })
            return nil
        }
        if let failure {
            markNeedsReset(failure)
            return
        }
        if let activation {
            do { try backend.activate(activation) } catch { markNeedsReset("could not start: \(error)") }
        }
    }

    /// Sets DEVICE_NEEDS_RESET and raises a configuration interrupt, as the spec asks.
    public func markNeedsReset(_ why: String) {
        logger.error("virtio device \(backend.deviceID): \(why); it needs a reset")
        state.withLock { $0.status |= VirtioStatus.needsReset }
        interrupt.signalConfigChange()
    }

    /// Returns the device to its initial state (status 0).
    public func reset() {
        backend.reset()
        state.withLock { s in
            s = State(queues: backend.queueSizes.map { QueueSetup(size: $0) }, ready: backend.queueSizes.map { _ in false })
        }
        interrupt.status.store(0, ordering: .sequentiallyConsistent)
        for n in notifiers { _ = try? n.wait() }
    }
}
