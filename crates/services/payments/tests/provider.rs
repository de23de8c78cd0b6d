//! Payments charging through an outside provider: the simulator on a free port, the
//! `PaymentCommands` handler driven through real store transactions on a temporary SQLite
//! store, as the consumer drives it (commit on success, roll back on error).

use std::time::Duration;

use bazaar_contracts::{types, OrderRef, ProcessPayment};
use bazaar_kit::{
    client::ClientPolicy,
    consumer::{Handler, HandlerError},
    envelope::{Envelope, Metadata},
    outbox,
    resilience::{BreakerConfig, BreakerState},
    saga::CommandHeader,
    shutdown::Shutdown,
    store::Store,
};
use bazaar_payments::{
    ledger,
    provider::default_policy,
    simulator::{self, SimulatorState, Stats},
    PaymentCommands, PaymentProvider, MIGRATIONS,
};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

const REPLIES: &str = "orders.replies";

struct World {
    store: Store,
    sim: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&format!("sqlite://{}/payments.db", dir.path().display()))
        .await
        .expect("store");
    let all: Vec<_> = outbox::MIGRATIONS.iter().chain(MIGRATIONS).cloned().collect();
    store.migrate(&all).await.expect("migrate");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sim = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(simulator::serve(listener, SimulatorState::default(), Shutdown::never()));
    World {
        store,
        sim,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl World {
    /// Payments with a provider whose breaker rests only briefly, so tests can watch it recover.
    fn payments(&self) -> PaymentCommands {
        let policy = ClientPolicy {
            backoff_base: Duration::from_millis(5),
            breaker: BreakerConfig {
                open_for: Duration::from_millis(300),
                ..default_policy().breaker
            },
            ..default_policy()
        };
        PaymentCommands {
            decline_rate: 0.0,
            provider: Some(PaymentProvider::with_policy(&self.sim, policy).expect("provider")),
        }
    }

    async fn control(&self, patch: Value) {
        let r = self
            .http
            .post(format!("{}/_control", self.sim))
            .json(&patch)
            .send()
            .await
            .expect("control");
        assert!(r.status().is_success(), "{}", r.status());
    }

    async fn stats(&self) -> Stats {
        self.http
            .get(format!("{}/_stats", self.sim))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats body")
    }

    /// A customer with a funded wallet.
    async fn customer(&self, cents: i64) -> Uuid {
        let customer = Uuid::new_v4();
        let mut tx = self.store.begin().await.expect("tx");
        ledger::open(&mut tx, ledger::EXTERNAL, "USD").await.expect("external");
        let wallet = ledger::wallet(&customer);
        ledger::open(&mut tx, &wallet, "USD").await.expect("wallet");
        ledger::transfer(&mut tx, ledger::EXTERNAL, &wallet, cents, "deposit", "test")
            .await
            .expect("deposit");
        tx.commit().await.expect("commit");
        customer
    }

    /// Runs `command` as the consumer does; `commit: false` plays a crash before the commit.
    /// Returns the saga reply's `(ok, reason)`.
    async fn handle(
        &self,
        payments: &PaymentCommands,
        command: &Envelope,
        commit: bool,
    ) -> Result<(bool, Option<String>), HandlerError> {
        let mut tx = self.store.begin().await.expect("tx");
        if let Err(e) = payments.handle(&mut tx, command).await {
            tx.rollback().await.expect("rollback");
            return Err(e);
        }
        let row = sqlx::query("SELECT body FROM outbox WHERE topic = $1 ORDER BY id DESC LIMIT 1")
            .bind(REPLIES)
            .fetch_one(&mut *tx)
            .await
            .expect("a reply in the outbox");
        let body: String = row.try_get("body").expect("body");
        let reply = Envelope::from_slice(body.as_bytes()).expect("reply envelope").payload;
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
        Ok((
            reply["ok"].as_bool().expect("ok flag"),
            reply["reason"].as_str().map(str::to_string),
        ))
    }

    async fn payment(&self, order: Uuid) -> (String, Option<String>) {
        let row = sqlx::query("SELECT status, provider_charge_id FROM payment WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_one(self.store.pool())
            .await
            .expect("payment row");
        (
            row.try_get("status").expect("status"),
            row.try_get("provider_charge_id").expect("charge id"),
        )
    }

    async fn balance(&self, customer: Uuid) -> i64 {
        ledger::balance(self.store.pool(), &ledger::wallet(&customer))
            .await
            .expect("balance")
    }
}

fn command(event_type: &str, payload: Value, order: Uuid, compensation: bool) -> Envelope {
    let header = CommandHeader {
        saga_id: order.to_string(),
        step: "processPayment".into(),
        compensation,
        reply_to: REPLIES.into(),
        reply_type: "orders.saga.reply".into(),
    };
    let mut payload = payload;
    if let (Some(obj), Ok(Value::Object(h))) = (payload.as_object_mut(), serde_json::to_value(&header)) {
        obj.extend(h);
    }
    Envelope::new(event_type, order.to_string(), payload, Metadata::default())
}

fn process(order: Uuid, customer: Uuid, cents: i64) -> Envelope {
    let cmd = ProcessPayment {
        order_id: order,
        customer_id: customer,
        amount_cents: cents,
        currency: "USD".into(),
    };
    command(types::PROCESS_PAYMENT, json!(cmd), order, false)
}

fn refund(order: Uuid) -> Envelope {
    command(types::REFUND_PAYMENT, json!(OrderRef { order_id: order }), order, true)
}

#[tokio::test]
async fn a_charge_succeeds_and_records_the_provider_charge_id() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    let (ok, reason) = w
        .handle(&payments, &process(order, customer, 2_500), true)
        .await
        .expect("handled");
    assert!(ok, "{reason:?}");
    let (status, charge) = w.payment(order).await;
    assert_eq!(status, "captured");
    assert!(charge.as_deref().is_some_and(|c| c.starts_with("ch_")), "{charge:?}");
    assert_eq!(w.balance(customer).await, 7_500, "the ledger still moves the money");
    let stats = w.stats().await;
    assert_eq!((stats.charges, stats.succeeded), (1, 1));
}

#[tokio::test]
async fn a_failed_charge_replies_failure_and_is_stored_failed() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    w.control(json!({"declineRate": 1.0})).await;
    let order = Uuid::new_v4();
    let (ok, reason) = w
        .handle(&payments, &process(order, customer, 2_500), true)
        .await
        .expect("handled");
    assert!(!ok);
    assert!(reason.as_deref().is_some_and(|r| r.contains("declined")), "{reason:?}");
    assert_eq!(w.payment(order).await, ("failed".to_string(), None));
    assert_eq!(w.balance(customer).await, 10_000, "nothing was taken");
}

#[tokio::test]
async fn an_outage_is_transient_and_a_redelivery_never_charges_twice() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    let cmd = process(order, customer, 1_000);

    w.control(json!({"outage": true})).await;
    // Each delivery's retries fail; soon the breaker opens and calls fail without a request.
    for _ in 0..3 {
        let r = w.handle(&payments, &cmd, true).await;
        assert!(matches!(r, Err(HandlerError::Transient(_))), "{r:?}");
    }
    let provider = payments.provider.as_ref().expect("provider");
    assert_eq!(provider.breaker_state(), BreakerState::Open);
    assert!(provider.check().is_err(), "health reports the provider down while open");
    let seen = w.stats().await.requests;
    assert!(matches!(
        w.handle(&payments, &cmd, true).await,
        Err(HandlerError::Transient(_))
    ));
    assert_eq!(w.stats().await.requests, seen, "an open breaker sends nothing");
    assert_eq!(w.stats().await.charges, 0);

    w.control(json!({"outage": false})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (ok, _) = loop {
        match w.handle(&payments, &cmd, false).await {
            // The first good delivery "crashes" before its commit: the charge happened at
            // the provider, but payments recorded nothing.
            Ok(reply) => break reply,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "the provider recovers: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(ok);
    let (ok, _) = w.handle(&payments, &cmd, true).await.expect("redelivery");
    assert!(ok);
    assert_eq!(w.payment(order).await.0, "captured");
    let stats = w.stats().await;
    assert_eq!(
        stats.charges, 1,
        "one charge per order despite the redelivery: {stats:?}"
    );
    assert!(
        stats.replays >= 1,
        "the redelivery was answered from the idempotency key"
    );
    assert_eq!(w.balance(customer).await, 9_000);
    assert_eq!(provider.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_refund_goes_to_the_provider_once() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    let (ok, _) = w
        .handle(&payments, &process(order, customer, 4_000), true)
        .await
        .expect("charge");
    assert!(ok);

    // A crash after the provider refunded, then the redelivery, then a duplicate.
    let (ok, _) = w.handle(&payments, &refund(order), false).await.expect("refund");
    assert!(ok);
    let (ok, _) = w
        .handle(&payments, &refund(order), true)
        .await
        .expect("redelivered refund");
    assert!(ok);
    let (ok, _) = w
        .handle(&payments, &refund(order), true)
        .await
        .expect("duplicate refund");
    assert!(ok);
    assert_eq!(w.payment(order).await.0, "refunded");
    assert_eq!(w.balance(customer).await, 10_000);
    let stats = w.stats().await;
    assert_eq!(stats.refunds, 1, "{stats:?}");
    assert_eq!(stats.charges, 1);
}

#[tokio::test]
async fn the_simulator_refuses_a_key_reused_with_other_parameters() {
    let w = world().await;
    let charge = |amount: i64| {
        w.http
            .post(format!("{}/v1/charges", w.sim))
            .header("Idempotency-Key", "order-1")
            .json(&json!({"amount": amount, "currency": "USD", "customer": "c", "description": "d"}))
            .send()
    };
    let first: Value = charge(100).await.expect("charge").json().await.expect("body");
    let again: Value = charge(100).await.expect("charge").json().await.expect("body");
    assert_eq!(first["id"], again["id"], "same key, same charge");
    assert_eq!(charge(200).await.expect("charge").status(), 400);
    let control: Value = w
        .http
        .get(format!("{}/_control", w.sim))
        .send()
        .await
        .expect("control")
        .json()
        .await
        .expect("body");
    assert_eq!(control["outage"], false);
    assert_eq!(w.stats().await.charges, 1);
}
