//! Turns events into pending notifications, once per outcome.

use bazaar_contracts::{types, OrderOutcome, UserRegistered};
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use sqlx::Row;
use uuid::Uuid;

/// Handles `user.registered`, `order.confirmed` and `order.cancelled`.
#[derive(Debug, Clone, Copy)]
pub struct Outcomes;

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, (cents % 100).abs())
}

/// One message to queue.
struct Note {
    key: String,
    channel: &'static str,
    to: String,
    subject: String,
    body: String,
}

impl Handler for Outcomes {
    fn handle<'a>(&'a self, tx: &'a mut Tx<'static>, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (subject_key, email, phone, subject, body) = match event.event_type.as_str() {
                types::USER_REGISTERED => {
                    let u: UserRegistered = event.payload_as()?;
                    // Remember how to reach the user for their later orders.
                    sqlx::query(
                        "INSERT INTO contact (user_id, email, phone) VALUES ($1, $2, $3) ON CONFLICT (user_id) DO NOTHING",
                    )
                    .bind(u.user_id.to_string())
                    .bind(&u.email)
                    .bind(u.phone.clone())
                    .execute(&mut **tx)
                    .await?;
                    (
                        format!("{}:{}", event.event_type, u.user_id),
                        u.email,
                        None,
                        "Welcome to bazaar".to_string(),
                        format!("Hello {},\n\nyour bazaar account is ready.\n", u.name),
                    )
                }
                types::ORDER_CONFIRMED | types::ORDER_CANCELLED => {
                    let o: OrderOutcome = event.payload_as()?;
                    let phone = contact_phone(tx, &o).await?;
                    let confirmed = event.event_type == types::ORDER_CONFIRMED;
                    let (subject, body) = if confirmed {
                        let currency = o.currency.as_deref().ok_or_else(|| {
                            HandlerError::Poison(format!("confirmed order {} has no currency", o.order_id))
                        })?;
                        (
                            format!("Order {} confirmed", o.order_id),
                            format!(
                                "Your order {} is confirmed. We charged {}.\n",
                                o.order_id,
                                money(o.total_cents, currency)
                            ),
                        )
                    } else {
                        (
                            format!("Order {} cancelled", o.order_id),
                            format!(
                                "Your order {} was cancelled: {}. Nothing was charged.\n",
                                o.order_id,
                                o.reason.clone().unwrap_or_else(|| "no reason given".into())
                            ),
                        )
                    };
                    (
                        format!("{}:{}", event.event_type, o.order_id),
                        o.email,
                        phone,
                        subject,
                        body,
                    )
                }
                // Other events on these topics are not ours to announce.
                _ => return Ok(()),
            };
            let mut notes = vec![Note {
                key: subject_key.clone(),
                channel: "email",
                to: email,
                subject: subject.clone(),
                body: body.clone(),
            }];
            if let Some(phone) = phone {
                notes.push(Note {
                    key: format!("{subject_key}:sms"),
                    channel: "sms",
                    to: phone,
                    subject: subject.clone(),
                    body: subject,
                });
            }
            for note in notes {
                sqlx::query(
                    "INSERT INTO notification (id, dedupe_key, channel, recipient, subject, body, status, attempts, correlation_id, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $8) ON CONFLICT (dedupe_key) DO NOTHING",
                )
                .bind(Uuid::now_v7().to_string())
                .bind(note.key)
                .bind(note.channel)
                .bind(note.to)
                .bind(note.subject)
                .bind(note.body)
                .bind(&event.metadata.correlation_id)
                .bind(now_millis())
                .execute(&mut **tx)
                .await?;
            }
            Ok(())
        })
    }
}

/// The customer's phone, from the contact their `user.registered` left. Until that event is
/// handled the outcome waits (a retry), so an SMS is not skipped by a race between topics.
async fn contact_phone(tx: &mut Tx<'static>, o: &OrderOutcome) -> Result<Option<String>, HandlerError> {
    let row = sqlx::query("SELECT phone FROM contact WHERE user_id = $1")
        .bind(o.customer_id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        Some(r) => Ok(r.try_get("phone")?),
        None => Err(HandlerError::Transient(format!(
            "no contact yet for customer {}",
            o.customer_id
        ))),
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
