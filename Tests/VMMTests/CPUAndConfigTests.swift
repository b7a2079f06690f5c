import KVM
import Testing

@testable import VMM

@Suite struct CPUIDTests {
    let host: [CPUIDEntry] = [
        CPUIDEntry(function: 0, eax: 0x1F),
        CPUIDEntry(function: 1, eax: 0x806F8, ebx: 0x0000_0800, ecx: 0x1, edx: 0x1000_0000),
        CPUIDEntry(function: 0xA, eax: 0x0804_0001, ebx: 1, ecx: 2, edx: 3),
        CPUIDEntry(function: 0xB, index: 0, flags: 1), CPUIDEntry(function: 0xB, index: 1, flags: 1),
        CPUIDEntry(function: 0xB, index: 2, flags: 1),
        CPUIDEntry(function: 0x8000_0008, ecx: 0x3F),
    ]

    @Test func apicIDsAndTopologyPerVCPU() {
        let leaves = CPUIDPolicy.normalize(host, vcpuIndex: 2, vcpuCount: 4, smt: false)
        let leaf1 = leaves.first { $0.function == 1 }
        #expect(leaf1.map { $0.ebx >> 24 } == 2)
        #expect(leaf1.map { ($0.ebx >> 16) & 0xFF } == 4)
        #expect(leaf1.map { $0.ecx & (1 << 31) != 0 } == true)
        #expect(leaf1.map { $0.edx & (1 << 28) != 0 } == true)
        let topo = leaves.filter { $0.function == 0xB }
        #expect(topo.allSatisfy { $0.edx == 2 })
        #expect(topo[0].ebx == 1 && topo[0].ecx == 0x100)
        #expect(topo[1].eax == 2 && topo[1].ebx == 4 && topo[1].ecx == 0x201)
        #expect(topo[2].ecx == 2 && topo[2].ebx == 0)
        #expect(leaves.first { $0.function == 0xA }.map { $0.eax | $0.ebx | $0.ecx | $0.edx } == 0)
        #expect(leaves.first { $0.function == 0x8000_0008 }.map { $0.ecx & 0xFF } == 3)
    }

    @Test func smtHasTwoThreadsPerCore() {
        let leaves = CPUIDPolicy.normalize(host, vcpuIndex: 1, vcpuCount: 4, smt: true)
        let topo = leaves.filter { $0.function == 0xB }
        #expect(topo[0].eax == 1 && topo[0].ebx == 2)
        #expect(topo[1].eax == 2 && topo[1].ebx == 4)
    }

    @Test func singleVCPUHasNoHTT() {
        let leaf1 = CPUIDPolicy.normalize(host, vcpuIndex: 0, vcpuCount: 1, smt: false).first { $0.function == 1 }
        #expect(leaf1.map { $0.edx & (1 << 28) } == 0)
    }

    @Test func lapicWiring() {
        var page = [UInt8](repeating: 0, count: 1024)
        page[0x350 + 1] = 0x07  // some other mode bits set
        let wired = BootCPUState.wireLAPIC(page)
        #expect(wired[0x351] & 0x07 == 7)
        #expect(wired[0x361] & 0x07 == 4)
    }

    @Test func registersForEachEntry() {
        let linux = BootCPUState.registers(entry: .linux64(0x100200))
        #expect(linux.rip == 0x100200 && linux.rsi == Layout.zeroPage && linux.rsp == Layout.bootStack)
        let pvh = BootCPUState.registers(entry: .pvh(0x1000123))
        #expect(pvh.rip == 0x1000123 && pvh.rbx == Layout.pvhStartInfo)
    }
}

/// A configuration with one network interface `e` made of `fields`.
func nic(_ fields: String) -> String {
    #"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [{"iface_id": "e", "# + fields + "}]}"
}

@Suite struct ConfigTests {
    func parse(_ text: String) throws -> VMConfig { try VMConfig(fileContents: Array(text.utf8)) }

    @Test func fullFirecrackerConfig() throws {
        let c = try parse(
            """
            {"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
             "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false},
             "drives": [{"drive_id": "rootfs", "path_on_host": "/d.img", "is_root_device": true, "is_read_only": false}],
             "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "AA:FC:00:00:00:01"}]}
            """)
        #expect(c.bootSource == BootSource(kernelImagePath: "/k", bootArgs: "console=ttyS0", initrdPath: "/i"))
        #expect(c.machine.vcpuCount == 2 && c.machine.memSizeMiB == 256)
        #expect(c.drives.first?.driveID == "rootfs" && c.drives.first?.isRootDevice == true)
        #expect(c.networkInterfaces.first?.hostDevName == "tap0")
    }

    @Test func virtioSectionsAndRootDrive() throws {
        let c = try parse(
            """
            {"boot-source": {"kernel_image_path": "/k"},
             "drives": [{"drive_id": "data", "path_on_host": "/data.raw"},
                        {"drive_id": "rootfs", "path_on_host": "/root.qcow2", "is_root_device": true, "is_read_only": true}],
             "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"}, "entropy": {}}
            """)
        #expect(c.vsock == (try VsockConfig(json: .object(["guest_cid": .integer(3), "uds_path": .string("/tmp/v.sock")]))))
        #expect(c.entropy != nil && c.virtioDeviceCount == 4)
        #expect(VirtioSet.orderedDrives(c).map(\.driveID) == ["rootfs", "data"])
        #expect(VirtioSet.commandLine("console=ttyS0", config: c) == "console=ttyS0 root=/dev/vda ro")
        #expect(VirtioSet.commandLine("console=ttyS0 root=/dev/sda", config: c) == "console=ttyS0 root=/dev/sda")
        #expect(VirtioSet.description(slot: 2) == VirtioMMIODescription(base: 0xd000_2000, gsi: 7))
        // The DSDT gets one LNRO0005 device per slot.
        let dsdt = ACPITables.dsdt(devices: (0..<4).map(VirtioSet.description(slot:)))
        #expect(dsdt.count > 0 && String(decoding: dsdt, as: UTF8.self).components(separatedBy: "LNRO0005").count - 1 == 4)
        let reparsed = try VMConfig(fileContents: Array(c.json.serialized().utf8))
        #expect(reparsed == c)
    }

    @Test func uplinkInterfacesUseTheInProcessSwitch() throws {
        let c = try parse(
            """
            {"boot-source": {"kernel_image_path": "/k"},
             "network-interfaces": [{"iface_id": "eth0", "uplink": {"type": "system", "name": "veth-vm"}, "guest_mac": "06:00:00:00:00:01"},
                                    {"iface_id": "eth1", "uplink": {"type": "vxlan", "remote_ip": "192.0.2.7", "key": 42}},
                                    {"iface_id": "eth2", "uplink": {"type": "dgram", "local_path": "/run/vm.sock", "remote_path": "/run/sw.sock"}}]}
            """)
        #expect(
            c.networkInterfaces.map(\.uplink?.kind) == [
                .system(interface: "veth-vm"), .vxlan(remoteIP: "192.0.2.7", key: 42, port: 4789),
                .datagram(localPath: "/run/vm.sock", remotePath: "/run/sw.sock", vnetHeader: true),
            ])
        #expect(c.networkInterfaces.allSatisfy { $0.hostDevName == nil })
        #expect(try VMConfig(fileContents: Array(c.json.serialized().utf8)) == c)
        // One uplink serves one interface.
        var twice = c
        #expect(throws: ConfigError.self) {
            let uplink = c.networkInterfaces[0].uplink?.json ?? .null
            try twice.addNetworkInterface(NetworkInterfaceConfig(json: .object(["iface_id": .string("eth2"), "uplink": uplink])))
        }
    }

    @Test func oldHTEnabledNameIsAccepted() throws {
        let c = try parse(#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "ht_enabled": true}}"#)
        #expect(c.machine.smt)
    }

    @Test(arguments: [
        (#"{"boot-source": {"kernel_image_path": "/k", "extra": 1}}"#, "unknown field `extra`"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "what": {}}"#, "unknown field `what`"),
        (#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#, "missing section `boot-source`"),
        (#"{"boot-source": {}}"#, "missing field `kernel_image_path`"),
        (#"{"boot-source": {"kernel_image_path": 5}}"#, "must be a string"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}"#, "between 1 and 32"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 0}}"#, "at least 1"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1.5, "mem_size_mib": 64}}"#, "must be an integer"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1}}"#, "missing field `mem_size_mib`"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {}}"#, "not supported"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {}}"#, "missing field `uds_path`"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 1, "uds_path": "/v"}}"#, "between 3"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "entropy": {"rate_limiter": {}}}"#, "rate_limiter"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [{"iface_id": "e", "host_dev_name": "t", "guest_mac": "zz"}]}"#, "not a MAC"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "drives": [{"drive_id": "a b", "path_on_host": "/d"}]}"#, "drive_id"),
        (#"{"boot-source": {"kernel_image_path": "/k"}, "network-interfaces": [{"iface_id": "e"}]}"#, "give `host_dev_name`"),
        (nic(#""host_dev_name": "t", "uplink": {"type": "system", "name": "v"}"#), "not both"),
        (nic(#""uplink": {"type": "bridge"}"#), "not an uplink type"),
        (nic(#""uplink": {"type": "system", "name": "a/b"}"#), "not a network interface name"),
        (nic(#""uplink": {"type": "vxlan", "remote_ip": "1.2.3"}"#), "not an IPv4"),
        (nic(#""uplink": {"type": "vxlan", "remote_ip": "1.2.3.4", "key": 16777216}"#), "24-bit VNI"),
        (nic(#""uplink": {"type": "system", "name": "v", "mtu": 1}"#), "unknown field `mtu`"),
        (nic(#""uplink": {"type": "dgram", "local_path": "/a"}"#), "missing field `remote_path`"),
        (nic(#""uplink": {"type": "dgram", "local_path": "a", "remote_path": "/b"}"#), "absolute path"),
        (#"{"boot-source": "#, "malformed JSON"),
        (#"[1, 2]"#, "must be a JSON object"),
    ])
    func badConfigsSayWhy(text: String, reason: String) {
        #expect {
            _ = try VMConfig(fileContents: Array(text.utf8))
        } throws: { error in
            "\(error)".contains(reason)
        }
    }

    @Test func jsonRoundTripIsSortedAndEscaped() throws {
        let v = JSONValue.object(["b": .string("q\"\n"), "a": .array([.integer(1), .bool(true), .null])])
        #expect(v.serialized() == #"{"a":[1,true,null],"b":"q\"\n"}"#)
        #expect(try JSONValue.parse(Array(v.serialized().utf8)) == v)
    }
}
