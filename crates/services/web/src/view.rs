//! Pages: the templates (compiled into the binary, escaped by default), money in words, an
//! order's saga as steps a shopper follows, and cancellation reasons in plain language.

use std::collections::HashMap;

use axum::response::{Html, IntoResponse, Response};
use http::StatusCode;
use minijinja::Environment;
use serde::Serialize;
use uuid::Uuid;

use crate::api::{Order, Product};

/// Every template, by name.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../templates/base.html")),
    ("home.html", include_str!("../templates/home.html")),
    ("cart.html", include_str!("../templates/cart.html")),
    ("signin.html", include_str!("../templates/signin.html")),
    ("signup.html", include_str!("../templates/signup.html")),
    ("confirm.html", include_str!("../templates/confirm.html")),
    ("orders.html", include_str!("../templates/orders.html")),
    ("order.html", include_str!("../templates/order.html")),
    ("progress.html", include_str!("../templates/progress.html")),
    ("wallet.html", include_str!("../templates/wallet.html")),
    ("messages.html", include_str!("../templates/messages.html")),
    ("problem.html", include_str!("../templates/problem.html")),
    ("console_nav.html", include_str!("../templates/console_nav.html")),
    ("console.html", include_str!("../templates/console.html")),
    ("console_live.html", include_str!("../templates/console_live.html")),
    ("console_sagas.html", include_str!("../templates/console_sagas.html")),
    ("console_saga.html", include_str!("../templates/console_saga.html")),
    (
        "console_products.html",
        include_str!("../templates/console_products.html"),
    ),
    (
        "console_deadletters.html",
        include_str!("../templates/console_deadletters.html"),
    ),
];

/// The compiled templates.
#[derive(Debug)]
pub struct Views(Environment<'static>);

/// Why the templates could not be compiled (a bug caught by the unit tests).
#[derive(Debug, thiserror::Error)]
#[error("template {name}: {source}")]
pub struct ViewError {
    name: &'static str,
    source: minijinja::Error,
}

impl Views {
    /// Compiles every template.
    pub fn new() -> Result<Views, ViewError> {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .map_err(|source| ViewError { name, source })?;
        }
        env.add_filter("money", |cents: i64, currency: Option<String>| {
            money(cents, currency.as_deref().unwrap_or("USD"))
        });
        env.add_filter("when", |rfc3339: String| when(&rfc3339));
        Ok(Views(env))
    }

    /// Renders `name` with `context`; a rendering failure is a 500 page in words.
    pub fn render(&self, name: &str, context: impl Serialize) -> Result<String, minijinja::Error> {
        self.0.get_template(name)?.render(context)
    }

    /// The page `name` with `status`.
    pub fn page(&self, status: StatusCode, name: &str, context: impl Serialize) -> Response {
        match self.render(name, context) {
            Ok(html) => (status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "cannot render a page");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Html("<!doctype html><title>Error</title><p>Something went wrong on our side.</p>"),
                )
                    .into_response()
            }
        }
    }
}

/// `cents` in `currency` as people write it: `$12.50`, `€3.00`, `12.50 CHF`.
pub fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let amount = format!("{}.{:02}", cents.unsigned_abs() / 100, cents.unsigned_abs() % 100);
    match currency {
        "USD" => format!("{sign}${amount}"),
        "EUR" => format!("{sign}€{amount}"),
        "GBP" => format!("{sign}£{amount}"),
        other => format!("{sign}{amount} {other}"),
    }
}

/// An RFC 3339 time as `2026-12-05 10:46:07 UTC`.
fn when(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

/// The order saga's steps, in order, as a shopper reads them.
const STEPS: [(&str, &str); 3] = [
    ("reserveInventory", "Reserve your items"),
    ("processPayment", "Take the payment"),
    ("commitStock", "Hand your items to shipping"),
];

/// Where one step of an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Not started.
    Waiting,
    /// Under way.
    Working,
    /// Done.
    Done,
    /// It failed; what came before is being undone.
    Failed,
    /// Done, then undone because a later step failed.
    Undone,
}

impl StepState {
    /// In words.
    fn words(self) -> &'static str {
        match self {
            StepState::Waiting => "waiting",
            StepState::Working => "in progress",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Undone => "undone",
        }
    }
}

/// One step as the order page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    /// What the step does.
    pub label: &'static str,
    /// Where it is.
    pub state: StepState,
    /// `state` in words.
    pub words: &'static str,
}

/// An order as its page shows it: lines with names, steps, and the outcome in words.
#[derive(Debug, Clone, Serialize)]
pub struct OrderView {
    /// The order.
    pub order: Order,
    /// Its lines with the product's name and price.
    pub lines: Vec<LineView>,
    /// The saga's steps.
    pub steps: Vec<StepView>,
    /// `pending`, `confirmed`, `cancelling` or `cancelled`.
    pub status: String,
    /// Whether it has an outcome.
    pub settled: bool,
    /// Whether the shopper may still cancel it.
    pub cancellable: bool,
    /// The outcome (or the wait) in a sentence.
    pub headline: String,
    /// History entries seen (the live feed asks for more than these).
    pub seen: usize,
}

/// One line of an order or cart.
#[derive(Debug, Clone, Serialize)]
pub struct LineView {
    /// The product's id.
    pub product_id: Uuid,
    /// Its name (or its id when the catalogue no longer has it).
    pub name: String,
    /// How many.
    pub quantity: i64,
    /// Unit price, when known.
    pub price_cents: Option<i64>,
    /// Its currency.
    pub currency: String,
    /// Units available now.
    pub stock: Option<i64>,
}

/// The lines of `lines` with what the catalogue says of each product.
pub fn line_views(lines: &[(Uuid, i64)], products: &HashMap<Uuid, Product>) -> Vec<LineView> {
    lines
        .iter()
        .map(|(id, quantity)| {
            let product = products.get(id);
            LineView {
                product_id: *id,
                name: product.map_or_else(|| format!("product {id}"), |p| p.name.clone()),
                quantity: *quantity,
                price_cents: product.map(|p| p.price_cents),
                currency: product.map_or_else(|| "USD".to_string(), |p| p.currency.clone()),
                stock: product.map(|p| p.stock),
            }
        })
        .collect()
}

impl OrderView {
    /// The page's view of `order`, naming products from `products`.
    pub fn new(order: Order, products: &HashMap<Uuid, Product>) -> OrderView {
        let saga = order.saga.clone().unwrap_or_default();
        let steps = STEPS
            .iter()
            .map(|(step, label)| {
                let last = saga
                    .history
                    .iter()
                    .rev()
                    .find(|h| h.step == *step)
                    .map(|h| h.entry.as_str());
                let state = match last {
                    Some("done") => StepState::Done,
                    Some("compensated") => StepState::Undone,
                    Some(entry) if entry.starts_with("failed") || entry.starts_with("no reply") => StepState::Failed,
                    _ if saga.step.as_deref() == Some(step) && saga.status.as_deref() == Some("running") => {
                        StepState::Working
                    }
                    _ => StepState::Waiting,
                };
                StepView {
                    label,
                    state,
                    words: state.words(),
                }
            })
            .collect();
        let lines: Vec<(Uuid, i64)> = order.lines.iter().map(|l| (l.product_id, l.quantity)).collect();
        let headline = match order.status.as_str() {
            "confirmed" => "Your order is confirmed.".to_string(),
            "cancelling" => "You cancelled your order: we are refunding it and putting its items back.".to_string(),
            "cancelled" => format!(
                "Your order was cancelled: {}",
                reason_words(
                    order.reason.as_deref().unwrap_or_default(),
                    order.currency.as_deref(),
                    products
                )
            ),
            _ if saga.status.as_deref() == Some("stuck") => {
                "Your order is waiting for our staff; nothing has been charged twice, and we will sort it out."
                    .to_string()
            }
            _ => "We are working on your order…".to_string(),
        };
        OrderView {
            lines: line_views(&lines, products),
            steps,
            status: order.status.clone(),
            settled: matches!(order.status.as_str(), "confirmed" | "cancelled"),
            cancellable: matches!(order.status.as_str(), "pending" | "confirmed"),
            headline,
            seen: saga.history.len(),
            order,
        }
    }
}

/// Why an order was cancelled, in a sentence for the shopper who placed it.
pub fn reason_words(reason: &str, currency: Option<&str>, products: &HashMap<Uuid, Product>) -> String {
    let currency = currency.unwrap_or("USD");
    // The saga names the failed step first: `processPayment: insufficient funds: …`.
    let reason = match reason.split_once(": ") {
        Some((step, rest)) if STEPS.iter().any(|(s, _)| *s == step) => rest,
        _ => reason,
    };
    if let Some(rest) = reason.strip_prefix("insufficient funds: balance ") {
        // "insufficient funds: balance 1200, amount 5000"
        let mut numbers = rest.split(", amount ").map(|n| n.trim().parse::<i64>());
        if let (Some(Ok(balance)), Some(Ok(amount))) = (numbers.next(), numbers.next()) {
            return format!(
                "not enough money in your wallet — the order came to {} and your wallet held {}.",
                money(amount, currency),
                money(balance, currency)
            );
        }
        return "not enough money in your wallet.".into();
    }
    if let Some(rest) = reason.strip_prefix("insufficient stock for ") {
        // "insufficient stock for <id>: 3 available, 5 wanted"
        let name = rest
            .split(':')
            .next()
            .and_then(|id| id.trim().parse::<Uuid>().ok())
            .and_then(|id| products.get(&id))
            .map_or_else(|| "one of the products".to_string(), |p| p.name.clone());
        let available = rest
            .split(": ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<i64>().ok());
        return match available {
            Some(n) => format!("out of stock — only {n} of {name} left."),
            None => format!("out of stock — not enough of {name} left."),
        };
    }
    if reason.ends_with("cancelled by the customer") {
        return "you cancelled it.".into();
    }
    if reason.starts_with("unknown product") {
        return "a product in your order is no longer sold.".into();
    }
    if reason.contains("declined") {
        return "your payment was declined.".into();
    }
    if reason.contains("no reply") || reason.contains("timed out") {
        return "we could not complete it in time; nothing was charged.".into();
    }
    "we could not complete it; anything charged has been refunded.".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HistoryEntry, Line, SagaProgress};

    #[test]
    fn every_template_compiles_and_every_file_is_one() {
        Views::new().unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        for file in std::fs::read_dir(dir).unwrap() {
            let name = file.unwrap().file_name().into_string().unwrap();
            assert!(TEMPLATES.iter().any(|(n, _)| *n == name), "{name} is not in TEMPLATES");
        }
    }

    #[test]
    fn money_reads_as_people_write_it() {
        assert_eq!(money(1250, "USD"), "$12.50");
        assert_eq!(money(-5, "EUR"), "-€0.05");
        assert_eq!(money(100_000, "CHF"), "1000.00 CHF");
    }

    fn product(id: Uuid, name: &str) -> Product {
        Product {
            id,
            sku: "S".into(),
            name: name.into(),
            price_cents: 100,
            currency: "USD".into(),
            stock: 3,
            on_hand: 3,
            reserved: 0,
        }
    }

    #[test]
    fn cancellation_reasons_are_said_in_plain_words() {
        let id = Uuid::new_v4();
        let products = HashMap::from([(id, product(id, "Blue mug"))]);
        assert_eq!(
            reason_words(
                "processPayment: insufficient funds: balance 1200, amount 5000",
                Some("USD"),
                &products
            ),
            "not enough money in your wallet — the order came to $50.00 and your wallet held $12.00."
        );
        assert_eq!(
            reason_words(
                &format!("insufficient stock for {id}: 3 available, 5 wanted"),
                None,
                &products
            ),
            "out of stock — only 3 of Blue mug left."
        );
        assert!(reason_words("provider declined the card", None, &products).contains("declined"));
    }

    #[test]
    fn a_failed_payment_shows_the_reservation_undone() {
        let entry = |step: &str, entry: &str| HistoryEntry {
            at: "2026-12-05T10:00:00Z".into(),
            step: step.into(),
            entry: entry.into(),
        };
        let order = Order {
            id: Uuid::new_v4(),
            status: "cancelled".into(),
            lines: vec![Line {
                product_id: Uuid::new_v4(),
                quantity: 1,
            }],
            total_cents: None,
            currency: Some("USD".into()),
            reason: Some("insufficient funds: balance 0, amount 100".into()),
            created_at: "2026-12-05T10:00:00Z".into(),
            saga: Some(SagaProgress {
                status: Some("compensated".into()),
                step: None,
                history: vec![
                    entry("-", "started"),
                    entry("reserveInventory", "done"),
                    entry("processPayment", "failed: insufficient funds; compensating"),
                    entry("reserveInventory", "compensated"),
                ],
            }),
        };
        let view = OrderView::new(order, &HashMap::new());
        let states: Vec<StepState> = view.steps.iter().map(|s| s.state).collect();
        assert_eq!(states, [StepState::Undone, StepState::Failed, StepState::Waiting]);
        assert!(view.settled);
        assert!(view.headline.contains("not enough money"));
        assert_eq!(view.seen, 4);
    }
}
