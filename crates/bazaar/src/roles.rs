//! The roles, their settings, and `bazaar serve ROLE`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use bazaar_kit::{runtime::RoleConfig, shutdown};
use clap::{Args, ValueEnum};

/// One deployable part of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The API gateway.
    Gateway,
    /// Users and tokens.
    Users,
    /// Products and stock.
    Inventory,
    /// Orders and the order saga.
    Orders,
    /// Wallets, ledger and payments.
    Payments,
    /// Email to customers.
    Notifications,
    /// A simulated outside payment provider (Stripe-like) for local runs and fault drills.
    /// Not part of `bazaar up`: start it with `bazaar serve payment-sim` and point payments at
    /// it with `BAZAAR_PAYMENT_PROVIDER_URL=http://127.0.0.1:8106` (base port + 26).
    PaymentSim,
}

impl Role {
    /// Every role, services first.
    pub const ALL: [Role; 6] = [
        Role::Users,
        Role::Inventory,
        Role::Orders,
        Role::Payments,
        Role::Notifications,
        Role::Gateway,
    ];

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Users => "users",
            Role::Inventory => "inventory",
            Role::Orders => "orders",
            Role::Payments => "payments",
            Role::Notifications => "notifications",
            Role::PaymentSim => "payment-sim",
        }
    }

    /// Offset of the role's port from the base port (DESIGN.md: 8080, 8101..8105).
    fn port_offset(self) -> u16 {
        match self {
            Role::Gateway => 0,
            Role::Users => 21,
            Role::Inventory => 22,
            Role::Orders => 23,
            Role::Payments => 24,
            Role::Notifications => 25,
            Role::PaymentSim => 26,
        }
    }
}

/// The operator account `bazaar up` creates (its password is in DATA/admin.password).
pub const ADMIN_EMAIL: &str = "admin@bazaar.local";

/// Settings shared by every command; each flag also reads a `BAZAAR_*` variable.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Directory for SQLite files, the gateway config, the JWT secret and mail.
    #[arg(long, global = true, env = "BAZAAR_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Broker URL: sqlite://PATH (embedded) or nats://HOST:PORT. Default: sqlite://DATA/bus.db.
    #[arg(long, global = true, env = "BAZAAR_BROKER_URL")]
    pub broker: Option<String>,
    /// Gateway port; the gateway admin is at +20, the services at +21..+25 and the payment
    /// simulator (serve payment-sim) at +26.
    #[arg(long, global = true, env = "BAZAAR_BASE_PORT", default_value_t = 8080)]
    pub base_port: u16,
    /// Address the role listens on (serve only). Default: 127.0.0.1 and the role's port.
    #[arg(long, global = true, env = "BAZAAR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The role's store URL (serve only). Default: BAZAAR_<ROLE>_STORE_URL or sqlite://DATA/<role>.db.
    #[arg(long, global = true, env = "BAZAAR_STORE_URL")]
    pub store: Option<String>,
    /// Shared JWT secret. Default: read (or create) DATA/jwt.secret.
    #[arg(long, global = true, env = "BAZAAR_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Gateway config file. Default: DATA/kong.yml, written with bazaar's routes when missing.
    #[arg(long, global = true, env = "BAZAAR_GATEWAY_CONFIG")]
    pub gateway_config: Option<PathBuf>,
    /// Log one JSON object per line.
    #[arg(long, global = true, env = "BAZAAR_JSON_LOGS")]
    pub json_logs: bool,
    /// Share of payments declined on purpose (payments; fault drills).
    #[arg(long, global = true, env = "BAZAAR_DECLINE_RATE", default_value_t = 0.0)]
    pub decline_rate: f64,
    /// Base URL of an outside payment provider (payments), e.g. the simulator from
    /// `bazaar serve payment-sim` at http://127.0.0.1:8106. Default: the wallet alone pays.
    #[arg(long, global = true, env = "BAZAAR_PAYMENT_PROVIDER_URL")]
    pub payment_provider_url: Option<String>,
    /// Credit for each new wallet in cents (payments).
    #[arg(long, global = true, env = "BAZAAR_WELCOME_CREDIT_CENTS", default_value_t = 100_000)]
    pub welcome_credit_cents: i64,
    /// SMTP relay HOST:PORT (notifications). Default: write mail to DATA/mail/*.eml.
    #[arg(long, global = true, env = "BAZAAR_SMTP")]
    pub smtp: Option<String>,
    /// SMS gateway webhook URL (notifications). Default: write texts to DATA/sms/*.txt.
    #[arg(long, global = true, env = "BAZAAR_SMS_WEBHOOK")]
    pub sms_webhook: Option<String>,
    /// Password of the admin account admin@bazaar.local (users creates it at start).
    /// Default: read (or create) DATA/admin.password.
    #[arg(long, global = true, env = "BAZAAR_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Add a small demo catalogue to an empty inventory (bazaar up turns it on).
    #[arg(long, global = true, env = "BAZAAR_SEED_DEMO")]
    pub seed_demo: bool,
}

impl Settings {
    /// The broker URL.
    pub fn broker_url(&self) -> String {
        self.broker
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data.join("bus.db").display()))
    }

    /// The port of `role`.
    pub fn port(&self, role: Role) -> u16 {
        self.base_port.saturating_add(role.port_offset())
    }

    /// The gateway's admin port.
    pub fn admin_port(&self) -> u16 {
        self.base_port.saturating_add(20)
    }

    /// The store URL of `role`, from `BAZAAR_<ROLE>_STORE_URL` or the data directory.
    pub fn store_url(&self, role: Role) -> String {
        let var = format!("BAZAAR_{}_STORE_URL", role.name().to_uppercase());
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("sqlite://{}", self.data.join(format!("{}.db", role.name())).display()))
    }

    /// The gateway config path.
    pub fn gateway_config(&self) -> PathBuf {
        self.gateway_config
            .clone()
            .unwrap_or_else(|| self.data.join("kong.yml"))
    }

    /// The JWT secret, creating DATA/jwt.secret on first use.
    pub fn jwt_secret(&self) -> anyhow::Result<String> {
        self.secret(self.jwt_secret.as_deref(), "jwt.secret")
    }

    /// The admin password, creating DATA/admin.password on first use.
    pub fn admin_password(&self) -> anyhow::Result<String> {
        self.secret(self.admin_password.as_deref(), "admin.password")
    }

    /// `given`, or the contents of DATA/FILE, or a new random secret written there.
    fn secret(&self, given: Option<&str>, file: &str) -> anyhow::Result<String> {
        if let Some(s) = given.filter(|s| !s.is_empty()) {
            return Ok(s.to_string());
        }
        let path = self.data.join(file);
        if let Ok(s) = std::fs::read_to_string(&path) {
            if !s.trim().is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        std::fs::create_dir_all(&self.data).with_context(|| format!("cannot create {}", self.data.display()))?;
        let secret: String = (0..48)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand_index(36)]))
            .collect();
        write_private(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(secret)
    }

    /// Writes the default gateway config for these ports when the file is missing.
    pub fn ensure_gateway_config(&self) -> anyhow::Result<PathBuf> {
        let path = self.gateway_config();
        if !path.exists() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let ports = bazaar_gateway::DefaultPorts {
                users: self.port(Role::Users),
                inventory: self.port(Role::Inventory),
                orders: self.port(Role::Orders),
                payments: self.port(Role::Payments),
                notifications: self.port(Role::Notifications),
            };
            let text = bazaar_gateway::default_config(ports, &self.jwt_secret()?);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(path)
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

fn rand_index(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n as u128) as usize
}

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `bazaar serve ROLE`.
pub async fn serve(settings: &Settings, role: Role) -> anyhow::Result<()> {
    bazaar_kit::telemetry::init_logging(role.name(), settings.json_logs);
    bazaar_kit::telemetry::metrics();
    // Crash-only: a panicking task would leave a half-alive process; exit so the supervisor
    // (bazaar up, systemd, Kubernetes) restarts a whole one. Durable state makes that safe.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    write_pid_file(settings, role);
    let listen = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], settings.port(role))));
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping");
        trigger.trigger();
    });
    let config = RoleConfig {
        listen,
        store_url: settings.store.clone().unwrap_or_else(|| settings.store_url(role)),
        broker_url: settings.broker_url(),
        jwt_secret: settings.jwt_secret()?,
    };
    let result = match role {
        Role::Users => {
            let admin = bazaar_users::AdminAccount {
                email: ADMIN_EMAIL.into(),
                password: settings.admin_password()?,
            };
            bazaar_users::run(config, Some(admin), shutdown).await
        }
        Role::Inventory => bazaar_inventory::run(config, settings.seed_demo, shutdown).await,
        Role::Orders => bazaar_orders::run(config, shutdown).await,
        Role::Payments => {
            let payments = bazaar_payments::PaymentsConfig {
                welcome_credit_cents: settings.welcome_credit_cents,
                decline_rate: settings.decline_rate,
                provider_url: settings.payment_provider_url.clone(),
            };
            bazaar_payments::run(config, payments, shutdown).await
        }
        Role::Notifications => {
            let mail = match &settings.smtp {
                Some(relay) => {
                    let (host, port) = relay
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
                        .with_context(|| format!("--smtp must be HOST:PORT, got `{relay}`"))?;
                    bazaar_notifications::MailConfig::Smtp { host, port }
                }
                None => bazaar_notifications::MailConfig::Files(mail_dir(&settings.data)),
            };
            let sms = match &settings.sms_webhook {
                Some(url) => bazaar_notifications::SmsConfig::Webhook(url.clone()),
                None => bazaar_notifications::SmsConfig::Files(settings.data.join("sms")),
            };
            bazaar_notifications::run(config, mail, sms, shutdown).await
        }
        Role::Gateway => return serve_gateway(settings, listen, shutdown).await,
        Role::PaymentSim => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let state = bazaar_payments::simulator::SimulatorState::default();
            return bazaar_payments::simulator::serve(listener, state, shutdown)
                .await
                .context("payment-sim");
        }
    };
    result.with_context(|| role.name().to_string())
}

async fn serve_gateway(settings: &Settings, listen: SocketAddr, shutdown: shutdown::Shutdown) -> anyhow::Result<()> {
    let config_path = settings.ensure_gateway_config()?;
    let admin_listen = SocketAddr::new(listen.ip(), settings.admin_port());
    let opts = bazaar_gateway::GatewayOptions {
        config_path,
        listen,
        admin_listen,
        render_metrics: Arc::new(bazaar_kit::telemetry::render_metrics),
    };
    let mut stop = shutdown;
    bazaar_gateway::serve(opts, async move { stop.wait().await })
        .await
        .context("gateway")
}

/// Records the process id in DATA/run/ROLE.pid so operators and fault drills can find it.
fn write_pid_file(settings: &Settings, role: Role) {
    let dir = settings.data.join("run");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{}.pid", role.name())), std::process::id().to_string()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the pid file");
    }
}

/// Where the file mailer writes.
pub fn mail_dir(data: &Path) -> PathBuf {
    data.join("mail")
}
