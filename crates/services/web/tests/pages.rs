//! The web role's pages in process, with the gateway it calls stopped: what a visitor sees
//! when the shop behind the pages cannot answer, and the rules that hold whatever the API
//! says (sessions, same-origin forms, errors as pages). The browser test in
//! `crates/bazaar/tests/browser.rs` walks the whole shop against a running system.

use std::sync::Arc;

use axum::http::{header, Method, StatusCode};
use bazaar_kit::client::HttpClient;
use bazaar_testkit::{Answer, TestRole};
use bazaar_web::{users_policy, Api, Monitor, Views, Web, SERVICE};

/// Nothing listens here: every API call fails to connect.
const STOPPED_GATEWAY: &str = "http://127.0.0.1:9";

async fn start() -> TestRole {
    TestRole::start(&SERVICE, |rt| {
        bazaar_web::router(Web {
            rt: rt.clone(),
            api: Api::new(
                STOPPED_GATEWAY,
                STOPPED_GATEWAY,
                HttpClient::new("users", users_policy()).expect("a client"),
            )
            .expect("a client"),
            views: Arc::new(Views::new().expect("templates")),
            monitor: Monitor::new(Vec::new()).expect("a monitor"),
            consumers: Arc::new(vec!["orders"]),
        })
    })
    .await
}

async fn get(web: &TestRole, uri: &str, headers: &[(&str, &str)]) -> Answer {
    web.send(TestRole::request(Method::GET, uri, None, headers, None)).await
}

async fn post_form(web: &TestRole, uri: &str, headers: &[(&str, &str)], form: &str) -> Answer {
    let mut request = TestRole::request(Method::POST, uri, None, headers, None);
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-www-form-urlencoded".parse().unwrap(),
    );
    *request.body_mut() = axum::body::Body::from(form.to_string());
    web.send(request).await
}

fn html(answer: &Answer) -> &str {
    assert!(answer.content_type().starts_with("text/html"), "{:?}", answer.headers);
    answer.body.as_str().expect("a page")
}

#[tokio::test]
async fn a_shop_that_cannot_be_reached_is_explained_in_words() {
    let web = start().await;
    let answer = get(&web, "/", &[]).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let page = html(&answer);
    assert!(page.contains("cannot be reached right now"), "{page}");
    assert!(!page.contains("problem+json") && !page.contains("\"status\""), "{page}");
}

#[tokio::test]
async fn every_page_forbids_scripts_and_frames_from_elsewhere() {
    let web = start().await;
    let answer = get(&web, "/account/signin", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let policy = answer.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert_eq!(answer.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
}

#[tokio::test]
async fn account_pages_ask_a_visitor_to_sign_in_and_come_back() {
    let web = start().await;
    for page in [
        "/account/orders",
        "/account/wallet",
        "/account/messages",
        "/account/orders/x",
    ] {
        let answer = get(&web, page, &[]).await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{page}");
        assert_eq!(
            answer.headers[header::LOCATION].to_str().unwrap(),
            format!("/account/signin?next={page}")
        );
    }
}

#[tokio::test]
async fn a_valid_session_cookie_shows_who_is_signed_in_and_a_forged_one_does_not() {
    let web = start().await;
    let (_, token) = web.customer();
    let cookie = format!("bazaar_session={token}");
    let page = get(&web, "/account/signin", &[("cookie", &cookie)]).await;
    assert!(html(&page).contains("Signed in as"), "{:?}", page.body);
    let forged = get(
        &web,
        "/account/signin",
        &[("cookie", "bazaar_session=eyJhbGciOiJub25lIn0.e30.")],
    )
    .await;
    assert!(!html(&forged).contains("Signed in as"));
}

#[tokio::test]
async fn a_form_posted_from_another_site_is_refused() {
    let web = start().await;
    let form = "product_id=01938a4e-7c1e-7a9b-8c3d-1e2f3a4b5c6d&quantity=1";
    let refused = post_form(
        &web,
        "/cart/add",
        &[("origin", "https://evil.example"), ("host", "127.0.0.1:8080")],
        form,
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(html(&refused).contains("another site"));
    // The gateway names the address the shopper reached; a form from there goes through
    // (to a catalogue that cannot be reached, said in words).
    let same = post_form(
        &web,
        "/cart/add",
        &[
            ("origin", "http://shop.example:8080"),
            ("host", "web.bazaar"),
            ("x-forwarded-host", "shop.example"),
            ("x-forwarded-port", "8080"),
        ],
        form,
    )
    .await;
    assert_eq!(same.status, StatusCode::BAD_GATEWAY);
    assert!(html(&same).contains("cannot be reached"));
}

#[tokio::test]
async fn a_form_that_does_not_parse_is_answered_with_a_page_not_a_problem() {
    let web = start().await;
    let answer = post_form(&web, "/cart/add", &[], "product_id=not-a-product").await;
    assert!(answer.status.is_client_error(), "{:?}", answer.status);
    assert!(html(&answer).contains("check the form"));
    let wrong_method = web
        .send(TestRole::request(Method::DELETE, "/cart", None, &[], None))
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    html(&wrong_method);
}

#[tokio::test]
async fn an_unknown_page_is_a_page_saying_so() {
    let web = start().await;
    let answer = get(&web, "/account/nothing-here", &[]).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(html(&answer).contains("There is no page here"));
}

#[tokio::test]
async fn the_console_is_for_operators_only() {
    let web = start().await;
    let visitor = get(&web, "/console/sagas", &[]).await;
    assert_eq!(visitor.status, StatusCode::SEE_OTHER);
    assert_eq!(
        visitor.headers[header::LOCATION].to_str().unwrap(),
        "/account/signin?next=/console/sagas"
    );
    let (_, shopper) = web.customer();
    let cookie = format!("bazaar_session={shopper}");
    for page in ["/console", "/console/sagas", "/console/products"] {
        let refused = get(&web, page, &[("cookie", &cookie)]).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{page}");
        assert!(html(&refused).contains("The console is for the shop"));
    }
    let live = get(&web, "/console/live", &[("cookie", &cookie)]).await;
    assert_eq!(live.status, StatusCode::FORBIDDEN);
    let cookie = format!("bazaar_session={}", web.admin_token());
    let console = get(&web, "/console", &[("cookie", &cookie)]).await;
    assert_eq!(console.status, StatusCode::OK);
    assert!(html(&console).contains("0 of 0 instances healthy"));
}
