//! The public API as the web role calls it: through the gateway, as a shopper's own client
//! would, with the shopper's token (the credential forms go to users directly; see [`Api`]).
//! Nothing here reaches past what a script could do.

use std::time::Duration;

use bazaar_kit::client::{ClientError, ClientPolicy, HttpClient};
use http::{Method, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Why a call to the public API gave no answer the page can use.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status.
    #[error("{status}: {detail}")]
    Answered {
        /// The status.
        status: StatusCode,
        /// The problem's `detail` (or the gateway's `message`).
        detail: String,
    },
    /// No answer: the gateway is unreachable, slow, or its breaker is open.
    #[error("no answer: {0}")]
    Unreachable(String),
    /// An answer that is not what the API documents.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl ApiError {
    /// The status of an answered error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What a shopper reads: no status codes, no problem documents.
    pub fn words(&self) -> String {
        match self {
            ApiError::Answered { status, detail } => match *status {
                StatusCode::UNAUTHORIZED => "Your session has ended; please sign in again.".into(),
                StatusCode::FORBIDDEN => "You are not allowed to do that.".into(),
                StatusCode::NOT_FOUND => "We could not find that.".into(),
                StatusCode::TOO_MANY_REQUESTS => {
                    "Too many attempts in a short time; please wait a moment and try again.".into()
                }
                s if s.is_server_error() => "The shop is busy right now; please try again in a moment.".into(),
                _ => sentence(detail),
            },
            ApiError::Unreachable(_) | ApiError::Unexpected(_) => {
                "The shop cannot be reached right now; please try again in a moment.".into()
            }
        }
    }
}

/// `detail` as a sentence: capitalised, ending in a full stop.
fn sentence(detail: &str) -> String {
    let detail = detail.trim();
    let mut chars = detail.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return "That did not work; please check what you entered.".into(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// A product as the catalogue shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Product {
    /// Its id.
    pub id: Uuid,
    /// Its SKU.
    pub sku: String,
    /// Its name.
    pub name: String,
    /// Price of one, in minor units.
    pub price_cents: i64,
    /// ISO 4217.
    pub currency: String,
    /// Units available now.
    pub stock: i64,
    /// Units in the warehouse.
    pub on_hand: i64,
    /// Units held for orders in progress.
    pub reserved: i64,
}

/// An access token.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Token {
    /// The JWT.
    pub access_token: String,
    /// Seconds it lives.
    pub expires_in: u64,
}

/// One line of an order (sent as the API names its fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: i64,
}

/// One entry of a saga's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: String,
    /// Which step.
    pub step: String,
    /// What happened.
    pub entry: String,
}

/// An order's saga progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SagaProgress {
    /// `running`, `compensating`, `completed`, `compensated` or `stuck`.
    pub status: Option<String>,
    /// The step it is at.
    pub step: Option<String>,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// An order, with its saga's progress when asked for one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Order {
    /// Its id.
    pub id: Uuid,
    /// `pending`, `confirmed` or `cancelled`.
    pub status: String,
    /// What was ordered.
    pub lines: Vec<Line>,
    /// The total once priced.
    pub total_cents: Option<i64>,
    /// Its currency.
    pub currency: Option<String>,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// When it was placed (RFC 3339).
    pub created_at: String,
    /// The saga (only on `GET /orders/{id}`).
    #[serde(default)]
    pub saga: Option<SagaProgress>,
}

/// A wallet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Account {
    /// Balance in minor units.
    pub balance_cents: i64,
    /// ISO 4217.
    pub currency: String,
}

/// A message sent to someone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Notification {
    /// `email` or `sms`.
    pub channel: String,
    /// The address or number.
    pub recipient: String,
    /// Its subject.
    pub subject: String,
    /// `pending`, `sent` or `failed`.
    pub status: String,
    /// When it was written.
    pub created_at: String,
}

/// A saga as operators list it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct Saga {
    /// Its id: the order's, or `{order}/cancel` for a cancellation.
    pub id: String,
    /// Its flow: `order`, or `order-cancellation`.
    #[serde(default)]
    pub kind: String,
    /// The order it belongs to (the console's links name it).
    #[serde(default)]
    pub order: String,
    /// Where it is.
    pub status: String,
    /// The step it is at (an index).
    pub step: i64,
    /// Sends of the current command.
    pub attempts: u32,
    /// The last failure.
    pub error: Option<String>,
    /// The correlation id of the request that started it.
    pub correlation_id: String,
}

impl Saga {
    /// Fills in the order: the id up to `/` (a cancellation's id is `{order}/cancel`).
    fn name_its_order(&mut self) {
        self.order = self.id.split('/').next().unwrap_or(&self.id).to_string();
    }
}

/// A message a role's consumer group set aside.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all(deserialize = "camelCase"))]
pub struct DeadLetter {
    /// The topic it came from.
    pub topic: String,
    /// Its place among the topic's dead letters.
    pub seq: u64,
    /// The event's type, when it is an event.
    pub event_type: Option<String>,
    /// Deliveries tried.
    pub attempts: u32,
    /// Why it was set aside.
    pub reason: String,
    /// When (RFC 3339).
    pub dead_at: String,
}

/// A saga with its history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaView {
    /// The saga.
    pub saga: Saga,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// Longest a single call may take (the gateway's own limits are shorter for most).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the order page's live feed waits for the saga to move in one call; under the
/// gateway's 30 s read timeout.
pub const WATCH_WAIT: Duration = Duration::from_secs(20);

/// The public API at one gateway, and the users role's credential routes.
///
/// Signing in, registering and confirming go to users directly (over the mesh when the role
/// has a certificate) rather than through the gateway: the gateway already limited the
/// shopper's form per client address, and a second pass would count every shopper against
/// this role's one address. Users keeps its own per-account throttles.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    calls: HttpClient,
    watch: HttpClient,
    users_base: String,
    users: HttpClient,
}

/// Users' routes the credential forms call directly: what the mesh policy lets web call.
pub const CREDENTIAL_ROUTES: [&str; 3] = ["POST /users", "POST /auth/token", "POST /auth/verification"];

/// Where a call goes.
#[derive(Debug, Clone, Copy)]
enum Hop {
    /// The public API through the gateway.
    Api,
    /// The public API through the gateway, waiting long for an answer.
    Watch,
    /// Users' credential routes, directly.
    Users,
}

/// The policy of calls to users' credential routes.
pub fn users_policy() -> ClientPolicy {
    ClientPolicy {
        timeout: CALL_TIMEOUT,
        max_in_flight: 64,
        ..ClientPolicy::default()
    }
}

impl Api {
    /// The API behind the gateway at `base` (`http://127.0.0.1:8080`), with users'
    /// credential routes at `users_base` through `users` (see [`users_policy`]).
    pub fn new(base: &str, users_base: &str, users: HttpClient) -> Result<Api, ClientError> {
        let calls = HttpClient::new(
            "gateway",
            ClientPolicy {
                timeout: CALL_TIMEOUT,
                max_in_flight: 256,
                ..ClientPolicy::default()
            },
        )?;
        // Long polls: one at a time per open order page, never retried (the page reconnects).
        let watch = HttpClient::new(
            "gateway-watch",
            ClientPolicy {
                timeout: WATCH_WAIT + Duration::from_secs(5),
                max_retries: 0,
                max_in_flight: 1024,
                ..ClientPolicy::default()
            },
        )?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            calls,
            watch,
            users_base: users_base.trim_end_matches('/').to_string(),
            users,
        })
    }

    /// Whether calls go through (the breaker to the gateway is not open).
    pub fn check(&self) -> Result<(), String> {
        match self.calls.breaker_state() {
            bazaar_kit::resilience::BreakerState::Open => Err("the breaker to the gateway is open".into()),
            _ => Ok(()),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// Sends a call and returns the body of a success, or the error in the answer.
    async fn exchange(
        &self,
        hop: Hop,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<bytes::Bytes, ApiError> {
        let (client, url) = match hop {
            Hop::Api => (&self.calls, self.url(path)),
            Hop::Watch => (&self.watch, self.url(path)),
            // Users' own routes have no `/api/v1` in front.
            Hop::Users => (&self.users, format!("{}{path}", self.users_base)),
        };
        let mut request = client.request(method, &url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = idempotency_key {
            request = request.header(bazaar_kit::client::IDEMPOTENCY_KEY, key);
        }
        let response = client
            .send(request)
            .await
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        if status.is_success() {
            return Ok(bytes);
        }
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let detail = answer["detail"]
            .as_str()
            .or_else(|| answer["message"].as_str())
            .unwrap_or_default()
            .to_string();
        Err(ApiError::Answered { status, detail })
    }

    /// A call whose answer is a `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        hop: Hop,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<T, ApiError> {
        let bytes = self.exchange(hop, method, path, token, body, idempotency_key).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Unexpected(format!("{path}: {e}")))
    }

    /// The catalogue.
    pub async fn products(&self) -> Result<Vec<Product>, ApiError> {
        self.call(Hop::Api, Method::GET, "/products?limit=200", None, None, None)
            .await
    }

    /// One product with its live stock.
    pub async fn product(&self, id: Uuid) -> Result<Product, ApiError> {
        self.call(Hop::Api, Method::GET, &format!("/products/{id}"), None, None, None)
            .await
    }

    /// Registers an address; a code is mailed to it.
    pub async fn register(&self, name: &str, email: &str, password: &str, phone: Option<&str>) -> Result<(), ApiError> {
        let body = serde_json::json!({"name": name, "email": email, "password": password, "phone": phone});
        self.call::<Value>(Hop::Users, Method::POST, "/users", None, Some(&body), None)
            .await
            .map(drop)
    }

    /// Opens the account with the mailed code and signs in.
    pub async fn confirm(&self, email: &str, password: &str, code: &str) -> Result<Token, ApiError> {
        let body = serde_json::json!({"email": email, "password": password, "code": code});
        self.call(Hop::Users, Method::POST, "/auth/verification", None, Some(&body), None)
            .await
    }

    /// Signs in.
    pub async fn sign_in(&self, email: &str, password: &str) -> Result<Token, ApiError> {
        let body = serde_json::json!({"email": email, "password": password});
        self.call(Hop::Users, Method::POST, "/auth/token", None, Some(&body), None)
            .await
    }

    /// Places an order; the same key places it once however often it is sent.
    pub async fn place_order(&self, token: &str, key: &str, lines: &[Line]) -> Result<Order, ApiError> {
        let body = serde_json::json!({ "items": lines });
        self.call(Hop::Api, Method::POST, "/orders", Some(token), Some(&body), Some(key))
            .await
    }

    /// The shopper's orders, newest first.
    pub async fn orders(&self, token: &str) -> Result<Vec<Order>, ApiError> {
        self.call(Hop::Api, Method::GET, "/orders?limit=100", Some(token), None, None)
            .await
    }

    /// One of the shopper's orders with its saga.
    pub async fn order(&self, token: &str, id: Uuid) -> Result<Order, ApiError> {
        self.call(Hop::Api, Method::GET, &format!("/orders/{id}"), Some(token), None, None)
            .await
    }

    /// Cancels one of the shopper's orders.
    pub async fn cancel_order(&self, token: &str, id: Uuid) -> Result<Order, ApiError> {
        let path = format!("/orders/{id}/cancellation");
        self.call(Hop::Api, Method::POST, &path, Some(token), None, None).await
    }

    /// The order once its saga has moved past `seen` history entries (or after a while).
    pub async fn watch_order(&self, token: &str, id: Uuid, seen: usize) -> Result<Order, ApiError> {
        let path = format!(
            "/orders/{id}?waitFor=change&seen={seen}&timeout={}",
            WATCH_WAIT.as_secs()
        );
        self.call(Hop::Watch, Method::GET, &path, Some(token), None, None).await
    }

    /// The shopper's wallet.
    pub async fn wallet(&self, token: &str) -> Result<Account, ApiError> {
        self.call(Hop::Api, Method::GET, "/accounts/me", Some(token), None, None)
            .await
    }

    /// Sagas in `status` (operators).
    pub async fn sagas(&self, token: &str, status: &str) -> Result<Vec<Saga>, ApiError> {
        let path = format!("/sagas?status={status}&limit=200");
        let mut sagas: Vec<Saga> = self.call(Hop::Api, Method::GET, &path, Some(token), None, None).await?;
        sagas.iter_mut().for_each(Saga::name_its_order);
        Ok(sagas)
    }

    /// A saga and its history (operators).
    pub async fn saga(&self, token: &str, id: Uuid) -> Result<SagaView, ApiError> {
        let mut view: SagaView = self
            .call(Hop::Api, Method::GET, &format!("/sagas/{id}"), Some(token), None, None)
            .await?;
        view.saga.name_its_order();
        Ok(view)
    }

    /// Sends an order's stuck saga on (operators): the order saga back to compensation, a
    /// cancellation forward.
    pub async fn retry_saga(&self, token: &str, id: Uuid) -> Result<(), ApiError> {
        self.exchange(
            Hop::Api,
            Method::POST,
            &format!("/sagas/{id}/retry"),
            Some(token),
            None,
            None,
        )
        .await
        .map(drop)
    }

    /// Receives (`delta` > 0) or writes off stock (operators).
    pub async fn restock(&self, token: &str, id: Uuid, delta: i64, reason: &str) -> Result<Product, ApiError> {
        let body = serde_json::json!({"delta": delta, "reason": reason});
        let path = format!("/products/{id}/stock");
        self.call(Hop::Api, Method::POST, &path, Some(token), Some(&body), None)
            .await
    }

    /// Adds a product to the catalogue (operators).
    pub async fn add_product(&self, token: &str, product: &Value) -> Result<Product, ApiError> {
        self.call(Hop::Api, Method::POST, "/products", Some(token), Some(product), None)
            .await
    }

    /// The dead letters `role` set aside (operators).
    pub async fn dead_letters(&self, token: &str, role: &str) -> Result<Vec<DeadLetter>, ApiError> {
        let path = format!("/deadletters/{role}");
        self.call(Hop::Api, Method::GET, &path, Some(token), None, None).await
    }

    /// Hands a dead letter back to `role`'s handler (operators); the answer's `outcome`.
    pub async fn replay(&self, token: &str, role: &str, topic: &str, seq: u64) -> Result<String, ApiError> {
        let path = format!("/deadletters/{role}/{topic}/{seq}/replay");
        let answer: Value = self
            .call(Hop::Api, Method::POST, &path, Some(token), None, None)
            .await?;
        Ok(answer["outcome"].as_str().unwrap_or("handled").to_string())
    }

    /// What was sent to the shopper.
    pub async fn notifications(&self, token: &str) -> Result<Vec<Notification>, ApiError> {
        self.call(
            Hop::Api,
            Method::GET,
            "/notifications?limit=100",
            Some(token),
            None,
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shoppers_read_sentences_not_statuses() {
        let answered = |status, detail: &str| ApiError::Answered {
            status,
            detail: detail.into(),
        };
        assert_eq!(
            answered(StatusCode::BAD_REQUEST, "password must be 8 to 1024 characters").words(),
            "Password must be 8 to 1024 characters."
        );
        assert!(answered(StatusCode::SERVICE_UNAVAILABLE, "saga backlog full")
            .words()
            .contains("busy"));
        assert!(!answered(StatusCode::UNAUTHORIZED, "bad token").words().contains("401"));
        assert!(ApiError::Unreachable("refused".into())
            .words()
            .contains("cannot be reached"));
    }
}
