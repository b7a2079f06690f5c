// Devices (layer 2): a 16550A UART, the guest's serial console at 0x3f8 / IRQ 4.
import Synchronization

/// Where the serial console's output goes.
public typealias SerialSink = @Sendable ([UInt8]) -> Void

/// A 16550A UART with a 64-byte receive FIFO and an always-empty transmitter.
public final class Serial16550: BusDevice {
    // Register offsets.
    static let data: UInt64 = 0, ier: UInt64 = 1, iir: UInt64 = 2, lcr: UInt64 = 3
    static let mcr: UInt64 = 4, lsr: UInt64 = 5, msr: UInt64 = 6, scratch: UInt64 = 7
    // Bits.
    static let ierReceived: UInt8 = 0x01, ierTransmitEmpty: UInt8 = 0x02
    static let lcrDLAB: UInt8 = 0x80, mcrLoop: UInt8 = 0x10
    static let lsrDataReady: UInt8 = 0x01, lsrTHREmpty: UInt8 = 0x20, lsrIdle: UInt8 = 0x40
    static let iirNone: UInt8 = 0x01, iirTHR: UInt8 = 0x02, iirReceived: UInt8 = 0x04, iirFIFO: UInt8 = 0xC0
    /// Capacity of the receive FIFO; input beyond it waits in `pendingInput`.
    public static let fifoSize = 64

    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03
        var mcr: UInt8 = 0x08
        var scratch: UInt8 = 0
        var dll: UInt8 = 0x0C
        var dlm: UInt8 = 0
        var fifoEnabled = false
        var thrInterruptPending = false
        var rx: [UInt8] = []
        var pendingInput: [UInt8] = []
    }

    private let state = Mutex(State())
    private let interrupt: any InterruptLine
    private let sink: SerialSink

    public init(interrupt: any InterruptLine, sink: @escaping SerialSink) {
        self.interrupt = interrupt
        self.sink = sink
    }

    /// Queues host input for the guest to read.
    public func enqueueInput(_ bytes: [UInt8]) {
        let raise = state.withLock { s in
            s.pendingInput.append(contentsOf: bytes)
            return Self.refill(&s) && (s.ier & Self.ierReceived) != 0
        }
        if raise { interrupt.trigger() }
    }

    /// Bytes accepted from the host that the guest has not read yet.
    public var bufferedInputCount: Int { state.withLock { $0.rx.count + $0.pendingInput.count } }

    private static func refill(_ s: inout State) -> Bool {
        var moved = false
        while s.rx.count < fifoSize, !s.pendingInput.isEmpty {
            s.rx.append(s.pendingInput.removeFirst())
            moved = true
        }
        return moved
    }

    public func read(offset: UInt64, size: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: max(size, 1))
        out[0] = readRegister(offset)
        return Array(out.prefix(size))
    }

    public func write(offset: UInt64, data: [UInt8]) {
        guard let value = data.first else { return }
        writeRegister(offset, value)
    }

    func readRegister(_ offset: UInt64) -> UInt8 {
        let (value, raise) = state.withLock { s -> (UInt8, Bool) in
            let dlab = (s.lcr & Self.lcrDLAB) != 0
            switch offset {
            case Self.data:
                if dlab { return (s.dll, false) }
                guard !s.rx.isEmpty else { return (0, false) }
                let byte = s.rx.removeFirst()
                let refilled = Self.refill(&s)
                return (byte, refilled && (s.ier & Self.ierReceived) != 0)
            case Self.ier:
                return (dlab ? s.dlm : s.ier, false)
            case Self.iir:
                var id = Self.iirNone
                if (s.ier & Self.ierReceived) != 0 && !s.rx.isEmpty {
                    id = Self.iirReceived
                } else if (s.ier & Self.ierTransmitEmpty) != 0 && s.thrInterruptPending {
                    id = Self.iirTHR
                    s.thrInterruptPending = false
                }
                return (id | (s.fifoEnabled ? Self.iirFIFO : 0), false)
            case Self.lcr: return (s.lcr, false)
            case Self.mcr: return (s.mcr, false)
            case Self.lsr:
                return ((s.rx.isEmpty ? 0 : Self.lsrDataReady) | Self.lsrTHREmpty | Self.lsrIdle, false)
            case Self.msr:
                if (s.mcr & Self.mcrLoop) != 0 {
                    // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
                    let m = s.mcr
                    var v: UInt8 = 0
                    if m & 0x01 != 0 { v |= 0x20 }
                    if m & 0x02 != 0 { v |= 0x10 }
                    if m & 0x04 != 0 { v |= 0x40 }
                    if m & 0x08 != 0 { v |= 0x80 }
                    return (v, false)
                }
                return (0xB0, false)  // DCD, DSR, CTS: a connected line.
            case Self.scratch: return (s.scratch, false)
            default: return (0xFF, false)
            }
        }
        if raise { interrupt.trigger() }
        return value
    }

    func writeRegister(_ offset: UInt64, _ value: UInt8) {
        var output: UInt8?
        let raise = state.withLock { s -> Bool in
            let dlab = (s.lcr & Self.lcrDLAB) != 0
            switch offset {
            case Self.data:
                if dlab { s.dll = value; return false }
                if (s.mcr & Self.mcrLoop) != 0 {
                    if s.rx.count < Self.fifoSize { s.rx.append(value) }
                    s.thrInterruptPending = true
                    return (s.ier & (Self.ierReceived | Self.ierTransmitEmpty)) != 0
                }
                output = value
                s.thrInterruptPending = true
                return (s.ier & Self.ierTransmitEmpty) != 0
            case Self.ier:
                if dlab { s.dlm = value; return false }
                let enabledTHR = (value & Self.ierTransmitEmpty) != 0 && (s.ier & Self.ierTransmitEmpty) == 0
                s.ier = value & 0x0F
                if enabledTHR { s.thrInterruptPending = true }
                return enabledTHR || ((value & Self.ierReceived) != 0 && !s.rx.isEmpty)
            case Self.iir:  // FCR
                s.fifoEnabled = (value & 0x01) != 0
                if value & 0x02 != 0 { s.rx.removeAll() }
                return false
            case Self.lcr: s.lcr = value; return false
            case Self.mcr: s.mcr = value & 0x1F; return false
            case Self.scratch: s.scratch = value; return false
            default: return false
            }
        }
        if let output { sink([output]) }
        if raise { interrupt.trigger() }
    }
}
