//! The embedded broker: a durable log in one SQLite file that several processes on one
//! machine open at once.
//!
//! `bus_messages` holds every published message once (unique per topic and message id, which
//! is the de-duplication). Each consumer group has a row per message still to handle in
//! `bus_deliveries`; fetching leases rows (bumps `attempts`, hides them until the ack wait
//! ends), ack deletes the row, nack makes it visible again later. A group joins from the
//! topic's first retained message. Publishers wake waiting subscribers at once: in the same
//! process directly, in other processes through a Unix datagram (see `wake`); a slow poll of
//! a cheap read remains as the fallback.
//!
//! The file is used through [`crate::sqlite::Sqlite`]: every operation is one transaction
//! run inline with prepared statements, a batch (publish, lease, acks) in one.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use rusqlite::{params, OptionalExtension};
use tokio::sync::{oneshot, Notify};

use super::{Acker, BatchFailure, Broker, BrokerError, Delivery, Message, Outgoing, SubscribeOptions, Subscription};
use crate::{
    sqlite::Sqlite,
    store::{now_millis, Migration, StoreUrl},
};

const MIGRATIONS: &[Migration] = &[
    Migration::new(
        1,
        "bus",
        "CREATE TABLE bus_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        body BLOB NOT NULL,
        published_at BIGINT NOT NULL,
        UNIQUE (topic, msg_id)
    );
    CREATE TABLE bus_groups (topic TEXT NOT NULL, grp TEXT NOT NULL, PRIMARY KEY (topic, grp));
    CREATE TABLE bus_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        topic TEXT NOT NULL,
        seq BIGINT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        visible_at BIGINT NOT NULL,
        last_error TEXT,
        UNIQUE (grp, topic, seq)
    );
    CREATE INDEX bus_deliveries_ready ON bus_deliveries (grp, topic, visible_at);",
    ),
    // Pruning looks messages up by age and deliveries by sequence.
    Migration::new(
        2,
        "bus_prune_indexes",
        "CREATE INDEX bus_messages_age ON bus_messages (published_at);
         CREATE INDEX bus_deliveries_seq ON bus_deliveries (seq);",
    ),
    // Leases walk `(grp, topic, seq)`; an index on `visible_at` only cost every publish,
    // lease and ack one more B-tree page to write.
    Migration::new(3, "bus_drop_ready_index", "DROP INDEX IF EXISTS bus_deliveries_ready;"),
    // Deliveries keyed by `(grp, topic, seq)` in one B-tree: the rowid table, its unique index
    // and the `seq` index were three pages to write for each publish, lease and ack. Pruning
    // finds a message's deliveries through its topic's groups instead of a `seq` index.
    Migration::new(
        4,
        "bus_deliveries_keyed",
        "CREATE TABLE bus_deliveries_keyed (
            grp TEXT NOT NULL,
            topic TEXT NOT NULL,
            seq BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            visible_at BIGINT NOT NULL,
            last_error TEXT,
            PRIMARY KEY (grp, topic, seq)
        ) WITHOUT ROWID;
        INSERT INTO bus_deliveries_keyed (grp, topic, seq, attempts, visible_at, last_error)
            SELECT grp, topic, seq, attempts, visible_at, last_error FROM bus_deliveries;
        DROP TABLE bus_deliveries;
        ALTER TABLE bus_deliveries_keyed RENAME TO bus_deliveries;",
    ),
];

/// How long published messages are kept once every group has acked them: the window in
/// which publishing a message id again is dropped, as NATS's `duplicate_window` (the same
/// [`super::nats::DEDUP_WINDOW`]). A relay that publishes a row again later (it crashed
/// before marking the row sent and stayed down) is caught by the consumers' inbox, which
/// keeps what it handled for days; the log itself stays as large as two minutes of traffic.
const RETENTION: Duration = super::nats::DEDUP_WINDOW;
/// How often a waiting fetch looks for messages without being woken (a lost wake-up, a
/// redelivery falling due, or a platform without Unix sockets).
#[cfg(unix)]
const POLL: Duration = Duration::from_millis(100);
#[cfg(not(unix))]
const POLL: Duration = Duration::from_millis(10);
/// How often a publishing process prunes the log.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Most messages one pruning transaction deletes, so publishers wait for no long one.
const PRUNE_CHUNK: i64 = 2_000;

/// Deletes up to `?2` messages published before `?1` that no group still has to handle
/// (looked up by primary key, once per group of the message's topic); dead letters stay.
const PRUNE: &str = "DELETE FROM bus_messages WHERE seq IN (SELECT m.seq FROM bus_messages m
     WHERE m.published_at < ?1 AND m.topic NOT LIKE '%.dlq'
     AND NOT EXISTS (SELECT 1 FROM bus_groups g JOIN bus_deliveries d
                     ON d.grp = g.grp AND d.topic = g.topic AND d.seq = m.seq WHERE g.topic = m.topic)
     LIMIT ?2)";

/// The SQLite-file broker.
#[derive(Clone)]
pub struct EmbeddedBroker {
    db: Sqlite,
    published: Arc<Notify>,
    /// When this process last pruned (ms since the epoch); publishing prunes now and then.
    last_prune: Arc<AtomicI64>,
    /// Acks waiting to be written together.
    acks: Arc<Acks>,
    /// Wakes other processes' subscribers after a publish.
    #[cfg(unix)]
    wake: Option<Arc<super::wake::Wake>>,
}

/// Refuses the log at `path` when another version of bazaar wrote it (it records a migration
/// this one does not have); a missing file passes.
pub async fn check_log(path: &std::path::Path) -> Result<(), BrokerError> {
    if !path.exists() {
        return Ok(());
    }
    Sqlite::open(path).await?.check_migrations(MIGRATIONS).await?;
    Ok(())
}

impl EmbeddedBroker {
    /// Opens (creating when needed) the log at a `sqlite://PATH` URL.
    pub async fn open(url: &str) -> Result<EmbeddedBroker, BrokerError> {
        let parsed: StoreUrl = url.parse()?;
        let path = std::path::PathBuf::from(
            parsed
                .sqlite_path()
                .ok_or_else(|| BrokerError::UnsupportedUrl(url.to_string()))?,
        );
        let db = Sqlite::open(&path).await?;
        db.migrate(MIGRATIONS).await?;
        let published = Arc::new(Notify::new());
        #[cfg(unix)]
        let wake = super::wake::Wake::bind(&path, published.clone());
        Ok(EmbeddedBroker {
            acks: Arc::new(Acks {
                db: db.clone(),
                queue: Mutex::new(Vec::new()),
                writing: tokio::sync::Mutex::new(()),
            }),
            db,
            published,
            last_prune: Arc::new(AtomicI64::new(0)),
            #[cfg(unix)]
            wake,
        })
    }

    /// Deletes acked messages older than the retention period (dead-letter topics are kept
    /// until replayed). Returns how many went. Publishing calls it every [`PRUNE_EVERY`].
    pub async fn prune(&self) -> Result<u64, BrokerError> {
        let cutoff = now_millis() - RETENTION.as_millis() as i64;
        let mut pruned = 0;
        loop {
            let deleted = self.db.write(|tx| tx.execute(PRUNE, [cutoff, PRUNE_CHUNK])).await?;
            pruned += deleted as u64;
            if (deleted as i64) < PRUNE_CHUNK {
                return Ok(pruned);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Appends `messages` in one transaction: one commit for the whole batch.
    async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), BrokerError> {
        let now = now_millis();
        self.db
            .write(|tx| {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO bus_messages (topic, msg_id, body, published_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (topic, msg_id) DO NOTHING",
                )?;
                let mut deliver = tx.prepare_cached(
                    "INSERT INTO bus_deliveries (grp, topic, seq, visible_at)
                     SELECT grp, topic, ?2, ?3 FROM bus_groups WHERE topic = ?1",
                )?;
                for m in messages {
                    // A duplicate inserts nothing and gets no deliveries.
                    if insert.execute(params![m.topic, m.msg_id, &m.body[..], now])? == 1 {
                        deliver.execute(params![m.topic, tx.last_insert_rowid(), now])?;
                    }
                }
                Ok(())
            })
            .await?;
        self.published.notify_waiters();
        #[cfg(unix)]
        if let Some(wake) = &self.wake {
            wake.publish();
        }
        self.prune_now_and_then().await;
        Ok(())
    }

    /// Prunes when this process has not for [`PRUNE_EVERY`]; one caller at a time wins.
    async fn prune_now_and_then(&self) {
        let now = now_millis();
        let last = self.last_prune.load(Ordering::Relaxed);
        if now - last < PRUNE_EVERY.as_millis() as i64
            || self
                .last_prune
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = self.prune().await {
            tracing::warn!(error = %e, "pruning the embedded broker's log failed");
        }
    }
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(&'a self, topic: &'a str, msg_id: &'a str, body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.publish_all(&[Outgoing { topic, msg_id, body }]).await })
    }

    fn publish_batch<'a>(&'a self, messages: &'a [Outgoing<'a>]) -> BoxFuture<'a, Result<(), BatchFailure>> {
        // All or nothing: one transaction.
        Box::pin(async move {
            self.publish_all(messages)
                .await
                .map_err(|error| BatchFailure { published: 0, error })
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        Box::pin(async move {
            self.db
                .write(|tx| {
                    let joined = tx.execute(
                        "INSERT INTO bus_groups (topic, grp) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                        params![topic, group],
                    )?;
                    if joined == 1 {
                        tx.execute(
                            "INSERT INTO bus_deliveries (grp, topic, seq, visible_at)
                             SELECT ?2, topic, seq, ?3 FROM bus_messages WHERE topic = ?1",
                            params![topic, group, now_millis()],
                        )?;
                    }
                    Ok(())
                })
                .await?;
            Ok(Box::new(EmbeddedSubscription {
                broker: self.clone(),
                topic: topic.into(),
                group: group.into(),
                options,
            }) as Box<dyn Subscription>)
        })
    }

    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        Box::pin(async move {
            let rows = self
                .db
                .read(|c| {
                    let mut read = c.prepare_cached(
                        "SELECT seq, msg_id, body FROM bus_messages WHERE topic = ?1 ORDER BY seq LIMIT ?2",
                    )?;
                    let rows = read.query_map(params![topic, limit as i64], |r| {
                        Ok(Message {
                            topic: topic.to_string(),
                            seq: r.get::<_, i64>(0)? as u64,
                            msg_id: r.get(1)?,
                            body: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        })
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()
                })
                .await?;
            Ok(rows)
        })
    }

    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.db
                .write(|tx| {
                    tx.execute(
                        "DELETE FROM bus_deliveries WHERE grp IN (SELECT grp FROM bus_groups WHERE topic = ?1)
                         AND topic = ?1 AND seq = ?2",
                        params![topic, seq as i64],
                    )?;
                    tx.execute(
                        "DELETE FROM bus_messages WHERE topic = ?1 AND seq = ?2",
                        params![topic, seq as i64],
                    )
                })
                .await?;
            Ok(())
        })
    }

    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move {
            let n: i64 = self
                .db
                .read(|c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM bus_deliveries WHERE grp = ?1 AND topic = ?2",
                        params![group, topic],
                        |r| r.get(0),
                    )
                })
                .await?;
            Ok(n as u64)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.db.read(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

struct EmbeddedSubscription {
    broker: EmbeddedBroker,
    topic: Arc<str>,
    group: Arc<str>,
    options: SubscribeOptions,
}

/// Leases up to `?5` deliveries of group `?1` on topic `?2` visible at `?3`, in log order,
/// hiding them until `?4`. It walks the `(grp, topic, seq)` key and stops after `?5`;
/// `+visible_at` keeps the planner off any index on `visible_at`, through which (as it once
/// did) every visible delivery of the backlog would be read and sorted on each lease.
const LEASE: &str = "UPDATE bus_deliveries SET attempts = attempts + 1, visible_at = ?4
     WHERE grp = ?1 AND topic = ?2 AND seq IN (SELECT seq FROM bus_deliveries
         WHERE grp = ?1 AND topic = ?2 AND +visible_at <= ?3 ORDER BY seq LIMIT ?5)
     RETURNING seq, attempts, last_error";

/// A delivery as leased: `(attempts, last error, message)`.
type Lease = (i64, Option<String>, Message);

impl EmbeddedSubscription {
    /// Leases up to `max` visible deliveries, in log order; empty when none is ready.
    ///
    /// One piece: one lease; a read-only probe gates the write transaction, which takes the
    /// deliveries, reads their messages and drops orphan rows, and each Delivery's acker is
    /// built from the attempts and seq of the same taken rows.
    async fn lease(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_millis();
        let (group, topic) = (&*self.group, &*self.topic);
        // A plain read first, so idle polling never takes the file's write lock. It passes
        // over the deliveries in flight or waiting out a retry delay, a short list.
        let ready = self
            .broker
            .db
            .read(|c| {
                c.prepare_cached(
                    "SELECT 1 FROM bus_deliveries WHERE grp = ?1 AND topic = ?2 AND visible_at <= ?3 LIMIT 1",
                )?
                .query_row(params![group, topic, now], |_| Ok(()))
                .optional()
            })
            .await?;
        if ready.is_none() {
            return Ok(Vec::new());
        }
        let until = now + self.options.ack_wait.as_millis() as i64;
        let leased: Vec<Lease> = self
            .broker
            .db
            .write(|tx| {
                let mut take = tx.prepare_cached(LEASE)?;
                let mut taken = take
                    .query_map(params![group, topic, now, until, max as i64], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
                    })?
                    .collect::<Result<Vec<(i64, i64, Option<String>)>, _>>()?;
                taken.sort_unstable_by_key(|(seq, _, _)| *seq);
                let mut message = tx.prepare_cached("SELECT msg_id, body FROM bus_messages WHERE seq = ?1")?;
                let mut orphan =
                    tx.prepare_cached("DELETE FROM bus_deliveries WHERE grp = ?1 AND topic = ?2 AND seq = ?3")?;
                let mut out = Vec::with_capacity(taken.len());
                for (seq, attempts, last_error) in taken {
                    let found = message
                        .query_row([seq], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
                        .optional()?;
                    match found {
                        Some((msg_id, body)) => out.push((
                            attempts,
                            last_error,
                            Message {
                                topic: topic.to_string(),
                                seq: seq as u64,
                                msg_id,
                                body: Bytes::from(body),
                            },
                        )),
                        // The message was deleted under a stale delivery row: drop the row.
                        None => {
                            orphan.execute(params![group, topic, seq])?;
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(leased
            .into_iter()
            .map(|(attempts, last_error, message)| {
                let acker = EmbeddedAcker {
                    db: self.broker.db.clone(),
                    acks: self.broker.acks.clone(),
                    key: DeliveryKey {
                        group: self.group.clone(),
                        topic: self.topic.clone(),
                        seq: message.seq as i64,
                        attempts,
                    },
                };
                Delivery::new(message, attempts as u32, last_error, Box::new(acker))
            })
            .collect())
    }
}

impl Subscription for EmbeddedSubscription {
    fn fetch(&mut self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Registered before looking, so a publish between the look and the wait still
                // wakes us (an unpolled `Notified` misses `notify_waiters`).
                let published = self.broker.published.notified();
                tokio::pin!(published);
                published.as_mut().enable();
                let got = self.lease(max.max(1)).await?;
                if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok(got);
                }
                let nap = POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                tokio::select! {
                    _ = published => {}
                    _ = tokio::time::sleep(nap) => {}
                }
            }
        })
    }
}

/// Acks of one broker that are written together: while one transaction runs, the acks that
/// arrive queue up and the next transaction settles all of them. A consumer acking a batch at
/// once pays one write, not one per message.
struct Acks {
    db: Sqlite,
    /// Acks not yet written.
    queue: Mutex<Vec<QueuedAck>>,
    /// Held by the one task writing; the others wait their turn.
    writing: tokio::sync::Mutex<()>,
}

/// One lease of one delivery: the delivery's key and the attempt the lease counted.
struct DeliveryKey {
    group: Arc<str>,
    topic: Arc<str>,
    seq: i64,
    /// A late ack of an expired lease that another consumer re-leased (a higher count) must
    /// not settle the newer delivery.
    attempts: i64,
}

/// A lease to settle and who waits for the write.
type QueuedAck = (DeliveryKey, oneshot::Sender<Result<(), String>>);

impl Acks {
    /// Settles the lease `key`, together with whatever else is queued.
    async fn ack(&self, key: DeliveryKey) -> Result<(), BrokerError> {
        let (done, settled) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((key, done));
        {
            let _writer = self.writing.lock().await;
            // Let the other acks of the caller's batch join the queue before it is taken.
            tokio::task::yield_now().await;
            let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
            if !queued.is_empty() {
                // A lease that expired and was re-leased (other `attempts`) is left alone.
                let result = self
                    .db
                    .write(|tx| {
                        let mut delete = tx.prepare_cached(
                            "DELETE FROM bus_deliveries WHERE grp = ?1 AND topic = ?2 AND seq = ?3 AND attempts = ?4",
                        )?;
                        for (key, _) in &queued {
                            delete.execute(params![&*key.group, &*key.topic, key.seq, key.attempts])?;
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| e.to_string());
                for (_, waiter) in queued {
                    let _ = waiter.send(result.clone());
                }
            }
        }
        // Ours was written by this task or by an earlier writer.
        match settled.await {
            Ok(result) => result.map_err(BrokerError::Unavailable),
            Err(_) => Err(BrokerError::Unavailable("the ack was dropped unwritten".into())),
        }
    }
}

struct EmbeddedAcker {
    db: Sqlite,
    acks: Arc<Acks>,
    key: DeliveryKey,
}

impl Acker for EmbeddedAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move { self.acks.ack(self.key).await })
    }

    fn nack(self: Box<Self>, delay: Duration, error: String) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            let visible_at = now_millis() + delay.as_millis() as i64;
            let key = &self.key;
            self.db
                .read(|c| {
                    c.prepare_cached(
                        "UPDATE bus_deliveries SET visible_at = ?1, last_error = ?2
                         WHERE grp = ?3 AND topic = ?4 AND seq = ?5 AND attempts = ?6",
                    )?
                    .execute(params![
                        visible_at,
                        error,
                        &*key.group,
                        &*key.topic,
                        key.seq,
                        key.attempts
                    ])
                })
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn broker() -> (tempfile::TempDir, EmbeddedBroker) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("bus.db").display());
        let broker = EmbeddedBroker::open(&url).await.expect("open");
        (dir, broker)
    }

    /// Publishes `count` messages `m0`, `m1`, … on topic `t` in one batch.
    async fn publish_numbered(broker: &EmbeddedBroker, count: usize) {
        let ids: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
        let outgoing: Vec<Outgoing<'_>> = ids
            .iter()
            .map(|id| Outgoing {
                topic: "t",
                msg_id: id,
                body: Bytes::from_static(b"x"),
            })
            .collect();
        broker.publish_batch(&outgoing).await.expect("publish");
    }

    async fn age_everything(broker: &EmbeddedBroker) {
        let old = now_millis() - RETENTION.as_millis() as i64 - 1;
        broker
            .db
            .write(|tx| tx.execute("UPDATE bus_messages SET published_at = ?1", [old]))
            .await
            .expect("age");
    }

    #[tokio::test]
    async fn prune_drops_only_old_messages_every_group_acked() {
        let (_dir, broker) = broker().await;
        let mut sub = broker
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .expect("subscribe");
        for id in ["acked", "unacked"] {
            broker
                .publish("t", id, Bytes::from_static(b"x"))
                .await
                .expect("publish");
        }
        broker
            .publish("t.dlq", "dead", Bytes::from_static(b"x"))
            .await
            .expect("publish");
        for d in sub.fetch(2, Duration::ZERO).await.expect("fetch") {
            if d.message.msg_id == "acked" {
                d.ack().await.expect("ack");
            }
        }
        assert_eq!(broker.prune().await.expect("prune"), 0, "nothing is old yet");
        age_everything(&broker).await;
        assert_eq!(broker.prune().await.expect("prune"), 1);
        let left: Vec<_> = broker
            .read("t", 10)
            .await
            .expect("read")
            .into_iter()
            .map(|m| m.msg_id)
            .collect();
        assert_eq!(left, ["unacked"]);
        assert_eq!(
            broker.read("t.dlq", 10).await.expect("read").len(),
            1,
            "dead letters stay"
        );
    }

    #[tokio::test]
    async fn acks_sent_together_settle_every_delivery_but_not_a_newer_lease() {
        let (_dir, broker) = broker().await;
        let options = SubscribeOptions {
            ack_wait: Duration::from_millis(1),
        };
        let mut sub = broker.subscribe("t", "g", options).await.expect("subscribe");
        publish_numbered(&broker, 300).await;
        let mut first = sub.fetch(300, Duration::ZERO).await.expect("fetch");
        assert_eq!(first.len(), 300);
        // The last lease expires and is taken again: its old ack must not settle the new one.
        let stale = first.pop().expect("one");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = sub.fetch(300, Duration::ZERO).await.expect("refetch");
        let others: Vec<_> = again.iter().map(|d| d.message.msg_id.clone()).collect();
        assert!(
            others.contains(&"m299".to_string()),
            "the expired lease is delivered again"
        );
        let acks = first.into_iter().chain([stale]).map(Delivery::ack);
        for acked in futures_util::future::join_all(acks).await {
            acked.expect("ack");
        }
        assert_eq!(
            broker.pending("t", "g").await.expect("pending"),
            others.len() as u64,
            "only the re-leased deliveries are left (their first leases' acks are stale)"
        );
        let newer = again.into_iter().map(Delivery::ack);
        for acked in futures_util::future::join_all(newer).await {
            acked.expect("ack");
        }
        assert_eq!(broker.pending("t", "g").await.expect("pending"), 0);
    }

    /// The steps of SQLite's plan for `sql` run with `args`.
    async fn plan(broker: &EmbeddedBroker, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Vec<String> {
        broker
            .db
            .read(|c| {
                let mut explain = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let rows = explain.query_map(args, |r| r.get::<_, String>(3))?;
                rows.collect()
            })
            .await
            .expect("explain")
    }

    #[tokio::test]
    async fn a_lease_walks_the_log_in_order_instead_of_sorting_the_backlog() {
        let (_dir, broker) = broker().await;
        let plan = plan(&broker, LEASE, params!["g", "t", 0, 0, 16]).await;
        assert!(
            plan.iter().all(|step| !step.contains("TEMP B-TREE")),
            "the lease sorts: {plan:?}"
        );
    }

    #[tokio::test]
    async fn pruning_looks_deliveries_up_by_key_instead_of_scanning_them() {
        let (_dir, broker) = broker().await;
        let plan = plan(&broker, PRUNE, params![0, 1]).await;
        assert!(
            plan.iter()
                .any(|step| step.contains("SEARCH d USING PRIMARY KEY (grp=? AND topic=? AND seq=?)")),
            "pruning does not use the deliveries' key: {plan:?}"
        );
    }

    #[tokio::test]
    async fn deliveries_waiting_before_an_upgrade_are_still_delivered_after_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bus.db");
        let old = Sqlite::open(&path).await.expect("open");
        old.migrate(&MIGRATIONS[..3]).await.expect("the old schema");
        old.write(|tx| {
            tx.execute("INSERT INTO bus_groups (topic, grp) VALUES ('t', 'g')", [])?;
            tx.execute(
                "INSERT INTO bus_messages (topic, msg_id, body, published_at) VALUES ('t', 'waiting', x'78', 0)",
                [],
            )?;
            tx.execute(
                "INSERT INTO bus_deliveries (grp, topic, seq, attempts, visible_at, last_error)
                 VALUES ('g', 't', 1, 2, 0, 'boom')",
                [],
            )
        })
        .await
        .expect("a delivery on the old schema");
        drop(old);
        let broker = EmbeddedBroker::open(&format!("sqlite://{}", path.display()))
            .await
            .expect("upgrade");
        let mut sub = broker
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let got = sub.fetch(10, Duration::ZERO).await.expect("fetch");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.msg_id, "waiting");
        assert_eq!(got[0].attempt, 3, "its earlier attempts still count");
        got.into_iter().next().expect("one").ack().await.expect("ack");
        assert_eq!(broker.pending("t", "g").await.expect("pending"), 0);
    }

    #[tokio::test]
    async fn prune_goes_on_past_one_chunk() {
        let (_dir, broker) = broker().await;
        let count = PRUNE_CHUNK as usize + 500;
        publish_numbered(&broker, count).await;
        age_everything(&broker).await;
        assert_eq!(broker.prune().await.expect("prune"), count as u64);
        assert!(broker.read("t", 10).await.expect("read").is_empty());
    }

    #[tokio::test]
    async fn publishing_prunes_now_and_then() {
        let (_dir, broker) = broker().await;
        broker
            .publish("t", "old", Bytes::from_static(b"x"))
            .await
            .expect("publish");
        age_everything(&broker).await;
        // Due: the last prune is older than PRUNE_EVERY.
        broker.last_prune.store(0, Ordering::Relaxed);
        broker
            .publish("t", "new", Bytes::from_static(b"x"))
            .await
            .expect("publish");
        let left: Vec<_> = broker
            .read("t", 10)
            .await
            .expect("read")
            .into_iter()
            .map(|m| m.msg_id)
            .collect();
        assert_eq!(left, ["new"], "a topic without groups keeps nothing past retention");
    }
}
