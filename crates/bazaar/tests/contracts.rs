//! The contracts hold: the committed OpenAPI and AsyncAPI documents validate against the
//! specifications' own schemas, and schemathesis fuzzing the public document through a
//! running `bazaar up` (as a shopper and as the admin, following the document's links) finds
//! no server error and no answer the document does not allow, after which the audit is
//! clean. Tools come from PyPI and npm (installed here when `.ci/run` has not); everything
//! talks to loopback, and each run is bounded in examples and time. `BAZAAR_FUZZ_SEED`
//! explores other inputs than CI's fixed seed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use bazaar_bench::harness::{self, Options};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// The Python packages the checks run (pip's requirement syntax).
const PYTHON: &[&str] = &["schemathesis>=4.30,<5", "openapi-spec-validator>=0.7", "jsonschema>=4"];

/// The npm package holding AsyncAPI's JSON Schemas.
const ASYNCAPI_SPECS: &str = "@asyncapi/specs@6.11.1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Makes sure the Python checkers are importable, installing them from PyPI if not.
fn python_tools() {
    let present = Command::new("python3")
        .args(["-c", "import schemathesis, openapi_spec_validator, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(PYTHON),
            "pip install",
        );
    }
}

/// AsyncAPI 3.0.0's JSON Schema, from npm (fetched once into the target dir).
fn asyncapi_meta_schema() -> PathBuf {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("asyncapi-specs");
    let schema = prefix.join("node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json");
    harness::npm_install(&prefix, ASYNCAPI_SPECS, &schema).unwrap_or_else(|e| panic!("{e:#}"));
    schema
}

#[test]
fn the_documents_validate_against_the_openapi_3_1_and_asyncapi_3_0_schemas() {
    python_tools();
    let meta = asyncapi_meta_schema();
    let api = repo().join("api");
    let mut openapi = vec![api.join("openapi.json"), api.join("baseline/openapi.json")];
    let mut services: Vec<PathBuf> = std::fs::read_dir(api.join("services"))
        .expect("api/services")
        .map(|e| e.expect("an entry").path())
        .collect();
    services.sort();
    assert_eq!(
        services.len(),
        bazaar::roles::services().count(),
        "a document per service"
    );
    openapi.extend(services);
    let report = run(
        Command::new("python3")
            .arg(repo().join("crates/bazaar/tests/contracts/validate.py"))
            .arg(meta)
            .args(&openapi)
            .arg("--")
            .arg(api.join("asyncapi.json"))
            .arg(api.join("baseline/asyncapi.json")),
        "validate.py",
    );
    println!("{report}");
}

/// Per-operation expectations schemathesis cannot read from the document: reusing an
/// Idempotency-Key for a different order is refused with 422 (as the IETF draft says), which
/// a fuzzer repeating a key runs into with schema-valid bodies.
const SCHEMATHESIS_CONFIG: &str = r#"
[[operations]]
include-path = "/api/v1/orders"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2XX", "401", "403", "404", "409", "422", "429"]
"#;

/// Gives the fuzzer a gateway profile whose credential limits (5 a second per client) it
/// cannot trip: it calls the sign-in routes as fast as it can from one address, and a 429
/// answered before "401 unauthorized" made its auth checks fail by timing, not by a fault.
/// The gateway reloads its edited config; the limits have tests of their own (abuse.rs).
async fn lift_credential_limits(up: &harness::System) {
    let path = up.data().join("kong.yml");
    let config = std::fs::read_to_string(&path).expect("kong.yml");
    let (second, minute, hour) = bazaar_gateway::CREDENTIAL_LIMITS;
    let strict = format!("second: {second}\n              minute: {minute}\n              hour: {hour}\n");
    assert!(
        config.contains(&strict),
        "the credential limits are in kong.yml:\n{config}"
    );
    let lifted = "second: 100000\n              minute: 1000000\n              hour: 10000000\n";
    let reloads = up.log().matches("gateway config reloaded").count();
    std::fs::write(&path, config.replace(&strict, lifted)).expect("write kong.yml");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while up.log().matches("gateway config reloaded").count() == reloads {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not reload kong.yml:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzing_the_public_api_finds_no_server_error_and_no_answer_off_the_document() {
    python_tools();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut up = harness::System::start(Options {
        bin: PathBuf::from(BIN),
        dir: dir.path().to_path_buf(),
        base: None,
        env: Vec::new(),
        args: Vec::new(),
        replicas: None,
        cluster: None,
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    lift_credential_limits(&up).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let password = std::fs::read_to_string(up.data().join("admin.password")).expect("admin.password");
    let admin = bazaar::load::sign_in_admin(&client, &up.api(""), password.trim())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let shopper = bazaar::load::open_account(&client, &up.api(""), &admin, "fuzz@example.com", "Fuzz", "long enough")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    // What is served is what is committed: the gateway's documents and each service's own.
    let served = |url: String| {
        let client = client.clone();
        async move {
            let response = client.get(&url).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(response.status(), 200, "{url}");
            response.text().await.expect("a body")
        }
    };
    let committed = |path: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(repo().join(path)).expect("a committed document")).expect("JSON")
    };
    let as_json = |text: String| -> serde_json::Value { serde_json::from_str(&text).expect("JSON") };
    assert_eq!(
        as_json(served(up.api("/openapi.json")).await),
        committed("api/openapi.json")
    );
    assert_eq!(
        as_json(served(up.api("/asyncapi.json")).await),
        committed("api/asyncapi.json")
    );
    let page = served(up.api("/docs")).await;
    assert!(
        page.contains("<title>bazaar API reference</title>") && page.contains("/api/v1/openapi.json"),
        "{page}"
    );
    for (role, spec) in bazaar::roles::services() {
        let admin_port = up.port(role.name).expect("a port") + bazaar::roles::ADMIN_PORT_OFFSET;
        let own = served(format!("http://127.0.0.1:{admin_port}/openapi.json")).await;
        assert_eq!(
            as_json(own),
            committed(&format!("api/services/{}.openapi.json", role.name)),
            "{}",
            role.name
        );
        let events = as_json(served(format!("http://127.0.0.1:{admin_port}/asyncapi.json")).await);
        let messaging = !spec.publishes.is_empty() || !spec.consumes.is_empty();
        assert_eq!(
            events["operations"].as_object().is_some_and(|o| !o.is_empty()),
            messaging,
            "{}: {events}",
            role.name
        );
    }

    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, SCHEMATHESIS_CONFIG).expect("config");
    let seed = std::env::var("BAZAAR_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    let base = up.api("").trim_end_matches("/api/v1").to_string();
    for (who, token) in [("shopper", &shopper), ("admin", &admin)] {
        let run = tokio::process::Command::new("python3")
            .args(["-m", "schemathesis.cli", "--config-file"])
            .arg(&config)
            .arg("run")
            .arg(up.api("/openapi.json"))
            .args(["--url", &base])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "all", "--max-examples", "50", "--seed", &seed])
            .args(["--request-timeout", "15", "--report-dir"])
            .arg(dir.path().join(format!("report-{who}")))
            // Its crash cache goes in the temp dir, not the repository.
            .current_dir(dir.path())
            .kill_on_drop(true)
            .output();
        // `--max-time` would make schemathesis fuzz until the budget is spent; the examples
        // bound the run, and this bounds a hang.
        let out = tokio::time::timeout(Duration::from_secs(240), run)
            .await
            .expect("schemathesis finishes within 4 minutes")
            .expect("schemathesis runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: String = text
            .lines()
            .skip_while(|l| !l.contains("SUMMARY"))
            .collect::<Vec<_>>()
            .join("\n");
        println!("schemathesis as the {who} (seed {seed}):\n{summary}");
        assert!(
            out.status.success(),
            "schemathesis as the {who} found failures (seed {seed}):\n{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            up.log_tail(3000)
        );
    }
    let (ok, report) = up.audit(Duration::from_secs(60)).await.expect("audit runs");
    assert!(ok, "audit after fuzzing:\n{report}\n{}", up.log_tail(4000));
    up.stop().await;
}
