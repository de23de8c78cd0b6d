//! Delivers pending notifications by email and SMS, each channel behind its own circuit
//! breaker. The SMS webhook is called through the kit's outbound client stack, whose
//! breaker guards it; its calls carry the notification id as `Idempotency-Key`, so the
//! stack may retry them within its budget without sending a text twice.

use bazaar_kit::store;
use futures_util::StreamExt;
use std::{path::PathBuf, time::Duration};

use bazaar_kit::{
    client::{ClientPolicy, HttpClient, IDEMPOTENCY_KEY},
    resilience::{BreakerConfig, BreakerState, CallError, CircuitBreaker},
    store::{now_millis, Store},
};
use lettre::{
    message::{header::ContentType, Mailbox},
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};

use crate::{MailConfig, SmsConfig};

/// The sender address of every message.
const FROM: &str = "bazaar <no-reply@bazaar.local>";

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The message could not be built (bad address).
    #[error("cannot build message: {0}")]
    Build(String),
    /// The transport failed.
    #[error("cannot deliver: {0}")]
    Deliver(String),
}

enum Transport {
    Files(PathBuf),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

enum SmsTransport {
    Files { dir: PathBuf, breaker: CircuitBreaker },
    Webhook { url: String, client: HttpClient },
}

impl SmsTransport {
    fn breaker_state(&self) -> BreakerState {
        match self {
            SmsTransport::Files { breaker, .. } => breaker.state(),
            SmsTransport::Webhook { client, .. } => client.breaker_state(),
        }
    }
}

/// Sends email and SMS through the configured transports, each guarded by a breaker.
pub struct Courier {
    transport: Transport,
    breaker: CircuitBreaker,
    sms: SmsTransport,
}

fn make_dir(dir: &std::path::Path) -> Result<(), MailError> {
    std::fs::create_dir_all(dir).map_err(|e| MailError::Deliver(format!("cannot create {}: {e}", dir.display())))
}

/// Writes `contents` to `<dir>/<id>.<ext>` via a temporary file, so a resend replaces the
/// same file whole.
async fn write_once(dir: &std::path::Path, id: &str, ext: &str, contents: Vec<u8>) -> Result<(), MailError> {
    let tmp = dir.join(format!(".{id}.tmp"));
    tokio::fs::write(&tmp, contents)
        .await
        .map_err(|e| MailError::Deliver(e.to_string()))?;
    tokio::fs::rename(&tmp, dir.join(format!("{id}.{ext}")))
        .await
        .map_err(|e| MailError::Deliver(e.to_string()))
}

impl Courier {
    /// A courier for `mail` and `sms`; creates the directories for file delivery.
    pub fn new(mail: MailConfig, sms: SmsConfig) -> Result<Courier, MailError> {
        let sms = match sms {
            SmsConfig::Files(dir) => {
                make_dir(&dir)?;
                SmsTransport::Files {
                    dir,
                    breaker: CircuitBreaker::new("sms", BreakerConfig::default()),
                }
            }
            SmsConfig::Webhook(url) => SmsTransport::Webhook {
                url,
                client: HttpClient::new(
                    "sms",
                    ClientPolicy {
                        timeout: Duration::from_secs(10),
                        ..ClientPolicy::default()
                    },
                )
                .map_err(|e| MailError::Deliver(e.to_string()))?,
            },
        };
        let transport = match mail {
            MailConfig::Files(dir) => {
                make_dir(&dir)?;
                Transport::Files(dir)
            }
            MailConfig::Smtp { host, port } => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_secs(10)))
                    .build(),
            ),
        };
        Ok(Courier {
            transport,
            breaker: CircuitBreaker::new("mail", BreakerConfig::default()),
            sms,
        })
    }

    /// Health: down while a channel's breaker is open.
    pub fn check(&self) -> Result<(), String> {
        for (name, state) in [("mail", self.breaker.state()), ("sms", self.sms.breaker_state())] {
            if state == BreakerState::Open {
                return Err(format!("{name} circuit open after repeated failures"));
            }
        }
        Ok(())
    }

    /// Sends one text message whose id the receiver can use to drop a resend.
    pub async fn send_sms(&self, id: &str, to: &str, text: &str) -> Result<(), CallError<MailError>> {
        match &self.sms {
            SmsTransport::Files { dir, breaker } => {
                breaker
                    .call(
                        Duration::from_secs(15),
                        write_once(dir, id, "txt", format!("To: {to}\n\n{text}\n").into_bytes()),
                    )
                    .await
            }
            SmsTransport::Webhook { url, client } => {
                let call = client
                    .post(url)
                    .header(IDEMPOTENCY_KEY, id)
                    .json(&serde_json::json!({ "id": id, "to": to, "text": text }));
                let resp = client.send(call).await.map_err(|e| match e {
                    CallError::Open(name) => CallError::Open(name),
                    CallError::Full(name) => CallError::Full(name),
                    CallError::Timeout(after) => CallError::Timeout(after),
                    CallError::Failed(e) => CallError::Failed(MailError::Deliver(e.to_string())),
                })?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(CallError::Failed(MailError::Deliver(format!(
                        "SMS webhook answered {}",
                        resp.status()
                    ))))
                }
            }
        }
    }

    /// Sends one message whose `Message-ID` derives from `id`.
    pub async fn send(&self, id: &str, to: &str, subject: &str, body: &str) -> Result<(), CallError<MailError>> {
        let message = build(id, to, subject, body).map_err(CallError::Failed)?;
        self.breaker
            .call(Duration::from_secs(15), async {
                match &self.transport {
                    Transport::Files(dir) => write_once(dir, id, "eml", message.formatted()).await,
                    Transport::Smtp(smtp) => smtp
                        .send(message)
                        .await
                        .map(|_| ())
                        .map_err(|e| MailError::Deliver(e.to_string())),
                }
            })
            .await
    }
}

fn build(id: &str, to: &str, subject: &str, body: &str) -> Result<Message, MailError> {
    let from: Mailbox = FROM.parse().map_err(|e| MailError::Build(format!("{e}")))?;
    let to: Mailbox = to
        .parse()
        .map_err(|e| MailError::Build(format!("recipient `{to}`: {e}")))?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{id}@bazaar.local>")))
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_string())
        .map_err(|e| MailError::Build(e.to_string()))
}

/// How long a sender's claim on a row lasts (longer than any send may take).
const CLAIM: Duration = Duration::from_secs(60);

/// Gives up on a notification after this many failed sends (it stays visible as `failed`).
const MAX_ATTEMPTS: i64 = 10;

/// How often the sender looks for pending notifications.
pub const SEND_EVERY: Duration = Duration::from_millis(200);

/// Notifications one batch takes.
const BATCH: usize = 200;
/// Sends a batch has under way at once.
const CONCURRENT_SENDS: usize = 16;
/// How long a round goes on taking full batches before it lets the next round start.
const ROUND_FOR: Duration = Duration::from_secs(2);

/// One sender round: delivers what is pending, batch after batch while batches come full
/// (50 every 200 ms capped the courier at 250 a second, below the saga's pace), logging (not
/// returning) a failed batch.
pub async fn send_round(store: &Store, courier: &Courier) {
    let started = std::time::Instant::now();
    loop {
        match send_batch(store, courier).await {
            Ok(Batch { taken, deferred: 0 }) if taken == BATCH && started.elapsed() < ROUND_FOR => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "notification round failed");
                return;
            }
        }
    }
}

/// How a batch went.
struct Batch {
    /// Notifications that were pending when it started (at most [`BATCH`]).
    taken: usize,
    /// Those left for a later round because their channel is resting or busy: a round
    /// does not take batch after batch while a breaker is open.
    deferred: usize,
}

/// A pending notification this sender has claimed.
struct Claimed {
    id: String,
    sms: bool,
    to: String,
    subject: String,
    body: String,
    attempts: i64,
}

/// Claims up to [`BATCH`] pending notifications in one transaction, sends them
/// [`CONCURRENT_SENDS`] at a time, and records every outcome in one transaction.
///
/// One piece: one claim-send-record cycle; only rows this call claimed are sent, the second
/// transaction records the outcome of exactly those sends, and `taken` and `deferred` from
/// both ends make up the one Batch it returns.
async fn send_batch(store: &Store, courier: &Courier) -> Result<Batch, store::StoreError> {
    let rows = store::query(
        "SELECT id, channel, recipient, subject, body, attempts FROM notification
         WHERE status = 'pending' AND (claimed_until IS NULL OR claimed_until < $1) ORDER BY created_at LIMIT $2",
    )
    .bind(now_millis())
    .bind(BATCH as i64)
    .fetch_all(store)
    .await?;
    let taken = rows.len();
    let mut deferred = 0;
    if taken == 0 {
        return Ok(Batch { taken, deferred });
    }
    // Claim the rows, so another instance's sender does not send them too; a claim left by a
    // crashed sender expires and the row is sent again (idempotently, under the same id).
    let now = now_millis();
    let mut claimed = Vec::with_capacity(taken);
    let mut tx = store.begin().await?;
    for row in rows {
        let id: String = row.try_get("id")?;
        let done = store::query(
            "UPDATE notification SET claimed_until = $1
             WHERE id = $2 AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < $3)",
        )
        .bind(now + CLAIM.as_millis() as i64)
        .bind(&id)
        .bind(now)
        .execute(&mut tx)
        .await?;
        if done.rows_affected() == 1 {
            claimed.push(Claimed {
                id,
                sms: row.try_get::<String, _>("channel")? == "sms",
                to: row.try_get("recipient")?,
                subject: row.try_get("subject")?,
                body: row.try_get("body")?,
                attempts: row.try_get("attempts")?,
            });
        }
    }
    tx.commit().await?;

    let sent: Vec<(Claimed, Result<(), CallError<MailError>>)> = futures_util::stream::iter(claimed)
        .map(|n| async move {
            let result = if n.sms {
                courier.send_sms(&n.id, &n.to, &n.body).await
            } else {
                courier.send(&n.id, &n.to, &n.subject, &n.body).await
            };
            (n, result)
        })
        .buffer_unordered(CONCURRENT_SENDS)
        .collect()
        .await;

    let mut tx = store.begin().await?;
    for (n, result) in sent {
        match result {
            Ok(()) => {
                store::query(
                    "UPDATE notification SET status = 'sent', sent_at = $1, attempts = attempts + 1 WHERE id = $2",
                )
                .bind(now_millis())
                .bind(&n.id)
                .execute(&mut tx)
                .await?;
                metrics::counter!("bazaar_notifications_sent_total").increment(1);
            }
            // That channel is resting or busy; the row stays pending for a later round.
            Err(CallError::Open(_) | CallError::Full(_)) => {
                deferred += 1;
                store::query("UPDATE notification SET claimed_until = NULL WHERE id = $1")
                    .bind(&n.id)
                    .execute(&mut tx)
                    .await?;
            }
            Err(e) => {
                let status = if n.attempts + 1 >= MAX_ATTEMPTS {
                    "failed"
                } else {
                    "pending"
                };
                tracing::warn!(notification = %n.id, error = %e, "send failed");
                store::query(
                    "UPDATE notification SET attempts = attempts + 1, last_error = $1, status = $2, claimed_until = NULL
                     WHERE id = $3",
                )
                .bind(e.to_string())
                .bind(status)
                .bind(&n.id)
                .execute(&mut tx)
                .await?;
                metrics::counter!("bazaar_notifications_failed_total").increment(1);
            }
        }
    }
    tx.commit().await?;
    Ok(Batch { taken, deferred })
}
