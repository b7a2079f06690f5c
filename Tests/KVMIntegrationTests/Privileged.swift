// Gating for tests that need root, /dev/kvm or peer tools. With NIMBUS_REQUIRE_PRIVILEGED=1 (as
// in CI) such tests always run, so a missing capability fails them instead of skipping them.
import Glibc

enum Privileged {
    static var required: Bool { getenv("NIMBUS_REQUIRE_PRIVILEGED").map { String(cString: $0) == "1" } ?? false }
    static var kvmAvailable: Bool { access("/dev/kvm", R_OK | W_OK) == 0 }
    /// Whether KVM tests should run: KVM is there, or CI demands they run.
    static var runKVM: Bool { kvmAvailable || required }
}

/// A minimal ELF64 executable with one PT_LOAD of `code` at `address` and entry at its start.
enum TinyELF {
    static func make(code: [UInt8], address: UInt64 = 0x100000) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 0x1000)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            var x = v.littleEndian
            for i in 0..<MemoryLayout<T>.size { out[at + i] = UInt8(truncatingIfNeeded: x); x >>= 8 }
        }
        out.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
        out[4] = 2; out[5] = 1; out[6] = 1
        put(UInt16(2), 16)  // ET_EXEC
        put(UInt16(62), 18)  // x86-64
        put(UInt32(1), 20)
        put(address, 24)  // entry
        put(UInt64(64), 32)  // phoff
        put(UInt16(64), 52)  // ehsize
        put(UInt16(56), 54)
        put(UInt16(1), 56)
        // PT_LOAD
        put(UInt32(1), 64)
        put(UInt32(5), 68)
        put(UInt64(0x1000), 72)  // offset
        put(address, 80)  // vaddr
        put(address, 88)  // paddr
        put(UInt64(code.count), 96)
        put(UInt64(code.count), 104)
        put(UInt64(0x1000), 112)
        return out + code
    }

    /// Writes "OK\n" to the serial port, then asks the i8042 for a reset.
    static let helloAndReset: [UInt8] = [
        0x66, 0xBA, 0xF8, 0x03,  // mov dx, 0x3f8
        0xB0, 0x4F, 0xEE,  // mov al, 'O'; out dx, al
        0xB0, 0x4B, 0xEE,  // mov al, 'K'; out dx, al
        0xB0, 0x0A, 0xEE,  // mov al, '\n'; out dx, al
        0xB0, 0xFE, 0xE6, 0x64,  // mov al, 0xfe; out 0x64, al
        0xF4, 0xEB, 0xFD,  // hlt; jmp hlt
    ]

    /// Writes "P" then powers off through the ACPI sleep-control register (S5 | SLP_EN).
    static let acpiPowerOff: [UInt8] = [
        0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x50, 0xEE,  // 'P' to the serial port
        0x66, 0xBA, 0x00, 0x06, 0xB0, 0x34, 0xEE,  // mov dx, 0x600; mov al, 0x34; out dx, al
        0xF4, 0xEB, 0xFD,
    ]

    /// Executes ud2 with an empty IDT: #UD → #GP → #DF → triple fault.
    static let tripleFault: [UInt8] = [0x0F, 0x0B, 0xF4, 0xEB, 0xFD]

    /// Reads a byte from the serial port once one arrives and echoes it doubled, then resets.
    static let echoInput: [UInt8] = [
        0x66, 0xBA, 0xFD, 0x03,  // mov dx, 0x3fd (LSR)
        0xEC, 0xA8, 0x01, 0x74, 0xFB,  // in al, dx; test al, 1; jz -5
        0x66, 0xBA, 0xF8, 0x03, 0xEC,  // mov dx, 0x3f8; in al, dx
        0xEE, 0xEE,  // out dx, al twice
        0xB0, 0xFE, 0xE6, 0x64, 0xF4,  // reset
    ]
}
