//! `bazaar-bench pipeline`: what the messaging core (outbox, relay, consumer runner, inbox)
//! costs over publishing and acking straight on the same broker.
//!
//! - raw: one task publishes N messages to the broker, 256 at a time with their acks awaited
//!   together; one subscription of one group fetches 16 at a time and acks them together.
//!   No store is involved.
//! - full: one task commits N store transactions, each holding one `Outbox::add`; the relay
//!   (`Outbox::spawn_relay`) moves them to the broker; `consumer::spawn` (one task) handles
//!   each in a sink store's transaction that records the inbox and inserts one row.
//! - sqlite one-row: the reference for the embedded pipeline, N write transactions of one row
//!   each, one after another, on a SQLite file in WAL mode with `synchronous = NORMAL` and
//!   `BEGIN IMMEDIATE`, as every store is: "plain" calls SQLite directly on one thread
//!   (rusqlite, a prepared statement), "Store" is the same through `Store` as a service writes. An
//!   event of the full pipeline is at least four such writes (outbox, broker, inbox, ack),
//!   batched where the design allows.
//!
//! Both measure from the first publish (or commit) to the last event handled, and each
//! event's latency from its publish (or commit) to its handler. Runs on the embedded broker in
//! a temp dir, and also on the broker `--broker` (or `BAZAAR_BENCH_NATS_URL`) names. Each row
//! notes this process's CPU time per event (a NATS server's own CPU is not in it).

use bazaar_kit::store;
use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bazaar_bench::harness::cpu_seconds;
use bazaar_kit::{
    broker::{self, SharedBroker, SubscribeOptions},
    consumer::{self, ConsumerConfig, Handler, HandlerError},
    envelope::{Envelope, Metadata},
    outbox::{self, Outbox},
    shutdown,
    store::{Migration, Store, Tx},
};
use clap::Args;
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::sync::Notify;

use super::{Report, Sample};

/// Flags of `bazaar-bench pipeline`.
#[derive(Debug, Args)]
pub struct PipelineBenchArgs {
    /// Events per variant.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// A second broker to measure beside the embedded one, e.g. `nats://127.0.0.1:4222`
    /// (a fresh namespace is used and its streams are deleted afterwards).
    #[arg(long, env = "BAZAAR_BENCH_NATS_URL")]
    broker: Option<String>,
    /// Rounds over every variant, interleaved; each row is its variant's median round, so
    /// a stretch of noise on a shared machine moves one round rather than one variant.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    rounds: u64,
    /// Give up on a variant after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

const SINK_MIGRATIONS: &[Migration] = &[Migration::new(
    100,
    "bench_sink",
    "CREATE TABLE bench_sink (event_id TEXT PRIMARY KEY, n BIGINT NOT NULL, at BIGINT NOT NULL)",
)];

/// `bazaar-bench pipeline`.
///
/// One piece: one report over rounds; each round runs every variant in a fresh dir, the
/// `record` closure files each result under its row name, and the medians, failure notes
/// and comparisons at the end read those same per-round lists.
pub async fn run(args: PipelineBenchArgs, cores: usize) -> anyhow::Result<Report> {
    if args.events == 0 || args.events > 1_000_000 || args.timeout == 0 {
        bail!("--events must be 1..=1000000 and --timeout at least 1");
    }
    bazaar_kit::telemetry::metrics();
    let mut report = Report::new(
        format!(
            "bench pipeline: {} events per variant in each of {} rounds, one producer task, one consumer task",
            args.events, args.rounds
        ),
        "events/s",
    );
    let timeout = Duration::from_secs(args.timeout);
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let reference = "sqlite one-row plain";
    // Each variant's result per round, in the order the rows are shown.
    let mut rounds: Vec<(String, Vec<(Sample, String)>)> = Vec::new();
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut record = |name: &str, result: anyhow::Result<(Sample, String)>| {
        let at = match rounds.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                rounds.push((name.to_string(), Vec::new()));
                rounds.len() - 1
            }
        };
        match result {
            Ok(measured) => rounds[at].1.push(measured),
            Err(e) => failures.push((name.to_string(), format!("{e:#}"))),
        }
    };
    let mut backends = vec![("embedded", None)];
    if let Some(url) = &args.broker {
        let name = if url.starts_with("nats://") { "nats" } else { "broker" };
        backends.push((name, Some(url.clone())));
    }
    for round in 1..=args.rounds {
        let dir = dir.path().join(format!("round{round}"));
        std::fs::create_dir_all(&dir).context("cannot create the round's dir")?;
        eprintln!(
            "bench pipeline: round {round}/{}: sqlite one-row write transactions (the reference)",
            args.rounds
        );
        let (path, n) = (dir.join("plain.db"), args.events);
        let plain = tokio::task::spawn_blocking(move || sqlite_plain(&path, n));
        record(
            reference,
            measured(async { plain.await.context("the reference panicked")? }).await,
        );
        record("sqlite one-row Store", measured(sqlite_store(&dir, args.events)).await);
        for (name, remote) in &backends {
            // A fresh namespace keeps each round's topics apart from anything else on the server.
            let (url, shown, namespace) = match remote {
                None => {
                    let url = format!("sqlite://{}/bus.db", dir.display());
                    (url.clone(), url, None)
                }
                Some(url) => {
                    let ns = format!("bench_{}", uuid::Uuid::now_v7().simple());
                    let sep = if url.contains('?') { '&' } else { '?' };
                    (format!("{url}{sep}namespace={ns}"), url.clone(), Some(ns))
                }
            };
            eprintln!(
                "bench pipeline: round {round}/{}: {name} broker at {shown}",
                args.rounds
            );
            let (raw_name, full_name) = (format!("{name} raw"), format!("{name} full"));
            match broker::connect(&url)
                .await
                .with_context(|| format!("cannot connect to {shown}"))
            {
                Ok(broker) => {
                    eprintln!("bench pipeline: {name} raw publish/ack");
                    record(&raw_name, measured(raw(broker.clone(), args.events, timeout)).await);
                    eprintln!("bench pipeline: {name} outbox -> relay -> broker -> consumer + inbox");
                    let sub = dir.join(name);
                    record(&full_name, measured(full(broker, &sub, args.events, timeout)).await);
                }
                Err(e) => {
                    record(&raw_name, Err(e));
                    record(&full_name, Err(anyhow::anyhow!("not run: no broker")));
                }
            }
            if let (Some(ns), true) = (namespace, shown.starts_with("nats://")) {
                if let Err(e) = delete_streams(&shown, &ns).await {
                    report.note(format!(
                        "could not delete the bench's NATS streams in namespace {ns}: {e:#}"
                    ));
                }
            }
        }
    }
    for (name, samples) in rounds {
        match super::report::median(samples) {
            Some((sample, note)) => report.row(&name, Some(sample), note),
            None => report.row(&name, None, "not measured (see the note below)"),
        }
    }
    for (name, why) in failures {
        report.note(format!("{name} failed in a round: {why}"));
    }
    report.compare("sqlite one-row Store", reference);
    for (name, _) in &backends {
        let (raw_name, full_name) = (format!("{name} raw"), format!("{name} full"));
        report.compare(&full_name, &raw_name);
        if *name == "embedded" {
            report.compare(&full_name, reference);
        }
    }
    report.note(format!(
        "{cores} core(s) shared by producer, relay, consumer and broker. Embedded: every publish \
         and ack is a SQLite transaction in bus.db; full adds a producer store (outbox) and a sink \
         store (inbox + row). Latency: publish/commit -> handler."
    ));
    Ok(report)
}

/// Runs a variant and appends this process's CPU time per event to its note.
async fn measured<F>(variant: F) -> anyhow::Result<(Sample, String)>
where
    F: Future<Output = anyhow::Result<(Sample, String)>>,
{
    let before = cpu_seconds("self");
    let (sample, mut note) = variant.await?;
    let cpu = cpu_seconds("self") - before;
    if cpu.is_finite() && sample.count > 0 {
        note.push_str(&format!("; CPU {:.0} µs/event", cpu * 1e6 / sample.count as f64));
    }
    Ok((sample, note))
}

/// The reference: `n` write transactions of one row each, one after another, straight on
/// SQLite (a prepared statement, this thread).
fn sqlite_plain(path: &std::path::Path, n: usize) -> anyhow::Result<(Sample, String)> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE bench_sink (event_id TEXT PRIMARY KEY, n BIGINT NOT NULL, at BIGINT NOT NULL);",
    )?;
    let mut insert = db.prepare("INSERT INTO bench_sink (event_id, n, at) VALUES (?1, ?2, ?3)")?;
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let at = Instant::now();
        db.execute_batch("BEGIN IMMEDIATE")?;
        insert.execute(rusqlite::params![
            format!("reference-{i}"),
            i as i64,
            bazaar_kit::store::now_millis()
        ])?;
        db.execute_batch("COMMIT")?;
        latencies.push(at.elapsed());
    }
    Ok((
        one_by_one(n, started, latencies),
        "BEGIN IMMEDIATE; INSERT; COMMIT, directly".into(),
    ))
}

/// The same as a `Store` transaction: what a service pays for a write.
async fn sqlite_store(dir: &std::path::Path, n: usize) -> anyhow::Result<(Sample, String)> {
    let store = Store::open(&format!("sqlite://{}/store.db", dir.display())).await?;
    store.migrate(SINK_MIGRATIONS).await?;
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let at = Instant::now();
        let mut tx = store.begin().await?;
        store::query("INSERT INTO bench_sink (event_id, n, at) VALUES ($1, $2, $3)")
            .bind(format!("reference-{i}"))
            .bind(i as i64)
            .bind(bazaar_kit::store::now_millis())
            .execute(&mut tx)
            .await?;
        tx.commit().await?;
        latencies.push(at.elapsed());
    }
    store.close().await;
    Ok((
        one_by_one(n, started, latencies),
        "the same as a Store transaction".into(),
    ))
}

/// The sample of `n` operations run one after another since `started`.
fn one_by_one(n: usize, started: Instant, latencies: Vec<Duration>) -> Sample {
    Sample {
        count: n,
        elapsed: started.elapsed(),
        latencies,
        ..Sample::default()
    }
    .finish()
}

/// When each event left, as nanoseconds after `base`; shared by producer and consumer.
struct Clock {
    base: Instant,
    sent: Vec<AtomicU64>,
}

impl Clock {
    fn new(n: usize) -> Arc<Clock> {
        Arc::new(Clock {
            base: Instant::now(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn mark(&self, i: usize) {
        self.sent[i].store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn since(&self, i: usize) -> Duration {
        let sent = Duration::from_nanos(self.sent[i].load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(sent)
    }
}

/// What a consumer has seen so far: unique events, their latencies, and a wake-up at the end.
struct Tally {
    clock: Arc<Clock>,
    seen: Mutex<Vec<bool>>,
    latencies: Mutex<Vec<Duration>>,
    unique: AtomicUsize,
    duplicates: AtomicUsize,
    all: Notify,
}

impl Tally {
    fn new(clock: Arc<Clock>) -> Arc<Tally> {
        let n = clock.sent.len();
        Arc::new(Tally {
            clock,
            seen: Mutex::new(vec![false; n]),
            latencies: Mutex::new(Vec::with_capacity(n)),
            unique: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            all: Notify::new(),
        })
    }

    /// Records event `i`; a poisoned lock only means another task panicked, which ends the
    /// bench anyway, so its data is still used.
    fn saw(&self, i: usize) {
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            match seen.get_mut(i) {
                Some(s) if !*s => {
                    *s = true;
                    true
                }
                _ => false,
            }
        };
        if !first {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.clock.since(i));
        if self.unique.fetch_add(1, Ordering::AcqRel) + 1 == self.clock.sent.len() {
            self.all.notify_one();
        }
    }

    /// Waits until every event was seen or `timeout` passed; the sample covers `started..now`.
    async fn wait(&self, started: Instant, timeout: Duration) -> (Sample, String) {
        let done = self.all.notified();
        let complete = self.unique.load(Ordering::Acquire) == self.clock.sent.len()
            || tokio::time::timeout(timeout, done).await.is_ok();
        let sample = Sample {
            count: self.unique.load(Ordering::Acquire),
            errors: 0,
            elapsed: started.elapsed(),
            latencies: self.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ..Sample::default()
        }
        .finish();
        let mut note = String::new();
        if !complete {
            note = format!("TIMED OUT after {timeout:?}; ");
        }
        let dup = self.duplicates.load(Ordering::Relaxed);
        if dup > 0 {
            note.push_str(&format!("{dup} redeliveries; "));
        }
        (sample, note)
    }
}

fn event(i: usize) -> Envelope {
    let metadata = Metadata {
        correlation_id: uuid::Uuid::now_v7().to_string(),
        source: "bench".into(),
        ..Metadata::default()
    };
    Envelope::new("bench.happened", format!("agg-{i}"), json!({"n": i}), metadata)
}

/// Events the raw producer publishes per batch (the relay's batch).
const RAW_BATCH: usize = 256;

/// Bare broker: publish N in batches, one group's one subscription fetches and acks them.
///
/// One piece: one measurement; the consumer and producer tasks share the `clock` and `tally`
/// of one timeline started with the producer, and the stop signal and task joins follow
/// the tally's wait on that timeline.
async fn raw(broker: SharedBroker, n: usize, timeout: Duration) -> anyhow::Result<(Sample, String)> {
    let topic = "bench.raw";
    let mut sub = broker
        .subscribe(topic, "bench-raw", SubscribeOptions::default())
        .await
        .context("cannot subscribe")?;
    let clock = Clock::new(n);
    let tally = Tally::new(clock.clone());
    let (stop, mut stopped) = shutdown::channel();
    let consumer = {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    _ = stopped.wait() => return,
                    b = sub.fetch(16, Duration::from_secs(1)) => b,
                };
                let Ok(batch) = batch else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Acked together, as the consumer runner does.
                let acks = batch.into_iter().map(|d| {
                    let i = d
                        .message
                        .msg_id
                        .rsplit('-')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok());
                    async move { (i, d.ack().await) }
                });
                for (i, acked) in futures_util::future::join_all(acks).await {
                    if let (Some(i), Ok(())) = (i, acked) {
                        tally.saw(i);
                    }
                }
            }
        })
    };
    let run = uuid::Uuid::now_v7().simple().to_string();
    let started = Instant::now();
    let producer = {
        let (broker, clock) = (broker.clone(), clock.clone());
        tokio::spawn(async move {
            // As a client publishing a stream of events would: RAW_BATCH at a time, acks
            // awaited together (pipelined on NATS, one transaction embedded).
            for first in (0..n).step_by(RAW_BATCH) {
                let last = (first + RAW_BATCH).min(n);
                let ids: Vec<String> = (first..last).map(|i| format!("{run}-{i}")).collect();
                let batch: Vec<broker::Outgoing<'_>> = (first..last)
                    .zip(&ids)
                    .map(|(i, msg_id)| broker::Outgoing {
                        topic,
                        msg_id,
                        body: event(i).to_vec().into(),
                    })
                    .collect();
                for i in first..last {
                    clock.mark(i);
                }
                broker
                    .publish_batch(&batch)
                    .await
                    .map_err(|f| f.error)
                    .with_context(|| format!("publishing events {first}..{last} failed"))?;
            }
            anyhow::Ok(())
        })
    };
    let (sample, note) = tally.wait(started, timeout).await;
    stop.trigger();
    let _ = consumer.await;
    producer.await.context("the producer panicked")??;
    Ok((sample, format!("{note}publish + fetch/ack, no store")))
}

/// Inserts one sink row per event and tells the tally.
struct SinkHandler {
    tally: Arc<Tally>,
}

impl Handler for SinkHandler {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let i = event.payload["n"]
                .as_u64()
                .ok_or_else(|| HandlerError::Poison("payload without n".into()))? as usize;
            store::query("INSERT INTO bench_sink (event_id, n, at) VALUES ($1, $2, $3)")
                .bind(event.event_id.to_string())
                .bind(i as i64)
                .bind(bazaar_kit::store::now_millis())
                .execute(&mut *tx)
                .await?;
            self.tally.saw(i);
            Ok(())
        })
    }
}

/// Outbox in a producer store, relay, broker, consumer runner with inbox in a sink store.
async fn full(
    broker: SharedBroker,
    dir: &std::path::Path,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<(Sample, String)> {
    let topic = "bench.full";
    let producer_store = Store::open(&format!("sqlite://{}/producer.db", dir.display())).await?;
    producer_store.migrate(outbox::MIGRATIONS).await?;
    let sink_store = Store::open(&format!("sqlite://{}/sink.db", dir.display())).await?;
    let mut migrations = outbox::MIGRATIONS.to_vec();
    migrations.extend_from_slice(SINK_MIGRATIONS);
    sink_store.migrate(&migrations).await?;

    let clock = Clock::new(n);
    let tally = Tally::new(clock.clone());
    let (stop, stopped) = shutdown::channel();
    let producer_outbox = Outbox::new(producer_store.clone());
    let relay = producer_outbox.spawn_relay(broker.clone(), stopped.clone());
    let consumers = consumer::spawn(
        Outbox::new(sink_store.clone()),
        broker,
        ConsumerConfig::new("bench-sink", topic),
        Arc::new(SinkHandler { tally: tally.clone() }),
        stopped,
    );
    let started = Instant::now();
    let producer = {
        let clock = clock.clone();
        tokio::spawn(async move {
            for i in 0..n {
                let e = event(i);
                clock.mark(i);
                let mut tx = producer_outbox.store().begin().await?;
                producer_outbox.add(&mut tx, topic, &e).await?;
                producer_outbox.commit(tx).await?;
            }
            anyhow::Ok(())
        })
    };
    let (mut sample, note) = tally.wait(started, timeout).await;
    // The handler runs just before its transaction commits: wait for the last commit too.
    let committed = wait_for(Duration::from_secs(5), || async {
        store::query("SELECT COUNT(*) FROM bench_sink")
            .fetch_scalar::<i64>(&sink_store)
            .await
            .is_ok_and(|c| c as usize >= sample.count)
    })
    .await;
    sample.elapsed = started.elapsed();
    stop.trigger();
    let _ = relay.await;
    for c in consumers {
        let _ = c.await;
    }
    producer.await.context("the producer panicked")??;
    producer_store.close().await;
    sink_store.close().await;
    let mut note = format!("{note}outbox tx -> relay -> consumer tx (inbox + row)");
    if !committed {
        note.push_str("; sink rows missing after the last handler ran");
    }
    Ok((sample, note))
}

/// Polls `check` every millisecond until it holds or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Deletes the JetStream streams the bench created under namespace `ns`.
async fn delete_streams(url: &str, ns: &str) -> anyhow::Result<()> {
    let base = url.split('?').next().unwrap_or(url);
    let client = async_nats::connect(base).await?;
    let js = async_nats::jetstream::new(client);
    for topic in ["bench.raw", "bench.full", "bench.raw.dlq", "bench.full.dlq"] {
        let name = bazaar_kit::broker::nats::stream_name(&format!("{ns}.{topic}"));
        // The dead-letter streams exist only if something was dead-lettered.
        let _ = js.delete_stream(&name).await;
    }
    Ok(())
}
