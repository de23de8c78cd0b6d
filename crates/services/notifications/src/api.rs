//! The notifications HTTP API: what was sent to you, or (operators) to anyone.

use axum::{
    extract::{Query, State},
    routing::get,
    Router,
};
use bazaar_kit::{
    auth::AuthUser,
    http::{Json, Page, Problem},
    runtime::Runtime,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    Router::new().route("/notifications", get(list)).with_state(rt)
}

/// `?recipient=` (operators only).
#[derive(Debug, Deserialize)]
struct Filter {
    recipient: Option<String>,
}

/// Customers see what was sent to their own email; admins see everything, or one recipient's.
async fn list(
    State(rt): State<Runtime>,
    AuthUser(user): AuthUser,
    Query(filter): Query<Filter>,
    Query(page): Query<Page>,
) -> Result<Json<Vec<Value>>, Problem> {
    let recipient = match (user.is_admin(), filter.recipient) {
        (true, r) => r,
        (false, Some(r)) if r != user.email => {
            return Err(Problem::forbidden("only admins may list someone else's notifications"))
        }
        (false, _) => Some(user.email.clone()),
    };
    let rows = sqlx::query(
        "SELECT id, dedupe_key, channel, recipient, subject, status, attempts, last_error, correlation_id, created_at, sent_at
         FROM notification WHERE ($1 = '' OR recipient = $1) ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(recipient.unwrap_or_default())
    .bind(page.limit(100, 1000))
    .bind(page.offset())
    .fetch_all(rt.store.pool())
    .await?;
    let time = |ms: Option<i64>| {
        ms.map(|t| {
            chrono::DateTime::from_timestamp_millis(t)
                .unwrap_or_default()
                .to_rfc3339()
        })
    };
    rows.iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<String, _>("id")?,
                "about": r.try_get::<String, _>("dedupe_key")?,
                "channel": r.try_get::<String, _>("channel")?,
                "recipient": r.try_get::<String, _>("recipient")?,
                "subject": r.try_get::<String, _>("subject")?,
                "status": r.try_get::<String, _>("status")?,
                "attempts": r.try_get::<i64, _>("attempts")?,
                "lastError": r.try_get::<Option<String>, _>("last_error")?,
                "correlationId": r.try_get::<String, _>("correlation_id")?,
                "createdAt": time(Some(r.try_get::<i64, _>("created_at")?)),
                "sentAt": time(r.try_get::<Option<i64>, _>("sent_at")?),
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map(Json)
        .map_err(Problem::from)
}
