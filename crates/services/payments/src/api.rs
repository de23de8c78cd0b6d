//! The payments HTTP API: your wallet, deposits, and the payment of an order.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{get, post},
    Router,
};
use bazaar_kit::{
    auth::{AdminUser, AuthUser},
    http::{Json, Problem},
    runtime::Runtime,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::ledger;

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    Router::new()
        .route("/accounts/me", get(me))
        .route("/accounts/{user_id}/deposits", post(deposit))
        .route("/payments/{order_id}", get(show))
        .with_state(rt)
}

/// Largest single deposit (minor units).
const MAX_DEPOSIT: i64 = 100_000_000;

async fn account_view(rt: &Runtime, customer: &Uuid) -> Result<Value, Problem> {
    let wallet = ledger::wallet(customer);
    let exists = sqlx::query("SELECT currency FROM account WHERE id = $1")
        .bind(&wallet)
        .fetch_optional(rt.store.pool())
        .await?;
    let Some(row) = exists else {
        return Err(Problem::not_found(
            "no wallet yet; it opens moments after registration, try again shortly",
        ));
    };
    let currency: String = row.try_get("currency")?;
    let balance = ledger::balance(rt.store.pool(), &wallet).await?;
    Ok(json!({ "userId": customer, "balanceCents": balance, "currency": currency }))
}

async fn me(State(rt): State<Runtime>, AuthUser(user): AuthUser) -> Result<Json<Value>, Problem> {
    Ok(Json(account_view(&rt, &user.sub).await?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Deposit {
    amount_cents: i64,
}

/// Credits a user's wallet from outside (operators only).
async fn deposit(
    State(rt): State<Runtime>,
    _admin: AdminUser,
    Path(user_id): Path<String>,
    Json(body): Json<Deposit>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let user: Uuid = user_id
        .parse()
        .map_err(|_| Problem::bad_request(format!("`{user_id}` is not a user id (a UUID)")))?;
    if body.amount_cents <= 0 || body.amount_cents > MAX_DEPOSIT {
        return Err(Problem::bad_request(format!(
            "amountCents must be between 1 and {MAX_DEPOSIT}"
        )));
    }
    let wallet = ledger::wallet(&user);
    let mut tx = rt.store.begin().await?;
    if !ledger::exists(&mut tx, &wallet).await? {
        return Err(Problem::not_found(format!("no wallet for user {user}")));
    }
    ledger::open(&mut tx, ledger::EXTERNAL, "USD").await?;
    ledger::transfer(
        &mut tx,
        ledger::EXTERNAL,
        &wallet,
        body.amount_cents,
        "deposit",
        "customer deposit",
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(account_view(&rt, &user).await?)))
}

async fn show(
    State(rt): State<Runtime>,
    AuthUser(user): AuthUser,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let order: Uuid = order_id
        .parse()
        .map_err(|_| Problem::bad_request(format!("`{order_id}` is not an order id (a UUID)")))?;
    let row =
        sqlx::query("SELECT id, customer_id, amount_cents, currency, status, reason FROM payment WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_optional(rt.store.pool())
            .await?
            .filter(|r| r.try_get::<String, _>("customer_id").ok() == Some(user.sub.to_string()))
            .ok_or_else(|| Problem::not_found(format!("no payment for order {order}")))?;
    Ok(Json(json!({
        "id": row.try_get::<String, _>("id")?,
        "orderId": order,
        "amountCents": row.try_get::<i64, _>("amount_cents")?,
        "currency": row.try_get::<String, _>("currency")?,
        "status": row.try_get::<String, _>("status")?,
        "reason": row.try_get::<Option<String>, _>("reason")?,
    })))
}
