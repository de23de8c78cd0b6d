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

use crate::{
    ledger,
    provider::{ChargeRequest, PaymentProvider},
};

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
#[derive(Debug, Clone, Default)]
pub struct PaymentCommands {
    /// Share of payments declined on purpose (fault drills).
    pub decline_rate: f64,
    /// The outside provider that takes the money, if one is configured; without one the
    /// wallet alone pays.
    pub provider: Option<PaymentProvider>,
}

type Reply = Result<serde_json::Value, String>;

impl Handler for PaymentCommands {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let header = CommandHeader::of(event)?;
            let result = match event.event_type.as_str() {
                types::PROCESS_PAYMENT => self.process(tx, event.payload_as()?).await?,
                types::REFUND_PAYMENT => self.refund(tx, event.payload_as()?).await?,
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

/// What became of a payment, as stored.
struct Outcome<'a> {
    status: &'a str,
    reason: Option<&'a str>,
    provider_charge_id: Option<&'a str>,
}

async fn record(
    tx: &mut Tx<'static>,
    cmd: &ProcessPayment,
    id: &str,
    amount: i64,
    outcome: Outcome<'_>,
) -> Result<(), HandlerError> {
    let now = now_millis();
    sqlx::query(
        "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, provider_charge_id, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(cmd.order_id.to_string())
    .bind(id)
    .bind(cmd.customer_id.to_string())
    .bind(amount)
    .bind(&cmd.currency)
    .bind(outcome.status)
    .bind(outcome.reason)
    .bind(outcome.provider_charge_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PaymentCommands {
    /// Captures the order's amount from the customer's wallet (and at the provider when one
    /// is configured), once.
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
        // Lock the wallet's row first, so two payments of one customer on PostgreSQL (READ
        // COMMITTED) cannot both spend the same balance. SQLite's write transaction already
        // serialises them.
        sqlx::query("UPDATE account SET currency = currency WHERE id = $1")
            .bind(&wallet)
            .execute(&mut **tx)
            .await?;
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
        // Only a payment the wallet can cover reaches the provider.
        let charged = match (declined, &self.provider) {
            (Some(reason), _) => Err(reason),
            (None, None) => Ok(None),
            (None, Some(provider)) => provider_charge(provider, &cmd).await?,
        };
        let provider_charge_id = match charged {
            Ok(charge_id) => charge_id,
            Err(reason) => {
                let outcome = Outcome {
                    status: "failed",
                    reason: Some(&reason),
                    provider_charge_id: None,
                };
                record(tx, &cmd, &id, cmd.amount_cents, outcome).await?;
                metrics::counter!("bazaar_payments_total", "outcome" => "declined").increment(1);
                return Ok(Err(reason));
            }
        };
        // The ledger moves the money even when a provider took it, so wallets, revenue and
        // deposits still balance for the audit.
        ledger::open(tx, ledger::REVENUE, &cmd.currency).await?;
        ledger::transfer(tx, &wallet, ledger::REVENUE, cmd.amount_cents, "payment", &order).await?;
        let outcome = Outcome {
            status: "captured",
            reason: None,
            provider_charge_id: provider_charge_id.as_deref(),
        };
        record(tx, &cmd, &id, cmd.amount_cents, outcome).await?;
        metrics::counter!("bazaar_payments_total", "outcome" => "captured").increment(1);
        Ok(Ok(serde_json::json!(Paid {
            payment_id: id.parse().unwrap_or_default()
        })))
    }

    /// Refunds a captured payment (at the provider too when it took the money); leaves a
    /// `voided` tombstone when none was taken yet, so a late `payments.process` for the order
    /// is refused.
    async fn refund(&self, tx: &mut Tx<'static>, cmd: OrderRef) -> Result<Reply, HandlerError> {
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
                let row = sqlx::query(
                    "SELECT customer_id, amount_cents, provider_charge_id FROM payment WHERE order_id = $1",
                )
                .bind(&order)
                .fetch_one(&mut **tx)
                .await?;
                let customer: String = row.try_get("customer_id")?;
                let amount: i64 = row.try_get("amount_cents")?;
                if let Some(charge) = row.try_get::<Option<String>, _>("provider_charge_id")? {
                    let Some(provider) = &self.provider else {
                        // Money taken outside can only go back outside: wait for the provider
                        // to be configured again rather than pretend it was returned.
                        return Err(HandlerError::Transient(format!(
                            "payment for order {order} was charged at the provider ({charge}) but none is configured"
                        )));
                    };
                    provider
                        .refund(&format!("refund-{order}"), &charge)
                        .await
                        .map_err(|e| HandlerError::Transient(e.to_string()))?;
                }
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
}

/// Charges `cmd` at the provider: `Ok(Ok(charge id))` when it took the money,
/// `Ok(Err(reason))` when it declined, and a transient error when it gave no answer, so the
/// command comes back later and the same idempotency key finds the same charge.
async fn provider_charge(
    provider: &PaymentProvider,
    cmd: &ProcessPayment,
) -> Result<Result<Option<String>, String>, HandlerError> {
    let order = cmd.order_id.to_string();
    let request = ChargeRequest {
        amount: cmd.amount_cents,
        currency: cmd.currency.clone(),
        customer: cmd.customer_id.to_string(),
        description: format!("bazaar order {order}"),
    };
    let charge = provider.charge(&order, &request).await.map_err(|e| {
        metrics::counter!("bazaar_payments_provider_errors_total").increment(1);
        HandlerError::Transient(e.to_string())
    })?;
    if charge.succeeded() {
        Ok(Ok(Some(charge.id)))
    } else {
        let why = charge.failure_message.unwrap_or_else(|| "no reason given".into());
        Ok(Err(format!("payment provider declined the charge: {why}")))
    }
}
