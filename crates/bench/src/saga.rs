//! `bazaar-bench saga`: orders through the distributed saga against a monolith that does the
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
//!   with the services' own tables; each order is ONE transaction that runs the participants'
//!   own code (inventory's `StockCommands`, payments' `PaymentCommands`) for reserve, pay and
//!   commit (or release), then confirms or cancels the order: the same rules, so the baseline
//!   cannot drift from the services. Same customers, products, prices, order mix, count and
//!   concurrency as the load driver.

use bazaar_kit::store;
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bazaar::{
    load::{self, LoadArgs, LoadShape, LoadStats},
    roles,
    settings::store_url_var,
};
use bazaar_bench::harness::{cpu_delta, drop_cluster_databases, servers_cpu, servers_delta, Options, System};
use bazaar_contracts::{types, LineRequest, OrderRef, ProcessPayment, ReserveStock, Reserved};
use bazaar_inventory::StockCommands;
use bazaar_kit::{
    envelope::{Envelope, Metadata},
    store::{now_millis, Migration, Store, Tx},
};
use bazaar_orders::OrderStatus;
use bazaar_payments::{ledger, PaymentCommands};
use bazaar_saga::{Participant, Verdict};
use clap::Args;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{Report, Sample};

mod soak;

/// Flags of `bazaar-bench saga`.
#[derive(Debug, Args)]
pub struct SagaBenchArgs {
    #[command(flatten)]
    shape: LoadShape,
    /// Admin URL of a PostgreSQL server on which the pg+nats variant creates (and then drops)
    /// one database per role; needs --nats too.
    #[arg(long, env = "BAZAAR_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
    /// NATS URL for the pg+nats variant (a `namespace=bench<uuid>` is added); needs --postgres too.
    #[arg(long, env = "BAZAAR_BENCH_NATS_URL")]
    nats: Option<String>,
    /// The `bazaar` executable to start. Default: the one beside this executable.
    #[arg(long, env = "BAZAAR_BIN")]
    bazaar: Option<PathBuf>,
    /// Also run the cluster form (`bazaar up --cluster`: 3 JetStream nodes, a PostgreSQL
    /// database per service on --postgres, Redis) with 1 and with 2 replicas of every role.
    #[arg(long)]
    cluster: bool,
    /// After the measured runs, keep placing orders on embedded defaults for this many
    /// seconds and report each role's memory and the stores' bookkeeping over time.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    soak: Option<u64>,
    /// Redis for the cluster variants' gateways.
    #[arg(long, env = "BAZAAR_BENCH_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
}

/// Prices of the products `bazaar load` creates, in the same order.
const PRICES: [i64; 4] = [250, 399, 1000, 1250];

/// What one saga variant measured.
struct SagaRun {
    stats: LoadStats,
    cpu: Vec<(String, f64)>,
    /// CPU seconds of PostgreSQL and nats-server over the same span (every process of each
    /// name on this machine).
    servers: Vec<(String, f64)>,
    /// Peak resident MiB per role once the orders settled.
    memory: Vec<(String, f64)>,
    audit: anyhow::Result<(bool, String)>,
}

/// `bazaar-bench saga`.
///
/// One piece: one report written top to bottom; every variant (embedded, mesh off, pg+nats,
/// cluster, monolith, soak) runs in turn in the same temp dir with the same binary, and the
/// closing `compare` calls refer to rows by the names added above.
pub async fn run(args: SagaBenchArgs, cores: usize) -> anyhow::Result<Report> {
    if args.shape.orders == 0 || args.shape.orders > 100_000 || args.shape.concurrency == 0 || args.shape.users == 0 {
        bail!("--orders must be 1..=100000; --concurrency and --users at least 1");
    }
    let credit: i64 = std::env::var("BAZAAR_WELCOME_CREDIT_CENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut report = Report::new(
        format!(
            "bench saga: {} orders, {} concurrent workers, {} customers ({} cents each)",
            args.shape.orders, args.shape.concurrency, args.shape.users, credit
        ),
        "orders/s",
    );
    let bin = bazaar_bench::harness::bazaar_bin(args.bazaar.as_deref())?;
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;

    eprintln!("bench saga: starting `bazaar up` on a temp data dir (embedded defaults)");
    let embedded = saga(&args, &bin, &dir.path().join("embedded"), Vec::new()).await;
    add_saga(
        &mut report,
        "saga embedded",
        "bazaar up, SQLite per role + embedded broker, mTLS mesh on (the default)",
        embedded,
        cores,
    );
    eprintln!("bench saga: the same with the mesh off (plain HTTP from the gateway to the services)");
    let plain = saga(
        &args,
        &bin,
        &dir.path().join("embedded-plain"),
        vec![("BAZAAR_MESH".to_string(), "off".to_string())],
    )
    .await;
    add_saga(
        &mut report,
        "saga embedded, mesh off",
        "bazaar up --mesh off: the same, plain HTTP between roles",
        plain,
        cores,
    );

    let distributed = match (&args.postgres, &args.nats) {
        (Some(pg), Some(nats)) => {
            eprintln!("bench saga: starting `bazaar up` on fresh PostgreSQL databases and NATS");
            Some(saga_on_postgres_and_nats(&args, &bin, &dir.path().join("pg-nats"), pg, nats).await)
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

    if args.cluster {
        match &args.postgres {
            Some(pg) => {
                for (n, replicas) in [(1, "1,gateway=1"), (2, "2,gateway=2")] {
                    let name = format!("saga cluster r{n}");
                    eprintln!("bench saga: starting `bazaar up --cluster --replicas {replicas}`");
                    let result =
                        saga_on_cluster(&args, &bin, &dir.path().join(format!("cluster{n}")), pg, replicas).await;
                    add_saga(
                        &mut report,
                        &name,
                        &format!("bazaar up --cluster, {n} instance(s) of every role, 3 JetStream nodes (R3)"),
                        result,
                        cores,
                    );
                }
            }
            None => report.row("saga cluster r1", None, "--cluster needs --postgres"),
        }
    }

    eprintln!("bench saga: monolith, one transaction per order");
    let (mono, outcomes) = monolith(&dir.path().join("monolith.db"), &args, credit).await?;
    report.row(
        "monolith",
        Some(mono),
        format!("one SQLite tx per order through the participants' code; outcomes {outcomes:?}"),
    );
    report.compare("saga embedded", "monolith");
    report.compare("saga embedded", "saga embedded, mesh off");
    report.compare("saga pg+nats", "monolith");
    report.compare("saga cluster r1", "monolith");
    report.compare("saga cluster r2", "saga cluster r1");

    if let Some(seconds) = args.soak {
        eprintln!("bench saga: soak, {seconds} s of orders on embedded defaults");
        match soak::run(&args, &bin, &dir.path().join("soak"), seconds).await {
            Ok(text) => report.note(text),
            Err(e) => report.note(format!("soak FAILED: {e:#}")),
        }
    }

    report.note(
        "saga latency is placed -> confirmed/cancelled as a client sees it (POST /orders, then \
         GET /orders/{id}?waitFor=outcome, which the server answers when the outcome commits). \
         Monolith latency is one order's transaction including the wait for a pooled connection.",
    );
    report.note(format!(
        "{cores} core(s) shared by the load driver, the gateway and five services (saga; with \
         pg+nats also PostgreSQL and nats-server, whose CPU has a note of its own), or by the \
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
    let failed = stats.failed() + stats.shed();
    let sample = Sample {
        count: stats.settle.len(),
        errors: failed,
        elapsed: stats.elapsed,
        latencies: stats.settle.clone(),
        ..Sample::default()
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
            "{name}: CPU seconds while placing and settling (from the first order; {:.2} s wall, {cores} core(s)): {} (total {total:.2})",
            stats.elapsed.as_secs_f64(),
            per_role.join(", ")
        ));
        let orders = stats.settle.len().max(1) as f64;
        let roles: f64 = run.cpu.iter().filter(|(r, _)| r != "load driver").map(|(_, s)| s).sum();
        report.note(format!(
            "{name}: CPU per settled order across the roles (the load driver left out): {:.2} ms",
            roles * 1000.0 / orders
        ));
        // Idle servers (PostgreSQL under the embedded variants) tick a little: not worth a note.
        let busy: Vec<&(String, f64)> = run.servers.iter().filter(|(_, s)| *s >= 0.05).collect();
        if !busy.is_empty() {
            let servers: f64 = busy.iter().map(|(_, s)| s).sum();
            let each: Vec<String> = busy.iter().map(|(n, s)| format!("{n} {s:.2}")).collect();
            report.note(format!(
                "{name}: CPU seconds of the servers over the same span (every such process on this machine): {}; \
                 per settled order with the roles: {:.2} ms",
                each.join(", "),
                (roles + servers) * 1000.0 / orders
            ));
        }
    }
    if !run.memory.is_empty() {
        let per_role: Vec<String> = run.memory.iter().map(|(r, m)| format!("{r} {m:.1}")).collect();
        report.note(format!("{name}: peak resident MiB per role: {}", per_role.join(", ")));
    }
    match run.audit {
        Ok((true, text)) => report.note(format!("{name}: audit passed:\n{}", indent(&text))),
        Ok((false, text)) => report.note(format!("{name}: AUDIT FAILED:\n{}", indent(&text))),
        Err(e) => report.note(format!("{name}: audit could not run: {e:#}")),
    }
}

/// The cluster form with `replicas`, on databases named for this run (dropped afterwards).
async fn saga_on_cluster(
    args: &SagaBenchArgs,
    bin: &Path,
    dir: &Path,
    admin: &str,
    replicas: &str,
) -> anyhow::Result<SagaRun> {
    let name = format!("bench{}", uuid::Uuid::now_v7().simple());
    let env = vec![
        ("BAZAAR_CLUSTER_POSTGRES_URL".to_string(), admin.to_string()),
        ("BAZAAR_CLUSTER_REDIS_URL".to_string(), args.redis.clone()),
    ];
    let result = saga_with(args, bin, dir, env, Some(replicas.to_string()), Some(name.clone())).await;
    drop_cluster_databases(admin, &name).await;
    result
}

/// Starts `bazaar up` in `dir` with `env`, drives the orders, audits, stops it.
async fn saga(args: &SagaBenchArgs, bin: &Path, dir: &Path, env: Vec<(String, String)>) -> anyhow::Result<SagaRun> {
    saga_with(args, bin, dir, env, None, None).await
}

/// [`saga`] with `--replicas` and `--cluster NAME` when given.
async fn saga_with(
    args: &SagaBenchArgs,
    bin: &Path,
    dir: &Path,
    env: Vec<(String, String)>,
    replicas: Option<String>,
    cluster: Option<String>,
) -> anyhow::Result<SagaRun> {
    let options = up_options(bin, dir, env, replicas, cluster);
    let mut system = System::start(options).await?;
    // CPU is counted from the first order on: registering customers (two argon2 hashes
    // each) and adding products are set-up, not the cost of an order.
    let mut cpu_before = Vec::new();
    let mut servers_before = Vec::new();
    let measured = async {
        let load_args = load_args(&args.shape, &system)?;
        let prepared = load::prepare(&load_args).await?;
        cpu_before = system.cpu();
        servers_before = servers_cpu();
        prepared.place(&load_args).await
    }
    .await;
    let cpu = cpu_delta(&cpu_before, &system.cpu());
    let servers = servers_delta(&servers_before, &servers_cpu());
    let memory = system.peak_memory();
    eprintln!("bench saga: running `bazaar audit --wait 30`");
    let audit = system.audit(Duration::from_secs(30)).await;
    system.stop().await;
    Ok(SagaRun {
        stats: measured?,
        cpu,
        servers,
        memory,
        audit,
    })
}

/// How the bench starts `bazaar up` in `dir` with `env` on top of its own settings.
fn up_options(
    bin: &Path,
    dir: &Path,
    env: Vec<(String, String)>,
    replicas: Option<String>,
    cluster: Option<String>,
) -> Options {
    Options {
        bin: bin.to_path_buf(),
        dir: dir.to_path_buf(),
        base: None,
        // Eight customers placing hundreds of orders a minute each is no person's load: the
        // bench measures the saga, not the per-customer limit. Each customer is its own
        // client at the gateway (the load names it in X-Forwarded-For, which the gateway
        // believes from this machine), not one client over the per-client limit.
        env: [
            ("BAZAAR_DECLINE_RATE".to_string(), "0".to_string()),
            ("BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE".to_string(), "0".to_string()),
            ("BAZAAR_TRUSTED_IPS".to_string(), "127.0.0.1".to_string()),
        ]
        .into_iter()
        .chain(env)
        .collect(),
        args: Vec::new(),
        replicas,
        cluster,
    }
}

/// The saga on five fresh PostgreSQL databases and a NATS namespace of its own; the
/// databases are dropped afterwards whatever happened.
async fn saga_on_postgres_and_nats(
    args: &SagaBenchArgs,
    bin: &Path,
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
        saga(args, bin, data, env).await
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
        let created = store::query(&format!("CREATE DATABASE {name}")).execute(&server).await;
        server.close().await;
        created.with_context(|| format!("cannot create database {name}"))?;
        self.names.push(name.clone());
        Ok(bazaar_testkit::with_database(&self.admin, &name))
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
            let dropped = store::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&server)
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

/// `bazaar load`'s settings for this run: the bench's shape, this system's gateway, and the
/// admin password `up` wrote.
fn load_args(shape: &LoadShape, system: &System) -> anyhow::Result<LoadArgs> {
    let password = std::fs::read_to_string(system.data().join("admin.password"))
        .context("cannot read the admin password `bazaar up` wrote")?;
    let shape = LoadShape {
        customers_apart: true,
        ..shape.clone()
    };
    Ok(LoadArgs::new(
        format!("http://127.0.0.1:{}", system.base()),
        shape,
        Some(password.trim().to_string()),
    ))
}

fn indent(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The monolith's one store: the services' own tables (so both sides do the same work on the
/// same schema), renumbered into one migration sequence.
fn monolith_schema() -> [Migration; 4] {
    let renumber = |m: Migration, version| Migration { version, ..m };
    [
        renumber(bazaar_inventory::MIGRATIONS[0], 10),
        renumber(bazaar_payments::MIGRATIONS[0], 11),
        renumber(bazaar_payments::MIGRATIONS[1], 12),
        renumber(bazaar_orders::MIGRATIONS[1], 13),
    ]
}

/// Opens `users` customers' wallets with `credit` each and one product per price, in one
/// transaction; returns the customers and the products.
async fn seed_monolith(store: &Store, users: usize, credit: i64) -> anyhow::Result<(Vec<Uuid>, Vec<Uuid>)> {
    let mut tx = store.begin().await?;
    ledger::open(&mut tx, ledger::EXTERNAL, "USD").await?;
    let mut customers = Vec::new();
    for _ in 0..users {
        let customer = Uuid::now_v7();
        let wallet = ledger::wallet(&customer);
        ledger::open(&mut tx, &wallet, "USD").await?;
        ledger::transfer(&mut tx, ledger::EXTERNAL, &wallet, credit, "deposit", "welcome credit").await?;
        customers.push(customer);
    }
    let mut products = Vec::new();
    for (i, price) in PRICES.iter().enumerate() {
        let product = Uuid::now_v7();
        store::query(
            "INSERT INTO product (id, sku, name, price_cents, currency, on_hand, reserved, created_at)
             VALUES ($1, $2, $3, $4, 'USD', 1000000, 0, $5)",
        )
        .bind(product.to_string())
        .bind(format!("MONO-{i}"))
        .bind(format!("Item {i}"))
        .bind(*price)
        .bind(now_millis())
        .execute(&mut tx)
        .await?;
        products.push(product);
    }
    tx.commit().await?;
    Ok((customers, products))
}

/// Runs the monolith baseline; returns its sample and outcome counts.
async fn monolith(
    path: &Path,
    args: &SagaBenchArgs,
    credit: i64,
) -> anyhow::Result<(Sample, std::collections::BTreeMap<String, usize>)> {
    let store = Store::open(&format!("sqlite://{}", path.display())).await?;
    store.migrate(&monolith_schema()).await?;
    let (customers, products) = seed_monolith(&store, args.shape.users, credit).await?;

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(args.shape.orders)));
    let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let customers = Arc::new(customers);
    let products = Arc::new(products);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.shape.timeout);
    let workers: Vec<_> = (0..args.shape.concurrency)
        .map(|_| {
            let (store, next, latencies, outcomes) = (store.clone(), next.clone(), latencies.clone(), outcomes.clone());
            let (customers, products, total) = (customers.clone(), products.clone(), args.shape.orders);
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total || Instant::now() > deadline {
                        return;
                    }
                    // The same mix as `bazaar load`: customer n % users, product n % 4, 1 or 2 units.
                    let customer = customers[n % customers.len()];
                    let product = products[n % products.len()];
                    let quantity = 1 + (n % 2) as i64;
                    let t0 = Instant::now();
                    let outcome = match place_order(&store, customer, product, quantity).await {
                        Ok(status) => {
                            latencies.lock().await.push(t0.elapsed());
                            status.as_str().to_string()
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
        ..Sample::default()
    }
    .finish();
    Ok((sample, outcomes))
}

/// A saga command as the participant receives it (the header the engine adds is not read).
fn command(event_type: &str, order: Uuid, payload: impl serde::Serialize) -> Envelope {
    Envelope::new(event_type, order.to_string(), payload, Metadata::default())
}

/// What a participant answers now, done with data or refused with a reason; the monolith
/// has no provider to wait for.
async fn ask(
    participant: &impl Participant,
    tx: &mut Tx,
    command: &Envelope,
) -> anyhow::Result<Result<serde_json::Value, String>> {
    match participant.act(tx, command).await? {
        Verdict::Done(data) => Ok(Ok(data)),
        Verdict::Refused(reason) => Ok(Err(reason)),
        Verdict::Later => bail!("{} was deferred, but the monolith has no provider", command.event_type),
        Verdict::GaveUp(reason) => bail!("{} was given up: {reason}", command.event_type),
    }
}

/// One order, start to end, in one transaction through the participants' own rules.
async fn place_order(store: &Store, customer: Uuid, product: Uuid, quantity: i64) -> anyhow::Result<OrderStatus> {
    let order = Uuid::now_v7();
    let lines = vec![LineRequest {
        product_id: product,
        quantity,
    }];
    let now = now_millis();
    let mut tx = store.begin().await?;
    store::query(
        "INSERT INTO orders (id, customer_id, email, status, lines, version, created_at, updated_at)
         VALUES ($1, $2, 'bench@example.com', $3, $4, 1, $5, $5)",
    )
    .bind(order.to_string())
    .bind(customer.to_string())
    .bind(OrderStatus::Pending.as_str())
    .bind(serde_json::to_string(&lines)?)
    .bind(now)
    .execute(&mut tx)
    .await?;
    let payments = PaymentCommands::default();
    let by_order = OrderRef { order_id: order };
    let reserve = command(types::RESERVE_STOCK, order, ReserveStock { order_id: order, lines });
    let (status, total, reason) = match ask(&StockCommands, &mut tx, &reserve).await? {
        Ok(data) => {
            let reserved: Reserved = serde_json::from_value(data)?;
            let pay = ProcessPayment {
                order_id: order,
                customer_id: customer,
                amount_cents: reserved.total_cents,
                currency: reserved.currency,
            };
            match ask(&payments, &mut tx, &command(types::PROCESS_PAYMENT, order, pay)).await? {
                Ok(_) => {
                    let commit = command(types::COMMIT_STOCK, order, &by_order);
                    if let Err(reason) = ask(&StockCommands, &mut tx, &commit).await? {
                        bail!("inventory refused to commit order {order}: {reason}");
                    }
                    (OrderStatus::Confirmed, Some(reserved.total_cents), None)
                }
                Err(reason) => {
                    let release = command(types::RELEASE_STOCK, order, &by_order);
                    if let Err(why) = ask(&StockCommands, &mut tx, &release).await? {
                        bail!("inventory refused to release order {order}: {why}");
                    }
                    (OrderStatus::Cancelled, None, Some(format!("processPayment: {reason}")))
                }
            }
        }
        Err(reason) => (
            OrderStatus::Cancelled,
            None,
            Some(format!("reserveInventory: {reason}")),
        ),
    };
    store::query(
        "UPDATE orders SET status = $2, total_cents = $3, reason = $4, version = version + 1, updated_at = $5 WHERE id = $1",
    )
    .bind(order.to_string())
    .bind(status.as_str())
    .bind(total)
    .bind(reason)
    .bind(now_millis())
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(status)
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
