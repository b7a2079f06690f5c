// Releasing code pages (what nimbus-tunnel does a few seconds after start): the maps parser and
// the effect on this test process's own resident set.
import Foundation
import LinuxSystem
import Testing

@Suite struct ResidentMemoryTests {
    @Test func parsesMapsLines() throws {
        let text = "55d0c3959000-55d0c5b2e000 r-xp 00000000 fe:00 5326693                    /usr/bin/nimbus-tunnel"
        let code = try #require(MemoryMapping(line: Substring(text)))
        #expect(code.start == 0x55d0_c395_9000 && code.end == 0x55d0_c5b2_e000)
        #expect(code.executable && !code.writable && code.path == "/usr/bin/nimbus-tunnel" && code.isReadOnlyFileMapping)
        let data = try #require(MemoryMapping(line: "55d0c5c23000-55d0c812b000 rw-p 022c9000 fe:00 5326693   /usr/bin/nimbus-tunnel"))
        #expect(data.writable && !data.isReadOnlyFileMapping)
        let heap = try #require(MemoryMapping(line: "557fe4d88000-557fe4da9000 rw-p 00000000 00:00 0                          [heap]"))
        #expect(heap.inode == 0 && heap.path == "[heap]" && !heap.isReadOnlyFileMapping)
        let vdso = try #require(MemoryMapping(line: "7ffd1c5f2000-7ffd1c5f4000 r-xp 00000000 00:00 0   [vdso]"))
        #expect(!vdso.isReadOnlyFileMapping)
        let anonymous = try #require(MemoryMapping(line: "7f2628021000-7f262c000000 ---p 00000000 00:00 0"))
        #expect(anonymous.path.isEmpty && !anonymous.isReadOnlyFileMapping)
        #expect(MemoryMapping(line: "garbage") == nil)
        #expect(MemoryMapping(line: "zz-10 r-xp 0 0:0 1 /x") == nil)
        #expect(MemoryMapping(line: "20-10 r-xp 0 0:0 1 /x") == nil)
    }

    func rssFileKiB() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("RssFile:") })
        return try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
    }

    @Test func releasingCodePagesShrinksTheResidentSetAndTheProcessRunsOn() throws {
        let before = try rssFileKiB()
        let released = Host.releaseCodePages()
        let after = try rssFileKiB()
        #expect(released.mappings > 0 && released.bytes > 0)
        #expect(try Host.memoryMappings().contains { $0.isReadOnlyFileMapping })
        // Code runs on from pages faulted back one at a time.
        #expect((0..<1000).map { $0 * 3 }.reduce(0, +) == 1_498_500)
        #expect(after < before, "RssFile \(before) KiB before, \(after) KiB after")
    }
}
