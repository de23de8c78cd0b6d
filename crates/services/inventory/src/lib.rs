//! The inventory service: products, stock and reservations.
//!
//! It answers the order saga's stock commands (`inventory.reserve`, `inventory.release`,
//! `inventory.commit`). Each is idempotent by order id: a reservation row per order records
//! what was done, and a release that arrives before its reserve leaves a `released`
//! tombstone so the late reserve fails instead of holding stock forever.

mod api;
mod commands;

use std::sync::Arc;

use bazaar_contracts::{roles, topics};
use bazaar_kit::telemetry::MetricDoc;
use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{PublicRoute, ServiceSpec},
    shutdown::Shutdown,
    store::Migration,
};
use bazaar_saga::Participates;

pub use api::router;
pub use commands::{ReservationStatus, StockCommands};

/// The consumer of `inventory.commands`: [`StockCommands`] answering the order saga, which
/// alone may send it commands.
pub fn stock_commands() -> Participates<StockCommands> {
    Participates {
        source: SERVICE.name,
        commands_from: roles::ORDERS,
        replies_on: topics::ORDER_SAGA_REPLIES,
        participant: StockCommands,
    }
}

/// The inventory tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 10,
    name: "inventory",
    sql: "CREATE TABLE product (
            id TEXT PRIMARY KEY,
            sku TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
            currency TEXT NOT NULL,
            on_hand BIGINT NOT NULL CHECK (on_hand >= 0),
            reserved BIGINT NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
            created_at BIGINT NOT NULL
        );
        CREATE TABLE stock_movement (
            id TEXT PRIMARY KEY,
            product_id TEXT NOT NULL REFERENCES product (id),
            delta BIGINT NOT NULL,
            reason TEXT NOT NULL,
            at BIGINT NOT NULL
        );
        CREATE TABLE reservation (
            order_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            priced TEXT,
            reason TEXT,
            updated_at BIGINT NOT NULL
        );
        CREATE TABLE reservation_line (
            order_id TEXT NOT NULL REFERENCES reservation (order_id),
            product_id TEXT NOT NULL REFERENCES product (id),
            quantity BIGINT NOT NULL,
            PRIMARY KEY (order_id, product_id)
        );",
}];

/// The metrics inventory records beside the kit's.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_inventory_reservations_total",
        help: "Orders whose every line inventory reserved.",
    },
    MetricDoc {
        name: "bazaar_inventory_returns_total",
        help: "Orders whose sold units inventory put back on the shelf after a cancellation.",
    },
    MetricDoc {
        name: "bazaar_inventory_units_on_hand",
        help: "Units on hand over all products.",
    },
    MetricDoc {
        name: "bazaar_inventory_units_reserved",
        help: "Units reserved for orders not yet committed or released, over all products.",
    },
];

/// The inventory service: it answers stock commands; anyone may browse the catalogue.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::INVENTORY,
    migrations: MIGRATIONS,
    publishes: &[topics::ORDER_SAGA_REPLIES],
    consumes: &[topics::INVENTORY_COMMANDS],
    routes: &[
        PublicRoute {
            name: "products-browse",
            methods: &["GET", "HEAD"],
            ..PublicRoute::anyone("products")
        },
        PublicRoute::token("products"),
        PublicRoute::dead_letters("inventory-deadletters", "deadletters/inventory"),
    ],
    openapi: api::openapi,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// Runs the inventory role until `shutdown`; `demo` adds a small catalogue to an empty store.
pub async fn run(config: RoleConfig, demo: bool, shutdown: Shutdown) -> Result<(), ServiceError> {
    let rt = Runtime::start(&SERVICE, &config, shutdown).await?;
    if demo {
        api::seed_demo(&rt).await?;
    }
    rt.spawn_gauge(
        "bazaar_inventory_units_on_hand",
        "SELECT CAST(COALESCE(SUM(on_hand), 0) AS BIGINT) FROM product",
    );
    rt.spawn_gauge(
        "bazaar_inventory_units_reserved",
        "SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT) FROM product",
    );
    let mut consumer = rt.consumer(topics::INVENTORY_COMMANDS);
    consumer.tasks = 2;
    rt.consume(consumer, Arc::new(stock_commands()))?;
    rt.serve(config.listen, router(rt.clone()), rt.health()).await
}
