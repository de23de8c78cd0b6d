//! Turns events into pending notifications, once per outcome.

use bazaar_contracts::{types, OrderOutcome, RegistrationRepeated, UserRegistered, VerificationRequested};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    store::{now_millis, Tx},
};
use futures_util::future::BoxFuture;
use uuid::Uuid;

/// How a confirmation email's subject begins; the code follows (an operator's tool, such as
/// `bazaar load`, reads it from there through `GET /notifications?recipient=`).
pub const CODE_SUBJECT: &str = "Your bazaar confirmation code: ";

/// Texts one number may be sent a day. Numbers are typed in at registration and never
/// confirmed, so past this a number's texts are recorded as `suppressed`, not sent: an
/// account cannot be used to flood someone else's phone.
pub const TEXTS_PER_NUMBER_PER_DAY: i64 = 20;

/// Handles `user.registered`, `user.verification-requested`, `user.registration-repeated`,
/// `order.confirmed` and `order.cancelled`.
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
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let Some(message) = compose(tx, event).await? else {
                return Ok(());
            };
            let mut notes = vec![Note {
                key: message.key.clone(),
                channel: "email",
                to: message.email,
                subject: message.subject.clone(),
                body: message.body,
            }];
            if let Some(phone) = message.phone {
                notes.push(Note {
                    key: format!("{}:sms", message.key),
                    channel: "sms",
                    to: phone,
                    subject: message.subject.clone(),
                    body: message.subject,
                });
            }
            for note in notes {
                queue(tx, note, &event.metadata.correlation_id).await?;
            }
            Ok(())
        })
    }
}

/// What an event tells a customer: the dedupe key, the address and (for orders) the phone
/// it goes to, the subject and the text.
struct Message {
    key: String,
    email: String,
    phone: Option<String>,
    subject: String,
    body: String,
}

/// The message `event` calls for, if any (other events on these topics are not ours to
/// announce); a registration also records how to reach the user for their later orders.
async fn compose(tx: &mut Tx, event: &Envelope) -> Result<Option<Message>, HandlerError> {
    let (key, email, phone, subject, body) = match event.event_type.as_str() {
        types::USER_REGISTERED => {
            let u: UserRegistered = event.payload_as()?;
            // Remember how to reach the user for their later orders.
            store::query(
                "INSERT INTO contact (user_id, email, phone) VALUES ($1, $2, $3) ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(u.user_id.to_string())
            .bind(&u.email)
            .bind(u.phone.clone())
            .execute(&mut *tx)
            .await?;
            (
                format!("{}:{}", event.event_type, u.user_id),
                u.email,
                None,
                "Welcome to bazaar".to_string(),
                format!("Hello {},\n\nyour bazaar account is ready.\n", u.name),
            )
        }
        // Only to the address being confirmed: the code is the proof of owning it.
        types::USER_VERIFICATION_REQUESTED => {
            let v: VerificationRequested = event.payload_as()?;
            (
                format!("{}:{}", event.event_type, event.event_id),
                v.email,
                None,
                format!("{CODE_SUBJECT}{}", v.code),
                format!(
                    "Hello {},\n\nto open your bazaar account, enter this code with your address and password: {}\n\nIt is valid for {} hours. If you did not register, ignore this message: nothing happens without the code.\n",
                    v.name,
                    v.code,
                    v.valid_minutes / 60
                ),
            )
        }
        types::USER_REGISTRATION_REPEATED => {
            let r: RegistrationRepeated = event.payload_as()?;
            (
                format!("{}:{}", event.event_type, event.event_id),
                r.email,
                None,
                "Someone tried to register your address at bazaar".to_string(),
                "Hello,\n\nsomeone asked to register this address, which already has a bazaar account. If it was you, sign in with your password. If not, nothing changed.\n".to_string(),
            )
        }
        types::ORDER_CONFIRMED | types::ORDER_CANCELLED => {
            let o: OrderOutcome = event.payload_as()?;
            let phone = contact_phone(tx, &o).await?;
            let (subject, body) = order_text(&o, event.event_type == types::ORDER_CONFIRMED)?;
            (
                format!("{}:{}", event.event_type, o.order_id),
                o.email,
                phone,
                subject,
                body,
            )
        }
        _ => return Ok(None),
    };
    Ok(Some(Message {
        key,
        email,
        phone,
        subject,
        body,
    }))
}

/// The subject and text of an order's outcome.
fn order_text(o: &OrderOutcome, confirmed: bool) -> Result<(String, String), HandlerError> {
    if !confirmed {
        // A cancelled order refunded what its confirmation charged; a refused one took nothing.
        let money_back = match (o.total_cents, o.currency.as_deref()) {
            (cents, Some(currency)) if cents > 0 => format!("We refunded {}.", money(cents, currency)),
            _ => "Nothing was charged.".to_string(),
        };
        return Ok((
            format!("Order {} cancelled", o.order_id),
            format!(
                "Your order {} was cancelled: {}. {money_back}\n",
                o.order_id,
                o.reason.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    let currency = o
        .currency
        .as_deref()
        .ok_or_else(|| HandlerError::Poison(format!("confirmed order {} has no currency", o.order_id)))?;
    Ok((
        format!("Order {} confirmed", o.order_id),
        format!(
            "Your order {} is confirmed. We charged {}.\n",
            o.order_id,
            money(o.total_cents, currency)
        ),
    ))
}

/// Records `note` to be sent, once per dedupe key; a text past its number's daily limit is
/// recorded as suppressed instead.
async fn queue(tx: &mut Tx, note: Note, correlation_id: &str) -> Result<(), HandlerError> {
    let now = now_millis();
    let (status, why) = if note.channel == "sms" && texts_today(tx, &note.to, now).await? >= TEXTS_PER_NUMBER_PER_DAY {
        metrics::counter!("bazaar_notifications_suppressed_total", "channel" => "sms").increment(1);
        tracing::warn!(key = %note.key, "this number was sent its daily limit of texts; not sending");
        ("suppressed", Some("the number was sent its daily limit of texts"))
    } else {
        ("pending", None)
    };
    store::query(
        "INSERT INTO notification (id, dedupe_key, channel, recipient, subject, body, status, attempts, last_error, correlation_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10) ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(note.key)
    .bind(note.channel)
    .bind(note.to)
    .bind(note.subject)
    .bind(note.body)
    .bind(status)
    .bind(why)
    .bind(correlation_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Texts recorded for `number` in the day before `now`, sent or to be sent.
async fn texts_today(tx: &mut Tx, number: &str, now: i64) -> Result<i64, HandlerError> {
    let row = store::query(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM notification WHERE recipient = $1 AND channel = 'sms' AND status <> 'suppressed' AND created_at > $2",
    )
    .bind(number)
    .bind(now - 24 * 3600 * 1000)
    .fetch_one(&mut *tx)
    .await?;
    Ok(row.try_get("n")?)
}

/// The customer's phone, from the contact their `user.registered` left. Until that event is
/// handled the outcome waits (a retry), so an SMS is not skipped by a race between topics.
async fn contact_phone(tx: &mut Tx, o: &OrderOutcome) -> Result<Option<String>, HandlerError> {
    let row = store::query("SELECT phone FROM contact WHERE user_id = $1")
        .bind(o.customer_id.to_string())
        .fetch_optional(&mut *tx)
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
