//! The message broker: one trait, one contract, two real backends.
//!
//! - [`embedded::EmbeddedBroker`]: a durable log in its own SQLite file, shared by every
//!   process on one machine (the default, `sqlite://data/bus.db`).
//! - [`nats::NatsBroker`]: NATS JetStream, a stream per topic and a durable pull consumer per
//!   consumer group (`nats://127.0.0.1:4222`).
//!
//! The contract both keep (and `tests/broker_contract.rs` checks): a message is durable once
//! `publish` returns; a second publish of the same message id is dropped; every consumer group
//! gets every message; instances of one group compete; a delivery not acked within the ack
//! wait is delivered again; `nack` delays redelivery. Dead-lettering after too many attempts
//! is done for both by the [`crate::consumer`] runner, which moves the message to
//! `<topic>.dlq` (see [`DeadLetter`]).

pub mod embedded;
pub mod nats;
#[cfg(unix)]
mod wake;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Errors any broker backend can report.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The URL names no known backend.
    #[error("unsupported broker URL `{0}`: expected sqlite://PATH or nats://HOST:PORT")]
    UnsupportedUrl(String),
    /// The backend could not be reached or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The embedded log's database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<rusqlite::Error> for BrokerError {
    fn from(e: rusqlite::Error) -> Self {
        BrokerError::Store(crate::store::StoreError::from(e))
    }
}

/// A message as stored on a topic.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published to.
    pub topic: String,
    /// Position in the topic, assigned by the broker.
    pub seq: u64,
    /// Publisher's id, the de-duplication key (the envelope's `eventId`).
    pub msg_id: String,
    /// The bytes as published.
    pub body: Bytes,
}

/// How a consumer group wants its messages delivered.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    /// A delivery not acked within this time is delivered again.
    pub ack_wait: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// Settles one delivery; implemented by each backend.
pub trait Acker: Send + Sync {
    /// Marks the message handled for this group.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Asks for redelivery after `delay`, remembering `error` where the backend can.
    fn nack(self: Box<Self>, delay: Duration, error: String) -> BoxFuture<'static, Result<(), BrokerError>>;
}

/// One message handed to one consumer of a group.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// 1 on the first delivery, then counting every redelivery (nack or ack timeout).
    pub attempt: u32,
    /// The error given with the last nack, where the backend keeps it.
    pub last_error: Option<String>,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl Delivery {
    /// Builds a delivery; for backends.
    pub fn new(message: Message, attempt: u32, last_error: Option<String>, acker: Box<dyn Acker>) -> Self {
        Delivery {
            message,
            attempt,
            last_error,
            acker,
        }
    }

    /// Marks the message handled.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Returns the message for redelivery after `delay`.
    pub async fn nack(self, delay: Duration, error: impl Into<String>) -> Result<(), BrokerError> {
        self.acker.nack(delay, error.into()).await
    }
}

/// A consumer group's handle on one topic; each instance of a group holds its own.
pub trait Subscription: Send {
    /// Up to `max` deliveries, waiting at most `wait` for the first one.
    fn fetch(&mut self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>>;
}

/// One message of [`Broker::publish_batch`].
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Where it goes.
    pub topic: &'a str,
    /// Its de-duplication id.
    pub msg_id: &'a str,
    /// What it says.
    pub body: Bytes,
}

/// How far a batch got: its first `published` messages are durable, and `error` says why the
/// next one may not be. Later ones may be durable too; publishing them again stores nothing
/// new (their ids de-duplicate).
#[derive(Debug)]
pub struct BatchFailure {
    /// How many messages, from the first, are durable.
    pub published: usize,
    /// Why the one after them failed.
    pub error: BrokerError,
}

/// A durable publish/subscribe log.
pub trait Broker: Send + Sync + 'static {
    /// Publishes `body` under `msg_id`; durable when this returns. Repeating a `msg_id` on a
    /// topic (within the backend's de-duplication window) stores nothing new.
    fn publish<'a>(&'a self, topic: &'a str, msg_id: &'a str, body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Publishes `messages` in order; all are durable when this returns `Ok`. Backends
    /// override it to pay one round trip or one transaction for the whole batch instead of
    /// one per message; this default publishes them one at a time.
    fn publish_batch<'a>(&'a self, messages: &'a [Outgoing<'a>]) -> BoxFuture<'a, Result<(), BatchFailure>> {
        Box::pin(async move {
            for (published, m) in messages.iter().enumerate() {
                self.publish(m.topic, m.msg_id, m.body.clone())
                    .await
                    .map_err(|error| BatchFailure { published, error })?;
            }
            Ok(())
        })
    }
    /// Joins `group` on `topic`, creating the group (from the topic's first message) if new.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>>;
    /// Messages retained on a topic, oldest first (used to list dead letters).
    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>>;
    /// Removes one retained message (a replayed dead letter).
    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>>;
    /// Messages a group has not yet acked on a topic: its lag.
    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>>;
    /// Checks that the backend answers; used by health checks.
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    /// A short name for logs and health output.
    fn kind(&self) -> &'static str;
}

/// A shared broker handle.
pub type SharedBroker = Arc<dyn Broker>;

/// Opens the broker a URL names: `sqlite://PATH` (embedded) or `nats://HOST:PORT`.
///
/// A `namespace=NAME` query parameter (`nats://127.0.0.1:4222?namespace=staging`) prefixes
/// every topic with `NAME.`, so several systems (or test runs) can share one server.
pub async fn connect(url: &str) -> Result<SharedBroker, BrokerError> {
    let (base, namespace) = split_namespace(url)?;
    let inner: SharedBroker = if base.starts_with("sqlite:") {
        Arc::new(embedded::EmbeddedBroker::open(&base).await?)
    } else if base.starts_with("nats://") {
        Arc::new(nats::NatsBroker::connect(&base).await?)
    } else {
        return Err(BrokerError::UnsupportedUrl(url.to_string()));
    };
    Ok(match namespace {
        Some(prefix) => Arc::new(Namespaced { inner, prefix }),
        None => inner,
    })
}

/// Splits `namespace=NAME` off a URL's query.
fn split_namespace(url: &str) -> Result<(String, Option<String>), BrokerError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut namespace = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("namespace=") {
            Some(name)
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                namespace = Some(name.to_string());
            }
            Some(name) => {
                return Err(BrokerError::UnsupportedUrl(format!(
                    "namespace `{name}` must be letters, digits, `_` or `-`"
                )))
            }
            None => rest.push(pair),
        }
    }
    let base = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((base, namespace))
}

/// A broker whose topics all live under `prefix.`; callers see their own topic names.
struct Namespaced {
    inner: SharedBroker,
    prefix: String,
}

impl Namespaced {
    fn topic(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }

    fn unprefix(&self, mut m: Message) -> Message {
        if let Some(t) = m.topic.strip_prefix(&format!("{}.", self.prefix)) {
            m.topic = t.to_string();
        }
        m
    }
}

/// Hands out deliveries with the caller's topic names.
struct NamespacedSubscription {
    inner: Box<dyn Subscription>,
    prefix: String,
}

impl Subscription for NamespacedSubscription {
    fn fetch(&mut self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        Box::pin(async move {
            let mut out = self.inner.fetch(max, wait).await?;
            let prefix = format!("{}.", self.prefix);
            for d in &mut out {
                if let Some(t) = d.message.topic.strip_prefix(&prefix) {
                    d.message.topic = t.to_string();
                }
            }
            Ok(out)
        })
    }
}

impl Broker for Namespaced {
    fn publish<'a>(&'a self, topic: &'a str, msg_id: &'a str, body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.inner.publish(&self.topic(topic), msg_id, body).await })
    }

    fn publish_batch<'a>(&'a self, messages: &'a [Outgoing<'a>]) -> BoxFuture<'a, Result<(), BatchFailure>> {
        Box::pin(async move {
            let topics: Vec<String> = messages.iter().map(|m| self.topic(m.topic)).collect();
            let renamed: Vec<Outgoing<'_>> = messages
                .iter()
                .zip(&topics)
                .map(|(m, topic)| Outgoing {
                    topic,
                    msg_id: m.msg_id,
                    body: m.body.clone(),
                })
                .collect();
            self.inner.publish_batch(&renamed).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        Box::pin(async move {
            let inner = self.inner.subscribe(&self.topic(topic), group, options).await?;
            Ok(Box::new(NamespacedSubscription {
                inner,
                prefix: self.prefix.clone(),
            }) as Box<dyn Subscription>)
        })
    }

    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        Box::pin(async move {
            let messages = self.inner.read(&self.topic(topic), limit).await?;
            Ok(messages.into_iter().map(|m| self.unprefix(m)).collect())
        })
    }

    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.inner.delete(&self.topic(topic), seq).await })
    }

    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move { self.inner.pending(&self.topic(topic), group).await })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.inner.ping()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// What the dead-letter topic holds for a message a group gave up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The topic the message came from.
    pub topic: String,
    /// The consumer group that gave up.
    pub group: String,
    /// The message id (the envelope's eventId when it had one).
    pub msg_id: String,
    /// How many deliveries were tried.
    pub attempts: u32,
    /// Why it was given up: the last handler error, or the parse error of a poison message.
    pub reason: String,
    /// The original bytes, as UTF-8 (lossy for non-text bodies).
    pub body: String,
    /// When it was dead-lettered (RFC 3339).
    pub dead_at: String,
}

impl DeadLetter {
    /// Moves `delivery` to the dead-letter topic and acks it. A crash between the two
    /// republishes under the same id, which the broker drops as a duplicate.
    pub async fn park(broker: &dyn Broker, group: &str, delivery: Delivery, reason: String) -> Result<(), BrokerError> {
        let dead = DeadLetter {
            topic: delivery.message.topic.clone(),
            group: group.to_string(),
            msg_id: delivery.message.msg_id.clone(),
            attempts: delivery.attempt,
            reason,
            body: String::from_utf8_lossy(&delivery.message.body).into_owned(),
            dead_at: chrono::Utc::now().to_rfc3339(),
        };
        let id = format!("{}:{}", group, dead.msg_id);
        let body = serde_json::to_vec(&dead).unwrap_or_default();
        broker.publish(&dlq_topic(&dead.topic), &id, body.into()).await?;
        metrics::counter!("bazaar_dead_letters_total", "topic" => dead.topic.clone(), "group" => group.to_string())
            .increment(1);
        delivery.ack().await
    }

    /// Publishes the original message again on its topic under a fresh id so every group
    /// sees it (groups that handled it already drop it in their inbox), then removes the dead
    /// letter at `seq` from the dead-letter topic.
    pub async fn replay(&self, broker: &dyn Broker, seq: u64) -> Result<(), BrokerError> {
        let id = format!("{}.replay.{}", self.msg_id, uuid::Uuid::now_v7());
        broker.publish(&self.topic, &id, Bytes::from(self.body.clone())).await?;
        broker.delete(&dlq_topic(&self.topic), seq).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_split_off_the_url() {
        let (base, ns) = split_namespace("nats://127.0.0.1:4222?namespace=ci-1").unwrap();
        assert_eq!((base.as_str(), ns.as_deref()), ("nats://127.0.0.1:4222", Some("ci-1")));
        let (base, ns) = split_namespace("sqlite://data/bus.db").unwrap();
        assert_eq!((base.as_str(), ns), ("sqlite://data/bus.db", None));
        assert!(split_namespace("nats://h:1?namespace=a.b").is_err());
    }

    #[tokio::test]
    async fn namespaced_topics_are_separate_but_look_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/bus.db", dir.path().display());
        let a = connect(&format!("{url}?namespace=a")).await.unwrap();
        let b = connect(&format!("{url}?namespace=b")).await.unwrap();
        a.publish("t", "1", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(b.read("t", 10).await.unwrap().len(), 0);
        let mut sub = a.subscribe("t", "g", SubscribeOptions::default()).await.unwrap();
        let got = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.topic, "t");
    }
}
