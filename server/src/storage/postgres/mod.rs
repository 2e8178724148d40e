//! PostgreSQL as the relay's storage: every concern of [`crate::storage`] in tables of
//! one database, so relays can share it (and an operator's backups, replicas and
//! point-in-time recovery apply).
//!
//! **Transactions map to flushes.** The storage contract says writes are atomic but not
//! durable until [`Documents::flush`]. Here the first write after a flush opens a
//! transaction on one connection of the pool (the *writer*); every write until the next
//! flush joins it; the flush commits it. So the hub's group commit (many documents, one
//! flush) becomes one transaction, and the feed's head row is updated once per batch.
//! Reads see the relay's own unflushed writes: while a transaction is open they run on
//! the writer's connection, otherwise on any connection of the pool.
//!
//! **Failures.** A statement that fails inside the open transaction aborts it in
//! PostgreSQL. It is rolled back at once (so later writes start afresh, on a live
//! connection if the old one died), and the next flush reports the loss: every commit
//! waiting for that flush is answered with an error and the hub reloads the documents
//! (memory never runs ahead of the database). A refusal decided here (an upload piece at
//! the wrong offset) does not touch the transaction.
//!
//! **Blocking.** The storage traits block (the hub calls them on tokio's blocking
//! threads). The asynchronous client runs on a small runtime of its own; each call hands
//! it a future and waits for the answer, so calling from any thread is safe. The two
//! calls on the live path (the follower's read, the flush) also come as futures the hub
//! awaits on its own runtime; the asynchronous flush commits without the writer's lock
//! (`Inner::settled` says who waits for it).

mod documents;
mod listen;
mod records;
mod schema;
mod writer;

use documents::random_epoch;
use listen::config_for_listen;
use writer::{LostAppends, Writer, from_database, lost_or_ok, spawn_idle_commit};

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use redline_proto::{DeviceId, DocId};

use super::{
    ActorBindings, DeviceRecords, Documents, FeedRead, KeyValue, QuarantineStore, SeqChunk,
    StorageFuture, StoredDoc, Uploads, flat, unflat,
};
use crate::Error;

pub use schema::VERSION as SCHEMA_VERSION;

/// A statement parameter.
type Param = dyn tokio_postgres::types::ToSql + Sync;

/// Connections in the pool unless told otherwise.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// Quarantined pushes read per round trip while visiting them all.
const VISIT_PAGE: i64 = 64;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style URL or key=value string (`postgres://user@host:port/db`).
    pub url: String,
    /// PEM file of the certificate authority that signed the server's certificate: the
    /// connection then uses TLS (rustls) and checks the server against it. `None`: no
    /// TLS (a database on loopback or a private network).
    pub ca_file: Option<PathBuf>,
    /// Connections kept open at most.
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PgOptions")
            .field("url", &redact(&self.url))
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PgOptions {
    /// Options for `url`, without TLS, with the default pool size.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

/// `url` with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    // URL form: scheme://user:password@host...
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.find('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    // key=value form.
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***".to_string()
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Relay storage in PostgreSQL.
pub struct PgStorage {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Moves to the feed's new head when any relay's flush appended (NOTIFY).
    signal: tokio::sync::watch::Receiver<u64>,
}

/// What the storage's calls share with its idle-transaction flusher.
pub struct Inner {
    handle: tokio::runtime::Handle,
    pool: Pool,
    writer: Mutex<Writer>,
    lost_appends: LostAppends,
    epoch: u64,
    target: String,
    /// The schema version found at connect (before migrating).
    found: i32,
}

impl std::ops::Deref for PgStorage {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The first key after every key that starts with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn seq_sql(seq: u64) -> Result<i64, Error> {
    i64::try_from(seq).map_err(|_| Error::Storage(format!("feed sequence {seq} out of range")))
}

/// A sequence as an upper or lower bound of a read: anything past `i64::MAX` means
/// "everything".
fn seq_bound(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| Error::Config(format!("PostgreSQL CA {}: {e}", ca_file.display())))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| Error::Config(format!("PostgreSQL CA {}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("PostgreSQL CA {}: {e}", ca_file.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls("PostgreSQL TLS versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A human description of where `config` points (no password).
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgres://{host}:{port}/{db}")
}

/// The connection pool of the relay's storage calls.
fn pool(config: tokio_postgres::Config, options: &PgOptions) -> Result<Pool, Error> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &options.ca_file {
        Some(ca) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(ca)?);
            Manager::from_config(config, tls, manager_config)
        }
        None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(options.pool_size.max(2))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| Error::Config(format!("PostgreSQL pool: {e}")))
}

impl PgStorage {
    /// Connects, creates or migrates the schema to [`SCHEMA_VERSION`], and reads the
    /// database's epoch.
    pub fn connect(options: &PgOptions) -> Result<Self, Error> {
        let mut config: tokio_postgres::Config = options.url.parse().map_err(|e| {
            Error::Config(format!(
                "PostgreSQL URL {} is not valid: {e}",
                redact(&options.url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("redline-relay");
        }
        let target = describe(&config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("redline-postgres")
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                action: "starting the PostgreSQL client runtime",
                path: PathBuf::new(),
                source,
            })?;
        let pool = pool(config, options)?;
        let listen_config = config_for_listen(&options.url)?;
        let tls = match &options.ca_file {
            Some(ca) => Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
                ca,
            )?)),
            None => None,
        };
        let (notify, signal) = tokio::sync::watch::channel(0u64);
        let mut inner = Inner {
            handle: runtime.handle().clone(),
            pool,
            writer: Mutex::new(Writer::default()),
            lost_appends: LostAppends::default(),
            epoch: 0,
            target,
            found: 0,
        };
        inner.found = inner.migrate()?.0;
        inner.epoch = inner.read_epoch()?;
        let inner = Arc::new(inner);
        runtime.spawn(listen::listen(listen_config, tls, notify));
        spawn_idle_commit(Arc::downgrade(&inner))?;
        Ok(Self {
            inner,
            runtime: Some(runtime),
            signal,
        })
    }
}

impl Inner {
    /// The schema version the database had when this store connected (it migrated it
    /// to [`SCHEMA_VERSION`]; 0: the database was empty).
    pub fn schema_found(&self) -> i32 {
        self.found
    }

    /// Where the database is (no password), for logs and `/health`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Brings the schema to [`SCHEMA_VERSION`]; returns the version found and the one
    /// left. Safe to run from several relays at once, and again.
    pub fn migrate(&self) -> Result<(i32, i32), Error> {
        let pool = self.pool.clone();
        self.block(async move {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&schema::MIGRATION_LOCK],
            )
            .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS redline_schema (version integer NOT NULL)",
            )
            .await?;
            let found: i32 = match tx
                .query_opt("SELECT version FROM redline_schema", &[])
                .await?
            {
                Some(row) => row.get(0),
                None => {
                    tx.execute("INSERT INTO redline_schema (version) VALUES (0)", &[])
                        .await?;
                    0
                }
            };
            if found > schema::VERSION {
                return Err(Error::Config(format!(
                    "the database's schema is version {found}, newer than this relay's \
                     ({}): upgrade the relay",
                    schema::VERSION
                )));
            }
            for (i, migration) in schema::MIGRATIONS.iter().enumerate() {
                let to = i as i32 + 1;
                if to > found {
                    tx.batch_execute(migration).await?;
                    tx.execute("UPDATE redline_schema SET version = $1", &[&to])
                        .await?;
                }
            }
            let epoch = random_epoch() as i64;
            tx.execute(
                "INSERT INTO redline_meta (key, value) VALUES ('epoch', $1) \
                 ON CONFLICT (key) DO NOTHING",
                &[&epoch],
            )
            .await?;
            tx.commit().await?;
            Ok((found, schema::VERSION))
        })
    }

    fn read_epoch(&self) -> Result<u64, Error> {
        self.read(|c| async move {
            let row = c
                .query_one("SELECT value FROM redline_meta WHERE key = 'epoch'", &[])
                .await?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    /// Runs `fut` on the client's runtime and waits for it.
    fn block<R: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<R, Error>> + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Storage("the PostgreSQL client stopped".into()))?
    }

    /// Runs `fut` on the client's runtime and answers with its result as a future (for
    /// callers on an async runtime: no blocking thread in between).
    fn spawned<R: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<R, Error>> + Send + 'static,
    ) -> StorageFuture<R> {
        let task = self.handle.spawn(fut);
        Box::pin(async move {
            task.await
                .map_err(|_| Error::Storage("the PostgreSQL client stopped".into()))?
        })
    }
}

impl Drop for PgStorage {
    fn drop(&mut self) {
        // An open transaction is rolled back by the server when its connection closes:
        // only flushed writes stay, as the contract says.
        if let Ok(mut w) = self.inner.writer.lock() {
            w.tx = None;
        }
        self.inner.pool.close();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_printed() {
        assert_eq!(
            redact("postgres://relay:s3cret@db.example:5432/redline"),
            "postgres://relay:***@db.example:5432/redline"
        );
        assert_eq!(
            redact("host=db user=relay password=s3cret dbname=redline"),
            "host=db user=relay password=*** dbname=redline"
        );
        assert_eq!(
            redact("postgres://relay@db/redline"),
            "postgres://relay@db/redline"
        );
    }

    #[test]
    fn prefix_ranges_end_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
