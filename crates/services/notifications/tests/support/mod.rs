//! The notifications role started in-process for tests (the kit's [`TestRole`]: the real
//! [`Runtime`] on a temporary SQLite store and embedded broker, its app called without a
//! socket). Consumers and the sender loop are not started: the test builds each event and
//! runs `Outcomes` inside one store transaction, committed when it succeeds and rolled back
//! when it fails, as the consumer runner does, then reads the `notification` rows it queued;
//! and it runs sender rounds itself (`courier::send_round`) with a [`Courier`] writing mail
//! and texts to temporary directories.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use bazaar_kit::store;
use std::path::{Path, PathBuf};

use axum::http::{Method, StatusCode};
use bazaar_contracts::{types, OrderOutcome, UserRegistered};
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
    runtime::Runtime,
};
use bazaar_notifications::{courier, Courier, MailConfig, Outcomes, SmsConfig};
use bazaar_testkit::TestRole;

pub use bazaar_testkit::Answer;
use serde_json::Value;
use uuid::Uuid;

/// The correlation id every test event carries.
pub const CORRELATION: &str = "notifications-test";

/// A running notifications role and a courier writing to temporary directories.
pub struct Notifications {
    pub rt: Runtime,
    pub courier: Courier,
    mail: tempfile::TempDir,
    sms: tempfile::TempDir,
    role: TestRole,
}

/// A customer: who they are, how to reach them, and their token.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: Uuid,
    pub email: String,
    pub phone: Option<String>,
    pub token: String,
}

/// One queued notification as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub id: String,
    pub about: String,
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub status: String,
    pub attempts: i64,
    pub correlation_id: String,
}

/// Starts notifications on a fresh store and broker.
pub async fn start() -> Notifications {
    let role = TestRole::start(&bazaar_notifications::SERVICE, |rt| {
        bazaar_notifications::router(rt.clone())
    })
    .await;
    let mail = tempfile::tempdir().expect("temp dir");
    let sms = tempfile::tempdir().expect("temp dir");
    let courier = Courier::new(
        MailConfig::Files(mail.path().to_path_buf()),
        SmsConfig::Files(sms.path().to_path_buf()),
    )
    .expect("a courier");
    Notifications {
        rt: role.rt.clone(),
        courier,
        mail,
        sms,
        role,
    }
}

fn metadata(source: &str) -> Metadata {
    Metadata {
        correlation_id: CORRELATION.into(),
        source: source.into(),
        ..Metadata::default()
    }
}

/// `user.registered` for `customer`, as users announces it.
pub fn registered(customer: &Customer) -> Envelope {
    let payload = UserRegistered {
        user_id: customer.id,
        email: customer.email.clone(),
        name: "Ann".into(),
        phone: customer.phone.clone(),
    };
    Envelope::new(
        types::USER_REGISTERED,
        customer.id.to_string(),
        payload,
        metadata("users"),
    )
}

/// `order.confirmed` for `order` of `customer`, charged `total_cents` in `currency`.
pub fn confirmed(order: Uuid, customer: &Customer, total_cents: i64, currency: &str) -> Envelope {
    let payload = OrderOutcome {
        order_id: order,
        customer_id: customer.id,
        email: customer.email.clone(),
        total_cents,
        currency: Some(currency.into()),
        reason: None,
    };
    Envelope::new(types::ORDER_CONFIRMED, order.to_string(), payload, metadata("orders"))
}

/// `order.cancelled` for `order` of `customer`, for `reason`.
pub fn cancelled(order: Uuid, customer: &Customer, reason: Option<&str>) -> Envelope {
    let payload = OrderOutcome {
        order_id: order,
        customer_id: customer.id,
        email: customer.email.clone(),
        total_cents: 0,
        currency: None,
        reason: reason.map(str::to_string),
    };
    Envelope::new(types::ORDER_CANCELLED, order.to_string(), payload, metadata("orders"))
}

/// The files in `dir` ending `.ext`, sorted (temporary `.*.tmp` files are not counted).
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

impl Notifications {
    /// A new customer named by `email` (and `phone`), not yet known to notifications.
    pub fn stranger(&self, email: &str, phone: Option<&str>) -> Customer {
        let id = Uuid::now_v7();
        Customer {
            id,
            email: email.into(),
            phone: phone.map(str::to_string),
            token: self.role.token(id, email, &[]),
        }
    }

    /// A new customer whose `user.registered` was handled (so they were also welcomed).
    pub async fn customer(&self, email: &str, phone: Option<&str>) -> Customer {
        let customer = self.stranger(email, phone);
        self.handle(&registered(&customer)).await.expect("registered");
        customer
    }

    /// A token for an operator.
    pub fn admin(&self) -> String {
        self.role.admin_token()
    }

    /// Sends `method uri` with `token` and a JSON `body` through the served router.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.role.call(method, uri, token, body).await
    }

    /// `GET uri` with `token`, asserting a 200; returns the listed notifications.
    pub async fn list(&self, uri: &str, token: &str) -> Vec<Value> {
        self.call(Method::GET, uri, Some(token), None)
            .await
            .expect(StatusCode::OK)
            .as_array()
            .expect("a list")
            .clone()
    }

    /// Runs `event` through `Outcomes` as the consumer runner does (without the inbox, so a
    /// repeated envelope shows the handler's own idempotency): one transaction, committed
    /// through the outbox when it succeeds, rolled back when it fails.
    pub async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        self.role.handle(&Outcomes, event).await
    }

    /// Every queued notification, oldest first.
    pub async fn notes(&self) -> Vec<Note> {
        store::query(
            "SELECT id, dedupe_key, channel, recipient, subject, body, status, attempts, correlation_id
             FROM notification ORDER BY created_at, id",
        )
        .fetch_all(&self.rt.store)
        .await
        .expect("notifications")
        .iter()
        .map(|r| Note {
            id: r.try_get("id").expect("a column"),
            about: r.try_get("dedupe_key").expect("a column"),
            channel: r.try_get("channel").expect("a column"),
            recipient: r.try_get("recipient").expect("a column"),
            subject: r.try_get("subject").expect("a column"),
            body: r.try_get("body").expect("a column"),
            status: r.try_get("status").expect("a column"),
            attempts: r.try_get("attempts").expect("a column"),
            correlation_id: r.try_get("correlation_id").expect("a column"),
        })
        .collect()
    }

    /// The queued notifications about `about` (e.g. `order.confirmed:<id>`, with `:sms` for
    /// the text).
    pub async fn notes_about(&self, about: &str) -> Vec<Note> {
        self.notes()
            .await
            .into_iter()
            .filter(|n| n.about == about || n.about == format!("{about}:sms"))
            .collect()
    }

    /// One sender round, as the role's sender loop runs it.
    pub async fn send_round(&self) {
        courier::send_round(&self.rt.store, &self.courier).await;
    }

    /// The mail written so far (`<id>.eml`).
    pub fn mail_files(&self) -> Vec<PathBuf> {
        files(self.mail.path(), "eml")
    }

    /// The texts written so far (`<id>.txt`).
    pub fn sms_files(&self) -> Vec<PathBuf> {
        files(self.sms.path(), "txt")
    }

    /// The mail directory.
    pub fn mail_dir(&self) -> &Path {
        self.mail.path()
    }

    /// The text message directory.
    pub fn sms_dir(&self) -> &Path {
        self.sms.path()
    }
}
