//! `/health`, `/health/live`, `/health/ready` and `/metrics` for every role.
//!
//! `/health` runs every dependency check with a short timeout and answers
//! `{status: healthy|degraded, checks: {name: up|"down: why"}, version, uptime}`, 200 when all
//! are up and 503 otherwise, so orchestrators and the gateway can route around a sick instance.
//! `/health/ready` says whether this instance should get traffic: its store and broker answer
//! and it is not draining (a stopping instance turns not-ready before it stops accepting).
//! `/health/live` is cheap and only says the process runs.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};

use crate::{broker::SharedBroker, store::Store};

type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The dependency checks of one role.
#[derive(Clone)]
pub struct Health {
    role: &'static str,
    started: Instant,
    checks: Vec<(&'static str, Check)>,
    /// The checks readiness needs (store and broker), by name.
    needed_for_ready: Vec<&'static str>,
    draining: Draining,
}

/// Set once the instance starts to stop: readiness fails from then on.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Marks the instance as draining.
    pub fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it is draining.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Health {
    /// Health of `role`, with no checks yet; `draining` is the instance's drain flag.
    pub fn new(role: &'static str, draining: Draining) -> Health {
        Health {
            role,
            started: Instant::now(),
            checks: Vec::new(),
            needed_for_ready: Vec::new(),
            draining,
        }
    }

    /// Adds a named check.
    pub fn check<F>(mut self, name: &'static str, f: F) -> Health
    where
        F: Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    {
        self.checks.push((name, Arc::new(f)));
        self
    }

    /// Checks the role's own database (readiness needs it).
    pub fn database(mut self, store: Store) -> Health {
        self.needed_for_ready.push("database");
        self.check("database", move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        })
    }

    /// Checks the broker (readiness needs it).
    pub fn broker(mut self, broker: SharedBroker) -> Health {
        self.needed_for_ready.push("broker");
        self.check("broker", move || {
            let broker = broker.clone();
            Box::pin(async move { broker.ping().await.map_err(|e| e.to_string()) })
        })
    }

    /// Whether this instance should get traffic now, and why not.
    pub async fn readiness(&self) -> (bool, Value) {
        // The pid tells processes sharing one listening socket apart (a rollout waits for
        // the new one to be ready).
        let pid = std::process::id();
        if self.draining.is_draining() {
            return (false, json!({"status": "draining", "role": self.role, "pid": pid}));
        }
        let (ok, checks) = self.run(|name| self.needed_for_ready.contains(&name)).await;
        let status = if ok { "ready" } else { "not ready" };
        (
            ok,
            json!({"status": status, "role": self.role, "checks": checks, "pid": pid}),
        )
    }

    /// Runs the checks `pick` selects; `true` when all are up.
    async fn run(&self, pick: impl Fn(&'static str) -> bool) -> (bool, Map<String, Value>) {
        let mut checks = Map::new();
        let mut healthy = true;
        for (name, check) in self.checks.iter().filter(|(name, _)| pick(name)) {
            let result = tokio::time::timeout(Duration::from_secs(2), check()).await;
            let status = match result {
                Ok(Ok(())) => Value::from("up"),
                Ok(Err(e)) => {
                    healthy = false;
                    Value::from(format!("down: {e}"))
                }
                Err(_) => {
                    healthy = false;
                    Value::from("down: no answer within 2s")
                }
            };
            checks.insert(name.to_string(), status);
        }
        (healthy, checks)
    }

    /// Runs every check; `true` when all are up.
    pub async fn report(&self) -> (bool, Value) {
        let (healthy, checks) = self.run(|_| true).await;
        let body = json!({
            "status": if healthy { "healthy" } else { "degraded" },
            "role": self.role,
            "checks": checks,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime": self.started.elapsed().as_secs(),
            // Which process answered, as the gateway's says too.
            "pid": std::process::id(),
        });
        (healthy, body)
    }

    /// The `/health`, `/health/live`, `/health/ready` and `/metrics` routes.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/health/ready", get(ready))
            .route("/health/live", get(|| async { axum::Json(json!({"status": "live"})) }))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(self))
    }
}

async fn health(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let (ok, body) = h.report().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn ready(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let (ok, body) = h.readiness().await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
}
