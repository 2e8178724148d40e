//! Documents and the feed on PostgreSQL: one transaction per flush, the feed counter
//! taken once per flush inside it, optimistic concurrency on a document's last sequence.

use super::*;

pub(super) fn random_epoch() -> u64 {
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
        let open = writer.tx.clone();
        let fresh = open.is_none();
        let pool = self.pool.clone();
        let locked = writer.head;
        let name = doc.clone();
        let result = self.block(async move {
            let c = match open {
                Some(c) => c,
                None => Arc::new(pool.get().await?),
            };
            let read = append_in(&c, fresh, locked, &doc, expected, &chunk, &heads);
            match read.await {
                Ok(outcome) => Ok((c, outcome)),
                Err(e) => {
                    if fresh {
                        // Never back to the pool inside a transaction.
                        let _ = c.batch_execute("ROLLBACK").await;
                    }
                    Err(e)
                }
            }
        });
        match result {
            Ok((conn, (head, outcome))) => {
                if fresh {
                    writer.tx = Some(conn);
                    writer.opened = Some(std::time::Instant::now());
                }
                writer.head = Some(head);
                if let Ok(seq) = outcome {
                    writer.appended = Some(seq as i64);
                    let key = (name, seq);
                    self.lost_appends
                        .lock()
                        .expect("lost appends lock")
                        .remove(&key);
                    writer.appends.push(key);
                }
                outcome
            }
            Err(e) => {
                if from_database(&e) && !fresh {
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
        let writer = self.writer.lock().expect("writer lock");
        let lost = self
            .lost_appends
            .lock()
            .expect("lost appends lock")
            .remove(&key);
        lost || writer.appends.contains(&key)
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

    fn committed_feed_chunks(&self, after: u64, most: u64) -> Result<FeedRead, Error> {
        self.block(feed_with_chunks(self.pool.clone(), after, most))
    }

    fn committed_feed_chunks_async(
        &self,
        after: u64,
        most: u64,
    ) -> Option<StorageFuture<FeedRead>> {
        Some(self.spawned(feed_with_chunks(self.pool.clone(), after, most)))
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
        let mut writer = self.settled();
        let committed = self.commit_open(&mut writer);
        lost_or_ok(std::mem::take(&mut writer.lost))?;
        committed
    }

    fn flush_async(&self) -> Option<StorageFuture<()>> {
        self.inner.flush_async()
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

/// The follower's read ([`Documents::committed_feed_chunks`]): one statement (one
/// snapshot) on any pooled connection, apart from this relay's open transaction. The
/// chunks are joined only over a short window (a live commit or a few).
async fn feed_with_chunks(pool: Pool, after: u64, most: u64) -> Result<FeedRead, Error> {
    let (after, most) = (seq_bound(after), seq_bound(most));
    let c = pool.get().await?;
    let st = c
        .prepare_cached(
            "SELECT h.seq, f.seq, f.doc, c.chunk, f.heads FROM redline_feed_head h \
             LEFT JOIN redline_feed f ON f.seq > $1 AND f.seq <= h.seq \
             LEFT JOIN redline_chunks c ON c.doc = f.doc AND c.seq = f.seq \
               AND h.seq - $1 <= $2 \
             ORDER BY f.seq",
        )
        .await?;
    let rows = c.query(&st, &[&after, &most]).await?;
    let head = rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64);
    let mut entries = Vec::with_capacity(rows.len());
    let mut chunks = Some(Vec::with_capacity(rows.len()));
    for r in &rows {
        if let (Some(seq), Some(doc)) = (r.get::<_, Option<i64>>(1), r.get::<_, Option<&str>>(2)) {
            entries.push((seq as u64, DocId::parse(doc)?));
            let chunk: Option<Vec<u8>> = r.get(3);
            let heads: Option<&[u8]> = r.get(4);
            chunks = match (chunks, chunk, heads) {
                (Some(mut all), Some(chunk), Some(heads)) => {
                    all.push((chunk, unflat(heads)));
                    Some(all)
                }
                _ => None,
            };
        }
    }
    Ok(FeedRead {
        head,
        entries,
        chunks,
    })
}

/// One append inside the writer's transaction on `c` (opened here when `fresh`): the
/// feed's new head and the document's sequence, or a conflict (another relay committed
/// to `doc` since `expected`) with the head as it is.
async fn append_in(
    c: &Object,
    fresh: bool,
    locked: Option<i64>,
    doc: &str,
    expected: i64,
    chunk: &[u8],
    heads: &[u8],
) -> Result<(i64, Result<u64, Error>), Error> {
    // One round trip: the transaction opens, the head row is locked and the
    // document's last sequence read, pipelined on the connection. The backend
    // runs them in the order sent, so the last sequence is read once the lock
    // is held (after any other relay's commit): the statements are prepared
    // first, and each query is sent when first polled, in this order.
    let (lock, last) = tokio::try_join!(
        c.prepare_cached("SELECT seq FROM redline_feed_head FOR UPDATE"),
        c.prepare_cached("SELECT last_seq FROM redline_docs WHERE doc = $1"),
    )?;
    let begin = async {
        if fresh {
            c.batch_execute("BEGIN").await?;
        }
        Ok::<_, Error>(())
    };
    // The head row, locked until this transaction commits: another relay's
    // append waits here, so sequences are taken in commit order.
    let head = async {
        match locked {
            Some(h) => Ok(h),
            None => Ok::<_, Error>(c.query_one(&lock, &[]).await?.get::<_, i64>(0)),
        }
    };
    let last = async { Ok::<_, Error>(c.query_opt(&last, &[&doc]).await?.map_or(0, |r| r.get(0))) };
    let ((), head, last) = tokio::try_join!(begin, head, last)?;
    if last != expected {
        return Ok((head, Err(Error::Conflict(doc.to_string()))));
    }
    let seq = head + 1;
    let raise = c
        .prepare_cached("UPDATE redline_feed_head SET seq = $1")
        .await?;
    let by_seq: [&Param; 1] = [&seq];
    let (raised, written) = tokio::join!(
        c.execute(&raise, &by_seq),
        write_commit(c, doc, seq, chunk, heads)
    );
    raised?;
    written?;
    Ok((seq, Ok(seq as u64)))
}
