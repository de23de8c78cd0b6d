//! `/health`, `/health/live` and `/metrics` for every role.
//!
//! `/health` runs every dependency check with a short timeout and answers
//! `{status: healthy|degraded, checks: {name: up|"down: why"}, version, uptime}`, 200 when all
//! are up and 503 otherwise, so orchestrators and the gateway can route around a sick instance.

use std::{
    sync::Arc,
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
}

impl Health {
    /// Health of `role`, with no checks yet.
    pub fn new(role: &'static str) -> Health {
        Health {
            role,
            started: Instant::now(),
            checks: Vec::new(),
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

    /// Checks the role's own database.
    pub fn database(self, store: Store) -> Health {
        self.check("database", move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.map_err(|e| e.to_string()) })
        })
    }

    /// Checks the broker.
    pub fn broker(self, broker: SharedBroker) -> Health {
        self.check("broker", move || {
            let broker = broker.clone();
            Box::pin(async move { broker.ping().await.map_err(|e| e.to_string()) })
        })
    }

    /// Runs every check; `true` when all are up.
    pub async fn report(&self) -> (bool, Value) {
        let mut checks = Map::new();
        let mut healthy = true;
        for (name, check) in &self.checks {
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
        let body = json!({
            "status": if healthy { "healthy" } else { "degraded" },
            "role": self.role,
            "checks": checks,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime": self.started.elapsed().as_secs(),
        });
        (healthy, body)
    }

    /// The `/health`, `/health/live` and `/metrics` routes.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/health", get(health))
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

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
}
