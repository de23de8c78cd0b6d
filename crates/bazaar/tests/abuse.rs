//! Abuse: what one client can do to `bazaar up` by flooding it, and what it cannot. Each case
//! runs the real system on loopback, is bounded in count and time, and asserts what a shopper
//! and an operator would see: floods are turned away with 429 or 503 and `Retry-After`, no
//! role restarts, shoppers beside the flood are served, nothing admitted is lost (the audit
//! holds), and answers say nothing about which accounts exist.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use bazaar::load::{self, LoadArgs, LoadShape};
use bazaar_bench::harness::{self, Options};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// `bazaar up` in a temp dir, with a client and the admin's token.
struct Shop {
    up: harness::System,
    client: reqwest::Client,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Shop {
    async fn start(env: &[(&str, &str)]) -> Shop {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = harness::System::start(Options {
            bin: PathBuf::from(BIN),
            dir: dir.path().to_path_buf(),
            base: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            args: Vec::new(),
            replicas: None,
            cluster: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let password = std::fs::read_to_string(up.data().join("admin.password")).expect("admin.password");
        let (status, body) = send(
            client
                .post(up.api("/auth/token"))
                .json(&json!({"email": bazaar::settings::ADMIN_EMAIL, "password": password.trim()})),
        )
        .await;
        assert_eq!(status, 200, "admin login: {body}");
        let admin = body["accessToken"].as_str().expect("a token").to_string();
        Shop {
            up,
            client,
            admin,
            _dir: dir,
        }
    }

    fn api(&self, path: &str) -> String {
        self.up.api(path)
    }

    /// A confirmed customer's token.
    async fn customer(&self, email: &str) -> String {
        load::open_account(
            &self.client,
            &self.api(""),
            &self.admin,
            email,
            "Shopper",
            "long enough",
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.up.log_tail(4000)))
    }

    /// The pid of every role, to tell whether any restarted.
    fn pids(&self) -> Vec<(String, Option<u32>)> {
        bazaar::roles::ROLES
            .iter()
            .map(|r| (r.name.to_string(), self.up.pid(r.name)))
            .collect()
    }

    async fn assert_audit_clean(&self) -> String {
        let (ok, report) = self.up.audit(Duration::from_secs(60)).await.expect("audit runs");
        assert!(ok, "audit failed:\n{report}\n{}", self.up.log_tail(6000));
        report
    }
}

/// Sends `request`; the status and the JSON body (or null).
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_orders_above_capacity_is_shed_and_nothing_admitted_is_lost() {
    let shop = Shop::start(&[
        ("BAZAAR_ORDERS_MAX_IN_FLIGHT", "24"),
        ("BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE", "0"),
    ])
    .await;
    let pids = shop.pids();
    let shape = LoadShape {
        orders: 500,
        concurrency: 1,
        users: 4,
        timeout: 120,
        customers_apart: false,
    };
    let password = std::fs::read_to_string(shop.up.data().join("admin.password")).expect("admin.password");
    let args = LoadArgs::new(
        format!("http://127.0.0.1:{}", shop.up.base()),
        shape,
        Some(password.trim().to_string()),
    )
    .at_rate(500.0);
    let stats = load::measure(&args).await.expect("the load runs");
    let report = format!("{:?}\n{}", stats.outcomes, shop.up.log_tail(3000));
    assert_eq!(stats.failed(), 0, "nothing but shedding turns an order away: {report}");
    assert!(stats.shed() > 0, "500 orders a second were all admitted: {report}");
    assert!(stats.admitted() > 0, "nothing admitted: {report}");
    assert_eq!(stats.admitted() + stats.shed(), 500, "{report}");
    let p99 = load::percentile(&stats.settle, 0.99);
    assert!(
        p99 < 10_000.0,
        "admitted orders kept waiting (p99 {p99:.0} ms): shedding came too late"
    );
    assert_eq!(shop.pids(), pids, "a role restarted");
    let audit = shop.assert_audit_clean().await;
    eprintln!("admitted {}, shed {}; {audit}", stats.admitted(), stats.shed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_for_one_account_is_turned_away_while_shoppers_are_served() {
    let shop = Shop::start(&[("BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE", "0")]).await;
    let shopper = shop.customer("shopper@example.com").await;
    let (_, products) = send(shop.client.get(shop.api("/products"))).await;
    let product = products[0]["id"].as_str().expect("a demo product").to_string();
    let users_pid = shop.up.pid("users").expect("users runs");
    let pids = shop.pids();

    // A shopper browses and orders beside the flood; every answer is timed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let (client, stop) = (shop.client.clone(), stop.clone());
        let (browse, order) = (shop.api("/products"), shop.api("/orders"));
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let (status, _) = send(client.get(&browse)).await;
                answers.push((status, started.elapsed()));
                let started = Instant::now();
                let body = json!({"items": [{"productId": product, "quantity": 1}]});
                let (status, _) = send(client.post(&order).bearer_auth(&shopper).json(&body)).await;
                answers.push((status, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };

    // 600 sign-ins for the admin's account at once, with wrong passwords.
    let flood = futures_util::future::join_all((0..600).map(|i| {
        let request = shop.client.post(shop.api("/auth/token")).json(&json!({
            "email": bazaar::settings::ADMIN_EMAIL, "password": format!("guess number {i}")
        }));
        async move {
            let response = request.send().await.expect("the gateway answers");
            let retry_after = response.headers().contains_key("retry-after");
            (response.status().as_u16(), retry_after)
        }
    }))
    .await;
    let peak_kib = rss_kib(users_pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = trickle.await.expect("the shopper's task");

    let mut turned_away = 0;
    for (status, retry_after) in &flood {
        match status {
            401 => {}
            429 | 503 => {
                turned_away += 1;
                assert!(retry_after, "a {status} without Retry-After");
            }
            other => panic!("a flooded sign-in answered {other}\n{}", shop.up.log_tail(4000)),
        }
    }
    let p99_so_far = {
        let mut times: Vec<Duration> = answers.iter().map(|(_, t)| *t).collect();
        times.sort();
        load::percentile(&times, 0.99)
    };
    eprintln!(
        "flood: {turned_away} of 600 turned away; shopper: {} answers, p99 {p99_so_far:.0} ms; users peak {} MiB",
        answers.len(),
        peak_kib / 1024
    );
    assert!(turned_away >= 500, "only {turned_away} of 600 sign-ins turned away");
    assert!(
        answers.iter().all(|(status, _)| *status == 200 || *status == 202),
        "the shopper was refused beside the flood: {:?}",
        answers.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let mut times: Vec<Duration> = answers.iter().map(|(_, t)| *t).collect();
    times.sort();
    let p99 = load::percentile(&times, 0.99);
    assert!(p99 < 1_000.0, "the shopper's p99 was {p99:.0} ms beside the flood");
    assert!(peak_kib < 256 * 1024, "users grew to {peak_kib} KiB");
    assert_eq!(shop.pids(), pids, "a role restarted");
    shop.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_sign_in_answer_alike_for_taken_and_unknown_addresses() {
    let shop = Shop::start(&[]).await;
    shop.customer("taken@example.com").await;
    let register = |email: &str| {
        let body = json!({"email": email, "name": "Eve", "password": "another password"});
        send(shop.client.post(shop.api("/users")).json(&body))
    };
    let (taken_status, mut taken) = register("taken@example.com").await;
    let (new_status, mut new) = register("unknown@example.com").await;
    assert_eq!((taken_status, new_status), (202, 202), "{taken} {new}");
    for body in [&mut taken, &mut new] {
        body["email"] = Value::Null;
    }
    assert_eq!(taken, new, "registration tells taken addresses apart");

    let sign_in = |email: &str| {
        let body = json!({"email": email, "password": "not the password"});
        send(shop.client.post(shop.api("/auth/token")).json(&body))
    };
    let (taken_status, taken) = sign_in("taken@example.com").await;
    let (unknown_status, unknown) = sign_in("nobody@example.com").await;
    assert_eq!((taken_status, unknown_status), (401, 401));
    assert_eq!(taken, unknown, "sign-in tells taken addresses apart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_from_one_client_are_limited_and_open_no_wallet_without_a_confirmed_address() {
    // Outside up's demo, a wallet opens empty; here the demo credit is off likewise.
    let shop = Shop::start(&[("BAZAAR_WELCOME_CREDIT_CENTS", "0")]).await;
    // Twenty at once, as a script would send them.
    let answers: Vec<(u16, bool)> = futures_util::future::join_all((0..20).map(|i| {
        let body = json!({"email": format!("sock{i}@example.com"), "name": "Sock", "password": "long enough"});
        let request = shop.client.post(shop.api("/users")).json(&body);
        async move {
            let response = request.send().await.expect("the gateway answers");
            (
                response.status().as_u16(),
                response.headers().contains_key("retry-after"),
            )
        }
    }))
    .await;
    let accepted = answers.iter().filter(|(s, _)| *s == 202).count();
    let limited = answers.iter().filter(|(s, r)| *s == 429 && *r).count();
    assert_eq!(accepted + limited, 20, "{answers:?}");
    assert!(
        limited > 0,
        "one client registered 20 addresses unhindered: {answers:?}"
    );
    // None of them can sign in, let alone spend, before confirming its address.
    let (status, body) = send(
        shop.client
            .post(shop.api("/auth/token"))
            .json(&json!({"email": "sock0@example.com", "password": "long enough"})),
    )
    .await;
    assert!(status == 401 || status == 429, "{status} {body}");
    let audit = shop.assert_audit_clean().await;
    assert!(audit.contains("deposits 0 "), "free money was handed out:\n{audit}");
}
