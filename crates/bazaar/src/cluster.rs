//! `bazaar up --cluster`: the distributed form on one machine. A three-node JetStream
//! cluster of `nats-server` processes (supervised by `up` like the roles, stores under
//! DATA/nats; a NATS user per service that may publish only the topics its spec names and
//! work only its own consumers, and an operator user for `up` and the audit), a PostgreSQL
//! database and login role per service (each role owns its database
//! and nobody else may connect to it), the gateway's rate-limit counters in Redis, and
//! replicas of every service. What it provisioned is written to DATA/cluster.env (owner-only),
//! so `bazaar --config DATA/cluster.env audit` checks the same stores.

use bazaar_kit::store;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use bazaar::{
    roles::{self, Replicas, NATS_CLIENT_OFFSETS, NATS_ROUTE_OFFSETS},
    settings::Settings,
};
use bazaar_kit::store::Store;
use tokio::process::Command;

use crate::job::Job;

/// The JetStream cluster `up --cluster` runs.
pub struct Nats {
    bin: PathBuf,
    dir: PathBuf,
    run: PathBuf,
    name: String,
    clients: Vec<u16>,
    routes: Vec<u16>,
}

/// The NATS user of `up`, the audit and the dead-letter tools: every right.
const OPERATOR: &str = "operator";

/// Broker URLs with credentials: the operator's and each service's.
pub struct NatsLogins {
    /// Every right: for `up`'s own checks and `bazaar audit` (written to cluster.env).
    pub operator: String,
    /// Each service's own user.
    pub services: BTreeMap<&'static str, String>,
}

/// One node of it.
#[derive(Debug, Clone)]
pub struct NatsNode {
    bin: PathBuf,
    dir: PathBuf,
    run: PathBuf,
    cluster: String,
    index: usize,
    client: u16,
    route: u16,
    routes: String,
    auth: PathBuf,
}

/// The `nats-server` executable, or why there is none.
fn nats_server() -> anyhow::Result<PathBuf> {
    bazaar_kit::broker::nats::server_binary()
        .context("bazaar up --cluster needs the nats-server binary on PATH (Debian package `nats-server`)")
}

impl Nats {
    /// The cluster's nodes at the base port's NATS offsets, stores under DATA/nats.
    pub fn plan(settings: &Settings, name: &str) -> anyhow::Result<Nats> {
        let at = |offsets: [u16; 3]| offsets.map(|o| settings.place.base_port.saturating_add(o)).to_vec();
        Ok(Nats {
            bin: nats_server()?,
            dir: settings.data.join("nats"),
            run: settings.data.join("run"),
            name: name.to_string(),
            clients: at(NATS_CLIENT_OFFSETS),
            routes: at(NATS_ROUTE_OFFSETS),
        })
    }

    /// The broker URL of the cluster: every seed, streams kept on all three nodes (no
    /// credentials: for display).
    pub fn url(&self) -> String {
        self.url_as(None)
    }

    /// The broker URL logging in as `login` (user, password).
    fn url_as(&self, login: Option<(&str, &str)>) -> String {
        let user = login.map_or(String::new(), |(user, password)| format!("{user}:{password}@"));
        let seeds: Vec<String> = self.clients.iter().map(|p| format!("{user}127.0.0.1:{p}")).collect();
        format!("nats://{}?replicas=3", seeds.join(","))
    }

    /// Writes the nodes' users (DATA/nats/auth.conf, owner-only; passwords in
    /// DATA/nats/USER.password): one per service with exactly the rights its spec implies
    /// ([`bazaar_kit::broker::nats::permissions`]), and an operator with every right. Returns
    /// the operator's broker URL and each service's.
    pub fn provision_users(&self) -> anyhow::Result<NatsLogins> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let password = |user: &str| secret_file(&self.dir.join(format!("{user}.password")));
        let mut users = Vec::new();
        let mut services = BTreeMap::new();
        for (_, spec) in roles::services() {
            let secret = password(spec.name)?;
            let rights = bazaar_kit::broker::nats::permissions(spec.name, spec.publishes, spec.consumes);
            users.push(serde_json::json!({
                "user": spec.name,
                "password": secret,
                "permissions": {
                    "publish": {"allow": rights.publish},
                    "subscribe": {"allow": rights.subscribe},
                },
            }));
            services.insert(spec.name, self.url_as(Some((spec.name, &secret))));
        }
        let operator = password(OPERATOR)?;
        users.push(serde_json::json!({"user": OPERATOR, "password": operator}));
        // nats-server reads JSON as its configuration syntax.
        let text = format!(
            "# Written by `bazaar up --cluster` from the role table at each start.\nauthorization: {}\n",
            serde_json::json!({ "users": users })
        );
        let auth = self.auth_file();
        bazaar_trust::files::write_private(&auth, &text).with_context(|| format!("cannot write {}", auth.display()))?;
        Ok(NatsLogins {
            operator: self.url_as(Some((OPERATOR, &operator))),
            services,
        })
    }

    fn auth_file(&self) -> PathBuf {
        self.dir.join("auth.conf")
    }

    /// The ports it listens on, named.
    pub fn ports(&self) -> Vec<(String, u16)> {
        let clients = self.clients.iter().enumerate().map(|(i, p)| (format!("nats-{i}"), *p));
        let routes = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("nats-{i} routes"), *p));
        clients.chain(routes).collect()
    }

    /// Its nodes.
    pub fn nodes(&self) -> Vec<NatsNode> {
        let routes: Vec<String> = self
            .routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        (0..self.clients.len())
            .map(|index| NatsNode {
                bin: self.bin.clone(),
                dir: self.dir.join(format!("n{index}")),
                run: self.run.clone(),
                cluster: self.name.clone(),
                index,
                client: self.clients[index],
                route: self.routes[index],
                routes: routes.join(","),
                auth: self.auth_file(),
            })
            .collect()
    }
}

impl NatsNode {
    /// The command that runs this node.
    pub fn job(&self) -> anyhow::Result<Job> {
        for dir in [&self.dir, &self.run] {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut command = Command::new(&self.bin);
        command
            .arg("-c")
            .arg(&self.auth)
            .args(["-n", &format!("{}-{}", self.cluster, self.index)])
            .args(["-a", "127.0.0.1", "-p", &self.client.to_string(), "-js"])
            .arg("-sd")
            .arg(&self.dir)
            .args(["--cluster_name", &self.cluster])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", self.route)])
            .args(["--routes", &self.routes]);
        let name = format!("nats-{}", self.index);
        Ok(Job {
            pid_file: Some(self.run.join(format!("{name}.pid"))),
            name,
            command,
            fds: Vec::new(),
        })
    }
}

/// Creates every stream the roles use, logged in as the operator (`url`), before they start:
/// no role may create one, so none can shape a stream another role depends on.
pub async fn create_streams(url: &str) -> anyhow::Result<()> {
    let mut topics = std::collections::BTreeSet::new();
    for (_, spec) in roles::services() {
        topics.extend(spec.publishes.iter().map(|t| t.to_string()));
        for topic in spec.consumes {
            topics.insert(topic.to_string());
            topics.insert(bazaar_kit::broker::dlq_topic(topic));
        }
    }
    bazaar_kit::broker::nats::create_streams(url, topics.iter().map(String::as_str))
        .await
        .context("cannot create the JetStream streams")
}

/// How long a new JetStream cluster gets to elect its meta leader.
const JETSTREAM_READY_WITHIN: Duration = Duration::from_secs(60);

/// Waits until JetStream answers on the cluster `url`.
pub async fn wait_for_jetstream(url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + JETSTREAM_READY_WITHIN;
    loop {
        match bazaar_kit::broker::connect(url).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                bail!("the JetStream cluster did not become ready within {JETSTREAM_READY_WITHIN:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Checks that Redis answers at `url` (`redis://HOST:PORT`) before anything starts.
pub async fn check_redis(url: &str) -> anyhow::Result<String> {
    let addr = url
        .strip_prefix("redis://")
        .map(|rest| rest.split(['/', '?']).next().unwrap_or(rest))
        .map(|hp| hp.rsplit_once('@').map_or(hp, |(_, hp)| hp))
        .filter(|hp| hp.contains(':'))
        .with_context(|| format!("--redis must be redis://HOST:PORT, got `{url}`"))?;
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(url.to_string()),
        _ => bail!("no Redis answers at {addr} (--redis); the cluster's gateways keep their rate limits there"),
    }
}

/// `url` (a PostgreSQL URL) with `user:password` and database `db`.
fn with_login(url: &str, user: &str, password: &str, db: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .with_context(|| format!("--postgres must be postgres://USER@HOST/DB, got `{url}`"))?;
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let query = tail.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Ok(format!("postgres://{user}:{password}@{host}/{db}{query}"))
}

/// A database and login role per service (`<cluster>_<service>`), each role owning its own
/// database with connections by anyone else revoked; passwords kept in DATA/pg (0600).
/// Returns each service's store URL. Safe to run again: what exists is reused.
pub async fn provision_postgres(
    admin: &str,
    data: &Path,
    cluster: &str,
) -> anyhow::Result<BTreeMap<&'static str, String>> {
    let server = Store::open(admin)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {} (--postgres)", redact(admin)))?;
    let dir = data.join("pg");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut stores = BTreeMap::new();
    for (_, spec) in roles::services() {
        let name = format!("{cluster}_{}", spec.name.replace('-', "_"));
        let password = secret_file(&dir.join(format!("{}.password", spec.name)))?;
        let role_exists = store::query("SELECT 1 AS one FROM pg_roles WHERE rolname = $1")
            .bind(&name)
            .fetch_optional(&server)
            .await?
            .is_some();
        // Identifiers are our own `[a-z0-9_]` names and the password our own alphanumerics.
        let role_sql = if role_exists { "ALTER" } else { "CREATE" };
        store::query(&format!("{role_sql} ROLE \"{name}\" LOGIN PASSWORD '{password}'"))
            .execute(&server)
            .await
            .with_context(|| format!("cannot create the PostgreSQL role {name}"))?;
        let db_exists = store::query("SELECT 1 AS one FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_optional(&server)
            .await?
            .is_some();
        if !db_exists {
            store::query(&format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""))
                .execute(&server)
                .await
                .with_context(|| format!("cannot create the database {name}"))?;
        }
        store::query(&format!("REVOKE ALL ON DATABASE \"{name}\" FROM PUBLIC"))
            .execute(&server)
            .await?;
        stores.insert(spec.name, with_login(admin, &name, &password, &name)?);
    }
    server.close().await;
    Ok(stores)
}

/// The secret in `path`, or a new one written there (owner-only).
fn secret_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    let secret = uuid::Uuid::new_v4().simple().to_string();
    bazaar_trust::files::write_private(path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}****{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Writes DATA/cluster.env (owner-only): the broker and store URLs, for `--config`.
pub fn write_env(
    settings: &Settings,
    broker: &str,
    stores: &BTreeMap<&'static str, String>,
) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "# What `bazaar up --cluster` provisioned; use it as `bazaar --config {} audit`.\nBAZAAR_BROKER_URL={broker}\n",
        settings.data.join("cluster.env").display()
    );
    for (service, url) in stores {
        text.push_str(&format!("{}={url}\n", bazaar::settings::store_url_var(service)));
    }
    let path = settings.data.join("cluster.env");
    bazaar_trust::files::write_private(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// What `up --cluster` started and where, for the operator.
pub fn summary(
    settings: &Settings,
    nats: &Nats,
    replicas: &Replicas,
    stores: &BTreeMap<&'static str, String>,
    redis: Option<&str>,
) -> String {
    let mut out = format!(
        "bazaar cluster: JetStream {} (3 nodes, streams replicated 3 times, stores in {})\n",
        nats.url(),
        nats.dir.display()
    );
    for (role, spec) in roles::services() {
        let ports: Vec<String> = (0..replicas.of(role))
            .map(|k| settings.instance_port(role, k).to_string())
            .collect();
        out.push_str(&format!(
            "  {:<14} {} replica(s) on ports {}, store {}\n",
            spec.name,
            replicas.of(role),
            ports.join(", "),
            redact(&stores[spec.name])
        ));
    }
    if let Some(redis) = redis {
        out.push_str(&format!("  gateway rate limits in Redis at {}\n", redact(redis)));
    }
    out.push_str(&format!(
        "  audit: bazaar --config {} audit",
        settings.data.join("cluster.env").display()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_logins_keep_the_server_and_its_options() {
        assert_eq!(
            with_login(
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "b_orders",
                "pw",
                "b_orders"
            )
            .unwrap(),
            "postgres://b_orders:pw@127.0.0.1:5432/b_orders?sslmode=disable"
        );
        assert_eq!(
            with_login("postgresql://u:x@db", "r", "p", "d").unwrap(),
            "postgres://r:p@db/d"
        );
        assert!(with_login("mysql://x", "r", "p", "d").is_err());
    }
}
