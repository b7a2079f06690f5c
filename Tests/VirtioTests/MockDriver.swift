// A virtio driver in the test process: lays out split rings in in-memory guest RAM, drives a
// VirtioMMIODevice through its registers the way Linux's virtio_mmio does, and reads results back.
import Devices
import Foundation
import GuestMemory
import LinuxSystem
import Logging
import Synchronization
import Testing

@testable import Virtio

final class CountingLine: InterruptLine {
    let count = Atomic<Int>(0)
    func trigger() { count.add(1, ordering: .sequentiallyConsistent) }
}

struct TestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A mock driver for one device.
final class MockDriver {
    let memory: GuestMemory
    let device: VirtioMMIODevice
    let line = CountingLine()
    let queueSize: UInt16 = 16
    var nextFreeDescriptor: [UInt16]
    var availableIndex: [UInt16]
    var usedSeen: [UInt16]
    var heap: UInt64 = 0x20_0000

    static let ramSize: UInt64 = 8 << 20

    func descriptorTable(_ q: Int) -> UInt64 { 0x1_0000 + UInt64(q) * 0x1_0000 }
    func availableRing(_ q: Int) -> UInt64 { descriptorTable(q) + 0x1000 }
    func usedRing(_ q: Int) -> UInt64 { descriptorTable(q) + 0x2000 }

    /// Negotiates `features` (default: everything offered) and sets DRIVER_OK unless `start` is false.
    init(_ backend: any VirtioBackend, features: UInt64? = nil, start: Bool = true) throws {
        memory = try GuestMemory(ranges: [(0, Self.ramSize)])
        device = try VirtioMMIODevice(
            backend: backend, memory: memory, interrupt: VirtioInterrupt(line: line), logger: Logger(label: "test"))
        let queues = backend.queueSizes.count
        nextFreeDescriptor = Array(repeating: 0, count: queues)
        availableIndex = Array(repeating: 0, count: queues)
        usedSeen = Array(repeating: 0, count: queues)
        if start { try self.start(features: features) }
    }

    func reg(_ offset: UInt64) -> UInt32 {
        let b = device.read(offset: offset, size: 4)
        return UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
    }

    func poke(_ offset: UInt64, _ value: UInt32) {
        device.write(offset: offset, data: withUnsafeBytes(of: value.littleEndian) { Array($0) })
    }

    var offered: UInt64 {
        poke(0x14, 0)
        let low = UInt64(reg(0x10))
        poke(0x14, 1)
        return low | UInt64(reg(0x10)) << 32
    }

    func negotiate(_ features: UInt64) -> Bool {
        poke(0x70, 1)
        poke(0x70, 3)
        poke(0x24, 0)
        poke(0x20, UInt32(truncatingIfNeeded: features))
        poke(0x24, 1)
        poke(0x20, UInt32(features >> 32))
        poke(0x70, 3 | 8)
        return reg(0x70) & 8 != 0
    }

    func start(features: UInt64?) throws {
        guard negotiate(features ?? offered) else { throw TestError("FEATURES_OK refused") }
        for q in 0..<nextFreeDescriptor.count {
            poke(0x30, UInt32(q))
            poke(0x38, UInt32(queueSize))
            poke(0x80, UInt32(descriptorTable(q)))
            poke(0x84, 0)
            poke(0x90, UInt32(availableRing(q)))
            poke(0x94, 0)
            poke(0xa0, UInt32(usedRing(q)))
            poke(0xa4, 0)
            poke(0x44, 1)
        }
        poke(0x70, 3 | 8 | 4)
    }

    /// Allocates `length` zeroed bytes of guest memory for buffers.
    func allocate(_ length: Int) -> UInt64 {
        let address = heap
        heap += UInt64((length + 15) & ~15)
        return address
    }

    func buffer(_ bytes: [UInt8]) throws -> UInt64 {
        let a = allocate(bytes.count)
        try memory.write(bytes, at: a)
        return a
    }

    /// Writes raw descriptor `index` of queue `q`.
    func writeDescriptor(_ q: Int, _ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16, table: UInt64? = nil) throws {
        let at = (table ?? descriptorTable(q)) + 16 * UInt64(index)
        try memory.store(address, at: at)
        try memory.store(length, at: at + 8)
        try memory.store(flags, at: at + 12)
        try memory.store(next, at: at + 14)
    }

    /// Publishes chain head `head` on queue `q` and notifies the device.
    func publish(_ q: Int, head: UInt16, notify: Bool = true) throws {
        let slot = availableRing(q) + 4 + 2 * UInt64(availableIndex[q] % queueSize)
        try memory.store(head, at: slot)
        availableIndex[q] &+= 1
        try memory.store(availableIndex[q], at: availableRing(q) + 2)
        if notify { poke(0x50, UInt32(q)) }
    }

    /// Adds a chain of `(address, length, writable)` buffers, optionally through an indirect table.
    @discardableResult
    func submit(_ q: Int, _ buffers: [(UInt64, Int, Bool)], indirect: Bool = false, notify: Bool = true) throws -> UInt16 {
        if indirect {
            let table = allocate(16 * buffers.count)
            for (i, b) in buffers.enumerated() {
                let last = i == buffers.count - 1
                try writeDescriptor(q, UInt16(i), address: b.0, length: UInt32(b.1), flags: (b.2 ? 2 : 0) | (last ? 0 : 1), next: UInt16(i + 1), table: table)
            }
            let head = nextFreeDescriptor[q]
            nextFreeDescriptor[q] = (head + 1) % queueSize
            try writeDescriptor(q, head, address: table, length: UInt32(16 * buffers.count), flags: 4, next: 0)
            try publish(q, head: head, notify: notify)
            return head
        }
        let head = nextFreeDescriptor[q]
        for (i, b) in buffers.enumerated() {
            let index = (head + UInt16(i)) % queueSize
            let last = i == buffers.count - 1
            try writeDescriptor(q, index, address: b.0, length: UInt32(b.1), flags: (b.2 ? 2 : 0) | (last ? 0 : 1), next: (index + 1) % queueSize)
        }
        nextFreeDescriptor[q] = (head + UInt16(buffers.count)) % queueSize
        try publish(q, head: head, notify: notify)
        return head
    }

    /// Waits for the next used element of queue `q`: (head, length).
    func waitUsed(_ q: Int, timeout: Double = 5) throws -> (UInt16, Int) {
        let deadline = Date().addingTimeInterval(timeout)
        while try memory.load(UInt16.self, at: usedRing(q) + 2) == usedSeen[q] {
            guard Date() < deadline else { throw TestError("queue \(q): nothing used within \(timeout) s") }
            usleep(1000)
        }
        let slot = usedRing(q) + 4 + 8 * UInt64(usedSeen[q] % queueSize)
        usedSeen[q] &+= 1
        return (UInt16(try memory.load(UInt32.self, at: slot)), Int(try memory.load(UInt32.self, at: slot + 4)))
    }

    /// Whether nothing more gets used on queue `q` within `wait` seconds.
    func nothingUsed(_ q: Int, wait: Double = 0.2) throws -> Bool {
        usleep(UInt32(wait * 1_000_000))
        return try memory.load(UInt16.self, at: usedRing(q) + 2) == usedSeen[q]
    }

    /// Waits until the device sets DEVICE_NEEDS_RESET.
    func waitNeedsReset(timeout: Double = 5) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while reg(0x70) & VirtioStatus.needsReset == 0 {
            if Date() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    func shutdown() { poke(0x70, 0) }
}

func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

func temporaryPath(_ name: String) -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("nimbus-virtio-\(UUID().uuidString.prefix(8))-\(name)").path
}
