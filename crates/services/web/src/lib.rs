//! The web role: bazaar's storefront and operator console at the gateway's root, rendered
//! on the server.
//!
//! It is a backend-for-frontend: every page is built from the public API, called through
//! the gateway with the shopper's own token (kept in an `HttpOnly` cookie), so the pages can
//! do nothing a script could not; only the credential forms, limited per shopper at the
//! gateway, go to users directly over the mesh. The console reads each instance's health
//! and metrics as a probe would (see [`Monitor`]). It owns no data of its own; its store holds
//! only the kit's empty outbox and inbox. The live parts (an order's saga as it happens,
//! the console's charts) are server-sent events, fed by the orders API's long poll and the
//! monitor's samples, so the browser never polls. No asset comes from anywhere but this
//! role: templates, styles and the one small script are compiled into the binary.

mod api;
mod chart;
mod console;
mod monitor;
mod pages;
mod session;
mod view;

use std::sync::Arc;

use axum::{
    extract::Request,
    http::{header, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use bazaar_contracts::roles;
use bazaar_kit::telemetry::MetricDoc;
use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{Access, Mount, PublicRoute, ServiceSpec},
    shutdown::Shutdown,
};

pub use api::{users_policy, Api, ApiError, CREDENTIAL_ROUTES};
pub use monitor::{Instance, Monitor};
pub use view::{money, Views};

/// What the gateway routes to the web role: pages at its root.
const fn page(name: &'static str, resource: &'static str) -> PublicRoute {
    PublicRoute {
        name,
        resource,
        mount: Mount::Root,
        methods: &[],
        exact: false,
        access: Access::Anyone,
    }
}

/// A form posted to `resource` that checks credentials: limited per client at the gateway.
const fn credentials(name: &'static str, resource: &'static str) -> PublicRoute {
    PublicRoute {
        methods: &["POST"],
        exact: true,
        access: Access::Credentials,
        ..page(name, resource)
    }
}

/// The web role's routes at the gateway: the home page, the shopper's pages, the cart, the
/// operator console and the static assets. Token checks happen here, on the session cookie, not at the gateway.
const ROUTES: &[PublicRoute] = &[
    PublicRoute {
        exact: true,
        methods: &["GET", "HEAD"],
        ..page("web-home", "")
    },
    // The forms that check a password or open an account are limited per shopper at the
    // edge, as the API's own credential routes are.
    credentials("web-signin", "account/signin"),
    credentials("web-signup", "account/signup"),
    credentials("web-confirm", "account/confirm"),
    page("web-account", "account"),
    page("web-cart", "cart"),
    page("web-console", "console"),
    page("web-assets", "assets"),
];

/// The metrics web records beside the kit's.
pub const METRICS: &[MetricDoc] = &[];

/// The web role as the tools that start, route to and audit it see it.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::WEB,
    migrations: &[],
    publishes: &[],
    consumes: &[],
    routes: ROUTES,
    openapi: bazaar_kit::openapi::no_operations,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// The web role's settings beyond the common ones.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The gateway whose public API the pages call (`http://127.0.0.1:8080`).
    pub gateway_url: String,
    /// The users role, whose credential routes the sign-in, sign-up and confirmation forms
    /// call directly (`https://users:8101` over the mesh).
    pub users_url: String,
    /// Every role instance the console watches.
    pub instances: Vec<Instance>,
    /// The roles whose dead letters the console lists (those that consume).
    pub consumers: Vec<&'static str>,
}

/// The web role's shared state.
#[derive(Clone)]
pub struct Web {
    /// Store, broker, token verifier.
    pub rt: Runtime,
    /// The public API.
    pub api: Api,
    /// The templates.
    pub views: Arc<Views>,
    /// What the console watches.
    pub monitor: Monitor,
    /// The roles whose dead letters the console lists.
    pub consumers: Arc<Vec<&'static str>>,
}

/// Runs the web role until `shutdown`.
pub async fn run(config: RoleConfig, web: WebConfig, shutdown: Shutdown) -> Result<(), ServiceError> {
    if !(web.gateway_url.starts_with("http://") || web.gateway_url.starts_with("https://")) {
        return Err(ServiceError::Config(format!(
            "the gateway URL must start with http:// or https://, not `{}`",
            web.gateway_url
        )));
    }
    let views = Views::new().map_err(|e| ServiceError::Config(e.to_string()))?;
    let users = match &config.mesh {
        Some(tls) => {
            let client = bazaar_kit::mesh::http_client(tls, api::users_policy().timeout, &config.mesh_peers)
                .map_err(|e| ServiceError::Config(e.to_string()))?;
            bazaar_kit::client::HttpClient::with_client("users", api::users_policy(), client)
        }
        None => bazaar_kit::client::HttpClient::new("users", api::users_policy())
            .map_err(|e| ServiceError::Config(e.to_string()))?,
    };
    let api = Api::new(&web.gateway_url, &web.users_url, users).map_err(|e| ServiceError::Config(e.to_string()))?;
    let monitor = Monitor::new(web.instances).map_err(|e| ServiceError::Config(e.to_string()))?;
    let rt = Runtime::start(&SERVICE, &config, shutdown).await?;
    let sampler = monitor.clone();
    rt.every(monitor::SAMPLE_EVERY, move || {
        let sampler = sampler.clone();
        async move { sampler.round().await }
    });
    let state = Web {
        rt: rt.clone(),
        api: api.clone(),
        views: Arc::new(views),
        monitor,
        consumers: Arc::new(web.consumers),
    };
    let health = rt.health().check("gateway", move || {
        let api = api.clone();
        Box::pin(async move { api.check() })
    });
    rt.serve(config.listen, router(state), health).await
}

/// The web role's pages (without the runtime's health routes).
pub fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/cart", get(pages::cart))
        .route("/cart/add", post(pages::cart_add))
        .route("/cart/remove", post(pages::cart_remove))
        .route("/cart/checkout", post(pages::checkout))
        .route("/account", get(pages::account))
        .route("/account/signin", get(pages::sign_in_form).post(pages::sign_in))
        .route("/account/signup", get(pages::sign_up_form).post(pages::sign_up))
        .route("/account/confirm", get(pages::confirm_form).post(pages::confirm))
        .route("/account/signout", post(pages::sign_out))
        .route("/account/orders", get(pages::orders))
        .route("/account/orders/{id}", get(pages::order))
        .route("/account/orders/{id}/events", get(pages::order_events))
        .route("/account/orders/{id}/cancel", post(pages::cancel_order))
        .route("/account/wallet", get(pages::wallet))
        .route("/account/messages", get(pages::messages))
        .route("/console", get(console::home))
        .route("/console/live", get(console::live))
        .route("/console/sagas", get(console::sagas))
        .route("/console/sagas/{id}", get(console::saga))
        .route("/console/sagas/{id}/retry", post(console::retry))
        .route("/console/products", get(console::products).post(console::add_product))
        .route("/console/products/{id}/stock", post(console::restock))
        .route("/console/deadletters", get(console::dead_letters))
        .route(
            "/console/deadletters/{role}/{topic}/{seq}/replay",
            post(console::replay),
        )
        .route("/assets/site.css", get(|| asset("text/css; charset=utf-8", SITE_CSS)))
        .route(
            "/assets/live.js",
            get(|| asset("text/javascript; charset=utf-8", LIVE_JS)),
        )
        .route("/{*rest}", get(pages::not_found))
        .layer(axum::middleware::from_fn(html_errors))
        .layer(axum::middleware::from_fn(same_origin_posts))
        .layer(axum::middleware::from_fn(page_headers))
        .with_state(web)
}

const SITE_CSS: &str = include_str!("../assets/site.css");
const LIVE_JS: &str = include_str!("../assets/live.js");

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Refuses a form posted from another site: the session cookie is `SameSite=Lax` already,
/// and a browser names the site a form came from in `Origin`, which must be the one the
/// shopper reached (the gateway says which in `X-Forwarded-Host` and `-Port`).
async fn same_origin_posts(request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let headers = request.headers();
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(origin) = text("origin") {
            let reached = match (text("x-forwarded-host"), text("x-forwarded-port")) {
                (Some(host), Some(port)) => Some(format!("{host}:{port}")),
                _ => text("host").map(str::to_string),
            };
            if reached.as_deref().map(authority) != Some(origin_authority(origin)) {
                return (
                    StatusCode::FORBIDDEN,
                    axum::response::Html(
                        "<!doctype html><title>Refused</title><p>This form was sent from another site, so it was refused.</p>",
                    ),
                )
                    .into_response();
            }
        }
    }
    next.run(request).await
}

/// `host:port` of an `Origin` (`http://shop.example` is `shop.example:80`).
fn origin_authority(origin: &str) -> String {
    let (scheme, rest) = origin.split_once("://").unwrap_or(("http", origin));
    let default = if scheme == "https" { "443" } else { "80" };
    match rest.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => format!("{host}:{port}"),
        _ => format!("{rest}:{default}"),
    }
}

/// `host:port` of a `Host` header (port 80 when it names none).
fn authority(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((_, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_string(),
        _ => format!("{host}:80"),
    }
}

/// Answers an error the framework produced (a form that does not parse, a wrong method) with
/// a page in words instead of its plain text: a shopper never reads a raw error.
async fn html_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if status.as_u16() < 400 || html {
        return response;
    }
    let words = match status {
        StatusCode::METHOD_NOT_ALLOWED => "That page cannot be used that way; go back and use its buttons.",
        s if s.is_client_error() => "We did not understand what was sent; go back, check the form and try again.",
        _ => "Something went wrong on our side; please try again in a moment.",
    };
    let page = format!(
        "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>Sorry</title><link rel=\"stylesheet\" href=\"/assets/site.css\"><main><h1>Sorry</h1><p role=\"alert\">{words}</p><p><a href=\"/\">Back to the shop</a></p></main></html>"
    );
    (status, axum::response::Html(page)).into_response()
}

/// What every page says about itself: nothing from elsewhere runs or frames it.
async fn page_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_matches_only_the_host_and_port_the_shopper_reached() {
        assert_eq!(origin_authority("http://127.0.0.1:8080"), authority("127.0.0.1:8080"));
        assert_eq!(origin_authority("https://shop.example"), "shop.example:443");
        assert_eq!(origin_authority("http://shop.example"), authority("shop.example"));
        assert_ne!(
            origin_authority("http://evil.example:8080"),
            authority("127.0.0.1:8080")
        );
    }
}
