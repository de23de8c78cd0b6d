//! The storefront's pages. Forms post here and are answered with a redirect (so a reload
//! repeats nothing) or with the same page and the problem in words.

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    extract::{Form, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode, Uri},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
};
use futures_util::stream::{self, Stream};
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    api::{ApiError, Product},
    session::{Shopper, Visitor, CART_COOKIE, SESSION_COOKIE},
    view::{line_views, OrderView},
    Web,
};

/// How long a cart cookie lives.
const CART_AGE: u64 = 30 * 24 * 3600;

/// Longest one live feed of an order stays open; the browser reconnects after it.
const FEED_LIMIT: Duration = Duration::from_secs(300);

/// What every page's layout needs: who is visiting and the cart's size.
#[derive(Debug, Serialize)]
pub(crate) struct Nav {
    signed_in: bool,
    email: Option<String>,
    admin: bool,
    cart_units: i64,
}

impl Nav {
    pub(crate) fn of(visitor: &Visitor) -> Nav {
        Nav {
            signed_in: visitor.shopper.is_some(),
            email: visitor.shopper.as_ref().map(|s| s.claims.email.clone()),
            admin: visitor.shopper.as_ref().is_some_and(|s| s.claims.is_admin()),
            cart_units: visitor.cart.units(),
        }
    }
}

/// A redirect after a form (303: the browser follows with GET).
fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A redirect that also sets cookies.
fn see_other_with(to: &str, cookies: &[HeaderValue]) -> Response {
    let mut response = see_other(to);
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie.clone());
    }
    response
}

/// The sign-in page, coming back to `back` afterwards.
pub(crate) fn sign_in_first(back: &Uri) -> Response {
    let next = back.path_and_query().map_or("/", |p| p.as_str());
    see_other(&format!("/account/signin?next={}", encode(next)))
}

/// `text` escaped for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Only a path on this site may be where a sign-in returns to.
fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

/// A page saying what went wrong, in words.
pub(crate) fn problem_page(web: &Web, visitor: &Visitor, status: StatusCode, title: &str, words: &str) -> Response {
    web.views.page(
        status,
        "problem.html",
        context! { nav => Nav::of(visitor), title, words },
    )
}

/// The status a page answers with when the API refused: the API's own for a client
/// error, 502 when the shop behind it failed.
pub(crate) fn page_status(error: &ApiError) -> StatusCode {
    match error.status() {
        Some(s) if s.is_client_error() => s,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// The products named by `ids`, by id, read from the catalogue (those it no longer has are
/// left out).
async fn products_of(web: &Web, ids: impl IntoIterator<Item = Uuid>) -> HashMap<Uuid, Product> {
    let lookups = ids.into_iter().map(|id| web.api.product(id));
    futures_util::future::join_all(lookups)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .map(|p| (p.id, p))
        .collect()
}

/// `GET /`: the catalogue with prices and live stock.
pub async fn home(State(web): State<Web>, visitor: Visitor) -> Response {
    match web.api.products().await {
        Ok(products) => web.views.page(
            StatusCode::OK,
            "home.html",
            context! { nav => Nav::of(&visitor), products },
        ),
        Err(e) => problem_page(
            &web,
            &visitor,
            page_status(&e),
            "The shop is closed for a moment",
            &e.words(),
        ),
    }
}

/// `GET /{unknown}`.
pub async fn not_found(State(web): State<Web>, visitor: Visitor) -> Response {
    problem_page(
        &web,
        &visitor,
        StatusCode::NOT_FOUND,
        "Page not found",
        "There is no page here. The shop's front page lists everything on sale.",
    )
}

/// The cart page, with `error` said above it.
async fn cart_page(web: &Web, visitor: &Visitor, status: StatusCode, error: Option<String>) -> Response {
    let lines: Vec<(Uuid, i64)> = visitor
        .cart
        .lines()
        .iter()
        .map(|l| (l.product_id, l.quantity))
        .collect();
    let products = products_of(web, lines.iter().map(|(id, _)| *id)).await;
    let lines = line_views(&lines, &products);
    let total: i64 = lines.iter().map(|l| l.price_cents.unwrap_or(0) * l.quantity).sum();
    let currency = lines.first().map_or("USD", |l| l.currency.as_str());
    web.views.page(
        status,
        "cart.html",
        context! {
            nav => Nav::of(visitor),
            lines,
            total => crate::money(total, currency),
            // A fresh key per rendering: a double click or a resent form places one order.
            idempotency_key => Uuid::new_v4(),
            error,
        },
    )
}

/// `GET /cart`.
pub async fn cart(State(web): State<Web>, visitor: Visitor) -> Response {
    cart_page(&web, &visitor, StatusCode::OK, None).await
}

/// The form that adds a product to the cart.
#[derive(Debug, Deserialize)]
pub struct AddToCart {
    product_id: Uuid,
    quantity: Option<i64>,
}

/// `POST /cart/add`.
pub async fn cart_add(State(web): State<Web>, mut visitor: Visitor, Form(form): Form<AddToCart>) -> Response {
    let quantity = form.quantity.unwrap_or(1);
    if !(1..=crate::session::MAX_QUANTITY).contains(&quantity) {
        let error = format!(
            "You can add 1 to {} of a product at a time.",
            crate::session::MAX_QUANTITY
        );
        return cart_page(&web, &visitor, StatusCode::BAD_REQUEST, Some(error)).await;
    }
    if let Err(e) = web.api.product(form.product_id).await {
        let words = match e.status() {
            Some(StatusCode::NOT_FOUND) => "That product is not sold here any more.".to_string(),
            _ => e.words(),
        };
        return cart_page(&web, &visitor, page_status(&e), Some(words)).await;
    }
    if !visitor.cart.add(form.product_id, quantity) {
        let error = format!(
            "Your cart holds {} different products at most; check out or remove one first.",
            crate::session::CART_LINES
        );
        return cart_page(&web, &visitor, StatusCode::BAD_REQUEST, Some(error)).await;
    }
    see_other_with(
        "/cart",
        &[visitor.cookie(CART_COOKIE, &visitor.cart.encode(), CART_AGE)],
    )
}

/// The form that takes a product out of the cart.
#[derive(Debug, Deserialize)]
pub struct RemoveFromCart {
    product_id: Uuid,
}

/// `POST /cart/remove`.
pub async fn cart_remove(mut visitor: Visitor, Form(form): Form<RemoveFromCart>) -> Response {
    visitor.cart.remove(form.product_id);
    see_other_with(
        "/cart",
        &[visitor.cookie(CART_COOKIE, &visitor.cart.encode(), CART_AGE)],
    )
}

/// The checkout form.
#[derive(Debug, Deserialize)]
pub struct Checkout {
    idempotency_key: Uuid,
}

/// `POST /cart/checkout`: places the order once per key and opens its page.
pub async fn checkout(State(web): State<Web>, visitor: Visitor, Form(form): Form<Checkout>) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return see_other("/account/signin?next=/cart");
    };
    if visitor.cart.is_empty() {
        let error = "Your cart is empty; add something from the shop first.".to_string();
        return cart_page(&web, &visitor, StatusCode::BAD_REQUEST, Some(error)).await;
    }
    let key = form.idempotency_key.to_string();
    match web.api.place_order(&shopper.token, &key, &visitor.cart.lines()).await {
        Ok(order) => see_other_with(
            &format!("/account/orders/{}", order.id),
            &[visitor.cookie(CART_COOKIE, "", 0)],
        ),
        Err(e) => {
            let words = match e.status() {
                Some(StatusCode::UNAUTHORIZED) => return see_other("/account/signin?next=/cart"),
                Some(StatusCode::TOO_MANY_REQUESTS) => {
                    "You have placed many orders in the last minute; please wait a moment and try again.".to_string()
                }
                _ => e.words(),
            };
            cart_page(&web, &visitor, page_status(&e), Some(words)).await
        }
    }
}

/// `?next=` of the sign-in page.
#[derive(Debug, Deserialize)]
pub struct Next {
    next: Option<String>,
}

/// `GET /account/signin`.
pub async fn sign_in_form(State(web): State<Web>, visitor: Visitor, Query(q): Query<Next>) -> Response {
    let next = local_path(q.next.as_deref());
    web.views.page(
        StatusCode::OK,
        "signin.html",
        context! { nav => Nav::of(&visitor), next },
    )
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignIn {
    email: String,
    password: String,
    next: Option<String>,
}

/// The cookie that carries a token for as long as it lives.
fn session_cookie(visitor: &Visitor, token: &crate::api::Token) -> HeaderValue {
    visitor.cookie(SESSION_COOKIE, &token.access_token, token.expires_in)
}

/// `POST /account/signin`.
pub async fn sign_in(State(web): State<Web>, visitor: Visitor, Form(form): Form<SignIn>) -> Response {
    let next = local_path(form.next.as_deref()).to_string();
    match web.api.sign_in(form.email.trim(), &form.password).await {
        Ok(token) => see_other_with(&next, &[session_cookie(&visitor, &token)]),
        Err(e) => {
            let error = match e.status() {
                Some(StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN) => {
                    "Wrong email or password, or the address is not confirmed yet.".to_string()
                }
                _ => e.words(),
            };
            web.views.page(
                page_status(&e),
                "signin.html",
                context! { nav => Nav::of(&visitor), next, email => form.email, error },
            )
        }
    }
}

/// `GET /account/signup`.
pub async fn sign_up_form(State(web): State<Web>, visitor: Visitor) -> Response {
    web.views
        .page(StatusCode::OK, "signup.html", context! { nav => Nav::of(&visitor) })
}

/// The sign-up form.
#[derive(Debug, Deserialize)]
pub struct SignUp {
    name: String,
    email: String,
    password: String,
    phone: Option<String>,
}

/// `POST /account/signup`: registers and asks for the mailed code.
pub async fn sign_up(State(web): State<Web>, visitor: Visitor, Form(form): Form<SignUp>) -> Response {
    let phone = form.phone.as_deref().map(str::trim).filter(|p| !p.is_empty());
    match web
        .api
        .register(form.name.trim(), form.email.trim(), &form.password, phone)
        .await
    {
        Ok(()) => see_other(&format!("/account/confirm?email={}", encode(form.email.trim()))),
        Err(e) => web.views.page(
            page_status(&e),
            "signup.html",
            context! { nav => Nav::of(&visitor), name => form.name, email => form.email, phone, error => e.words() },
        ),
    }
}

/// `?email=` of the confirmation page.
#[derive(Debug, Deserialize)]
pub struct EmailQuery {
    email: Option<String>,
}

/// `GET /account/confirm`.
pub async fn confirm_form(State(web): State<Web>, visitor: Visitor, Query(q): Query<EmailQuery>) -> Response {
    web.views.page(
        StatusCode::OK,
        "confirm.html",
        context! { nav => Nav::of(&visitor), email => q.email },
    )
}

/// The confirmation form.
#[derive(Debug, Deserialize)]
pub struct Confirm {
    email: String,
    password: String,
    code: String,
}

/// `POST /account/confirm`: opens the account and signs in.
pub async fn confirm(State(web): State<Web>, visitor: Visitor, Form(form): Form<Confirm>) -> Response {
    match web
        .api
        .confirm(form.email.trim(), &form.password, form.code.trim())
        .await
    {
        Ok(token) => see_other_with("/", &[session_cookie(&visitor, &token)]),
        Err(e) => {
            let error = match e.status() {
                Some(s) if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {
                    "That code, address or password is not right, or the code has expired; check the email we sent."
                        .to_string()
                }
                _ => e.words(),
            };
            web.views.page(
                page_status(&e),
                "confirm.html",
                context! { nav => Nav::of(&visitor), email => form.email, error },
            )
        }
    }
}

/// `POST /account/signout`.
pub async fn sign_out(visitor: Visitor) -> Response {
    see_other_with("/", &[visitor.cookie(SESSION_COOKIE, "", 0)])
}

/// `GET /account`.
pub async fn account(visitor: Visitor, uri: Uri) -> Response {
    if visitor.shopper.is_none() {
        return sign_in_first(&uri);
    }
    see_other("/account/orders")
}

/// `GET /account/orders`: order history.
pub async fn orders(State(web): State<Web>, visitor: Visitor, uri: Uri) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return sign_in_first(&uri);
    };
    match web.api.orders(&shopper.token).await {
        Ok(orders) => web.views.page(
            StatusCode::OK,
            "orders.html",
            context! { nav => Nav::of(&visitor), orders },
        ),
        Err(e) => problem_page(&web, &visitor, page_status(&e), "Your orders", &e.words()),
    }
}

/// An order's view, or the page saying why there is none.
async fn order_view(web: &Web, visitor: &Visitor, shopper: &Shopper, id: &str) -> Result<OrderView, Box<Response>> {
    let not_found = || {
        problem_page(
            web,
            visitor,
            StatusCode::NOT_FOUND,
            "Order not found",
            "You have no order with that number. Your orders page lists every order you placed.",
        )
    };
    let Ok(id) = id.parse::<Uuid>() else {
        return Err(Box::new(not_found()));
    };
    match web.api.order(&shopper.token, id).await {
        Ok(order) => {
            let products = products_of(web, order.lines.iter().map(|l| l.product_id)).await;
            Ok(OrderView::new(order, &products))
        }
        Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Err(Box::new(not_found())),
        Err(e) => Err(Box::new(problem_page(
            web,
            visitor,
            page_status(&e),
            "Your order",
            &e.words(),
        ))),
    }
}

/// `GET /account/orders/{id}`: the order and its saga, live.
pub async fn order(State(web): State<Web>, visitor: Visitor, uri: Uri, Path(id): Path<String>) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return sign_in_first(&uri);
    };
    match order_view(&web, &visitor, shopper, &id).await {
        Ok(view) => web.views.page(
            StatusCode::OK,
            "order.html",
            context! { nav => Nav::of(&visitor), view },
        ),
        Err(page) => *page,
    }
}

/// `POST /account/orders/{id}/cancel`: cancels the order and shows it, cancelling.
pub async fn cancel_order(State(web): State<Web>, visitor: Visitor, uri: Uri, Path(id): Path<String>) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return sign_in_first(&uri);
    };
    let Ok(order) = id.parse::<Uuid>() else {
        return problem_page(
            &web,
            &visitor,
            StatusCode::NOT_FOUND,
            "Order not found",
            "You have no order with that number.",
        );
    };
    match web.api.cancel_order(&shopper.token, order).await {
        Ok(_) => see_other(&format!("/account/orders/{order}")),
        Err(e) => {
            let words = match e.status() {
                Some(StatusCode::UNAUTHORIZED) => return sign_in_first(&uri),
                Some(StatusCode::CONFLICT) => {
                    "Your order is waiting for our staff and cannot be cancelled until they have looked at it."
                        .to_string()
                }
                _ => e.words(),
            };
            problem_page(&web, &visitor, page_status(&e), "Cancel your order", &words)
        }
    }
}

/// `?seen=` of the live feed.
#[derive(Debug, Deserialize)]
pub struct Seen {
    seen: Option<usize>,
}

/// Where a live feed is.
struct Feed {
    web: Web,
    token: String,
    id: Uuid,
    seen: usize,
    settled: bool,
    until: tokio::time::Instant,
    stop: bazaar_kit::shutdown::Shutdown,
}

/// `GET /account/orders/{id}/events`: server-sent events, one `update` event with the
/// rendered steps each time the saga moves, and `settled` once the order has an outcome.
pub async fn order_events(
    State(web): State<Web>,
    visitor: Visitor,
    Path(id): Path<String>,
    Query(q): Query<Seen>,
    headers: HeaderMap,
) -> Response {
    let (Some(shopper), Ok(id)) = (visitor.shopper, id.parse::<Uuid>()) else {
        return (StatusCode::NOT_FOUND, "no such order of yours").into_response();
    };
    // A browser reconnecting says what it saw last.
    let seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or(q.seen)
        .unwrap_or(0);
    let feed = Feed {
        stop: web.rt.shutdown.clone(),
        web,
        token: shopper.token,
        id,
        seen,
        settled: false,
        until: tokio::time::Instant::now() + FEED_LIMIT,
    };
    Sse::new(events(feed))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn events(feed: Feed) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(feed, |mut feed| async move {
        if feed.settled || tokio::time::Instant::now() >= feed.until {
            return None;
        }
        let watched = tokio::select! {
            watched = feed.web.api.watch_order(&feed.token, feed.id, feed.seen) => watched,
            () = feed.stop.wait() => return None,
        };
        let order = match watched {
            Ok(order) => order,
            Err(e) => {
                tracing::debug!(order = %feed.id, error = %e, "live feed ends");
                // The browser reconnects after a pause and the feed resumes from `seen`.
                feed.settled = true;
                return Some((Ok(Event::default().event("pause").data(e.words())), feed));
            }
        };
        let products = products_of(&feed.web, order.lines.iter().map(|l| l.product_id)).await;
        let view = OrderView::new(order, &products);
        let html = feed
            .web
            .views
            .render("progress.html", context! { view })
            .unwrap_or_default();
        feed.seen = view.seen;
        feed.settled = view.settled;
        let event = Event::default()
            .event(if view.settled { "settled" } else { "update" })
            .id(view.seen.to_string())
            .data(html);
        Some((Ok(event), feed))
    })
}

/// `GET /account/wallet`.
pub async fn wallet(State(web): State<Web>, visitor: Visitor, uri: Uri) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return sign_in_first(&uri);
    };
    match web.api.wallet(&shopper.token).await {
        Ok(account) => web.views.page(
            StatusCode::OK,
            "wallet.html",
            context! { nav => Nav::of(&visitor), account },
        ),
        Err(e) => problem_page(&web, &visitor, page_status(&e), "Your wallet", &e.words()),
    }
}

/// `GET /account/messages`: the emails and texts sent to the shopper.
pub async fn messages(State(web): State<Web>, visitor: Visitor, uri: Uri) -> Response {
    let Some(shopper) = &visitor.shopper else {
        return sign_in_first(&uri);
    };
    match web.api.notifications(&shopper.token).await {
        Ok(messages) => web.views.page(
            StatusCode::OK,
            "messages.html",
            context! { nav => Nav::of(&visitor), messages },
        ),
        Err(e) => problem_page(&web, &visitor, page_status(&e), "Your messages", &e.words()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_returns_only_to_this_site() {
        assert_eq!(local_path(Some("/cart")), "/cart");
        assert_eq!(local_path(Some("//evil.example")), "/");
        assert_eq!(local_path(Some("https://evil.example")), "/");
        assert_eq!(local_path(Some("/\\evil.example")), "/");
        assert_eq!(local_path(None), "/");
    }

    #[test]
    fn return_paths_are_escaped_in_the_query() {
        assert_eq!(encode("/cart?x=1&y"), "/cart%3Fx%3D1%26y");
        assert_eq!(encode("ann@example.com"), "ann%40example.com");
    }
}
