//! One adapter per role: it turns the settings into the role's own configuration and runs
//! the role. The role table points at these. Nothing here reads the table: what a role must
//! know of the others (where users' keys are, the instances web's console lists) comes in
//! [`Launch`], worked out by `serve`.

use std::net::SocketAddr;

use anyhow::Context;
use bazaar_kit::{runtime::RoleConfig, shutdown::Shutdown};
use futures_util::future::LocalBoxFuture;

use crate::settings::{mail_dir, Process, Settings, ADMIN_EMAIL};

/// What an adapter is given besides the role's common config.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The shop's settings.
    pub settings: Settings,
    /// This process's own settings.
    pub process: Process,
    /// Where this process loads users' public token keys.
    pub jwks_url: String,
    /// Every instance `up` runs, with its plain admin URL: what web's console lists.
    pub instances: Vec<bazaar_web::Instance>,
    /// The services that consume events, whose consumer lag the console shows.
    pub consumers: Vec<&'static str>,
}

/// How `serve` runs a service: the launch, the common role config, the stop signal. The
/// future runs on `serve`'s own thread (`block_on`), so it need not be `Send`.
pub type RunService = fn(Launch, RoleConfig, Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>>;

/// How `serve` runs a stand-in for an outside system on an address.
pub type RunSimulator = fn(Launch, SocketAddr, Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>>;

/// Users, with the operator's account.
pub fn users(launch: Launch, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let admin = bazaar_users::AdminAccount {
            email: ADMIN_EMAIL.into(),
            password: launch.settings.admin_password()?,
        };
        Ok(bazaar_users::run(config, Some(admin), stop).await?)
    })
}

/// Inventory, with the demo catalogue when asked.
pub fn inventory(launch: Launch, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    let seed_demo = launch.settings.roles.inventory.seed_demo;
    Box::pin(async move { Ok(bazaar_inventory::run(config, seed_demo, stop).await?) })
}

/// Orders, with its admission limits and saga step timeout.
pub fn orders(launch: Launch, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    let own = launch.settings.roles.orders;
    Box::pin(async move {
        let limits = bazaar_orders::AdmissionLimits {
            per_customer_per_minute: own.orders_per_customer_per_minute,
            max_in_flight: i64::from(own.orders_max_in_flight),
        };
        let step_timeout = std::time::Duration::from_millis(own.saga_step_timeout_ms);
        Ok(bazaar_orders::run(config, limits, step_timeout, stop).await?)
    })
}

/// Payments, with the welcome credit, declines and the outside provider.
pub fn payments(launch: Launch, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let own = &launch.settings.roles.payments;
        let payments = bazaar_payments::PaymentsConfig {
            welcome_credit_cents: launch.settings.welcome_credit(false)?,
            decline_rate: own.decline_rate,
            provider_url: own.payment_provider_url.clone(),
        };
        Ok(bazaar_payments::run(config, payments, stop).await?)
    })
}

/// Notifications, to an SMTP relay and an SMS webhook, or to files in the data directory.
pub fn notifications(
    launch: Launch,
    config: RoleConfig,
    stop: Shutdown,
) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let (own, data) = (&launch.settings.roles.notifications, &launch.settings.data);
        let mail = match &own.smtp {
            Some(relay) => {
                let (host, port) = relay
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
                    .with_context(|| format!("--smtp must be HOST:PORT, got `{relay}`"))?;
                bazaar_notifications::MailConfig::Smtp { host, port }
            }
            None => bazaar_notifications::MailConfig::Files(mail_dir(data)),
        };
        let sms = match &own.sms_webhook {
            Some(url) => bazaar_notifications::SmsConfig::Webhook(url.clone()),
            None => bazaar_notifications::SmsConfig::Files(data.join("sms")),
        };
        Ok(bazaar_notifications::run(config, mail, sms, stop).await?)
    })
}

/// Web: the storefront and the console over every instance.
pub fn web(launch: Launch, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let jwks = &launch.jwks_url;
        let web = bazaar_web::WebConfig {
            gateway_url: launch.settings.gateway_url(),
            users_url: jwks
                .strip_suffix(bazaar_kit::auth::JWKS_PATH)
                .unwrap_or(jwks)
                .to_string(),
            instances: launch.instances,
            consumers: launch.consumers,
        };
        Ok(bazaar_web::run(config, web, stop).await?)
    })
}

/// The payment provider simulator, over the mesh when this process has a certificate.
pub fn payment_sim(launch: Launch, listen: SocketAddr, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let mesh = launch.process.mesh()?;
        let policy = launch.process.mesh_policy.clone();
        Ok(bazaar_payments::simulator::run(listen, mesh, policy, stop).await?)
    })
}
