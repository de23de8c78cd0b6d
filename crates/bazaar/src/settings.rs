//! The settings: every flag, each also read from a `BAZAAR_*` variable, in groups by who reads
//! it, so a command takes only the groups it uses (`bazaar audit --smtp x` is refused).
//!
//! - [`Global`]: the data directory and log format, for every command;
//! - [`Place`]: the base port and the broker, for `up` and `serve`;
//! - [`RoleSettings`]: one group per role, for `up` (which hands them on) and `serve`;
//! - [`Process`]: this process's listener, store, mesh files and instance, for `serve`.
//!
//! Nothing here knows the role table; ports and URLs per role are in `layout`.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use clap::{parser::ValueSource, ArgMatches, Args};

/// The credit each new wallet gets in `bazaar up`'s demo, unless set.
pub const DEMO_WELCOME_CREDIT_CENTS: i64 = 100_000;

/// PostgreSQL connections the instances of one service share by default: six services take
/// 48 of a default server's 100, whatever their replicas.
pub const SERVICE_CONNECTIONS: u32 = 8;

/// The operator account `bazaar up` creates (its password is in DATA/admin.password).
pub const ADMIN_EMAIL: &str = "admin@bazaar.local";

/// Settings of every command.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Directory for SQLite files, the gateway config, secrets and mail (kept 0700).
    #[arg(long, global = true, env = "BAZAAR_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Log one JSON object per line.
    #[arg(long, global = true, env = "BAZAAR_JSON_LOGS")]
    pub json_logs: bool,
}

/// The broker, for every command that reads or writes messages.
#[derive(Debug, Clone, Args)]
pub struct Broker {
    /// Broker URL: sqlite://PATH (embedded) or nats://HOST:PORT. Default: sqlite://DATA/bus.db.
    #[arg(long, global = true, env = "BAZAAR_BROKER_URL")]
    pub broker: Option<String>,
}

impl Broker {
    /// The broker URL: as set, or the embedded broker in `data`.
    pub fn url(&self, data: &Path) -> String {
        self.broker
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data.join("bus.db").display()))
    }
}

/// Where the shop's roles listen and find each other: read by `up` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct Place {
    /// Gateway port; every other role's port is an offset from it (the gateway admin +20,
    /// the services +21..+25 and web +27, the payment simulator +26).
    #[arg(long, env = "BAZAAR_BASE_PORT", default_value_t = 8080)]
    pub base_port: u16,
    #[command(flatten)]
    pub broker: Broker,
    /// Where the gateway and services load the users service's public token keys (a JWKS).
    /// Default: users on this machine, http://127.0.0.1:<users port>/.well-known/jwks.json.
    #[arg(long, env = "BAZAAR_JWKS_URL")]
    pub jwks_url: Option<String>,
}

/// The users role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Users")]
pub struct UsersSettings {
    /// Password of the admin account admin@bazaar.local (users creates it at start).
    /// Default: read (or create) DATA/admin.password.
    #[arg(long, env = "BAZAAR_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
}

/// The inventory role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Inventory")]
pub struct InventorySettings {
    /// Add a small demo catalogue to an empty inventory (bazaar up turns it on).
    #[arg(long, env = "BAZAAR_SEED_DEMO")]
    pub seed_demo: bool,
}

/// The orders role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Orders")]
pub struct OrdersSettings {
    /// Orders one customer may place in any minute (0: no limit); past it, 429.
    #[arg(long, env = "BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE", default_value_t = 30)]
    pub orders_per_customer_per_minute: u32,
    /// Sagas in progress past which new orders are shed with 503 (0: no limit).
    #[arg(long, env = "BAZAAR_ORDERS_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub orders_max_in_flight: u32,
    /// How long each order saga step waits for its participant before resending; resends
    /// back off from a twentieth of it to three times it, and a compensation that fails 12
    /// times leaves the saga stuck. Shorter makes fault drills quick.
    #[arg(long, env = "BAZAAR_SAGA_STEP_TIMEOUT_MS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub saga_step_timeout_ms: u64,
}

/// The payments role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Payments")]
pub struct PaymentsSettings {
    /// Share of payments declined on purpose (fault drills).
    #[arg(long, env = "BAZAAR_DECLINE_RATE", default_value_t = 0.0)]
    pub decline_rate: f64,
    /// Base URL of an outside payment provider, e.g. the simulator from
    /// `bazaar serve payment-sim` at http://127.0.0.1:8106. Default: the wallet alone pays.
    #[arg(long, env = "BAZAAR_PAYMENT_PROVIDER_URL")]
    pub payment_provider_url: Option<String>,
    /// Credit for each new wallet in cents: free money, so a demo feature.
    /// Default: none for `bazaar serve`; `bazaar up`'s demo gives 100 000.
    #[arg(long, env = "BAZAAR_WELCOME_CREDIT_CENTS")]
    pub welcome_credit_cents: Option<i64>,
}

/// The notifications role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Notifications")]
pub struct NotificationsSettings {
    /// SMTP relay HOST:PORT. Default: write mail to DATA/mail/*.eml.
    #[arg(long, env = "BAZAAR_SMTP")]
    pub smtp: Option<String>,
    /// SMS gateway webhook URL. Default: write texts to DATA/sms/*.txt.
    #[arg(long, env = "BAZAAR_SMS_WEBHOOK")]
    pub sms_webhook: Option<String>,
}

/// The gateway's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Gateway")]
pub struct GatewaySettings {
    /// Gateway config file. Default: DATA/kong.yml, written with bazaar's routes when missing.
    #[arg(long, env = "BAZAAR_GATEWAY_CONFIG")]
    pub gateway_config: Option<PathBuf>,
    /// Proxies in front of the gateway whose X-Forwarded-For names the client (Kong's
    /// trusted_ips): IPs or CIDR blocks, comma-separated. Default: none, so every client is
    /// its connecting address and a forged header picks no rate-limit bucket.
    #[arg(long, env = "BAZAAR_TRUSTED_IPS")]
    pub trusted_ips: Option<String>,
    /// Threads serving the gateway's proxied connections, each with its own event loop and
    /// upstream pools (default: one per core, as nginx's `worker_processes auto`).
    #[arg(long, env = "BAZAAR_GATEWAY_WORKERS",
        value_parser = clap::value_parser!(u16).range(1..=256))]
    pub gateway_workers: Option<u16>,
}

/// The web role's settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Web")]
pub struct WebSettings {
    /// Where the web role calls the public API. Default: the gateway on this machine,
    /// http://127.0.0.1:<base port>.
    #[arg(long, env = "BAZAAR_GATEWAY_URL")]
    pub gateway_url: Option<String>,
}

/// Every role's own settings: `up` takes them all and hands them on; `serve ROLE` takes
/// them all and refuses, from the command line, those of another role.
#[derive(Debug, Clone, Args)]
pub struct RoleSettings {
    #[command(flatten)]
    pub users: UsersSettings,
    #[command(flatten)]
    pub inventory: InventorySettings,
    #[command(flatten)]
    pub orders: OrdersSettings,
    #[command(flatten)]
    pub payments: PaymentsSettings,
    #[command(flatten)]
    pub notifications: NotificationsSettings,
    #[command(flatten)]
    pub gateway: GatewaySettings,
    #[command(flatten)]
    pub web: WebSettings,
}

/// What one process of a role needs beyond the shop's settings (`serve` only): its
/// listener, store, mesh files and which instance it is. `up` sets these for each process.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "This process")]
pub struct Process {
    /// Address the role listens on. Default: 127.0.0.1 and the role's port.
    #[arg(long, env = "BAZAAR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where its admin listener binds (the gateway's /config, /status and /metrics; a
    /// service's plain health and metrics), whatever the public address: loopback unless
    /// told. (`up` holds every socket on loopback itself.)
    #[arg(long, env = "BAZAAR_ADMIN_LISTEN_IP", default_value = "127.0.0.1")]
    pub admin_listen_ip: std::net::IpAddr,
    /// The role's store URL. Default: BAZAAR_<ROLE>_STORE_URL or sqlite://DATA/<role>.db.
    #[arg(long, env = "BAZAAR_STORE_URL")]
    pub store: Option<String>,
    /// Most connections each instance of a service opens to its PostgreSQL store (1-64).
    /// Default: the replicas of a service share 8 (at least 2 each), so `up --cluster`, a
    /// rollout's extra instance and `bazaar audit` stay well inside PostgreSQL's default 100.
    #[arg(long, env = "BAZAAR_STORE_POOL", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub store_pool: Option<u32>,
    /// This process's mesh certificate (PEM): with it a service's API speaks only mutual TLS.
    /// `bazaar up` issues one per instance; without one a service serves plain HTTP and says
    /// so loudly. Needs BAZAAR_MESH_KEY and BAZAAR_MESH_BUNDLE too.
    #[arg(long, env = "BAZAAR_MESH_CERT")]
    pub mesh_cert: Option<PathBuf>,
    /// The mesh certificate's private key (PEM).
    #[arg(long, env = "BAZAAR_MESH_KEY")]
    pub mesh_key: Option<PathBuf>,
    /// The mesh CA certificates to trust (PEM, one or more).
    #[arg(long, env = "BAZAAR_MESH_BUNDLE")]
    pub mesh_bundle: Option<PathBuf>,
    /// The mesh's authorization policy (YAML): who may call which routes of which role.
    /// `bazaar up` writes DATA/mesh/policy.yaml from the role table's edges.
    #[arg(long, env = "BAZAAR_MESH_POLICY")]
    pub mesh_policy: Option<PathBuf>,
    /// The address every role is reached at by name over the mesh (`bazaar up`: 127.0.0.1).
    /// Default: role names resolve through DNS, as Kubernetes Services do.
    #[arg(long, env = "BAZAAR_PEER_IP", hide = true)]
    pub peer_ip: Option<std::net::IpAddr>,
    /// How many instances of each role run (`orders=2,web=1`; web's console lists them).
    /// `bazaar up` sets it for every role it starts. Default: one of each.
    #[arg(long = "layout", env = "BAZAAR_REPLICAS", hide = true)]
    pub layout: Option<String>,
    /// Which instance of its role this process is: 0 listens on the role's port, instance K
    /// on the role's port + 10*K.
    #[arg(long, env = "BAZAAR_INSTANCE", default_value_t = 0)]
    pub instance: u16,
    /// Milliseconds a stopping service answers not-ready on /health/ready, still serving,
    /// before it stops accepting (so a balancer takes it out first).
    #[arg(long, env = "BAZAAR_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// A listening socket passed by the supervisor (`bazaar up`): serve on it instead of
    /// binding the role's port.
    #[arg(long, env = "BAZAAR_LISTEN_FD", hide = true)]
    pub listen_fd: Option<i32>,
    /// The gateway admin's listening socket passed by the supervisor.
    #[arg(long, env = "BAZAAR_ADMIN_LISTEN_FD", hide = true)]
    pub admin_listen_fd: Option<i32>,
}

/// What `up` and `serve` read: the data directory, where the roles live, and every role's
/// settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The data directory.
    pub data: PathBuf,
    /// Ports and the broker.
    pub place: Place,
    /// Every role's own settings.
    pub roles: RoleSettings,
}

impl Settings {
    /// The broker URL.
    pub fn broker_url(&self) -> String {
        self.place.broker.url(&self.data)
    }

    /// The store URL of service `name`, from `BAZAAR_<NAME>_STORE_URL` or the data directory.
    pub fn store_url(&self, name: &str) -> String {
        store_url(&self.data, name)
    }

    /// The gateway config path.
    pub fn gateway_config(&self) -> PathBuf {
        self.roles
            .gateway
            .gateway_config
            .clone()
            .unwrap_or_else(|| self.data.join("kong.yml"))
    }

    /// The credit each new wallet gets: as set, else [`DEMO_WELCOME_CREDIT_CENTS`] in `up`'s
    /// demo (`demo`) and nothing otherwise, so a served shop gives no free money unless told.
    pub fn welcome_credit(&self, demo: bool) -> anyhow::Result<i64> {
        match self.roles.payments.welcome_credit_cents {
            Some(cents) if cents < 0 => anyhow::bail!("BAZAAR_WELCOME_CREDIT_CENTS must not be negative, got {cents}"),
            Some(cents) => Ok(cents),
            None if demo => Ok(DEMO_WELCOME_CREDIT_CENTS),
            None => Ok(0),
        }
    }

    /// The proxies whose X-Forwarded-For the gateway believes (`BAZAAR_TRUSTED_IPS`).
    pub fn trusted_proxies(&self) -> anyhow::Result<bazaar_gateway::TrustedProxies> {
        bazaar_gateway::TrustedProxies::parse(self.roles.gateway.trusted_ips.as_deref().unwrap_or(""))
            .map_err(|e| anyhow::anyhow!("BAZAAR_TRUSTED_IPS: {e}"))
    }

    /// Where the web role calls the public API: `--gateway-url`, or this machine's gateway.
    pub fn gateway_url(&self) -> String {
        self.roles
            .web
            .gateway_url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", self.place.base_port))
    }

    /// The admin password, creating DATA/admin.password on first use.
    pub fn admin_password(&self) -> anyhow::Result<String> {
        self.secret(self.roles.users.admin_password.as_deref(), "admin.password")
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
}

impl Process {
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
}

/// The store URL of service `name` for a data directory: `BAZAAR_<NAME>_STORE_URL`, or a
/// SQLite file in `data`.
pub fn store_url(data: &Path, name: &str) -> String {
    std::env::var(store_url_var(name))
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("sqlite://{}", data.join(format!("{name}.db")).display()))
}

/// The variable that names service `name`'s store: `BAZAAR_<NAME>_STORE_URL`.
pub fn store_url_var(name: &str) -> String {
    format!("BAZAAR_{}_STORE_URL", name.to_uppercase().replace('-', "_"))
}

/// Where the file mailer writes.
pub fn mail_dir(data: &Path) -> PathBuf {
    data.join("mail")
}

/// The settings of `group` given as flags on `matches`' command line, as the `BAZAAR_*`
/// variables they also read: what `up` hands the processes it starts, so a flag reaches the
/// roles as the same setting in `up`'s environment does.
pub fn given_as_flags(matches: &ArgMatches, group: &clap::Command) -> Vec<(OsString, OsString)> {
    group
        .get_arguments()
        .filter(|arg| matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine))
        .filter_map(|arg| {
            let value = if arg.get_action().takes_values() {
                matches.get_raw(arg.get_id().as_str())?.next()?.to_owned()
            } else {
                OsString::from("true")
            };
            Some((arg.get_env()?.to_owned(), value))
        })
        .collect()
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

/// Settings parsed from `args` as `serve` reads them, for tests.
#[cfg(test)]
pub(crate) fn parse_for_test(data: &Path, args: &[&str]) -> (Settings, Process) {
    use clap::FromArgMatches;
    let command = Process::augment_args(RoleSettings::augment_args(Place::augment_args(clap::Command::new("t"))));
    let matches = command
        .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))
        .expect("test flags");
    let settings = Settings {
        data: data.to_path_buf(),
        place: Place::from_arg_matches(&matches).expect("place"),
        roles: RoleSettings::from_arg_matches(&matches).expect("roles"),
    };
    (settings, Process::from_arg_matches(&matches).expect("process"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_demo_gives_new_wallets_free_money_unless_told() {
        let (mut s, _) = parse_for_test(Path::new("data"), &[]);
        assert_eq!(s.welcome_credit(false).unwrap(), 0, "bazaar serve");
        assert_eq!(
            s.welcome_credit(true).unwrap(),
            DEMO_WELCOME_CREDIT_CENTS,
            "bazaar up's demo"
        );
        s.roles.payments.welcome_credit_cents = Some(2_500);
        assert_eq!(
            (s.welcome_credit(false).unwrap(), s.welcome_credit(true).unwrap()),
            (2_500, 2_500)
        );
        s.roles.payments.welcome_credit_cents = Some(-1);
        assert!(s.welcome_credit(true).is_err());
    }

    #[test]
    fn store_variables_are_named_after_the_role() {
        assert_eq!(store_url_var("orders"), "BAZAAR_ORDERS_STORE_URL");
        assert_eq!(store_url_var("payment-sim"), "BAZAAR_PAYMENT_SIM_STORE_URL");
    }

    #[test]
    fn flags_given_on_the_command_line_are_handed_on_as_their_variables() {
        let group = RoleSettings::augment_args(clap::Command::new("up"));
        let matches = group
            .clone()
            .try_get_matches_from(["up", "--saga-step-timeout-ms", "200", "--seed-demo", "--smtp=m:25"])
            .expect("flags");
        let mut given = given_as_flags(&matches, &group);
        given.sort();
        let expected: Vec<(OsString, OsString)> = [
            ("BAZAAR_SAGA_STEP_TIMEOUT_MS", "200"),
            ("BAZAAR_SEED_DEMO", "true"),
            ("BAZAAR_SMTP", "m:25"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
        assert_eq!(given, expected, "defaults are not handed on, given flags are");
    }
}
