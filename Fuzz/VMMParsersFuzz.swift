// libFuzzer target for nimbus-vmm's parsers of untrusted input: kernel images (bzImage, ELF with
// notes) and Firecracker config / API JSON. Built by Fuzz/run; any crash or sanitizer report fails.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let image = try? KernelImage.parse(bytes) {
        // Whatever parses must describe ranges inside the file.
        for segment in image.segments {
            precondition(segment.fileRange.upperBound <= bytes.count, "segment past the end of the image")
            precondition(segment.memorySize >= UInt64(segment.fileRange.count), "segment smaller in memory")
        }
    }
    _ = try? VMConfig(fileContents: bytes)
    if let json = try? JSONValue.parse(bytes) {
        _ = try? MachineConfig(json: json, partial: true)
        _ = try? BootSource(json: json)
        _ = try? DriveConfig(json: json)
        _ = try? NetworkInterfaceConfig(json: json)
        _ = try? VsockConfig(json: json)
        _ = try? EntropyConfig(json: json)
        _ = json.serialized()
    }
    return 0
}
