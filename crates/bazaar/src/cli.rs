//! The command line: every command and the settings groups it takes (`bazaar::settings`),
//! so a flag a command does not read is refused rather than ignored.

use std::{ffi::OsString, path::PathBuf};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use bazaar::{
    roles::{Role, RoleParser},
    settings::{self, Broker, Global, Place, Process, RoleSettings, Settings},
};

/// An event-driven order system: gateway, users, inventory, orders, payments, notifications, web.
#[derive(Debug, Parser)]
#[command(name = "bazaar", version, about)]
pub struct Cli {
    /// A file of BAZAAR_NAME=value lines (the variables below); flags and the environment win.
    #[arg(long, global = true, env = "BAZAAR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: Global,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs every role as its own child process on this machine, restarting any that dies.
    Up {
        #[command(flatten)]
        args: crate::up::UpArgs,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        roles: RoleSettings,
    },
    /// Runs one role in this process (one pod, one container).
    Serve {
        /// A role of the table.
        #[arg(value_parser = RoleParser)]
        role: Role,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        roles: RoleSettings,
        #[command(flatten)]
        process: Process,
    },
    /// Replaces the instances of each role (all when none) one at a time, beside a running
    /// `bazaar up` on the same data dir, without refusing a request.
    Rollout {
        /// Roles to roll, in order.
        #[arg(value_parser = RoleParser)]
        roles: Vec<Role>,
    },
    /// Checks the invariants (nothing lost, nothing doubled) over every store and the broker.
    Audit {
        #[command(flatten)]
        args: crate::audit::AuditArgs,
        #[command(flatten)]
        broker: Broker,
    },
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
        command: crate::audit::DlqCommand,
        #[command(flatten)]
        broker: Broker,
    },
    /// The mesh CA: create, show, issue a tool's certificate, rotate.
    Mesh {
        #[command(subcommand)]
        command: crate::mesh::MeshCommand,
    },
    /// Prints or writes the API and event contracts (OpenAPI 3.1, AsyncAPI 3.0).
    Contracts {
        #[command(subcommand)]
        command: ContractsCommand,
    },
}

/// `bazaar contracts …`.
#[derive(Debug, Subcommand)]
pub enum ContractsCommand {
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

/// `bazaar gateway …`.
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Validates a Kong-style declarative config file.
    Check {
        /// The file (YAML or JSON).
        file: PathBuf,
    },
}

/// The command line, parsed and checked: the command, and the settings `up` was given as
/// flags (which it hands to the roles it starts as their variables).
pub struct Parsed {
    /// The parsed command line.
    pub cli: Cli,
    /// For `up`: its flags, as `BAZAAR_*` variables for its children.
    pub handed_on: Vec<(OsString, OsString)>,
}

/// Parses the command line, or exits with clap's message (and 2) on a flag the command does
/// not take; a role's setting given to `serve` for another role is an error (one line, and
/// exit 1 from `main`).
pub fn parse() -> anyhow::Result<Parsed> {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let handed_on = match (&cli.command, matches.subcommand()) {
        (Command::Serve { role, .. }, Some(("serve", serve))) => {
            bazaar::serve::refuse_other_roles_flags(role, serve)?;
            Vec::new()
        }
        (Command::Up { .. }, Some(("up", up))) => handed_on(&matches, up),
        _ => Vec::new(),
    };
    Ok(Parsed { cli, handed_on })
}

/// Every setting given to `up` as a flag that its roles read too, as variables.
fn handed_on(top: &ArgMatches, up: &ArgMatches) -> Vec<(OsString, OsString)> {
    let mut vars = settings::given_as_flags(top, &Global::augment_args(clap::Command::new("bazaar")));
    vars.extend(settings::given_as_flags(
        up,
        &Place::augment_args(clap::Command::new("up")),
    ));
    vars.extend(settings::given_as_flags(
        up,
        &RoleSettings::augment_args(clap::Command::new("up")),
    ));
    vars
}

/// The settings `up` and `serve` read.
pub fn settings(global: &Global, place: Place, roles: RoleSettings) -> Settings {
    Settings {
        data: global.data.clone(),
        place,
        roles,
    }
}
