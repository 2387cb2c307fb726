//! TLS 1.3 for QUIC: rustls with the `ring` provider only (aws-lc and ring together make rustls
//! panic at start).
//!
//! With a [`ClusterKey`], both ends present the certificate derived from it and accept only that
//! one (mutual authentication, see [`crate::auth`]). Without one, a worker makes a throw-away
//! self-signed certificate and the coordinator accepts any (the link is encrypted but neither
//! end is authenticated): only for trusted networks and loopback.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::auth::ClusterKey;
use crate::{ALPN, ProtoError, Result};

pub use crate::auth::SERVER_NAME;

/// How long a QUIC connection may be silent before it is declared dead. Keep-alives are sent at a
/// third of this, so only a dead or unreachable peer hits it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

fn tls_err(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Tls { msg: e.to_string() }
}

use crate::auth::provider;

/// Transport settings both ends use: idle timeout, keep-alive, and stream windows sized for
/// prefill batches.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // 10 s fits in a VarInt of milliseconds; the fallback keeps quinn's default.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(crate::MAX_CONCURRENT_REQUESTS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// Server configuration: mutual authentication from `key`, or (without one) a fresh self-signed
/// certificate and no client authentication.
pub fn server_config(key: Option<&ClusterKey>) -> Result<quinn::ServerConfig> {
    let tls = match key {
        Some(k) => crate::auth::server_config(k, ALPN)?,
        None => unauthenticated_server()?,
    };
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

fn unauthenticated_server() -> Result<rustls::ServerConfig> {
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(tls_err)?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// Client configuration: mutual authentication from `key`, or (without one) acceptance of any
/// worker certificate (see the module docs).
pub fn client_config(key: Option<&ClusterKey>) -> Result<quinn::ClientConfig> {
    let tls = match key {
        Some(k) => crate::auth::client_config(k, ALPN)?,
        None => unauthenticated_client()?,
    };
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

fn unauthenticated_client() -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Accepts any server certificate but still verifies the handshake signature made with it.
#[derive(Debug)]
pub struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration allows TLS 1.3 only.
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
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build_with_ring() {
        server_config(None).unwrap();
        client_config(None).unwrap();
        let k = ClusterKey::from_secret(b"0123456789abcdef").unwrap();
        server_config(Some(&k)).unwrap();
        client_config(Some(&k)).unwrap();
    }
}
