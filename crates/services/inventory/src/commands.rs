//! The saga commands inventory answers.

use std::collections::BTreeMap;

use bazaar_contracts::{types, LineRequest, OrderRef, PricedLine, ReserveStock, Reserved};
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    outbox,
    saga::CommandHeader,
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use sqlx::Row;

/// Handles `inventory.reserve`, `inventory.release` and `inventory.commit`.
#[derive(Debug, Clone, Copy)]
pub struct StockCommands;

impl Handler for StockCommands {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let header = CommandHeader::of(event)?;
            let result = match event.event_type.as_str() {
                types::RESERVE_STOCK => reserve(tx, event.payload_as()?).await?,
                types::RELEASE_STOCK => release(tx, event.payload_as()?).await?,
                types::COMMIT_STOCK => commit(tx, event.payload_as()?).await?,
                other => return Err(HandlerError::Poison(format!("unknown command type `{other}`"))),
            };
            let (topic, reply) = header.reply(event, "inventory", result);
            Ok(outbox::add(tx, &topic, &reply).await?)
        })
    }
}

type Reply = Result<serde_json::Value, String>;

/// Most units of one product one order may reserve.
const MAX_UNITS: i64 = 1_000_000;

/// An order's reservation row: status, priced lines (when reserved), reason (when refused).
struct Reservation {
    status: String,
    priced: Option<String>,
    reason: Option<String>,
}

async fn reservation(tx: &mut Tx<'static>, order: &str) -> Result<Option<Reservation>, HandlerError> {
    let row = sqlx::query("SELECT status, priced, reason FROM reservation WHERE order_id = $1")
        .bind(order)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => Some(Reservation {
            status: r.try_get("status")?,
            priced: r.try_get("priced")?,
            reason: r.try_get("reason")?,
        }),
        None => None,
    })
}

/// Reserves every line or none; repeats the first answer when asked again.
async fn reserve(tx: &mut Tx<'static>, cmd: ReserveStock) -> Result<Reply, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await? {
        Some(Reservation {
            status,
            priced: Some(priced),
            ..
        }) if status == "reserved" || status == "committed" => {
            return Ok(Ok(serde_json::from_str(&priced).unwrap_or_default()));
        }
        Some(Reservation { status, reason, .. }) => {
            return Ok(Err(
                reason.unwrap_or_else(|| format!("the reservation was already {status}"))
            ));
        }
        None => {}
    }
    let result = try_reserve(tx, &order, &cmd).await?;
    if let Err(reason) = &result {
        // A refusal is final for this order: a resent command gets the same answer even if
        // stock came back meanwhile, so no late reservation outlives its cancelled order.
        sqlx::query("INSERT INTO reservation (order_id, status, reason, updated_at) VALUES ($1, 'rejected', $2, $3)")
            .bind(&order)
            .bind(reason)
            .bind(now_millis())
            .execute(&mut **tx)
            .await?;
    }
    Ok(result)
}

/// Reserves every line or none, when nothing was decided for the order yet.
async fn try_reserve(tx: &mut Tx<'static>, order: &str, cmd: &ReserveStock) -> Result<Reply, HandlerError> {
    let now = now_millis();
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for LineRequest { product_id, quantity } in &cmd.lines {
        if *quantity <= 0 {
            return Ok(Err(format!("quantity of {product_id} must be at least 1")));
        }
        let sum = wanted.entry(product_id.to_string()).or_default();
        *sum = match sum.checked_add(*quantity) {
            Some(n) if n <= MAX_UNITS => n,
            _ => return Ok(Err(format!("quantity of {product_id} is too large"))),
        };
    }
    if wanted.is_empty() {
        return Ok(Err("an order needs at least one line".into()));
    }
    let mut priced = Vec::new();
    let mut currency: Option<String> = None;
    for (product, quantity) in &wanted {
        let row = sqlx::query("SELECT price_cents, currency, on_hand, reserved FROM product WHERE id = $1")
            .bind(product)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = row else {
            return Ok(Err(format!("unknown product {product}")));
        };
        let price: i64 = row.try_get("price_cents")?;
        let cur: String = row.try_get("currency")?;
        let available = row.try_get::<i64, _>("on_hand")? - row.try_get::<i64, _>("reserved")?;
        if available < *quantity {
            return Ok(Err(format!(
                "insufficient stock for {product}: {available} available, {quantity} wanted"
            )));
        }
        if currency.get_or_insert_with(|| cur.clone()) != &cur {
            return Ok(Err("all lines of an order must share one currency".into()));
        }
        priced.push(PricedLine {
            product_id: product
                .parse()
                .map_err(|_| HandlerError::Poison(format!("bad product id {product}")))?,
            quantity: *quantity,
            unit_price_cents: price,
        });
    }
    let total = priced.iter().try_fold(0i64, |sum, l| {
        l.quantity
            .checked_mul(l.unit_price_cents)
            .and_then(|line| sum.checked_add(line))
    });
    let Some(total) = total else {
        return Ok(Err("the order's total is too large".into()));
    };
    let reserved = Reserved {
        total_cents: total,
        priced_lines: priced,
        currency: currency.unwrap_or_default(),
    };
    let data = serde_json::to_value(&reserved).unwrap_or_default();
    sqlx::query("INSERT INTO reservation (order_id, status, priced, updated_at) VALUES ($1, 'reserved', $2, $3)")
        .bind(order)
        .bind(data.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    for (product, quantity) in &wanted {
        sqlx::query("UPDATE product SET reserved = reserved + $1 WHERE id = $2")
            .bind(quantity)
            .bind(product)
            .execute(&mut **tx)
            .await?;
        sqlx::query("INSERT INTO reservation_line (order_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(order)
            .bind(product)
            .bind(quantity)
            .execute(&mut **tx)
            .await?;
    }
    metrics::counter!("bazaar_inventory_reservations_total").increment(1);
    Ok(Ok(data))
}

/// Releases a held reservation; leaves a tombstone when there is none yet.
async fn release(tx: &mut Tx<'static>, cmd: OrderRef) -> Result<Reply, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await?.map(|r| r.status).as_deref() {
        None => {
            sqlx::query("INSERT INTO reservation (order_id, status, reason, updated_at) VALUES ($1, 'released', 'released before reserved', $2)")
                .bind(&order)
                .bind(now_millis())
                .execute(&mut **tx)
                .await?;
            Ok(Ok(serde_json::Value::Null))
        }
        Some("reserved") => {
            move_lines(tx, &order, "UPDATE product SET reserved = reserved - $1 WHERE id = $2").await?;
            set_status(tx, &order, "released").await?;
            Ok(Ok(serde_json::Value::Null))
        }
        // Nothing is held for a released or refused reservation.
        Some("released") | Some("rejected") => Ok(Ok(serde_json::Value::Null)),
        Some(other) => Ok(Err(format!("cannot release a {other} reservation"))),
    }
}

/// Turns a reservation into a sale: the units leave the shelf.
async fn commit(tx: &mut Tx<'static>, cmd: OrderRef) -> Result<Reply, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await?.map(|r| r.status).as_deref() {
        Some("reserved") => {
            move_lines(
                tx,
                &order,
                "UPDATE product SET reserved = reserved - $1, on_hand = on_hand - $1 WHERE id = $2",
            )
            .await?;
            set_status(tx, &order, "committed").await?;
            Ok(Ok(serde_json::Value::Null))
        }
        Some("committed") => Ok(Ok(serde_json::Value::Null)),
        Some(other) => Ok(Err(format!("cannot commit a {other} reservation"))),
        None => Ok(Err("no reservation for this order".into())),
    }
}

async fn move_lines(tx: &mut Tx<'static>, order: &str, sql: &str) -> Result<(), HandlerError> {
    let lines = sqlx::query("SELECT product_id, quantity FROM reservation_line WHERE order_id = $1")
        .bind(order)
        .fetch_all(&mut **tx)
        .await?;
    for line in lines {
        sqlx::query(sql)
            .bind(line.try_get::<i64, _>("quantity")?)
            .bind(line.try_get::<String, _>("product_id")?)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn set_status(tx: &mut Tx<'static>, order: &str, status: &str) -> Result<(), HandlerError> {
    sqlx::query("UPDATE reservation SET status = $1, updated_at = $2 WHERE order_id = $3")
        .bind(status)
        .bind(now_millis())
        .bind(order)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
