//! `bazaar bench saga`: orders through the distributed saga against a monolith that does the
//! same business in one database transaction per order.
//!
//! - saga embedded: `bazaar up --quiet` runs as a child process on a temp data dir and free
//!   ports, with its defaults (a SQLite file per role, the embedded broker); `bazaar load`'s
//!   driver places the orders through the gateway and follows each one with
//!   `GET /orders/{id}?waitFor=outcome` (answered when the outcome commits), then
//!   `bazaar audit --wait 30` checks the invariants before `up` is stopped with SIGTERM.
//! - saga pg+nats: the same, when `--postgres` and `--nats` are given, on five fresh
//!   PostgreSQL databases (created through the admin URL, dropped afterwards even when the
//!   run fails) and a NATS broker under a namespace of its own.
//! - monolith: one SQLite file (opened by `Store`, so the same pool size, WAL and pragmas)
//!   with products, reservations, accounts, a double-entry ledger, payments and orders; each
//!   order is ONE transaction that reserves stock, checks and debits the wallet, commits the
//!   stock and confirms (or cancels) the order. Same customers, products, prices, order mix,
//!   count and concurrency as the load driver.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bazaar::roles::{self, store_url_var};
use bazaar_kit::store::{now_millis, Migration, Store};
use clap::Args;
use sqlx::Row;
use tokio::{process::Command, sync::Mutex};

use super::{Report, Sample};
use crate::load::{self, LoadArgs, LoadStats};

/// Flags of `bazaar bench saga`.
#[derive(Debug, Args)]
pub struct SagaBenchArgs {
    /// Orders per variant.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Concurrent workers placing orders.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Customers the orders are spread over.
    #[arg(long, default_value_t = 8)]
    users: usize,
    /// Give up following orders after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Admin URL of a PostgreSQL server on which the pg+nats variant creates (and then drops)
    /// one database per role; needs --nats too.
    #[arg(long, env = "BAZAAR_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
    /// NATS URL for the pg+nats variant (a `namespace=bench<uuid>` is added); needs --postgres too.
    #[arg(long, env = "BAZAAR_BENCH_NATS_URL")]
    nats: Option<String>,
}

/// Prices of the products `bazaar load` creates, in the same order.
const PRICES: [i64; 4] = [250, 399, 1000, 1250];

/// What one saga variant measured.
struct SagaRun {
    stats: LoadStats,
    cpu: Vec<(String, f64)>,
    audit: anyhow::Result<(bool, String)>,
}

/// `bazaar bench saga`.
pub async fn run(args: SagaBenchArgs, cores: usize) -> anyhow::Result<Report> {
    if args.orders == 0 || args.orders > 100_000 || args.concurrency == 0 || args.users == 0 {
        bail!("--orders must be 1..=100000; --concurrency and --users at least 1");
    }
    let credit: i64 = std::env::var("BAZAAR_WELCOME_CREDIT_CENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut report = Report::new(
        format!(
            "bench saga: {} orders, {} concurrent workers, {} customers ({} cents each)",
            args.orders, args.concurrency, args.users, credit
        ),
        "orders/s",
    );
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;

    eprintln!("bench saga: starting `bazaar up` on a temp data dir (embedded defaults)");
    let embedded = saga(&args, &dir.path().join("embedded"), Vec::new()).await;
    add_saga(
        &mut report,
        "saga embedded",
        "bazaar up, SQLite per role + embedded broker",
        embedded,
        cores,
    );

    let distributed = match (&args.postgres, &args.nats) {
        (Some(pg), Some(nats)) => {
            eprintln!("bench saga: starting `bazaar up` on fresh PostgreSQL databases and NATS");
            Some(saga_on_postgres_and_nats(&args, &dir.path().join("pg-nats"), pg, nats).await)
        }
        (None, None) => {
            report.row(
                "saga pg+nats",
                None,
                "give --postgres URL and --nats URL (or BAZAAR_BENCH_POSTGRES_URL, BAZAAR_BENCH_NATS_URL)",
            );
            None
        }
        _ => {
            report.row("saga pg+nats", None, "needs both --postgres and --nats");
            None
        }
    };
    if let Some(result) = distributed {
        add_saga(
            &mut report,
            "saga pg+nats",
            "bazaar up, PostgreSQL database per role + NATS",
            result,
            cores,
        );
    }

    eprintln!("bench saga: monolith, one transaction per order");
    let (mono, outcomes) = monolith(&dir.path().join("monolith.db"), &args, credit).await?;
    report.row(
        "monolith",
        Some(mono),
        format!("one SQLite tx per order; outcomes {outcomes:?}"),
    );
    report.compare("saga embedded", "monolith");
    report.compare("saga pg+nats", "monolith");

    report.note(
        "saga latency is placed -> confirmed/cancelled as a client sees it (POST /orders, then \
         GET /orders/{id}?waitFor=outcome, which the server answers when the outcome commits). \
         Monolith latency is one order's transaction including the wait for a pooled connection.",
    );
    report.note(format!(
        "{cores} core(s) shared by the load driver, the gateway and five services (saga; with \
         pg+nats also PostgreSQL and nats-server, whose CPU is not counted below), or by the \
         driver and SQLite (monolith)."
    ));
    Ok(report)
}

/// Adds a saga variant's row and its notes (POST latency, CPU per role, audit).
fn add_saga(report: &mut Report, name: &str, what: &str, result: anyhow::Result<SagaRun>, cores: usize) {
    let run = match result {
        Ok(run) => run,
        Err(e) => {
            report.row(name, None, format!("FAILED: {e:#}"));
            return;
        }
    };
    let stats = run.stats;
    let failed: usize = stats
        .outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("http") || k.starts_with("error") || *k == "timed out")
        .map(|(_, n)| n)
        .sum();
    let sample = Sample {
        count: stats.settle.len(),
        errors: failed,
        elapsed: stats.elapsed,
        latencies: stats.settle.clone(),
    }
    .finish();
    report.row(name, Some(sample), format!("{what}; outcomes {:?}", stats.outcomes));
    let place = Sample {
        latencies: stats.place,
        ..Sample::default()
    }
    .finish();
    report.note(format!(
        "{name}: POST /orders alone p50 {:.1} ms, p99 {:.1} ms.",
        place.ms(0.5),
        place.ms(0.99)
    ));
    if !run.cpu.is_empty() {
        let total: f64 = run.cpu.iter().map(|(_, s)| s).sum();
        let per_role: Vec<String> = run.cpu.iter().map(|(r, s)| format!("{r} {s:.2}")).collect();
        report.note(format!(
            "{name}: CPU seconds while placing and settling (setup included; {:.2} s wall, {cores} core(s)): {} (total {total:.2})",
            stats.elapsed.as_secs_f64(),
            per_role.join(", ")
        ));
    }
    match run.audit {
        Ok((true, text)) => report.note(format!("{name}: audit passed:\n{}", indent(&text))),
        Ok((false, text)) => report.note(format!("{name}: AUDIT FAILED:\n{}", indent(&text))),
        Err(e) => report.note(format!("{name}: audit could not run: {e:#}")),
    }
}

/// Starts `bazaar up` on `data` with `env`, drives the orders, audits, stops it.
async fn saga(args: &SagaBenchArgs, data: &Path, env: Vec<(String, String)>) -> anyhow::Result<SagaRun> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let system = System::start(&data.join("data"), &data.join("up.log"), env).await?;
    let cpu_before = system.cpu();
    let measured = match load_args(args, &system) {
        Ok(load_args) => load::measure(&load_args).await,
        Err(e) => Err(e),
    };
    let cpu = cpu_delta(&cpu_before, &system.cpu());
    eprintln!("bench saga: running `bazaar audit --wait 30`");
    let audit = system.audit().await;
    system.stop().await;
    Ok(SagaRun {
        stats: measured?,
        cpu,
        audit,
    })
}

/// The saga on five fresh PostgreSQL databases and a NATS namespace of its own; the
/// databases are dropped afterwards whatever happened.
async fn saga_on_postgres_and_nats(
    args: &SagaBenchArgs,
    data: &Path,
    admin: &str,
    nats: &str,
) -> anyhow::Result<SagaRun> {
    let mut dbs = BenchDbs {
        admin: admin.to_string(),
        names: Vec::new(),
    };
    let result = async {
        let mut env = Vec::new();
        for (_, spec) in roles::services() {
            let url = dbs.create(spec.name).await?;
            env.push((store_url_var(spec.name), url));
        }
        let namespace = format!("bench{}", uuid::Uuid::now_v7().simple());
        env.push(("BAZAAR_BROKER_URL".to_string(), with_namespace(nats, &namespace)));
        saga(args, data, env).await
    }
    .await;
    dbs.drop_all().await;
    result
}

/// Databases this bench created on a PostgreSQL server.
struct BenchDbs {
    admin: String,
    names: Vec<String>,
}

impl BenchDbs {
    /// Creates `bench_<role>_<uuid>`; returns its URL.
    async fn create(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("bench_{role}_{}", uuid::Uuid::new_v4().simple());
        let server = Store::open(&self.admin)
            .await
            .context("cannot connect to the --postgres server")?;
        let created = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(server.pool())
            .await;
        server.close().await;
        created.with_context(|| format!("cannot create database {name}"))?;
        self.names.push(name.clone());
        Ok(bazaar_kit::testing::with_database(&self.admin, &name))
    }

    /// Drops every database created here, saying so when one cannot be dropped.
    async fn drop_all(&mut self) {
        if self.names.is_empty() {
            return;
        }
        let server = match Store::open(&self.admin).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("bench saga: cannot drop {:?}: {e}", self.names);
                return;
            }
        };
        for name in self.names.drain(..) {
            let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(server.pool())
                .await;
            if let Err(e) = dropped {
                eprintln!("bench saga: cannot drop database {name}: {e}");
            }
        }
        server.close().await;
    }
}

/// `url` with its `namespace=` query parameter set to `namespace` (other parameters kept).
fn with_namespace(url: &str, namespace: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("namespace="))
        .collect();
    let ns = format!("namespace={namespace}");
    pairs.push(&ns);
    format!("{base}?{}", pairs.join("&"))
}

/// `bazaar load`'s flags for this run, parsed as its command line would be so that flags
/// with defaults need no mention here; an admin password `up` wrote is passed on when
/// `bazaar load` takes one.
fn load_args(args: &SagaBenchArgs, system: &System) -> anyhow::Result<LoadArgs> {
    #[derive(Debug, clap::Parser)]
    struct Line {
        #[command(flatten)]
        load: LoadArgs,
    }
    let mut line = vec![
        "load".to_string(),
        format!("--url=http://127.0.0.1:{}", system.base),
        format!("--orders={}", args.orders),
        format!("--concurrency={}", args.concurrency),
        format!("--users={}", args.users),
        format!("--timeout={}", args.timeout),
    ];
    let takes_password = <Line as clap::CommandFactory>::command()
        .get_arguments()
        .any(|a| a.get_long() == Some("admin-password"));
    if takes_password {
        if let Ok(password) = std::fs::read_to_string(system.data.join("admin.password")) {
            line.push(format!("--admin-password={}", password.trim()));
        }
    }
    Ok(<Line as clap::Parser>::try_parse_from(line)?.load)
}

fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `bazaar up` child on free ports; [`System::stop`] (or drop) ends it with SIGTERM.
struct System {
    child: Option<tokio::process::Child>,
    data: PathBuf,
    base: u16,
    log: PathBuf,
    /// Set for `up` and `audit` after [`foreign_env`] is removed: stores and broker.
    env: Vec<(String, String)>,
}

/// Variables that could point `up` at someone else's stores, broker or config.
fn foreign_env() -> Vec<String> {
    let common = [
        "BAZAAR_BROKER_URL",
        "BAZAAR_STORE_URL",
        "BAZAAR_LISTEN",
        "BAZAAR_GATEWAY_CONFIG",
    ];
    let stores = roles::services().map(|(_, spec)| store_url_var(spec.name));
    common.into_iter().map(String::from).chain(stores).collect()
}

impl System {
    async fn start(data: &Path, log: &Path, env: Vec<(String, String)>) -> anyhow::Result<System> {
        let exe = std::env::current_exe().context("cannot find the bazaar executable")?;
        let base = free_base_port()?;
        let file = std::fs::File::create(log)?;
        let mut cmd = Command::new(exe);
        cmd.args(["up", "--quiet"])
            .env("BAZAAR_DATA", data)
            .env("BAZAAR_BASE_PORT", base.to_string())
            .env("BAZAAR_DECLINE_RATE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for var in foreign_env() {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().context("cannot start `bazaar up`")?;
        let mut system = System {
            child: Some(child),
            data: data.to_path_buf(),
            base,
            log: log.to_path_buf(),
            env,
        };
        if let Err(e) = system.wait_healthy().await {
            let log = system.log.clone();
            system.stop().await;
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e:#}; last lines of its log:\n{}", tail.join("\n"));
        }
        Ok(system)
    }

    /// CPU seconds used so far by each role (from `DATA/run/ROLE.pid`) and by this process
    /// (the load driver), read from /proc; empty where /proc is missing.
    fn cpu(&self) -> Vec<(String, f64)> {
        let mut out = vec![("load driver".to_string(), cpu_seconds("self"))];
        if let Ok(entries) = std::fs::read_dir(self.data.join("run")) {
            for entry in entries.flatten() {
                let path = entry.path();
                let (Some(role), Some("pid")) = (
                    path.file_stem().and_then(|s| s.to_str()),
                    path.extension().and_then(|s| s.to_str()),
                ) else {
                    continue;
                };
                if let Ok(pid) = std::fs::read_to_string(&path) {
                    out.push((role.to_string(), cpu_seconds(pid.trim())));
                }
            }
        }
        out.retain(|(_, s)| s.is_finite());
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        for role in roles::up_roles() {
            let url = format!("http://127.0.0.1:{}/health", self.base + role.health_offset());
            loop {
                if let Ok(r) = client.get(&url).send().await {
                    if r.status().is_success() {
                        break;
                    }
                }
                if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                    bail!("`bazaar up` exited with {status}");
                }
                if Instant::now() > deadline {
                    bail!("{url} was not healthy within 90s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Runs `bazaar audit --wait 30` on this system's data; `(passed, output)`.
    async fn audit(&self) -> anyhow::Result<(bool, String)> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["audit", "--wait", "30"]).env("BAZAAR_DATA", &self.data);
        for var in foreign_env() {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .context("audit did not finish within 90s")??;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// SIGTERM, then up to 15 s for `up` to stop its roles, then SIGKILL.
    async fn stop(mut self) {
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

/// User plus system CPU seconds of process `pid` (`self` for this one), NaN if unknown.
/// Assumes the usual 100 clock ticks per second of Linux's /proc.
fn cpu_seconds(pid: &str) -> f64 {
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

/// CPU seconds spent between two snapshots, per process present in both.
fn cpu_delta(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let (_, b) = before.iter().find(|(n, _)| n == name)?;
            Some((name.clone(), (a - b).max(0.0)))
        })
        .collect()
}

/// A base port whose every role's port (as `up` would take them) is free.
fn free_base_port() -> anyhow::Result<u16> {
    let seed = uuid::Uuid::new_v4().as_u128() as u64;
    for i in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_add(i * 7919)) % 1_300) as u16 * 30;
        let free = roles::port_offsets()
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free range of loopback ports found")
}

/// The monolith's one store: the services' own tables (so both sides do the same work on the
/// same schema), renumbered into one migration sequence.
fn monolith_schema() -> [Migration; 3] {
    let renumber = |m: Migration, version| Migration { version, ..m };
    [
        renumber(bazaar_inventory::MIGRATIONS[0], 10),
        renumber(bazaar_payments::MIGRATIONS[0], 11),
        renumber(bazaar_orders::MIGRATIONS[1], 12),
    ]
}

fn id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Runs the monolith baseline; returns its sample and outcome counts.
async fn monolith(
    path: &Path,
    args: &SagaBenchArgs,
    credit: i64,
) -> anyhow::Result<(Sample, std::collections::BTreeMap<String, usize>)> {
    let store = Store::open(&format!("sqlite://{}", path.display())).await?;
    store.migrate(&monolith_schema()).await?;
    // The house account receives what customers pay, so the ledger balances.
    let house = id();
    let mut tx = store.begin().await?;
    sqlx::query("INSERT INTO account (id, currency, created_at) VALUES ($1, 'USD', $2)")
        .bind(&house)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
    let mut customers = Vec::new();
    for _ in 0..args.users {
        let account = id();
        sqlx::query("INSERT INTO account (id, currency, created_at) VALUES ($1, 'USD', $2)")
            .bind(&account)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ledger_entry (id, txn_id, account_id, amount_cents, kind, reference, at)
             VALUES ($1, $2, $3, $4, 'credit', 'welcome', $5)",
        )
        .bind(id())
        .bind(id())
        .bind(&account)
        .bind(credit)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        customers.push(account);
    }
    let mut products = Vec::new();
    for (i, price) in PRICES.iter().enumerate() {
        let product = id();
        sqlx::query(
            "INSERT INTO product (id, sku, name, price_cents, currency, on_hand, reserved, created_at)
             VALUES ($1, $2, $3, $4, 'USD', 1000000, 0, $5)",
        )
        .bind(&product)
        .bind(format!("MONO-{i}"))
        .bind(format!("Item {i}"))
        .bind(*price)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        products.push(product);
    }
    tx.commit().await?;

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.orders)));
    let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let customers = Arc::new(customers);
    let products = Arc::new(products);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (store, next, latencies, outcomes) = (store.clone(), next.clone(), latencies.clone(), outcomes.clone());
            let (customers, products, house, total) = (customers.clone(), products.clone(), house.clone(), args.orders);
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total || Instant::now() > deadline {
                        return;
                    }
                    // The same mix as `bazaar load`: customer n % users, product n % 4, 1 or 2 units.
                    let customer = &customers[n % customers.len()];
                    let product = &products[n % products.len()];
                    let quantity = 1 + (n % 2) as i64;
                    let t0 = Instant::now();
                    let outcome = match place_order(&store, customer, &house, product, quantity).await {
                        Ok(status) => {
                            latencies.lock().await.push(t0.elapsed());
                            status
                        }
                        Err(e) => format!("error: {e:#}"),
                    };
                    *outcomes.lock().await.entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    store.close().await;
    let outcomes = outcomes.lock().await.clone();
    let errors = outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum();
    let latencies = latencies.lock().await.clone();
    let sample = Sample {
        count: latencies.len(),
        errors,
        elapsed,
        latencies,
    }
    .finish();
    Ok((sample, outcomes))
}

/// One order, start to end, in one transaction: `confirmed` or `cancelled`.
async fn place_order(
    store: &Store,
    customer: &str,
    house: &str,
    product: &str,
    quantity: i64,
) -> anyhow::Result<String> {
    let order = id();
    let now = now_millis();
    let mut tx = store.begin().await?;
    let lines = serde_json::json!([{"productId": product, "quantity": quantity}]).to_string();
    sqlx::query(
        "INSERT INTO orders (id, customer_id, email, status, lines, version, created_at, updated_at)
         VALUES ($1, $2, 'bench@example.com', 'pending', $3, 1, $4, $4)",
    )
    .bind(&order)
    .bind(customer)
    .bind(&lines)
    .bind(now)
    .execute(&mut *tx)
    .await?;

    // reserveInventory: every line or none.
    let row = sqlx::query("SELECT price_cents, on_hand, reserved FROM product WHERE id = $1")
        .bind(product)
        .fetch_one(&mut *tx)
        .await?;
    let (price, on_hand, reserved): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    let (status, reason) = if on_hand - reserved < quantity {
        ("cancelled", Some("out of stock"))
    } else {
        sqlx::query("UPDATE product SET reserved = reserved + $1 WHERE id = $2")
            .bind(quantity)
            .bind(product)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO reservation (order_id, status, updated_at) VALUES ($1, 'reserved', $2)")
            .bind(&order)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO reservation_line (order_id, product_id, quantity) VALUES ($1, $2, $3)")
            .bind(&order)
            .bind(product)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;

        // processPayment: the wallet's balance is the sum of its ledger entries.
        let total = price * quantity;
        let balance: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entry WHERE account_id = $1")
                .bind(customer)
                .fetch_one(&mut *tx)
                .await?;
        if balance < total {
            // Compensation: release the reservation.
            sqlx::query("UPDATE product SET reserved = reserved - $1 WHERE id = $2")
                .bind(quantity)
                .bind(product)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE reservation SET status = 'released', updated_at = $2 WHERE order_id = $1")
                .bind(&order)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            ("cancelled", Some("insufficient funds"))
        } else {
            let txn = id();
            for (account, amount, kind) in [(customer, -total, "debit"), (house, total, "credit")] {
                sqlx::query(
                    "INSERT INTO ledger_entry (id, txn_id, account_id, amount_cents, kind, reference, at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(id())
                .bind(&txn)
                .bind(account)
                .bind(amount)
                .bind(kind)
                .bind(&order)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO payment (order_id, id, customer_id, amount_cents, currency, status, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, 'USD', 'captured', $5, $5)",
            )
            .bind(&order)
            .bind(&txn)
            .bind(customer)
            .bind(total)
            .bind(now)
            .execute(&mut *tx)
            .await?;

            // confirmOrder: commit the reserved stock.
            sqlx::query("UPDATE product SET on_hand = on_hand - $1, reserved = reserved - $1 WHERE id = $2")
                .bind(quantity)
                .bind(product)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO stock_movement (id, product_id, delta, reason, at) VALUES ($1, $2, $3, $4, $5)")
                .bind(id())
                .bind(product)
                .bind(-quantity)
                .bind(format!("order {order}"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE reservation SET status = 'committed', updated_at = $2 WHERE order_id = $1")
                .bind(&order)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE orders SET total_cents = $2 WHERE id = $1")
                .bind(&order)
                .bind(total)
                .execute(&mut *tx)
                .await?;
            ("confirmed", None)
        }
    };
    sqlx::query("UPDATE orders SET status = $2, reason = $3, version = version + 1, updated_at = $4 WHERE id = $1")
        .bind(&order)
        .bind(status)
        .bind(reason)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(status.to_string())
}

#[cfg(test)]
mod tests {
    use super::with_namespace;

    #[test]
    fn the_bench_namespace_replaces_any_other_and_keeps_other_parameters() {
        assert_eq!(with_namespace("nats://h:4222", "b1"), "nats://h:4222?namespace=b1");
        assert_eq!(
            with_namespace("nats://h:4222?namespace=prod&x=1", "b1"),
            "nats://h:4222?x=1&namespace=b1"
        );
    }
}
