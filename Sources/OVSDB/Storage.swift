// OVSDB layer: the database file, in ovsdb-server's standalone format so that `ovsdb-tool` reads
// Nimbus's files and Nimbus reads files ovsdb-server wrote. The file is a log of records, each
// `OVSDB JSON <length> <sha1>\n<json>\n` (length and digest cover the JSON and its newline):
// first the schema, then one record per commit naming the rows it inserted or changed (their new
// column values) or deleted (null). A commit is appended and fsynced before its reply goes out.
// A torn last record (a crash mid-append) is dropped on open and the file truncated to the last
// whole record, as ovsdb-server does.
import Crypto
import LinuxSystem

public final class DatabaseFile {
    public let path: String
    private var descriptor: OwnedFileDescriptor
    private var size: Int
    private var compactedSize: Int
    /// The log is rewritten as one snapshot once it is this much larger than after the last rewrite.
    public var compactFactor = 4
    public var compactMinimum = 8 << 20

    private init(path: String, descriptor: OwnedFileDescriptor, size: Int) {
        self.path = path
        self.descriptor = descriptor
        self.size = size
        compactedSize = size
    }

    /// Creates a new file holding only `schema` (refuses to overwrite).
    public static func create(path: String, schema: DatabaseSchema) throws -> DatabaseFile {
        let descriptor: OwnedFileDescriptor
        do {
            descriptor = try OwnedFileDescriptor.openReadWrite(path, create: true, exclusive: true)
        } catch {
            throw OVSDBError("I/O error", "cannot create database file \(path): \(error)")
        }
        let record = Self.record(schema.json)
        do {
            try descriptor.write(record, at: 0)
            try descriptor.sync()
        } catch {
            throw OVSDBError("I/O error", "cannot write database file \(path): \(error)")
        }
        return DatabaseFile(path: path, descriptor: descriptor, size: record.count)
    }

    /// Opens an existing file and replays it into a database.
    public static func open(path: String) throws -> (DatabaseFile, Database, warnings: [String]) {
        let bytes: [UInt8]
        do {
            bytes = try readWholeFile(path)
        } catch {
            throw OVSDBError("I/O error", "cannot read database file \(path): \(error)")
        }
        var warnings: [String] = []
        var offset = 0
        var records: [JSON] = []
        while offset < bytes.count {
            switch Self.parseRecord(bytes, at: offset) {
            case .record(let json, let next):
                records.append(json)
                offset = next
            case .bad(let reason):
                guard !records.isEmpty else { throw OVSDBError("syntax error", "\(path): \(reason)") }
                warnings.append("\(path): dropping everything from offset \(offset) on: \(reason)")
                offset = -offset
            }
            if offset < 0 { break }
        }
        let validEnd = offset < 0 ? -offset : offset
        guard let schemaJSON = records.first else { throw OVSDBError("syntax error", "\(path) is empty: it has no schema record") }
        let schema = try DatabaseSchema(json: schemaJSON)
        var database = Database(schema: schema)
        for (number, record) in records.dropFirst().enumerated() {
            do {
                try Self.replay(record, into: &database)
            } catch let error as OVSDBError {
                throw OVSDBError(error.error, "\(path): transaction record \(number + 1): \(error.details)")
            }
        }
        let descriptor: OwnedFileDescriptor
        do {
            descriptor = try OwnedFileDescriptor.openReadWrite(path)
            if validEnd < bytes.count { try descriptor.truncate(to: validEnd) }
        } catch {
            throw OVSDBError("I/O error", "cannot open database file \(path) for writing: \(error)")
        }
        return (DatabaseFile(path: path, descriptor: descriptor, size: validEnd), database, warnings)
    }

    /// Appends one commit and makes it durable.
    public func append(_ commit: Commit, schema: DatabaseSchema, date: Int64) throws {
        var members: [String: JSON] = ["_date": .int(date)]
        if let comment = commit.comment { members["_comment"] = .string(comment) }
        for (tableName, changes) in commit.changes {
            guard let table = schema.tables[tableName] else { continue }
            var rows: [String: JSON] = [:]
            for (uuid, change) in changes {
                guard let new = change.new else {
                    rows[uuid.description] = .null
                    continue
                }
                var columns: [String: JSON] = [:]
                for (name, datum) in new.columns {
                    guard let column = table.columns[name], !column.ephemeral else { continue }
                    if let old = change.old {
                        if old.columns[name] != datum { columns[name] = datum.json }
                    } else if datum != Datum.defaultValue(column.type) {
                        columns[name] = datum.json
                    }
                }
                if change.old != nil, columns.isEmpty { continue }
                rows[uuid.description] = .object(columns)
            }
            if !rows.isEmpty { members[tableName] = .object(rows) }
        }
        // A commit that changed only ephemeral columns leaves nothing to keep.
        guard members.keys.contains(where: { !$0.hasPrefix("_") }) else { return }
        try write(Self.record(.object(members)))
    }

    /// Rewrites the file as the schema plus one record holding every row, if the log has grown
    /// enough since the last rewrite. The new file replaces the old one atomically.
    public func compactIfNeeded(_ database: Database, date: Int64) throws {
        guard size > compactMinimum, size > compactedSize * compactFactor else { return }
        try compact(database, date: date)
    }

    public func compact(_ database: Database, date: Int64) throws {
        var members: [String: JSON] = ["_date": .int(date), "_comment": .string("compacting database online")]
        for (tableName, table) in database.schema.tables {
            var rows: [String: JSON] = [:]
            for row in database.rows(tableName) {
                var columns: [String: JSON] = [:]
                for (name, datum) in row.columns {
                    guard let column = table.columns[name], !column.ephemeral, datum != Datum.defaultValue(column.type) else { continue }
                    columns[name] = datum.json
                }
                rows[row.uuid.description] = .object(columns)
            }
            if !rows.isEmpty { members[tableName] = .object(rows) }
        }
        let bytes = Self.record(database.schema.json) + Self.record(.object(members))
        let temporary = path + ".tmp"
        do {
            removeFile(temporary)
            let fresh = try OwnedFileDescriptor.openReadWrite(temporary, create: true, exclusive: true)
            try fresh.write(bytes, at: 0)
            try fresh.sync()
            try renameFile(temporary, to: path)
        } catch {
            throw OVSDBError("I/O error", "cannot compact database file \(path): \(error)")
        }
        // Later appends go to the new file.
        do {
            descriptor = try OwnedFileDescriptor.openReadWrite(path)
        } catch {
            throw OVSDBError("I/O error", "cannot reopen compacted database file \(path): \(error)")
        }
        size = bytes.count
        compactedSize = bytes.count
    }

    private func write(_ record: [UInt8]) throws {
        do {
            try descriptor.write(record, at: size)
            try descriptor.sync()
        } catch {
            throw OVSDBError("I/O error", "cannot append to database file \(path): \(error)")
        }
        size += record.count
    }

    // MARK: records

    /// One record; as ovsdb-server writes it, the body's length and digest include its final newline.
    static func record(_ json: JSON) -> [UInt8] {
        let body = json.bytes + [0x0A]
        let digest = sha1Hex(body)
        return Array("OVSDB JSON \(body.count) \(digest)\n".utf8) + body
    }

    static func sha1Hex(_ bytes: [UInt8]) -> String {
        Insecure.SHA1.hash(data: bytes).map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    enum ParsedRecord {
        case record(JSON, next: Int)
        case bad(String)
    }

    static func parseRecord(_ bytes: [UInt8], at offset: Int) -> ParsedRecord {
        guard let newline = bytes[offset...].prefix(200).firstIndex(of: 0x0A) else { return .bad("truncated record header") }
        let header = String(decoding: bytes[offset..<newline], as: UTF8.self).split(separator: " ")
        guard header.count == 4, header[0] == "OVSDB", header[1] == "JSON", let length = Int(header[2]), length >= 0 else {
            return .bad("bad record header")
        }
        let start = newline + 1
        guard length <= bytes.count - start else { return .bad("record body is truncated") }
        let body = Array(bytes[start..<start + length])
        let digest = sha1Hex(body)
        guard digest == header[3].lowercased() else { return .bad("record checksum mismatch") }
        let json: JSON
        do {
            json = try JSON.parse(body)
        } catch {
            return .bad("record is not valid JSON: \(error)")
        }
        var next = start + length
        if next < bytes.count, bytes[next] == 0x0A { next += 1 }
        return .record(json, next: next)
    }

    static func replay(_ record: JSON, into database: inout Database) throws {
        guard let members = record.objectValue else { throw OVSDBError.syntax("a transaction record must be an object") }
        let isDiff = members["_is_diff"]?.boolValue ?? false
        var changes: [String: [RowUUID: Row?]] = [:]
        for (tableName, rowsJSON) in members where !tableName.hasPrefix("_") {
            guard let table = database.schema.tables[tableName] else { throw OVSDBError.syntax("unknown table \(tableName)") }
            guard let rows = rowsJSON.objectValue else { throw OVSDBError.syntax("table \(tableName) must map UUIDs to rows") }
            let existing = database.tables[tableName] ?? [:]
            for (uuidText, rowJSON) in rows {
                guard let uuid = RowUUID(uuidText) else { throw OVSDBError.syntax("bad row UUID \(uuidText)") }
                if rowJSON == .null {
                    changes[tableName, default: [:]][uuid] = .some(nil)
                    continue
                }
                guard let values = rowJSON.objectValue else { throw OVSDBError.syntax("row \(uuidText) must be an object or null") }
                var row =
                    existing[uuid]
                    ?? Row(
                        uuid: uuid, version: .random(),
                        columns: Dictionary(
                            uniqueKeysWithValues: table.columns.values.filter { !$0.name.hasPrefix("_") }.map {
                                ($0.name, Datum.defaultValue($0.type))
                            }))
                let wasPresent = existing[uuid] != nil
                for (name, valueJSON) in values {
                    guard let column = table.columns[name], !name.hasPrefix("_") else { continue }
                    if isDiff, wasPresent, !column.type.isScalar {
                        let diff = try Datum(json: valueJSON, type: column.type.relaxed, resolver: nil)
                        row.columns[name] = (row.columns[name] ?? .empty(column.type)).applying(diff: diff)
                    } else {
                        row.columns[name] = try Datum(json: valueJSON, type: column.type.relaxed, resolver: nil)
                    }
                }
                row.version = .random()
                changes[tableName, default: [:]][uuid] = row
            }
        }
        database.apply(changes)
    }
}
