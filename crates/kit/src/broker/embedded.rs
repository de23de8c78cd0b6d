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

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sqlx::Row;
use tokio::sync::{oneshot, Notify};

use super::{Acker, BatchFailure, Broker, BrokerError, Delivery, Message, Outgoing, SubscribeOptions, Subscription};
use crate::store::{now_millis, params, rows_of_params, Migration, Store};

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
];

/// How long published messages are kept once every group has acked them; also the
/// de-duplication window.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often a waiting fetch looks for messages without being woken (a lost wake-up, a
/// redelivery falling due, or a platform without Unix sockets).
#[cfg(unix)]
const POLL: Duration = Duration::from_millis(100);
#[cfg(not(unix))]
const POLL: Duration = Duration::from_millis(10);
/// How often a publishing process prunes the log.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Messages per insert statement: 4 parameters each stays far below SQLite's limit (32 766).
const PUBLISH_CHUNK: usize = 256;
/// Acks settled by one statement at most (2 parameters each).
const ACK_CHUNK: usize = 256;

/// The SQLite-file broker.
#[derive(Clone)]
pub struct EmbeddedBroker {
    store: Store,
    published: Arc<Notify>,
    /// When this process last pruned (ms since the epoch); publishing prunes now and then.
    last_prune: Arc<AtomicI64>,
    /// Acks waiting to be written together.
    acks: Arc<Acks>,
    /// Wakes other processes' subscribers after a publish.
    #[cfg(unix)]
    wake: Option<Arc<super::wake::Wake>>,
}

impl EmbeddedBroker {
    /// Opens (creating when needed) the log at a `sqlite://PATH` URL.
    pub async fn open(url: &str) -> Result<EmbeddedBroker, BrokerError> {
        let store = Store::open(url).await?;
        store.migrate(MIGRATIONS).await?;
        let published = Arc::new(Notify::new());
        #[cfg(unix)]
        let wake = url
            .parse::<crate::store::StoreUrl>()
            .ok()
            .and_then(|u| u.sqlite_path().map(std::path::PathBuf::from))
            .and_then(|path| super::wake::Wake::bind(&path, published.clone()));
        Ok(EmbeddedBroker {
            store: store.clone(),
            published,
            last_prune: Arc::new(AtomicI64::new(0)),
            acks: Arc::new(Acks {
                store: store.clone(),
                queue: Mutex::new(Vec::new()),
                writing: tokio::sync::Mutex::new(()),
            }),
            #[cfg(unix)]
            wake,
        })
    }

    /// Deletes acked messages older than the retention period (dead-letter topics are kept
    /// until replayed). Returns how many went. Publishing calls it every [`PRUNE_EVERY`].
    pub async fn prune(&self) -> Result<u64, BrokerError> {
        let cutoff = now_millis() - RETENTION.as_millis() as i64;
        let done = sqlx::query(
            "DELETE FROM bus_messages WHERE published_at < $1 AND topic NOT LIKE '%.dlq'
             AND NOT EXISTS (SELECT 1 FROM bus_deliveries d WHERE d.seq = bus_messages.seq)",
        )
        .bind(cutoff)
        .execute(self.store.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Appends `messages` in one transaction: one commit for the whole batch, two statements
    /// per [`PUBLISH_CHUNK`] messages (the rows, then every group's delivery of them).
    async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Result<(), BrokerError> {
        let now = now_millis();
        let mut tx = self.store.begin().await?;
        for chunk in messages.chunks(PUBLISH_CHUNK) {
            let values = rows_of_params(chunk.len(), 4, 1);
            let sql = format!(
                "INSERT INTO bus_messages (topic, msg_id, body, published_at) VALUES {values}
                 ON CONFLICT (topic, msg_id) DO NOTHING RETURNING seq"
            );
            let mut insert = sqlx::query(&sql);
            for m in chunk {
                insert = insert.bind(m.topic).bind(m.msg_id).bind(m.body.to_vec()).bind(now);
            }
            // Duplicates return no row: only new messages get deliveries.
            let seqs = insert
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>("seq"))
                .collect::<Result<Vec<_>, _>>()?;
            if seqs.is_empty() {
                continue;
            }
            let sql = format!(
                "INSERT INTO bus_deliveries (grp, topic, seq, visible_at)
                 SELECT g.grp, g.topic, m.seq, $1 FROM bus_messages m JOIN bus_groups g ON g.topic = m.topic
                 WHERE m.seq IN ({})",
                params(seqs.len(), 2)
            );
            let mut deliver = sqlx::query(&sql).bind(now);
            for seq in seqs {
                deliver = deliver.bind(seq);
            }
            deliver.execute(&mut *tx).await?;
        }
        tx.commit().await?;
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
            let mut tx = self.store.begin().await?;
            let joined = sqlx::query("INSERT INTO bus_groups (topic, grp) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(topic)
                .bind(group)
                .execute(&mut *tx)
                .await?;
            if joined.rows_affected() == 1 {
                sqlx::query(
                    "INSERT INTO bus_deliveries (grp, topic, seq, visible_at)
                     SELECT $2, topic, seq, $3 FROM bus_messages WHERE topic = $1",
                )
                .bind(topic)
                .bind(group)
                .bind(now_millis())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(Box::new(EmbeddedSubscription {
                broker: self.clone(),
                topic: topic.to_string(),
                group: group.to_string(),
                options,
            }) as Box<dyn Subscription>)
        })
    }

    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT seq, msg_id, body FROM bus_messages WHERE topic = $1 ORDER BY seq LIMIT $2")
                .bind(topic)
                .bind(limit as i64)
                .fetch_all(self.store.pool())
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(Message {
                        topic: topic.to_string(),
                        seq: r.try_get::<i64, _>("seq")? as u64,
                        msg_id: r.try_get("msg_id")?,
                        body: Bytes::from(r.try_get::<Vec<u8>, _>("body")?),
                    })
                })
                .collect()
        })
    }

    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut tx = self.store.begin().await?;
            sqlx::query("DELETE FROM bus_deliveries WHERE topic = $1 AND seq = $2")
                .bind(topic)
                .bind(seq as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM bus_messages WHERE topic = $1 AND seq = $2")
                .bind(topic)
                .bind(seq as i64)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM bus_deliveries WHERE grp = $1 AND topic = $2")
                .bind(group)
                .bind(topic)
                .fetch_one(self.store.pool())
                .await?;
            Ok(row.try_get::<i64, _>("n")? as u64)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { Ok(self.store.ping().await?) })
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

struct EmbeddedSubscription {
    broker: EmbeddedBroker,
    topic: String,
    group: String,
    options: SubscribeOptions,
}

impl EmbeddedSubscription {
    /// Leases up to `max` visible deliveries; empty when none is ready.
    async fn lease(&self, max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let now = now_millis();
        let pool = self.broker.store.pool();
        // A plain read first, so idle polling never takes the file's write lock.
        let ready =
            sqlx::query("SELECT 1 AS r FROM bus_deliveries WHERE grp = $1 AND topic = $2 AND visible_at <= $3 LIMIT 1")
                .bind(&self.group)
                .bind(&self.topic)
                .bind(now)
                .fetch_optional(pool)
                .await?;
        if ready.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.broker.store.begin().await?;
        let leased = sqlx::query(
            "UPDATE bus_deliveries SET attempts = attempts + 1, visible_at = $4
             WHERE id IN (SELECT id FROM bus_deliveries WHERE grp = $1 AND topic = $2 AND visible_at <= $3
                          ORDER BY seq LIMIT $5)
             RETURNING id, seq, attempts, last_error",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(now)
        .bind(now + self.options.ack_wait.as_millis() as i64)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await?;
        if leased.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut leases = Vec::with_capacity(leased.len());
        for row in &leased {
            let (id, seq, attempts): (i64, i64, i64) =
                (row.try_get("id")?, row.try_get("seq")?, row.try_get("attempts")?);
            leases.push((id, seq, attempts, row.try_get::<Option<String>, _>("last_error")?));
        }
        // Every leased message in one read, in log order.
        leases.sort_unstable_by_key(|(_, seq, _, _)| *seq);
        let sql = format!(
            "SELECT seq, msg_id, body FROM bus_messages WHERE seq IN ({}) ORDER BY seq",
            params(leases.len(), 1)
        );
        let mut read = sqlx::query(&sql);
        for (_, seq, _, _) in &leases {
            read = read.bind(*seq);
        }
        let mut messages = read.fetch_all(&mut *tx).await?.into_iter().peekable();
        let mut out = Vec::with_capacity(leases.len());
        for (id, seq, attempts, last_error) in leases {
            let msg = match messages.peek().map(|m| m.try_get::<i64, _>("seq")).transpose()? {
                Some(found) if found == seq => messages.next(),
                _ => None,
            };
            let Some(msg) = msg else {
                // The message was deleted under a stale delivery row: drop the row.
                sqlx::query("DELETE FROM bus_deliveries WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                continue;
            };
            out.push(Delivery::new(
                Message {
                    topic: self.topic.clone(),
                    seq: seq as u64,
                    msg_id: msg.try_get("msg_id")?,
                    body: Bytes::from(msg.try_get::<Vec<u8>, _>("body")?),
                },
                attempts as u32,
                last_error,
                Box::new(EmbeddedAcker {
                    store: self.broker.store.clone(),
                    acks: self.broker.acks.clone(),
                    id,
                    attempts,
                }),
            ));
        }
        tx.commit().await?;
        Ok(out)
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

/// Acks of one broker that are written together: while one statement runs, the acks that
/// arrive queue up and the next statement settles all of them. A consumer acking a batch at
/// once pays one write, not one per message.
struct Acks {
    store: Store,
    /// Acks not yet written.
    queue: Mutex<Vec<QueuedAck>>,
    /// Held by the one task writing; the others wait their turn.
    writing: tokio::sync::Mutex<()>,
}

/// `(delivery id, attempts, who waits for the write)`.
type QueuedAck = (i64, i64, oneshot::Sender<Result<(), String>>);

impl Acks {
    /// Settles delivery `id` of lease `attempts`, together with whatever else is queued.
    async fn ack(&self, id: i64, attempts: i64) -> Result<(), BrokerError> {
        let (done, settled) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, attempts, done));
        {
            let _writer = self.writing.lock().await;
            // Let the other acks of the caller's batch join the queue before it is taken.
            tokio::task::yield_now().await;
            let mut queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
            while !queued.is_empty() {
                let chunk: Vec<_> = queued.drain(..queued.len().min(ACK_CHUNK)).collect();
                let leases: Vec<(i64, i64)> = chunk.iter().map(|(id, attempts, _)| (*id, *attempts)).collect();
                let result = self.delete(&leases).await.map_err(|e| e.to_string());
                for (_, _, waiter) in chunk {
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

    /// One statement for `leases`; a lease that expired and was re-leased (other `attempts`)
    /// is left alone.
    async fn delete(&self, leases: &[(i64, i64)]) -> Result<(), sqlx::Error> {
        let sql = format!(
            "DELETE FROM bus_deliveries WHERE (id, attempts) IN (VALUES {})",
            rows_of_params(leases.len(), 2, 1)
        );
        let mut query = sqlx::query(&sql);
        for (id, attempts) in leases {
            query = query.bind(*id).bind(*attempts);
        }
        query.execute(self.store.pool()).await?;
        Ok(())
    }
}

struct EmbeddedAcker {
    store: Store,
    acks: Arc<Acks>,
    id: i64,
    /// The attempt this lease belongs to; a late ack of an expired lease that another
    /// consumer re-leased must not settle the newer delivery.
    attempts: i64,
}

impl Acker for EmbeddedAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move { self.acks.ack(self.id, self.attempts).await })
    }

    fn nack(self: Box<Self>, delay: Duration, error: String) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            sqlx::query("UPDATE bus_deliveries SET visible_at = $1, last_error = $2 WHERE id = $3 AND attempts = $4")
                .bind(now_millis() + delay.as_millis() as i64)
                .bind(error)
                .bind(self.id)
                .bind(self.attempts)
                .execute(self.store.pool())
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

    async fn age_everything(broker: &EmbeddedBroker) {
        sqlx::query("UPDATE bus_messages SET published_at = $1")
            .bind(now_millis() - RETENTION.as_millis() as i64 - 1)
            .execute(broker.store.pool())
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
        let batch: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        let outgoing: Vec<Outgoing<'_>> = batch
            .iter()
            .map(|id| Outgoing {
                topic: "t",
                msg_id: id,
                body: Bytes::from_static(b"x"),
            })
            .collect();
        broker.publish_batch(&outgoing).await.expect("publish");
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
