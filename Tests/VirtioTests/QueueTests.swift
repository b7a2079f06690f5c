// Split-virtqueue parsing against well-formed and hostile rings, with no device behind it.
import GuestMemory
import Testing

@testable import Virtio

@Suite struct QueueTests {
    let memory: GuestMemory
    let desc: UInt64 = 0x1000
    let avail: UInt64 = 0x2000
    let used: UInt64 = 0x3000

    init() throws { memory = try GuestMemory(ranges: [(0, 1 << 20)]) }

    func queue(features: UInt64 = VirtioFeature.indirectDescriptors) throws -> Virtqueue {
        var setup = QueueSetup(size: 8)
        setup.descriptorTable = desc
        setup.availableRing = avail
        setup.usedRing = used
        return try Virtqueue(setup: setup, memory: memory, features: features)
    }

    func put(_ index: UInt64, _ address: UInt64, _ length: UInt32, _ flags: UInt16, _ next: UInt16, table: UInt64? = nil) throws {
        let at = (table ?? desc) + 16 * index
        try memory.store(address, at: at)
        try memory.store(length, at: at + 8)
        try memory.store(flags, at: at + 12)
        try memory.store(next, at: at + 14)
    }

    func offer(_ heads: [UInt16]) throws {
        for (i, h) in heads.enumerated() { try memory.store(h, at: avail + 4 + 2 * UInt64(i)) }
        try memory.store(UInt16(heads.count), at: avail + 2)
    }

    func popError(_ q: inout Virtqueue) -> String {
        do {
            _ = try q.pop()
            return "no error"
        } catch { return error.description }
    }

    @Test func readsChainsAndPublishesUsed() throws {
        try put(0, 0x8000, 16, 1, 1)
        try put(1, 0x9000, 512, 1 | 2, 2)
        try put(2, 0xa000, 1, 2, 0)
        try offer([0])
        var q = try queue()
        let chain = try #require(try q.pop())
        #expect(chain.readable == [GuestBuffer(address: 0x8000, length: 16)])
        #expect(chain.writable.map(\.length) == [512, 1])
        #expect(try q.pop() == nil)
        try q.addUsed(head: 0, length: 513)
        #expect(try memory.load(UInt16.self, at: used + 2) == 1)
        #expect(try memory.load(UInt32.self, at: used + 4) == 0)
        #expect(try memory.load(UInt32.self, at: used + 8) == 513)
        // No EVENT_IDX: the driver's NO_INTERRUPT flag decides.
        #expect(try q.needsInterrupt())
        try memory.store(UInt16(1), at: avail)
        #expect(try q.needsInterrupt() == false)
    }

    @Test func usedEntriesOfOneFrameAppearTogether() throws {
        try put(0, 0x8000, 64, 2, 0)
        try put(1, 0x9000, 64, 2, 0)
        try offer([0, 1])
        var q = try queue()
        _ = try q.pop()
        _ = try q.pop()
        try q.putUsed(head: 0, length: 64)
        try q.putUsed(head: 1, length: 10)
        #expect(try memory.load(UInt16.self, at: used + 2) == 0)
        try q.publishUsed()
        #expect(try memory.load(UInt16.self, at: used + 2) == 2)
        #expect(try memory.load(UInt32.self, at: used + 12) == 1 && memory.load(UInt32.self, at: used + 16) == 10)
    }

    @Test func indirectTables() throws {
        let table: UInt64 = 0x6000
        try put(0, 0x8000, 16, 1, 1, table: table)
        try put(1, 0x9000, 8, 2, 0, table: table)
        try put(0, table, 32, 4, 0)
        try offer([0])
        var q = try queue()
        let chain = try #require(try q.pop())
        #expect(chain.readableLength == 16 && chain.writableLength == 8)
        var plain = try queue(features: 0)
        #expect(popError(&plain).contains("without VIRTIO_F_INDIRECT_DESC"))
    }

    @Test func hostileChainsAreRefused() throws {
        // A loop: 0 -> 1 -> 0.
        try put(0, 0x8000, 16, 1, 1)
        try put(1, 0x8000, 16, 1, 0)
        try offer([0])
        var q = try queue()
        #expect(popError(&q).contains("loop"))

        // A buffer outside guest RAM, and one that wraps the address space.
        try put(0, 0xFFFF_FFFF_FFFF_F000, 0x2000, 0, 0)
        q = try queue()
        #expect(popError(&q).contains("outside guest RAM"))
        try put(0, 1 << 20, 1, 0, 0)
        q = try queue()
        #expect(popError(&q).contains("outside guest RAM"))

        // Next index outside the table, and a head outside the queue.
        try put(0, 0x8000, 16, 1, 9)
        q = try queue()
        #expect(popError(&q).contains("outside its table"))
        try offer([8])
        q = try queue()
        #expect(popError(&q).contains("outside the queue"))

        // Readable after writable.
        try put(0, 0x8000, 16, 2 | 1, 1)
        try put(1, 0x8000, 16, 0, 0)
        try offer([0])
        q = try queue()
        #expect(popError(&q).contains("readable buffer after a writable"))

        // Indirect: nested, with NEXT, bad sizes, loops inside the table.
        let table: UInt64 = 0x6000
        try put(0, table, 16, 4, 0, table: table)
        try put(0, table, 16, 4, 0)
        q = try queue()
        #expect(popError(&q).contains("nests"))
        try put(0, table, 16, 4 | 1, 1)
        q = try queue()
        #expect(popError(&q).contains("NEXT"))
        try put(0, table, 17, 4, 0)
        q = try queue()
        #expect(popError(&q).contains("multiple of 16"))
        try put(0, table, 0, 4, 0)
        q = try queue()
        #expect(popError(&q).contains("indirect table of 0 bytes"))
        try put(0, table, 32, 4, 0)
        try put(0, 0x8000, 1, 1, 1, table: table)
        try put(1, 0x8000, 1, 1, 0, table: table)
        q = try queue()
        #expect(popError(&q).contains("loop"))

        // The available index running more than a queue's worth ahead.
        try memory.store(UInt16(9), at: avail + 2)
        q = try queue()
        #expect(popError(&q).contains("more than the queue size"))
    }

    @Test func ringPlacementIsChecked() throws {
        var setup = QueueSetup(size: 8)
        setup.descriptorTable = 0xFFF8_0000
        #expect(throws: QueueError.self) { try Virtqueue(setup: setup, memory: memory, features: 0) }
        setup = QueueSetup(size: 6)
        #expect(throws: QueueError.self) { try Virtqueue(setup: setup, memory: memory, features: 0) }
        setup = QueueSetup(size: 8)
        setup.usedRing = 2
        #expect(throws: QueueError.self) { try Virtqueue(setup: setup, memory: memory, features: 0) }
    }

    @Test func eventIndexSuppression() throws {
        try put(0, 0x8000, 4, 2, 0)
        try offer([0, 0, 0])
        var q = try queue(features: VirtioFeature.eventIndex)
        // used_event = 1: interrupt only once the used index passes 1.
        try memory.store(UInt16(1), at: avail + 4 + 2 * 8)
        _ = try q.pop()
        try q.addUsed(head: 0, length: 0)
        #expect(try q.needsInterrupt() == false)
        _ = try q.pop()
        try q.addUsed(head: 0, length: 0)
        #expect(try q.needsInterrupt())
        // enableNotifications publishes avail_event and reports work still pending.
        #expect(try q.enableNotifications())
        #expect(try memory.load(UInt16.self, at: used + 4 + 8 * 8) == 2)
    }
}
