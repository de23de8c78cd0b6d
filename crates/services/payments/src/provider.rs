//! The adapter to an outside payment provider with a Stripe-like API, behind the kit's
//! outbound client stack (timeout, budgeted retries, breaker, bulkhead).
//!
//! Every call carries an idempotency key derived from the order (`<order id>` for the
//! charge, `refund-<order id>` for the refund), so a retry inside the stack, or a whole
//! redelivery of the command after a crash, gets the first answer back instead of charging
//! twice.

use std::time::Duration;

use bazaar_kit::{
    client::{ClientError, ClientPolicy, HttpClient, IDEMPOTENCY_KEY},
    resilience::{BreakerConfig, BreakerState},
};
use serde::{Deserialize, Serialize};

/// Why the provider gave no usable answer; each is worth retrying later.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No answer: down, too slow, breaker open or too many calls in flight.
    #[error("payment provider unavailable: {0}")]
    Unavailable(#[from] ClientError),
    /// An answer that is not a result (after the stack's retries).
    #[error("payment provider answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// A 200 whose body is not the expected shape.
    #[error("payment provider answer unreadable: {0}")]
    Malformed(String),
}

/// A charge to make.
#[derive(Debug, Clone, Serialize)]
pub struct ChargeRequest {
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// The customer's id.
    pub customer: String,
    /// Shown on the customer's statement.
    pub description: String,
}

/// The provider's verdict on a charge.
#[derive(Debug, Clone, Deserialize)]
pub struct Charge {
    /// The provider's charge id (`ch_…`).
    pub id: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Why a failed charge failed.
    #[serde(default)]
    pub failure_message: Option<String>,
}

impl Charge {
    /// True when the money was taken.
    pub fn succeeded(&self) -> bool {
        self.status == "succeeded"
    }
}

/// A refund the provider made.
#[derive(Debug, Clone, Deserialize)]
pub struct Refund {
    /// The provider's refund id (`re_…`).
    pub id: String,
    /// `succeeded` when the money is on its way back.
    pub status: String,
}

/// The client policy for the provider: 2 s per attempt and at most two retries; past that
/// the settler asks again later. Calls run outside any store transaction (a session idle in
/// one for 5 s is ended), between the settler's claim and its settling transaction.
pub fn default_policy() -> ClientPolicy {
    ClientPolicy {
        timeout: Duration::from_secs(2),
        max_retries: 2,
        breaker: BreakerConfig {
            window: 20,
            min_calls: 5,
            failure_rate: 0.5,
            open_for: Duration::from_secs(10),
            half_open_probes: 2,
            slow_call: Duration::from_secs(1),
            slow_call_rate: 0.8,
        },
        max_in_flight: 16,
        queue_wait: Duration::from_millis(500),
        ..ClientPolicy::default()
    }
}

/// A payment provider at a base URL.
#[derive(Debug, Clone)]
pub struct PaymentProvider {
    http: HttpClient,
    base: String,
}

impl PaymentProvider {
    /// The provider at `base_url` (e.g. `http://127.0.0.1:8106`) with [`default_policy`].
    pub fn new(base_url: &str) -> Result<PaymentProvider, ProviderError> {
        Self::with_policy(base_url, default_policy())
    }

    /// The provider at `base_url` with its own client policy.
    pub fn with_policy(base_url: &str, policy: ClientPolicy) -> Result<PaymentProvider, ProviderError> {
        Ok(PaymentProvider {
            http: HttpClient::new("payment-provider", policy)?,
            base: base_url.trim_end_matches('/').to_string(),
        })
    }

    /// The provider at `base_url` reached with `client` (a mesh client: the simulator on the
    /// mesh), with [`default_policy`].
    pub fn with_client(base_url: &str, client: reqwest::Client) -> PaymentProvider {
        PaymentProvider {
            http: HttpClient::with_client("payment-provider", default_policy(), client),
            base: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// Charges `request` once per `key`: a repeat of the key answers the first charge.
    pub async fn charge(&self, key: &str, request: &ChargeRequest) -> Result<Charge, ProviderError> {
        let call = self
            .http
            .post(&format!("{}/v1/charges", self.base))
            .header(IDEMPOTENCY_KEY, key)
            .json(request);
        self.answer(call).await
    }

    /// Refunds the charge `charge` once per `key`.
    pub async fn refund(&self, key: &str, charge: &str) -> Result<Refund, ProviderError> {
        let call = self
            .http
            .post(&format!("{}/v1/refunds", self.base))
            .header(IDEMPOTENCY_KEY, key)
            .json(&serde_json::json!({ "charge": charge }));
        self.answer(call).await
    }

    async fn answer<T: serde::de::DeserializeOwned>(&self, call: reqwest::RequestBuilder) -> Result<T, ProviderError> {
        let response = self.http.send(call).await?;
        let status = response.status();
        if !status.is_success() {
            let mut body = response.text().await.unwrap_or_default();
            body.truncate(300);
            return Err(ProviderError::Status {
                status: status.as_u16(),
                body,
            });
        }
        response
            .json()
            .await
            .map_err(|e| ProviderError::Malformed(e.to_string()))
    }

    /// Health: down while the provider's breaker is open.
    pub fn check(&self) -> Result<(), String> {
        match self.http.breaker_state() {
            BreakerState::Open => Err("payment provider circuit open after repeated failures".into()),
            BreakerState::Closed | BreakerState::HalfOpen => Ok(()),
        }
    }

    /// The provider's breaker state.
    pub fn breaker_state(&self) -> BreakerState {
        self.http.breaker_state()
    }
}
