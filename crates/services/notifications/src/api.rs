//! The notifications HTTP API: what was sent to you, or (operators) to anyone.

use axum::{
    extract::{Query, State},
    Router,
};
use bazaar_kit::store;
use bazaar_kit::{
    auth::AuthUser,
    http::{Json, Page, Problem},
    openapi::OpenApiRouter,
    runtime::Runtime,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;

/// The API's routes, each with the operation it documents.
fn api() -> OpenApiRouter<Runtime> {
    OpenApiRouter::new().routes(routes!(list))
}

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    api().split_for_parts().0.with_state(rt)
}

/// The API's operations, for its OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// `?recipient=` (operators only).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Filter {
    /// Only what was sent to this address or number (admins; others may name only their own).
    recipient: Option<String>,
}

/// A message sent (or to be sent) to someone.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Notification {
    /// The message's id.
    id: String,
    /// What it is about: the event that caused it (`order.confirmed:<order id>`, say).
    about: String,
    /// `email` or `sms`.
    channel: String,
    /// The address or number.
    recipient: String,
    /// The subject line.
    subject: String,
    /// `pending`, `sent`, `failed` or `suppressed` (over a number's daily limit, never sent).
    status: String,
    /// Delivery attempts so far.
    attempts: i64,
    /// Why the last attempt failed.
    last_error: Option<String>,
    /// The correlation id of the request that caused it.
    correlation_id: String,
    /// When it was written.
    #[schema(format = DateTime)]
    created_at: String,
    /// When it was delivered.
    #[schema(format = DateTime)]
    sent_at: Option<String>,
}

/// Customers see what was sent to their own email; admins see everything, or one recipient's.
#[utoipa::path(get, path = "/notifications", tag = "notifications", security(("bearer" = [])),
    params(Filter, Page),
    responses((status = 200, description = "Messages, newest first", body = Vec<Notification>),
        (status = 403, description = "Only admins may list someone else's messages")))]
async fn list(
    State(rt): State<Runtime>,
    AuthUser(user): AuthUser,
    Query(filter): Query<Filter>,
    Query(page): Query<Page>,
) -> Result<Json<Vec<Notification>>, Problem> {
    let recipient = match (user.is_admin(), filter.recipient) {
        (true, r) => r,
        (false, Some(r)) if r != user.email => {
            return Err(Problem::forbidden("only admins may list someone else's notifications"))
        }
        (false, _) => Some(user.email.clone()),
    };
    let rows = store::query(
        "SELECT id, dedupe_key, channel, recipient, subject, status, attempts, last_error, correlation_id, created_at, sent_at
         FROM notification WHERE ($1 = '' OR recipient = $1) ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(recipient.unwrap_or_default())
    .bind(page.limit(100, 1000))
    .bind(page.offset())
    .fetch_all(&rt.store)
    .await?;
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339()
    };
    rows.iter()
        .map(|r| {
            Ok(Notification {
                id: r.try_get("id")?,
                about: r.try_get("dedupe_key")?,
                channel: r.try_get("channel")?,
                recipient: r.try_get("recipient")?,
                subject: r.try_get("subject")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                correlation_id: r.try_get("correlation_id")?,
                created_at: time(r.try_get("created_at")?),
                sent_at: r.try_get::<Option<i64>, _>("sent_at")?.map(time),
            })
        })
        .collect::<Result<Vec<_>, store::StoreError>>()
        .map(Json)
        .map_err(Problem::from)
}
