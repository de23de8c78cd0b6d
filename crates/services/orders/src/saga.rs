//! The order saga: reserveInventory -> processPayment -> commitStock, compensating in
//! reverse. Its steps are [`OrderStep`]; its context, [`OrderContext`], holds what the
//! customer asked for and what each participant reported, typed, so the payment step can
//! only charge what the reservation priced.

use bazaar_kit::store;
use std::{sync::Arc, time::Duration};

use bazaar_contracts::{
    roles, topics, types, LineRequest, OrderOutcome, OrderRef, Paid, ProcessPayment, ReserveStock, Reserved,
};
use bazaar_kit::{
    consumer::HandlerError,
    store::{now_millis, Tx},
};
use bazaar_saga::{SagaEngine, SagaFlow, SagaState, SagaStatus, SagaStep, Step};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    cancellation::{CancelContext, CancelFlow},
    OrderStatus,
};

/// The steps of the order saga (docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStep {
    /// Inventory reserves every line or none, and prices them; undone by a release.
    ReserveInventory,
    /// Payments takes the reservation's total from the customer; undone by a refund.
    ProcessPayment,
    /// Inventory turns the reservation into a sale: the pivot, retried until it answers.
    CommitStock,
}

impl SagaStep for OrderStep {
    fn name(self) -> &'static str {
        match self {
            OrderStep::ReserveInventory => "reserveInventory",
            OrderStep::ProcessPayment => "processPayment",
            OrderStep::CommitStock => "commitStock",
        }
    }
}

/// What the order saga carries from step to step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderContext {
    /// The order (also the saga id).
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The customer's email, for the outcome notification.
    pub email: String,
    /// What was ordered.
    pub lines: Vec<LineRequest>,
    /// What reserveInventory priced, once it has (its fields sit beside the others; the
    /// schema leaves them out, since a schema cannot say "all of these or none").
    #[serde(flatten, default)]
    #[schema(ignore)]
    pub reserved: Option<Reserved>,
    /// The payment processPayment took, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<Uuid>,
}

impl OrderContext {
    /// The context of a new order, before any step ran.
    pub fn new(order_id: Uuid, customer_id: Uuid, email: String, lines: Vec<LineRequest>) -> OrderContext {
        OrderContext {
            order_id,
            customer_id,
            email,
            lines,
            reserved: None,
            payment_id: None,
        }
    }
}

/// The order saga's definition.
pub struct OrderSaga {
    steps: [Step<OrderStep>; 3],
    /// Where an order the customer cancelled past the pivot goes once it completes.
    cancellations: Option<Arc<SagaEngine<CancelFlow>>>,
}

impl std::fmt::Debug for OrderSaga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderSaga")
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Default for OrderSaga {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks a reservation against what was ordered before its total is charged: the priced
/// quantities are the ordered ones, product by product, and the total is what the lines add
/// up to. Inventory owns prices, but the quantities and the sum are the saga's own to check.
fn check_reservation(ordered: &[LineRequest], reserved: &Reserved) -> Result<(), String> {
    let mut wanted: std::collections::BTreeMap<Uuid, i64> = std::collections::BTreeMap::new();
    for line in ordered {
        *wanted.entry(line.product_id).or_default() += line.quantity;
    }
    let mut priced: std::collections::BTreeMap<Uuid, i64> = std::collections::BTreeMap::new();
    let mut total: i64 = 0;
    for line in &reserved.priced_lines {
        if line.unit_price_cents < 0 || line.quantity < 1 {
            return Err(format!("line {} has a negative price or no quantity", line.product_id));
        }
        *priced.entry(line.product_id).or_default() += line.quantity;
        total = line
            .unit_price_cents
            .checked_mul(line.quantity)
            .and_then(|cents| total.checked_add(cents))
            .ok_or("the lines' total overflows")?;
    }
    if priced != wanted {
        return Err(format!("it priced {priced:?}, but the order is for {wanted:?}"));
    }
    if total != reserved.total_cents {
        return Err(format!(
            "its total is {} but its lines add up to {total}",
            reserved.total_cents
        ));
    }
    Ok(())
}

/// How long each step waits for its participant's reply before resending, unless set.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

impl OrderSaga {
    /// The three steps of the design map (docs/architecture.md), each waiting [`STEP_TIMEOUT`] for a reply.
    pub fn new() -> OrderSaga {
        OrderSaga::paced(STEP_TIMEOUT)
    }

    /// The three steps, each waiting `timeout` for a reply before resending.
    pub fn paced(timeout: Duration) -> OrderSaga {
        let step = |step, topic, participant, execute, compensate| Step {
            step,
            topic,
            participant,
            execute,
            compensate,
            timeout,
            max_attempts: 3,
        };
        OrderSaga {
            cancellations: None,
            steps: [
                step(
                    OrderStep::ReserveInventory,
                    topics::INVENTORY_COMMANDS,
                    roles::INVENTORY,
                    types::RESERVE_STOCK,
                    Some(types::RELEASE_STOCK),
                ),
                step(
                    OrderStep::ProcessPayment,
                    topics::PAYMENTS_COMMANDS,
                    roles::PAYMENTS,
                    types::PROCESS_PAYMENT,
                    Some(types::REFUND_PAYMENT),
                ),
                step(
                    OrderStep::CommitStock,
                    topics::INVENTORY_COMMANDS,
                    roles::INVENTORY,
                    types::COMMIT_STOCK,
                    None,
                ),
            ],
        }
    }
}

impl OrderSaga {
    /// The saga handing orders cancelled past its pivot to `engine` once they complete.
    pub fn with_cancellations(mut self, engine: Arc<SagaEngine<CancelFlow>>) -> OrderSaga {
        self.cancellations = Some(engine);
        self
    }

    /// Hands a completed order whose customer asked to cancel it past the pivot to its
    /// cancellation saga, unannounced; false when nobody asked. The order's row is locked.
    async fn hand_to_cancellation(
        &self,
        tx: &mut Tx,
        saga: &SagaState<OrderContext>,
        reserved: &Reserved,
    ) -> Result<bool, HandlerError> {
        let ctx = &saga.context;
        let asked = store::query("SELECT cancel_requested_at FROM orders WHERE id = $1 AND status = $2 FOR UPDATE")
            .bind(ctx.order_id.to_string())
            .bind(OrderStatus::Pending.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<Option<i64>, _>("cancel_requested_at"))
            .transpose()?
            .flatten();
        if asked.is_none() {
            return Ok(false);
        }
        let engine = self.cancellations.as_ref().ok_or_else(|| {
            HandlerError::Poison(format!(
                "order {} was cancelled, but no cancellation flow runs",
                ctx.order_id
            ))
        })?;
        store::query("UPDATE orders SET total_cents = $1, currency = $2 WHERE id = $3")
            .bind(reserved.total_cents)
            .bind(&reserved.currency)
            .bind(ctx.order_id.to_string())
            .execute(&mut *tx)
            .await?;
        let context = CancelContext {
            order_id: ctx.order_id,
            customer_id: ctx.customer_id,
            email: ctx.email.clone(),
            total_cents: reserved.total_cents,
            currency: reserved.currency.clone(),
            announced: false,
        };
        let trace = (saga.correlation_id.as_str(), saga.traceparent.as_deref());
        crate::cancellation::start(engine, tx, context, trace).await?;
        Ok(true)
    }
}

fn json(value: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

impl SagaFlow for OrderSaga {
    type Step = OrderStep;
    type Context = OrderContext;

    fn kind(&self) -> &'static str {
        "order"
    }

    fn steps(&self) -> &[Step<OrderStep>] {
        &self.steps
    }

    fn command(&self, step: OrderStep, compensation: bool, ctx: &OrderContext) -> Result<Value, String> {
        let by_order = OrderRef { order_id: ctx.order_id };
        match (step, compensation) {
            (OrderStep::ReserveInventory, false) => json(ReserveStock {
                order_id: ctx.order_id,
                lines: ctx.lines.clone(),
            }),
            (OrderStep::ProcessPayment, false) => {
                let reserved = ctx
                    .reserved
                    .as_ref()
                    .ok_or("no reservation is recorded, so the amount to charge is unknown")?;
                json(ProcessPayment {
                    order_id: ctx.order_id,
                    customer_id: ctx.customer_id,
                    amount_cents: reserved.total_cents,
                    currency: reserved.currency.clone(),
                })
            }
            // Release, refund and commit name the order and nothing else.
            (OrderStep::ReserveInventory | OrderStep::ProcessPayment, true) | (OrderStep::CommitStock, _) => {
                json(by_order)
            }
        }
    }

    fn record(&self, step: OrderStep, ctx: &mut OrderContext, data: Value) -> Result<(), String> {
        match step {
            OrderStep::ReserveInventory => {
                let reserved = serde_json::from_value::<Reserved>(data).map_err(|e| e.to_string())?;
                check_reservation(&ctx.lines, &reserved)?;
                ctx.reserved = Some(reserved);
            }
            OrderStep::ProcessPayment => {
                ctx.payment_id = Some(
                    serde_json::from_value::<Paid>(data)
                        .map_err(|e| e.to_string())?
                        .payment_id,
                );
            }
            // The commit reports nothing the saga needs.
            OrderStep::CommitStock => {}
        }
        Ok(())
    }

    /// One piece: one end of an order saga in the saga's transaction; status, total and reason
    /// feed both the update guarded by `status = pending` and the outcome event, which is
    /// added to the outbox and counted only when that update changed a row.
    fn finished<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga: &'a SagaState<OrderContext>,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let ctx = &saga.context;
            let (status, event_type, total, reason) = match saga.status {
                SagaStatus::Completed => {
                    let reserved = ctx.reserved.as_ref().ok_or_else(|| {
                        HandlerError::Poison(format!(
                            "order saga {} completed without a recorded reservation",
                            saga.id
                        ))
                    })?;
                    if self.hand_to_cancellation(tx, saga, reserved).await? {
                        return Ok(());
                    }
                    (
                        OrderStatus::Confirmed,
                        types::ORDER_CONFIRMED,
                        reserved.total_cents,
                        None,
                    )
                }
                // A cancelled order charged nothing, as its event says. A customer's stop reads
                // as theirs, not as the step the saga was at.
                SagaStatus::Compensated => {
                    let reason = match saga.error.as_deref() {
                        Some(e) if e.ends_with(crate::cancellation::BY_THE_CUSTOMER) => {
                            crate::cancellation::BY_THE_CUSTOMER.to_string()
                        }
                        other => other.unwrap_or("cancelled").to_string(),
                    };
                    (OrderStatus::Cancelled, types::ORDER_CANCELLED, 0, Some(reason))
                }
                // A stuck saga leaves the order pending; the audit and metrics show it.
                _ => return Ok(()),
            };
            let currency = ctx.reserved.as_ref().map(|r| r.currency.clone());
            let now = now_millis();
            let updated = store::query(
                "UPDATE orders SET status = $1, total_cents = $2, currency = $3, reason = $4, version = version + 1, updated_at = $5,
                 confirmed_at = $8 WHERE id = $6 AND status = $7",
            )
            .bind(status.as_str())
            .bind((status == OrderStatus::Confirmed).then_some(total))
            .bind(currency.clone())
            .bind(reason.clone())
            .bind(now)
            .bind(ctx.order_id.to_string())
            .bind(OrderStatus::Pending.as_str())
            .bind((status == OrderStatus::Confirmed).then_some(now))
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 0 {
                // Already settled (a saga retried by an operator after going stuck): announce once.
                return Ok(());
            }
            let outcome = OrderOutcome {
                order_id: ctx.order_id,
                customer_id: ctx.customer_id,
                email: ctx.email.clone(),
                total_cents: total,
                currency,
                reason,
            };
            crate::cancellation::announce(tx, saga, event_type, outcome).await?;
            metrics::counter!("bazaar_orders_finished_total", "status" => status.as_str()).increment(1);
            // Placed -> outcome: the order id is a UUIDv7, so it carries when it was placed.
            if let Some(placed) = ctx.order_id.get_timestamp() {
                let (secs, nanos) = placed.to_unix();
                let placed_ms = i64::try_from(secs).unwrap_or(i64::MAX) * 1000 + i64::from(nanos / 1_000_000);
                let took = (now_millis() - placed_ms).max(0) as f64 / 1000.0;
                metrics::histogram!("bazaar_order_saga_seconds", "status" => status.as_str()).record(took);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazaar_contracts::PricedLine;

    fn context() -> OrderContext {
        let line = LineRequest {
            product_id: Uuid::nil(),
            quantity: 2,
        };
        OrderContext::new(Uuid::now_v7(), Uuid::now_v7(), "ann@example.com".into(), vec![line])
    }

    fn reserved() -> Reserved {
        Reserved {
            priced_lines: vec![PricedLine {
                product_id: Uuid::nil(),
                quantity: 2,
                unit_price_cents: 250,
            }],
            total_cents: 500,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn the_payment_charges_what_the_reservation_priced() {
        let saga = OrderSaga::new();
        let mut ctx = context();
        saga.record(OrderStep::ReserveInventory, &mut ctx, json(reserved()).unwrap())
            .unwrap();
        let cmd: ProcessPayment =
            serde_json::from_value(saga.command(OrderStep::ProcessPayment, false, &ctx).unwrap()).unwrap();
        assert_eq!((cmd.amount_cents, cmd.currency.as_str()), (500, "EUR"));
        assert_eq!(cmd.customer_id, ctx.customer_id);
    }

    #[test]
    fn a_reservation_whose_total_or_quantities_do_not_fit_the_order_is_refused() {
        let saga = OrderSaga::new();
        let mut cheap = reserved();
        cheap.total_cents = 1;
        let mut fewer = reserved();
        fewer.priced_lines[0].quantity = 1;
        fewer.total_cents = 250;
        let mut other = reserved();
        other.priced_lines[0].product_id = Uuid::now_v7();
        for (what, forged) in [("total", cheap), ("quantities", fewer), ("products", other)] {
            let mut ctx = context();
            let refused = saga.record(OrderStep::ReserveInventory, &mut ctx, json(forged).unwrap());
            assert!(refused.is_err(), "a reservation with other {what} was recorded");
            assert_eq!(ctx.reserved, None);
        }
    }

    #[test]
    fn a_payment_without_a_reservation_is_an_error_not_a_zero_charge() {
        let err = OrderSaga::new()
            .command(OrderStep::ProcessPayment, false, &context())
            .unwrap_err();
        assert!(err.contains("amount to charge is unknown"), "{err}");
    }

    #[test]
    fn a_reply_that_does_not_fit_its_step_is_refused() {
        let saga = OrderSaga::new();
        let mut ctx = context();
        assert!(saga
            .record(
                OrderStep::ReserveInventory,
                &mut ctx,
                serde_json::json!({"totalCents": "lots"})
            )
            .is_err());
        assert!(saga.record(OrderStep::ProcessPayment, &mut ctx, Value::Null).is_err());
        assert_eq!(ctx, context_with_ids(&ctx), "nothing was recorded");
    }

    fn context_with_ids(ctx: &OrderContext) -> OrderContext {
        OrderContext::new(ctx.order_id, ctx.customer_id, ctx.email.clone(), ctx.lines.clone())
    }

    #[test]
    fn compensations_and_the_commit_name_only_the_order() {
        let saga = OrderSaga::new();
        let ctx = context();
        for (step, compensation) in [
            (OrderStep::ReserveInventory, true),
            (OrderStep::ProcessPayment, true),
            (OrderStep::CommitStock, false),
        ] {
            let cmd: OrderRef = serde_json::from_value(saga.command(step, compensation, &ctx).unwrap()).unwrap();
            assert_eq!(cmd.order_id, ctx.order_id);
        }
    }

    #[test]
    fn a_context_stored_by_the_untyped_engine_still_reads() {
        // Wave 1 merged reply data into the context's top level; the flattened reservation
        // reads the same keys, so sagas in flight across an upgrade keep their amounts.
        let stored = serde_json::json!({
            "orderId": Uuid::nil(), "customerId": Uuid::nil(), "email": "a@b.c",
            "lines": [{"productId": Uuid::nil(), "quantity": 1}],
            "pricedLines": [{"productId": Uuid::nil(), "quantity": 1, "unitPriceCents": 250}],
            "totalCents": 250, "currency": "USD"
        });
        let ctx: OrderContext = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(ctx.reserved.as_ref().map(|r| r.total_cents), Some(250));
        let fresh: OrderContext = serde_json::from_value(
            serde_json::json!({"orderId": Uuid::nil(), "customerId": Uuid::nil(), "email": "a@b.c", "lines": []}),
        )
        .unwrap();
        assert_eq!(fresh.reserved, None);
    }
}
