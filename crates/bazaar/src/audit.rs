//! `bazaar audit`: checks the invariants of the design map (docs/architecture.md) over every store and the broker, and
//! `bazaar dlq`: lists and replays dead letters.

use bazaar_kit::store;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use bazaar_kit::{
    broker::{self, dlq_topic, DeadLetter, SharedBroker},
    service::ServiceSpec,
    store::Store,
};
use clap::Args;
use serde::Serialize;

use bazaar::{roles, settings::Broker};
use bazaar_inventory::ReservationStatus;
use bazaar_orders::OrderStatus;
use bazaar_payments::PaymentStatus;

/// Flags of `bazaar audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Keep re-checking for up to this many seconds until everything holds (lets the system
    /// go quiet first).
    #[arg(long, default_value_t = 0)]
    wait: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One checked statement.
#[derive(Debug, Serialize)]
pub struct Check {
    /// Which invariant of the design map (1..=6).
    pub invariant: u8,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The stores and broker the audit reads.
pub struct Sources {
    /// Every service's store, in role-table order (outboxes and consumer groups).
    all: Vec<(&'static ServiceSpec, Store)>,
    users: Store,
    inventory: Store,
    orders: Store,
    payments: Store,
    notifications: Store,
    broker: SharedBroker,
}

impl Sources {
    /// Opens every service's store (as `up` and `serve` find them from `data`) and `broker`.
    pub async fn open(data: &std::path::Path, broker: &Broker) -> anyhow::Result<Sources> {
        let mut all = Vec::new();
        for (_, spec) in roles::services() {
            let url = bazaar::settings::store_url(data, spec.name);
            if let Some(path) = url.strip_prefix("sqlite://") {
                if !std::path::Path::new(path).exists() {
                    anyhow::bail!(
                        "no {} store at {path}; has the system run with this data directory?",
                        spec.name
                    );
                }
            }
            // Two connections a store: the audit reads one query at a time.
            let pool = bazaar_kit::store::PoolOptions::new(format!("audit of {}", spec.name), 2);
            let store = Store::open_with(&url, pool)
                .await
                .with_context(|| format!("{} store", spec.name))?;
            all.push((spec, store));
        }
        // The invariants are the shop's own rules, so they name the services they read.
        let store = |spec: &ServiceSpec| {
            all.iter()
                .find(|(s, _)| s.name == spec.name)
                .map(|(_, store)| store.clone())
                .with_context(|| format!("the role table has no {} service", spec.name))
        };
        Ok(Sources {
            users: store(&bazaar_users::SERVICE)?,
            inventory: store(&bazaar_inventory::SERVICE)?,
            orders: store(&bazaar_orders::SERVICE)?,
            payments: store(&bazaar_payments::SERVICE)?,
            notifications: store(&bazaar_notifications::SERVICE)?,
            all,
            broker: broker::connect(&broker.url(data)).await.context("broker")?,
        })
    }
}

async fn count(store: &Store, sql: &str) -> anyhow::Result<i64> {
    Ok(store::query(sql).fetch_one(store).await?.try_get::<i64, _>(0)?)
}

fn check(invariant: u8, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        invariant,
        ok,
        detail: detail.into(),
    }
}

/// Runs every check once.
pub async fn checks(s: &Sources) -> anyhow::Result<Vec<Check>> {
    let orders = orders(s).await?;
    Ok(vec![
        settled(s, &orders).await?,
        outcomes_match(s, &orders).await?,
        stock_adds_up(s).await?,
        money_adds_up(s).await?,
        notified_once(s, &orders).await?,
        events_delivered(s).await?,
    ])
}

/// An order as the audit reads it.
struct OrderRow {
    id: String,
    status: OrderStatus,
    total: Option<i64>,
    customer: String,
    /// Whether its confirmation was announced (also for an order cancelled afterwards).
    announced: bool,
}

/// Every order.
async fn orders(s: &Sources) -> anyhow::Result<Vec<OrderRow>> {
    store::query("SELECT id, status, total_cents, customer_id, confirmed_at FROM orders")
        .fetch_all(&s.orders)
        .await?
        .iter()
        .map(|r| {
            Ok(OrderRow {
                id: r.try_get("id")?,
                status: OrderStatus::parse(&r.try_get::<String, _>("status")?)?,
                total: r.try_get("total_cents")?,
                customer: r.try_get("customer_id")?,
                announced: r.try_get::<Option<i64>, _>("confirmed_at")?.is_some(),
            })
        })
        .collect()
}

/// 1. Every order settled.
async fn settled(s: &Sources, orders: &[OrderRow]) -> anyhow::Result<Check> {
    let mut by_status: HashMap<&str, i64> = HashMap::new();
    for order in orders {
        *by_status.entry(order.status.as_str()).or_default() += 1;
    }
    let pending = by_status.get("pending").copied().unwrap_or(0);
    let cancelling = by_status.get("cancelling").copied().unwrap_or(0);
    let open_sagas = count(
        &s.orders,
        "SELECT COUNT(*) FROM saga WHERE status IN ('running', 'compensating')",
    )
    .await?;
    let stuck = count(&s.orders, "SELECT COUNT(*) FROM saga WHERE status = 'stuck'").await?;
    Ok(check(
        1,
        pending == 0 && cancelling == 0 && open_sagas == 0 && stuck == 0,
        format!(
            "{} orders: {} confirmed, {} cancelled, {pending} pending, {cancelling} cancelling; sagas open {open_sagas}, stuck {stuck}",
            orders.len(),
            by_status.get("confirmed").copied().unwrap_or(0),
            by_status.get("cancelled").copied().unwrap_or(0),
        ),
    ))
}

/// 2. Each outcome matches payments and stock.
async fn outcomes_match(s: &Sources, orders: &[OrderRow]) -> anyhow::Result<Check> {
    let payments: HashMap<String, (PaymentStatus, i64)> =
        store::query("SELECT order_id, status, amount_cents FROM payment")
            .fetch_all(&s.payments)
            .await?
            .iter()
            .map(|r| {
                let status = PaymentStatus::parse(&r.try_get::<String, _>("status")?)?;
                Ok((r.try_get("order_id")?, (status, r.try_get("amount_cents")?)))
            })
            .collect::<anyhow::Result<_>>()?;
    let reservations: HashMap<String, ReservationStatus> = store::query("SELECT order_id, status FROM reservation")
        .fetch_all(&s.inventory)
        .await?
        .iter()
        .map(|r| {
            let status = ReservationStatus::parse(&r.try_get::<String, _>("status")?)?;
            Ok((r.try_get("order_id")?, status))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut wrong = Vec::new();
    for OrderRow { id, status, total, .. } in orders {
        let pay = payments.get(id);
        let res = reservations.get(id).copied();
        let captured = |(st, _): &(PaymentStatus, i64)| *st == PaymentStatus::Captured;
        // A cancelled order holds nothing: no payment taken (or it was refunded) and no units
        // held or sold (or they were returned).
        let fine = match status {
            OrderStatus::Confirmed => {
                pay.is_some_and(|p| captured(p) && Some(p.1) == *total) && res == Some(ReservationStatus::Committed)
            }
            OrderStatus::Cancelled => {
                !pay.is_some_and(captured)
                    && !matches!(res, Some(ReservationStatus::Reserved | ReservationStatus::Committed))
            }
            // Not settled yet: invariant 1 says so.
            OrderStatus::Pending | OrderStatus::Cancelling => true,
        };
        if !fine {
            wrong.push(format!(
                "{id} {}: payment {pay:?}, reservation {res:?}",
                status.as_str()
            ));
        }
    }
    Ok(check(
        2,
        wrong.is_empty(),
        if wrong.is_empty() {
            format!("{} settled orders match their payment and reservation", orders.len())
        } else {
            format!("{} mismatches, first: {}", wrong.len(), wrong[0])
        },
    ))
}

/// 3. Stock adds up, per product.
async fn stock_adds_up(s: &Sources) -> anyhow::Result<Check> {
    let products = store::query(
        "SELECT p.id, p.on_hand, p.reserved,
                (SELECT CAST(COALESCE(SUM(delta), 0) AS BIGINT) FROM stock_movement m WHERE m.product_id = p.id) AS moved,
                (SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_line l JOIN reservation r ON r.order_id = l.order_id
                  WHERE l.product_id = p.id AND r.status = 'committed') AS sold,
                (SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_line l JOIN reservation r ON r.order_id = l.order_id
                  WHERE l.product_id = p.id AND r.status = 'reserved') AS held
         FROM product p",
    )
    .fetch_all(&s.inventory)
    .await?;
    let mut bad_stock = Vec::new();
    for r in &products {
        let (id, on_hand, reserved): (String, i64, i64) =
            (r.try_get("id")?, r.try_get("on_hand")?, r.try_get("reserved")?);
        let (moved, sold, held): (i64, i64, i64) = (r.try_get("moved")?, r.try_get("sold")?, r.try_get("held")?);
        if moved - sold != on_hand || on_hand < 0 || reserved != held {
            bad_stock.push(format!(
                "{id}: received {moved} - sold {sold} != on hand {on_hand}, or reserved {reserved} != held {held}"
            ));
        }
    }
    Ok(check(
        3,
        bad_stock.is_empty(),
        if bad_stock.is_empty() {
            format!(
                "{} products: received - sold = on hand, reservations match",
                products.len()
            )
        } else {
            bad_stock.join("; ")
        },
    ))
}

/// 4. Money adds up.
async fn money_adds_up(s: &Sources) -> anyhow::Result<Check> {
    let total = count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry",
    )
    .await?;
    let deposits = -count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id = 'external:deposits'",
    )
    .await?;
    let wallets = count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id LIKE 'customer:%'",
    )
    .await?;
    let revenue = count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id = 'merchant:revenue'",
    )
    .await?;
    let captured = count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM payment WHERE status = 'captured'",
    )
    .await?;
    // Amounts held while a payment provider's answer is awaited; none once all is quiet.
    let held = count(
        &s.payments,
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry WHERE account_id = 'payments:holds'",
    )
    .await?;
    let negative = count(
        &s.payments,
        "SELECT COUNT(*) FROM (SELECT account_id FROM ledger_entry WHERE account_id LIKE 'customer:%' GROUP BY account_id HAVING SUM(amount_cents) < 0) AS n",
    )
    .await?;
    let drifted = count(&s.payments, bazaar_payments::ledger::DRIFTED_ACCOUNTS).await?;
    // Doubled transfers an older release wrote, set aside when the store was upgraded: not
    // in the sums above, shown so an operator knows they were there.
    let doubled = count(&s.payments, "SELECT COUNT(DISTINCT txn_id) FROM ledger_entry_doubled").await?;
    Ok(check(
        4,
        total == 0 && wallets + revenue == deposits && revenue == captured && negative == 0 && held == 0 && drifted == 0,
        format!(
            "deposits {deposits} = wallets {wallets} + revenue {revenue}; revenue = captured {captured}; ledger sum {total}; negative wallets {negative}; on hold {held}; balances off their entries {drifted}; doubled transfers set aside by the upgrade {doubled}"
        ),
    ))
}

/// 5. One notification per outcome and channel (SMS for customers who gave a phone).
async fn notified_once(s: &Sources, orders: &[OrderRow]) -> anyhow::Result<Check> {
    let sent: HashMap<String, String> =
        store::query("SELECT dedupe_key, status FROM notification WHERE dedupe_key LIKE 'order.%'")
            .fetch_all(&s.notifications)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("dedupe_key")?, r.try_get("status")?)))
            .collect::<Result<_, store::StoreError>>()?;
    let phones: std::collections::HashSet<String> = store::query("SELECT user_id FROM contact WHERE phone IS NOT NULL")
        .fetch_all(&s.notifications)
        .await?
        .iter()
        .map(|r| r.try_get("user_id"))
        .collect::<Result<_, store::StoreError>>()?;
    let mut missing = Vec::new();
    let mut texts = 0;
    for order in orders.iter().filter(|o| o.status.is_settled()) {
        let texted = phones.contains(&order.customer);
        texts += usize::from(texted);
        missing.extend(untold(order, &sent, texted));
    }
    // Only confirmed accounts are announced (and welcomed); unconfirmed ones wait for a code.
    let users = count(&s.users, "SELECT COUNT(*) FROM users WHERE verified_at IS NOT NULL").await?;
    let welcomes = count(
        &s.notifications,
        "SELECT COUNT(*) FROM notification WHERE dedupe_key LIKE 'user.registered:%' AND status = 'sent'",
    )
    .await?;
    Ok(check(
        5,
        missing.is_empty() && welcomes == users,
        if missing.is_empty() {
            format!(
                "{} outcome messages sent once each ({texts} by SMS); {welcomes}/{users} welcome emails",
                sent.len()
            )
        } else {
            format!(
                "{} outcomes not notified exactly once, first: {}; welcomes {welcomes}/{users}",
                missing.len(),
                missing[0]
            )
        },
    ))
}

/// What settled `order` was not told once each, per channel (email, and SMS when `texted`),
/// or was told and never should have been: a confirmation (also of an order cancelled once
/// it was confirmed), a cancellation.
fn untold(order: &OrderRow, sent: &HashMap<String, String>, texted: bool) -> Vec<String> {
    let (told, never): (&[&str], &[&str]) = match (order.status, order.announced) {
        (OrderStatus::Confirmed, _) => (&["confirmed"], &["cancelled"]),
        (_, true) => (&["confirmed", "cancelled"], &[]),
        _ => (&["cancelled"], &["confirmed"]),
    };
    let channels: &[&str] = if texted { &["", ":sms"] } else { &[""] };
    let mut wrong = Vec::new();
    for channel in channels {
        let id = &order.id;
        for outcome in told {
            let key = format!("order.{outcome}:{id}{channel}");
            // A text past its number's daily limit is recorded as suppressed instead of sent.
            let done = match sent.get(&key).map(String::as_str) {
                Some("sent") => true,
                Some("suppressed") => *channel == ":sms",
                _ => false,
            };
            if !done {
                wrong.push(format!("{key}: {:?}", sent.get(&key)));
            }
        }
        for outcome in never {
            let key = format!("order.{outcome}:{id}{channel}");
            if let Some(status) = sent.get(&key) {
                wrong.push(format!("{key} should not be: {status:?}"));
            }
        }
    }
    wrong
}

/// 6. Every event reached every group, or sits in a dead-letter topic.
async fn events_delivered(s: &Sources) -> anyhow::Result<Check> {
    let mut unsent = Vec::new();
    for (spec, store) in &s.all {
        let n = count(store, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await?;
        if n > 0 {
            unsent.push(format!("{} outbox {n} unsent", spec.name));
        }
        for topic in spec.consumes {
            let lag = s.broker.pending(topic, spec.name).await?;
            if lag > 0 {
                unsent.push(format!("{} on {topic}: {lag} pending", spec.name));
            }
        }
    }
    let mut dead = 0;
    for topic in all_topics() {
        dead += s.broker.read(&dlq_topic(topic), 10_000).await?.len();
    }
    Ok(check(
        6,
        unsent.is_empty(),
        if unsent.is_empty() {
            format!("every outbox relayed, every group caught up; {dead} dead letters (see bazaar dlq list)")
        } else {
            unsent.join("; ")
        },
    ))
}

/// Every consumed topic once: where dead letters can be.
fn all_topics() -> Vec<&'static str> {
    let mut topics: Vec<&'static str> = roles::services()
        .flat_map(|(_, spec)| spec.consumes.iter().copied())
        .collect();
    topics.sort_unstable();
    topics.dedup();
    topics
}

/// `bazaar audit`.
pub async fn run(data: &std::path::Path, broker: &Broker, args: AuditArgs) -> anyhow::Result<()> {
    let sources = Sources::open(data, broker).await?;
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let report = loop {
        let report = checks(&sources).await?;
        if report.iter().all(|c| c.ok) || Instant::now() >= deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report {
            println!(
                "{} invariant {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.invariant,
                c.detail
            );
        }
    }
    let failed = report.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} invariant(s) do not hold");
    }
    Ok(())
}

/// `bazaar dlq …`.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Lists dead letters of every topic.
    List,
    /// Republishes every dead letter of `topic` and removes it from the dead-letter topic.
    Replay {
        /// The original topic, e.g. `payments.commands`.
        topic: String,
    },
}

/// `bazaar dlq list|replay`.
pub async fn dlq(data: &std::path::Path, broker: &Broker, command: DlqCommand) -> anyhow::Result<()> {
    let broker = broker::connect(&broker.url(data)).await.context("broker")?;
    match command {
        DlqCommand::List => {
            let mut n = 0;
            for topic in all_topics() {
                for m in broker.read(&dlq_topic(topic), 10_000).await? {
                    n += 1;
                    match serde_json::from_slice::<DeadLetter>(&m.body) {
                        Ok(d) => println!(
                            "{topic} #{} group={} id={} attempts={} at={} reason: {}",
                            m.seq, d.group, d.msg_id, d.attempts, d.dead_at, d.reason
                        ),
                        Err(_) => println!("{topic} #{} (unreadable dead letter)", m.seq),
                    }
                }
            }
            println!("{n} dead letter(s)");
            Ok(())
        }
        DlqCommand::Replay { topic } => {
            let mut n = 0;
            for m in broker.read(&dlq_topic(&topic), 10_000).await? {
                let d: DeadLetter = serde_json::from_slice(&m.body)
                    .with_context(|| format!("dead letter #{} of {topic} is unreadable", m.seq))?;
                d.replay(broker.as_ref(), m.seq).await?;
                n += 1;
            }
            println!("replayed {n} dead letter(s) of {topic}");
            Ok(())
        }
    }
}
