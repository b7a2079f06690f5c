// nimbus: the Nimbus command line. `nimbus disk …` manages virtual disks like qemu-img.
import ArgumentParser
import LinuxSystem

@main
struct Nimbus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nimbus",
        abstract: "Nimbus, a cloud virtualization platform: command line.",
        version: "0.1.0",
        subcommands: [Disk.self, Pool.self])

    static func main() {
        Host.keepLargeAllocationsOnHeap()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            exit(withError: error)
        }
    }
}
