//! The inventory HTTP API: browse the catalogue, add products, restock.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    Router,
};
use bazaar_kit::store;
use bazaar_kit::{
    auth::AdminUser,
    http::{Json, Page, Problem},
    openapi::OpenApiRouter,
    runtime::Runtime,
    store::now_millis,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::routes;
use uuid::Uuid;

/// The API's routes, each with the operation it documents.
fn api() -> OpenApiRouter<Runtime> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show))
        .routes(routes!(restock))
}

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    api().split_for_parts().0.with_state(rt)
}

/// The API's operations, for its OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// A product as clients see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Product {
    /// The product's id.
    #[schema(format = Uuid)]
    id: String,
    /// Stock-keeping unit, unique.
    sku: String,
    /// What shoppers see.
    name: String,
    /// Price of one unit in minor units.
    price_cents: i64,
    /// ISO 4217 currency.
    currency: String,
    /// Units available to order now (on hand minus reserved).
    stock: i64,
    /// Units in the warehouse.
    on_hand: i64,
    /// Units held for orders in progress.
    reserved: i64,
}

fn product(r: &store::Row) -> Result<Product, store::StoreError> {
    let on_hand: i64 = r.try_get("on_hand")?;
    let reserved: i64 = r.try_get("reserved")?;
    Ok(Product {
        id: r.try_get("id")?,
        sku: r.try_get("sku")?,
        name: r.try_get("name")?,
        price_cents: r.try_get("price_cents")?,
        currency: r.try_get("currency")?,
        stock: on_hand - reserved,
        on_hand,
        reserved,
    })
}

const COLUMNS: &str = "id, sku, name, price_cents, currency, on_hand, reserved";

/// The product `id`, or a 404 problem.
async fn load(rt: &Runtime, id: &str) -> Result<Product, Problem> {
    let row = store::query(&format!("SELECT {COLUMNS} FROM product WHERE id = $1"))
        .bind(id)
        .fetch_optional(&rt.store)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no product {id}")))?;
    Ok(product(&row)?)
}

/// The catalogue, by SKU.
#[utoipa::path(get, path = "/products", tag = "products", params(Page),
    responses((status = 200, description = "A page of products", body = Vec<Product>)))]
async fn list(State(rt): State<Runtime>, Query(page): Query<Page>) -> Result<Json<Vec<Product>>, Problem> {
    let (limit, offset) = (page.limit(100, 1000), page.offset());
    let rows = store::query(&format!(
        "SELECT {COLUMNS} FROM product ORDER BY sku LIMIT $1 OFFSET $2"
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(&rt.store)
    .await?;
    Ok(Json(rows.iter().map(product).collect::<Result<_, _>>()?))
}

fn parse_id(id: &str) -> Result<Uuid, Problem> {
    id.parse()
        .map_err(|_| Problem::bad_request(format!("`{id}` is not a product id (a UUID)")))
}

/// One product with its live stock.
#[utoipa::path(get, path = "/products/{id}", tag = "products",
    params(("id" = Uuid, Path, description = "The product's id")),
    responses((status = 200, description = "The product", body = Product),
        (status = 404, description = "No such product")))]
async fn show(State(rt): State<Runtime>, Path(id): Path<String>) -> Result<Json<Product>, Problem> {
    let id = parse_id(&id)?;
    Ok(Json(load(&rt, &id.to_string()).await?))
}

/// Highest price of one unit (minor units): keeps every order total far from overflow.
const MAX_PRICE_CENTS: i64 = 1_000_000_000;
/// Most units a product may hold, and the largest single stock change.
const MAX_STOCK: i64 = 1_000_000_000;

/// The body of `POST /products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"sku": "MUG-BLUE", "name": "Blue mug", "priceCents": 1250, "currency": "USD", "stock": 40}))]
struct NewProduct {
    /// Stock-keeping unit, unique (surrounding spaces are dropped).
    #[schema(max_length = 64, pattern = "\\S")]
    sku: String,
    /// What shoppers see (surrounding spaces are dropped).
    #[schema(max_length = 200, pattern = "\\S")]
    name: String,
    /// Price of one unit in minor units.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    price_cents: i64,
    /// ISO 4217 currency (default USD).
    #[serde(default = "usd")]
    #[schema(pattern = "^[A-Z]{3}$", default = "USD")]
    currency: String,
    /// Units on hand to begin with.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000, default = 0)]
    stock: i64,
}

fn usd() -> String {
    "USD".into()
}

impl NewProduct {
    fn check(&self) -> Result<(), Problem> {
        if self.sku.trim().is_empty() || self.sku.chars().count() > 64 {
            return Err(Problem::bad_request("sku must be 1 to 64 characters"));
        }
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return Err(Problem::bad_request("name must be 1 to 200 characters"));
        }
        if !(0..=MAX_PRICE_CENTS).contains(&self.price_cents) {
            return Err(Problem::bad_request(format!(
                "priceCents must be between 0 and {MAX_PRICE_CENTS}"
            )));
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(Problem::bad_request("currency must be an ISO 4217 code such as USD"));
        }
        if !(0..=MAX_STOCK).contains(&self.stock) {
            return Err(Problem::bad_request(format!("stock must be between 0 and {MAX_STOCK}")));
        }
        Ok(())
    }
}

/// Adds a product to the catalogue (admins).
#[utoipa::path(post, path = "/products", tag = "products", security(("bearer" = ["admin"])),
    responses((status = 201, description = "The new product", body = Product),
        (status = 409, description = "A product with this SKU exists")))]
async fn create(
    State(rt): State<Runtime>,
    _admin: AdminUser,
    Json(new): Json<NewProduct>,
) -> Result<(StatusCode, Json<Product>), Problem> {
    new.check()?;
    let id = Uuid::now_v7().to_string();
    let now = now_millis();
    let mut tx = rt.store.begin().await?;
    let inserted = store::query(
        "INSERT INTO product (id, sku, name, price_cents, currency, on_hand, reserved, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7) ON CONFLICT (sku) DO NOTHING",
    )
    .bind(&id)
    .bind(new.sku.trim())
    .bind(new.name.trim())
    .bind(new.price_cents)
    .bind(&new.currency)
    .bind(new.stock)
    .bind(now)
    .execute(&mut tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Problem::conflict(format!(
            "a product with sku `{}` exists",
            new.sku.trim()
        )));
    }
    if new.stock > 0 {
        movement(&mut tx, &id, new.stock, "initial stock").await?;
    }
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(load(&rt, &id).await?)))
}

/// A small catalogue for a first look, added once to an empty store.
const DEMO: &[(&str, &str, i64, i64)] = &[
    ("MUG-CLASSIC", "Classic mug", 1_250, 100),
    ("TEE-LOGO", "Logo T-shirt", 2_000, 50),
    ("SOCKS-3", "Three pairs of socks", 900, 200),
    ("BAG-TOTE", "Tote bag", 1_500, 75),
    ("LAMP-DESK", "Desk lamp", 4_500, 20),
];

/// Adds the demo catalogue when the store has no products yet.
pub async fn seed_demo(rt: &Runtime) -> Result<(), bazaar_kit::store::StoreError> {
    let mut tx = rt.store.begin().await?;
    let any = store::query("SELECT 1 AS one FROM product LIMIT 1")
        .fetch_optional(&mut tx)
        .await?;
    if any.is_some() {
        return Ok(());
    }
    for (sku, name, price, stock) in DEMO {
        let id = Uuid::now_v7().to_string();
        // Replicas starting together may both find the catalogue empty: the second one's
        // insert waits for the first and then adds nothing.
        let added = store::query(
            "INSERT INTO product (id, sku, name, price_cents, currency, on_hand, reserved, created_at)
             VALUES ($1, $2, $3, $4, 'USD', $5, 0, $6) ON CONFLICT (sku) DO NOTHING",
        )
        .bind(&id)
        .bind(sku)
        .bind(name)
        .bind(price)
        .bind(stock)
        .bind(now_millis())
        .execute(&mut tx)
        .await?;
        if added.rows_affected() == 1 {
            movement(&mut tx, &id, *stock, "demo catalogue").await?;
        }
    }
    tx.commit().await
}

async fn movement(
    tx: &mut bazaar_kit::store::Tx,
    product: &str,
    delta: i64,
    reason: &str,
) -> Result<(), store::StoreError> {
    store::query("INSERT INTO stock_movement (id, product_id, delta, reason, at) VALUES ($1, $2, $3, $4, $5)")
        .bind(Uuid::now_v7().to_string())
        .bind(product)
        .bind(delta)
        .bind(reason)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The body of `POST /products/{id}/stock`: units received (positive) or written off
/// (negative, never below what is reserved).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(example = json!({"delta": 24, "reason": "delivery 2026-12-01"}))]
struct Restock {
    /// Units received (positive) or written off (negative); never zero.
    #[schema(schema_with = stock_change)]
    delta: i64,
    /// Why, for the stock history (default `restock` or `write-off`).
    #[serde(default)]
    #[schema(max_length = 200)]
    reason: Option<String>,
}

/// The schema of [`Restock::delta`]: a non-zero count within [`MAX_STOCK`] either way.
fn stock_change() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    let range = |min: i64, max: i64| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(min as f64))
            .maximum(Some(max as f64))
    };
    OneOfBuilder::new()
        .item(range(-MAX_STOCK, -1))
        .item(range(1, MAX_STOCK))
        .description(Some("Units received (positive) or written off (negative); never zero."))
        .build()
        .into()
}

/// Receives or writes off stock (admins).
#[utoipa::path(post, path = "/products/{id}/stock", tag = "products", security(("bearer" = ["admin"])),
    params(("id" = Uuid, Path, description = "The product's id")),
    responses((status = 200, description = "The product after the change", body = Product),
        (status = 404, description = "No such product"),
        (status = 409, description = "The change would leave fewer units than are reserved")))]
async fn restock(
    State(rt): State<Runtime>,
    _admin: AdminUser,
    Path(id): Path<String>,
    Json(body): Json<Restock>,
) -> Result<Json<Product>, Problem> {
    let id = parse_id(&id)?.to_string();
    // A range check, not `delta.abs()`: that overflows (a panic) for `i64::MIN`.
    if body.delta == 0 || !(-MAX_STOCK..=MAX_STOCK).contains(&body.delta) {
        return Err(Problem::bad_request(format!(
            "delta must be non-zero and between -{MAX_STOCK} and {MAX_STOCK}"
        )));
    }
    if body.reason.as_ref().is_some_and(|r| r.chars().count() > 200) {
        return Err(Problem::bad_request("reason must be at most 200 characters"));
    }
    let mut tx = rt.store.begin().await?;
    let changed = store::query(
        "UPDATE product SET on_hand = on_hand + $1 WHERE id = $2 AND on_hand + $1 >= reserved AND on_hand + $1 <= $3",
    )
    .bind(body.delta)
    .bind(&id)
    .bind(MAX_STOCK)
    .execute(&mut tx)
    .await?;
    if changed.rows_affected() == 0 {
        let on_hand = store::query("SELECT on_hand FROM product WHERE id = $1")
            .bind(&id)
            .fetch_optional(&mut tx)
            .await?;
        return Err(match on_hand {
            None => Problem::not_found(format!("no product {id}")),
            Some(row) if row.try_get::<i64, _>("on_hand")? + body.delta > MAX_STOCK => {
                Problem::conflict(format!("that would leave more than {MAX_STOCK} units on hand"))
            }
            Some(_) => Problem::conflict("that would leave fewer units on hand than are reserved"),
        });
    }
    let reason = body
        .reason
        .unwrap_or_else(|| if body.delta > 0 { "restock" } else { "write-off" }.into());
    movement(&mut tx, &id, body.delta, &reason).await?;
    tx.commit().await?;
    Ok(Json(load(&rt, &id).await?))
}
