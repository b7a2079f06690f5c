// libFuzzer target for the tunnel's wire parsers: random bytes are read as a stream of frames
// (headers, then the fixed-layout payloads by type), and as the first bytes of a vhost connection
// (an HTTP request head, a TLS ClientHello). Compiled by Fuzz/run with Sources/Tunnel/Codec.swift
// and Sources/Tunnel/Sniff.swift alone. Any trap or sanitizer report is a bug.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTunnel(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    var offset = 0
    while offset < bytes.count {
        guard let header = try? FrameHeader.parse(bytes[offset...]) else { break }
        let start = offset + FrameHeader.size
        guard bytes.count - start >= header.length else { break }
        let payload = Array(bytes[start..<(start + header.length)])
        switch header.type {
        case .challenge: _ = try? WireParse.challengeNonce(payload)
        case .hello: try? WireParse.checkHello(payload)
        case .datagram: _ = try? WireParse.datagramHeader(payload)
        default: break
        }
        offset = start + header.length
    }
    if case .success(let head)? = HTTPHead.parse(bytes) {
        _ = head.host
        _ = head.path
        _ = head.rewritten(forwardedFor: "192.0.2.1", hostRewrite: "")
    }
    _ = sniffSNI(bytes)
    if let text = String(validating: bytes.prefix(64), as: UTF8.self) {
        _ = parseIPAddress(text)
        _ = normalizeHost(text)
    }
    return 0
}
