//! The writer: the one open transaction of the relay's unflushed writes, its flush
//! (blocking or asynchronous) and who waits for whom.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Object;

use super::{Inner, schema};
use crate::Error;
use crate::storage::StorageFuture;

/// The open transaction of the relay's unflushed writes.
#[derive(Default)]
pub(super) struct Writer {
    /// The connection it runs on (`None`: nothing written since the last flush).
    pub(super) tx: Option<Arc<Object>>,
    /// Writes since the last flush were lost (a statement failed and the transaction
    /// was rolled back): the next flush must fail.
    pub(super) lost: bool,
    /// The feed's head as this transaction locked it (`SELECT ... FOR UPDATE`), then
    /// raised by each append: relays append one transaction at a time, so sequences
    /// follow commit order.
    pub(super) head: Option<i64>,
    /// The last sequence this transaction appended (announced at its commit).
    pub(super) appended: Option<i64>,
    /// When the transaction was opened (an idle one is committed by itself).
    pub(super) opened: Option<std::time::Instant>,
    /// Documents and sequences this transaction appended.
    pub(super) appends: Vec<(String, u64)>,
    /// The transaction an asynchronous flush took and is committing: reads and other
    /// flushes wait for it (its writes are not visible to other connections yet).
    committing: Option<Arc<Committing>>,
}

/// Appends of transactions that were rolled back or whose commit failed, until their
/// appender asks ([`Documents::append_lost`]). Locked after the writer, never before.
pub(super) type LostAppends = Mutex<std::collections::HashSet<(String, u64)>>;

/// A commit in flight without the writer's lock ([`Documents::flush_async`]).
#[derive(Default)]
struct Committing {
    done: Mutex<bool>,
    finished: std::sync::Condvar,
}

impl Committing {
    fn is_done(&self) -> bool {
        *self.done.lock().expect("commit lock")
    }

    fn wait(&self) {
        let mut done = self.done.lock().expect("commit lock");
        while !*done {
            done = self.finished.wait(done).expect("commit lock");
        }
    }

    fn finish(&self) {
        *self.done.lock().expect("commit lock") = true;
        self.finished.notify_all();
    }
}

/// Marks its commit finished when dropped: when the commit ends, and also when its
/// task is dropped unfinished (the client's runtime shut down), so nobody waits on it
/// for ever.
struct FinishOnDrop(Arc<Committing>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Writer {
    /// A statement failed inside the open transaction: roll it back (PostgreSQL
    /// aborted it) and remember that the writes since the last flush are gone.
    pub(super) fn abandon(&mut self, storage: &Inner) {
        self.lost = true;
        self.head = None;
        self.appended = None;
        self.opened = None;
        let appends = std::mem::take(&mut self.appends);
        storage
            .lost_appends
            .lock()
            .expect("lost appends lock")
            .extend(appends);
        if let Some(conn) = self.tx.take() {
            // On a dead connection this fails at once; the pool then drops it.
            let _ = storage.block(async move {
                conn.batch_execute("ROLLBACK").await?;
                Ok(())
            });
        }
    }
}

/// A transaction left open this long without a flush is committed by itself: it holds
/// the feed's head row (other relays wait) and keeps its writes from other readers.
const IDLE_COMMIT: Duration = Duration::from_millis(200);

/// Whether `e` came from PostgreSQL itself (the transaction is then aborted).
pub(super) fn from_database(e: &Error) -> bool {
    matches!(e, Error::Postgres(_) | Error::PostgresPool(_))
}

/// Commits the transaction open on `conn`, announcing `appended` (the last sequence
/// it appended) to every relay: NOTIFY is transactional, delivered when (and only if)
/// the commit is.
async fn commit(conn: Arc<Object>, appended: Option<i64>) -> Result<(), Error> {
    match appended {
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
}

/// A flush's answer when the writes since the last one were `lost` (or not).
pub(super) fn lost_or_ok(lost: bool) -> Result<(), Error> {
    if lost {
        return Err(Error::Storage(
            "a write failed since the last flush; PostgreSQL rolled back the writes made \
             before it"
                .into(),
        ));
    }
    Ok(())
}

/// Commits the writer's transaction when it was left idle for [`IDLE_COMMIT`], until
/// the storage is gone.
pub(super) fn spawn_idle_commit(weak: std::sync::Weak<Inner>) -> Result<(), Error> {
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
    Ok(())
}

impl Inner {
    /// The open transaction's connection, opening one if none is.
    pub(super) fn open(&self, writer: &mut Writer) -> Result<Arc<Object>, Error> {
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

    /// The writer, once no asynchronous flush is committing (its writes are then
    /// visible, and a flush after it covers them).
    pub(super) fn settled(&self) -> std::sync::MutexGuard<'_, Writer> {
        let mut writer = self.writer.lock().expect("writer lock");
        while let Some(c) = writer.committing.clone() {
            if c.is_done() {
                writer.committing = None;
            } else {
                drop(writer);
                c.wait();
                writer = self.writer.lock().expect("writer lock");
            }
        }
        writer
    }

    /// Commits the open transaction, if any (announcing what it appended).
    pub(super) fn commit_open(&self, writer: &mut Writer) -> Result<(), Error> {
        let Some(conn) = writer.tx.take() else {
            return Ok(());
        };
        let appended = writer.appended.take();
        writer.head = None;
        writer.opened = None;
        let appends = std::mem::take(&mut writer.appends);
        let committed = self.block(commit(conn, appended));
        if committed.is_err() {
            // The commit's fate is unknown: count its appends as lost (their retry
            // finds them stored if they were).
            self.lost_appends
                .lock()
                .expect("lost appends lock")
                .extend(appends);
        }
        committed
    }

    /// [`Documents::flush`] without holding the writer's lock while the commit runs
    /// (`None`: a write or another commit is under way; flush the blocking way). The
    /// transaction is taken at once: writes after it open the next one (an append
    /// waits for this commit on the feed's head row), reads and other flushes wait for
    /// it ([`Self::settled`]). The commit runs on the client's runtime to its end even
    /// if the answer is no longer awaited.
    pub(super) fn flush_async(self: &Arc<Self>) -> Option<StorageFuture<()>> {
        let mut writer = self.writer.try_lock().ok()?;
        if let Some(c) = &writer.committing {
            if !c.is_done() {
                return None;
            }
            writer.committing = None;
        }
        let lost = std::mem::take(&mut writer.lost);
        let Some(conn) = writer.tx.take() else {
            return Some(Box::pin(std::future::ready(lost_or_ok(lost))));
        };
        let appended = writer.appended.take();
        writer.head = None;
        writer.opened = None;
        let appends = std::mem::take(&mut writer.appends);
        let committing = Arc::new(Committing::default());
        writer.committing = Some(committing.clone());
        drop(writer);
        let inner = self.clone();
        let finished = FinishOnDrop(committing);
        Some(self.spawned(async move {
            let committed = commit(conn, appended).await;
            if committed.is_err() {
                inner
                    .lost_appends
                    .lock()
                    .expect("lost appends lock")
                    .extend(appends);
            }
            drop(finished);
            lost_or_ok(lost)?;
            committed
        }))
    }

    /// Commits a transaction that stayed open for [`IDLE_COMMIT`] without a flush
    /// (device records, upload touches): a failure is reported by the next flush.
    pub(super) fn commit_if_idle(&self) {
        let mut writer = self.settled();
        if writer.opened.is_some_and(|t| t.elapsed() >= IDLE_COMMIT)
            && self.commit_open(&mut writer).is_err()
        {
            writer.lost = true;
        }
    }

    /// Runs a write inside the open transaction (opening one if none is).
    pub(super) fn write<R, F, Fut>(&self, op: F) -> Result<R, Error>
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
    pub(super) fn apart<R, F, Fut>(&self, op: F) -> Result<R, Error>
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
    pub(super) fn read<R, F, Fut>(&self, op: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(Arc<Object>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<R, Error>> + Send + 'static,
    {
        let mut writer = self.settled();
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
