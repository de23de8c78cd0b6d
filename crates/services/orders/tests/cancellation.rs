//! A customer's cancellation, driven without a broker as the saga tests are: before the
//! order saga's pivot it turns the saga around; once the order is confirmed, or its stock is
//! being committed, a cancellation saga refunds the payment and puts the units back; asked
//! again, it is one cancellation.

mod support;

use axum::http::{Method, StatusCode};
use bazaar_contracts::types;
use bazaar_saga::Verdict;
use serde_json::Value;
use support::{priced, start, Shop, User};
use uuid::Uuid;

/// Asks to cancel `order` as `user`; the status and the order in the answer.
async fn cancel(shop: &Shop, user: &User, order: Uuid) -> (StatusCode, Value) {
    let answer = shop
        .call(
            Method::POST,
            &format!("/orders/{order}/cancellation"),
            Some(&user.token),
            None,
        )
        .await;
    (answer.status, answer.body.clone())
}

/// Answers the cancellation saga's latest `event_type` command of `order` as done.
async fn agree(shop: &Shop, order: Uuid, event_type: &str) {
    let sent = shop.sent_for(&format!("{order}/cancel")).await;
    let command = sent
        .iter()
        .rev()
        .find(|s| s.envelope.event_type == event_type)
        .unwrap_or_else(|| panic!("no {event_type} for the cancellation of {order}"));
    let reply = Shop::reply_to(command, Verdict::done_empty());
    shop.deliver(&reply).await.expect("the engine accepts the reply");
}

/// The cancellation saga's commands for `order`, by type.
async fn cancellation_sent(shop: &Shop, order: Uuid) -> Vec<String> {
    shop.sent_for(&format!("{order}/cancel"))
        .await
        .into_iter()
        .map(|s| s.envelope.event_type)
        .collect()
}

/// The outcome events announced for `order`: (type, total).
async fn announced(shop: &Shop, order: Uuid) -> Vec<(String, i64)> {
    shop.outcomes(order)
        .await
        .into_iter()
        .map(|(e, o)| (e.event_type, o.total_cents))
        .collect()
}

#[tokio::test]
async fn cancelling_a_confirmed_order_refunds_it_returns_its_units_and_then_cancels_it() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 2)]).await;
    shop.confirm(id, &priced(&[(mug, 2)], 1_250, "EUR")).await;

    let (status, order) = cancel(&shop, &ann, id).await;
    assert_eq!(
        (status, order["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelling"))
    );
    assert_eq!(cancellation_sent(&shop, id).await, [types::RETURN_STOCK]);
    let (again, _) = cancel(&shop, &ann, id).await;
    assert_eq!(again, StatusCode::ACCEPTED, "asked again while it runs: the same one");

    agree(&shop, id, types::RETURN_STOCK).await;
    assert_eq!(
        cancellation_sent(&shop, id).await,
        [types::RETURN_STOCK, types::REFUND_PAYMENT],
        "the money goes back once the units did"
    );
    assert_eq!(shop.status(id).await, "cancelling");
    agree(&shop, id, types::REFUND_PAYMENT).await;

    let order = shop.order(&ann, id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(order["reason"], "cancelled by the customer");
    assert_eq!(
        announced(&shop, id).await,
        [
            (types::ORDER_CONFIRMED.to_string(), 2_500),
            (types::ORDER_CANCELLED.to_string(), 2_500)
        ],
        "confirmed, then cancelled with what was refunded"
    );
    let history: Vec<String> = order["saga"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| {
            format!(
                "{} {}",
                h["step"].as_str().unwrap_or(""),
                h["entry"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(history.contains(&"refundPayment done".to_string()), "{history:?}");
    let (done, order) = cancel(&shop, &ann, id).await;
    assert_eq!((done, order["status"].as_str()), (StatusCode::OK, Some("cancelled")));
    assert_eq!(cancellation_sent(&shop, id).await.len(), 2, "one cancellation");
}

#[tokio::test]
async fn cancelling_a_pending_order_undoes_what_its_saga_did_the_step_in_flight_included() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 1)]).await;
    shop.reserve(id, &priced(&[(mug, 1)], 900, "EUR")).await;

    let (status, order) = cancel(&shop, &ann, id).await;
    assert_eq!(
        (status, order["status"].as_str()),
        (StatusCode::ACCEPTED, Some("pending"))
    );
    assert_eq!(
        shop.sent_types(id).await,
        [types::RESERVE_STOCK, types::PROCESS_PAYMENT, types::REFUND_PAYMENT],
        "the payment in flight is refunded (or voided) at once"
    );
    shop.answer(id, types::REFUND_PAYMENT, Verdict::done_empty()).await;
    shop.answer(id, types::RELEASE_STOCK, Verdict::done_empty()).await;

    let order = shop.order(&ann, id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert_eq!(
        order["reason"], "cancelled by the customer",
        "the customer's words, not a step's"
    );
    assert_eq!(announced(&shop, id).await, [(types::ORDER_CANCELLED.to_string(), 0)]);
    assert!(
        cancellation_sent(&shop, id).await.is_empty(),
        "nothing was taken: no refund saga"
    );
}

#[tokio::test]
async fn an_order_cancelled_while_its_stock_is_committed_is_handed_to_a_cancellation_unannounced() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 3)]).await;
    shop.reserve(id, &priced(&[(mug, 3)], 500, "EUR")).await;
    shop.pay(id).await;

    let (status, _) = cancel(&shop, &ann, id).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        shop.sent_types(id).await.last().map(String::as_str),
        Some(types::COMMIT_STOCK),
        "past the pivot nothing is undone"
    );
    shop.commit(id).await;
    assert_eq!(shop.status(id).await, "cancelling", "never confirmed to the customer");
    assert_eq!(cancellation_sent(&shop, id).await, [types::RETURN_STOCK]);
    agree(&shop, id, types::RETURN_STOCK).await;
    agree(&shop, id, types::REFUND_PAYMENT).await;

    assert_eq!(shop.status(id).await, "cancelled");
    assert_eq!(
        announced(&shop, id).await,
        [(types::ORDER_CANCELLED.to_string(), 1_500)],
        "one message: cancelled, with the refund"
    );
}

#[tokio::test]
async fn only_the_customer_can_cancel_their_order_and_a_bad_id_is_a_400() {
    let shop = start().await;
    let (ann, bob) = (shop.customer(), shop.customer());
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 1)]).await;

    let (status, problem) = cancel(&shop, &bob, id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, _) = cancel(&shop, &ann, Uuid::now_v7()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let bad = shop
        .call(Method::POST, "/orders/nope/cancellation", Some(&ann.token), None)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(shop.status(id).await, "pending", "nothing changed");
    assert_eq!(shop.sent_types(id).await, [types::RESERVE_STOCK]);
}

#[tokio::test]
async fn a_refused_cancellation_changes_nothing_and_asking_again_says_why() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 1)]).await;
    shop.confirm(id, &priced(&[(mug, 1)], 800, "EUR")).await;
    cancel(&shop, &ann, id).await;
    let sent = shop.sent_for(&format!("{id}/cancel")).await;
    let reply = Shop::reply_to(&sent[0], Verdict::refused("nothing was sold"));
    shop.deliver(&reply).await.expect("the engine accepts the refusal");

    assert_eq!(
        cancellation_sent(&shop, id).await,
        [types::RETURN_STOCK],
        "no refund after a refused return"
    );
    let order = shop.order(&ann, id).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert!(
        order["reason"].as_str().unwrap_or("").contains("nothing was sold"),
        "{order}"
    );
    assert_eq!(
        announced(&shop, id).await,
        [(types::ORDER_CONFIRMED.to_string(), 800)],
        "announced once, as before"
    );
    let (status, problem) = cancel(&shop, &ann, id).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("nothing was sold"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_stuck_cancellation_is_listed_refuses_a_new_one_and_an_operator_sends_it_forward() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = Uuid::now_v7();
    let id = shop.place(&ann, &[(mug, 1)]).await;
    shop.confirm(id, &priced(&[(mug, 1)], 600, "EUR")).await;
    cancel(&shop, &ann, id).await;
    agree(&shop, id, types::RETURN_STOCK).await;
    let refund = shop.sent_for(&format!("{id}/cancel")).await.pop().expect("the refund");
    let gave_up = Shop::reply_to(&refund, Verdict::GaveUp("no provider configured".into()));
    shop.deliver(&gave_up)
        .await
        .expect("the engine takes the given-up reply");

    let (status, problem) = cancel(&shop, &ann, id).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let admin = shop.admin();
    let stuck = shop.get("/sagas?status=stuck", &admin).await.expect(StatusCode::OK);
    assert_eq!(stuck[0]["kind"], "order-cancellation", "{stuck}");
    assert_eq!(stuck[0]["id"], format!("{id}/cancel"));
    let view = shop.get(&format!("/sagas/{id}"), &admin).await.expect(StatusCode::OK);
    assert_eq!(view["saga"]["status"], "stuck", "{view}");

    shop.call(Method::POST, &format!("/sagas/{id}/retry"), Some(&admin.token), None)
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(
        cancellation_sent(&shop, id).await,
        [types::RETURN_STOCK, types::REFUND_PAYMENT, types::REFUND_PAYMENT],
        "the refund is sent again, nothing undone"
    );
    agree(&shop, id, types::REFUND_PAYMENT).await;
    assert_eq!(shop.status(id).await, "cancelled");
}
