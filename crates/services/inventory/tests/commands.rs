//! The saga commands inventory answers (`inventory.reserve`, `inventory.release`,
//! `inventory.commit`), run through `StockCommands` inside store transactions as the consumer
//! runner runs them, with the answer read from the reply inventory writes to the outbox:
//! reserving takes every line or none and prices it; each command is idempotent by order id;
//! a release that overtakes its reserve leaves a tombstone; a commit turns the reservation
//! into a sale; and after each story the stock adds up as `bazaar audit` checks it.

mod support;

use bazaar_contracts::{topics, types, Reserved};
use bazaar_kit::consumer::HandlerError;
use serde_json::json;
use support::{command, commit, release, reserve, start, CORRELATION};
use uuid::Uuid;

#[tokio::test]
async fn reserve_holds_every_line_and_answers_with_the_prices() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 1_250, 10).await;
    let tee = inv.add_product("TEE", 2_000, 4).await;
    let order = Uuid::now_v7();

    let data = inv.ok(&reserve(order, &[(mug, 2), (tee, 4)])).await;
    let reserved: Reserved = serde_json::from_value(data).expect("a Reserved answer");
    assert_eq!(reserved.total_cents, 2 * 1_250 + 4 * 2_000);
    assert_eq!(reserved.currency, "USD");
    let mut lines: Vec<_> = reserved
        .priced_lines
        .iter()
        .map(|l| (l.product_id, l.quantity, l.unit_price_cents))
        .collect();
    lines.sort();
    let mut want = vec![(mug, 2, 1_250), (tee, 4, 2_000)];
    want.sort();
    assert_eq!(lines, want);

    assert_eq!(inv.levels(mug).await, (8, 10, 2), "(stock, on hand, reserved)");
    assert_eq!(inv.levels(tee).await, (0, 4, 4));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn the_reply_goes_to_the_saga_that_asked() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 1).await;
    let order = Uuid::now_v7();
    let cmd = reserve(order, &[(mug, 1)]);
    inv.ok(&cmd).await;

    let row = bazaar_kit::store::query("SELECT topic, body FROM outbox")
        .fetch_one(&inv.rt.store)
        .await
        .expect("one reply");
    let (topic, body): (String, String) = (row.try_get("topic").unwrap(), row.try_get("body").unwrap());
    assert_eq!(topic, topics::ORDER_SAGA_REPLIES);
    let reply = bazaar_kit::envelope::Envelope::from_slice(body.as_bytes()).unwrap();
    assert_eq!(reply.event_type, types::ORDER_SAGA_REPLY);
    assert_eq!(reply.aggregate_id, order.to_string());
    assert_eq!(reply.metadata.source, "inventory");
    assert_eq!(reply.metadata.correlation_id, CORRELATION);
    assert_eq!(reply.metadata.causation_id, Some(cmd.event_id.to_string()));
    assert_eq!(reply.payload["sagaId"], order.to_string());
    assert_eq!(reply.payload["step"], "reserveInventory");
    assert_eq!(reply.payload["compensation"], false);
    assert_eq!(reply.payload["ok"], true);
}

#[tokio::test]
async fn reserve_takes_nothing_when_one_line_is_short() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let tee = inv.add_product("TEE", 100, 2).await;

    let reason = inv.refused(&reserve(Uuid::now_v7(), &[(mug, 5), (tee, 3)])).await;
    assert!(
        reason.contains("insufficient stock") && reason.contains(&tee.to_string()),
        "{reason}"
    );
    assert!(reason.contains("2 available, 3 wanted"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0), "the line that fitted was not taken");
    assert_eq!(inv.levels(tee).await, (2, 2, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn reserve_counts_stock_others_already_hold() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 5).await;
    inv.ok(&reserve(Uuid::now_v7(), &[(mug, 4)])).await;

    let reason = inv.refused(&reserve(Uuid::now_v7(), &[(mug, 2)])).await;
    assert!(reason.contains("1 available, 2 wanted"), "{reason}");
    inv.ok(&reserve(Uuid::now_v7(), &[(mug, 1)])).await;
    assert_eq!(inv.levels(mug).await, (0, 5, 5));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn two_lines_of_one_product_are_reserved_as_their_sum() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 5).await;

    let reason = inv.refused(&reserve(Uuid::now_v7(), &[(mug, 3), (mug, 3)])).await;
    assert!(reason.contains("5 available, 6 wanted"), "{reason}");
    let data = inv.ok(&reserve(Uuid::now_v7(), &[(mug, 2), (mug, 3)])).await;
    assert_eq!(data["totalCents"], 500);
    assert_eq!(data["pricedLines"].as_array().unwrap().len(), 1);
    assert_eq!(inv.levels(mug).await, (0, 5, 5));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_redelivered_reserve_reserves_once() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    let cmd = reserve(order, &[(mug, 3)]);

    let first = inv.ok(&cmd).await;
    // The same delivery again (past the inbox), and the saga's resend with a new event id.
    let again = inv.ok(&cmd).await;
    let resent = inv.ok(&reserve(order, &[(mug, 3)])).await;
    assert_eq!(again, first, "the same answer");
    assert_eq!(resent, first, "the same answer");
    assert_eq!(inv.levels(mug).await, (7, 10, 3), "held once");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_refused_reserve_stays_refused_when_stock_comes_back() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 1).await;
    let order = Uuid::now_v7();

    let first = inv.refused(&reserve(order, &[(mug, 2)])).await;
    let admin = inv.admin();
    let restock = inv
        .call(
            axum::http::Method::POST,
            &format!("/products/{mug}/stock"),
            Some(&admin),
            Some(json!({"delta": 10})),
        )
        .await;
    assert!(restock.status.is_success(), "{:?}", restock.body);

    let again = inv.refused(&reserve(order, &[(mug, 2)])).await;
    assert_eq!(again, first, "the first answer is final");
    assert_eq!(inv.levels(mug).await, (11, 11, 0), "nothing held");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn an_unknown_product_in_a_reserve_is_refused_with_a_reason() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let ghost = Uuid::now_v7();

    let reason = inv.refused(&reserve(Uuid::now_v7(), &[(mug, 1), (ghost, 1)])).await;
    assert_eq!(reason, format!("unknown product {ghost}"));
    assert_eq!(inv.levels(mug).await, (10, 10, 0), "nothing held");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_reserve_with_a_line_of_no_units_is_refused() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    for quantity in [0, -1] {
        let reason = inv
            .refused(&reserve(Uuid::now_v7(), &[(mug, 1), (mug, quantity)]))
            .await;
        assert!(reason.contains("must be at least 1"), "{reason}");
    }
    let reason = inv.refused(&reserve(Uuid::now_v7(), &[])).await;
    assert!(reason.contains("at least one line"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0), "nothing held");
}

#[tokio::test]
async fn a_reserve_of_too_many_units_is_refused() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    // More than a million units of one product, in one line or summed over several.
    for lines in [
        vec![(mug, 1_000_001)],
        vec![(mug, 600_000), (mug, 600_000)],
        vec![(mug, i64::MAX), (mug, 1)],
    ] {
        let reason = inv.refused(&reserve(Uuid::now_v7(), &lines)).await;
        assert!(reason.contains("too large"), "{reason}");
    }
    assert_eq!(inv.levels(mug).await, (10, 10, 0), "nothing held");
}

#[tokio::test]
async fn a_reserve_mixing_currencies_is_refused() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let admin = inv.admin();
    let euro = inv
        .call(
            axum::http::Method::POST,
            "/products",
            Some(&admin),
            Some(json!({"sku": "TASSE", "name": "Tasse", "priceCents": 900, "currency": "EUR", "stock": 3})),
        )
        .await;
    let euro: Uuid = euro.body["id"].as_str().expect("created").parse().unwrap();

    let reason = inv.refused(&reserve(Uuid::now_v7(), &[(mug, 1), (euro, 1)])).await;
    assert!(reason.contains("one currency"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
    assert_eq!(inv.levels(euro).await, (3, 3, 0));
    let data = inv.ok(&reserve(Uuid::now_v7(), &[(euro, 1)])).await;
    assert_eq!(data["currency"], "EUR");
}

#[tokio::test]
async fn release_returns_the_stock() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    inv.ok(&reserve(order, &[(mug, 4)])).await;

    inv.ok(&release(order)).await;
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
    // A repeated release gives nothing back twice.
    inv.ok(&release(order)).await;
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_release_answers_as_the_compensation_of_reserving() {
    let inv = start().await;
    let order = Uuid::now_v7();
    let cmd = release(order);
    let reply = inv.handle(&cmd).await.expect("handled");
    assert!(reply.ok);
    assert!(reply.compensation);
    assert_eq!(reply.step, "reserveInventory");
    assert_eq!(reply.saga_id, order.to_string());
}

#[tokio::test]
async fn a_release_before_its_reserve_makes_the_late_reserve_hold_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();

    inv.ok(&release(order)).await;
    let reason = inv.refused(&reserve(order, &[(mug, 4)])).await;
    assert!(reason.contains("released"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0), "nothing held");
    // Nor may the tombstone be committed.
    let reason = inv.refused(&commit(order)).await;
    assert!(reason.contains("released"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_reserve_resent_after_its_release_holds_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    inv.ok(&reserve(order, &[(mug, 4)])).await;
    inv.ok(&release(order)).await;

    let reason = inv.refused(&reserve(order, &[(mug, 4)])).await;
    assert!(reason.contains("released"), "{reason}");
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn releasing_a_refused_reservation_changes_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 1).await;
    let other = Uuid::now_v7();
    inv.ok(&reserve(other, &[(mug, 1)])).await;
    let order = Uuid::now_v7();
    inv.refused(&reserve(order, &[(mug, 1)])).await;

    inv.ok(&release(order)).await;
    assert_eq!(inv.levels(mug).await, (0, 1, 1), "the other order still holds its unit");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn commit_turns_the_reservation_into_a_sale() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    inv.ok(&reserve(order, &[(mug, 4)])).await;

    inv.ok(&commit(order)).await;
    assert_eq!(inv.levels(mug).await, (6, 6, 0), "on hand and reserved both drop");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn commit_twice_changes_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    inv.ok(&reserve(order, &[(mug, 4)])).await;
    let cmd = commit(order);
    inv.ok(&cmd).await;

    inv.ok(&cmd).await;
    inv.ok(&commit(order)).await;
    assert_eq!(inv.levels(mug).await, (6, 6, 0));
    // A late resend of the reserve repeats its answer and holds nothing more.
    inv.ok(&reserve(order, &[(mug, 4)])).await;
    assert_eq!(inv.levels(mug).await, (6, 6, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_sold_order_cannot_be_released() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    inv.ok(&reserve(order, &[(mug, 4)])).await;
    inv.ok(&commit(order)).await;

    let reason = inv.refused(&release(order)).await;
    assert!(reason.contains("committed"), "{reason}");
    assert_eq!(inv.levels(mug).await, (6, 6, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn commit_without_a_reservation_is_refused() {
    let inv = start().await;
    let reason = inv.refused(&commit(Uuid::now_v7())).await;
    assert!(reason.contains("no reservation"), "{reason}");
}

#[tokio::test]
async fn an_unknown_command_is_poison_and_writes_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    let cmd = command(
        "inventory.restock",
        json!({"orderId": order}),
        order,
        "reserveInventory",
        false,
    );

    match inv.handle(&cmd).await {
        Err(HandlerError::Poison(reason)) => assert!(reason.contains("inventory.restock"), "{reason}"),
        other => panic!("expected poison, got {other:?}"),
    }
    assert_eq!(inv.outbox_rows().await, 0, "no reply");
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
}

#[tokio::test]
async fn a_command_without_its_saga_header_is_poison() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 100, 10).await;
    let order = Uuid::now_v7();
    let cmd = bazaar_kit::envelope::Envelope::new(
        types::RESERVE_STOCK,
        order.to_string(),
        json!({"orderId": order, "lines": [{"productId": mug, "quantity": 1}]}),
        bazaar_kit::envelope::Metadata::default(),
    );
    assert!(matches!(inv.handle(&cmd).await, Err(HandlerError::Poison(_))));
    assert_eq!(inv.outbox_rows().await, 0, "no reply");
    assert_eq!(inv.levels(mug).await, (10, 10, 0));
}

#[tokio::test]
async fn a_reserve_whose_payload_breaks_its_schema_is_poison() {
    let inv = start().await;
    let order = Uuid::now_v7();
    let cmd = command(
        types::RESERVE_STOCK,
        json!({"orderId": order, "lines": [{"productId": "MUG", "quantity": 1}]}),
        order,
        "reserveInventory",
        false,
    );
    assert!(matches!(inv.handle(&cmd).await, Err(HandlerError::Poison(_))));
    assert_eq!(inv.outbox_rows().await, 0, "no reply");
}

#[tokio::test]
async fn a_command_not_from_the_order_saga_is_dead_lettered_and_holds_nothing() {
    let inv = start().await;
    let mug = inv.add_product("MUG", 1_000, 5).await;
    // Another service that can publish here, or a forger, naming itself.
    let mut forged = reserve(Uuid::now_v7(), &[(mug, 5)]);
    forged.metadata.source = "notifications".into();
    match inv.handle(&forged).await {
        Err(HandlerError::Poison(why)) => assert!(why.contains("only orders sends commands"), "{why}"),
        other => panic!("a command from notifications was not refused: {other:?}"),
    }
    // One that asks for its reply somewhere inventory may not publish.
    let mut elsewhere = reserve(Uuid::now_v7(), &[(mug, 5)]);
    elsewhere.payload["replyTo"] = json!(topics::PAYMENTS_COMMANDS);
    match inv.handle(&elsewhere).await {
        Err(HandlerError::Poison(why)) => assert!(why.contains("replies only on"), "{why}"),
        other => panic!("a reply to payments.commands was not refused: {other:?}"),
    }
    assert_eq!(inv.levels(mug).await, (5, 5, 0), "nothing reserved");
    assert_eq!(inv.outbox_rows().await, 0, "nothing announced");
}
