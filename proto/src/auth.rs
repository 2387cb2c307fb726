//! Mutual authentication of cluster nodes from a shared secret, the cluster key.
//!
//! Every node that knows the secret derives the same Ed25519 key pair from it (BLAKE3 key
//! derivation, domain-separated) and the same self-signed certificate over that key (rcgen is
//! deterministic here: fixed dates, serial from the public key, deterministic Ed25519
//! signatures). Both ends of a link present that certificate in a TLS 1.3 handshake and accept
//! only a peer whose certificate is byte-for-byte the one they derive themselves; TLS then makes
//! the peer prove it holds the private key (the handshake signature), which only a holder of the
//! secret can derive. A peer without the secret fails the handshake, before any request.
//!
//! The same [`ClusterKey`] gives the rustls configurations of both transports: QUIC
//! ([`crate::tls`]) and gRPC over TLS ([`server_config`], [`client_config`]), and is what a
//! discovery mechanism reuses to admit only nodes of the cluster.
//!
//! All nodes of a cluster must run builds that derive the same certificate (the same moeshard
//! version); a mismatch shows as a refused handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use crate::{ProtoError, Result};

/// Name the certificate is made for and a client asks for.
pub const SERVER_NAME: &str = "moeshard-worker";

/// Fewest secret bytes accepted in a key file.
pub const MIN_SECRET_BYTES: usize = 16;

/// Most bytes read from a key file.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Key-derivation context (BLAKE3 `derive_key`); bump it to change the derived identities.
const KDF_CONTEXT: &str = "moeshard 2026 cluster key v1: ed25519 seed";

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn tls_err(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Tls { msg: e.to_string() }
}

/// The rustls crypto provider of every moeshard link: ring only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cluster secret and the identity derived from it.
#[derive(Clone)]
pub struct ClusterKey {
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
    id: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: only the public identifier.
        f.debug_struct("ClusterKey").field("id", &self.id).finish()
    }
}

impl ClusterKey {
    /// The key derived from `secret` (at least [`MIN_SECRET_BYTES`] bytes).
    pub fn from_secret(secret: &[u8]) -> Result<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ProtoError::Key {
                msg: format!(
                    "a cluster key needs at least {MIN_SECRET_BYTES} bytes of secret, got {}",
                    secret.len()
                ),
            });
        }
        let seed = blake3::derive_key(KDF_CONTEXT, secret);
        let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
        pkcs8.extend_from_slice(&seed);
        let der = PrivatePkcs8KeyDer::from(pkcs8.clone());
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
            .map_err(tls_err)?;
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(tls_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "moeshard cluster node");
        let cert = params.self_signed(&key_pair).map_err(tls_err)?;
        let id = blake3::hash(key_pair.public_key_raw()).to_hex()[..16].to_string();
        Ok(ClusterKey {
            cert: cert.der().clone(),
            pkcs8,
            id,
        })
    }

    /// The key in a file: its bytes with surrounding white space trimmed (a hex or base64 line
    /// works, as does raw random bytes).
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |msg: String| ProtoError::Key {
            msg: format!("{}: {msg}", path.display()),
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(err(format!(
                "{} bytes is too big for a key file (at most {MAX_KEY_FILE_BYTES})",
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let trimmed = bytes.trim_ascii();
        Self::from_secret(trimmed).map_err(|e| match e {
            ProtoError::Key { msg } => err(msg),
            other => other,
        })
    }

    /// A fresh random secret (64 hex characters) and its key.
    pub fn generate() -> Result<(String, Self)> {
        let mut raw = [0u8; 32];
        provider()
            .secure_random
            .fill(&mut raw)
            .map_err(|_| tls_err("no secure random bytes"))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let key = Self::from_secret(hex.as_bytes())?;
        Ok((hex, key))
    }

    /// Writes a fresh random secret to `path` (readable by its owner only, on Unix) and returns
    /// its key.
    pub fn generate_file(path: &Path) -> Result<Self> {
        let (hex, key) = Self::generate()?;
        let err = |e: std::io::Error| ProtoError::Key {
            msg: format!("{}: {e}", path.display()),
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(err)?;
        std::io::Write::write_all(&mut f, format!("{hex}\n").as_bytes()).map_err(err)?;
        Ok(key)
    }

    /// Public identifier of the cluster (hex of a hash of the derived public key), for logs:
    /// nodes that show the same id share the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The certificate every node of the cluster presents.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// rustls server configuration (TLS 1.3 only) that requires the client to prove `key`.
pub fn server_config(key: &ClusterKey, alpn: &[u8]) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(ClusterPeerVerifier {
        cert: key.cert.clone(),
        provider: Arc::clone(&provider),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![key.cert.clone()], key.private_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// rustls client configuration (TLS 1.3 only) that proves `key` and requires the server to.
pub fn client_config(key: &ClusterKey, alpn: &[u8]) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(ClusterPeerVerifier {
        cert: key.cert.clone(),
        provider: Arc::clone(&provider),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![key.cert.clone()], key.private_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    Ok(tls)
}

/// Accepts exactly the cluster's certificate, and checks the handshake signature made with it.
#[derive(Debug)]
struct ClusterPeerVerifier {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

const WRONG_KEY: &str = "the peer does not hold this cluster's key";

impl ClusterPeerVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::General(WRONG_KEY.into()))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The signature must be made with the certificate accepted above.
        self.check(cert)?;
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for ClusterPeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![rustls::SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for ClusterPeerVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![rustls::SignatureScheme::ED25519]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_secret_derives_the_same_identity_and_another_does_not() {
        let a = ClusterKey::from_secret(b"0123456789abcdef-secret").unwrap();
        let b = ClusterKey::from_secret(b"0123456789abcdef-secret").unwrap();
        let c = ClusterKey::from_secret(b"0123456789abcdef-Secret").unwrap();
        assert_eq!(a.cert(), b.cert());
        assert_eq!(a.id(), b.id());
        assert_ne!(a.cert(), c.cert());
        assert_ne!(a.id(), c.id());
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[test]
    fn short_secrets_and_missing_files_are_refused() {
        let err = ClusterKey::from_secret(b"short").unwrap_err();
        assert!(err.to_string().contains("at least 16 bytes"), "{err}");
        let err = ClusterKey::from_file(Path::new("/nonexistent/key")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key"), "{err}");
    }

    #[test]
    fn generated_files_round_trip_and_trim_white_space() {
        let dir = std::env::temp_dir().join(format!("moeshard-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let k = ClusterKey::generate_file(&dir).unwrap();
        let back = ClusterKey::from_file(&dir).unwrap();
        assert_eq!(k.cert(), back.cert());
        // Never overwrites.
        assert!(ClusterKey::generate_file(&dir).is_err());
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn configs_build() {
        let k = ClusterKey::from_secret(b"0123456789abcdef").unwrap();
        server_config(&k, b"x").unwrap();
        client_config(&k, b"x").unwrap();
    }
}
