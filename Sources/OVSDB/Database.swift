// OVSDB layer: a database's rows and the `transact` method (RFC 7047 sections 4.1.3 and 5.2):
// operations run in order on a working copy; at commit, unreferenced rows of non-root tables are
// collected, weak references to deleted rows are dropped, and strong references, element counts,
// maxRows and indexes are checked. Either everything commits or nothing does.

/// One row: its identity, its version (new on every change) and every user column's value.
public struct Row: Sendable, Hashable {
    public var uuid: RowUUID
    public var version: RowUUID
    public var columns: [String: Datum]

    public subscript(column: String) -> Datum? {
        switch column {
        case "_uuid": Datum(.uuid(uuid))
        case "_version": Datum(.uuid(version))
        default: columns[column]
        }
    }

    /// The row as a JSON object with `names` (all user columns plus _uuid and _version if nil).
    public func json(columns names: [String]?) -> JSON {
        var members: [String: JSON] = [:]
        if let names {
            for name in names { members[name] = self[name]?.json }
        } else {
            for (name, datum) in columns { members[name] = datum.json }
            members["_uuid"] = Atom.uuid(uuid).json
            members["_version"] = Atom.uuid(version).json
        }
        return .object(members)
    }
}

/// How one row changed in a commit: inserted (old nil), deleted (new nil) or modified.
public struct RowChange: Sendable {
    public var old: Row?
    public var new: Row?
}

/// A committed transaction's effect, handed to monitors and to storage.
public struct Commit: Sendable {
    /// Table name → row → change; rows whose value did not change are left out.
    public var changes: [String: [RowUUID: RowChange]]
    public var comment: String?
    /// A fresh id per commit (monitor_cond_since's last-txn-id).
    public var id: RowUUID
}

/// The result of `transact`.
public enum TransactOutcome: Sendable {
    /// The reply's result array, and the commit if anything changed.
    case done(results: [JSON], commit: Commit?)
    /// A "wait" operation is not satisfied yet and may wait `timeoutMs` (nil: forever); run the
    /// request again after the next commit or, at the deadline, with `waitsMayBlock` false.
    case blocked(timeoutMs: Int?)
}

public struct Database: Sendable {
    public let schema: DatabaseSchema
    public private(set) var tables: [String: [RowUUID: Row]]

    public init(schema: DatabaseSchema) {
        self.schema = schema
        tables = Dictionary(uniqueKeysWithValues: schema.tables.keys.map { ($0, [:]) })
    }

    public func rows(_ table: String) -> [Row] { tables[table].map { Array($0.values) } ?? [] }

    /// Applies changes that were already validated (replaying the database file).
    public mutating func apply(_ changes: [String: [RowUUID: Row?]]) {
        for (table, rows) in changes {
            for (uuid, row) in rows { tables[table, default: [:]][uuid] = row }
        }
    }

    /// Runs the operations of one transact request.
    public mutating func transact(
        _ operations: [JSON], waitsMayBlock: Bool = false, ownsLock: (String) -> Bool = { _ in false }
    ) -> TransactOutcome {
        var txn = Transaction(schema: schema, tables: tables)
        var results: [JSON] = []
        func failed(_ error: OVSDBError) -> TransactOutcome {
            results.append(error.json)
            while results.count < operations.count { results.append(.null) }
            return .done(results: results, commit: nil)
        }
        do {
            try txn.assignNamedUUIDs(operations)
        } catch let error as OVSDBError {
            return failed(error)
        } catch {
            return failed(OVSDBError.syntax("\(error)"))
        }
        for (position, operation) in operations.enumerated() {
            do {
                results.append(try txn.execute(operation, position: position, count: operations.count, ownsLock: ownsLock))
            } catch let blocked as WaitBlocked {
                if waitsMayBlock, blocked.timeoutMs != 0 { return .blocked(timeoutMs: blocked.timeoutMs) }
                return failed(OVSDBError("timed out", "\"where\" clause test failed"))
            } catch let error as OVSDBError {
                return failed(error)
            } catch {
                return failed(OVSDBError.syntax("\(error)"))
            }
        }
        do {
            guard let changes = try txn.finish(original: tables) else { return .done(results: results, commit: nil) }
            tables = txn.tables
            return .done(results: results, commit: Commit(changes: changes, comment: txn.comment, id: .random()))
        } catch let error as OVSDBError {
            results.append(error.json)
            return .done(results: results, commit: nil)
        } catch {
            results.append(OVSDBError("internal error", "\(error)").json)
            return .done(results: results, commit: nil)
        }
    }
}

struct WaitBlocked: Error {
    let timeoutMs: Int?
}

// MARK: conditions

/// One `[column, function, value]` clause of a "where".
struct Condition {
    enum Function: String { case lt = "<", le = "<=", eq = "==", ne = "!=", ge = ">=", gt = ">", includes, excludes }
    let column: String
    let function: Function
    let value: Datum

    init(json: JSON, table: TableSchema, resolver: NamedUUIDResolver?) throws {
        guard let parts = json.arrayValue, parts.count == 3, let column = parts[0].stringValue, let name = parts[1].stringValue else {
            throw OVSDBError.syntax("a condition must be [column, function, value]", json)
        }
        guard let schema = table.columns[column] else {
            throw OVSDBError.syntax("No column \(column) in table \(table.name).", json)
        }
        guard let function = Function(rawValue: name) else { throw OVSDBError.syntax("unknown function \(name)", json) }
        let ordered: Set<Function> = [.lt, .le, .ge, .gt]
        if ordered.contains(function) {
            guard schema.type.isScalar, schema.type.key.type == .integer || schema.type.key.type == .real else {
                throw OVSDBError.syntax("Type mismatch: \"\(name)\" operator may not be applied to column \(column)", json)
            }
        }
        let type = function == .includes || function == .excludes ? schema.type.relaxed : schema.type
        self.column = column
        self.function = function
        value = try Datum(json: parts[2], type: type, resolver: resolver)
    }

    func matches(_ row: Row) -> Bool {
        guard let datum = row[column] else { return false }
        switch function {
        case .eq: return datum == value
        case .ne: return datum != value
        case .includes: return datum.includes(value)
        case .excludes: return datum.excludes(value)
        case .lt, .le, .gt, .ge:
            guard let left = datum.keys.first, let right = value.keys.first else { return false }
            switch function {
            case .lt: return left < right
            case .le: return left <= right
            case .gt: return left > right
            default: return left >= right
            }
        }
    }

    static func parse(_ json: JSON?, table: TableSchema, resolver: NamedUUIDResolver?) throws -> [Condition] {
        guard let json else { return [] }
        guard let clauses = json.arrayValue else { throw OVSDBError.syntax("\"where\" must be an array", json) }
        return try clauses.map { try Condition(json: $0, table: table, resolver: resolver) }
    }
}

// MARK: the transaction

struct Transaction: NamedUUIDResolver {
    let schema: DatabaseSchema
    var tables: [String: [RowUUID: Row]]
    var touched: [String: Set<RowUUID>] = [:]
    var named: [String: RowUUID] = [:]
    var comment: String?

    init(schema: DatabaseSchema, tables: [String: [RowUUID: Row]]) {
        self.schema = schema
        self.tables = tables
    }

    func resolve(_ name: String) -> RowUUID? { named[name] }

    /// Named UUIDs may be used before the insert that names them, so all are assigned first.
    mutating func assignNamedUUIDs(_ operations: [JSON]) throws {
        for operation in operations where operation["op"]?.stringValue == "insert" {
            guard let name = operation["uuid-name"]?.stringValue else { continue }
            guard named[name] == nil else { throw OVSDBError("duplicate uuid-name", "uuid-name \(name) is used twice", syntax: operation) }
            if let text = operation["uuid"]?.stringValue {
                guard let uuid = RowUUID(text) else { throw OVSDBError.syntax("bad uuid \(text)", operation) }
                named[name] = uuid
            } else {
                named[name] = .random()
            }
        }
    }

    func table(_ operation: JSON) throws -> TableSchema {
        guard let name = operation["table"]?.stringValue else { throw OVSDBError.syntax("operation needs a \"table\"", operation) }
        guard let table = schema.tables[name] else { throw OVSDBError.syntax("No table named \(name).", operation) }
        return table
    }

    func matching(_ table: TableSchema, _ conditions: [Condition]) -> [RowUUID] {
        // An equality on _uuid picks the row directly.
        if let direct = conditions.first(where: { $0.column == "_uuid" && $0.function == .eq }), let uuid = direct.value.keys.first?.uuidValue {
            guard let row = tables[table.name]?[uuid], conditions.allSatisfy({ $0.matches(row) }) else { return [] }
            return [uuid]
        }
        return (tables[table.name] ?? [:]).values.filter { row in conditions.allSatisfy { $0.matches(row) } }.map(\.uuid).sorted()
    }

    mutating func execute(_ operation: JSON, position: Int, count: Int, ownsLock: (String) -> Bool) throws -> JSON {
        guard operation.objectValue != nil, let op = operation["op"]?.stringValue else {
            throw OVSDBError.syntax("Parsing ovsdb operation \(position + 1) of \(count) failed: an operation needs \"op\"", operation)
        }
        switch op {
        case "insert": return try insert(operation)
        case "select": return try select(operation)
        case "update": return try update(operation)
        case "mutate": return try mutate(operation)
        case "delete": return try delete(operation)
        case "wait": return try wait(operation)
        case "commit":
            guard operation["durable"].map({ $0.boolValue != nil }) ?? true else {
                throw OVSDBError.syntax("\"durable\" must be a boolean", operation)
            }
            return .object([:])
        case "abort": throw OVSDBError("aborted", "aborted by request")
        case "comment":
            guard let text = operation["comment"]?.stringValue else { throw OVSDBError.syntax("comment needs a \"comment\" string", operation) }
            comment = comment.map { $0 + "\n" + text } ?? text
            return .object([:])
        case "assert":
            guard let lock = operation["lock"]?.stringValue else { throw OVSDBError.syntax("assert needs a \"lock\"", operation) }
            guard ownsLock(lock) else { throw OVSDBError("not owner", "Asserted lock \(lock) not held.") }
            return .object([:])
        default:
            throw OVSDBError.syntax("Parsing ovsdb operation \(position + 1) of \(count) failed: No operation \"\(op)\"", operation)
        }
    }

    /// Parses `row` of an insert or update into column values.
    func parseRow(_ json: JSON?, table: TableSchema, forUpdate: Bool) throws -> [String: Datum] {
        guard let json else { return [:] }
        guard let members = json.objectValue else { throw OVSDBError.syntax("\"row\" must be an object", json) }
        var values: [String: Datum] = [:]
        for (name, valueJSON) in members {
            guard let column = table.columns[name], !name.hasPrefix("_") else {
                throw OVSDBError.syntax("No column \(name) in table \(table.name).", json)
            }
            if forUpdate, !column.mutable {
                throw OVSDBError(
                    "constraint violation", "Cannot update immutable column \(name) in table \(table.name).", syntax: json)
            }
            let datum = try Datum(json: valueJSON, type: column.type, resolver: self)
            try datum.check(column.type)
            values[name] = datum
        }
        return values
    }

    mutating func insert(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let uuid: RowUUID
        if let name = operation["uuid-name"]?.stringValue, let assigned = named[name] {
            uuid = assigned
        } else if let text = operation["uuid"]?.stringValue {
            guard let given = RowUUID(text) else { throw OVSDBError.syntax("bad uuid \(text)", operation) }
            uuid = given
        } else {
            uuid = .random()
        }
        guard tables[table.name]?[uuid] == nil else {
            throw OVSDBError("duplicate uuid", "This UUID would duplicate a UUID already present within the table or deleted within the same transaction.")
        }
        var columns: [String: Datum] = [:]
        for column in table.columns.values where !column.name.hasPrefix("_") { columns[column.name] = .defaultValue(column.type) }
        for (name, datum) in try parseRow(operation["row"], table: table, forUpdate: false) { columns[name] = datum }
        tables[table.name, default: [:]][uuid] = Row(uuid: uuid, version: .random(), columns: columns)
        touched[table.name, default: []].insert(uuid)
        return .object(["uuid": Atom.uuid(uuid).json])
    }

    func select(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let conditions = try Condition.parse(operation["where"], table: table, resolver: self)
        let columns = try projection(operation["columns"], table: table)
        let rows = matching(table, conditions).compactMap { tables[table.name]?[$0] }
        return .object(["rows": .array(rows.map { $0.json(columns: columns) })])
    }

    func projection(_ json: JSON?, table: TableSchema) throws -> [String]? {
        guard let json else { return nil }
        guard let names = json.arrayValue?.compactMap(\.stringValue), names.count == json.arrayValue?.count else {
            throw OVSDBError.syntax("\"columns\" must be an array of column names", json)
        }
        for name in names where table.columns[name] == nil {
            throw OVSDBError.syntax("No column \(name) in table \(table.name).", json)
        }
        return names
    }

    mutating func update(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let conditions = try Condition.parse(operation["where"], table: table, resolver: self)
        let values = try parseRow(operation["row"], table: table, forUpdate: true)
        let uuids = matching(table, conditions)
        for uuid in uuids {
            guard var row = tables[table.name]?[uuid] else { continue }
            for (name, datum) in values { row.columns[name] = datum }
            store(row, table: table.name)
        }
        return .object(["count": .int(Int64(uuids.count))])
    }

    mutating func store(_ row: Row, table: String) {
        var row = row
        if tables[table]?[row.uuid] != row { row.version = .random() }
        tables[table, default: [:]][row.uuid] = row
        touched[table, default: []].insert(row.uuid)
    }

    mutating func mutate(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let conditions = try Condition.parse(operation["where"], table: table, resolver: self)
        guard let mutationsJSON = operation["mutations"]?.arrayValue else {
            throw OVSDBError.syntax("mutate needs \"mutations\"", operation)
        }
        let mutations = try mutationsJSON.map { try Mutation(json: $0, table: table, resolver: self) }
        let uuids = matching(table, conditions)
        for uuid in uuids {
            guard var row = tables[table.name]?[uuid] else { continue }
            for mutation in mutations {
                guard let current = row.columns[mutation.column.name] else { continue }
                let result = try mutation.apply(to: current)
                try result.check(mutation.column.type)
                row.columns[mutation.column.name] = result
            }
            store(row, table: table.name)
        }
        return .object(["count": .int(Int64(uuids.count))])
    }

    mutating func delete(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let conditions = try Condition.parse(operation["where"], table: table, resolver: self)
        let uuids = matching(table, conditions)
        for uuid in uuids {
            tables[table.name]?[uuid] = nil
            touched[table.name, default: []].insert(uuid)
        }
        return .object(["count": .int(Int64(uuids.count))])
    }

    func wait(_ operation: JSON) throws -> JSON {
        let table = try table(operation)
        let conditions = try Condition.parse(operation["where"], table: table, resolver: self)
        guard let columns = try projection(operation["columns"], table: table) else {
            throw OVSDBError.syntax("wait needs \"columns\"", operation)
        }
        guard let until = operation["until"]?.stringValue, until == "==" || until == "!=" else {
            throw OVSDBError.syntax("wait needs \"until\" of == or !=", operation)
        }
        guard let rowsJSON = operation["rows"]?.arrayValue else { throw OVSDBError.syntax("wait needs \"rows\"", operation) }
        var timeoutMs: Int?
        if let timeout = operation["timeout"] {
            guard let value = timeout.intValue, value >= 0 else { throw OVSDBError.syntax("timeout must be a non-negative integer", timeout) }
            timeoutMs = Int(value)
        }
        var expected: [[String: Datum]] = []
        for rowJSON in rowsJSON {
            guard let members = rowJSON.objectValue else { throw OVSDBError.syntax("wait rows must be objects", rowJSON) }
            var values: [String: Datum] = [:]
            for (name, valueJSON) in members {
                guard columns.contains(name), let column = table.columns[name] else {
                    throw OVSDBError.syntax("wait row names column \(name), which is not in \"columns\"", rowJSON)
                }
                values[name] = try Datum(json: valueJSON, type: column.type, resolver: self)
            }
            expected.append(values)
        }
        let actual = matching(table, conditions).compactMap { tables[table.name]?[$0] }.map { row in
            Dictionary(uniqueKeysWithValues: columns.compactMap { name in row[name].map { (name, $0) } })
        }
        // Compare as multisets of projected rows.
        var remaining = actual
        var equal = true
        for row in expected {
            if let index = remaining.firstIndex(of: row) { remaining.remove(at: index) } else { equal = false; break }
        }
        if !remaining.isEmpty { equal = false }
        guard equal == (until == "==") else { throw WaitBlocked(timeoutMs: timeoutMs) }
        return .object([:])
    }

    // MARK: commit

    func exists(_ table: String, _ uuid: RowUUID) -> Bool { tables[table]?[uuid] != nil }

    /// Collects garbage, drops dangling weak references, checks integrity and constraints, and
    /// returns the changes (nil if nothing changed).
    mutating func finish(original: [String: [RowUUID: Row]]) throws -> [String: [RowUUID: RowChange]]? {
        guard touched.values.contains(where: { !$0.isEmpty }) else { return nil }
        // References first (as ovsdb-server does): a new row pointing nowhere is an error even if
        // garbage collection would remove that row next.
        try checkReferences(original: original)
        var deletedSomething = touched.contains { table, uuids in uuids.contains { tables[table]?[$0] == nil } }
        while true {
            var changed = false
            if deletedSomething {
                changed = dropWeakReferences() || changed
            }
            let collected = collectGarbage()
            if collected { deletedSomething = true }
            changed = changed || collected
            if !changed { break }
        }
        // Constraints of every changed row, then table limits.
        for (tableName, uuids) in touched {
            guard let table = schema.tables[tableName] else { continue }
            for uuid in uuids {
                guard let row = tables[tableName]?[uuid] else { continue }
                for (name, datum) in row.columns {
                    guard let column = table.columns[name] else { continue }
                    do {
                        try datum.check(column.type)
                    } catch let error as OVSDBError {
                        throw OVSDBError.constraint("Table \(tableName) column \(name) row \(uuid): \(error.details)")
                    }
                }
            }
            let count = tables[tableName]?.count ?? 0
            if let maxRows = table.maxRows, count > maxRows {
                throw OVSDBError.constraint("Transaction causes \(count) rows in table \(tableName), but it has a maximum of \(maxRows)")
            }
            for index in table.indexes {
                var seen: [[Datum]: RowUUID] = [:]
                for row in (tables[tableName] ?? [:]).values {
                    let key = index.map { row[$0] ?? Datum(set: []) }
                    if let other = seen[key] {
                        let names = index.joined(separator: ", ")
                        throw OVSDBError.constraint(
                            "Transaction causes multiple rows in \"\(tableName)\" table to have identical values (\(key.map { $0.json.text }.joined(separator: ", "))) for index on columns (\(names)). First row, with UUID \(other), was inserted or modified by this transaction. Second row, with UUID \(row.uuid), existed in the database before this transaction or was inserted or modified by this transaction."
                        )
                    }
                    seen[key] = row.uuid
                }
            }
        }
        var changes: [String: [RowUUID: RowChange]] = [:]
        for (tableName, uuids) in touched {
            for uuid in uuids {
                let old = original[tableName]?[uuid]
                let new = tables[tableName]?[uuid]
                if old == nil, new == nil { continue }
                if let old, let new, old.columns == new.columns {
                    tables[tableName]?[uuid]?.version = old.version
                    continue
                }
                changes[tableName, default: [:]][uuid] = RowChange(old: old, new: new)
            }
        }
        return changes.isEmpty ? nil : changes
    }

    /// Removes weak references to rows that no longer exist; true if any row changed.
    mutating func dropWeakReferences() -> Bool {
        var changed = false
        for (tableName, table) in schema.tables {
            let weakColumns = table.columns.values.filter { column in
                [column.type.key, column.type.value].contains { $0?.refTable != nil && $0?.refType == .weak }
            }
            guard !weakColumns.isEmpty else { continue }
            for row in (tables[tableName] ?? [:]).values {
                var updated = row
                for column in weakColumns {
                    guard let datum = row.columns[column.name] else { continue }
                    let kept = datum.droppingDangling(column.type, exists: exists)
                    if kept != datum { updated.columns[column.name] = kept }
                }
                if updated != row {
                    store(updated, table: tableName)
                    changed = true
                }
            }
        }
        return changed
    }

    /// Deletes rows of non-root tables that no strong reference reaches; true if any went.
    mutating func collectGarbage() -> Bool {
        var referenced: [String: Set<RowUUID>] = [:]
        for (tableName, table) in schema.tables {
            for row in (tables[tableName] ?? [:]).values {
                for (name, datum) in row.columns {
                    guard let column = table.columns[name] else { continue }
                    for (uuid, base) in datum.references(column.type) where base.refType == .strong {
                        if let target = base.refTable { referenced[target, default: []].insert(uuid) }
                    }
                }
            }
        }
        var collected = false
        for (tableName, table) in schema.tables where !table.isRoot {
            for uuid in (tables[tableName] ?? [:]).keys where !(referenced[tableName]?.contains(uuid) ?? false) {
                tables[tableName]?[uuid] = nil
                touched[tableName, default: []].insert(uuid)
                collected = true
            }
        }
        return collected
    }

    /// Every strong reference must name an existing row.
    func checkReferences(original: [String: [RowUUID: Row]]) throws {
        for (tableName, table) in schema.tables {
            for row in (tables[tableName] ?? [:]).values {
                for (name, datum) in row.columns {
                    guard let column = table.columns[name] else { continue }
                    for (uuid, base) in datum.references(column.type) where base.refType == .strong {
                        guard let target = base.refTable, !exists(target, uuid) else { continue }
                        if original[target]?[uuid] != nil, !(touched[tableName]?.contains(row.uuid) ?? false) {
                            throw OVSDBError(
                                "referential integrity violation",
                                "cannot delete \(target) row \(uuid) because of 1 remaining reference(s)")
                        }
                        throw OVSDBError(
                            "referential integrity violation",
                            "Table \(tableName) column \(name) row \(row.uuid) references nonexistent row \(uuid) in table \(target).")
                    }
                }
            }
        }
    }
}

// MARK: mutations

/// One `[column, mutator, value]` of a mutate operation.
struct Mutation {
    enum Mutator: String { case add = "+=", subtract = "-=", multiply = "*=", divide = "/=", modulo = "%=", insert, delete }
    let column: ColumnSchema
    let mutator: Mutator
    let operand: Datum

    init(json: JSON, table: TableSchema, resolver: NamedUUIDResolver) throws {
        guard let parts = json.arrayValue, parts.count == 3, let name = parts[0].stringValue, let mutatorName = parts[1].stringValue else {
            throw OVSDBError.syntax("a mutation must be [column, mutator, value]", json)
        }
        guard let column = table.columns[name], !name.hasPrefix("_") else {
            throw OVSDBError.syntax("No column \(name) in table \(table.name).", json)
        }
        guard column.mutable else {
            throw OVSDBError("constraint violation", "Cannot mutate immutable column \(name) in table \(table.name).", syntax: json)
        }
        guard let mutator = Mutator(rawValue: mutatorName) else { throw OVSDBError.syntax("unknown mutator \(mutatorName)", json) }
        self.column = column
        self.mutator = mutator
        switch mutator {
        case .insert:
            operand = try Datum(json: parts[2], type: column.type.relaxed, resolver: resolver)
        case .delete:
            // For maps, delete takes either a map or a set of keys.
            if column.type.isMap, case .array(let pair) = parts[2], pair.first?.stringValue != "map" {
                let keys = ColumnType(key: column.type.key, value: nil, min: 0, max: Int.max)
                operand = try Datum(json: parts[2], type: keys, resolver: resolver)
            } else {
                operand = try Datum(json: parts[2], type: column.type.relaxed, resolver: resolver)
            }
        default:
            let scalar = column.type.key.type
            guard !column.type.isMap, scalar == .integer || scalar == .real else {
                throw OVSDBError.syntax("Type mismatch: \"\(mutatorName)\" may not be applied to column \(name)", json)
            }
            if mutator == .modulo, scalar != .integer {
                throw OVSDBError.syntax("Type mismatch: \"%=\" may not be applied to real column \(name)", json)
            }
            operand = Datum(try column.type.key.atom(json: parts[2], resolver: resolver))
        }
    }

    func apply(to datum: Datum) throws -> Datum {
        switch mutator {
        case .insert: return datum.inserting(operand)
        case .delete: return datum.deleting(operand)
        default:
            guard let operandAtom = operand.keys.first else { return datum }
            let atoms = try datum.keys.map { try arithmetic($0, operandAtom) }
            return Datum(set: atoms)
        }
    }

    private func arithmetic(_ left: Atom, _ right: Atom) throws -> Atom {
        switch (left, right) {
        case (.integer(let a), .integer(let b)):
            let result: (Int64, Bool)
            switch mutator {
            case .add: result = a.addingReportingOverflow(b)
            case .subtract: result = a.subtractingReportingOverflow(b)
            case .multiply: result = a.multipliedReportingOverflow(by: b)
            case .divide:
                guard b != 0 else { throw OVSDBError("domain error", "Division by zero.") }
                result = a.dividedReportingOverflow(by: b)
            default:
                guard b != 0 else { throw OVSDBError("domain error", "Division by zero.") }
                result = a.remainderReportingOverflow(dividingBy: b)
            }
            guard !result.1 else { throw OVSDBError("range error", "Result of \"\(mutator.rawValue)\" operation is out of range.") }
            return .integer(result.0)
        case (.real(let a), .real(let b)):
            let value: Double
            switch mutator {
            case .add: value = a + b
            case .subtract: value = a - b
            case .multiply: value = a * b
            default:
                guard b != 0 else { throw OVSDBError("domain error", "Division by zero.") }
                value = a / b
            }
            guard value.isFinite else { throw OVSDBError("range error", "Result of \"\(mutator.rawValue)\" operation is out of range.") }
            return .real(value)
        default:
            throw OVSDBError.syntax("Type mismatch in \"\(mutator.rawValue)\"")
        }
    }
}
