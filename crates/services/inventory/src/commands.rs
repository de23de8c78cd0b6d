//! The saga commands inventory answers.

use bazaar_kit::store;
use std::collections::BTreeMap;

use bazaar_contracts::{types, LineRequest, OrderRef, PricedLine, ReserveStock, Reserved};
use bazaar_kit::{
    consumer::HandlerError,
    envelope::Envelope,
    saga::{Participant, Verdict},
    store::{now_millis, StoreError, Tx},
};
use futures_util::future::BoxFuture;

/// Answers `inventory.reserve`, `inventory.release` and `inventory.commit`.
#[derive(Debug, Clone, Copy)]
pub struct StockCommands;

impl Participant for StockCommands {
    fn act<'a>(&'a self, tx: &'a mut Tx, command: &'a Envelope) -> BoxFuture<'a, Result<Verdict, HandlerError>> {
        Box::pin(async move {
            match command.event_type.as_str() {
                types::RESERVE_STOCK => reserve(tx, command.payload_as()?).await,
                types::RELEASE_STOCK => release(tx, command.payload_as()?).await,
                types::COMMIT_STOCK => commit(tx, command.payload_as()?).await,
                other => Err(HandlerError::Poison(format!("unknown command type `{other}`"))),
            }
        })
    }
}

/// Where an order's reservation is; stored by name in `reservation.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    /// The units are held for the order.
    Reserved,
    /// Refused (stock, product, currency); final for the order.
    Rejected,
    /// Given back, or released before any reserve arrived (a tombstone).
    Released,
    /// Sold: the units left the shelf.
    Committed,
}

impl ReservationStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "reserved",
            ReservationStatus::Rejected => "rejected",
            ReservationStatus::Released => "released",
            ReservationStatus::Committed => "committed",
        }
    }

    /// The status a stored name means.
    pub fn parse(name: &str) -> Result<ReservationStatus, StoreError> {
        Ok(match name {
            "reserved" => ReservationStatus::Reserved,
            "rejected" => ReservationStatus::Rejected,
            "released" => ReservationStatus::Released,
            "committed" => ReservationStatus::Committed,
            other => return Err(StoreError::Corrupt(format!("unknown reservation status `{other}`"))),
        })
    }
}

/// Most units of one product one order may reserve.
const MAX_UNITS: i64 = 1_000_000;

/// An order's reservation row: status, priced lines (when reserved), reason (when refused).
struct Reservation {
    status: ReservationStatus,
    priced: Option<String>,
    reason: Option<String>,
}

async fn reservation(tx: &mut Tx, order: &str) -> Result<Option<Reservation>, HandlerError> {
    let row = store::query("SELECT status, priced, reason FROM reservation WHERE order_id = $1")
        .bind(order)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(match row {
        Some(r) => Some(Reservation {
            status: ReservationStatus::parse(&r.try_get::<String, _>("status")?)?,
            priced: r.try_get("priced")?,
            reason: r.try_get("reason")?,
        }),
        None => None,
    })
}

/// Reserves every line or none; repeats the first answer when asked again.
async fn reserve(tx: &mut Tx, cmd: ReserveStock) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await? {
        Some(Reservation {
            status: ReservationStatus::Reserved | ReservationStatus::Committed,
            priced: Some(priced),
            ..
        }) => {
            let priced = serde_json::from_str(&priced)
                .map_err(|e| HandlerError::Poison(format!("reservation of order {order} is unreadable: {e}")))?;
            return Ok(Verdict::Done(priced));
        }
        Some(Reservation { status, reason, .. }) => {
            return Ok(Verdict::Refused(reason.unwrap_or_else(|| {
                format!("the reservation was already {}", status.as_str())
            })));
        }
        None => {}
    }
    let verdict = try_reserve(tx, &order, &cmd).await?;
    if let Verdict::Refused(reason) = &verdict {
        // A refusal is final for this order: a resent command gets the same answer even if
        // stock came back meanwhile, so no late reservation outlives its cancelled order.
        store::query("INSERT INTO reservation (order_id, status, reason, updated_at) VALUES ($1, $4, $2, $3)")
            .bind(&order)
            .bind(reason)
            .bind(now_millis())
            .bind(ReservationStatus::Rejected.as_str())
            .execute(&mut *tx)
            .await?;
    }
    Ok(verdict)
}

/// Reserves every line or none, when nothing was decided for the order yet.
async fn try_reserve(tx: &mut Tx, order: &str, cmd: &ReserveStock) -> Result<Verdict, HandlerError> {
    let now = now_millis();
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for LineRequest { product_id, quantity } in &cmd.lines {
        if *quantity <= 0 {
            return Ok(Verdict::Refused(format!("quantity of {product_id} must be at least 1")));
        }
        let sum = wanted.entry(product_id.to_string()).or_default();
        *sum = match sum.checked_add(*quantity) {
            Some(n) if n <= MAX_UNITS => n,
            _ => return Ok(Verdict::Refused(format!("quantity of {product_id} is too large"))),
        };
    }
    if wanted.is_empty() {
        return Ok(Verdict::refused("an order needs at least one line"));
    }
    let mut priced = Vec::new();
    let mut currency: Option<String> = None;
    for (product, quantity) in &wanted {
        let row = store::query("SELECT price_cents, currency, on_hand, reserved FROM product WHERE id = $1")
            .bind(product)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(Verdict::Refused(format!("unknown product {product}")));
        };
        let price: i64 = row.try_get("price_cents")?;
        let cur: String = row.try_get("currency")?;
        let available = row.try_get::<i64, _>("on_hand")? - row.try_get::<i64, _>("reserved")?;
        if available < *quantity {
            return Ok(Verdict::Refused(format!(
                "insufficient stock for {product}: {available} available, {quantity} wanted"
            )));
        }
        if currency.get_or_insert_with(|| cur.clone()) != &cur {
            return Ok(Verdict::refused("all lines of an order must share one currency"));
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
        return Ok(Verdict::refused("the order's total is too large"));
    };
    let reserved = Reserved {
        total_cents: total,
        priced_lines: priced,
        currency: currency.ok_or_else(|| HandlerError::Poison(format!("order {order} priced no line")))?,
    };
    let data = serde_json::to_value(&reserved)
        .map_err(|e| HandlerError::Poison(format!("reservation of order {order} does not serialise: {e}")))?;
    store::query("INSERT INTO reservation (order_id, status, priced, updated_at) VALUES ($1, $4, $2, $3)")
        .bind(order)
        .bind(data.to_string())
        .bind(now)
        .bind(ReservationStatus::Reserved.as_str())
        .execute(&mut *tx)
        .await?;
    for (product, quantity) in &wanted {
        store::query("UPDATE product SET reserved = reserved + $1 WHERE id = $2")
            .bind(quantity)
            .bind(product)
            .execute(&mut *tx)
            .await?;
        store::query("INSERT INTO reservation_line (order_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(order)
            .bind(product)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
    }
    metrics::counter!("bazaar_inventory_reservations_total").increment(1);
    Ok(Verdict::Done(data))
}

/// Releases a held reservation; leaves a tombstone when there is none yet.
async fn release(tx: &mut Tx, cmd: OrderRef) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await?.map(|r| r.status) {
        None => {
            store::query(
                "INSERT INTO reservation (order_id, status, reason, updated_at) VALUES ($1, $3, 'released before reserved', $2)",
            )
            .bind(&order)
            .bind(now_millis())
            .bind(ReservationStatus::Released.as_str())
            .execute(&mut *tx)
            .await?;
            Ok(Verdict::done_empty())
        }
        Some(ReservationStatus::Reserved) => {
            move_lines(tx, &order, "UPDATE product SET reserved = reserved - $1 WHERE id = $2").await?;
            set_status(tx, &order, ReservationStatus::Released).await?;
            Ok(Verdict::done_empty())
        }
        // Nothing is held for a released or refused reservation.
        Some(ReservationStatus::Released | ReservationStatus::Rejected) => Ok(Verdict::done_empty()),
        Some(ReservationStatus::Committed) => Ok(Verdict::refused("cannot release a committed reservation")),
    }
}

/// Turns a reservation into a sale: the units leave the shelf.
async fn commit(tx: &mut Tx, cmd: OrderRef) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await?.map(|r| r.status) {
        Some(ReservationStatus::Reserved) => {
            move_lines(
                tx,
                &order,
                "UPDATE product SET reserved = reserved - $1, on_hand = on_hand - $1 WHERE id = $2",
            )
            .await?;
            set_status(tx, &order, ReservationStatus::Committed).await?;
            Ok(Verdict::done_empty())
        }
        Some(ReservationStatus::Committed) => Ok(Verdict::done_empty()),
        Some(other) => Ok(Verdict::refused(format!(
            "cannot commit a {} reservation",
            other.as_str()
        ))),
        None => Ok(Verdict::refused("no reservation for this order")),
    }
}

async fn move_lines(tx: &mut Tx, order: &str, sql: &str) -> Result<(), HandlerError> {
    let lines = store::query("SELECT product_id, quantity FROM reservation_line WHERE order_id = $1")
        .bind(order)
        .fetch_all(&mut *tx)
        .await?;
    for line in lines {
        store::query(sql)
            .bind(line.try_get::<i64, _>("quantity")?)
            .bind(line.try_get::<String, _>("product_id")?)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn set_status(tx: &mut Tx, order: &str, status: ReservationStatus) -> Result<(), HandlerError> {
    store::query("UPDATE reservation SET status = $1, updated_at = $2 WHERE order_id = $3")
        .bind(status.as_str())
        .bind(now_millis())
        .bind(order)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
