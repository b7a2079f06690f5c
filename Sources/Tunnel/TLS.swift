// Tunnel layer: TLS for the control connection. The server accepts TLS and plain clients on one
// port (it looks at the first byte, as frps does); without a configured certificate it makes a
// self-signed one at start, as frps does.
import Crypto
import Foundation
import NIOCore
import NIOSSL
import X509

enum TunnelTLS {
    /// The server's TLS context: the configured certificate or a fresh self-signed one; client
    /// certificates are required when `trustedCaFile` is set.
    static func serverContext(_ files: TLSFiles) throws -> NIOSSLContext {
        var configuration: TLSConfiguration
        if let certFile = files.certFile, let keyFile = files.keyFile {
            do {
                let chain = try NIOSSLCertificate.fromPEMFile(certFile).map { NIOSSLCertificateSource.certificate($0) }
                let key = try NIOSSLPrivateKey(file: keyFile, format: .pem)
                configuration = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
            } catch {
                throw ConfigError("cannot load transport.tls.certFile \(certFile) or keyFile \(keyFile): \(error)")
            }
        } else {
            let (certificate, key) = try selfSigned()
            configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: [.certificate(certificate)], privateKey: .privateKey(key))
        }
        if let ca = files.trustedCaFile {
            guard FileManager.default.fileExists(atPath: ca) else {
                throw ConfigError("transport.tls.trustedCaFile \(ca) does not exist")
            }
            configuration.trustRoots = .file(ca)
            configuration.certificateVerification = .noHostnameVerification
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ConfigError("cannot set up TLS: \(error)")
        }
    }

    /// The client's TLS context: the server is verified only when `trustedCaFile` is set (frpc's
    /// behaviour); a client certificate is offered when `certFile` is set.
    static func clientContext(_ files: TLSFiles) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let ca = files.trustedCaFile {
            guard FileManager.default.fileExists(atPath: ca) else {
                throw ConfigError("transport.tls.trustedCaFile \(ca) does not exist")
            }
            configuration.trustRoots = .file(ca)
            configuration.certificateVerification = files.serverName == nil ? .noHostnameVerification : .fullVerification
        } else {
            configuration.certificateVerification = .none
        }
        if let certFile = files.certFile {
            guard let keyFile = files.keyFile else { throw ConfigError("transport.tls.certFile needs transport.tls.keyFile") }
            do {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            } catch {
                throw ConfigError("cannot load transport.tls.certFile \(certFile) or keyFile \(keyFile): \(error)")
            }
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ConfigError("cannot set up TLS: \(error)")
        }
    }

    static func selfSigned() throws -> (NIOSSLCertificate, NIOSSLPrivateKey) {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName { CommonName("nimbus-tunnel") }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(10 * 365 * 86400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions { SubjectAlternativeNames([.dnsName("nimbus-tunnel")]) },
            issuerPrivateKey: .init(key))
        let pem = try certificate.serializeAsPEM().pemString
        return (
            try NIOSSLCertificate(bytes: Array(pem.utf8), format: .pem),
            try NIOSSLPrivateKey(bytes: Array(key.pemRepresentation.utf8), format: .pem)
        )
    }
}

/// First handler on a server control connection: a TLS handshake record gets a TLS handler in
/// front of the protocol, anything else is plain (or refused when TLS is forced).
final class TLSDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let sslContext: NIOSSLContext
    let force: Bool

    init(context: NIOSSLContext, force: Bool) {
        sslContext = context
        self.force = force
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        let isTLS = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == 0x16
        if isTLS {
            do {
                try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sslContext), position: .after(self))
            } catch {
                context.close(promise: nil)
                return
            }
        } else if force {
            context.close(promise: nil)
            return
        }
        context.fireChannelRead(data)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
