//! Turns events into pending notifications, once per outcome.

use bazaar_contracts::{types, OrderOutcome, UserRegistered};
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use uuid::Uuid;

/// Handles `user.registered`, `order.confirmed` and `order.cancelled`.
#[derive(Debug, Clone, Copy)]
pub struct Outcomes;

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, (cents % 100).abs())
}

impl Handler for Outcomes {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (key, to, subject, body) = match event.event_type.as_str() {
                types::USER_REGISTERED => {
                    let u: UserRegistered = event.payload_as()?;
                    (
                        format!("{}:{}", event.event_type, u.user_id),
                        u.email,
                        "Welcome to bazaar".to_string(),
                        format!("Hello {},\n\nyour bazaar account is ready.\n", u.name),
                    )
                }
                types::ORDER_CONFIRMED => {
                    let o: OrderOutcome = event.payload_as()?;
                    (
                        format!("{}:{}", event.event_type, o.order_id),
                        o.email,
                        format!("Order {} confirmed", o.order_id),
                        format!(
                            "Your order {} is confirmed. We charged {}.\n",
                            o.order_id,
                            money(o.total_cents, &o.currency)
                        ),
                    )
                }
                types::ORDER_CANCELLED => {
                    let o: OrderOutcome = event.payload_as()?;
                    (
                        format!("{}:{}", event.event_type, o.order_id),
                        o.email,
                        format!("Order {} cancelled", o.order_id),
                        format!(
                            "Your order {} was cancelled: {}. Nothing was charged.\n",
                            o.order_id,
                            o.reason.unwrap_or_else(|| "no reason given".into())
                        ),
                    )
                }
                // Other events on these topics are not ours to announce.
                _ => return Ok(()),
            };
            sqlx::query(
                "INSERT INTO notification (id, dedupe_key, channel, recipient, subject, body, status, attempts, correlation_id, created_at)
                 VALUES ($1, $2, 'email', $3, $4, $5, 'pending', 0, $6, $7) ON CONFLICT (dedupe_key) DO NOTHING",
            )
            .bind(Uuid::now_v7().to_string())
            .bind(key)
            .bind(to)
            .bind(subject)
            .bind(body)
            .bind(&event.metadata.correlation_id)
            .bind(now_millis())
            .execute(&mut **tx)
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::money;

    #[test]
    fn money_reads_like_money() {
        assert_eq!(money(123456, "USD"), "1234.56 USD");
        assert_eq!(money(5, "EUR"), "0.05 EUR");
    }
}
