//! The saga commands inventory answers.

use bazaar_kit::store;
use std::collections::BTreeMap;

use bazaar_contracts::{types, LineRequest, OrderRef, PricedLine, ReserveStock, Reserved};
use bazaar_kit::{
    consumer::HandlerError,
    envelope::Envelope,
    store::{now_millis, StoreError, Tx},
};
use bazaar_saga::{Participant, Verdict};
use futures_util::future::BoxFuture;

/// Answers `inventory.reserve`, `inventory.release`, `inventory.commit` and `inventory.return`.
#[derive(Debug, Clone, Copy)]
pub struct StockCommands;

impl Participant for StockCommands {
    fn act<'a>(&'a self, tx: &'a mut Tx, command: &'a Envelope) -> BoxFuture<'a, Result<Verdict, HandlerError>> {
        Box::pin(async move {
            match command.event_type.as_str() {
                types::RESERVE_STOCK => reserve(tx, command.payload_as()?).await,
                types::RELEASE_STOCK => release(tx, command.payload_as()?).await,
                types::COMMIT_STOCK => commit(tx, command.payload_as()?).await,
                types::RETURN_STOCK => give_back(tx, command.payload_as()?).await,
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
    /// Sold, then the order was cancelled: the units are back on the shelf.
    Returned,
}

impl ReservationStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Reserved => "reserved",
            ReservationStatus::Rejected => "rejected",
            ReservationStatus::Released => "released",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Returned => "returned",
        }
    }

    /// The status a stored name means.
    pub fn parse(name: &str) -> Result<ReservationStatus, StoreError> {
        Ok(match name {
            "reserved" => ReservationStatus::Reserved,
            "rejected" => ReservationStatus::Rejected,
            "released" => ReservationStatus::Released,
            "committed" => ReservationStatus::Committed,
            "returned" => ReservationStatus::Returned,
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

/// The order's reservation, locked until the transaction ends: every command decides on it,
/// so a second copy of a command (or a crossing one) waits and then sees what the first did.
async fn reservation(tx: &mut Tx, order: &str) -> Result<Option<Reservation>, HandlerError> {
    let row = store::query("SELECT status, priced, reason FROM reservation WHERE order_id = $1 FOR UPDATE")
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

impl Reservation {
    /// The answer a reserve gets once this was decided: the first answer, again.
    fn answer(self, order: &str) -> Result<Verdict, HandlerError> {
        match self {
            Reservation {
                status: ReservationStatus::Reserved | ReservationStatus::Committed,
                priced: Some(priced),
                ..
            } => Ok(Verdict::Done(serde_json::from_str(&priced).map_err(|e| {
                HandlerError::Poison(format!("reservation of order {order} is unreadable: {e}"))
            })?)),
            Reservation { status, reason, .. } => {
                Ok(Verdict::Refused(reason.unwrap_or_else(|| {
                    format!("the reservation was already {}", status.as_str())
                })))
            }
        }
    }
}

/// Reserves every line or none; repeats the first answer when asked again.
///
/// The order's row is claimed before any product is locked, as release and commit lock it
/// before the products they move: every command takes the order's row, then products in id
/// order, so copies and crossing commands queue instead of deadlocking.
async fn reserve(tx: &mut Tx, cmd: ReserveStock) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    // Never committed as such: the decision below overwrites it in this transaction.
    if !claim(
        tx,
        &order,
        Decision::not_held(ReservationStatus::Rejected, "being priced"),
    )
    .await?
    {
        return decided(tx, &order).await?.answer(&order);
    }
    match price(tx, &order, &cmd).await? {
        Ok(reserved) => {
            let data = serde_json::to_value(&reserved)
                .map_err(|e| HandlerError::Poison(format!("reservation of order {order} does not serialise: {e}")))?;
            let priced = data.to_string();
            let held = Decision {
                status: ReservationStatus::Reserved,
                priced: Some(&priced),
                reason: None,
            };
            decide(tx, &order, held).await?;
            hold(tx, &order, &reserved.priced_lines).await?;
            metrics::counter!("bazaar_inventory_reservations_total").increment(1);
            Ok(Verdict::Done(data))
        }
        // A refusal is final for this order: a resent command gets the same answer even if
        // stock came back meanwhile, so no late reservation outlives its cancelled order.
        Err(reason) => {
            decide(tx, &order, Decision::not_held(ReservationStatus::Rejected, &reason)).await?;
            Ok(Verdict::Refused(reason))
        }
    }
}

/// What is decided for an order's reservation: its status, the priced answer when held,
/// the reason when refused.
struct Decision<'a> {
    status: ReservationStatus,
    priced: Option<&'a str>,
    reason: Option<&'a str>,
}

impl<'a> Decision<'a> {
    /// Refused (or a tombstone) for `reason`.
    fn not_held(status: ReservationStatus, reason: &'a str) -> Decision<'a> {
        Decision {
            status,
            priced: None,
            reason: Some(reason),
        }
    }
}

/// Inserts the order's reservation row unless it exists; false when it did (then nothing
/// was written). On PostgreSQL the insert waits for a transaction that inserted it and has
/// not ended, so the caller then reads the row that transaction left.
async fn claim(tx: &mut Tx, order: &str, decision: Decision<'_>) -> Result<bool, HandlerError> {
    let done = store::query(
        "INSERT INTO reservation (order_id, status, priced, reason, updated_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order)
    .bind(decision.status.as_str())
    .bind(decision.priced)
    .bind(decision.reason)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the decision on the order's row this transaction claimed.
async fn decide(tx: &mut Tx, order: &str, decision: Decision<'_>) -> Result<(), HandlerError> {
    store::query("UPDATE reservation SET status = $1, priced = $2, reason = $3, updated_at = $4 WHERE order_id = $5")
        .bind(decision.status.as_str())
        .bind(decision.priced)
        .bind(decision.reason)
        .bind(now_millis())
        .bind(order)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The reservation a claim found in place.
async fn decided(tx: &mut Tx, order: &str) -> Result<Reservation, HandlerError> {
    reservation(tx, order)
        .await?
        .ok_or_else(|| HandlerError::Transient(format!("the reservation of order {order} vanished after a lost claim")))
}

/// Holds each priced line's units and records the line.
async fn hold(tx: &mut Tx, order: &str, lines: &[PricedLine]) -> Result<(), HandlerError> {
    for line in lines {
        let product = line.product_id.to_string();
        store::query("UPDATE product SET reserved = reserved + $1 WHERE id = $2")
            .bind(line.quantity)
            .bind(&product)
            .execute(&mut *tx)
            .await?;
        store::query("INSERT INTO reservation_line (order_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(order)
            .bind(&product)
            .bind(line.quantity)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Prices every line against stock locked until the transaction ends (products in id order,
/// so two orders never each hold the row the other waits for): `Done` with the [`Reserved`]
/// answer when every line fits, the reason for refusing otherwise. Changes nothing.
async fn price(tx: &mut Tx, order: &str, cmd: &ReserveStock) -> Result<Result<Reserved, String>, HandlerError> {
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
        return Ok(Err(String::from("an order needs at least one line")));
    }
    let mut priced = Vec::new();
    let mut currency: Option<String> = None;
    for (product, quantity) in &wanted {
        let row = store::query("SELECT price_cents, currency, on_hand, reserved FROM product WHERE id = $1 FOR UPDATE")
            .bind(product)
            .fetch_optional(&mut *tx)
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
            return Ok(Err(String::from("all lines of an order must share one currency")));
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
        return Ok(Err(String::from("the order's total is too large")));
    };
    Ok(Ok(Reserved {
        total_cents: total,
        priced_lines: priced,
        currency: currency.ok_or_else(|| HandlerError::Poison(format!("order {order} priced no line")))?,
    }))
}

/// Releases a held reservation; leaves a tombstone when there is none yet.
async fn release(tx: &mut Tx, cmd: OrderRef) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    let status = match reservation(tx, &order).await? {
        Some(r) => r.status,
        None => {
            let tombstone = "released before reserved";
            if claim(tx, &order, Decision::not_held(ReservationStatus::Released, tombstone)).await? {
                return Ok(Verdict::done_empty());
            }
            // A reserve decided meanwhile: release what it did.
            decided(tx, &order).await?.status
        }
    };
    match status {
        ReservationStatus::Reserved => {
            move_lines(tx, &order, "UPDATE product SET reserved = reserved - $1 WHERE id = $2").await?;
            set_status(tx, &order, ReservationStatus::Released).await?;
            Ok(Verdict::done_empty())
        }
        // Nothing is held for a released or refused reservation.
        ReservationStatus::Released | ReservationStatus::Rejected => Ok(Verdict::done_empty()),
        ReservationStatus::Committed | ReservationStatus::Returned => Ok(Verdict::refused(format!(
            "cannot release a {} reservation",
            status.as_str()
        ))),
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

/// Puts a cancelled sale's units back on the shelf, once whatever the copies.
async fn give_back(tx: &mut Tx, cmd: OrderRef) -> Result<Verdict, HandlerError> {
    let order = cmd.order_id.to_string();
    match reservation(tx, &order).await?.map(|r| r.status) {
        Some(ReservationStatus::Committed) => {
            move_lines(tx, &order, "UPDATE product SET on_hand = on_hand + $1 WHERE id = $2").await?;
            set_status(tx, &order, ReservationStatus::Returned).await?;
            metrics::counter!("bazaar_inventory_returns_total").increment(1);
            Ok(Verdict::done_empty())
        }
        Some(ReservationStatus::Returned) => Ok(Verdict::done_empty()),
        Some(other) => Ok(Verdict::refused(format!(
            "cannot return a {} reservation: nothing was sold",
            other.as_str()
        ))),
        None => Ok(Verdict::refused("no reservation for this order")),
    }
}

async fn move_lines(tx: &mut Tx, order: &str, sql: &str) -> Result<(), HandlerError> {
    let lines =
        store::query("SELECT product_id, quantity FROM reservation_line WHERE order_id = $1 ORDER BY product_id")
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
