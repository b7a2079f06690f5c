// A stand-in for swift-log's `Logger` so that the fuzz targets compile from source files alone.
// Only the calls the fuzzed sources make; messages are discarded.
public struct Logger: Sendable {
    enum Level: Sendable { case trace, debug, info, notice, warning, error, critical }
    public struct Message: ExpressibleByStringInterpolation, Sendable {
        public init(stringLiteral value: String) {}
        public init(stringInterpolation: DefaultStringInterpolation) {}
    }
    public init(label: String) {}
    public func trace(_ message: @autoclosure () -> Message) {}
    public func debug(_ message: @autoclosure () -> Message) {}
    public func info(_ message: @autoclosure () -> Message) {}
    public func warning(_ message: @autoclosure () -> Message) {}
    public func error(_ message: @autoclosure () -> Message) {}
}
