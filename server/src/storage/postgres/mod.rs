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
//! it a future and waits for the answer, so calling from any thread is safe.

mod schema;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use redline_proto::{DeviceId, DocId};

use super::{
    ActorBindings, DeviceRecords, Documents, KeyValue, QuarantineStore, SeqChunk, StoredDoc,
    Uploads, flat, unflat,
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

/// The open transaction of the relay's unflushed writes.
#[derive(Default)]
struct Writer {
    /// The connection it runs on (`None`: nothing written since the last flush).
    tx: Option<Arc<Object>>,
    /// Writes since the last flush were lost (a statement failed and the transaction
    /// was rolled back): the next flush must fail.
    lost: bool,
    /// The feed's head as this transaction locked it (`SELECT ... FOR UPDATE`), then
    /// raised by each append: relays append one transaction at a time, so sequences
    /// follow commit order.
    head: Option<i64>,
    /// The last sequence this transaction appended (announced at its commit).
    appended: Option<i64>,
    /// When the transaction was opened (an idle one is committed by itself).
    opened: Option<std::time::Instant>,
    /// Documents and sequences this transaction appended.
    appends: Vec<(String, u64)>,
    /// Appends of transactions that were rolled back or whose commit failed, until
    /// their appender asks ([`Documents::append_lost`]).
    lost_appends: std::collections::HashSet<(String, u64)>,
}

impl Writer {
    /// A statement failed inside the open transaction: roll it back (PostgreSQL
    /// aborted it) and remember that the writes since the last flush are gone.
    fn abandon(&mut self, storage: &Inner) {
        self.lost = true;
        self.head = None;
        self.appended = None;
        self.opened = None;
        let appends = std::mem::take(&mut self.appends);
        self.lost_appends.extend(appends);
        if let Some(conn) = self.tx.take() {
            // On a dead connection this fails at once; the pool then drops it.
            let _ = storage.block(async move {
                conn.batch_execute("ROLLBACK").await?;
                Ok(())
            });
        }
    }
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

/// A transaction left open this long without a flush is committed by itself: it holds
/// the feed's head row (other relays wait) and keeps its writes from other readers.
const IDLE_COMMIT: Duration = Duration::from_millis(200);

/// Whether `e` came from PostgreSQL itself (the transaction is then aborted).
fn from_database(e: &Error) -> bool {
    matches!(e, Error::Postgres(_) | Error::PostgresPool(_))
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
        .map_err(|e| Error::Tls(e.to_string()))?
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
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| Error::Config(format!("PostgreSQL pool: {e}")))?;
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
            epoch: 0,
            target,
            found: 0,
        };
        inner.found = inner.migrate()?.0;
        inner.epoch = inner.read_epoch()?;
        let inner = Arc::new(inner);
        runtime.spawn(listen(listen_config, tls, notify));
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("redline-pg-idle".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(IDLE_COMMIT);
                    let Some(inner) = weak.upgrade() else { return };
                    inner.commit_if_idle();
                }
            })
            .map_err(|source| Error::Io {
                action: "starting the PostgreSQL idle-commit thread",
                path: PathBuf::new(),
                source,
            })?;
        Ok(Self {
            inner,
            runtime: Some(runtime),
            signal,
        })
    }
}

/// The connection settings of the LISTEN connection (the pool's, parsed again).
fn config_for_listen(url: &str) -> Result<tokio_postgres::Config, Error> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::Config(format!("PostgreSQL URL {} is not valid: {e}", redact(url))))?;
    config.application_name("redline-relay-listen");
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

/// Listens for the feed's announcements (other relays' flushes and this one's) and
/// moves `notify` to the highest sequence announced; reconnects after a failure (the
/// relay's periodic re-read of the feed's head covers what was missed meanwhile).
async fn listen(
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    notify: tokio::sync::watch::Sender<u64>,
) {
    loop {
        let result = match &tls {
            Some(tls) => match config.connect(tls.clone()).await {
                Ok((client, conn)) => listen_on(client, conn, &notify).await,
                Err(e) => Err(e),
            },
            None => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => listen_on(client, conn, &notify).await,
                Err(e) => Err(e),
            },
        };
        if notify.is_closed() {
            return;
        }
        if let Err(e) = result {
            tracing::debug!("feed announcements: {e}; listening again in 500 ms");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut conn: tokio_postgres::Connection<S, T>,
    notify: &tokio::sync::watch::Sender<u64>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_postgres::AsyncMessage;
    let sql = format!("LISTEN {}", schema::FEED_CHANNEL);
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    // The LISTEN's answer arrives through the connection: drive both.
    let mut listening = false;
    loop {
        if !listening {
            tokio::select! {
                r = &mut listen => { r?; listening = true; continue; }
                m = std::future::poll_fn(|cx| conn.poll_message(cx)) => {
                    if !take(m, notify)? { return Ok(()); }
                }
            }
        } else {
            let m = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
            if notify.is_closed() || !take(m, notify)? {
                return Ok(());
            }
        }
    }

    fn take(
        m: Option<Result<AsyncMessage, tokio_postgres::Error>>,
        notify: &tokio::sync::watch::Sender<u64>,
    ) -> Result<bool, tokio_postgres::Error> {
        match m {
            None => Ok(false),
            Some(Err(e)) => Err(e),
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Ok(seq) = n.payload().parse::<u64>() {
                    notify.send_if_modified(|v| {
                        let forward = seq > *v;
                        if forward {
                            *v = seq;
                        }
                        forward
                    });
                }
                Ok(true)
            }
            Some(Ok(_)) => Ok(true),
        }
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

    /// The open transaction's connection, opening one if none is.
    fn open(&self, writer: &mut Writer) -> Result<Arc<Object>, Error> {
        if let Some(c) = &writer.tx {
            return Ok(c.clone());
        }
        let pool = self.pool.clone();
        let c = self.block(async move {
            let c = pool.get().await?;
            c.batch_execute("BEGIN").await?;
            Ok(Arc::new(c))
        })?;
        writer.tx = Some(c.clone());
        writer.opened = Some(std::time::Instant::now());
        Ok(c)
    }

    /// Commits the open transaction, if any (announcing what it appended).
    fn commit_open(&self, writer: &mut Writer) -> Result<(), Error> {
        let Some(conn) = writer.tx.take() else {
            return Ok(());
        };
        let appended = writer.appended.take();
        writer.head = None;
        writer.opened = None;
        let appends = std::mem::take(&mut writer.appends);
        let committed = self.block(async move {
            match appended {
                // NOTIFY is transactional: delivered when (and only if) the commit is.
                Some(seq) => {
                    conn.batch_execute(&format!(
                        "SELECT pg_notify('{}', '{seq}'); COMMIT",
                        schema::FEED_CHANNEL
                    ))
                    .await?
                }
                None => conn.batch_execute("COMMIT").await?,
            }
            Ok(())
        });
        if committed.is_err() {
            // The commit's fate is unknown: count its appends as lost (their retry
            // finds them stored if they were).
            writer.lost_appends.extend(appends);
        }
        committed
    }

    /// Commits a transaction that stayed open for [`IDLE_COMMIT`] without a flush
    /// (device records, upload touches): a failure is reported by the next flush.
    fn commit_if_idle(&self) {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.opened.is_some_and(|t| t.elapsed() >= IDLE_COMMIT)
            && self.commit_open(&mut writer).is_err()
        {
            writer.lost = true;
        }
    }

    /// Runs a write inside the open transaction (opening one if none is).
    fn write<R, F, Fut>(&self, op: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(Arc<Object>) -> Fut,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
    {
        let mut writer = self.writer.lock().expect("writer lock");
        let conn = self.open(&mut writer)?;
        let r = self.block(op(conn));
        if let Err(e) = &r
            && from_database(e)
        {
            writer.abandon(self);
        }
        r
    }

    /// Runs `op` on any pooled connection, outside the relay's open transaction: its
    /// statements commit at once (writes that must not hold row locks for the length of
    /// the relay's transaction, and reads of what is committed only).
    fn apart<R, F, Fut>(&self, op: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(Arc<Object>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
    {
        let pool = self.pool.clone();
        self.block(async move {
            let c = Arc::new(pool.get().await?);
            op(c).await
        })
    }

    /// Runs a read: inside the open transaction if there is one (it sees the relay's
    /// unflushed writes), else on any connection.
    fn read<R, F, Fut>(&self, op: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(Arc<Object>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
    {
        let mut writer = self.writer.lock().expect("writer lock");
        if let Some(c) = writer.tx.clone() {
            let r = self.block(op(c));
            if let Err(e) = &r
                && from_database(e)
            {
                writer.abandon(self);
            }
            return r;
        }
        drop(writer);
        let pool = self.pool.clone();
        self.block(async move {
            let c = Arc::new(pool.get().await?);
            op(c).await
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

fn random_epoch() -> u64 {
    rand::random::<u64>() >> 1 | 1
}

impl Documents for PgStorage {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn describe(&self) -> String {
        format!("postgresql {} (schema {})", self.target, schema::VERSION)
    }

    fn ping(&self) -> Result<(), Error> {
        self.read(|c| async move {
            c.simple_query("SELECT 1").await?;
            Ok(())
        })
    }

    fn last_seq(&self) -> Result<u64, Error> {
        self.read(|c| async move {
            let st = c
                .prepare_cached("SELECT seq FROM redline_feed_head")
                .await?;
            Ok(c.query_one(&st, &[]).await?.get::<_, i64>(0) as u64)
        })
    }

    fn load(&self, doc: &DocId) -> Result<Option<StoredDoc>, Error> {
        let doc = doc.as_str().to_string();
        self.read(|c| async move {
            // One statement, so one snapshot of the database: a compaction by another
            // relay can never fall between reading the snapshot and reading the chunks.
            let st = c
                .prepare_cached(
                    "SELECT d.snapshot, d.last_seq, -1::bigint AS seq FROM redline_docs d \
                     WHERE d.doc = $1 \
                     UNION ALL \
                     SELECT c.chunk, 0, c.seq FROM redline_chunks c \
                     JOIN redline_docs d ON d.doc = c.doc \
                     WHERE c.doc = $1 AND c.seq > d.snapshot_seq \
                     ORDER BY seq",
                )
                .await?;
            let rows = c.query(&st, &[&doc]).await?;
            let Some((first, rest)) = rows.split_first() else {
                return Ok(None);
            };
            let snapshot: Option<Vec<u8>> = first.get(0);
            let last_seq = first.get::<_, i64>(1) as u64;
            let chunks: Vec<Vec<u8>> = rest.iter().filter_map(|r| r.get(0)).collect();
            if snapshot.is_none() && chunks.is_empty() {
                return Ok(None);
            }
            Ok(Some(StoredDoc {
                snapshot,
                chunks,
                last_seq,
            }))
        })
    }

    fn commit(&self, doc: &DocId, seq: u64, chunk: &[u8], heads: &[[u8; 32]]) -> Result<(), Error> {
        let (doc, seq, chunk, heads) = (
            doc.as_str().to_string(),
            seq_sql(seq)?,
            chunk.to_vec(),
            flat(heads),
        );
        self.write(|c| async move {
            // A sequence chosen by the caller (the relay appends with `append`). Commits
            // may arrive out of sequence order: the head and the document's last
            // commit take the highest. A sequence written twice fails on the feed's
            // primary key.
            let head = c
                .prepare_cached("UPDATE redline_feed_head SET seq = GREATEST(seq, $1)")
                .await?;
            c.execute(&head, &[&seq]).await?;
            write_commit(&c, &doc, seq, &chunk, &heads).await
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn append(
        &self,
        doc: &DocId,
        expected: u64,
        chunk: &[u8],
        heads: &[[u8; 32]],
    ) -> Result<u64, Error> {
        let (doc, expected, chunk, heads) = (
            doc.as_str().to_string(),
            seq_sql(expected)?,
            chunk.to_vec(),
            flat(heads),
        );
        let mut writer = self.writer.lock().expect("writer lock");
        let conn = self.open(&mut writer)?;
        let locked = writer.head;
        let name = doc.clone();
        let result = self.block(async move {
            let c = conn;
            // The head row, locked until this transaction commits: another relay's
            // append waits here, so sequences are taken in commit order.
            let head = match locked {
                Some(h) => h,
                None => {
                    let st = c
                        .prepare_cached("SELECT seq FROM redline_feed_head FOR UPDATE")
                        .await?;
                    c.query_one(&st, &[]).await?.get::<_, i64>(0)
                }
            };
            let last = c
                .prepare_cached("SELECT last_seq FROM redline_docs WHERE doc = $1")
                .await?;
            let last: i64 = c.query_opt(&last, &[&doc]).await?.map_or(0, |r| r.get(0));
            if last != expected {
                return Ok((head, Err(Error::Conflict(doc))));
            }
            let seq = head + 1;
            let raise = c
                .prepare_cached("UPDATE redline_feed_head SET seq = $1")
                .await?;
            let by_seq: [&Param; 1] = [&seq];
            let (raised, written) = tokio::join!(
                c.execute(&raise, &by_seq),
                write_commit(&c, &doc, seq, &chunk, &heads)
            );
            raised?;
            written?;
            Ok((seq, Ok(seq as u64)))
        });
        match result {
            Ok((head, outcome)) => {
                writer.head = Some(head);
                if let Ok(seq) = outcome {
                    writer.appended = Some(seq as i64);
                    let key = (name, seq);
                    writer.lost_appends.remove(&key);
                    writer.appends.push(key);
                }
                outcome
            }
            Err(e) => {
                if from_database(&e) {
                    writer.abandon(self);
                }
                Err(e)
            }
        }
    }

    fn feed_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.signal.clone())
    }

    fn append_lost(&self, doc: &DocId, seq: u64) -> bool {
        let key = (doc.as_str().to_string(), seq);
        let mut writer = self.writer.lock().expect("writer lock");
        writer.lost_appends.remove(&key) || writer.appends.contains(&key)
    }

    fn chunks_after(&self, doc: &DocId, after: u64) -> Result<Option<Vec<SeqChunk>>, Error> {
        let (doc, after) = (doc.as_str().to_string(), seq_bound(after));
        self.read(move |c| async move {
            // One statement: the snapshot's cover and the chunks after `after` agree.
            let st = c
                .prepare_cached(
                    "SELECT d.snapshot_seq, c.seq, c.chunk, f.heads FROM redline_docs d \
                     LEFT JOIN redline_chunks c ON c.doc = d.doc AND c.seq > $2 \
                     LEFT JOIN redline_feed f ON f.seq = c.seq \
                     WHERE d.doc = $1 ORDER BY c.seq",
                )
                .await?;
            let rows = c.query(&st, &[&doc, &after]).await?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            if first.get::<_, i64>(0) > after {
                return Ok(None);
            }
            Ok(Some(
                rows.iter()
                    .filter_map(|r| {
                        let seq: Option<i64> = r.get(1);
                        let chunk: Option<Vec<u8>> = r.get(2);
                        let heads: Option<&[u8]> = r.get(3);
                        Some((seq? as u64, chunk?, unflat(heads?)))
                    })
                    .collect(),
            ))
        })
    }

    fn committed_feed(&self, after: u64) -> Result<(u64, Vec<(u64, DocId)>), Error> {
        let after = seq_bound(after);
        // One statement (one snapshot), apart from this relay's open transaction.
        self.apart(move |c| async move {
            let st = c
                .prepare_cached(
                    "SELECT h.seq, f.seq, f.doc FROM redline_feed_head h \
                     LEFT JOIN redline_feed f ON f.seq > $1 AND f.seq <= h.seq \
                     ORDER BY f.seq",
                )
                .await?;
            let rows = c.query(&st, &[&after]).await?;
            let head = rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64);
            let mut entries = Vec::with_capacity(rows.len());
            for r in &rows {
                if let (Some(seq), Some(doc)) =
                    (r.get::<_, Option<i64>>(1), r.get::<_, Option<&str>>(2))
                {
                    entries.push((seq as u64, DocId::parse(doc)?));
                }
            }
            Ok((head, entries))
        })
    }

    fn compact(&self, doc: &DocId, snapshot: &[u8], covers: u64) -> Result<(), Error> {
        let (doc, snapshot, covers) = (
            doc.as_str().to_string(),
            snapshot.to_vec(),
            seq_bound(covers),
        );
        self.write(|c| async move {
            // Never replaces a snapshot that covers more (another relay compacted
            // later), and drops only the chunks this one covers.
            let set = c
                .prepare_cached(
                    "INSERT INTO redline_docs (doc, snapshot, snapshot_seq) VALUES ($1, $2, $3) \
                     ON CONFLICT (doc) DO UPDATE \
                     SET snapshot = EXCLUDED.snapshot, snapshot_seq = EXCLUDED.snapshot_seq \
                     WHERE redline_docs.snapshot_seq < EXCLUDED.snapshot_seq",
                )
                .await?;
            if c.execute(&set, &[&doc, &snapshot, &covers]).await? == 0 {
                return Ok(());
            }
            let drop = c
                .prepare_cached("DELETE FROM redline_chunks WHERE doc = $1 AND seq <= $2")
                .await?;
            c.execute(&drop, &[&doc, &covers]).await?;
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), Error> {
        let mut writer = self.writer.lock().expect("writer lock");
        let committed = self.commit_open(&mut writer);
        if std::mem::take(&mut writer.lost) {
            return Err(Error::Storage(
                "a write failed since the last flush; PostgreSQL rolled back the writes \
                 made before it"
                    .into(),
            ));
        }
        committed
    }

    fn feed(&self, after: u64, upto: u64) -> Result<Vec<(u64, DocId)>, Error> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let (after, upto) = (seq_bound(after), seq_bound(upto));
        self.read(move |c| async move {
            let st = c
                .prepare_cached(
                    "SELECT seq, doc FROM redline_feed WHERE seq > $1 AND seq <= $2 ORDER BY seq",
                )
                .await?;
            c.query(&st, &[&after, &upto])
                .await?
                .iter()
                .map(|r| {
                    let doc: &str = r.get(1);
                    Ok((r.get::<_, i64>(0) as u64, DocId::parse(doc)?))
                })
                .collect()
        })
    }

    fn heads_at(&self, doc: &DocId, seq: u64) -> Result<Option<Vec<[u8; 32]>>, Error> {
        let (doc, seq) = (doc.as_str().to_string(), seq_bound(seq));
        self.read(move |c| async move {
            let st = c
                .prepare_cached(
                    "SELECT heads FROM redline_feed WHERE doc = $1 AND seq <= $2 \
                     ORDER BY seq DESC LIMIT 1",
                )
                .await?;
            Ok(c.query_opt(&st, &[&doc, &seq])
                .await?
                .map(|r| unflat(r.get::<_, &[u8]>(0))))
        })
    }

    fn list(&self) -> Result<Vec<DocId>, Error> {
        self.read(|c| async move {
            let st = c
                .prepare_cached("SELECT doc FROM redline_docs ORDER BY doc")
                .await?;
            c.query(&st, &[])
                .await?
                .iter()
                .map(|r| Ok(DocId::parse(r.get::<_, &str>(0))?))
                .collect()
        })
    }

    fn exists(&self, doc: &DocId) -> Result<bool, Error> {
        let doc = doc.as_str().to_string();
        self.read(move |c| async move {
            let st = c
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM redline_docs WHERE doc = $1)")
                .await?;
            Ok(c.query_one(&st, &[&doc]).await?.get(0))
        })
    }
}

/// Writes a commit's rows: the document's last commit, the chunk, the feed entry.
async fn write_commit(
    c: &Object,
    doc: &str,
    seq: i64,
    chunk: &[u8],
    heads: &[u8],
) -> Result<(), Error> {
    let upsert = c
        .prepare_cached(
            "INSERT INTO redline_docs (doc, last_seq) VALUES ($1, $2) \
             ON CONFLICT (doc) DO UPDATE SET last_seq = GREATEST(redline_docs.last_seq, EXCLUDED.last_seq)",
        )
        .await?;
    let new_chunk = c
        .prepare_cached("INSERT INTO redline_chunks (doc, seq, chunk) VALUES ($1, $2, $3)")
        .await?;
    let new_entry = c
        .prepare_cached("INSERT INTO redline_feed (seq, doc, heads) VALUES ($1, $2, $3)")
        .await?;
    type Arg<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let (p_doc, p_chunk, p_entry): ([Arg<'_>; 2], [Arg<'_>; 3], [Arg<'_>; 3]) =
        ([&doc, &seq], [&doc, &seq, &chunk], [&seq, &doc, &heads]);
    tokio::try_join!(
        c.execute(&upsert, &p_doc),
        c.execute(&new_chunk, &p_chunk),
        c.execute(&new_entry, &p_entry),
    )?;
    Ok(())
}

/// `SUM(length(...))` of the rows a statement selects, as bytes.
async fn total(c: &Object, sql: &str, params: &[&Param]) -> Result<u64, Error> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, params).await?.get::<_, i64>(0) as u64)
}

const UPLOAD_LEN: &str =
    "SELECT COALESCE(SUM(length(data)), 0)::bigint FROM redline_upload_pieces WHERE key = $1";

impl Uploads for PgStorage {
    fn upload_len(&self, key: &[u8]) -> Result<u64, Error> {
        let key = key.to_vec();
        self.read(move |c| async move { total(&c, UPLOAD_LEN, &[&key]).await })
    }

    fn put_piece(&self, key: &[u8], offset: u64, data: &[u8]) -> Result<(), Error> {
        let (key, data) = (key.to_vec(), data.to_vec());
        let at = seq_sql(offset)?;
        self.write(move |c| async move {
            let have = total(&c, UPLOAD_LEN, &[&key]).await?;
            if have != offset {
                return Err(Error::Storage(format!(
                    "piece at {offset}, but {have} bytes are held"
                )));
            }
            let st = c
                .prepare_cached(
                    "INSERT INTO redline_upload_pieces (key, at, data) VALUES ($1, $2, $3)",
                )
                .await?;
            c.execute(&st, &[&key, &at, &data]).await?;
            Ok(())
        })
    }

    fn upload_bytes(&self, key: &[u8]) -> Result<Vec<u8>, Error> {
        let key = key.to_vec();
        self.read(move |c| async move {
            let st = c
                .prepare_cached("SELECT data FROM redline_upload_pieces WHERE key = $1 ORDER BY at")
                .await?;
            let mut out = Vec::new();
            for row in c.query(&st, &[&key]).await? {
                out.extend_from_slice(row.get::<_, &[u8]>(0));
            }
            Ok(out)
        })
    }

    fn drop_upload(&self, key: &[u8]) -> Result<(), Error> {
        let key = key.to_vec();
        self.write(move |c| async move {
            let pieces = c
                .prepare_cached("DELETE FROM redline_upload_pieces WHERE key = $1")
                .await?;
            let upload = c
                .prepare_cached("DELETE FROM redline_uploads WHERE key = $1")
                .await?;
            let by_key: [&Param; 1] = [&key];
            tokio::try_join!(c.execute(&pieces, &by_key), c.execute(&upload, &by_key))?;
            Ok(())
        })
    }

    fn touch_upload(&self, key: &[u8], now: u64) -> Result<(), Error> {
        let (key, now) = (key.to_vec(), seq_sql(now)?);
        self.write(move |c| async move {
            let st = c
                .prepare_cached(
                    "INSERT INTO redline_uploads (key, touched) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET touched = EXCLUDED.touched",
                )
                .await?;
            c.execute(&st, &[&key, &now]).await?;
            Ok(())
        })
    }

    fn staged_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        let (from, to) = (prefix.to_vec(), prefix_end(prefix));
        self.read(move |c| async move {
            total(
                &c,
                "SELECT COALESCE(SUM(length(data)), 0)::bigint FROM redline_upload_pieces \
                 WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2)",
                &[&from, &to],
            )
            .await
        })
    }

    fn expire_uploads(&self, cutoff: u64) -> Result<usize, Error> {
        let cutoff = seq_sql(cutoff)?;
        self.write(move |c| async move {
            let stale = c
                .prepare_cached("DELETE FROM redline_uploads WHERE touched < $1 RETURNING key")
                .await?;
            let keys: Vec<Vec<u8>> = c
                .query(&stale, &[&cutoff])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let pieces = c
                .prepare_cached("DELETE FROM redline_upload_pieces WHERE key = ANY($1)")
                .await?;
            c.execute(&pieces, &[&keys]).await?;
            Ok(keys.len())
        })
    }
}

fn bound_device(stored: &str) -> Result<DeviceId, Error> {
    DeviceId::new(stored).map_err(|e| Error::Storage(format!("corrupt actor binding: {e}")))
}

impl ActorBindings for PgStorage {
    fn bind_actor(&self, actor: &[u8], device: &DeviceId) -> Result<DeviceId, Error> {
        let (actor, device) = (actor.to_vec(), device.as_str().to_string());
        // Committed at once, apart from the relay's transaction: a binding is right
        // whether or not the commit that first used it lands, and a row lock held until
        // the relay's flush would make other relays wait (or deadlock) on it.
        let owner = self.apart(move |c| async move {
            // The primary key decides a race: whoever commits first owns the actor; a
            // concurrent insert waits for that commit, then finds the row.
            let bind = c
                .prepare_cached(
                    "INSERT INTO redline_actors (actor, device) VALUES ($1, $2) \
                     ON CONFLICT (actor) DO NOTHING",
                )
                .await?;
            let owner = c
                .prepare_cached("SELECT device FROM redline_actors WHERE actor = $1")
                .await?;
            c.execute(&bind, &[&actor, &device]).await?;
            Ok(c.query_one(&owner, &[&actor]).await?.get::<_, String>(0))
        })?;
        bound_device(&owner)
    }

    fn actor_owner(&self, actor: &[u8]) -> Result<Option<DeviceId>, Error> {
        let actor = actor.to_vec();
        let owner: Option<String> = self.read(move |c| async move {
            let st = c
                .prepare_cached("SELECT device FROM redline_actors WHERE actor = $1")
                .await?;
            Ok(c.query_opt(&st, &[&actor]).await?.map(|r| r.get(0)))
        })?;
        owner.map(|o| bound_device(&o)).transpose()
    }

    fn actors_of(&self, device: &DeviceId) -> Result<usize, Error> {
        let device = device.as_str().to_string();
        self.read(move |c| async move {
            let st = c
                .prepare_cached("SELECT count(*) FROM redline_actors WHERE device = $1")
                .await?;
            Ok(c.query_one(&st, &[&device]).await?.get::<_, i64>(0) as usize)
        })
    }
}

impl DeviceRecords for PgStorage {
    fn save_device(&self, device: &DeviceId, record: &[u8]) -> Result<(), Error> {
        let (device, record) = (device.as_str().to_string(), record.to_vec());
        // Apart from the relay's transaction: a phone that moves between relays has its
        // record written by both, which must not wait on each other's flush.
        self.apart(move |c| async move {
            let st = c
                .prepare_cached(
                    "INSERT INTO redline_devices (device, record) VALUES ($1, $2) \
                     ON CONFLICT (device) DO UPDATE SET record = EXCLUDED.record",
                )
                .await?;
            c.execute(&st, &[&device, &record]).await?;
            Ok(())
        })
    }

    fn devices(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.read(|c| async move {
            let st = c
                .prepare_cached("SELECT record FROM redline_devices ORDER BY device")
                .await?;
            Ok(c.query(&st, &[]).await?.iter().map(|r| r.get(0)).collect())
        })
    }
}

impl QuarantineStore for PgStorage {
    fn put_quarantine(&self, key: &[u8], item: &[u8]) -> Result<(), Error> {
        let (key, item) = (key.to_vec(), item.to_vec());
        self.write(move |c| async move {
            let st = c
                .prepare_cached(
                    "INSERT INTO redline_quarantine (key, item) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET item = EXCLUDED.item",
                )
                .await?;
            c.execute(&st, &[&key, &item]).await?;
            Ok(())
        })
    }

    fn visit_quarantined(&self, visit: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), Error> {
        // A page at a time: never every held push in memory at once.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let from = after.clone();
            let page: Vec<KeyValue> = self.read(move |c| async move {
                let st = c
                    .prepare_cached(
                        "SELECT key, item FROM redline_quarantine \
                         WHERE ($1::bytea IS NULL OR key > $1) ORDER BY key LIMIT $2",
                    )
                    .await?;
                Ok(c.query(&st, &[&from, &VISIT_PAGE])
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect())
            })?;
            let full = page.len() as i64 == VISIT_PAGE;
            for (k, v) in &page {
                if !visit(k, v) {
                    return Ok(());
                }
            }
            match page.into_iter().last() {
                Some((k, _)) if full => after = Some(k),
                _ => return Ok(()),
            }
        }
    }

    fn quarantined_with(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, Error> {
        let (from, to) = (prefix.to_vec(), prefix_end(prefix));
        self.read(move |c| async move {
            let st = c
                .prepare_cached(
                    "SELECT key, item FROM redline_quarantine \
                     WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) ORDER BY key",
                )
                .await?;
            Ok(c.query(&st, &[&from, &to])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    fn held_bytes(&self, prefix: &[u8]) -> Result<u64, Error> {
        let (from, to) = (prefix.to_vec(), prefix_end(prefix));
        self.read(move |c| async move {
            total(
                &c,
                "SELECT COALESCE(SUM(length(item)), 0)::bigint FROM redline_quarantine \
                 WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2)",
                &[&from, &to],
            )
            .await
        })
    }

    fn drop_quarantine(&self, key: &[u8]) -> Result<(), Error> {
        let key = key.to_vec();
        self.write(move |c| async move {
            let st = c
                .prepare_cached("DELETE FROM redline_quarantine WHERE key = $1")
                .await?;
            c.execute(&st, &[&key]).await?;
            Ok(())
        })
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
