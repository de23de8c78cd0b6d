//! The store, outbox and inbox on both engines.
//!
//! Each case is an async function over a [`Db`] (a fresh, empty database and a way to open
//! more stores on it); the `store_cases!` macro makes `sqlite::<case>` (a file in a temp dir)
//! and `postgres::<case>` of it. PostgreSQL cases run when `BAZAAR_TEST_POSTGRES_URL` names a
//! server (e.g. `postgres://postgres@127.0.0.1:5432/test`): each creates its own database
//! `bazaar_test_<uuid>` through that URL and drops it afterwards, passed or failed.
//!
//! ```text
//! BAZAAR_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo nextest run -p bazaar-kit --test store
//! ```

use bazaar_kit::store;
use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::Duration,
};

use bazaar_kit::{
    broker::{self, Broker, BrokerError, Message, SharedBroker, SubscribeOptions, Subscription},
    envelope::{Envelope, Metadata},
    inbox,
    outbox::{self, Outbox},
    shutdown,
    store::{Migration, Store, StoreError},
};
use bazaar_testkit::TestDb;
use bytes::Bytes;
use futures_util::{future::BoxFuture, FutureExt};
use tokio::time::Instant;

type Db = TestDb;

async fn run<F, Fut>(db: Option<Db>, case: F)
where
    F: FnOnce(Arc<Db>) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(db) = db else { return };
    let db = Arc::new(db);
    let outcome = AssertUnwindSafe(case(db.clone())).catch_unwind().await;
    db.drop_database().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Generates `sqlite::<case>` and `postgres::<case>` for every case.
macro_rules! store_cases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(Some(super::Db::sqlite("service.db")), super::$case).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(super::Db::postgres("bazaar_test").await, super::$case).await
                }
            )*
        }
    };
}

store_cases!(
    a_store_another_version_wrote_is_refused,
    migrations_apply_once,
    concurrent_migrations_both_succeed,
    rolled_back_transaction_leaves_nothing,
    outbox_relay_publishes_every_row_once,
    inbox_records_each_event_once,
);

// ---- helpers ----

/// [`migrations`] and a later release's `extra`.
fn migrations_and(extra: Migration) -> Vec<Migration> {
    let mut all = migrations();
    all.push(extra);
    all
}

/// The kit's tables plus one service table, as a service's migration list looks.
fn migrations() -> Vec<Migration> {
    let mut all = outbox::MIGRATIONS.to_vec();
    all.push(Migration::new(
        10,
        "widgets",
        "CREATE TABLE widgets (id BIGINT PRIMARY KEY, name TEXT NOT NULL)",
    ));
    all
}

async fn migrated(db: &Db) -> Store {
    let store = db.open().await;
    store.migrate(&migrations()).await.expect("migrate");
    store
}

async fn count(store: &Store, sql: &str) -> i64 {
    let row = store::query(sql).fetch_one(store).await.expect(sql);
    row.try_get::<i64, _>(0).expect("a count")
}

fn event(n: usize) -> Envelope {
    Envelope::new(
        "widget.made",
        format!("widget-{n}"),
        serde_json::json!({ "n": n }),
        Metadata::default(),
    )
}

// ---- the cases ----

/// Migrations run once: a second run (a restart) changes nothing and the version is right.
async fn migrations_apply_once(db: Arc<Db>) {
    let store = db.open().await;
    store.migrate(&migrations()).await.expect("first migrate");
    assert_eq!(store.schema_version().await.expect("version"), 10);
    store.migrate(&migrations()).await.expect("second migrate");
    assert_eq!(store.schema_version().await.expect("version"), 10);
    let applied = migrations().len() as i64;
    assert_eq!(count(&store, "SELECT COUNT(*) FROM schema_migrations").await, applied);

    // The tables are there and usable.
    store::query("INSERT INTO widgets (id, name) VALUES ($1, $2)")
        .bind(1i64)
        .bind("first")
        .execute(&store)
        .await
        .expect("insert a widget");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM widgets").await, 1);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM outbox").await, 0);

    // A later release adds a migration: only that one runs.
    let next = migrations_and(Migration::new(
        11,
        "widget_colour",
        "ALTER TABLE widgets ADD COLUMN colour TEXT",
    ));
    store.migrate(&next).await.expect("migrate to 11");
    assert_eq!(store.schema_version().await.expect("version"), 11);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM widgets").await, 1, "data kept");
}

/// A store another version wrote (a migration this one does not have, or one it has under
/// another name) is refused, naming the migration, and left as it was.
async fn a_store_another_version_wrote_is_refused(db: Arc<Db>) {
    let store = db.open().await;
    let newer = migrations_and(Migration::new(
        11,
        "widget_colour",
        "ALTER TABLE widgets ADD COLUMN colour TEXT",
    ));
    store.migrate(&newer).await.expect("the newer version migrates");
    let refused = store
        .migrate(&migrations())
        .await
        .expect_err("an older version must refuse it");
    assert!(
        matches!(&refused, StoreError::UnknownMigration { version: 11, name } if name == "widget_colour"),
        "{refused}"
    );

    let renamed = migrations_and(Migration::new(
        11,
        "widget_size",
        "ALTER TABLE widgets ADD COLUMN size TEXT",
    ));
    let refused = store
        .migrate(&renamed)
        .await
        .expect_err("a different migration 11 must refuse it");
    assert!(
        refused.to_string().contains("migration 11 (widget_colour)"),
        "{refused}"
    );
    assert_eq!(store.schema_version().await.expect("version"), 11, "left as it was");
    store
        .check_migrations(&newer)
        .await
        .expect("the version that wrote it accepts it");
}

/// Two instances starting together on one database both come up on the same schema.
async fn concurrent_migrations_both_succeed(db: Arc<Db>) {
    for _round in 0..3 {
        // Every round starts from an empty schema, so the race is on creating everything.
        let (a, b) = (db.open().await, db.open().await);
        let all = migrations();
        let (ra, rb) = tokio::join!(a.migrate(&all), b.migrate(&all));
        ra.expect("instance a migrates");
        rb.expect("instance b migrates");
        assert_eq!(a.schema_version().await.expect("version"), 10);
        assert_eq!(b.schema_version().await.expect("version"), 10);
        assert_eq!(
            count(&a, "SELECT COUNT(*) FROM schema_migrations").await,
            all.len() as i64
        );
        for table in ["widgets", "outbox", "inbox", "relay_lease", "schema_migrations"] {
            store::query(&format!("DROP TABLE {table}"))
                .execute(&a)
                .await
                .expect("reset");
        }
        a.close().await;
        b.close().await;
    }
}

/// Work in a transaction that rolls back leaves no trace: no state, no event, no inbox mark.
async fn rolled_back_transaction_leaves_nothing(db: Arc<Db>) {
    let store = migrated(&db).await;
    let outbox = Outbox::new(store.clone());
    let e = event(1);

    let mut tx = store.begin().await.expect("begin");
    store::query("INSERT INTO widgets (id, name) VALUES ($1, $2)")
        .bind(1i64)
        .bind("doomed")
        .execute(&mut tx)
        .await
        .expect("insert");
    outbox.add(&mut tx, "widgets", &e).await.expect("outbox add");
    assert!(inbox::record(&mut tx, "g", &e.event_id.to_string())
        .await
        .expect("record"));
    tx.rollback().await.expect("rollback");

    assert_eq!(count(&store, "SELECT COUNT(*) FROM widgets").await, 0);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM outbox").await, 0);
    assert_eq!(outbox.lag().await.expect("lag"), (0, 0));
    let mut tx = store.begin().await.expect("begin");
    assert!(
        inbox::record(&mut tx, "g", &e.event_id.to_string())
            .await
            .expect("record"),
        "a rolled back inbox mark must not count as handled"
    );
    tx.rollback().await.expect("rollback");

    // A dropped (never committed) transaction rolls back too.
    {
        let mut tx = store.begin().await.expect("begin");
        outbox.add(&mut tx, "widgets", &e).await.expect("outbox add");
    }
    assert_eq!(count(&store, "SELECT COUNT(*) FROM outbox").await, 0);
}

/// Committed outbox rows reach the broker, each exactly once, and are marked sent; two
/// relays on one store (two instances of a service) still publish each row once.
async fn outbox_relay_publishes_every_row_once(db: Arc<Db>) {
    const N: usize = 40;
    let store = migrated(&db).await;
    let bus_dir = tempfile::tempdir().expect("temp dir");
    let bus = broker::connect(&format!("sqlite://{}", bus_dir.path().join("bus.db").display()))
        .await
        .expect("embedded broker");
    let counting = Arc::new(CountingBroker::new(bus.clone()));
    let outbox = Outbox::new(store.clone());
    let other_instance = Outbox::new(db.open().await);
    let (stop, shutdown) = shutdown::channel();
    let relays = [
        outbox.spawn_relay(counting.clone(), shutdown.clone()),
        other_instance.spawn_relay(counting.clone(), shutdown),
    ];

    let mut sent = Vec::new();
    for batch in 0..4 {
        let mut tx = store.begin().await.expect("begin");
        for i in 0..N / 4 {
            let e = event(batch * 100 + i);
            outbox.add(&mut tx, "widgets.made", &e).await.expect("add");
            sent.push(e.event_id.to_string());
        }
        outbox.commit(tx).await.expect("commit");
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    while outbox.lag().await.expect("lag").0 > 0 {
        assert!(Instant::now() < deadline, "relay left {:?} unsent", outbox.lag().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a second relay a chance to (wrongly) publish again before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.trigger();
    for relay in relays {
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay stops on shutdown")
            .expect("relay task");
    }

    let published = counting.counts();
    for id in &sent {
        assert_eq!(
            published.get(id),
            Some(&1),
            "event {id} published {:?} times",
            published.get(id)
        );
    }
    assert_eq!(published.len(), N);
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await,
        0
    );
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").await,
        N as i64
    );

    // On the broker, in the order they were written, with the envelope intact.
    let on_bus = bus.read("widgets.made", 1000).await.expect("read");
    let ids: Vec<_> = on_bus.iter().map(|m| m.msg_id.clone()).collect();
    assert_eq!(ids, sent);
    let first = Envelope::from_slice(&on_bus[0].body).expect("an envelope");
    assert_eq!(first.event_id.to_string(), sent[0]);
}

/// The inbox answers "new" once per (group, event) and "seen" after that.
async fn inbox_records_each_event_once(db: Arc<Db>) {
    let store = migrated(&db).await;
    let id = event(1).event_id.to_string();

    let mut tx = store.begin().await.expect("begin");
    assert!(inbox::record(&mut tx, "billing", &id).await.expect("record"));
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    assert!(
        !inbox::record(&mut tx, "billing", &id).await.expect("record"),
        "a redelivered event is recognised"
    );
    assert!(
        inbox::record(&mut tx, "shipping", &id).await.expect("record"),
        "another group handles it separately"
    );
    tx.commit().await.expect("commit");

    // Another instance of the group sees the mark too.
    let other = db.open().await;
    let mut tx = other.begin().await.expect("begin");
    assert!(!inbox::record(&mut tx, "billing", &id).await.expect("record"));
    assert!(!inbox::record(&mut tx, "shipping", &id).await.expect("record"));
    tx.rollback().await.expect("rollback");
}

/// A broker that counts publishes per message id before passing them on, so a test can
/// tell "published once" from "published twice and de-duplicated".
struct CountingBroker {
    inner: SharedBroker,
    counts: Mutex<HashMap<String, usize>>,
}

impl CountingBroker {
    fn new(inner: SharedBroker) -> CountingBroker {
        CountingBroker {
            inner,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> HashMap<String, usize> {
        self.counts.lock().expect("counts").clone()
    }
}

impl Broker for CountingBroker {
    fn publish<'a>(&'a self, topic: &'a str, msg_id: &'a str, body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>> {
        *self
            .counts
            .lock()
            .expect("counts")
            .entry(msg_id.to_string())
            .or_default() += 1;
        self.inner.publish(topic, msg_id, body)
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        self.inner.subscribe(topic, group, options)
    }

    fn read<'a>(&'a self, topic: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        self.inner.read(topic, limit)
    }

    fn delete<'a>(&'a self, topic: &'a str, seq: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.inner.delete(topic, seq)
    }

    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        self.inner.pending(topic, group)
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.inner.ping()
    }

    fn kind(&self) -> &'static str {
        "counting"
    }
}

/// A role whose every PostgreSQL connection is held is told so, by name, within its wait,
/// instead of hanging or failing with a bare "pool timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_no_free_connection_says_whose_it_is_and_how_large() {
    run(TestDb::postgres("bazaar_test").await, |db| async move {
        let mut pool = store::PoolOptions::new("orders", 1);
        pool.wait = Duration::from_millis(200);
        let store = Store::open_with(&db.url, pool).await.expect("open");
        let held = store.begin().await.expect("the one connection");
        let started = Instant::now();
        let error = store::query("SELECT 1")
            .fetch_all(&store)
            .await
            .expect_err("no connection is free");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?}",
            started.elapsed()
        );
        let text = error.to_string();
        assert!(
            text.contains("orders") && text.contains("all 1 connections") && text.contains("--store-pool"),
            "{text}"
        );
        assert!(error.is_busy(), "worth retrying: {text}");
        let error = store.begin().await.expect_err("no connection for a transaction either");
        assert!(error.to_string().contains("orders"), "{error}");
        drop(held);
        store.close().await;
    })
    .await;
}

/// A replica cut off from the database in the middle of a transaction (a partition, a frozen
/// host) does not hold the rows it locked for ever: the server ends its session once it has
/// sat idle in the transaction past the pool's limit, and the other replicas go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_its_client_went_silent_in_lets_go_of_its_locks() {
    run(TestDb::postgres("bazaar_test").await, |db| async move {
        migrated(&db).await.close().await;
        let mut pool = store::PoolOptions::new("inventory", 2);
        pool.idle_in_transaction = Duration::from_millis(500);
        let (cut_off, other) = (
            Store::open_with(&db.url, pool.clone()).await.expect("open"),
            Store::open_with(&db.url, pool).await.expect("open"),
        );
        store::query("INSERT INTO widgets (id, name) VALUES (1, 'a')")
            .execute(&other)
            .await
            .expect("insert");
        let mut silent = cut_off.begin().await.expect("begin");
        store::query("UPDATE widgets SET name = 'held' WHERE id = 1")
            .execute(&mut silent)
            .await
            .expect("lock the row");
        // The client says nothing more; another replica needs the same row.
        let started = Instant::now();
        let mut tx = other.begin().await.expect("begin");
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            store::query("UPDATE widgets SET name = 'taken' WHERE id = 1").execute(&mut tx),
        )
        .await;
        assert!(
            waited.is_ok(),
            "still waiting for the silent transaction's lock after {:?}",
            started.elapsed()
        );
        waited.expect("in time").expect("update");
        tx.commit().await.expect("commit");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?}",
            started.elapsed()
        );
        let late = silent.commit().await;
        assert!(late.is_err(), "the silent transaction's session was ended");
        let row = store::query("SELECT name FROM widgets WHERE id = 1")
            .fetch_one(&other)
            .await
            .expect("read");
        assert_eq!(row.try_get::<String, _>(0).expect("name"), "taken");
        cut_off.close().await;
        other.close().await;
    })
    .await;
}
