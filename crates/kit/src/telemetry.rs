//! Logs and metrics for every role: tracing to stderr (human or JSON lines) and one global
//! Prometheus recorder behind the `metrics` facade.
//!
//! Log lines are appended to a buffer in memory and written to stderr by one thread every
//! [`FLUSH_EVERY`], so no request waits on stderr: the gateway's access line written
//! synchronously cost it about a fifth of its throughput (a `write` and a contended lock per
//! request). Call [`flush_logs`] before the process exits.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Starts logging for `service`. `BAZAAR_LOG` (or `RUST_LOG`) sets the filter, default
/// `info`; `json` writes one JSON object per line for log shippers. With
/// `BAZAAR_OTLP_ENDPOINT` set, spans are also exported over OTLP (see [`crate::otlp`]); call
/// from inside a tokio runtime then. Safe to call twice.
pub fn init_logging(service: &str, json: bool) {
    JSON.store(json, Ordering::Relaxed);
    let filter = std::env::var("BAZAAR_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,sqlx=warn,async_nats=warn,hyper=warn".into());
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = if json {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(deferred_stderr)
            .boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .compact()
            .with_writer(deferred_stderr)
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

/// Whether lines are JSON objects (see [`init_logging`]).
static JSON: AtomicBool = AtomicBool::new(false);

/// A field's value in an [`info_line`].
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    /// Written bare, as tracing writes a `%value` (Display).
    Bare(&'a str),
    /// Written quoted and escaped, as tracing writes a `&str`.
    Text(&'a str),
    /// A number.
    Number(u64),
}

/// Logs one INFO event for `target` in the shape tracing's formatter gives it (text or JSON,
/// as [`init_logging`] chose), without tracing's per-field dispatch and date formatting: for
/// a line written on every request (the gateway's access line took a twelfth of its CPU
/// through tracing). The caller checks `tracing::enabled!(Level::INFO)` first.
pub fn info_line(target: &str, message: &str, fields: &[(&str, Field<'_>)]) {
    thread_local! {
        static LINE: std::cell::RefCell<(u64, Vec<u8>, Vec<u8>)> = const {
            std::cell::RefCell::new((u64::MAX, Vec::new(), Vec::new()))
        };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    LINE.with_borrow_mut(|(second, stamp, line)| {
        // The date and time to the second, formatted once a second per thread.
        if *second != now.as_secs() {
            *second = now.as_secs();
            stamp.clear();
            let time = chrono::DateTime::from_timestamp(now.as_secs() as i64, 0).unwrap_or_default();
            let _ = write!(stamp, "{}", time.format("%Y-%m-%dT%H:%M:%S"));
        }
        line.clear();
        format_line(
            JSON.load(Ordering::Relaxed),
            stamp,
            now.subsec_micros(),
            target,
            message,
            fields,
            line,
        );
        let _ = deferred_stderr().write(line);
    });
}

/// One log line: `stamp` (date and time to the second) with `micros`, INFO, `message` and
/// `fields`, as tracing's compact text or flattened JSON formatter writes it.
fn format_line(
    json: bool,
    stamp: &[u8],
    micros: u32,
    target: &str,
    message: &str,
    fields: &[(&str, Field<'_>)],
    line: &mut Vec<u8>,
) {
    if json {
        line.extend_from_slice(b"{\"timestamp\":\"");
        line.extend_from_slice(stamp);
        let _ = write!(line, ".{micros:06}Z\",\"level\":\"INFO\",\"message\":");
        let _ = serde_json::to_writer(&mut *line, message);
        for (name, value) in fields {
            line.push(b',');
            let _ = serde_json::to_writer(&mut *line, name);
            line.push(b':');
            let _ = match value {
                Field::Bare(text) | Field::Text(text) => serde_json::to_writer(&mut *line, text),
                Field::Number(n) => serde_json::to_writer(&mut *line, n),
            };
        }
        line.extend_from_slice(b",\"target\":");
        let _ = serde_json::to_writer(&mut *line, target);
        line.extend_from_slice(b"}\n");
    } else {
        line.extend_from_slice(stamp);
        let _ = write!(line, ".{micros:06}Z  INFO {message}");
        for (name, value) in fields {
            let _ = match value {
                Field::Bare(text) => write!(line, " {name}={text}"),
                // Debug's quoting, without its per-character escape search when nothing needs one.
                Field::Text(text)
                    if text
                        .bytes()
                        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') =>
                {
                    for part in [" ", name, "=\"", text, "\""] {
                        line.extend_from_slice(part.as_bytes());
                    }
                    Ok(())
                }
                Field::Text(text) => write!(line, " {name}={text:?}"),
                Field::Number(n) => write!(line, " {name}={n}"),
            };
        }
        line.push(b'\n');
    }
}

/// How often the flusher thread writes what was logged.
pub const FLUSH_EVERY: Duration = Duration::from_millis(25);

/// Most bytes of log lines held between two flushes; past it lines are counted and dropped
/// (a flood of logging must not take the memory the work needs).
const PENDING_CAP: usize = 8 << 20;

/// Lines logged and not yet written, and how many were dropped at the cap.
struct Pending {
    lines: Mutex<Vec<u8>>,
    dropped: AtomicU64,
}

static PENDING: Pending = Pending {
    lines: Mutex::new(Vec::new()),
    dropped: AtomicU64::new(0),
};

/// The writer tracing formats each line into: appends to [`PENDING`] and, the first time,
/// starts the thread that flushes it. That thread lives as long as the process.
fn deferred_stderr() -> DeferredStderr {
    static FLUSHER: OnceLock<()> = OnceLock::new();
    FLUSHER.get_or_init(|| {
        let started = std::thread::Builder::new().name("log-flush".into()).spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            flush_logs();
        });
        if let Err(e) = started {
            eprintln!("bazaar: cannot start the log flusher ({e}); logs are written when the process stops");
        }
    });
    DeferredStderr
}

/// See [`deferred_stderr`].
struct DeferredStderr;

impl Write for DeferredStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut lines = PENDING.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() + line.len() > PENDING_CAP {
            PENDING.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            lines.extend_from_slice(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes every log line logged so far to stderr, and says how many were dropped.
pub fn flush_logs() {
    // Swap the buffer out so loggers wait only for the swap, not for stderr.
    static SPARE: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut lines = PENDING.lines.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *lines, &mut *spare);
    }
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(&spare);
    let dropped = PENDING.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = writeln!(
            stderr,
            "bazaar: {dropped} log line(s) dropped: more than {PENDING_CAP} bytes were logged within {FLUSH_EVERY:?}"
        );
    }
    let _ = stderr.flush();
    // Keep the capacity for the next swap unless one burst made it large.
    spare.clear();
    if spare.capacity() > 1 << 20 {
        spare.shrink_to(64 << 10);
    }
}

/// A metric a crate records, and the help text `/metrics` gives it (`# HELP`).
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    /// Its name.
    pub name: &'static str,
    /// What it counts or measures, in which unit, by which labels.
    pub help: &'static str,
}

/// Gives each metric of `docs` its help text in this process's `/metrics`.
pub fn describe(docs: &[MetricDoc]) {
    for doc in docs {
        // The exporter keeps one help text per name, whatever the metric's kind.
        metrics::describe_gauge!(doc.name, doc.help);
    }
}

/// The metrics the kit records in every role that uses it.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_http_requests_total",
        help: "HTTP requests served, by route, method and status.",
    },
    MetricDoc {
        name: "bazaar_http_request_duration_seconds",
        help: "Time to answer an HTTP request, in seconds, by route and method.",
    },
    MetricDoc {
        name: "bazaar_http_panics_total",
        help: "Request handlers that panicked (each answered 500).",
    },
    MetricDoc {
        name: "bazaar_http_slow_bodies_total",
        help: "Requests refused with 408 because their body arrived too slowly.",
    },
    MetricDoc {
        name: "bazaar_connection_cap_reached_total",
        help: "Times a listener held a new connection because its cap of open connections was reached, by listener.",
    },
    MetricDoc {
        name: "bazaar_outbox_unsent",
        help: "Events in the outbox not yet published to the broker.",
    },
    MetricDoc {
        name: "bazaar_outbox_oldest_unsent_seconds",
        help: "Age of the oldest event in the outbox not yet published, in seconds (0 when none).",
    },
    MetricDoc {
        name: "bazaar_outbox_published_total",
        help: "Events the outbox relay published to the broker.",
    },
    MetricDoc {
        name: "bazaar_consumer_handled_total",
        help: "Deliveries a consumer handled and acknowledged, by topic and group.",
    },
    MetricDoc {
        name: "bazaar_consumer_redeliveries_total",
        help: "Deliveries that arrived again after a failed or unacknowledged attempt, by topic and group.",
    },
    MetricDoc {
        name: "bazaar_consumer_lag",
        help: "Messages a consumer group has yet to acknowledge on its topic, by topic and group.",
    },
    MetricDoc {
        name: "bazaar_dead_letters_total",
        help: "Messages moved to a dead-letter topic after their last attempt, by topic and group.",
    },
    MetricDoc {
        name: "bazaar_saga_transitions_total",
        help: "Sagas that reached a status, by saga and status.",
    },
    MetricDoc {
        name: "bazaar_saga_replies_total",
        help: "Participant replies a saga took, by saga and whether the step succeeded.",
    },
    MetricDoc {
        name: "bazaar_saga_retries_total",
        help: "Saga commands resent for want of a reply in time, by saga and step.",
    },
    MetricDoc {
        name: "bazaar_saga_stuck_total",
        help: "Sagas that stopped as stuck and wait for an operator, by saga.",
    },
    MetricDoc {
        name: "bazaar_sagas",
        help: "Sagas in each status, by saga and status.",
    },
    MetricDoc {
        name: "bazaar_breaker_state",
        help: "A circuit breaker's state, by breaker: 0 closed, 1 half-open, 2 open.",
    },
    MetricDoc {
        name: "bazaar_breaker_transitions_total",
        help: "Times a circuit breaker changed state, by breaker.",
    },
    MetricDoc {
        name: "bazaar_breaker_rejected_total",
        help: "Calls a circuit breaker refused without trying, by breaker.",
    },
    MetricDoc {
        name: "bazaar_client_retries_total",
        help: "Outbound calls retried, by client.",
    },
    MetricDoc {
        name: "bazaar_client_retry_budget_exhausted_total",
        help: "Outbound retries given up because the retry budget was spent, by client.",
    },
    MetricDoc {
        name: "bazaar_client_rejected_total",
        help: "Outbound calls refused before they were sent, by client and reason.",
    },
    MetricDoc {
        name: "bazaar_mesh_requests_total",
        help: "Requests over the mesh, by caller, callee, route and outcome.",
    },
    MetricDoc {
        name: "bazaar_mesh_request_seconds",
        help: "Time to answer a request over the mesh, in seconds, by caller, callee and route.",
    },
    MetricDoc {
        name: "bazaar_mesh_refusals_total",
        help: "Mesh requests refused by the policy, by caller and callee.",
    },
    MetricDoc {
        name: "bazaar_mesh_handshake_failures_total",
        help: "Mutual TLS handshakes that failed (no, expired or untrusted certificate).",
    },
    MetricDoc {
        name: "bazaar_otlp_dropped_spans_total",
        help: "Trace spans dropped because the OTLP export queue was full.",
    },
    MetricDoc {
        name: "bazaar_otlp_failed_exports_total",
        help: "OTLP export batches the collector did not accept.",
    },
];

/// How often the recorder folds the histogram samples recorded since into its buckets.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
///
/// The recorder keeps every histogram sample until its upkeep folds them into the buckets;
/// without a scrape that was never, and a role's memory grew by every request's and every
/// event's durations (orders by 1 MiB every 30 s under the saga soak). A thread that lives
/// as long as the process runs the upkeep, as the log flusher flushes.
pub fn metrics() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets(&latency)
                .ok()?
                .install_recorder()
                .ok()?;
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot start the metrics upkeep; histograms are folded only when scraped");
            }
            Some(handle)
        })
        .as_ref()
}

/// The current metrics in Prometheus text format (empty when no recorder could be installed).
pub fn render_metrics() -> String {
    metrics().map(|h| h.render()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: [(&str, Field<'static>); 4] = [
        ("method", Field::Bare("GET")),
        ("path", Field::Text("/a \"b\"")),
        ("status", Field::Number(200)),
        ("service", Field::Text("orders")),
    ];

    #[test]
    fn a_fast_line_reads_like_tracings_text_line() {
        let mut line = Vec::new();
        format_line(false, b"2026-12-05T19:43:16", 7, "t", "proxied", &FIELDS, &mut line);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "2026-12-05T19:43:16.000007Z  INFO proxied method=GET path=\"/a \\\"b\\\"\" status=200 service=\"orders\"\n"
        );
    }

    #[test]
    fn a_fast_json_line_is_one_json_object() {
        let mut line = Vec::new();
        format_line(true, b"2026-12-05T19:43:16", 7, "t", "proxied", &FIELDS, &mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["timestamp"], "2026-12-05T19:43:16.000007Z");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["message"], "proxied");
        assert_eq!(value["path"], "/a \"b\"");
        assert_eq!(value["status"], 200);
        assert_eq!(value["service"], "orders");
        assert_eq!(value["target"], "t");
    }
}
