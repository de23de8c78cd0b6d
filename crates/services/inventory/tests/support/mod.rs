//! The inventory role started in-process for tests (the kit's [`TestRole`]: the real
//! [`Runtime`] on a temporary SQLite store and embedded broker, its app called without a
//! socket), and the saga commands run through `StockCommands` (as the saga participant the
//! role's consumer runs) inside store transactions, as the consumer runner runs them.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::http::{Method, StatusCode};
use bazaar_contracts::{topics, types, LineRequest, OrderRef, ReserveStock};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
    runtime::Runtime,
};
use bazaar_saga::{CommandHeader, SagaReply};
use bazaar_testkit::{TestDb, TestRole};

pub use bazaar_testkit::Answer;
use serde_json::{json, Value};
use uuid::Uuid;

/// The correlation id every test command carries.
pub const CORRELATION: &str = "inventory-test";

/// A running inventory role.
pub struct Inventory {
    pub rt: Runtime,
    role: TestRole,
}

/// Starts inventory on a fresh store and broker.
pub async fn start() -> Inventory {
    start_on(TestDb::sqlite("inventory.db")).await
}

/// Starts inventory on `db` (SQLite or PostgreSQL) and a fresh broker.
pub async fn start_on(db: TestDb) -> Inventory {
    let role = TestRole::start_on(
        &bazaar_inventory::SERVICE,
        |rt| bazaar_inventory::router(rt.clone()),
        db,
    )
    .await;
    Inventory {
        rt: role.rt.clone(),
        role,
    }
}

/// Inventory on SQLite, and on PostgreSQL when the tests have a server.
pub async fn on_both_engines() -> Vec<Inventory> {
    let mut roles = Vec::new();
    for db in TestDb::both("inventory").await {
        roles.push(start_on(db).await);
    }
    roles
}

impl Inventory {
    /// Drops the role's database (a PostgreSQL one outlives the test otherwise).
    pub async fn finish(self) {
        self.role.drop_database().await;
    }

    /// The engine the role's store runs on, for assertion messages.
    pub fn engine(&self) -> String {
        format!("{:?}", self.rt.store.dialect())
    }

    /// A token for an operator.
    pub fn admin(&self) -> String {
        self.role.admin_token()
    }

    /// A token for a plain customer.
    pub fn customer(&self) -> String {
        self.role.customer().1
    }

    /// Sends one request through the served router.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.role.call(method, uri, token, body).await
    }

    /// Adds a USD product through the API as an admin; returns its id.
    pub async fn add_product(&self, sku: &str, price_cents: i64, stock: i64) -> Uuid {
        let token = self.admin();
        let answer = self
            .call(
                Method::POST,
                "/products",
                Some(&token),
                Some(json!({"sku": sku, "name": format!("{sku} (test)"), "priceCents": price_cents, "stock": stock})),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        answer.body["id"].as_str().expect("id").parse().expect("a UUID")
    }

    /// The product as `GET /products/{id}` shows it.
    pub async fn product(&self, id: Uuid) -> Value {
        let answer = self.call(Method::GET, &format!("/products/{id}"), None, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.body
    }

    /// `(stock, onHand, reserved)` of a product.
    pub async fn levels(&self, id: Uuid) -> (i64, i64, i64) {
        let p = self.product(id).await;
        let get = |k: &str| p[k].as_i64().unwrap_or_else(|| panic!("{k} in {p}"));
        (get("stock"), get("onHand"), get("reserved"))
    }

    /// Runs `command` as the consumer runner does: one transaction, committed through the
    /// outbox when the handler succeeds, rolled back when it fails. Returns the saga reply
    /// it wrote.
    pub async fn handle(&self, command: &Envelope) -> Result<SagaReply, HandlerError> {
        let handler = bazaar_inventory::stock_commands();
        self.role.handle(&handler, command).await?;
        let mut replies = self.replies_to(command).await;
        assert!(!replies.is_empty(), "no reply to {}", command.event_type);
        Ok(replies.pop().expect("a reply"))
    }

    /// Runs `command` and returns the reply's data, failing the test if inventory refused.
    pub async fn ok(&self, command: &Envelope) -> Value {
        let reply = self.handle(command).await.expect("handled");
        assert!(reply.ok, "{} refused: {:?}", command.event_type, reply.reason);
        reply.data
    }

    /// Runs `command` and returns the reason inventory gave for refusing it.
    pub async fn refused(&self, command: &Envelope) -> String {
        let reply = self.handle(command).await.expect("handled");
        assert!(!reply.ok, "{} was not refused: {:?}", command.event_type, reply.data);
        reply.reason.expect("a refusal has a reason")
    }

    /// Every reply written to the saga's reply topic for `command`, oldest first.
    pub async fn replies_to(&self, command: &Envelope) -> Vec<SagaReply> {
        self.role.replies_to(topics::ORDER_SAGA_REPLIES, command).await
    }

    /// Rows in the outbox (every reply inventory ever wrote).
    pub async fn outbox_rows(&self) -> i64 {
        store::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM outbox")
            .fetch_one(&self.rt.store)
            .await
            .expect("count")
            .try_get("n")
            .expect("a column")
    }

    /// Asserts what `bazaar audit` checks per product: the stock movements minus what was
    /// sold equal what is on hand, and `reserved` equals what held reservations hold.
    pub async fn assert_stock_adds_up(&self) {
        let rows = store::query(
            "SELECT p.id, p.on_hand, p.reserved,
                (SELECT CAST(COALESCE(SUM(delta), 0) AS BIGINT) FROM stock_movement m WHERE m.product_id = p.id) AS moved,
                (SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_line l
                   JOIN reservation r ON r.order_id = l.order_id
                  WHERE l.product_id = p.id AND r.status = 'committed') AS sold,
                (SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_line l
                   JOIN reservation r ON r.order_id = l.order_id
                  WHERE l.product_id = p.id AND r.status = 'reserved') AS held
             FROM product p",
        )
        .fetch_all(&self.rt.store)
        .await
        .expect("stock audit");
        for r in rows {
            let id: String = r.try_get("id").expect("a column");
            let (on_hand, reserved, moved, sold, held): (i64, i64, i64, i64, i64) = (
                r.try_get("on_hand").expect("a column"),
                r.try_get("reserved").expect("a column"),
                r.try_get("moved").expect("a column"),
                r.try_get("sold").expect("a column"),
                r.try_get("held").expect("a column"),
            );
            assert_eq!(
                moved - sold,
                on_hand,
                "{id}: received {moved} - sold {sold} != on hand {on_hand}"
            );
            assert_eq!(
                reserved, held,
                "{id}: reserved {reserved} != held by reservations {held}"
            );
        }
    }
}

/// A saga command as the order saga's engine sends it: the payload plus the routing header.
pub fn command(event_type: &str, payload: Value, order: Uuid, step: &str, compensation: bool) -> Envelope {
    let header = CommandHeader {
        saga_id: order.to_string(),
        step: step.into(),
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

/// `inventory.reserve` for `order` with `(product, quantity)` lines.
pub fn reserve(order: Uuid, lines: &[(Uuid, i64)]) -> Envelope {
    let cmd = ReserveStock {
        order_id: order,
        lines: lines
            .iter()
            .map(|&(product_id, quantity)| LineRequest { product_id, quantity })
            .collect(),
    };
    command(types::RESERVE_STOCK, json!(cmd), order, "reserveInventory", false)
}

/// `inventory.release` (the compensation of reserving) for `order`.
pub fn release(order: Uuid) -> Envelope {
    command(
        types::RELEASE_STOCK,
        json!(OrderRef { order_id: order }),
        order,
        "reserveInventory",
        true,
    )
}

/// `inventory.commit` (the confirming step) for `order`.
pub fn commit(order: Uuid) -> Envelope {
    command(
        types::COMMIT_STOCK,
        json!(OrderRef { order_id: order }),
        order,
        "commitStock",
        false,
    )
}

/// `inventory.return` (a cancellation's restock) for `order`.
pub fn give_back(order: Uuid) -> Envelope {
    command(
        types::RETURN_STOCK,
        json!(OrderRef { order_id: order }),
        order,
        "returnStock",
        false,
    )
}
