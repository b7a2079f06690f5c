// Virtio (layer 2): the thread each active device runs on, and helpers for moving bytes between
// descriptor chains and the host.
import GuestMemory
import LinuxSystem
import Synchronization

/// What a device does with the events of its thread. Lives only on that thread.
protocol DeviceLoop: AnyObject {
    /// Handles one readiness event; throwing marks the device as needing a reset.
    func handle(_ event: Epoll.Event) throws
}

/// A device thread: waits with epoll on the descriptors registered before it started, until stopped.
final class DeviceWorker: Sendable {
    static let stopToken = UInt64.max
    let epoll: Epoll
    private let stopEvent: EventFD
    private let thread: NativeThread

    /// Starts thread `name`; `watch` lists descriptors to wait on with their tokens; `makeLoop` runs
    /// on the new thread and builds the loop state there.
    init(
        name: String, watch: [(fd: Int32, events: UInt32, token: UInt64)], fail: @escaping @Sendable (String) -> Void,
        makeLoop: @escaping @Sendable (Epoll) throws -> any DeviceLoop
    ) throws {
        let epoll = try Epoll()
        let stopEvent = try EventFD(nonBlocking: true)
        try epoll.add(stopEvent.rawValue, events: Epoll.input, token: Self.stopToken)
        for w in watch { try epoll.add(w.fd, events: w.events, token: w.token) }
        self.epoll = epoll
        self.stopEvent = stopEvent
        thread = try NativeThread.start(name: name) {
            do {
                let loop = try makeLoop(epoll)
                while true {
                    for event in try epoll.wait() {
                        if event.token == Self.stopToken { return }
                        try loop.handle(event)
                    }
                }
            } catch {
                fail("\(error)")
                // Park until stopped, so the device stays inert instead of spinning.
                while (try? epoll.wait().contains { $0.token == Self.stopToken }) != true {}
            }
        }
    }

    /// Stops the thread and waits for it.
    func stop() {
        try? stopEvent.signal()
        thread.join()
    }
}

/// A device's running worker, if any: started at DRIVER_OK, stopped at reset.
final class WorkerSlot: Sendable {
    private let current = Mutex<DeviceWorker?>(nil)

    /// Starts a worker that waits on every queue notifier of `activation` (token: the queue
    /// index) and on `extra` descriptors.
    func start(
        name: String, activation: VirtioActivation, extra: [(fd: Int32, events: UInt32, token: UInt64)] = [],
        makeLoop: @escaping @Sendable (Epoll) throws -> any DeviceLoop
    ) throws {
        let queues = activation.notifiers.enumerated().map { (fd: $1.rawValue, events: Epoll.input, token: UInt64($0)) }
        let worker = try DeviceWorker(name: name, watch: queues + extra, fail: activation.fail, makeLoop: makeLoop)
        current.withLock { $0 = worker }
    }

    /// Stops the worker (idempotent).
    func stop() {
        let worker = current.withLock { w in
            let old = w
            w = nil
            return old
        }
        worker?.stop()
    }
}

/// `count` bytes of a configuration space at `offset`; bytes past its end read as zero.
func configSlice(_ config: [UInt8], offset: Int, count: Int) -> [UInt8] {
    guard count > 0 else { return [] }
    return (0..<count).map { i in
        let at = offset + i
        return at >= 0 && at < config.count ? config[at] : 0
    }
}

extension Array where Element == GuestBuffer {
    /// The guest ranges holding bytes `[from, from+count)` of these buffers laid end to end.
    func slice(from: Int, count: Int) -> [GuestBuffer] {
        var result: [GuestBuffer] = []
        var skip = from
        var left = count
        for b in self where left > 0 {
            if skip >= b.length {
                skip -= b.length
                continue
            }
            let n = Swift.min(b.length - skip, left)
            result.append(GuestBuffer(address: b.address + UInt64(skip), length: n))
            left -= n
            skip = 0
        }
        return result
    }

    /// Total length.
    var totalLength: Int { reduce(0) { $0 + $1.length } }

    /// The (address, length) pairs GuestMemory.withHostBuffers takes.
    var ranges: [(address: UInt64, length: Int)] { map { ($0.address, $0.length) } }
}

extension GuestMemory {
    /// Copies bytes `[from, from+count)` of `buffers` (laid end to end) out of guest memory.
    func gather(_ buffers: [GuestBuffer], from: Int = 0, count: Int) throws -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        for piece in buffers.slice(from: from, count: count) { bytes += try read(piece.length, at: piece.address) }
        return bytes
    }

    /// Copies `bytes` into `buffers` (laid end to end) starting at byte `from`; returns how many fit.
    @discardableResult
    func scatter(_ bytes: ArraySlice<UInt8>, into buffers: [GuestBuffer], from: Int = 0) throws -> Int {
        var done = bytes.startIndex
        for piece in buffers.slice(from: from, count: bytes.count) {
            try write(bytes[done..<done + piece.length], at: piece.address)
            done += piece.length
        }
        return done - bytes.startIndex
    }

    @discardableResult
    func scatter(_ bytes: [UInt8], into buffers: [GuestBuffer], from: Int = 0) throws -> Int {
        try scatter(bytes[...], into: buffers, from: from)
    }
}

/// Little-endian fields of device headers and configuration spaces, read and written without
/// pointers. Callers check lengths first.
extension Array where Element == UInt8 {
    func littleEndian<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value |= T(truncatingIfNeeded: self[offset + i]) << (8 * i) }
        return value
    }

    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        for i in 0..<MemoryLayout<T>.size { append(UInt8(truncatingIfNeeded: value >> (8 * i))) }
    }

    mutating func setLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
}

/// A queue a device thread drains: pops chains, lets `body` serve each, publishes them as used,
/// and interrupts the driver when it asks for it.
extension Virtqueue {
    /// Serves every available chain; `body` returns the bytes written into the chain. Returns
    /// whether the driver was interrupted.
    @discardableResult
    mutating func drain(interrupt: VirtioInterrupt, _ body: (DescriptorChain) throws -> Int) throws -> Bool {
        var added = false
        repeat {
            try disableNotifications()
            while let chain = try pop() {
                try addUsed(head: chain.head, length: try body(chain))
                added = true
            }
        } while try enableNotifications()
        guard added, try needsInterrupt() else { return false }
        interrupt.signalUsedBuffers()
        return true
    }
}
