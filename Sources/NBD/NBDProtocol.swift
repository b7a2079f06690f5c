// NBD (layer 2): the NBD wire protocol (fixed newstyle handshake, simple and structured replies),
// as constants and a pure decoder that turns bytes into handshake events and requests.
import NIOCore

public enum NBD {
    static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x3_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    // Handshake flags.
    static let flagFixedNewstyle: UInt16 = 1
    static let flagNoZeroes: UInt16 = 2
    static let clientFixedNewstyle: UInt32 = 1
    static let clientNoZeroes: UInt32 = 2

    // Options.
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optList: UInt32 = 3
    static let optStartTLS: UInt32 = 5
    static let optInfo: UInt32 = 6
    static let optGo: UInt32 = 7
    static let optStructuredReply: UInt32 = 8
    static let optListMetaContext: UInt32 = 9
    static let optSetMetaContext: UInt32 = 10

    // Option replies.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repMetaContext: UInt32 = 4
    static let repErrUnsupported: UInt32 = 0x8000_0001
    static let repErrPolicy: UInt32 = 0x8000_0002
    static let repErrInvalid: UInt32 = 0x8000_0003
    static let repErrUnknown: UInt32 = 0x8000_0006
    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    // Transmission flags.
    static let hasFlags: UInt16 = 1 << 0
    static let readOnly: UInt16 = 1 << 1
    static let sendFlush: UInt16 = 1 << 2
    static let sendFUA: UInt16 = 1 << 3
    static let sendTrim: UInt16 = 1 << 5
    static let sendWriteZeroes: UInt16 = 1 << 6
    static let sendDF: UInt16 = 1 << 7
    static let canMultiConn: UInt16 = 1 << 8
    static let sendCache: UInt16 = 1 << 10
    static let sendFastZero: UInt16 = 1 << 11

    // Commands and command flags.
    static let cmdRead: UInt16 = 0
    static let cmdWrite: UInt16 = 1
    static let cmdDisconnect: UInt16 = 2
    static let cmdFlush: UInt16 = 3
    static let cmdTrim: UInt16 = 4
    static let cmdCache: UInt16 = 5
    static let cmdWriteZeroes: UInt16 = 6
    static let cmdBlockStatus: UInt16 = 7
    static let cmdFlagFUA: UInt16 = 1 << 0
    static let cmdFlagReqOne: UInt16 = 1 << 3
    static let cmdFlagFastZero: UInt16 = 1 << 4

    // Structured reply chunk types and flags.
    static let replyFlagDone: UInt16 = 1
    static let replyNone: UInt16 = 0
    static let replyOffsetData: UInt16 = 1
    static let replyBlockStatus: UInt16 = 5
    static let replyError: UInt16 = 0x8001

    // Errors.
    static let EPERM: UInt32 = 1
    static let EIO: UInt32 = 5
    static let EINVAL: UInt32 = 22
    static let ENOSPC: UInt32 = 28
    static let EOVERFLOW: UInt32 = 75
    static let ENOTSUP: UInt32 = 95

    // base:allocation status flags.
    static let stateHole: UInt32 = 1
    static let stateZero: UInt32 = 2

    /// Largest READ or WRITE payload accepted (requests beyond it close the connection).
    public static let maxPayload = 32 << 20
    /// Largest option payload accepted during the handshake.
    public static let maxOptionLength = 64 << 10
}

/// One transmission-phase request.
public struct NBDRequest: Sendable, Equatable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    public var payload: [UInt8]
}

/// What the decoder hands the server.
public enum NBDEvent: Sendable, Equatable {
    case clientFlags(UInt32)
    case option(type: UInt32, data: [UInt8])
    case request(NBDRequest)
}

/// A protocol violation: the connection is closed.
public struct NBDProtocolError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// Decodes the client's side of the protocol. `phase` is advanced by the server handler.
public enum NBDDecoder {
    public enum Phase: Sendable { case clientFlags, options, transmission }

    /// Decodes one event from `buffer`, or returns nil (leaving `buffer` untouched) if more bytes are needed.
    public static func decodeOne(_ buffer: inout ByteBuffer, phase: Phase) throws -> NBDEvent? {
        switch phase {
        case .clientFlags:
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            guard flags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) == 0 else {
                throw NBDProtocolError(description: "unknown client flags 0x\(String(flags, radix: 16))")
            }
            return .clientFlags(flags)
        case .options:
            guard buffer.readableBytes >= 16 else { return nil }
            let start = buffer.readerIndex
            guard let magic = buffer.getInteger(at: start, as: UInt64.self), let type = buffer.getInteger(at: start + 8, as: UInt32.self),
                let length = buffer.getInteger(at: start + 12, as: UInt32.self)
            else { return nil }
            guard magic == NBD.optionMagic else { throw NBDProtocolError(description: "bad option magic 0x\(String(magic, radix: 16))") }
            guard length <= NBD.maxOptionLength else { throw NBDProtocolError(description: "option \(type) of \(length) bytes is too long") }
            guard buffer.readableBytes >= 16 + Int(length) else { return nil }
            buffer.moveReaderIndex(forwardBy: 16)
            return .option(type: type, data: buffer.readBytes(length: Int(length)) ?? [])
        case .transmission:
            guard var request = try decodeRequestHeader(&buffer) else { return nil }
            if request.type == NBD.cmdWrite { request.payload = buffer.readBytes(length: Int(request.length)) ?? [] }
            return .request(request)
        }
    }

    /// How many more bytes the transmission-phase request at the front of `buffer` needs before
    /// `decodeRequestHeader` can return it: what is missing of a WRITE's payload, else 0.
    public static func missingRequestBytes(_ buffer: ByteBuffer) -> Int {
        let start = buffer.readerIndex
        guard buffer.readableBytes >= 28, buffer.getInteger(at: start + 6, as: UInt16.self) == NBD.cmdWrite,
            let length = buffer.getInteger(at: start + 24, as: UInt32.self), Int(length) <= NBD.maxPayload
        else { return 0 }
        return max(0, 28 + Int(length) - buffer.readableBytes)
    }

    /// Decodes a transmission-phase request once its header and (for WRITE) its whole payload
    /// are in `buffer`, and moves past the header only: the payload, `length` bytes, comes next.
    /// Returns nil (leaving `buffer` untouched) if more bytes are needed; `payload` is empty.
    public static func decodeRequestHeader(_ buffer: inout ByteBuffer) throws -> NBDRequest? {
        guard buffer.readableBytes >= 28 else { return nil }
        let start = buffer.readerIndex
        guard let magic = buffer.getInteger(at: start, as: UInt32.self), let flags = buffer.getInteger(at: start + 4, as: UInt16.self),
            let type = buffer.getInteger(at: start + 6, as: UInt16.self), let cookie = buffer.getInteger(at: start + 8, as: UInt64.self),
            let offset = buffer.getInteger(at: start + 16, as: UInt64.self), let length = buffer.getInteger(at: start + 24, as: UInt32.self)
        else { return nil }
        guard magic == NBD.requestMagic else { throw NBDProtocolError(description: "bad request magic 0x\(String(magic, radix: 16))") }
        var payloadLength = 0
        if type == NBD.cmdWrite {
            guard length <= NBD.maxPayload else { throw NBDProtocolError(description: "write of \(length) bytes exceeds \(NBD.maxPayload)") }
            payloadLength = Int(length)
        }
        guard buffer.readableBytes >= 28 + payloadLength else { return nil }
        buffer.moveReaderIndex(forwardBy: 28)
        return NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length, payload: [])
    }
}
