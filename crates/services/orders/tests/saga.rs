//! The order saga's rules, driven without a broker: the test plays inventory and payments by
//! answering the commands the engine wrote to the outbox, and reads the order (through the
//! API) and the outcome events (`orders.events` in the outbox) that result. Covered: placing
//! asks for exactly the ordered lines; the payment charges exactly what the reservation
//! priced; a refused reservation or payment cancels the order with the reason and undoes
//! what was done; commitStock is the pivot, after which the order is confirmed and announced
//! exactly once; duplicate, early and ill-fitting replies change nothing.

mod support;

use axum::http::StatusCode;
use bazaar_contracts::{topics, types, OrderRef, ProcessPayment, ReserveStock};
use bazaar_kit::consumer::HandlerError;
use bazaar_saga::Verdict;
use serde_json::json;
use support::{priced, start, Shop, User};
use uuid::Uuid;

/// A placed order of two mugs (12.50 EUR each) and one tee (20.00 EUR).
struct Placed {
    shop: Shop,
    ann: User,
    id: Uuid,
    lines: Vec<(Uuid, i64)>,
}

async fn placed() -> Placed {
    let shop = start().await;
    let ann = shop.customer();
    let lines = vec![(Uuid::now_v7(), 2), (Uuid::now_v7(), 1)];
    let id = shop.place(&ann, &lines).await;
    Placed { shop, ann, id, lines }
}

impl Placed {
    /// What inventory answers: 12.50 a unit, in EUR, 37.50 in all.
    fn reserved(&self) -> bazaar_contracts::Reserved {
        let reserved = priced(&self.lines, 1_250, "EUR");
        assert_eq!(reserved.total_cents, 3_750);
        reserved
    }

    async fn order(&self) -> serde_json::Value {
        self.shop.order(&self.ann, self.id).await
    }
}

#[tokio::test]
async fn placing_an_order_asks_inventory_to_reserve_exactly_its_lines() {
    let p = placed().await;
    let sent = p.shop.sent(p.id).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let reserve = &sent[0];
    assert_eq!(reserve.topic, topics::INVENTORY_COMMANDS);
    assert_eq!(reserve.envelope.event_type, types::RESERVE_STOCK);
    assert_eq!(reserve.envelope.metadata.source, "orders");
    let cmd: ReserveStock = reserve.payload();
    assert_eq!(cmd.order_id, p.id);
    let lines: Vec<(Uuid, i64)> = cmd.lines.iter().map(|l| (l.product_id, l.quantity)).collect();
    assert_eq!(lines, p.lines);
    assert_eq!(reserve.header.step, "reserveInventory");
    assert!(!reserve.header.compensation);
    assert_eq!(reserve.header.reply_to, topics::ORDER_SAGA_REPLIES);
    assert_eq!(reserve.header.reply_type, types::ORDER_SAGA_REPLY);
}

#[tokio::test]
async fn the_payment_charges_exactly_what_the_reservation_priced() {
    let p = placed().await;
    p.shop.reserve(p.id, &p.reserved()).await;

    let pay = p.shop.latest(p.id, types::PROCESS_PAYMENT).await;
    assert_eq!(pay.topic, topics::PAYMENTS_COMMANDS);
    let cmd: ProcessPayment = pay.payload();
    assert_eq!(
        (cmd.order_id, cmd.customer_id, cmd.amount_cents, cmd.currency.as_str()),
        (p.id, p.ann.id, 3_750, "EUR")
    );
    assert_eq!(p.order().await["status"], "pending", "not confirmed before it is paid");
}

#[tokio::test]
async fn a_confirmed_order_records_the_reservations_total_and_currency() {
    let p = placed().await;
    p.shop.confirm(p.id, &p.reserved()).await;

    let order = p.order().await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["totalCents"], 3_750);
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["reason"], serde_json::Value::Null);
    assert_eq!(order["saga"]["status"], "completed");
    assert_eq!(
        p.shop.sent_types(p.id).await,
        [types::RESERVE_STOCK, types::PROCESS_PAYMENT, types::COMMIT_STOCK]
    );
}

#[tokio::test]
async fn a_refused_reservation_cancels_the_order_with_the_reason_and_never_charges() {
    let p = placed().await;
    let reason = format!("insufficient stock for {}: 1 available, 2 wanted", p.lines[0].0);
    p.shop
        .answer(p.id, types::RESERVE_STOCK, Verdict::refused(&reason))
        .await;

    let order = p.order().await;
    assert_eq!(order["status"], "cancelled", "{order}");
    let said = order["reason"].as_str().expect("a reason");
    assert!(said.contains(&reason), "{said}");
    assert_eq!(order["totalCents"], serde_json::Value::Null, "nothing charged");
    assert_eq!(order["currency"], serde_json::Value::Null, "never priced");
    assert_eq!(
        p.shop.sent_types(p.id).await,
        [types::RESERVE_STOCK],
        "no payment asked for, and nothing to release"
    );
    let outcomes = p.shop.outcomes(p.id).await;
    assert_eq!(outcomes.len(), 1);
    let (event, outcome) = &outcomes[0];
    assert_eq!(event.event_type, types::ORDER_CANCELLED);
    assert_eq!(outcome.total_cents, 0);
    assert_eq!(outcome.currency, None);
    assert!(
        outcome.reason.as_deref().is_some_and(|r| r.contains(&reason)),
        "{outcome:?}"
    );
    assert_eq!(outcome.customer_id, p.ann.id);
    assert_eq!(outcome.email, format!("{}@example.com", p.ann.id));
}

#[tokio::test]
async fn a_refused_payment_releases_the_reservation_and_cancels_the_order_with_the_reason() {
    let p = placed().await;
    p.shop.reserve(p.id, &p.reserved()).await;
    p.shop
        .answer(
            p.id,
            types::PROCESS_PAYMENT,
            Verdict::refused("insufficient funds: 10.00 EUR available"),
        )
        .await;

    let release = p.shop.latest(p.id, types::RELEASE_STOCK).await;
    assert_eq!(release.topic, topics::INVENTORY_COMMANDS);
    assert!(release.header.compensation);
    assert_eq!(release.header.step, "reserveInventory");
    assert_eq!(release.payload::<OrderRef>().order_id, p.id);
    assert_eq!(
        p.order().await["status"],
        "pending",
        "pending until the stock is given back"
    );
    assert!(p.shop.outcomes(p.id).await.is_empty(), "nothing announced yet");

    p.shop.answer(p.id, types::RELEASE_STOCK, Verdict::done_empty()).await;
    let order = p.order().await;
    assert_eq!(order["status"], "cancelled", "{order}");
    let reason = order["reason"].as_str().expect("a reason");
    assert!(reason.contains("insufficient funds: 10.00 EUR available"), "{reason}");
    assert_eq!(order["totalCents"], serde_json::Value::Null, "nothing charged");
    assert_eq!(
        p.shop.sent_types(p.id).await,
        [types::RESERVE_STOCK, types::PROCESS_PAYMENT, types::RELEASE_STOCK],
        "no refund for a payment never taken, no commit"
    );
    let outcomes = p.shop.outcomes(p.id).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].0.event_type, types::ORDER_CANCELLED);
    assert_eq!(outcomes[0].1.total_cents, 0);
    assert_eq!(outcomes[0].1.currency.as_deref(), Some("EUR"), "it was priced");
}

#[tokio::test]
async fn commit_stock_is_the_pivot_after_payment_and_confirms_the_order_once() {
    let p = placed().await;
    p.shop.reserve(p.id, &p.reserved()).await;
    p.shop.pay(p.id).await;

    let commit = p.shop.latest(p.id, types::COMMIT_STOCK).await;
    assert_eq!(commit.topic, topics::INVENTORY_COMMANDS);
    assert_eq!(commit.header.step, "commitStock");
    assert!(!commit.header.compensation);
    assert_eq!(commit.payload::<OrderRef>().order_id, p.id);
    assert_eq!(p.order().await["status"], "pending", "not confirmed before the commit");
    assert!(p.shop.outcomes(p.id).await.is_empty());

    let reply = p.shop.commit(p.id).await;
    let outcomes = p.shop.outcomes(p.id).await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let (event, outcome) = &outcomes[0];
    assert_eq!(event.event_type, types::ORDER_CONFIRMED);
    assert_eq!(event.metadata.source, "orders");
    assert_eq!(
        (
            outcome.order_id,
            outcome.customer_id,
            outcome.total_cents,
            outcome.currency.as_deref()
        ),
        (p.id, p.ann.id, 3_750, Some("EUR"))
    );
    assert_eq!(outcome.reason, None);

    // The same reply again (a redelivery past the inbox) changes nothing.
    let before = (
        p.order().await,
        p.shop.count("outbox").await,
        p.shop.history(p.id).await,
    );
    p.shop.deliver(&reply).await.expect("a duplicate is accepted");
    let after = (
        p.order().await,
        p.shop.count("outbox").await,
        p.shop.history(p.id).await,
    );
    assert_eq!(before, after);
    assert_eq!(p.shop.outcomes(p.id).await.len(), 1, "announced once");
}

#[tokio::test]
async fn a_duplicate_or_early_reply_changes_nothing() {
    let p = placed().await;
    let reserve = p.shop.latest(p.id, types::RESERVE_STOCK).await;
    let reserved = Shop::reply_to(&reserve, Verdict::done(&p.reserved()));
    p.shop.deliver(&reserved).await.expect("accepted");
    let pay = p.shop.latest(p.id, types::PROCESS_PAYMENT).await;

    // The reservation's reply again, and a refusal of the reservation arriving late.
    p.shop.deliver(&reserved).await.expect("accepted");
    p.shop
        .deliver(&Shop::reply_to(&reserve, Verdict::refused("late")))
        .await
        .expect("accepted");
    assert_eq!(
        p.shop.sent_types(p.id).await,
        [types::RESERVE_STOCK, types::PROCESS_PAYMENT],
        "no second payment, no release"
    );
    let history = p.shop.history(p.id).await;
    assert_eq!(
        history
            .iter()
            .filter(|h| h.as_str() == "reserveInventory: ignored a late or duplicate reply")
            .count(),
        2,
        "{history:?}"
    );

    // A commit reply before the payment was answered is ignored too.
    let early_commit = Shop::reply_to(
        &support::Sent {
            header: bazaar_saga::CommandHeader {
                step: "commitStock".into(),
                ..pay.header.clone()
            },
            ..pay.clone()
        },
        Verdict::done_empty(),
    );
    p.shop.deliver(&early_commit).await.expect("accepted");
    let order = p.order().await;
    assert_eq!(order["status"], "pending");
    assert_eq!(order["saga"]["step"], "processPayment");

    // The payment still completes the order as usual.
    p.shop.pay(p.id).await;
    p.shop.commit(p.id).await;
    assert_eq!(p.order().await["status"], "confirmed");
}

#[tokio::test]
async fn a_reservation_reply_that_does_not_fit_is_poison_and_leaves_the_order_pending() {
    let p = placed().await;
    let reserve = p.shop.latest(p.id, types::RESERVE_STOCK).await;
    let history = p.shop.history(p.id).await;
    for data in [
        json!({"pricedLines": [], "totalCents": "lots", "currency": "EUR"}),
        json!({"pricedLines": [], "totalCents": 100}),
        serde_json::Value::Null,
    ] {
        let reply = Shop::reply_to(&reserve, Verdict::Done(data.clone()));
        match p.shop.deliver(&reply).await {
            Err(HandlerError::Poison(reason)) => {
                assert!(reason.contains(&p.id.to_string()), "{reason}");
                assert!(reason.contains("reserveInventory"), "{reason}");
            }
            other => panic!("{data}: expected poison, got {other:?}"),
        }
    }

    let order = p.order().await;
    assert_eq!(order["status"], "pending");
    assert_eq!(order["totalCents"], serde_json::Value::Null);
    assert_eq!(order["saga"]["step"], "reserveInventory");
    assert_eq!(p.shop.sent_types(p.id).await, [types::RESERVE_STOCK], "nothing charged");
    assert_eq!(p.shop.history(p.id).await, history, "nothing recorded");
    let saga = p.shop.orders.engine.load(&p.id.to_string()).await.unwrap().unwrap();
    assert_eq!(saga.context.reserved, None);

    // A reply that fits still moves it on.
    p.shop.reserve(p.id, &p.reserved()).await;
    assert_eq!(
        p.shop
            .latest(p.id, types::PROCESS_PAYMENT)
            .await
            .payload::<ProcessPayment>()
            .amount_cents,
        3_750
    );
}

#[tokio::test]
async fn a_payment_reply_without_a_payment_id_is_poison_and_commits_nothing() {
    let p = placed().await;
    p.shop.reserve(p.id, &p.reserved()).await;
    let pay = p.shop.latest(p.id, types::PROCESS_PAYMENT).await;
    for data in [serde_json::Value::Null, json!({"paymentId": "not-a-uuid"})] {
        let reply = Shop::reply_to(&pay, Verdict::Done(data.clone()));
        match p.shop.deliver(&reply).await {
            Err(HandlerError::Poison(reason)) => assert!(reason.contains("processPayment"), "{reason}"),
            other => panic!("{data}: expected poison, got {other:?}"),
        }
    }
    assert_eq!(p.order().await["status"], "pending");
    assert_eq!(
        p.shop.sent_types(p.id).await,
        [types::RESERVE_STOCK, types::PROCESS_PAYMENT],
        "no commit of stock that was not paid for"
    );
}

#[tokio::test]
async fn a_refused_commit_refunds_the_payment_and_releases_the_stock() {
    let p = placed().await;
    p.shop.reserve(p.id, &p.reserved()).await;
    p.shop.pay(p.id).await;
    p.shop
        .answer(p.id, types::COMMIT_STOCK, Verdict::refused("reservation expired"))
        .await;

    let refund = p.shop.latest(p.id, types::REFUND_PAYMENT).await;
    assert_eq!(refund.topic, topics::PAYMENTS_COMMANDS);
    assert_eq!(refund.payload::<OrderRef>().order_id, p.id);
    p.shop.answer(p.id, types::REFUND_PAYMENT, Verdict::done_empty()).await;
    p.shop.answer(p.id, types::RELEASE_STOCK, Verdict::done_empty()).await;

    assert_eq!(
        p.shop.sent_types(p.id).await,
        [
            types::RESERVE_STOCK,
            types::PROCESS_PAYMENT,
            types::COMMIT_STOCK,
            types::REFUND_PAYMENT,
            types::RELEASE_STOCK
        ]
    );
    let order = p.order().await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert!(
        order["reason"].as_str().unwrap().contains("reservation expired"),
        "{order}"
    );
    let outcomes = p.shop.outcomes(p.id).await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].0.event_type, types::ORDER_CANCELLED);
    assert_eq!(outcomes[0].1.total_cents, 0, "refunded");
}

#[tokio::test]
async fn the_placing_requests_correlation_and_trace_follow_the_saga_to_its_outcome() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let request = Shop::request(
        axum::http::Method::POST,
        "/orders",
        Some(&ann.token),
        &[("x-correlation-id", "checkout-42"), ("traceparent", TRACEPARENT)],
        Some(&support::items(&[(mug, 1)])),
    );
    let answer = shop.send(request).await;
    assert_eq!(
        answer.headers.get("x-correlation-id").and_then(|v| v.to_str().ok()),
        Some("checkout-42")
    );
    let id: Uuid = answer.expect(StatusCode::ACCEPTED)["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    shop.confirm(id, &priced(&[(mug, 1)], 900, "USD")).await;

    for sent in shop.sent(id).await {
        let metadata = &sent.envelope.metadata;
        assert_eq!(metadata.correlation_id, "checkout-42", "{}", sent.envelope.event_type);
        assert_eq!(
            metadata.traceparent.as_deref(),
            Some(TRACEPARENT),
            "{}",
            sent.envelope.event_type
        );
    }
    let outcomes = shop.outcomes(id).await;
    assert_eq!(outcomes[0].0.metadata.correlation_id, "checkout-42");
    assert_eq!(outcomes[0].0.metadata.traceparent.as_deref(), Some(TRACEPARENT));
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
