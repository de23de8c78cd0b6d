//! The storefront and the operator console in a real browser: Debian's Chromium, headless
//! (installed from Debian here when `.ci/run` has not), driven by playwright-core (from npm,
//! told to use `/usr/bin/chromium`; nothing downloads a browser) against a `bazaar up` on
//! free ports. Each scenario in `browser/*.cjs` asserts what a person would see on the page. Screenshots at desktop and phone widths go to the target dir, or
//! to `BAZAAR_SCREENSHOTS` (the README's come from `BAZAAR_SCREENSHOTS=docs/screenshots`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use bazaar_bench::harness::{self, Options};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// The browser `.ci/run` installs from Debian.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The driver, pinned (it drives the installed Chromium over CDP).
const PLAYWRIGHT: &str = "playwright-core@1.64";

/// Where playwright-core is installed, once per target dir.
fn driver() -> PathBuf {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playwright");
    let modules = prefix.join("node_modules");
    harness::npm_install(&prefix, PLAYWRIGHT, &modules.join("playwright-core/package.json"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    modules
}

/// Makes sure Debian's Chromium is installed, installing the package when it is not (as
/// `.ci/run` does first).
fn chromium() {
    if Path::new(CHROMIUM).is_file() {
        return;
    }
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Both browser tests may get here at once: the second waits for dpkg's lock.
    let install = ["-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "chromium"];
    if !apt(&install) {
        apt(&["update", "-q"]);
        apt(&install);
    }
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing and `apt-get install chromium` could not install it: install Debian's chromium package"
    );
}

/// Where screenshots go: `BAZAAR_SCREENSHOTS`, or the target dir.
fn screenshots() -> PathBuf {
    let shots = std::env::var_os("BAZAAR_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    shots
}

/// Runs the scenarios of `tests/browser/<script>` in headless Chromium against `up`, failing
/// the test with their output (and the system's log) when one fails.
async fn browse(up: &harness::System, dir: &Path, script: &str, env: &[(&str, String)]) {
    chromium();
    let modules = driver();
    let base = up.api("").trim_end_matches("/api/v1").to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser").join(script);
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", &modules)
        .env("BAZAAR_URL", &base)
        .env("BAZAAR_ADMIN_PASSWORD_FILE", up.data().join("admin.password"))
        .env("BAZAAR_SCREENSHOTS", screenshots())
        .env("CHROMIUM", CHROMIUM)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser scenarios finish within 4 minutes")
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "a browser scenario failed:\n{text}\n{}",
        up.log_tail(4000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoppers_and_operators_use_the_shop_and_its_console_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut up = harness::System::start(Options {
        bin: PathBuf::from(BIN),
        dir: dir.path().to_path_buf(),
        base: None,
        // $100 per new wallet: a second, larger order runs out of money.
        env: vec![("BAZAAR_WELCOME_CREDIT_CENTS".into(), "10000".into())],
        // Two web instances behind the gateway: pages, sessions and live feeds hold across them.
        args: Vec::new(),
        replicas: Some("web=2".into()),
        cluster: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    // An event no consumer can take (its payload breaks the contract): notifications sets it
    // aside at once, for the operator to find in the console.
    let bus = bazaar_kit::broker::connect(&format!("sqlite://{}", up.data().join("bus.db").display()))
        .await
        .expect("the embedded broker");
    let broken = bazaar_kit::envelope::Envelope::new(
        "order.confirmed",
        uuid::Uuid::now_v7().to_string(),
        serde_json::json!({"orderId": "not an order id"}),
        bazaar_kit::envelope::Metadata::default(),
    );
    bus.publish(
        bazaar_contracts::topics::ORDERS_EVENTS,
        &broken.event_id.to_string(),
        broken.to_vec().into(),
    )
    .await
    .expect("publish");
    // A dead letter as a long mail outage leaves one: a good event about the admin's order
    // that notifications gave up on. Replayed now, its handler takes it.
    let client = reqwest::Client::new();
    let password = std::fs::read_to_string(up.data().join("admin.password")).expect("the admin password");
    let admin = bazaar::load::sign_in_admin(&client, &up.api(""), password.trim())
        .await
        .expect("the admin signs in");
    let me: serde_json::Value = client
        .get(up.api("/users/me"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("who am I")
        .json()
        .await
        .expect("JSON");
    let good = bazaar_kit::envelope::Envelope::new(
        "order.confirmed",
        uuid::Uuid::now_v7().to_string(),
        bazaar_contracts::OrderOutcome {
            order_id: uuid::Uuid::now_v7(),
            customer_id: me["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("the admin's id"),
            email: bazaar::settings::ADMIN_EMAIL.into(),
            total_cents: 1250,
            currency: Some("USD".into()),
            reason: None,
        },
        bazaar_kit::envelope::Metadata::default(),
    );
    let parked = bazaar_kit::broker::DeadLetter {
        topic: bazaar_contracts::topics::ORDERS_EVENTS.into(),
        group: bazaar_notifications::SERVICE.name.into(),
        msg_id: good.event_id.to_string(),
        attempts: 70,
        reason: "gave up after 70 attempts: the mail relay refused the connection".into(),
        body: String::from_utf8(good.to_vec()).expect("JSON is UTF-8"),
        dead_at: chrono::Utc::now().to_rfc3339(),
    };
    bus.publish(
        &bazaar_kit::broker::dlq_topic(bazaar_contracts::topics::ORDERS_EVENTS),
        &format!("notifications:{}", good.event_id),
        serde_json::to_vec(&parked).expect("JSON").into(),
    )
    .await
    .expect("publish");
    let env = [
        ("BAZAAR_MAIL", up.data().join("mail").display().to_string()),
        ("BAZAAR_INSTANCES", (bazaar::roles::up_roles().count() + 1).to_string()),
        (
            "BAZAAR_PAYMENTS_PID",
            up.pid("payments").expect("payments runs").to_string(),
        ),
    ];
    browse(&up, dir.path(), "storefront.cjs", &env).await;
    let (ok, report) = up.audit(Duration::from_secs(60)).await.expect("audit runs");
    assert!(
        ok,
        "audit after the browser scenarios:\n{report}\n{}",
        up.log_tail(4000)
    );
    up.stop().await;
}

/// `bazaar serve payment-sim` beside a system, on its mesh certificate; killed on drop.
fn payment_simulator(up: &harness::System, base: u16) -> tokio::process::Child {
    let mesh = up.data().join("mesh");
    tokio::process::Command::new(BIN)
        .args(["serve", "payment-sim"])
        .env("BAZAAR_BASE_PORT", base.to_string())
        .env("BAZAAR_DATA", up.data())
        .env("BAZAAR_MESH_CERT", mesh.join("payment-sim.crt"))
        .env("BAZAAR_MESH_KEY", mesh.join("payment-sim.key"))
        .env("BAZAAR_MESH_BUNDLE", mesh.join("bundle.pem"))
        .env("BAZAAR_MESH_POLICY", mesh.join("policy.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the payment simulator")
}

/// A client of the mesh as an operator's tool (its certificate from the system's CA).
fn mesh_tool(up: &harness::System) -> reqwest::Client {
    use bazaar_kit::mesh::{Authority, Identity, MeshFiles, Workload};
    let dir = up.data().join("mesh");
    let ca = Authority::load(&dir).expect("the mesh CA");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir.join("tools"))
        .expect("tools dir");
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).expect("the bundle");
    let identity = Identity::new(ca.trust_domain(), Workload::Tool, "browser-test").expect("an identity");
    let tls = ca
        .issue(&identity, Duration::from_secs(600))
        .expect("a certificate")
        .install(&MeshFiles::in_dir(&dir.join("tools"), "browser-test"), &bundle)
        .expect("install it");
    let peers = vec![(
        bazaar::roles::PAYMENT_SIM.to_string(),
        std::net::IpAddr::from([127, 0, 0, 1]),
    )];
    bazaar_kit::mesh::http_client(&tls, Duration::from_secs(5), &peers).expect("a mesh client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_from_the_console_a_saga_a_provider_outage_left_stuck() {
    let base = harness::free_base_port().expect("free ports");
    let sim_port = base + harness::port_offset(bazaar::roles::PAYMENT_SIM).expect("the simulator's port");
    let dir = tempfile::tempdir().expect("tempdir");
    let up = harness::System::start(Options {
        bin: PathBuf::from(BIN),
        dir: dir.path().to_path_buf(),
        base: Some(base),
        env: vec![
            (
                "BAZAAR_PAYMENT_PROVIDER_URL".into(),
                format!("https://payment-sim:{sim_port}"),
            ),
            // Steps wait 300 ms for a reply, so a long outage exhausts the compensation's
            // retries in seconds rather than minutes.
            ("BAZAAR_SAGA_STEP_TIMEOUT_MS".into(), "300".into()),
        ],
        args: Vec::new(),
        replicas: None,
        cluster: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let _sim = payment_simulator(&up, base);
    let tool = mesh_tool(&up);
    let outage = |on: bool| {
        let (tool, url) = (tool.clone(), format!("https://payment-sim:{sim_port}/_control"));
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                match tool.post(&url).json(&serde_json::json!({"outage": on})).send().await {
                    Ok(r) if r.status().is_success() => return,
                    other => {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "the simulator does not answer: {other:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    outage(true).await;

    // The admin orders a mug while the provider is down: the charge never settles, the
    // compensation's refund cannot reach the provider either, and the saga ends stuck.
    let client = reqwest::Client::new();
    let api = up.api("");
    let password = std::fs::read_to_string(up.data().join("admin.password")).expect("the admin password");
    let admin = bazaar::load::sign_in_admin(&client, &api, password.trim())
        .await
        .expect("the admin signs in");
    let products: serde_json::Value = client
        .get(format!("{api}/products"))
        .send()
        .await
        .expect("the catalogue")
        .json()
        .await
        .expect("JSON");
    let product = products[0]["id"].as_str().expect("a product").to_string();
    let placed = client
        .post(format!("{api}/orders"))
        .bearer_auth(&admin)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&serde_json::json!({"items": [{"productId": product, "quantity": 1}]}))
        .send()
        .await
        .expect("place an order");
    assert_eq!(placed.status(), 202);
    let order: serde_json::Value = placed.json().await.expect("the order");
    let id = order["id"].as_str().expect("an id").to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let stuck: serde_json::Value = client
            .get(format!("{api}/sagas?status=stuck"))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("stuck sagas")
            .json()
            .await
            .expect("JSON");
        if stuck
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["id"] == id.as_str()))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga never got stuck:\n{}",
            up.log_tail(3000)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    outage(false).await;

    browse(&up, dir.path(), "stuck.cjs", &[("BAZAAR_SAGA", id)]).await;
    let (ok, report) = up.audit(Duration::from_secs(60)).await.expect("audit runs");
    assert!(ok, "audit after the retry:\n{report}\n{}", up.log_tail(4000));
}
