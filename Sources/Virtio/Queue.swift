// Virtio (layer 2): split virtqueues over guest memory, read as a hostile driver would write them.
//
// Every ring field and descriptor is fetched with bounds-checked guest-memory accesses; a chain is
// bounded by its table's size (which also catches loops), indirect tables are checked before use,
// and nothing here ever holds a host pointer. A malformed ring surfaces as `QueueError`, which the
// device turns into DEVICE_NEEDS_RESET.
import GuestMemory
import Synchronization

/// Feature bits shared by every device (virtio 1.x §6).
public enum VirtioFeature {
    public static let indirectDescriptors: UInt64 = 1 << 28
    public static let eventIndex: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
}

/// The driver broke the virtqueue rules; the device must be reset.
public struct QueueError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// One guest buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct GuestBuffer: Sendable, Equatable {
    public let address: UInt64
    public let length: Int
    public init(address: UInt64, length: Int) {
        self.address = address
        self.length = length
    }
}

/// A descriptor chain taken from the available ring: device-readable buffers, then writable ones.
public struct DescriptorChain: Sendable, Equatable {
    public let head: UInt16
    public var readable: [GuestBuffer] = []
    public var writable: [GuestBuffer] = []
    public var readableLength: Int { readable.reduce(0) { $0 + $1.length } }
    public var writableLength: Int { writable.reduce(0) { $0 + $1.length } }
}

/// What the driver programmed for one queue through the transport.
public struct QueueSetup: Sendable, Equatable {
    public var size: UInt16
    public var descriptorTable: UInt64 = 0
    public var availableRing: UInt64 = 0
    public var usedRing: UInt64 = 0
    public init(size: UInt16) { self.size = size }
}

/// A split virtqueue, driven by one device thread.
public struct Virtqueue: Sendable {
    public let memory: GuestMemory
    public let size: UInt16
    let descriptorTable: UInt64
    let availableRing: UInt64
    let usedRing: UInt64
    let eventIndex: Bool
    let indirect: Bool
    /// The next available-ring slot to consume.
    public private(set) var lastAvailable: UInt16 = 0
    /// The next used-ring slot to fill.
    public private(set) var nextUsed: UInt16 = 0
    /// `nextUsed` when the driver was last interrupted (for VIRTIO_F_EVENT_IDX).
    var signalledUsed: UInt16 = 0

    static let descriptorNext: UInt16 = 1
    static let descriptorWrite: UInt16 = 2
    static let descriptorIndirect: UInt16 = 4
    /// Largest indirect table accepted (entries).
    public static let maxIndirectEntries = 1024

    /// Checks the ring placement the driver chose and builds the queue.
    public init(setup: QueueSetup, memory: GuestMemory, features: UInt64) throws(QueueError) {
        let size = setup.size
        guard size > 0, size & (size - 1) == 0 else { throw QueueError("queue size \(size) is not a power of two") }
        let n = UInt64(size)
        let eventIndex = features & VirtioFeature.eventIndex != 0
        let extra: UInt64 = eventIndex ? 2 : 0
        let areas: [(String, UInt64, UInt64, UInt64)] = [
            ("descriptor table", setup.descriptorTable, 16 * n, 16),
            ("available ring", setup.availableRing, 4 + 2 * n + extra, 2),
            ("used ring", setup.usedRing, 4 + 8 * n + extra, 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address % alignment == 0 else {
                throw QueueError("\(name) at 0x\(String(address, radix: 16)) is not \(alignment)-byte aligned")
            }
            guard memory.contains(address, length: length) else {
                throw QueueError("\(name) at 0x\(String(address, radix: 16)) (\(length) bytes) is outside guest RAM")
            }
        }
        self.memory = memory
        self.size = size
        descriptorTable = setup.descriptorTable
        availableRing = setup.availableRing
        usedRing = setup.usedRing
        self.eventIndex = eventIndex
        indirect = features & VirtioFeature.indirectDescriptors != 0
    }

    private func load16(_ address: UInt64) throws(QueueError) -> UInt16 {
        do { return try memory.load(UInt16.self, at: address) } catch { throw QueueError("\(error)") }
    }

    private func store16(_ value: UInt16, _ address: UInt64) throws(QueueError) {
        do { try memory.store(value, at: address) } catch { throw QueueError("\(error)") }
    }

    /// Whether the driver has made buffers available that we have not taken.
    public func hasAvailable() throws(QueueError) -> Bool {
        try load16(availableRing + 2) != lastAvailable
    }

    /// Takes the next available chain, or nil when the ring is empty.
    public mutating func pop() throws(QueueError) -> DescriptorChain? {
        let availableIndex = try load16(availableRing + 2)
        if availableIndex == lastAvailable { return nil }
        guard availableIndex &- lastAvailable <= size else {
            throw QueueError("available index jumped from \(lastAvailable) to \(availableIndex), more than the queue size \(size)")
        }
        atomicMemoryFence(ordering: .acquiring)
        let head = try load16(availableRing + 4 + 2 * UInt64(lastAvailable % size))
        lastAvailable &+= 1
        return try chain(startingAt: head)
    }

    /// Puts the last `count` chains taken back (the device could not use them yet).
    public mutating func undoPop(_ count: Int = 1) { lastAvailable &-= UInt16(truncatingIfNeeded: count) }

    /// Walks the chain whose head is descriptor `head`.
    public func chain(startingAt head: UInt16) throws(QueueError) -> DescriptorChain {
        guard head < size else { throw QueueError("chain head \(head) is outside the queue of \(size)") }
        var result = DescriptorChain(head: head)
        var table = descriptorTable
        var tableSize = Int(size)
        var index = Int(head)
        var seen = 0
        var inIndirect = false
        while true {
            seen += 1
            guard seen <= tableSize else {
                throw QueueError("descriptor chain from head \(head) is longer than its table (\(tableSize)): a loop")
            }
            let entry = table + 16 * UInt64(index)
            let address: UInt64
            let length: UInt32
            let flags: UInt16
            let next: UInt16
            do {
                address = try memory.load(UInt64.self, at: entry)
                length = try memory.load(UInt32.self, at: entry + 8)
                flags = try memory.load(UInt16.self, at: entry + 12)
                next = try memory.load(UInt16.self, at: entry + 14)
            } catch {
                throw QueueError("descriptor \(index) of chain \(head): \(error)")
            }
            if flags & Self.descriptorIndirect != 0 {
                guard indirect else { throw QueueError("chain \(head) uses an indirect table without VIRTIO_F_INDIRECT_DESC") }
                guard !inIndirect else { throw QueueError("chain \(head) nests indirect tables") }
                guard flags & Self.descriptorNext == 0 else { throw QueueError("chain \(head) has an indirect descriptor with NEXT set") }
                guard length > 0, length % 16 == 0, Int(length / 16) <= Self.maxIndirectEntries else {
                    throw QueueError("chain \(head) has an indirect table of \(length) bytes (must be 16 to \(16 * Self.maxIndirectEntries), a multiple of 16)")
                }
                guard memory.contains(address, length: UInt64(length)) else {
                    throw QueueError("chain \(head) has an indirect table at 0x\(String(address, radix: 16)) outside guest RAM")
                }
                table = address
                tableSize = Int(length / 16)
                index = 0
                seen = 0
                inIndirect = true
                continue
            }
            guard memory.contains(address, length: UInt64(length)) else {
                throw QueueError("chain \(head) has a \(length)-byte buffer at 0x\(String(address, radix: 16)) outside guest RAM")
            }
            let buffer = GuestBuffer(address: address, length: Int(length))
            if flags & Self.descriptorWrite != 0 {
                result.writable.append(buffer)
            } else {
                guard result.writable.isEmpty else { throw QueueError("chain \(head) has a readable buffer after a writable one") }
                result.readable.append(buffer)
            }
            if flags & Self.descriptorNext == 0 { return result }
            guard Int(next) < tableSize else { throw QueueError("chain \(head) links to descriptor \(next), outside its table of \(tableSize)") }
            index = Int(next)
        }
    }

    /// Returns chain `head` to the driver with `length` bytes written into it.
    public mutating func addUsed(head: UInt16, length: Int) throws(QueueError) {
        try putUsed(head: head, length: length)
        try publishUsed()
    }

    /// Fills the next used-ring slot without showing it to the driver yet: chains that belong
    /// together (one received frame spread over several buffers) must appear at once.
    public mutating func putUsed(head: UInt16, length: Int) throws(QueueError) {
        let slot = usedRing + 4 + 8 * UInt64(nextUsed % size)
        do {
            try memory.store(UInt32(head), at: slot)
            try memory.store(UInt32(truncatingIfNeeded: length), at: slot + 4)
        } catch { throw QueueError("used ring: \(error)") }
        nextUsed &+= 1
    }

    /// Shows every slot filled so far to the driver (stores the used index).
    public mutating func publishUsed() throws(QueueError) {
        atomicMemoryFence(ordering: .releasing)
        try store16(nextUsed, usedRing + 2)
    }

    /// Asks the driver not to notify us (we are about to drain the ring anyway).
    public mutating func disableNotifications() throws(QueueError) {
        if !eventIndex { try store16(1, usedRing) }
    }

    /// Asks the driver to notify us again once it makes available the buffer at ring index `index`
    /// (default: the next one we would take); returns true if the available index has already moved
    /// past `index`, in which case the caller must look again instead of waiting.
    public mutating func enableNotifications(from index: UInt16? = nil) throws(QueueError) -> Bool {
        let from = index ?? lastAvailable
        if eventIndex {
            try store16(from, usedRing + 4 + 8 * UInt64(size))
        } else {
            try store16(0, usedRing)
        }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return try load16(availableRing + 2) != from
    }

    /// Whether the driver wants an interrupt for what was added since the last one.
    public mutating func needsInterrupt() throws(QueueError) -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIndex {
            let usedEvent = try load16(availableRing + 4 + 2 * UInt64(size))
            let old = signalledUsed
            signalledUsed = nextUsed
            return nextUsed &- usedEvent &- 1 < nextUsed &- old
        }
        return try load16(availableRing) & 1 == 0
    }
}
