//! The role runtime owns its background tasks: a stopping role finishes the delivery its
//! consumer is handling before `serve` returns, and a consumer of a topic the service's spec
//! does not list is refused.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::{Envelope, Metadata},
    runtime::{RoleConfig, Runtime, ServiceError},
    service::ServiceSpec,
    shutdown,
    store::{Migration, Tx},
};
use bytes::Bytes;
use futures_util::future::BoxFuture;

const TOPIC: &str = "runtime.test";

static SPEC: ServiceSpec = ServiceSpec {
    name: "runtime-test",
    migrations: &[Migration::new(
        10,
        "handled",
        "CREATE TABLE handled (event_id TEXT NOT NULL)",
    )],
    publishes: &[],
    consumes: &[TOPIC],
    routes: &[],
};

/// Takes its time over each event, so a shutdown lands mid-delivery.
struct Slow {
    started: AtomicBool,
    finished: AtomicBool,
}

impl Handler for Slow {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.started.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(600)).await;
            sqlx::query("INSERT INTO handled (event_id) VALUES ($1)")
                .bind(event.event_id.to_string())
                .execute(&mut **tx)
                .await?;
            self.finished.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
}

impl Slow {
    fn new() -> Arc<Slow> {
        Arc::new(Slow {
            started: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        })
    }
}

/// The test role on a store and embedded broker in `dir`, and the trigger that stops it.
async fn start(dir: &std::path::Path) -> (shutdown::ShutdownTrigger, Runtime) {
    let config = RoleConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        store_url: format!("sqlite://{}/role.db", dir.display()),
        broker_url: format!("sqlite://{}/bus.db", dir.display()),
        tokens: bazaar_kit::auth::Verifier::fixed(Default::default()),
        drain_delay: std::time::Duration::ZERO,
        listen_fd: None,
    };
    let (stop, shut) = shutdown::channel();
    let rt = Runtime::start(&SPEC, &config, shut).await.expect("start");
    (stop, rt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_role_finishes_the_delivery_in_hand_before_serve_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, rt) = start(dir.path()).await;
    let handler = Slow::new();
    rt.consume(rt.consumer(TOPIC), handler.clone()).expect("consume");
    let event = Envelope::new("test.slow", "a1", serde_json::json!({}), Metadata::default());
    rt.broker
        .publish(TOPIC, &event.event_id.to_string(), Bytes::from(event.to_vec()))
        .await
        .expect("publish");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let serving = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.serve_on(listener, axum::Router::new(), rt.health()).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !handler.started.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the consumer never took the event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.trigger();
    serving.await.expect("join").expect("serve");

    assert!(
        handler.finished.load(Ordering::SeqCst),
        "serve returned while a delivery was still being handled"
    );
    let handled: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM handled")
        .fetch_one(rt.store.pool())
        .await
        .expect("count");
    assert_eq!(handled, 1, "the delivery in hand committed");
}

#[tokio::test]
async fn a_consumer_of_a_topic_the_spec_does_not_list_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_stop, rt) = start(dir.path()).await;
    let handler = Slow::new();
    let err = rt
        .consume(rt.consumer("elsewhere.events"), handler.clone())
        .unwrap_err();
    assert!(
        matches!(&err, ServiceError::Config(m) if m.contains("elsewhere.events")),
        "{err}"
    );
    let mut other_group = rt.consumer(TOPIC);
    other_group.group = "someone-else".into();
    assert!(rt.consume(other_group, handler).is_err(), "a foreign group is refused");
}
