import Devices
import GuestMemory
import Synchronization
import Testing

final class CountingLine: InterruptLine {
    let count = Mutex(0)
    func trigger() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

final class Collector: Sendable {
    let bytes = Mutex<[UInt8]>([])
    let requests = Mutex<[MachineRequest]>([])
}

@Suite struct SerialTests {
    func make() -> (Serial16550, CountingLine, Collector) {
        let line = CountingLine(), out = Collector()
        return (Serial16550(interrupt: line, sink: { b in out.bytes.withLock { $0 += b } }), line, out)
    }

    @Test func transmitsAndRaisesTHREInterrupt() {
        let (s, line, out) = make()
        s.write(offset: 1, data: [0x02])  // IER: THRE
        #expect(line.value == 1)
        #expect(s.read(offset: 2, size: 1) == [0x02])  // IIR: THRE, then cleared
        #expect(s.read(offset: 2, size: 1) == [0x01])
        s.write(offset: 0, data: [0x41])
        #expect(out.bytes.withLock { $0 } == [0x41])
        #expect(line.value == 2)
        #expect(s.read(offset: 5, size: 1)[0] & 0x60 == 0x60)  // LSR: THRE | TEMT
    }

    @Test func receivesInputThroughTheFIFO() {
        let (s, line, _) = make()
        s.write(offset: 1, data: [0x01])  // IER: received data
        s.enqueueInput(Array("hi".utf8))
        #expect(line.value == 1)
        #expect(s.read(offset: 5, size: 1)[0] & 1 == 1)
        #expect(s.read(offset: 2, size: 1)[0] & 0x0F == 0x04)
        #expect(s.read(offset: 0, size: 1) == [0x68])
        #expect(s.read(offset: 0, size: 1) == [0x69])
        #expect(s.read(offset: 5, size: 1)[0] & 1 == 0)
    }

    @Test func inputBeyondTheFIFOWaits() {
        let (s, _, _) = make()
        s.enqueueInput([UInt8](repeating: 7, count: 100))
        #expect(s.bufferedInputCount == 100)
        for _ in 0..<100 { _ = s.read(offset: 0, size: 1) }
        #expect(s.bufferedInputCount == 0)
    }

    @Test func loopbackAndModemStatusLikeA16550() {
        let (s, _, out) = make()
        s.write(offset: 4, data: [0x1A])  // loop | RTS | OUT2
        #expect(s.read(offset: 6, size: 1)[0] & 0xF0 == 0x90)
        s.write(offset: 0, data: [0x55])
        #expect(out.bytes.withLock { $0 }.isEmpty)
        #expect(s.read(offset: 0, size: 1) == [0x55])
    }

    @Test func divisorLatchAndScratch() {
        let (s, _, _) = make()
        s.write(offset: 3, data: [0x83])
        s.write(offset: 0, data: [0x01])
        s.write(offset: 1, data: [0x02])
        #expect(s.read(offset: 0, size: 1) == [0x01])
        #expect(s.read(offset: 1, size: 1) == [0x02])
        s.write(offset: 3, data: [0x03])
        s.write(offset: 7, data: [0xAB])
        #expect(s.read(offset: 7, size: 1) == [0xAB])
        s.write(offset: 2, data: [0x01])
        #expect(s.read(offset: 2, size: 1)[0] & 0xC0 == 0xC0)
    }
}

@Suite struct KeyboardAndPowerTests {
    @Test func i8042ResetAndSelfTest() {
        let c = Collector(), line = CountingLine()
        let k = I8042(interrupt: line, onRequest: { r in c.requests.withLock { $0.append(r) } })
        k.write(offset: 4, data: [0xAA])
        #expect(k.read(offset: 4, size: 1)[0] & 1 == 1)
        #expect(k.read(offset: 0, size: 1) == [0x55])
        k.write(offset: 0, data: [0xFF])
        #expect(k.read(offset: 0, size: 1) == [0xFA])
        #expect(k.read(offset: 0, size: 1) == [0xAA])
        k.write(offset: 4, data: [0xFE])
        #expect(c.requests.withLock { $0 } == [.reset])
        k.sendCtrlAltDel()
        #expect(k.read(offset: 0, size: 1) == [0x14])
    }

    @Test func acpiSleepControl() {
        let c = Collector()
        let p = ACPIPowerDevice(onRequest: { r in c.requests.withLock { $0.append(r) } })
        p.write(offset: 0, data: [0x14])  // S5 without SLP_EN: nothing
        p.write(offset: 0, data: [0x34])
        p.write(offset: 0, data: [0x01])
        #expect(c.requests.withLock { $0 } == [.powerOff, .reset])
    }
}

final class Register: BusDevice {
    func read(offset: UInt64, size: Int) -> [UInt8] { [UInt8(offset)] }
    func write(offset: UInt64, data: [UInt8]) {}
}

@Suite struct BusAndMemoryTests {
    @Test func busRoutesByRangeAndRejectsOverlap() throws {
        let bus = Bus()
        try bus.insert(Register(), base: 0x3f8, length: 8)
        try bus.insert(Register(), base: 0x60, length: 5)
        #expect(bus.read(0x3fa, size: 1) == [2])
        #expect(bus.read(0x64, size: 1) == [4])
        #expect(bus.read(0x500, size: 2) == [0xFF, 0xFF])
        #expect(bus.write(0x500, data: [1]) == false)
        #expect(throws: BusError.self) { try bus.insert(Register(), base: 0x3fc, length: 8) }
        #expect(throws: BusError.self) { try bus.insert(Register(), base: 0x1000, length: 0) }
    }

    @Test func guestMemoryChecksEveryAccess() throws {
        let m = try GuestMemory(ranges: [(0, 0x10000), (0x100000, 0x1000)])
        try m.store(UInt32(0xdeadbeef), at: 0xFFFC)
        #expect(try m.load(UInt32.self, at: 0xFFFC) == 0xdeadbeef)
        #expect(throws: GuestMemoryError.self) { try m.load(UInt64.self, at: 0xFFFC) }
        #expect(throws: GuestMemoryError.self) { try m.read(16, at: 0x20000) }
        #expect(throws: GuestMemoryError.self) { try m.write([1, 2], at: UInt64.max) }
        #expect(throws: GuestMemoryError.self) { try m.read(0x2000, at: 0xF000) }
        try m.write([1, 2, 3], at: 0x100FFD)
        #expect(try m.read(3, at: 0x100FFD) == [1, 2, 3])
        #expect(throws: GuestMemoryError.self) { try GuestMemory(ranges: [(0, 100)]) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory(ranges: [(0x2000, 0x1000), (0x1000, 0x1000)]) }
    }
}
