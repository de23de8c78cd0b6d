//! The payments service: customer wallets on a double-entry ledger, and order payments.
//!
//! Every money movement is one ledger transaction whose entries sum to zero, across three
//! kinds of account: a customer's wallet (`customer:<id>`), the merchant's revenue
//! (`merchant:revenue`) and the outside world (`external:deposits`). So the whole ledger
//! always sums to zero, and wallets plus revenue equal what was deposited.
//!
//! It opens a wallet (with a welcome credit) for every `user.registered`, and answers the
//! order saga's `payments.process` / `payments.refund`, idempotently by order id.
//!
//! With a provider URL configured, a payment the wallet can cover is also charged at an
//! outside, Stripe-like payment provider ([`provider`]) through the kit's outbound client
//! stack; the [`simulator`] plays that provider locally (`bazaar serve payment-sim`).

mod api;
mod commands;
pub mod ledger;
pub mod provider;
pub mod settle;
pub mod simulator;

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
pub use commands::{PaymentCommands, UserEvents};
pub use provider::PaymentProvider;

/// The consumer of `payments.commands`: `commands` answering the order saga, which alone may
/// send it commands.
pub fn payment_commands(commands: PaymentCommands) -> Participates<PaymentCommands> {
    Participates {
        source: SERVICE.name,
        commands_from: roles::ORDERS,
        replies_on: topics::ORDER_SAGA_REPLIES,
        participant: commands,
    }
}

/// The payments tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 10,
        name: "payments",
        sql: "CREATE TABLE account (
            id TEXT PRIMARY KEY,
            currency TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE TABLE ledger_entry (
            id TEXT PRIMARY KEY,
            txn_id TEXT NOT NULL,
            account_id TEXT NOT NULL REFERENCES account (id),
            amount_cents BIGINT NOT NULL,
            kind TEXT NOT NULL,
            reference TEXT NOT NULL,
            at BIGINT NOT NULL
        );
        CREATE INDEX ledger_account ON ledger_entry (account_id);
        CREATE TABLE payment (
            order_id TEXT PRIMARY KEY,
            id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            amount_cents BIGINT NOT NULL,
            currency TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            provider_charge_id TEXT,
            command TEXT,
            refund_command TEXT,
            next_try_at BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        );
        CREATE INDEX payment_due ON payment (status, next_try_at);",
    },
    // An account's balance was the sum of its entries, read on every payment: a customer's
    // history made each charge slower than the last. It is now kept beside the account,
    // moved by the same statements that write the entries.
    Migration {
        version: 11,
        name: "payments_account_balance",
        sql: "ALTER TABLE account ADD COLUMN balance_cents BIGINT NOT NULL DEFAULT 0;
        UPDATE account SET balance_cents =
            (SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entry WHERE ledger_entry.account_id = account.id);",
    },
    // What the tables enforce whatever a handler does: an order's money is held, released,
    // taken and given back at most once each, and a payment is never refunded beyond what
    // was captured. Releases before this one could write such a transfer twice (copies of a
    // command at once on PostgreSQL): every later copy, both its entries (copies ordered by
    // time, then transaction id, alike for both legs), moves to `ledger_entry_doubled` for an
    // operator to see, and the balances give back what the copies moved, so such a store
    // upgrades. (The release that introduced version 12 had no such step: see 13.)
    Migration {
        version: 12,
        name: "payments_once",
        sql: "CREATE TABLE ledger_entry_doubled AS SELECT * FROM ledger_entry WHERE txn_id IN (
            SELECT txn_id FROM (
                SELECT txn_id, ROW_NUMBER() OVER (
                    PARTITION BY kind, reference, account_id ORDER BY at, txn_id) AS copy
                FROM ledger_entry WHERE kind IN ('hold', 'release', 'payment', 'refund')) AS copies
            WHERE copy > 1);
        DELETE FROM ledger_entry WHERE txn_id IN (SELECT txn_id FROM ledger_entry_doubled);
        UPDATE account SET balance_cents = balance_cents -
            (SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entry_doubled d WHERE d.account_id = account.id);
        ALTER TABLE payment ADD COLUMN refunded_cents BIGINT NOT NULL DEFAULT 0
            CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents);
        UPDATE payment SET refunded_cents = amount_cents WHERE status = 'refunded';
        CREATE UNIQUE INDEX ledger_once_per_order ON ledger_entry (kind, reference, account_id)
            WHERE kind IN ('hold', 'release', 'payment', 'refund');",
    },
    // Stores that ran version 12 as first released have no set-aside table; the audit reads it.
    Migration {
        version: 13,
        name: "payments_doubled_table",
        sql: "CREATE TABLE IF NOT EXISTS ledger_entry_doubled (
            id TEXT,
            txn_id TEXT,
            account_id TEXT,
            amount_cents BIGINT,
            kind TEXT,
            reference TEXT,
            at BIGINT
        );",
    },
];

/// The metrics payments records beside the kit's.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_payments_total",
        help: "Payments settled, by outcome (captured, declined, refunded).",
    },
    MetricDoc {
        name: "bazaar_payments_provider_errors_total",
        help: "Calls to the payment provider that got no usable answer (asked again later).",
    },
    MetricDoc {
        name: "bazaar_payments_wallets_cents",
        help: "Money in customers' wallets, in cents.",
    },
    MetricDoc {
        name: "bazaar_payments_revenue_cents",
        help: "Money in the merchant's revenue account, in cents.",
    },
];

/// The payments service: it opens wallets for new users and answers payment commands.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::PAYMENTS,
    migrations: MIGRATIONS,
    publishes: &[topics::ORDER_SAGA_REPLIES],
    consumes: &[topics::PAYMENTS_COMMANDS, topics::USERS_EVENTS],
    routes: &[
        PublicRoute::token("accounts"),
        PublicRoute::token("payments"),
        PublicRoute::dead_letters("payments-deadletters", "deadletters/payments"),
    ],
    openapi: api::openapi,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// Where a payment is; stored by name in `payment.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    /// The amount is held and the provider is being asked to charge it.
    Charging,
    /// Taken: in revenue.
    Captured,
    /// Declined (by the wallet's balance, the simulated card network or the provider).
    Failed,
    /// A refund overtook a charge in flight: the settler undoes whatever the provider did.
    Voiding,
    /// Nothing was or will be taken (also the tombstone of a refund before its payment).
    Voided,
    /// Being given back at the provider.
    Refunding,
    /// Given back.
    Refunded,
}

impl PaymentStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Charging => "charging",
            PaymentStatus::Captured => "captured",
            PaymentStatus::Failed => "failed",
            PaymentStatus::Voiding => "voiding",
            PaymentStatus::Voided => "voided",
            PaymentStatus::Refunding => "refunding",
            PaymentStatus::Refunded => "refunded",
        }
    }

    /// The status a stored name means.
    pub fn parse(name: &str) -> Result<PaymentStatus, bazaar_kit::store::StoreError> {
        Ok(match name {
            "charging" => PaymentStatus::Charging,
            "captured" => PaymentStatus::Captured,
            "failed" => PaymentStatus::Failed,
            "voiding" => PaymentStatus::Voiding,
            "voided" => PaymentStatus::Voided,
            "refunding" => PaymentStatus::Refunding,
            "refunded" => PaymentStatus::Refunded,
            other => {
                return Err(bazaar_kit::store::StoreError::Corrupt(format!(
                    "unknown payment status `{other}`"
                )))
            }
        })
    }
}

/// Settings of the payments role beyond the common ones.
#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    /// Credit a new wallet receives (minor units).
    pub welcome_credit_cents: i64,
    /// Share of payments the simulated card network declines (0..=1), for fault drills.
    pub decline_rate: f64,
    /// Base URL of an outside payment provider (Stripe-like) that takes the money; without
    /// one the wallet alone pays.
    pub provider_url: Option<String>,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            welcome_credit_cents: 100_000,
            decline_rate: 0.0,
            provider_url: None,
        }
    }
}

/// The outside payment provider at `url`: an https provider on this installation's mesh
/// (the simulator) is called with the role's own certificate; another is an outside one.
fn provider_for(url: &str, config: &RoleConfig) -> Result<PaymentProvider, ServiceError> {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(ServiceError::Config(format!(
            "payment provider URL must start with http:// or https://, got `{url}`"
        )));
    }
    // A mesh peer: a name `up` resolves (`payment-sim`), or, where names go through DNS
    // (Kubernetes), a bare service name.
    let host = url
        .strip_prefix("https://")
        .and_then(|rest| rest.split([':', '/']).next())
        .unwrap_or_default();
    let on_mesh = if config.mesh_peers.is_empty() {
        !host.is_empty() && !host.contains('.')
    } else {
        config.mesh_peers.iter().any(|(name, _)| name == host)
    };
    let provider = match (&config.mesh, on_mesh) {
        (Some(tls), true) => {
            let client = bazaar_kit::mesh::http_client(tls, provider::default_policy().timeout, &config.mesh_peers)
                .map_err(|e| ServiceError::Config(format!("payment provider client: {e}")))?;
            PaymentProvider::with_client(url, client)
        }
        _ => PaymentProvider::new(url).map_err(|e| ServiceError::Config(format!("payment provider client: {e}")))?,
    };
    tracing::info!(%url, "charging through the payment provider");
    Ok(provider)
}

/// Runs the payments role until `shutdown`.
pub async fn run(config: RoleConfig, payments: PaymentsConfig, shutdown: Shutdown) -> Result<(), ServiceError> {
    if !(0.0..=1.0).contains(&payments.decline_rate) {
        return Err(ServiceError::Config(format!(
            "decline rate must be between 0 and 1, got {}",
            payments.decline_rate
        )));
    }
    let provider = payments
        .provider_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|url| provider_for(url, &config))
        .transpose()?;
    let rt = Runtime::start(&SERVICE, &config, shutdown.clone()).await?;
    rt.spawn_gauge(
        "bazaar_payments_wallets_cents",
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id LIKE 'customer:%'",
    );
    rt.spawn_gauge(
        "bazaar_payments_revenue_cents",
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id = 'merchant:revenue'",
    );
    let mut commands = rt.consumer(topics::PAYMENTS_COMMANDS);
    commands.max_attempts = 12;
    rt.consume(
        commands,
        Arc::new(payment_commands(PaymentCommands {
            decline_rate: payments.decline_rate,
            provider: provider.clone(),
        })),
    )?;
    if let Some(provider) = &provider {
        rt.own("settler", settle::spawn(rt.outbox.clone(), provider.clone(), shutdown));
    }
    rt.consume(
        rt.consumer(topics::USERS_EVENTS),
        Arc::new(UserEvents {
            welcome_credit_cents: payments.welcome_credit_cents,
        }),
    )?;
    let mut health = rt.health();
    if let Some(provider) = provider {
        health = health.check("provider", move || {
            let status = provider.check();
            Box::pin(async move { status })
        });
    }
    rt.serve(config.listen, router(rt.clone()), health).await
}
