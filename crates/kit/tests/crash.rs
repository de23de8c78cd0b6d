//! The crash test of the messaging core: a producer-and-consumer process is SIGKILLed at
//! random instants, over and over, between store commits, relay publishes, handler commits
//! and broker acks. Afterwards every committed event reached every consumer group exactly
//! once in the data (and nothing that was not committed appeared).
//!
//! The test re-runs its own binary as the child (`crash_child`, ignored unless asked for).

use bazaar_kit::store;
use bazaar_testkit::{servers, Server};
use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bazaar_kit::{
    broker,
    consumer::{self, ConsumerConfig, Handler, HandlerError},
    envelope::{Envelope, Metadata},
    outbox::{self, Outbox},
    shutdown,
    store::{Migration, Store, Tx},
};
use futures_util::future::BoxFuture;

/// Events the child commits in total, across all its lives.
const EVENTS: i64 = 500;
const GROUPS: [&str; 2] = ["g1", "g2"];

const PRODUCER: &[Migration] = &[Migration::new(
    10,
    "produced",
    "CREATE TABLE produced (event_id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
)];
const SINK: &[Migration] = &[Migration::new(
    10,
    "effects",
    "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT NOT NULL, event_id TEXT NOT NULL)",
)];

fn all(extra: &[Migration]) -> Vec<Migration> {
    outbox::MIGRATIONS.iter().chain(extra).copied().collect()
}

/// Records the event as an effect with no uniqueness of its own: only the inbox stops doubles.
struct Effect(&'static str);

impl Handler for Effect {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            store::query("INSERT INTO effects (grp, event_id) VALUES ($1, $2)")
                .bind(self.0)
                .bind(event.event_id.to_string())
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

/// The child: produces the remaining events one transaction at a time while consuming them
/// in two groups, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash tests as their child process"]
async fn crash_child() {
    let Ok(dir) = std::env::var("CRASH_DIR") else { return };
    let broker_url = std::env::var("CRASH_BROKER").expect("CRASH_BROKER");
    let topic = std::env::var("CRASH_TOPIC").expect("CRASH_TOPIC");
    let producer = Store::open(&format!("sqlite://{dir}/producer.db"))
        .await
        .expect("producer store");
    producer.migrate(&all(PRODUCER)).await.expect("migrate producer");
    let sink = Store::open(&format!("sqlite://{dir}/sink.db"))
        .await
        .expect("sink store");
    sink.migrate(&all(SINK)).await.expect("migrate sink");
    let broker = broker::connect(&broker_url).await.expect("broker");
    let (_trigger, stop) = shutdown::channel();
    let out = Outbox::new(producer.clone());
    out.spawn_relay(broker.clone(), stop.clone());
    for group in GROUPS {
        let mut config = ConsumerConfig::new(group, topic.clone());
        config.ack_wait = Duration::from_millis(800);
        config.max_attempts = 1000;
        consumer::spawn(
            Outbox::new(sink.clone()),
            broker.clone(),
            config,
            Arc::new(Effect(group)),
            stop.clone(),
        );
    }
    loop {
        let n: i64 = store::query("SELECT COUNT(*) FROM produced")
            .fetch_one(&producer)
            .await
            .expect("count")
            .try_get(0)
            .expect("a column");
        if n >= EVENTS {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let event = Envelope::new(
            "crash.tested",
            format!("agg-{}", n % 7),
            serde_json::json!({ "n": n }),
            Metadata::default(),
        );
        let mut tx = producer.begin().await.expect("begin");
        store::query("INSERT INTO produced (event_id, n) VALUES ($1, $2)")
            .bind(event.event_id.to_string())
            .bind(n)
            .execute(&mut tx)
            .await
            .expect("insert");
        out.add(&mut tx, &topic, &event).await.expect("outbox add");
        out.commit(tx).await.expect("commit");
        // Paced so that kills land while producing as well as while consuming.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_child(dir: &std::path::Path, broker_url: &str, topic: &str) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child", "--exact", "--ignored", "--nocapture"])
        .env("CRASH_DIR", dir)
        .env("CRASH_BROKER", broker_url)
        .env("CRASH_TOPIC", topic)
        .env("BAZAAR_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child")
}

async fn count(store: &Store, sql: &str) -> i64 {
    store::query(sql)
        .fetch_one(store)
        .await
        .map(|r| r.try_get::<i64, _>(0).expect("a column"))
        .unwrap_or(-1)
}

async fn run_crash_test(broker_url: String, topic: String, dir: &std::path::Path) {
    let kills = 15;
    for _ in 0..kills {
        let mut child = spawn_child(dir, &broker_url, &topic);
        let wait = 150 + rand::random::<u64>() % 500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap");
    }
    let producer = Store::open(&format!("sqlite://{}/producer.db", dir.display()))
        .await
        .expect("producer");
    let before = count(&producer, "SELECT COUNT(*) FROM produced").await;
    assert!(
        before > 0,
        "the killed lives committed nothing, so the kills tested nothing"
    );
    eprintln!("{before} of {EVENTS} events committed across {kills} killed lives");
    // A last life with no kill: let it finish producing and draining.
    let mut child = spawn_child(dir, &broker_url, &topic);
    let sink = Store::open(&format!("sqlite://{}/sink.db", dir.display()))
        .await
        .expect("sink");
    let broker = broker::connect(&broker_url).await.expect("broker");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let produced = count(&producer, "SELECT COUNT(*) FROM produced").await;
        let unsent = count(&producer, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await;
        let handled = count(&sink, "SELECT COUNT(DISTINCT grp || ':' || event_id) FROM effects").await;
        let mut lag = 0;
        for g in GROUPS {
            lag += broker.pending(&topic, g).await.unwrap_or(1);
        }
        if produced == EVENTS && unsent == 0 && handled == 2 * EVENTS && lag == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let life = match child.try_wait() {
                Ok(Some(status)) => format!("the last life exited early ({status})"),
                _ => "the last life is still running".to_string(),
            };
            panic!(
                "did not settle: produced {produced}, unsent {unsent}, handled {handled}/{}, lag {lag}; {life}",
                2 * EVENTS
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().expect("stop child");
    child.wait().expect("reap");

    // Every committed event reached both groups, exactly once in the data.
    let produced = count(&producer, "SELECT COUNT(*) FROM produced").await;
    assert_eq!(produced, EVENTS);
    for g in GROUPS {
        let rows = count(&sink, &format!("SELECT COUNT(*) FROM effects WHERE grp = '{g}'")).await;
        let distinct = count(
            &sink,
            &format!("SELECT COUNT(DISTINCT event_id) FROM effects WHERE grp = '{g}'"),
        )
        .await;
        assert_eq!(distinct, EVENTS, "group {g} missed events");
        assert_eq!(rows, distinct, "group {g} applied an event twice");
    }
    // Nothing was handled that was never committed.
    let ghosts = {
        let produced_ids: std::collections::HashSet<String> = store::query("SELECT event_id FROM produced")
            .fetch_all(&producer)
            .await
            .expect("ids")
            .iter()
            .map(|r| r.try_get::<String, _>(0).expect("a column"))
            .collect();
        store::query("SELECT event_id FROM effects")
            .fetch_all(&sink)
            .await
            .expect("effects")
            .iter()
            .filter(|r| !produced_ids.contains(&r.try_get::<String, _>(0).expect("a column")))
            .count()
    };
    assert_eq!(ghosts, 0, "effects of uncommitted events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_loses_and_doubles_nothing_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/bus.db", dir.path().display());
    run_crash_test(url, "crash.events".into(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_loses_and_doubles_nothing_nats() {
    let Some(url) = servers::url(Server::Nats, "the crash test on NATS") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = format!("crash.{}", uuid::Uuid::now_v7().simple());
    run_crash_test(url, topic, dir.path()).await;
}
