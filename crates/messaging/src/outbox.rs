//! The transactional outbox: an event is written in the same transaction as the state
//! change that caused it, and a relay moves committed rows to the broker.
//!
//! The relay publishes in row order (so events of one aggregate leave in the order they were
//! written), marks rows sent, and deletes sent rows a minute later ([`SENT_KEPT`]): only
//! unsent rows matter for delivery, and an outbox that kept every event would grow with the
//! traffic. A crash between
//! publish and mark republishes the row on restart; the broker drops the duplicate by
//! `eventId` within its de-duplication window (2 min, embedded and on JetStream), and past
//! it the consumers' inboxes do (kept for [`RETENTION`]). With several instances on one
//! PostgreSQL store, one relay holds a lease.

use crate::store;
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    broker::{Outgoing, SharedBroker},
    envelope::Envelope,
    resilience::Backoff,
    shutdown::Shutdown,
    store::{now_millis, params, Migration, Store, StoreError, Tx},
};

/// Tables the outbox, inbox and relay lease need; include them in every service's migrations.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_inbox",
        sql: "CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            topic TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            sent_at BIGINT
        );
        CREATE INDEX outbox_unsent ON outbox (sent_at, id);
        CREATE TABLE inbox (grp TEXT NOT NULL, event_id TEXT NOT NULL, handled_at BIGINT NOT NULL, PRIMARY KEY (grp, event_id));
        CREATE INDEX inbox_age ON inbox (handled_at);
        CREATE TABLE relay_lease (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at BIGINT NOT NULL);",
    },
    // On PostgreSQL a row marked sent leaves its old index entry behind until a vacuum, and
    // the relay's bitmap scan of `outbox_unsent` visited every one of them (a minute of
    // traffic, 1-2 ms a round). An index of the unsent rows alone, in id order, is read by a
    // plain index scan that marks the dead entries it passes, so the next round skips them;
    // pruning reads the sent rows by their own index, so a row costs no more index writes.
    Migration {
        version: 3,
        name: "outbox_pending",
        sql: "DROP INDEX outbox_unsent;
        CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
        CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;",
    },
];

/// How long inbox records are kept: longer than any republish can come (a relay that
/// published a row and crashed before marking it sends it again when it restarts).
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a sent outbox row is kept, for an operator to look at recent traffic; delivery
/// never reads it again.
pub const SENT_KEPT: Duration = Duration::from_secs(60);

/// How often the relay prunes sent rows and old inbox records.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Rows one pruning statement deletes at most.
const PRUNE_CHUNK: i64 = 2_000;

/// A service's outbox: adds events inside transactions and wakes the relay on commit.
#[derive(Debug, Clone)]
pub struct Outbox {
    store: Store,
    wake: Arc<Notify>,
}

impl Outbox {
    /// The outbox of `store`.
    pub fn new(store: Store) -> Outbox {
        Outbox {
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    /// The store the outbox lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records `event` for `topic` inside the caller's transaction (same as [`add`]).
    pub async fn add(&self, tx: &mut Tx, topic: &str, event: &Envelope) -> Result<(), StoreError> {
        add(tx, topic, event).await
    }

    /// Commits `tx` and wakes the relay, so events leave at once rather than at the next poll.
    pub async fn commit(&self, tx: Tx) -> Result<(), StoreError> {
        tx.commit().await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Unsent rows and the age in milliseconds of the oldest: the outbox lag.
    pub async fn lag(&self) -> Result<(u64, u64), StoreError> {
        let row = store::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE sent_at IS NULL")
            .fetch_one(&self.store)
            .await?;
        let n: i64 = row.try_get("n")?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok((n as u64, oldest.map_or(0, |t| (now_millis() - t).max(0) as u64)))
    }

    /// Spawns the relay that moves committed rows to `broker` until `shutdown` fires.
    pub fn spawn_relay(&self, broker: SharedBroker, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let relay = OutboxRelay {
            outbox: self.clone(),
            broker,
            owner: Uuid::now_v7().to_string(),
            renew_at: std::sync::atomic::AtomicI64::new(0),
        };
        tokio::spawn(relay.run(shutdown))
    }
}

/// Records `event` for `topic` inside the caller's transaction. Consumer handlers use this
/// form; the runner commits through the outbox, which wakes the relay.
pub async fn add(tx: &mut Tx, topic: &str, event: &Envelope) -> Result<(), StoreError> {
    let body = String::from_utf8(event.to_vec()).unwrap_or_default();
    store::query("INSERT INTO outbox (event_id, topic, body, created_at) VALUES ($1, $2, $3, $4)")
        .bind(event.event_id.to_string())
        .bind(topic)
        .bind(body)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Moves committed outbox rows to the broker.
struct OutboxRelay {
    outbox: Outbox,
    broker: SharedBroker,
    owner: String,
    /// Until when (ms) the lease we hold needs no renewal.
    renew_at: std::sync::atomic::AtomicI64,
}

/// Rows published per round.
const BATCH: i64 = 256;
/// The next rows to publish, oldest first.
const NEXT_BATCH: &str = "SELECT id, event_id, topic, body FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1";
/// The least time between the starts of two rounds while commits keep coming (a round that
/// finds the outbox empty or a full batch waits for nothing): at most this much latency added
/// to an event, for batches instead of a broker transaction per commit.
pub const COALESCE: Duration = Duration::from_millis(1);
/// Fallback poll when no in-process commit wakes the relay.
const POLL: Duration = Duration::from_millis(200);
/// Wait after a failed round (broker down): 100 ms doubling, capped at 5 s.
const RELAY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// How long a relay's lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(10);

impl OutboxRelay {
    async fn run(self, mut shutdown: Shutdown) {
        let mut last_prune = 0i64;
        let mut last_lag = 0i64;
        let mut failures = 0u32;
        loop {
            // Once a second is enough for a gauge, and keeps a query off every event's path.
            if now_millis() - last_lag >= 1_000 {
                last_lag = now_millis();
                if let Ok((count, age)) = self.outbox.lag().await {
                    metrics::gauge!("bazaar_outbox_unsent").set(count as f64);
                    metrics::gauge!("bazaar_outbox_oldest_unsent_seconds").set(age as f64 / 1000.0);
                }
            }
            if now_millis() - last_prune > PRUNE_EVERY.as_millis() as i64 {
                last_prune = now_millis();
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %e, "outbox prune failed");
                }
            }
            let began = tokio::time::Instant::now();
            match self.round().await {
                // A backlog: the next batch is ready now.
                Ok(moved) if moved == BATCH as usize => {
                    failures = 0;
                    continue;
                }
                // A stream of commits: the next ones gather until `COALESCE` after this round
                // began and leave together, rather than each paying a broker transaction.
                Ok(moved) if moved > 0 => {
                    failures = 0;
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep_until(began + COALESCE) => continue,
                    }
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "outbox relay round failed; will retry");
                }
            }
            let nap = if failures > 0 {
                RELAY_BACKOFF.delay(failures)
            } else {
                POLL
            };
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = self.outbox.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Holds (or takes over an expired) relay lease; only the holder publishes. The lease is
    /// renewed in the store only when half of it has passed, not on every round.
    async fn lease(&self) -> Result<bool, StoreError> {
        let now = now_millis();
        if now < self.renew_at.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(true);
        }
        let got = store::query(
            "INSERT INTO relay_lease (name, owner, expires_at) VALUES ('outbox', $1, $2)
             ON CONFLICT (name) DO UPDATE SET owner = $1, expires_at = $2
             WHERE relay_lease.owner = $1 OR relay_lease.expires_at < $3",
        )
        .bind(&self.owner)
        .bind(now + LEASE.as_millis() as i64)
        .bind(now)
        .execute(&self.outbox.store)
        .await?;
        let held = got.rows_affected() == 1;
        let renew_at = if held { now + LEASE.as_millis() as i64 / 2 } else { 0 };
        self.renew_at.store(renew_at, std::sync::atomic::Ordering::Relaxed);
        Ok(held)
    }

    /// Publishes one batch; returns how many rows were moved.
    async fn round(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        if !self.lease().await? {
            return Ok(0);
        }
        let rows = store::query(NEXT_BATCH)
            .bind(BATCH)
            .fetch_all(&self.outbox.store)
            .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut fields = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            fields.push((
                row.try_get::<String, _>("event_id")?,
                row.try_get::<String, _>("topic")?,
                row.try_get::<String, _>("body")?,
            ));
        }
        let batch: Vec<Outgoing<'_>> = fields
            .iter()
            .map(|(event_id, topic, body)| Outgoing {
                topic,
                msg_id: event_id,
                body: Bytes::copy_from_slice(body.as_bytes()),
            })
            .collect();
        // One round trip (NATS) or one transaction (embedded) for the whole batch. On a
        // failure only the durable prefix is marked: the rest go again next round, in order,
        // and their ids make the broker store any that did arrive only once.
        let published = match self.broker.publish_batch(&batch).await {
            Ok(()) => ids.len(),
            Err(failure) => {
                self.mark_sent(&ids[..failure.published]).await?;
                return Err(failure.error.into());
            }
        };
        self.mark_sent(&ids[..published]).await?;
        metrics::counter!("bazaar_outbox_published_total").increment(published as u64);
        Ok(published)
    }

    /// Marks exactly the published rows, in one statement. (Not an id range: on PostgreSQL a
    /// lower id can commit after a higher one, and a range would mark it unpublished.)
    async fn mark_sent(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!("UPDATE outbox SET sent_at = $1 WHERE id IN ({})", params(ids.len(), 2));
        let mut query = store::query(&sql).bind(now_millis());
        for id in ids {
            query = query.bind(*id);
        }
        query.execute(&self.outbox.store).await?;
        Ok(())
    }

    /// Deletes sent rows past [`SENT_KEPT`] and inbox records past [`RETENTION`], a bounded
    /// chunk per statement so the store's writer is never held for long.
    async fn prune(&self) -> Result<(), StoreError> {
        let sent = now_millis() - SENT_KEPT.as_millis() as i64;
        let handled = now_millis() - RETENTION.as_millis() as i64;
        for (sql, cutoff) in [
            (
                "DELETE FROM outbox WHERE id IN
                 (SELECT id FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1 LIMIT $2)",
                sent,
            ),
            (
                "DELETE FROM inbox WHERE (grp, event_id) IN
                 (SELECT grp, event_id FROM inbox WHERE handled_at < $1 LIMIT $2)",
                handled,
            ),
        ] {
            loop {
                let done = store::query(sql)
                    .bind(cutoff)
                    .bind(PRUNE_CHUNK)
                    .execute(&self.outbox.store)
                    .await?;
                if done.rows_affected() < PRUNE_CHUNK as u64 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn count(store: &Store, sql: &str) -> i64 {
        store::query(sql).fetch_scalar(store).await.expect("count")
    }

    #[tokio::test]
    async fn pruning_drops_sent_rows_after_a_minute_and_inbox_records_after_retention_but_never_an_unsent_row() {
        let db = bazaar_store::testing::TestDb::sqlite("prune.db");
        let store = db.open().await;
        store.migrate(MIGRATIONS).await.expect("migrate");
        let now = now_millis();
        let old_sent = now - SENT_KEPT.as_millis() as i64 - 1_000;
        let old_handled = now - RETENTION.as_millis() as i64 - 1_000;
        let mut tx = store.begin().await.expect("begin");
        // More old rows than one pruning statement takes, so pruning has to go round.
        for i in 0..(PRUNE_CHUNK + 500) {
            let (created, sent) = match i {
                0 => (old_sent, None), // never sent: stays however old
                1 => (now, Some(now)), // sent just now: kept for a while
                _ => (old_sent, Some(old_sent)),
            };
            store::query(
                "INSERT INTO outbox (event_id, topic, body, created_at, sent_at) VALUES ($1, 't', '{}', $2, $3)",
            )
            .bind(format!("e{i}"))
            .bind(created)
            .bind(sent)
            .execute(&mut tx)
            .await
            .expect("outbox row");
            store::query("INSERT INTO inbox (grp, event_id, handled_at) VALUES ('g', $1, $2)")
                .bind(format!("e{i}"))
                .bind(if i == 0 { now } else { old_handled })
                .execute(&mut tx)
                .await
                .expect("inbox row");
        }
        tx.commit().await.expect("commit");
        let bus = tempfile::tempdir().expect("temp dir");
        let relay = OutboxRelay {
            outbox: Outbox::new(store.clone()),
            broker: crate::broker::connect(&format!("sqlite://{}/bus.db", bus.path().display()))
                .await
                .expect("broker"),
            owner: "test".into(),
            renew_at: std::sync::atomic::AtomicI64::new(0),
        };
        relay.prune().await.expect("prune");
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await,
            1,
            "the unsent row stays"
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM outbox").await,
            2,
            "and the one sent just now"
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM inbox").await,
            1,
            "only the recent inbox record stays"
        );
    }

    /// On PostgreSQL, with most rows sent, the relay's query is planned on the index of
    /// unsent rows (the one whose dead entries a plain index scan marks as it passes).
    #[tokio::test]
    async fn the_relay_reads_its_next_batch_from_the_index_of_unsent_rows() {
        let Some(db) = bazaar_store::testing::TestDb::postgres("bazaar_outbox").await else {
            return;
        };
        let store = db.open().await;
        let plan = async {
            store.migrate(MIGRATIONS).await?;
            store::query(
                "INSERT INTO outbox (event_id, topic, body, created_at)
                 SELECT 'e' || n, 't', '{}', 0 FROM generate_series(1, 5000) AS n",
            )
            .execute(&store)
            .await?;
            store::query("UPDATE outbox SET sent_at = 1 WHERE id % 100 <> 0")
                .execute(&store)
                .await?;
            store::query("ANALYZE outbox").execute(&store).await?;
            let rows = store::query(&format!("EXPLAIN {}", NEXT_BATCH.replace("$1", "256")))
                .fetch_all(&store)
                .await?;
            rows.iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()
        }
        .await;
        store.close().await;
        db.drop_database().await;
        let plan = plan.expect("explain the relay's query").join("\n");
        assert!(plan.contains("outbox_pending"), "{plan}");
    }
}
