// libFuzzer target for the qcow2 parser: random bytes as an image file, opened, read, mapped and
// checked. Any crash or sanitizer report fails; errors are expected.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Data(bytes: data, count: size)
    let path = NSTemporaryDirectory() + "nimbus-fuzz-\(getpid()).qcow2"
    guard (try? bytes.write(to: URL(fileURLWithPath: path))) != nil else { return 0 }
    defer { unlink(path) }
    _ = try? QCOW2Header(Array(bytes), fileSize: UInt64(size))
    guard let image = try? QCOW2Image(path: path, readOnly: true, openBacking: { _, _ in throw DiskError("no backing files while fuzzing") }) else {
        return 0
    }
    let length = min(image.virtualSize, 1 << 20)
    _ = try? image.read(at: 0, count: Int(length))
    _ = try? image.map(at: 0, length: length)
    _ = try? image.check()
    _ = try? image.snapshots()
    return 0
}
