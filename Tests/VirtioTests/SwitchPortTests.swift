// virtio-net plugged straight into a switch bridge in the same process (no TAP): a VMPort's backend
// under the mock driver, a running datapath, and an in-process MemoryPort as the other host.
import Foundation
import LinuxSystem
import Logging
import Testing

@testable import Switch
@testable import Virtio

@Suite(.serialized) struct SwitchPortTests {
    static func mac(_ last: UInt8) -> [UInt8] { [0x02, 0, 0, 0, 0, last] }

    /// An Ethernet frame from host `src` to host `dst` with an IPv4/TCP packet carrying `payload` bytes.
    static func tcpFrame(from src: UInt8, to dst: UInt8, payload: Int) -> [UInt8] {
        var frame = mac(dst) + mac(src) + [0x08, 0x00]
        let total = 20 + 20 + payload
        frame += [0x45, 0, UInt8(total >> 8), UInt8(total & 0xFF), 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, src, 10, 0, 0, dst]
        frame += [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0]
        frame += (0..<payload).map { UInt8(truncatingIfNeeded: $0) }
        return frame
    }

    func waitFor(_ port: MemoryPort) -> [[UInt8]] {
        for _ in 0..<400 {
            let frames = port.take()
            if !frames.isEmpty { return frames }
            Thread.sleep(forTimeInterval: 0.005)
        }
        return []
    }

    @Test func guestTrafficCrossesTheBridgeWithoutATap() throws {
        let datapath = try Datapath(name: "vmtest", logger: Logger(label: "test"))
        let vmPort = try VMPort(name: "vm0", ofport: 1)
        let host = try MemoryPort(name: "host", ofport: 2)
        datapath.add(vmPort)
        datapath.add(host)
        datapath.configure(PipelineConfig(ports: [1: VLANConfig(), 2: VLANConfig()], tables: FlowTables.normalOnly().snapshot()))
        try datapath.start()
        defer { datapath.stop() }
        let net = VirtioNet(ifaceID: "eth0", backend: vmPort.backend, mac: Self.mac(1), logger: logger)
        let d = try MockDriver(net)
        defer { d.shutdown() }

        // Guest → switch → the other host: the 12-byte header is gone, the frame intact.
        let outgoing = Self.tcpFrame(from: 1, to: 2, payload: 100)
        try d.submit(1, [(try d.buffer([UInt8](repeating: 0, count: 12)), 12, false), (try d.buffer(outgoing), outgoing.count, false)])
        _ = try d.waitUsed(1)
        #expect(waitFor(host) == [outgoing])
        #expect(vmPort.counters.rxPackets == 1)

        // The other host → switch (MAC learned: unicast to the VM) → guest, header first.
        let incoming = Self.tcpFrame(from: 2, to: 1, payload: 200)
        host.inject(incoming)
        let buffer = d.allocate(2048)
        try d.submit(0, [(buffer, 2048, true)])
        let (_, length) = try d.waitUsed(0)
        #expect(length == 12 + incoming.count)
        #expect(try d.memory.read(incoming.count, at: buffer + 12) == incoming)
        #expect(try d.memory.read(10, at: buffer) == [UInt8](repeating: 0, count: 10))

        // A frame shorter than an Ethernet header is refused at the port, and the device goes on.
        try d.submit(1, [(try d.buffer([UInt8](repeating: 0, count: 16)), 16, false)])
        _ = try d.waitUsed(1)
        try d.submit(1, [(try d.buffer([UInt8](repeating: 0, count: 12)), 12, false), (try d.buffer(outgoing), outgoing.count, false)])
        _ = try d.waitUsed(1)
        #expect(waitFor(host) == [outgoing])
    }

    @Test func aVMBridgeJoinsASwitchBridgeOverUnixDatagrams() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dgram-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let vmSide = directory + "/vm.sock"
        let switchSide = directory + "/switch.sock"
        func bridge(_ name: String, _ ports: [any DatapathPort]) throws -> Datapath {
            let datapath = try Datapath(name: name, logger: Logger(label: "test"))
            for port in ports { datapath.add(port) }
            let vlans = Dictionary(uniqueKeysWithValues: ports.map { ($0.ofport, VLANConfig()) })
            datapath.configure(PipelineConfig(ports: vlans, tables: FlowTables.normalOnly().snapshot()))
            try datapath.start()
            return datapath
        }
        // nimbus-vmm's side: the guest's port and a dgram uplink; the switch's side: a dgram port and
        // another VM's port, both with virtio-net headers.
        let guest = try VMPort(name: "vm0", ofport: 1)
        let uplink = try DatagramPort(name: "up", ofport: 2, localPath: vmSide, remotePath: switchSide, vnetHeader: true)
        let vmBridge = try bridge("vmside", [guest, uplink])
        defer { vmBridge.stop() }
        let other = try VMPort(name: "vm1", ofport: 1)
        let port = try DatagramPort(name: "vm0", ofport: 2, localPath: switchSide, remotePath: vmSide, vnetHeader: true)
        let switchBridge = try bridge("switchside", [other, port])
        defer { switchBridge.stop() }
        try guest.backend.guestAccepts(checksum: true, tso4: true, tso6: false)
        try other.backend.guestAccepts(checksum: true, tso4: true, tso6: false)

        // A TSO super-frame from the guest reaches the other VM whole, its header intact (the
        // uplink connects to its peer within a second of the peer's socket existing).
        let superFrame = Self.tcpFrame(from: 1, to: 2, payload: 3000)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoTCPv4, headerLength: 54, gsoSize: 1000, checksumStart: 34,
            checksumOffset: 16)
        let wire = header.wire + [0, 0] + superFrame
        var buffer = [UInt8](repeating: 0, count: 70_000)
        var arrived: [UInt8]?
        for _ in 0..<300 where arrived == nil {
            _ = try wire.withUnsafeBytes { try guest.backend.send([$0]) }
            Thread.sleep(forTimeInterval: 0.01)
            if case .done(let n) = try buffer.withUnsafeMutableBytes({ try other.backend.receive(into: $0) }) { arrived = Array(buffer[0..<n]) }
        }
        #expect(arrived == wire)
        // And back: the answer finds the guest (its MAC was learned on both bridges).
        let answer = Self.tcpFrame(from: 2, to: 1, payload: 100)
        _ = try ([UInt8](repeating: 0, count: 12) + answer).withUnsafeBytes { try other.backend.send([$0]) }
        var back: [UInt8]?
        for _ in 0..<300 where back == nil {
            Thread.sleep(forTimeInterval: 0.01)
            if case .done(let n) = try buffer.withUnsafeMutableBytes({ try guest.backend.receive(into: $0) }), n == 12 + answer.count {
                back = Array(buffer[12..<n])
            }
        }
        #expect(back == answer)
    }

    @Test func aDatagramPortReplacesOnlyAStaleSocket() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dgram-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/port.sock"
        var first: DatagramPort? = try DatagramPort(name: "a", ofport: 1, localPath: path, remotePath: directory + "/peer", vnetHeader: true)
        // Someone is bound there: a second port must not take the path away.
        #expect(throws: SystemError.self) {
            _ = try DatagramPort(name: "b", ofport: 2, localPath: path, remotePath: directory + "/peer", vnetHeader: true)
        }
        #expect(first != nil)
        first = nil
        // Left behind by a closed socket (a daemon restart): replaced.
        _ = try DatagramPort(name: "c", ofport: 3, localPath: path, remotePath: directory + "/peer", vnetHeader: true)
        // Not a socket at all: refused.
        let file = directory + "/file"
        _ = FileManager.default.createFile(atPath: file, contents: Data("keep".utf8))
        #expect(throws: SystemError.self) {
            _ = try DatagramPort(name: "d", ofport: 4, localPath: file, remotePath: directory + "/peer", vnetHeader: true)
        }
        #expect(FileManager.default.contents(atPath: file) == Data("keep".utf8))
    }

    @Test func gatherSkipsAndStopsAcrossBuffers() {
        let parts: [[UInt8]] = [[0, 1, 2], [3, 4], [], [5, 6, 7, 8]]
        func gather(from: Int, count: Int = .max) -> [UInt8] {
            func nest(_ index: Int, _ done: [UnsafeRawBufferPointer]) -> [UInt8] {
                guard index < parts.count else { return RawBytes.gather(done, from: from, count: count) }
                return parts[index].withUnsafeBytes { nest(index + 1, done + [$0]) }
            }
            return nest(0, [])
        }
        #expect(gather(from: 0) == Array(0...8))
        #expect(gather(from: 4) == [4, 5, 6, 7, 8])
        #expect(gather(from: 2, count: 4) == [2, 3, 4, 5])
        #expect(gather(from: 0, count: 3) == [0, 1, 2])
        #expect(gather(from: 20).isEmpty)
    }

    @Test func datagramPortOptionsAreChecked() {
        #expect(DatagramPort.optionsProblem(["local_path": "/a", "remote_path": "/b"]) == nil)
        #expect(DatagramPort.optionsProblem(["local_path": "/a"])?.contains("remote_path") == true)
        #expect(DatagramPort.optionsProblem(["local_path": "a", "remote_path": "/b"])?.contains("absolute") == true)
        #expect(DatagramPort.optionsProblem(["local_path": "/a", "remote_path": "/b", "vnet_hdr": "yes"])?.contains("vnet_hdr") == true)
    }

    @Test func offloadsPassOnlyToAGuestThatTakesThem() throws {
        let port = try VMPort(name: "vm1", ofport: 1)
        let superFrame = Self.tcpFrame(from: 1, to: 2, payload: 3000)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoTCPv4, headerLength: 54, gsoSize: 1000, checksumStart: 34,
            checksumOffset: 16)
        let batch = FrameBatch(capacity: 1)
        #expect(batch.append(superFrame, header: header))
        var buffer = [UInt8](repeating: 0, count: 70_000)
        func received() throws -> [[UInt8]] {
            var frames: [[UInt8]] = []
            while case .done(let n) = try buffer.withUnsafeMutableBytes({ try port.backend.receive(into: $0) }) {
                frames.append(Array(buffer[0..<n]))
            }
            return frames
        }

        // A guest with checksum and TSO4 offloads gets the super-frame whole, header and all.
        try port.backend.guestAccepts(checksum: true, tso4: true, tso6: false)
        #expect(port.send([FrameRef(batch, 0)]) == 1)
        let whole = try received()
        #expect(whole == [header.wire + [0, 0] + superFrame])

        // A guest without them gets wire-ready segments with an empty header.
        try port.backend.guestAccepts(checksum: false, tso4: false, tso6: false)
        #expect(port.send([FrameRef(batch, 0)]) == 1)
        let segments = try received()
        #expect(segments.count == 3)
        #expect(segments.allSatisfy { $0.count == 12 + 54 + 1000 && $0.prefix(12).allSatisfy { $0 == 0 } })
    }

    @Test func udpSuperFramesReachAGuestAsDatagrams() throws {
        // virtio-net has no USO feature here: a guest that takes TSO still gets UDP_SEGMENT
        // super-frames cut into datagrams.
        let port = try VMPort(name: "vm3", ofport: 1)
        try port.backend.guestAccepts(checksum: true, tso4: true, tso6: true)
        var frame = Self.mac(2) + Self.mac(1) + [0x08, 0x00]
        let udpLength = 8 + 2500
        frame += [0x45, 0, UInt8((20 + udpLength) >> 8), UInt8((20 + udpLength) & 0xFF), 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]
        frame += [0x30, 0x39, 0x01, 0xBB, UInt8(udpLength >> 8), UInt8(udpLength & 0xFF), 0, 0]
        frame += [UInt8](repeating: 0x5A, count: 2500)
        let header = VirtioNetHeader(
            flags: VirtioNetHeader.needsChecksum, gsoType: VirtioNetHeader.gsoUDPL4, headerLength: 42, gsoSize: 1200, checksumStart: 34,
            checksumOffset: 6)
        let batch = FrameBatch(capacity: 1)
        #expect(batch.append(frame, header: header))
        #expect(port.send([FrameRef(batch, 0)]) == 1)
        var buffer = [UInt8](repeating: 0, count: 70_000)
        var sizes: [Int] = []
        while case .done(let n) = try buffer.withUnsafeMutableBytes({ try port.backend.receive(into: $0) }) { sizes.append(n) }
        #expect(sizes == [12 + 42 + 1200, 12 + 42 + 1200, 12 + 42 + 100])
    }

    @Test func aFullQueueDropsInsteadOfGrowing() throws {
        let port = try VMPort(name: "vm2", ofport: 1)
        let batch = FrameBatch(capacity: 1)
        #expect(batch.append(Self.tcpFrame(from: 1, to: 2, payload: 10)))
        var sent = 0
        for _ in 0..<(VMPort.queueLimit + 50) { sent += port.send([FrameRef(batch, 0)]) }
        #expect(sent == VMPort.queueLimit)
        // The readiness descriptor stays readable until the last frame is taken.
        var buffer = [UInt8](repeating: 0, count: 2048)
        var taken = 0
        while case .done = try buffer.withUnsafeMutableBytes({ try port.backend.receive(into: $0) }) { taken += 1 }
        #expect(taken == VMPort.queueLimit)
    }
}
