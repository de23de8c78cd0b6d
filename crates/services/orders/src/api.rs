//! The orders HTTP API: place an order, follow it, cancel it, list your orders, and for
//! operators, inspect or retry a saga.

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Extension, Router,
};
use bazaar_contracts::LineRequest;
use bazaar_kit::store;
use bazaar_kit::{
    auth::{AdminUser, AuthUser},
    http::{Json, Page, Problem, RequestContext},
    openapi::OpenApiRouter,
    store::{now_millis, StoreError},
};
use bazaar_saga::{HistoryEntry, SagaState, SagaStatus};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{
    cancellation::{self, CancelError, Cancellation},
    saga::OrderContext,
    OrderStatus, Orders,
};

/// The API's routes, each with the operation it documents.
fn api() -> OpenApiRouter<Orders> {
    OpenApiRouter::new()
        .routes(routes!(list, place))
        .routes(routes!(show))
        .routes(routes!(cancel))
        .routes(routes!(sagas))
        .routes(routes!(saga))
        .routes(routes!(retry))
}

/// The API routes.
pub fn router(orders: Orders) -> Router {
    api().split_for_parts().0.with_state(orders)
}

/// The API's operations, for its OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// Most lines one order may have.
const MAX_LINES: usize = 100;

/// The body of `POST /orders`: what to buy; prices come from the catalogue. Unknown fields
/// are refused in the lines too, so nothing the customer asked for (a size, say) is dropped.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"items": [{"productId": "01938a4e-7c1e-7a9b-8c3d-1e2f3a4b5c6d", "quantity": 2}]}))]
struct PlaceOrder {
    /// What to buy, one line per product.
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<OrderLine>,
}

/// One line of [`PlaceOrder`]: the strict form of [`LineRequest`], which (as a contract
/// between services) tolerates fields it does not know.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OrderLine {
    /// The product.
    product_id: Uuid,
    /// How many.
    #[schema(minimum = 1, maximum = 10_000)]
    quantity: i64,
}

impl From<OrderLine> for LineRequest {
    fn from(line: OrderLine) -> LineRequest {
        LineRequest {
            product_id: line.product_id,
            quantity: line.quantity,
        }
    }
}

/// An order as clients see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Order {
    /// The order's id.
    #[schema(format = Uuid)]
    id: String,
    /// Who placed it.
    #[schema(format = Uuid)]
    customer_id: String,
    /// Where it is.
    status: OrderStatus,
    /// What was ordered.
    #[schema(value_type = Vec<LineRequest>)]
    lines: serde_json::Value,
    /// What was charged in minor units, once priced.
    total_cents: Option<i64>,
    /// ISO 4217 currency of the total, once priced.
    currency: Option<String>,
    /// Why it was cancelled.
    reason: Option<String>,
    /// When it was placed.
    #[schema(format = DateTime)]
    created_at: String,
    /// When it last changed.
    #[schema(format = DateTime)]
    updated_at: String,
}

/// An order with its saga's progress (`GET /orders/{id}`).
#[derive(Debug, Serialize, ToSchema)]
struct OrderView {
    #[serde(flatten)]
    order: Order,
    /// The saga that decides the order's fate.
    saga: SagaProgress,
}

/// Where an order's saga is, and what happened so far.
#[derive(Debug, Serialize, ToSchema)]
struct SagaProgress {
    /// None only for an order whose saga is not stored (it should not happen).
    status: Option<SagaStatus>,
    /// The step it is at (none once it has passed the first step backwards).
    step: Option<&'static str>,
    /// Every transition, oldest first.
    history: Vec<HistoryEntry>,
}

/// A saga of either flow the orders role runs; `kind` says which (`order`, whose context is
/// an `OrderContext`, or `order-cancellation`, whose id is `{order}/cancel` and context a
/// `CancelContext`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(transparent)]
struct OrderSaga(SagaState<serde_json::Value>);

impl OrderSaga {
    /// The saga, its context as JSON.
    fn of<C: Serialize>(saga: SagaState<C>) -> Result<OrderSaga, Problem> {
        let context = serde_json::to_value(&saga.context).map_err(Problem::internal)?;
        Ok(OrderSaga(SagaState {
            id: saga.id,
            kind: saga.kind,
            status: saga.status,
            step: saga.step,
            context,
            correlation_id: saga.correlation_id,
            traceparent: saga.traceparent,
            attempts: saga.attempts,
            command_id: saga.command_id,
            deadline: saga.deadline,
            error: saga.error,
        }))
    }
}

/// An order's latest saga (its cancellation, when it has one) and the history of both
/// (`GET /sagas/{id}`).
#[derive(Debug, Serialize, ToSchema)]
struct SagaView {
    saga: OrderSaga,
    /// Every transition, oldest first.
    history: Vec<HistoryEntry>,
}

fn order(r: &store::Row) -> Result<Order, StoreError> {
    let lines: String = r.try_get("lines")?;
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339()
    };
    Ok(Order {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        status: OrderStatus::parse(&r.try_get::<String, _>("status")?)?,
        lines: serde_json::from_str(&lines).unwrap_or_default(),
        total_cents: r.try_get("total_cents")?,
        currency: r.try_get("currency")?,
        reason: r.try_get("reason")?,
        created_at: time(r.try_get("created_at")?),
        updated_at: time(r.try_get("updated_at")?),
    })
}

const COLUMNS: &str = "id, customer_id, status, lines, total_cents, currency, reason, created_at, updated_at";

/// Places an order: 202 with the pending order; the saga decides its fate. The same
/// `Idempotency-Key` from the same customer returns the first order instead of a second one.
// One piece: one idempotent placement; the key is looked up before admission, after a quota
// refusal and after an insert conflict, each answered against the same `items`, and quota,
// insert and saga start share one transaction committed through the outbox.
#[utoipa::path(post, path = "/orders", tag = "orders", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,200}$",
        description = "Makes a retry of this request return the order it placed (1 to 200 visible ASCII characters)")),
    responses(
        (status = 202, description = "Placed; the saga decides its fate",
            headers(("Location" = String, description = "The order's address")), body = Order),
        (status = 200, description = "An earlier request with this Idempotency-Key placed it", body = Order),
        (status = 422, description = "This Idempotency-Key was used for a different order"),
        (status = 429, description = "Too many orders from this customer this minute")))]
async fn place(
    State(orders): State<Orders>,
    AuthUser(user): AuthUser,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    Json(body): Json<PlaceOrder>,
) -> Result<Response, Problem> {
    let items: Vec<LineRequest> = body.items.into_iter().map(LineRequest::from).collect();
    if items.is_empty() {
        return Err(Problem::bad_request("an order needs at least one item"));
    }
    if items.len() > MAX_LINES {
        return Err(Problem::bad_request(format!("an order has at most {MAX_LINES} items")));
    }
    if let Some(bad) = items.iter().find(|l| l.quantity < 1 || l.quantity > 10_000) {
        return Err(Problem::bad_request(format!(
            "quantity of {} must be between 1 and 10000",
            bad.product_id
        )));
    }
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 200 && k.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| Problem::bad_request("Idempotency-Key must be 1 to 200 visible ASCII characters"))?
                .to_string(),
        ),
        None => None,
    };
    let store = &orders.rt.store;
    if let Some(existing) = find_by_key(&orders, &user.sub, key.as_deref()).await? {
        return same_request(existing, &items);
    }
    // A retry of a placed order (above) is answered even when new ones are turned away.
    let _turn = orders.admission.admit().await?;
    let id = Uuid::now_v7();
    let now = now_millis();
    let lines = serde_json::to_string(&items).unwrap_or_default();
    let mut tx = store.begin().await?;
    if let Err(over) = orders.admission.within_quota(&mut tx, &user.sub).await {
        // A retry of an order placed while this one waited for the quota is answered too.
        drop(tx);
        return match find_by_key(&orders, &user.sub, key.as_deref()).await? {
            Some(existing) => same_request(existing, &items),
            None => Err(over),
        };
    }
    let inserted = store::query(
        "INSERT INTO orders (id, customer_id, email, status, lines, idempotency_key, version, created_at, updated_at)
         VALUES ($1, $2, $3, $7, $4, $5, 1, $6, $6) ON CONFLICT DO NOTHING",
    )
    .bind(id.to_string())
    .bind(user.sub.to_string())
    .bind(&user.email)
    .bind(&lines)
    .bind(key.clone())
    .bind(now)
    .bind(OrderStatus::Pending.as_str())
    .execute(&mut tx)
    .await?;
    if inserted.rows_affected() == 0 {
        // A concurrent request with the same key won the race.
        drop(tx);
        let existing = find_by_key(&orders, &user.sub, key.as_deref())
            .await?
            .ok_or_else(|| Problem::conflict("order could not be placed; retry"))?;
        return same_request(existing, &items);
    }
    let context = OrderContext::new(id, user.sub, user.email.clone(), items);
    orders
        .engine
        .start_traced(
            &mut tx,
            &id.to_string(),
            context,
            &ctx.correlation_id,
            ctx.traceparent.as_deref(),
        )
        .await
        .map_err(Problem::from)?;
    orders.rt.outbox.commit(tx).await?;
    metrics::counter!("bazaar_orders_placed_total").increment(1);
    let row = store::query(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
        .bind(id.to_string())
        .fetch_one(store)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/orders/{id}"))],
        Json(order(&row)?),
    )
        .into_response())
}

/// The order an earlier request with the same key placed, if this request asks the same.
fn same_request(existing: Order, items: &[LineRequest]) -> Result<Response, Problem> {
    if existing.lines != serde_json::json!(items) {
        return Err(Problem::unprocessable(
            "this Idempotency-Key was used for a different order; use a new key for a new order",
        ));
    }
    Ok((StatusCode::OK, Json(existing)).into_response())
}

async fn find_by_key(orders: &Orders, customer: &Uuid, key: Option<&str>) -> Result<Option<Order>, Problem> {
    let Some(key) = key else { return Ok(None) };
    let row = store::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE customer_id = $1 AND idempotency_key = $2"
    ))
    .bind(customer.to_string())
    .bind(key)
    .fetch_optional(&orders.rt.store)
    .await?;
    Ok(row.as_ref().map(order).transpose()?)
}

/// The caller's orders, newest first.
#[utoipa::path(get, path = "/orders", tag = "orders", security(("bearer" = [])), params(Page),
    responses((status = 200, description = "A page of orders", body = Vec<Order>)))]
async fn list(
    State(orders): State<Orders>,
    AuthUser(user): AuthUser,
    Query(page): Query<Page>,
) -> Result<Json<Vec<Order>>, Problem> {
    let rows = store::query(&format!(
        "SELECT {COLUMNS} FROM orders WHERE customer_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
    ))
    .bind(user.sub.to_string())
    .bind(page.limit(50, 500))
    .bind(page.offset())
    .fetch_all(&orders.rt.store)
    .await?;
    Ok(Json(rows.iter().map(order).collect::<Result<_, _>>()?))
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    id.parse()
        .map_err(|_| Problem::bad_request(format!("`{id}` is not an order id (a UUID)")))
}

/// `?waitFor=outcome|change&seen=N&timeout=SECS` on `GET /orders/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
struct Wait {
    /// `outcome`: answer once the order is confirmed or cancelled. `change`: answer once its
    /// saga's history has more than `seen` entries, or it has an outcome.
    #[param(value_type = Option<String>, pattern = "^(outcome|change)$")]
    wait_for: Option<String>,
    /// With `waitFor=change`: how many history entries the client has seen (default 0).
    #[param(minimum = 0)]
    seen: Option<i64>,
    /// Longest wait in seconds (default 30; more than 60 counts as 60).
    #[param(minimum = 0)]
    timeout: Option<i64>,
}

/// What a waiting `GET /orders/{id}` waits for.
#[derive(Debug, Clone, Copy)]
enum Awaited {
    /// Confirmed or cancelled.
    Outcome,
    /// More history entries than the client has seen, or an outcome.
    Change { seen: usize },
}

/// Longest a client may wait for an outcome in one request.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A waiting request re-reads at least this often (an outcome reached in another instance
/// of orders does not wake this one).
const FALLBACK_READ: Duration = Duration::from_millis(250);

/// One of the caller's orders, with its saga's progress. With `?waitFor=outcome` the answer
/// waits (up to `timeout` seconds, default 30) until the order is confirmed or cancelled;
/// with `?waitFor=change&seen=N` until its saga has moved past the N history entries the
/// client has seen. Clients need not poll.
// One piece: one long poll; the notification is armed before each read, the wait mode
// decides whether history is read in the loop or once after, and the same deadline and
// watch span every pass until the answer is built.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id"), Wait),
    responses((status = 200, description = "The order and its saga", body = OrderView),
        (status = 404, description = "No such order of the caller's")))]
async fn show(
    State(orders): State<Orders>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Query(wait): Query<Wait>,
) -> Result<Json<OrderView>, Problem> {
    let id = parse_id(&id)?.to_string();
    let timeout = u64::try_from(wait.timeout.unwrap_or(30))
        .map_err(|_| Problem::bad_request("timeout must be 0 or more seconds"))?;
    let seen = usize::try_from(wait.seen.unwrap_or(0))
        .map_err(|_| Problem::bad_request("seen must be 0 or more history entries"))?;
    let awaited = match wait.wait_for.as_deref() {
        None => None,
        Some("outcome") => Some(Awaited::Outcome),
        Some("change") => Some(Awaited::Change { seen }),
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "waitFor must be `outcome` or `change`, not `{other}`"
            )))
        }
    };
    let until = awaited.map(|_| Instant::now() + Duration::from_secs(timeout).min(MAX_WAIT));
    let watch = until.map(|_| orders.waiters.watch(&id));
    let (found, history) = loop {
        // Armed before the read, so an outcome committed between the read and the wait
        // still wakes us.
        let notified = watch.as_ref().map(|w| w.notify().notified());
        tokio::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        let row = store::query(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
            .bind(&id)
            .fetch_optional(&orders.rt.store)
            .await?
            .ok_or_else(|| Problem::not_found(format!("no order {id}")))?;
        let found = order(&row)?;
        if found.customer_id != user.sub.to_string() {
            // Not yours: answer as if it did not exist.
            return Err(Problem::not_found(format!("no order {id}")));
        }
        // Waiting for the outcome needs only the order's status; the history is read once,
        // for the answer, rather than at every step the order takes meanwhile.
        let history = match awaited {
            Some(Awaited::Outcome) if !found.status.is_settled() => None,
            _ => Some(order_history(&orders, &id).await?),
        };
        let waiting = match (awaited, &history) {
            // Left unread above only while the order is pending.
            (Some(Awaited::Outcome), None) => true,
            (Some(Awaited::Change { seen }), Some(history)) => !found.status.is_settled() && history.len() <= seen,
            _ => false,
        };
        match (until, notified.as_mut().as_pin_mut()) {
            (Some(t), Some(n)) if waiting && Instant::now() < t => {
                let _ = tokio::time::timeout(FALLBACK_READ.min(t.saturating_duration_since(Instant::now())), n).await;
            }
            _ => break (found, history),
        }
    };
    let history = match history {
        Some(history) => history,
        None => order_history(&orders, &id).await?,
    };
    let saga = orders.engine.load(&id).await?;
    Ok(Json(OrderView {
        order: found,
        saga: SagaProgress {
            status: saga.as_ref().map(|s| s.status),
            step: saga.as_ref().and_then(|s| orders.engine.step_name(s.step)),
            history,
        },
    }))
}

/// Order `id`'s history: its saga's, then its cancellation's, if any.
async fn order_history(orders: &Orders, id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
    let mut history = orders.engine.history(id).await?;
    history.extend(orders.cancellations.history(&cancellation::saga_id(id)).await?);
    Ok(history)
}

/// Cancels one of the caller's orders: at once while nothing was taken for it, or by
/// refunding its payment and putting its units back on the shelf once it was; the order is
/// `cancelled` when that ends (follow it with `GET /orders/{id}?waitFor=outcome`). Asked
/// again, it is the same one cancellation.
#[utoipa::path(post, path = "/orders/{id}/cancellation", tag = "orders", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses((status = 202, description = "Under way: the order is pending or cancelling until it is cancelled", body = Order),
        (status = 200, description = "The order was already cancelled", body = Order),
        (status = 404, description = "No such order of the caller's"),
        (status = 409, description = "The order's saga or its cancellation is stuck and waits for an operator, or an earlier cancellation was refused")))]
async fn cancel(
    State(orders): State<Orders>,
    AuthUser(user): AuthUser,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let order_id = parse_id(&id)?;
    let trace = (ctx.correlation_id.as_str(), ctx.traceparent.as_deref());
    let status = match cancellation::cancel(&orders, user.sub, order_id, trace).await {
        Ok(Cancellation::Accepted) => StatusCode::ACCEPTED,
        Ok(Cancellation::Already) => StatusCode::OK,
        Err(CancelError::NotFound(id)) => return Err(Problem::not_found(format!("no order {id}"))),
        Err(e @ (CancelError::Stuck(_) | CancelError::Refused { .. })) => return Err(Problem::conflict(e.to_string())),
        Err(CancelError::Handler(e)) => return Err(Problem::internal(e)),
    };
    let row = store::query(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
        .bind(order_id.to_string())
        .fetch_one(&orders.rt.store)
        .await?;
    Ok((status, Json(order(&row)?)))
}

/// `?status=` of `GET /sagas`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SagaFilter {
    /// Which status to list (default `stuck`).
    #[param(value_type = Option<SagaStatus>)]
    status: Option<String>,
    /// Most sagas to return (default 100; taken as the nearest of 1 and 1000 when outside).
    limit: Option<i64>,
}

/// Sagas of both flows in one status, `stuck` by default: what needs an operator (admins).
#[utoipa::path(get, path = "/sagas", tag = "sagas", security(("bearer" = ["admin"])), params(SagaFilter),
    responses((status = 200, description = "Sagas in that status", body = Vec<OrderSaga>)))]
async fn sagas(
    State(orders): State<Orders>,
    _admin: AdminUser,
    Query(filter): Query<SagaFilter>,
) -> Result<Json<Vec<OrderSaga>>, Problem> {
    let name = filter.status.as_deref().unwrap_or("stuck");
    let status = SagaStatus::parse(name).map_err(|_| {
        Problem::bad_request(format!(
            "status must be running, compensating, completed, compensated or stuck, not `{name}`"
        ))
    })?;
    let limit = filter.limit.unwrap_or(100).clamp(1, 1000);
    let mut list = orders
        .engine
        .list(status, limit)
        .await?
        .into_iter()
        .map(OrderSaga::of)
        .collect::<Result<Vec<_>, _>>()?;
    for cancellation in orders.cancellations.list(status, limit).await? {
        list.push(OrderSaga::of(cancellation)?);
    }
    list.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(Json(list))
}

/// An order's latest saga (its cancellation, when it has one) and the history of both
/// (admins).
#[utoipa::path(get, path = "/sagas/{id}", tag = "sagas", security(("bearer" = ["admin"])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses((status = 200, description = "The saga", body = SagaView),
        (status = 404, description = "No such saga")))]
async fn saga(
    State(orders): State<Orders>,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<SagaView>, Problem> {
    let id = parse_id(cancellation::order_of(&id))?.to_string();
    let saga = match orders.cancellations.load(&cancellation::saga_id(&id)).await? {
        Some(cancellation) => OrderSaga::of(cancellation)?,
        None => OrderSaga::of(
            orders
                .engine
                .load(&id)
                .await?
                .ok_or_else(|| Problem::not_found(format!("no saga {id}")))?,
        )?,
    };
    let history = order_history(&orders, &id).await?;
    Ok(Json(SagaView { saga, history }))
}

/// Sends an order's stuck saga on (admins): the order saga back to compensation, a stuck
/// cancellation forward again (a refund or return must still happen).
#[utoipa::path(post, path = "/sagas/{id}/retry", tag = "sagas", security(("bearer" = ["admin"])),
    params(("id" = Uuid, Path, description = "The order's id")),
    responses((status = 202, description = "Sent on"),
        (status = 409, description = "The order has no stuck saga")))]
async fn retry(State(orders): State<Orders>, _admin: AdminUser, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    // A saga's id as `GET /sagas` lists it names its order, a cancellation's too.
    let id = parse_id(cancellation::order_of(&id))?.to_string();
    let retried = match orders.engine.retry(&id).await.map_err(Problem::internal)? {
        true => true,
        false => orders
            .cancellations
            .retry(&cancellation::saga_id(&id))
            .await
            .map_err(Problem::internal)?,
    };
    match retried {
        true => Ok(StatusCode::ACCEPTED),
        false => Err(Problem::conflict(format!(
            "no saga of order {id} exists that is stuck (none, or not stuck)"
        ))),
    }
}
