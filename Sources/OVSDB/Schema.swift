// OVSDB layer: database schemas (RFC 7047 section 3.2), parsed from the same .ovsschema files
// ovsdb-server reads. The server is generic: nothing here knows about Open vSwitch's tables.

public struct ColumnSchema: Sendable {
    public var name: String
    public var type: ColumnType
    public var ephemeral: Bool
    public var mutable: Bool
}

public struct TableSchema: Sendable {
    public var name: String
    /// Every column, including `_uuid` and `_version`.
    public var columns: [String: ColumnSchema]
    public var maxRows: Int?
    public var isRoot: Bool
    public var indexes: [[String]]

    /// The user columns (without `_uuid` and `_version`), sorted.
    public var userColumns: [String] { columns.keys.filter { !$0.hasPrefix("_") }.sorted() }
}

public struct DatabaseSchema: Sendable {
    public var name: String
    public var version: String
    public var cksum: String?
    public var tables: [String: TableSchema]
    /// The schema as it was read, returned by get_schema and written at the head of the db file.
    public var json: JSON

    public init(json: JSON) throws {
        guard let members = json.objectValue else { throw OVSDBError.syntax("a schema must be a JSON object", json) }
        guard let name = members["name"]?.stringValue, !name.isEmpty else { throw OVSDBError.syntax("the schema has no \"name\"", json) }
        guard let tablesJSON = members["tables"]?.objectValue, !tablesJSON.isEmpty else {
            throw OVSDBError.syntax("the schema has no \"tables\"", json)
        }
        self.name = name
        version = members["version"]?.stringValue ?? "0.0.0"
        cksum = members["cksum"]?.stringValue
        self.json = json
        var tables: [String: TableSchema] = [:]
        for (tableName, tableJSON) in tablesJSON {
            guard !tableName.hasPrefix("_"), let table = tableJSON.objectValue, let columnsJSON = table["columns"]?.objectValue else {
                throw OVSDBError.syntax("table \(tableName) needs \"columns\" (and a name not starting with _)", tableJSON)
            }
            var columns: [String: ColumnSchema] = [:]
            for (columnName, columnJSON) in columnsJSON {
                guard !columnName.hasPrefix("_"), let column = columnJSON.objectValue, let typeJSON = column["type"] else {
                    throw OVSDBError.syntax("column \(tableName).\(columnName) needs a \"type\"", columnJSON)
                }
                let type: ColumnType
                do {
                    type = try ColumnType(json: typeJSON)
                } catch let error as OVSDBError {
                    throw OVSDBError.syntax("column \(tableName).\(columnName): \(error.details)", columnJSON)
                }
                columns[columnName] = ColumnSchema(
                    name: columnName, type: type, ephemeral: column["ephemeral"]?.boolValue ?? false,
                    mutable: column["mutable"]?.boolValue ?? true)
            }
            let uuidType = ColumnType(key: BaseType(.uuid), value: nil, min: 1, max: 1)
            columns["_uuid"] = ColumnSchema(name: "_uuid", type: uuidType, ephemeral: false, mutable: false)
            columns["_version"] = ColumnSchema(name: "_version", type: uuidType, ephemeral: false, mutable: false)
            var indexes: [[String]] = []
            for index in table["indexes"]?.arrayValue ?? [] {
                guard let names = index.arrayValue?.compactMap(\.stringValue), !names.isEmpty,
                    names.allSatisfy({ columns[$0] != nil })
                else {
                    throw OVSDBError.syntax("table \(tableName) has an index naming an unknown column", index)
                }
                indexes.append(names)
            }
            var maxRows: Int?
            if let limit = table["maxRows"] {
                guard let value = limit.intValue, value >= 1 else { throw OVSDBError.syntax("maxRows must be a positive integer", limit) }
                maxRows = Int(value)
            }
            tables[tableName] = TableSchema(
                name: tableName, columns: columns, maxRows: maxRows, isRoot: table["isRoot"]?.boolValue ?? false,
                indexes: indexes)
        }
        // References must name tables that exist.
        for table in tables.values {
            for column in table.columns.values {
                for base in [column.type.key] + (column.type.value.map { [$0] } ?? []) {
                    if let ref = base.refTable, tables[ref] == nil {
                        throw OVSDBError.syntax("column \(table.name).\(column.name) refers to unknown table \(ref)", json)
                    }
                }
            }
        }
        // A schema where no table is a root treats every table as one (RFC 7047 3.2).
        if !tables.values.contains(where: \.isRoot) {
            for name in tables.keys { tables[name]?.isRoot = true }
        }
        self.tables = tables
    }

    public init(text: String) throws {
        let json: JSON
        do {
            json = try JSON.parse(text)
        } catch {
            throw OVSDBError.syntax("the schema is not valid JSON: \(error)")
        }
        try self.init(json: json)
    }
}

/// The schema of the `_Server` database that ovsdb-server serves beside the user's databases;
/// OVS clients (ovs-vsctl included) read it first to learn each database's state.
public enum ServerSchema {
    public static let text = """
        {"name":"_Server","version":"1.2.0","cksum":"3009684573 744","tables":{"Database":{"columns":{\
        "name":{"type":"string"},\
        "model":{"type":{"key":{"type":"string","enum":["set",["clustered","relay","standalone"]]}}},\
        "connected":{"type":"boolean"},"leader":{"type":"boolean"},\
        "schema":{"type":{"key":"string","min":0}},"sid":{"type":{"key":"uuid","min":0}},\
        "cid":{"type":{"key":"uuid","min":0}},"index":{"type":{"key":"integer","min":0}}},"isRoot":true}}}
        """
}
