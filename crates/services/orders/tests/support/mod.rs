//! The orders role started in-process for tests (the kit's [`TestRole`]: the real
//! [`Runtime`] on a temporary SQLite store and embedded broker, its app called without a
//! socket). The test plays the saga's participants (inventory, payments): it reads the commands
//! the engine wrote to the `outbox` table, builds each reply with [`CommandHeader::reply`] and
//! feeds it to [`SagaEngine::on_reply`](bazaar_saga::SagaEngine::on_reply) in one store
//! transaction, committed when the engine accepts it and rolled back when it does not, as the
//! orders role's reply consumer does. No saga timer runs, so nothing moves unless a test says so.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use bazaar_contracts::{topics, types, OrderOutcome, Paid, PricedLine, Reserved};
use bazaar_kit::store;
use bazaar_kit::{auth::ADMIN, consumer::HandlerError, envelope::Envelope, runtime::Runtime};
use bazaar_saga::{CommandHeader, Verdict};
use bazaar_testkit::{TestDb, TestRole};

use bazaar_orders::Orders;
pub use bazaar_testkit::Answer;
use serde_json::{json, Value};
use uuid::Uuid;

/// A running orders role.
pub struct Shop {
    pub rt: Runtime,
    pub orders: Orders,
    role: TestRole,
}

/// A user with a token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub token: String,
}

/// Starts orders on a fresh store and broker.
pub async fn start() -> Shop {
    start_limited(bazaar_orders::AdmissionLimits::default()).await
}

/// Starts orders admitting orders under `limits` (the count of sagas in flight is kept
/// fresh, as the role does).
pub async fn start_limited(limits: bazaar_orders::AdmissionLimits) -> Shop {
    start_limited_on(limits, TestDb::sqlite("orders.db")).await
}

/// As [`start_limited`], on `db` (SQLite or PostgreSQL).
pub async fn start_limited_on(limits: bazaar_orders::AdmissionLimits, db: TestDb) -> Shop {
    let mut orders = None;
    let role = TestRole::start_on(
        &bazaar_orders::SERVICE,
        |rt| {
            let built = Orders::limited(rt.clone(), limits);
            built.admission.watch(rt);
            orders = Some(built.clone());
            bazaar_orders::router(built)
        },
        db,
    )
    .await;
    Shop {
        rt: role.rt.clone(),
        orders: orders.expect("the router was built"),
        role,
    }
}

/// `{"items": [...]}` for `(product, quantity)` lines.
pub fn items(lines: &[(Uuid, i64)]) -> Value {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(product, quantity)| json!({"productId": product, "quantity": quantity}))
        .collect();
    json!({ "items": lines })
}

/// What inventory answers for a reservation of `lines` at `unit_price_cents` each.
pub fn priced(lines: &[(Uuid, i64)], unit_price_cents: i64, currency: &str) -> Reserved {
    let priced_lines: Vec<PricedLine> = lines
        .iter()
        .map(|&(product_id, quantity)| PricedLine {
            product_id,
            quantity,
            unit_price_cents,
        })
        .collect();
    Reserved {
        total_cents: priced_lines.iter().map(|l| l.quantity * l.unit_price_cents).sum(),
        priced_lines,
        currency: currency.into(),
    }
}

/// A saga command the engine left in the outbox.
#[derive(Debug, Clone)]
pub struct Sent {
    pub topic: String,
    pub envelope: Envelope,
    pub header: CommandHeader,
}

impl Sent {
    /// The command's payload as `T`.
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> T {
        self.envelope.payload_as().expect("the command's payload")
    }
}

impl Shop {
    /// Drops the role's database (a PostgreSQL one outlives the test otherwise).
    pub async fn finish(self) {
        self.role.drop_database().await;
    }

    /// The engine the role's store runs on, for assertion messages.
    pub fn engine(&self) -> String {
        format!("{:?}", self.rt.store.dialect())
    }

    /// A token for a plain customer.
    pub fn customer(&self) -> User {
        let (id, token) = self.role.customer();
        User { id, token }
    }

    /// A token for an operator.
    pub fn admin(&self) -> User {
        let id = Uuid::now_v7();
        let token = self.role.token(id, "admin@example.com", &[ADMIN.to_string()]);
        User { id, token }
    }

    /// Sends one request through the served router.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        self.role.send(request).await
    }

    /// A request with `token` (if any) and a JSON `body` (if any), and `headers`.
    pub fn request(
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Request<Body> {
        TestRole::request(method, uri, token, headers, body)
    }

    /// Sends `method uri` with `token` and a JSON `body`.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.role.call(method, uri, token, body).await
    }

    /// `GET uri` as `user`.
    pub async fn get(&self, uri: &str, user: &User) -> Answer {
        self.call(Method::GET, uri, Some(&user.token), None).await
    }

    /// `POST /orders` as `user` with `body` and an optional Idempotency-Key.
    pub async fn post_order(&self, user: &User, body: &Value, key: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        self.send(Shop::request(
            Method::POST,
            "/orders",
            Some(&user.token),
            &headers,
            Some(body),
        ))
        .await
    }

    /// Places an order of `lines` as `user`, asserting the 202; returns its id.
    pub async fn place(&self, user: &User, lines: &[(Uuid, i64)]) -> Uuid {
        let body = self
            .post_order(user, &items(lines), None)
            .await
            .expect(StatusCode::ACCEPTED);
        body["id"].as_str().expect("an order id").parse().expect("a UUID")
    }

    /// The order as `GET /orders/{id}` shows it to `user`.
    pub async fn order(&self, user: &User, order: Uuid) -> Value {
        self.get(&format!("/orders/{order}"), user).await.expect(StatusCode::OK)
    }

    /// The order's stored status.
    pub async fn status(&self, order: Uuid) -> String {
        store::query("SELECT status FROM orders WHERE id = $1")
            .bind(order.to_string())
            .fetch_one(&self.rt.store)
            .await
            .expect("the order row")
            .try_get("status")
            .expect("a column")
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

    /// Every envelope in the outbox on `topic` about `order`, oldest first.
    pub async fn outbox(&self, topic: &str, order: Uuid) -> Vec<Envelope> {
        let mut envelopes = self.role.outbox(topic).await;
        envelopes.retain(|e| e.aggregate_id == order.to_string());
        envelopes
    }

    /// Every saga command the engine sent for `order` (to inventory or payments), in order.
    pub async fn sent(&self, order: Uuid) -> Vec<Sent> {
        self.sent_for(&order.to_string()).await
    }

    /// Every command saga `saga` sent, in order.
    pub async fn sent_for(&self, saga: &str) -> Vec<Sent> {
        let rows = store::query("SELECT topic, body FROM outbox WHERE topic IN ($1, $2) ORDER BY id")
            .bind(topics::INVENTORY_COMMANDS)
            .bind(topics::PAYMENTS_COMMANDS)
            .fetch_all(&self.rt.store)
            .await
            .expect("outbox");
        rows.iter()
            .map(|row| {
                let envelope = Envelope::from_slice(row.try_get::<String, _>("body").expect("a column").as_bytes())
                    .expect("an envelope");
                let header = CommandHeader::of(&envelope).expect("a saga command");
                Sent {
                    topic: row.try_get("topic").expect("a column"),
                    envelope,
                    header,
                }
            })
            .filter(|s| s.header.saga_id == saga)
            .collect()
    }

    /// The event types of [`Shop::sent`], e.g. `["inventory.reserve", "payments.process"]`.
    pub async fn sent_types(&self, order: Uuid) -> Vec<String> {
        self.sent(order)
            .await
            .into_iter()
            .map(|s| s.envelope.event_type)
            .collect()
    }

    /// The latest command of `event_type` sent for `order`.
    pub async fn latest(&self, order: Uuid, event_type: &str) -> Sent {
        let sent = self.sent(order).await;
        let types: Vec<&str> = sent.iter().map(|s| s.envelope.event_type.as_str()).collect();
        sent.iter()
            .rev()
            .find(|s| s.envelope.event_type == event_type)
            .cloned()
            .unwrap_or_else(|| panic!("no {event_type} was sent for {order}; sent: {types:?}"))
    }

    /// The reply of the participant `command` went to, with `verdict`.
    pub fn reply_to(command: &Sent, verdict: Verdict) -> Envelope {
        let source = if command.topic == topics::PAYMENTS_COMMANDS {
            "payments"
        } else {
            "inventory"
        };
        let (topic, reply) = command
            .header
            .reply(&command.envelope, source, verdict)
            .expect("a verdict that answers now");
        assert_eq!(topic, topics::ORDER_SAGA_REPLIES);
        assert_eq!(reply.event_type, types::ORDER_SAGA_REPLY);
        reply
    }

    /// Feeds `reply` to the engine as the reply consumer does: one transaction, committed
    /// when the engine accepts the reply, rolled back when it refuses it.
    pub async fn deliver(&self, reply: &Envelope) -> Result<(), HandlerError> {
        let mut tx = self.rt.store.begin().await.expect("begin");
        match self.orders.flows.on_reply(&mut tx, reply).await {
            Ok(()) => {
                self.rt.outbox.commit(tx).await.expect("commit");
                Ok(())
            }
            Err(e) => {
                tx.rollback().await.expect("rollback");
                Err(e)
            }
        }
    }

    /// Answers the latest `event_type` command of `order` with `verdict`; returns the reply.
    pub async fn answer(&self, order: Uuid, event_type: &str, verdict: Verdict) -> Envelope {
        let command = self.latest(order, event_type).await;
        let reply = Shop::reply_to(&command, verdict);
        self.deliver(&reply).await.expect("the engine accepts the reply");
        reply
    }

    /// Inventory reserves `order` as `reserved`.
    pub async fn reserve(&self, order: Uuid, reserved: &Reserved) -> Envelope {
        self.answer(order, types::RESERVE_STOCK, Verdict::done(reserved)).await
    }

    /// Payments takes the money for `order`; returns the payment id.
    pub async fn pay(&self, order: Uuid) -> Uuid {
        let payment_id = Uuid::now_v7();
        self.answer(order, types::PROCESS_PAYMENT, Verdict::done(&Paid { payment_id }))
            .await;
        payment_id
    }

    /// Inventory commits `order`'s reservation.
    pub async fn commit(&self, order: Uuid) -> Envelope {
        self.answer(order, types::COMMIT_STOCK, Verdict::done_empty()).await
    }

    /// Plays every participant agreeing: reserve as `reserved`, pay, commit.
    pub async fn confirm(&self, order: Uuid, reserved: &Reserved) {
        self.reserve(order, reserved).await;
        self.pay(order).await;
        self.commit(order).await;
    }

    /// The outcome events (`orders.events`) announced for `order`, with their payloads.
    pub async fn outcomes(&self, order: Uuid) -> Vec<(Envelope, OrderOutcome)> {
        self.outbox(topics::ORDERS_EVENTS, order)
            .await
            .into_iter()
            .map(|e| {
                let outcome = e.payload_as::<OrderOutcome>().expect("an order outcome");
                (e, outcome)
            })
            .collect()
    }

    /// The saga's history entries for `order`, as `"step: entry"`.
    pub async fn history(&self, order: Uuid) -> Vec<String> {
        self.orders
            .engine
            .history(&order.to_string())
            .await
            .expect("history")
            .into_iter()
            .map(|h| format!("{}: {}", h.step, h.entry))
            .collect()
    }
}
