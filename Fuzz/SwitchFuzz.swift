// libFuzzer target for the switch's parsers: the first byte picks what the rest is fed to:
//   0: a JSON-RPC byte stream (framer, JSON parser) whose texts run as OVSDB transactions,
//      schemas and monitor requests against a small database;
//   1: OpenFlow messages (flow_mod with OXM matches, instructions and actions, multipart
//      requests, packet_out), each flow_mod re-encoded and parsed again;
//   2: an Ethernet frame (the flow-key parser, software TSO and checksum, offload repair).
// Compiled by Fuzz/run with the OVSDB and Switch pure sources. Any trap is a bug.

let fuzzSchema = try? DatabaseSchema(
    text: """
        {"name":"F","tables":{"R":{"isRoot":true,"maxRows":4,"columns":{"n":{"type":"string","mutable":false},
        "k":{"type":{"key":{"type":"uuid","refTable":"K"},"min":0,"max":"unlimited"}},
        "w":{"type":{"key":{"type":"uuid","refTable":"K","refType":"weak"},"min":0,"max":"unlimited"}},
        "i":{"type":{"key":{"type":"integer","minInteger":0,"maxInteger":100},"min":0,"max":3}},
        "m":{"type":{"key":"string","value":"real","min":0,"max":"unlimited"}}}},
        "K":{"indexes":[["n"]],"columns":{"n":{"type":"string"}}}}}
        """)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSwitch(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let all = Array(UnsafeBufferPointer(start: data, count: size))
    guard let mode = all.first else { return 0 }
    let bytes = Array(all.dropFirst())
    switch mode % 3 {
    case 0:
        guard let schema = fuzzSchema else { return 0 }
        var database = Database(schema: schema)
        var framer = JSONFramer(maxMessage: 1 << 16)
        guard let texts = try? framer.feed(bytes) else { return 0 }
        for text in texts {
            guard let json = try? JSON.parse(text) else { continue }
            _ = json.text
            if let operations = json.arrayValue {
                _ = database.transact(operations, waitsMayBlock: true)
            }
            _ = try? DatabaseSchema(json: json)
            if let request = try? MonitorRequest(json: json, schema: schema, version: 2) { _ = request.initial(database) }
        }
    case 1:
        var offset = 0
        while offset + 8 <= bytes.count {
            guard let length = OFMessage.length(ofHeader: bytes[offset..<(offset + 8)]), length >= 8, offset + length <= bytes.count else { break }
            let raw = Array(bytes[offset..<(offset + length)])
            offset += length
            guard let message = try? OFMessage.parse(raw) else { continue }
            if let mod = try? FlowMod(body: message.body) {
                let flow = mod.entry(now: 0)
                let again = try? FlowMod(body: FlowMod.addBody(flow))
                precondition(again != nil, "a flow_mod that parsed must re-encode")
                _ = OFBodies.flowStats(flow, now: 1)
            }
            var reader = OFReader(message.body)
            _ = try? FlowStatsRequest(&reader)
            var actions = OFReader(message.body)
            _ = try? OFActions.parse(&actions)
        }
    default:
        let batch = FrameBatch(capacity: 1, frameCapacity: 70_000)
        guard batch.append(bytes) else { return 0 }
        _ = FlowKey.parse(batch, 0, inPort: 1)
        Offload.repairOffloads(batch, 0)
        let mss = bytes.count > 2 ? Int(bytes[0]) * 8 + 1 : 1
        _ = Offload.segmentTCP(bytes, mss: mss)
        _ = Offload.segmentUDP(bytes, size: mss)
        // The frame twice in a row: a run of one flow, if it is a datagram that may join one.
        _ = UDPCoalescer().send([FrameRef(batch, 0), FrameRef(batch, 0)]) { ($0.count, 0) }
        var copy = bytes
        Offload.completeChecksum(&copy, start: Int(bytes.first ?? 0), offset: Int(bytes.last ?? 0))
    }
    return 0
}
