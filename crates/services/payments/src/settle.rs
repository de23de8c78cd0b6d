//! Settles payments with the outside provider, outside any database transaction.
//!
//! The command handler only records an intent (`charging`, with the amount moved to the
//! `payments:holds` ledger account) or a request to give money back (`voiding`,
//! `refunding`), each with the saga command to answer. This loop claims such a row, calls the
//! provider with the order id as idempotency key, and then, in one transaction, moves the
//! held money (to revenue, or back to the wallet), stores the outcome and adds the saga reply
//! to the outbox. A crash anywhere repeats the call, which the idempotency key makes harmless;
//! a refund that overtakes a charge finds the intent and undoes whatever the provider did.

use bazaar_kit::store;
use std::time::Duration;

use bazaar_contracts::Paid;
use bazaar_kit::{
    consumer::HandlerError,
    envelope::Envelope,
    outbox::Outbox,
    shutdown::Shutdown,
    store::{now_millis, Tx},
};
use bazaar_saga::{self as saga, Verdict};

use crate::{
    ledger,
    provider::{ChargeRequest, PaymentProvider},
    PaymentStatus,
};

/// How long a settler's claim on a row lasts (longer than a provider call with retries).
const CLAIM: Duration = Duration::from_secs(30);
/// Wait before asking an unavailable provider again about the same row.
const RETRY: Duration = Duration::from_secs(2);

/// Runs [`settle_round`] every 200 ms until `shutdown`.
pub fn spawn(outbox: Outbox, provider: PaymentProvider, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = settle_round(&outbox, &provider).await {
                tracing::warn!(error = %e, "settling payments failed; will retry");
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
}

/// One row to settle, as claimed.
struct Due {
    order: String,
    status: PaymentStatus,
    customer: String,
    amount: i64,
    currency: String,
    charge_id: Option<String>,
}

/// Settles every due row once; returns how many were settled.
pub async fn settle_round(outbox: &Outbox, provider: &PaymentProvider) -> Result<usize, HandlerError> {
    let store = outbox.store();
    let rows = store::query(
        "SELECT order_id, status, customer_id, amount_cents, currency, provider_charge_id FROM payment
         WHERE status IN ($2, $3, $4) AND next_try_at <= $1 ORDER BY next_try_at LIMIT 20",
    )
    .bind(now_millis())
    .bind(PaymentStatus::Charging.as_str())
    .bind(PaymentStatus::Voiding.as_str())
    .bind(PaymentStatus::Refunding.as_str())
    .fetch_all(store)
    .await?;
    let mut settled = 0;
    for row in rows {
        let due = Due {
            order: row.try_get("order_id")?,
            status: PaymentStatus::parse(&row.try_get::<String, _>("status")?)?,
            customer: row.try_get("customer_id")?,
            amount: row.try_get("amount_cents")?,
            currency: row.try_get("currency")?,
            charge_id: row.try_get("provider_charge_id")?,
        };
        // Claim it, so another instance's settler leaves it alone.
        let now = now_millis();
        let claimed = store::query(
            "UPDATE payment SET next_try_at = $1 WHERE order_id = $2 AND status = $3 AND next_try_at <= $4",
        )
        .bind(now + CLAIM.as_millis() as i64)
        .bind(&due.order)
        .bind(due.status.as_str())
        .bind(now)
        .execute(store)
        .await?;
        if claimed.rows_affected() == 0 {
            continue;
        }
        let done = match due.status {
            PaymentStatus::Refunding => refund(outbox, provider, &due).await?,
            _ => charge(outbox, provider, &due).await?,
        };
        if done {
            settled += 1;
        } else {
            store::query("UPDATE payment SET next_try_at = $1 WHERE order_id = $2")
                .bind(now_millis() + RETRY.as_millis() as i64)
                .bind(&due.order)
                .execute(store)
                .await?;
        }
    }
    Ok(settled)
}

/// Asks the provider for the charge (made now, or found by its key) and settles a
/// `charging` or `voiding` row; `false` when the provider did not answer.
async fn charge(outbox: &Outbox, provider: &PaymentProvider, due: &Due) -> Result<bool, HandlerError> {
    let request = ChargeRequest {
        amount: due.amount,
        currency: due.currency.clone(),
        customer: due.customer.clone(),
        description: format!("bazaar order {}", due.order),
    };
    let answer = match provider.charge(&due.order, &request).await {
        Ok(answer) => answer,
        Err(e) => {
            metrics::counter!("bazaar_payments_provider_errors_total").increment(1);
            tracing::warn!(order = %due.order, error = %e, "payment provider did not answer; will ask again");
            return Ok(false);
        }
    };
    let wallet = format!("customer:{}", due.customer);
    let mut tx = outbox.store().begin().await?;
    // The row may have moved from charging to voiding while the provider answered.
    let status = lock(&mut tx, &due.order).await?;
    match (status, answer.succeeded()) {
        (PaymentStatus::Charging, true) => {
            capture(&mut tx, due, &answer.id).await?;
            set_status(&mut tx, &due.order, PaymentStatus::Captured).await?;
            let id: String = store::query("SELECT id FROM payment WHERE order_id = $1")
                .bind(&due.order)
                .fetch_one(&mut tx)
                .await?
                .try_get("id")?;
            let payment_id = id
                .parse()
                .map_err(|_| HandlerError::Poison(format!("payment of order {} has a bad id `{id}`", due.order)))?;
            reply(&mut tx, &due.order, "command", Verdict::done(&Paid { payment_id })).await?;
            metrics::counter!("bazaar_payments_total", "outcome" => "captured").increment(1);
        }
        (PaymentStatus::Charging, false) => {
            let why = answer.failure_message.unwrap_or_else(|| "no reason given".into());
            let reason = format!("payment provider declined the charge: {why}");
            ledger::transfer(&mut tx, ledger::HOLDS, &wallet, due.amount, "release", &due.order).await?;
            set_status(&mut tx, &due.order, PaymentStatus::Failed).await?;
            store::query("UPDATE payment SET reason = $1 WHERE order_id = $2")
                .bind(&reason)
                .bind(&due.order)
                .execute(&mut tx)
                .await?;
            reply(&mut tx, &due.order, "command", Verdict::Refused(reason)).await?;
            metrics::counter!("bazaar_payments_total", "outcome" => "declined").increment(1);
        }
        (PaymentStatus::Voiding, true) => {
            // Taken after all: capture it, then give it back like any captured payment.
            capture(&mut tx, due, &answer.id).await?;
            set_status(&mut tx, &due.order, PaymentStatus::Refunding).await?;
            store::query("UPDATE payment SET next_try_at = $1 WHERE order_id = $2")
                .bind(now_millis())
                .bind(&due.order)
                .execute(&mut tx)
                .await?;
        }
        (PaymentStatus::Voiding, false) => {
            ledger::transfer(&mut tx, ledger::HOLDS, &wallet, due.amount, "release", &due.order).await?;
            set_status(&mut tx, &due.order, PaymentStatus::Voided).await?;
            reply(&mut tx, &due.order, "refund_command", Verdict::done_empty()).await?;
        }
        // Settled by someone else meanwhile.
        _ => {}
    }
    outbox.commit(tx).await?;
    Ok(true)
}

/// Moves the held amount to revenue and records the provider's charge id.
async fn capture(tx: &mut Tx, due: &Due, charge_id: &str) -> Result<(), HandlerError> {
    ledger::open(tx, ledger::REVENUE, &due.currency).await?;
    ledger::transfer(tx, ledger::HOLDS, ledger::REVENUE, due.amount, "payment", &due.order).await?;
    store::query("UPDATE payment SET provider_charge_id = $1 WHERE order_id = $2")
        .bind(charge_id)
        .bind(&due.order)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Refunds a captured charge at the provider and settles a `refunding` row; `false` when the
/// provider did not answer.
async fn refund(outbox: &Outbox, provider: &PaymentProvider, due: &Due) -> Result<bool, HandlerError> {
    let Some(charge) = due.charge_id.as_deref() else {
        return Err(HandlerError::Poison(format!(
            "refunding payment {} has no provider charge",
            due.order
        )));
    };
    if let Err(e) = provider.refund(&format!("refund-{}", due.order), charge).await {
        metrics::counter!("bazaar_payments_provider_errors_total").increment(1);
        tracing::warn!(order = %due.order, error = %e, "payment provider did not refund; will ask again");
        return Ok(false);
    }
    let mut tx = outbox.store().begin().await?;
    if lock(&mut tx, &due.order).await? == PaymentStatus::Refunding {
        let wallet = format!("customer:{}", due.customer);
        crate::commands::mark_refunded(&mut tx, &due.order).await?;
        ledger::transfer(&mut tx, ledger::REVENUE, &wallet, due.amount, "refund", &due.order).await?;
        reply(&mut tx, &due.order, "refund_command", Verdict::done_empty()).await?;
        metrics::counter!("bazaar_payments_total", "outcome" => "refunded").increment(1);
    }
    outbox.commit(tx).await?;
    Ok(true)
}

/// Locks the payment row until the commit and returns its status.
async fn lock(tx: &mut Tx, order: &str) -> Result<PaymentStatus, HandlerError> {
    let status: String = store::query("SELECT status FROM payment WHERE order_id = $1 FOR UPDATE")
        .bind(order)
        .fetch_one(&mut *tx)
        .await?
        .try_get("status")?;
    Ok(PaymentStatus::parse(&status)?)
}

async fn set_status(tx: &mut Tx, order: &str, status: PaymentStatus) -> Result<(), HandlerError> {
    store::query("UPDATE payment SET status = $1, updated_at = $2 WHERE order_id = $3")
        .bind(status.as_str())
        .bind(now_millis())
        .bind(order)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Adds the saga reply to the command stored in `column` to the outbox.
async fn reply(tx: &mut Tx, order: &str, column: &str, verdict: Verdict) -> Result<(), HandlerError> {
    let stored: Option<String> = store::query(&format!("SELECT {column} FROM payment WHERE order_id = $1"))
        .bind(order)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    let Some(stored) = stored else {
        return Ok(());
    };
    let command = Envelope::from_slice(stored.as_bytes())?;
    saga::answer(tx, &command, crate::SERVICE.name, verdict).await
}
