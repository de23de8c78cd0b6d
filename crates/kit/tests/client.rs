//! The outbound client stack against a real HTTP server on a free port whose failures the
//! test controls: the breaker opens and keeps traffic off the server, recovers through
//! trial calls, and retries stay within their budget.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::any, Router};
use bazaar_kit::{
    client::{ClientPolicy, HttpClient, IDEMPOTENCY_KEY},
    resilience::{BreakerConfig, BreakerState, CallError},
};

/// What the test server does, and how often it was hit.
#[derive(Default)]
struct Server {
    hits: AtomicU32,
    failing: AtomicBool,
}

async fn answer(State(server): State<Arc<Server>>) -> StatusCode {
    server.hits.fetch_add(1, Ordering::SeqCst);
    if server.failing.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Starts the server on 127.0.0.1:0; it stops with the test's runtime.
async fn spawn_server() -> (String, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = Router::new().route("/{*path}", any(answer)).with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), server)
}

#[tokio::test]
async fn an_open_breaker_keeps_every_request_off_the_server_until_trial_calls_pass() {
    let (base, server) = spawn_server().await;
    server.failing.store(true, Ordering::SeqCst);
    let client = HttpClient::new(
        "it-breaker",
        ClientPolicy {
            max_retries: 0,
            breaker: BreakerConfig {
                window: 10,
                min_calls: 5,
                failure_rate: 0.5,
                open_for: Duration::from_millis(300),
                half_open_probes: 2,
                ..BreakerConfig::default()
            },
            ..ClientPolicy::default()
        },
    )
    .expect("client");
    let url = format!("{base}/thing");

    for _ in 0..5 {
        let status = client.send(client.get(&url)).await.expect("an answer").status();
        assert_eq!(status, 503);
    }
    assert_eq!(client.breaker_state(), BreakerState::Open);
    for _ in 0..20 {
        let r = client.send(client.get(&url)).await;
        assert!(matches!(r, Err(CallError::Open("it-breaker"))), "{r:?}");
    }
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        5,
        "no request reached the server while open"
    );

    server.failing.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.breaker_state() != BreakerState::HalfOpen {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker half-opens after its wait"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..2 {
        assert_eq!(client.send(client.get(&url)).await.expect("trial").status(), 200);
    }
    assert_eq!(
        client.breaker_state(),
        BreakerState::Closed,
        "two good trial calls close it"
    );
    assert_eq!(client.send(client.get(&url)).await.expect("call").status(), 200);
    assert_eq!(server.hits.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn retries_against_a_failing_server_stay_within_the_budget() {
    let (base, server) = spawn_server().await;
    server.failing.store(true, Ordering::SeqCst);
    let client = HttpClient::new(
        "it-budget",
        ClientPolicy {
            max_retries: 3,
            budget_ratio: 0.2,
            budget_floor: 1,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(5),
            // Kept closed so that only the budget limits the retries.
            breaker: BreakerConfig {
                failure_rate: 2.0,
                ..BreakerConfig::default()
            },
            ..ClientPolicy::default()
        },
    )
    .expect("client");
    let requests = 100;
    for i in 0..requests {
        let call = client
            .post(&format!("{base}/charges"))
            .header(IDEMPOTENCY_KEY, format!("key-{i}"));
        assert_eq!(client.send(call).await.expect("an answer").status(), 503);
    }
    let hits = server.hits.load(Ordering::SeqCst);
    // 20 % of the requests plus the floor (1 per second over the 10 s window), with one of
    // slack for the budget's rounding; without the budget it would be 400.
    assert!(hits > requests, "some calls were retried: {hits}");
    assert!(hits <= requests + 20 + 10 + 1, "retries stayed within budget: {hits}");

    // A POST without an idempotency key is never retried.
    server.hits.store(0, Ordering::SeqCst);
    let plain = client.post(&format!("{base}/charges"));
    assert_eq!(client.send(plain).await.expect("an answer").status(), 503);
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn calls_made_while_serving_carry_the_correlation_id_and_traceparent() {
    let seen: Arc<tokio::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                seen.lock().await.push((get("x-correlation-id"), get("traceparent")));
                StatusCode::OK
            }
        }
    };
    let app = Router::new().route("/{*path}", any(record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/x", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = HttpClient::new("peer", ClientPolicy::default()).expect("client");
    let context = bazaar_kit::http::RequestContext {
        correlation_id: "corr-42".into(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    };
    context.scope(client.send(client.get(&url))).await.expect("call");
    client.send(client.get(&url)).await.expect("call outside any request");
    let seen = seen.lock().await;
    assert_eq!(seen[0].0, "corr-42");
    assert_eq!(seen[0].1, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_eq!(seen[1], (String::new(), String::new()), "no context, no headers");
}
