//! The events and saga commands payments handles.

use bazaar_contracts::{types, OrderRef, Paid, ProcessPayment, UserRegistered};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    saga::{Participant, Verdict},
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::{ledger, provider::PaymentProvider, PaymentStatus};

/// Opens a wallet with the welcome credit for each new user.
#[derive(Debug, Clone, Copy)]
pub struct UserEvents {
    /// Credit for a new wallet (minor units).
    pub welcome_credit_cents: i64,
}

impl Handler for UserEvents {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
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

impl Participant for PaymentCommands {
    fn act<'a>(&'a self, tx: &'a mut Tx, command: &'a Envelope) -> BoxFuture<'a, Result<Verdict, HandlerError>> {
        Box::pin(async move {
            match command.event_type.as_str() {
                types::PROCESS_PAYMENT => self.process(tx, command.payload_as()?, command).await,
                types::REFUND_PAYMENT => self.refund(tx, command.payload_as()?, command).await,
                other => Err(HandlerError::Poison(format!("unknown command type `{other}`"))),
            }
        })
    }
}

async fn payment(tx: &mut Tx, order: &str) -> Result<Option<(Uuid, PaymentStatus)>, HandlerError> {
    let row = store::query("SELECT id, status FROM payment WHERE order_id = $1")
        .bind(order)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(match row {
        Some(r) => {
            let id: String = r.try_get("id")?;
            let id = id
                .parse()
                .map_err(|_| HandlerError::Poison(format!("payment of order {order} has a bad id `{id}`")))?;
            Some((id, PaymentStatus::parse(&r.try_get::<String, _>("status")?)?))
        }
        None => None,
    })
}

/// What became of a payment, as stored.
struct Outcome<'a> {
    status: PaymentStatus,
    reason: Option<&'a str>,
    provider_charge_id: Option<&'a str>,
}

async fn record(
    tx: &mut Tx,
    cmd: &ProcessPayment,
    id: &str,
    amount: i64,
    outcome: Outcome<'_>,
) -> Result<(), HandlerError> {
    let now = now_millis();
    store::query(
        "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, provider_charge_id, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(cmd.order_id.to_string())
    .bind(id)
    .bind(cmd.customer_id.to_string())
    .bind(amount)
    .bind(&cmd.currency)
    .bind(outcome.status.as_str())
    .bind(outcome.reason)
    .bind(outcome.provider_charge_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl PaymentCommands {
    /// Captures the order's amount from the customer's wallet, once. With a provider, the
    /// amount is put on hold and a `charging` intent recorded instead, and [`crate::settle`]
    /// calls the provider outside any transaction and answers ([`Verdict::Later`] here).
    async fn process(&self, tx: &mut Tx, cmd: ProcessPayment, event: &Envelope) -> Result<Verdict, HandlerError> {
        let order = cmd.order_id.to_string();
        match payment(tx, &order).await? {
            Some((id, PaymentStatus::Captured)) => return Ok(Verdict::done(&Paid { payment_id: id })),
            // Being charged: the settler answers.
            Some((_, PaymentStatus::Charging)) => return Ok(Verdict::Later),
            // A refusal is final for the order: a resent command gets the first answer.
            Some((_, PaymentStatus::Failed)) => {
                let reason: Option<String> = store::query("SELECT reason FROM payment WHERE order_id = $1")
                    .bind(&order)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("reason")?;
                return Ok(Verdict::refused(
                    reason.unwrap_or_else(|| "payment for this order is already failed".into()),
                ));
            }
            Some((_, status)) => {
                return Ok(Verdict::refused(format!(
                    "payment for this order is already {}",
                    status.as_str()
                )))
            }
            None => {}
        }
        if cmd.amount_cents <= 0 {
            return Ok(Verdict::refused("amount must be positive"));
        }
        let wallet = ledger::wallet(&cmd.customer_id);
        let Some((held, balance)) = ledger::lock(tx, &wallet).await? else {
            // The user.registered event may still be on its way: retry before giving up.
            return Err(HandlerError::Transient(format!(
                "no wallet yet for customer {}",
                cmd.customer_id
            )));
        };
        let id = Uuid::now_v7();
        let declined = if cmd.currency != held {
            // Never take one currency's minor units as another's.
            Some(format!("the wallet holds {held}; it cannot pay in {}", cmd.currency))
        } else if balance < cmd.amount_cents {
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
            let outcome = Outcome {
                status: PaymentStatus::Failed,
                reason: Some(&reason),
                provider_charge_id: None,
            };
            record(tx, &cmd, &id.to_string(), cmd.amount_cents, outcome).await?;
            metrics::counter!("bazaar_payments_total", "outcome" => "declined").increment(1);
            return Ok(Verdict::Refused(reason));
        }
        if self.provider.is_some() {
            // Hold the amount and record the intent; the provider is called after this commits.
            ledger::open(tx, ledger::HOLDS, &cmd.currency).await?;
            ledger::transfer(tx, &wallet, ledger::HOLDS, cmd.amount_cents, "hold", &order).await?;
            let outcome = Outcome {
                status: PaymentStatus::Charging,
                reason: None,
                provider_charge_id: None,
            };
            record(tx, &cmd, &id.to_string(), cmd.amount_cents, outcome).await?;
            store::query("UPDATE payment SET command = $1, next_try_at = $2 WHERE order_id = $3")
                .bind(String::from_utf8_lossy(&event.to_vec()).into_owned())
                .bind(now_millis())
                .bind(&order)
                .execute(&mut *tx)
                .await?;
            return Ok(Verdict::Later);
        }
        ledger::open(tx, ledger::REVENUE, &cmd.currency).await?;
        ledger::transfer(tx, &wallet, ledger::REVENUE, cmd.amount_cents, "payment", &order).await?;
        let outcome = Outcome {
            status: PaymentStatus::Captured,
            reason: None,
            provider_charge_id: None,
        };
        record(tx, &cmd, &id.to_string(), cmd.amount_cents, outcome).await?;
        metrics::counter!("bazaar_payments_total", "outcome" => "captured").increment(1);
        Ok(Verdict::done(&Paid { payment_id: id }))
    }

    /// Refunds a captured payment; leaves a `voided` tombstone when none was taken yet, so a
    /// late `payments.process` for the order is refused. Money the provider holds or took is
    /// given back by [`crate::settle`], which then answers ([`Verdict::Later`] here).
    async fn refund(&self, tx: &mut Tx, cmd: OrderRef, event: &Envelope) -> Result<Verdict, HandlerError> {
        let order = cmd.order_id.to_string();
        let now = now_millis();
        let hand_to_settler = |status: PaymentStatus| {
            store::query(
                "UPDATE payment SET status = $1, refund_command = $2, next_try_at = $3, updated_at = $3 WHERE order_id = $4",
            )
            .bind(status.as_str())
            .bind(String::from_utf8_lossy(&event.to_vec()).into_owned())
            .bind(now)
            .bind(order.clone())
        };
        match payment(tx, &order).await? {
            None => {
                store::query(
                    "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, created_at, updated_at)
                     VALUES ($1, $2, '', 0, 'USD', $4, 'refund arrived before payment', $3, $3)",
                )
                .bind(&order)
                .bind(Uuid::now_v7().to_string())
                .bind(now)
                .bind(PaymentStatus::Voided.as_str())
                .execute(&mut *tx)
                .await?;
            }
            // The provider may or may not have taken it: the settler finds out and undoes it.
            Some((_, PaymentStatus::Charging)) => {
                hand_to_settler(PaymentStatus::Voiding).execute(&mut *tx).await?;
                return Ok(Verdict::Later);
            }
            Some((_, PaymentStatus::Voiding | PaymentStatus::Refunding)) => return Ok(Verdict::Later),
            Some((_, PaymentStatus::Captured)) => {
                let row = store::query(
                    "SELECT customer_id, amount_cents, provider_charge_id FROM payment WHERE order_id = $1",
                )
                .bind(&order)
                .fetch_one(&mut *tx)
                .await?;
                if row.try_get::<Option<String>, _>("provider_charge_id")?.is_some() {
                    if self.provider.is_none() {
                        // Money taken outside can only go back outside: wait for the provider
                        // to be configured again rather than pretend it was returned.
                        return Err(HandlerError::Transient(format!(
                            "payment for order {order} was charged at the provider but none is configured"
                        )));
                    }
                    hand_to_settler(PaymentStatus::Refunding).execute(&mut *tx).await?;
                    return Ok(Verdict::Later);
                }
                let customer: String = row.try_get("customer_id")?;
                let amount: i64 = row.try_get("amount_cents")?;
                let wallet = format!("customer:{customer}");
                ledger::transfer(tx, ledger::REVENUE, &wallet, amount, "refund", &order).await?;
                store::query("UPDATE payment SET status = $3, updated_at = $1 WHERE order_id = $2")
                    .bind(now)
                    .bind(&order)
                    .bind(PaymentStatus::Refunded.as_str())
                    .execute(&mut *tx)
                    .await?;
                metrics::counter!("bazaar_payments_total", "outcome" => "refunded").increment(1);
            }
            // Failed, voided or refunded: nothing is held.
            Some((_, PaymentStatus::Failed | PaymentStatus::Voided | PaymentStatus::Refunded)) => {}
        }
        Ok(Verdict::done_empty())
    }
}
