//! `bazaar`: one binary for every role, the local supervisor, the audit and the load tool.
//! Benchmarks are a separate binary, `bazaar-bench` (crates/bench).

mod audit;
mod cluster;
mod config_file;
mod job;
mod mesh;
mod up;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use bazaar::roles::{self, Role, RoleParser, Settings};

/// mimalloc keeps freed blocks per thread instead of glibc's arenas and consolidation: the
/// gateway spent a tenth of its time in glibc's malloc and free under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An event-driven order system: gateway, users, inventory, orders, payments, notifications, web.
#[derive(Debug, Parser)]
#[command(name = "bazaar", version, about)]
struct Cli {
    /// A file of BAZAAR_NAME=value lines (the variables below); flags and the environment win.
    #[arg(long, global = true, env = "BAZAAR_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every role as its own child process on this machine, restarting any that dies.
    Up(up::UpArgs),
    /// Runs one role in this process (one pod, one container).
    Serve {
        /// A role of the table.
        #[arg(value_parser = RoleParser)]
        role: Role,
    },
    /// Replaces the instances of each role (all when none) one at a time, beside a running
    /// `bazaar up` on the same data dir, without refusing a request.
    Rollout {
        /// Roles to roll, in order.
        #[arg(value_parser = RoleParser)]
        roles: Vec<Role>,
    },
    /// Checks the invariants (nothing lost, nothing doubled) over every store and the broker.
    Audit(audit::AuditArgs),
    /// Drives orders through the gateway and reports throughput and latency.
    Load(bazaar::load::LoadArgs),
    /// Gateway tools.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Lists or replays dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The mesh CA: create, show, issue a tool's certificate, rotate.
    Mesh {
        #[command(subcommand)]
        command: mesh::MeshCommand,
    },
    /// Prints or writes the API and event contracts (OpenAPI 3.1, AsyncAPI 3.0).
    Contracts {
        #[command(subcommand)]
        command: ContractsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ContractsCommand {
    /// Prints the public OpenAPI document (as the gateway serves it), or one service's.
    Openapi {
        /// A service of the role table, for its own document.
        #[arg(long)]
        service: Option<String>,
    },
    /// Prints the AsyncAPI document of every event and command.
    Asyncapi,
    /// Writes every document under DIR/api (the committed copies: run it after changing a
    /// contract).
    Write {
        /// The repository root.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Also replace the baseline under DIR/api/baseline that changes are held to (a
        /// deliberate, breaking change).
        #[arg(long)]
        baseline: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Validates a Kong-style declarative config file.
    Check {
        /// The file (YAML or JSON).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists dead letters of every topic.
    List,
    /// Republishes every dead letter of `topic` and removes it from the dead-letter topic.
    Replay {
        /// The original topic, e.g. `payments.commands`.
        topic: String,
    },
}

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
    let cli = Cli::parse();
    // A service role is I/O bound and runs its SQLite transactions inline: one scheduler
    // thread avoids cross-thread wake-ups (bazaar-bench saga: 90 -> 100 orders/s, 12% less
    // CPU, measured when SQLite still ran on sqlx's threads). The gateway's proxied
    // connections run on its own worker threads (BAZAAR_GATEWAY_WORKERS), so its main
    // runtime only accepts and reloads.
    // BAZAAR_WORKER_THREADS overrides.
    let threads = std::env::var("BAZAAR_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut builder = match (&cli.command, threads) {
        (Command::Serve { .. }, None) => tokio::runtime::Builder::new_current_thread(),
        (_, Some(1)) => tokio::runtime::Builder::new_current_thread(),
        (_, Some(n)) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        (_, None) => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bazaar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(&cli.settings, args).await,
            Command::Rollout { roles } => up::request_rollout(&cli.settings, &roles).await,
            Command::Serve { role } => roles::serve(&cli.settings, role).await,
            Command::Audit(args) => audit::run(&cli.settings, args).await,
            Command::Load(args) => bazaar::load::run(args.in_data_dir(cli.settings.data.clone())).await,
            Command::Gateway {
                command: GatewayCommand::Check { file },
            } => match bazaar_gateway::check_config_file(&file) {
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
            },
            Command::Dlq { command } => audit::dlq(&cli.settings, command).await,
            Command::Mesh { command } => mesh::run(&cli.settings, command),
            Command::Contracts { command } => contracts(command),
        }
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
