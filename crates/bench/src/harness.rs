//! A running `bazaar up` for end-to-end tests and benches: a child process on a free range
//! of loopback ports, in a directory of its own, waited on until every role is healthy, and
//! stopped (SIGTERM, then SIGKILL) when dropped. The ports and roles come from the role table,
//! so a new role is started, probed and stopped here without a change.

use bazaar_kit::store;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bazaar::{
    roles::{self, instance_name, Replicas, Role, RoleSpec},
    settings::store_url_var,
};
use tokio::process::{Child, Command};

/// How long every role gets to report healthy.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `bazaar` executable.
    pub bin: PathBuf,
    /// A directory for the data dir (`data/`) and the supervisor's log (`up.log`).
    pub dir: PathBuf,
    /// The base port; a free range is picked when `None`.
    pub base: Option<u16>,
    /// Extra `BAZAAR_*` settings (stores, broker, credit, provider).
    pub env: Vec<(String, String)>,
    /// Flags after `up --quiet` (`--orders-per-customer-per-minute 1`, ...).
    pub args: Vec<String>,
    /// `up --replicas` (`2`, `orders=3`, ...); one instance of each service when `None`
    /// (two with `cluster`).
    pub replicas: Option<String>,
    /// `up --cluster --cluster-name NAME`: a JetStream cluster, a PostgreSQL database and
    /// role per service named after NAME, replicas of every service.
    pub cluster: Option<String>,
}

/// A `bazaar up` child.
#[derive(Debug)]
pub struct System {
    child: Option<Child>,
    bin: PathBuf,
    base: u16,
    data: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    replicas: Replicas,
}

/// Variables of the caller's environment that could point `up` at someone else's stores,
/// broker, ports or config.
pub fn foreign_env() -> Vec<String> {
    let common = [
        "BAZAAR_BROKER_URL",
        "BAZAAR_STORE_URL",
        "BAZAAR_LISTEN",
        "BAZAAR_GATEWAY_CONFIG",
        "BAZAAR_CONFIG",
    ];
    let stores = roles::services().map(|(_, spec)| store_url_var(spec.name));
    common.into_iter().map(String::from).chain(stores).collect()
}

/// Why a system did not start: `up` exited (perhaps its ports were taken), or anything else.
enum StartError {
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> StartError {
        StartError::Other(e)
    }
}

/// A base port whose every role's port is free, below the ephemeral range (32768+) so that
/// outgoing connections cannot take them meanwhile.
pub fn free_base_port() -> anyhow::Result<u16> {
    let offsets = roles::port_offsets();
    let span = offsets.iter().max().copied().unwrap_or(0) + 4;
    let slots = (32_000 - 10_000) / span;
    let seed = uuid::Uuid::new_v4().as_u128() as u64;
    for i in 0..200u64 {
        let base = 10_000 + (seed.wrapping_add(i * 7919) % u64::from(slots)) as u16 * span;
        let free = offsets
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free range of loopback ports found")
}

/// The `bazaar` executable: `explicit`, or the one built beside this executable.
pub fn bazaar_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("bazaar"),
    };
    if !path.is_file() {
        bail!(
            "no bazaar executable at {}; build it with `cargo build --release -p bazaar` or pass --bazaar PATH",
            path.display()
        );
    }
    Ok(path)
}

/// The port offset of the role called `name`.
pub fn port_offset(name: &str) -> anyhow::Result<u16> {
    RoleSpec::named(name)
        .map(|r| r.port_offset)
        .with_context(|| format!("no role `{name}` in the role table"))
}

impl System {
    /// Starts `up` and waits until every role answers `/health` with 200.
    pub async fn start(options: Options) -> anyhow::Result<System> {
        // Another test may take the free ports this one chose before `up` binds them; then
        // `up` exits at once, and a chosen (not given) base is chosen again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let base = match options.base {
                Some(base) => base,
                None => free_base_port()?,
            };
            match System::start_on(&options, base).await {
                Err(StartError::Exited(e)) if options.base.is_none() && attempts < 3 => {
                    eprintln!("harness: `bazaar up` on base {base} exited while starting ({e:#}); another base");
                }
                Err(StartError::Exited(e) | StartError::Other(e)) => return Err(e),
                Ok(system) => return Ok(system),
            }
        }
    }

    async fn start_on(options: &Options, base: u16) -> Result<System, StartError> {
        let options = options.clone();
        std::fs::create_dir_all(&options.dir).with_context(|| format!("cannot create {}", options.dir.display()))?;
        let data = options.dir.join("data");
        let log = options.dir.join("up.log");
        let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let replicas = match (&options.replicas, &options.cluster) {
            (Some(text), _) => Replicas::parse(text).map_err(|e| anyhow::anyhow!("--replicas {text}: {e}"))?,
            (None, Some(_)) => Replicas::parse("2,gateway=2").map_err(anyhow::Error::msg)?,
            (None, None) => Replicas::default(),
        };
        let mut cmd = Command::new(&options.bin);
        cmd.args(["up", "--quiet"])
            .args(&options.args)
            .args(options.replicas.iter().flat_map(|r| ["--replicas", r.as_str()]))
            .args(
                options
                    .cluster
                    .iter()
                    .flat_map(|name| ["--cluster", "--cluster-name", name.as_str()]),
            )
            .env("BAZAAR_DATA", &data)
            .env("BAZAAR_BASE_PORT", base.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().context("cannot share the log file")?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for var in foreign_env() {
            cmd.env_remove(var);
        }
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} up", options.bin.display()))?;
        let mut system = System {
            child: Some(child),
            bin: options.bin,
            base,
            data,
            log,
            env: options.env,
            replicas,
        };
        if let Err(e) = system.wait_healthy().await {
            let exited = matches!(system.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            let tail = system.log_tail(4000);
            system.stop().await;
            let e = anyhow::anyhow!("{e:#}; the end of its log:\n{tail}");
            return Err(if exited {
                StartError::Exited(e)
            } else {
                StartError::Other(e)
            });
        }
        Ok(system)
    }

    /// Waits until every instance answers `/health` with 200 (again, after faults).
    pub async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + READY_WITHIN;
        for (role, k) in self.instances() {
            let url = format!("http://127.0.0.1:{}/health", self.instance_port(role, k));
            loop {
                if let Ok(r) = client.get(&url).send().await {
                    // Only this system's own processes count (gateways sharing a socket answer
                    // for each other): another test's system on the same ports must not pass.
                    if r.status().is_success() {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        if body["pid"].as_u64().is_some_and(|pid| self.pids().contains(&pid)) {
                            break;
                        }
                    }
                }
                if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                    bail!("`bazaar up` exited with {status}");
                }
                if Instant::now() > deadline {
                    bail!("{url} was not healthy within {}s", READY_WITHIN.as_secs());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The pids this system's processes recorded under `DATA/run`.
    fn pids(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.data.join("run")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    }

    /// The base port (the gateway's).
    pub fn base(&self) -> u16 {
        self.base
    }

    /// Every role instance `up` runs: `(role, k)`.
    pub fn instances(&self) -> Vec<(Role, u16)> {
        roles::up_roles()
            .flat_map(|r| (0..self.replicas.of(r)).map(move |k| (r, k)))
            .collect()
    }

    /// The port instance `k` of `role` answers `/health` and `/metrics` on.
    pub fn instance_port(&self, role: Role, k: u16) -> u16 {
        self.base + role.health_offset() + role.instance_stride(k)
    }

    /// The port of the role called `name`.
    pub fn port(&self, name: &str) -> anyhow::Result<u16> {
        Ok(self.base + port_offset(name)?)
    }

    /// The gateway's public URL of `path` under `/api/v1`.
    pub fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/api/v1{path}", self.base)
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The extra settings it was started with.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// About the last `bytes` of the supervisor's log (every role's lines, prefixed).
    pub fn log_tail(&self, bytes: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(bytes);
        let start = text.char_indices().map(|(i, _)| i).find(|i| *i >= start).unwrap_or(0);
        text[start..].to_string()
    }

    /// The whole supervisor log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `within` until the supervisor log holds a line for which `found` is true,
    /// and returns the log. Roles write their logs every few tens of milliseconds and `up`
    /// relays them, so a line appears shortly after what it reports.
    pub async fn wait_for_log(&self, within: Duration, found: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let log = self.log();
            if log.lines().any(&found) || std::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `bazaar audit --wait WAIT` on this system's stores; `(passed, output)`.
    pub async fn audit(&self, wait: Duration) -> anyhow::Result<(bool, String)> {
        let mut cmd = Command::new(&self.bin);
        let cluster_env = self.data.join("cluster.env");
        if cluster_env.is_file() {
            // What `up --cluster` provisioned: its broker and stores.
            cmd.arg("--config").arg(&cluster_env);
        }
        cmd.args(["audit", "--wait", &wait.as_secs().to_string()])
            .env("BAZAAR_DATA", &self.data);
        for var in foreign_env() {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = tokio::time::timeout(wait + Duration::from_secs(60), cmd.output())
            .await
            .context("the audit did not finish in time")??;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// The pid of the running process of role `name`, from `DATA/run/ROLE.pid`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.data.join("run").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs role `name`'s process; false when it was not running (being restarted).
    pub fn kill9(&self, name: &str) -> bool {
        self.signal(name, "KILL")
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`…) to role `name`'s process; false when it was
    /// not running.
    pub fn signal(&self, name: &str, signal: &str) -> bool {
        self.pid(name).is_some_and(|pid| {
            std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// CPU seconds used so far by each role and by this process (the load driver), read
    /// from /proc; empty where /proc is missing.
    pub fn cpu(&self) -> Vec<(String, f64)> {
        let mut out = vec![("load driver".to_string(), cpu_seconds("self"))];
        for (role, k) in self.instances() {
            let name = instance_name(role, k);
            if let Some(pid) = self.pid(&name) {
                out.push((name, cpu_seconds(&pid.to_string())));
            }
        }
        out.retain(|(_, s)| s.is_finite());
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The peak resident size of each role's process so far, in MiB (`VmHWM` in /proc);
    /// empty where /proc is missing.
    pub fn peak_memory(&self) -> Vec<(String, f64)> {
        self.memory_field("VmHWM:")
    }

    /// The resident size of each role's process now, in MiB (`VmRSS` in /proc).
    pub fn memory(&self) -> Vec<(String, f64)> {
        self.memory_field("VmRSS:")
    }

    /// A `kB` field of each role's /proc status, in MiB.
    fn memory_field(&self, field: &str) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .instances()
            .into_iter()
            .filter_map(|(role, k)| {
                let name = instance_name(role, k);
                let pid = self.pid(&name)?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()?;
                Some((name, kib / 1024.0))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// SIGTERM, then up to 15 s for `up` to stop its roles, then SIGKILL.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

impl Drop for System {
    /// Stops `up` the way [`System::stop`] does, without a runtime: SIGTERM lets it stop its
    /// roles (a SIGKILL would orphan them), and only a hung one is killed.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.start_kill();
    }
}

/// User plus system CPU seconds of process `pid` (`self` for this one), NaN if unknown.
/// Assumes the usual 100 clock ticks per second of Linux's /proc.
pub fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name: state is the 1st, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// Servers a variant may lean on outside the roles, by the command name /proc gives them.
const SERVERS: &[&str] = &["postgres", "nats-server"];

/// CPU seconds so far of each live process named one of [`SERVERS`] on this machine
/// (PostgreSQL's backends are processes of their own): `(pid, name, seconds)`.
pub type ServerSnapshot = Vec<(u32, &'static str, f64)>;

/// A [`ServerSnapshot`] of now; empty where /proc is missing.
pub fn servers_cpu() -> ServerSnapshot {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let name = SERVERS.iter().find(|s| **s == comm.trim())?;
            let seconds = cpu_seconds(&pid.to_string());
            seconds.is_finite().then_some((pid, *name, seconds))
        })
        .collect()
}

/// CPU seconds each server spent between two snapshots: a process started in between
/// counts from zero; one that ended takes its share along (so this is a lower bound).
pub fn servers_delta(before: &ServerSnapshot, after: &ServerSnapshot) -> Vec<(String, f64)> {
    SERVERS
        .iter()
        .map(|server| {
            let spent: f64 = after
                .iter()
                .filter(|(_, name, _)| name == server)
                .map(|(pid, _, now)| {
                    let earlier = before.iter().find(|(p, n, _)| p == pid && n == server);
                    (now - earlier.map_or(0.0, |(_, _, s)| *s)).max(0.0)
                })
                .sum();
            (server.to_string(), spent)
        })
        .collect()
}

/// CPU seconds spent between two snapshots, per process present in both.
pub fn cpu_delta(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let (_, b) = before.iter().find(|(n, _)| n == name)?;
            Some((name.clone(), (a - b).max(0.0)))
        })
        .collect()
}

/// Drops the databases and login roles `up --cluster --cluster-name NAME` provisioned on the
/// PostgreSQL server at `admin` (what a test or bench run leaves behind otherwise).
pub async fn drop_cluster_databases(admin: &str, name: &str) {
    let Ok(server) = bazaar_kit::store::Store::open(admin).await else {
        return;
    };
    for (_, spec) in roles::services() {
        let db = format!("{name}_{}", spec.name.replace('-', "_"));
        let _ = store::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&server)
            .await;
        let _ = store::query(&format!("DROP ROLE IF EXISTS \"{db}\""))
            .execute(&server)
            .await;
    }
    server.close().await;
}

/// Installs the npm `package` (`name@version`) under `prefix` unless `marker` (a file it
/// holds) is there already: the tests' tools from npm, fetched once per target dir. Only the
/// package itself: a driver that would download a browser of its own is told not to.
pub fn npm_install(prefix: &Path, package: &str, marker: &Path) -> anyhow::Result<()> {
    if marker.is_file() {
        return Ok(());
    }
    let out = std::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--silent",
            "--prefix",
        ])
        .arg(prefix)
        .arg(package)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .output()
        .context("cannot run npm")?;
    if !out.status.success() {
        bail!(
            "npm install {package} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !marker.is_file() {
        bail!("{} is missing after npm install {package}", marker.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_cpu_counts_each_process_from_the_first_snapshot_or_from_zero() {
        let before = vec![(10, "postgres", 5.0), (11, "postgres", 2.0), (20, "nats-server", 1.0)];
        // 10 ran on, 11 ended (its lifetime must not be subtracted), 12 started meanwhile.
        let after = vec![(10, "postgres", 6.5), (12, "postgres", 0.25), (20, "nats-server", 1.5)];
        assert_eq!(
            servers_delta(&before, &after),
            vec![("postgres".to_string(), 1.75), ("nats-server".to_string(), 0.5)]
        );
    }
}
