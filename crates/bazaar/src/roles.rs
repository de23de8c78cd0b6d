//! The role table, the roles' settings, and `bazaar serve ROLE`.
//!
//! [`ROLES`] is the one place that knows the shop's layout: every role's name, port and
//! kind, and for a service its [`ServiceSpec`] (tables, topics, public routes) and how to
//! run it. `up`, `serve`, `audit`, the gateway's default config, the bench and the tests
//! all iterate it. Adding a role is one crate exporting a `SERVICE` spec and a `run`
//! function, and one row here.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use bazaar_kit::{
    runtime::RoleConfig,
    service::{Access, ServiceSpec},
    shutdown::{self, Shutdown},
};
use clap::Args;
use futures_util::future::LocalBoxFuture;

/// One deployable part of the system: a row of [`ROLES`].
#[derive(Debug)]
pub struct RoleSpec {
    /// Its name on the command line and in logs, pid files and `BAZAAR_<ROLE>_…` variables.
    pub name: &'static str,
    /// One line for `bazaar serve --help`.
    pub about: &'static str,
    /// Its port's offset from the base port (docs/architecture.md, "Roles").
    pub port_offset: u16,
    /// What it is.
    pub kind: RoleKind,
}

/// The kinds of role.
#[derive(Debug)]
pub enum RoleKind {
    /// The gateway: routes clients to every service's public routes; health on its admin port.
    Gateway,
    /// A service of the shop, started by `up`.
    Service {
        /// Its name, tables, topics and routes.
        spec: &'static ServiceSpec,
        /// Runs it until shutdown.
        run: RunService,
    },
    /// A stand-in for an outside system, for local runs and fault drills; `up` leaves it out.
    Simulator {
        /// Serves it on the address until shutdown (over the mesh when the settings give it
        /// a certificate).
        run: fn(Settings, SocketAddr, Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>>,
    },
}

/// How `serve` runs a service: the settings, the common role config, the stop signal. The
/// future runs on `serve`'s own thread (`block_on`), so it need not be `Send`.
pub type RunService = fn(Settings, RoleConfig, Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>>;

/// A role, as the command line names it.
pub type Role = &'static RoleSpec;

/// Every role: services first (the order `up` starts them), then the gateway, then tools.
pub static ROLES: [RoleSpec; 8] = [
    RoleSpec {
        name: "users",
        about: "Users and tokens.",
        port_offset: 21,
        kind: RoleKind::Service {
            spec: &bazaar_users::SERVICE,
            run: run_users,
        },
    },
    RoleSpec {
        name: "inventory",
        about: "Products and stock.",
        port_offset: 22,
        kind: RoleKind::Service {
            spec: &bazaar_inventory::SERVICE,
            run: run_inventory,
        },
    },
    RoleSpec {
        name: "orders",
        about: "Orders and the order saga.",
        port_offset: 23,
        kind: RoleKind::Service {
            spec: &bazaar_orders::SERVICE,
            run: run_orders,
        },
    },
    RoleSpec {
        name: "payments",
        about: "Wallets, ledger and payments.",
        port_offset: 24,
        kind: RoleKind::Service {
            spec: &bazaar_payments::SERVICE,
            run: run_payments,
        },
    },
    RoleSpec {
        name: "notifications",
        about: "Email and texts to customers.",
        port_offset: 25,
        kind: RoleKind::Service {
            spec: &bazaar_notifications::SERVICE,
            run: run_notifications,
        },
    },
    RoleSpec {
        name: "web",
        about: "The storefront in the browser, at the gateway's root.",
        port_offset: 27,
        kind: RoleKind::Service {
            spec: &bazaar_web::SERVICE,
            run: run_web,
        },
    },
    RoleSpec {
        name: "gateway",
        about: "The API gateway (Kong-compatible config).",
        port_offset: 0,
        kind: RoleKind::Gateway,
    },
    RoleSpec {
        name: PAYMENT_SIM,
        about: "A Stripe-like payment provider for local runs and drills (base port + 26); \
                point payments at it with BAZAAR_PAYMENT_PROVIDER_URL.",
        port_offset: 26,
        kind: RoleKind::Simulator { run: run_payment_sim },
    },
];

/// The gateway's admin listener (health, metrics, config) is at the base port plus this.
pub const GATEWAY_ADMIN_OFFSET: u16 = 20;

/// A service's plain health-and-metrics listener sits this far above its API port (orders:
/// 8103 and 8203), for probes and scrapers that hold no mesh certificate.
pub const ADMIN_PORT_OFFSET: u16 = 100;

/// The trust domain of the identities `bazaar up` issues; the gateway reaches each service
/// as the upstream `<service>.<trust domain>`, the name its certificate carries.
pub const TRUST_DOMAIN: &str = "bazaar";

/// Instance `k` of a service listens `k * REPLICA_STRIDE` above instance 0 (orders: 8103,
/// 8113, 8123, ...), so every instance of every role has a port of its own.
pub const REPLICA_STRIDE: u16 = 10;

/// Most instances of one service `up` runs (their ports stay below base + 100).
pub const MAX_INSTANCES: u16 = 8;

/// Client ports of the three JetStream nodes `up --cluster` runs, from the base port (in the
/// gaps between service instances' ports).
pub const NATS_CLIENT_OFFSETS: [u16; 3] = [10, 11, 12];
/// Their cluster route ports.
pub const NATS_ROUTE_OFFSETS: [u16; 3] = [13, 14, 15];

/// How many instances of each service run; one unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicas(std::collections::BTreeMap<&'static str, u16>);

impl Replicas {
    /// Instances of `role`.
    pub fn of(&self, role: Role) -> u16 {
        self.0.get(role.name).copied().unwrap_or(1)
    }

    /// Parses `N` (every service), `ROLE=N,ROLE=N`, or both (`2,orders=3`).
    pub fn parse(text: &str) -> Result<Replicas, String> {
        let mut replicas = Replicas::default();
        let count = |n: &str| -> Result<u16, String> {
            match n.trim().parse::<u16>() {
                Ok(n) if (1..=MAX_INSTANCES).contains(&n) => Ok(n),
                _ => Err(format!(
                    "a replica count must be 1 to {MAX_INSTANCES}, not `{}`",
                    n.trim()
                )),
            }
        };
        let mut every = None;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                None => every = Some(count(item)?),
                Some((name, n)) => {
                    let role = RoleSpec::named(name.trim()).ok_or_else(|| {
                        let names: Vec<&str> = services().map(|(r, _)| r.name).collect();
                        format!("no role `{}`; services are {}", name.trim(), names.join(", "))
                    })?;
                    if !role.replicable() {
                        return Err(format!(
                            "{} runs once; only services and the gateway have replicas",
                            role.name
                        ));
                    }
                    replicas.0.insert(role.name, count(n)?);
                }
            }
        }
        if let Some(n) = every {
            for (role, _) in services() {
                replicas.0.entry(role.name).or_insert(n);
            }
        }
        Ok(replicas)
    }
}

/// `ROLE=N,ROLE=N`, as [`Replicas::parse`] reads it.
impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self.0.iter().map(|(role, n)| format!("{role}={n}")).collect();
        f.write_str(&items.join(","))
    }
}

/// The name of instance `k` of `role` in logs and pid files: `orders`, `orders-1`, ...
pub fn instance_name(role: Role, k: u16) -> String {
    if k == 0 {
        role.name.to_string()
    } else {
        format!("{}-{k}", role.name)
    }
}

impl RoleSpec {
    /// The role called `name`.
    pub fn named(name: &str) -> Option<Role> {
        ROLES.iter().find(|r| r.name == name)
    }

    /// The service spec, when the role is a service.
    pub fn service(&self) -> Option<&'static ServiceSpec> {
        match self.kind {
            RoleKind::Service { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// Whether `up` can run several instances of it.
    pub fn replicable(&self) -> bool {
        !matches!(self.kind, RoleKind::Simulator { .. })
    }

    /// Whether its instances share one port (the gateway's public and admin sockets, which
    /// `up` holds and hands to each) rather than each having its own.
    pub fn shares_port(&self) -> bool {
        matches!(self.kind, RoleKind::Gateway)
    }

    /// How far instance `k`'s ports sit above instance 0's: `k * REPLICA_STRIDE`, or nothing
    /// when the instances share one port.
    pub fn instance_stride(&self, k: u16) -> u16 {
        if self.shares_port() {
            0
        } else {
            k.saturating_mul(REPLICA_STRIDE)
        }
    }

    /// Whether `bazaar up` starts it.
    pub fn started_by_up(&self) -> bool {
        !matches!(self.kind, RoleKind::Simulator { .. })
    }

    /// Offset of the port its `/health` answers on.
    pub fn health_offset(&self) -> u16 {
        match self.kind {
            RoleKind::Gateway => GATEWAY_ADMIN_OFFSET,
            RoleKind::Service { .. } => self.port_offset + ADMIN_PORT_OFFSET,
            RoleKind::Simulator { .. } => self.port_offset,
        }
    }
}

/// The roles `bazaar up` starts.
pub fn up_roles() -> impl Iterator<Item = Role> {
    ROLES.iter().filter(|r| r.started_by_up())
}

/// Every service and its spec.
pub fn services() -> impl Iterator<Item = (Role, &'static ServiceSpec)> {
    ROLES.iter().filter_map(|r| Some((r, r.service()?)))
}

/// Every port offset a system may take (every role, every possible replica of a service, the
/// gateway admin): what a test or bench that runs the system beside others needs free.
pub fn port_offsets() -> Vec<u16> {
    let mut offsets: Vec<u16> = ROLES.iter().map(|r| r.port_offset).collect();
    for (role, _) in services() {
        offsets.extend((1..MAX_INSTANCES).map(|k| role.port_offset + k * REPLICA_STRIDE));
        offsets.extend((0..MAX_INSTANCES).map(|k| role.port_offset + k * REPLICA_STRIDE + ADMIN_PORT_OFFSET));
    }
    offsets.extend(NATS_CLIENT_OFFSETS.iter().chain(&NATS_ROUTE_OFFSETS));
    offsets.push(GATEWAY_ADMIN_OFFSET);
    offsets
}

/// Parses a role name on the command line, listing the table's roles in `--help`.
#[derive(Debug, Clone, Copy)]
pub struct RoleParser;

impl clap::builder::TypedValueParser for RoleParser {
    type Value = Role;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Role, clap::Error> {
        let name = value.to_string_lossy();
        RoleSpec::named(&name).ok_or_else(|| {
            let mut err = clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd);
            use clap::error::{ContextKind, ContextValue};
            if let Some(arg) = arg {
                err.insert(ContextKind::InvalidArg, ContextValue::String(arg.to_string()));
            }
            err.insert(ContextKind::InvalidValue, ContextValue::String(name.into_owned()));
            err.insert(
                ContextKind::ValidValue,
                ContextValue::Strings(ROLES.iter().map(|r| r.name.to_string()).collect()),
            );
            err
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            ROLES
                .iter()
                .map(|r| clap::builder::PossibleValue::new(r.name).help(r.about)),
        ))
    }
}

fn run_users(settings: Settings, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let admin = bazaar_users::AdminAccount {
            email: ADMIN_EMAIL.into(),
            password: settings.admin_password()?,
        };
        Ok(bazaar_users::run(config, Some(admin), stop).await?)
    })
}

fn run_inventory(
    settings: Settings,
    config: RoleConfig,
    stop: Shutdown,
) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move { Ok(bazaar_inventory::run(config, settings.seed_demo, stop).await?) })
}

fn run_orders(settings: Settings, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let limits = bazaar_orders::AdmissionLimits {
            per_customer_per_minute: settings.orders_per_customer_per_minute,
            max_in_flight: i64::from(settings.orders_max_in_flight),
        };
        let step_timeout = std::time::Duration::from_millis(settings.saga_step_timeout_ms);
        Ok(bazaar_orders::run(config, limits, step_timeout, stop).await?)
    })
}

fn run_payments(settings: Settings, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let payments = bazaar_payments::PaymentsConfig {
            welcome_credit_cents: settings.welcome_credit(false)?,
            decline_rate: settings.decline_rate,
            provider_url: settings.payment_provider_url.clone(),
        };
        Ok(bazaar_payments::run(config, payments, stop).await?)
    })
}

fn run_notifications(
    settings: Settings,
    config: RoleConfig,
    stop: Shutdown,
) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
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
        Ok(bazaar_notifications::run(config, mail, sms, stop).await?)
    })
}

fn run_web(settings: Settings, config: RoleConfig, stop: Shutdown) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let replicas = settings.replicas()?;
        // Every instance's plain health and metrics listener, for the console.
        let instances = up_roles()
            .flat_map(|role| {
                let count = if role.shares_port() { 1 } else { replicas.of(role) };
                (0..count).map(move |k| (role, k))
            })
            .map(|(role, k)| bazaar_web::Instance {
                role: role.name,
                name: instance_name(role, k),
                admin_url: settings
                    .instance_health_url(role, k)
                    .trim_end_matches("/health")
                    .to_string(),
            })
            .collect();
        let jwks = settings.jwks_url();
        let web = bazaar_web::WebConfig {
            gateway_url: settings.gateway_url(),
            users_url: jwks
                .strip_suffix(bazaar_kit::auth::JWKS_PATH)
                .unwrap_or(&jwks)
                .to_string(),
            instances,
            consumers: services()
                .filter(|(_, spec)| !spec.consumes.is_empty())
                .map(|(_, spec)| spec.name)
                .collect(),
        };
        Ok(bazaar_web::run(config, web, stop).await?)
    })
}

fn run_payment_sim(
    settings: Settings,
    listen: SocketAddr,
    stop: Shutdown,
) -> LocalBoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let mesh = settings.mesh()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let state = bazaar_payments::simulator::SimulatorState::default();
        let Some(tls) = mesh else {
            tracing::warn!("MESH OFF: the payment simulator serves plain HTTP to any caller");
            return bazaar_payments::simulator::serve(listener, state, stop)
                .await
                .context("payment-sim");
        };
        tracing::info!(identity = %tls.identity(), %listen, "payment provider simulator listening over mutual TLS");
        let policy = settings
            .mesh_policy
            .clone()
            .map(|file| bazaar_kit::policy::PolicyGuard::load(PAYMENT_SIM, file).map(Arc::new))
            .transpose()
            .context("mesh policy")?;
        let mut router = bazaar_payments::simulator::router(state);
        if let Some(guard) = &policy {
            router = guard.guard(router);
        }
        let mut stop = stop;
        let served = bazaar_kit::mesh::serve_mtls(listener, router, tls.clone(), async move { stop.wait().await });
        // Renewed certificates and an edited policy apply without a restart, as in every role.
        let reload = async {
            loop {
                tokio::time::sleep(bazaar_kit::runtime::MESH_RELOAD_PERIOD).await;
                bazaar_kit::runtime::reload_mesh(&tls, policy.as_deref());
            }
        };
        tokio::select! {
            served = served => served.context("payment-sim"),
            never = reload => never,
        }
    })
}

/// The payment simulator's role name.
pub const PAYMENT_SIM: &str = "payment-sim";

/// The credit each new wallet gets in `bazaar up`'s demo, unless set.
pub const DEMO_WELCOME_CREDIT_CENTS: i64 = 100_000;

/// PostgreSQL connections the instances of one service share by default: six services take
/// 48 of a default server's 100, whatever their replicas.
pub const SERVICE_CONNECTIONS: u32 = 8;

/// The operator account `bazaar up` creates (its password is in DATA/admin.password).
pub const ADMIN_EMAIL: &str = "admin@bazaar.local";

/// Settings shared by every command; each flag also reads a `BAZAAR_*` variable.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Directory for SQLite files, the gateway config, secrets and mail (kept 0700).
    #[arg(long, global = true, env = "BAZAAR_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Broker URL: sqlite://PATH (embedded) or nats://HOST:PORT. Default: sqlite://DATA/bus.db.
    #[arg(long, global = true, env = "BAZAAR_BROKER_URL")]
    pub broker: Option<String>,
    /// Gateway port; every other role's port is an offset from it (the gateway admin +20,
    /// the services +21..+25 and web +27, the payment simulator +26).
    #[arg(long, global = true, env = "BAZAAR_BASE_PORT", default_value_t = 8080)]
    pub base_port: u16,
    /// Where admin listeners bind (the gateway's /config, /status and /metrics; services'
    /// plain health and metrics), whatever the public address: loopback unless told.
    #[arg(long, global = true, env = "BAZAAR_ADMIN_LISTEN_IP", default_value = "127.0.0.1")]
    pub admin_listen_ip: std::net::IpAddr,
    /// Address the role listens on (serve only). Default: 127.0.0.1 and the role's port.
    #[arg(long, global = true, env = "BAZAAR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The role's store URL (serve only). Default: BAZAAR_<ROLE>_STORE_URL or sqlite://DATA/<role>.db.
    #[arg(long, global = true, env = "BAZAAR_STORE_URL")]
    pub store: Option<String>,
    /// Most connections each instance of a service opens to its PostgreSQL store (1-64).
    /// Default: the replicas of a service share 8 (at least 2 each), so `up --cluster`, a
    /// rollout's extra instance and `bazaar audit` stay well inside PostgreSQL's default 100.
    #[arg(long, global = true, env = "BAZAAR_STORE_POOL", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub store_pool: Option<u32>,
    /// This process's mesh certificate (PEM): with it a service's API speaks only mutual TLS.
    /// `bazaar up` issues one per instance; without one a service serves plain HTTP and says
    /// so loudly. Needs BAZAAR_MESH_KEY and BAZAAR_MESH_BUNDLE too.
    #[arg(long, global = true, env = "BAZAAR_MESH_CERT")]
    pub mesh_cert: Option<PathBuf>,
    /// The mesh certificate's private key (PEM).
    #[arg(long, global = true, env = "BAZAAR_MESH_KEY")]
    pub mesh_key: Option<PathBuf>,
    /// The mesh CA certificates to trust (PEM, one or more).
    #[arg(long, global = true, env = "BAZAAR_MESH_BUNDLE")]
    pub mesh_bundle: Option<PathBuf>,
    /// The mesh's authorization policy (YAML): who may call which routes of which role.
    /// `bazaar up` writes DATA/mesh/policy.yaml from the role table's edges.
    #[arg(long, global = true, env = "BAZAAR_MESH_POLICY")]
    pub mesh_policy: Option<PathBuf>,
    /// The address every role is reached at by name over the mesh (`bazaar up`: 127.0.0.1).
    /// Default: role names resolve through DNS, as Kubernetes Services do.
    #[arg(long, global = true, env = "BAZAAR_PEER_IP", hide = true)]
    pub peer_ip: Option<std::net::IpAddr>,
    /// Where the gateway and services load the users service's public token keys (a JWKS).
    /// Default: users on this machine, http://127.0.0.1:<users port>/.well-known/jwks.json.
    #[arg(long, global = true, env = "BAZAAR_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Where the web role calls the public API (web). Default: the gateway on this machine,
    /// http://127.0.0.1:<base port>.
    #[arg(long, global = true, env = "BAZAAR_GATEWAY_URL")]
    pub gateway_url: Option<String>,
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
    /// Credit for each new wallet in cents (payments): free money, so a demo feature.
    /// Default: none for `bazaar serve`; `bazaar up`'s demo gives 100 000.
    #[arg(long, global = true, env = "BAZAAR_WELCOME_CREDIT_CENTS")]
    pub welcome_credit_cents: Option<i64>,
    /// Proxies in front of the gateway whose X-Forwarded-For names the client (gateway;
    /// Kong's trusted_ips): IPs or CIDR blocks, comma-separated. Default: none, so every
    /// client is its connecting address and a forged header picks no rate-limit bucket.
    #[arg(long, global = true, env = "BAZAAR_TRUSTED_IPS")]
    pub trusted_ips: Option<String>,
    /// Orders one customer may place in any minute (orders; 0: no limit); past it, 429.
    #[arg(
        long,
        global = true,
        env = "BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE",
        default_value_t = 30
    )]
    pub orders_per_customer_per_minute: u32,
    /// How long each order saga step waits for its participant before resending (orders);
    /// resends back off from a twentieth of it to three times it, and a compensation that
    /// fails 12 times leaves the saga stuck. Shorter makes fault drills quick.
    #[arg(long, global = true, env = "BAZAAR_SAGA_STEP_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub saga_step_timeout_ms: u64,
    /// Threads serving the gateway's proxied connections, each with its own event loop and
    /// upstream pools (gateway; default: one per core, as nginx's `worker_processes auto`).
    #[arg(long, global = true, env = "BAZAAR_GATEWAY_WORKERS",
        value_parser = clap::value_parser!(u16).range(1..=256))]
    pub gateway_workers: Option<u16>,
    /// Sagas in progress past which new orders are shed with 503 (orders; 0: no limit).
    #[arg(long, global = true, env = "BAZAAR_ORDERS_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub orders_max_in_flight: u32,
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
    /// How many instances of each role run (`orders=2,web=1`; web's console lists them).
    /// `bazaar up` sets it for every role it starts. Default: one of each.
    #[arg(long = "layout", global = true, env = "BAZAAR_REPLICAS", hide = true)]
    pub layout: Option<String>,
    /// Which instance of its role this process is (serve only): 0 listens on the role's
    /// port, instance K on the role's port + 10*K.
    #[arg(long, global = true, env = "BAZAAR_INSTANCE", default_value_t = 0)]
    pub instance: u16,
    /// Milliseconds a stopping service answers not-ready on /health/ready, still serving,
    /// before it stops accepting (so a balancer takes it out first).
    #[arg(long, global = true, env = "BAZAAR_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// A listening socket passed by the supervisor (`bazaar up`): serve on it instead of
    /// binding the role's port.
    #[arg(long, global = true, env = "BAZAAR_LISTEN_FD", hide = true)]
    pub listen_fd: Option<i32>,
    /// The gateway admin's listening socket passed by the supervisor.
    #[arg(long, global = true, env = "BAZAAR_ADMIN_LISTEN_FD", hide = true)]
    pub admin_listen_fd: Option<i32>,
}

impl Settings {
    /// The broker URL.
    pub fn broker_url(&self) -> String {
        self.broker
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data.join("bus.db").display()))
    }

    /// The port of `role` (its first instance).
    pub fn port(&self, role: Role) -> u16 {
        self.instance_port(role, 0)
    }

    /// The port of instance `k` of `role`.
    pub fn instance_port(&self, role: Role, k: u16) -> u16 {
        self.base_port
            .saturating_add(role.port_offset)
            .saturating_add(role.instance_stride(k))
    }

    /// The gateway's admin port.
    pub fn admin_port(&self) -> u16 {
        self.base_port.saturating_add(GATEWAY_ADMIN_OFFSET)
    }

    /// The URL of `role`'s `/health` (its first instance).
    pub fn health_url(&self, role: Role) -> String {
        self.instance_health_url(role, 0)
    }

    /// The URL of instance `k` of `role`'s `/health`.
    pub fn instance_health_url(&self, role: Role, k: u16) -> String {
        let port = match role.kind {
            RoleKind::Gateway => self.base_port.saturating_add(GATEWAY_ADMIN_OFFSET),
            RoleKind::Service { .. } => self.instance_port(role, k).saturating_add(ADMIN_PORT_OFFSET),
            RoleKind::Simulator { .. } => self.instance_port(role, k),
        };
        format!("http://127.0.0.1:{port}/health")
    }

    /// Connections each instance of `role` opens to a PostgreSQL store: `--store-pool`, or
    /// its share of [`SERVICE_CONNECTIONS`] among the role's replicas.
    pub fn store_pool(&self, role: Role) -> anyhow::Result<u32> {
        if let Some(size) = self.store_pool {
            return Ok(size);
        }
        Ok((SERVICE_CONNECTIONS / u32::from(self.replicas()?.of(role).max(1))).max(2))
    }

    /// How many instances of each role run, as `bazaar up` told this process.
    pub fn replicas(&self) -> anyhow::Result<Replicas> {
        match &self.layout {
            Some(text) => Replicas::parse(text).map_err(|e| anyhow::anyhow!("BAZAAR_REPLICAS: {e}")),
            None => Ok(Replicas::default()),
        }
    }

    /// The store URL of service `name`, from `BAZAAR_<NAME>_STORE_URL` or the data directory.
    pub fn store_url(&self, name: &str) -> String {
        std::env::var(store_url_var(name))
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("sqlite://{}", self.data.join(format!("{name}.db")).display()))
    }

    /// The gateway config path.
    pub fn gateway_config(&self) -> PathBuf {
        self.gateway_config
            .clone()
            .unwrap_or_else(|| self.data.join("kong.yml"))
    }

    /// The credit each new wallet gets: as set, else [`DEMO_WELCOME_CREDIT_CENTS`] in `up`'s
    /// demo (`demo`) and nothing otherwise, so a served shop gives no free money unless told.
    pub fn welcome_credit(&self, demo: bool) -> anyhow::Result<i64> {
        match self.welcome_credit_cents {
            Some(cents) if cents < 0 => anyhow::bail!("BAZAAR_WELCOME_CREDIT_CENTS must not be negative, got {cents}"),
            Some(cents) => Ok(cents),
            None if demo => Ok(DEMO_WELCOME_CREDIT_CENTS),
            None => Ok(0),
        }
    }

    /// The proxies whose X-Forwarded-For the gateway believes (`BAZAAR_TRUSTED_IPS`).
    pub fn trusted_proxies(&self) -> anyhow::Result<bazaar_gateway::TrustedProxies> {
        bazaar_gateway::TrustedProxies::parse(self.trusted_ips.as_deref().unwrap_or(""))
            .map_err(|e| anyhow::anyhow!("BAZAAR_TRUSTED_IPS: {e}"))
    }

    /// Where the web role calls the public API: `--gateway-url`, or this machine's gateway.
    pub fn gateway_url(&self) -> String {
        self.gateway_url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", self.base_port))
    }

    /// The URL of the users service's JWKS: over the mesh (`https://users:PORT/…`) when this
    /// process has a mesh certificate.
    pub fn jwks_url(&self) -> String {
        self.jwks_url.clone().unwrap_or_else(|| {
            let users = RoleSpec::named(bazaar_users::SERVICE.name).map_or(0, |r| self.port(r));
            match self.mesh_cert {
                Some(_) => format!(
                    "https://{}:{users}{}",
                    bazaar_users::SERVICE.name,
                    bazaar_kit::auth::JWKS_PATH
                ),
                None => format!("http://127.0.0.1:{users}{}", bazaar_kit::auth::JWKS_PATH),
            }
        })
    }

    /// This process's mesh material, when all three files are set; an error naming what is
    /// missing or unusable when only some are.
    pub fn mesh(&self) -> anyhow::Result<Option<Arc<bazaar_kit::mesh::Tls>>> {
        match (&self.mesh_cert, &self.mesh_key, &self.mesh_bundle) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(bundle)) => {
                let files = bazaar_kit::mesh::MeshFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    bundle: bundle.clone(),
                };
                Ok(Some(Arc::new(bazaar_kit::mesh::Tls::load(files).context("mesh")?)))
            }
            _ => anyhow::bail!(
                "BAZAAR_MESH_CERT, BAZAAR_MESH_KEY and BAZAAR_MESH_BUNDLE go together; set all three or none"
            ),
        }
    }

    /// Role names and where they are reached, for mesh clients (none: DNS).
    pub fn peers(&self) -> Vec<(String, std::net::IpAddr)> {
        match self.peer_ip {
            Some(ip) => ROLES.iter().map(|r| (r.name.to_string(), ip)).collect(),
            None => Vec::new(),
        }
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
        bazaar_trust::files::write_private(&path, &secret)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(secret)
    }

    /// Writes the default gateway config for these ports and `replicas` when the file is
    /// missing, or (`refresh`) when it is one bazaar generated and nobody claimed by
    /// deleting its first line; a file of the operator's own is left alone.
    pub fn ensure_gateway_config(
        &self,
        replicas: &Replicas,
        redis: Option<&str>,
        refresh: bool,
        mesh: Option<&bazaar_gateway::DefaultMesh<'_>>,
    ) -> anyhow::Result<PathBuf> {
        let path = self.gateway_config();
        let generated =
            || std::fs::read_to_string(&path).is_ok_and(|text| text.starts_with(bazaar_gateway::GENERATED_MARKER));
        if !path.exists() || (refresh && generated()) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // Over the mesh the gateway reaches users' keys as it reaches users.
            let jwks_uri = match mesh {
                Some(mesh) => format!(
                    "https://{}.{}{}",
                    bazaar_users::SERVICE.name,
                    mesh.trust_domain,
                    bazaar_kit::auth::JWKS_PATH
                ),
                None => self.jwks_url(),
            };
            let text = bazaar_gateway::default_config(&self.public_routes(replicas), redis, &jwks_uri, mesh);
            bazaar_trust::files::write_private(&path, &text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(path)
    }
}

impl Settings {
    /// Every service's public routes, at the ports of its instances: what the default
    /// gateway config serves.
    pub fn public_routes(&self, replicas: &Replicas) -> Vec<bazaar_gateway::DefaultRoute<'static>> {
        services()
            .flat_map(|(role, spec)| {
                let targets: Vec<u16> = (0..replicas.of(role)).map(|k| self.instance_port(role, k)).collect();
                spec.routes.iter().map(move |r| bazaar_gateway::DefaultRoute {
                    name: r.name,
                    resource: r.resource,
                    prefix: r.mount.prefix(),
                    service: role.name,
                    targets: targets.clone(),
                    methods: r.methods,
                    exact: r.exact,
                    jwt: r.access == Access::Token,
                    credentials: r.access == Access::Credentials,
                })
            })
            .collect()
    }
}

/// The variable that names service `name`'s store: `BAZAAR_<NAME>_STORE_URL`.
pub fn store_url_var(name: &str) -> String {
    format!("BAZAAR_{}_STORE_URL", name.to_uppercase().replace('-', "_"))
}

/// Creates the data directory readable by its owner only, tightening one an older bazaar
/// left open, checks that it can be written, and removes the shared token secret older
/// versions wrote there.
pub fn private_data_dir(data: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let mode = std::fs::metadata(data)
        .with_context(|| format!("cannot read {}", data.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", data.display()))?;
        tracing::warn!(dir = %data.display(), was = format!("{:o}", mode & 0o777), "the data directory was readable by others; it is 0700 now");
    }
    // Everything bazaar keeps goes here: find out now, not when a role first writes.
    let probe = data.join(format!(".write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            anyhow::anyhow!(
                "the data directory {} is not writable ({e}); make it writable, or pick another with --data",
                data.display()
            )
        })?;
    let old_secret = data.join("jwt.secret");
    if old_secret.exists() {
        std::fs::remove_file(&old_secret).with_context(|| format!("cannot remove {}", old_secret.display()))?;
        tracing::warn!(file = %old_secret.display(), "removed the shared token secret of an older bazaar: only the users service signs tokens now");
    }
    Ok(())
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
    bazaar_kit::telemetry::init_logging(role.name, settings.json_logs);
    bazaar_kit::telemetry::metrics();
    // Crash-only: a panicking task would leave a half-alive process; exit so the supervisor
    // (bazaar up, systemd, Kubernetes) restarts a whole one. Durable state makes that safe.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        bazaar_kit::telemetry::flush_logs();
        default_hook(info);
        std::process::exit(101);
    }));
    write_pid_file(settings, role);
    if settings.instance >= MAX_INSTANCES || (settings.instance > 0 && !role.replicable()) {
        anyhow::bail!(
            "--instance {} is not an instance {} can have (services and the gateway: 0 to {}; others: 0)",
            settings.instance,
            role.name,
            MAX_INSTANCES - 1
        );
    }
    let listen = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], settings.instance_port(role, settings.instance))));
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping");
        trigger.trigger();
    });
    match role.kind {
        RoleKind::Service { spec, run } => {
            let mesh = settings.mesh()?;
            match &mesh {
                Some(tls) => tracing::info!(identity = %tls.identity(), "mesh: serving the API over mutual TLS"),
                None => tracing::warn!(
                    "MESH OFF: the API is plain HTTP and takes any caller; set BAZAAR_MESH_CERT, BAZAAR_MESH_KEY and BAZAAR_MESH_BUNDLE (bazaar up does)"
                ),
            }
            let tokens = match &mesh {
                Some(tls) => bazaar_kit::auth::Verifier::jwks_with(
                    &settings.jwks_url(),
                    bazaar_kit::mesh::http_client(tls, std::time::Duration::from_secs(2), &settings.peers())
                        .context("mesh client for users' keys")?,
                ),
                None => bazaar_kit::auth::Verifier::jwks(&settings.jwks_url()),
            };
            let config = RoleConfig {
                listen,
                store_url: settings.store.clone().unwrap_or_else(|| settings.store_url(spec.name)),
                store_pool: settings.store_pool(role)?,
                broker_url: settings.broker_url(),
                tokens,
                drain_delay: std::time::Duration::from_millis(settings.drain_delay_ms),
                listen_fd: settings.listen_fd,
                mesh,
                admin_listen: Some(SocketAddr::new(
                    settings.admin_listen_ip,
                    listen.port().saturating_add(ADMIN_PORT_OFFSET),
                )),
                admin_listen_fd: settings.admin_listen_fd,
                mesh_policy: settings.mesh_policy.clone(),
                mesh_peers: settings.peers(),
            };
            run(settings.clone(), config, shutdown).await.with_context(|| role.name)
        }
        RoleKind::Gateway => serve_gateway(settings, listen, shutdown).await,
        RoleKind::Simulator { run } => run(settings.clone(), listen, shutdown).await,
    }
}

/// The gateway's access line, written by the log buffer without tracing's per-field work.
fn access_line(entry: &bazaar_gateway::AccessEntry<'_>) {
    use bazaar_kit::telemetry::Field;
    bazaar_kit::telemetry::info_line(
        "bazaar_gateway::proxy",
        "proxied",
        &[
            ("method", Field::Bare(entry.method)),
            ("path", Field::Text(entry.path)),
            ("status", Field::Number(u64::from(entry.status))),
            ("service", Field::Text(entry.service)),
            ("us", Field::Number(entry.us)),
            ("correlation_id", Field::Text(entry.correlation_id)),
        ],
    );
}

async fn serve_gateway(settings: &Settings, listen: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
    // `up` wrote the config for its layout; a lone gateway only fills in a missing one.
    let trusted = settings.trusted_proxies()?;
    let config_path = settings.ensure_gateway_config(&Replicas::default(), None, false, None)?;
    // A public gateway (`BAZAAR_LISTEN=0.0.0.0:…`) keeps its admin API on loopback unless
    // BAZAAR_ADMIN_LISTEN_IP says otherwise.
    let admin_listen = SocketAddr::new(settings.admin_listen_ip, settings.admin_port());
    let opts = bazaar_gateway::GatewayOptions {
        config_path,
        listen,
        admin_listen,
        render_metrics: Arc::new(bazaar_kit::telemetry::render_metrics),
        edge: bazaar_gateway::Edge {
            trusted,
            documents: crate::contracts::gateway_documents(),
            access_log: Some(access_line),
        },
        workers: settings
            .gateway_workers
            .map_or_else(bazaar_gateway::default_workers, usize::from),
    };
    let mut stop = shutdown;
    let stopped = async move { stop.wait().await };
    if let (Some(proxy), Some(admin)) = (settings.listen_fd, settings.admin_listen_fd) {
        // Sockets `up` holds: a replacement gateway accepts from the same queues.
        let inherited =
            |fd| bazaar_kit::runtime::inherited_listener(fd).with_context(|| format!("inherited socket {fd}"));
        let (proxy, admin) = (inherited(proxy)?, inherited(admin)?);
        let drain = std::time::Duration::from_millis(settings.drain_delay_ms);
        return bazaar_gateway::serve_draining(
            opts.config_path,
            proxy,
            admin,
            opts.render_metrics,
            stopped,
            drain,
            opts.edge,
            opts.workers,
        )
        .await
        .context("gateway");
    }
    bazaar_gateway::serve(opts, stopped).await.context("gateway")
}

/// Records the process id in DATA/run/ROLE.pid so operators and fault drills can find it.
fn write_pid_file(settings: &Settings, role: Role) {
    let dir = settings.data.join("run");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let name = instance_name(role, settings.instance);
        std::fs::write(dir.join(format!("{name}.pid")), std::process::id().to_string())
    });
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the pid file");
    }
}

/// Where the file mailer writes.
pub fn mail_dir(data: &Path) -> PathBuf {
    data.join("mail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replicas_of_a_service_share_its_postgresql_connections() {
        let dir = tempfile::tempdir().unwrap();
        let orders: Role = ROLES.iter().find(|r| r.name == "orders").unwrap();
        let mut s = settings(dir.path());
        assert_eq!(s.store_pool(orders).unwrap(), SERVICE_CONNECTIONS);
        s.layout = Some("2".into());
        assert_eq!(s.store_pool(orders).unwrap(), SERVICE_CONNECTIONS / 2);
        s.layout = Some("orders=8".into());
        assert_eq!(s.store_pool(orders).unwrap(), 2, "never fewer than two");
        s.store_pool = Some(5);
        assert_eq!(s.store_pool(orders).unwrap(), 5, "the flag wins");
    }

    fn settings(data: &Path) -> Settings {
        Settings {
            data: data.to_path_buf(),
            broker: None,
            base_port: 8080,
            listen: None,
            store: None,
            store_pool: None,
            jwks_url: None,
            gateway_url: None,
            layout: None,
            saga_step_timeout_ms: 10_000,
            gateway_workers: None,
            admin_listen_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            mesh_cert: None,
            mesh_key: None,
            mesh_bundle: None,
            mesh_policy: None,
            peer_ip: None,
            gateway_config: None,
            json_logs: false,
            decline_rate: 0.0,
            payment_provider_url: None,
            welcome_credit_cents: None,
            trusted_ips: None,
            orders_per_customer_per_minute: 30,
            orders_max_in_flight: 1000,
            smtp: None,
            sms_webhook: None,
            admin_password: None,
            seed_demo: false,
            instance: 0,
            drain_delay_ms: 0,
            listen_fd: None,
            admin_listen_fd: None,
        }
    }

    #[test]
    fn only_the_demo_gives_new_wallets_free_money_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        assert_eq!(s.welcome_credit(false).unwrap(), 0, "bazaar serve");
        assert_eq!(
            s.welcome_credit(true).unwrap(),
            DEMO_WELCOME_CREDIT_CENTS,
            "bazaar up's demo"
        );
        s.welcome_credit_cents = Some(2_500);
        assert_eq!(
            (s.welcome_credit(false).unwrap(), s.welcome_credit(true).unwrap()),
            (2_500, 2_500)
        );
        s.welcome_credit_cents = Some(-1);
        assert!(s.welcome_credit(true).is_err());
    }

    #[test]
    fn every_role_has_its_own_name_and_port() {
        let mut names: Vec<&str> = ROLES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ROLES.len(), "two roles share a name");
        let mut ports = port_offsets();
        ports.sort_unstable();
        ports.dedup();
        let replica_ports = services().count() * usize::from(MAX_INSTANCES - 1);
        let admin_ports = services().count() * usize::from(MAX_INSTANCES);
        assert_eq!(
            ports.len(),
            ROLES.len() + replica_ports + admin_ports + 6 + 1,
            "two instances share a port"
        );
        for (role, spec) in services() {
            assert_eq!(role.name, spec.name, "a service row is named as its spec");
        }
    }

    #[test]
    fn ports_follow_design_md_under_the_default_base() {
        let s = settings(Path::new("data"));
        let port = |name| s.port(RoleSpec::named(name).unwrap());
        assert_eq!(
            [
                port("gateway"),
                port("users"),
                port("inventory"),
                port("orders"),
                port("payments"),
                port("notifications")
            ],
            [8080, 8101, 8102, 8103, 8104, 8105]
        );
        assert_eq!(
            s.health_url(RoleSpec::named("gateway").unwrap()),
            "http://127.0.0.1:8100/health"
        );
        assert_eq!(
            s.health_url(RoleSpec::named("orders").unwrap()),
            "http://127.0.0.1:8203/health"
        );
    }

    #[test]
    fn each_resource_is_served_by_one_service_and_each_route_named_once() {
        let s = settings(Path::new("data"));
        let routes = s.public_routes(&Replicas::default());
        for r in &routes {
            assert_eq!(
                routes.iter().filter(|o| o.name == r.name).count(),
                1,
                "route {}",
                r.name
            );
            assert!(
                routes
                    .iter()
                    .all(|o| o.resource != r.resource || o.service == r.service),
                "/{} is served by two services",
                r.resource
            );
        }
    }

    #[test]
    fn the_default_gateway_config_is_valid_and_routes_every_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = settings(dir.path())
            .ensure_gateway_config(&Replicas::default(), None, true, None)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        bazaar_gateway::check_config_file(&path).unwrap_or_else(|p| panic!("{p:?}"));
        for (role, spec) in services() {
            for route in spec.routes {
                let url = format!("url: http://127.0.0.1:{}/{}", 8080 + role.port_offset, route.resource);
                assert!(text.contains(&url), "no upstream {url} for route {}", route.name);
            }
        }
    }

    #[test]
    fn consumed_topics_are_listed_once_per_service() {
        for (_, spec) in services() {
            let mut topics = spec.consumes.to_vec();
            topics.sort_unstable();
            topics.dedup();
            assert_eq!(topics.len(), spec.consumes.len(), "{} lists a topic twice", spec.name);
        }
    }

    #[test]
    fn replicas_parse_per_role_or_for_every_service_and_refuse_the_rest() {
        let orders = RoleSpec::named("orders").unwrap();
        let users = RoleSpec::named("users").unwrap();
        let r = Replicas::parse("2,orders=3").unwrap();
        assert_eq!((r.of(orders), r.of(users)), (3, 2));
        let r = Replicas::parse("orders=3").unwrap();
        assert_eq!((r.of(orders), r.of(users)), (3, 1));
        // `up` hands its layout to every role in this form.
        assert_eq!(Replicas::parse(&r.to_string()), Ok(r));
        for (bad, says) in [
            ("orders=0", "1 to 8"),
            ("9", "1 to 8"),
            ("orders=lots", "not `lots`"),
            ("shipping=2", "no role `shipping`"),
            ("payment-sim=2", "only services and the gateway have replicas"),
        ] {
            let err = Replicas::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn every_replica_gets_a_port_of_its_own_and_the_gateway_balances_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let orders = RoleSpec::named("orders").unwrap();
        assert_eq!([0, 1, 2].map(|k| s.instance_port(orders, k)), [8103, 8113, 8123]);
        let replicas = Replicas::parse("orders=2").unwrap();
        let path = s
            .ensure_gateway_config(&replicas, Some("redis://127.0.0.1:6379"), true, None)
            .unwrap();
        bazaar_gateway::check_config_file(&path).unwrap_or_else(|p| panic!("{p:?}"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("target: 127.0.0.1:8103") && text.contains("target: 127.0.0.1:8113"),
            "{text}"
        );
        // A file the operator claimed (marker line deleted) is never rewritten.
        std::fs::write(&path, text.replacen(bazaar_gateway::GENERATED_MARKER, "# mine", 1)).unwrap();
        s.ensure_gateway_config(&Replicas::default(), None, true, None).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("# mine"));
    }

    #[test]
    fn store_variables_are_named_after_the_role() {
        assert_eq!(store_url_var("orders"), "BAZAAR_ORDERS_STORE_URL");
        assert_eq!(store_url_var("payment-sim"), "BAZAAR_PAYMENT_SIM_STORE_URL");
    }
}
