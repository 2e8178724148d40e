//! TLS for the relay, in one of two modes:
//!
//! - **dev** (the default): a self-signed certificate created on first start and kept in
//!   the data dir. Devices do not check it against a CA: they compare its SHA-256
//!   fingerprint with the one they were given (pinning). Handshake signatures are still
//!   verified, so only the holder of the private key can answer.
//! - **production**: certificate chain and private key loaded from PEM files (for example
//!   from the organisation's CA or ACME). Devices either pin the leaf's fingerprint or
//!   trust the issuing CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::Error;

/// The relay's certificate chain and key.
pub struct Identity {
    /// The certificate chain, leaf first (DER).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// True if it was created by this call, false if loaded.
    pub created: bool,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            created: self.created,
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The leaf certificate's SHA-256 fingerprint, lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.chain.first().map(|c| c.as_ref()).unwrap_or_default())
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
            chain: vec![CertificateDer::from(cert_der)],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
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
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::tls("self-signed certificate", e))?;
    let cert_der = certified.cert.der().to_vec();
    let key_der = certified.signing_key.serialize_der();
    // Key first and private; the certificate's presence marks a complete pair.
    write_private(&key_path, &key_der)?;
    write_private(&cert_path, &cert_der)?;
    Ok(Identity {
        chain: vec![CertificateDer::from(cert_der)],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        created: true,
    })
}

/// Loads a production certificate chain and private key from PEM files.
pub fn load_pem_identity(cert: &Path, key: &Path) -> Result<Identity, Error> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::tls(format!("certificate file {}", cert.display()), e))?;
    if chain.is_empty() {
        return Err(Error::tls_setup(format!(
            "certificate file {} holds no PEM certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::tls(format!("key file {}", key.display()), e))?;
    Ok(Identity {
        chain,
        key,
        created: false,
    })
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
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls("TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| Error::tls("certificate and key do not fit together", e))?;
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
