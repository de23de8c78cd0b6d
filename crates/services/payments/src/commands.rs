//! The events and saga commands payments handles.

use bazaar_contracts::{types, OrderRef, Paid, ProcessPayment, UserRegistered};
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    outbox,
    saga::CommandHeader,
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use sqlx::Row;
use uuid::Uuid;

use crate::ledger;

/// Opens a wallet with the welcome credit for each new user.
#[derive(Debug, Clone, Copy)]
pub struct UserEvents {
    /// Credit for a new wallet (minor units).
    pub welcome_credit_cents: i64,
}

impl Handler for UserEvents {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if event.event_type != types::USER_REGISTERED {
                // Other user events are not ours to act on.
                return Ok(());
            }
            let user: UserRegistered = event.payload_as()?;
            ledger::open(tx, ledger::EXTERNAL, "USD").await?;
            let wallet = ledger::wallet(&user.user_id);
            if ledger::open(tx, &wallet, "USD").await? && self.welcome_credit_cents > 0 {
                ledger::transfer(
                    tx,
                    ledger::EXTERNAL,
                    &wallet,
                    self.welcome_credit_cents,
                    "deposit",
                    "welcome credit",
                )
                .await?;
            }
            Ok(())
        })
    }
}

/// Handles `payments.process` and `payments.refund`.
#[derive(Debug, Clone, Copy)]
pub struct PaymentCommands {
    /// Share of payments declined on purpose (fault drills).
    pub decline_rate: f64,
}

type Reply = Result<serde_json::Value, String>;

impl Handler for PaymentCommands {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let header = CommandHeader::of(event)?;
            let result = match event.event_type.as_str() {
                types::PROCESS_PAYMENT => self.process(tx, event.payload_as()?).await?,
                types::REFUND_PAYMENT => refund(tx, event.payload_as()?).await?,
                other => return Err(HandlerError::Poison(format!("unknown command type `{other}`"))),
            };
            let (topic, reply) = header.reply(event, "payments", result);
            Ok(outbox::add(tx, &topic, &reply).await?)
        })
    }
}

async fn payment(tx: &mut Tx<'static>, order: &str) -> Result<Option<(String, String)>, HandlerError> {
    let row = sqlx::query("SELECT id, status FROM payment WHERE order_id = $1")
        .bind(order)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => Some((r.try_get("id")?, r.try_get("status")?)),
        None => None,
    })
}

async fn record(
    tx: &mut Tx<'static>,
    cmd: &ProcessPayment,
    id: &str,
    amount: i64,
    status: &str,
    reason: Option<&str>,
) -> Result<(), HandlerError> {
    let now = now_millis();
    sqlx::query(
        "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
    )
    .bind(cmd.order_id.to_string())
    .bind(id)
    .bind(cmd.customer_id.to_string())
    .bind(amount)
    .bind(&cmd.currency)
    .bind(status)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PaymentCommands {
    /// Captures the order's amount from the customer's wallet, once.
    async fn process(&self, tx: &mut Tx<'static>, cmd: ProcessPayment) -> Result<Reply, HandlerError> {
        let order = cmd.order_id.to_string();
        match payment(tx, &order).await? {
            Some((id, status)) if status == "captured" => {
                return Ok(Ok(serde_json::json!(Paid {
                    payment_id: id.parse().unwrap_or_default()
                })));
            }
            Some((_, status)) => return Ok(Err(format!("payment for this order is already {status}"))),
            None => {}
        }
        if cmd.amount_cents <= 0 {
            return Ok(Err("amount must be positive".into()));
        }
        let wallet = ledger::wallet(&cmd.customer_id);
        if !ledger::exists(tx, &wallet).await? {
            // The user.registered event may still be on its way: retry before giving up.
            return Err(HandlerError::Transient(format!(
                "no wallet yet for customer {}",
                cmd.customer_id
            )));
        }
        let id = Uuid::now_v7().to_string();
        let balance = ledger::balance(&mut **tx, &wallet).await?;
        let declined = if balance < cmd.amount_cents {
            Some(format!(
                "insufficient funds: balance {balance}, amount {}",
                cmd.amount_cents
            ))
        } else if self.decline_rate > 0.0 && rand::random::<f64>() < self.decline_rate {
            Some("card declined (simulated)".to_string())
        } else {
            None
        };
        if let Some(reason) = declined {
            record(tx, &cmd, &id, cmd.amount_cents, "failed", Some(&reason)).await?;
            metrics::counter!("bazaar_payments_total", "outcome" => "declined").increment(1);
            return Ok(Err(reason));
        }
        ledger::open(tx, ledger::REVENUE, &cmd.currency).await?;
        ledger::transfer(tx, &wallet, ledger::REVENUE, cmd.amount_cents, "payment", &order).await?;
        record(tx, &cmd, &id, cmd.amount_cents, "captured", None).await?;
        metrics::counter!("bazaar_payments_total", "outcome" => "captured").increment(1);
        Ok(Ok(serde_json::json!(Paid {
            payment_id: id.parse().unwrap_or_default()
        })))
    }
}

/// Refunds a captured payment; leaves a `voided` tombstone when none was taken yet, so a
/// late `payments.process` for the order is refused.
async fn refund(tx: &mut Tx<'static>, cmd: OrderRef) -> Result<Reply, HandlerError> {
    let order = cmd.order_id.to_string();
    let now = now_millis();
    match payment(tx, &order).await? {
        None => {
            sqlx::query(
                "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, created_at, updated_at)
                 VALUES ($1, $2, '', 0, 'USD', 'voided', 'refund arrived before payment', $3, $3)",
            )
            .bind(&order)
            .bind(Uuid::now_v7().to_string())
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        Some((_, status)) if status == "captured" => {
            let row = sqlx::query("SELECT customer_id, amount_cents FROM payment WHERE order_id = $1")
                .bind(&order)
                .fetch_one(&mut **tx)
                .await?;
            let customer: String = row.try_get("customer_id")?;
            let amount: i64 = row.try_get("amount_cents")?;
            let wallet = format!("customer:{customer}");
            ledger::transfer(tx, ledger::REVENUE, &wallet, amount, "refund", &order).await?;
            sqlx::query("UPDATE payment SET status = 'refunded', updated_at = $1 WHERE order_id = $2")
                .bind(now)
                .bind(&order)
                .execute(&mut **tx)
                .await?;
            metrics::counter!("bazaar_payments_total", "outcome" => "refunded").increment(1);
        }
        Some(_) => {}
    }
    Ok(Ok(serde_json::Value::Null))
}
