// swift-tools-version: 6.1
// Nimbus: a cloud virtualization stack for Linux hosts. See docs/ARCHITECTURE.md for the layers.
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "Nimbus",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "nimbus-vmm", targets: ["nimbus-vmm"]),
        .executable(name: "nimbus", targets: ["nimbus"]),
        .library(name: "VirtualDisk", targets: ["VirtualDisk"]),
        .library(name: "VMM", targets: ["VMM"]),
        .executable(name: "nimbus-tunnel", targets: ["nimbus-tunnel"]),
        .library(name: "Tunnel", targets: ["Tunnel"]),
        .executable(name: "nimbus-switchd", targets: ["nimbus-switchd"]),
        .library(name: "OVSDB", targets: ["OVSDB"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // Layer 0: the only C in the package. <linux/kvm.h>, ioctl codes, kvm_run accessors.
        .target(name: "CNimbusLinux"),
        // Layer 1: owned descriptors, errno errors, mmap, eventfd, threads and signals.
        .target(name: "LinuxSystem", dependencies: ["CNimbusLinux"], swiftSettings: strict),
        // Layer 1: the only caller of KVM ioctls.
        .target(
            name: "KVM", dependencies: ["CNimbusLinux", "LinuxSystem", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // Layer 2: guest-physical memory with bounds-checked access.
        .target(name: "GuestMemory", dependencies: ["LinuxSystem"], swiftSettings: strict),
        // Layer 2: emulated devices and the port/MMIO bus.
        .target(
            name: "Devices",
            dependencies: ["GuestMemory", "LinuxSystem", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // Layer 0: raw deflate for qcow2 compressed clusters.
        .target(name: "CNimbusZlib", linkerSettings: [.linkedLibrary("z")]),
        // Layer 2: raw and qcow2 images, backing chains, snapshots, check and repair.
        .target(name: "VirtualDisk", dependencies: ["LinuxSystem", "CNimbusZlib"], swiftSettings: strict),
        // Layer 2: the NBD server exporting a virtual disk.
        .target(
            name: "NBD",
            dependencies: [
                "VirtualDisk", "LinuxSystem", .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // Layer 2: virtio-mmio transport, split virtqueues, and the block, net, vsock and rng devices.
        .target(
            name: "Virtio",
            dependencies: ["GuestMemory", "Devices", "LinuxSystem", "VirtualDisk", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // Layer 4: boot loader, ACPI, CPUID, vCPU threads, the Firecracker-compatible API.
        .target(
            name: "VMM",
            dependencies: [
                "KVM", "GuestMemory", "Devices", "LinuxSystem", "Virtio", "VirtualDisk", "Switch",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // Layer 2: the frp-class tunnel: multiplexed sessions, proxies, visitors, auth, status API.
        .target(
            name: "Tunnel",
            dependencies: [
                "CNimbusZlib",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "nimbus-tunnel",
            dependencies: [
                "Tunnel", "LinuxSystem", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict),
        // Layer 2: an OVSDB server (RFC 7047), generic over its schema, with ovsdb-server's file format.
        .target(
            name: "OVSDB",
            dependencies: [
                "LinuxSystem",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        // Layer 3: the virtual switch: reconciling the Open_vSwitch tables into bridges and ports.
        .target(
            name: "Switch",
            dependencies: [
                "OVSDB", "LinuxSystem", "Virtio", .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "nimbus-switchd",
            dependencies: [
                "Switch", "OVSDB", "LinuxSystem", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "nimbus-vmm",
            dependencies: [
                "VMM", "LinuxSystem",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "nimbus",
            dependencies: [
                "VirtualDisk", "NBD", "LinuxSystem", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "VirtualDiskTests",
            dependencies: [
                "VirtualDisk", "NBD", "LinuxSystem", .product(name: "NIOCore", package: "swift-nio"), .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "VMMTests", dependencies: ["VMM", "Devices", "GuestMemory", "KVM", "LinuxSystem", "Virtio", "VirtualDisk"],
            swiftSettings: strict),
        .testTarget(
            name: "VirtioTests", dependencies: ["Virtio", "GuestMemory", "Devices", "LinuxSystem", "VirtualDisk", "Switch"],
            swiftSettings: strict),
        .testTarget(
            name: "KVMIntegrationTests", dependencies: ["VMM", "KVM", "GuestMemory", "LinuxSystem"],
            swiftSettings: strict),
        .testTarget(
            name: "TunnelTests",
            dependencies: [
                "Tunnel", "LinuxSystem", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict),
        .testTarget(
            name: "SwitchTests",
            dependencies: ["OVSDB", "Switch", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")],
            swiftSettings: strict),
        .testTarget(name: "TunnelNamespaceTests", dependencies: [], swiftSettings: strict),
        .testTarget(name: "NestedHostTests", dependencies: [], swiftSettings: strict),
    ]
)
