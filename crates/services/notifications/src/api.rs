//! The notifications HTTP API: what was sent to you.

use axum::{extract::State, routing::get, Router};
use bazaar_kit::{
    auth::AuthUser,
    http::{Json, Problem},
    runtime::Runtime,
};
use serde_json::{json, Value};
use sqlx::Row;

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    Router::new().route("/notifications", get(mine)).with_state(rt)
}

async fn mine(State(rt): State<Runtime>, AuthUser(user): AuthUser) -> Result<Json<Vec<Value>>, Problem> {
    let rows = sqlx::query(
        "SELECT id, dedupe_key, subject, status, created_at, sent_at FROM notification WHERE recipient = $1 ORDER BY created_at DESC LIMIT 100",
    )
    .bind(&user.email)
    .fetch_all(rt.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<String, _>("id")?,
                "about": r.try_get::<String, _>("dedupe_key")?,
                "subject": r.try_get::<String, _>("subject")?,
                "status": r.try_get::<String, _>("status")?,
                "createdAt": r.try_get::<i64, _>("created_at")?,
                "sentAt": r.try_get::<Option<i64>, _>("sent_at")?,
            }))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map(Json)
        .map_err(Problem::from)
}
