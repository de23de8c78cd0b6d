//! A customer's cancellation: before the order saga's pivot it turns the saga around; once
//! the order is confirmed (or the pivot was sent), a cancellation saga of its own puts the
//! sold units back on the shelf and refunds the payment: returnStock -> refundPayment, each
//! retried until its participant answers (neither can be undone: a refund is not taken back).
//! Only the return can be refused (a reservation that was never sold), and it goes first, so
//! a refused cancellation has changed nothing.
//!
//! Every decision locks the placement saga's row, then the cancellation saga's (if there is
//! one), then the order's row, the order the replies of both flows take them in, so a
//! cancellation and a reply meeting on one order queue instead of deadlocking; the order's
//! status then says what has already happened.

use std::time::Duration;

use bazaar_contracts::{roles, topics, types, OrderOutcome, OrderRef};
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
    outbox, store,
    store::{now_millis, Tx},
};
use bazaar_saga::{SagaEngine, SagaFlow, SagaState, SagaStatus, SagaStep, Step, Stopped};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{OrderStatus, Orders};

/// Why a customer's cancellation stops an order, as the order and its notification say.
pub const BY_THE_CUSTOMER: &str = "cancelled by the customer";

/// The cancellation saga's kind.
pub const KIND: &str = "order-cancellation";

/// The id of order `order`'s cancellation saga.
pub fn saga_id(order: &str) -> String {
    format!("{order}/cancel")
}

/// The order a saga id belongs to: the id itself for the order saga, the part before `/`
/// for its cancellation.
pub fn order_of(saga_id: &str) -> &str {
    saga_id.split('/').next().unwrap_or(saga_id)
}

/// The steps of the cancellation saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelStep {
    /// Inventory puts the sold units back on the shelf.
    ReturnStock,
    /// Payments gives the captured amount back to the wallet (or the provider).
    RefundPayment,
}

impl SagaStep for CancelStep {
    fn name(self) -> &'static str {
        match self {
            CancelStep::RefundPayment => "refundPayment",
            CancelStep::ReturnStock => "returnStock",
        }
    }
}

/// What the cancellation saga carries: the order and what its confirmation charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelContext {
    /// The order.
    pub order_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// Where the outcome is announced.
    pub email: String,
    /// What was charged, and is refunded.
    pub total_cents: i64,
    /// Its currency.
    pub currency: String,
    /// Whether its confirmation was announced (and counted as an outcome) before.
    #[serde(default)]
    pub announced: bool,
}

impl CancelContext {
    /// The order's outcome as announced: what was charged (and is refunded), and why.
    fn outcome(&self, reason: Option<&str>) -> OrderOutcome {
        OrderOutcome {
            order_id: self.order_id,
            customer_id: self.customer_id,
            email: self.email.clone(),
            total_cents: self.total_cents,
            currency: Some(self.currency.clone()),
            reason: reason.map(str::to_string),
        }
    }
}

/// The cancellation saga's definition.
#[derive(Debug)]
pub struct CancelFlow {
    steps: [Step<CancelStep>; 2],
}

impl CancelFlow {
    /// The two steps, each waiting `timeout` for a reply before resending; neither has a
    /// compensation, so each is retried until its participant answers.
    pub fn paced(timeout: Duration) -> CancelFlow {
        let step = |step, topic, participant, execute| Step {
            step,
            topic,
            participant,
            execute,
            compensate: None,
            timeout,
            max_attempts: 3,
        };
        CancelFlow {
            steps: [
                step(
                    CancelStep::ReturnStock,
                    topics::INVENTORY_COMMANDS,
                    roles::INVENTORY,
                    types::RETURN_STOCK,
                ),
                step(
                    CancelStep::RefundPayment,
                    topics::PAYMENTS_COMMANDS,
                    roles::PAYMENTS,
                    types::REFUND_PAYMENT,
                ),
            ],
        }
    }
}

impl SagaFlow for CancelFlow {
    type Step = CancelStep;
    type Context = CancelContext;

    fn kind(&self) -> &'static str {
        KIND
    }

    fn steps(&self) -> &[Step<CancelStep>] {
        &self.steps
    }

    fn command(&self, _step: CancelStep, _compensation: bool, ctx: &CancelContext) -> Result<Value, String> {
        serde_json::to_value(OrderRef { order_id: ctx.order_id }).map_err(|e| e.to_string())
    }

    /// Neither step reports anything the saga needs.
    fn record(&self, _step: CancelStep, _ctx: &mut CancelContext, _data: Value) -> Result<(), String> {
        Ok(())
    }

    fn finished<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga: &'a SagaState<CancelContext>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            match saga.status {
                SagaStatus::Completed => cancelled(tx, saga).await,
                // The return was refused, before anything was given back: the order stands,
                // confirmed, and says why.
                SagaStatus::Compensated => {
                    let why = format!(
                        "the cancellation failed: {}",
                        saga.error.as_deref().unwrap_or("refused")
                    );
                    reinstate(tx, saga, &why).await
                }
                // A stuck cancellation leaves the order cancelling; the audit and metrics show it.
                _ => Ok(()),
            }
        })
    }
}

/// Marks a cancelling order cancelled and announces it, with what was refunded.
async fn cancelled(tx: &mut Tx, saga: &SagaState<CancelContext>) -> Result<(), HandlerError> {
    let ctx = &saga.context;
    let updated = store::query(
        "UPDATE orders SET status = $1, reason = $2, version = version + 1, updated_at = $3 WHERE id = $4 AND status = $5",
    )
    .bind(OrderStatus::Cancelled.as_str())
    .bind(BY_THE_CUSTOMER)
    .bind(now_millis())
    .bind(ctx.order_id.to_string())
    .bind(OrderStatus::Cancelling.as_str())
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(());
    }
    announce(tx, saga, types::ORDER_CANCELLED, ctx.outcome(Some(BY_THE_CUSTOMER))).await?;
    // An order confirmed before counted its outcome then.
    if !ctx.announced {
        metrics::counter!("bazaar_orders_finished_total", "status" => OrderStatus::Cancelled.as_str()).increment(1);
    }
    Ok(())
}

/// Puts a cancelling order back to confirmed with `why`; announces the confirmation if it
/// never went out (the cancellation was asked for before the order was confirmed).
async fn reinstate(tx: &mut Tx, saga: &SagaState<CancelContext>, why: &str) -> Result<(), HandlerError> {
    let ctx = &saga.context;
    let row = store::query("SELECT confirmed_at FROM orders WHERE id = $1 AND status = $2 FOR UPDATE")
        .bind(ctx.order_id.to_string())
        .bind(OrderStatus::Cancelling.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Ok(());
    };
    let announced = row.try_get::<Option<i64>, _>("confirmed_at")?.is_some();
    let now = now_millis();
    store::query(
        "UPDATE orders SET status = $1, reason = $2, confirmed_at = $3, version = version + 1, updated_at = $3 WHERE id = $4",
    )
    .bind(OrderStatus::Confirmed.as_str())
    .bind(why)
    .bind(now)
    .bind(ctx.order_id.to_string())
    .execute(&mut *tx)
    .await?;
    if !announced {
        announce(tx, saga, types::ORDER_CONFIRMED, ctx.outcome(None)).await?;
    }
    Ok(())
}

/// Adds an order's outcome event to the outbox, in the saga's transaction.
pub(crate) async fn announce<C>(
    tx: &mut Tx,
    saga: &SagaState<C>,
    event_type: &str,
    outcome: OrderOutcome,
) -> Result<(), HandlerError> {
    let metadata = Metadata {
        correlation_id: saga.correlation_id.clone(),
        traceparent: saga.traceparent.clone(),
        source: crate::SERVICE.name.into(),
        ..Metadata::default()
    };
    let event = Envelope::new(event_type, outcome.order_id.to_string(), outcome, metadata).with_version(2);
    outbox::add(tx, topics::ORDERS_EVENTS, &event).await?;
    Ok(())
}

/// What a customer's cancellation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancellation {
    /// It is under way: the order will be cancelled, its money and units given back.
    Accepted,
    /// The order was already cancelled.
    Already,
}

/// Why a cancellation could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No order of that customer's has that id.
    #[error("no order {0}")]
    NotFound(String),
    /// The order's saga, or its cancellation, is stuck; an operator must look at it first.
    #[error("order {0} is waiting for an operator (its saga is stuck); it cannot be cancelled until then")]
    Stuck(String),
    /// An earlier cancellation was refused, for this reason; the order stands.
    #[error("order {order} cannot be cancelled: {reason}")]
    Refused {
        /// The order.
        order: String,
        /// Why its cancellation was refused.
        reason: String,
    },
    /// The store or the outbox failed.
    #[error(transparent)]
    Handler(#[from] HandlerError),
}

impl From<store::StoreError> for CancelError {
    fn from(e: store::StoreError) -> CancelError {
        CancelError::Handler(e.into())
    }
}

/// Cancels `customer`'s order `order`, at once if nothing was taken for it yet, by a
/// cancellation saga if it was; asked again, it is the same one cancellation.
pub async fn cancel(
    orders: &Orders,
    customer: Uuid,
    order: Uuid,
    trace: (&str, Option<&str>),
) -> Result<Cancellation, CancelError> {
    let id = order.to_string();
    let owner = store::query("SELECT customer_id FROM orders WHERE id = $1")
        .bind(&id)
        .fetch_optional(&orders.rt.store)
        .await?;
    if owner.map(|r| r.try_get::<String, _>("customer_id")).transpose()? != Some(customer.to_string()) {
        return Err(CancelError::NotFound(id));
    }
    let mut tx = orders.rt.store.begin().await?;
    // Sagas first, then the order: the order a reply of either flow locks them in. Everything
    // is read in this transaction, so a request holds one connection however long it waits.
    let stopped = orders.engine.stop(&mut tx, &id, BY_THE_CUSTOMER).await?;
    let earlier = orders.cancellations.load_locked(&mut tx, &saga_id(&id)).await?;
    let row =
        store::query("SELECT customer_id, email, status, total_cents, currency FROM orders WHERE id = $1 FOR UPDATE")
            .bind(&id)
            .fetch_one(&mut tx)
            .await?;
    let status = OrderStatus::parse(&row.try_get::<String, _>("status")?)?;
    match earlier.as_ref().map(|c| c.status) {
        Some(SagaStatus::Stuck) => return Err(CancelError::Stuck(id)),
        Some(SagaStatus::Compensated) => {
            let reason = earlier.and_then(|c| c.error).unwrap_or_else(|| "refused".into());
            return Err(CancelError::Refused { order: id, reason });
        }
        _ => {}
    }
    let answer = match (stopped, status) {
        (_, OrderStatus::Cancelled) => Cancellation::Already,
        (_, OrderStatus::Cancelling) | (Stopped::Undoing, _) => Cancellation::Accepted,
        (Stopped::Ended(SagaStatus::Stuck), _) => return Err(CancelError::Stuck(id)),
        (Stopped::PastPivot, OrderStatus::Pending) => {
            // The saga may have taken the stock for good: it finishes, then the cancellation
            // saga gives everything back (see `OrderSaga::finished`).
            store::query("UPDATE orders SET cancel_requested_at = $1 WHERE id = $2")
                .bind(now_millis())
                .bind(&id)
                .execute(&mut tx)
                .await?;
            Cancellation::Accepted
        }
        (_, OrderStatus::Confirmed) => {
            let context = CancelContext {
                order_id: order,
                customer_id: customer,
                email: row.try_get("email")?,
                total_cents: row
                    .try_get::<Option<i64>, _>("total_cents")?
                    .ok_or_else(|| HandlerError::Poison(format!("confirmed order {id} has no total")))?,
                currency: row
                    .try_get::<Option<String>, _>("currency")?
                    .ok_or_else(|| HandlerError::Poison(format!("confirmed order {id} has no currency")))?,
                announced: true,
            };
            start(&orders.cancellations, &mut tx, context, trace).await?;
            Cancellation::Accepted
        }
        // Pending with its saga ended or gone: it settles in the same transaction as its
        // saga, so this is an order whose saga is being moved right now.
        (_, OrderStatus::Pending) => Cancellation::Accepted,
    };
    orders.rt.outbox.commit(tx).await?;
    Ok(answer)
}

/// Marks the order cancelling and starts its cancellation saga, in the caller's transaction
/// (which holds the order's row), under `trace`: the correlation id and traceparent.
pub(crate) async fn start(
    engine: &SagaEngine<CancelFlow>,
    tx: &mut Tx,
    context: CancelContext,
    (correlation_id, traceparent): (&str, Option<&str>),
) -> Result<(), HandlerError> {
    let id = context.order_id.to_string();
    store::query("UPDATE orders SET status = $1, version = version + 1, updated_at = $2 WHERE id = $3")
        .bind(OrderStatus::Cancelling.as_str())
        .bind(now_millis())
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    engine
        .start_traced(tx, &saga_id(&id), context, correlation_id, traceparent)
        .await?;
    Ok(())
}
