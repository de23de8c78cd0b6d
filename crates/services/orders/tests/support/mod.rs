//! The orders role started in-process for tests: the real [`Runtime`] on a temporary SQLite
//! store and a temporary embedded broker, its router wrapped in the same layers
//! `Runtime::serve_on` adds (shared HTTP layers, JWT keys, health routes) and called without a
//! socket. The test plays the saga's participants (inventory, payments): it reads the commands
//! the engine wrote to the `outbox` table, builds each reply with [`CommandHeader::reply`] and
//! feeds it to [`SagaEngine::on_reply`](bazaar_kit::saga::SagaEngine::on_reply) in one store
//! transaction, committed when the engine accepts it and rolled back when it does not, as the
//! orders role's reply consumer does. No saga timer runs, so nothing moves unless a test says so.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::{
    body::Body,
    http::{header, HeaderMap, Method, Request, StatusCode},
    Router,
};
use bazaar_contracts::{topics, types, OrderOutcome, Paid, PricedLine, Reserved};
use bazaar_kit::{
    auth::ADMIN,
    consumer::HandlerError,
    envelope::Envelope,
    runtime::{RoleConfig, Runtime},
    saga::{CommandHeader, Verdict},
    shutdown::{self, ShutdownTrigger},
    testing::TestDb,
};
use bazaar_orders::Orders;
use serde_json::{json, Value};
use sqlx::Row;
use tower::ServiceExt;
use uuid::Uuid;

/// A running orders role.
pub struct Shop {
    pub rt: Runtime,
    pub orders: Orders,
    app: Router,
    stop: ShutdownTrigger,
    _store: TestDb,
    _bus: tempfile::TempDir,
}

impl Drop for Shop {
    fn drop(&mut self) {
        // Stops the outbox relay the runtime started.
        self.stop.trigger();
    }
}

/// A user with a token.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub token: String,
}

/// What the API answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The response's content type ("" when none).
    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Asserts a problem response with `status` and returns its detail.
    #[track_caller]
    pub fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.content_type(), "application/problem+json", "{:?}", self.body);
        assert_eq!(self.body["status"], status.as_u16(), "{:?}", self.body);
        self.body["detail"]
            .as_str()
            .expect("a problem has a detail")
            .to_string()
    }

    /// Asserts `status` and returns the body.
    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{:?}", self.body);
        self.body
    }
}

/// Starts orders on a fresh store and broker.
pub async fn start() -> Shop {
    let store = TestDb::sqlite("orders.db");
    let bus = tempfile::tempdir().expect("temp dir");
    let config = RoleConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        store_url: store.url.clone(),
        broker_url: format!("sqlite://{}", bus.path().join("bus.db").display()),
        jwt_secret: "orders-test-secret".into(),
    };
    let (stop, shutdown) = shutdown::channel();
    let rt = Runtime::start(&bazaar_orders::SERVICE, &config, shutdown)
        .await
        .expect("start orders");
    let orders = Orders::new(rt.clone());
    // What Runtime::serve_on builds around the service's router.
    let app = bazaar_kit::http::finish(
        bazaar_orders::router(orders.clone())
            .merge(rt.health().routes())
            .layer(axum::Extension(rt.keys.clone())),
    );
    Shop {
        rt,
        orders,
        app,
        stop,
        _store: store,
        _bus: bus,
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
    /// A token for a plain customer.
    pub fn customer(&self) -> User {
        let id = Uuid::now_v7();
        let token = self
            .rt
            .keys
            .issue(id, &format!("{id}@example.com"), &[])
            .expect("customer token");
        User { id, token }
    }

    /// A token for an operator.
    pub fn admin(&self) -> User {
        let id = Uuid::now_v7();
        let token = self
            .rt
            .keys
            .issue(id, "admin@example.com", &[ADMIN.to_string()])
            .expect("admin token");
        User { id, token }
    }

    /// Sends one request through the served router.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.clone().oneshot(request).await.expect("router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer { status, headers, body }
    }

    /// A request with `token` (if any) and a JSON `body` (if any), and `headers`.
    pub fn request(
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Request<Body> {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .expect("request")
    }

    /// Sends `method uri` with `token` and a JSON `body`.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.send(Shop::request(method, uri, token, &[], body.as_ref())).await
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
        sqlx::query("SELECT status FROM orders WHERE id = $1")
            .bind(order.to_string())
            .fetch_one(self.rt.store.pool())
            .await
            .expect("the order row")
            .get("status")
    }

    /// How many rows `table` has.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query(&format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table}"))
            .fetch_one(self.rt.store.pool())
            .await
            .expect("count")
            .get("n")
    }

    /// Every envelope in the outbox on `topic` about `order`, oldest first.
    pub async fn outbox(&self, topic: &str, order: Uuid) -> Vec<Envelope> {
        sqlx::query("SELECT body FROM outbox WHERE topic = $1 ORDER BY id")
            .bind(topic)
            .fetch_all(self.rt.store.pool())
            .await
            .expect("outbox")
            .iter()
            .map(|row| Envelope::from_slice(row.get::<String, _>("body").as_bytes()).expect("an envelope"))
            .filter(|e| e.aggregate_id == order.to_string())
            .collect()
    }

    /// Every saga command the engine sent for `order` (to inventory or payments), in order.
    pub async fn sent(&self, order: Uuid) -> Vec<Sent> {
        let rows = sqlx::query("SELECT topic, body FROM outbox WHERE topic IN ($1, $2) ORDER BY id")
            .bind(topics::INVENTORY_COMMANDS)
            .bind(topics::PAYMENTS_COMMANDS)
            .fetch_all(self.rt.store.pool())
            .await
            .expect("outbox");
        rows.iter()
            .map(|row| {
                let envelope = Envelope::from_slice(row.get::<String, _>("body").as_bytes()).expect("an envelope");
                let header = CommandHeader::of(&envelope).expect("a saga command");
                Sent {
                    topic: row.get("topic"),
                    envelope,
                    header,
                }
            })
            .filter(|s| s.header.saga_id == order.to_string())
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
        match self.orders.engine.on_reply(&mut tx, reply).await {
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
