//! A stand-in for an outside payment provider with a Stripe-like shape, for local runs,
//! fault drills and tests (`bazaar serve payment-sim`).
//!
//! - `POST /v1/charges` `{amount, currency, customer, description}` with an
//!   `Idempotency-Key` header answers `{id, status: "succeeded"|"failed", failure_message}`;
//! - `POST /v1/refunds` `{charge}` with an `Idempotency-Key` answers `{id, charge, status}`.
//!
//! As at Stripe, a repeat of a key answers the first answer again without acting twice, and
//! a repeat with different parameters is refused; that is what makes a payments redelivery
//! after a crash safe. Injected faults (an outage, a random error) happen before any work,
//! so they are never remembered under the key.
//!
//! `POST /_control {"latencyMs", "errorRate", "outage", "declineRate"}` changes behaviour
//! at run time (fields left out keep their value), `GET /_control` reads it, and
//! `GET /_stats` counts requests, charges and refunds.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::{get, post},
    Json, Router,
};
use bazaar_kit::{mesh::Tls, policy::PolicyGuard, shutdown::Shutdown};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// How the simulator behaves.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Control {
    /// Delay before every provider answer.
    pub latency_ms: u64,
    /// Share (0..=1) of provider requests answered 500 without doing anything.
    pub error_rate: f64,
    /// When true every provider request is answered 503.
    pub outage: bool,
    /// Share (0..=1) of new charges that come back `failed` (a declined card).
    pub decline_rate: f64,
}

/// A change to [`Control`]; fields left out keep their value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPatch {
    /// New latency.
    pub latency_ms: Option<u64>,
    /// New error rate.
    pub error_rate: Option<f64>,
    /// New outage switch.
    pub outage: Option<bool>,
    /// New decline rate.
    pub decline_rate: Option<f64>,
}

/// What the simulator saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Provider requests received (charges and refunds, including refused ones).
    pub requests: u64,
    /// Charges created (each idempotency key at most once).
    pub charges: u64,
    /// Of those, charges that succeeded.
    pub succeeded: u64,
    /// Of those, charges that failed.
    pub failed: u64,
    /// Refunds made.
    pub refunds: u64,
    /// Requests answered from an idempotency key's first answer.
    pub replays: u64,
    /// Requests refused by an injected outage or error.
    pub injected_errors: u64,
}

#[derive(Debug)]
struct ChargeRecord {
    status: &'static str,
    refunded: bool,
}

/// The first answer to an idempotency key, and the request it answered.
#[derive(Debug)]
struct Remembered {
    request: Value,
    answer: Value,
}

#[derive(Debug, Default)]
struct Sim {
    control: Control,
    stats: Stats,
    keys: HashMap<String, Remembered>,
    charges: HashMap<String, ChargeRecord>,
}

/// The simulator's shared state; clone it to read stats or change behaviour in-process.
#[derive(Debug, Clone, Default)]
pub struct SimulatorState {
    inner: Arc<Mutex<Sim>>,
}

impl SimulatorState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sim> {
        // A panic elsewhere cannot leave the maps half-updated: each update is one statement.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current behaviour.
    pub fn control(&self) -> Control {
        self.lock().control.clone()
    }

    /// Applies `patch`; rates must lie in 0..=1.
    pub fn set_control(&self, patch: ControlPatch) -> Result<Control, String> {
        for (name, rate) in [("errorRate", patch.error_rate), ("declineRate", patch.decline_rate)] {
            if rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        let mut sim = self.lock();
        let c = &mut sim.control;
        c.latency_ms = patch.latency_ms.unwrap_or(c.latency_ms);
        c.error_rate = patch.error_rate.unwrap_or(c.error_rate);
        c.outage = patch.outage.unwrap_or(c.outage);
        c.decline_rate = patch.decline_rate.unwrap_or(c.decline_rate);
        tracing::info!(control = ?c, "payment simulator behaviour changed");
        Ok(c.clone())
    }

    /// What it saw so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }
}

/// The simulator's routes.
pub fn router(state: SimulatorState) -> Router {
    Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/refunds", post(refund))
        .route("/_control", get(read_control).post(write_control))
        .route("/_stats", get(stats))
        .route("/health", get(|| async { Json(json!({"status": "healthy"})) }))
        .with_state(state)
}

/// Serves the simulator on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SimulatorState,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "payment provider simulator listening");
    }
    bazaar_kit::http::serve(listener, router(state), shutdown).await
}

/// The simulator's role name (`bazaar serve payment-sim`), as its mesh certificate and the
/// mesh policy name it.
pub const ROLE: &str = "payment-sim";

/// Why the simulator stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// Its address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Its mesh policy could not be loaded.
    #[error("mesh policy: {0}")]
    Policy(#[from] bazaar_kit::policy::PolicyError),
    /// Serving failed.
    #[error("payment-sim: {0}")]
    Serve(std::io::Error),
}

/// Serves the simulator on `listen` until `shutdown`: over mutual TLS under the mesh policy
/// when it has a certificate, reloading a renewed certificate and an edited policy as every
/// role does; else plain HTTP to any caller, said loudly.
pub async fn run(
    listen: SocketAddr,
    mesh: Option<Arc<Tls>>,
    policy: Option<PathBuf>,
    shutdown: Shutdown,
) -> Result<(), SimulatorError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| SimulatorError::Listen { addr: listen, source })?;
    let state = SimulatorState::default();
    let Some(tls) = mesh else {
        tracing::warn!("MESH OFF: the payment simulator serves plain HTTP to any caller");
        return serve(listener, state, shutdown).await.map_err(SimulatorError::Serve);
    };
    tracing::info!(identity = %tls.identity(), %listen, "payment provider simulator listening over mutual TLS");
    let policy = policy
        .map(|file| PolicyGuard::load(ROLE, file).map(Arc::new))
        .transpose()?;
    let mut router = router(state);
    if let Some(guard) = &policy {
        router = guard.guard(router);
    }
    let mut stop = shutdown;
    let served = bazaar_kit::mesh::serve_mtls(listener, router, tls.clone(), async move { stop.wait().await });
    let reload = async {
        loop {
            tokio::time::sleep(bazaar_kit::runtime::MESH_RELOAD_PERIOD).await;
            bazaar_kit::runtime::reload_mesh(&tls, policy.as_deref());
        }
    };
    tokio::select! {
        served = served => served.map_err(SimulatorError::Serve),
        never = reload => never,
    }
}

type Answer = (StatusCode, Json<Value>);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, Json(json!({ "error": { "message": message.into() } })))
}

/// Counts the request, waits the configured latency and injects the configured faults.
async fn behave(state: &SimulatorState) -> Result<(), Answer> {
    let control = {
        let mut sim = state.lock();
        sim.stats.requests += 1;
        sim.control.clone()
    };
    if control.outage {
        state.lock().stats.injected_errors += 1;
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "provider outage (simulated)"));
    }
    if control.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(control.latency_ms)).await;
    }
    if control.error_rate > 0.0 && rand::random::<f64>() < control.error_rate {
        state.lock().stats.injected_errors += 1;
        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal error (simulated)"));
    }
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, Answer> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "an Idempotency-Key header is required"))
}

/// The first answer for `key`, if it was used before with the same request.
fn replay(sim: &mut Sim, key: &str, request: &Value) -> Option<Answer> {
    let first = sim.keys.get(key)?;
    if &first.request != request {
        return Some(error(
            StatusCode::BAD_REQUEST,
            format!(
                "keys for idempotent requests can only be used with the same parameters; `{key}` was used with others"
            ),
        ));
    }
    let answer = first.answer.clone();
    sim.stats.replays += 1;
    Some((StatusCode::OK, Json(answer)))
}

async fn charge(State(state): State<SimulatorState>, headers: HeaderMap, Json(body): Json<Value>) -> Answer {
    if let Err(answer) = behave(&state).await {
        return answer;
    }
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(answer) => return answer,
    };
    let amount = body.get("amount").and_then(Value::as_i64).filter(|a| *a > 0);
    let currency = body.get("currency").and_then(Value::as_str);
    let (Some(amount), Some(currency)) = (amount, currency) else {
        return error(
            StatusCode::BAD_REQUEST,
            "amount (a positive integer) and currency are required",
        );
    };
    let mut sim = state.lock();
    if let Some(answer) = replay(&mut sim, &key, &body) {
        return answer;
    }
    let declined = sim.control.decline_rate > 0.0 && rand::random::<f64>() < sim.control.decline_rate;
    let (status, failure_message) = if declined {
        ("failed", Some("Your card was declined."))
    } else {
        ("succeeded", None)
    };
    let id = format!("ch_{}", Uuid::new_v4().simple());
    let answer = json!({
        "id": id,
        "object": "charge",
        "amount": amount,
        "currency": currency,
        "customer": body.get("customer"),
        "description": body.get("description"),
        "status": status,
        "failure_message": failure_message,
    });
    sim.charges.insert(
        id,
        ChargeRecord {
            status,
            refunded: false,
        },
    );
    sim.stats.charges += 1;
    if declined {
        sim.stats.failed += 1;
    } else {
        sim.stats.succeeded += 1;
    }
    sim.keys.insert(
        key,
        Remembered {
            request: body,
            answer: answer.clone(),
        },
    );
    (StatusCode::OK, Json(answer))
}

async fn refund(State(state): State<SimulatorState>, headers: HeaderMap, Json(body): Json<Value>) -> Answer {
    if let Err(answer) = behave(&state).await {
        return answer;
    }
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(answer) => return answer,
    };
    let Some(charge_id) = body.get("charge").and_then(Value::as_str).map(str::to_string) else {
        return error(StatusCode::BAD_REQUEST, "charge is required");
    };
    let mut sim = state.lock();
    if let Some(answer) = replay(&mut sim, &key, &body) {
        return answer;
    }
    let Some(charge) = sim.charges.get_mut(&charge_id) else {
        return error(StatusCode::NOT_FOUND, format!("no such charge: {charge_id}"));
    };
    if charge.status != "succeeded" {
        return error(StatusCode::BAD_REQUEST, format!("charge {charge_id} did not succeed"));
    }
    if charge.refunded {
        return error(
            StatusCode::BAD_REQUEST,
            format!("charge {charge_id} has already been refunded"),
        );
    }
    charge.refunded = true;
    let answer = json!({
        "id": format!("re_{}", Uuid::new_v4().simple()),
        "object": "refund",
        "charge": charge_id,
        "status": "succeeded",
    });
    sim.stats.refunds += 1;
    sim.keys.insert(
        key,
        Remembered {
            request: body,
            answer: answer.clone(),
        },
    );
    (StatusCode::OK, Json(answer))
}

async fn read_control(State(state): State<SimulatorState>) -> Json<Control> {
    Json(state.control())
}

async fn write_control(State(state): State<SimulatorState>, Json(patch): Json<ControlPatch>) -> Answer {
    match state.set_control(patch) {
        Ok(control) => (StatusCode::OK, Json(json!(control))),
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

async fn stats(State(state): State<SimulatorState>) -> Json<Stats> {
    Json(state.stats())
}
