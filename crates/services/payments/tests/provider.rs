//! Payments charging through an outside provider: the simulator on a free port, the
//! `PaymentCommands` handler driven through real store transactions on a temporary SQLite
//! store, as the consumer drives it (commit on success, roll back on error), and the settler
//! that calls the provider outside any transaction and answers the saga.

use bazaar_kit::store;
use std::time::Duration;

use bazaar_contracts::{types, OrderRef, ProcessPayment};
use bazaar_kit::{
    client::ClientPolicy,
    consumer::{Handler, HandlerError},
    envelope::{Envelope, Metadata},
    outbox::{self, Outbox},
    resilience::{BreakerConfig, BreakerState},
    shutdown::Shutdown,
    store::Store,
};
use bazaar_payments::{
    ledger,
    provider::default_policy,
    settle::settle_round,
    simulator::{self, SimulatorState, Stats},
    PaymentCommands, PaymentProvider, MIGRATIONS,
};
use bazaar_saga::CommandHeader;
use serde_json::{json, Value};
use uuid::Uuid;

const REPLIES: &str = bazaar_contracts::topics::ORDER_SAGA_REPLIES;

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

    async fn last_outbox_id(&self) -> i64 {
        store::query("SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM outbox")
            .fetch_one(&self.store)
            .await
            .expect("max id")
            .try_get(0)
            .expect("a column")
    }

    /// Saga replies written after outbox row `after`, as `(ok, reason)`.
    async fn replies_after(&self, after: i64) -> Vec<(bool, Option<String>)> {
        store::query("SELECT body FROM outbox WHERE topic = $1 AND id > $2 ORDER BY id")
            .bind(REPLIES)
            .bind(after)
            .fetch_all(&self.store)
            .await
            .expect("replies")
            .iter()
            .map(|row| {
                let body: String = row.try_get("body").expect("a column");
                let reply = Envelope::from_slice(body.as_bytes()).expect("reply envelope").payload;
                (
                    reply["ok"].as_bool().expect("ok flag"),
                    reply["reason"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    /// Runs `command` as the consumer does; `commit: false` plays a crash before the commit.
    /// Returns the saga reply it wrote, or `None` when the settler is to answer.
    async fn handle(
        &self,
        payments: &PaymentCommands,
        command: &Envelope,
        commit: bool,
    ) -> Result<Option<(bool, Option<String>)>, HandlerError> {
        let before = self.last_outbox_id().await;
        let mut tx = self.store.begin().await.expect("tx");
        let handler = bazaar_payments::payment_commands(payments.clone());
        if let Err(e) = handler.handle(&mut tx, command).await {
            tx.rollback().await.expect("rollback");
            return Err(e);
        }
        if !commit {
            tx.rollback().await.expect("rollback");
            return Ok(None);
        }
        tx.commit().await.expect("commit");
        Ok(self.replies_after(before).await.pop())
    }

    /// Runs the settler until it has nothing left that is due (or 10 s pass); returns the
    /// replies it wrote.
    async fn settle(&self, payments: &PaymentCommands) -> Vec<(bool, Option<String>)> {
        let provider = payments.provider.as_ref().expect("provider");
        let outbox = Outbox::new(self.store.clone());
        let before = self.last_outbox_id().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            settle_round(&outbox, provider).await.expect("settle round");
            let open: i64 =
                store::query("SELECT COUNT(*) FROM payment WHERE status IN ('charging', 'voiding', 'refunding')")
                    .fetch_one(&self.store)
                    .await
                    .expect("open")
                    .try_get(0)
                    .expect("a column");
            if open == 0 || tokio::time::Instant::now() > deadline {
                return self.replies_after(before).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn payment(&self, order: Uuid) -> (String, Option<String>) {
        let row = store::query("SELECT status, provider_charge_id FROM payment WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_one(&self.store)
            .await
            .expect("payment row");
        (
            row.try_get("status").expect("status"),
            row.try_get("provider_charge_id").expect("charge id"),
        )
    }

    async fn balance(&self, customer: Uuid) -> i64 {
        ledger::balance(&self.store, &ledger::wallet(&customer))
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
    let metadata = Metadata {
        source: "orders".into(),
        ..Metadata::default()
    };
    Envelope::new(event_type, order.to_string(), payload, metadata)
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
async fn a_charge_is_held_then_settled_with_the_provider_charge_id() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    let deferred = w
        .handle(&payments, &process(order, customer, 2_500), true)
        .await
        .expect("handled");
    assert_eq!(deferred, None, "the saga is answered after the provider is");
    assert_eq!(w.payment(order).await.0, "charging");
    assert_eq!(w.balance(customer).await, 7_500, "the amount is on hold");
    assert_eq!(w.stats().await.charges, 0, "no provider call inside the transaction");

    let replies = w.settle(&payments).await;
    assert_eq!(replies.len(), 1);
    assert!(replies[0].0, "{replies:?}");
    let (status, charge) = w.payment(order).await;
    assert_eq!(status, "captured");
    assert!(charge.as_deref().is_some_and(|c| c.starts_with("ch_")), "{charge:?}");
    assert_eq!(w.balance(customer).await, 7_500);
    let stats = w.stats().await;
    assert_eq!((stats.charges, stats.succeeded), (1, 1));
    // A redelivered command is answered from the record, with no second charge.
    let again = w
        .handle(&payments, &process(order, customer, 2_500), true)
        .await
        .expect("handled");
    assert_eq!(again.map(|r| r.0), Some(true));
    assert_eq!(w.stats().await.charges, 1);
}

#[tokio::test]
async fn a_declined_charge_replies_failure_and_releases_the_hold() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    w.control(json!({"declineRate": 1.0})).await;
    let order = Uuid::new_v4();
    assert_eq!(
        w.handle(&payments, &process(order, customer, 2_500), true)
            .await
            .expect("handled"),
        None
    );
    let replies = w.settle(&payments).await;
    assert_eq!(replies.len(), 1);
    assert!(!replies[0].0);
    assert!(
        replies[0].1.as_deref().is_some_and(|r| r.contains("declined")),
        "{replies:?}"
    );
    assert_eq!(w.payment(order).await, ("failed".to_string(), None));
    assert_eq!(w.balance(customer).await, 10_000, "nothing was taken");
}

#[tokio::test]
async fn an_outage_waits_and_the_charge_is_made_once_when_it_ends() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    w.control(json!({"outage": true})).await;
    assert_eq!(
        w.handle(&payments, &process(order, customer, 1_000), true)
            .await
            .expect("handled"),
        None
    );

    // The settler keeps asking; soon the breaker opens and calls fail without a request.
    let provider = payments.provider.as_ref().expect("provider");
    let outbox = Outbox::new(w.store.clone());
    for _ in 0..3 {
        store::query("UPDATE payment SET next_try_at = 0")
            .execute(&w.store)
            .await
            .expect("due");
        assert_eq!(settle_round(&outbox, provider).await.expect("round"), 0);
    }
    assert_eq!(provider.breaker_state(), BreakerState::Open);
    assert!(provider.check().is_err(), "health reports the provider down while open");
    let seen = w.stats().await.requests;
    store::query("UPDATE payment SET next_try_at = 0")
        .execute(&w.store)
        .await
        .expect("due");
    assert_eq!(settle_round(&outbox, provider).await.expect("round"), 0);
    assert_eq!(w.stats().await.requests, seen, "an open breaker sends nothing");
    assert_eq!(w.payment(order).await.0, "charging", "still waiting, nothing lost");

    w.control(json!({"outage": false})).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let replies = w.settle(&payments).await;
    assert_eq!(replies.iter().filter(|r| r.0).count(), 1, "{replies:?}");
    assert_eq!(w.payment(order).await.0, "captured");
    assert_eq!(w.stats().await.charges, 1);
    assert_eq!(w.balance(customer).await, 9_000);
}

#[tokio::test]
async fn a_refund_goes_to_the_provider_once() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    w.handle(&payments, &process(order, customer, 4_000), true)
        .await
        .expect("charge");
    assert!(w.settle(&payments).await[0].0);

    // A crash before the refund's commit, then the redelivery, then a duplicate.
    assert_eq!(w.handle(&payments, &refund(order), false).await.expect("refund"), None);
    assert_eq!(w.handle(&payments, &refund(order), true).await.expect("refund"), None);
    assert_eq!(w.payment(order).await.0, "refunding");
    let replies = w.settle(&payments).await;
    assert_eq!(replies, vec![(true, None)]);
    let dup = w
        .handle(&payments, &refund(order), true)
        .await
        .expect("duplicate refund");
    assert_eq!(dup.map(|r| r.0), Some(true));
    assert_eq!(w.payment(order).await.0, "refunded");
    assert_eq!(w.balance(customer).await, 10_000);
    let stats = w.stats().await;
    assert_eq!((stats.charges, stats.refunds), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn a_refund_that_overtakes_its_charge_undoes_whatever_the_provider_did() {
    let w = world().await;
    let payments = w.payments();
    let customer = w.customer(10_000).await;
    let order = Uuid::new_v4();
    // The provider is down while the charge is due; the saga gives up and compensates.
    w.control(json!({"outage": true})).await;
    assert_eq!(
        w.handle(&payments, &process(order, customer, 3_000), true)
            .await
            .expect("charge"),
        None
    );
    assert_eq!(w.handle(&payments, &refund(order), true).await.expect("refund"), None);
    assert_eq!(w.payment(order).await.0, "voiding");
    // A late process command must not charge a voided order.
    assert_eq!(
        w.handle(&payments, &process(order, customer, 3_000), true)
            .await
            .expect("late")
            .map(|r| r.0),
        Some(false)
    );

    w.control(json!({"outage": false})).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let replies = w.settle(&payments).await;
    assert_eq!(replies, vec![(true, None)], "the refund is answered once");
    assert_eq!(
        w.payment(order).await.0,
        "refunded",
        "taken at the provider, then given back"
    );
    assert_eq!(w.balance(customer).await, 10_000, "the hold went back to the wallet");
    let stats = w.stats().await;
    assert_eq!((stats.charges, stats.refunds), (1, 1), "{stats:?}");
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
