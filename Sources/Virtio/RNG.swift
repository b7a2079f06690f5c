// Virtio (layer 2): virtio-rng (entropy device), filled from the host's getrandom.
import GuestMemory
import LinuxSystem
import Synchronization

/// A virtio entropy device.
public final class VirtioRNG: VirtioBackend {
    private let worker = WorkerSlot()

    public init() {}

    public var deviceID: UInt32 { 4 }
    public var queueSizes: [UInt16] { [256] }
    public var features: UInt64 { VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors }
    public func readConfig(offset: Int, count: Int) -> [UInt8] { configSlice([], offset: offset, count: count) }
    public func writeConfig(offset: Int, data: [UInt8]) {}

    public func activate(_ a: VirtioActivation) throws {
        let queue = a.queues[0]
        try worker.start(name: "rng", activation: a) { _ in RNGLoop(queue: queue, activation: a) }
    }

    public func reset() { worker.stop() }
}

final class RNGLoop: DeviceLoop {
    var queue: Virtqueue
    let activation: VirtioActivation
    /// Bytes handed out per request at most (a guest asking for more gets the rest next time).
    static let maxPerRequest = 64 << 10

    init(queue: Virtqueue, activation: VirtioActivation) {
        self.queue = queue
        self.activation = activation
    }

    func handle(_ event: Epoll.Event) throws {
        _ = try? activation.notifiers[0].wait()
        let memory = activation.memory
        try queue.drain(interrupt: activation.interrupt) { chain in
            let buffers = chain.writable.slice(from: 0, count: min(chain.writableLength, Self.maxPerRequest))
            try memory.withHostBuffers(buffers.ranges) { hostBuffers in
                for b in hostBuffers { try Host.fillRandom(b) }
            }
            return buffers.totalLength
        }
    }
}
