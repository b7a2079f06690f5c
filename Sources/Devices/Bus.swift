// Devices (layer 2): the port-I/O and MMIO buses that route vCPU exits to devices.
import Synchronization

/// A device on the port-I/O or MMIO bus. Offsets are relative to the device's base.
public protocol BusDevice: AnyObject, Sendable {
    /// Returns `size` bytes for a guest read at `offset` (little endian).
    func read(offset: UInt64, size: Int) -> [UInt8]
    /// Handles a guest write of `data` at `offset`.
    func write(offset: UInt64, data: [UInt8])
}

/// An edge-triggered interrupt line into the guest.
public protocol InterruptLine: Sendable {
    func trigger()
}

/// A request from a device to end the VM.
public enum MachineRequest: Sendable, Equatable {
    /// The guest asked for a reset (i8042 0xFE, ACPI reset register).
    case reset
    /// The guest powered off through ACPI.
    case powerOff
}

/// Where a device sends `MachineRequest`s.
public typealias MachineRequestHandler = @Sendable (MachineRequest) -> Void

/// Two bus ranges overlap, or a range is empty.
public struct BusError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// Address ranges mapped to devices; built before the vCPUs start, read-only afterwards.
public final class Bus: Sendable {
    public struct Entry: Sendable {
        public let base: UInt64
        public let length: UInt64
        public let device: any BusDevice
    }

    private let entries: Mutex<[Entry]>

    public init() { entries = Mutex([]) }

    /// Maps `device` at `[base, base+length)`.
    public func insert(_ device: any BusDevice, base: UInt64, length: UInt64) throws(BusError) {
        guard length > 0, base.addingReportingOverflow(length).overflow == false else {
            throw BusError(description: "bus range at 0x\(String(base, radix: 16)) of \(length) bytes is empty or wraps")
        }
        try entries.withLock { list throws(BusError) in
            for e in list where base < e.base + e.length && e.base < base + length {
                throw BusError(description: "bus range 0x\(String(base, radix: 16))+\(length) overlaps a device at 0x\(String(e.base, radix: 16))")
            }
            list.append(Entry(base: base, length: length, device: device))
            list.sort { $0.base < $1.base }
        }
    }

    /// The device covering `address`, with the offset inside it.
    public func resolve(_ address: UInt64) -> (device: any BusDevice, offset: UInt64)? {
        entries.withLock { list in
            var lo = 0
            var hi = list.count
            while lo < hi {
                let mid = (lo + hi) / 2
                let e = list[mid]
                if address < e.base {
                    hi = mid
                } else if address >= e.base + e.length {
                    lo = mid + 1
                } else {
                    return (e.device, address - e.base)
                }
            }
            return nil
        }
    }

    /// Dispatches a read; unmapped addresses read as all ones, like an empty ISA/PCI bus.
    public func read(_ address: UInt64, size: Int) -> [UInt8] {
        guard let (device, offset) = resolve(address) else { return [UInt8](repeating: 0xFF, count: size) }
        return device.read(offset: offset, size: size)
    }

    /// Dispatches a write; writes to unmapped addresses are dropped. Returns whether a device took it.
    @discardableResult
    public func write(_ address: UInt64, data: [UInt8]) -> Bool {
        guard let (device, offset) = resolve(address) else { return false }
        device.write(offset: offset, data: data)
        return true
    }
}
