//! The storefront and the operator console in a real browser: Debian's Chromium, headless, driven by playwright-core
//! (from npm, told to use `/usr/bin/chromium`; nothing downloads a browser) against a
//! `bazaar up` on free ports. Each scenario in `browser/storefront.cjs` asserts what a person
//! would see on the page. Screenshots at desktop and phone widths go to the target dir, or
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoppers_and_operators_use_the_shop_and_its_console_in_a_real_browser() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: install Debian's chromium package (`.ci/run` does)"
    );
    let modules = driver();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut up = harness::System::start(Options {
        bin: PathBuf::from(BIN),
        dir: dir.path().to_path_buf(),
        base: None,
        // $100 per new wallet: a second, larger order runs out of money.
        env: vec![("BAZAAR_WELCOME_CREDIT_CENTS".into(), "10000".into())],
        // Two web instances behind the gateway: pages, sessions and live feeds hold across them.
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
    let shots = std::env::var_os("BAZAAR_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let base = up.api("").trim_end_matches("/api/v1").to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/storefront.cjs");
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", &modules)
        .env("BAZAAR_URL", &base)
        .env("BAZAAR_MAIL", up.data().join("mail"))
        .env("BAZAAR_ADMIN_PASSWORD_FILE", up.data().join("admin.password"))
        .env("BAZAAR_INSTANCES", (bazaar::roles::up_roles().count() + 1).to_string())
        .env("BAZAAR_SCREENSHOTS", &shots)
        .env("CHROMIUM", CHROMIUM)
        .env(
            "BAZAAR_PAYMENTS_PID",
            up.pid("payments").expect("payments runs").to_string(),
        )
        .current_dir(dir.path())
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
    let (ok, report) = up.audit(Duration::from_secs(60)).await.expect("audit runs");
    assert!(
        ok,
        "audit after the browser scenarios:\n{report}\n{}",
        up.log_tail(4000)
    );
    up.stop().await;
}
