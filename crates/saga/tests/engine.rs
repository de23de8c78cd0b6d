//! The saga engine's guarantees, driven without a broker.
//!
//! The test plays every participant: it reads the commands the engine wrote to the `outbox`
//! table, builds replies with [`CommandHeader::reply`] and feeds them to
//! [`SagaEngine::on_reply`], one transaction each, as the orders role's reply consumer would.
//! Time moves with [`SagaEngine::tick`] after sleeping past a step's (short) timeout. Where a
//! wait would include the engine's resend backoff (seconds, growing to 30 s), the test sets the
//! saga's `deadline` column to 0 instead of sleeping; see [`Orchestrator::expire`].
//!
//! Each case is an async function over a [`Db`]; the `saga_cases!` macro makes
//! `sqlite::<case>` (a file in a temp dir) and `postgres::<case>` of it. PostgreSQL cases run
//! when `BAZAAR_TEST_POSTGRES_URL` names a server: each creates its own database
//! `saga_<uuid>` through that URL and drops it afterwards, passed or failed.
//!
//! ```text
//! BAZAAR_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres cargo nextest run -p bazaar-saga --test engine
//! ```

use bazaar_store as store;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use bazaar_core::{envelope::Envelope, shutdown};
use bazaar_messaging::{
    consumer::HandlerError,
    outbox::{self, Outbox},
};
use bazaar_saga::{
    self, CommandHeader, Flows, SagaEngine, SagaFlow, SagaState, SagaStatus, SagaStep, Step, Stopped, Verdict,
    COMPENSATION_ATTEMPTS,
};
use bazaar_store::testing::TestDb;
use bazaar_store::{now_millis, Store, Tx};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

/// How long each step waits for a reply before the timer resends it.
const TIMEOUT: Duration = Duration::from_millis(100);
/// Sends of a step's execute command before it counts as failed.
const MAX_ATTEMPTS: u32 = 2;
/// The kind the test flow stores with each saga.
const KIND: &str = "test";

/// The test flow's steps: A and B can be undone, C cannot (the pivot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestStep {
    A,
    B,
    C,
}

impl SagaStep for TestStep {
    fn name(self) -> &'static str {
        match self {
            TestStep::A => "A",
            TestStep::B => "B",
            TestStep::C => "C",
        }
    }
}

/// The saga's id and whatever the steps reported, merged key by key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TestContext {
    order_id: String,
    #[serde(flatten)]
    reported: Map<String, Value>,
}

/// Three steps: A and B can be undone, C cannot.
struct TestFlow {
    kind: &'static str,
    steps: Vec<Step<TestStep>>,
}

impl TestFlow {
    fn new() -> TestFlow {
        let remote = |step, topic, execute, compensate| Step {
            step,
            topic,
            participant: "participant",
            execute,
            compensate,
            timeout: TIMEOUT,
            max_attempts: MAX_ATTEMPTS,
        };
        TestFlow {
            kind: KIND,
            steps: vec![
                remote(TestStep::A, "a", "a.do", Some("a.undo")),
                remote(TestStep::B, "b", "b.do", Some("b.undo")),
                remote(TestStep::C, "c", "c.do", None),
            ],
        }
    }

    /// A flow, `forward`, of one step that cannot be undone (Y, sent as `y.do`).
    fn forward() -> TestFlow {
        TestFlow {
            kind: "forward",
            steps: vec![Step {
                step: TestStep::C,
                topic: "y",
                participant: "participant",
                execute: "y.do",
                compensate: None,
                timeout: TIMEOUT,
                max_attempts: MAX_ATTEMPTS,
            }],
        }
    }

    /// Another flow, `other`, of one step that can be undone (X, sent as `x.do`).
    fn other() -> TestFlow {
        TestFlow {
            kind: "other",
            steps: vec![Step {
                step: TestStep::A,
                topic: "x",
                participant: "participant",
                execute: "x.do",
                compensate: Some("x.undo"),
                timeout: TIMEOUT,
                max_attempts: MAX_ATTEMPTS,
            }],
        }
    }
}

impl SagaFlow for TestFlow {
    type Step = TestStep;
    type Context = TestContext;

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn steps(&self) -> &[Step<TestStep>] {
        &self.steps
    }

    fn command(&self, _step: TestStep, _compensation: bool, context: &TestContext) -> Result<Value, String> {
        Ok(json!({ "orderId": context.order_id }))
    }

    /// Keeps an object's keys; anything else does not fit.
    fn record(&self, _step: TestStep, context: &mut TestContext, data: Value) -> Result<(), String> {
        match data {
            Value::Object(map) => {
                context.reported.extend(map);
                Ok(())
            }
            other => Err(format!("expected an object, got {other}")),
        }
    }

    /// Records each final status in order, so a test sees how often the hook ran and with what.
    fn finished<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga: &'a SagaState<TestContext>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            store::query(
                "INSERT INTO saga_finished (n, saga_id, status, error)
                 SELECT COUNT(*) + 1, $1, $2, $3 FROM saga_finished",
            )
            .bind(&saga.id)
            .bind(saga.status.as_str())
            .bind(saga.error.clone())
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }
}

type Db = TestDb;

/// A saga command the engine left in the outbox.
#[derive(Debug, Clone)]
struct Command {
    /// The outbox row id: the order commands were written in.
    row: i64,
    topic: String,
    envelope: Envelope,
    header: CommandHeader,
}

impl Command {
    fn event_type(&self) -> &str {
        &self.envelope.event_type
    }
}

/// The orchestrator's side of a case: its store and an engine on it.
struct Orchestrator {
    store: Store,
    engine: Arc<SagaEngine<TestFlow>>,
}

impl Orchestrator {
    /// Opens (and migrates) the store at `db`, as a starting orchestrator process would.
    async fn open(db: &Db) -> Orchestrator {
        let store = Store::open(&db.url).await.expect("open the store");
        let mut all: Vec<_> = outbox::MIGRATIONS
            .iter()
            .chain(bazaar_saga::MIGRATIONS)
            .copied()
            .collect();
        all.sort_by_key(|m| m.version);
        store.migrate(&all).await.expect("migrations");
        store::query(
            "CREATE TABLE IF NOT EXISTS saga_finished (
                n BIGINT NOT NULL, saga_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT)",
        )
        .execute(&store)
        .await
        .expect("create the finished table");
        let engine = SagaEngine::new(
            TestFlow::new(),
            Outbox::new(store.clone()),
            "orders",
            "replies",
            "saga.reply",
        );
        Orchestrator {
            store,
            engine: Arc::new(engine),
        }
    }

    async fn start(&self, id: &str) -> SagaState<TestContext> {
        let mut tx = self.store.begin().await.expect("begin");
        let state = self
            .engine
            .start(
                &mut tx,
                id,
                TestContext {
                    order_id: id.to_string(),
                    reported: Map::new(),
                },
                "corr",
            )
            .await
            .expect("start the saga");
        tx.commit().await.expect("commit the start");
        state
    }

    async fn state(&self, id: &str) -> SagaState<TestContext> {
        self.engine.load(id).await.expect("load").expect("the saga exists")
    }

    /// Every command sent so far, in the order the engine wrote them.
    async fn commands(&self) -> Vec<Command> {
        commands(&self.store).await
    }

    /// The commands sent for saga `id`.
    async fn commands_of(&self, id: &str) -> Vec<Command> {
        let mut all = self.commands().await;
        all.retain(|c| c.header.saga_id == id);
        all
    }

    /// The event types of saga `id`'s commands, in order: what the participants saw.
    async fn sent(&self, id: &str) -> Vec<String> {
        self.commands_of(id)
            .await
            .iter()
            .map(|c| c.event_type().to_string())
            .collect()
    }

    /// The newest command of saga `id`.
    async fn last_command(&self, id: &str) -> Command {
        self.commands_of(id).await.pop().expect("a command was sent")
    }

    /// Answers `command` as its participant would and returns the reply, for redelivery.
    async fn answer(&self, command: &Command, result: Result<Value, String>) -> Envelope {
        let (topic, reply) = reply(command, result);
        assert_eq!(topic, "replies");
        self.deliver(&reply).await;
        reply
    }

    /// Hands `reply` to the engine in its own transaction, as the reply consumer does.
    async fn deliver(&self, reply: &Envelope) {
        deliver(&self.store, &self.engine, reply).await;
    }

    /// Makes saga `id`'s current wait end now. The engine adds a backoff of seconds to every
    /// resend and compensation retry; the test skips that wait rather than sleeping through it.
    async fn expire(&self, id: &str) {
        store::query("UPDATE saga SET deadline = 0 WHERE id = $1")
            .bind(id)
            .execute(&self.store)
            .await
            .expect("expire the deadline");
    }

    /// The statuses the finished hook saw for saga `id`, in order.
    async fn finished(&self, id: &str) -> Vec<String> {
        store::query("SELECT status FROM saga_finished WHERE saga_id = $1 ORDER BY n")
            .bind(id)
            .fetch_all(&self.store)
            .await
            .expect("read the finished table")
            .iter()
            .map(|r| r.try_get::<String, _>("status").expect("status"))
            .collect()
    }

    async fn history(&self, id: &str) -> Vec<String> {
        self.engine
            .history(id)
            .await
            .expect("history")
            .into_iter()
            .map(|h| format!("{} {}", h.step, h.entry))
            .collect()
    }

    async fn tick(&self) -> usize {
        self.engine.tick().await.expect("tick")
    }

    /// Asks saga `id` to stop for `reason`, in a transaction of its own.
    async fn stop(&self, id: &str, reason: &str) -> Stopped {
        let mut tx = self.store.begin().await.expect("begin");
        let stopped = self.engine.stop(&mut tx, id, reason).await.expect("stop");
        Outbox::new(self.store.clone())
            .commit(tx)
            .await
            .expect("commit the stop");
        stopped
    }
}

async fn commands(store: &Store) -> Vec<Command> {
    store::query("SELECT id, topic, body FROM outbox ORDER BY id")
        .fetch_all(store)
        .await
        .expect("read the outbox")
        .iter()
        .map(|r| {
            let body: String = r.try_get("body").expect("body");
            let envelope = Envelope::from_slice(body.as_bytes()).expect("an envelope");
            let header = CommandHeader::of(&envelope).expect("a saga command");
            Command {
                row: r.try_get("id").expect("id"),
                topic: r.try_get("topic").expect("topic"),
                envelope,
                header,
            }
        })
        .collect()
}

/// The participant's reply to `command`: done with the data, or refused for the reason.
fn reply(command: &Command, result: Result<Value, String>) -> (String, Envelope) {
    let verdict = match result {
        Ok(data) => Verdict::Done(data),
        Err(reason) => Verdict::Refused(reason),
    };
    command
        .header
        .reply(&command.envelope, "participant", verdict)
        .expect("an answer now")
}

async fn deliver(store: &Store, engine: &SagaEngine<TestFlow>, reply: &Envelope) {
    let mut tx = store.begin().await.expect("begin");
    engine.on_reply(&mut tx, reply).await.expect("handle the reply");
    tx.commit().await.expect("commit the reply");
}

/// How often the participants saw `event_type` for one saga.
fn count(sent: &[String], event_type: &str) -> usize {
    sent.iter().filter(|t| *t == event_type).count()
}

/// The whole saga row as a user would see it, for "nothing changed" comparisons.
fn snapshot(state: &SagaState<TestContext>) -> Value {
    serde_json::to_value(state).expect("a saga state serialises")
}

/// Every step succeeds: the saga completes once, in order, with every reply's data.
async fn all_steps_succeed(db: &Db) {
    let o = Orchestrator::open(db).await;
    let started = o.start("s1").await;
    assert_eq!(started.status, SagaStatus::Running);
    assert_eq!(started.kind, KIND);

    for (step, data) in [
        ("A", json!({"a": 1})),
        ("B", json!({"b": "two"})),
        ("C", json!({"c": [3]})),
    ] {
        let command = o.last_command("s1").await;
        assert_eq!(command.header.step, step);
        assert!(!command.header.compensation);
        o.answer(&command, Ok(data)).await;
    }

    let saga = o.state("s1").await;
    assert_eq!(saga.status, SagaStatus::Completed);
    assert_eq!(saga.deadline, None, "a finished saga waits for nothing");
    assert_eq!(saga.error, None);
    assert_eq!(
        json!(saga.context),
        json!({"orderId": "s1", "a": 1, "b": "two", "c": [3]})
    );
    assert_eq!(o.finished("s1").await, ["completed"]);
    assert_eq!(o.sent("s1").await, ["a.do", "b.do", "c.do"]);

    let commands = o.commands_of("s1").await;
    let topics: Vec<_> = commands.iter().map(|c| c.topic.as_str()).collect();
    assert_eq!(topics, ["a", "b", "c"]);
    for c in &commands {
        assert_eq!(c.envelope.payload["orderId"], "s1");
        assert_eq!(c.header.reply_to, "replies");
        assert_eq!(c.header.reply_type, "saga.reply");
        assert_eq!(
            c.envelope.metadata.correlation_id, "corr",
            "the request's correlation id travels on"
        );
        assert_eq!(c.envelope.metadata.source, "orders");
    }

    // Nothing is due once the saga is over.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(o.tick().await, 0);
    assert_eq!(o.commands().await.len(), 3);
    assert_eq!(o.history("s1").await.last().map(String::as_str), Some("- completed"));
}

/// A reply claiming to come from anyone but the step's participant (another service that
/// can publish to the reply topic, forging a result) is refused as poison and moves nothing.
async fn a_reply_from_another_service_is_refused_and_changes_nothing(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s9").await;
    let a = o.last_command("s9").await;
    let before = snapshot(&o.state("s9").await);
    let forged = a
        .header
        .reply(&a.envelope, "mallory", Verdict::Done(json!({"a": 1})))
        .expect("an answer now")
        .1;
    let mut tx = o.store.begin().await.expect("begin");
    let refused = o.engine.on_reply(&mut tx, &forged).await;
    tx.rollback().await.expect("rollback");
    match refused {
        Err(HandlerError::Poison(why)) => assert!(why.contains("mallory") && why.contains("participant"), "{why}"),
        other => panic!("a forged reply was not refused as poison: {other:?}"),
    }
    assert_eq!(snapshot(&o.state("s9").await), before);
    // The participant's own reply still counts.
    o.answer(&a, Ok(json!({"a": 1}))).await;
    assert_eq!(o.last_command("s9").await.event_type(), "b.do");
}

/// B fails: only A (done before it) is undone, C never runs, and the error says why.
async fn failed_step_compensates_earlier_steps(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s2").await;
    let a = o.last_command("s2").await;
    o.answer(&a, Ok(json!({"reserved": true}))).await;
    let b = o.last_command("s2").await;
    assert_eq!(b.event_type(), "b.do");
    o.answer(&b, Err("card declined".into())).await;

    let saga = o.state("s2").await;
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert_eq!(o.sent("s2").await, ["a.do", "b.do", "a.undo"]);
    let undo = o.last_command("s2").await;
    assert!(undo.header.compensation);
    assert_eq!(undo.header.step, "A");
    assert_eq!(undo.topic, "a");
    assert!(o.finished("s2").await.is_empty(), "not finished while compensating");

    o.answer(&undo, Ok(Value::Null)).await;
    let saga = o.state("s2").await;
    assert_eq!(saga.status, SagaStatus::Compensated);
    let error = saga.error.expect("a compensated saga says why");
    assert!(error.contains('B') && error.contains("card declined"), "error: {error}");
    assert_eq!(o.finished("s2").await, ["compensated"]);
    assert_eq!(o.sent("s2").await, ["a.do", "b.do", "a.undo"], "no C, no undo of B");
    assert_eq!(o.history("s2").await.last().map(String::as_str), Some("- compensated"));
}

/// Redelivered and late replies find the saga elsewhere and change nothing.
async fn duplicate_and_late_replies_change_nothing(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s3").await;
    let a = o.last_command("s3").await;
    let a_ok = o.answer(&a, Ok(json!({"a": 1}))).await;
    let b = o.last_command("s3").await;
    let b_ok = o.answer(&b, Ok(json!({"b": 2}))).await;

    // Now waiting on C: a second delivery of B's reply and a late one of A's are ignored.
    let before = snapshot(&o.state("s3").await);
    let outbox_before = o.commands().await.len();
    for reply in [&b_ok, &a_ok, &b_ok] {
        o.deliver(reply).await;
        assert_eq!(snapshot(&o.state("s3").await), before);
        assert_eq!(o.commands().await.len(), outbox_before);
    }

    // A reply for a saga this orchestrator never started is ignored too.
    let mut stranger = b_ok.clone();
    stranger.payload["sagaId"] = json!("no-such-saga");
    o.deliver(&stranger).await;
    assert_eq!(o.commands().await.len(), outbox_before);

    // After the saga completed, its replies change nothing and the hook does not run again.
    let c = o.last_command("s3").await;
    let c_ok = o.answer(&c, Ok(json!({"c": 3}))).await;
    let done = snapshot(&o.state("s3").await);
    assert_eq!(done["status"], "completed");
    for reply in [&c_ok, &a_ok] {
        o.deliver(reply).await;
        assert_eq!(snapshot(&o.state("s3").await), done);
    }
    assert_eq!(o.commands().await.len(), outbox_before, "completing sends nothing");
    assert_eq!(o.finished("s3").await, ["completed"]);

    // While compensating: a repeated failure and a late success of the failed step, and a
    // late success of the step being undone, are all ignored.
    o.start("s4").await;
    let a = o.last_command("s4").await;
    let a_ok = o.answer(&a, Ok(json!({}))).await;
    let b = o.last_command("s4").await;
    let b_failed = o.answer(&b, Err("no stock".into())).await;
    let (_, b_late_ok) = reply(&b, Ok(json!({"b": 1})));
    let compensating = snapshot(&o.state("s4").await);
    assert_eq!(compensating["status"], "compensating");
    let outbox_before = o.commands().await.len();
    for reply in [&b_failed, &b_late_ok, &a_ok] {
        o.deliver(reply).await;
        assert_eq!(snapshot(&o.state("s4").await), compensating);
        assert_eq!(o.commands().await.len(), outbox_before);
    }

    // A failed compensation, delivered twice, schedules one retry: the second delivery
    // (a few milliseconds later, so a moved deadline would show) changes nothing.
    let undo = o.last_command("s4").await;
    let undo_failed = o.answer(&undo, Err("ledger busy".into())).await;
    let retrying = snapshot(&o.state("s4").await);
    tokio::time::sleep(Duration::from_millis(20)).await;
    o.deliver(&undo_failed).await;
    assert_eq!(snapshot(&o.state("s4").await), retrying);
    assert_eq!(o.commands().await.len(), outbox_before);

    // Once the compensation is resent, the first attempt's failure arriving late again
    // neither reschedules nor resends.
    o.expire("s4").await;
    assert_eq!(o.tick().await, 1);
    let resent = snapshot(&o.state("s4").await);
    let outbox_before = o.commands().await.len();
    tokio::time::sleep(Duration::from_millis(20)).await;
    o.deliver(&undo_failed).await;
    assert_eq!(snapshot(&o.state("s4").await), resent);
    assert_eq!(o.commands().await.len(), outbox_before);

    // The compensation's own reply, delivered twice, finishes the saga once.
    let undo = o.last_command("s4").await;
    let undo_ok = o.answer(&undo, Ok(Value::Null)).await;
    let compensated = snapshot(&o.state("s4").await);
    o.deliver(&undo_ok).await;
    assert_eq!(snapshot(&o.state("s4").await), compensated);
    assert_eq!(o.finished("s4").await, ["compensated"]);
    assert_eq!(o.sent("s4").await, ["a.do", "b.do", "a.undo", "a.undo"]);
}

/// A saga the timer cannot handle (here a hand-corrupted row) is skipped, not allowed to
/// stall the deadlines of every saga behind it.
async fn one_broken_saga_does_not_stall_the_timer(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("broken").await;
    o.start("healthy").await;
    store::query("UPDATE saga SET context = 'not json', deadline = 0 WHERE id = 'broken'")
        .execute(&o.store)
        .await
        .expect("corrupt a saga");
    tokio::time::sleep(TIMEOUT + Duration::from_millis(50)).await;

    for _ in 0..2 {
        let _ = o.engine.tick().await;
    }
    assert_eq!(o.sent("healthy").await, ["a.do", "a.do"], "the healthy saga was resent");
    assert_eq!(o.state("healthy").await.attempts, 2);
    assert_eq!(o.sent("broken").await, ["a.do"]);
}

/// A silent step is resent after its timeout, then given up on and undone itself, since its
/// participant may still act on a command it received late.
async fn silent_step_is_resent_then_compensated(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s5").await;
    let a = o.last_command("s5").await;
    o.answer(&a, Ok(json!({}))).await;
    let first_b = o.last_command("s5").await;
    assert_eq!(first_b.event_type(), "b.do");

    assert_eq!(o.tick().await, 0, "nothing is due before the timeout");
    tokio::time::sleep(TIMEOUT + Duration::from_millis(50)).await;
    assert_eq!(o.tick().await, 1);
    let saga = o.state("s5").await;
    assert_eq!(saga.status, SagaStatus::Running);
    assert_eq!(saga.attempts, 2);
    let second_b = o.last_command("s5").await;
    assert_eq!(second_b.event_type(), "b.do");
    assert!(second_b.row > first_b.row, "a resend is a new outbox row");
    assert_ne!(second_b.envelope.event_id, first_b.envelope.event_id);
    assert_eq!(second_b.header, first_b.header);
    assert_eq!(o.tick().await, 0, "the resend waits again");

    // The second wait includes a backoff of seconds; skip it.
    o.expire("s5").await;
    assert_eq!(o.tick().await, 1);
    let saga = o.state("s5").await;
    assert_eq!(saga.status, SagaStatus::Compensating);
    let error = saga.error.expect("why it compensates");
    assert!(error.contains('B') && error.contains("no reply"), "error: {error}");
    assert_eq!(o.sent("s5").await, ["a.do", "b.do", "b.do", "b.undo"]);
    assert_eq!(count(&o.sent("s5").await, "b.do"), MAX_ATTEMPTS as usize);

    // B's participant answers the first send only now: too late, the saga is undoing it.
    let before = snapshot(&o.state("s5").await);
    o.answer(&first_b, Ok(json!({"b": 1}))).await;
    assert_eq!(snapshot(&o.state("s5").await), before);

    let undo_b = o.last_command("s5").await;
    assert_eq!((undo_b.header.step.as_str(), undo_b.header.compensation), ("B", true));
    o.answer(&undo_b, Ok(Value::Null)).await;
    let undo_a = o.last_command("s5").await;
    assert_eq!(undo_a.event_type(), "a.undo");
    o.answer(&undo_a, Ok(Value::Null)).await;
    assert_eq!(o.state("s5").await.status, SagaStatus::Compensated);
    assert_eq!(o.finished("s5").await, ["compensated"]);
    assert_eq!(o.sent("s5").await, ["a.do", "b.do", "b.do", "b.undo", "a.undo"]);
}

/// A compensation that keeps failing is retried with growing waits, then the saga is stuck
/// until an operator retries it.
async fn failing_compensation_is_retried_then_stuck(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s6").await;
    let a = o.last_command("s6").await;
    o.answer(&a, Ok(json!({}))).await;
    let b = o.last_command("s6").await;
    o.answer(&b, Err("declined".into())).await;

    let mut waits = Vec::new();
    loop {
        let undo = o.last_command("s6").await;
        assert_eq!(undo.event_type(), "a.undo");
        let sent_at = now_millis();
        o.answer(&undo, Err("ledger down".into())).await;
        let saga = o.state("s6").await;
        assert_eq!(saga.status, SagaStatus::Compensating);
        waits.push(saga.deadline.expect("a retry is scheduled") - sent_at);
        assert_eq!(o.tick().await, 0, "no retry before the backoff ends");
        o.expire("s6").await;
        assert_eq!(o.tick().await, 1);
        if o.state("s6").await.status == SagaStatus::Stuck {
            break;
        }
        assert!(waits.len() < 100, "never stuck");
    }

    let sent = o.sent("s6").await;
    assert_eq!(count(&sent, "a.undo"), COMPENSATION_ATTEMPTS as usize);
    assert_eq!(waits.len(), COMPENSATION_ATTEMPTS as usize);
    // A wait is measured from before the failure is handed over, so the time the engine
    // takes to handle it (up to a few hundred ms on a loaded machine, seen: 100 ms) adds to
    // that one wait, never takes from it.
    const HANDLING: i64 = 500;
    assert!(waits[0] >= 500, "the first retry waits: {waits:?}");
    assert!(
        waits.windows(2).all(|w| w[1] + HANDLING >= w[0]),
        "waits never shrink: {waits:?}"
    );
    assert!(waits[waits.len() - 1] > 4 * waits[0], "waits grow: {waits:?}");
    assert!(
        waits[waits.len() - 1] <= 30_000 + HANDLING,
        "waits are capped: {waits:?}"
    );

    let saga = o.state("s6").await;
    assert_eq!(saga.deadline, None);
    assert!(saga.error.as_deref().is_some_and(|e| e.contains("declined")));
    assert_eq!(o.finished("s6").await, ["stuck"]);
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(o.tick().await, 0, "a stuck saga waits for an operator");
    assert_eq!(o.sent("s6").await, sent);

    assert!(!o.engine.retry("s1-never-started").await.expect("retry"));
    assert!(o.engine.retry("s6").await.expect("retry"));
    assert!(
        !o.engine.retry("s6").await.expect("retry"),
        "only a stuck saga is retried"
    );
    let saga = o.state("s6").await;
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert_eq!(saga.attempts, 1);
    let undo = o.last_command("s6").await;
    assert_eq!(undo.event_type(), "a.undo");
    assert_eq!(count(&o.sent("s6").await, "a.undo"), COMPENSATION_ATTEMPTS as usize + 1);
    o.answer(&undo, Ok(Value::Null)).await;
    assert_eq!(o.state("s6").await.status, SagaStatus::Compensated);
    assert_eq!(o.finished("s6").await, ["stuck", "compensated"]);
    let history = o.history("s6").await;
    assert!(history.iter().any(|h| h.ends_with("stuck")), "{history:?}");
    assert!(
        history.iter().any(|h| h.contains("retried by an operator")),
        "{history:?}"
    );
}

/// `participant` gave up on `command` (dead-lettered it after every attempt failed).
fn given_up(command: &Command, reason: &str) -> Envelope {
    command
        .header
        .reply(&command.envelope, "participant", Verdict::GaveUp(reason.into()))
        .expect("an answer now")
        .1
}

/// A participant that gave up on the pivot (C, nothing to undo) or on a compensation stops
/// the saga as stuck with its reason; nothing is resent until an operator retries it.
async fn a_pivot_or_compensation_given_up_stops_the_saga_as_stuck_with_the_reason(db: &Db) {
    let o = Orchestrator::open(db).await;
    let reason = "participant gave up: violates check constraint";
    for (id, pivot) in [("s10", true), ("s11", false)] {
        o.start(id).await;
        let a = o.last_command(id).await;
        o.answer(&a, Ok(json!({}))).await;
        let b = o.last_command(id).await;
        let dead = if pivot {
            o.answer(&b, Ok(json!({}))).await;
            o.last_command(id).await
        } else {
            o.answer(&b, Err("declined".into())).await;
            o.last_command(id).await
        };
        assert_eq!(dead.event_type(), if pivot { "c.do" } else { "a.undo" }, "{id}");
        o.deliver(&given_up(&dead, reason)).await;

        let saga = o.state(id).await;
        assert_eq!(saga.status, SagaStatus::Stuck, "{id}");
        assert_eq!(saga.deadline, None, "{id}");
        let error = saga.error.expect("a stuck saga says why");
        assert!(
            error.contains(reason) && error.contains(&dead.header.step),
            "{id}: {error}"
        );
        assert_eq!(o.finished(id).await, ["stuck"], "{id}");
        let sent = o.sent(id).await;
        o.expire(id).await;
        assert_eq!(o.tick().await, 0, "{id}: a stuck saga resends nothing");
        assert_eq!(o.sent(id).await, sent, "{id}");
    }
}

/// A forward step its participant gave up on is undone, itself included (an earlier copy may
/// have acted), and the saga compensates on its own; a given-up reply to an earlier send (or
/// to a command the engine never sent) changes nothing.
async fn a_forward_step_given_up_is_compensated_and_only_the_latest_send_counts(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s12").await;
    let a = o.last_command("s12").await;
    o.answer(&a, Ok(json!({}))).await;
    let first = o.last_command("s12").await;
    o.expire("s12").await;
    assert_eq!(o.tick().await, 1, "B resent");
    let second = o.last_command("s12").await;
    assert_ne!(first.envelope.event_id, second.envelope.event_id);
    let before = snapshot(&o.state("s12").await);
    o.deliver(&given_up(&first, "gave up on the first copy")).await;
    assert_eq!(
        snapshot(&o.state("s12").await),
        before,
        "an earlier send's failure changes nothing"
    );

    o.deliver(&given_up(&second, "gave up: pool exhausted")).await;
    let saga = o.state("s12").await;
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert!(
        saga.error.as_deref().is_some_and(|e| e.contains("pool exhausted")),
        "{saga:?}"
    );
    assert_eq!(
        o.last_command("s12").await.event_type(),
        "b.undo",
        "B itself is undone first"
    );
}

/// Killing the orchestrator at any point loses nothing: an uncommitted reply is as if never
/// received, and a new process resends what was awaited when the deadline passes.
async fn killed_orchestrator_resumes_from_its_store(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s7").await;
    let a = o.last_command("s7").await;

    // Killed while handling A's reply, before the commit.
    let (_, a_ok) = reply(&a, Ok(json!({"a": 1})));
    {
        let mut tx = o.store.begin().await.expect("begin");
        o.engine.on_reply(&mut tx, &a_ok).await.expect("handle the reply");
        drop(tx);
    }
    assert_eq!(o.sent("s7").await, ["a.do"]);
    assert_eq!(o.state("s7").await.step, 0);
    drop(o);

    tokio::time::sleep(TIMEOUT + Duration::from_millis(50)).await;
    let o = Orchestrator::open(db).await;
    let saga = o.state("s7").await;
    assert_eq!((saga.status, saga.step, saga.attempts), (SagaStatus::Running, 0, 1));
    assert_eq!(o.tick().await, 1, "the new process resends what was awaited");
    assert_eq!(o.sent("s7").await, ["a.do", "a.do"]);

    // The reply the old process lost is redelivered and counts; the resend's reply is a duplicate.
    let resent_a = o.last_command("s7").await;
    o.deliver(&a_ok).await;
    o.answer(&resent_a, Ok(json!({"a": 1}))).await;
    let b = o.last_command("s7").await;
    assert_eq!(b.event_type(), "b.do");
    o.answer(&b, Ok(json!({"b": 2}))).await;
    let c = o.last_command("s7").await;
    o.answer(&c, Ok(json!({"c": 3}))).await;

    let saga = o.state("s7").await;
    assert_eq!(saga.status, SagaStatus::Completed);
    assert_eq!(json!(saga.context), json!({"orderId": "s7", "a": 1, "b": 2, "c": 3}));
    assert_eq!(o.finished("s7").await, ["completed"]);
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(o.tick().await, 0);
    let sent = o.sent("s7").await;
    assert_eq!(sent, ["a.do", "a.do", "b.do", "c.do"]);
    for execute in ["a.do", "b.do", "c.do"] {
        assert!(count(&sent, execute) <= MAX_ATTEMPTS as usize);
    }
}

/// What a participant did for one saga in the concurrent case.
#[derive(Default)]
struct Seen {
    /// Steps whose execute the participant carried out (replied ok to).
    executed: HashSet<String>,
}

/// Fifty sagas with random outcomes, answered by four participant tasks (with redeliveries)
/// while the timer runs: each one settles, undoing exactly what was done.
async fn many_concurrent_sagas_settle(db: &Db) {
    const SAGAS: usize = 50;
    const TASKS: usize = 4;
    let o = Arc::new(Orchestrator::open(db).await);
    // Which step of each saga fails (None: all succeed). A participant answers every send of
    // a step the same way, as an idempotent one would.
    let plan: Arc<HashMap<String, Option<&'static str>>> = Arc::new(
        (0..SAGAS)
            .map(|i| {
                let fails = [None, None, Some("A"), Some("B"), Some("C")][rand::random::<usize>() % 5];
                (format!("m{i}"), fails)
            })
            .collect(),
    );
    for id in plan.keys() {
        o.start(id).await;
    }
    let (trigger, stop) = shutdown::channel();
    let timer = o.engine.clone().spawn_timer(stop);
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();

    let mut participants = Vec::new();
    for task in 0..TASKS {
        let (o, plan, seen) = (o.clone(), plan.clone(), seen.clone());
        participants.push(tokio::spawn(async move {
            let mine = |id: &str| id[1..].parse::<usize>().expect("numbered") % TASKS == task;
            let mut answered = 0i64;
            let give_up = Instant::now() + Duration::from_secs(60);
            loop {
                let fresh: Vec<Command> = commands(&o.store)
                    .await
                    .into_iter()
                    .filter(|c| c.row > answered)
                    .collect();
                if let Some(last) = fresh.last() {
                    answered = last.row;
                }
                for c in fresh.iter().filter(|c| mine(&c.header.saga_id)) {
                    let id = &c.header.saga_id;
                    let result = if c.header.compensation {
                        Ok(Value::Null)
                    } else if plan[id] == Some(c.header.step.as_str()) {
                        Err("planned failure".to_string())
                    } else {
                        seen.lock()
                            .expect("seen")
                            .entry(id.clone())
                            .or_default()
                            .executed
                            .insert(c.header.step.clone());
                        Ok(json!({ c.header.step.clone(): true }))
                    };
                    let reply = o.answer(c, result).await;
                    if rand::random::<u8>() < 64 {
                        o.deliver(&reply).await;
                    }
                }
                let mut settled = true;
                for id in plan.keys().filter(|id| mine(id)) {
                    settled &= o.state(id).await.status.is_final();
                }
                if settled {
                    return;
                }
                assert!(Instant::now() < give_up, "task {task}: sagas did not settle in time");
                if fresh.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for p in participants {
        p.await.expect("a participant task panicked");
    }
    trigger.trigger();
    timer.await.expect("the timer stops");

    let seen = std::mem::take(&mut *seen.lock().expect("seen"));
    for (id, fails) in plan.iter() {
        let saga = o.state(id).await;
        let commands = o.commands_of(id).await;
        let sent_steps: HashSet<&str> = commands
            .iter()
            .filter(|c| !c.header.compensation)
            .map(|c| c.header.step.as_str())
            .collect();
        let undone: HashSet<&str> = commands
            .iter()
            .filter(|c| c.header.compensation)
            .map(|c| c.header.step.as_str())
            .collect();
        let executed = seen.get(id).map(|s| s.executed.clone()).unwrap_or_default();
        for step in ["A", "B", "C"] {
            let sends = commands
                .iter()
                .filter(|c| !c.header.compensation && c.header.step == step)
                .count();
            assert!(sends <= MAX_ATTEMPTS as usize, "{id}: {step} sent {sends} times");
        }
        assert!(
            undone.is_subset(&sent_steps),
            "{id}: undid a step never sent: undone {undone:?}, sent {sent_steps:?}"
        );
        assert!(!undone.contains("C"), "{id}: C has no compensation");
        match saga.status {
            SagaStatus::Completed => {
                assert_eq!(*fails, None, "{id} completed though {fails:?} failed");
                assert!(undone.is_empty(), "{id}: completed yet undid {undone:?}");
            }
            SagaStatus::Compensated => {
                let error = saga.error.clone().unwrap_or_default();
                assert!(
                    fails.is_some() || error.contains("no reply"),
                    "{id} compensated without a failure: {error}"
                );
                for step in ["A", "B"] {
                    if executed.contains(step) {
                        assert!(undone.contains(step), "{id}: {step} was done but never undone");
                    }
                }
            }
            other => panic!("{id} ended {other:?}"),
        }
        assert_eq!(o.finished(id).await.len(), 1, "{id}: the finished hook runs once");
    }
    let counts = o.engine.counts().await.expect("counts");
    let live: i64 = counts
        .iter()
        .filter(|(s, _)| matches!(*s, "running" | "compensating" | "stuck"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(live, 0, "{counts:?}");
}

/// Two flows on one store and reply topic: each reply reaches its own saga's flow, each
/// flow's timer resends only its own sagas, and a reply for a flow nobody runs is refused.
async fn two_flows_share_a_store_and_each_moves_only_its_own_sagas(db: &Db) {
    let o = Orchestrator::open(db).await;
    let other = Arc::new(SagaEngine::new(
        TestFlow::other(),
        Outbox::new(o.store.clone()),
        "orders",
        "replies",
        "saga.reply",
    ));
    let flows = Flows::new(vec![o.engine.clone(), other.clone()]).expect("two kinds");
    assert!(
        Flows::new(vec![o.engine.clone(), o.engine.clone()]).is_err(),
        "one kind twice"
    );
    o.start("t1").await;
    let mut tx = o.store.begin().await.expect("begin");
    let context = TestContext {
        order_id: "o1".into(),
        reported: Map::new(),
    };
    other.start(&mut tx, "o1", context, "corr").await.expect("start o1");
    tx.commit().await.expect("commit");

    o.expire("t1").await;
    o.expire("o1").await;
    assert_eq!(o.tick().await, 1, "the test flow's timer moves t1 only");
    assert_eq!(
        (count(&o.sent("t1").await, "a.do"), count(&o.sent("o1").await, "x.do")),
        (2, 1)
    );
    assert_eq!(other.tick().await.expect("tick"), 1, "the other flow's timer moves o1");
    assert_eq!(count(&o.sent("o1").await, "x.do"), 2);

    let through_flows = |command: Command| {
        let flows = &flows;
        let store = &o.store;
        async move {
            let (_, reply) = reply(&command, Ok(json!({"seen": command.envelope.event_type})));
            let mut tx = store.begin().await.expect("begin");
            flows.on_reply(&mut tx, &reply).await.expect("handle the reply");
            tx.commit().await.expect("commit the reply");
        }
    };
    through_flows(o.last_command("o1").await).await;
    through_flows(o.last_command("t1").await).await;
    let o1 = other.load("o1").await.expect("load").expect("o1");
    assert_eq!(
        (o1.status, o1.context.reported["seen"].clone()),
        (SagaStatus::Completed, json!("x.do"))
    );
    assert_eq!(
        o.sent("t1").await.last().map(String::as_str),
        Some("b.do"),
        "t1 moved on to B"
    );
    assert!(
        o.engine.load("o1").await.expect("load").is_none(),
        "the test flow does not see o1"
    );
    let completed = |counts: Vec<(&str, i64)>| counts.into_iter().find(|(s, _)| *s == "completed").map(|(_, n)| n);
    assert_eq!(completed(other.counts().await.expect("counts")), Some(1));
    assert_eq!(completed(o.engine.counts().await.expect("counts")), Some(0));

    let alone = Flows::new(vec![o.engine.clone()]).expect("one flow");
    let mut tx = o.store.begin().await.expect("begin");
    let context = TestContext {
        order_id: "o3".into(),
        reported: Map::new(),
    };
    other.start(&mut tx, "o3", context, "corr").await.expect("start o3");
    Outbox::new(o.store.clone()).commit(tx).await.expect("commit");
    let (_, stray) = reply(&o.last_command("o3").await, Ok(json!({})));
    let mut tx = o.store.begin().await.expect("begin");
    let refused = alone.on_reply(&mut tx, &stray).await;
    assert!(matches!(refused, Err(HandlerError::Poison(_))), "{refused:?}");
}

/// A saga stopped before its pivot undoes what it did, the step in flight included, and a
/// late answer to that step changes nothing; one whose pivot was sent runs to its end.
async fn a_saga_stopped_before_its_pivot_undoes_its_steps_and_one_past_it_runs_on(db: &Db) {
    let o = Orchestrator::open(db).await;
    o.start("s1").await;
    o.answer(&o.last_command("s1").await, Ok(json!({"a": 1}))).await;
    let b = o.last_command("s1").await;
    assert_eq!(o.stop("s1", "cancelled by the customer").await, Stopped::Undoing);
    assert_eq!(
        o.sent("s1").await,
        ["a.do", "b.do", "b.undo"],
        "B is undone, in flight as it is"
    );
    let before = snapshot(&o.state("s1").await);
    o.answer(&b, Ok(json!({"b": 2}))).await;
    assert_eq!(
        snapshot(&o.state("s1").await),
        before,
        "a late answer to B changes nothing"
    );
    o.answer(&o.last_command("s1").await, Ok(Value::Null)).await;
    assert_eq!(o.sent("s1").await.last().map(String::as_str), Some("a.undo"));
    assert_eq!(
        o.stop("s1", "again").await,
        Stopped::Undoing,
        "asked twice, one undoing"
    );
    o.answer(&o.last_command("s1").await, Ok(Value::Null)).await;
    let s1 = o.state("s1").await;
    assert_eq!(s1.status, SagaStatus::Compensated);
    assert!(s1.error.unwrap_or_default().contains("cancelled by the customer"));
    assert_eq!(o.finished("s1").await, ["compensated"]);
    assert_eq!(o.stop("s1", "late").await, Stopped::Ended(SagaStatus::Compensated));

    o.start("s2").await;
    o.answer(&o.last_command("s2").await, Ok(json!({}))).await;
    o.answer(&o.last_command("s2").await, Ok(json!({}))).await;
    assert_eq!(o.stop("s2", "cancelled by the customer").await, Stopped::PastPivot);
    assert_eq!(
        o.sent("s2").await,
        ["a.do", "b.do", "c.do"],
        "nothing undone past the pivot"
    );
    o.answer(&o.last_command("s2").await, Ok(json!({}))).await;
    assert_eq!(o.stop("s2", "late").await, Stopped::Ended(SagaStatus::Completed));
    assert_eq!(o.stop("nobody", "why").await, Stopped::Unknown);
}

/// A saga of forward-only steps stuck on a step its participant gave up on is retried
/// forward, not turned around: there is nothing to undo, and the step must still happen.
async fn a_stuck_saga_with_nothing_to_undo_is_retried_forward(db: &Db) {
    let o = Orchestrator::open(db).await;
    let forward = Arc::new(SagaEngine::new(
        TestFlow::forward(),
        Outbox::new(o.store.clone()),
        "orders",
        "replies",
        "saga.reply",
    ));
    let mut tx = o.store.begin().await.expect("begin");
    let context = TestContext {
        order_id: "f1".into(),
        reported: Map::new(),
    };
    forward.start(&mut tx, "f1", context, "corr").await.expect("start");
    Outbox::new(o.store.clone()).commit(tx).await.expect("commit");
    let flows = Flows::new(vec![forward.clone()]).expect("one flow");
    let mut tx = o.store.begin().await.expect("begin");
    flows
        .on_reply(&mut tx, &given_up(&o.last_command("f1").await, "the provider is gone"))
        .await
        .expect("the given-up reply");
    tx.commit().await.expect("commit");
    assert_eq!(
        forward.load("f1").await.expect("load").expect("f1").status,
        SagaStatus::Stuck
    );

    assert!(forward.retry("f1").await.expect("retry"), "a stuck saga is retried");
    assert_eq!(
        o.sent("f1").await,
        ["y.do", "y.do"],
        "the step is sent again, nothing undone"
    );
    let (_, reply) = reply(&o.last_command("f1").await, Ok(json!({})));
    let mut tx = o.store.begin().await.expect("begin");
    flows.on_reply(&mut tx, &reply).await.expect("the reply");
    tx.commit().await.expect("commit");
    assert_eq!(
        forward.load("f1").await.expect("load").expect("f1").status,
        SagaStatus::Completed
    );
}

macro_rules! saga_cases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::Db::sqlite("o.db");
                    super::$case(&db).await;
                }
            )*
        }

        mod postgres {
            use futures_util::FutureExt;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = super::Db::postgres("saga").await else {
                        return;
                    };
                    let outcome = std::panic::AssertUnwindSafe(super::$case(&db)).catch_unwind().await;
                    db.drop_database().await;
                    if let Err(panic) = outcome {
                        std::panic::resume_unwind(panic);
                    }
                }
            )*
        }
    };
}

saga_cases!(
    all_steps_succeed,
    failed_step_compensates_earlier_steps,
    a_reply_from_another_service_is_refused_and_changes_nothing,
    duplicate_and_late_replies_change_nothing,
    silent_step_is_resent_then_compensated,
    failing_compensation_is_retried_then_stuck,
    a_pivot_or_compensation_given_up_stops_the_saga_as_stuck_with_the_reason,
    a_forward_step_given_up_is_compensated_and_only_the_latest_send_counts,
    killed_orchestrator_resumes_from_its_store,
    one_broken_saga_does_not_stall_the_timer,
    many_concurrent_sagas_settle,
    two_flows_share_a_store_and_each_moves_only_its_own_sagas,
    a_saga_stopped_before_its_pivot_undoes_its_steps_and_one_past_it_runs_on,
    a_stuck_saga_with_nothing_to_undo_is_retried_forward,
);
