//! TLS for the relay: a self-signed development certificate created on first start and
//! kept in the data dir, and the SHA-256 fingerprint devices pin.
//!
//! Devices do not check the certificate against a CA: they compare its fingerprint with
//! the one they were given. Handshake signatures are still verified, so only the holder
//! of the private key can answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::Error;

/// The relay's certificate and key, DER-encoded.
#[derive(Clone)]
pub struct Identity {
    /// The certificate.
    pub cert_der: Vec<u8>,
    /// The PKCS#8 private key.
    pub key_der: Vec<u8>,
    /// True if it was created by this call, false if loaded.
    pub created: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &fingerprint(&self.cert_der))
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The certificate's SHA-256 fingerprint, lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }
}

/// SHA-256 of a DER certificate, lowercase hex without separators.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// Loads the dev certificate from `dir`, or creates and stores one.
pub fn load_or_create_dev_identity(dir: &Path) -> Result<Identity, Error> {
    let cert_path = dir.join("dev-cert.der");
    let key_path = dir.join("dev-key.der");
    if cert_path.exists() && key_path.exists() {
        let cert_der = std::fs::read(&cert_path).map_err(io("read", &cert_path))?;
        let key_der = std::fs::read(&key_path).map_err(io("read", &key_path))?;
        return Ok(Identity {
            cert_der,
            key_der,
            created: false,
        });
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let names = vec![
        "localhost".to_string(),
        "redline-relay".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| Error::Tls(e.to_string()))?;
    let identity = Identity {
        cert_der: certified.cert.der().to_vec(),
        key_der: certified.signing_key.serialize_der(),
        created: true,
    };
    // Key first and private; the certificate's presence marks a complete pair.
    write_private(&key_path, &identity.key_der)?;
    write_private(&cert_path, &identity.cert_der)?;
    Ok(identity)
}

/// Writes `bytes` to `path` through a temporary file, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// The rustls configuration of the relay: TLS 1.3 only, ring, ALPN `redline/1`.
pub fn server_crypto(identity: &Identity) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = CertificateDer::from(identity.cert_der.clone());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![redline_proto::ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_identity_is_created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_dev_identity(dir.path()).unwrap();
        assert!(first.created);
        let again = load_or_create_dev_identity(dir.path()).unwrap();
        assert!(!again.created);
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        server_crypto(&again).unwrap();
    }
}
