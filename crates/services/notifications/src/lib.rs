//! The notifications service: tells customers about their account and orders by email.
//!
//! Each outcome event becomes one `notification` row per channel (email, and SMS when the
//! user gave a phone) keyed by what it announces
//! (`order.confirmed:<orderId>`), written in the consumer's transaction: a redelivered event
//! finds the key taken and adds nothing. A sender loop then delivers pending rows through a
//! circuit breaker. Delivery is idempotent per row: the file mailer writes `<id>.eml`
//! (a resend overwrites the same file), and SMTP messages carry the row id as `Message-ID`
//! so a resend after a crash is recognisable as the same message.

mod api;
pub mod courier;
mod events;

use std::{path::PathBuf, sync::Arc};

use bazaar_contracts::{roles, topics};
use bazaar_kit::telemetry::MetricDoc;
use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{PublicRoute, ServiceSpec},
    shutdown::Shutdown,
    store::Migration,
};

pub use api::router;
pub use courier::Courier;
pub use events::{Outcomes, CODE_SUBJECT, TEXTS_PER_NUMBER_PER_DAY};

/// The notifications table.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 10,
    name: "notifications",
    sql: "CREATE TABLE notification (
            id TEXT PRIMARY KEY,
            dedupe_key TEXT NOT NULL UNIQUE,
            channel TEXT NOT NULL,
            recipient TEXT NOT NULL,
            subject TEXT NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            last_error TEXT,
            correlation_id TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            sent_at BIGINT,
            claimed_until BIGINT
        );
        CREATE INDEX notification_pending ON notification (status, created_at);
        CREATE INDEX notification_recipient ON notification (recipient, created_at);
        CREATE TABLE contact (
            user_id TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            phone TEXT
        );",
}];

/// The metrics notifications records beside the kit's.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_notifications_sent_total",
        help: "Notifications delivered (mail or text).",
    },
    MetricDoc {
        name: "bazaar_notifications_failed_total",
        help: "Notification deliveries that failed and will be tried again.",
    },
    MetricDoc {
        name: "bazaar_notifications_suppressed_total",
        help: "Notifications not sent on purpose (texts past a number's daily limit), by channel.",
    },
];

/// The notifications service: it hears outcomes and new users; what was sent needs a token.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::NOTIFICATIONS,
    migrations: MIGRATIONS,
    publishes: &[],
    consumes: &[topics::ORDERS_EVENTS, topics::USERS_EVENTS],
    routes: &[
        PublicRoute::token("notifications"),
        PublicRoute::dead_letters("notifications-deadletters", "deadletters/notifications"),
    ],
    openapi: api::openapi,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// Where mail goes.
#[derive(Debug, Clone)]
pub enum MailConfig {
    /// Write each message to `<dir>/<id>.eml` (the default: `data/mail`).
    Files(PathBuf),
    /// Send through an SMTP relay at `host:port` (no TLS; a local relay such as a sidecar).
    Smtp {
        /// Relay host.
        host: String,
        /// Relay port.
        port: u16,
    },
}

/// Where text messages go.
#[derive(Debug, Clone)]
pub enum SmsConfig {
    /// Write each message to `<dir>/<id>.txt` (the default: `data/sms`).
    Files(PathBuf),
    /// POST `{id, to, text}` as JSON to an SMS gateway's webhook, with the id as
    /// `Idempotency-Key`.
    Webhook(String),
}

/// Runs the notifications role until `shutdown`.
pub async fn run(config: RoleConfig, mail: MailConfig, sms: SmsConfig, shutdown: Shutdown) -> Result<(), ServiceError> {
    let rt = Runtime::start(&SERVICE, &config, shutdown.clone()).await?;
    let courier = Arc::new(Courier::new(mail, sms).map_err(|e| ServiceError::Config(e.to_string()))?);
    for topic in SERVICE.consumes {
        let mut config = rt.consumer(topic);
        // An outcome waits for its customer's contact (from users.events, another topic);
        // give that lag ten minutes of retries before dead-lettering.
        config.max_attempts = 70;
        rt.consume(config, Arc::new(Outcomes))?;
    }
    let (store, sender) = (rt.store.clone(), courier.clone());
    rt.every(courier::SEND_EVERY, move || {
        let (store, sender) = (store.clone(), sender.clone());
        async move { courier::send_round(&store, &sender).await }
    });
    let health = rt.health().check("delivery", {
        let courier = courier.clone();
        move || {
            let courier = courier.clone();
            Box::pin(async move { courier.check() })
        }
    });
    rt.serve(config.listen, router(rt.clone()), health).await
}
