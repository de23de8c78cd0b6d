//! Who may place an order now: each customer a few a minute, and nobody while the role is
//! saturated.
//!
//! Placing an order is cheap; the saga it starts is not (six hops over the broker). A role
//! that took every order during a burst would build a backlog that makes every order slow,
//! so it sheds early instead: past `max_in_flight` sagas still running, or when placements
//! queue for a turn longer than [`QUEUE_WAIT`], `POST /orders` answers 503 with `Retry-After`
//! and changes nothing, and the orders it admitted keep their latency. Separately each
//! customer may place `per_customer_per_minute` orders a minute (429 with `Retry-After`), so
//! one account cannot take the capacity, or loop impossible orders to flood mailboxes.

use bazaar_kit::store;
use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use bazaar_kit::{
    http::Problem,
    runtime::Runtime,
    store::{now_millis, Tx},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// How long a placement waits for a turn before it is shed.
pub const QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Placements handled at once (each a short store transaction).
const PLACING: usize = 32;
/// How often the count of running sagas is re-read.
const RECOUNT_EVERY: Duration = Duration::from_millis(250);

/// The limits, set from `BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE` and `BAZAAR_ORDERS_MAX_IN_FLIGHT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    /// Orders one customer may place in any minute (0: no limit).
    pub per_customer_per_minute: u32,
    /// Sagas running or compensating past which new orders are shed (0: no limit).
    pub max_in_flight: i64,
}

impl Default for AdmissionLimits {
    /// 30 orders a customer a minute (a person places a few; a script, more than this role
    /// serves a customer fairly), and 1 000 sagas in flight (about ten seconds of this role's
    /// capacity on two cores).
    fn default() -> AdmissionLimits {
        AdmissionLimits {
            per_customer_per_minute: 30,
            max_in_flight: 1_000,
        }
    }
}

/// Admission control shared by the role's handlers.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: AdmissionLimits,
    turns: Arc<Semaphore>,
    in_flight: Arc<AtomicI64>,
}

impl Admission {
    /// Admission under `limits`; the running-saga count is kept fresh by [`Admission::watch`].
    pub fn new(limits: AdmissionLimits) -> Admission {
        Admission {
            limits,
            turns: Arc::new(Semaphore::new(PLACING)),
            in_flight: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Re-reads the number of sagas in flight every [`RECOUNT_EVERY`], as one of `rt`'s tasks.
    pub fn watch(&self, rt: &Runtime) {
        if self.limits.max_in_flight == 0 {
            return;
        }
        let (store, in_flight) = (rt.store.clone(), self.in_flight.clone());
        rt.every(RECOUNT_EVERY, move || {
            let (store, in_flight) = (store.clone(), in_flight.clone());
            async move {
                let counted = store::query(
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM saga WHERE status IN ('running', 'compensating') AND kind = 'order'",
                )
                .fetch_scalar::<i64>(&store)
                .await;
                match counted {
                    Ok(n) => {
                        in_flight.store(n, Ordering::Relaxed);
                        metrics::gauge!("bazaar_orders_sagas_in_flight").set(n as f64);
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot count sagas in flight"),
                }
            }
        });
    }

    /// A turn to place an order, or the problem that sheds it.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, Problem> {
        let limit = self.limits.max_in_flight;
        if limit > 0 && self.in_flight.load(Ordering::Relaxed) >= limit {
            return Err(shed(format!(
                "the shop is at capacity ({limit} orders in progress); nothing was placed, retry in a moment"
            )));
        }
        match tokio::time::timeout(QUEUE_WAIT, self.turns.clone().acquire_owned()).await {
            Ok(Ok(turn)) => Ok(turn),
            _ => Err(shed(
                "too many orders at once; nothing was placed, retry in a moment".into(),
            )),
        }
    }

    /// Checks, inside the transaction that places the order, that `customer` is within their
    /// orders a minute. The customer's quota row is locked first (an upsert locks the row it
    /// meets), so two placements of one customer, on any replicas, count one after the other
    /// and the second sees the first's order.
    pub async fn within_quota(&self, tx: &mut Tx, customer: &Uuid) -> Result<(), Problem> {
        let per_minute = self.limits.per_customer_per_minute;
        if per_minute == 0 {
            return Ok(());
        }
        let now = now_millis();
        store::query(
            "INSERT INTO customer_quota (customer_id, checked_at) VALUES ($1, $2)
             ON CONFLICT (customer_id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(customer.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let since = now - 60_000;
        let recent = store::query(
            "SELECT created_at FROM orders WHERE customer_id = $1 AND created_at > $2 ORDER BY created_at LIMIT $3",
        )
        .bind(customer.to_string())
        .bind(since)
        .bind(i64::from(per_minute))
        .fetch_column::<i64>(&mut *tx)
        .await?;
        if recent.len() < per_minute as usize {
            return Ok(());
        }
        // The oldest of them leaves the window first.
        let wait = Duration::from_millis((recent[0] - since).max(1) as u64);
        metrics::counter!("bazaar_orders_throttled_total").increment(1);
        Err(Problem::too_many(
            format!(
                "you placed {per_minute} orders in the last minute, the most one customer may; try again in {} s",
                wait.as_secs().max(1)
            ),
            wait,
        ))
    }
}

fn shed(detail: String) -> Problem {
    metrics::counter!("bazaar_orders_shed_total").increment(1);
    Problem::unavailable(detail)
}
