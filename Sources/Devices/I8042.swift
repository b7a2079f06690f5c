// Devices (layer 2): a minimal i8042 keyboard controller at ports 0x60/0x64. Its job in a
// microVM is the reset line (command 0xFE) and Ctrl-Alt-Del delivery; there is no real keyboard.
import Synchronization

public final class I8042: BusDevice {
    /// Offset of the data port (0x60) and the command/status port (0x64) from base 0x60.
    public static let dataOffset: UInt64 = 0
    public static let commandOffset: UInt64 = 4

    struct State {
        var output: [UInt8] = []
        var controlByte: UInt8 = 0x47  // kbd interrupt on, system flag, translation
        var pendingCommand: UInt8?
    }

    private let state = Mutex(State())
    private let interrupt: any InterruptLine
    private let onRequest: MachineRequestHandler

    public init(interrupt: any InterruptLine, onRequest: @escaping MachineRequestHandler) {
        self.interrupt = interrupt
        self.onRequest = onRequest
    }

    public func read(offset: UInt64, size: Int) -> [UInt8] {
        let value: UInt8 = state.withLock { s in
            switch offset {
            case Self.dataOffset:
                return s.output.isEmpty ? 0 : s.output.removeFirst()
            case Self.commandOffset:
                // System flag and "not inhibited" always set; output-buffer-full when there is data.
                return 0x14 | (s.output.isEmpty ? 0 : 0x01)
            default:
                return 0xFF
            }
        }
        return [value] + [UInt8](repeating: 0, count: max(0, size - 1))
    }

    public func write(offset: UInt64, data: [UInt8]) {
        guard let value = data.first else { return }
        var reset = false
        let raise = state.withLock { s -> Bool in
            let before = s.output.count
            switch offset {
            case Self.commandOffset:
                switch value {
                case 0x20: s.output.append(s.controlByte)
                case 0x60, 0xD1, 0xD2, 0xD3, 0xD4: s.pendingCommand = value
                case 0xAA: s.output.append(0x55)
                case 0xAB: s.output.append(0x00)  // keyboard interface test: passed
                case 0xA9: s.output.append(0x01)  // aux interface test: failed, there is no mouse
                case 0xAD: s.controlByte |= 0x10
                case 0xAE: s.controlByte &= ~0x10
                case 0xA7: s.controlByte |= 0x20
                case 0xA8: s.controlByte &= ~0x20
                case 0xFE: reset = true
                default: break
                }
            case Self.dataOffset:
                if let command = s.pendingCommand {
                    s.pendingCommand = nil
                    switch command {
                    case 0x60: s.controlByte = value
                    case 0xD1: if value & 0x01 == 0 { reset = true }  // output port bit 0 low resets the CPU
                    case 0xD2: s.output.append(value)
                    default: break  // no auxiliary device
                    }
                } else {
                    // A command to the keyboard: acknowledge it like a real one.
                    s.output.append(0xFA)
                    if value == 0xFF { s.output.append(0xAA) }
                    if value == 0xF2 { s.output.append(contentsOf: [0xAB, 0x83]) }
                }
            default:
                break
            }
            return s.output.count > before && (s.controlByte & 0x01) != 0
        }
        if reset { onRequest(.reset) }
        if raise { interrupt.trigger() }
    }

    /// Queues the scan codes of Ctrl-Alt-Del being pressed and released (set 2).
    public func sendCtrlAltDel() {
        let codes: [UInt8] = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
        let raise = state.withLock { s -> Bool in
            s.output.append(contentsOf: codes)
            return (s.controlByte & 0x01) != 0
        }
        if raise { interrupt.trigger() }
    }
}
