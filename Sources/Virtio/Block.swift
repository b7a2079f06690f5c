// Virtio (layer 2): virtio-blk over any `DiskImage` (raw files, qcow2 with backing chains).
//
// One request queue served on the device's thread. Reads and writes go straight between the image
// and guest memory (raw images) or through the qcow2 layer; every request is bounds-checked
// against the disk's capacity and answered with a status byte, never a host fault.
import GuestMemory
import LinuxSystem
import Logging
import Synchronization
import VirtualDisk

/// A virtio-blk device.
public final class VirtioBlock: VirtioBackend {
    public static let sectorSize = 512
    enum Feature {
        static let sizeMax: UInt64 = 1 << 1
        static let segMax: UInt64 = 1 << 2
        static let readOnly: UInt64 = 1 << 5
        static let flush: UInt64 = 1 << 9
        static let discard: UInt64 = 1 << 13
        static let writeZeroes: UInt64 = 1 << 14
    }
    enum RequestType {
        static let read: UInt32 = 0
        static let write: UInt32 = 1
        static let flush: UInt32 = 4
        static let getID: UInt32 = 8
        static let discard: UInt32 = 11
        static let writeZeroes: UInt32 = 13
    }
    enum Status {
        static let ok: UInt8 = 0
        static let ioError: UInt8 = 1
        static let unsupported: UInt8 = 2
    }
    public static let queueSize: UInt16 = 256
    /// Largest segment, as advertised through size_max.
    static let maxSegmentBytes = 1 << 20
    /// Most discard or write-zeroes ranges in one request (the driver is told 1).
    static let maxRangeSegments = 256

    public let driveID: String
    public let isReadOnly: Bool
    /// Whether the guest's flushes reach the host disk (Firecracker's `cache_type` Writeback).
    public let flushes: Bool
    private let disk: Mutex<any DiskImage>
    private let worker = WorkerSlot()
    private let interruptBox = Mutex<VirtioInterrupt?>(nil)
    let logger: Logger

    public init(driveID: String, disk: any DiskImage, readOnly: Bool, flushes: Bool, logger: Logger) {
        self.driveID = driveID
        self.disk = Mutex(disk)
        isReadOnly = readOnly || disk.isReadOnly
        self.flushes = flushes
        self.logger = logger
    }

    public var deviceID: UInt32 { 2 }
    public var queueSizes: [UInt16] { [Self.queueSize] }
    public var features: UInt64 {
        var f = VirtioFeature.eventIndex | VirtioFeature.indirectDescriptors | Feature.segMax | Feature.sizeMax
        if isReadOnly { f |= Feature.readOnly } else { f |= Feature.discard | Feature.writeZeroes }
        if flushes { f |= Feature.flush }
        return f
    }

    /// The image currently behind the device.
    public var image: any DiskImage { disk.withLock { $0 } }

    /// Swaps the image (the API's `PATCH /drives/{id}`) and tells the driver the capacity may have changed.
    public func replaceImage(_ image: any DiskImage) {
        let old = disk.withLock { d in
            let old = d
            d = image
            return old
        }
        try? old.flush()
        interruptBox.withLock { $0 }?.signalConfigChange()
    }

    public func readConfig(offset: Int, count: Int) -> [UInt8] {
        var config = [UInt8](repeating: 0, count: 60)
        func put<T: FixedWidthInteger>(_ value: T, _ at: Int) { config.setLittleEndian(value, at: at) }
        put(image.virtualSize / UInt64(Self.sectorSize), 0)
        put(UInt32(Self.maxSegmentBytes), 8)
        put(UInt32(Self.queueSize - 2), 12)
        put(UInt32(Self.sectorSize), 20)
        put(UInt32(UInt32.max >> 9), 36)  // max_discard_sectors
        put(UInt32(1), 40)  // max_discard_seg
        put(UInt32(1), 44)  // discard_sector_alignment
        put(UInt32(UInt32.max >> 9), 48)  // max_write_zeroes_sectors
        put(UInt32(1), 52)  // max_write_zeroes_seg
        config[56] = 1  // write_zeroes_may_unmap
        return configSlice(config, offset: offset, count: count)
    }

    public func writeConfig(offset: Int, data: [UInt8]) {}

    public func activate(_ a: VirtioActivation) throws {
        interruptBox.withLock { $0 = a.interrupt }
        let queue = a.queues[0]
        try worker.start(name: "blk-\(driveID)", activation: a) { _ in BlockLoop(device: self, queue: queue, activation: a) }
    }

    public func reset() { worker.stop() }

    /// Serves one request; returns the bytes written into the chain (data plus status).
    func serve(_ chain: DescriptorChain, memory: GuestMemory) -> Int {
        guard let statusBuffer = chain.writable.last, statusBuffer.length >= 1 else {
            logger.warning("virtio-blk \(driveID): request \(chain.head) has no status byte; dropped")
            return 0
        }
        let statusAddress = statusBuffer.address + UInt64(statusBuffer.length - 1)
        let dataOut = chain.writable.slice(from: 0, count: chain.writableLength - 1)
        var written = 0
        let status: UInt8
        do {
            (status, written) = try execute(chain, dataOut: dataOut, memory: memory)
        } catch {
            logger.warning("virtio-blk \(driveID): \(error)")
            status = Status.ioError
        }
        try? memory.store(status, at: statusAddress)
        return written + 1
    }

    private func execute(_ chain: DescriptorChain, dataOut: [GuestBuffer], memory: GuestMemory) throws -> (UInt8, Int) {
        guard chain.readableLength >= 16 else { return (Status.ioError, 0) }
        let header = try memory.gather(chain.readable, count: 16)
        let type = header.littleEndian(UInt32.self, at: 0)
        let sector = header.littleEndian(UInt64.self, at: 8)
        let dataIn = chain.readable.slice(from: 16, count: chain.readableLength - 16)
        let image = self.image
        func checkedRange(_ sector: UInt64, _ bytes: Int) -> UInt64? {
            let (offset, o1) = sector.multipliedReportingOverflow(by: UInt64(Self.sectorSize))
            let (end, o2) = offset.addingReportingOverflow(UInt64(bytes))
            guard !o1, !o2, end <= image.virtualSize else { return nil }
            return offset
        }
        switch type {
        case RequestType.read:
            let length = dataOut.totalLength
            guard length % Self.sectorSize == 0, let offset = checkedRange(sector, length) else { return (Status.ioError, 0) }
            try memory.withHostBuffers(dataOut.ranges) { buffers in try image.read(into: buffers, at: offset) }
            return (Status.ok, length)
        case RequestType.write:
            guard !isReadOnly else { return (Status.ioError, 0) }
            let length = dataIn.totalLength
            guard length % Self.sectorSize == 0, let offset = checkedRange(sector, length) else { return (Status.ioError, 0) }
            try memory.withHostBuffers(dataIn.ranges) { buffers in
                try image.write(from: buffers.map { UnsafeRawBufferPointer($0) }, at: offset)
            }
            return (Status.ok, 0)
        case RequestType.flush:
            if flushes { try image.flush() }
            return (Status.ok, 0)
        case RequestType.getID:
            let id = Array(driveID.utf8.prefix(20))
            let n = try memory.scatter(id + [UInt8](repeating: 0, count: 20 - id.count), into: dataOut)
            return (Status.ok, n)
        case RequestType.discard, RequestType.writeZeroes:
            guard !isReadOnly else { return (Status.ioError, 0) }
            // At most `maxRangeSegments` ranges: a hostile length must not make the host allocate.
            guard dataIn.totalLength >= 16, dataIn.totalLength % 16 == 0, dataIn.totalLength <= 16 * Self.maxRangeSegments else {
                return (Status.ioError, 0)
            }
            let segments = try memory.gather(dataIn, count: dataIn.totalLength)
            for s in stride(from: 0, to: segments.count, by: 16) {
                let start = segments.littleEndian(UInt64.self, at: s)
                let count = segments.littleEndian(UInt32.self, at: s + 8)
                let flags = segments.littleEndian(UInt32.self, at: s + 12)
                let bytes = Int(count) * Self.sectorSize
                guard let offset = checkedRange(start, bytes) else { return (Status.ioError, 0) }
                if type == RequestType.discard {
                    guard flags == 0 else { return (Status.unsupported, 0) }
                    try image.discard(at: offset, length: UInt64(bytes))
                } else {
                    guard flags & ~1 == 0 else { return (Status.unsupported, 0) }
                    try image.writeZeroes(at: offset, length: UInt64(bytes))
                }
            }
            return (Status.ok, 0)
        default:
            return (Status.unsupported, 0)
        }
    }
}

/// The block device's thread state.
final class BlockLoop: DeviceLoop {
    let device: VirtioBlock
    var queue: Virtqueue
    let activation: VirtioActivation

    init(device: VirtioBlock, queue: Virtqueue, activation: VirtioActivation) {
        self.device = device
        self.queue = queue
        self.activation = activation
    }

    func handle(_ event: Epoll.Event) throws {
        _ = try? activation.notifiers[0].wait()
        let memory = activation.memory
        try queue.drain(interrupt: activation.interrupt) { chain in device.serve(chain, memory: memory) }
    }
}
