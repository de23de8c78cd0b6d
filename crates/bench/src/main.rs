//! `bazaar-bench`: our building blocks measured beside a reference, in one run, as ratios.
//!
//! - `gateway`: requests per second and latency straight to an upstream, through the bazaar
//!   gateway in its own process (bare, to an mTLS upstream, with jwt + rate-limiting +
//!   correlation-id), and through HAProxy (bare and doing the same work) and nginx when they
//!   are installed; load from wrk when it is.
//! - `pipeline`: events per second through outbox, relay, broker and inbox against a bare
//!   publish/ack loop on the same broker.
//! - `saga`: orders per second through the distributed saga (`bazaar up` on its embedded
//!   defaults and, given `--postgres` and `--nats`, on fresh PostgreSQL databases and NATS)
//!   against a monolith that runs the same participants' code in one SQLite transaction.
//!
//! It ships apart from the `bazaar` binary, which holds only what an operator runs. Build
//! both (`cargo build --release -p bazaar -p bazaar-bench`); the gateway and saga benches start the
//! `bazaar` beside this executable, or the one `--bazaar PATH` names.
//!
//! Every run is bounded in count and time, uses loopback and temp dirs only, and cleans up.
//! Load generator and servers share this machine's cores, so figures are comparative: read
//! the ratios, not the absolute numbers.

mod gateway;
mod pipeline;
mod report;
mod saga;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) use report::{Report, Sample};

/// The allocator `bazaar` runs with, so the in-process pipeline measures the kit as deployed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks gateway, messaging pipeline and saga against a reference, as ratios.
#[derive(Debug, Parser)]
#[command(name = "bazaar-bench", version, about)]
struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
    /// Also print the results as one JSON object on the last line.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// HTTP proxying: direct vs bazaar gateway (bare, mesh, plugins) vs HAProxy and nginx.
    Gateway(gateway::GatewayBenchArgs),
    /// Messaging: raw broker publish/ack vs outbox + relay + consumer + inbox.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Orders: the distributed saga under `bazaar up` vs a single-database monolith.
    Saga(saga::SagaBenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = match args.what {
        BenchCommand::Gateway(a) => gateway::run(a, cores).await,
        BenchCommand::Pipeline(a) => pipeline::run(a, cores).await,
        BenchCommand::Saga(a) => saga::run(a, cores).await,
    };
    match report {
        Ok(report) => {
            report.print(args.json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bazaar-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
