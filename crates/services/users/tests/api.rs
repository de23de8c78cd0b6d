//! The users HTTP API, called in-process through the router the role serves (no socket):
//! registering answers 202 and has a code mailed; confirming it with the password opens the
//! account and announces `user.registered` exactly once (in the same transaction, through the
//! outbox); a taken address answers the same as a new one, in the same time; what
//! registration refuses (a malformed email, a short password, a phone not in international form, an empty
//! name, unknown or missing fields, a body that is not JSON) is a 4xx
//! `application/problem+json` naming the field, storing and announcing nothing; logging in
//! returns a Bearer token whose claims name the user, and refuses a wrong password and an
//! unknown email alike; `GET /users/me` needs a token and shows the caller.

mod support;

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use bazaar_contracts::{topics, types, RegistrationRepeated, UserRegistered, VerificationRequested};
use bazaar_kit::{
    auth::{Jwks, KeySet, ISSUER, JWKS_PATH},
    http::CORRELATION_HEADER,
};
use bazaar_testkit::TestRole;
use bazaar_users::keys::TOKEN_TTL;
use serde_json::json;
use support::{registration, start, PASSWORD};
use uuid::Uuid;

#[tokio::test]
async fn registering_mails_a_code_and_opens_the_account_only_when_it_is_confirmed() {
    let users = start().await;
    let body = registration(" Ann@Example.COM ", "  Ann Smith ", PASSWORD, Some("+1 415-555-0123"));
    let request = TestRole::request(
        Method::POST,
        "/users",
        None,
        &[(CORRELATION_HEADER, "reg-test-1")],
        Some(&body),
    );
    let answer = users.send(request).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    assert!(answer.content_type().starts_with("application/json"));
    assert_eq!(answer.body["email"], "ann@example.com");
    assert_eq!(answer.body["codeExpiresIn"], 24 * 3600);
    assert!(answer.body["detail"].as_str().unwrap().contains("/auth/verification"));

    // A code goes to the address, and nothing else happens yet.
    let announced = users.announced().await;
    assert_eq!(announced.len(), 1, "one event: {announced:?}");
    let (topic, event) = &announced[0];
    assert_eq!(topic, topics::USERS_EVENTS);
    assert_eq!(event.event_type, types::USER_VERIFICATION_REQUESTED);
    assert_eq!(event.metadata.correlation_id, "reg-test-1");
    let sent: VerificationRequested = event.payload_as().expect("a verification payload");
    assert_eq!(
        (sent.email.as_str(), sent.name.as_str()),
        ("ann@example.com", "Ann Smith")
    );
    assert!(sent.code.len() == 6 && sent.code.chars().all(|c| c.is_ascii_digit()));
    assert!(
        users.registrations().await.is_empty(),
        "no wallet or welcome before confirmation"
    );

    // Signing in before confirming is refused as a wrong password is (so registering an
    // address with a password of one's own says nothing of an account behind it), with
    // what to do; a wrong code opens nothing.
    let detail = users
        .login("ann@example.com", PASSWORD)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("POST /api/v1/auth/verification"), "{detail}");
    let wrong_password = users.login("ann@example.com", "not the password").await;
    assert_eq!(wrong_password.problem(StatusCode::UNAUTHORIZED), detail);
    let wrong = if sent.code == "000000" { "000001" } else { "000000" };
    users
        .confirm("ann@example.com", PASSWORD, wrong)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    // The right code with the wrong password opens nothing either.
    users
        .confirm("ann@example.com", "not the password", &sent.code)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(users.registrations().await.is_empty());

    let opened = users
        .confirm("Ann@example.com", PASSWORD, &sent.code)
        .await
        .expect(StatusCode::OK);
    assert_eq!(opened["tokenType"], "Bearer", "confirming signs in: {opened}");
    let id: Uuid = opened["userId"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        users.registrations().await,
        vec![UserRegistered {
            user_id: id,
            email: "ann@example.com".into(),
            name: "Ann Smith".into(),
            phone: Some("+14155550123".into()),
        }],
        "trimmed, lower-cased, phone in E.164"
    );
    // Confirming again (a retry after a lost answer) signs in and announces nothing more.
    users
        .confirm("ann@example.com", PASSWORD, &sent.code)
        .await
        .expect(StatusCode::OK);
    users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
    assert_eq!(users.registrations().await.len(), 1, "announced once");
}

#[tokio::test]
async fn a_user_without_a_phone_is_announced_without_one() {
    let users = start().await;
    let user = users.register("bob@example.com").await;
    assert!(user.get("phone").is_none(), "{user}");
    let registered = users.registrations().await;
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].phone, None);
    assert_eq!(registered[0].email, "bob@example.com");
    assert_eq!(registered[0].name, "Ann");
}

#[tokio::test]
async fn registering_a_taken_address_answers_as_a_new_one_does_and_tells_only_its_owner() {
    let users = start().await;
    users.register("ann@example.com").await;
    let fresh = users
        .post_user(registration("bob@example.com", "Bob", PASSWORD, None))
        .await
        .expect(StatusCode::ACCEPTED);

    let again = users
        .post_user(registration(
            " ANN@example.com",
            "Another Ann",
            "another password",
            None,
        ))
        .await
        .expect(StatusCode::ACCEPTED);
    let mut as_new = fresh.clone();
    as_new["email"] = json!("ann@example.com");
    assert_eq!(again, as_new, "the same answer as for an address nobody has");
    // The owner is told; the account and its password are untouched.
    let notices: Vec<_> = users
        .announced()
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == types::USER_REGISTRATION_REPEATED)
        .collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(
        notices[0].1.payload_as::<RegistrationRepeated>().unwrap().email,
        "ann@example.com"
    );
    assert_eq!(users.codes_sent("ann@example.com").await.len(), 1, "no new code");
    users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
    users
        .login("ann@example.com", "another password")
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert_eq!(users.registrations().await.len(), 1, "announced once");
}

#[tokio::test]
async fn whoever_squats_an_unconfirmed_address_loses_it_to_the_mailbox_owner() {
    let users = start().await;
    // Mallory registers Ann's address first; only Ann's mailbox gets the code.
    users
        .post_user(registration("ann@example.com", "Mallory", "mallory's password", None))
        .await
        .expect(StatusCode::ACCEPTED);
    let mallorys_code = users.code_for("ann@example.com").await.unwrap();
    // Ann registers too: her password replaces Mallory's, and a new code voids the old one.
    users
        .post_user(registration("ann@example.com", "Ann", PASSWORD, None))
        .await
        .expect(StatusCode::ACCEPTED);
    let code = users.code_for("ann@example.com").await.unwrap();
    users
        .confirm("ann@example.com", "mallory's password", &code)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    if mallorys_code != code {
        users
            .confirm("ann@example.com", PASSWORD, &mallorys_code)
            .await
            .problem(StatusCode::UNAUTHORIZED);
    }
    users
        .confirm("ann@example.com", PASSWORD, &code)
        .await
        .expect(StatusCode::OK);
    assert_eq!(users.registrations().await[0].name, "Ann");
}

#[tokio::test]
async fn spending_an_addresss_hourly_messages_does_not_keep_its_owner_out() {
    let users = start().await;
    // Mallory registers Ann's address until no more codes are sent this hour.
    for _ in 0..4 {
        users
            .post_user(registration("ann@example.com", "Mallory", "mallory's password", None))
            .await
            .expect(StatusCode::ACCEPTED);
    }
    let code = users.code_for("ann@example.com").await.unwrap();
    // Ann registers: no new code is sent, but her password replaces Mallory's, so the code
    // already in her mailbox opens the account for her and not for Mallory.
    users
        .post_user(registration("ann@example.com", "Ann", PASSWORD, None))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(
        users.codes_sent("ann@example.com").await.len(),
        3,
        "no message past the limit"
    );
    users
        .confirm("ann@example.com", "mallory's password", &code)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    users
        .confirm("ann@example.com", PASSWORD, &code)
        .await
        .expect(StatusCode::OK);
    assert_eq!(users.registrations().await[0].name, "Ann");
}

/// Registers Ann; her code, and a code that is not hers.
async fn ann_registered(users: &support::Users) -> (String, String) {
    users
        .post_user(registration("ann@example.com", "Ann", PASSWORD, None))
        .await
        .expect(StatusCode::ACCEPTED);
    let code = users.code_for("ann@example.com").await.unwrap();
    let wrong = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
    (code, wrong)
}

#[tokio::test]
async fn a_code_dies_after_five_wrong_guesses() {
    let users = start().await;
    let (code, wrong) = ann_registered(&users).await;
    for _ in 0..5 {
        let answer = users.confirm("ann@example.com", PASSWORD, &wrong).await;
        assert!(
            answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::TOO_MANY_REQUESTS,
            "{:?}",
            answer.body
        );
    }
    // Wait out any sign-in lock the guesses earned, then even the right code is refused.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let detail = users
        .confirm("ann@example.com", PASSWORD, &code)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("register again"), "{detail}");
    assert!(users.registrations().await.is_empty());
}

#[tokio::test]
async fn guesses_sent_at_once_never_compare_more_than_five_against_a_code() {
    let users = start().await;
    let (_, wrong) = ann_registered(&users).await;
    for _ in 0..4 {
        users
            .confirm("ann@example.com", PASSWORD, &wrong)
            .await
            .problem(StatusCode::UNAUTHORIZED);
    }
    // The fifth and a sixth at once: both read four guesses spent, only one may be compared.
    futures_util::future::join(
        users.confirm("ann@example.com", PASSWORD, &wrong),
        users.confirm("ann@example.com", PASSWORD, &wrong),
    )
    .await;
    let spent: i64 = bazaar_kit::store::query("SELECT code_failures FROM users WHERE email = 'ann@example.com'")
        .fetch_scalar(&users.rt.store)
        .await
        .expect("the account");
    assert_eq!(spent, 5, "guesses compared against the code");
}

#[tokio::test]
async fn an_address_is_sent_at_most_three_codes_an_hour() {
    let users = start().await;
    for _ in 0..5 {
        users
            .post_user(registration("ann@example.com", "Ann", PASSWORD, None))
            .await
            .expect(StatusCode::ACCEPTED);
    }
    assert_eq!(users.codes_sent("ann@example.com").await.len(), 3);
}

#[tokio::test]
async fn an_invalid_email_is_refused_naming_the_email() {
    let users = start().await;
    for email in [
        "",
        "ann",
        "ann@",
        "@example.com",
        "ann@example",
        "a b@example.com",
        "a@@example.com",
    ] {
        let detail = users
            .post_user(registration(email, "Ann", PASSWORD, None))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("email"), "{email}: {detail}");
    }
    users.nothing_registered().await;
}

#[tokio::test]
async fn a_password_shorter_than_8_characters_is_refused_naming_the_password() {
    let users = start().await;
    // Seven characters, even when they take more than eight bytes.
    for password in ["", "1234567", "ééééééé"] {
        let detail = users
            .post_user(registration("ann@example.com", "Ann", password, None))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("password") && detail.contains("8"), "{detail}");
    }
    users.nothing_registered().await;
}

#[tokio::test]
async fn a_password_too_long_is_refused_saying_so() {
    let users = start().await;
    let detail = users
        .post_user(registration("ann@example.com", "Ann", &"x".repeat(1025), None))
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(
        detail.contains("password") && detail.contains("at most 1024"),
        "{detail}"
    );
    users.nothing_registered().await;
}

#[tokio::test]
async fn a_phone_not_in_international_form_is_refused_naming_the_phone() {
    let users = start().await;
    for phone in ["4155550123", "+12", "+1415abc0123", "+1234567890123456"] {
        let detail = users
            .post_user(registration("ann@example.com", "Ann", PASSWORD, Some(phone)))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("phone number") && detail.contains(phone), "{detail}");
    }
    users.nothing_registered().await;
}

#[tokio::test]
async fn an_empty_name_is_refused_naming_the_name() {
    let users = start().await;
    for name in ["", "   "] {
        let detail = users
            .post_user(registration("ann@example.com", name, PASSWORD, None))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("name"), "{detail}");
    }
    users.nothing_registered().await;
}

#[tokio::test]
async fn a_registration_cannot_carry_unknown_fields_such_as_roles() {
    let users = start().await;
    for field in ["roles", "isAdmin", "nickname"] {
        let mut body = registration("ann@example.com", "Ann", PASSWORD, None);
        body[field] = json!(["admin"]);
        let detail = users.post_user(body).await.problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(&format!("unknown field `{field}`")), "{detail}");
    }
    users.nothing_registered().await;
}

#[tokio::test]
async fn a_registration_missing_a_field_is_refused_naming_it() {
    let users = start().await;
    let detail = users
        .post_user(json!({"email": "ann@example.com", "name": "Ann"}))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("missing field `password`"), "{detail}");
    users.nothing_registered().await;
}

/// `POST /users` with `body` as it is and `content_type`, if any.
fn raw(content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::builder().method(Method::POST).uri("/users");
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    request.body(Body::from(body.to_string())).expect("a request")
}

#[tokio::test]
async fn a_registration_that_is_not_json_is_refused() {
    let users = start().await;
    let detail = users
        .send(raw(None, "email=ann@example.com"))
        .await
        .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(detail.contains("application/json"), "{detail}");
    users
        .send(raw(Some("application/json"), r#"{"email": "#))
        .await
        .problem(StatusCode::BAD_REQUEST);
    users.nothing_registered().await;
}

#[tokio::test]
async fn logging_in_with_the_right_password_returns_a_bearer_token_naming_the_user() {
    let users = start().await;
    let user = users.register("ann@example.com").await;
    let id: Uuid = user["id"].as_str().unwrap().parse().unwrap();

    // The email is matched however it is typed.
    let answer = users.login(" Ann@Example.com ", PASSWORD).await.expect(StatusCode::OK);
    assert_eq!(answer["tokenType"], "Bearer");
    assert_eq!(answer["userId"], id.to_string());
    assert_eq!(answer["expiresIn"], TOKEN_TTL.as_secs());
    let token = answer["accessToken"].as_str().expect("a token");
    // Anyone holding the published keys can check it.
    let jwks: Jwks = serde_json::from_value(
        users
            .call(Method::GET, JWKS_PATH, None, None)
            .await
            .expect(StatusCode::OK),
    )
    .expect("a JWKS");
    let claims = KeySet::from_jwks(&jwks)
        .expect("usable keys")
        .verify(token)
        .expect("a token the published keys accept");
    assert_eq!(claims.sub, id);
    assert_eq!(claims.email, "ann@example.com");
    assert_eq!(claims.roles, Vec::<String>::new());
    assert!(!claims.is_admin());
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.exp - claims.iat, TOKEN_TTL.as_secs());

    // And the token works.
    let me = users
        .call(Method::GET, "/users/me", Some(token), None)
        .await
        .expect(StatusCode::OK);
    assert_eq!(me, user);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_are_the_same_401() {
    let users = start().await;
    users.register("ann@example.com").await;

    let wrong = users.login("ann@example.com", "not the password").await;
    let unknown = users.login("nobody@example.com", PASSWORD).await;
    let malformed = users.login("nobody", PASSWORD).await;
    let detail = wrong.problem(StatusCode::UNAUTHORIZED);
    assert!(detail.starts_with("unknown email or wrong password"), "{detail}");
    assert_eq!(
        unknown.problem(StatusCode::UNAUTHORIZED),
        detail,
        "no hint which one was wrong"
    );
    assert_eq!(malformed.problem(StatusCode::UNAUTHORIZED), detail);
    assert!(wrong.body.get("accessToken").is_none());
}

#[tokio::test]
async fn a_login_with_unknown_fields_is_refused() {
    let users = start().await;
    let body = json!({"email": "ann@example.com", "password": PASSWORD, "roles": ["admin"]});
    let detail = users
        .call(Method::POST, "/auth/token", None, Some(body))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("unknown field `roles`"), "{detail}");
}

#[tokio::test]
async fn who_am_i_needs_a_valid_token() {
    let users = start().await;
    let detail = users
        .call(Method::GET, "/users/me", None, None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bearer token"), "{detail}");

    let forged = users.foreign_token(Uuid::now_v7(), "mallory@example.com");
    let detail = users
        .call(Method::GET, "/users/me", Some(&forged), None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("does not publish"), "{detail}");
}

#[tokio::test]
async fn who_am_i_shows_the_caller_or_404_when_their_account_is_gone() {
    let users = start().await;
    let body = registration("ann@example.com", "Ann", PASSWORD, Some("+447700900123"));
    let ann = users.register_with(body).await;
    let id: Uuid = ann["id"].as_str().unwrap().parse().unwrap();

    let me = users
        .call(
            Method::GET,
            "/users/me",
            Some(&users.token_for(id, "ann@example.com").await),
            None,
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        me,
        json!({"id": id.to_string(), "email": "ann@example.com", "name": "Ann", "phone": "+447700900123", "roles": []})
    );

    // A valid token for an account that is not (or no longer) stored.
    let ghost = Uuid::now_v7();
    let detail = users
        .call(
            Method::GET,
            "/users/me",
            Some(&users.token_for(ghost, "ghost@example.com").await),
            None,
        )
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(detail.contains("no longer exists"), "{detail}");
}

#[tokio::test]
async fn the_published_keys_hold_only_public_halves() {
    let users = start().await;
    // The first token creates the first key.
    users.token_for(Uuid::now_v7(), "ann@example.com").await;
    let jwks = users
        .call(Method::GET, JWKS_PATH, None, None)
        .await
        .expect(StatusCode::OK);
    let keys = jwks["keys"].as_array().expect("a keys array");
    assert_eq!(keys.len(), 1, "one key on a new store: {jwks}");
    for key in keys {
        assert_eq!(
            (&key["kty"], &key["crv"], &key["alg"]),
            (&json!("OKP"), &json!("Ed25519"), &json!("EdDSA"))
        );
        let mut names: Vec<&str> = key.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["alg", "crv", "kid", "kty", "use", "x"],
            "no private member such as d"
        );
    }
}

#[tokio::test]
async fn a_key_rotation_keeps_old_tokens_working_and_signs_new_ones_with_the_new_key() {
    let users = start().await;
    let user = users.register("ann@example.com").await;
    async fn login(users: &support::Users) -> String {
        let answer = users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
        answer["accessToken"].as_str().unwrap().to_string()
    }
    let before = login(&users).await;
    let admin = users.admin_token().await;

    // Only an operator may rotate.
    let ann = before.clone();
    users
        .call(Method::POST, "/auth/keys", Some(&ann), None)
        .await
        .problem(StatusCode::FORBIDDEN);
    let rotated = users
        .call(Method::POST, "/auth/keys", Some(&admin), None)
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(rotated["published"], 2, "old and new side by side: {rotated}");

    let after = login(&users).await;
    let kid = |token: &str| jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    assert_eq!(kid(&after), rotated["kid"].as_str().unwrap());
    assert_ne!(kid(&before), kid(&after));
    for token in [&before, &after] {
        let me = users
            .call(Method::GET, "/users/me", Some(token), None)
            .await
            .expect(StatusCode::OK);
        assert_eq!(me, user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_beyond_the_hashing_limit_is_shed_with_503_and_retry_after() {
    let users = support::start_limited(bazaar_users::HashingLimit {
        concurrent: 1,
        wait: std::time::Duration::from_millis(1),
    })
    .await;
    users.register("ann@example.com").await;
    // Sixteen different addresses at once, so only the hashing limit can turn them away.
    let flood = futures_util::future::join_all((0..16).map(|i| {
        let body = json!({"email": format!("guess{i}@example.com"), "password": "not the password"});
        users.call(Method::POST, "/auth/token", None, Some(body))
    }))
    .await;
    let mut shed = 0;
    for answer in &flood {
        match answer.status {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert_eq!(answer.headers["retry-after"], "1");
                assert!(answer.problem(StatusCode::SERVICE_UNAVAILABLE).contains("retry"));
            }
            other => panic!("a flooded login answered {other}: {:?}", answer.body),
        }
    }
    assert!(
        shed > 0,
        "sixteen logins at once with one hashing turn and no wait shed none"
    );
    // Once the flood has passed, the right password still works.
    users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_for_one_account_is_answered_429_without_hashing_and_the_owner_gets_in_after() {
    let users = start().await;
    users.register("ann@example.com").await;
    let flood =
        futures_util::future::join_all((0..24).map(|_| users.login("ann@example.com", "not the password"))).await;
    let throttled: Vec<_> = flood
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        throttled.len() >= 20,
        "only two sign-ins of one account run at once: {} of 24 throttled",
        throttled.len()
    );
    for answer in throttled {
        assert!(answer.headers.contains_key("retry-after"));
        assert!(answer.body["detail"]
            .as_str()
            .unwrap()
            .contains("too many sign-in attempts"));
    }
    assert!(flood.iter().all(|a| matches!(a.status.as_u16(), 401 | 429)));
    users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_an_account_and_an_unknown_address_alike() {
    let users = start().await;
    users.register("ann@example.com").await;
    for email in ["ann@example.com", "nobody@example.com"] {
        for _ in 0..5 {
            users
                .login(email, "not the password")
                .await
                .problem(StatusCode::UNAUTHORIZED);
        }
    }
    let (known, unknown) = (
        users.login("ann@example.com", PASSWORD).await,
        users.login("nobody@example.com", PASSWORD).await,
    );
    assert_eq!(
        known.status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits"
    );
    assert_eq!(known.body, unknown.body, "no hint which address exists");
    assert_eq!(known.headers["retry-after"], unknown.headers["retry-after"]);
    // The lock is short at first: after it, the right password works and clears the count.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    users.login("ann@example.com", PASSWORD).await.expect(StatusCode::OK);
}

/// The median seconds of `attempt` for `first`, and for the addresses `second` names (`#`
/// becomes 0..5), measured in turns, one of each, so load on a busy machine falls on both
/// alike rather than on whichever ran second.
async fn alternating<F, Fut>(first: &str, second: &str, attempt: F) -> (f64, f64)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..5 {
        for (pattern, times) in [(first, &mut a), (second, &mut b)] {
            let started = std::time::Instant::now();
            attempt(pattern.replace('#', &i.to_string())).await;
            times.push(started.elapsed().as_secs_f64());
        }
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    (median(a), median(b))
}

/// Seconds `attempt` takes for the three addresses `pattern` names (`#` becomes 0, 1, 2:
/// distinct addresses, so no lock earned by one slows the next).
async fn three_times<F, Fut>(pattern: &str, attempt: F) -> f64
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = std::time::Instant::now();
    for i in 0..3 {
        attempt(pattern.replace('#', &i.to_string())).await;
    }
    started.elapsed().as_secs_f64()
}

#[tokio::test]
async fn a_login_for_an_unknown_email_takes_as_long_as_one_with_a_wrong_password() {
    let users = start().await;
    users.register("ann@example.com").await;
    let users = &users;
    let wrong = |email: String| async move {
        users
            .login(&email, "not the password")
            .await
            .problem(StatusCode::UNAUTHORIZED);
    };
    // Warm the stand-in hash first.
    three_times("warm#@example.com", wrong).await;
    let (known, unknown) = (
        three_times("ann@example.com", wrong).await,
        three_times("nobody#@example.com", wrong).await,
    );
    let ratio = unknown / known;
    assert!(
        (0.5..2.0).contains(&ratio),
        "unknown email {unknown:.3}s vs wrong password {known:.3}s: the timing tells them apart"
    );
}

#[tokio::test]
async fn registering_a_taken_address_takes_as_long_as_a_new_one() {
    let users = start().await;
    users.register("ann@example.com").await;
    let users = &users;
    let register = |email: String| async move {
        users
            .post_user(registration(&email, "Ann", PASSWORD, None))
            .await
            .expect(StatusCode::ACCEPTED);
    };
    three_times("warm#@example.com", register).await;
    let (taken, new) = alternating("ann@example.com", "new#@example.com", register).await;
    let ratio = new / taken;
    assert!(
        (0.5..2.0).contains(&ratio),
        "new address {new:.3}s vs taken {taken:.3}s: the timing tells them apart"
    );
}
