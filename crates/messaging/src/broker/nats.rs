//! NATS JetStream backend: a stream per topic, a durable pull consumer per consumer group.
//!
//! - Each topic gets its own stream, `BAZAAR_<topic>` (characters outside `[A-Za-z0-9_-]`
//!   become `_`, see [`stream_name`]), with the topic as its only subject, file storage and a
//!   de-duplication window of [`DEDUP_WINDOW`]. Streams are created on first use and
//!   remembered, so the hot path does not ask the server again.
//! - `publish` sets `Nats-Msg-Id` to the message id and waits for the stream's ack: the message
//!   is on disk (in the stream's replicas) when it returns. JetStream only remembers ids for the
//!   de-duplication window; a duplicate published later than that (an outbox relay that was
//!   down for minutes between publish and mark) is stored again, and the consumers' inboxes
//!   drop it. That is why every handler records its `eventId` in the inbox.
//! - A consumer group is a durable pull consumer named after the group (see
//!   [`consumer_name`]), shared by every instance of the group, so instances compete. It
//!   starts at the stream's first retained message (like the embedded broker), acks
//!   explicitly, redelivers after the subscriber's ack wait and never gives up by itself
//!   (`max_deliver` unlimited): the consumer runner counts attempts and dead-letters.
//! - Retention: ordinary topics keep messages for [`RETENTION`] whether acked or not (JetStream
//!   cannot drop "acked by every group" while letting new groups start from the beginning);
//!   dead-letter topics (`*.dlq`) keep them until they are replayed and deleted.
//!
//! Known server quirk (seen on nats-server 2.9.10): a redelivery that falls due at the same
//! instant a waiting pull request expires is counted as delivered but never arrives; it comes
//! again after one more ack wait. Nothing is lost, but `attempt` can skip a number.
//!
//! The stream and consumer names are stable, so an operator can inspect them with the `nats`
//! CLI (`nats stream info BAZAAR_orders_events`).
//!
//! The URL names one server or several seeds of a cluster, and how many copies a stream
//! keeps: `nats://127.0.0.1:14221,127.0.0.1:14222,127.0.0.1:14223?replicas=3`. The client
//! connects to any seed that answers and fails over to the others; streams (and their
//! consumers) are created with that replication factor, so losing a node, or the stream's
//! leader moving, costs retries of the publish or fetch in flight, never an acked message.

use std::{
    collections::HashSet,
    fmt::Display,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    context::{Publish, PublishErrorKind},
    message::AckKind,
    response::Response,
    stream::{self, RawMessageErrorKind, StorageType},
};
use bytes::Bytes;
use futures_util::{future::BoxFuture, StreamExt};

use super::{Acker, BatchFailure, Broker, BrokerError, Delivery, Message, Outgoing, SubscribeOptions, Subscription};

/// How long JetStream remembers a `Nats-Msg-Id` to drop a repeated publish.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// How long an ordinary topic keeps its messages (dead-letter topics keep them until replayed).
/// A group that stays away longer than this misses messages: monitor consumer lag.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long connecting, and every request to the server, may take before the broker reports
/// itself unavailable.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Waits shorter than this are not worth a waiting pull request.
const MIN_WAIT: Duration = Duration::from_millis(10);

/// The stream that holds `topic`: `BAZAAR_` and the topic with every character outside
/// `[A-Za-z0-9_-]` replaced by `_` (`orders.events` -> `BAZAAR_orders_events`).
pub fn stream_name(topic: &str) -> String {
    format!("BAZAAR_{}", sanitise(topic))
}

/// The durable consumer that stands for consumer `group` on a topic's stream.
pub fn consumer_name(group: &str) -> String {
    sanitise(group)
}

/// What one role may do on the NATS server, as subject lists for its user's `permissions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// The inbox prefix of a client logged in as `user`: its replies (JetStream API answers,
/// pulled messages) arrive there, where no other user may subscribe.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{}", sanitise(user))
}

/// Least privilege for consumer `group` (also its NATS user) publishing `publishes` and
/// consuming `consumes`: publish to those topics (and the dead-letter topics of the ones it
/// consumes) and no others; look up their streams, which the operator creates
/// ([`create_streams`]) so that no role shapes one; create, read, pull from and ack its own
/// durable consumer on each consumed topic, and no one else's; receive replies only on its
/// own inbox ([`inbox_prefix`]). Creating, deleting or purging streams and reading others'
/// consumers stay with the operator's user.
pub fn permissions(group: &str, publishes: &[&str], consumes: &[&str]) -> Permissions {
    let dead_letters: Vec<String> = consumes.iter().map(|t| super::dlq_topic(t)).collect();
    let produced: Vec<&str> = publishes
        .iter()
        .copied()
        .chain(dead_letters.iter().map(String::as_str))
        .collect();
    let mut publish = vec!["$JS.API.INFO".to_string()];
    for topic in produced.iter().chain(consumes) {
        let stream = stream_name(topic);
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
    }
    publish.extend(produced.iter().map(|t| t.to_string()));
    let consumer = consumer_name(group);
    for topic in consumes {
        let stream = stream_name(topic);
        for api in ["CONSUMER.CREATE", "CONSUMER.INFO", "CONSUMER.MSG.NEXT"] {
            publish.push(format!("$JS.API.{api}.{stream}.{consumer}"));
        }
        // With a filter subject the create request names it after the consumer.
        publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"));
        // Acks, in the server's short form and in its form with domain and account.
        publish.push(format!("$JS.ACK.{stream}.{consumer}.>"));
        publish.push(format!("$JS.ACK.*.*.{stream}.{consumer}.>"));
    }
    // Its own dead letters: read to list them, trimmed once a replay handled one.
    for topic in &dead_letters {
        let stream = stream_name(topic);
        publish.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
        publish.push(format!("$JS.API.STREAM.MSG.DELETE.{stream}"));
    }
    publish.dedup();
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", inbox_prefix(group))],
    }
}

/// Creates (or finds) the stream of each of `topics` at `url`, logged in as the operator.
pub async fn create_streams<'a>(url: &str, topics: impl IntoIterator<Item = &'a str>) -> Result<(), BrokerError> {
    let broker = NatsBroker::connect(url).await?;
    for topic in topics {
        broker.stream(topic).await?;
    }
    Ok(())
}

fn sanitise(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A topic is a literal NATS subject: dot-separated non-empty tokens, no wildcards, no spaces.
fn check_topic(topic: &str) -> Result<(), BrokerError> {
    let valid = !topic.is_empty()
        && topic
            .split('.')
            .all(|token| !token.is_empty() && !token.contains(|c: char| c.is_whitespace() || c == '*' || c == '>'));
    if valid {
        Ok(())
    } else {
        Err(BrokerError::Unavailable(format!(
            "`{topic}` is not a valid NATS topic (dot-separated words, no spaces or wildcards)"
        )))
    }
}

fn unavailable(what: impl Display, error: impl Display) -> BrokerError {
    BrokerError::Unavailable(format!("NATS {what}: {error}"))
}

/// The URL with any password hidden, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}****{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// True for a JetStream "not found" answer (no such stream, consumer or message).
fn is_not_found(error: &jetstream::Error) -> bool {
    error.code() == 404
}

/// The `nats-server` executable on PATH, or where Debian's package installs it.
pub fn server_binary() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin/nats-server")])
        .find(|p| p.is_file())
}

/// Most copies of a stream JetStream keeps (its own limit).
const MAX_REPLICAS: usize = 5;

/// A parsed broker URL: the seed servers and the streams' replication factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    /// `nats://host:port` of each seed (credentials kept).
    pub seeds: Vec<String>,
    /// Copies of each stream (1 to 5).
    pub replicas: usize,
}

impl std::str::FromStr for NatsUrl {
    type Err = BrokerError;

    fn from_str(url: &str) -> Result<NatsUrl, BrokerError> {
        let bad = |why: String| BrokerError::UnsupportedUrl(format!("{}: {why}", redact(url)));
        let rest = url
            .strip_prefix("nats://")
            .ok_or_else(|| bad("a NATS URL starts with nats://".into()))?;
        let (servers, query) = rest.split_once('?').unwrap_or((rest, ""));
        let seeds: Vec<String> = servers
            .split(',')
            .map(str::trim)
            .map(|server| {
                let server = server.strip_prefix("nats://").unwrap_or(server);
                if server.is_empty() || server.contains('/') {
                    Err(bad(format!("`{server}` is not HOST:PORT")))
                } else {
                    Ok(format!("nats://{server}"))
                }
            })
            .collect::<Result<_, _>>()?;
        let mut replicas = 1;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("replicas", n)) => {
                    replicas = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_REPLICAS).contains(n))
                        .ok_or_else(|| bad(format!("replicas must be 1 to {MAX_REPLICAS}, not `{n}`")))?;
                }
                _ => return Err(bad(format!("unknown parameter `{pair}` (known: replicas, namespace)"))),
            }
        }
        if replicas > seeds.len() && seeds.len() > 1 {
            return Err(bad(format!(
                "{replicas} replicas need at least {replicas} servers; {} seeds given",
                seeds.len()
            )));
        }
        Ok(NatsUrl { seeds, replicas })
    }
}

/// The JetStream broker.
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Copies of each stream it creates.
    replicas: usize,
    /// Topics whose stream this process has created or found.
    streams: Mutex<HashSet<String>>,
}

impl NatsBroker {
    /// Connects to `nats://[USER:PASSWORD@]HOST:PORT[,…][?replicas=N]` and checks that JetStream is
    /// enabled; fails within a few seconds when no seed answers.
    pub async fn connect(url: &str) -> Result<NatsBroker, BrokerError> {
        let shown = redact(url);
        let parsed: NatsUrl = url.parse()?;
        let seeds = parsed
            .seeds
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BrokerError::UnsupportedUrl(format!("{shown}: {e}")))?;
        let mut options = async_nats::ConnectOptions::new()
            .name("bazaar")
            .connection_timeout(TIMEOUT)
            .request_timeout(Some(TIMEOUT));
        // `nats://user:password@host:port`: the role's own login (bazaar up --cluster gives
        // each service one).
        if let Some((user, password)) = seeds
            .iter()
            .find_map(|s| Some((s.username()?, s.password().unwrap_or_default())))
        {
            options = options
                .user_and_password(user.to_string(), password.to_string())
                .custom_inbox_prefix(inbox_prefix(user));
        }
        let client = tokio::time::timeout(TIMEOUT + Duration::from_secs(1), options.connect(seeds))
            .await
            .map_err(|_| unavailable(format!("at {shown}"), format!("no answer within {TIMEOUT:?}")))?
            .map_err(|e| unavailable(format!("at {shown}"), e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(TIMEOUT);
        let broker = NatsBroker {
            client,
            js,
            replicas: parsed.replicas,
            streams: Mutex::new(HashSet::new()),
        };
        broker
            .account_info()
            .await
            .map_err(|e| unavailable(format!("at {shown}"), format!("JetStream not available: {e}")))?;
        Ok(broker)
    }

    /// Asks JetStream for the account's info: answers only when JetStream is enabled for us.
    /// The answer is read loosely, as its fields vary between server versions.
    async fn account_info(&self) -> Result<(), String> {
        let empty = serde_json::json!({});
        let request = self.js.request::<_, _, Response<serde_json::Value>>("INFO", &empty);
        match tokio::time::timeout(TIMEOUT, request).await {
            Ok(Ok(Response::Ok(_))) => Ok(()),
            Ok(Ok(Response::Err { error })) => Err(error.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        }
    }

    fn known(&self, topic: &str) -> bool {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(topic)
    }

    fn remember(&self, topic: &str, exists: bool) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if exists {
            streams.insert(topic.to_string());
        } else {
            streams.remove(topic);
        }
    }

    /// The stream of `topic`, created when this process has not seen it yet.
    async fn stream(&self, topic: &str) -> Result<stream::Stream<()>, BrokerError> {
        check_topic(topic)?;
        let name = stream_name(topic);
        if !self.known(topic) {
            let config = stream::Config {
                name: name.clone(),
                subjects: vec![topic.to_string()],
                storage: StorageType::File,
                duplicate_window: DEDUP_WINDOW,
                max_age: if topic.ends_with(".dlq") {
                    Duration::ZERO
                } else {
                    RETENTION
                },
                num_replicas: self.replicas,
                ..Default::default()
            };
            self.js
                .get_or_create_stream(config)
                .await
                .map_err(|e| unavailable(format!("stream {name}"), e))?;
            self.remember(topic, true);
        }
        self.js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| unavailable(format!("stream {name}"), e))
    }

    /// The stream of `topic` without creating it; reads of a topic nobody used find nothing.
    async fn existing_stream(&self, topic: &str) -> Result<stream::Stream<()>, BrokerError> {
        check_topic(topic)?;
        let name = stream_name(topic);
        self.js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| unavailable(format!("stream {name}"), e))
    }

    async fn publish_once(&self, topic: &str, msg_id: &str, body: Bytes) -> Result<(), (PublishErrorKind, String)> {
        let publish = Publish::build().payload(body).message_id(msg_id);
        let ack = self
            .js
            .send_publish(topic.to_string(), publish)
            .await
            .map_err(|e| (e.kind(), e.to_string()))?;
        ack.await.map_err(|e| (e.kind(), e.to_string()))?;
        Ok(())
    }

    async fn publish_inner(&self, topic: &str, msg_id: &str, body: Bytes) -> Result<(), BrokerError> {
        self.stream(topic).await?;
        match self.publish_once(topic, msg_id, body.clone()).await {
            Ok(()) => Ok(()),
            // The stream was deleted behind our back (an operator, a test cleaning up): make it
            // again and retry once.
            Err((PublishErrorKind::StreamNotFound, _)) => {
                self.remember(topic, false);
                self.stream(topic).await?;
                self.publish_once(topic, msg_id, body)
                    .await
                    .map_err(|(_, e)| unavailable(format!("publish to {topic}"), e))
            }
            Err((_, e)) => Err(unavailable(format!("publish to {topic}"), e)),
        }
    }

    /// Sends every message before waiting for any acknowledgement (pipelined, as a
    /// JetStream client publishing a batch does), then reads the acks in order: one round
    /// trip for the batch instead of one per message.
    async fn publish_batch_inner(&self, messages: &[Outgoing<'_>]) -> Result<(), BatchFailure> {
        let mut acks = Vec::with_capacity(messages.len());
        let mut stopped = None;
        for (published, m) in messages.iter().enumerate() {
            if let Err(error) = self.stream(m.topic).await {
                stopped = Some(BatchFailure { published, error });
                break;
            }
            let publish = Publish::build().payload(m.body.clone()).message_id(m.msg_id);
            match self.js.send_publish(m.topic.to_string(), publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    let error = unavailable(format!("publish to {}", m.topic), e);
                    stopped = Some(BatchFailure { published, error });
                    break;
                }
            }
        }
        for (published, ack) in acks.into_iter().enumerate() {
            if let Err(e) = ack.await {
                let topic = messages[published].topic;
                if e.kind() == PublishErrorKind::StreamNotFound {
                    // Deleted behind our back: made again on the next attempt.
                    self.remember(topic, false);
                }
                let error = unavailable(format!("publish to {topic}"), e);
                return Err(BatchFailure { published, error });
            }
        }
        stopped.map_or(Ok(()), Err)
    }

    async fn subscribe_inner(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        let stream = self.stream(topic).await?;
        let name = consumer_name(group);
        if name.is_empty() {
            return Err(BrokerError::Unavailable("a consumer group needs a name".into()));
        }
        let config = pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: -1,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| unavailable(format!("consumer {name} on {topic}"), e))?;
        if consumer.cached_info().config.ack_wait != options.ack_wait {
            // The group existed with another ack wait (a redeployed service changed it).
            match stream.update_consumer(config).await {
                Ok(updated) => consumer = updated,
                Err(e) => tracing::warn!(%topic, %group, error = %e, "could not update the consumer's ack wait"),
            }
        }
        Ok(Box::new(NatsSubscription {
            consumer,
            topic: topic.to_string(),
        }))
    }

    async fn read_inner(&self, topic: &str, limit: usize) -> Result<Vec<Message>, BrokerError> {
        let stream = self.existing_stream(topic).await?;
        let mut out = Vec::new();
        let mut seq = 1;
        while out.len() < limit {
            // The first message at or after `seq`, so deleted sequences are skipped for free.
            let msg = match stream.get_first_raw_message_by_subject(topic, seq).await {
                Ok(msg) => msg,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break,
                Err(e) => match e.kind() {
                    RawMessageErrorKind::JetStream(js) if is_not_found(&js) => break,
                    _ => return Err(unavailable(format!("read {topic}"), e)),
                },
            };
            seq = msg.sequence + 1;
            let msg_id = msg
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            out.push(Message {
                topic: topic.to_string(),
                seq: msg.sequence,
                msg_id,
                body: msg.payload,
            });
        }
        Ok(out)
    }

    async fn delete_inner(&self, topic: &str, seq: u64) -> Result<(), BrokerError> {
        let stream = self.existing_stream(topic).await?;
        match stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                // Already gone: deleting is idempotent, as on the embedded broker.
                stream::DeleteMessageErrorKind::JetStream(js) if is_not_found(&js) => Ok(()),
                _ => Err(unavailable(format!("delete {topic} #{seq}"), e)),
            },
        }
    }

    async fn pending_inner(&self, topic: &str, group: &str) -> Result<u64, BrokerError> {
        let stream = self.existing_stream(topic).await?;
        match stream.consumer_info(consumer_name(group)).await {
            Ok(info) => Ok(info.num_pending + info.num_ack_pending as u64),
            Err(e) => match e.kind() {
                // A group that never subscribed (or a topic never used) has nothing pending.
                jetstream::context::ConsumerInfoErrorKind::NotFound
                | jetstream::context::ConsumerInfoErrorKind::StreamNotFound => Ok(0),
                _ => Err(unavailable(format!("consumer {group} on {topic}"), e)),
            },
        }
    }
}

impl Broker for NatsBroker {
    fn publish<'a>(&'a self, topic: &'a str, msg_id: &'a str, body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.publish_inner(topic, msg_id, body))
    }

    fn publish_batch<'a>(&'a self, messages: &'a [Outgoing<'a>]) -> BoxFuture<'a, Result<(), BatchFailure>> {
        Box::pin(self.publish_batch_inner(messages))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        Box::pin(self.subscribe_inner(topic, group, options))
    }

    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        Box::pin(self.read_inner(topic, limit))
    }

    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.delete_inner(topic, seq))
    }

    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(self.pending_inner(topic, group))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.account_info()
                .await
                .map_err(|e| unavailable(format!("({:?})", self.client.connection_state()), e))
        })
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

/// One instance's handle on a group's durable consumer.
struct NatsSubscription {
    consumer: PullConsumer,
    topic: String,
}

impl NatsSubscription {
    /// Pulls up to `max` messages. Without `wait` the server answers at once with what it has;
    /// with it, the request waits up to `wait` for `max` messages. Every message the request
    /// brings is collected before returning, so none sits unseen until its ack wait runs out.
    async fn pull(&self, max: usize, wait: Option<Duration>) -> Result<Vec<Delivery>, BrokerError> {
        let failed = |e: &dyn Display| unavailable(format!("fetch from {}", self.topic), e);
        let batch = match wait {
            None => self.consumer.fetch().max_messages(max).messages().await,
            Some(wait) => self.consumer.batch().max_messages(max).expires(wait).messages().await,
        }
        .map_err(|e| failed(&e))?;
        // The server ends every pull request with a status, but nats-server 2.9 can swallow
        // both the status and a redelivery that falls due the instant a waiting request
        // expires (the message then comes back one ack wait later, its attempt counted twice).
        // So stop listening shortly after the request's own expiry rather than the library's
        // five seconds: by then the server sends nothing more on it.
        let limit = match wait {
            Some(wait) => wait + Duration::from_secs(1),
            None => TIMEOUT,
        };
        let collected = match tokio::time::timeout(limit, batch.collect::<Vec<_>>()).await {
            Ok(collected) => collected,
            // The quirk above: the request is over, it just was not said.
            Err(_) if wait.is_some() => Vec::new(),
            Err(_) => return Err(failed(&"no answer from the server")),
        };
        let mut out = Vec::with_capacity(collected.len());
        for msg in collected {
            let msg = msg.map_err(|e| failed(&e))?;
            out.push(self.delivery(msg));
        }
        Ok(out)
    }

    fn delivery(&self, msg: jetstream::Message) -> Delivery {
        // The ack subject carries the stream sequence and the delivery count; JetStream always
        // sets it on consumer deliveries.
        let (seq, attempt) = msg
            .info()
            .map(|info| {
                (
                    info.stream_sequence,
                    info.delivered.clamp(1, i64::from(u32::MAX)) as u32,
                )
            })
            .unwrap_or((0, 1));
        let (msg, acker) = msg.split();
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        Delivery::new(
            Message {
                topic: self.topic.clone(),
                seq,
                msg_id,
                body: msg.payload,
            },
            attempt,
            // JetStream does not keep a reason with a nak.
            None,
            Box::new(NatsAcker { acker }),
        )
    }
}

impl Subscription for NatsSubscription {
    fn fetch(&mut self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Delivery>, BrokerError>> {
        Box::pin(async move {
            let max = max.max(1);
            let mut got = self.pull(max, None).await?;
            if got.is_empty() && wait >= MIN_WAIT {
                // Wait for one message only, so a quiet topic returns as soon as anything
                // arrives, then take whatever else is ready. Dropping this future while the
                // waiting request is open can strand one message until its ack wait ends.
                got = self.pull(1, Some(wait)).await?;
                if !got.is_empty() && max > 1 {
                    got.extend(self.pull(max - 1, None).await?);
                }
            }
            Ok(got)
        })
    }
}

struct NatsAcker {
    acker: jetstream::message::Acker,
}

impl Acker for NatsAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            // Waits for the server to confirm, so an acked message is not redelivered after a
            // crash right after `ack` returned.
            self.acker.double_ack().await.map_err(|e| unavailable("ack", e))
        })
    }

    fn nack(self: Box<Self>, delay: Duration, _error: String) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            self.acker
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| unavailable("nak", e))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_role_may_publish_only_its_own_topics_and_work_only_its_own_consumers() {
        let p = super::permissions("notifications", &[], &["orders.events"]);
        assert!(p.publish.contains(&"orders.events.dlq".to_string()), "its dead letters");
        assert!(!p
            .publish
            .iter()
            .any(|s| s == "orders.events" || s.ends_with('>') && !s.starts_with("$JS")));
        assert!(p
            .publish
            .contains(&"$JS.API.CONSUMER.MSG.NEXT.BAZAAR_orders_events.notifications".to_string()));
        // It may trim its own dead letters once replayed, and delete or purge nothing else.
        assert!(!p
            .publish
            .iter()
            .any(|s| (s.contains("DELETE") && !s.ends_with("BAZAAR_orders_events_dlq")) || s.contains("PURGE")));
        assert!(p
            .publish
            .contains(&"$JS.API.STREAM.MSG.DELETE.BAZAAR_orders_events_dlq".to_string()));
        assert_eq!(p.subscribe, ["_INBOX_notifications.>"]);
        assert!(
            !p.publish.iter().any(|s| s.contains("STREAM.CREATE")),
            "the operator shapes streams"
        );
        let orders = super::permissions("orders", &["inventory.commands"], &[]);
        assert!(orders.publish.contains(&"inventory.commands".to_string()));
    }

    use super::*;

    #[test]
    fn names_are_valid_jetstream_names() {
        assert_eq!(stream_name("orders.events"), "BAZAAR_orders_events");
        assert_eq!(stream_name("orders.events.dlq"), "BAZAAR_orders_events_dlq");
        assert_eq!(consumer_name("inventory:v2 x"), "inventory_v2_x");
        assert_eq!(consumer_name("pay-ments_1"), "pay-ments_1");
    }

    #[test]
    fn topics_must_be_literal_subjects() {
        assert!(check_topic("orders.events").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("orders.*").is_err());
        assert!(check_topic("orders..x").is_err());
        assert!(check_topic("orders x").is_err());
    }

    #[test]
    fn urls_name_several_seeds_and_a_replication_factor() {
        let url: NatsUrl = "nats://127.0.0.1:14221,127.0.0.1:14222, nats://127.0.0.1:14223?replicas=3"
            .parse()
            .unwrap();
        assert_eq!(
            url.seeds,
            [
                "nats://127.0.0.1:14221",
                "nats://127.0.0.1:14222",
                "nats://127.0.0.1:14223"
            ]
        );
        assert_eq!(url.replicas, 3);
        let one: NatsUrl = "nats://u:p@h:4222".parse().unwrap();
        assert_eq!((one.seeds.len(), one.replicas), (1, 1));
        for (bad, says) in [
            ("nats://h:1?replicas=0", "1 to 5"),
            ("nats://h:1?replicas=9", "1 to 5"),
            ("nats://h:1,h:2?replicas=3", "need at least 3 servers"),
            ("nats://h:1?replica=3", "unknown parameter `replica=3`"),
            ("nats://h:1,,h:2", "is not HOST:PORT"),
            ("http://h:1", "starts with nats://"),
        ] {
            let err = bad.parse::<NatsUrl>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn urls_hide_their_password() {
        assert_eq!(redact("nats://u:secret@host:4222"), "nats://****@host:4222");
        assert_eq!(redact("nats://host:4222"), "nats://host:4222");
    }
}
