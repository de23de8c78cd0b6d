//! OpenTelemetry trace export over OTLP/HTTP (JSON encoding), as a `tracing` layer.
//!
//! Off unless `BAZAAR_OTLP_ENDPOINT` (e.g. `http://127.0.0.1:4318`) is set; then every closed
//! span is sent, in batches, to `<endpoint>/v1/traces`. A span with a `traceparent` field
//! (an HTTP request's header, or an event's metadata) joins that W3C trace as a child of its
//! parent span; other spans inherit their parent's trace, or start a new one. So a request
//! through the gateway and the events it causes in every role form one trace.
//!
//! Export never slows the traced work: spans go through a bounded queue, and when the
//! collector is slow or down the queue fills and spans are dropped (counted in
//! `bazaar_otlp_dropped_spans_total`).

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{
    field::{Field, Visit},
    span, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

/// The variable naming the collector's OTLP/HTTP endpoint.
pub const ENDPOINT_VAR: &str = "BAZAAR_OTLP_ENDPOINT";

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// Longest a closed span waits before it is sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A closed span, ready to send.
#[derive(Debug, Clone)]
struct Finished {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: &'static str,
    start: u64,
    end: u64,
    attributes: Vec<(String, String)>,
}

/// What the layer keeps in a live span's extensions.
struct Live {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start: u64,
    attributes: Vec<(String, String)>,
}

/// The layer that records spans and hands them to the exporter task.
pub struct OtlpLayer {
    queue: mpsc::Sender<Finished>,
}

/// Builds the layer and spawns its exporter on the current tokio runtime, sending to
/// `endpoint` as service `service`. Call from inside a runtime.
pub fn layer(service: &str, endpoint: &str) -> OtlpLayer {
    let (tx, rx) = mpsc::channel(QUEUE);
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    tokio::spawn(export(service.to_string(), url, rx));
    OtlpLayer { queue: tx }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(16) {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The trace id and parent span id of a W3C `traceparent`, read as
/// [`bazaar_trust::traceparent::Traceparent`] reads it.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8])> {
    let parsed = bazaar_trust::traceparent::Traceparent::parse(value)?;
    Some((parsed.trace_bytes(), parsed.parent_bytes()))
}

/// Collects a span's fields as string attributes.
#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_string(), format!("{value:?}")));
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let remote = fields
            .0
            .iter()
            .find(|(k, _)| k == "traceparent")
            .and_then(|(_, v)| parse_traceparent(v));
        let local_parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Live>().map(|live| (live.trace_id, live.span_id)));
        let (trace_id, parent) = match (local_parent, remote) {
            (Some((trace, parent)), _) => (trace, Some(parent)),
            (None, Some((trace, parent))) => (trace, Some(parent)),
            (None, None) => (random::<16>(), None),
        };
        span.extensions_mut().insert(Live {
            trace_id,
            span_id: random::<8>(),
            parent,
            start: now_nanos(),
            attributes: fields.0,
        });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut fields = Fields::default();
            values.record(&mut fields);
            if let Some(live) = span.extensions_mut().get_mut::<Live>() {
                live.attributes.extend(fields.0);
            }
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(live) = span.extensions_mut().remove::<Live>() else {
            return;
        };
        let done = Finished {
            trace_id: live.trace_id,
            span_id: live.span_id,
            parent: live.parent,
            name: span.name(),
            start: live.start,
            end: now_nanos(),
            attributes: live.attributes,
        };
        if self.queue.try_send(done).is_err() {
            metrics::counter!("bazaar_otlp_dropped_spans_total").increment(1);
        }
    }
}

/// The OTLP/HTTP JSON body for `spans` of `service`.
fn body(service: &str, spans: &[Finished]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.trace_id),
                "spanId": hex(&s.span_id),
                "name": s.name,
                "kind": 1,
                "startTimeUnixNano": s.start.to_string(),
                "endTimeUnixNano": s.end.to_string(),
                "attributes": s.attributes.iter()
                    .map(|(k, v)| json!({"key": k, "value": {"stringValue": v}}))
                    .collect::<Vec<_>>(),
            });
            if let Some(parent) = s.parent {
                span["parentSpanId"] = json!(hex(&parent));
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "bazaar"}, "spans": spans}],
        }]
    })
}

/// Sends batches (full, or a second after their first span) until every sender is gone.
async fn export(service: String, url: String, mut rx: mpsc::Receiver<Finished>) {
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(5)).build() else {
        return;
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let wait = due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let closed = tokio::select! {
            got = rx.recv() => match got {
                Some(span) => {
                    due.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_EVERY);
                    batch.push(span);
                    if batch.len() < BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tokio::time::sleep_until(wait) => false,
        };
        if !batch.is_empty() {
            let sent = client.post(&url).json(&body(&service, &batch)).send().await;
            if !matches!(&sent, Ok(r) if r.status().is_success()) {
                metrics::counter!("bazaar_otlp_failed_exports_total").increment(1);
            }
            batch.clear();
        }
        due = None;
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_junk_does_not() {
        let (trace, span) = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_body_is_otlp_json() {
        let span = Finished {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            name: "request",
            start: 10,
            end: 20,
            attributes: vec![("correlation_id".into(), "c1".into())],
        };
        let b = body("orders", &[span]);
        let s = &b["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(
            b["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "orders"
        );
        assert_eq!(s["traceId"], "01010101010101010101010101010101");
        assert_eq!(s["parentSpanId"], "0303030303030303");
        assert_eq!(s["startTimeUnixNano"], "10");
        assert_eq!(s["attributes"][0]["key"], "correlation_id");
    }
}
