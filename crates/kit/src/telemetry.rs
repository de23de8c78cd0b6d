//! Logs and metrics for every role: tracing to stderr (human or JSON lines) and one global
//! Prometheus recorder behind the `metrics` facade.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Starts logging for `service`. `BAZAAR_LOG` (or `RUST_LOG`) sets the filter, default
/// `info`; `json` writes one JSON object per line for log shippers. With
/// `BAZAAR_OTLP_ENDPOINT` set, spans are also exported over OTLP (see [`crate::otlp`]); call
/// from inside a tokio runtime then. Safe to call twice.
pub fn init_logging(service: &str, json: bool) {
    let filter = std::env::var("BAZAAR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn,hyper=warn".into());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .compact()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let otlp = std::env::var(crate::otlp::ENDPOINT_VAR)
        .ok()
        .filter(|e| !e.is_empty() && tokio::runtime::Handle::try_current().is_ok())
        .map(|endpoint| crate::otlp::layer(service, &endpoint));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otlp)
        .try_init();
}

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&latency)
                .ok()?
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// The current metrics in Prometheus text format (empty when no recorder could be installed).
pub fn render_metrics() -> String {
    metrics().map(|h| h.render()).unwrap_or_default()
}
