// LinuxSystem (layer 1): blocking stream sockets for servers that give each connection its own
// thread (the NBD export): a listener on TCP or a Unix path, and blocking whole transfers.
import CNimbusLinux
import Glibc

/// A blocking listening socket. `accept` waits for a connection; `close` wakes a waiting
/// `accept`, which then returns nil.
public final class StreamListener: Sendable {
    public let descriptor: OwnedFileDescriptor
    /// The Unix socket path, removed by `close`.
    public let path: String?

    private init(descriptor: OwnedFileDescriptor, path: String?) {
        self.descriptor = descriptor
        self.path = path
    }

    /// Listens on TCP `host`:`port` (port 0 picks a free port; see `port`).
    public static func tcp(host: String, port: Int, backlog: Int32 = 128) throws(SystemError) -> StreamListener {
        let fd = try syscallOnce("bind", subject: "\(host):\(port)") { nimbus_tcp_listen(host, Int32(port), backlog) }
        return StreamListener(descriptor: OwnedFileDescriptor(taking: fd), path: nil)
    }

    /// Listens on Unix socket `path`, replacing a stale socket file left there.
    public static func unix(path: String, backlog: Int32 = 128) throws(SystemError) -> StreamListener {
        UnixSocketPath.remove(path)
        let fd = try UnixStream.listen(path, backlog: backlog)
        try fd.setNonBlocking(false)
        return StreamListener(descriptor: fd, path: path)
    }

    /// The bound TCP port, or nil for a Unix socket.
    public var port: Int? {
        let port = nimbus_local_port(descriptor.rawValue)
        return port >= 0 ? Int(port) : nil
    }

    /// Waits for the next connection (blocking, close-on-exec, TCP_NODELAY on TCP). Returns nil
    /// once the listener is closed.
    public func accept() throws(SystemError) -> OwnedFileDescriptor? {
        while true {
            let fd = nimbus_accept_blocking(descriptor.rawValue)
            if fd >= 0 { return OwnedFileDescriptor(taking: fd) }
            let code = Glibc.errno
            if code == EINTR || code == ECONNABORTED { continue }
            // shutdown(2) of a listening socket makes a blocked accept fail with EINVAL.
            if code == EINVAL { return nil }
            if code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM {
                // Out of descriptors or memory: wait a little instead of spinning or giving up.
                usleep(10_000)
                continue
            }
            throw SystemError(call: "accept4", errno: code)
        }
    }

    /// Stops listening: a waiting `accept` returns nil and the Unix socket file is removed.
    public func close() {
        descriptor.shutdownBoth()
        if let path { UnixSocketPath.remove(path) }
    }
}

extension OwnedFileDescriptor {
    /// shutdown(2) of both directions: a thread blocked reading the socket sees end of stream.
    public func shutdownBoth() { _ = Glibc.shutdown(rawValue, Int32(SHUT_RDWR)) }

    /// Writes all of `buffer` to a blocking socket, retrying short writes and EINTR.
    public func sendAll(_ buffer: UnsafeRawBufferPointer) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try retryingSyscall("send") {
                // SAFETY: sends at most the remaining bytes of the caller's buffer.
                Glibc.send(rawValue, buffer.baseAddress?.advanced(by: done), buffer.count - done, Int32(MSG_NOSIGNAL))
            }
            done += n
        }
    }

    /// Reads what is available, at most `buffer.count` bytes, blocking until there is something;
    /// 0 means end of stream.
    public func receiveSome(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int {
        try retryingSyscall("recv") {
            // SAFETY: receives at most buffer.count bytes into the caller's buffer.
            Glibc.recv(rawValue, buffer.baseAddress, buffer.count, 0)
        }
    }
}
