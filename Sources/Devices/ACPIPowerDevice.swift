// Devices (layer 2): the hardware-reduced ACPI sleep-control and reset register. The FADT points
// the guest's SLEEP_CONTROL_REG, SLEEP_STATUS_REG and RESET_REG here (one I/O port).
public final class ACPIPowerDevice: BusDevice {
    /// The value the FADT names as RESET_VALUE.
    public static let resetValue: UInt8 = 0x01
    /// The S5 (soft-off) sleep type the DSDT's `_S5_` package announces.
    public static let softOffSleepType: UInt8 = 5
    static let sleepEnable: UInt8 = 0x20

    private let onRequest: MachineRequestHandler

    public init(onRequest: @escaping MachineRequestHandler) {
        self.onRequest = onRequest
    }

    public func read(offset: UInt64, size: Int) -> [UInt8] {
        [UInt8](repeating: 0, count: size)  // sleep status: never "woken"
    }

    public func write(offset: UInt64, data: [UInt8]) {
        guard offset == 0, let value = data.first else { return }
        if value == Self.resetValue {
            onRequest(.reset)
        } else if value & Self.sleepEnable != 0 && (value >> 2) & 0x7 == Self.softOffSleepType {
            onRequest(.powerOff)
        }
    }
}
