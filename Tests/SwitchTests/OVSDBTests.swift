// Unit tests for the OVSDB core: JSON, datums, transactions, monitors and the file format.
import Foundation
import Testing

@testable import OVSDB

let vswitchSchemaPath = "/usr/share/openvswitch/vswitch.ovsschema"

/// A small schema with a root table, a child table (garbage collected), weak references and limits.
let testSchemaText = """
    {"name":"Test","version":"1.0.0","tables":{
      "Root":{"isRoot":true,"maxRows":2,"columns":{
        "name":{"type":"string","mutable":false},
        "kids":{"type":{"key":{"type":"uuid","refTable":"Kid"},"min":0,"max":"unlimited"}},
        "watch":{"type":{"key":{"type":"uuid","refTable":"Kid","refType":"weak"},"min":0,"max":"unlimited"}},
        "count":{"type":"integer"},
        "mode":{"type":{"key":{"type":"string","enum":["set",["a","b"]]},"min":0,"max":1}},
        "tags":{"type":{"key":{"type":"integer","minInteger":0,"maxInteger":4095},"min":0,"max":"unlimited"}},
        "config":{"type":{"key":"string","value":"string","min":0,"max":"unlimited"}}}},
      "Kid":{"indexes":[["name"]],"columns":{"name":{"type":"string"}}}}}
    """

func makeDatabase() throws -> Database { Database(schema: try DatabaseSchema(text: testSchemaText)) }

func ops(_ text: String) throws -> [JSON] { try JSON.parse(text).arrayValue ?? [] }

extension Database {
    mutating func run(_ text: String) throws -> [JSON] {
        guard case .done(let results, _) = transact(try ops(text)) else { return [] }
        return results
    }
}

@Suite struct JSONTests {
    @Test func parsesAndPrintsRoundTrip() throws {
        let text = #"{"a":[1,-2,3.5,true,false,null,"x\"y\\z\n\u00e9\ud83d\ude00"],"b":{}}"#
        let value = try JSON.parse(text)
        #expect(value["a"]?.arrayValue?[0] == .int(1))
        #expect(value["a"]?.arrayValue?[2] == .double(3.5))
        #expect(value["a"]?.arrayValue?[6] == .string("x\"y\\z\né😀"))
        #expect(try JSON.parse(value.text) == value)
    }

    @Test func refusesBadTexts() {
        for bad in ["{", "[1,]", "{\"a\" 1}", "\"\u{01}\"", "01x", "[1] 2", "{\"a\":1,\"a\":2}", String(repeating: "[", count: 100)] {
            #expect(throws: JSONError.self) { try JSON.parse(bad) }
        }
    }

    @Test func framerSplitsAStream() throws {
        var framer = JSONFramer()
        let stream = Array(#"{"id":1,"s":"}{"} [2,{"x":"]"}]{"#.utf8)
        var texts: [[UInt8]] = []
        for byte in stream { texts += try framer.feed([byte]) }
        #expect(texts.map { String(decoding: $0, as: UTF8.self) } == [#"{"id":1,"s":"}{"}"#, #"[2,{"x":"]"}]"#])
        texts = try framer.feed(Array(#""a":1}"#.utf8))
        #expect(texts.map { String(decoding: $0, as: UTF8.self) } == [#"{"a":1}"#])
        var bad = JSONFramer()
        #expect(throws: JSONError.self) { try bad.feed(Array("x".utf8)) }
        var small = JSONFramer(maxMessage: 8)
        #expect(throws: JSONError.self) { try small.feed(Array(#"{"aaaaaaaaaa""#.utf8)) }
    }
}

@Suite struct DatumTests {
    @Test func uuidsRoundTrip() {
        let uuid = RowUUID.random()
        #expect(RowUUID(uuid.description) == uuid)
        #expect(RowUUID("not-a-uuid") == nil)
        #expect(RowUUID("00000000-0000-0000-0000-000000000000") == .zero)
    }

    @Test func setsAndMapsParseSortAndDiff() throws {
        let setType = ColumnType(key: BaseType(.integer), value: nil, min: 0, max: Int.max)
        let set = try Datum(json: try JSON.parse(#"["set",[3,1,2]]"#), type: setType, resolver: nil)
        #expect(set.keys == [.integer(1), .integer(2), .integer(3)])
        #expect(try Datum(json: .int(7), type: setType, resolver: nil).json == .int(7))
        let other = Datum(set: [.integer(2), .integer(5)])
        #expect(set.diff(to: other) == Datum(set: [.integer(1), .integer(3), .integer(5)]))
        #expect(set.applying(diff: set.diff(to: other)) == other)
        let mapType = ColumnType(key: BaseType(.string), value: BaseType(.string), min: 0, max: Int.max)
        let map = try Datum(json: try JSON.parse(#"["map",[["b","2"],["a","1"]]]"#), type: mapType, resolver: nil)
        #expect(map.json.text == #"["map",[["a","1"],["b","2"]]]"#)
        let changed = Datum(map: [(.string("a"), .string("9")), (.string("c"), .string("3"))])
        #expect(map.applying(diff: map.diff(to: changed)) == changed)
        #expect(throws: OVSDBError.self) {
            try Datum(json: try JSON.parse(#"["map",[["a","1"],["a","2"]]]"#), type: mapType, resolver: nil)
        }
    }

    @Test func theRealVswitchSchemaParses() throws {
        let text = try String(contentsOfFile: vswitchSchemaPath, encoding: .utf8)
        let schema = try DatabaseSchema(text: text)
        #expect(schema.name == "Open_vSwitch")
        #expect(schema.tables["Bridge"]?.indexes == [["name"]])
        #expect(schema.tables["Open_vSwitch"]?.isRoot == true)
        #expect(schema.tables["Port"]?.columns["tag"]?.type.key.maxInteger == 4095)
    }
}

@Suite struct TransactionTests {
    @Test func insertSelectUpdateMutateDelete() throws {
        var db = try makeDatabase()
        let inserted = try db.run(
            #"[{"op":"insert","table":"Root","row":{"name":"r1","kids":["named-uuid","k"],"count":5},"uuid-name":"r"},"#
                + #"{"op":"insert","table":"Kid","row":{"name":"kid1"},"uuid-name":"k"}]"#)
        #expect(inserted.count == 2 && inserted[0]["uuid"] != nil)
        var results = try db.run(#"[{"op":"select","table":"Root","where":[["name","==","r1"]],"columns":["count","mode"]}]"#)
        #expect(results[0].text == #"{"rows":[{"count":5,"mode":["set",[]]}]}"#)
        results = try db.run(#"[{"op":"mutate","table":"Root","where":[],"mutations":[["count","+=",2],["config","insert",["map",[["k","v"]]]]]}]"#)
        #expect(results[0]["count"] == .int(1))
        results = try db.run(#"[{"op":"select","table":"Root","where":[["count",">",6],["config","includes",["map",[["k","v"]]]]],"columns":["count"]}]"#)
        #expect(results[0].text == #"{"rows":[{"count":7}]}"#)
        results = try db.run(#"[{"op":"update","table":"Root","where":[],"row":{"mode":"b"}}]"#)
        #expect(results[0]["count"] == .int(1))
        results = try db.run(#"[{"op":"delete","table":"Root","where":[["name","==","r1"]]}]"#)
        #expect(results[0]["count"] == .int(1))
        // The kid lost its only strong reference and was collected.
        #expect(db.rows("Kid").isEmpty)
    }

    @Test func errorsNameTheProblemAndRollBack() throws {
        var db = try makeDatabase()
        var results = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a"}},{"op":"insert","table":"Nope","row":{}},{"op":"comment","comment":"x"}]"#)
        #expect(results.count == 3)
        #expect(results[1]["error"] == .string("syntax error"))
        #expect(results[2] == .null)
        #expect(db.rows("Root").isEmpty)
        results = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a","mode":"c"}}]"#)
        #expect(results[0]["error"] == .string("constraint violation"))
        results = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a","tags":["set",[4096]]}}]"#)
        #expect(results[0]["error"] == .string("constraint violation"))
        results = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a","kids":["uuid","11111111-1111-1111-1111-111111111111"]}}]"#)
        #expect(results.count == 2)
        #expect(results[1]["error"] == .string("referential integrity violation"))
        _ = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a"}}]"#)
        results = try db.run(#"[{"op":"update","table":"Root","where":[],"row":{"name":"b"}}]"#)
        #expect(results[0]["details"] == .string("Cannot update immutable column name in table Root."))
        results = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"b"}},{"op":"insert","table":"Root","row":{"name":"c"}}]"#)
        #expect(results.last?["error"] == .string("constraint violation"))
        #expect(db.rows("Root").count == 1)
        results = try db.run(#"[{"op":"mutate","table":"Root","where":[],"mutations":[["count","/=",0]]}]"#)
        #expect(results[0]["error"] == .string("domain error"))
        results = try db.run(#"[{"op":"abort"}]"#)
        #expect(results[0]["error"] == .string("aborted"))
        results = try db.run(#"[{"op":"frob"}]"#)
        #expect(results[0]["details"]?.stringValue?.contains("No operation \"frob\"") == true)
    }

    @Test func weakReferencesAndIndexes() throws {
        var db = try makeDatabase()
        _ = try db.run(
            #"[{"op":"insert","table":"Root","row":{"name":"a","kids":["set",[["named-uuid","k1"],["named-uuid","k2"]]],"watch":["named-uuid","k2"]}},"#
                + #"{"op":"insert","table":"Kid","row":{"name":"one"},"uuid-name":"k1"},{"op":"insert","table":"Kid","row":{"name":"two"},"uuid-name":"k2"}]"#)
        #expect(db.rows("Kid").count == 2)
        // Dropping k2 from kids collects it, and the weak reference to it goes too.
        let two = try #require(db.rows("Kid").first { $0["name"] == Datum(.string("two")) })
        _ = try db.run(#"[{"op":"mutate","table":"Root","where":[],"mutations":[["kids","delete",["uuid","\#(two.uuid)"]]]}]"#)
        #expect(db.rows("Kid").count == 1)
        #expect(db.rows("Root").first?["watch"]?.count == 0)
        let results = try db.run(
            #"[{"op":"insert","table":"Kid","row":{"name":"one"},"uuid-name":"x"},{"op":"mutate","table":"Root","where":[],"mutations":[["kids","insert",["named-uuid","x"]]]}]"#
        )
        #expect(results.last?["error"] == .string("constraint violation"))
    }

    @Test func waitChecksRows() throws {
        var db = try makeDatabase()
        _ = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a","count":1}}]"#)
        var results = try db.run(#"[{"op":"wait","table":"Root","timeout":0,"where":[],"columns":["count"],"until":"==","rows":[{"count":1}]}]"#)
        #expect(results[0] == .object([:]))
        results = try db.run(#"[{"op":"wait","table":"Root","timeout":0,"where":[],"columns":["count"],"until":"==","rows":[{"count":2}]}]"#)
        #expect(results[0]["error"] == .string("timed out"))
        let outcome = db.transact(try ops(#"[{"op":"wait","table":"Root","where":[],"columns":["count"],"until":"==","rows":[]}]"#), waitsMayBlock: true)
        guard case .blocked(let timeout) = outcome else {
            Issue.record("expected the wait to block")
            return
        }
        #expect(timeout == nil)
    }
}

@Suite struct MonitorTests {
    @Test func updatesInEachVersion() throws {
        var db = try makeDatabase()
        _ = try db.run(#"[{"op":"insert","table":"Root","row":{"name":"a","tags":["set",[1,2]]}}]"#)
        let request = try JSON.parse(#"{"Root":{"columns":["name","tags","count"]}}"#)
        let v1 = try MonitorRequest(json: request, schema: db.schema, version: 1)
        let v2 = try MonitorRequest(json: request, schema: db.schema, version: 2)
        let uuid = try #require(db.rows("Root").first?.uuid)
        #expect(v1.initial(db).text == #"{"Root":{"\#(uuid)":{"new":{"count":0,"name":"a","tags":["set",[1,2]]}}}}"#)
        #expect(v2.initial(db).text == #"{"Root":{"\#(uuid)":{"initial":{"name":"a","tags":["set",[1,2]]}}}}"#)
        guard case .done(_, let commit?) = db.transact(try ops(#"[{"op":"update","table":"Root","where":[],"row":{"tags":["set",[2,3]],"count":4}}]"#)) else {
            Issue.record("no commit")
            return
        }
        #expect(
            v1.update(commit, schema: db.schema)?.text
                == #"{"Root":{"\#(uuid)":{"new":{"count":4,"name":"a","tags":["set",[2,3]]},"old":{"count":0,"tags":["set",[1,2]]}}}}"#)
        #expect(v2.update(commit, schema: db.schema)?.text == #"{"Root":{"\#(uuid)":{"modify":{"count":4,"tags":["set",[1,3]]}}}}"#)
        let conditional = try MonitorRequest(json: try JSON.parse(#"{"Root":{"where":[["count","==",99]]}}"#), schema: db.schema, version: 2)
        #expect(conditional.update(commit, schema: db.schema) == nil)
    }
}

@Suite struct StorageTests {
    @Test func fileSurvivesReopenAndTornTail() throws {
        let path = NSTemporaryDirectory() + "ovsdb-test-\(UUID().uuidString).db"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let schema = try DatabaseSchema(text: testSchemaText)
        let file = try DatabaseFile.create(path: path, schema: schema)
        var db = Database(schema: schema)
        for text in [
            #"[{"op":"insert","table":"Root","row":{"name":"a","config":["map",[["x","1"]]],"kids":["named-uuid","k"]}},{"op":"insert","table":"Kid","row":{"name":"kid"},"uuid-name":"k"}]"#,
            #"[{"op":"mutate","table":"Root","where":[],"mutations":[["count","+=",3],["config","insert",["map",[["y","2"]]]]]}]"#,
        ] {
            guard case .done(_, let commit?) = db.transact(try ops(text)) else { throw OVSDBError("test", "no commit") }
            try file.append(commit, schema: schema, date: 1)
        }
        let (_, reopened, warnings) = try DatabaseFile.open(path: path)
        #expect(warnings.isEmpty)
        #expect(reopened.rows("Root").map(\.columns) == db.rows("Root").map(\.columns))
        #expect(reopened.rows("Kid").count == 1)
        // A torn last record is dropped and the earlier ones kept.
        let handle = try #require(FileHandle(forWritingAtPath: path))
        handle.seekToEndOfFile()
        handle.write(Data("OVSDB JSON 500 0123\n{\"Root\":".utf8))
        try handle.close()
        let (_, recovered, notes) = try DatabaseFile.open(path: path)
        #expect(notes.count == 1)
        #expect(recovered.rows("Root").first?["count"] == Datum(.integer(3)))
        // Corrupt headers are refused with a clear error.
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: path))
        #expect(throws: OVSDBError.self) { try DatabaseFile.open(path: path) }
    }
}

@Suite struct ControlSocketTests {
    @Test func requestsAreCheckedAsOvsVswitchdChecksThem() {
        let commands = ["fdb/show": ControlCommand(usage: "BRIDGE", arguments: 1...1) { _ in fatalError("not run here") }]
        func check(_ method: String, _ params: [JSON]) -> String {
            switch ControlSession.validate(method, .array(params), commands: commands) {
            case .success(let (_, arguments)): return arguments.joined(separator: ",")
            case .failure(let error): return error.message
            }
        }
        #expect(check("fdb/show", [.string("br0")]) == "br0")
        #expect(check("nope", []) == "\"nope\" is not a valid command (use \"list-commands\" to see a list of valid commands)")
        #expect(check("fdb/show", []) == "\"fdb/show\" command requires at least 1 arguments")
        #expect(check("fdb/show", [.string("a"), .string("b")]) == "\"fdb/show\" command takes at most 1 arguments")
        #expect(check("fdb/show", [.int(1)]) == "\"fdb/show\" command has non-string argument")
    }
}
