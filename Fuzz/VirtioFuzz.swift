// libFuzzer target for the virtio devices: the fuzz input becomes the guest's descriptor table,
// available ring and buffers, and is fed to the split-queue parser and to each device's queue
// handler (block over a raw image, rng, vsock, net over a socket pair standing in for the TAP).
// The host must never crash or touch memory outside guest RAM; the devices may only refuse.
import Glibc

let ramSize: UInt64 = 1 << 20
let fuzzMemory = try? GuestMemory(ranges: [(0, ramSize)])
let diskPath = "/tmp/nimbus-virtio-fuzz-\(getpid()).raw"

struct NoLine: InterruptLine {
    func trigger() {}
}

func makeActivation(_ memory: GuestMemory, features: UInt64, queues: Int) throws -> VirtioActivation {
    var list: [Virtqueue] = []
    for q in 0..<queues {
        var setup = QueueSetup(size: 16)
        setup.descriptorTable = 0x400 * UInt64(q)
        setup.availableRing = 0x400 * UInt64(q) + 0x100
        setup.usedRing = 0x400 * UInt64(q) + 0x200
        list.append(try Virtqueue(setup: setup, memory: memory, features: features))
    }
    return VirtioActivation(
        memory: memory, features: features, queues: list, notifiers: try (0..<queues).map { _ in try EventFD(nonBlocking: true) },
        interrupt: VirtioInterrupt(line: NoLine()), fail: { _ in })
}

/// A datagram socket standing in for the TAP.
final class SocketBackend: NetworkBackend {
    let socket: OwnedFileDescriptor
    init(socket: OwnedFileDescriptor) { self.socket = socket }
    var name: String { "socket" }
    var readinessDescriptor: Int32 { socket.rawValue }
    func send(_ buffers: [UnsafeRawBufferPointer]) throws -> TransferResult { try socket.writeVector(buffers) }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> TransferResult { try socket.readSome(into: buffer) }
    func guestAccepts(checksum: Bool, tso4: Bool, tso6: Bool) throws {}
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 2, let memory = fuzzMemory else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let selector = bytes[0]
    var features: UInt64 = 0
    if bytes[1] & 1 != 0 { features |= VirtioFeature.eventIndex }
    if bytes[1] & 2 != 0 { features |= VirtioFeature.indirectDescriptors }
    if bytes[1] & 4 != 0 { features |= 1 << 15 }  // virtio-net mergeable buffers
    // Rings and buffers live in the first 64 KiB. The input is laid over the rings; or, with bit
    // 0x10, every queue gets a well-formed chain (readable 0x3000+64, writable 0x3100+512 and
    // 0x3400+1) and the input becomes the buffers' contents, so devices see plausible requests.
    try? memory.zero(0x10000, at: 0)
    if bytes[1] & 0x10 != 0 {
        for q in 0..<3 {
            let table = 0x400 * UInt64(q)
            let descriptors: [(UInt64, UInt32, UInt16, UInt16)] = [(0x3000, 64, 1, 1), (0x3100, 512, 3, 2), (0x3400, 1, 2, 0)]
            for (i, d) in descriptors.enumerated() {
                let at = table + 16 * UInt64(i)
                try? memory.store(d.0, at: at)
                try? memory.store(d.1, at: at + 8)
                try? memory.store(d.2, at: at + 12)
                try? memory.store(d.3, at: at + 14)
            }
            try? memory.store(UInt16(1), at: table + 0x102)
        }
        try? memory.write(Array(bytes.dropFirst(2).prefix(0x1000)), at: 0x3000)
    } else {
        try? memory.write(Array(bytes.dropFirst(2).prefix(0x10000)), at: 0)
    }
    let event = Epoll.Event(token: 0, mask: 1)
    do {
        switch selector % 5 {
        case 0:
            var queue = try makeActivation(memory, features: features, queues: 1).queues[0]
            for _ in 0..<64 {
                guard let chain = try queue.pop() else { break }
                precondition(chain.readable.allSatisfy { memory.contains($0.address, length: UInt64($0.length)) })
                precondition(chain.writable.allSatisfy { memory.contains($0.address, length: UInt64($0.length)) })
                try queue.addUsed(head: chain.head, length: chain.writableLength)
                _ = try queue.needsInterrupt()
            }
        case 1:
            if access(diskPath, F_OK) != 0 { try RawImage.create(path: diskPath, size: 1 << 20) }
            let block = VirtioBlock(
                driveID: "fuzz", disk: try RawImage(path: diskPath, readOnly: false), readOnly: bytes[1] & 8 != 0, flushes: true,
                logger: Logger(label: "fuzz"))
            let a = try makeActivation(memory, features: features, queues: 1)
            try BlockLoop(device: block, queue: a.queues[0], activation: a).handle(event)
        case 2:
            let a = try makeActivation(memory, features: features, queues: 1)
            try RNGLoop(queue: a.queues[0], activation: a).handle(event)
        case 3:
            let path = "/tmp/nimbus-virtio-fuzz-\(getpid()).sock"
            let a = try makeActivation(memory, features: features, queues: 3)
            let loop = VsockLoop(
                activation: a, epoll: try Epoll(), listener: try UnixStream.listen(path), guestCID: 3, udsPath: path,
                logger: Logger(label: "fuzz"))
            defer { unlink(path) }
            try loop.handle(Epoll.Event(token: VsockLoop.txToken, mask: 1))
            try loop.handle(Epoll.Event(token: VsockLoop.rxToken, mask: 1))
        default:
            var pair: [Int32] = [0, 0]
            // SAFETY: socketpair writes two descriptors into the two-element array.
            guard socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0 else { return 0 }
            let tap = OwnedFileDescriptor(taking: pair[0])
            let peer = OwnedFileDescriptor(taking: pair[1])
            let frame = Array(bytes.suffix(min(bytes.count, 2000)))
            _ = try frame.withUnsafeBytes { try peer.writeSome($0) }
            let a = try makeActivation(memory, features: features, queues: 2)
            let loop = NetLoop(backend: SocketBackend(socket: tap), activation: a, epoll: try Epoll(), logger: Logger(label: "fuzz"))
            try loop.handle(Epoll.Event(token: NetLoop.txToken, mask: 1))
            try loop.handle(Epoll.Event(token: NetLoop.backendToken, mask: 1))
        }
    } catch {
        // Refusing hostile input is the expected outcome.
    }
    return 0
}
