// LinuxSystem (layer 1): epoll, vectored and non-blocking I/O, and the other calls that virtio
// device threads need (TAP devices, Unix stream sockets, getrandom).
import CNimbusLinux
import Glibc

/// An epoll instance; each registered descriptor carries a caller-chosen 64-bit token.
public final class Epoll: Sendable {
    public let descriptor: OwnedFileDescriptor

    public struct Event: Sendable {
        public let token: UInt64
        public let mask: UInt32
        public init(token: UInt64, mask: UInt32) {
            self.token = token
            self.mask = mask
        }
        public var readable: Bool { mask & NIMBUS_EPOLLIN != 0 }
        public var writable: Bool { mask & NIMBUS_EPOLLOUT != 0 }
        public var hangup: Bool { mask & (NIMBUS_EPOLLHUP | NIMBUS_EPOLLERR | NIMBUS_EPOLLRDHUP) != 0 }
    }

    public static let input = NIMBUS_EPOLLIN
    public static let output = NIMBUS_EPOLLOUT
    public static let peerClosed = NIMBUS_EPOLLRDHUP
    public static let edgeTriggered = NIMBUS_EPOLLET

    public init() throws(SystemError) {
        descriptor = OwnedFileDescriptor(taking: try syscallOnce("epoll_create1") { epoll_create1(NIMBUS_EPOLL_CLOEXEC) })
    }

    /// Starts watching `fd` for `events` (level triggered).
    public func add(_ fd: Int32, events: UInt32, token: UInt64) throws(SystemError) {
        try syscallOnce("epoll_ctl(ADD)") { nimbus_epoll_ctl(descriptor.rawValue, NIMBUS_EPOLL_CTL_ADD, fd, events, token) }
    }

    /// Changes the events watched on `fd`.
    public func modify(_ fd: Int32, events: UInt32, token: UInt64) throws(SystemError) {
        try syscallOnce("epoll_ctl(MOD)") { nimbus_epoll_ctl(descriptor.rawValue, NIMBUS_EPOLL_CTL_MOD, fd, events, token) }
    }

    /// Stops watching `fd` (errors are ignored: the descriptor may already be closed).
    public func remove(_ fd: Int32) {
        _ = nimbus_epoll_ctl(descriptor.rawValue, NIMBUS_EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Space for the events of one wait, kept by a caller that waits in a loop: `wait(into:)`
    /// allocates nothing.
    public struct Events {
        public fileprivate(set) var count = 0
        fileprivate var tokens: [UInt64]
        fileprivate var masks: [UInt32]

        public init(capacity: Int = 64) {
            tokens = [UInt64](repeating: 0, count: Swift.max(1, capacity))
            masks = [UInt32](repeating: 0, count: Swift.max(1, capacity))
        }

        public subscript(_ index: Int) -> Event { Event(token: tokens[index], mask: masks[index]) }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for events, into `events`; returns how many.
    @discardableResult
    public func wait(into events: inout Events, timeoutMilliseconds: Int32 = -1) throws(SystemError) -> Int {
        let capacity = Int32(events.tokens.count)
        events.count = 0
        let n = try retryingSyscall("epoll_wait") {
            // SAFETY: both arrays hold `capacity` elements and the shim writes at most that many.
            nimbus_epoll_wait(descriptor.rawValue, &events.tokens, &events.masks, capacity, timeoutMilliseconds)
        }
        events.count = Int(n)
        return events.count
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for events.
    public func wait(timeoutMilliseconds: Int32 = -1, max: Int = 64) throws(SystemError) -> [Event] {
        var events = Events(capacity: max)
        try wait(into: &events, timeoutMilliseconds: timeoutMilliseconds)
        return (0..<events.count).map { events[$0] }
    }
}

/// What a non-blocking transfer did.
public enum TransferResult: Sendable, Equatable {
    /// This many bytes moved (0 on a read means end of stream).
    case done(Int)
    /// The descriptor is not ready (EAGAIN).
    case wouldBlock
}

extension OwnedFileDescriptor {
    /// writev(2) of `buffers`; EAGAIN becomes `.wouldBlock`.
    public func writeVector(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) -> TransferResult {
        var vectors = buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        return try transfer("writev") {
            // SAFETY: every iovec comes from a live buffer the caller lent us for this call.
            Glibc.writev(rawValue, &vectors, Int32(vectors.count))
        }
    }

    /// readv(2) into `buffers`; EAGAIN becomes `.wouldBlock`.
    public func readVector(_ buffers: [UnsafeMutableRawBufferPointer]) throws(SystemError) -> TransferResult {
        var vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        return try transfer("readv") {
            // SAFETY: every iovec comes from a live, writable buffer the caller lent us.
            Glibc.readv(rawValue, &vectors, Int32(vectors.count))
        }
    }

    /// read(2) into `buffer`; EAGAIN becomes `.wouldBlock`.
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> TransferResult {
        try transfer("read") {
            // SAFETY: reads at most buffer.count bytes into the caller's buffer.
            Glibc.read(rawValue, buffer.baseAddress, buffer.count)
        }
    }

    /// write(2) from `buffer` (MSG_NOSIGNAL semantics for sockets via send); EAGAIN → `.wouldBlock`.
    public func writeSome(_ buffer: UnsafeRawBufferPointer) throws(SystemError) -> TransferResult {
        try transfer("send") {
            // SAFETY: sends at most buffer.count bytes from the caller's buffer.
            Glibc.send(rawValue, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL))
        }
    }

    private func transfer(_ call: String, _ body: () -> Int) throws(SystemError) -> TransferResult {
        while true {
            let n = body()
            if n >= 0 { return .done(n) }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return .wouldBlock }
            throw SystemError(call: call, errno: code)
        }
    }

    /// Fills `buffers` in order from the file at `offset` with preadv, retrying short reads; fails
    /// with EIO if the file ends first.
    public func readFully(into buffers: [UnsafeMutableRawBufferPointer], at offset: Int) throws(SystemError) {
        var vectors = buffers.filter { $0.count > 0 }.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        try vectoredFully("preadv", &vectors, offset: offset) { v, n, at in
            // SAFETY: every iovec describes a live, writable buffer the caller lent us.
            Glibc.preadv(rawValue, v, n, off_t(at))
        }
    }

    /// Writes `buffers` in order to the file at `offset` with pwritev, retrying short writes.
    public func writeFully(_ buffers: [UnsafeRawBufferPointer], at offset: Int) throws(SystemError) {
        var vectors = buffers.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        try vectoredFully("pwritev", &vectors, offset: offset) { v, n, at in
            // SAFETY: every iovec describes a live buffer the caller lent us; pwritev only reads it.
            Glibc.pwritev(rawValue, v, n, off_t(at))
        }
    }

    private func vectoredFully(
        _ call: String, _ vectors: inout [iovec], offset: Int, _ body: (UnsafePointer<iovec>, Int32, Int) -> Int
    ) throws(SystemError) {
        var first = 0
        var at = offset
        while first < vectors.count {
            let count = min(vectors.count - first, 1024)  // IOV_MAX
            let n = try retryingSyscall(call, subject: "offset \(at)") {
                vectors.withUnsafeBufferPointer { v in
                    // SAFETY: [first, first+count) lies inside the array.
                    body(v.baseAddress.unsafelyUnwrapped.advanced(by: first), Int32(count), at)
                }
            }
            if n == 0 { throw SystemError(call: call, subject: "offset \(at) (file ended early)", errno: EIO) }
            at += n
            // Drop the vectors that were completed and trim a partly completed one.
            var left = n
            while left > 0 && first < vectors.count {
                if left >= vectors[first].iov_len {
                    left -= vectors[first].iov_len
                    first += 1
                } else {
                    vectors[first].iov_base = vectors[first].iov_base.map { $0.advanced(by: left) }
                    vectors[first].iov_len -= left
                    left = 0
                }
            }
        }
    }

    /// Sets or clears O_NONBLOCK.
    public func setNonBlocking(_ on: Bool = true) throws(SystemError) {
        let flags = try syscallOnce("fcntl(F_GETFL)") { fcntl(rawValue, F_GETFL) }
        try syscallOnce("fcntl(F_SETFL)") { fcntl(rawValue, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) }
    }

    /// shutdown(2) of the write side (a socket's peer sees end of stream).
    public func shutdownWrite() { _ = Glibc.shutdown(rawValue, Int32(SHUT_WR)) }
}

/// A TAP interface opened with virtio-net headers on every frame.
public enum TapDevice {
    /// Attaches to (or creates) TAP interface `name` with IFF_NO_PI and IFF_VNET_HDR, sets the
    /// header size, and makes the descriptor non-blocking.
    public static func open(_ name: String, vnetHeaderSize: Int32 = 12) throws(SystemError) -> OwnedFileDescriptor {
        let fd = try OwnedFileDescriptor.open("/dev/net/tun", flags: O_RDWR | O_NONBLOCK)
        try syscallOnce("ioctl(TUNSETIFF)", subject: name) {
            nimbus_tun_set_iff(fd.rawValue, name, NIMBUS_IFF_TAP | NIMBUS_IFF_NO_PI | NIMBUS_IFF_VNET_HDR)
        }
        var size = vnetHeaderSize
        try syscallOnce("ioctl(TUNSETVNETHDRSZ)", subject: name) { nimbus_ioctl_ptr(fd.rawValue, NIMBUS_TUNSETVNETHDRSZ, &size) }
        return fd
    }

    /// Offloads the guest can take: checksum, TSO for IPv4/IPv6 (with ECN), UFO.
    public struct Offloads: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let checksum = Offloads(rawValue: NIMBUS_TUN_F_CSUM)
        public static let tso4 = Offloads(rawValue: NIMBUS_TUN_F_TSO4)
        public static let tso6 = Offloads(rawValue: NIMBUS_TUN_F_TSO6)
        public static let tsoECN = Offloads(rawValue: NIMBUS_TUN_F_TSO_ECN)
        public static let ufo = Offloads(rawValue: NIMBUS_TUN_F_UFO)
    }

    /// Tells the TAP which offloaded frames it may hand us (TUNSETOFFLOAD).
    public static func setOffloads(_ fd: OwnedFileDescriptor, _ offloads: Offloads) throws(SystemError) {
        try syscallOnce("ioctl(TUNSETOFFLOAD)") { nimbus_ioctl_val(fd.rawValue, NIMBUS_TUNSETOFFLOAD, UInt(offloads.rawValue)) }
    }
}

/// Unix stream sockets for host-side vsock endpoints.
public enum UnixStream {
    /// Connects to the socket at `path`; the result is non-blocking.
    public static func connect(_ path: String) throws(SystemError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try syscallOnce("connect", subject: path) { nimbus_unix_connect(path, 1) })
    }

    /// Listens on `path` (non-blocking).
    public static func listen(_ path: String, backlog: Int32 = 128) throws(SystemError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try syscallOnce("bind", subject: path) { nimbus_unix_listen(path, backlog) })
    }

    /// Accepts one connection, non-blocking and close-on-exec; nil when none is pending.
    public static func accept(_ listener: OwnedFileDescriptor) throws(SystemError) -> OwnedFileDescriptor? {
        while true {
            let fd = nimbus_accept_nonblocking(listener.rawValue)
            if fd >= 0 { return OwnedFileDescriptor(taking: fd) }
            let code = Glibc.errno
            if code == EINTR || code == ECONNABORTED { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return nil }
            throw SystemError(call: "accept4", errno: code)
        }
    }
}

extension Host {
    /// Fills `buffer` from the kernel's CSPRNG (getrandom, blocking only before the pool is ready).
    public static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) throws(SystemError) {
        var done = 0
        while done < buffer.count {
            let n = try retryingSyscall("getrandom") {
                // SAFETY: writes at most the remaining bytes of the caller's buffer.
                getrandom(buffer.baseAddress?.advanced(by: done), buffer.count - done, 0)
            }
            done += n
        }
    }
}
