//! The relay's other records on PostgreSQL: staged uploads, actor bindings (unique by
//! constraint), device health and quarantined pushes.

use super::*;

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
