//! The order saga: reserveInventory -> processPayment -> confirmOrder, compensating in reverse.

use std::time::Duration;

use bazaar_contracts::{topics, types, OrderOutcome, ProcessPayment, ReserveStock};
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
    outbox,
    saga::{Action, SagaFlow, SagaState, SagaStatus, Step},
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// What the order saga carries from step to step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderContext {
    /// The order (also the saga id).
    pub order_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The customer's email, for the outcome notification.
    pub email: String,
    /// What was ordered.
    pub lines: Vec<bazaar_contracts::LineRequest>,
    /// Set by reserveInventory.
    #[serde(default)]
    pub total_cents: Option<i64>,
    /// Set by reserveInventory.
    #[serde(default)]
    pub currency: Option<String>,
}

/// The order saga's definition.
#[derive(Debug)]
pub struct OrderSaga {
    steps: Vec<Step>,
}

impl Default for OrderSaga {
    fn default() -> Self {
        Self::new()
    }
}

impl OrderSaga {
    /// The three steps of DESIGN.md.
    pub fn new() -> OrderSaga {
        let step = |name, topic, execute, compensate| Step {
            name,
            action: Action::Remote {
                topic,
                execute,
                compensate,
            },
            timeout: Duration::from_secs(10),
            max_attempts: 3,
        };
        OrderSaga {
            steps: vec![
                step(
                    "reserveInventory",
                    topics::INVENTORY_COMMANDS,
                    types::RESERVE_STOCK,
                    Some(types::RELEASE_STOCK),
                ),
                step(
                    "processPayment",
                    topics::PAYMENTS_COMMANDS,
                    types::PROCESS_PAYMENT,
                    Some(types::REFUND_PAYMENT),
                ),
                step("confirmOrder", topics::INVENTORY_COMMANDS, types::COMMIT_STOCK, None),
            ],
        }
    }
}

fn context(saga: &SagaState) -> Result<OrderContext, HandlerError> {
    serde_json::from_value(saga.context.clone())
        .map_err(|e| HandlerError::Poison(format!("order saga {} has a bad context: {e}", saga.id)))
}

impl SagaFlow for OrderSaga {
    fn kind(&self) -> &'static str {
        "order"
    }

    fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn command(&self, step: &Step, compensation: bool, ctx: &Value) -> Value {
        let order_id = ctx.get("orderId").cloned().unwrap_or(Value::Null);
        let by_order = || serde_json::json!({ "orderId": order_id });
        match (step.name, compensation) {
            ("reserveInventory", false) => match serde_json::from_value::<ReserveStock>(ctx.clone()) {
                Ok(cmd) => serde_json::to_value(cmd).unwrap_or_default(),
                Err(_) => by_order(),
            },
            ("processPayment", false) => {
                let cmd = serde_json::from_value::<OrderContext>(ctx.clone()).map(|c| ProcessPayment {
                    order_id: c.order_id,
                    customer_id: c.customer_id,
                    amount_cents: c.total_cents.unwrap_or(0),
                    currency: c.currency.unwrap_or_else(|| "USD".into()),
                });
                cmd.ok()
                    .and_then(|c| serde_json::to_value(c).ok())
                    .unwrap_or_else(by_order)
            }
            _ => by_order(),
        }
    }

    fn local<'a>(
        &'a self,
        _tx: &'a mut Tx<'static>,
        step: &'a Step,
        _saga: &'a SagaState,
    ) -> BoxFuture<'a, Result<Result<(), String>, HandlerError>> {
        Box::pin(async move { Ok(Err(format!("step {} has no local action", step.name))) })
    }

    fn finished<'a>(&'a self, tx: &'a mut Tx<'static>, saga: &'a SagaState) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let ctx = context(saga)?;
            let (status, event_type) = match saga.status {
                SagaStatus::Completed => ("confirmed", types::ORDER_CONFIRMED),
                SagaStatus::Compensated => ("cancelled", types::ORDER_CANCELLED),
                // A stuck saga leaves the order pending; the audit and metrics show it.
                _ => return Ok(()),
            };
            let reason = (status == "cancelled").then(|| saga.error.clone().unwrap_or_else(|| "cancelled".into()));
            let total = if status == "confirmed" {
                ctx.total_cents.unwrap_or(0)
            } else {
                0
            };
            let currency = ctx.currency.clone().unwrap_or_else(|| "USD".into());
            let updated = sqlx::query(
                "UPDATE orders SET status = $1, total_cents = $2, currency = $3, reason = $4, version = version + 1, updated_at = $5
                 WHERE id = $6 AND status = 'pending'",
            )
            .bind(status)
            // A cancelled order charged nothing, as its event says.
            .bind((status == "confirmed").then_some(total))
            .bind(&currency)
            .bind(reason.clone())
            .bind(now_millis())
            .bind(ctx.order_id.to_string())
            .execute(&mut **tx)
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
            let metadata = Metadata {
                correlation_id: saga.correlation_id.clone(),
                traceparent: saga.traceparent.clone(),
                source: "orders".into(),
                ..Metadata::default()
            };
            let event = Envelope::new(event_type, ctx.order_id.to_string(), outcome, metadata).with_version(2);
            outbox::add(tx, topics::ORDERS_EVENTS, &event).await?;
            metrics::counter!("bazaar_orders_finished_total", "status" => status).increment(1);
            Ok(())
        })
    }
}
