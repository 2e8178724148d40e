//! The QUIC connection to the relay: TLS 1.3 with the relay's certificate pinned by its
//! SHA-256 fingerprint, ALPN `redline/1`, keep-alive and idle timeout tuned for phones.
//!
//! Pinning replaces CA validation (a field relay has no public name), but the handshake
//! signature is still verified against the pinned certificate, so only the holder of the
//! relay's private key passes. A production relay with a CA-issued certificate can be
//! trusted through its CA instead ([`RelayEndpoint::with_ca`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::{Error, RelayEndpoint};

/// Checks the relay's certificate against a pinned SHA-256 fingerprint.
#[derive(Debug)]
struct PinnedCertificate {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// The fingerprint actually presented, when it did not match (for the error message).
    mismatch: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().expect("pin lock poisoned") = Some(hex::encode(seen));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config allows TLS 1.3 only; QUIC requires it anyway.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses a fingerprint given as 64 hex digits, with or without `:` separators.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], Error> {
    let cleaned: String = s.trim().chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&cleaned)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok());
    bytes.ok_or_else(|| {
        Error::Invalid(format!(
            "certificate fingerprint {s:?}: expected 64 hex digits (the relay prints it at start)"
        ))
    })
}

/// Opens the device's UDP endpoint, of the address family of `relay`. The client keeps
/// it across syncs: one socket per device, cheap reconnects.
pub(crate) fn client_endpoint(relay: &SocketAddr) -> Result<quinn::Endpoint, Error> {
    let bind: SocketAddr = if relay.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
        .map_err(|e| Error::network_in(format!("cannot open a UDP socket: {e}"), e))
}

/// How the device recognises the relay.
enum Trust {
    /// The certificate's SHA-256 fingerprint.
    Pin([u8; 32]),
    /// Certificates issued by this CA (DER).
    Ca(Vec<u8>),
}

/// How a connection from a tool or test differs from a phone's: where it comes from and
/// how much it lets the relay send (a device that stops reading, or takes no streams).
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// Local address to send from (default: any, of the relay's family).
    pub bind: Option<SocketAddr>,
    /// Bytes the relay may send on one stream before this side reads (QUIC flow
    /// control).
    pub stream_receive_window: Option<u32>,
    /// Unidirectional streams the relay may open to this side.
    pub max_uni_streams: Option<u32>,
}

fn client_config(
    trust: Trust,
    mismatch: Arc<Mutex<Option<String>>>,
    options: &ConnectOptions,
) -> Result<quinn::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::network)?;
    let mut tls = match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                pin,
                provider,
                mismatch,
            }))
            .with_no_client_auth(),
        Trust::Ca(der) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(der))
                .map_err(|e| Error::Invalid(format!("relay CA certificate: {e}")))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![redline_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(Error::network)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s is in range"),
    ));
    if let Some(w) = options.stream_receive_window {
        transport.stream_receive_window(w.into());
    }
    if let Some(n) = options.max_uni_streams {
        transport.max_concurrent_uni_streams(n.into());
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Connects to the relay through `endpoint` and completes the TLS handshake, checking
/// the pinned fingerprint.
pub(crate) async fn connect(
    endpoint: &quinn::Endpoint,
    relay: &RelayEndpoint,
) -> Result<quinn::Connection, Error> {
    connect_with(endpoint, relay, &ConnectOptions::default()).await
}

async fn connect_with(
    endpoint: &quinn::Endpoint,
    relay: &RelayEndpoint,
    options: &ConnectOptions,
) -> Result<quinn::Connection, Error> {
    let (trust, pin) = match &relay.ca_der {
        Some(ca) if relay.fingerprint.is_empty() => (Trust::Ca(ca.clone()), [0; 32]),
        _ => {
            let pin = parse_fingerprint(&relay.fingerprint)?;
            (Trust::Pin(pin), pin)
        }
    };
    let mismatch = Arc::new(Mutex::new(None));
    let config = client_config(trust, mismatch.clone(), options)?;
    let connecting = endpoint
        .connect_with(config, relay.addr, &relay.server_name)
        .map_err(|e| Error::network_in(format!("cannot connect to {}: {e}", relay.addr), e))?;
    match connecting.await {
        Ok(c) => Ok(c),
        Err(e) => {
            if let Some(seen) = mismatch.lock().expect("pin lock poisoned").take() {
                return Err(Error::PinMismatch {
                    expected: hex::encode(pin),
                    seen,
                });
            }
            Err(Error::network_in(
                format!("cannot reach the relay at {}: {e}", relay.addr),
                e,
            ))
        }
    }
}

/// Opens a QUIC connection to `relay` with the same TLS checks the sync driver uses, for
/// tools and tests that speak the protocol themselves. Keep the endpoint alive as long
/// as the connection.
pub async fn open_connection(
    relay: &RelayEndpoint,
) -> Result<(quinn::Endpoint, quinn::Connection), Error> {
    open_connection_with(relay, &ConnectOptions::default()).await
}

/// [`open_connection`] with [`ConnectOptions`] (tests that play a misbehaving device).
pub async fn open_connection_with(
    relay: &RelayEndpoint,
    options: &ConnectOptions,
) -> Result<(quinn::Endpoint, quinn::Connection), Error> {
    let endpoint = match options.bind {
        Some(bind) => quinn::Endpoint::client(bind).map_err(|e| {
            Error::network_in(format!("cannot open a UDP socket on {bind}: {e}"), e)
        })?,
        None => client_endpoint(&relay.addr)?,
    };
    let conn = connect_with(&endpoint, relay, options).await?;
    Ok((endpoint, conn))
}
