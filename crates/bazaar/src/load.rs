//! `bazaar load`: drives real orders through the gateway and reports what a user would feel.
//!
//! It registers and confirms users, adds products, places orders from concurrent workers and follows
//! each order until it is confirmed or cancelled. Bounded in count and time; loopback or
//! whatever `--url` says.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Args;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// Flags of `bazaar load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[command(flatten)]
    shape: LoadShape,
    /// Place orders open-loop at this many a second, whatever the answers (so overload can be
    /// driven on purpose), instead of from `--concurrency` workers each waiting for its last.
    /// Shed answers (503, 429) are counted, not retried.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Password of the admin account (admin@bazaar.local) that adds the load's products.
    /// Default: the DATA/admin.password file `bazaar up` wrote.
    #[arg(long, env = "BAZAAR_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// The data directory `bazaar up` wrote the admin password in (the global `--data`).
    #[arg(skip = std::path::PathBuf::from("data"))]
    data: std::path::PathBuf,
    /// Open a new connection for every request, as curl or Python's urllib do, instead of
    /// keeping connections alive: what a rollout must also serve without a failure.
    #[arg(long)]
    connection_per_request: bool,
}

/// How much load, from how many workers and customers: shared with `bazaar-bench saga`, so
/// its monolith baseline gets the same mix.
#[derive(Debug, Clone, Args)]
pub struct LoadShape {
    /// Orders to place.
    #[arg(long, default_value_t = 200)]
    pub orders: usize,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Customers to spread the orders over.
    #[arg(long, default_value_t = 8)]
    pub users: usize,
    /// Give up following orders after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Send each customer's orders as from an address of its own (`X-Forwarded-For:
    /// 10.77.0.N`), so a gateway that trusts this machine (`BAZAAR_TRUSTED_IPS`) counts the
    /// customers as the separate clients they stand for, each within its per-client limit,
    /// rather than as one client over it.
    #[arg(long)]
    pub customers_apart: bool,
}

impl LoadShape {
    /// The address customer `n` (of the orders' round robin) claims, when they are apart.
    fn forwarded_for(&self, n: usize) -> Option<String> {
        self.customers_apart
            .then(|| format!("10.77.{}.{}", (n / 250) % 250, n % 250 + 1))
    }
}

impl LoadArgs {
    /// A load of `shape` on the gateway at `url`, adding products as the admin with `admin_password`.
    pub fn new(url: String, shape: LoadShape, admin_password: Option<String>) -> LoadArgs {
        LoadArgs {
            url,
            shape,
            rate: None,
            admin_password,
            data: std::path::PathBuf::from("data"),
            connection_per_request: false,
        }
    }

    /// The same load, reading the admin password from `data` when none is given.
    pub fn in_data_dir(self, data: std::path::PathBuf) -> LoadArgs {
        LoadArgs { data, ..self }
    }
}

impl LoadArgs {
    /// The same load placed open-loop at `rate` orders a second (`--rate`).
    pub fn at_rate(self, rate: f64) -> LoadArgs {
        LoadArgs {
            rate: Some(rate),
            ..self
        }
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 100_000.0 => Ok(r),
        _ => Err(format!("`{raw}` is not a rate between 0 and 100000 orders a second")),
    }
}

/// What one load run measured; `bazaar-bench saga` reads it instead of the printed report.
#[derive(Debug, Clone)]
pub struct LoadStats {
    /// From the first order placed to the last one settled.
    pub elapsed: Duration,
    /// `POST /orders` round trips, sorted.
    pub place: Vec<Duration>,
    /// Placed to confirmed or cancelled, sorted.
    pub settle: Vec<Duration>,
    /// Requests sent to place and follow orders (a 429 waited out and sent again counts once).
    pub requests: usize,
    /// Final order statuses, shed placements (`shed 503`, `shed 429`) and failed requests
    /// (placing or following an order), counted.
    pub outcomes: std::collections::BTreeMap<String, usize>,
}

impl LoadStats {
    /// Placements the system turned away on purpose (503 or 429), to be sent again later.
    pub fn shed(&self) -> usize {
        self.count(|k| k.starts_with("shed"))
    }

    /// Placements that failed or orders that did not settle: what must never happen.
    pub fn failed(&self) -> usize {
        self.failed_requests() + self.unsettled()
    }

    /// Requests, placing or following an order, that failed (shed placements aside).
    pub fn failed_requests(&self) -> usize {
        self.count(|k| k.starts_with("http") || k.starts_with("error"))
    }

    /// Orders admitted that had no outcome by the load's timeout.
    pub fn unsettled(&self) -> usize {
        self.count(|k| k == "timed out")
    }

    /// Orders admitted (202) that reached an outcome.
    pub fn admitted(&self) -> usize {
        self.settle.len()
    }

    fn count(&self, which: impl Fn(&str) -> bool) -> usize {
        self.outcomes.iter().filter(|(k, _)| which(k)).map(|(_, n)| n).sum()
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Sends `req`; a 429 from the gateway's rate limiter is waited out (Retry-After) and
/// retried, as a well-behaved client would.
async fn json_call(req: reqwest::RequestBuilder) -> anyhow::Result<(StatusCode, Value)> {
    for _ in 0..100 {
        let attempt = req.try_clone().context("request body cannot be retried")?;
        // Without the URL, one kind of failure counts under one key whatever the order.
        let resp = attempt.send().await.map_err(reqwest::Error::without_url)?;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Duration::from_millis(100), Duration::from_secs);
            tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
            continue;
        }
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        return Ok((status, body));
    }
    bail!("rate limited 100 times in a row; raise the gateway's rate-limiting plugin limits")
}

/// `bazaar load`.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let stats = measure(&args).await?;
    let (admitted, shed) = (stats.admitted(), stats.shed());
    let (failed, unsettled) = (stats.failed_requests(), stats.unsettled());
    let LoadStats {
        requests,
        elapsed,
        place,
        settle,
        outcomes,
    } = stats;
    println!(
        "admitted {admitted}, shed {shed} (503/429, nothing placed); failed requests {failed} of {requests}; unsettled orders {unsettled}"
    );
    println!(
        "{} orders in {:.2}s: {:.1} orders/s settled",
        settle.len(),
        elapsed.as_secs_f64(),
        settle.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "place (POST /orders) ms: p50 {:.1} p90 {:.1} p99 {:.1}",
        percentile(&place, 0.5),
        percentile(&place, 0.9),
        percentile(&place, 0.99)
    );
    println!(
        "settle (placed -> confirmed/cancelled) ms: p50 {:.1} p90 {:.1} p99 {:.1}",
        percentile(&settle, 0.5),
        percentile(&settle, 0.9),
        percentile(&settle, 0.99)
    );
    println!("outcomes: {outcomes:?}");
    if failed + unsettled > 0 {
        bail!("{failed} requests failed and {unsettled} orders did not settle: {outcomes:?}");
    }
    Ok(())
}

/// Logs in as the admin account `bazaar up` created, to add products.
async fn admin_token(client: &Client, api: &str, args: &LoadArgs) -> anyhow::Result<String> {
    let password = match &args.admin_password {
        Some(p) => p.clone(),
        None => {
            let path = args.data.join("admin.password");
            std::fs::read_to_string(&path)
                .with_context(|| format!("no --admin-password and cannot read {}", path.display()))?
                .trim()
                .to_string()
        }
    };
    sign_in_admin(client, api, &password).await
}

/// Signs in as the admin account `bazaar up` created, with its `password`, through the
/// gateway at `api` (`…/api/v1`).
pub async fn sign_in_admin(client: &Client, api: &str, password: &str) -> anyhow::Result<String> {
    let (st, body) = json_call(
        client
            .post(format!("{api}/auth/token"))
            .json(&json!({"email": crate::settings::ADMIN_EMAIL, "password": password})),
    )
    .await?;
    match body["accessToken"].as_str() {
        Some(t) if st.is_success() => Ok(t.to_string()),
        _ => bail!("admin login answered {st}: {body}"),
    }
}

/// Registers `email`, reads its confirmation code as the admin (from the notification that
/// mailed it), confirms it and returns the customer's token.
pub async fn open_account(
    client: &Client,
    api: &str,
    admin: &str,
    email: &str,
    name: &str,
    password: &str,
) -> anyhow::Result<String> {
    let (st, body) = json_call(
        client
            .post(format!("{api}/users"))
            .json(&json!({"email": email, "name": name, "password": password})),
    )
    .await?;
    if st != StatusCode::ACCEPTED {
        bail!("registering a user answered {st}: {body}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        let (st, sent) = json_call(
            client
                .get(format!("{api}/notifications"))
                .query(&[("recipient", email)])
                .bearer_auth(admin),
        )
        .await?;
        let code = sent.as_array().into_iter().flatten().find_map(|n| {
            n["subject"]
                .as_str()?
                .strip_prefix(bazaar_notifications::CODE_SUBJECT)
                .map(|c| c.trim().to_string())
        });
        match code {
            Some(code) => break code,
            None if Instant::now() > deadline => bail!("no confirmation code reached {email} within 30s ({st})"),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (st, body) = json_call(
        client
            .post(format!("{api}/auth/verification"))
            .json(&json!({"email": email, "password": password, "code": code})),
    )
    .await?;
    match body["accessToken"].as_str() {
        Some(t) if st.is_success() => Ok(t.to_string()),
        _ => bail!("confirming {email} answered {st}: {body}"),
    }
}

/// Sets up customers and products, places `args.shape.orders` orders and follows each to its end.
pub async fn measure(args: &LoadArgs) -> anyhow::Result<LoadStats> {
    prepare(args).await?.place(args).await
}

/// Customers with open wallets and products in stock, ready for orders: what a run sets up
/// before the measured part begins.
pub struct Prepared {
    client: Client,
    api: String,
    tokens: Vec<String>,
    products: Vec<String>,
}

/// Registers and confirms `args.shape.users` customers, adds four products and waits until
/// every customer's wallet is open.
pub async fn prepare(args: &LoadArgs) -> anyhow::Result<Prepared> {
    if args.shape.orders == 0 || args.shape.concurrency == 0 || args.shape.users == 0 {
        bail!("--orders, --concurrency and --users must be at least 1");
    }
    let idle = if args.connection_per_request {
        0
    } else {
        args.shape.concurrency
    };
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle)
        .build()?;
    let api = format!("{}/api/v1", args.url.trim_end_matches('/'));
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let admin = admin_token(&client, &api, args)
        .await
        .with_context(|| format!("cannot sign in as the admin at {}", args.url))?;
    let mut tokens = Vec::new();
    for i in 0..args.shape.users {
        let email = format!("load-{run_id}-{i}@example.com");
        tokens.push(open_account(&client, &api, &admin, &email, &format!("Load {i}"), "load-test-pass").await?);
    }
    let mut products = Vec::new();
    for (i, price) in [250, 399, 1000, 1250].iter().enumerate() {
        let (st, body) = json_call(client.post(format!("{api}/products")).bearer_auth(&admin).json(&json!({
            "sku": format!("LOAD-{run_id}-{i}"), "name": format!("Load item {i}"),
            "priceCents": price, "stock": 1_000_000
        })))
        .await?;
        let id = body["id"].as_str().map(str::to_string);
        match id {
            Some(id) if st == StatusCode::CREATED => products.push(id),
            _ => bail!("creating a product answered {st}: {body}"),
        }
    }
    // Wallets open asynchronously after registration; wait for them.
    for token in &tokens {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, _) = json_call(client.get(format!("{api}/accounts/me")).bearer_auth(token)).await?;
            if st.is_success() {
                break;
            }
            if Instant::now() > deadline {
                bail!("a wallet did not open within 30s ({st})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(Prepared {
        client,
        api,
        tokens,
        products,
    })
}

impl Prepared {
    /// Places `args.shape.orders` orders and follows each to its end: the measured part.
    ///
    /// One piece: one measured run; the `order` closure and the open- or closed-loop spawner
    /// share the start instant, the deadline and the request, latency and outcome tallies
    /// that become the returned LoadStats.
    pub async fn place(self, args: &LoadArgs) -> anyhow::Result<LoadStats> {
        let Prepared {
            client,
            api,
            tokens,
            products,
        } = self;
        // Shared by every order rather than copied into each.
        let (tokens, products) = (Arc::new(tokens), Arc::new(products));
        match args.rate {
            Some(rate) => println!(
                "placing {} orders at {rate}/s (open loop) for {} customers via {}",
                args.shape.orders, args.shape.users, args.url
            ),
            None => println!(
                "placing {} orders from {} workers for {} customers via {}",
                args.shape.orders, args.shape.concurrency, args.shape.users, args.url
            ),
        }
        let next = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let place = Arc::new(Mutex::new(Vec::new()));
        let settle = Arc::new(Mutex::new(Vec::new()));
        let outcomes = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.shape.timeout);
        let total = args.shape.orders;
        let shared = (place.clone(), settle.clone(), outcomes.clone(), requests.clone());
        let shape = args.shape.clone();
        let forwarded_for = move |customer: usize| shape.forwarded_for(customer);
        let order = move |n: usize, open_loop: bool| {
            let (client, api, tokens, products) = (client.clone(), api.clone(), tokens.clone(), products.clone());
            let (place, settle, outcomes, requests) = shared.clone();
            let client_address = forwarded_for(n % tokens.len());
            async move {
                let token = &tokens[n % tokens.len()];
                let as_customer = |request: reqwest::RequestBuilder| match &client_address {
                    Some(address) => request.header("x-forwarded-for", address),
                    None => request,
                };
                let body = json!({"items": [{"productId": products[n % products.len()], "quantity": 1 + n % 2}]});
                let t0 = Instant::now();
                requests.fetch_add(1, Ordering::Relaxed);
                let request = as_customer(client.post(format!("{api}/orders")).bearer_auth(token).json(&body));
                // Closed-loop workers wait out a 429 as a client would; open-loop counts it.
                let result = if open_loop {
                    match request.send().await {
                        Ok(resp) => {
                            let status = resp.status();
                            Ok((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
                        }
                        Err(e) => Err(anyhow::Error::from(e.without_url())),
                    }
                } else {
                    json_call(request).await
                };
                place.lock().await.push(t0.elapsed());
                let id = match result {
                    Ok((st, v)) if st == StatusCode::ACCEPTED => v["id"].as_str().map(str::to_string),
                    Ok((st, _)) if st == StatusCode::SERVICE_UNAVAILABLE || st == StatusCode::TOO_MANY_REQUESTS => {
                        *outcomes
                            .lock()
                            .await
                            .entry(format!("shed {}", st.as_u16()))
                            .or_default() += 1;
                        None
                    }
                    Ok((st, _)) => {
                        *outcomes.lock().await.entry(format!("http {st}")).or_default() += 1;
                        None
                    }
                    Err(e) => {
                        *outcomes.lock().await.entry(format!("error: {e}")).or_default() += 1;
                        None
                    }
                };
                let Some(id) = id else { return };
                let status = loop {
                    if Instant::now() > deadline {
                        break "timed out".to_string();
                    }
                    // The server answers as soon as the order has its outcome: no client polling.
                    let wait = format!("{api}/orders/{id}?waitFor=outcome&timeout=10");
                    requests.fetch_add(1, Ordering::Relaxed);
                    // A failed read is a failed request the customer saw; the order is still
                    // followed to its end.
                    let failure = match json_call(as_customer(client.get(wait).bearer_auth(token))).await {
                        Ok((st, v)) if st.is_success() => match v["status"].as_str() {
                            Some("pending" | "cancelling") | None => continue,
                            Some(s) => break s.to_string(),
                        },
                        Ok((st, _)) => format!("http {} following", st.as_u16()),
                        Err(e) => format!("error following: {e}"),
                    };
                    *outcomes.lock().await.entry(failure).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                settle.lock().await.push(t0.elapsed());
                *outcomes.lock().await.entry(status).or_default() += 1;
            }
        };
        let mut workers = Vec::new();
        if let Some(rate) = args.rate {
            // Open loop: one order every 1/rate seconds, each followed by a task of its own.
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0..total {
                tick.tick().await;
                if Instant::now() > deadline {
                    break;
                }
                workers.push(tokio::spawn(order(n, true)));
            }
        } else {
            for _ in 0..args.shape.concurrency {
                let (next, order) = (next.clone(), order.clone());
                workers.push(tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= total || Instant::now() > deadline {
                            return;
                        }
                        order(n, false).await;
                    }
                }));
            }
        }
        for w in workers {
            let _ = w.await;
        }
        let elapsed = start.elapsed();
        let mut place = place.lock().await.clone();
        let mut settle = settle.lock().await.clone();
        place.sort();
        settle.sort();
        let outcomes = outcomes.lock().await.clone();
        Ok(LoadStats {
            requests: requests.load(Ordering::Relaxed),
            elapsed,
            place,
            settle,
            outcomes,
        })
    }
}
