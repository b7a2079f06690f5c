// KVM smoke tests on this host's /dev/kvm: tiny guests that do port I/O, MMIO and hlt. These run
// even on nested KVM that cannot boot Linux (see shared/GUIDE.md); Linux boots are NestedHostTests.
import GuestMemory
import KVM
import LinuxSystem
import Testing

@Suite(.enabled(if: Privileged.runKVM, "needs /dev/kvm"), .serialized)
struct KVMSmokeTests {
    /// A real-mode guest at 0x1000 that writes to a port, reads MMIO, and halts.
    @Test func realModePortIOMMIOAndHalt() throws {
        let kvm = try KVM()
        let vm = try kvm.createVM()
        let memory = try GuestMemory(ranges: [(0, 0x10000)])
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: 0x10000, hostAddress: memory.hostAddress(of: memory.regions[0]))
        let code: [UInt8] = [
            0xBA, 0xF8, 0x03,  // mov dx, 0x3f8
            0xB0, 0x41, 0xEE,  // mov al, 'A'; out dx, al
            0xB8, 0x00, 0x10,  // mov ax, 0x1000
            0x8E, 0xD8,  // mov ds, ax  (ds base 0x10000: outside RAM → MMIO)
            0xA0, 0x10, 0x00,  // mov al, [0x10]  → MMIO read at 0x10010
            0xEE,  // out dx, al (the MMIO value)
            0xA2, 0x20, 0x00,  // mov [0x20], al → MMIO write at 0x10020
            0xF4,  // hlt
        ]
        try memory.write(code, at: 0x1000)
        let vcpu = try vm.createVCPU(id: 0)
        var s = try vcpu.specialRegisters()
        var cs = s.cs
        cs.base = 0
        cs.selector = 0
        s.cs = cs
        try vcpu.setSpecialRegisters(s)
        var r = Registers()
        r.rip = 0x1000
        r.rflags = 2
        try vcpu.setRegisters(r)

        var outputs: [[UInt8]] = []
        var mmioWrites: [(UInt64, [UInt8])] = []
        var mmioReads: [UInt64] = []
        loop: for _ in 0..<100 {
            switch try vcpu.run() {
            case .ioOut(let port, _, let data):
                #expect(port == 0x3f8)
                outputs.append(data)
            case .mmioRead(let address, let length):
                mmioReads.append(address)
                #expect(length == 1)
                vcpu.completeMMIORead([0x5A])
            case .mmioWrite(let address, let data):
                mmioWrites.append((address, data))
            case .hlt:
                break loop
            case let other:
                Issue.record("unexpected exit \(other)")
                break loop
            }
        }
        #expect(outputs == [[0x41], [0x5A]])
        #expect(mmioReads == [0x10010])
        #expect(mmioWrites.count == 1)
        #expect(mmioWrites.first?.0 == 0x10020)
        #expect(mmioWrites.first?.1 == [0x5A])
    }

    @Test func supportedCPUIDHasBasicLeaves() throws {
        let leaves = try KVM().supportedCPUID()
        #expect(leaves.contains { $0.function == 0 })
        #expect(leaves.contains { $0.function == 1 })
    }

    @Test func missingDeviceIsAClearError() {
        #expect(throws: KVMError.self) { try KVM(path: "/nonexistent/kvm") }
        do {
            _ = try KVM(path: "/nonexistent/kvm")
        } catch {
            #expect("\(error)".contains("/nonexistent/kvm"))
        }
    }
}
