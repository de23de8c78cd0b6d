//! What the tests of bazaar's services and of the kit share: [`TestRole`], a service role
//! started in-process on a throwaway store whose HTTP app is called without a socket, and
//! (from `bazaar_store::testing`) throwaway databases and the servers tests find through
//! variables. A dev-dependency only: nothing that ships depends on it.

use axum::{
    body::Body,
    http::{header, HeaderMap, Method, Request, StatusCode},
    Router,
};
use serde_json::Value;
use tower::ServiceExt;
use uuid::Uuid;

use bazaar_core::saga::SagaReply;
use bazaar_kit::{
    auth::{Jwks, KeySet, SigningKey, Verifier, ADMIN},
    consumer::{Handler, HandlerError},
    envelope::Envelope,
    runtime::{RoleConfig, Runtime},
    service::ServiceSpec,
    shutdown::{self, ShutdownTrigger},
    store,
};

pub use bazaar_store::testing::{servers, with_database, Server, TestDb};

/// A service role started for a test: the real [`Runtime`] (store migrated, outbox relay
/// running) on a temporary SQLite store and a temporary embedded broker, and its HTTP app
/// exactly as [`Runtime::serve_on`] serves it. Consumers are not started, so the test decides
/// when each event is handled. Stops its tasks on drop.
pub struct TestRole {
    /// The role's runtime.
    pub rt: Runtime,
    app: Router,
    /// Signs the tokens [`TestRole::token`] hands out; the role trusts its public key.
    signer: SigningKey,
    stop: ShutdownTrigger,
    db: TestDb,
    _bus: tempfile::TempDir,
}

/// What the app answered.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body as JSON (`Null` when empty, a string when not JSON).
    pub body: Value,
}

impl Answer {
    /// The response's content type ("" when none).
    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// Asserts a problem+json response with `status` and returns its detail.
    #[track_caller]
    pub fn problem(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.content_type(), "application/problem+json", "{:?}", self.body);
        assert_eq!(self.body["status"], status.as_u16(), "{:?}", self.body);
        self.body["detail"]
            .as_str()
            .expect("a problem has a detail")
            .to_string()
    }

    /// Asserts `status` and returns the body.
    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{:?}", self.body);
        self.body
    }
}

impl TestRole {
    /// Starts the service `spec` names on a SQLite store; `api` builds its router from the
    /// runtime.
    pub async fn start(spec: &'static ServiceSpec, api: impl FnOnce(&Runtime) -> Router) -> TestRole {
        TestRole::start_on(spec, api, TestDb::sqlite(&format!("{}.db", spec.name))).await
    }

    /// Starts the service `spec` names on `store` (SQLite or PostgreSQL).
    pub async fn start_on(spec: &'static ServiceSpec, api: impl FnOnce(&Runtime) -> Router, store: TestDb) -> TestRole {
        let bus = tempfile::tempdir().expect("temp dir");
        let signer = SigningKey::generate().expect("a signing key");
        let trusted = KeySet::from_jwks(&Jwks {
            keys: vec![signer.public().clone()],
        })
        .expect("a key set");
        let config = RoleConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            store_url: store.url.clone(),
            store_pool: 4,
            broker_url: format!("sqlite://{}", bus.path().join("bus.db").display()),
            tokens: Verifier::fixed(trusted),
            drain_delay: std::time::Duration::ZERO,
            listen_fd: None,
            mesh: None,
            admin_listen: None,
            admin_listen_fd: None,
            mesh_policy: None,
            mesh_peers: Vec::new(),
        };
        let (stop, shutdown) = shutdown::channel();
        let rt = Runtime::start(spec, &config, shutdown)
            .await
            .unwrap_or_else(|e| panic!("start {}: {e}", spec.name));
        let app = rt.app(api(&rt), rt.health());
        TestRole {
            rt,
            app,
            signer,
            stop,
            db: store,
            _bus: bus,
        }
    }

    /// Closes the role's store and drops its database when it is a PostgreSQL one.
    pub async fn drop_database(&self) {
        self.rt.store.close().await;
        self.db.drop_database().await;
    }

    /// A token for user `id` with `email` and `roles`, signed by a key the role trusts.
    pub fn token(&self, id: Uuid, email: &str, roles: &[String]) -> String {
        self.signer
            .issue(id, email, roles, std::time::Duration::from_secs(3600))
            .expect("a token")
    }

    /// A token for a new operator.
    pub fn admin_token(&self) -> String {
        self.token(Uuid::now_v7(), "admin@example.com", &[ADMIN.to_string()])
    }

    /// A new plain customer and their token.
    pub fn customer(&self) -> (Uuid, String) {
        let id = Uuid::now_v7();
        (id, self.token(id, &format!("{id}@example.com"), &[]))
    }

    /// A request with `token` (if any), `headers`, and a JSON `body` (if any).
    pub fn request(
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Request<Body> {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .expect("a request")
    }

    /// Sends `request` through the served app.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.clone().oneshot(request).await.expect("the app is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer { status, headers, body }
    }

    /// Sends `method uri` with `token` and a JSON `body`.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.send(TestRole::request(method, uri, token, &[], body.as_ref()))
            .await
    }

    /// Runs `event` through `handler` as the consumer runner does: one transaction,
    /// committed through the outbox when the handler succeeds, rolled back when it fails.
    pub async fn handle(&self, handler: &dyn Handler, event: &Envelope) -> Result<(), HandlerError> {
        let mut tx = self.rt.store.begin().await.expect("begin");
        if let Err(e) = handler.handle(&mut tx, event).await {
            tx.rollback().await.expect("rollback");
            return Err(e);
        }
        self.rt.outbox.commit(tx).await.expect("commit");
        Ok(())
    }

    /// Every envelope the role added to its outbox for `topic`, oldest first.
    pub async fn outbox(&self, topic: &str) -> Vec<Envelope> {
        store::query("SELECT body FROM outbox WHERE topic = $1 ORDER BY id")
            .bind(topic)
            .fetch_all(&self.rt.store)
            .await
            .expect("the outbox")
            .iter()
            .map(|row| {
                Envelope::from_slice(row.try_get::<String, _>("body").expect("a column").as_bytes())
                    .expect("an envelope")
            })
            .collect()
    }

    /// The saga replies the role wrote to `topic` for `command`, oldest first.
    pub async fn replies_to(&self, topic: &str, command: &Envelope) -> Vec<SagaReply> {
        let cause = command.event_id.to_string();
        self.outbox(topic)
            .await
            .into_iter()
            .filter(|reply| reply.metadata.causation_id.as_deref() == Some(cause.as_str()))
            .map(|reply| reply.payload_as::<SagaReply>().expect("a saga reply"))
            .collect()
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        // Stops the outbox relay the runtime started.
        self.stop.trigger();
    }
}
