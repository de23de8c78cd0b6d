//! The orders service: owns orders and orchestrates the order saga.
//!
//! `POST /orders` writes a pending order and starts its saga in one transaction; the saga
//! (see [`saga::OrderSaga`]) reserves stock, takes payment and commits the stock, or undoes
//! what was done, and finally confirms or cancels the order and announces the outcome. A
//! customer may cancel until then, and after: [`cancellation`] stops the saga or runs a
//! cancellation saga of its own beside it, on the same engine and reply topic.

pub mod admission;
mod api;
pub mod cancellation;
pub mod saga;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bazaar_contracts::{roles, topics, types};
use bazaar_kit::telemetry::MetricDoc;
use bazaar_kit::{
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{PublicRoute, ServiceSpec},
    shutdown::Shutdown,
    store::{Migration, StoreError, Tx},
};
use bazaar_saga::{FlowEngine, Flows, SagaEngine};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use admission::{Admission, AdmissionLimits};
pub use api::router;
use cancellation::CancelFlow;
use saga::OrderSaga;

/// The orders tables (the saga tables come from the kit).
pub const MIGRATIONS: &[Migration] = &[
    bazaar_saga::MIGRATIONS[0],
    Migration {
        version: 10,
        name: "orders",
        sql: "CREATE TABLE orders (
            id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            email TEXT NOT NULL,
            status TEXT NOT NULL,
            lines TEXT NOT NULL,
            total_cents BIGINT,
            currency TEXT,
            reason TEXT,
            idempotency_key TEXT,
            version BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        );
        CREATE UNIQUE INDEX orders_idempotency ON orders (customer_id, idempotency_key);
        CREATE INDEX orders_customer ON orders (customer_id, created_at);",
    },
    // One row per customer that placing an order locks, so that two placements of one
    // customer count their recent orders one after the other.
    Migration {
        version: 11,
        name: "orders_customer_quota",
        sql: "CREATE TABLE customer_quota (
            customer_id TEXT PRIMARY KEY,
            checked_at BIGINT NOT NULL
        );",
    },
    // When a customer asked to cancel an order whose saga was past its pivot (the saga then
    // hands it to a cancellation), and when its confirmation was announced.
    Migration {
        version: 12,
        name: "orders_cancellation",
        sql: "ALTER TABLE orders ADD COLUMN cancel_requested_at BIGINT;
        ALTER TABLE orders ADD COLUMN confirmed_at BIGINT;
        UPDATE orders SET confirmed_at = updated_at WHERE status = 'confirmed';",
    },
];

/// The metrics orders records beside the kit's.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_orders_placed_total",
        help: "Orders admitted (answered 202).",
    },
    MetricDoc {
        name: "bazaar_orders_finished_total",
        help: "Orders that reached an outcome, by status (confirmed or cancelled).",
    },
    MetricDoc {
        name: "bazaar_order_saga_seconds",
        help: "Time from placing an order to its outcome, in seconds, by status.",
    },
    MetricDoc {
        name: "bazaar_orders_sagas_in_flight",
        help: "Order sagas running or compensating, as admission counts them.",
    },
    MetricDoc {
        name: "bazaar_orders_throttled_total",
        help: "Orders refused with 429 because the customer is over their per-minute quota.",
    },
    MetricDoc {
        name: "bazaar_orders_shed_total",
        help: "Orders refused with 503 because too many sagas are in flight (nothing placed).",
    },
];

/// The orders service: it hears the saga's replies; its orders and sagas need a token.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::ORDERS,
    migrations: MIGRATIONS,
    publishes: &[
        topics::INVENTORY_COMMANDS,
        topics::PAYMENTS_COMMANDS,
        topics::ORDERS_EVENTS,
    ],
    consumes: &[topics::ORDER_SAGA_REPLIES],
    routes: &[
        PublicRoute::token("orders"),
        PublicRoute::token("sagas"),
        PublicRoute::dead_letters("orders-deadletters", "deadletters/orders"),
    ],
    openapi: api::openapi,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// Where an order is; stored by name in `orders.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Placed; its saga is running.
    Pending,
    /// Reserved, paid and committed.
    Confirmed,
    /// The customer cancelled it: its payment is being refunded and its units put back.
    Cancelling,
    /// Refused, undone, or cancelled by the customer; nothing charged, or all refunded.
    Cancelled,
}

impl OrderStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Cancelling => "cancelling",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// The status a stored name means.
    pub fn parse(name: &str) -> Result<OrderStatus, StoreError> {
        Ok(match name {
            "pending" => OrderStatus::Pending,
            "confirmed" => OrderStatus::Confirmed,
            "cancelling" => OrderStatus::Cancelling,
            "cancelled" => OrderStatus::Cancelled,
            other => return Err(StoreError::Corrupt(format!("unknown order status `{other}`"))),
        })
    }

    /// True once the order has its outcome: confirmed or cancelled.
    pub fn is_settled(self) -> bool {
        matches!(self, OrderStatus::Confirmed | OrderStatus::Cancelled)
    }
}

/// The orders role's shared state.
#[derive(Clone)]
pub struct Orders {
    /// Store, outbox, broker, keys.
    pub rt: Runtime,
    /// The order saga's engine.
    pub engine: Arc<SagaEngine<OrderSaga>>,
    /// The cancellation saga's engine.
    pub cancellations: Arc<SagaEngine<CancelFlow>>,
    /// Both flows, which share the saga table and the reply topic.
    pub flows: Arc<Flows>,
    /// Requests waiting for an order to move (`?waitFor=outcome` or `change`).
    pub waiters: Arc<Waiters>,
    /// Who may place an order now.
    pub admission: Admission,
}

/// Wakes requests waiting on an order when a reply for its saga commits in this process.
/// A reply handled by another instance is caught by the waiter's fallback re-read.
#[derive(Debug, Default)]
pub struct Waiters(Mutex<HashMap<String, (Arc<Notify>, usize)>>);

impl Waiters {
    /// Registers interest in `order`; drop the guard to withdraw it.
    pub fn watch(self: &Arc<Self>, order: &str) -> WaitGuard {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map
            .entry(order.to_string())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        WaitGuard {
            waiters: self.clone(),
            order: order.to_string(),
            notify: entry.0.clone(),
        }
    }

    fn wake(&self, order: &str) {
        if let Some((notify, _)) = self.0.lock().unwrap_or_else(PoisonError::into_inner).get(order) {
            notify.notify_waiters();
        }
    }
}

/// One request's interest in one order.
pub struct WaitGuard {
    waiters: Arc<Waiters>,
    order: String,
    notify: Arc<Notify>,
}

impl WaitGuard {
    /// What a reply's commit for the order notifies. Create (and `enable`) a `notified()`
    /// future before reading the order, so a commit between the read and the wait still counts.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut map = self.waiters.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.order) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.order);
            }
        }
    }
}

impl Orders {
    /// The engine for `rt`'s store, admitting orders under the default limits.
    pub fn new(rt: Runtime) -> Orders {
        Orders::limited(rt, AdmissionLimits::default())
    }

    /// The engine for `rt`'s store, admitting orders under `limits`.
    pub fn limited(rt: Runtime, limits: AdmissionLimits) -> Orders {
        Orders::paced(rt, limits, saga::STEP_TIMEOUT)
    }

    /// The engine for `rt`'s store, admitting orders under `limits`, each saga step waiting
    /// `step_timeout` for its reply (resends back off from a twentieth of it to three times it:
    /// 500 ms to 30 s by default).
    pub fn paced(rt: Runtime, limits: AdmissionLimits, step_timeout: Duration) -> Orders {
        let resend = bazaar_kit::resilience::Backoff::new(step_timeout / 20, step_timeout * 3);
        let cancellations = Arc::new(engine_of(CancelFlow::paced(step_timeout), &rt, resend));
        let engine = Arc::new(engine_of(
            OrderSaga::paced(step_timeout).with_cancellations(cancellations.clone()),
            &rt,
            resend,
        ));
        let both: Vec<Arc<dyn FlowEngine>> = vec![engine.clone(), cancellations.clone()];
        let flows = Flows::new(both).unwrap_or_else(|e| unreachable!("the order flows have kinds of their own: {e}"));
        Orders {
            rt,
            engine,
            cancellations,
            flows: Arc::new(flows),
            waiters: Arc::new(Waiters::default()),
            admission: Admission::new(limits),
        }
    }
}

/// An engine for `flow` on `rt`'s outbox, replied to on the order saga's topic.
fn engine_of<F: bazaar_saga::SagaFlow>(
    flow: F,
    rt: &Runtime,
    resend: bazaar_kit::resilience::Backoff,
) -> SagaEngine<F> {
    SagaEngine::new(
        flow,
        rt.outbox.clone(),
        SERVICE.name,
        topics::ORDER_SAGA_REPLIES,
        types::ORDER_SAGA_REPLY,
    )
    .with_resend_backoff(resend)
}

/// Feeds participants' replies to the saga engine of their flow.
struct Replies(Arc<Flows>, Arc<Waiters>);

impl Handler for Replies {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if event.event_type != types::ORDER_SAGA_REPLY {
                return Err(HandlerError::Poison(format!(
                    "unknown event type `{}`",
                    event.event_type
                )));
            }
            self.0.on_reply(tx, event).await
        })
    }

    fn committed(&self, event: &Envelope) {
        self.1.wake(cancellation::order_of(&event.aggregate_id));
    }
}

/// Runs the orders role until `shutdown`, admitting orders under `limits`, each saga step
/// waiting `step_timeout` for its participant.
pub async fn run(
    config: RoleConfig,
    limits: AdmissionLimits,
    step_timeout: Duration,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let rt = Runtime::start(&SERVICE, &config, shutdown.clone()).await?;
    let orders = Orders::paced(rt.clone(), limits, step_timeout);
    orders.admission.watch(&rt);
    rt.consume(
        rt.consumer(topics::ORDER_SAGA_REPLIES),
        Arc::new(Replies(orders.flows.clone(), orders.waiters.clone())),
    )?;
    rt.own("saga timer", orders.engine.clone().spawn_timer(shutdown.clone()));
    rt.own("cancellation timer", orders.cancellations.clone().spawn_timer(shutdown));
    let health = rt.health();
    rt.serve(config.listen, router(orders), health).await
}
