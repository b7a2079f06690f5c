// OVSDB layer: monitors (RFC 7047 section 4.1.5, and the monitor_cond/monitor_cond_since
// extensions OVS clients use). A monitor names tables, columns, which kinds of change to report
// and, for monitor_cond, a condition per table; it turns the initial contents and each commit into
// the "table-updates" (version 1) or "table-updates2" (versions 2 and 3) JSON.

public struct MonitorRequest: Sendable {
    /// 1: monitor ("update", old/new rows); 2: monitor_cond ("update2", diffs); 3: monitor_cond_since ("update3").
    public let version: Int
    struct TableMonitor: Sendable {
        var columns: [String]
        var initial = true
        var insert = true
        var delete = true
        var modify = true
        /// Conjunction of clauses; nil matches every row. `false` literals make `never` true.
        var conditions: [ConditionClause]?
    }
    var tables: [String: TableMonitor] = [:]

    public init(json: JSON, schema: DatabaseSchema, version: Int) throws {
        self.version = version
        guard let requests = json.objectValue else { throw OVSDBError.syntax("monitor requests must be an object", json) }
        for (tableName, requestJSON) in requests {
            guard let table = schema.tables[tableName] else { throw OVSDBError.syntax("no table named \(tableName)", json) }
            let list = requestJSON.arrayValue ?? [requestJSON]
            var merged: TableMonitor?
            for request in list {
                guard let members = request.objectValue else { throw OVSDBError.syntax("a monitor request must be an object", request) }
                var columns = table.userColumns
                if let names = members["columns"] {
                    guard let list = names.arrayValue?.compactMap(\.stringValue), list.count == names.arrayValue?.count else {
                        throw OVSDBError.syntax("\"columns\" must be an array of column names", names)
                    }
                    for name in list where table.columns[name] == nil {
                        throw OVSDBError.syntax("no column \(name) in table \(tableName)", names)
                    }
                    if !list.isEmpty { columns = list }
                }
                var monitor = TableMonitor(columns: columns)
                if let select = members["select"]?.objectValue {
                    monitor.initial = select["initial"]?.boolValue ?? true
                    monitor.insert = select["insert"]?.boolValue ?? true
                    monitor.delete = select["delete"]?.boolValue ?? true
                    monitor.modify = select["modify"]?.boolValue ?? true
                }
                if version >= 2, let whereJSON = members["where"] {
                    guard let clauses = whereJSON.arrayValue else { throw OVSDBError.syntax("\"where\" must be an array", whereJSON) }
                    monitor.conditions = try clauses.map { clause in
                        if let literal = clause.boolValue { return .literal(literal) }
                        return .condition(try Condition(json: clause, table: table, resolver: nil))
                    }
                }
                if var existing = merged {
                    existing.columns = Array(Set(existing.columns + monitor.columns)).sorted()
                    existing.initial = existing.initial || monitor.initial
                    existing.insert = existing.insert || monitor.insert
                    existing.delete = existing.delete || monitor.delete
                    existing.modify = existing.modify || monitor.modify
                    merged = existing
                } else {
                    merged = monitor
                }
            }
            if let merged { tables[tableName] = merged }
        }
    }

    /// The table-updates for the rows present when the monitor starts.
    public func initial(_ database: Database) -> JSON {
        var updates: [String: JSON] = [:]
        for (tableName, monitor) in tables where monitor.initial {
            var rows: [String: JSON] = [:]
            for row in database.rows(tableName) where monitor.matches(row) {
                rows[row.uuid.description] =
                    version == 1
                    ? .object(["new": row.json(columns: monitor.columns)])
                    : .object(["initial": nonDefault(row, monitor, database.schema.tables[tableName])])
            }
            if !rows.isEmpty { updates[tableName] = .object(rows) }
        }
        return .object(updates)
    }

    /// The table-updates for one commit, or nil if none of it concerns this monitor.
    public func update(_ commit: Commit, schema: DatabaseSchema) -> JSON? {
        var updates: [String: JSON] = [:]
        for (tableName, changes) in commit.changes {
            guard let monitor = tables[tableName] else { continue }
            var rows: [String: JSON] = [:]
            for (uuid, change) in changes {
                let old = change.old.flatMap { monitor.matches($0) ? $0 : nil }
                let new = change.new.flatMap { monitor.matches($0) ? $0 : nil }
                let key = uuid.description
                switch (old, new) {
                case (nil, let new?):
                    guard monitor.insert else { continue }
                    rows[key] =
                        version == 1
                        ? .object(["new": new.json(columns: monitor.columns)])
                        : .object(["insert": nonDefault(new, monitor, schema.tables[tableName])])
                case (let old?, nil):
                    guard monitor.delete else { continue }
                    rows[key] = version == 1 ? .object(["old": old.json(columns: monitor.columns)]) : .object(["delete": .null])
                case (let old?, let new?):
                    guard monitor.modify else { continue }
                    let changed = monitor.columns.filter { old[$0] != new[$0] }
                    guard !changed.isEmpty else { continue }
                    if version == 1 {
                        rows[key] = .object(["old": old.json(columns: changed), "new": new.json(columns: monitor.columns)])
                    } else {
                        var diff: [String: JSON] = [:]
                        for name in changed {
                            guard let before = old[name], let after = new[name] else { continue }
                            let scalar = schema.tables[tableName]?.columns[name]?.type.isScalar ?? false
                            diff[name] = scalar || name.hasPrefix("_") ? after.json : before.diff(to: after).json
                        }
                        rows[key] = .object(["modify": .object(diff)])
                    }
                case (nil, nil): continue
                }
            }
            if !rows.isEmpty { updates[tableName] = .object(rows) }
        }
        return updates.isEmpty ? nil : .object(updates)
    }

    private func nonDefault(_ row: Row, _ monitor: TableMonitor, _ table: TableSchema?) -> JSON {
        var members: [String: JSON] = [:]
        for name in monitor.columns {
            guard let datum = row[name] else { continue }
            if let type = table?.columns[name]?.type, !name.hasPrefix("_"), datum == Datum.defaultValue(type) { continue }
            members[name] = datum.json
        }
        return .object(members)
    }
}

enum ConditionClause: Sendable {
    case literal(Bool)
    case condition(Condition)
}

extension MonitorRequest.TableMonitor {
    func matches(_ row: Row) -> Bool {
        guard let conditions else { return true }
        return conditions.allSatisfy { clause in
            switch clause {
            case .literal(let value): value
            case .condition(let condition): condition.matches(row)
            }
        }
    }
}
