//! Delivers pending notifications by email, behind a circuit breaker.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bazaar_kit::{
    resilience::{BreakerConfig, CallError, CircuitBreaker},
    shutdown::Shutdown,
    store::{now_millis, Store},
};
use lettre::{
    message::{header::ContentType, Mailbox},
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use sqlx::Row;

use crate::MailConfig;

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

/// Sends mail through the configured transport, guarded by a breaker.
pub struct Mailer {
    transport: Transport,
    breaker: CircuitBreaker,
}

impl Mailer {
    /// A mailer for `config`; creates the mail directory for file delivery.
    pub fn new(config: MailConfig) -> Result<Mailer, MailError> {
        let transport = match config {
            MailConfig::Files(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| MailError::Deliver(format!("cannot create {}: {e}", dir.display())))?;
                Transport::Files(dir)
            }
            MailConfig::Smtp { host, port } => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_secs(10)))
                    .build(),
            ),
        };
        Ok(Mailer {
            transport,
            breaker: CircuitBreaker::new("mail", BreakerConfig::default()),
        })
    }

    /// Health: down while the breaker is open.
    pub fn check(&self) -> Result<(), String> {
        match self.breaker.state() {
            bazaar_kit::resilience::BreakerState::Open => Err("mail circuit open after repeated failures".into()),
            _ => Ok(()),
        }
    }

    /// Sends one message whose `Message-ID` derives from `id`.
    pub async fn send(&self, id: &str, to: &str, subject: &str, body: &str) -> Result<(), CallError<MailError>> {
        let message = build(id, to, subject, body).map_err(CallError::Failed)?;
        self.breaker
            .call(Duration::from_secs(15), async {
                match &self.transport {
                    Transport::Files(dir) => {
                        let tmp = dir.join(format!(".{id}.tmp"));
                        let path = dir.join(format!("{id}.eml"));
                        tokio::fs::write(&tmp, message.formatted())
                            .await
                            .map_err(|e| MailError::Deliver(e.to_string()))?;
                        tokio::fs::rename(&tmp, &path)
                            .await
                            .map_err(|e| MailError::Deliver(e.to_string()))
                    }
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

/// Gives up on a notification after this many failed sends (it stays visible as `failed`).
const MAX_ATTEMPTS: i64 = 10;

/// Sends pending notifications every 200 ms until `shutdown`.
pub fn spawn_sender(store: Store, mailer: Arc<Mailer>, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = send_pending(&store, &mailer).await {
                tracing::warn!(error = %e, "notification round failed");
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
}

async fn send_pending(store: &Store, mailer: &Mailer) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, recipient, subject, body, attempts FROM notification WHERE status = 'pending' ORDER BY created_at LIMIT 50",
    )
    .fetch_all(store.pool())
    .await?;
    for row in rows {
        let id: String = row.try_get("id")?;
        let attempts: i64 = row.try_get("attempts")?;
        let to: String = row.try_get("recipient")?;
        let result = mailer
            .send(
                &id,
                &to,
                &row.try_get::<String, _>("subject")?,
                &row.try_get::<String, _>("body")?,
            )
            .await;
        match result {
            Ok(()) => {
                sqlx::query(
                    "UPDATE notification SET status = 'sent', sent_at = $1, attempts = attempts + 1 WHERE id = $2",
                )
                .bind(now_millis())
                .bind(&id)
                .execute(store.pool())
                .await?;
                metrics::counter!("bazaar_notifications_sent_total").increment(1);
            }
            Err(CallError::Open(_)) => return Ok(()),
            Err(e) => {
                let status = if attempts + 1 >= MAX_ATTEMPTS {
                    "failed"
                } else {
                    "pending"
                };
                tracing::warn!(notification = %id, error = %e, "send failed");
                sqlx::query(
                    "UPDATE notification SET attempts = attempts + 1, last_error = $1, status = $2 WHERE id = $3",
                )
                .bind(e.to_string())
                .bind(status)
                .bind(&id)
                .execute(store.pool())
                .await?;
                metrics::counter!("bazaar_notifications_failed_total").increment(1);
            }
        }
    }
    Ok(())
}
