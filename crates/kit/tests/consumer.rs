//! The consumer runner: poison messages and exhausted retries go to the dead-letter topic with
//! their reason and never block the messages behind them; a dead letter can be replayed.

use bazaar_kit::store;
use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bazaar_kit::{
    broker::{self, dlq_topic, DeadLetter, SharedBroker},
    consumer::{self, ConsumerConfig, Handler, HandlerError},
    envelope::{Envelope, Metadata},
    outbox::{self, Outbox},
    shutdown,
    store::{Migration, Store, Tx},
};
use bytes::Bytes;
use futures_util::future::BoxFuture;

const SINK: &[Migration] = &[Migration::new(
    10,
    "handled",
    "CREATE TABLE handled (event_id TEXT NOT NULL, event_type TEXT NOT NULL)",
)];

/// Knows `test.ok`; `test.flaky` fails until `heal` is set; `test.half` writes its row and
/// then turns out to be poison; anything else is poison.
struct TestHandler {
    flaky_failures: AtomicU32,
    heal_after: u32,
}

impl Handler for TestHandler {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            match event.event_type.as_str() {
                "test.ok" => {}
                "test.half" => {
                    store::query("INSERT INTO handled (event_id, event_type) VALUES ($1, 'test.half')")
                        .bind(event.event_id.to_string())
                        .execute(&mut *tx)
                        .await?;
                    return Err(HandlerError::Poison("half-way through, the event made no sense".into()));
                }
                "test.flaky" => {
                    if self.flaky_failures.fetch_add(1, Ordering::SeqCst) < self.heal_after {
                        return Err(HandlerError::Transient("the ledger is down".into()));
                    }
                }
                other => return Err(HandlerError::Poison(format!("unknown event type `{other}`"))),
            }
            store::query("INSERT INTO handled (event_id, event_type) VALUES ($1, $2)")
                .bind(event.event_id.to_string())
                .bind(&event.event_type)
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sink: Store,
    broker: SharedBroker,
    topic: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Store::open(&format!("sqlite://{}/sink.db", dir.path().display()))
        .await
        .expect("store");
    let all: Vec<Migration> = outbox::MIGRATIONS.iter().chain(SINK).copied().collect();
    sink.migrate(&all).await.expect("migrate");
    let broker = broker::connect(&format!("sqlite://{}/bus.db", dir.path().display()))
        .await
        .expect("broker");
    Fixture {
        _dir: dir,
        sink,
        broker,
        topic: "consumer.test".into(),
    }
}

async fn publish(broker: &SharedBroker, topic: &str, event_type: &str) -> String {
    let e = Envelope::new(event_type, "a1", serde_json::json!({}), Metadata::default());
    broker
        .publish(topic, &e.event_id.to_string(), Bytes::from(e.to_vec()))
        .await
        .expect("publish");
    e.event_id.to_string()
}

async fn handled(sink: &Store) -> Vec<String> {
    store::query("SELECT event_type FROM handled ORDER BY event_type")
        .fetch_all(sink)
        .await
        .expect("handled")
        .iter()
        .map(|r| r.try_get::<String, _>(0).expect("a column"))
        .collect()
}

async fn dead_letters(broker: &SharedBroker, topic: &str, n: usize) -> Vec<(u64, DeadLetter)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead: Vec<(u64, DeadLetter)> = broker
            .read(&dlq_topic(topic), 100)
            .await
            .expect("read dlq")
            .into_iter()
            .map(|m| (m.seq, serde_json::from_slice(&m.body).expect("dead letter json")))
            .collect();
        if dead.len() >= n {
            return dead;
        }
        assert!(Instant::now() < deadline, "only {} of {n} dead letters", dead.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a consumer of `f`'s topic whose flaky events never fail, allowing five attempts;
/// it stops when the returned trigger is dropped.
fn run_healthy_consumer(f: &Fixture) -> shutdown::ShutdownTrigger {
    let (stop, shut) = shutdown::channel();
    let handler = Arc::new(TestHandler {
        flaky_failures: AtomicU32::new(0),
        heal_after: 0,
    });
    consumer::spawn(
        Outbox::new(f.sink.clone()),
        f.broker.clone(),
        config(&f.topic, 5),
        handler,
        shut,
    );
    stop
}

fn config(topic: &str, max_attempts: u32) -> ConsumerConfig {
    let mut c = ConsumerConfig::new("g", topic);
    c.max_attempts = max_attempts;
    c.ack_wait = Duration::from_secs(2);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_block_nothing() {
    let f = fixture().await;
    f.broker
        .publish(&f.topic, "not-json", Bytes::from_static(b"{oops"))
        .await
        .expect("publish");
    let unknown = publish(&f.broker, &f.topic, "test.mystery").await;
    publish(&f.broker, &f.topic, "test.ok").await;
    let _stop = run_healthy_consumer(&f);

    let dead = dead_letters(&f.broker, &f.topic, 2).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, d)| d.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("malformed envelope")), "{reasons:?}");
    let mystery = dead
        .iter()
        .find(|(_, d)| d.msg_id == unknown)
        .expect("unknown type dead-lettered");
    assert!(
        mystery.1.reason.contains("unknown event type `test.mystery`"),
        "{}",
        mystery.1.reason
    );
    assert_eq!(mystery.1.group, "g");
    assert_eq!(mystery.1.attempts, 1, "poison is not retried");

    let deadline = Instant::now() + Duration::from_secs(10);
    while handled(&f.sink).await != ["test.ok"] {
        assert!(
            Instant::now() < deadline,
            "the good message behind the poison was not handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(f.broker.pending(&f.topic, "g").await.expect("pending"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_its_good_events_once_and_leaves_nothing_of_a_failed_one() {
    let f = fixture().await;
    let first = publish(&f.broker, &f.topic, "test.ok").await;
    let half = publish(&f.broker, &f.topic, "test.half").await;
    // The same event again under another message id: only the inbox can tell.
    let mut copy = Envelope::new("test.ok", "a1", serde_json::json!({}), Metadata::default());
    copy.event_id = first.parse().expect("uuid");
    f.broker
        .publish(&f.topic, "copy-of-first", Bytes::from(copy.to_vec()))
        .await
        .expect("publish");
    publish(&f.broker, &f.topic, "test.ok").await;
    let _stop = run_healthy_consumer(&f);
    let dead = dead_letters(&f.broker, &f.topic, 1).await;
    assert_eq!(dead[0].1.msg_id, half);
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.broker.pending(&f.topic, "g").await.expect("pending") > 0 {
        assert!(Instant::now() < deadline, "the batch was not settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        handled(&f.sink).await,
        ["test.ok", "test.ok"],
        "each good event once, nothing of the failed one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_with_the_last_error_and_replay_handles_it_once() {
    let f = fixture().await;
    let flaky = publish(&f.broker, &f.topic, "test.flaky").await;
    let (stop, shut) = shutdown::channel();
    let handler = Arc::new(TestHandler {
        flaky_failures: AtomicU32::new(0),
        heal_after: 3,
    });
    consumer::spawn(
        Outbox::new(f.sink.clone()),
        f.broker.clone(),
        config(&f.topic, 3),
        handler.clone(),
        shut.clone(),
    );

    let dead = dead_letters(&f.broker, &f.topic, 1).await;
    let (seq, letter) = &dead[0];
    assert_eq!(letter.msg_id, flaky);
    assert_eq!(letter.attempts, 3);
    assert!(letter.reason.contains("the ledger is down"), "{}", letter.reason);
    assert!(handled(&f.sink).await.is_empty());

    // The ledger is back (the handler heals after 3 failures): replay the dead letter.
    letter.replay(f.broker.as_ref(), *seq).await.expect("replay");
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled(&f.sink).await != ["test.flaky"] {
        assert!(Instant::now() < deadline, "the replayed message was not handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(f.broker.read(&dlq_topic(&f.topic), 10).await.expect("dlq").is_empty());
    stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_dead_letter_through_its_own_handler_once() {
    let f = fixture().await;
    let flaky = publish(&f.broker, &f.topic, "test.flaky").await;
    let (stop, shut) = shutdown::channel();
    let handler = Arc::new(TestHandler {
        flaky_failures: AtomicU32::new(0),
        heal_after: 4,
    });
    let outbox = Outbox::new(f.sink.clone());
    consumer::spawn(
        outbox.clone(),
        f.broker.clone(),
        config(&f.topic, 3),
        handler.clone(),
        shut.clone(),
    );
    dead_letters(&f.broker, &f.topic, 1).await;
    let listed = consumer::dead_letters(f.broker.as_ref(), "g", &f.topic, 100)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].letter.msg_id, flaky);
    assert!(
        consumer::dead_letters(f.broker.as_ref(), "another-group", &f.topic, 100)
            .await
            .expect("list")
            .is_empty()
    );
    let seq = listed[0].seq;
    let cfg = config(&f.topic, 3);

    // The ledger is still down (a fourth failure): the dead letter stays.
    let still = consumer::replay(&outbox, f.broker.as_ref(), &cfg, handler.as_ref(), seq).await;
    assert!(
        matches!(&still, Err(consumer::ReplayError::StillFailing(r)) if r.contains("the ledger is down")),
        "{still:?}"
    );
    assert_eq!(dead_letters(&f.broker, &f.topic, 1).await.len(), 1);

    // Healed: handled once, in the handler's own transaction, and the dead letter is gone.
    let replayed = consumer::replay(&outbox, f.broker.as_ref(), &cfg, handler.as_ref(), seq).await;
    assert_eq!(replayed.expect("replayed"), consumer::Replayed::Handled);
    assert_eq!(handled(&f.sink).await, ["test.flaky"]);
    assert!(f.broker.read(&dlq_topic(&f.topic), 10).await.expect("dlq").is_empty());
    let again = consumer::replay(&outbox, f.broker.as_ref(), &cfg, handler.as_ref(), seq).await;
    assert!(
        matches!(again, Err(consumer::ReplayError::NotFound { .. })),
        "{again:?}"
    );
    stop.trigger();
}

/// Notes which aggregates are being handled at once, and in what order each one's events
/// (numbered `n` in their payload) began.
#[derive(Default)]
struct Overlaps {
    in_flight: std::sync::Mutex<Vec<String>>,
    most_at_once: AtomicU32,
    same_aggregate_at_once: std::sync::atomic::AtomicBool,
    began: std::sync::Mutex<Vec<(String, i64)>>,
}

impl Handler for Overlaps {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let aggregate = event.aggregate_id.clone();
            {
                let mut in_flight = self.in_flight.lock().expect("lock");
                if in_flight.contains(&aggregate) {
                    self.same_aggregate_at_once.store(true, Ordering::SeqCst);
                }
                in_flight.push(aggregate.clone());
                self.most_at_once.fetch_max(in_flight.len() as u32, Ordering::SeqCst);
            }
            let n = event.payload["n"].as_i64().unwrap_or(-1);
            self.began.lock().expect("lock").push((aggregate.clone(), n));
            // Long enough that events handled one after another could not overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            store::query("INSERT INTO handled (event_id, event_type) VALUES ($1, $2)")
                .bind(event.event_id.to_string())
                .bind(&event.event_type)
                .execute(&mut *tx)
                .await?;
            let mut in_flight = self.in_flight.lock().expect("lock");
            if let Some(at) = in_flight.iter().position(|a| *a == aggregate) {
                in_flight.remove(at);
            }
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_batch_handles_aggregates_side_by_side_and_each_ones_events_in_order() {
    let Some(db) = bazaar_testkit::TestDb::postgres("consumer_lanes").await else {
        return;
    };
    let sink = db.open().await;
    let all: Vec<Migration> = outbox::MIGRATIONS.iter().chain(SINK).copied().collect();
    sink.migrate(&all).await.expect("migrate");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker::connect(&format!("sqlite://{}/bus.db", dir.path().display()))
        .await
        .expect("broker");
    let topic = "consumer.lanes";
    // Subscribed first, so the group sees every event; all of them fit in one fetch.
    drop(
        broker
            .subscribe(topic, "g", broker::SubscribeOptions::default())
            .await
            .expect("subscribe"),
    );
    for n in 0..3 {
        for aggregate in ["a", "b", "c", "d"] {
            let e = Envelope::new("test.ok", aggregate, serde_json::json!({ "n": n }), Metadata::default());
            broker
                .publish(topic, &e.event_id.to_string(), Bytes::from(e.to_vec()))
                .await
                .expect("publish");
        }
    }
    let overlaps = Arc::new(Overlaps::default());
    let (stop, shut) = shutdown::channel();
    let tasks = consumer::spawn(
        Outbox::new(sink.clone()),
        broker.clone(),
        config(topic, 5),
        overlaps.clone(),
        shut,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.pending(topic, "g").await.expect("pending") > 0 {
        assert!(Instant::now() < deadline, "the events were not all handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stop);
    for task in tasks {
        task.await.expect("the runner stops");
    }
    assert_eq!(handled(&sink).await.len(), 12, "every event once");
    assert!(
        !overlaps.same_aggregate_at_once.load(Ordering::SeqCst),
        "two events of one aggregate were handled at once"
    );
    assert!(
        overlaps.most_at_once.load(Ordering::SeqCst) > 1,
        "the batch's aggregates were handled one after another"
    );
    let began = overlaps.began.lock().expect("lock").clone();
    for aggregate in ["a", "b", "c", "d"] {
        let order: Vec<i64> = began.iter().filter(|(a, _)| a == aggregate).map(|(_, n)| *n).collect();
        assert_eq!(order, [0, 1, 2], "aggregate {aggregate}'s events out of order");
    }
    sink.close().await;
    db.drop_database().await;
}

/// A participant whose every attempt fails as a refused write would.
struct Refusing;

impl bazaar_saga::Participant for Refusing {
    fn act<'a>(
        &'a self,
        _tx: &'a mut Tx,
        _command: &'a Envelope,
    ) -> BoxFuture<'a, Result<bazaar_saga::Verdict, HandlerError>> {
        Box::pin(async {
            Err(HandlerError::Transient(
                "violates check constraint \"product_check\"".into(),
            ))
        })
    }
}

/// Inventory answering commands from orders with [`Refusing`].
fn refusing_inventory() -> bazaar_saga::Participates<Refusing> {
    bazaar_saga::Participates {
        source: "inventory",
        commands_from: "orders",
        replies_on: "replies",
        participant: Refusing,
    }
}

/// A saga command for step `step` of saga `saga`, claiming to come from `source`.
fn saga_command(saga: &str, step: &str, source: &str) -> Envelope {
    let header = bazaar_saga::CommandHeader {
        saga_id: saga.into(),
        step: step.into(),
        compensation: false,
        reply_to: "replies".into(),
        reply_type: "saga.reply".into(),
    };
    let metadata = Metadata {
        source: source.into(),
        ..Metadata::default()
    };
    Envelope::new(
        "stock.commit",
        saga,
        serde_json::to_value(header).expect("a header"),
        metadata,
    )
}

/// Publishes `commands` to refusing inventory allowing `max_attempts` each, waits until all
/// are dead-lettered, and returns the replies it wrote.
async fn dead_lettered_replies(f: &Fixture, commands: &[&Envelope], max_attempts: u32) -> Vec<Envelope> {
    for command in commands {
        f.broker
            .publish(&f.topic, &command.event_id.to_string(), Bytes::from(command.to_vec()))
            .await
            .expect("publish");
    }
    let (stop, shut) = shutdown::channel();
    consumer::spawn(
        Outbox::new(f.sink.clone()),
        f.broker.clone(),
        config(&f.topic, max_attempts),
        Arc::new(refusing_inventory()),
        shut,
    );
    dead_letters(&f.broker, &f.topic, commands.len()).await;
    stop.trigger();
    store::query("SELECT body FROM outbox WHERE topic = 'replies'")
        .fetch_all(&f.sink)
        .await
        .expect("the outbox")
        .iter()
        .map(|r| Envelope::from_slice(r.try_get::<String, _>(0).expect("a body").as_bytes()).expect("an envelope"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_fails_every_attempt_tells_its_saga_that_it_was_given_up() {
    let f = fixture().await;
    let given_up = saga_command("s1", "commitStock", "orders");
    let forged = saga_command("s2", "commitStock", "mallory");

    let replies = dead_lettered_replies(&f, &[&given_up, &forged], 2).await;

    assert_eq!(
        replies.len(),
        1,
        "one reply, and none to the forged command: {replies:?}"
    );
    let reply: bazaar_saga::SagaReply = replies[0].payload_as().expect("a saga reply");
    assert_eq!((reply.saga_id.as_str(), reply.step.as_str()), ("s1", "commitStock"));
    assert!(!reply.ok && reply.dead, "{reply:?}");
    let reason = reply.reason.expect("a reason");
    assert!(
        reason.contains("product_check") && reason.contains("gave up after 2 attempts"),
        "{reason}"
    );
    assert_eq!(replies[0].metadata.causation_id, Some(given_up.event_id.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_handled_after_all_is_not_reported_as_given_up_when_its_copy_runs_out_of_attempts() {
    let f = fixture().await;
    let handled = saga_command("s1", "commitStock", "orders");
    let never = saga_command("s2", "commitStock", "orders");
    // The first was handled (its ack lost): the inbox holds it.
    store::query("INSERT INTO inbox (grp, event_id, handled_at) VALUES ('g', $1, 0)")
        .bind(handled.event_id.to_string())
        .execute(&f.sink)
        .await
        .expect("inbox");

    // No attempt left for any delivery: each is parked as it arrives.
    let replies = dead_lettered_replies(&f, &[&handled, &never], 0).await;

    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].aggregate_id, "s2", "only the command never handled");
}
