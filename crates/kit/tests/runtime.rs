//! The role runtime owns its background tasks: a stopping role finishes the delivery its
//! consumer is handling before `serve` returns, and a consumer of a topic the service's spec
//! does not list is refused. With a mesh certificate its API speaks only mutual TLS and names
//! each caller, while health and metrics stay on a plain admin listener that serves nothing
//! else.

use bazaar_kit::store;
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bazaar_kit::{
    asyncapi::{schema_of, MessageKind, MessageSpec},
    broker::{dlq_topic, DeadLetter},
    consumer::{Handler, HandlerError},
    envelope::{Envelope, Metadata},
    mesh::{Authority, Identity, MeshFiles, PeerIdentity, Tls, Workload},
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
    openapi: bazaar_kit::openapi::no_operations,
    messages: &[MessageSpec {
        event_type: "test.counted",
        topic: TOPIC,
        kind: MessageKind::Event,
        summary: "A count, at least one.",
        payload: schema_of::<Counted>,
    }],
    metrics: &[],
};

/// The payload of `test.counted`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Counted {
    #[schema(minimum = 1)]
    n: i64,
}

/// Takes its time over each event, so a shutdown lands mid-delivery.
struct Slow {
    started: AtomicBool,
    finished: AtomicBool,
}

impl Handler for Slow {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.started.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(600)).await;
            store::query("INSERT INTO handled (event_id) VALUES ($1)")
                .bind(event.event_id.to_string())
                .execute(&mut *tx)
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
    start_with(dir, None).await
}

async fn start_with(dir: &std::path::Path, mesh: Option<Arc<Tls>>) -> (shutdown::ShutdownTrigger, Runtime) {
    let (stop, shut) = shutdown::channel();
    let rt = Runtime::start(&SPEC, &role_config(dir, mesh), shut)
        .await
        .expect("start");
    (stop, rt)
}

/// A role's settings on a store and embedded broker in `dir`.
fn role_config(dir: &std::path::Path, mesh: Option<Arc<Tls>>) -> RoleConfig {
    RoleConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        store_url: format!("sqlite://{}/role.db", dir.display()),
        store_pool: 4,
        broker_url: format!("sqlite://{}/bus.db", dir.display()),
        tokens: bazaar_kit::auth::Verifier::fixed(Default::default()),
        drain_delay: std::time::Duration::ZERO,
        listen_fd: None,
        mesh,
        admin_listen: None,
        admin_listen_fd: None,
        mesh_policy: None,
        mesh_peers: Vec::new(),
    }
}

#[tokio::test]
async fn a_service_migration_that_takes_a_kit_version_is_refused_before_any_runs() {
    static CLASHING: ServiceSpec = ServiceSpec {
        name: "runtime-test",
        migrations: &[Migration::new(3, "widgets", "CREATE TABLE widgets (n BIGINT)")],
        ..SPEC
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_stop, shut) = shutdown::channel();
    match Runtime::start(&CLASHING, &role_config(dir.path(), None), shut).await {
        Err(ServiceError::Config(message)) => {
            assert!(
                message.contains("widgets") && message.contains("version 3"),
                "{message}"
            )
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a role started with two migrations of version 3"),
    }
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
    let handled: i64 = store::query("SELECT COUNT(*) FROM handled")
        .fetch_scalar(&rt.store)
        .await
        .expect("count");
    assert_eq!(handled, 1, "the delivery in hand committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_breaks_its_schema_is_dead_lettered_with_the_reason_and_the_rest_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stop, rt) = start(dir.path()).await;
    let handler = Slow::new();
    rt.consume(rt.consumer(TOPIC), handler.clone()).expect("consume");
    let payloads = [
        serde_json::json!({"n": 1}),
        serde_json::json!({"n": "two"}),
        serde_json::json!({"n": 3}),
    ];
    let mut ids = Vec::new();
    for payload in payloads {
        let event = Envelope::new("test.counted", "a1", payload, Metadata::default());
        ids.push(event.event_id.to_string());
        rt.broker
            .publish(TOPIC, &event.event_id.to_string(), Bytes::from(event.to_vec()))
            .await
            .expect("publish");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (handled, dead) = loop {
        let handled: Vec<String> = store::query("SELECT event_id FROM handled ORDER BY event_id")
            .fetch_column(&rt.store)
            .await
            .expect("handled");
        let dead = rt.broker.read(&dlq_topic(TOPIC), 10).await.expect("dlq");
        if handled.len() == 2 && dead.len() == 1 {
            break (handled, dead);
        }
        assert!(Instant::now() < deadline, "handled {handled:?}, dead {}", dead.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(handled, [ids[0].clone(), ids[2].clone()]);
    let letter: DeadLetter = serde_json::from_slice(&dead[0].body).expect("a dead letter");
    assert_eq!(letter.msg_id, ids[1]);
    assert_eq!(
        letter.reason,
        "payload of `test.counted` does not match its schema: at $.n: expected integer, found a string"
    );
    stop.trigger();
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

/// Certificates for `names` (roles, then tools prefixed `tool:`) from one new CA in `dir`.
fn mesh_files(dir: &std::path::Path, names: &[&str]) -> Vec<Arc<Tls>> {
    let ca = Authority::create("test.local", Duration::from_secs(3600)).expect("a CA");
    names
        .iter()
        .map(|name| {
            let identity = match name.strip_prefix("tool:") {
                Some(tool) => Identity::new("test.local", Workload::Tool, tool),
                None => Identity::role("test.local", name),
            }
            .expect("an identity");
            let file = name.replace(':', "-");
            let files = MeshFiles::in_dir(dir, &file);
            ca.issue(&identity, Duration::from_secs(600))
                .expect("a leaf")
                .write(&files)
                .expect("write");
            std::fs::write(&files.bundle, ca.cert_pem()).expect("bundle");
            Arc::new(Tls::load(files).expect("load"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_mesh_certificate_the_api_speaks_only_mutual_tls_and_health_stays_plain_on_the_admin_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = mesh_files(dir.path(), &["runtime-test", "tool:probe"]);
    let (stop, rt) = start_with(dir.path(), Some(tls[0].clone())).await;
    let api = axum::Router::new().route(
        "/whoami",
        axum::routing::get(
            |axum::Extension(PeerIdentity(caller)): axum::Extension<PeerIdentity>| async move { caller.uri() },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (port, admin_port) = (
        listener.local_addr().unwrap().port(),
        admin.local_addr().unwrap().port(),
    );
    let serving = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.serve_with_admin(listener, Some(admin), api, rt.health()).await })
    };
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // A caller with the mesh's certificate is served and named.
    let peers = [("runtime-test".to_string(), std::net::IpAddr::from([127, 0, 0, 1]))];
    let mesh = bazaar_kit::mesh::http_client(&tls[1], Duration::from_secs(5), &peers).expect("a mesh client");
    let answer = mesh
        .get(format!("https://runtime-test:{port}/whoami"))
        .send()
        .await
        .expect("served over mTLS");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "spiffe://test.local/tool/probe");
    let ready = mesh
        .get(format!("https://runtime-test:{port}/health/ready"))
        .send()
        .await
        .expect("health over mTLS");
    assert_eq!(ready.status(), 200);

    // Plain HTTP, or TLS without a client certificate, gets nothing from the API port.
    assert!(plain
        .get(format!("http://127.0.0.1:{port}/whoami"))
        .send()
        .await
        .is_err());
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls({
            let mut roots = rustls::RootCertStore::empty();
            let bundle = std::fs::read(&tls[1].files().bundle).unwrap();
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&bundle) {
                roots.add(cert.unwrap()).unwrap();
            }
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        })
        .resolve("runtime-test", ([127, 0, 0, 1], 0).into())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(
        anonymous
            .get(format!("https://runtime-test:{port}/whoami"))
            .send()
            .await
            .is_err(),
        "served a client without a certificate"
    );

    // The admin port serves health and metrics in plain HTTP, and nothing else.
    for path in ["/health", "/health/ready", "/health/live", "/metrics"] {
        let status = plain
            .get(format!("http://127.0.0.1:{admin_port}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    let api_on_admin = plain
        .get(format!("http://127.0.0.1:{admin_port}/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(api_on_admin.status(), 404);

    stop.trigger();
    serving.await.expect("join").expect("serve");
}
