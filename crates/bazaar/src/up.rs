//! `bazaar up`: every role as its own child process, supervised, with multiplexed logs.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    os::fd::{AsRawFd, RawFd},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use bazaar::{
    roles::{self, instance_name, Replicas, Role, RoleKind, ADMIN_PORT_OFFSET},
    serve::stop_signal,
    settings::{self, Settings},
};
use bazaar_kit::{
    broker::BrokerError,
    store::{Store, StoreError},
};

use crate::cluster;
use crate::job::Job;

/// Flags of `bazaar up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Start without the quick tour.
    #[arg(long)]
    quiet: bool,
    /// Seconds to wait for every role to report healthy.
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Instances of each service: `N` for every one, `orders=3,inventory=2` per service, or
    /// both (`2,orders=3`). A service with several needs a shared store (PostgreSQL).
    /// Default: 1, or 2 with --cluster.
    #[arg(long, value_parser = Replicas::parse)]
    replicas: Option<Replicas>,
    /// The distributed form on this machine: a three-node JetStream cluster (nats-server
    /// processes under DATA/nats), a PostgreSQL database and role per service on --postgres,
    /// the gateway's rate limits in Redis (--redis), two replicas of every service and two gateways sharing the public port.
    #[arg(long)]
    cluster: bool,
    /// PostgreSQL server (a superuser's URL) on which --cluster provisions its databases.
    #[arg(
        long,
        env = "BAZAAR_CLUSTER_POSTGRES_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Redis that holds the gateway's rate-limit counters with --cluster.
    #[arg(long, env = "BAZAAR_CLUSTER_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Names the JetStream cluster and prefixes the PostgreSQL databases and roles
    /// (`<name>_orders`, ...), so several clusters can share one server.
    #[arg(long, default_value = "bazaar", value_parser = cluster_name)]
    cluster_name: String,
    /// The built-in mesh: every service's API over mutual TLS with a certificate per
    /// instance from the CA under DATA/mesh. `off` serves plain HTTP, for debugging only.
    #[arg(long, env = "BAZAAR_MESH", value_enum, default_value_t = MeshMode::On)]
    mesh: MeshMode,
}

/// Whether `up` runs the built-in mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MeshMode {
    /// Mutual TLS on every hop to a service.
    On,
    /// Plain HTTP; any local process may call any service.
    Off,
}

/// A cluster name: lowercase letters, digits and `_`, starting with a letter (it becomes
/// PostgreSQL identifiers and a NATS cluster name).
fn cluster_name(name: &str) -> Result<String, String> {
    let ok = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "`{name}` is not a cluster name: lowercase letters, digits and _, starting with a letter, at most 40"
        ))
    }
}

/// A replicated service drains this long (not ready, still serving) before it stops, so
/// the gateway's one-second readiness probe takes it out of the rotation first.
const REPLICA_DRAIN_DELAY_MS: u64 = 1_500;

/// Restarts within [`RESTART_WINDOW`] after which a process that never became ready is given
/// up on, and one that did is restarted more and more slowly (up to [`LONGEST_RESTART_DELAY`]).
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
const LONGEST_RESTART_DELAY: Duration = Duration::from_secs(30);

/// How long to wait before restarting a process that exited `recent` times in the window:
/// 200 ms more for each of the first few, then doubling from a second up to half a minute.
fn restart_delay(recent: usize) -> Duration {
    match recent.checked_sub(MAX_RESTARTS) {
        None => Duration::from_millis(200 * (recent as u64 + 1)),
        Some(over) => Duration::from_secs(1u64 << over.min(5)).min(LONGEST_RESTART_DELAY),
    }
}

/// One running job.
struct Proc {
    name: String,
    /// The role it is an instance of (none for a NATS node).
    role: Option<Role>,
    /// Where a new process of it says it is ready, with its pid in the answer.
    ready_url: Option<String>,
    /// Builds the job again for a restart or a rollout.
    make: Box<dyn Fn() -> anyhow::Result<Job> + Send>,
    child: Child,
    restarts: Vec<Instant>,
    /// When an exited process is to be started again.
    restart_at: Option<Instant>,
}

/// A `bazaar rollout` request: the roles to roll (all when empty) and where progress goes.
struct RolloutRequest {
    roles: Vec<String>,
    progress: mpsc::UnboundedSender<String>,
}

/// The control socket `bazaar rollout` talks to.
pub fn control_socket(data: &std::path::Path) -> std::path::PathBuf {
    data.join("run").join("up.sock")
}

/// How long a replacement gets to become ready before a rollout gives up on it.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a replaced process gets to drain before it is killed.
const DRAIN_WITHIN: Duration = Duration::from_secs(45);

/// Where each service keeps its data and how the roles reach the broker: from the settings,
/// or provisioned by `--cluster`.
struct Backends {
    broker: String,
    /// Whether the roles run on the built-in mesh.
    mesh: bool,
    /// Each service's own broker login, where the broker has users (`--cluster`).
    service_brokers: BTreeMap<&'static str, String>,
    stores: BTreeMap<&'static str, String>,
    /// Rate-limit counters shared by gateways, when set.
    redis: Option<String>,
}

/// Refuses a layout that cannot work before anything starts: several instances of a service
/// whose store is a SQLite file, which only one process may own (a role that keeps nothing
/// gives each instance a file of its own instead).
fn check_replicas(backends: &Backends, replicas: &Replicas) -> anyhow::Result<()> {
    for (role, spec) in roles::services().filter(|(_, spec)| !spec.keeps_nothing()) {
        let n = replicas.of(role);
        let store = &backends.stores[spec.name];
        if n > 1 && store.starts_with("sqlite:") {
            anyhow::bail!(
                "{} cannot run {n} replicas on its SQLite store ({store}): replicas share one store; set {}=postgres://…",
                spec.name,
                settings::store_url_var(spec.name)
            );
        }
    }
    Ok(())
}

/// Runs `up` until Ctrl-C or SIGTERM.
pub async fn run(settings: &Settings, args: UpArgs, handed_on: Vec<(OsString, OsString)>) -> anyhow::Result<()> {
    let (replicas, nats, mut backends) = prepare(settings, &args).await?;
    let instances: Vec<(Role, u16)> = roles::up_roles()
        .flat_map(|r| (0..replicas.of(r)).map(move |k| (r, k)))
        .collect();
    // The cluster form keeps its stores in PostgreSQL, where each role's own migration refuses
    // another version's schema; the data directory's SQLite files are unused then.
    if !args.cluster {
        check_stored_data(settings, &backends, &instances).await?;
    }
    settings.admin_password()?;
    let sockets = hold_sockets(settings, &instances, nats.as_ref())?;
    if args.cluster {
        backends.stores = cluster::provision_postgres(&args.postgres, &settings.data, &args.cluster_name).await?;
        cluster::write_env(settings, &backends.broker, &backends.stores)?;
    }
    let mut mesh = start_mesh(settings, args.mesh, &instances)?;
    backends.mesh = mesh.is_some();
    let config = write_gateway_config(settings, &replicas, backends.redis.as_deref(), mesh.as_ref())?;
    let (lines, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            println!("{line}");
        }
    });
    let shared = std::sync::Arc::new(Shared {
        exe: std::env::current_exe().context("cannot find the bazaar executable")?,
        settings: settings.clone(),
        replicas: replicas.clone(),
        backends,
        sockets,
        handed_on,
    });
    let mut procs = start_all(&shared, nats.as_ref(), &instances, &lines).await?;
    let rollouts = control(&settings.data)?;
    let ready = wait_ready(settings, &instances, Duration::from_secs(args.ready_timeout)).await;
    match &ready {
        Ok(()) if !args.quiet => println!("{}", tour(settings, &config, &shared.backends.broker)),
        Ok(()) => println!("bazaar: all roles healthy"),
        Err(e) => eprintln!("bazaar: {e}"),
    }
    if let (Ok(()), Some(nats)) = (&ready, &nats) {
        let backends = &shared.backends;
        println!(
            "{}",
            cluster::summary(settings, nats, &replicas, &backends.stores, backends.redis.as_deref())
        );
    }
    let supervised = supervise(&shared, &mut procs, mesh.as_mut(), rollouts, &lines, ready.is_ok()).await;
    println!("bazaar: stopping every role");
    terminate_all(&mut procs).await;
    let _ = std::fs::remove_file(control_socket(&settings.data));
    supervised.and(ready)
}

/// Checks what every role will read before anything starts, and works out the layout: the
/// replicas, the JetStream cluster to run (`--cluster`), and where stores and the broker are.
async fn prepare(settings: &Settings, args: &UpArgs) -> anyhow::Result<(Replicas, Option<cluster::Nats>, Backends)> {
    settings.welcome_credit(true)?;
    settings.trusted_proxies()?;
    let replicas = match (&args.replicas, args.cluster) {
        (Some(r), _) => r.clone(),
        (None, true) => Replicas::parse("2,gateway=2").map_err(anyhow::Error::msg)?,
        (None, false) => Replicas::default(),
    };
    let nats = if args.cluster {
        Some(cluster::Nats::plan(settings, &args.cluster_name)?)
    } else {
        None
    };
    let mut backends = Backends {
        broker: settings.broker_url(),
        mesh: false,
        service_brokers: BTreeMap::new(),
        stores: roles::services()
            .map(|(_, s)| (s.name, settings.store_url(s.name)))
            .collect(),
        redis: None,
    };
    if let Some(nats) = &nats {
        let logins = nats.provision_users()?;
        backends.broker = logins.operator;
        backends.service_brokers = logins.services;
        backends.redis = Some(cluster::check_redis(&args.redis).await?);
    }
    if !args.cluster {
        check_replicas(&backends, &replicas)?;
    }
    settings::private_data_dir(&settings.data)?;
    Ok((replicas, nats, backends))
}

/// Binds every role's listening socket, which `up` holds and passes to the role's process,
/// so a restarted or replacing process accepts from the same queue: connections made while
/// a process is being replaced wait instead of being refused. The cluster's NATS ports are
/// only checked to be free.
fn hold_sockets(
    settings: &Settings,
    instances: &[(Role, u16)],
    nats: Option<&cluster::Nats>,
) -> anyhow::Result<HashMap<String, std::net::TcpListener>> {
    let role_ports = instances
        .iter()
        .map(|&(r, k)| (socket_name(r, k), settings.instance_port(r, k)))
        .chain(instances.iter().filter(|(r, _)| r.service().is_some()).map(|&(r, k)| {
            (
                admin_socket_name(r, k),
                settings.instance_port(r, k) + ADMIN_PORT_OFFSET,
            )
        }))
        .chain([(GATEWAY_ADMIN.to_string(), settings.admin_port())]);
    let mut sockets = HashMap::new();
    for (name, port) in role_ports {
        if sockets.contains_key(&name) {
            continue;
        }
        let socket = std::net::TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
            anyhow::anyhow!(
                "port {port} for {name} is taken ({e}); stop what uses it or pick other ports with --base-port"
            )
        })?;
        sockets.insert(name, socket);
    }
    for (name, port) in nats.iter().flat_map(|n| n.ports()) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            anyhow::bail!("port {port} for {name} is taken; stop what uses it or pick other ports with --base-port");
        }
    }
    Ok(sockets)
}

/// Issues a mesh certificate per service instance and the gateway's (it goes into
/// kong.yml), and writes the mesh policy; or says loudly that the mesh is off.
fn start_mesh(
    settings: &Settings,
    mode: MeshMode,
    instances: &[(Role, u16)],
) -> anyhow::Result<Option<crate::mesh::UpMesh>> {
    match mode {
        MeshMode::On => {
            let holders = instances
                .iter()
                .filter(|(role, _)| role.service().is_some())
                .map(|&(role, k)| (instance_name(role, k), role.name))
                .chain([(GATEWAY_MESH_FILE.to_string(), GATEWAY_ROLE)])
                // For `bazaar serve payment-sim` beside this up (up does not start it).
                .chain([(roles::PAYMENT_SIM.to_string(), roles::PAYMENT_SIM)])
                .collect();
            let mesh = crate::mesh::UpMesh::start(&settings.data, holders)?;
            crate::mesh::ensure_policy(&settings.data)?;
            Ok(Some(mesh))
        }
        MeshMode::Off => {
            tracing::warn!("MESH OFF (--mesh off): services speak plain HTTP and take any caller; for debugging only");
            Ok(None)
        }
    }
}

/// Starts the cluster's NATS nodes (then waits for JetStream and creates the streams), then
/// every instance of every role, in the table's order.
async fn start_all(
    shared: &std::sync::Arc<Shared>,
    nats: Option<&cluster::Nats>,
    instances: &[(Role, u16)],
    lines: &mpsc::UnboundedSender<String>,
) -> anyhow::Result<Vec<Proc>> {
    type Maker = Box<dyn Fn() -> anyhow::Result<Job> + Send>;
    let mut makers: Vec<(Option<Role>, Option<String>, Maker)> = Vec::new();
    for node in nats.iter().flat_map(|n| n.nodes()) {
        makers.push((None, None, Box::new(move || node.job())));
    }
    let settings = &shared.settings;
    for &(role, k) in instances {
        let shared = shared.clone();
        let ready = match role.kind {
            RoleKind::Gateway => format!("http://127.0.0.1:{}/health", settings.admin_port()),
            _ => format!(
                "http://127.0.0.1:{}/health/ready",
                settings.instance_port(role, k) + ADMIN_PORT_OFFSET
            ),
        };
        makers.push((Some(role), Some(ready), Box::new(move || role_job(&shared, role, k))));
    }
    let mut procs = Vec::new();
    let nats_nodes = nats.map_or(0, |n| n.nodes().len());
    for (i, (role, ready_url, make)) in makers.into_iter().enumerate() {
        if i == nats_nodes && nats.is_some() {
            // The roles check the broker as they start: let the cluster elect its leaders.
            let ready = async {
                cluster::wait_for_jetstream(&shared.backends.broker).await?;
                cluster::create_streams(&shared.backends.broker).await
            };
            if let Err(e) = ready.await {
                terminate_all(&mut procs).await;
                return Err(e);
            }
        }
        let job = make()?;
        let name = job.name.clone();
        let child = start(job, lines)?;
        procs.push(Proc {
            name,
            role,
            ready_url,
            make,
            child,
            restarts: Vec::new(),
            restart_at: None,
        });
    }
    Ok(procs)
}

/// Keeps every process running until Ctrl-C or SIGTERM: restarts one that exits (backing
/// off, and giving up on one that cannot even come up when the system never got ready),
/// serves rollout requests, and renews mesh certificates when due.
async fn supervise(
    shared: &Shared,
    procs: &mut [Proc],
    mut mesh: Option<&mut crate::mesh::UpMesh>,
    mut rollouts: mpsc::UnboundedReceiver<RolloutRequest>,
    lines: &mpsc::UnboundedSender<String>,
    was_ready: bool,
) -> anyhow::Result<()> {
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut renewal_checked = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            Some(request) = rollouts.recv() => rollout(procs, request, lines).await,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if let Some(mesh) = mesh
            .as_deref_mut()
            .filter(|_| renewal_checked.elapsed() >= RENEWAL_CHECK)
        {
            renewal_checked = Instant::now();
            renew_mesh(shared, mesh, lines);
        }
        if let Some(reason) = restart_exited(procs, lines, was_ready) {
            anyhow::bail!(reason);
        }
    }
}

/// Renews the mesh certificates or trusts a rotated CA when due, and puts the gateway's new
/// certificate in its config.
fn renew_mesh(shared: &Shared, mesh: &mut crate::mesh::UpMesh, lines: &mpsc::UnboundedSender<String>) {
    let done = match mesh.renew_if_due() {
        Ok(crate::mesh::Renewal::Nothing) => None,
        Ok(crate::mesh::Renewal::Trusted) => Some("the gateway and services now trust the rotated mesh CA"),
        Ok(crate::mesh::Renewal::Renewed) => Some("mesh certificates renewed"),
        Err(e) => {
            let _ = lines.send(format!("{:>15} | cannot renew the mesh certificates: {e:#}", "up"));
            None
        }
    };
    if let Some(done) = done {
        let _ = lines.send(format!("{:>15} | {done}", "up"));
        let redis = shared.backends.redis.as_deref();
        if let Err(e) = write_gateway_config(&shared.settings, &shared.replicas, redis, Some(mesh)) {
            let _ = lines.send(format!(
                "{:>15} | cannot put the gateway's mesh certificate in its config: {e:#}",
                "up"
            ));
        }
    }
}

/// Starts again each process whose restart is due, and schedules a restart for each that
/// exited. Returns why `up` gives up: a process it cannot start, or one that cannot even
/// come up (exits too often before the system was ever ready).
fn restart_exited(procs: &mut [Proc], lines: &mpsc::UnboundedSender<String>, was_ready: bool) -> Option<String> {
    for p in procs.iter_mut() {
        if let Some(at) = p.restart_at {
            if Instant::now() >= at {
                p.restart_at = None;
                match (p.make)().and_then(|job| start(job, lines)) {
                    Ok(child) => p.child = child,
                    Err(e) => return Some(format!("cannot restart {}: {e:#}", p.name)),
                }
            }
            continue;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            p.restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
            let recent = p.restarts.len();
            // A role that cannot even come up is a configuration to fix; one that crashes
            // after the system was serving waits longer between restarts instead, so the
            // other roles keep serving (a flood that crashed it is not a reason to stop all).
            if recent >= MAX_RESTARTS && !was_ready {
                return Some(format!(
                    "{} exited ({status}) {MAX_RESTARTS} times within a minute; giving up",
                    p.name
                ));
            }
            let delay = restart_delay(recent);
            let looping = if recent >= MAX_RESTARTS {
                "; it keeps crashing, the other roles keep serving"
            } else {
                ""
            };
            let _ = lines.send(format!(
                "{:>15} | exited ({status}); restarting in {} ms{looping}",
                p.name,
                delay.as_millis()
            ));
            p.restarts.push(Instant::now());
            p.restart_at = Some(Instant::now() + delay);
        }
    }
    None
}

/// `bazaar rollout [ROLE…]`: asks the `up` running on this data dir to replace the
/// instances of each role (all when none) one at a time, printing its progress.
pub async fn request_rollout(data: &std::path::Path, roles: &[Role]) -> anyhow::Result<()> {
    let path = control_socket(data);
    let mut stream = tokio::net::UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no `bazaar up` is running on the data dir {} (nothing answers on {})",
            data.display(),
            path.display()
        )
    })?;
    let names: Vec<&str> = roles.iter().map(|r| r.name).collect();
    stream
        .write_all(format!("rollout {}\n", names.join(" ")).as_bytes())
        .await
        .context("cannot send the request")?;
    let mut lines = BufReader::new(stream).lines();
    let finished = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(line) = lines.next_line().await? {
            if line == "ok" {
                println!("rollout finished");
                return Ok(());
            }
            if let Some(reason) = line.strip_prefix("error: ") {
                anyhow::bail!("rollout stopped: {reason}");
            }
            println!("{line}");
        }
        anyhow::bail!("`bazaar up` stopped before the rollout finished")
    })
    .await;
    finished.unwrap_or_else(|_| anyhow::bail!("the rollout did not finish within 10 minutes"))
}

/// The name `up` keeps the gateway admin's socket under.
const GATEWAY_ADMIN: &str = "gateway admin";

/// The role the gateway's mesh certificate names, and the files it is kept in.
const GATEWAY_ROLE: &str = "gateway";
const GATEWAY_MESH_FILE: &str = "gateway";

/// How often `up` looks whether the mesh certificates are due for renewal or the CA was
/// rotated.
const RENEWAL_CHECK: Duration = Duration::from_secs(2);

/// The name `up` keeps instance `k` of service `role`'s admin socket under.
fn admin_socket_name(role: Role, k: u16) -> String {
    format!("{} admin", instance_name(role, k))
}

/// Writes kong.yml for this layout (while bazaar generated it), over the mesh when there is one.
fn write_gateway_config(
    settings: &Settings,
    replicas: &Replicas,
    redis: Option<&str>,
    mesh: Option<&crate::mesh::UpMesh>,
) -> anyhow::Result<std::path::PathBuf> {
    let pems = mesh.map(|m| m.pems(GATEWAY_MESH_FILE)).transpose()?;
    let default_mesh = pems.as_ref().map(|(cert, key, bundle)| bazaar_gateway::DefaultMesh {
        trust_domain: roles::TRUST_DOMAIN,
        cert_pem: cert,
        key_pem: key,
        ca_pem: bundle,
    });
    settings.ensure_gateway_config(replicas, redis, true, default_mesh.as_ref())
}

/// The name `up` keeps instance `k` of `role`'s socket under: its own, or the role's when
/// its instances share one (the gateway).
fn socket_name(role: Role, k: u16) -> String {
    if role.shares_port() {
        role.name.to_string()
    } else {
        instance_name(role, k)
    }
}

/// What every role's command is made from, shared by the restarts and rollouts of each.
struct Shared {
    /// The bazaar executable.
    exe: std::path::PathBuf,
    settings: Settings,
    replicas: Replicas,
    backends: Backends,
    /// The listening sockets `up` holds, by [`socket_name`] and [`admin_socket_name`].
    sockets: HashMap<String, std::net::TcpListener>,
    /// The settings `up` was given as flags, as the variables its roles read.
    handed_on: Vec<(OsString, OsString)>,
}

/// The command that runs instance `k` of `role`, on the sockets `up` holds for it.
fn role_job(shared: &Shared, role: Role, k: u16) -> anyhow::Result<Job> {
    let Shared {
        exe,
        settings,
        replicas,
        handed_on,
        ..
    } = shared;
    // A replicated service, and any gateway (its replacement shares its socket), drains.
    let drain_delay = if replicas.of(role) > 1 || role.shares_port() {
        REPLICA_DRAIN_DELAY_MS
    } else {
        0
    };
    let mut cmd = Command::new(exe);
    // What `up` was told as flags reaches every role as if it were in `up`'s environment;
    // what `up` decides for each process comes after and wins.
    cmd.envs(handed_on.iter().map(|(k, v)| (k, v)));
    cmd.arg("serve")
        .arg(role.name)
        .env("BAZAAR_INSTANCE", k.to_string())
        .env("BAZAAR_REPLICAS", replicas.to_string())
        .env("BAZAAR_DRAIN_DELAY_MS", drain_delay.to_string())
        .env("BAZAAR_DATA", &settings.data)
        .env("BAZAAR_BASE_PORT", settings.place.base_port.to_string())
        .env("BAZAAR_GATEWAY_CONFIG", settings.gateway_config())
        .env(
            "BAZAAR_WELCOME_CREDIT_CENTS",
            settings.welcome_credit(true)?.to_string(),
        )
        .env("BAZAAR_SEED_DEMO", "true")
        .env_remove("BAZAAR_STORE_URL")
        .env_remove("BAZAAR_LISTEN");
    scope_secrets(&mut cmd, shared, role, k)?;
    let name = instance_name(role, k);
    let fds = pass_sockets(&mut cmd, shared, role, k)?;
    Ok(Job {
        name,
        command: cmd,
        fds,
        pid_file: None,
    })
}

/// Gives instance `k` of `role` only the secrets it needs: its own store's URL and login, the
/// admin password (users only), and its own broker login (services only).
fn scope_secrets(cmd: &mut Command, shared: &Shared, role: Role, k: u16) -> anyhow::Result<()> {
    let Shared { settings, backends, .. } = shared;
    // Each service sees its own store's URL (and login) only.
    for (service, url) in &backends.stores {
        if *service == role.name {
            cmd.env(
                settings::store_url_var(service),
                instance_store_url(settings, role, k, url),
            );
        } else {
            cmd.env_remove(settings::store_url_var(service));
        }
    }
    // A service finds users' keys from its own settings (over the mesh when it has a
    // certificate) unless the operator named the JWKS.
    match &settings.place.jwks_url {
        Some(url) => cmd.env("BAZAAR_JWKS_URL", url),
        None => cmd.env_remove("BAZAAR_JWKS_URL"),
    };
    // Only users creates the admin account.
    if role.name == bazaar_users::SERVICE.name {
        cmd.env("BAZAAR_ADMIN_PASSWORD", settings.admin_password()?);
    } else {
        cmd.env_remove("BAZAAR_ADMIN_PASSWORD");
    }
    // Only services use the broker, each with its own login where the broker has users.
    match role.service() {
        Some(_) => cmd.env(
            "BAZAAR_BROKER_URL",
            backends.service_brokers.get(role.name).unwrap_or(&backends.broker),
        ),
        None => cmd.env_remove("BAZAAR_BROKER_URL"),
    };
    Ok(())
}

/// Passes instance `k` of `role` the sockets `up` holds for it (descriptors 3 and 4) and,
/// on the mesh, its certificate; returns the descriptors to pass.
fn pass_sockets(cmd: &mut Command, shared: &Shared, role: Role, k: u16) -> anyhow::Result<Vec<RawFd>> {
    let Shared {
        settings,
        backends,
        sockets,
        ..
    } = shared;
    let name = instance_name(role, k);
    let mut fds = vec![sockets
        .get(&socket_name(role, k))
        .with_context(|| format!("no socket held for {name}"))?
        .as_raw_fd()];
    cmd.env("BAZAAR_LISTEN_FD", "3");
    for var in [
        "BAZAAR_MESH_CERT",
        "BAZAAR_MESH_KEY",
        "BAZAAR_MESH_BUNDLE",
        "BAZAAR_MESH_POLICY",
        "BAZAAR_PEER_IP",
    ] {
        cmd.env_remove(var);
    }
    if role.service().is_some() {
        fds.push(
            sockets
                .get(&admin_socket_name(role, k))
                .with_context(|| format!("no admin socket held for {name}"))?
                .as_raw_fd(),
        );
        cmd.env("BAZAAR_ADMIN_LISTEN_FD", "4");
        if backends.mesh {
            let files = bazaar_kit::mesh::MeshFiles::in_dir(&crate::mesh::dir(&settings.data), &name);
            cmd.env(
                "BAZAAR_MESH_POLICY",
                crate::mesh::dir(&settings.data).join("policy.yaml"),
            )
            .env("BAZAAR_MESH_CERT", &files.cert)
            .env("BAZAAR_MESH_KEY", &files.key)
            .env("BAZAAR_MESH_BUNDLE", &files.bundle)
            .env("BAZAAR_PEER_IP", "127.0.0.1");
        }
    }
    if matches!(role.kind, RoleKind::Gateway) {
        fds.push(
            sockets
                .get(GATEWAY_ADMIN)
                .context("no socket held for the gateway admin")?
                .as_raw_fd(),
        );
        cmd.env("BAZAAR_ADMIN_LISTEN_FD", "4");
    }
    Ok(fds)
}

/// Passes `fds` to the child as descriptors 3, 4, ... (cleared of close-on-exec).
fn pass_fds(command: &mut Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: between fork and exec the closure only calls async-signal-safe dup2 and fcntl.
    unsafe {
        command.pre_exec(move || {
            for (i, &fd) in fds.iter().enumerate() {
                let target = 3 + i as RawFd;
                if fd == target {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Listens on DATA/run/up.sock (owner-only) for `bazaar rollout` requests: one line naming
/// the roles (none for all); progress goes back line by line, ending `ok` or `error: …`.
fn control(data: &std::path::Path) -> anyhow::Result<mpsc::UnboundedReceiver<RolloutRequest>> {
    let path = control_socket(data);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    let (requests, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                // A request is one short line; anything longer is not a rollout.
                let mut reader = BufReader::new(read.take(4096));
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let (progress, mut updates) = mpsc::unbounded_channel();
                let roles = line.split_whitespace().skip(1).map(str::to_string).collect();
                if !line.starts_with("rollout") || requests.send(RolloutRequest { roles, progress }).is_err() {
                    let _ = write.write_all(b"error: not a rollout request\n").await;
                    return;
                }
                while let Some(update) = updates.recv().await {
                    if write.write_all(format!("{update}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(rx)
}

/// Replaces every process of the requested roles, one at a time: start a new process on the
/// same socket, wait until it (by pid) says it is ready, then drain and stop the old one.
/// A replacement that never becomes ready is killed and the old process keeps serving.
async fn rollout(procs: &mut [Proc], request: RolloutRequest, lines: &mpsc::UnboundedSender<String>) {
    let say = |text: String| {
        let _ = lines.send(format!("{:>15} | {text}", "rollout"));
        let _ = request.progress.send(text);
    };
    let known: Vec<&str> = roles::up_roles().map(|r| r.name).collect();
    if let Some(unknown) = request.roles.iter().find(|r| !known.contains(&r.as_str())) {
        say(format!("error: no role `{unknown}`; roles are {}", known.join(", ")));
        return;
    }
    // A fresh connection per probe: a kept-alive one would keep asking the old process.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
    {
        Ok(client) => client,
        Err(e) => return say(format!("error: http client: {e}")),
    };
    for p in procs.iter_mut() {
        let (Some(role), Some(ready_url)) = (p.role, p.ready_url.clone()) else {
            continue;
        };
        if !request.roles.is_empty() && !request.roles.iter().any(|r| r == role.name) {
            continue;
        }
        say(format!("{}: starting a replacement", p.name));
        let mut fresh = match (p.make)().and_then(|job| start(job, lines)) {
            Ok(child) => child,
            Err(e) => return say(format!("error: cannot start a replacement for {}: {e:#}", p.name)),
        };
        let Some(pid) = fresh.id() else {
            return say(format!("error: the replacement for {} exited at once", p.name));
        };
        let ready = tokio::select! {
            ready = ready_as(&client, &ready_url, pid) => ready.then_some(()).ok_or_else(|| {
                format!("was not ready within {}s", READY_WITHIN.as_secs())
            }),
            exited = fresh.wait() => Err(match exited {
                Ok(status) => format!("exited ({status}) before it was ready"),
                Err(e) => format!("could not be watched: {e}"),
            }),
        };
        if let Err(why) = ready {
            let _ = fresh.kill().await;
            return say(format!(
                "error: the replacement for {} (pid {pid}) {why}; the old one keeps serving",
                p.name
            ));
        }
        let mut old = std::mem::replace(&mut p.child, fresh);
        p.restarts.clear();
        // The replacement stands in for an exited process waiting for its restart, too.
        p.restart_at = None;
        say(format!("{}: pid {pid} is ready; draining the old one", p.name));
        if let Some(old_pid) = old.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(old_pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(DRAIN_WITHIN, old.wait()).await.is_err() {
            let _ = old.kill().await;
        }
        say(format!("{}: replaced", p.name));
    }
    say("ok".into());
}

/// Polls `url` until process `pid` answers it with 200.
async fn ready_as(client: &reqwest::Client, url: &str, pid: u32) -> bool {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Ok(response) = client.get(url).send().await {
            let ok = response.status().is_success();
            if let Ok(body) = response.json::<serde_json::Value>().await {
                if ok && body["pid"].as_u64() == Some(u64::from(pid)) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Spawns `job` with its output prefixed by its name on `lines`.
fn start(mut job: Job, lines: &mpsc::UnboundedSender<String>) -> anyhow::Result<Child> {
    pass_fds(&mut job.command, std::mem::take(&mut job.fds));
    job.command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let name = job.name;
    let mut child = job.command.spawn().with_context(|| format!("cannot start {name}"))?;
    if let (Some(path), Some(pid)) = (&job.pid_file, child.id()) {
        if let Err(e) = std::fs::write(path, pid.to_string()) {
            let _ = lines.send(format!("{name:>15} | cannot write {}: {e}", path.display()));
        }
    }
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = lines.send(format!("{name:>15} | {line}"));
            }
        });
    }
    Ok(child)
}

/// Asks every child to stop (SIGTERM), waits up to 10 s, then kills what is left.
async fn terminate_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        if let Some(pid) = p.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            let _ = p.child.kill().await;
        }
    }
}

/// Waits until every instance answers 200 on `/health`.
pub async fn wait_ready(settings: &Settings, instances: &[(Role, u16)], timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("http client")?;
    let deadline = Instant::now() + timeout;
    for &(role, k) in instances {
        let url = settings.instance_health_url(role, k);
        loop {
            let ok = client
                .get(&url)
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} is not healthy after {}s ({url})",
                    instance_name(role, k),
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The store URL of instance `k` of `role` whose service's store is `url`: each instance of
/// a role that keeps nothing has a SQLite file of its own.
fn instance_store_url(settings: &Settings, role: Role, k: u16, url: &str) -> String {
    let keeps_nothing = role.service().is_some_and(|spec| spec.keeps_nothing());
    if keeps_nothing && k > 0 && url.starts_with("sqlite://") {
        let file = settings.data.join(format!("{}.db", roles::instance_name(role, k)));
        return format!("sqlite://{}", file.display());
    }
    url.to_string()
}

/// Refuses a data directory another version of bazaar wrote, before anything starts: each
/// SQLite store of a service instance and the embedded broker's log that exists must record
/// only migrations this bazaar has.
async fn check_stored_data(settings: &Settings, backends: &Backends, instances: &[(Role, u16)]) -> anyhow::Result<()> {
    let refuse = |path: &std::path::Path, e: StoreError| match e {
        StoreError::UnknownMigration { .. } => {
            let data = settings.data.display();
            anyhow::anyhow!(
                "{}: {e}; move the data directory aside to start afresh (mv {data} {data}.old), or run the bazaar that wrote it",
                path.display()
            )
        }
        e => anyhow::anyhow!("{}: {e}", path.display()),
    };
    let mut checked_urls = std::collections::BTreeSet::new();
    for &(role, k) in instances {
        let Some(spec) = role.service() else { continue };
        let url = instance_store_url(settings, role, k, &backends.stores[spec.name]);
        // Replicas of a role that keeps data share its store: one look is enough.
        if !checked_urls.insert(url.clone()) {
            continue;
        }
        let Some(path) = existing_sqlite_file(&url) else {
            continue;
        };
        let store = Store::open(&url).await.map_err(|e| refuse(&path, e))?;
        let checked = store.check_migrations(&bazaar_kit::runtime::migrations(spec)?).await;
        store.close().await;
        checked.map_err(|e| refuse(&path, e))?;
    }
    if let Some(path) = existing_sqlite_file(&backends.broker) {
        match bazaar_kit::broker::embedded::check_log(&path).await {
            Err(BrokerError::Store(e)) => return Err(refuse(&path, e)),
            other => other.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        }
    }
    Ok(())
}

/// The file a `sqlite://` URL names, when it exists.
fn existing_sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let parsed: bazaar_kit::store::StoreUrl = url.parse().ok()?;
    let path = std::path::PathBuf::from(parsed.sqlite_path()?);
    path.exists().then_some(path)
}

fn tour(settings: &Settings, config: &std::path::Path, broker: &str) -> String {
    // The gateway listens on the base port itself.
    let gw = format!("http://127.0.0.1:{}", settings.place.base_port);
    let data = settings.data.display();
    format!(
        r#"
bazaar is up: gateway {gw}, gateway admin http://127.0.0.1:{admin}, data in {data}, broker {broker}
gateway config: {config} (edit it; the gateway reloads on change)

Shop in a browser: {gw}/ (sign up, then find the emailed code in {data}/mail)
Operate it: {gw}/console (sign in as {admin_email}, password in {data}/admin.password)

Or with curl (copy and paste):
  curl -s {gw}/api/v1/products
  curl -s -XPOST {gw}/api/v1/users -H 'content-type: application/json' \
       -d '{{"email":"ann@example.com","name":"Ann","password":"correct horse"}}'
  for i in $(seq 50); do CODE=$(grep -hos 'confirmation code: [0-9]*' {data}/mail/*.eml | tail -1 | cut -d' ' -f3); [ -n "$CODE" ] && break; sleep 0.2; done
  TOKEN=$(curl -s -XPOST {gw}/api/v1/auth/verification -H 'content-type: application/json' \
       -d "{{\"email\":\"ann@example.com\",\"password\":\"correct horse\",\"code\":\"$CODE\"}}" \
       | sed 's/.*"accessToken":"\([^"]*\)".*/\1/')
  MUG=$(curl -s {gw}/api/v1/products | sed 's/.*"id":"\([^"]*\)","sku":"MUG-CLASSIC".*/\1/')
  ORDER=$(curl -s -XPOST {gw}/api/v1/orders -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
       -d "{{\"items\":[{{\"productId\":\"$MUG\",\"quantity\":2}}]}}" | sed 's/.*"id":"\([^"]*\)".*/\1/')
  curl -s "{gw}/api/v1/orders/$ORDER?waitFor=outcome&timeout=10" -H "authorization: Bearer $TOKEN"
  curl -s {gw}/api/v1/accounts/me -H "authorization: Bearer $TOKEN"
  ls {data}/mail

Admin: {admin_email}, password in {data}/admin.password (adds products, restocks, deposits).
Health: http://127.0.0.1:{admin}/health and each service's /health; metrics at /metrics.
Check the invariants any time: bazaar audit    Stop: Ctrl-C
"#,
        admin = settings.admin_port(),
        broker = broker.split('@').next_back().unwrap_or(broker),
        config = config.display(),
        admin_email = bazaar::settings::ADMIN_EMAIL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_looping_role_waits_longer_each_time_but_never_past_half_a_minute() {
        assert_eq!(restart_delay(0), Duration::from_millis(200));
        assert_eq!(restart_delay(MAX_RESTARTS - 1), Duration::from_millis(1_000));
        assert_eq!(restart_delay(MAX_RESTARTS), Duration::from_secs(1));
        assert_eq!(restart_delay(MAX_RESTARTS + 2), Duration::from_secs(4));
        assert_eq!(restart_delay(MAX_RESTARTS + 100), LONGEST_RESTART_DELAY);
    }
}
