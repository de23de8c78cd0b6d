//! The events and saga commands payments handles.

use bazaar_contracts::{types, OrderRef, Paid, ProcessPayment, UserRegistered};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    store::{now_millis, Tx},
};
use bazaar_saga::{Participant, Verdict};
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

/// An order's payment row, as a command decides on it.
struct Payment {
    id: Uuid,
    status: PaymentStatus,
    customer: String,
    amount: i64,
    reason: Option<String>,
    provider_charge_id: Option<String>,
}

impl Payment {
    /// The answer a `payments.process` gets once the payment exists: the first answer again.
    fn answer_to_process(self) -> Verdict {
        match self.status {
            PaymentStatus::Captured => Verdict::done(&Paid { payment_id: self.id }),
            // Being charged: the settler answers.
            PaymentStatus::Charging => Verdict::Later,
            // A refusal is final for the order: a resent command gets the first answer.
            PaymentStatus::Failed => Verdict::Refused(
                self.reason
                    .unwrap_or_else(|| "payment for this order is already failed".into()),
            ),
            status => Verdict::refused(format!("payment for this order is already {}", status.as_str())),
        }
    }
}

/// The order's payment, locked until the transaction ends: a second copy of a command (or
/// a crossing one) waits and then sees what the first did.
async fn payment(tx: &mut Tx, order: &str) -> Result<Option<Payment>, HandlerError> {
    let row = store::query(
        "SELECT id, status, customer_id, amount_cents, reason, provider_charge_id FROM payment
         WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let id: String = r.try_get("id")?;
    Ok(Some(Payment {
        id: id
            .parse()
            .map_err(|_| HandlerError::Poison(format!("payment of order {order} has a bad id `{id}`")))?,
        status: PaymentStatus::parse(&r.try_get::<String, _>("status")?)?,
        customer: r.try_get("customer_id")?,
        amount: r.try_get("amount_cents")?,
        reason: r.try_get("reason")?,
        provider_charge_id: r.try_get("provider_charge_id")?,
    }))
}

/// The payment a lost claim found in place.
async fn decided(tx: &mut Tx, order: &str) -> Result<Payment, HandlerError> {
    payment(tx, order)
        .await?
        .ok_or_else(|| HandlerError::Transient(format!("the payment of order {order} vanished after a lost claim")))
}

/// Inserts the order's payment row unless one exists; false when it did (then nothing was
/// written). On PostgreSQL the insert waits for a transaction that inserted it and has not
/// ended, so the caller then reads the row that transaction left. Every command claims the
/// order's row before it moves money, so copies and crossing commands queue on it.
async fn claim(
    tx: &mut Tx,
    order: &str,
    id: Uuid,
    payer: Payer<'_>,
    outcome: Outcome<'_>,
) -> Result<bool, HandlerError> {
    let now = now_millis();
    let done = store::query(
        "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order)
    .bind(id.to_string())
    .bind(payer.customer)
    .bind(payer.amount)
    .bind(payer.currency)
    .bind(outcome.status.as_str())
    .bind(outcome.reason)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Who pays how much of what, as stored.
struct Payer<'a> {
    customer: &'a str,
    amount: i64,
    currency: &'a str,
}

/// What became of a payment, as stored.
struct Outcome<'a> {
    status: PaymentStatus,
    reason: Option<&'a str>,
}

/// Records the decision on the payment row this transaction claimed; `command` is the
/// envelope the settler answers later, for a charge handed to the provider.
async fn decide(tx: &mut Tx, order: &str, outcome: Outcome<'_>, command: Option<String>) -> Result<(), HandlerError> {
    let now = now_millis();
    store::query(
        "UPDATE payment SET status = $1, reason = $2, command = $3, next_try_at = $4, updated_at = $5 WHERE order_id = $6",
    )
    .bind(outcome.status.as_str())
    .bind(outcome.reason)
    .bind(command)
    .bind(command_due(now, outcome.status))
    .bind(now)
    .bind(order)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// When the settler should look at a payment: now for one being charged, never otherwise.
fn command_due(now: i64, status: PaymentStatus) -> Option<i64> {
    (status == PaymentStatus::Charging).then_some(now)
}

/// Marks a captured (or refunding) payment refunded, counting the refund against what was
/// captured: the table refuses a second one.
pub(crate) async fn mark_refunded(tx: &mut Tx, order: &str) -> Result<(), HandlerError> {
    let done = store::query(
        "UPDATE payment SET status = $1, refunded_cents = refunded_cents + amount_cents, updated_at = $2
         WHERE order_id = $3 AND status IN ($4, $5)",
    )
    .bind(PaymentStatus::Refunded.as_str())
    .bind(now_millis())
    .bind(order)
    .bind(PaymentStatus::Captured.as_str())
    .bind(PaymentStatus::Refunding.as_str())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(HandlerError::Transient(format!(
            "the payment of order {order} was no longer captured when its refund was recorded"
        )));
    }
    Ok(())
}

impl PaymentCommands {
    /// Captures the order's amount from the customer's wallet, once. With a provider, the
    /// amount is put on hold and a `charging` intent recorded instead, and [`crate::settle`]
    /// calls the provider outside any transaction and answers ([`Verdict::Later`] here).
    async fn process(&self, tx: &mut Tx, cmd: ProcessPayment, event: &Envelope) -> Result<Verdict, HandlerError> {
        let order = cmd.order_id.to_string();
        if cmd.amount_cents <= 0 {
            return Ok(Verdict::refused("amount must be positive"));
        }
        let customer = cmd.customer_id.to_string();
        // Never committed as such: the decision below overwrites it in this transaction.
        let deciding = Outcome {
            status: PaymentStatus::Failed,
            reason: Some("being decided"),
        };
        let id = Uuid::now_v7();
        let payer = Payer {
            customer: &customer,
            amount: cmd.amount_cents,
            currency: &cmd.currency,
        };
        if !claim(tx, &order, id, payer, deciding).await? {
            return Ok(decided(tx, &order).await?.answer_to_process());
        }
        let wallet = ledger::wallet(&cmd.customer_id);
        let Some((held, balance)) = ledger::lock(tx, &wallet).await? else {
            // The user.registered event may still be on its way: retry before giving up.
            return Err(HandlerError::Transient(format!(
                "no wallet yet for customer {}",
                cmd.customer_id
            )));
        };
        if let Some(reason) = self.decline(&cmd, &held, balance) {
            let outcome = Outcome {
                status: PaymentStatus::Failed,
                reason: Some(&reason),
            };
            decide(tx, &order, outcome, None).await?;
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
            };
            let command = String::from_utf8_lossy(&event.to_vec()).into_owned();
            decide(tx, &order, outcome, Some(command)).await?;
            return Ok(Verdict::Later);
        }
        ledger::open(tx, ledger::REVENUE, &cmd.currency).await?;
        ledger::transfer(tx, &wallet, ledger::REVENUE, cmd.amount_cents, "payment", &order).await?;
        let outcome = Outcome {
            status: PaymentStatus::Captured,
            reason: None,
        };
        decide(tx, &order, outcome, None).await?;
        metrics::counter!("bazaar_payments_total", "outcome" => "captured").increment(1);
        Ok(Verdict::done(&Paid { payment_id: id }))
    }

    /// Why the wallet (or the simulated card network) declines `cmd`, if it does.
    fn decline(&self, cmd: &ProcessPayment, held: &str, balance: i64) -> Option<String> {
        if cmd.currency != held {
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
        }
    }

    /// Refunds a captured payment; leaves a `voided` tombstone when none was taken yet, so a
    /// late `payments.process` for the order is refused. Money the provider holds or took is
    /// given back by [`crate::settle`], which then answers ([`Verdict::Later`] here).
    async fn refund(&self, tx: &mut Tx, cmd: OrderRef, event: &Envelope) -> Result<Verdict, HandlerError> {
        let order = cmd.order_id.to_string();
        let payment = match payment(tx, &order).await? {
            Some(payment) => payment,
            None => {
                let tombstone = Outcome {
                    status: PaymentStatus::Voided,
                    reason: Some("refund arrived before payment"),
                };
                let nobody = Payer {
                    customer: "",
                    amount: 0,
                    currency: "USD",
                };
                if claim(tx, &order, Uuid::now_v7(), nobody, tombstone).await? {
                    return Ok(Verdict::done_empty());
                }
                // A charge was decided meanwhile: undo what it did.
                decided(tx, &order).await?
            }
        };
        match payment.status {
            // The provider may or may not have taken it: the settler finds out and undoes it.
            PaymentStatus::Charging => {
                hand_to_settler(tx, &order, PaymentStatus::Voiding, event).await?;
                Ok(Verdict::Later)
            }
            PaymentStatus::Voiding | PaymentStatus::Refunding => Ok(Verdict::Later),
            PaymentStatus::Captured if payment.provider_charge_id.is_some() => {
                if self.provider.is_none() {
                    // Money taken outside can only go back outside: wait for the provider
                    // to be configured again rather than pretend it was returned.
                    return Err(HandlerError::Transient(format!(
                        "payment for order {order} was charged at the provider but none is configured"
                    )));
                }
                hand_to_settler(tx, &order, PaymentStatus::Refunding, event).await?;
                Ok(Verdict::Later)
            }
            PaymentStatus::Captured => {
                mark_refunded(tx, &order).await?;
                let wallet = format!("customer:{}", payment.customer);
                ledger::transfer(tx, ledger::REVENUE, &wallet, payment.amount, "refund", &order).await?;
                metrics::counter!("bazaar_payments_total", "outcome" => "refunded").increment(1);
                Ok(Verdict::done_empty())
            }
            // Failed, voided or refunded: nothing is held.
            PaymentStatus::Failed | PaymentStatus::Voided | PaymentStatus::Refunded => Ok(Verdict::done_empty()),
        }
    }
}

/// Hands the order's payment to the settler in `status`, with the refund command it answers.
async fn hand_to_settler(
    tx: &mut Tx,
    order: &str,
    status: PaymentStatus,
    event: &Envelope,
) -> Result<(), HandlerError> {
    let now = now_millis();
    store::query(
        "UPDATE payment SET status = $1, refund_command = $2, next_try_at = $3, updated_at = $3 WHERE order_id = $4",
    )
    .bind(status.as_str())
    .bind(String::from_utf8_lossy(&event.to_vec()).into_owned())
    .bind(now)
    .bind(order)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
