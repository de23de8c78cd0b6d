//! End to end: `bazaar up` on a fresh data directory, real orders through the gateway,
//! roles killed with SIGKILL mid-flight, and `bazaar audit` proving nothing was lost or
//! doubled. Each test names the one thing a user would notice. Everything runs on loopback
//! and stops by itself; the process harness is the benches' own (`bazaar_bench::harness`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bazaar::roles;
use bazaar_bench::harness::{self, Options};
use bazaar_testkit::{servers, Server, TestDb};
use serde_json::{json, Value};

mod netns;

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// A running `bazaar up` in a temp dir, with an HTTP client; stopped on drop.
struct System {
    up: harness::System,
    client: reqwest::Client,
    /// The admin's token, signed in once (repeated sign-ins of one account are throttled).
    admin: tokio::sync::OnceCell<String>,
    _dir: tempfile::TempDir,
}

/// The port offset of the role called `name` in the role table.
fn port_offset(name: &str) -> u16 {
    harness::port_offset(name).expect("a role of the table")
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

impl System {
    async fn start(extra_env: &[(&str, &str)]) -> System {
        System::start_with(None, None, extra_env).await
    }

    /// `bazaar up` with `base` as its base port (a free one when `None`) and `--replicas`.
    async fn start_with(base: Option<u16>, replicas: Option<&str>, extra_env: &[(&str, &str)]) -> System {
        System::start_options(base, replicas, None, &[], extra_env).await
    }

    /// `bazaar up` with every option the harness has, `--cluster NAME` and flags among them.
    async fn start_options(
        base: Option<u16>,
        replicas: Option<&str>,
        cluster: Option<&str>,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> System {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = Options {
            bin: PathBuf::from(BIN),
            dir: dir.path().to_path_buf(),
            base,
            // These tests place orders as fast as they can for a few customers, and the drills
            // pile up sagas while a broker node is down; the per-customer limit and shedding
            // have tests of their own (abuse.rs, orders' API tests).
            env: [
                ("BAZAAR_ORDERS_PER_CUSTOMER_PER_MINUTE", "0"),
                ("BAZAAR_ORDERS_MAX_IN_FLIGHT", "0"),
            ]
            .iter()
            .chain(extra_env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            replicas: replicas.map(str::to_string),
            cluster: cluster.map(str::to_string),
        };
        let up = harness::System::start(options)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        System {
            up,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            admin: tokio::sync::OnceCell::new(),
            _dir: dir,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.up.data().to_path_buf()
    }

    /// A client holding a tool certificate from the system's mesh CA (as `bazaar mesh
    /// issue` makes), that reaches every role by name on this machine.
    fn mesh_client(&self, tool: &str) -> reqwest::Client {
        self.mesh_client_as(bazaar_kit::mesh::Workload::Tool, tool)
    }

    /// A client holding a certificate for `name` of `kind` from the system's mesh CA.
    fn mesh_client_as(&self, kind: bazaar_kit::mesh::Workload, name: &str) -> reqwest::Client {
        use bazaar_kit::mesh::{Authority, Identity, MeshFiles};
        let dir = self.data_dir().join("mesh");
        let ca = Authority::load(&dir).expect("the mesh CA");
        let files = MeshFiles::in_dir(&dir.join("tools"), &format!("test-{name}"));
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir.join("tools"))
            .expect("tools dir");
        let bundle = std::fs::read_to_string(dir.join("bundle.pem")).expect("the bundle");
        let tls = ca
            .issue(
                &Identity::new(ca.trust_domain(), kind, name).expect("an identity"),
                Duration::from_secs(600),
            )
            .expect("a certificate")
            .install(&files, &bundle)
            .expect("install it");
        let peers: Vec<(String, std::net::IpAddr)> = roles::ROLES
            .iter()
            .map(|r| (r.name.to_string(), std::net::IpAddr::from([127, 0, 0, 1])))
            .collect();
        bazaar_kit::mesh::http_client(&tls, Duration::from_secs(10), &peers).expect("a mesh client")
    }

    /// What service `role`'s instance 0 shows on its admin port's `/metrics`.
    async fn metrics(&self, role: &str) -> String {
        let port = self.base() + port_offset(role) + roles::ADMIN_PORT_OFFSET;
        self.client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text")
    }

    /// `path` on instance 0 of service `role`, over the mesh.
    fn service_url(&self, role: &str, path: &str) -> String {
        format!("https://{role}:{}{path}", self.base() + port_offset(role))
    }

    fn base(&self) -> u16 {
        self.up.base()
    }

    fn api(&self, path: &str) -> String {
        self.up.api(path)
    }

    fn log(&self) -> String {
        self.up.log_tail(6000)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_with(method, path, token, body, &[]).await
    }

    /// Like [`System::call`] with extra headers. A gateway that is down (a fault drill killed
    /// it and `up` is restarting it), or that asks to wait (429), is waited for, up to 30 s.
    async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut req = self.client.request(method.clone(), self.api(path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            match req.send().await {
                // A careful client waits out the gateway's per-client limit (sign-ins and
                // registrations have a strict one).
                Ok(resp) if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS && Instant::now() < deadline => {
                    let wait = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait).min(Duration::from_secs(5))).await;
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    return (status, resp.json().await.unwrap_or(Value::Null));
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "the gateway does not answer: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let body = json!({"email": email, "password": password});
        let (st, v) = self.call(reqwest::Method::POST, "/auth/token", None, Some(body)).await;
        assert_eq!(st, 200, "login: {v}");
        assert_eq!(v["tokenType"], "Bearer");
        v["accessToken"].as_str().expect("accessToken").to_string()
    }

    /// The admin account `up` created.
    async fn admin(&self) -> String {
        self.admin
            .get_or_init(|| async {
                let password = std::fs::read_to_string(self.data_dir().join("admin.password")).expect("admin.password");
                self.login("admin@bazaar.local", password.trim()).await
            })
            .await
            .clone()
    }

    /// Registers (with a phone when given), confirms the address with the code mailed to it
    /// (read as the admin) and logs in; waits for the wallet to open.
    async fn customer_with(&self, email: &str, phone: Option<&str>) -> String {
        let mut body = json!({"email": email, "name": "Test", "password": "long enough"});
        if let Some(p) = phone {
            body["phone"] = json!(p);
        }
        let (st, v) = self.call(reqwest::Method::POST, "/users", None, Some(body)).await;
        assert_eq!(st, 202, "register: {v}");
        let code = self.confirmation_code(email).await;
        let body = json!({"email": email, "password": "long enough", "code": code});
        let (st, v) = self
            .call(reqwest::Method::POST, "/auth/verification", None, Some(body))
            .await;
        assert_eq!(st, 200, "confirm: {v}");
        let token = v["accessToken"].as_str().expect("accessToken").to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .call(reqwest::Method::GET, "/accounts/me", Some(&token), None)
            .await
            .0
            != 200
        {
            assert!(Instant::now() < deadline, "wallet never opened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        token
    }

    /// The newest confirmation code mailed to `email`, as the admin reads it.
    async fn confirmation_code(&self, email: &str) -> String {
        let admin = self.admin().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, sent) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/notifications?recipient={email}"),
                    Some(&admin),
                    None,
                )
                .await;
            let code = sent.as_array().into_iter().flatten().find_map(|n| {
                n["subject"]
                    .as_str()?
                    .strip_prefix(bazaar_notifications::CODE_SUBJECT)
                    .map(str::to_string)
            });
            if let Some(code) = code {
                return code;
            }
            assert!(Instant::now() < deadline, "no confirmation code reached {email}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn customer(&self, email: &str) -> String {
        self.customer_with(email, None).await
    }

    async fn product(&self, token: &str, sku: &str, price: i64, stock: i64) -> String {
        let body = json!({"sku": sku, "name": sku, "priceCents": price, "stock": stock});
        let (st, v) = self
            .call(reqwest::Method::POST, "/products", Some(token), Some(body))
            .await;
        assert_eq!(st, 201, "create product: {v}");
        v["id"].as_str().expect("id").to_string()
    }

    /// Places an order as a careful client does: with an Idempotency-Key, retrying while
    /// a role is down, so a retried POST never makes a second order.
    async fn order(&self, token: &str, product: &str, quantity: i64) -> String {
        let body = json!({"items": [{"productId": product, "quantity": quantity}]});
        let key = uuid::Uuid::now_v7().to_string();
        loop {
            let (st, v) = self
                .call_with(
                    reqwest::Method::POST,
                    "/orders",
                    Some(token),
                    Some(body.clone()),
                    &[("idempotency-key", &key)],
                )
                .await;
            // The orders role may be down for a moment during fault drills.
            if st == 502 || st == 503 || st == 504 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert!(st == 202 || st == 200, "place order: {st} {v}\n{}", self.log());
            return v["id"].as_str().expect("id").to_string();
        }
    }

    /// Cancels `order` as a careful client does, asking again while a role is down (a
    /// cancellation asked twice is one).
    async fn cancel(&self, token: &str, order: &str) {
        let path = format!("/orders/{order}/cancellation");
        loop {
            let (st, v) = self.call(reqwest::Method::POST, &path, Some(token), None).await;
            if st == 502 || st == 503 || st == 504 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert!(st == 200 || st == 202, "cancel: {st} {v}\n{}", self.log());
            return;
        }
    }

    async fn settled(&self, token: &str, order: &str) -> Value {
        self.settled_within(token, order, Duration::from_secs(120))
            .await
            .unwrap_or_else(|v| panic!("order {order} never settled: {v}\n{}", self.log()))
    }

    /// The order once confirmed or cancelled, or its last answer when still pending (or
    /// cancelling) after `within`.
    async fn settled_within(&self, token: &str, order: &str, within: Duration) -> Result<Value, Value> {
        let deadline = Instant::now() + within;
        loop {
            let (st, v) = self
                .call(reqwest::Method::GET, &format!("/orders/{order}"), Some(token), None)
                .await;
            if st == 200 && (v["status"] == "confirmed" || v["status"] == "cancelled") {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn audit(&self) -> (bool, String) {
        self.up.audit(Duration::from_secs(60)).await.expect("run audit")
    }

    /// SIGKILLs the running process of `role`; false when it was not running (restarting).
    fn kill9(&self, role: &str) -> bool {
        self.up.kill9(role)
    }

    /// The stock and on-hand units of `product`, as anyone sees them.
    async fn stock(&self, product: &str) -> (i64, i64) {
        let (_, v) = self
            .call(reqwest::Method::GET, &format!("/products/{product}"), None, None)
            .await;
        (
            v["stock"].as_i64().expect("stock"),
            v["onHand"].as_i64().expect("onHand"),
        )
    }

    async fn balance(&self, token: &str) -> i64 {
        let (_, v) = self.call(reqwest::Method::GET, "/accounts/me", Some(token), None).await;
        v["balanceCents"].as_i64().expect("balanceCents")
    }

    /// Audits and fails the test with the report and the log when an invariant breaks.
    async fn assert_audit_clean(&self) -> String {
        let (ok, report) = self.audit().await;
        assert!(ok, "audit failed:\n{report}\n{}", self.log());
        report
    }
}

fn count_files(dir: &Path, sub: &str) -> usize {
    std::fs::read_dir(dir.join(sub)).map(|d| d.count()).unwrap_or(0)
}

/// A shop with a customer (Ann, with a phone), and a mug (5 on hand, 12.50) and a piano
/// (3 on hand, 5000.00) that a 100.00 wallet cannot pay for.
struct Shop {
    admin: String,
    ann: String,
    mug: String,
    piano: String,
}

async fn shop(sys: &System) -> Shop {
    let admin = sys.admin().await;
    let ann = sys.customer_with("ann@example.com", Some("+14155550123")).await;
    let mug = sys.product(&admin, "MUG", 1_250, 5).await;
    let piano = sys.product(&admin, "PIANO", 500_000, 3).await;
    Shop { admin, ann, mug, piano }
}

/// Wallets start with 100.00, so the piano cannot be paid.
const CREDIT: (&str, &str) = ("BAZAAR_WELCOME_CREDIT_CENTS", "10000");

/// Happy path: reserved, paid, committed, confirmed; the client waits without polling.
async fn confirmed_order(sys: &System, shop: &Shop) -> String {
    let ok = sys.order(&shop.ann, &shop.mug, 2).await;
    let (st, v) = sys
        .call(
            reqwest::Method::GET,
            &format!("/orders/{ok}?waitFor=outcome&timeout=30"),
            Some(&shop.ann),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["status"], "confirmed", "{v}");
    assert_eq!(v["totalCents"], 2_500);
    assert_eq!(v["saga"]["status"], "completed");
    ok
}

/// Stock reserved, payment refused, reservation released.
async fn compensated_order(sys: &System, shop: &Shop) {
    let too_dear = sys.order(&shop.ann, &shop.piano, 1).await;
    let v = sys.settled(&shop.ann, &too_dear).await;
    assert_eq!(v["status"], "cancelled");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains("insufficient funds"),
        "{v}"
    );
    assert_eq!(v["saga"]["status"], "compensated");
    assert_eq!(
        sys.stock(&shop.piano).await,
        (3, 3),
        "released stock is available again"
    );
}

/// The audit holds, and Ann heard of her one order's outcome once by email and once by text
/// (beside the two welcome emails, the admin's and hers, and Ann's confirmation code).
async fn assert_audit_clean_and_ann_told_once(sys: &System) {
    let report = sys.assert_audit_clean().await;
    assert_eq!(count_files(&sys.data_dir(), "mail"), 4, "{report}");
    assert_eq!(count_files(&sys.data_dir(), "sms"), 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_order_takes_the_stock_and_the_money_once_and_tells_the_customer_once() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    confirmed_order(&sys, &shop).await;
    assert_eq!(sys.stock(&shop.mug).await, (3, 3), "sold units left the shelf");
    assert_eq!(sys.balance(&shop.ann).await, 10_000 - 2_500);
    assert_audit_clean_and_ann_told_once(&sys).await;
}

/// A customer cancels a confirmed order through the gateway: the money goes back to the
/// wallet, the units back on the shelf, she is told by email and text, and every invariant
/// holds; asking again is the same one cancellation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_cancels_a_confirmed_order_and_gets_the_money_and_the_units_back() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let id = confirmed_order(&sys, &shop).await;
    let cancel = format!("/orders/{id}/cancellation");
    let (st, v) = sys.call(reqwest::Method::POST, &cancel, Some(&shop.ann), None).await;
    assert_eq!((st, v["status"].as_str()), (202, Some("cancelling")), "{v}");
    let v = sys.settled(&shop.ann, &id).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("cancelled"), Some("cancelled by the customer")),
        "{v}"
    );
    assert_eq!(sys.balance(&shop.ann).await, 10_000, "refunded in full");
    assert_eq!(sys.stock(&shop.mug).await, (5, 5), "the units are back on the shelf");
    let (st, v) = sys.call(reqwest::Method::POST, &cancel, Some(&shop.ann), None).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let report = sys.assert_audit_clean().await;
    // Welcomes (admin, Ann), Ann's code, her confirmation and her cancellation; two texts.
    assert_eq!(count_files(&sys.data_dir(), "mail"), 5, "{report}");
    assert_eq!(count_files(&sys.data_dir(), "sms"), 2, "{report}");
}

/// Every file and directory under `dir` that group or others could read, write or enter.
fn open_to_others(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            open.push(format!("{} {:o}", path.display(), meta.permissions().mode() & 0o777));
        }
        if meta.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tokens_users_signed_pass_the_gateway_or_any_service_and_no_data_is_readable_by_others() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let sys = System::start(&[]).await;
    let ann = sys.customer("ann@example.com").await;
    let real_kid = jsonwebtoken::decode_header(&ann).unwrap().kid.expect("a kid");
    let claims = json!({
        "sub": uuid::Uuid::now_v7(), "email": "mallory@example.com", "iss": bazaar_kit::auth::ISSUER,
        "iat": 0, "exp": 4_000_000_000u64, "roles": ["admin"],
    });
    let with_kid = |alg| {
        let mut header = Header::new(alg);
        header.kid = Some(real_kid.clone());
        header
    };
    let stranger = bazaar_kit::auth::SigningKey::generate().unwrap();
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let forged = [
        (
            "HS256",
            encode(
                &with_kid(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"secret"),
            )
            .unwrap(),
        ),
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none", "kid": real_kid})), b64(&claims)),
        ),
        (
            "unknown kid",
            stranger
                .issue(
                    uuid::Uuid::now_v7(),
                    "mallory@example.com",
                    &["admin".into()],
                    Duration::from_secs(600),
                )
                .unwrap(),
        ),
        (
            "users' kid, another key",
            encode(
                &with_kid(Algorithm::EdDSA),
                &claims,
                &EncodingKey::from_ed_der(stranger.pkcs8()),
            )
            .unwrap(),
        ),
    ];
    // A route of each service that needs a token, called directly on the service's port.
    let guarded = [
        ("users", "/users/me"),
        ("orders", "/orders"),
        ("payments", "/accounts/me"),
        ("notifications", "/notifications"),
        ("inventory", "/products"),
    ];
    let mesh = sys.mesh_client("e2e");
    let direct = |role: &str, path: &str, token: &str| {
        let url = sys.service_url(role, path);
        let request = if role == "inventory" {
            mesh.post(url)
                .json(&json!({"sku": "FORGED", "name": "Forged", "priceCents": 1}))
        } else {
            mesh.get(url)
        };
        request.bearer_auth(token.to_string()).send()
    };
    for (role, path) in guarded {
        let status = direct(role, path, &ann).await.unwrap().status().as_u16();
        let expected = if role == "inventory" { 403 } else { 200 };
        assert_eq!(status, expected, "ann's real token at {role} {path}");
    }
    for (what, token) in &forged {
        let (status, body) = sys.call(reqwest::Method::GET, "/users/me", Some(token), None).await;
        assert_eq!(status, 401, "{what} through the gateway: {body}");
        for (role, path) in guarded {
            let answer = direct(role, path, token).await.unwrap();
            assert_eq!(answer.status().as_u16(), 401, "{what} at {role} {path}");
            assert_eq!(
                answer.headers()["content-type"],
                "application/problem+json",
                "{what} at {role}"
            );
        }
    }

    // The published keys, through the gateway, verify ann's token.
    let jwks: bazaar_kit::auth::Jwks = sys
        .client
        .get(format!("http://127.0.0.1:{}/.well-known/jwks.json", sys.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .expect("a JWKS through the gateway");
    let keys = bazaar_kit::auth::KeySet::from_jwks(&jwks).unwrap();
    assert_eq!(keys.verify(&ann).unwrap().email, "ann@example.com");

    let data = sys.data_dir();
    assert_eq!(
        open_to_others(&data),
        Vec::<String>::new(),
        "readable by group or others"
    );
    assert!(!data.join("jwt.secret").exists(), "no shared token secret");
    let gateway_config = std::fs::read_to_string(data.join("kong.yml")).unwrap();
    assert!(
        !gateway_config.contains("secret:"),
        "the gateway holds no signing secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_ports_speak_only_mutual_tls_and_health_stays_on_the_plain_admin_ports() {
    let sys = System::start(&[]).await;
    let mesh = sys.mesh_client("probe");
    for (role, _) in roles::services() {
        let port = sys.base() + port_offset(role.name);
        // Plain HTTP gets nothing from the API port; a mesh certificate gets an answer.
        assert!(
            sys.client
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
                .is_err(),
            "{} answered plain HTTP",
            role.name
        );
        let ready = mesh.get(sys.service_url(role.name, "/health/ready")).send().await;
        assert_eq!(
            ready.map(|r| r.status().as_u16()).ok(),
            Some(200),
            "{} over the mesh",
            role.name
        );
        // The admin port answers probes and scrapers in plain HTTP, and nothing else.
        let admin = port + roles::ADMIN_PORT_OFFSET;
        let health = sys
            .client
            .get(format!("http://127.0.0.1:{admin}/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200, "{} admin health", role.name);
        let api = sys
            .client
            .get(format!("http://127.0.0.1:{admin}/orders"))
            .send()
            .await
            .unwrap();
        assert_eq!(api.status(), 404, "{} serves its API on the admin port", role.name);
    }
    // A certificate from another CA, for a name the mesh knows, is refused at the handshake.
    let dir = tempfile::tempdir().unwrap();
    let stranger = bazaar_kit::mesh::Authority::create("bazaar", Duration::from_secs(600)).unwrap();
    let files = bazaar_kit::mesh::MeshFiles::in_dir(dir.path(), "gateway");
    stranger
        .issue(
            &bazaar_kit::mesh::Identity::role("bazaar", "gateway").unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
        .write(&files)
        .unwrap();
    std::fs::copy(sys.data_dir().join("mesh/bundle.pem"), &files.bundle).unwrap();
    let forged = bazaar_kit::mesh::Tls::load(files).unwrap();
    let peers = [("orders".to_string(), std::net::IpAddr::from([127, 0, 0, 1]))];
    let mallory = bazaar_kit::mesh::http_client(&forged, Duration::from_secs(5), &peers).unwrap();
    assert!(
        mallory.get(sys.service_url("orders", "/orders")).send().await.is_err(),
        "orders served a certificate from another CA"
    );
    let log = sys
        .up
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("serving the API over mutual TLS")
        })
        .await;
    assert!(log.contains("serving the API over mutual TLS"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_calling_outside_the_mesh_policy_gets_403_naming_it_and_is_counted() {
    let sys = System::start(&[]).await;
    let ann = sys.customer("ann@example.com").await;
    // What notifications' certificate may do: read users' keys, and nothing else.
    let notifications = sys.mesh_client_as(bazaar_kit::mesh::Workload::Role, "notifications");
    let keys = notifications
        .get(sys.service_url("users", "/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status(), 200, "the JWKS edge is in the policy");
    for (role, path) in [("orders", "/orders"), ("users", "/users/me")] {
        let refused = notifications
            .get(sys.service_url(role, path))
            .bearer_auth(&ann)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "notifications -> {role} {path}");
        assert_eq!(refused.headers()["content-type"], "application/problem+json");
        let detail = refused.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains("spiffe://bazaar/role/notifications"), "{detail}");
        assert!(detail.contains(&format!("GET {path} on {role}")), "{detail}");
    }
    // Refusals and the gateway's traffic are counted per edge on the callee.
    let order_list = sys.call(reqwest::Method::GET, "/orders", Some(&ann), None).await;
    assert_eq!(order_list.0, 200);
    let metrics = sys.metrics("orders").await;
    let refusals = metric_sum(
        &metrics,
        "bazaar_mesh_refusals_total",
        &["caller=\"spiffe://bazaar/role/notifications\"", "callee=\"orders\""],
    );
    assert_eq!(refusals, 1.0, "{metrics}");
    let from_gateway = metric_sum(
        &metrics,
        "bazaar_mesh_requests_total",
        &[
            "caller=\"spiffe://bazaar/role/gateway\"",
            "callee=\"orders\"",
            "route=\"/orders\"",
        ],
    );
    assert!(from_gateway >= 1.0, "{metrics}");
    let log = sys
        .up
        .wait_for_log(Duration::from_secs(5), |l| l.contains("refused by the policy"))
        .await;
    assert!(log.contains("refused by the policy"), "refusals are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_short_of_stock_is_cancelled_with_the_reason_and_takes_nothing() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let too_many = sys.order(&shop.ann, &shop.mug, 10).await;
    let v = sys.settled(&shop.ann, &too_many).await;
    assert_eq!(v["status"], "cancelled");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains("insufficient stock"),
        "{v}"
    );
    assert_eq!(sys.stock(&shop.mug).await, (5, 5));
    assert_eq!(sys.balance(&shop.ann).await, 10_000);
    sys.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_the_wallet_cannot_pay_is_undone_and_its_stock_released() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    compensated_order(&sys, &shop).await;
    assert_eq!(sys.balance(&shop.ann).await, 10_000, "nothing was charged");
    assert_audit_clean_and_ann_told_once(&sys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_sees_only_their_own_orders_and_cannot_add_products() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let ben = sys.customer("ben@example.com").await;
    let ok = confirmed_order(&sys, &shop).await;
    let (st, v) = sys
        .call(reqwest::Method::GET, &format!("/orders/{ok}"), Some(&ben), None)
        .await;
    assert_eq!(st, 404, "another customer's order does not exist for Ben: {v}");
    let (_, mine) = sys.call(reqwest::Method::GET, "/orders", Some(&ben), None).await;
    assert_eq!(mine.as_array().map(Vec::len), Some(0), "{mine}");
    let (st, _) = sys
        .call(
            reqwest::Method::POST,
            "/products",
            Some(&ben),
            Some(json!({"sku": "X", "name": "X", "priceCents": 1})),
        )
        .await;
    assert_eq!(st, 403, "customers cannot add products");
    let (st, _) = sys.call(reqwest::Method::GET, "/orders", None, None).await;
    assert_eq!(st, 401, "the gateway refuses calls without a token");
}

/// A setting given to `up` as a flag reaches the roles it starts, as the same setting in
/// the environment does (the harness's environment says no per-customer limit; the flag wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_given_to_up_reaches_the_roles_it_starts() {
    let sys = System::start_options(None, None, None, &["--orders-per-customer-per-minute", "1"], &[]).await;
    let admin = sys.admin().await;
    let ann = sys.customer("ann@example.com").await;
    let tea = sys.product(&admin, "TEA", 300, 100).await;
    let body = json!({"items": [{"productId": tea, "quantity": 1}]});
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let resp = sys
            .client
            .post(sys.api("/orders"))
            .bearer_auth(&ann)
            .json(&body)
            .send()
            .await
            .expect("place an order");
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [202, 429], "one order a minute for ann\n{}", sys.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_order_with_the_same_idempotency_key_is_one_order() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let keyed = |body: Value| {
        sys.client
            .post(sys.api("/orders"))
            .bearer_auth(&shop.ann)
            .header("idempotency-key", "k-1")
            .json(&body)
            .send()
    };
    let body = json!({"items": [{"productId": shop.mug, "quantity": 1}]});
    let first = keyed(body.clone()).await.expect("post");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let again = keyed(body).await.expect("post");
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.expect("json")["id"], first["id"]);
    let other = keyed(json!({"items": [{"productId": shop.mug, "quantity": 2}]}))
        .await
        .expect("post");
    assert_eq!(other.status(), 422, "another body with the same key is refused");
    assert_eq!(
        other.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let v = sys.settled(&shop.ann, first["id"].as_str().expect("id")).await;
    assert_eq!(v["status"], "confirmed", "{v}");
    assert_eq!(sys.stock(&shop.mug).await, (4, 4), "one unit sold, once");
    assert_eq!(sys.balance(&shop.ann).await, 10_000 - 1_250, "charged once");
    sys.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_problem_details_not_crashes() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let (st, v) = sys
        .call(
            reqwest::Method::POST,
            "/orders",
            Some(&shop.ann),
            Some(json!({"items": []})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["detail"].as_str().unwrap_or_default().contains("at least one item"));
    let some_order = uuid::Uuid::now_v7();
    for (method, path, status) in [
        (reqwest::Method::GET, "/orders?limit=lots".to_string(), 400),
        (
            reqwest::Method::GET,
            format!("/orders/{some_order}?waitFor=outcome&timeout=-1"),
            400,
        ),
        (reqwest::Method::GET, "/orders/not-a-uuid".to_string(), 400),
        (reqwest::Method::DELETE, format!("/products/{}", shop.mug), 405),
    ] {
        let resp = sys
            .client
            .request(method.clone(), sys.api(&path))
            .bearer_auth(&shop.admin)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{method} {path}"
        );
        let body: Value = resp.json().await.expect("problem body");
        assert!(
            !body["detail"].as_str().unwrap_or_default().is_empty(),
            "{method} {path}: {body}"
        );
    }
    // Every role is still up and healthy afterwards.
    for role in roles::up_roles() {
        let url = format!("http://127.0.0.1:{}/health", sys.base() + role.health_offset());
        let status = sys.client.get(&url).send().await.expect("health").status();
        assert_eq!(status, 200, "{}", role.name);
    }
}

/// A small deterministic generator, so a failing drill can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The fault drill: for a few seconds, orders from several clients while roles are SIGKILLed
/// at seeded random instants; every order must reach an outcome and the audit must hold.
/// `BAZAAR_FAULT_SEED=N` replays a run's choices; `BAZAAR_FAULT_SECONDS` sets its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_roles_mid_flight_loses_and_doubles_nothing() {
    let seed = std::env::var("BAZAAR_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand_seed() | 1);
    let seconds: u64 = std::env::var("BAZAAR_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    // A bound on the work, whatever the machine's speed.
    let total = 1_200;
    eprintln!("fault drill seed {seed} (replay with BAZAAR_FAULT_SEED={seed})");
    let sys = System::start(&[("BAZAAR_WELCOME_CREDIT_CENTS", "300000")]).await;
    let admin = sys.admin().await;
    let mut customers = Vec::new();
    for i in 0..3 {
        customers.push(sys.customer(&format!("drill{i}@example.com")).await);
    }
    // Plenty of tea; few rare items (stock runs out); a pricey item (wallets run dry, so
    // payments fail after stock was reserved and compensation runs under faults too).
    let tea = sys.product(&admin, "TEA", 300, 10_000).await;
    let rare = sys.product(&admin, "RARE", 500, 6).await;
    let pricey = sys.product(&admin, "PRICEY", 20_000, 100).await;

    let placed = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let drilling = std::sync::atomic::AtomicBool::new(true);
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    // On a slow machine roles restart slowly and fewer kills land; the drill runs on (up to
    // three times as long) until it has killed enough to prove something.
    let give_up_at = Instant::now() + Duration::from_secs(3 * seconds);
    let worker = |w: u64| {
        let (placed, next, customers, products) = (&placed, &next, &customers, [&tea, &rare, &pricey]);
        let (sys, drilling) = (&sys, &drilling);
        async move {
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= total || !drilling.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let who = rng.below(customers.len() as u64) as usize;
                let what = match rng.below(10) {
                    0 => 1,
                    1 => 2,
                    _ => 0,
                };
                let id = sys
                    .order(&customers[who], products[what], 1 + rng.below(2) as i64)
                    .await;
                // One order in five is cancelled by its customer at once: before the pivot,
                // past it, or once confirmed, whichever the faults make it.
                let cancelled = rng.below(5) == 0;
                if cancelled {
                    sys.cancel(&customers[who], &id).await;
                }
                placed.lock().expect("lock").push((who, id, cancelled));
            }
        }
    };
    let killer = async {
        let mut rng = Rng(seed);
        let roles = ["orders", "payments", "inventory", "notifications", "gateway"];
        let mut kills = std::collections::HashMap::new();
        while Instant::now() < give_up_at && (Instant::now() < stop_at || kills.values().sum::<i32>() < 5) {
            tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
            let victim = roles[rng.below(roles.len() as u64) as usize];
            // `up` gives up on a role that dies five times a minute; stay under that.
            let count = kills.entry(victim).or_insert(0);
            if *count < 3 && sys.kill9(victim) {
                *count += 1;
            }
        }
        drilling.store(false, std::sync::atomic::Ordering::SeqCst);
        kills
    };
    let clients = futures_util::future::join_all((0..4).map(worker));
    let (_, kills) = tokio::join!(clients, killer);
    let placed = placed.into_inner().expect("lock");
    eprintln!("{} orders placed; kills: {kills:?}", placed.len());
    assert!(
        kills.values().sum::<i32>() >= 5,
        "the drill killed too little to prove anything (seed {seed})"
    );
    let mut outcomes = std::collections::BTreeMap::new();
    for (who, id, cancelled) in &placed {
        let v = sys.settled(&customers[*who], id).await;
        // An order its customer cancelled ends cancelled, whatever the faults did meanwhile.
        assert!(
            !cancelled || v["status"] == "cancelled",
            "seed {seed}: order {id} was cancelled by its customer but ended {v}"
        );
        *outcomes
            .entry(v["status"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(
        outcomes.get("confirmed").copied().unwrap_or(0) > 0,
        "seed {seed}: {outcomes:?}"
    );
    let (ok, report) = sys.audit().await;
    assert!(ok, "seed {seed}: audit failed:\n{report}\n{}", sys.log());
}

/// A fresh PostgreSQL database per service and a NATS namespace named `prefix`: the
/// variables that point a system at them, and the databases (to drop afterwards). `None`
/// (after saying the test is skipped) without a PostgreSQL server.
async fn postgres_and_nats(prefix: &str, nats: &str) -> Option<(Vec<(String, String)>, Vec<TestDb>)> {
    let mut dbs = Vec::new();
    let mut env = Vec::new();
    for (_, spec) in roles::services() {
        let db = TestDb::postgres(&format!("{prefix}_{}", spec.name.replace('-', "_"))).await?;
        env.push((bazaar::settings::store_url_var(spec.name), db.url.clone()));
        dbs.push(db);
    }
    let namespace = format!("{prefix}{}", uuid::Uuid::now_v7().simple());
    env.push(("BAZAAR_BROKER_URL".into(), format!("{nats}?namespace={namespace}")));
    Some((env, dbs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_system_runs_on_postgres_and_nats() {
    let Some([_, nats]) = servers::urls([Server::Postgres, Server::Nats], "the system on PostgreSQL and NATS") else {
        return;
    };
    let Some((mut env, dbs)) = postgres_and_nats("e2e", &nats).await else {
        return;
    };
    env.push((CREDIT.0.into(), CREDIT.1.into()));
    {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sys = System::start(&env).await;
        let shop = shop(&sys).await;
        confirmed_order(&sys, &shop).await;
        compensated_order(&sys, &shop).await;
        sys.kill9("orders");
        let after_crash = sys.order(&shop.ann, &shop.mug, 1).await;
        assert_eq!(sys.settled(&shop.ann, &after_crash).await["status"], "confirmed");
        sys.assert_audit_clean().await;
    }
    for db in dbs {
        db.drop_database().await;
    }
}

/// Checks one Prometheus text exposition line by line; returns the samples seen.
fn parse_prometheus(text: &str) -> Result<usize, String> {
    let mut samples = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let ok = match words.first() {
                Some(&"TYPE") => {
                    words.len() == 3 && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2])
                }
                Some(&"HELP") => words.len() >= 2,
                _ => true,
            };
            if !ok {
                return Err(format!("bad comment line: {line}"));
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("no value: {line}"))?;
        value
            .parse::<f64>()
            .or_else(|_| {
                if value == "+Inf" || value == "-Inf" || value == "NaN" {
                    Ok(0.0)
                } else {
                    Err(())
                }
            })
            .map_err(|()| format!("bad value in: {line}"))?;
        let name = series.split('{').next().unwrap_or_default();
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name || (series.contains('{') && !series.ends_with('}')) {
            return Err(format!("bad series: {line}"));
        }
        samples += 1;
    }
    Ok(samples)
}

/// What `promtool check metrics` (Prometheus's own linter) says of `text`: empty when it
/// finds nothing; `None` where promtool is not installed (`.ci/run` installs Debian's
/// `prometheus` package).
fn promtool_problems(text: &str) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_correlation_id_crosses_every_role_and_every_role_has_metrics() {
    let sys = System::start(&[]).await;
    let admin = sys.admin().await;
    let cy = sys.customer("cy@example.com").await;
    let pen = sys.product(&admin, "PEN", 150, 10).await;
    let correlation = format!("trace-me-{}", uuid::Uuid::now_v7().simple());
    let placed = sys
        .client
        .post(sys.api("/orders"))
        .bearer_auth(&cy)
        .header("x-correlation-id", &correlation)
        .json(&json!({"items": [{"productId": pen, "quantity": 1}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(placed.status(), 202);
    assert_eq!(
        placed.headers().get("x-correlation-id").and_then(|v| v.to_str().ok()),
        Some(correlation.as_str()),
        "the gateway echoes the caller's id"
    );
    let id = placed.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(sys.settled(&cy, &id).await["status"], "confirmed");

    // The outcome email was queued under the same id: it travelled in event metadata.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, notes) = sys
            .call(
                reqwest::Method::GET,
                "/notifications?recipient=cy@example.com",
                Some(&admin),
                None,
            )
            .await;
        let found = notes.as_array().is_some_and(|n| {
            n.iter()
                .any(|x| x["about"] == format!("order.confirmed:{id}") && x["correlationId"] == correlation.as_str())
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no notification with the correlation id: {notes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One grep over the supervisor's log finds the id in every role's lines.
    let roles = ["gateway", "orders", "inventory", "payments", "notifications"];
    let carries = |log: &str| {
        roles.iter().all(|role| {
            let prefix = format!("{role:>15} |");
            log.lines().any(|l| l.starts_with(&prefix) && l.contains(&correlation))
        })
    };
    let mut log = sys.up.log();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !carries(&log) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = sys.up.log();
    }
    for role in roles {
        let prefix = format!("{role:>15} |");
        assert!(
            log.lines().any(|l| l.starts_with(&prefix) && l.contains(&correlation)),
            "no {role} log line carries {correlation}"
        );
    }

    // Every role serves Prometheus text that parses.
    for role in bazaar::roles::up_roles() {
        let url = format!("http://127.0.0.1:{}/metrics", sys.base() + role.health_offset());
        let text = sys
            .client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(samples > 0, "{url} has no samples");
        // Prometheus's own linter: help text for every metric, base units, names.
        match promtool_problems(&text) {
            Some(problems) => assert!(problems.trim().is_empty(), "{url}: promtool check metrics:\n{problems}"),
            None => eprintln!("SKIPPED promtool check metrics of {url}: no promtool (Debian package prometheus)"),
        }
    }
    let orders = sys.metrics("orders").await;
    for name in [
        "bazaar_http_requests_total",
        "bazaar_saga_transitions_total",
        "bazaar_outbox_unsent",
    ] {
        assert!(orders.contains(name), "orders /metrics lacks {name}");
    }
}

/// Runs `bazaar serve payment-sim` beside a system; killed on drop.
struct Simulator(Child);

impl Simulator {
    /// `bazaar serve payment-sim` on `sys`'s mesh (its certificate, bundle and policy), at
    /// its port from `base`.
    fn beside(sys: &System, base: u16) -> Simulator {
        let mesh_dir = sys.data_dir().join("mesh");
        Simulator(
            Command::new(BIN)
                .args(["serve", "payment-sim"])
                .env("BAZAAR_BASE_PORT", base.to_string())
                .env("BAZAAR_DATA", sys.data_dir())
                .env("BAZAAR_MESH_CERT", mesh_dir.join("payment-sim.crt"))
                .env("BAZAAR_MESH_KEY", mesh_dir.join("payment-sim.key"))
                .env("BAZAAR_MESH_BUNDLE", mesh_dir.join("bundle.pem"))
                .env("BAZAAR_MESH_POLICY", mesh_dir.join("policy.yaml"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the simulator"),
        )
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The local addresses listening on `port`, from /proc/net/tcp (IPv4).
fn listening_on(port: u16) -> Vec<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let (ip, p) = local.split_once(':')?;
            let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
            (state == "0A" && u16::from_str_radix(p, 16).ok()? == port).then_some(ip)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_open_to_the_world_keeps_its_admin_api_on_loopback() {
    let base = harness::free_base_port().expect("free ports");
    let data = tempfile::tempdir().expect("tempdir");
    let _gateway = Simulator(
        Command::new(BIN)
            .args(["serve", "gateway"])
            .env("BAZAAR_BASE_PORT", base.to_string())
            .env("BAZAAR_LISTEN", format!("0.0.0.0:{base}"))
            .env("BAZAAR_DATA", data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let admin = base + roles::GATEWAY_ADMIN_OFFSET;
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("http://127.0.0.1:{admin}/health")).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway's admin API never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        listening_on(base),
        [std::net::Ipv4Addr::UNSPECIFIED],
        "the proxy listens everywhere"
    );
    assert_eq!(
        listening_on(admin),
        [std::net::Ipv4Addr::LOCALHOST],
        "the admin API on loopback only"
    );
}

/// The payment simulator takes an edited mesh policy without a restart, as every role does:
/// a tool it served is refused once the policy no longer lists tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payment_simulator_applies_an_edited_mesh_policy_without_a_restart() {
    let base = harness::free_base_port().expect("free ports");
    let sys = System::start_with(Some(base), None, &[]).await;
    let _sim = Simulator::beside(&sys, base);
    let stats = sys.service_url("payment-sim", "/_stats");
    let client = sys.mesh_client("e2e");
    let status = || async { client.get(&stats).send().await.map(|r| r.status().as_u16()).ok() };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status().await != Some(200) {
        assert!(Instant::now() < deadline, "the simulator never served the tool");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let path = sys.data_dir().join("mesh").join("policy.yaml");
    let mut policy: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("the policy")).expect("YAML");
    policy["roles"]["payment-sim"] =
        serde_yaml::from_str(r#"[{from: ["spiffe://bazaar/role/payments"], routes: ["*"]}]"#).expect("a rule");
    std::fs::write(&path, serde_yaml::to_string(&policy).expect("YAML")).expect("write the policy");
    let edited = Instant::now();
    while status().await != Some(403) {
        assert!(
            edited.elapsed() < 3 * bazaar_kit::runtime::MESH_RELOAD_PERIOD,
            "the simulator still serves a caller the edited policy no longer lists"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_wait_out_a_payment_provider_outage_and_then_complete() {
    let base = harness::free_base_port().expect("free ports");
    let port = base + port_offset("payment-sim");
    // Payments calls the simulator over the mesh, with its own certificate.
    let provider_url = format!("https://payment-sim:{port}");
    let sys = System::start_with(Some(base), None, &[("BAZAAR_PAYMENT_PROVIDER_URL", &provider_url)]).await;
    let sim = Simulator::beside(&sys, base);
    let sim_url = sys.service_url("payment-sim", "");
    let client = sys.mesh_client("e2e");
    let control = |body: Value| {
        let client = client.clone();
        let url = format!("{sim_url}/_control");
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => return,
                    _ => {
                        assert!(Instant::now() < deadline, "the simulator does not answer");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    control(json!({"outage": true})).await;
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/_stats")).await.is_err(),
        "the simulator answered plain HTTP"
    );
    let admin = sys.admin().await;
    let dee = sys.customer("dee@example.com").await;
    let kettle = sys.product(&admin, "KETTLE", 3_000, 5).await;

    let id = sys.order(&dee, &kettle, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, v) = sys
        .call(reqwest::Method::GET, &format!("/orders/{id}"), Some(&dee), None)
        .await;
    assert_eq!(
        v["status"], "pending",
        "the order waits while the provider is down: {v}"
    );
    let health: Value = sys
        .client
        .get(format!(
            "http://127.0.0.1:{}/health",
            base + port_offset("payments") + roles::ADMIN_PORT_OFFSET
        ))
        .send()
        .await
        .expect("payments health")
        .json::<Value>()
        .await
        .expect("json");
    assert!(
        health["checks"].get("provider").is_some(),
        "payments reports the provider in /health: {health}"
    );

    control(json!({"outage": false})).await;
    let v = sys.settled(&dee, &id).await;
    assert_eq!(v["status"], "confirmed", "{v}");
    let stats: Value = client
        .get(format!("{sim_url}/_stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        stats["charges"], 1,
        "one charge for one order, whatever the retries: {stats}"
    );
    let (ok, report) = sys.audit().await;
    assert!(ok, "audit failed:\n{report}\n{}", sys.log());
    drop(sim);
}

#[test]
fn replicas_of_a_service_on_its_sqlite_store_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refusal = up_refusal(&dir.path().join("data"), &["--replicas", "orders=2"]);
    assert!(
        refusal.contains("orders cannot run 2 replicas on its SQLite store"),
        "{refusal}"
    );
}

/// `bazaar up ARGS` on `data` with free ports and embedded defaults, expected to refuse
/// before starting anything: its one line of error.
fn up_refusal(data: &std::path::Path, args: &[&str]) -> String {
    let mut up = Command::new(BIN);
    up.args(["up", "--quiet"])
        .args(args)
        .env("BAZAAR_DATA", data)
        .env(
            "BAZAAR_BASE_PORT",
            harness::free_base_port().expect("ports").to_string(),
        )
        .env_remove("BAZAAR_BROKER_URL");
    for (_, spec) in roles::services() {
        up.env_remove(bazaar::settings::store_url_var(spec.name));
    }
    let out = up.output().expect("run up");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "up started anyway: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!data.join("run").exists(), "nothing was started: {stderr}");
    stderr
}

#[tokio::test]
async fn data_another_version_wrote_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let orders = format!("sqlite://{}", data.join("orders.db").display());
    let store = bazaar_kit::store::Store::open(&orders).await.expect("open");
    let future = bazaar_kit::store::Migration::new(999, "from_the_future", "CREATE TABLE later (id INTEGER)");
    store.migrate(&[future]).await.expect("a newer version's migration");
    store.close().await;

    let refusal = up_refusal(&data, &[]);
    assert!(
        refusal.contains("orders.db") && refusal.contains("migration 999 (from_the_future)") && refusal.contains("mv "),
        "{refusal}"
    );
}

/// A directory made read-only for a test, writable again when dropped (even when the test
/// fails): permission bits for a user, the immutable attribute for root, whom bits do not stop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    /// `None` where root cannot make it immutable (no chattr, or no such capability).
    fn make(dir: &std::path::Path) -> Option<ReadOnly> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        let guard = ReadOnly(dir.to_path_buf());
        // SAFETY: geteuid only reads this process's effective user id.
        if unsafe { libc::geteuid() } == 0 {
            let made = Command::new("chattr").arg("+i").arg(dir).status();
            if !made.is_ok_and(|status| status.success()) {
                return None;
            }
        }
        Some(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700));
    }
}

#[test]
fn an_unwritable_data_directory_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let refusal = {
        let Some(_read_only) = ReadOnly::make(&data) else {
            eprintln!("SKIPPED: root cannot make a directory read-only here (chattr +i failed)");
            return;
        };
        up_refusal(&data, &[])
    };
    assert!(
        refusal.contains("is not writable") && refusal.contains("--data"),
        "{refusal}"
    );
}

/// The sum of `metric`'s samples whose labels contain every one of `labels`.
fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_every_service_share_the_requests_and_the_events() {
    let Some([_, nats]) = servers::urls([Server::Postgres, Server::Nats], "replicas") else {
        return;
    };
    let Some((mut env, dbs)) = postgres_and_nats("replicas", &nats).await else {
        return;
    };
    env.push((CREDIT.0.into(), "1000000".into()));
    {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sys = System::start_with(None, Some("2"), &env).await;
        let admin = sys.admin().await;
        let tea = sys.product(&admin, "TEA", 300, 10_000).await;
        let mut customers = Vec::new();
        // Registrations are users.events for payments and notifications: enough of them that
        // both instances of each get some.
        for i in 0..8 {
            customers.push(sys.customer(&format!("rep{i}@example.com")).await);
        }
        let orders: Vec<(usize, String)> = futures_util::future::join_all((0..40).map(|n| {
            let (sys, customers, tea) = (&sys, &customers, &tea);
            async move { (n % 8, sys.order(&customers[n % 8], tea, 1).await) }
        }))
        .await;
        for (who, id) in &orders {
            assert_eq!(sys.settled(&customers[*who], id).await["status"], "confirmed");
        }
        for token in &customers {
            sys.call(reqwest::Method::GET, "/notifications", Some(token), None)
                .await;
            sys.call(reqwest::Method::GET, "/products", None, None).await;
        }
        sys.assert_audit_clean().await;

        for (role, k) in sys.up.instances() {
            let Some(spec) = role.service() else { continue };
            let url = format!("http://127.0.0.1:{}/metrics", sys.up.instance_port(role, k));
            let text = sys
                .client
                .get(&url)
                .send()
                .await
                .expect("scrape")
                .text()
                .await
                .expect("text");
            let api: f64 = spec
                .routes
                .iter()
                .map(|r| {
                    metric_sum(
                        &text,
                        "bazaar_http_requests_total",
                        &[&format!("route=\"/{}", r.resource)],
                    )
                })
                .sum();
            assert!(api > 0.0, "{} instance {k} served no API request", spec.name);
            for topic in spec.consumes {
                let handled = metric_sum(&text, "bazaar_consumer_handled_total", &[&format!("topic=\"{topic}\"")]);
                assert!(handled > 0.0, "{} instance {k} handled no event of {topic}", spec.name);
            }
        }
    }
    for db in dbs {
        db.drop_database().await;
    }
}

/// A cluster a test provisions with `bazaar up --cluster` on the tests' PostgreSQL and
/// Redis, its databases and roles prefixed with a name of its own.
struct Cluster {
    admin: String,
    redis: String,
    name: String,
}

impl Cluster {
    /// A cluster named `<prefix><uuid>`, or `None` (after saying that `what` is skipped)
    /// when the tests have no PostgreSQL server.
    fn on_test_servers(prefix: &str, what: &str) -> Option<Cluster> {
        let [admin, redis] = servers::urls([Server::Postgres, Server::Redis], what)?;
        Some(Cluster {
            admin,
            redis,
            name: format!("{prefix}{}", uuid::Uuid::now_v7().simple()),
        })
    }

    /// Starts it with `extra` settings.
    async fn start(&self, extra: &[(&str, &str)]) -> System {
        let servers = [
            ("BAZAAR_CLUSTER_POSTGRES_URL", self.admin.as_str()),
            ("BAZAAR_CLUSTER_REDIS_URL", self.redis.as_str()),
        ];
        let env: Vec<(&str, &str)> = servers.iter().chain(extra).copied().collect();
        System::start_options(None, None, Some(&self.name), &[], &env).await
    }

    /// Drops its databases and roles.
    async fn drop_databases(&self) {
        harness::drop_cluster_databases(&self.admin, &self.name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_form_runs_replicas_on_jetstream_nodes_and_a_database_per_service() {
    let Some(cluster) = Cluster::on_test_servers("e2e", "cluster form") else {
        return;
    };
    let name = &cluster.name;
    let result = {
        let sys = cluster.start(&[CREDIT]).await;
        let env = std::fs::read_to_string(sys.data_dir().join("cluster.env")).expect("cluster.env");
        let shop = shop(&sys).await;
        confirmed_order(&sys, &shop).await;
        compensated_order(&sys, &shop).await;
        let report = sys.assert_audit_clean().await;
        the_broker_refuses_a_forged_command(&sys).await;
        orders_cannot_open_the_inventory_database(&env).await;
        (env, report, sys.up.log())
    };
    cluster.drop_databases().await;
    let (env, report, log) = result;
    assert!(
        env.contains("?replicas=3"),
        "streams are replicated on the three nodes:\n{env}"
    );
    for (_, spec) in roles::services() {
        assert!(
            env.contains(&format!(
                "{}=postgres://{name}_{}:",
                bazaar::settings::store_url_var(spec.name),
                spec.name
            )),
            "{} logs in as its own role:\n{env}",
            spec.name
        );
    }
    assert!(report.contains("invariant 6"), "{report}");
    for node in ["nats-0", "nats-1", "nats-2", "gateway", "gateway-1"] {
        assert!(log.contains(&format!("{node:>15} |")), "{node} never logged:\n{log}");
    }
}

/// The broker URL a cluster's `cluster.env` gives operators (the operator's login).
fn cluster_broker_url(sys: &System) -> String {
    let env = std::fs::read_to_string(sys.data_dir().join("cluster.env")).expect("cluster.env");
    env.lines()
        .find_map(|l| l.strip_prefix("BAZAAR_BROKER_URL="))
        .expect("broker url")
        .to_string()
}

/// Logged in with notifications' own NATS user, a client may use JetStream but cannot put a
/// command on inventory's subject (a forged reservation or release).
async fn the_broker_refuses_a_forged_command(sys: &System) {
    let password = std::fs::read_to_string(sys.data_dir().join("nats/notifications.password")).expect("a password");
    let port = sys.base() + roles::NATS_CLIENT_OFFSETS[0];
    let client = async_nats::ConnectOptions::new()
        .user_and_password("notifications".into(), password.trim().into())
        .custom_inbox_prefix(bazaar_kit::broker::nats::inbox_prefix("notifications"))
        .connect(format!("127.0.0.1:{port}"))
        .await
        .expect("notifications logs in");
    let js = async_nats::jetstream::new(client.clone());
    let info = client
        .request("$JS.API.INFO", Vec::new().into())
        .await
        .expect("notifications may use JetStream");
    let info = String::from_utf8_lossy(&info.payload).to_string();
    assert!(
        info.contains("account_info_response") && !info.contains("\"error\""),
        "{info}"
    );
    let forged = json!({"orderId": uuid::Uuid::now_v7(), "sagaId": "x", "step": "reserveInventory"});
    let published = tokio::time::timeout(Duration::from_secs(10), async {
        js.publish("inventory.commands", forged.to_string().into()).await?.await
    })
    .await;
    assert!(
        !matches!(published, Ok(Ok(_))),
        "JetStream stored a command notifications published on inventory.commands"
    );
    // Nor can it shape a stream (say, one that captures payments' commands).
    let create = format!(
        "$JS.API.STREAM.CREATE.{}",
        bazaar_kit::broker::nats::stream_name("payments.commands")
    );
    let spec =
        json!({"name": bazaar_kit::broker::nats::stream_name("payments.commands"), "subjects": ["payments.commands"]});
    let created = tokio::time::timeout(Duration::from_secs(5), client.request(create, spec.to_string().into())).await;
    assert!(!matches!(created, Ok(Ok(_))), "notifications may create streams");
    // And a stranger gets nowhere.
    let stranger = async_nats::ConnectOptions::new()
        .user_and_password("notifications".into(), "not-the-password".into())
        .connect(format!("127.0.0.1:{port}"))
        .await;
    assert!(stranger.is_err(), "a wrong password was let in");
}

/// With orders' own PostgreSQL login, the inventory database is closed.
async fn orders_cannot_open_the_inventory_database(env: &str) {
    let url = |service: &str| {
        let var = format!("{}=", bazaar::settings::store_url_var(service));
        env.lines()
            .find_map(|l| l.strip_prefix(&var))
            .expect("a store URL")
            .to_string()
    };
    let (orders, inventory) = (url("orders"), url("inventory"));
    let inventory_db = inventory.rsplit('/').next().unwrap().split('?').next().unwrap();
    let (orders_server, _) = orders.rsplit_once('/').unwrap();
    let refused = bazaar_kit::store::Store::open(&format!("{orders_server}/{inventory_db}")).await;
    let why = match refused {
        Ok(_) => panic!("orders opened inventory's database"),
        Err(e) => e.to_string(),
    };
    assert!(why.contains("permission denied"), "{why}");
}

/// Runs `bazaar rollout` (every role) while a strict client (no retries) browses and places
/// orders as Ann; returns what rollout printed, the failed requests, and the orders placed.
async fn roll_under_strict_load(sys: &System, shop: &Shop) -> (std::process::Output, Vec<String>, Vec<String>) {
    under_strict_load(sys, shop, async {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.arg("rollout").env("BAZAAR_DATA", sys.data_dir());
        cmd.output().await.expect("run rollout")
    })
    .await
}

/// Workers of [`under_strict_load`]; those from [`FRESH_WORKERS`] on open a new connection for
/// every request, as curl or Python's urllib do.
const LOAD_WORKERS: usize = 5;
/// See [`LOAD_WORKERS`].
const FRESH_WORKERS: usize = 3;

/// Clients of [`under_strict_load`] that wait between connecting and sending.
const DAWDLERS: usize = 3;

/// The pause after each request of `clients` looping test clients: all of them, from one
/// address, stay at half the gateway's per-client minute limit however long a drill takes,
/// so that the limiter's 429 never passes for a fault of the drill.
fn pace(clients: usize) -> Duration {
    let (_, per_minute) = bazaar_gateway::CLIENT_LIMITS;
    let per_second = f64::from(per_minute) / 60.0 / 2.0;
    Duration::from_secs_f64(clients as f64 / per_second)
}

/// `GET path` from the gateway on a new connection, sent 50 ms after connecting; an error
/// unless answered 200.
async fn dawdling_get(port: u16, path: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n");
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer in 10 s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&answer[..answer.len().min(40)]).to_string();
    if head.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("answered {head:?} ({} bytes)", answer.len()))
    }
}

/// Runs `during` while strict clients (no retries) browse and place orders as Ann, some on
/// kept-alive connections and some on a new connection per request; returns what `during`
/// gave, the failed requests, and the orders placed.
async fn under_strict_load<T>(
    sys: &System,
    shop: &Shop,
    during: impl std::future::Future<Output = T>,
) -> (T, Vec<String>, Vec<String>) {
    let rolling = std::sync::atomic::AtomicBool::new(true);
    let failures = std::sync::Mutex::new(Vec::new());
    let placed = std::sync::Mutex::new(Vec::new());
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let load = |worker: usize| {
        let (rolling, failures, placed) = (&rolling, &failures, &placed);
        let client = if worker >= FRESH_WORKERS { &fresh } else { &sys.client };
        async move {
            let mut n = 0;
            while rolling.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                // Orders are bounded (the rollout may take a while on a loaded machine);
                // browsing goes on to the end.
                let result = if worker == 0 || n > 150 {
                    client.get(sys.api("/products")).send().await
                } else {
                    client
                        .post(sys.api("/orders"))
                        .bearer_auth(&shop.ann)
                        .header("idempotency-key", format!("roll-{}-{worker}-{n}", uuid::Uuid::now_v7()))
                        .json(&json!({"items": [{"productId": shop.mug, "quantity": 1}]}))
                        .send()
                        .await
                };
                match result {
                    Ok(r) if r.status().is_success() => {
                        if worker != 0 && n <= 150 {
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            if let Some(id) = body["id"].as_str() {
                                placed.lock().expect("lock").push(id.to_string());
                            }
                        }
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failures.lock().expect("lock").push(format!("{status} {body}"));
                    }
                    Err(e) => failures.lock().expect("lock").push(format!("worker {worker}: {e:?}")),
                }
                tokio::time::sleep(pace(LOAD_WORKERS + DAWDLERS)).await;
            }
        }
    };
    // Clients slow to send once connected (Python's http.client builds its request after
    // connecting): a stop that lands between their connect and their request must still
    // answer it.
    let dawdle = |_: usize| {
        let (rolling, failures) = (&rolling, &failures);
        async move {
            while rolling.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = dawdling_get(sys.base(), "/api/v1/products").await {
                    failures.lock().expect("lock").push(format!("dawdler: {e}"));
                }
                tokio::time::sleep(pace(LOAD_WORKERS + DAWDLERS)).await;
            }
        }
    };
    let roll = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = during.await;
        rolling.store(false, std::sync::atomic::Ordering::SeqCst);
        out
    };
    let clients = futures_util::future::join(
        futures_util::future::join_all((0..LOAD_WORKERS).map(load)),
        futures_util::future::join_all((0..DAWDLERS).map(dawdle)),
    );
    let (_, out) = tokio::join!(clients, roll);
    (
        out,
        failures.into_inner().expect("lock"),
        placed.into_inner().expect("lock"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_mesh_ca_under_load_fails_no_request_and_loses_no_order() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    // Services that loaded certificates after up renewed them from the new CA.
    let loaded_after_renewal = |log: &str| {
        log.find("mesh certificates renewed")
            .map_or(0, |at| log[at..].matches("renewed certificate loaded").count())
    };
    let (rotated, failures, placed) = under_strict_load(&sys, &shop, async {
        let out = tokio::process::Command::new(BIN)
            .args(["mesh", "rotate"])
            .env("BAZAAR_DATA", sys.data_dir())
            .output()
            .await
            .expect("run bazaar mesh rotate");
        // Peers first trust the new CA, then up issues every certificate from it and each
        // service loads its own; the load goes on a little past that.
        let deadline = Instant::now() + Duration::from_secs(90);
        while loaded_after_renewal(&sys.up.log()) < roles::services().count() {
            assert!(
                Instant::now() < deadline,
                "the renewed certificates were not loaded:\n{}",
                sys.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        out
    })
    .await;
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(failures.is_empty(), "requests failed during the rotation: {failures:?}");
    assert!(!placed.is_empty(), "orders were placed during the rotation");
    let shown = std::process::Command::new(BIN)
        .args(["mesh", "show"])
        .env("BAZAAR_DATA", sys.data_dir())
        .output()
        .expect("bazaar mesh show");
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert_eq!(shown.matches("trusted:").count(), 2, "old and new CA trusted:\n{shown}");
    for id in &placed {
        sys.settled(&shop.ann, id).await;
    }
    sys.assert_audit_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_every_role_under_load_fails_no_request_and_loses_no_order() {
    let sys = System::start(&[CREDIT]).await;
    let shop = shop(&sys).await;
    let (out, failures, placed) = roll_under_strict_load(&sys, &shop).await;
    let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rollout failed:\n{printed}\n{}", sys.log());
    for role in roles::up_roles() {
        assert!(printed.contains(&format!("{}: replaced", role.name)), "{printed}");
    }
    assert!(
        failures.is_empty(),
        "{} requests failed during the rollout: {failures:?}",
        failures.len()
    );
    for id in &placed {
        let v = sys.settled(&shop.ann, id).await;
        assert!(v["status"] == "confirmed" || v["status"] == "cancelled", "{v}");
    }
    sys.assert_audit_clean().await;
}

/// The cluster drill: the distributed form under closed-loop orders loses the JetStream node
/// leading the saga replies and one replica of every service, then rolls every role; every
/// order settles, the audit holds, and no client request failed during the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_a_lost_jetstream_leader_killed_replicas_and_a_rollout() {
    let Some(cluster) = Cluster::on_test_servers("drill", "cluster drill") else {
        return;
    };
    let outcome = async {
        let mut sys = cluster.start(&[("BAZAAR_WELCOME_CREDIT_CENTS", "1000000")]).await;
        let admin_token = sys.admin().await;
        let ann = sys.customer("ann@example.com").await;
        let tea = sys.product(&admin_token, "TEA", 300, 100_000).await;
        let shop = Shop {
            admin: admin_token,
            ann: ann.clone(),
            mug: tea.clone(),
            piano: tea.clone(),
        };

        // Closed-loop orders (a careful client: keyed retries) while the faults land.
        const CLIENTS: usize = 3;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let placed = std::sync::Mutex::new(Vec::new());
        let client = |_: usize| {
            let (sys, stop, placed, ann, tea) = (&sys, &stop, &placed, &ann, &tea);
            async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let id = sys.order(ann, tea, 1).await;
                    placed.lock().expect("lock").push(id);
                    tokio::time::sleep(pace(CLIENTS)).await;
                }
            }
        };
        let faults = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let url: bazaar_kit::broker::nats::NatsUrl =
                cluster_broker_url(&sys).parse().expect("the cluster's broker URL");
            let seeds: Vec<async_nats::ServerAddr> = url.seeds.iter().map(|s| s.parse().expect("seed")).collect();
            // The operator's login, as cluster.env gives it.
            let (user, password) = (
                seeds[0].username().expect("a user"),
                seeds[0].password().unwrap_or_default(),
            );
            let client = async_nats::ConnectOptions::new()
                .user_and_password(user.into(), password.into())
                .connect(seeds.clone())
                .await
                .expect("nats");
            let js = async_nats::jetstream::new(client);
            let stream = bazaar_kit::broker::nats::stream_name("orders.saga-replies");
            let info = js
                .get_stream(&stream)
                .await
                .expect("stream")
                .info()
                .await
                .expect("info")
                .clone();
            let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
            let node = leader.rsplit('-').next().expect("node index");
            assert!(
                sys.kill9(&format!("nats-{node}")),
                "killed the JetStream leader {leader}"
            );
            for (_, spec) in roles::services() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert!(sys.kill9(&format!("{}-1", spec.name)), "killed {}-1", spec.name);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            leader
        };
        let (_, leader) = tokio::join!(futures_util::future::join_all((0..CLIENTS).map(client)), faults);
        if let Err(e) = sys.up.wait_healthy().await {
            panic!("{e:#}\n{}", sys.log());
        }

        let (out, failures, during_rollout) = roll_under_strict_load(&sys, &shop).await;
        let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rollout failed:\n{printed}\n{}", sys.log());
        assert!(failures.is_empty(), "requests failed during the rollout: {failures:?}");

        let placed: Vec<String> = placed
            .into_inner()
            .expect("lock")
            .into_iter()
            .chain(during_rollout)
            .collect();
        // Under faults a step may time out and compensate: a cancelled order is an outcome
        // too, as long as the audit finds nothing lost or doubled.
        let mut confirmed = 0;
        for id in &placed {
            let v = sys.settled(&ann, id).await;
            assert!(v["status"] == "confirmed" || v["status"] == "cancelled", "{v}");
            confirmed += usize::from(v["status"] == "confirmed");
        }
        assert!(confirmed > 0, "no order got through the drill");
        let report = sys.assert_audit_clean().await;
        (
            leader,
            format!("{confirmed} of {} orders confirmed", placed.len()),
            report,
        )
    }
    .await;
    cluster.drop_databases().await;
    let (leader, orders, report) = outcome;
    eprintln!("drill: lost JetStream leader {leader}; {orders}\n{report}");
}

/// Customers ordering one unit at a time, each waiting for its last order's answer, until
/// `stop`; every order placed, as (customer, order id). Customer `c`'s `n`th order is of
/// product `(c + n) % products`, so that concurrent orders meet on the same rows.
async fn closed_loop(
    sys: &System,
    customers: &[String],
    products: &[String],
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(usize, String)> {
    let placed = std::sync::Mutex::new(Vec::new());
    let client = |worker: usize| {
        let placed = &placed;
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let id = sys
                    .order(&customers[worker], &products[(worker + n) % products.len()], 1)
                    .await;
                placed.lock().expect("lock").push((worker, id));
                tokio::time::sleep(pace(customers.len())).await;
            }
        }
    };
    futures_util::future::join_all((0..customers.len()).map(client)).await;
    placed.into_inner().expect("lock")
}

/// Waits until every order of `placed` is confirmed or cancelled, then audits; a line
/// counting them, and the audit's report.
async fn settled_and_audited(
    sys: &System,
    customers: &[String],
    placed: &[(usize, String)],
    note: &str,
) -> (String, String) {
    let mut confirmed = 0;
    for (customer, id) in placed {
        let v = sys.settled(&customers[*customer], id).await;
        assert!(v["status"] == "confirmed" || v["status"] == "cancelled", "{note}: {v}");
        confirmed += usize::from(v["status"] == "confirmed");
    }
    assert!(confirmed > 0, "{note}: no order got through the drill");
    let report = sys.assert_audit_clean().await;
    (format!("{confirmed} of {} orders confirmed", placed.len()), report)
}

/// A drill's system: `cluster` started with wallets deep enough for the whole drill and
/// saga steps that wait `step_timeout_ms` for a reply.
async fn drill_system(cluster: &Cluster, step_timeout_ms: &str) -> System {
    cluster
        .start(&[
            ("BAZAAR_WELCOME_CREDIT_CENTS", "1000000"),
            ("BAZAAR_SAGA_STEP_TIMEOUT_MS", step_timeout_ms),
        ])
        .await
}

/// A drill's shop: two products of `units` each, and a customer per name.
async fn drill_shop(sys: &System, units: i64, names: &[&str]) -> (Vec<String>, Vec<String>) {
    let admin_token = sys.admin().await;
    let mut products = Vec::new();
    for sku in ["TEA", "MUG"] {
        products.push(sys.product(&admin_token, sku, 300, units).await);
    }
    let mut customers = Vec::new();
    for who in names {
        customers.push(sys.customer(&format!("{who}@example.com")).await);
    }
    (products, customers)
}

/// Pauses of replicas that a participant handles under: how many, and how long each.
const PAUSES: usize = 40;

/// The pause drill: the distributed form with 200 ms step timeouts (so the saga resends each
/// command while the first copy may still be in hand, and the copies reach both replicas and
/// both consumer tasks of a participant at once), under closed-loop orders from four
/// customers, while replicas of inventory and payments are paused (SIGSTOP) for 0.2–0.8 s
/// and resumed, again and again: what a GC pause, a slow disk or a noisy neighbour looks
/// like. Every order settles and the audit finds nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_loses_and_doubles_nothing_while_participants_pause_under_resends() {
    let Some(cluster) = Cluster::on_test_servers("pause", "pause drill") else {
        return;
    };
    let seed = rand_seed();
    let outcome = async {
        let sys = drill_system(&cluster, "200").await;
        // Few units of few products, so that concurrent orders meet on the same rows.
        let (products, customers) = drill_shop(&sys, 400, &["ann", "bob", "cem", "dee"]).await;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let pauses = async {
            let mut rng = seed;
            let mut next = move |n: u64| {
                // xorshift: a fixed schedule per seed, printed on failure.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut paused = 0;
            for _ in 0..PAUSES {
                let role = ["inventory", "payments"][next(2) as usize];
                // Instance 0 is named for its role, instance 1 `<role>-1`.
                let target = match next(2) {
                    0 => role.to_string(),
                    _ => format!("{role}-1"),
                };
                if sys.up.signal(&target, "STOP") {
                    paused += 1;
                    tokio::time::sleep(Duration::from_millis(200 + next(600))).await;
                    sys.up.signal(&target, "CONT");
                }
                tokio::time::sleep(Duration::from_millis(50 + next(200))).await;
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            paused
        };
        let (placed, paused) = tokio::join!(closed_loop(&sys, &customers, &products, &stop), pauses);
        assert!(
            paused > PAUSES / 2,
            "seed {seed}: only {paused} of {PAUSES} pauses landed"
        );
        let (orders, report) = settled_and_audited(&sys, &customers, &placed, &format!("seed {seed}")).await;
        (format!("{paused} pauses; {orders}"), report)
    }
    .await;
    cluster.drop_databases().await;
    let (summary, report) = outcome;
    eprintln!("pause drill (seed {seed}): {summary}\n{report}");
}

/// How long the partition drill keeps each replica cut off: well past the 5 s a session may
/// sit idle in a transaction, so rows the replica had locked when the link went must be let
/// go of, and the backlog behind them handled, for an order placed meanwhile to settle
/// before the link is mended.
const CUT: Duration = Duration::from_secs(20);

/// The servers a replica needs, as `host:port`: the cluster's PostgreSQL and its NATS nodes.
fn cluster_servers(sys: &System, cluster: &Cluster) -> Vec<String> {
    let address = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
        rest.split(['/', '?', ',']).next().unwrap_or(rest).to_string()
    };
    let mut servers = vec![address(&cluster.admin)];
    let url: bazaar_kit::broker::nats::NatsUrl = cluster_broker_url(sys).parse().expect("the cluster's broker URL");
    servers.extend(url.seeds.iter().map(|seed| address(seed)));
    servers
}

/// The environment `up` gave `role`'s instance 1, for a third instance inside `host`: its
/// own instance number, listening sockets of its own, and its store and the broker reached
/// through the link.
fn third_instance_env(sys: &System, role: &str, host: &netns::Host) -> Vec<(String, String)> {
    let pid = sys.up.pid(&format!("{role}-1")).expect("instance 1 is running");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("its environment");
    let mut env: Vec<(String, String)> = environ
        .split(|b| *b == 0)
        .filter_map(|pair| {
            String::from_utf8_lossy(pair)
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .filter(|(k, _)| !k.ends_with("LISTEN_FD") && k != "BAZAAR_INSTANCE")
        .map(
            |(k, v)| match k == bazaar::settings::store_url_var(role) || k == "BAZAAR_BROKER_URL" {
                true => (k, host.rewrite(&v)),
                false => (k, v),
            },
        )
        .collect();
    env.push(("BAZAAR_INSTANCE".into(), "2".into()));
    env
}

/// Waits until the file `log` has a line containing `what`; false after `within`.
async fn log_shows(log: &Path, what: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|text| text.contains(what)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// How long after the link to a third replica of `role` was cut an order placed then took
/// to settle, while the replica worked under `sys`'s load.
async fn cut_off_in_turn(sys: &System, role: &str, host: &mut netns::Host, probe: (&str, &str)) -> Duration {
    let log = sys.data_dir().join(format!("{role}-cut.log"));
    host.spawn(BIN, &["serve", role], &third_instance_env(sys, role, host), &log);
    assert!(
        log_shows(&log, "listening", Duration::from_secs(60)).await,
        "{role}'s third replica never started:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    host.cut();
    let cut_at = Instant::now();
    let (customer, product) = probe;
    let order = sys.order(customer, product, 1).await;
    let settled = sys
        .settled_within(customer, &order, CUT.saturating_sub(cut_at.elapsed()))
        .await
        .map(|_| cut_at.elapsed());
    tokio::time::sleep(CUT.saturating_sub(cut_at.elapsed())).await;
    host.mend();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = host.stop(Duration::from_secs(30)).await;
    let settled = settled.unwrap_or_else(|order| {
        panic!(
            "an order placed while a replica of {role} was cut off did not settle within {CUT:?}: {order:#}\n{}",
            sys.log()
        )
    });
    assert!(
        stopped,
        "{role}'s third replica did not stop cleanly after the link came back:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    settled
}

/// The partition drill: the distributed form under closed-loop orders, with a third replica
/// of orders, then inventory, then payments, each on a host of its own (a network namespace
/// joined by a veth pair) whose link is cut for [`CUT`] while it works, then mended. While a
/// replica is cut off, an order placed meanwhile still settles; afterwards every order has
/// settled and the audit finds nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_loses_and_doubles_nothing_while_a_replica_is_cut_off_from_postgres_and_nats() {
    let Some(cluster) = Cluster::on_test_servers("cut", "partition drill") else {
        return;
    };
    if let Err(why) = netns::available() {
        eprintln!("SKIPPED partition drill: no network namespace here ({why})");
        return;
    }
    let outcome = async {
        // Steps long enough to outlast the stall behind a cut-off replica's locks (5 s)
        // rather than give up and compensate.
        let sys = drill_system(&cluster, "3000").await;
        let (products, customers) = drill_shop(&sys, 5_000, &["ann", "bob", "cem"]).await;
        let probe = sys.customer("pat@example.com").await;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let drill = async {
            let servers = cluster_servers(&sys, &cluster);
            let mut cuts = Vec::new();
            for (index, role) in ["orders", "inventory", "payments"].into_iter().enumerate() {
                let mut host = netns::Host::new(index as u8, &servers)
                    .await
                    .unwrap_or_else(|why| panic!("a host for {role}: {why}"));
                let settled = cut_off_in_turn(&sys, role, &mut host, (&probe, &products[0])).await;
                cuts.push(format!("{role}: an order placed during the cut settled in {settled:?}"));
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            cuts
        };
        let (placed, cuts) = tokio::join!(closed_loop(&sys, &customers, &products, &stop), drill);
        let (orders, report) = settled_and_audited(&sys, &customers, &placed, "partition drill").await;
        (format!("{}; {orders}", cuts.join("; ")), report)
    }
    .await;
    cluster.drop_databases().await;
    let (summary, report) = outcome;
    eprintln!("partition drill: {summary}\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_replacement_cannot_start_stops_and_leaves_the_old_one_serving() {
    let sys = System::start(&[]).await;
    // A bad config edit: the running gateway keeps its last good config, a new one refuses it.
    std::fs::write(
        sys.data_dir().join("kong.yml"),
        "_format_version: \"3.0\"\nservices:\n  - name: broken\n",
    )
    .expect("write config");
    let out = tokio::process::Command::new(BIN)
        .args(["rollout", "gateway"])
        .env("BAZAAR_DATA", sys.data_dir())
        .output()
        .await
        .expect("run rollout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the rollout claimed success:\n{stderr}");
    assert!(
        stderr.contains("the replacement for gateway") && stderr.contains("the old one keeps serving"),
        "{stderr}"
    );
    let (status, _) = sys.call(reqwest::Method::GET, "/products", None, None).await;
    assert_eq!(status, 200, "the old gateway still serves");
}
