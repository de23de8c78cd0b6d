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

use bazaar_contracts::{groups, topics};
use bazaar_kit::{
    consumer::{self, ConsumerConfig},
    runtime::{RoleConfig, Runtime, ServiceError},
    shutdown::Shutdown,
    store::Migration,
};

pub use api::router;
pub use commands::{PaymentCommands, UserEvents};
pub use provider::PaymentProvider;

/// The payments tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
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
    postgres: None,
}];

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

/// Runs the payments role until `shutdown`.
pub async fn run(config: RoleConfig, payments: PaymentsConfig, shutdown: Shutdown) -> Result<(), ServiceError> {
    if !(0.0..=1.0).contains(&payments.decline_rate) {
        return Err(ServiceError::Config(format!(
            "decline rate must be between 0 and 1, got {}",
            payments.decline_rate
        )));
    }
    let provider = match payments.provider_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ServiceError::Config(format!(
                    "payment provider URL must start with http:// or https://, got `{url}`"
                )));
            }
            let provider =
                PaymentProvider::new(url).map_err(|e| ServiceError::Config(format!("payment provider client: {e}")))?;
            tracing::info!(%url, "charging through the payment provider");
            Some(provider)
        }
        None => None,
    };
    let rt = Runtime::start("payments", &config, MIGRATIONS, shutdown.clone()).await?;
    rt.spawn_gauge(
        "bazaar_payments_wallets_cents",
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id LIKE 'customer:%'",
    );
    rt.spawn_gauge(
        "bazaar_payments_revenue_cents",
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id = 'merchant:revenue'",
    );
    let mut commands = ConsumerConfig::new(groups::PAYMENTS, topics::PAYMENTS_COMMANDS);
    commands.max_attempts = 12;
    consumer::spawn(
        rt.outbox.clone(),
        rt.broker.clone(),
        commands,
        Arc::new(PaymentCommands {
            decline_rate: payments.decline_rate,
            provider: provider.clone(),
        }),
        shutdown.clone(),
    );
    if let Some(provider) = &provider {
        settle::spawn(rt.outbox.clone(), provider.clone(), shutdown.clone());
    }
    consumer::spawn(
        rt.outbox.clone(),
        rt.broker.clone(),
        ConsumerConfig::new(groups::PAYMENTS, topics::USERS_EVENTS),
        Arc::new(UserEvents {
            welcome_credit_cents: payments.welcome_credit_cents,
        }),
        shutdown,
    );
    let mut health = rt.health();
    if let Some(provider) = provider {
        health = health.check("provider", move || {
            let status = provider.check();
            Box::pin(async move { status })
        });
    }
    rt.serve(config.listen, router(rt.clone()), health).await
}
