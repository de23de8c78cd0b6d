//! The broker contract (docs/architecture.md, "Messaging"), run against every backend.
//!
//! Each case is a plain async function over a [`Ctx`] (a broker, a way to reopen it, unique
//! topic names) and the `contract!` macro turns it into two tests: `embedded::<case>` on a
//! SQLite file in a temp dir, and `nats::<case>` on the server named by
//! `BAZAAR_TEST_NATS_URL` (skipped, saying so, when that is unset):
//!
//! ```text
//! BAZAAR_TEST_NATS_URL=nats://127.0.0.1:4222 cargo nextest run -p bazaar-kit --test broker_contract
//! ```
//!
//! Topics carry a fresh uuid per test, so runs on a shared server do not see each other, and
//! the NATS streams a test made are deleted when it ends (passed or failed).
//!
//! Durability across a restart is checked by dropping the broker and opening a new one on the
//! same file (embedded) or a new client connection (NATS). Restarting `nats-server` itself is
//! beyond what a test may do here; JetStream's file storage is what keeps messages over that.

use std::{
    collections::HashSet,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bazaar_kit::broker::{
    self, dlq_topic, DeadLetter, Delivery, Outgoing, SharedBroker, SubscribeOptions, Subscription,
};
use bazaar_testkit::{servers, Server};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

/// Short, so redelivery cases finish quickly.
const SHORT_ACK_WAIT: Duration = Duration::from_secs(1);
/// Long, for cases where an ack-timeout redelivery would muddle what is being checked.
const LONG_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a case waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// Where a case's broker lives.
enum Backend {
    Embedded { url: String, _dir: tempfile::TempDir },
    Nats { url: String },
}

impl Backend {
    fn embedded() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("bus.db").display());
        Backend::Embedded { url, _dir: dir }
    }

    fn nats() -> Option<Backend> {
        let url = servers::url(Server::Nats, "the NATS part")?;
        Some(Backend::Nats { url })
    }

    fn url(&self) -> &str {
        match self {
            Backend::Embedded { url, .. } | Backend::Nats { url } => url,
        }
    }

    /// Deletes every NATS stream whose name carries this run's id.
    async fn clean_up(&self, run: &str) {
        let Backend::Nats { url } = self else { return };
        let Ok(client) = async_nats::connect(url.as_str()).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        let Ok(names) = js
            .stream_names()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        for name in names.iter().filter(|n| n.contains(run)) {
            let _ = js.delete_stream(name).await;
        }
    }
}

/// What a case gets: a broker, its backend (to reopen it) and a per-test id for topic names.
#[derive(Clone)]
struct Ctx {
    broker: SharedBroker,
    backend: Arc<Backend>,
    run: String,
}

impl Ctx {
    /// A topic name no other test uses.
    fn topic(&self, name: &str) -> String {
        format!("contract.{name}.{}", self.run)
    }

    /// A new broker on the same backend, as a restarted process would open it.
    async fn reopen(&self) -> SharedBroker {
        broker::connect(self.backend.url()).await.expect("reopen the broker")
    }
}

async fn run<F, Fut>(backend: Option<Backend>, case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(backend) = backend else { return };
    let backend = Arc::new(backend);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let broker = broker::connect(backend.url()).await.expect("connect to the broker");
    let ctx = Ctx {
        broker,
        backend: backend.clone(),
        run: run.clone(),
    };
    let outcome = AssertUnwindSafe(case(ctx)).catch_unwind().await;
    backend.clean_up(&run).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Generates `embedded::<case>` and `nats::<case>` for every case.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(Some(super::Backend::embedded()), super::$case).await
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(super::Backend::nats(), super::$case).await
                }
            )*
        }
    };
}

contract!(
    ping_answers,
    fan_out,
    competing_consumers,
    redelivery_after_ack_timeout,
    nack_delays_redelivery,
    dead_letter_and_replay,
    publish_deduplicates,
    durable_across_restart,
    pending_reports_lag,
    bodies_arrive_unchanged,
    waiting_fetch_returns_on_publish,
    a_batch_arrives_whole_in_order_and_deduplicated,
);

// ---- helpers ----

fn options(ack_wait: Duration) -> SubscribeOptions {
    SubscribeOptions { ack_wait }
}

/// Each fetch in [`take`] waits this long: not a divisor of the ack waits, because
/// nats-server 2.9 can swallow a redelivery due at the very instant a pull request expires.
const FETCH_WAIT: Duration = Duration::from_millis(700);

/// Fetches until `n` deliveries arrived or `within` passed.
async fn take(sub: &mut Box<dyn Subscription>, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = sub.fetch(n - got.len(), left.min(FETCH_WAIT)).await.expect("fetch");
        got.extend(batch);
    }
    got
}

/// Asserts that nothing is delivered for `quiet`.
async fn assert_quiet(sub: &mut Box<dyn Subscription>, quiet: Duration, why: &str) {
    let got = take(sub, 1, quiet).await;
    assert!(
        got.is_empty(),
        "{why}: got {:?}",
        got.iter().map(|d| &d.message.msg_id).collect::<Vec<_>>()
    );
}

async fn ack_all(deliveries: Vec<Delivery>) {
    for d in deliveries {
        d.ack().await.expect("ack");
    }
}

fn ids(deliveries: &[Delivery]) -> HashSet<String> {
    deliveries.iter().map(|d| d.message.msg_id.clone()).collect()
}

async fn publish_n(b: &SharedBroker, topic: &str, prefix: &str, n: usize) -> HashSet<String> {
    let mut ids = HashSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        b.publish(topic, &id, Bytes::from(format!("{{\"n\":{i}}}")))
            .await
            .expect("publish");
        ids.insert(id);
    }
    ids
}

/// Polls `pending` until it equals `want` or the patience runs out.
async fn assert_pending(b: &SharedBroker, topic: &str, group: &str, want: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = b.pending(topic, group).await.expect("pending");
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pending({topic}, {group}) = {now}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the cases ----

async fn ping_answers(ctx: Ctx) {
    ctx.broker.ping().await.expect("ping");
    assert!(["embedded", "nats"].contains(&ctx.broker.kind()));
}

/// Every consumer group gets every message, whether it joined before or after the publish.
async fn fan_out(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("fanout");
    let mut sent = publish_n(b, &topic, "early", 3).await;
    let mut a = b
        .subscribe(&topic, "group-a", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe a");
    let mut bb = b
        .subscribe(&topic, "group-b", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe b");
    sent.extend(publish_n(b, &topic, "late", 3).await);

    for (name, sub) in [("group-a", &mut a), ("group-b", &mut bb)] {
        let got = take(sub, sent.len(), PATIENCE).await;
        assert_eq!(ids(&got), sent, "{name} must receive every message");
        assert_eq!(got.len(), sent.len(), "{name} got a message twice");
        assert!(got.iter().all(|d| d.attempt == 1 && d.message.topic == topic));
        ack_all(got).await;
        assert_quiet(sub, Duration::from_millis(300), name).await;
    }
}

/// Two instances of one group share the work: every message handled once, by one of them.
async fn competing_consumers(ctx: Ctx) {
    const N: usize = 200;
    let b = &ctx.broker;
    let topic = ctx.topic("compete");
    let s1 = b
        .subscribe(&topic, "workers", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe 1");
    let s2 = b
        .subscribe(&topic, "workers", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe 2");
    let sent = publish_n(b, &topic, "job", N).await;

    let handled = Arc::new(AtomicUsize::new(0));
    let worker = |mut sub: Box<dyn Subscription>, handled: Arc<AtomicUsize>| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut mine = Vec::new();
        while handled.load(Ordering::SeqCst) < N && Instant::now() < deadline {
            let batch = sub.fetch(10, Duration::from_millis(200)).await.expect("fetch");
            for d in batch {
                mine.push(d.message.msg_id.clone());
                d.ack().await.expect("ack");
                handled.fetch_add(1, Ordering::SeqCst);
            }
            // A handler takes time; without it one instance could drain a local log alone.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        mine
    };
    let t1 = tokio::spawn(worker(s1, handled.clone()));
    let t2 = tokio::spawn(worker(s2, handled.clone()));
    let (m1, m2) = (t1.await.expect("worker 1"), t2.await.expect("worker 2"));

    let (h1, h2): (HashSet<_>, HashSet<_>) = (m1.iter().cloned().collect(), m2.iter().cloned().collect());
    assert_eq!(m1.len() + m2.len(), N, "each message handled exactly once in total");
    assert!(h1.is_disjoint(&h2), "a message went to both instances");
    assert_eq!(&h1 | &h2, sent, "every message handled");
    assert!(
        !m1.is_empty() && !m2.is_empty(),
        "both instances got work: {} / {}",
        m1.len(),
        m2.len()
    );
    assert_pending(b, &topic, "workers", 0).await;
}

/// A consumer that dies holding a message (no ack) does not lose it: after the ack wait it
/// is delivered again, to another instance, as attempt 2.
async fn redelivery_after_ack_timeout(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("redeliver");
    let mut dying = b
        .subscribe(&topic, "g", options(SHORT_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&topic, "m1", Bytes::from_static(b"hello"))
        .await
        .expect("publish");
    let first = take(&mut dying, 1, PATIENCE).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    let leased_at = Instant::now();
    drop(first);
    drop(dying);

    let mut survivor = b
        .subscribe(&topic, "g", options(SHORT_ACK_WAIT))
        .await
        .expect("subscribe");
    let again = take(&mut survivor, 1, PATIENCE).await;
    assert_eq!(again.len(), 1, "the unacked message must come again");
    assert!(
        leased_at.elapsed() >= SHORT_ACK_WAIT - Duration::from_millis(200),
        "redelivered before the ack wait ended ({:?})",
        leased_at.elapsed()
    );
    assert_eq!(again[0].message.msg_id, "m1");
    assert_eq!(again[0].attempt, 2);
    ack_all(again).await;
    assert_quiet(&mut survivor, SHORT_ACK_WAIT * 2, "an acked message came back").await;
}

/// A nack asks for redelivery after a delay, not before it, with the attempt counted.
async fn nack_delays_redelivery(ctx: Ctx) {
    const DELAY: Duration = Duration::from_millis(1500);
    let b = &ctx.broker;
    let topic = ctx.topic("nack");
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&topic, "m1", Bytes::from_static(b"x"))
        .await
        .expect("publish");
    let got = take(&mut sub, 1, PATIENCE).await;
    assert_eq!(got.len(), 1);
    let d = got.into_iter().next().expect("one delivery");
    d.nack(DELAY, "boom").await.expect("nack");
    let nacked_at = Instant::now();

    assert_quiet(&mut sub, DELAY / 2, "redelivered before the nack delay").await;
    let again = take(&mut sub, 1, PATIENCE).await;
    assert_eq!(again.len(), 1, "the nacked message must come again");
    assert!(
        nacked_at.elapsed() >= DELAY - Duration::from_millis(100),
        "redelivered after {:?}, before the {DELAY:?} delay",
        nacked_at.elapsed()
    );
    assert_eq!(again[0].message.msg_id, "m1");
    assert_eq!(again[0].attempt, 2);
    if let Some(error) = &again[0].last_error {
        assert_eq!(error, "boom");
    }
    ack_all(again).await;
}

/// A parked message sits on `<topic>.dlq` with its reason; replay puts it back on the topic
/// for every group and removes it from the dead letters.
async fn dead_letter_and_replay(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("dead");
    let dlq = dlq_topic(&topic);
    let body = Bytes::from_static(br#"{"order":42}"#);
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&topic, "m1", body.clone()).await.expect("publish");
    let got = take(&mut sub, 1, PATIENCE).await;
    assert_eq!(got.len(), 1);
    let d = got.into_iter().next().expect("one delivery");
    DeadLetter::park(b.as_ref(), "g", d, "handler failed: boom".into())
        .await
        .expect("park");
    assert_pending(b, &topic, "g", 0).await;

    let listed = b.read(&dlq, 10).await.expect("read dlq");
    assert_eq!(listed.len(), 1, "one dead letter");
    let dead: DeadLetter = serde_json::from_slice(&listed[0].body).expect("a dead letter");
    assert_eq!(dead.topic, topic);
    assert_eq!(dead.group, "g");
    assert_eq!(dead.msg_id, "m1");
    assert_eq!(dead.attempts, 1);
    assert_eq!(dead.reason, "handler failed: boom");
    assert_eq!(dead.body.as_bytes(), &body[..]);
    assert_eq!(listed[0].msg_id, "g:m1");

    dead.replay(b.as_ref(), listed[0].seq).await.expect("replay");
    assert!(
        b.read(&dlq, 10).await.expect("read dlq").is_empty(),
        "replayed letter left the dlq"
    );

    // The group that gave up sees the replayed message as a new one.
    let again = take(&mut sub, 1, PATIENCE).await;
    assert_eq!(again.len(), 1, "the replay reaches the original group");
    assert!(
        again[0].message.msg_id.starts_with("m1.replay."),
        "{}",
        again[0].message.msg_id
    );
    assert_eq!(again[0].message.body, body);
    ack_all(again).await;

    // A group that joins afterwards finds the original and the replay.
    let mut fresh = b
        .subscribe(&topic, "fresh", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    let seen = take(&mut fresh, 2, PATIENCE).await;
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .any(|d| d.message.msg_id.starts_with("m1.replay.") && d.message.body == body));
    ack_all(seen).await;
}

/// Publishing the same message id twice stores and delivers it once.
async fn publish_deduplicates(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("dedup");
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&topic, "same", Bytes::from_static(b"first"))
        .await
        .expect("publish");
    b.publish(&topic, "same", Bytes::from_static(b"second"))
        .await
        .expect("publish again");
    b.publish(&topic, "other", Bytes::from_static(b"third"))
        .await
        .expect("publish other");

    let got = take(&mut sub, 3, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 2, "the duplicate must not be delivered");
    let same: Vec<_> = got.iter().filter(|d| d.message.msg_id == "same").collect();
    assert_eq!(same.len(), 1);
    assert_eq!(
        same[0].message.body,
        Bytes::from_static(b"first"),
        "the first publish wins"
    );
    ack_all(got).await;
    assert_eq!(b.read(&topic, 10).await.expect("read").len(), 2);
}

/// A batch across two topics arrives whole, in order per topic, and a message of it already
/// published (a relay repeating a batch that failed half-way) is stored once.
async fn a_batch_arrives_whole_in_order_and_deduplicated(ctx: Ctx) {
    let b = &ctx.broker;
    let (first, second) = (ctx.topic("batch-a"), ctx.topic("batch-b"));
    let mut sub_a = b
        .subscribe(&first, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    let mut sub_b = b
        .subscribe(&second, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&first, "a-0", Bytes::from_static(b"already"))
        .await
        .expect("publish");
    let ids: Vec<String> = (0..40)
        .map(|i| format!("{}-{i}", if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    let batch: Vec<Outgoing<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Outgoing {
            topic: if i % 2 == 0 { &first } else { &second },
            msg_id: id,
            body: Bytes::from(format!("{i}")),
        })
        .collect();
    b.publish_batch(&batch).await.expect("publish the batch");
    let got_a = take(&mut sub_a, 20, Duration::from_secs(3)).await;
    let got_b = take(&mut sub_b, 20, Duration::from_secs(3)).await;
    let bodies = |got: &[Delivery]| -> Vec<String> {
        got.iter()
            .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
            .collect()
    };
    let want_a: Vec<String> = std::iter::once("already".to_string())
        .chain((2..40).step_by(2).map(|i| i.to_string()))
        .collect();
    let want_b: Vec<String> = (1..40).step_by(2).map(|i| i.to_string()).collect();
    assert_eq!(bodies(&got_a), want_a, "in order, the earlier a-0 kept");
    assert_eq!(bodies(&got_b), want_b);
    ack_all(got_a).await;
    ack_all(got_b).await;
}

/// What was published survives the broker being closed and opened again; acked messages
/// stay acked, unacked ones come back.
async fn durable_across_restart(ctx: Ctx) {
    let topic = ctx.topic("durable");
    {
        let before = ctx.reopen().await;
        let mut sub = before
            .subscribe(&topic, "g", options(SHORT_ACK_WAIT))
            .await
            .expect("subscribe");
        publish_n(&before, &topic, "m", 3).await;
        let mut got = take(&mut sub, 3, PATIENCE).await;
        assert_eq!(got.len(), 3);
        got.sort_by_key(|d| d.message.seq);
        let first = got.remove(0);
        assert_eq!(first.message.msg_id, "m-0");
        first.ack().await.expect("ack");
        // The process dies: deliveries, subscription and broker go without acking the rest.
    }

    let after = ctx.reopen().await;
    let mut sub = after
        .subscribe(&topic, "g", options(SHORT_ACK_WAIT))
        .await
        .expect("subscribe");
    let got = take(&mut sub, 2, PATIENCE).await;
    let want: HashSet<String> = ["m-1".to_string(), "m-2".to_string()].into();
    assert_eq!(ids(&got), want, "unacked messages come back, the acked one does not");
    assert!(got.iter().all(|d| d.attempt == 2));
    ack_all(got).await;
    assert_quiet(&mut sub, SHORT_ACK_WAIT * 2, "nothing else after a restart").await;
    assert_eq!(
        after.read(&topic, 10).await.expect("read").len(),
        3,
        "the log kept every message"
    );
}

/// `pending` is the group's lag: published but not yet acked, in flight or not.
async fn pending_reports_lag(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("lag");
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    assert_pending(b, &topic, "g", 0).await;
    publish_n(b, &topic, "m", 5).await;
    assert_pending(b, &topic, "g", 5).await;
    assert_eq!(b.pending(&topic, "never-joined").await.expect("pending"), 0);

    let mut got = take(&mut sub, 5, PATIENCE).await;
    assert_eq!(got.len(), 5);
    assert_pending(b, &topic, "g", 5).await;
    let rest = got.split_off(3);
    ack_all(got).await;
    assert_pending(b, &topic, "g", 2).await;
    ack_all(rest).await;
    assert_pending(b, &topic, "g", 0).await;
}

/// Bodies are bytes: whatever is published (not JSON, not UTF-8) is delivered unchanged;
/// deciding what is poison is the consumer runner's job.
async fn bodies_arrive_unchanged(ctx: Ctx) {
    let b = &ctx.broker;
    let topic = ctx.topic("bytes");
    let body = Bytes::from_static(b"\xff\x00not json {\x80\n");
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    b.publish(&topic, "poison", body.clone()).await.expect("publish");
    let got = take(&mut sub, 1, PATIENCE).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.body, body);
    assert_eq!(got[0].message.msg_id, "poison");
    ack_all(got).await;
}

/// A fetch waits for the first message, not for its whole wait: a consumer on a quiet topic
/// reacts to a publish at once.
async fn waiting_fetch_returns_on_publish(ctx: Ctx) {
    let b = ctx.broker.clone();
    let topic = ctx.topic("wake");
    let mut sub = b
        .subscribe(&topic, "g", options(LONG_ACK_WAIT))
        .await
        .expect("subscribe");
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let got = sub.fetch(10, Duration::from_secs(20)).await.expect("fetch");
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.publish(&topic, "m1", Bytes::from_static(b"x"))
        .await
        .expect("publish");
    let (got, waited) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the fetch returned after the publish")
        .expect("fetch task");
    assert_eq!(ids(&got), HashSet::from(["m1".to_string()]));
    assert!(waited < Duration::from_secs(5), "fetch waited {waited:?}");
    ack_all(got).await;
}

/// A NATS URL with no server behind it fails within seconds, saying where it looked.
#[tokio::test]
async fn unreachable_nats_fails_fast_and_clearly() {
    let started = Instant::now();
    let error = match broker::connect("nats://127.0.0.1:1").await {
        Ok(_) => panic!("connected to a port with no server"),
        Err(e) => e.to_string(),
    };
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.contains("nats://127.0.0.1:1"), "{error}");
}
