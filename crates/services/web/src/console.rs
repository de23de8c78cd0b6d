//! The operator console (`/console`, admins only). Everything it shows or does goes through
//! what a script would use: each instance's `/health` and `/metrics`, and the admin routes
//! of the public API with the operator's own token.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Form, Path, Query, State},
    http::{StatusCode, Uri},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
};
use futures_util::stream;
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    api::ApiError,
    chart::{line_chart, Chart, Series},
    monitor::{quantile, rates, InstanceStatus, Sample, SAMPLE_EVERY},
    pages::{problem_page, sign_in_first, Nav},
    session::{Shopper, Visitor},
    Web,
};

/// Longest one live feed of the console stays open; the browser reconnects after it.
const FEED_LIMIT: Duration = Duration::from_secs(600);

/// The statuses sagas can be listed by, the default first.
const SAGA_STATUSES: [&str; 5] = ["stuck", "running", "compensating", "compensated", "completed"];

/// The signed-in operator, or the page that says why not.
fn operator<'v>(web: &Web, visitor: &'v Visitor, uri: &Uri) -> Result<&'v Shopper, Box<Response>> {
    match &visitor.shopper {
        Some(shopper) if shopper.claims.is_admin() => Ok(shopper),
        Some(_) => Err(Box::new(problem_page(
            web,
            visitor,
            StatusCode::FORBIDDEN,
            "Operators only",
            "The console is for the shop's operators; your account is a shopper's.",
        ))),
        None => Err(Box::new(sign_in_first(uri))),
    }
}

/// The signed-in operator and the saga `id` names, or the page that says why not.
fn operator_and_saga<'v>(
    web: &Web,
    visitor: &'v Visitor,
    uri: &Uri,
    id: &str,
) -> Result<(&'v Shopper, Uuid), Box<Response>> {
    let admin = operator(web, visitor, uri)?;
    let id = id.parse::<Uuid>().map_err(|_| {
        Box::new(problem_page(
            web,
            visitor,
            StatusCode::NOT_FOUND,
            "Saga",
            "There is no saga with that id.",
        ))
    })?;
    Ok((admin, id))
}

/// Everything the overview shows, rendered again for each live update.
#[derive(Debug, Serialize)]
struct Overview {
    instances: Vec<InstanceStatus>,
    healthy: usize,
    charts: Vec<Chart>,
    dead_letters: Vec<(String, f64)>,
    mesh: Vec<Edge>,
}

/// One edge of the mesh with its golden metrics: traffic since its roles started, and
/// server errors, refusals and latency.
#[derive(Debug, Serialize)]
struct Edge {
    edge: String,
    requests: f64,
    errors: f64,
    refusals: f64,
    /// p99 over the console's window, in ms (none when nothing was timed in it).
    p99_ms: Option<f64>,
}

/// Every edge seen in `last`, with its p99 since `first` (since its roles started when none).
fn mesh_edges(first: Option<&Sample>, last: &Sample) -> Vec<Edge> {
    let edges: std::collections::BTreeSet<&String> =
        last.mesh_requests.keys().chain(last.mesh_refusals.keys()).collect();
    edges
        .into_iter()
        .map(|edge| {
            let before = first
                .and_then(|f| f.mesh_buckets.get(edge))
                .map_or(&[][..], Vec::as_slice);
            let after = last.mesh_buckets.get(edge).map_or(&[][..], Vec::as_slice);
            Edge {
                edge: edge.clone(),
                requests: last.mesh_requests.get(edge).copied().unwrap_or(0.0),
                errors: last.mesh_errors.get(edge).copied().unwrap_or(0.0),
                refusals: last.mesh_refusals.get(edge).copied().unwrap_or(0.0),
                p99_ms: quantile(before, after, 0.99).map(|s| s * 1000.0),
            }
        })
        .collect()
}

fn overview(web: &Web) -> Overview {
    web.monitor.read(|watch| {
        let samples = &watch.samples;
        let series = |label: &str, values: Vec<f64>| Series {
            label: label.to_string(),
            values,
        };
        let finished = |status: &'static str| move |s: &Sample| s.finished.get(status).copied().unwrap_or(0.0);
        let orders = line_chart(
            "chart-orders",
            "Orders finished per second",
            "/s",
            &[
                series("confirmed", rates(samples, finished("confirmed"))),
                series("cancelled", rates(samples, finished("cancelled"))),
            ],
        );
        let pairs: Vec<(&Sample, &Sample)> = samples.iter().zip(samples.iter().skip(1)).collect();
        let percentile = |q: f64| -> Vec<f64> {
            pairs
                .iter()
                .map(|(a, b)| quantile(&a.saga_buckets, &b.saga_buckets, q).map_or(0.0, |s| s * 1000.0))
                .collect()
        };
        let latency = line_chart(
            "chart-latency",
            "Saga latency, placed to outcome",
            " ms",
            &[
                series("p50", percentile(0.5)),
                series("p95", percentile(0.95)),
                series("p99", percentile(0.99)),
            ],
        );
        let keyed = |pick: fn(&Sample) -> &std::collections::BTreeMap<String, f64>| -> Vec<Series> {
            let keys: std::collections::BTreeSet<&String> = samples.iter().flat_map(|s| pick(s).keys()).collect();
            keys.into_iter()
                .map(|k| {
                    series(
                        k,
                        samples.iter().map(|s| pick(s).get(k).copied().unwrap_or(0.0)).collect(),
                    )
                })
                .collect()
        };
        let outbox = line_chart(
            "chart-outbox",
            "Outbox: events not yet relayed",
            "",
            &keyed(|s| &s.outbox),
        );
        let lag = line_chart("chart-lag", "Consumer lag: messages waiting", "", &keyed(|s| &s.lag));
        let last = samples.back().cloned().unwrap_or_default();
        let healthy = watch.instances.iter().filter(|i| i.status == "healthy").count();
        Overview {
            instances: watch.instances.clone(),
            healthy,
            charts: vec![orders, latency, outbox, lag],
            dead_letters: last.dead.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            // With one sample there is no window yet: latency since the roles started.
            mesh: mesh_edges(samples.front().filter(|_| samples.len() > 1), &last),
        }
    })
}

/// `GET /console`: every instance's health, live charts, dead letters and the mesh.
pub async fn home(State(web): State<Web>, visitor: Visitor, uri: Uri) -> Response {
    if let Err(page) = operator(&web, &visitor, &uri) {
        return *page;
    }
    web.monitor.look().await;
    web.views.page(
        StatusCode::OK,
        "console.html",
        context! { nav => Nav::of(&visitor), overview => overview(&web) },
    )
}

/// `GET /console/live`: the overview again after each sample, as server-sent events.
pub async fn live(State(web): State<Web>, visitor: Visitor) -> Response {
    if !visitor.shopper.as_ref().is_some_and(|s| s.claims.is_admin()) {
        return (StatusCode::FORBIDDEN, "operators only").into_response();
    }
    let until = tokio::time::Instant::now() + FEED_LIMIT;
    let stop = web.rt.shutdown.clone();
    let feed = stream::unfold((web, stop), move |(web, mut stop)| async move {
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep(SAMPLE_EVERY) => {}
            () = stop.wait() => return None,
        }
        web.monitor.look().await;
        let html = web
            .views
            .render("console_live.html", context! { overview => overview(&web) })
            .unwrap_or_default();
        let event: Result<Event, Infallible> = Ok(Event::default().event("update").data(html));
        Some((event, (web, stop)))
    });
    Sse::new(feed)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `?status=` of the sagas page.
#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    status: Option<String>,
}

/// `GET /console/sagas`: sagas by status, stuck ones first.
pub async fn sagas(State(web): State<Web>, visitor: Visitor, uri: Uri, Query(q): Query<StatusQuery>) -> Response {
    let admin = match operator(&web, &visitor, &uri) {
        Ok(admin) => admin,
        Err(page) => return *page,
    };
    let status = q.status.as_deref().unwrap_or(SAGA_STATUSES[0]);
    if !SAGA_STATUSES.contains(&status) {
        let words = format!("There is no saga status “{status}”; choose one of the tabs.");
        return problem_page(&web, &visitor, StatusCode::BAD_REQUEST, "Sagas", &words);
    }
    match web.api.sagas(&admin.token, status).await {
        Ok(sagas) => web.views.page(
            StatusCode::OK,
            "console_sagas.html",
            context! { nav => Nav::of(&visitor), sagas, status, statuses => SAGA_STATUSES },
        ),
        Err(e) => problem_page(&web, &visitor, crate::pages::page_status(&e), "Sagas", &e.words()),
    }
}

/// `GET /console/sagas/{id}`: one saga's history, with a retry when it is stuck.
pub async fn saga(State(web): State<Web>, visitor: Visitor, uri: Uri, Path(id): Path<String>) -> Response {
    let (admin, id) = match operator_and_saga(&web, &visitor, &uri, &id) {
        Ok(found) => found,
        Err(page) => return *page,
    };
    match web.api.saga(&admin.token, id).await {
        Ok(view) => web.views.page(
            StatusCode::OK,
            "console_saga.html",
            context! { nav => Nav::of(&visitor), view },
        ),
        Err(e) => problem_page(&web, &visitor, crate::pages::page_status(&e), "Saga", &e.words()),
    }
}

/// `POST /console/sagas/{id}/retry`.
pub async fn retry(State(web): State<Web>, visitor: Visitor, uri: Uri, Path(id): Path<String>) -> Response {
    let (admin, id) = match operator_and_saga(&web, &visitor, &uri, &id) {
        Ok(found) => found,
        Err(page) => return *page,
    };
    match web.api.retry_saga(&admin.token, id).await {
        Ok(()) => Redirect::to(&format!("/console/sagas/{id}")).into_response(),
        Err(e) => {
            let words = match e.status() {
                Some(StatusCode::CONFLICT) => "That saga is not stuck (any more), so there is nothing to retry.".into(),
                _ => e.words(),
            };
            problem_page(&web, &visitor, crate::pages::page_status(&e), "Retry", &words)
        }
    }
}

/// `GET /console/products`: the catalogue with its stock, a restock form per product, and a
/// form for a new one.
pub async fn products(State(web): State<Web>, visitor: Visitor, uri: Uri) -> Response {
    products_page(&web, &visitor, &uri, StatusCode::OK, None).await
}

async fn products_page(web: &Web, visitor: &Visitor, uri: &Uri, status: StatusCode, error: Option<String>) -> Response {
    if let Err(page) = operator(web, visitor, uri) {
        return *page;
    }
    match web.api.products().await {
        Ok(products) => web.views.page(
            status,
            "console_products.html",
            context! { nav => Nav::of(visitor), products, error },
        ),
        Err(e) => problem_page(web, visitor, crate::pages::page_status(&e), "Products", &e.words()),
    }
}

/// The restock form.
#[derive(Debug, Deserialize)]
pub struct Restock {
    delta: i64,
    reason: Option<String>,
}

/// `POST /console/products/{id}/stock`.
pub async fn restock(
    State(web): State<Web>,
    visitor: Visitor,
    uri: Uri,
    Path(id): Path<String>,
    Form(form): Form<Restock>,
) -> Response {
    let admin = match operator(&web, &visitor, &uri) {
        Ok(admin) => admin,
        Err(page) => return *page,
    };
    let Ok(id) = id.parse::<Uuid>() else {
        return problem_page(
            &web,
            &visitor,
            StatusCode::NOT_FOUND,
            "Products",
            "There is no such product.",
        );
    };
    let reason = form.reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let reason = reason.unwrap_or(if form.delta > 0 { "restock" } else { "write-off" });
    match web.api.restock(&admin.token, id, form.delta, reason).await {
        Ok(_) => Redirect::to("/console/products").into_response(),
        Err(e) => {
            let status = crate::pages::page_status(&e);
            products_page(&web, &visitor, &uri, status, Some(e.words())).await
        }
    }
}

/// The new-product form (price in major units, as people type it).
#[derive(Debug, Deserialize)]
pub struct NewProduct {
    sku: String,
    name: String,
    price: String,
    stock: Option<i64>,
}

/// `POST /console/products`.
pub async fn add_product(State(web): State<Web>, visitor: Visitor, uri: Uri, Form(form): Form<NewProduct>) -> Response {
    let admin = match operator(&web, &visitor, &uri) {
        Ok(admin) => admin,
        Err(page) => return *page,
    };
    let Some(price_cents) = cents(&form.price) else {
        let error = format!("“{}” is not a price; write it like 12.50.", form.price.trim());
        return products_page(&web, &visitor, &uri, StatusCode::BAD_REQUEST, Some(error)).await;
    };
    let body = serde_json::json!({
        "sku": form.sku.trim(),
        "name": form.name.trim(),
        "priceCents": price_cents,
        "stock": form.stock.unwrap_or(0),
    });
    match web.api.add_product(&admin.token, &body).await {
        Ok(_) => Redirect::to("/console/products").into_response(),
        Err(e) => {
            let status = crate::pages::page_status(&e);
            products_page(&web, &visitor, &uri, status, Some(e.words())).await
        }
    }
}

/// `?done=` after a replay.
#[derive(Debug, Deserialize)]
pub struct Done {
    done: Option<String>,
}

/// `GET /console/deadletters`: what each consuming role set aside, with a replay each.
pub async fn dead_letters(State(web): State<Web>, visitor: Visitor, uri: Uri, Query(q): Query<Done>) -> Response {
    let done = q.done.as_deref().map(|outcome| match outcome {
        "already-handled" => "Replayed: the role had handled it meanwhile, so nothing was done twice.",
        _ => "Replayed: the role handled it, and it is no longer set aside.",
    });
    dead_letters_page(&web, &visitor, &uri, StatusCode::OK, done.map(str::to_string), None).await
}

async fn dead_letters_page(
    web: &Web,
    visitor: &Visitor,
    uri: &Uri,
    status: StatusCode,
    done: Option<String>,
    error: Option<String>,
) -> Response {
    let admin = match operator(web, visitor, uri) {
        Ok(admin) => admin,
        Err(page) => return *page,
    };
    let lists = web
        .consumers
        .iter()
        .map(|role| web.api.dead_letters(&admin.token, role));
    let mut roles = Vec::new();
    for (role, listed) in web.consumers.iter().zip(futures_util::future::join_all(lists).await) {
        match listed {
            Ok(letters) => roles.push(context! { role, letters, error => None::<String> }),
            Err(e) => roles.push(context! { role, letters => Vec::<()>::new(), error => Some(e.words()) }),
        }
    }
    web.views.page(
        status,
        "console_deadletters.html",
        context! { nav => Nav::of(visitor), roles, done, error },
    )
}

/// `POST /console/deadletters/{role}/{topic}/{seq}/replay`.
pub async fn replay(
    State(web): State<Web>,
    visitor: Visitor,
    uri: Uri,
    Path((role, topic, seq)): Path<(String, String, u64)>,
) -> Response {
    let admin = match operator(&web, &visitor, &uri) {
        Ok(admin) => admin,
        Err(page) => return *page,
    };
    let Some(role) = web.consumers.iter().find(|r| **r == role) else {
        return problem_page(
            &web,
            &visitor,
            StatusCode::NOT_FOUND,
            "Dead letters",
            "No role of that name consumes anything.",
        );
    };
    match web.api.replay(&admin.token, role, &topic, seq).await {
        Ok(outcome) => Redirect::to(&format!("/console/deadletters?done={outcome}")).into_response(),
        Err(e) => {
            // Operators read the role's own reason.
            let words = match &e {
                ApiError::Answered {
                    status: StatusCode::CONFLICT | StatusCode::NOT_FOUND,
                    detail,
                } => format!("Could not replay it: {detail}"),
                _ => e.words(),
            };
            dead_letters_page(&web, &visitor, &uri, crate::pages::page_status(&e), None, Some(words)).await
        }
    }
}

/// `12`, `12.5` or `12.50` in cents; `None` for anything else.
fn cents(price: &str) -> Option<i64> {
    let price = price.trim().trim_start_matches('$');
    let (whole, fraction) = price.split_once('.').unwrap_or((price, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 2 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
    whole.checked_mul(100)?.checked_add(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_read_as_people_type_them() {
        assert_eq!(cents("12"), Some(1200));
        assert_eq!(cents("12.5"), Some(1250));
        assert_eq!(cents(" $0.05 "), Some(5));
        for bad in ["", "12.345", "-1", "1e3", "12.x", "."] {
            assert_eq!(cents(bad), None, "{bad}");
        }
    }
}
