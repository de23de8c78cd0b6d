//! The payments HTTP API: your wallet, deposits, and the payment of an order.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Router,
};
use bazaar_kit::store;
use bazaar_kit::{
    auth::{AdminUser, AuthUser},
    http::{Json, Problem},
    openapi::OpenApiRouter,
    runtime::Runtime,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{ledger, PaymentStatus};

/// The API's routes, each with the operation it documents.
fn api() -> OpenApiRouter<Runtime> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(deposit))
        .routes(routes!(show))
}

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    api().split_for_parts().0.with_state(rt)
}

/// The API's operations, for its OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// A customer's wallet.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Account {
    /// Whose it is.
    user_id: Uuid,
    /// What it holds, in minor units.
    balance_cents: i64,
    /// ISO 4217 currency.
    currency: String,
}

/// The payment of an order.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Payment {
    /// The payment's id.
    #[schema(format = Uuid)]
    id: String,
    /// The order it pays.
    order_id: Uuid,
    /// The amount in minor units.
    amount_cents: i64,
    /// ISO 4217 currency.
    currency: String,
    /// Where it is.
    status: PaymentStatus,
    /// Why it failed, when it did.
    reason: Option<String>,
}

/// Largest single deposit (minor units).
const MAX_DEPOSIT: i64 = 100_000_000;

async fn account_view(rt: &Runtime, customer: &Uuid) -> Result<Account, Problem> {
    let wallet = ledger::wallet(customer);
    let exists = store::query("SELECT currency, balance_cents FROM account WHERE id = $1")
        .bind(&wallet)
        .fetch_optional(&rt.store)
        .await?;
    let Some(row) = exists else {
        return Err(Problem::not_found(
            "no wallet yet; it opens moments after registration, try again shortly",
        ));
    };
    let currency: String = row.try_get("currency")?;
    let balance: i64 = row.try_get("balance_cents")?;
    Ok(Account {
        user_id: *customer,
        balance_cents: balance,
        currency,
    })
}

/// The caller's wallet and balance.
#[utoipa::path(get, path = "/accounts/me", tag = "payments", security(("bearer" = [])),
    responses((status = 200, description = "The wallet", body = Account),
        (status = 404, description = "The wallet is not open yet (moments after the account opens)")))]
async fn me(State(rt): State<Runtime>, AuthUser(user): AuthUser) -> Result<Json<Account>, Problem> {
    Ok(Json(account_view(&rt, &user.sub).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"amountCents": 5000}))]
struct Deposit {
    /// Minor units to credit.
    #[schema(minimum = 1, maximum = 100_000_000)]
    amount_cents: i64,
}

/// Credits a user's wallet from outside (operators only).
#[utoipa::path(post, path = "/accounts/{user_id}/deposits", tag = "payments", security(("bearer" = ["admin"])),
    params(("user_id" = Uuid, Path, description = "Whose wallet")),
    responses((status = 201, description = "The wallet after the deposit", body = Account),
        (status = 404, description = "No wallet for that user")))]
async fn deposit(
    State(rt): State<Runtime>,
    _admin: AdminUser,
    Path(user_id): Path<String>,
    Json(body): Json<Deposit>,
) -> Result<(StatusCode, Json<Account>), Problem> {
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

/// The payment of one of the caller's orders.
#[utoipa::path(get, path = "/payments/{order_id}", tag = "payments", security(("bearer" = [])),
    params(("order_id" = Uuid, Path, description = "The order it pays")),
    responses((status = 200, description = "The payment", body = Payment),
        (status = 404, description = "No payment for an order of the caller's")))]
async fn show(
    State(rt): State<Runtime>,
    AuthUser(user): AuthUser,
    Path(order_id): Path<String>,
) -> Result<Json<Payment>, Problem> {
    let order: Uuid = order_id
        .parse()
        .map_err(|_| Problem::bad_request(format!("`{order_id}` is not an order id (a UUID)")))?;
    let row =
        store::query("SELECT id, customer_id, amount_cents, currency, status, reason FROM payment WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_optional(&rt.store)
            .await?
            .filter(|r| r.try_get::<String, _>("customer_id").ok() == Some(user.sub.to_string()))
            .ok_or_else(|| Problem::not_found(format!("no payment for order {order}")))?;
    Ok(Json(Payment {
        id: row.try_get("id")?,
        order_id: order,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        status: PaymentStatus::parse(&row.try_get::<String, _>("status")?)?,
        reason: row.try_get("reason")?,
    }))
}
