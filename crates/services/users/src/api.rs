//! The users HTTP API: register, log in, who am I, and the token keys.

use bazaar_kit::store;
use std::{sync::Arc, time::Duration};

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    Extension, Router,
};
use bazaar_contracts::{topics, types, RegistrationRepeated, UserRegistered, VerificationRequested};
use bazaar_kit::{
    auth::{AdminUser, AuthUser, ADMIN},
    envelope::{Envelope, Metadata},
    http::{Json, Problem, RequestContext},
    openapi::OpenApiRouter,
    runtime::Runtime,
    store::{now_millis, Tx},
};
use serde::{Deserialize, Serialize};

use utoipa::ToSchema;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{
    keys::{KeyRing, TOKEN_TTL},
    throttle::{Attempt, LoginThrottle},
    verification,
};

/// What every handler shares: the runtime, the signing keys, the hashing limit and the
/// sign-in throttle.
#[derive(Clone)]
struct Users {
    rt: Runtime,
    keys: KeyRing,
    hashing: Hashing,
    throttle: LoginThrottle,
}

/// The API routes, on a key ring of the role's own store.
pub fn router(rt: Runtime) -> Router {
    let keys = KeyRing::new(rt.store.clone());
    routes(rt, keys)
}

/// The API routes signing with `keys`. Tokens are verified against the ring itself, not the
/// runtime's verifier (which would fetch this role's own JWKS over HTTP).
pub fn routes(rt: Runtime, keys: KeyRing) -> Router {
    routes_limited(rt, keys, HashingLimit::default())
}

/// [`routes`] hashing passwords under `limit`.
pub fn routes_limited(rt: Runtime, keys: KeyRing, limit: HashingLimit) -> Router {
    let verifier = keys.verifier();
    api().split_for_parts().0.layer(Extension(verifier)).with_state(Users {
        rt,
        keys,
        hashing: Hashing::new(limit),
        throttle: LoginThrottle::default(),
    })
}

/// The API's routes, each with the operation it documents.
fn api() -> OpenApiRouter<Users> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(me))
        .routes(routes!(token))
        .routes(routes!(confirm))
        .routes(routes!(rotate_keys))
        .routes(routes!(jwks))
}

/// The API's operations, for its OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ann@example.com", "name": "Ann", "password": "correct horse battery", "phone": "+14155550123"}))]
struct Registration {
    /// The address to confirm; the code goes there.
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// Display name (surrounding spaces are dropped; U+0085 counts as one, as Unicode says,
    /// though a JSON Schema `\s` does not).
    #[schema(max_length = 200, pattern = "[^\\s\\u0085]")]
    name: String,
    /// 8 to 1024 characters.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    /// A mobile number in international form (`+` and 8 to 15 digits; spaces and dashes
    /// between them are dropped), for texts.
    #[serde(default)]
    #[schema(pattern = "^\\+[ -]*([0-9][ -]*){8,15}$")]
    phone: Option<String>,
}

/// A mobile number in E.164 form: `+` and 8 to 15 digits (spaces and dashes dropped).
fn parse_phone(raw: &str) -> Result<String, Problem> {
    let phone: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let digits = phone.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
        Ok(phone)
    } else {
        Err(Problem::bad_request(format!(
            "`{raw}` is not a phone number in international form, such as +14155550123"
        )))
    }
}

/// How much password hashing (argon2id: 19 MiB and tens of milliseconds of CPU each) the
/// role does at once, and how long a request waits for a turn before it is turned away with
/// 503 and `Retry-After`: a flood of logins queues briefly and is then shed, instead of
/// growing threads and memory until the role falls over.
#[derive(Debug, Clone, Copy)]
pub struct HashingLimit {
    /// Hashes computed at once.
    pub concurrent: usize,
    /// Longest wait for a turn.
    pub wait: Duration,
}

impl Default for HashingLimit {
    /// One hash per core (at most four), two seconds' wait.
    fn default() -> HashingLimit {
        HashingLimit {
            concurrent: std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4),
            wait: Duration::from_secs(2),
        }
    }
}

/// Runs password work under a [`HashingLimit`].
#[derive(Clone)]
struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl Hashing {
    fn new(limit: HashingLimit) -> Hashing {
        Hashing {
            permits: Arc::new(tokio::sync::Semaphore::new(limit.concurrent.max(1))),
            wait: limit.wait,
        }
    }

    /// Runs `work` on the blocking pool once a turn is free, or sheds the request.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Problem> {
        let permit = match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(permit) => permit.map_err(Problem::internal)?,
            Err(_) => {
                metrics::counter!("bazaar_users_hashing_shed_total").increment(1);
                tracing::warn!("password hashing saturated; shedding a sign-in or registration");
                return Err(Problem::unavailable(
                    "too many sign-ins and registrations at once; nothing was changed, retry in a moment",
                ));
            }
        };
        tokio::task::spawn_blocking(move || {
            let _turn = permit;
            work()
        })
        .await
        .map_err(Problem::internal)
    }

    /// Hashes a password with argon2id.
    async fn hash(&self, password: String) -> Result<String, Problem> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(Problem::internal)
    }

    /// Whether `password` matches `hash`; with no hash (an unknown email) it checks against
    /// a stand-in, so the answer takes as long either way.
    async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, Problem> {
        self.run(move || {
            let stand_in = STAND_IN.get_or_init(|| {
                let salt = SaltString::generate(&mut OsRng);
                Argon2::default()
                    .hash_password(Uuid::new_v4().to_string().as_bytes(), &salt)
                    .map(|h| h.to_string())
                    .unwrap_or_default()
            });
            let known = hash.is_some();
            let hash = hash.as_deref().unwrap_or(stand_in);
            let matches = PasswordHash::new(hash)
                .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false);
            known && matches
        })
        .await
    }
}

/// The hash an unknown email's password is checked against (of a random password nobody has).
static STAND_IN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An email address, trimmed and lower-cased, with one `@` between non-empty parts.
#[derive(Debug, Clone, PartialEq)]
struct Email(String);

impl Email {
    fn parse(raw: &str) -> Result<Email, Problem> {
        let email = raw.trim().to_lowercase();
        let valid = email.len() <= 254
            && email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            })
            && !email.chars().any(char::is_whitespace)
            && email.matches('@').count() == 1;
        if valid {
            Ok(Email(email))
        } else {
            Err(Problem::bad_request(format!(
                "`{}` is not an email address",
                raw.trim()
            )))
        }
    }
}

/// A user as clients see it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct User {
    /// The user's id.
    #[schema(format = Uuid)]
    id: String,
    /// The confirmed address.
    email: String,
    /// Display name.
    name: String,
    /// Mobile number in E.164 form, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<String>,
    /// Roles (`admin` for operators).
    roles: Vec<String>,
}

/// What `POST /users` answers, whether the address was new, unconfirmed or taken: the same
/// status, body and (hashing the password every time) time, so it reveals no accounts.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct RegistrationAnswer {
    /// The address as stored (trimmed, lower-case).
    email: String,
    /// What to do next.
    detail: &'static str,
    /// Seconds the mailed code stays valid.
    code_expires_in: u64,
}

/// An access token.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct Token {
    /// The JWT (EdDSA) to send as `Authorization: Bearer …`.
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds until it expires.
    expires_in: u64,
    /// Whose it is.
    user_id: Uuid,
}

/// A new signing key.
#[derive(Debug, Serialize, ToSchema)]
struct Rotated {
    /// Its key id.
    kid: String,
    /// How many keys the JWKS publishes now.
    published: usize,
}

/// Registers an address: mails it a code that opens the account (`POST /auth/verification`).
/// The answer is the same whether the address is new, waiting or taken.
// One piece: one SQL transaction; each branch decides on the row read at its start
// (verified_at, codes_sent, codes_since), its updates are guarded by those same counts,
// and the code or notice goes into the outbox committed with it.
#[utoipa::path(post, path = "/users", tag = "users",
    responses((status = 202, description = "If the address can be registered, a code is on its way", body = RegistrationAnswer)))]
async fn register(
    State(Users { rt, hashing, .. }): State<Users>,
    Extension(ctx): Extension<RequestContext>,
    Json(body): Json<Registration>,
) -> Result<(StatusCode, Json<RegistrationAnswer>), Problem> {
    let email = Email::parse(&body.email)?;
    let phone = body.phone.as_deref().map(parse_phone).transpose()?;
    check_password(&body.password)?;
    let name = body.name.trim();
    check_name(name)?;
    let hash = hashing.hash(body.password).await?;
    let now = now_millis();
    let mut tx = rt.store.begin().await?;
    let existing = store::query("SELECT id, verified_at, codes_sent, codes_since FROM users WHERE email = $1")
        .bind(&email.0)
        .fetch_optional(&mut tx)
        .await?;
    let meta = metadata(&ctx);
    match existing {
        None => {
            let id = Uuid::now_v7();
            let code = verification::new_code().map_err(|_| Problem::internal("no randomness for a code"))?;
            let inserted = store::query(
                "INSERT INTO users (id, email, name, phone, roles, password_hash, created_at, code_hash, code_expires_at, code_failures, codes_sent, codes_since)
                 VALUES ($1, $2, $3, $4, '', $5, $6, $7, $8, 0, 1, $6) ON CONFLICT (email) DO NOTHING",
            )
            .bind(id.to_string())
            .bind(&email.0)
            .bind(name)
            .bind(phone)
            .bind(&hash)
            .bind(now)
            .bind(verification::code_hash(&code))
            .bind(now + verification::CODE_LIFETIME.as_millis() as i64)
            .execute(&mut tx)
            .await?;
            // Zero rows: a registration of the same address committed a moment ago and sent a code.
            if inserted.rows_affected() == 1 {
                send_code(&rt, &mut tx, id, &email, name, code, meta).await?;
            }
        }
        Some(row) => {
            let id: Uuid = row.try_get::<String, _>("id")?.parse().map_err(Problem::internal)?;
            let verified = row.try_get::<Option<i64>, _>("verified_at")?.is_some();
            let (old_sent, old_since): (i64, i64) = (row.try_get("codes_sent")?, row.try_get("codes_since")?);
            match verification::may_send(old_sent, old_since, now) {
                None if verified => {
                    tracing::info!(user = %id, "registration for an address sent its hourly limit of messages; nothing sent")
                }
                None => {
                    // Over the limit no new code is sent, but the password is still the latest
                    // registrant's: whoever spends an address's messages cannot keep its owner,
                    // who holds the codes already sent, from opening it with their own.
                    store::query(
                        "UPDATE users SET name = $1, phone = $2, password_hash = $3 WHERE id = $4 AND verified_at IS NULL",
                    )
                    .bind(name)
                    .bind(phone)
                    .bind(&hash)
                    .bind(id.to_string())
                    .execute(&mut tx)
                    .await?;
                }
                Some((since, sent)) if verified => {
                    // Conditional on the counts read: of two racing registrations one sends.
                    let counted = store::query(
                        "UPDATE users SET codes_sent = $1, codes_since = $2 WHERE id = $3 AND codes_sent = $4 AND codes_since = $5",
                    )
                    .bind(sent)
                    .bind(since)
                    .bind(id.to_string())
                    .bind(old_sent)
                    .bind(old_since)
                    .execute(&mut tx)
                    .await?;
                    if counted.rows_affected() == 0 {
                        rt.outbox.commit(tx).await?;
                        return Ok(registration_answer(email));
                    }
                    let notice = RegistrationRepeated {
                        user_id: id,
                        email: email.0.clone(),
                    };
                    let event = Envelope::new(types::USER_REGISTRATION_REPEATED, id.to_string(), notice, meta);
                    rt.outbox.add(&mut tx, topics::USERS_EVENTS, &event).await?;
                }
                Some((since, sent)) => {
                    // Not confirmed yet: whoever registers it now chooses the password, and
                    // only the mailbox's owner receives the code that opens it.
                    let code = verification::new_code().map_err(|_| Problem::internal("no randomness for a code"))?;
                    let replaced = store::query(
                        "UPDATE users SET name = $1, phone = $2, password_hash = $3, code_hash = $4, code_expires_at = $5,
                         code_failures = 0, codes_sent = $6, codes_since = $7
                         WHERE id = $8 AND verified_at IS NULL AND codes_sent = $9 AND codes_since = $10",
                    )
                    .bind(name)
                    .bind(phone)
                    .bind(&hash)
                    .bind(verification::code_hash(&code))
                    .bind(now + verification::CODE_LIFETIME.as_millis() as i64)
                    .bind(sent)
                    .bind(since)
                    .bind(id.to_string())
                    .bind(old_sent)
                    .bind(old_since)
                    .execute(&mut tx)
                    .await?;
                    // Zero rows: a registration (or a confirmation) of this address committed
                    // since it was read; answering alike, this one changes nothing.
                    if replaced.rows_affected() == 1 {
                        send_code(&rt, &mut tx, id, &email, name, code, meta).await?;
                    }
                }
            }
        }
    }
    rt.outbox.commit(tx).await?;
    Ok(registration_answer(email))
}

/// What every registration is answered, whatever became of it.
fn registration_answer(email: Email) -> (StatusCode, Json<RegistrationAnswer>) {
    metrics::counter!("bazaar_users_registrations_total").increment(1);
    (
        StatusCode::ACCEPTED,
        Json(RegistrationAnswer {
            email: email.0,
            detail: "if this address can be registered, a confirmation code is on its way to it: send it with \
                     the address and password to POST /api/v1/auth/verification to open the account",
            code_expires_in: verification::CODE_LIFETIME.as_secs(),
        }),
    )
}

fn check_password(password: &str) -> Result<(), Problem> {
    if password.chars().count() < 8 {
        return Err(Problem::bad_request("password must be at least 8 characters"));
    }
    if password.chars().count() > 1024 {
        return Err(Problem::bad_request("password must be at most 1024 characters"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), Problem> {
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Problem::bad_request("name must be 1 to 200 characters"));
    }
    Ok(())
}

/// The metadata of an event caused by the request `ctx`.
fn metadata(ctx: &RequestContext) -> Metadata {
    Metadata {
        correlation_id: ctx.correlation_id.clone(),
        traceparent: ctx.traceparent.clone(),
        source: crate::SERVICE.name.into(),
        ..Metadata::default()
    }
}

/// Asks notifications to mail `code` to `email`, in the transaction that stored its hash.
async fn send_code(
    rt: &Runtime,
    tx: &mut Tx,
    id: Uuid,
    email: &Email,
    name: &str,
    code: String,
    meta: Metadata,
) -> Result<(), Problem> {
    let request = VerificationRequested {
        user_id: id,
        email: email.0.clone(),
        name: name.to_string(),
        code,
        valid_minutes: (verification::CODE_LIFETIME.as_secs() / 60) as i64,
    };
    let event = Envelope::new(types::USER_VERIFICATION_REQUESTED, id.to_string(), request, meta);
    rt.outbox.add(tx, topics::USERS_EVENTS, &event).await?;
    Ok(())
}

/// Opens the account `row` (confirmed at `now`) and announces `user.registered` in `tx`;
/// false when it was not waiting as `unchanged` says.
async fn open_account(
    rt: &Runtime,
    tx: &mut Tx,
    row: &store::Row,
    now: i64,
    meta: Metadata,
    unchanged: Option<(&str, &str)>,
) -> Result<bool, Problem> {
    let id: String = row.try_get("id")?;
    // With `unchanged` (the password and code hashes that were checked), only an account
    // still waiting with exactly those opens: of two racing confirmations one announces it,
    // and a registration that replaced the password meanwhile wins over a stale check.
    let (password_hash, code_hash) = unchanged.unwrap_or_default();
    let updated = store::query(
        "UPDATE users SET verified_at = $1, code_hash = NULL, code_expires_at = NULL
         WHERE id = $2 AND verified_at IS NULL
           AND ($3 = 0 OR (password_hash = $4 AND code_hash = $5 AND code_failures <= $6 AND code_expires_at > $1))",
    )
    .bind(now)
    .bind(&id)
    .bind(i64::from(unchanged.is_some()))
    .bind(password_hash)
    .bind(code_hash)
    .bind(verification::GUESSES)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(false);
    }
    let event = Envelope::new(
        types::USER_REGISTERED,
        id.clone(),
        UserRegistered {
            user_id: id.parse().map_err(Problem::internal)?,
            email: row.try_get("email")?,
            name: row.try_get("name")?,
            phone: row.try_get("phone")?,
        },
        meta,
    );
    rt.outbox.add(tx, topics::USERS_EVENTS, &event).await?;
    metrics::counter!("bazaar_users_registered_total").increment(1);
    Ok(true)
}

/// Creates the operator account `email` with the admin role, confirmed, unless it exists.
pub(crate) async fn ensure_admin(rt: &Runtime, email: &str, password: &str) -> Result<(), Problem> {
    let email = Email::parse(email)?;
    let exists = store::query("SELECT 1 AS one FROM users WHERE email = $1")
        .bind(&email.0)
        .fetch_optional(&rt.store)
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    if password.chars().count() < 8 {
        return Err(Problem::bad_request("the admin password must be at least 8 characters"));
    }
    let hash = Hashing::new(HashingLimit::default()).hash(password.to_string()).await?;
    let now = now_millis();
    let mut tx = rt.store.begin().await?;
    let inserted = store::query(
        "INSERT INTO users (id, email, name, phone, roles, password_hash, created_at, code_failures, codes_sent, codes_since)
         VALUES ($1, $2, 'Administrator', NULL, $3, $4, $5, 0, 0, 0) ON CONFLICT (email) DO NOTHING",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(&email.0)
    .bind(ADMIN)
    .bind(&hash)
    .bind(now)
    .execute(&mut tx)
    .await?;
    // Zero rows: another instance created it at the same moment.
    if inserted.rows_affected() == 1 {
        let row = store::query("SELECT id, email, name, phone FROM users WHERE email = $1")
            .bind(&email.0)
            .fetch_one(&mut tx)
            .await?;
        let ctx = RequestContext {
            correlation_id: Uuid::now_v7().to_string(),
            traceparent: None,
        };
        open_account(rt, &mut tx, &row, now, metadata(&ctx), None).await?;
    }
    rt.outbox.commit(tx).await?;
    Ok(())
}

/// The body of `POST /auth/token`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ann@example.com", "password": "correct horse battery"}))]
struct Login {
    /// The account's address.
    email: String,
    /// Its password.
    password: String,
}

/// The body of `POST /auth/verification`: a login with the code that was mailed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ann@example.com", "password": "correct horse battery", "code": "482913"}))]
struct Confirmation {
    /// The registered address.
    email: String,
    /// The password given at registration.
    password: String,
    /// The six-digit code mailed to the address.
    code: String,
}

/// The stored account an address names, if any, and whether `password` is its password,
/// under the per-account throttle. An unknown or malformed address is checked against a
/// stand-in hash and throttled alike, so neither the answer nor its timing says which
/// addresses are registered.
async fn check_credentials(
    users: &Users,
    email: &str,
    password: String,
) -> Result<(Option<store::Row>, Attempt), Problem> {
    let key = email.trim().to_lowercase();
    // No address is longer; refused before it takes a place in the throttle's memory.
    if key.len() > 254 {
        return Err(sign_in_refused());
    }
    let attempt = users.throttle.admit(&key).map_err(|t| {
        metrics::counter!("bazaar_users_login_throttled_total").increment(1);
        Problem::too_many(
            format!(
                "too many sign-in attempts for this account; try again in {} s",
                t.retry_after.as_secs().max(1)
            ),
            t.retry_after,
        )
    })?;
    if password.chars().count() > 1024 {
        attempt.matched(false);
        return Err(sign_in_refused());
    }
    let row = match Email::parse(email) {
        Ok(email) => store::query(
            "SELECT id, email, name, phone, roles, password_hash, verified_at, code_hash, code_expires_at, code_failures
             FROM users WHERE email = $1",
        )
        .bind(&email.0)
        .fetch_optional(&users.rt.store)
        .await?,
        Err(_) => None,
    };
    let hash = row
        .as_ref()
        .map(|r| r.try_get::<String, _>("password_hash"))
        .transpose()?;
    // A shed or failed hash says nothing about the password: the attempt is dropped uncounted.
    if users.hashing.verify(hash, password).await? {
        Ok((row, attempt))
    } else {
        attempt.matched(false);
        Err(sign_in_refused())
    }
}

/// Logs in: checks the password and issues an access token.
#[utoipa::path(post, path = "/auth/token", tag = "auth",
    responses((status = 200, description = "A token", body = Token),
        (status = 401, description = "The address and password match no open account"),
        (status = 429, description = "Too many failed sign-ins for this address; wait `Retry-After` seconds")))]
async fn token(State(users): State<Users>, Json(body): Json<Login>) -> Result<Json<Token>, Problem> {
    let (row, attempt) = check_credentials(&users, &body.email, body.password).await?;
    let row = row.ok_or_else(|| Problem::internal("a password matched no account"))?;
    if row.try_get::<Option<i64>, _>("verified_at")?.is_none() {
        // Answered, and throttled, exactly as a wrong password: anyone may register an address
        // with a password of their choosing, and a different answer here would then tell them
        // whether it already had an account.
        attempt.matched(false);
        return Err(sign_in_refused());
    }
    attempt.matched(true);
    issue(&users.keys, &row).await
}

/// The one answer to a sign-in that does not open an account, whatever the reason.
fn sign_in_refused() -> Problem {
    Problem::unauthorized(
        "unknown email or wrong password, or an address not confirmed yet (send the code mailed to it, \
         with the address and password, to POST /api/v1/auth/verification)",
    )
}

/// Confirms an address with the code mailed to it and the account's password, opening the
/// account, and logs in. Sent again for an open account, it is a login.
#[utoipa::path(post, path = "/auth/verification", tag = "auth",
    responses((status = 200, description = "The account is open; a token for it", body = Token),
        (status = 401, description = "The code, address and password match no account waiting for confirmation")))]
async fn confirm(
    State(users): State<Users>,
    Extension(ctx): Extension<RequestContext>,
    Json(body): Json<Confirmation>,
) -> Result<Json<Token>, Problem> {
    let refused = || {
        Problem::unauthorized("that code, address and password do not match an account waiting for confirmation; register again for a new code")
    };
    let (row, attempt) = match check_credentials(&users, &body.email, body.password).await {
        Err(p) if p.status == 401 => return Err(refused()),
        other => other?,
    };
    let row = row.ok_or_else(|| Problem::internal("a password matched no account"))?;
    if row.try_get::<Option<i64>, _>("verified_at")?.is_none() {
        let id: String = row.try_get("id")?;
        let now = now_millis();
        let stored: Option<String> = row.try_get("code_hash")?;
        // Every guess spends one of the code's five before it is compared, conditional on one
        // being left and the code alive: guesses sent at once (to any replica) each spend
        // their own, so no more than five are ever compared against one code.
        let spent = store::query(
            "UPDATE users SET code_failures = code_failures + 1
             WHERE id = $1 AND verified_at IS NULL AND code_failures < $2 AND code_expires_at > $3",
        )
        .bind(&id)
        .bind(verification::GUESSES)
        .bind(now)
        .execute(&users.rt.store)
        .await?;
        if spent.rows_affected() == 0 || stored.as_deref() != Some(verification::code_hash(&body.code).as_str()) {
            attempt.matched(false);
            return Err(refused());
        }
        let password_hash: String = row.try_get("password_hash")?;
        let mut tx = users.rt.store.begin().await?;
        let opened = open_account(
            &users.rt,
            &mut tx,
            &row,
            now,
            metadata(&ctx),
            Some((&password_hash, stored.as_deref().unwrap_or_default())),
        )
        .await?;
        users.rt.outbox.commit(tx).await?;
        if !opened {
            // Another confirmation opened it a moment ago (fine: the same password), or a
            // registration replaced the password and code since they were checked (refused).
            let now_stored = store::query("SELECT verified_at, password_hash FROM users WHERE id = $1")
                .bind(&id)
                .fetch_optional(&users.rt.store)
                .await?;
            let same = match &now_stored {
                Some(r) => {
                    r.try_get::<Option<i64>, _>("verified_at")?.is_some()
                        && r.try_get::<String, _>("password_hash")? == password_hash
                }
                None => false,
            };
            if !same {
                attempt.matched(false);
                return Err(refused());
            }
        }
    }
    attempt.matched(true);
    issue(&users.keys, &row).await
}

/// An access token for the account `row`.
async fn issue(keys: &KeyRing, row: &store::Row) -> Result<Json<Token>, Problem> {
    let id: String = row.try_get("id")?;
    let email: String = row.try_get("email")?;
    let roles = split_roles(&row.try_get::<String, _>("roles")?);
    let user: Uuid = id.parse().map_err(Problem::internal)?;
    let token = keys
        .signer()
        .await?
        .issue(user, &email, &roles, TOKEN_TTL)
        .map_err(Problem::internal)?;
    Ok(Json(Token {
        access_token: token,
        token_type: "Bearer",
        expires_in: TOKEN_TTL.as_secs(),
        user_id: user,
    }))
}

/// The public keys tokens are verified with (RFC 7517). Verifiers reload it when a token
/// names a key they have not seen, so a minute of caching is safe.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "The keys that verify tokens", body = bazaar_kit::auth::Jwks)))]
async fn jwks(State(Users { keys, .. }): State<Users>) -> Result<impl IntoResponse, Problem> {
    let jwks = keys.jwks().await?;
    Ok(([(header::CACHE_CONTROL, "public, max-age=60")], Json(jwks)))
}

/// Starts signing with a new key now (an operator suspects the old one leaked, or tests a
/// rotation); tokens already issued keep working until they expire.
#[utoipa::path(post, path = "/auth/keys", tag = "auth", security(("bearer" = ["admin"])),
    responses((status = 201, description = "Signing with the new key", body = Rotated)))]
async fn rotate_keys(
    State(Users { keys, .. }): State<Users>,
    _admin: AdminUser,
) -> Result<(StatusCode, Json<Rotated>), Problem> {
    let kid = keys.rotate().await?;
    let published = keys.jwks().await?.keys.len();
    Ok((StatusCode::CREATED, Json(Rotated { kid, published })))
}

fn split_roles(stored: &str) -> Vec<String> {
    stored
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect()
}

/// The caller's account.
#[utoipa::path(get, path = "/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, description = "The account", body = User),
        (status = 404, description = "The account no longer exists")))]
async fn me(State(Users { rt, .. }): State<Users>, AuthUser(claims): AuthUser) -> Result<Json<User>, Problem> {
    let row = store::query("SELECT id, email, name, phone, roles FROM users WHERE id = $1")
        .bind(claims.sub.to_string())
        .fetch_optional(&rt.store)
        .await?
        .ok_or_else(|| Problem::not_found("your account no longer exists"))?;
    Ok(Json(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        phone: row.try_get("phone")?,
        roles: split_roles(&row.try_get::<String, _>("roles")?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_junk_refused() {
        assert_eq!(Email::parse(" Ann@Example.COM ").unwrap().0, "ann@example.com");
        for bad in ["", "ann", "ann@", "@x.io", "a@b", "a b@c.io", "a@@c.io", "a@.io"] {
            assert!(Email::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn phones_must_be_international() {
        assert_eq!(parse_phone("+1 415-555-0123").unwrap(), "+14155550123");
        for bad in ["4155550123", "+12", "+1415555012345678", "+1415abc0123"] {
            assert!(parse_phone(bad).is_err(), "{bad} accepted");
        }
    }
}
