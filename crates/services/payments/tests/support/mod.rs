//! The payments role started in-process for tests (the kit's [`TestRole`]: the real
//! [`Runtime`] on a temporary SQLite store and embedded broker, its app called without a
//! socket). Consumers are not started: the test builds each event or saga command and runs
//! the role's handler (`UserEvents`, or `PaymentCommands` as the saga participant the
//! role's consumer runs) inside one store transaction, committed through the outbox when the
//! handler succeeds and rolled back when it fails, as the consumer runner does; then reads
//! what it wrote (the reply in the `outbox`, the `payment` row, the `ledger_entry` rows).
//! No payment provider is configured, so the wallet alone pays and every command is answered
//! at once.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::http::{Method, StatusCode};
use bazaar_contracts::{topics, types, OrderRef, ProcessPayment, UserRegistered};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::{Envelope, Metadata},
    runtime::Runtime,
};
use bazaar_payments::{ledger, PaymentCommands, PaymentsConfig, UserEvents};
use bazaar_saga::{CommandHeader, SagaReply};
use bazaar_testkit::{TestDb, TestRole};

pub use bazaar_testkit::Answer;
use serde_json::{json, Value};
use uuid::Uuid;

/// The correlation id every test event carries.
pub const CORRELATION: &str = "payments-test";

/// The welcome credit a new wallet receives (the role's default).
pub fn welcome() -> i64 {
    PaymentsConfig::default().welcome_credit_cents
}

/// A running payments role.
pub struct Payments {
    pub rt: Runtime,
    role: TestRole,
}

/// A customer with a token.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: Uuid,
    pub token: String,
}

/// Starts payments on a fresh store and broker.
pub async fn start() -> Payments {
    start_on(TestDb::sqlite("payments.db")).await
}

/// Starts payments on `db` (SQLite or PostgreSQL) and a fresh broker.
pub async fn start_on(db: TestDb) -> Payments {
    let role = TestRole::start_on(&bazaar_payments::SERVICE, |rt| bazaar_payments::router(rt.clone()), db).await;
    Payments {
        rt: role.rt.clone(),
        role,
    }
}

/// Payments on SQLite, and on PostgreSQL when the tests have a server.
pub async fn on_both_engines() -> Vec<Payments> {
    let mut roles = Vec::new();
    for db in TestDb::both("payments").await {
        roles.push(start_on(db).await);
    }
    roles
}

/// `user.registered` for `user`, as users announces it.
pub fn registered(user: Uuid) -> Envelope {
    let payload = UserRegistered {
        user_id: user,
        email: format!("{user}@example.com"),
        name: "Ann".into(),
        phone: None,
    };
    let metadata = Metadata {
        correlation_id: CORRELATION.into(),
        source: "users".into(),
        ..Metadata::default()
    };
    Envelope::new(types::USER_REGISTERED, user.to_string(), payload, metadata)
}

/// A saga command as the order saga's engine sends it: the payload plus the routing header.
pub fn command(event_type: &str, payload: Value, order: Uuid, compensation: bool) -> Envelope {
    let header = CommandHeader {
        saga_id: order.to_string(),
        step: "processPayment".into(),
        compensation,
        reply_to: topics::ORDER_SAGA_REPLIES.into(),
        reply_type: types::ORDER_SAGA_REPLY.into(),
    };
    let mut payload = payload;
    if let (Some(obj), Ok(Value::Object(h))) = (payload.as_object_mut(), serde_json::to_value(&header)) {
        obj.extend(h);
    }
    let metadata = Metadata {
        correlation_id: CORRELATION.into(),
        source: "orders".into(),
        ..Metadata::default()
    };
    Envelope::new(event_type, order.to_string(), payload, metadata)
}

/// `payments.process`: charge `customer` `amount_cents` in `currency` for `order`.
pub fn pay_in(order: Uuid, customer: Uuid, amount_cents: i64, currency: &str) -> Envelope {
    let cmd = ProcessPayment {
        order_id: order,
        customer_id: customer,
        amount_cents,
        currency: currency.into(),
    };
    command(types::PROCESS_PAYMENT, json!(cmd), order, false)
}

/// `payments.process` in USD, the wallets' currency.
pub fn pay(order: Uuid, customer: Uuid, amount_cents: i64) -> Envelope {
    pay_in(order, customer, amount_cents, "USD")
}

/// `payments.refund` (the compensation of paying) for `order`.
pub fn refund(order: Uuid) -> Envelope {
    command(types::REFUND_PAYMENT, json!(OrderRef { order_id: order }), order, true)
}

impl Payments {
    /// A token for an operator.
    pub fn admin(&self) -> String {
        self.role.admin_token()
    }

    /// A new customer (no wallet yet) and their token.
    pub fn stranger(&self) -> Customer {
        let (id, token) = self.role.customer();
        Customer { id, token }
    }

    /// A new customer whose `user.registered` was handled: a wallet with the welcome credit.
    pub async fn customer(&self) -> Customer {
        let customer = self.stranger();
        self.on_user_event(&registered(customer.id)).await.expect("registered");
        customer
    }

    /// Sends `method uri` with `token` and a JSON `body` through the served router.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.role.call(method, uri, token, body).await
    }

    /// Drops the role's database (a PostgreSQL one outlives the test otherwise).
    pub async fn finish(self) {
        self.role.drop_database().await;
    }

    /// The engine the role's store runs on, for assertion messages.
    pub fn engine(&self) -> String {
        format!("{:?}", self.rt.store.dialect())
    }

    /// Runs `handler` on `event` as the consumer runner does (without the inbox, so a
    /// repeated envelope shows the handler's own idempotency): one transaction, committed
    /// through the outbox when it succeeds, rolled back when it fails.
    pub async fn run(&self, handler: &dyn Handler, event: &Envelope) -> Result<(), HandlerError> {
        self.role.handle(handler, event).await
    }

    /// Runs a `users.events` event through `UserEvents` with the default welcome credit.
    pub async fn on_user_event(&self, event: &Envelope) -> Result<(), HandlerError> {
        let handler = UserEvents {
            welcome_credit_cents: welcome(),
        };
        self.run(&handler, event).await
    }

    /// Runs a saga command through `PaymentCommands` (no provider, no simulated declines)
    /// and returns the reply it wrote.
    pub async fn handle(&self, command: &Envelope) -> Result<SagaReply, HandlerError> {
        let handler = bazaar_payments::payment_commands(PaymentCommands::default());
        self.run(&handler, command).await?;
        // The latest: a repeated envelope is answered again, under the same causation.
        let mut replies = self.replies_to(command).await;
        Ok(replies
            .pop()
            .unwrap_or_else(|| panic!("no reply to {}", command.event_type)))
    }

    /// Runs `command` and returns the reply's data, failing the test if payments refused.
    pub async fn ok(&self, command: &Envelope) -> Value {
        let reply = self.handle(command).await.expect("handled");
        assert!(reply.ok, "{} refused: {:?}", command.event_type, reply.reason);
        reply.data
    }

    /// Runs a `payments.process` and returns the payment id it answered with.
    pub async fn paid(&self, command: &Envelope) -> Uuid {
        let data = self.ok(command).await;
        data["paymentId"]
            .as_str()
            .expect("a payment id")
            .parse()
            .expect("a UUID")
    }

    /// Runs `command` and returns the reason payments gave for refusing it.
    pub async fn refused(&self, command: &Envelope) -> String {
        let reply = self.handle(command).await.expect("handled");
        assert!(!reply.ok, "{} was not refused: {:?}", command.event_type, reply.data);
        reply.reason.expect("a refusal has a reason")
    }

    /// Every reply written to the saga's reply topic for `command`, oldest first.
    pub async fn replies_to(&self, command: &Envelope) -> Vec<SagaReply> {
        self.role.replies_to(topics::ORDER_SAGA_REPLIES, command).await
    }

    /// Every envelope in the outbox on `topic`, oldest first.
    pub async fn outbox(&self, topic: &str) -> Vec<Envelope> {
        self.role.outbox(topic).await
    }

    /// How many rows `table` has.
    pub async fn count(&self, table: &str) -> i64 {
        store::query(&format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table}"))
            .fetch_one(&self.rt.store)
            .await
            .expect("count")
            .try_get("n")
            .expect("a column")
    }

    /// The balance of ledger account `account`.
    pub async fn balance(&self, account: &str) -> i64 {
        ledger::balance(&self.rt.store, account).await.expect("balance")
    }

    /// The balance of `customer`'s wallet.
    pub async fn wallet(&self, customer: Uuid) -> i64 {
        self.balance(&ledger::wallet(&customer)).await
    }

    /// The merchant's revenue.
    pub async fn revenue(&self) -> i64 {
        self.balance(ledger::REVENUE).await
    }

    /// True when `customer` has a wallet.
    pub async fn has_wallet(&self, customer: Uuid) -> bool {
        store::query("SELECT 1 AS one FROM account WHERE id = $1")
            .bind(ledger::wallet(&customer))
            .fetch_optional(&self.rt.store)
            .await
            .expect("account")
            .is_some()
    }

    /// `(status, amount, reason)` of the payment row of `order`, if any.
    pub async fn payment(&self, order: Uuid) -> Option<(String, i64, Option<String>)> {
        store::query("SELECT status, amount_cents, reason FROM payment WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_optional(&self.rt.store)
            .await
            .expect("payment")
            .map(|r| {
                (
                    r.try_get("status").expect("a column"),
                    r.try_get("amount_cents").expect("a column"),
                    r.try_get("reason").expect("a column"),
                )
            })
    }

    /// Asserts the double-entry rule: the whole ledger, and each of its transactions, sums
    /// to zero.
    pub async fn assert_ledger_balances(&self) {
        let total: Option<i64> = store::query("SELECT CAST(SUM(amount_cents) AS BIGINT) AS s FROM ledger_entry")
            .fetch_one(&self.rt.store)
            .await
            .expect("ledger sum")
            .try_get("s")
            .expect("a column");
        assert_eq!(total.unwrap_or(0), 0, "the ledger sums to zero");
        let unbalanced = store::query(
            "SELECT txn_id FROM ledger_entry GROUP BY txn_id HAVING CAST(SUM(amount_cents) AS BIGINT) <> 0",
        )
        .fetch_all(&self.rt.store)
        .await
        .expect("ledger transactions");
        assert!(unbalanced.is_empty(), "{} unbalanced transactions", unbalanced.len());
        let drifted: i64 = store::query(bazaar_payments::ledger::DRIFTED_ACCOUNTS)
            .fetch_scalar(&self.rt.store)
            .await
            .expect("kept balances");
        assert_eq!(drifted, 0, "every kept balance is the sum of its account's entries");
    }

    /// `GET /accounts/me` as `customer`, asserting a 200; returns the balance.
    pub async fn account_balance(&self, customer: &Customer) -> i64 {
        let body = self
            .call(Method::GET, "/accounts/me", Some(&customer.token), None)
            .await
            .expect(StatusCode::OK);
        body["balanceCents"].as_i64().expect("a balance")
    }
}
