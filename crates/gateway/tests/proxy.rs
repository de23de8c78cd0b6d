//! End-to-end tests: real upstream HTTP servers and a real gateway on 127.0.0.1:0, checked
//! from the client's side (statuses, headers and bodies).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bazaar_testkit::{servers, Server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// An upstream that answers every request with a JSON echo of what it received.
/// Paths containing `/slow` answer after two seconds; dropping it closes every connection.
struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(name: &'static str) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    async fn start_on(addr: SocketAddr, name: &'static str) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Connections live in this set so aborting the server also cuts kept-alive ones.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(async move {
                    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        if parts.uri.path().contains("/slow") {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let headers: BTreeMap<String, String> = parts
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let echo = json!({
                            "upstream": name,
                            "method": parts.method.as_str(),
                            "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                            "headers": headers,
                            "body_len": body.len(),
                        });
                        let mut response = hyper::Response::new(Full::new(Bytes::from(echo.to_string())));
                        response
                            .headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        response
                            .headers_mut()
                            .insert("connection", "keep-alive".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway serving a config written to a temp file.
struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), bazaar_gateway::GatewayError>>>,
}

impl Gateway {
    async fn start(config: &str) -> Gateway {
        Gateway::start_with(config, bazaar_gateway::Edge::default()).await
    }

    /// A gateway that believes `X-Forwarded-For` from `trusted` proxies.
    async fn start_trusting(config: &str, trusted: bazaar_gateway::TrustedProxies) -> Gateway {
        let edge = bazaar_gateway::Edge {
            trusted,
            ..Default::default()
        };
        Gateway::start_with(config, edge).await
    }

    /// A gateway with `edge`'s trusted proxies and documents.
    async fn start_with(config: &str, edge: bazaar_gateway::Edge) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, config).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let render = Arc::new(|| "# TYPE test_metric counter\ntest_metric 1\n".to_string());
        let task = tokio::spawn(bazaar_gateway::serve_draining(
            config_path.clone(),
            proxy,
            admin,
            render,
            async {
                let _ = stopped.await;
            },
            Duration::ZERO,
            edge,
            2,
        ));
        Gateway {
            addr,
            admin: admin_addr,
            config_path,
            _dir: dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn body_json(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(secret: &str, claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn routes_strip_paths_and_set_forwarding_headers() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}/orders
    routes:
      - name: orders
        paths: [/api/v1/orders]
      - name: raw
        paths: [/raw]
        strip_path: false
      - name: by-regex
        paths: ["~/v(\\d+)/items"]
"#,
        addr = up.addr
    ))
    .await;
    let http = client();

    let response = http
        .get(gw.url("/api/v1/orders/123?x=1"))
        .header("x-forwarded-for", "10.0.0.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["via"].to_str().unwrap().contains("bazaar-gateway"));
    let echo = body_json(response).await;
    assert_eq!(echo["path"], "/orders/123?x=1");
    let headers = &echo["headers"];
    assert_eq!(headers["x-forwarded-for"], "10.0.0.9, 127.0.0.1");
    assert_eq!(headers["x-real-ip"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-port"], gw.addr.port().to_string());
    assert_eq!(headers["x-forwarded-path"], "/api/v1/orders/123");
    assert_eq!(headers["x-forwarded-prefix"], "/api/v1/orders");
    assert_eq!(headers["host"], up.addr.to_string());
    assert!(headers["via"].as_str().unwrap().contains("bazaar-gateway"));
    assert!(headers["traceparent"].as_str().unwrap().starts_with("00-"));

    let echo = body_json(http.get(gw.url("/api/v1/orders")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/orders");
    let echo = body_json(http.get(gw.url("/raw/thing")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/orders/raw/thing");
    let echo = body_json(http.get(gw.url("/v2/items/9")).send().await.unwrap()).await;
    assert_eq!(echo["path"], "/orders/9");

    let missing = http.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(
        body_json(missing).await,
        json!({"message": "no Route matched with those values"})
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_gateway_serves_its_own_documents_where_no_route_matches() {
    let up = Upstream::start("orders").await;
    let document = |path: &str, body: &'static str| bazaar_gateway::Document {
        path: path.into(),
        content_type: "application/json",
        body: body.into(),
    };
    let edge = bazaar_gateway::Edge {
        documents: vec![
            document("/api/v1/openapi.json", r#"{"openapi":"3.1.0"}"#),
            document("/api/v1/orders/openapi.json", r#"{"shadowed":true}"#),
        ],
        ..Default::default()
    };
    let gw = Gateway::start_with(
        &format!(
            r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}/orders
    routes:
      - name: orders
        paths: [/api/v1/orders]
"#,
            addr = up.addr
        ),
        edge,
    )
    .await;
    let http = client();
    let served = http.get(gw.url("/api/v1/openapi.json")).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "application/json");
    assert_eq!(body_json(served).await, json!({"openapi": "3.1.0"}));
    let posted = http.post(gw.url("/api/v1/openapi.json")).send().await.unwrap();
    assert_eq!(posted.status(), 405);
    assert_eq!(posted.headers()["allow"], "GET, HEAD");
    // A route of the config wins over a document at a path it matches.
    let routed = body_json(http.get(gw.url("/api/v1/orders/openapi.json")).send().await.unwrap()).await;
    assert_eq!(routed["path"], "/orders/openapi.json");
    gw.shutdown().await;
}

#[tokio::test]
async fn jwt_accepts_valid_tokens_and_rejects_each_fault_like_kong() {
    let up = Upstream::start("users").await;
    let public_pem = include_str!("fixtures/rsa_public.pem").replace('\n', "\\n");
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: users
    url: http://{addr}
    routes:
      - name: users
        paths: [/users]
        plugins:
          - name: jwt
consumers:
  - username: alice
    custom_id: a-1
    jwt_secrets:
      - key: alice-iss
        secret: alice-secret
  - username: robot
    jwt_secrets:
      - key: robot-iss
        algorithm: RS256
        rsa_public_key: "{public_pem}"
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let get = |token: Option<String>| {
        let mut request = http.get(gw.url("/users/me")).header("x-consumer-id", "spoofed");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.send()
    };

    let token = hs256("alice-secret", json!({"iss": "alice-iss", "exp": now() + 60}));
    let accepted = get(Some(token.clone())).await.unwrap();
    assert_eq!(accepted.status(), 200);
    let headers = body_json(accepted).await["headers"].clone();
    assert_eq!(headers["x-consumer-username"], "alice");
    assert_eq!(headers["x-consumer-custom-id"], "a-1");
    assert_eq!(headers["x-credential-identifier"], "alice-iss");
    assert_ne!(headers["x-consumer-id"], "spoofed");
    assert_eq!(headers["x-consumer-id"].as_str().unwrap().len(), 36);
    assert_eq!(headers["authorization"], format!("Bearer {token}"));

    let query = http
        .get(gw.url(&format!("/users/me?jwt={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 200);

    let rsa_key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")).unwrap();
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &json!({"iss": "robot-iss", "exp": now() + 60}),
        &rsa_key,
    )
    .unwrap();
    let robot = get(Some(rs256)).await.unwrap();
    assert_eq!(robot.status(), 200);
    assert_eq!(body_json(robot).await["headers"]["x-consumer-username"], "robot");

    let cases = [
        (None, json!({"message": "Unauthorized"})),
        (
            Some(hs256("wrong", json!({"iss": "alice-iss"}))),
            json!({"message": "Invalid signature"}),
        ),
        (
            Some(hs256("x", json!({"iss": "mallory"}))),
            json!({"message": "No credentials found for given 'iss'"}),
        ),
        (
            Some(hs256("alice-secret", json!({"iss": "alice-iss", "exp": now() - 10}))),
            json!({"exp": "token expired"}),
        ),
        (
            Some(hs256("alice-secret", json!({"iss": "alice-iss", "nbf": now() + 600}))),
            json!({"nbf": "token not valid yet"}),
        ),
        (
            Some("not.a.jwt".to_string()),
            json!({"message": "Bad token; invalid JSON"}),
        ),
    ];
    for (token, body) in cases {
        let refused = get(token).await.unwrap();
        assert_eq!(refused.status(), 401);
        assert_eq!(body_json(refused).await, body);
    }
    gw.shutdown().await;
}

/// An Ed25519 key for EdDSA tests: (kid, PKCS#8 DER, its JWK).
fn ed25519_key(kid: &str) -> (String, Vec<u8>, Value) {
    use base64::Engine;
    use ring::signature::KeyPair;
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
    (kid.to_string(), pkcs8.as_ref().to_vec(), jwk)
}

fn eddsa(kid: &str, pkcs8: &[u8], claims: Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    encode(&header, &claims, &EncodingKey::from_ed_der(pkcs8)).unwrap()
}

/// Serves `document` as a JWKS at any path and counts the requests.
struct JwksServer {
    addr: SocketAddr,
    document: Arc<std::sync::Mutex<Value>>,
    served: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let document = Arc::new(std::sync::Mutex::new(document));
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (doc, count) = (document.clone(), served.clone());
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (doc, count) = (doc.clone(), count.clone());
                connections.spawn(async move {
                    let service = service_fn(move |_request: hyper::Request<hyper::body::Incoming>| {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let body = doc.lock().unwrap().to_string();
                        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            document,
            served,
            task,
        }
    }

    fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn jwt_verifies_eddsa_tokens_with_a_jwks_and_follows_its_rotation() {
    let up = Upstream::start("users").await;
    let (kid1, key1, jwk1) = ed25519_key("k1");
    let (kid2, key2, jwk2) = ed25519_key("k2");
    let jwks = JwksServer::start(json!({"keys": [jwk1]})).await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: users
    url: http://{addr}
    routes:
      - name: users
        paths: [/users]
        plugins:
          - name: jwt
            config:
              claims_to_verify: [exp]
consumers:
  - username: bazaar-users
    jwt_secrets:
      - key: bazaar-users
        algorithm: EdDSA
        jwks_uri: http://{jwks}/.well-known/jwks.json
"#,
        addr = up.addr,
        jwks = jwks.addr
    ))
    .await;
    let http = client();
    let get = |token: String| {
        http.get(gw.url("/users/me"))
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    let claims = json!({"iss": "bazaar-users", "exp": now() + 60});

    let first = get(eddsa(&kid1, &key1, claims.clone())).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(body_json(first).await["headers"]["x-consumer-username"], "bazaar-users");
    assert_eq!(jwks.served(), 1, "loaded once, on first use");

    // HS256 under the same issuer, even keyed with the public key's text, and `alg: none`.
    let hs = hs256(jwk1["x"].as_str().unwrap(), claims.clone());
    let refused = get(hs).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(body_json(refused).await, json!({"message": "Invalid algorithm"}));
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": kid1})), b64(&claims));
    assert_eq!(get(none).await.unwrap().status(), 401);

    // A token signed by a key the JWKS does not publish: one reload, then 401.
    let stranger = get(eddsa(&kid2, &key2, claims.clone())).await.unwrap();
    assert_eq!(stranger.status(), 401);
    assert_eq!(
        body_json(stranger).await,
        json!({"message": "No credentials found for given 'kid'"})
    );
    assert_eq!(jwks.served(), 2);
    // Ten at once share one load.
    let flood = futures_util::future::join_all((0..10).map(|_| get(eddsa(&kid2, &key2, claims.clone())))).await;
    assert!(flood.iter().all(|r| r.as_ref().unwrap().status() == 401));
    assert_eq!(jwks.served(), 3);
    // A known kid with another key's signature.
    assert_eq!(get(eddsa(&kid1, &key2, claims.clone())).await.unwrap().status(), 401);

    // Rotation: the issuer publishes k2 beside k1, and k2's first token, moments after the
    // last load, waits for the next one rather than being refused.
    *jwks.document.lock().unwrap() = json!({"keys": [jwk1, jwk2]});
    assert_eq!(get(eddsa(&kid2, &key2, claims.clone())).await.unwrap().status(), 200);
    assert_eq!(get(eddsa(&kid1, &key1, claims.clone())).await.unwrap().status(), 200);

    // Retirement: k1 leaves the JWKS. Its token, verified (and remembered) above, is refused
    // once the gateway has loaded the set without it (a token naming a new key loads it).
    *jwks.document.lock().unwrap() = json!({"keys": [jwk2]});
    let (kid3, key3, _) = ed25519_key("k3");
    assert_eq!(get(eddsa(&kid3, &key3, claims.clone())).await.unwrap().status(), 401);
    let retired = get(eddsa(&kid1, &key1, claims.clone())).await.unwrap();
    assert_eq!(retired.status(), 401, "a retired key's remembered token passed");
    assert_eq!(get(eddsa(&kid2, &key2, claims.clone())).await.unwrap().status(), 200);
}

#[tokio::test]
async fn jwt_answers_503_while_the_jwks_cannot_be_loaded() {
    let up = Upstream::start("users").await;
    let (kid, key, _) = ed25519_key("k1");
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let gw = Gateway::start(&format!(
        "_format_version: \"3.0\"\nservices:\n  - name: users\n    url: http://{}\n    routes: [{{name: users, paths: [/users], plugins: [{{name: jwt}}]}}]\nconsumers:\n  - username: u\n    jwt_secrets: [{{key: bazaar-users, algorithm: EdDSA, jwks_uri: \"http://{closed}/jwks\"}}]\n",
        up.addr
    ))
    .await;
    let token = eddsa(&kid, &key, json!({"iss": "bazaar-users", "exp": now() + 60}));
    let answer = client()
        .get(gw.url("/users/me"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 503);
    let message = body_json(answer).await["message"].as_str().unwrap().to_string();
    assert!(message.contains("cannot load the keys"), "{message}");
}

/// A mesh CA in `dir` and the TLS files of `names` (roles) it issued.
fn mesh(dir: &std::path::Path, names: &[&str]) -> (bazaar_kit::mesh::Authority, Vec<Arc<bazaar_kit::mesh::Tls>>) {
    use bazaar_kit::mesh::{Authority, Identity, MeshFiles};
    let ca = Authority::create("test", Duration::from_secs(3600)).unwrap();
    let tls = names
        .iter()
        .map(|name| {
            let files = MeshFiles::in_dir(dir, name);
            let leaf = ca.issue(&Identity::role("test", name).unwrap(), Duration::from_secs(600));
            Arc::new(leaf.unwrap().install(&files, ca.cert_pem()).unwrap())
        })
        .collect();
    (ca, tls)
}

#[tokio::test]
async fn https_upstreams_get_the_client_certificate_and_are_verified_like_kong() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = mesh(dir.path(), &["orders", "gateway"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app =
        axum::Router::new().fallback(
            |axum::Extension(bazaar_kit::mesh::PeerIdentity(caller)): axum::Extension<
                bazaar_kit::mesh::PeerIdentity,
            >| async move { caller.uri() },
        );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bazaar_kit::mesh::serve_mtls(listener, app, tls[0].clone(), async {
        let _ = stopped.await;
    }));
    let pem = |path: &std::path::Path| serde_json::to_string(&std::fs::read_to_string(path).unwrap()).unwrap();
    let gateway_files = tls[1].files();
    let stranger = bazaar_kit::mesh::Authority::create("test", Duration::from_secs(3600)).unwrap();
    let config = format!(
        r#"
_format_version: "3.0"
certificates:
  - id: gateway-cert
    cert: {cert}
    key: {key}
ca_certificates:
  - id: mesh-ca
    cert: {ca}
  - id: stranger-ca
    cert: {stranger}
upstreams:
  - name: orders
    targets: [{{target: "127.0.0.1:{port}"}}]
services:
  - name: orders
    url: https://orders/
    client_certificate: gateway-cert
    tls_verify: true
    ca_certificates: [mesh-ca]
    routes: [{{name: orders, paths: [/orders]}}]
  - name: anonymous
    url: https://orders/
    tls_verify: true
    ca_certificates: [mesh-ca]
    retries: 0
    routes: [{{name: anonymous, paths: [/anonymous]}}]
  - name: wrong-ca
    url: https://orders/
    client_certificate: gateway-cert
    tls_verify: true
    ca_certificates: [stranger-ca]
    retries: 0
    routes: [{{name: wrong-ca, paths: [/wrong-ca]}}]
"#,
        cert = pem(&gateway_files.cert),
        key = pem(&gateway_files.key),
        ca = serde_json::to_string(ca.cert_pem()).unwrap(),
        stranger = serde_json::to_string(stranger.cert_pem()).unwrap(),
    );
    let gw = Gateway::start(&config).await;
    let answer = client().get(gw.url("/orders/1")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        "spiffe://test/role/gateway",
        "orders saw the gateway's identity"
    );
    for (path, why) in [
        ("/anonymous", "no client certificate"),
        ("/wrong-ca", "orders is not signed by the trusted CA"),
    ] {
        let refused = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(refused.status(), 502, "{path}: {why}");
    }
    gw.shutdown().await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    // What the config check says about TLS settings that cannot work.
    let problems = |text: &str| {
        let path = dir.path().join("bad.yml");
        std::fs::write(&path, text).unwrap();
        bazaar_gateway::check_config_file(&path).unwrap_err().lines().join("\n")
    };
    let bad = problems("_format_version: \"3.0\"\nservices:\n  - {name: a, url: https://a/, tls_verify: true, client_certificate: nope}\n  - {name: b, url: http://b/, tls_verify: true}\n");
    assert!(bad.contains("client_certificate: no certificate \"nope\""), "{bad}");
    assert!(bad.contains("tls_verify needs the CA certificates"), "{bad}");
    assert!(bad.contains("need protocol https"), "{bad}");
}

#[tokio::test]
async fn rate_limiting_refuses_after_the_limit_with_kong_headers() {
    let up = Upstream::start("inventory").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: inventory
    url: http://{addr}
    routes:
      - name: products
        paths: [/products]
plugins:
  - name: rate-limiting
    config:
      minute: 3
      limit_by: ip
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    for remaining in ["2", "1", "0"] {
        let response = http.get(gw.url("/products")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit-minute"], "3");
        assert_eq!(response.headers()["x-ratelimit-remaining-minute"], remaining);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(response.headers()["ratelimit-remaining"], remaining);
        assert!(response.headers().contains_key("ratelimit-reset"));
    }
    let refused = http.get(gw.url("/products")).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(refused.headers()["x-ratelimit-remaining-minute"], "0");
    assert_eq!(body_json(refused).await, json!({"message": "API rate limit exceeded"}));
    gw.shutdown().await;
}

#[tokio::test]
async fn redis_rate_limits_are_shared_between_gateways() {
    let Some(redis_url) = servers::url(Server::Redis, "shared rate limits") else {
        return;
    };
    let without_scheme = redis_url.trim_start_matches("redis://").trim_end_matches('/');
    let (host, port) = without_scheme.rsplit_once(':').unwrap_or((without_scheme, "6379"));
    let up = Upstream::start("orders").await;
    // A per-run service name keeps counts from earlier runs out of this one.
    let service = format!("orders-{}", uuid::Uuid::new_v4().simple());
    let config = format!(
        r#"
_format_version: "3.0"
services:
  - name: {service}
    url: http://{addr}
    routes:
      - name: orders
        paths: [/orders]
    plugins:
      - name: rate-limiting
        config:
          minute: 4
          limit_by: ip
          policy: redis
          redis_host: {host}
          redis_port: {port}
"#,
        addr = up.addr
    );
    let (one, two) = (Gateway::start(&config).await, Gateway::start(&config).await);
    let http = client();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gateway = if i % 2 == 0 { &one } else { &two };
        statuses.push(http.get(gateway.url("/orders")).send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    one.shutdown().await;
    two.shutdown().await;
}

#[tokio::test]
async fn redis_down_lets_requests_through_when_fault_tolerant() {
    let up = Upstream::start("orders").await;
    // Nothing listens on port 1, so every Redis call fails.
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}
    routes:
      - {{name: tolerant, paths: [/tolerant], plugins: [{{name: rate-limiting, config: {{minute: 1, policy: redis, redis_host: 127.0.0.1, redis_port: 1}}}}]}}
      - {{name: strict, paths: [/strict], plugins: [{{name: rate-limiting, config: {{minute: 1, policy: redis, redis_host: 127.0.0.1, redis_port: 1, fault_tolerant: false}}}}]}}
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    for _ in 0..3 {
        assert_eq!(http.get(gw.url("/tolerant")).send().await.unwrap().status(), 200);
    }
    let strict = http.get(gw.url("/strict")).send().await.unwrap();
    assert_eq!(strict.status(), 500);
    assert_eq!(
        body_json(strict).await,
        json!({"message": "An unexpected error occurred"})
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn correlation_ids_pass_through_and_are_echoed() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}
    routes:
      - {{name: orders, paths: [/orders]}}
plugins:
  - name: correlation-id
    config: {{header_name: X-Correlation-ID, generator: uuid, echo_downstream: true}}
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let kept = http
        .get(gw.url("/orders"))
        .header("x-correlation-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-correlation-id"], "abc-123");
    assert_eq!(body_json(kept).await["headers"]["x-correlation-id"], "abc-123");

    let made = http.get(gw.url("/orders")).send().await.unwrap();
    let echoed = made.headers()["x-correlation-id"].to_str().unwrap().to_string();
    assert_eq!(echoed.len(), 36);
    assert_eq!(body_json(made).await["headers"]["x-correlation-id"], echoed);

    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = body_json(
        http.get(gw.url("/orders"))
            .header("traceparent", trace)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let forwarded = traced["headers"]["traceparent"].as_str().unwrap();
    assert!(forwarded.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert_ne!(forwarded, trace);
    gw.shutdown().await;
}

/// Sends a raw chunked request (no Content-Length) and returns the status line.
async fn chunked_post(addr: SocketAddr, path: &str, total: usize) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 1000];
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        // The gateway may answer and close early; later writes failing is expected then.
        if stream.write_all(format!("{n:x}\r\n").as_bytes()).await.is_err()
            || stream.write_all(&chunk[..n]).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
        sent += n;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn request_size_limit_checks_declared_and_streamed_bodies() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}
    routes:
      - {{name: orders, paths: [/orders]}}
plugins:
  - name: request-size-limiting
    config: {{allowed_payload_size: 4, size_unit: kilobytes}}
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let small = http
        .post(gw.url("/orders"))
        .body(vec![b'a'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    assert_eq!(body_json(small).await["body_len"], 4096);
    let large = http
        .post(gw.url("/orders"))
        .body(vec![b'a'; 4097])
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 413);
    assert_eq!(
        body_json(large).await,
        json!({"message": "Request size limit exceeded"})
    );

    assert!(chunked_post(gw.addr, "/orders", 3000).await.contains("200"));
    assert!(chunked_post(gw.addr, "/orders", 20_000).await.contains("413"));
    gw.shutdown().await;
}

#[tokio::test]
async fn cors_preflight_is_answered_by_the_gateway() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}
    routes:
      - name: orders
        paths: [/orders]
        plugins: [{{name: jwt}}]
plugins:
  - name: cors
    config:
      origins: ["http://localhost:\\d+"]
      methods: [GET, POST]
      credentials: true
      exposed_headers: [X-Correlation-ID]
      max_age: 600
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let preflight = http
        .request(reqwest::Method::OPTIONS, gw.url("/orders"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "http://localhost:5173");
    assert_eq!(headers["access-control-allow-methods"], "GET,POST");
    assert_eq!(headers["access-control-allow-headers"], "authorization,content-type");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["access-control-max-age"], "600");

    // A refused request still carries CORS headers, so the browser can read the 401.
    let refused = http
        .get(gw.url("/orders"))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    assert_eq!(refused.headers()["access-control-expose-headers"], "X-Correlation-ID");
    let foreign = http
        .get(gw.url("/orders"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!foreign.headers().contains_key("access-control-allow-origin"));
    gw.shutdown().await;
}

#[tokio::test]
async fn balances_over_targets_and_fails_over_when_one_dies() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
upstreams:
  - name: shop.upstream
    healthchecks:
      passive:
        unhealthy: {{tcp_failures: 1}}
    targets:
      - target: {a}
      - target: {b}
services:
  - name: shop
    host: shop.upstream
    port: 80
    routes:
      - {{name: shop, paths: [/shop]}}
"#,
        a = a.addr,
        b = b.addr
    ))
    .await;
    let http = client();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..10 {
        let echo = body_json(http.get(gw.url("/shop")).send().await.unwrap()).await;
        assert_eq!(echo["headers"]["host"], "shop.upstream");
        *seen.entry(echo["upstream"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    assert_eq!((seen["a"], seen["b"]), (5, 5));

    drop(b);
    for _ in 0..6 {
        let response = http.get(gw.url("/shop")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(body_json(response).await["upstream"], "a");
    }
    let health = http.get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health = body_json(health).await;
    assert_eq!(health["checks"]["upstreams"]["shop.upstream"]["healthy_targets"], 1);

    drop(a);
    let first = http.get(gw.url("/shop")).send().await.unwrap();
    assert_eq!(first.status(), 502);
    assert_eq!(
        body_json(first).await,
        json!({"message": "An invalid response was received from the upstream server"})
    );
    let none = http.get(gw.url("/shop")).send().await.unwrap();
    assert_eq!(none.status(), 503);
    assert_eq!(
        body_json(none).await,
        json!({"message": "failure to get a peer from the ring-balancer"})
    );
    let health = http.get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(body_json(health).await["status"], "degraded");
    gw.shutdown().await;
}

#[tokio::test]
async fn active_health_checks_bring_a_target_back() {
    let a = Upstream::start("a").await;
    // Reserve a port, free it, and start the second target there later.
    let spare = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = spare.local_addr().unwrap();
    drop(spare);
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
upstreams:
  - name: pool
    healthchecks:
      active:
        http_path: /health
        healthy: {{interval: 0.2, successes: 1}}
        unhealthy: {{interval: 0.2, tcp_failures: 1}}
    targets: [{{target: "{a}"}}, {{target: "{b_addr}"}}]
services:
  - {{name: pool, host: pool, routes: [{{name: pool, paths: [/]}}]}}
"#,
        a = a.addr
    ))
    .await;
    let http = client();
    let healthy_targets = |http: reqwest::Client, url: String| async move {
        body_json(http.get(url).send().await.unwrap()).await["checks"]["upstreams"]["pool"]["healthy_targets"].clone()
    };
    let wait_for = |want: u64| {
        let (http, url) = (http.clone(), gw.admin_url("/health"));
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while healthy_targets(http.clone(), url.clone()).await != want {
                assert!(Instant::now() < deadline, "never reached {want} healthy targets");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(1).await;
    let b = Upstream::start_on(b_addr, "b").await;
    wait_for(2).await;
    drop(b);
    gw.shutdown().await;
}

#[tokio::test]
async fn connect_failures_give_502_and_slow_upstreams_504() {
    let up = Upstream::start("slow").await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: dead
    url: http://{closed}
    retries: 1
    routes: [{{name: dead, paths: [/dead]}}]
  - name: slow
    url: http://{addr}
    read_timeout: 300
    routes: [{{name: slow, paths: [/slow]}}]
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let dead = http.get(gw.url("/dead")).send().await.unwrap();
    assert_eq!(dead.status(), 502);
    assert_eq!(
        body_json(dead).await,
        json!({"message": "An invalid response was received from the upstream server"})
    );
    let started = Instant::now();
    let slow = http.get(gw.url("/slow/slow")).send().await.unwrap();
    assert_eq!(slow.status(), 504);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        body_json(slow).await,
        json!({"message": "The upstream server is timing out"})
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn reloads_on_file_change_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let up = Upstream::start("orders").await;
    let config = |paths: &str| {
        format!(
            "_format_version: \"3.0\"\nservices:\n  - name: orders\n    url: http://{}\n    routes: [{{name: r, paths: {paths}}}]\n",
            up.addr
        )
    };
    let gw = Gateway::start(&config("[/one]")).await;
    let http = client();
    assert_eq!(http.get(gw.url("/two")).send().await.unwrap().status(), 404);

    std::fs::write(&gw.config_path, config("[/one, /two]")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http.get(gw.url("/two")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "config was not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    std::fs::write(&gw.config_path, config("[nope]")).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(http.get(gw.url("/two")).send().await.unwrap().status(), 200);
    let summary = body_json(http.get(gw.admin_url("/config")).send().await.unwrap()).await;
    assert_eq!(summary["routes"], json!(["r"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_report_health_status_config_and_metrics() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        "_format_version: \"3.0\"\nservices:\n  - name: orders\n    url: http://{}\n    routes: [{{name: r, paths: [/o]}}]\n",
        up.addr
    ))
    .await;
    let http = client();
    http.get(gw.url("/o")).send().await.unwrap();
    let health = http.get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health = body_json(health).await;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["checks"]["config"], "up");
    assert!(health["version"].is_string() && health["uptime"].is_u64());
    assert_eq!(
        http.get(gw.admin_url("/health/live")).send().await.unwrap().status(),
        200
    );
    let metrics = http
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("test_metric 1"));
    let status = body_json(http.get(gw.admin_url("/status")).send().await.unwrap()).await;
    assert!(status["server"]["total_requests"].as_u64().unwrap() >= 1);
    assert!(status["server"]["connections_accepted"].as_u64().unwrap() >= 1);
    let config = body_json(http.get(gw.admin_url("/config")).send().await.unwrap()).await;
    assert_eq!(config["summary"], "1 service, 1 route, 0 consumers, 0 plugins");
    gw.shutdown().await;
}

#[tokio::test]
async fn check_config_file_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "_format_version: \"3.0\"\nroutes:\n  - {name: a, paths: [x]}\nplugins:\n  - name: key-auth\n",
    )
    .unwrap();
    let problems = bazaar_gateway::check_config_file(&path).unwrap_err();
    assert!(
        problems
            .lines()
            .iter()
            .any(|p| p == "routes[0].paths[0]: must start with /"),
        "{problems:?}"
    );
    assert!(
        problems
            .lines()
            .iter()
            .any(|p| p.starts_with("plugins[0].name: unknown plugin \"key-auth\"")),
        "{problems:?}"
    );

    let route = bazaar_gateway::DefaultRoute {
        name: "orders",
        resource: "orders",
        prefix: "/api/v1",
        service: "orders",
        targets: vec![3],
        methods: &[],
        exact: false,
        jwt: true,
        credentials: false,
    };
    std::fs::write(
        &path,
        bazaar_gateway::default_config(&[route], None, "http://127.0.0.1:3/.well-known/jwks.json", None),
    )
    .unwrap();
    assert_eq!(
        bazaar_gateway::check_config_file(&path).unwrap(),
        "1 service, 1 route, 1 consumer, 5 plugins"
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let up = Upstream::start("slow").await;
    let gw = Gateway::start(&format!(
        "_format_version: \"3.0\"\nservices:\n  - name: slow\n    url: http://{}\n    routes: [{{name: r, paths: [/slow], strip_path: false}}]\n",
        up.addr
    ))
    .await;
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    // Give the request time to reach the upstream, which takes two seconds to answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = gw.addr;
    gw.shutdown().await;
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open after shutdown"
    );
}

#[tokio::test]
async fn consumer_plugins_override_route_plugins_and_host_can_be_preserved() {
    let up = Upstream::start("orders").await;
    let gw = Gateway::start(&format!(
        r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://{addr}
    routes:
      - name: orders
        paths: [/orders]
        preserve_host: true
        plugins:
          - name: jwt
          - name: rate-limiting
            config: {{minute: 100, limit_by: consumer}}
consumers:
  - username: greedy
    jwt_secrets: [{{key: greedy, secret: g-secret}}]
    plugins:
      - name: rate-limiting
        config: {{minute: 1, limit_by: consumer}}
  - username: polite
    jwt_secrets: [{{key: polite, secret: p-secret}}]
"#,
        addr = up.addr
    ))
    .await;
    let http = client();
    let call = |secret: &str, iss: &str| {
        let token = hs256(secret, json!({"iss": iss, "exp": now() + 60}));
        http.get(gw.url("/orders"))
            .header("host", "shop.example:8000")
            .bearer_auth(token)
            .send()
    };
    let first = call("g-secret", "greedy").await.unwrap();
    assert_eq!(first.headers()["x-ratelimit-limit-minute"], "1");
    assert_eq!(body_json(first).await["headers"]["host"], "shop.example:8000");
    assert_eq!(call("g-secret", "greedy").await.unwrap().status(), 429);
    for _ in 0..3 {
        let polite = call("p-secret", "polite").await.unwrap();
        assert_eq!(polite.status(), 200);
        assert_eq!(polite.headers()["x-ratelimit-limit-minute"], "100");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_even_when_the_file_looks_unchanged() {
    let up = Upstream::start("orders").await;
    let config = |path: &str| {
        format!(
            "_format_version: \"3.0\"\nservices:\n  - name: orders\n    url: http://{}\n    routes: [{{name: r, paths: [{path}]}}]\n",
            up.addr
        )
    };
    let gw = Gateway::start(&config("/aaa")).await;
    let http = client();
    assert_eq!(http.get(gw.url("/aaa")).send().await.unwrap().status(), 200);
    // Same length and the old modification time: only the signal can reveal the change.
    let modified = std::fs::metadata(&gw.config_path).unwrap().modified().unwrap();
    std::fs::write(&gw.config_path, config("/bbb")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&gw.config_path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status();
    assert!(status.unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while http.get(gw.url("/bbb")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the config");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn serve_refuses_to_start_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.yaml");
    std::fs::write(&config_path, "_format_version: \"3.0\"\nservices: [{name: s}]\n").unwrap();
    let opts = bazaar_gateway::GatewayOptions {
        config_path,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        render_metrics: Arc::new(String::new),
        edge: bazaar_gateway::Edge::default(),
        workers: 1,
    };
    match bazaar_gateway::serve(opts, async {}).await {
        Err(bazaar_gateway::GatewayError::Config { problems, .. }) => {
            assert_eq!(problems.lines(), ["services[0]: needs a url or a host"]);
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Opens `n` connections that send a request head promising a body, and a few bytes of it.
async fn trickling_bodies(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut sockets = Vec::new();
    for _ in 0..n {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"POST /up/x HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"a\":")
            .await
            .unwrap();
        sockets.push(socket);
    }
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_trickling_bodies_are_cut_with_408_while_others_are_served() {
    use tokio::io::AsyncReadExt;
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&format!(
        "_format_version: \"3.0\"\nservices:\n  - name: up\n    url: http://{}\n    routes: [{{name: r, paths: [/up]}}]\n",
        up.addr
    ))
    .await;
    let started = Instant::now();
    let mut slow = trickling_bodies(gw.addr, 1000).await;
    // Everyone else is served meanwhile.
    for _ in 0..20 {
        let ok = client().get(gw.url("/up/fine")).send().await.unwrap();
        assert_eq!(ok.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "normal requests waited behind the slow ones"
    );
    // Each slow one is answered 408 and closed once its body stalls past the limit.
    for socket in slow.iter_mut() {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut answer))
            .await
            .expect("the gateway cut the slow client")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("too long to send the request body"), "{answer}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "cut after {waited:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_stalling_mid_body_is_cut_at_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let stalling = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 1024];
        let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut head).await;
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nthe first part")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let gw = Gateway::start(&format!(
        "_format_version: \"3.0\"\nservices:\n  - name: stall\n    url: http://{upstream}\n    read_timeout: 300\n    routes: [{{name: r, paths: [/stall]}}]\n"
    ))
    .await;
    let started = Instant::now();
    let response = client().get(gw.url("/stall")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the head arrived in time");
    assert!(response.bytes().await.is_err(), "a stalled body is cut, not waited for");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        started.elapsed()
    );
    stalling.abort();
    gw.shutdown().await;
}

/// A config whose one route allows two requests a minute per client address.
fn two_a_minute(upstream: SocketAddr) -> String {
    format!(
        "_format_version: \"3.0\"\nservices:\n  - name: up\n    url: http://{upstream}\n    routes: [{{name: r, paths: [/up]}}]\nplugins:\n  - name: rate-limiting\n    config: {{minute: 2, limit_by: ip, policy: local}}\n"
    )
}

async fn from(gw: &Gateway, forwarded_for: &str) -> (u16, Value) {
    let answer = client()
        .get(gw.url("/up/x"))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_forged_x_forwarded_for_does_not_pick_the_rate_limit_bucket() {
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&two_a_minute(up.addr)).await;
    let (first, echo) = from(&gw, "198.51.100.1").await;
    assert_eq!(first, 200);
    assert_eq!(
        echo["headers"]["x-real-ip"], "127.0.0.1",
        "the peer, not what it claimed"
    );
    assert_eq!(from(&gw, "198.51.100.2").await.0, 200);
    assert_eq!(from(&gw, "198.51.100.3").await.0, 429, "one bucket, whatever it claims");
    gw.shutdown().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_it_forwards_for_has_its_own_bucket() {
    let up = Upstream::start("up").await;
    let trusted = bazaar_gateway::TrustedProxies::parse("127.0.0.0/8").unwrap();
    let gw = Gateway::start_trusting(&two_a_minute(up.addr), trusted).await;
    for _ in 0..2 {
        let (status, echo) = from(&gw, "6.6.6.6, 198.51.100.1").await;
        assert_eq!(status, 200);
        assert_eq!(
            echo["headers"]["x-real-ip"], "198.51.100.1",
            "the hop the proxy appended"
        );
    }
    assert_eq!(from(&gw, "198.51.100.1").await.0, 429);
    assert_eq!(
        from(&gw, "198.51.100.2").await.0,
        200,
        "another client behind the proxy"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn only_a_trusted_proxy_says_the_client_used_https() {
    let up = Upstream::start("up").await;
    let scheme = |gw: &Gateway| {
        let url = gw.url("/up/x");
        async move {
            let answer = client()
                .get(url)
                .header("x-forwarded-proto", "https")
                .send()
                .await
                .unwrap();
            answer.json::<Value>().await.unwrap()["headers"]["x-forwarded-proto"].clone()
        }
    };
    let open = Gateway::start(&two_a_minute(up.addr)).await;
    assert_eq!(scheme(&open).await, "http", "a client's own claim is replaced");
    open.shutdown().await;
    let trusted = bazaar_gateway::TrustedProxies::parse("127.0.0.0/8").unwrap();
    let behind = Gateway::start_trusting(&two_a_minute(up.addr), trusted).await;
    assert_eq!(scheme(&behind).await, "https", "the proxy that ended TLS is believed");
    behind.shutdown().await;
}
