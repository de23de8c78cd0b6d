//! `bazaar`: one binary for every role, the local supervisor, the audit and the load tool.
//! Benchmarks are a separate binary, `bazaar-bench` (crates/bench).

mod audit;
mod cli;
mod cluster;
mod config_file;
mod job;
mod mesh;
mod up;

use std::process::ExitCode;

use bazaar::roles;
use cli::{Command, ContractsCommand, GatewayCommand};

/// mimalloc keeps freed blocks per thread instead of glibc's arenas and consolidation: the
/// gateway spent a tenth of its time in glibc's malloc and free under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn contracts(command: ContractsCommand) -> anyhow::Result<()> {
    use bazaar::contracts;
    let print = |doc: serde_json::Value| println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    match command {
        ContractsCommand::Openapi { service: None } => print(contracts::public_openapi()),
        ContractsCommand::Openapi { service: Some(name) } => {
            let doc = contracts::service_openapi(&name).ok_or_else(|| {
                let known: Vec<&str> = roles::services().map(|(r, _)| r.name).collect();
                anyhow::anyhow!("no service `{name}` (services: {})", known.join(", "))
            })?;
            print(doc)
        }
        ContractsCommand::Asyncapi => print(contracts::asyncapi()),
        ContractsCommand::Write { dir, baseline } => {
            let mut files = contracts::files();
            if baseline {
                files.extend(contracts::baseline_files());
            }
            for (path, text) in files {
                let path = dir.join(path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
                }
                std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Whatever bazaar and the processes it starts write (stores, secrets, logs, mail, pid
    // files, the cluster's NATS data) is readable by its owner only.
    // SAFETY: umask only sets this process's file-mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = config_file::named(&args) {
        if let Err(e) = config_file::apply(&path) {
            eprintln!("bazaar: {e}");
            return ExitCode::FAILURE;
        }
    }
    // The runtime outlives the error line: its shutdown waits for blocking work.
    let mut runtime = None;
    let result = cli::parse().and_then(|parsed| {
        let started = runtime.insert(self::runtime(&parsed.cli.command)?);
        started.block_on(run(parsed))
    });
    bazaar_kit::telemetry::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bazaar: {}", bazaar::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The async runtime for `command`. A service role is I/O bound and runs its SQLite
/// transactions inline: one scheduler thread avoids cross-thread wake-ups (bazaar-bench
/// saga: 90 -> 100 orders/s, 12% less CPU, measured when SQLite still ran on sqlx's
/// threads). The gateway's proxied connections run on its own worker threads
/// (BAZAAR_GATEWAY_WORKERS), so its main runtime only accepts and reloads.
/// BAZAAR_WORKER_THREADS overrides.
fn runtime(command: &Command) -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = std::env::var("BAZAAR_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut builder = match (command, threads) {
        (Command::Serve { .. }, None) => tokio::runtime::Builder::new_current_thread(),
        (_, Some(1)) => tokio::runtime::Builder::new_current_thread(),
        (_, Some(n)) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        (_, None) => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

/// Runs the command.
async fn run(parsed: cli::Parsed) -> anyhow::Result<()> {
    let cli::Parsed { cli, handed_on } = parsed;
    let global = cli.global;
    match cli.command {
        Command::Up { args, place, roles } => up::run(&cli::settings(&global, place, roles), args, handed_on).await,
        Command::Rollout { roles } => up::request_rollout(&global.data, &roles).await,
        Command::Serve {
            role,
            place,
            roles,
            process,
        } => bazaar::serve::serve(&cli::settings(&global, place, roles), &process, role, global.json_logs).await,
        Command::Audit { args, broker } => audit::run(&global.data, &broker, args).await,
        Command::Load(args) => bazaar::load::run(args.in_data_dir(global.data.clone())).await,
        Command::Gateway {
            command: GatewayCommand::Check { file },
        } => check_gateway_config(&file),
        Command::Dlq { command, broker } => audit::dlq(&global.data, &broker, command).await,
        Command::Mesh { command } => mesh::run(&global.data, command),
        Command::Contracts { command } => contracts(command),
    }
}

/// `bazaar gateway check FILE`: a summary, or every problem on a line of its own.
fn check_gateway_config(file: &std::path::Path) -> anyhow::Result<()> {
    match bazaar_gateway::check_config_file(file) {
        Ok(summary) => {
            println!("{}: ok ({summary})", file.display());
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("{}: {p}", file.display());
            }
            Err(anyhow::anyhow!(
                "{} problem(s) in {}",
                problems.lines().len(),
                file.display()
            ))
        }
    }
}
