//! `bazaar serve ROLE`: one role in this process, started from the settings and the role
//! table; and the stop signal `up` shares.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use bazaar_kit::{
    runtime::RoleConfig,
    shutdown::{self, Shutdown},
};
use clap::{parser::ValueSource, ArgMatches};

use crate::{
    adapters::Launch,
    roles::{instance_name, services, up_roles, Replicas, Role, RoleKind, ADMIN_PORT_OFFSET, MAX_INSTANCES, ROLES},
    settings::{Process, Settings},
};

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() {
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

/// Refuses a setting of another role given as a flag to `serve ROLE` (`serve orders --smtp`):
/// it would be ignored. The same setting in the environment is fine, since one environment
/// often configures every role.
pub fn refuse_other_roles_flags(role: Role, matches: &ArgMatches) -> anyhow::Result<()> {
    for other in ROLES.iter().filter(|r| r.name != role.name) {
        let flags = (other.flags)(clap::Command::new(other.name));
        for arg in flags.get_arguments() {
            if matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
                anyhow::bail!(
                    "--{} is a setting of {}; `bazaar serve {}` does not read it",
                    arg.get_long().unwrap_or(arg.get_id().as_str()),
                    other.name,
                    role.name
                );
            }
        }
    }
    Ok(())
}

/// `bazaar serve ROLE`.
pub async fn serve(settings: &Settings, process: &Process, role: Role, json_logs: bool) -> anyhow::Result<()> {
    bazaar_kit::telemetry::init_logging(role.name, json_logs);
    bazaar_kit::telemetry::metrics();
    // Crash-only: a panicking task would leave a half-alive process; exit so the supervisor
    // (bazaar up, systemd, Kubernetes) restarts a whole one. Durable state makes that safe.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        bazaar_kit::telemetry::flush_logs();
        default_hook(info);
        std::process::exit(101);
    }));
    write_pid_file(settings, process, role);
    if process.instance >= MAX_INSTANCES || (process.instance > 0 && !role.replicable()) {
        anyhow::bail!(
            "--instance {} is not an instance {} can have (services and the gateway: 0 to {}; others: 0)",
            process.instance,
            role.name,
            MAX_INSTANCES - 1
        );
    }
    let listen = process
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], settings.instance_port(role, process.instance))));
    let (trigger, shutdown) = shutdown::channel();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stopping");
        trigger.trigger();
    });
    match role.kind {
        RoleKind::Service { spec, run } => {
            let launch = launch(settings, process)?;
            let config = role_config(settings, process, role, spec.name, listen)?;
            run(launch, config, shutdown).await.with_context(|| role.name)
        }
        RoleKind::Gateway => serve_gateway(settings, process, listen, shutdown).await,
        RoleKind::Simulator { run } => run(launch(settings, process)?, listen, shutdown).await,
    }
}

/// What an adapter needs of the rest of the shop: users' keys as this process reaches them,
/// and every instance `up` runs (for web's console).
fn launch(settings: &Settings, process: &Process) -> anyhow::Result<Launch> {
    let replicas = process.replicas()?;
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
    Ok(Launch {
        settings: settings.clone(),
        process: process.clone(),
        jwks_url: settings.jwks_url(process.mesh_cert.is_some()),
        instances,
        consumers: services()
            .filter(|(_, spec)| !spec.consumes.is_empty())
            .map(|(_, spec)| spec.name)
            .collect(),
    })
}

/// The config every service role shares: listeners, store, broker, token keys and mesh.
fn role_config(
    settings: &Settings,
    process: &Process,
    role: Role,
    name: &str,
    listen: SocketAddr,
) -> anyhow::Result<RoleConfig> {
    let mesh = process.mesh()?;
    match &mesh {
        Some(tls) => tracing::info!(identity = %tls.identity(), "mesh: serving the API over mutual TLS"),
        None => tracing::warn!(
            "MESH OFF: the API is plain HTTP and takes any caller; set BAZAAR_MESH_CERT, BAZAAR_MESH_KEY and BAZAAR_MESH_BUNDLE (bazaar up does)"
        ),
    }
    let jwks = settings.jwks_url(mesh.is_some());
    let tokens = match &mesh {
        Some(tls) => bazaar_kit::auth::Verifier::jwks_with(
            &jwks,
            bazaar_kit::mesh::http_client(tls, std::time::Duration::from_secs(2), &process.peers())
                .context("mesh client for users' keys")?,
        ),
        None => bazaar_kit::auth::Verifier::jwks(&jwks),
    };
    Ok(RoleConfig {
        listen,
        store_url: process.store.clone().unwrap_or_else(|| settings.store_url(name)),
        store_pool: process.store_pool(role)?,
        broker_url: settings.broker_url(),
        tokens,
        drain_delay: std::time::Duration::from_millis(process.drain_delay_ms),
        listen_fd: process.listen_fd,
        mesh,
        admin_listen: Some(SocketAddr::new(
            process.admin_listen_ip,
            listen.port().saturating_add(ADMIN_PORT_OFFSET),
        )),
        admin_listen_fd: process.admin_listen_fd,
        mesh_policy: process.mesh_policy.clone(),
        mesh_peers: process.peers(),
    })
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

async fn serve_gateway(
    settings: &Settings,
    process: &Process,
    listen: SocketAddr,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // `up` wrote the config for its layout; a lone gateway only fills in a missing one.
    let trusted = settings.trusted_proxies()?;
    let config_path = settings.ensure_gateway_config(&Replicas::default(), None, false, None)?;
    // A public gateway (`BAZAAR_LISTEN=0.0.0.0:…`) keeps its admin API on loopback unless
    // BAZAAR_ADMIN_LISTEN_IP says otherwise.
    let admin_listen = SocketAddr::new(process.admin_listen_ip, settings.admin_port());
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
            .roles
            .gateway
            .gateway_workers
            .map_or_else(bazaar_gateway::default_workers, usize::from),
    };
    let mut stop = shutdown;
    let stopped = async move { stop.wait().await };
    if let (Some(proxy), Some(admin)) = (process.listen_fd, process.admin_listen_fd) {
        // Sockets `up` holds: a replacement gateway accepts from the same queues.
        let inherited =
            |fd| bazaar_kit::runtime::inherited_listener(fd).with_context(|| format!("inherited socket {fd}"));
        let (proxy, admin) = (inherited(proxy)?, inherited(admin)?);
        let drain = std::time::Duration::from_millis(process.drain_delay_ms);
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
fn write_pid_file(settings: &Settings, process: &Process, role: Role) {
    let dir = settings.data.join("run");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let name = instance_name(role, process.instance);
        std::fs::write(dir.join(format!("{name}.pid")), std::process::id().to_string())
    });
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the pid file");
    }
}
