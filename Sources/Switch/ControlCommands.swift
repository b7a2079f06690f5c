// Switch layer: the ovs-appctl commands nimbus-switchd answers, in ovs-vswitchd's formats:
// fdb/show and fdb/flush (the MAC tables, read on each datapath thread) and dpif/show (bridges,
// ports and the datapath's cache hits). Run on the control event loop, beside the BridgeManager.
import NIOCore
import OVSDB

public enum SwitchControl {
    /// The commands, for `manager` on `loop` (the loop that owns it, where the control socket's
    /// commands run).
    public static func commands(manager: BridgeManager, loop: EventLoop) -> [String: ControlCommand] {
        [
            "fdb/show": ControlCommand(usage: "BRIDGE", arguments: 1...1) { arguments in
                let bridge = arguments[0]
                guard let datapath = manager.datapaths[bridge] else { return loop.makeFailedFuture(ControlError("no such bridge")) }
                let promise = loop.makePromise(of: String.self)
                datapath.macEntries { entries in promise.succeed(fdbTable(entries)) }
                return promise.futureResult
            },
            "fdb/flush": ControlCommand(usage: "[BRIDGE]", arguments: 0...1) { arguments in
                let datapaths = manager.datapaths
                if let bridge = arguments.first {
                    guard let datapath = datapaths[bridge] else { return loop.makeFailedFuture(ControlError("no such bridge")) }
                    datapath.flushMACs()
                } else {
                    for datapath in datapaths.values { datapath.flushMACs() }
                }
                return loop.makeSucceededFuture("table successfully flushed\n")
            },
            "dpif/show": ControlCommand { _ in loop.makeSucceededFuture(dpifShow(manager)) },
        ]
    }

    /// `fdb/show`'s table: port (LOCAL for the bridge's own), VLAN, MAC and age in seconds.
    static func fdbTable(_ entries: [MACEntry]) -> String {
        var out = " port  VLAN  MAC                Age\n"
        for entry in entries {
            let port = entry.port == OFPort.local ? "LOCAL" : String(entry.port)
            out += pad(port, 5) + "  " + pad(String(entry.vlan), 4) + "  " + macText(entry.mac) + "  " + pad(String(entry.age), 3) + "\n"
        }
        return out
    }

    /// `dpif/show`: the datapath's cache hits and upcalls, then each bridge's ports.
    static func dpifShow(_ manager: BridgeManager) -> String {
        let stats = manager.datapaths.values.map(\.stats)
        let hits = stats.reduce(0) { $0 &+ $1.exactHits &+ $1.megaflowHits }
        let missed = stats.reduce(0) { $0 &+ $1.upcalls }
        var out = "nimbus@userspace: hit:\(hits) missed:\(missed)\n"
        for bridge in manager.datapaths.keys.sorted() {
            out += "  \(bridge):\n"
            for port in manager.portTypes(bridge) {
                let number = port.ofport == OFPort.local ? "65534" : String(port.ofport)
                out += "    \(port.name) \(number): (\(port.type.isEmpty ? "system" : port.type))\n"
            }
        }
        return out
    }

    static func macText(_ mac: UInt64) -> String {
        (0..<6).map { index in
            let byte = UInt8(truncatingIfNeeded: mac >> (40 - 8 * UInt64(index)))
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined(separator: ":")
    }

    private static func pad(_ text: String, _ width: Int) -> String {
        String(repeating: " ", count: max(0, width - text.count)) + text
    }
}
