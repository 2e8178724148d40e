//! The relay's TOML configuration file. Every key is optional; flags and environment
//! variables override the file, and the file overrides the built-in defaults.
//!
//! ```toml
//! data_dir = "/var/lib/redline"
//! listen = "0.0.0.0:7447"          # UDP, QUIC
//! http_listen = "127.0.0.1:7448"   # TCP, /metrics and /health; "off" to disable
//! cache_mb = 512
//! max_document_mb = 256
//! udp_buffer_kb = 8192             # kernel UDP buffers; capped by net.core.rmem_max
//! name = "district-9-relay"
//! log_format = "json"              # or "human"
//!
//! storage = "postgres"             # or "sled" (the default, in data_dir/db)
//! postgres_url = "postgres://redline@db.internal/redline"
//! postgres_ca = "/etc/redline/db-ca.pem"   # TLS to the database (omit on loopback)
//! postgres_pool = 8
//!
//! [tls]                            # omit for the dev certificate
//! cert = "/etc/redline/relay.pem"
//! key = "/etc/redline/relay-key.pem"
//!
//! [quotas]                         # what one token, device or address may take
//! connections_per_token = 8
//! connections_per_address = 1000
//! retry_above_pending = 256
//! staged_mb_per_device = 256
//! upload_expiry_hours = 24
//! held_mb_per_device = 256
//! new_documents_per_device_per_day = 200
//! ledger_days_back = 60
//! ledger_days_ahead = 2
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::config::{RelayConfig, TlsMode};

/// The file name `init` writes and `serve` looks for in the data dir.
pub const FILE_NAME: &str = "redline.toml";

/// The operator token `init` writes into the data dir (for roster administration).
pub const OPERATOR_TOKEN: &str = "operator.token";

/// The configuration file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where documents, certificate and keys live.
    pub data_dir: Option<PathBuf>,
    /// UDP address of the QUIC endpoint.
    pub listen: Option<SocketAddr>,
    /// TCP address of `/metrics` and `/health`, or `"off"`.
    pub http_listen: Option<String>,
    /// Parsed-document cache budget in MiB.
    pub cache_mb: Option<usize>,
    /// Largest document in MiB.
    pub max_document_mb: Option<u64>,
    /// Kernel UDP receive/send buffer in KiB.
    pub udp_buffer_kb: Option<usize>,
    /// The relay's name.
    pub name: Option<String>,
    /// `human` or `json`.
    pub log_format: Option<String>,
    /// The organisation whose roster the admin commands edit.
    pub org: Option<String>,
    /// Production certificate files.
    pub tls: Option<TlsFiles>,
    /// The revocation list, if not `<data_dir>/revoked`.
    pub revoked_file: Option<PathBuf>,
    /// Per-token, per-device and per-address quotas.
    pub quotas: Option<QuotaSettings>,
    /// The newest protocol version to speak (pinned during a staged rollout).
    pub protocol_version: Option<u16>,
    /// `sled` or `postgres` (default: `postgres` when `postgres_url` is set, else
    /// `sled`).
    pub storage: Option<String>,
    /// The PostgreSQL database (libpq URL or key=value string).
    pub postgres_url: Option<String>,
    /// Certificate authority (PEM) of the database server: connect with TLS.
    pub postgres_ca: Option<PathBuf>,
    /// Connections to PostgreSQL kept open at most.
    pub postgres_pool: Option<usize>,
}

/// The storage a relay uses, from its settings: `kind` (`sled` or `postgres`; default
/// `postgres` when a URL is given), the URL, the CA file and the pool size.
pub fn storage_choice(
    kind: Option<&str>,
    url: Option<&str>,
    ca: Option<&Path>,
    pool: Option<usize>,
) -> Result<crate::config::StorageChoice, Error> {
    use crate::config::StorageChoice;
    let kind = kind.unwrap_or(if url.is_some() { "postgres" } else { "sled" });
    match kind {
        "sled" => Ok(StorageChoice::Sled),
        "postgres" | "postgresql" => {
            let url = url.ok_or_else(|| {
                Error::Config(
                    "storage = \"postgres\" needs postgres_url (or --postgres-url, \
                     REDLINE_POSTGRES_URL)"
                        .into(),
                )
            })?;
            let mut options = crate::storage::PgOptions::new(url);
            options.ca_file = ca.map(Path::to_path_buf);
            if let Some(n) = pool {
                options.pool_size = n.max(2);
            }
            Ok(StorageChoice::Postgres(options))
        }
        other => Err(Error::Config(format!(
            "storage = {other:?}: expected \"sled\" or \"postgres\""
        ))),
    }
}

/// The `[quotas]` table: each key optional (see [`crate::config::Quotas`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// Connections one token may hold at once.
    pub connections_per_token: Option<usize>,
    /// Connections from one source address at once.
    pub connections_per_address: Option<usize>,
    /// Above this many connections in their handshake, new ones must prove their
    /// address (QUIC Retry).
    pub retry_above_pending: Option<usize>,
    /// Unfinished upload MiB one device may have staged.
    pub staged_mb_per_device: Option<u64>,
    /// Hours after which an untouched unfinished upload is dropped.
    pub upload_expiry_hours: Option<u64>,
    /// Quarantined MiB held for one device.
    pub held_mb_per_device: Option<u64>,
    /// Documents one device may create per day.
    pub new_documents_per_device_per_day: Option<u32>,
    /// New ledger days at most this many days before the relay's date...
    pub ledger_days_back: Option<u32>,
    /// ...and after it.
    pub ledger_days_ahead: Option<u32>,
}

impl QuotaSettings {
    fn apply(&self, q: &mut crate::config::Quotas) {
        if let Some(n) = self.connections_per_token {
            q.connections_per_token = n.max(1);
        }
        if let Some(n) = self.connections_per_address {
            q.connections_per_address = n.max(1);
        }
        if let Some(n) = self.retry_above_pending {
            q.retry_above_pending = n;
        }
        if let Some(mb) = self.staged_mb_per_device {
            q.staged_bytes_per_device = mb.saturating_mul(1 << 20);
        }
        if let Some(h) = self.upload_expiry_hours {
            q.upload_expiry = std::time::Duration::from_secs(h.saturating_mul(3_600).max(60));
        }
        if let Some(mb) = self.held_mb_per_device {
            q.held_bytes_per_device = mb.saturating_mul(1 << 20);
        }
        if let Some(n) = self.new_documents_per_device_per_day {
            q.new_documents_per_device_per_day = n;
        }
        if let Some(n) = self.ledger_days_back {
            q.ledger_days_back = n;
        }
        if let Some(n) = self.ledger_days_ahead {
            q.ledger_days_ahead = n;
        }
    }
}

/// Production certificate files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Parses an HTTP listen setting: an address, or `off`.
pub fn http_listen(text: &str) -> Result<Option<SocketAddr>, Error> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        Error::Config(format!(
            "http_listen {text:?}: expected an address like 127.0.0.1:7448, or \"off\""
        ))
    })
}

impl FileConfig {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            action: "read config",
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Applies the file's settings over `config`.
    pub fn apply(&self, mut config: RelayConfig) -> Result<RelayConfig, Error> {
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(h) = &self.http_listen {
            config.http_listen = http_listen(h)?;
        }
        if let Some(mb) = self.cache_mb {
            config.cache_budget_bytes = mb.saturating_mul(1 << 20);
        }
        if let Some(mb) = self.max_document_mb {
            config.max_document_bytes = mb.saturating_mul(1 << 20);
        }
        if let Some(kb) = self.udp_buffer_kb {
            config.udp_buffer_bytes = kb.saturating_mul(1 << 10);
        }
        if let Some(n) = &self.name {
            config.name = n.clone();
        }
        if let Some(r) = &self.revoked_file {
            config.revoked_file = Some(r.clone());
        }
        if let Some(q) = &self.quotas {
            q.apply(&mut config.quotas);
        }
        if let Some(v) = self.protocol_version {
            let (oldest, newest) = (
                redline_proto::MIN_PROTOCOL_VERSION,
                redline_proto::PROTOCOL_VERSION,
            );
            if !(oldest..=newest).contains(&v) {
                return Err(Error::Config(format!(
                    "protocol_version = {v}: this relay speaks versions {oldest} to {newest}"
                )));
            }
            config.protocol_version = v;
        }
        if self.storage.is_some() || self.postgres_url.is_some() {
            config.storage = storage_choice(
                self.storage.as_deref(),
                self.postgres_url.as_deref(),
                self.postgres_ca.as_deref(),
                self.postgres_pool,
            )?;
        }
        if let Some(t) = &self.tls {
            config.tls = TlsMode::Files {
                cert: t.cert.clone(),
                key: t.key.clone(),
            };
        }
        Ok(config)
    }

    /// The file `init` writes for a relay in `data_dir`: every setting spelled out.
    pub fn starter(data_dir: &Path) -> String {
        let defaults = RelayConfig::new(data_dir);
        format!(
            "# Redline relay configuration. Flags and REDLINE_* environment variables override it.\n\
             data_dir = {:?}\n\
             # UDP (QUIC). Use 0.0.0.0:7447 to serve phones on the network; open UDP 7447.\n\
             listen = \"{}\"\n\
             # TCP, /metrics (Prometheus) and /health. Keep it on loopback, or \"off\".\n\
             http_listen = \"{}\"\n\
             cache_mb = {}\n\
             max_document_mb = {}\n\
             # Kernel UDP buffers. Linux caps them at net.core.rmem_max/wmem_max: raise those\n\
             # (docs/DEPLOYMENT.md) or phones reconnecting together lose datagrams.\n\
             udp_buffer_kb = {}\n\
             name = {:?}\n\
             # \"human\" or \"json\"\n\
             log_format = \"human\"\n\
             \n\
             # The revocation list. Keep it outside the data dir's backups (a restore must\n\
             # not un-revoke tokens): for example /etc/redline/revoked.\n\
             # revoked_file = \"/etc/redline/revoked\"\n\
             \n\
             # The newest protocol version to speak. Leave it unset; during a staged rollout\n\
             # of several relays, pin it to what the oldest relay speaks.\n\
             # protocol_version = {}\n\
             \n\
             # Storage: sled in data_dir/db (default), or a PostgreSQL database that several\n\
             # relays may share (DEPLOYMENT.md, \"Several relays\").\n\
             # storage = \"postgres\"\n\
             # postgres_url = \"postgres://redline@db.internal/redline\"\n\
             # postgres_ca = \"/etc/redline/db-ca.pem\"\n\
             # postgres_pool = 8\n\
             \n\
             # What one token, device or address may take (defaults shown).\n\
             [quotas]\n\
             connections_per_token = {}\n\
             connections_per_address = {}\n\
             retry_above_pending = {}\n\
             staged_mb_per_device = {}\n\
             upload_expiry_hours = {}\n\
             held_mb_per_device = {}\n\
             new_documents_per_device_per_day = {}\n\
             # New ledger days only within this window around the relay's date.\n\
             ledger_days_back = {}\n\
             ledger_days_ahead = {}\n\
             \n\
             # Production certificate (PEM). Without it, the dev certificate in tls/ is used\n\
             # and devices pin its fingerprint.\n\
             # [tls]\n\
             # cert = \"/etc/redline/relay.pem\"\n\
             # key = \"/etc/redline/relay-key.pem\"\n",
            data_dir.display().to_string(),
            defaults.listen,
            crate::config::DEFAULT_HTTP_LISTEN,
            defaults.cache_budget_bytes >> 20,
            defaults.max_document_bytes >> 20,
            defaults.udp_buffer_bytes >> 10,
            defaults.name,
            defaults.protocol_version,
            defaults.quotas.connections_per_token,
            defaults.quotas.connections_per_address,
            defaults.quotas.retry_above_pending,
            defaults.quotas.staged_bytes_per_device >> 20,
            defaults.quotas.upload_expiry.as_secs() / 3_600,
            defaults.quotas.held_bytes_per_device >> 20,
            defaults.quotas.new_documents_per_device_per_day,
            defaults.quotas.ledger_days_back,
            defaults.quotas.ledger_days_ahead,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_file_parses_and_matches_the_defaults() {
        let text = FileConfig::starter(Path::new("/var/lib/redline"));
        let file: FileConfig = toml::from_str(&text).unwrap();
        let config = file.apply(RelayConfig::new("elsewhere")).unwrap();
        let defaults = RelayConfig::new("/var/lib/redline");
        assert_eq!(config.data_dir, defaults.data_dir);
        assert_eq!(config.listen, defaults.listen);
        assert_eq!(config.http_listen, defaults.http_listen);
        assert_eq!(config.cache_budget_bytes, defaults.cache_budget_bytes);
        assert_eq!(config.udp_buffer_bytes, defaults.udp_buffer_bytes);
        assert_eq!(config.tls, TlsMode::Dev);
        let (q, d) = (&config.quotas, &defaults.quotas);
        assert_eq!(
            (
                q.connections_per_token,
                q.staged_bytes_per_device,
                q.upload_expiry
            ),
            (
                d.connections_per_token,
                d.staged_bytes_per_device,
                d.upload_expiry
            )
        );
        assert_eq!((q.ledger_days_back, q.ledger_days_ahead), (60, 2));
    }

    #[test]
    fn quotas_are_settings() {
        let file: FileConfig =
            toml::from_str("[quotas]\nledger_days_back = 400\nheld_mb_per_device = 1\n").unwrap();
        let q = file.apply(RelayConfig::default()).unwrap().quotas;
        assert_eq!(
            (q.ledger_days_back, q.held_bytes_per_device),
            (400, 1 << 20)
        );
        assert!(toml::from_str::<FileConfig>("[quotas]\nledger_days = 1\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = toml::from_str::<FileConfig>("listn = \"1.2.3.4:5\"").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let file: FileConfig = toml::from_str("http_listen = \"nowhere\"").unwrap();
        assert!(file.apply(RelayConfig::default()).is_err());
        let off: FileConfig = toml::from_str("http_listen = \"off\"").unwrap();
        assert_eq!(off.apply(RelayConfig::default()).unwrap().http_listen, None);
    }

    #[test]
    fn storage_is_a_setting() {
        use crate::config::StorageChoice;
        let file: FileConfig = toml::from_str(
            "postgres_url = \"postgres://relay:pw@db/redline\"\npostgres_pool = 3\n",
        )
        .unwrap();
        match file.apply(RelayConfig::default()).unwrap().storage {
            StorageChoice::Postgres(o) => {
                assert_eq!(o.url, "postgres://relay:pw@db/redline");
                assert_eq!(o.pool_size, 3);
                assert!(
                    !format!("{o:?}").contains("pw"),
                    "the password is never printed"
                );
            }
            other => panic!("a URL means PostgreSQL, got {other:?}"),
        }
        let file: FileConfig = toml::from_str("storage = \"postgres\"\n").unwrap();
        let e = file.apply(RelayConfig::default()).unwrap_err();
        assert!(e.to_string().contains("postgres_url"), "{e}");
        let file: FileConfig = toml::from_str("storage = \"mysql\"\n").unwrap();
        assert!(file.apply(RelayConfig::default()).is_err());
        assert!(matches!(
            RelayConfig::default().storage,
            StorageChoice::Sled
        ));
    }
}
