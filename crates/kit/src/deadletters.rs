//! Every consuming role's dead letters as an admin API: `GET /deadletters/<role>` lists what
//! its groups set aside, with the reason, and `POST /deadletters/<role>/<topic>/<seq>/replay`
//! hands one back to the role's own handler (see [`crate::consumer::replay`]): effectively
//! once through the inbox, and removed only once handled. The gateway routes
//! `/api/v1/deadletters/<role>` here; the console and scripts use the same calls.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::AdminUser,
    broker::SharedBroker,
    consumer::{self, ConsumerConfig, Handler, ReplayError, Replayed},
    http::Problem,
    outbox::Outbox,
};

/// Most dead letters listed per topic.
const LIST_LIMIT: usize = 1000;

/// A consumer a role runs: where it reads and what handles it.
type Consumer = (ConsumerConfig, Arc<dyn Handler>);

/// The consumers a role runs, by topic, for replays.
#[derive(Clone, Default)]
pub struct Consumers(Arc<std::sync::RwLock<Vec<Consumer>>>);

impl Consumers {
    /// Remembers a consumer the role started.
    pub fn add(&self, config: ConsumerConfig, handler: Arc<dyn Handler>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((config, handler));
    }

    fn find(&self, topic: &str) -> Option<Consumer> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(c, _)| c.topic == topic)
            .cloned()
    }
}

/// What the dead-letter API works on: one role's consumers, its broker and its outbox.
#[derive(Clone)]
pub struct Desk {
    /// The role (its consumer groups' name).
    pub role: &'static str,
    /// The topics it consumes.
    pub topics: &'static [&'static str],
    /// The broker that holds the dead letters.
    pub broker: SharedBroker,
    /// The outbox a replayed handler publishes through.
    pub outbox: Outbox,
    /// The consumers, for replays.
    pub consumers: Consumers,
}

/// A message a consumer group set aside.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// The topic it came from.
    pub topic: String,
    /// Its place in the topic's dead letters (what a replay names).
    pub seq: u64,
    /// The message id.
    pub msg_id: String,
    /// The event's type, when the message is an event.
    pub event_type: Option<String>,
    /// Deliveries tried.
    pub attempts: u32,
    /// Why it was set aside.
    pub reason: String,
    /// When (RFC 3339).
    pub dead_at: String,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplayAnswer {
    /// `handled`, or `already-handled` when the group had handled it meanwhile.
    pub outcome: String,
}

/// The routes, documented (mounted by every role's runtime).
pub fn api() -> OpenApiRouter<Desk> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(replay))
}

/// The operations of `role`'s dead-letter API as its document lists them: the paths with
/// the role's own name in place of `{role}`.
pub fn document(role: &str) -> Value {
    let mut doc = serde_json::to_value(api().into_openapi()).unwrap_or_else(|_| json!({}));
    let mut paths = serde_json::Map::new();
    for (path, mut item) in doc["paths"].as_object().cloned().unwrap_or_default() {
        if let Some(ops) = item.as_object_mut() {
            for op in ops.values_mut() {
                if let Some(params) = op["parameters"].as_array_mut() {
                    params.retain(|p| p["name"] != "role");
                }
            }
        }
        paths.insert(path.replace("{role}", role), item);
    }
    doc["paths"] = Value::Object(paths);
    doc
}

fn own(desk: &Desk, role: &str) -> Result<(), Problem> {
    if role == desk.role {
        Ok(())
    } else {
        Err(Problem::not_found(format!("this is {}, not {role}", desk.role)))
    }
}

/// The dead letters this role's consumer groups set aside, oldest first per topic
/// (operators).
#[utoipa::path(get, path = "/deadletters/{role}", tag = "deadletters", operation_id = "deadletters",
    security(("bearer" = ["admin"])),
    params(("role" = String, Path, description = "The role")),
    responses((status = 200, description = "Its dead letters", body = Vec<DeadLetterView>)))]
async fn list(
    State(desk): State<Desk>,
    _admin: AdminUser,
    Path(role): Path<String>,
) -> Result<Json<Vec<DeadLetterView>>, Problem> {
    own(&desk, &role)?;
    let mut out = Vec::new();
    for topic in desk.topics {
        let parked = consumer::dead_letters(desk.broker.as_ref(), desk.role, topic, LIST_LIMIT)
            .await
            .map_err(|e| Problem::unavailable(format!("the broker cannot list dead letters: {e}")))?;
        out.extend(parked.into_iter().map(|p| {
            DeadLetterView {
                topic: topic.to_string(),
                seq: p.seq,
                event_type: serde_json::from_str::<Value>(&p.letter.body)
                    .ok()
                    .and_then(|v| v["eventType"].as_str().map(str::to_string)),
                msg_id: p.letter.msg_id,
                attempts: p.letter.attempts,
                reason: p.letter.reason,
                dead_at: p.letter.dead_at,
            }
        }));
    }
    Ok(Json(out))
}

/// Hands one dead letter back to this role's handler; it is removed once handled, and kept
/// (with 409 and the reason) while it still fails (operators).
#[utoipa::path(post, path = "/deadletters/{role}/{topic}/{seq}/replay", tag = "deadletters",
    operation_id = "replay_deadletter", security(("bearer" = ["admin"])),
    params(("role" = String, Path, description = "The role"),
        ("topic" = String, Path, description = "The topic it came from"),
        ("seq" = u64, Path, description = "Its place among the topic's dead letters")),
    responses((status = 200, description = "Handled, and no longer a dead letter", body = ReplayAnswer),
        (status = 404, description = "No such dead letter of this role"),
        (status = 409, description = "It still fails; it stays a dead letter")))]
async fn replay(
    State(desk): State<Desk>,
    _admin: AdminUser,
    Path((role, topic, seq)): Path<(String, String, String)>,
) -> Result<Json<ReplayAnswer>, Problem> {
    own(&desk, &role)?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| Problem::bad_request(format!("`{seq}` is not a dead letter's place (a number)")))?;
    let Some((config, handler)) = desk.consumers.find(&topic) else {
        return Err(Problem::not_found(format!("{} consumes no topic `{topic}`", desk.role)));
    };
    match consumer::replay(&desk.outbox, desk.broker.as_ref(), &config, handler.as_ref(), seq).await {
        Ok(Replayed::Handled) => Ok(Json(ReplayAnswer {
            outcome: "handled".into(),
        })),
        Ok(Replayed::AlreadyHandled) => Ok(Json(ReplayAnswer {
            outcome: "already-handled".into(),
        })),
        Err(e @ ReplayError::NotFound { .. }) => Err(Problem::not_found(e.to_string())),
        Err(ReplayError::StillFailing(reason)) => Err(Problem::new(
            StatusCode::CONFLICT,
            format!("it still fails, so it stays a dead letter: {reason}"),
        )),
        Err(ReplayError::Broker(e)) => Err(Problem::unavailable(format!("the broker: {e}"))),
    }
}
