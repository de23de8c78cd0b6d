//! Traces leave over OTLP/HTTP: spans of one request and the event it causes join the
//! caller's W3C trace, nested as they ran.

use std::{sync::Arc, time::Duration};

use axum::{extract::State, routing::post, Router};
use bazaar_kit::otlp;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing_subscriber::layer::SubscriberExt;

type Received = Arc<Mutex<Vec<Value>>>;

async fn collect(State(got): State<Received>, body: String) -> &'static str {
    if let Ok(v) = serde_json::from_str(&body) {
        got.lock().await.push(v);
    }
    "{}"
}

#[tokio::test]
async fn spans_are_exported_in_the_callers_trace() {
    let got: Received = Arc::default();
    let app = Router::new().route("/v1/traces", post(collect)).with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let subscriber = tracing_subscriber::registry().with(otlp::layer("orders", &endpoint));
    let guard = tracing::subscriber::set_default(subscriber);
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    {
        let request = tracing::info_span!("request", traceparent = caller, correlation_id = "c-1");
        let _r = request.enter();
        let handle = tracing::info_span!("handle", event_type = "order.created");
        let _h = handle.enter();
    }
    drop(guard);

    let spans = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let spans: Vec<Value> = got
                .lock()
                .await
                .iter()
                .flat_map(|b| {
                    b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .collect();
            if spans.len() >= 2 {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the collector received both spans");
    let find = |name: &str| spans.iter().find(|s| s["name"] == name).cloned().expect(name);
    let (request, handle) = (find("request"), find("handle"));
    assert_eq!(
        request["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "joins the caller's trace"
    );
    assert_eq!(
        request["parentSpanId"], "00f067aa0ba902b7",
        "child of the caller's span"
    );
    assert_eq!(handle["traceId"], request["traceId"]);
    assert_eq!(handle["parentSpanId"], request["spanId"], "nested as it ran");
    let received = got.lock().await;
    assert_eq!(
        received[0]["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
        "orders"
    );
}
