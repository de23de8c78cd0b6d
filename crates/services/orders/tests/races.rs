//! Placements that arrive at once: one customer's requests spread over two replicas (or
//! handled side by side by one) must still stop at the customer's limit. On PostgreSQL (READ
//! COMMITTED) they really run at once; on SQLite the write lock queues them.

mod support;

use axum::http::StatusCode;
use bazaar_testkit::TestDb;
use futures_util::future::join_all;
use support::items;
use uuid::Uuid;

#[tokio::test]
async fn orders_placed_at_once_by_one_customer_stop_at_their_limit() {
    let limits = bazaar_orders::AdmissionLimits {
        per_customer_per_minute: 3,
        max_in_flight: 0,
    };
    for db in TestDb::both("orders").await {
        let shop = support::start_limited_on(limits, db).await;
        let ann = shop.customer();
        let body = items(&[(Uuid::now_v7(), 1)]);

        let answers = join_all((0..8).map(|_| shop.post_order(&ann, &body, None))).await;

        let placed = answers.iter().filter(|a| a.status == StatusCode::ACCEPTED).count();
        for answer in answers.iter().filter(|a| a.status != StatusCode::ACCEPTED) {
            answer.problem(StatusCode::TOO_MANY_REQUESTS);
        }
        assert_eq!(placed, 3, "{}: placed past the limit", shop.engine());
        assert_eq!(shop.count("orders").await, 3, "{}", shop.engine());
        shop.finish().await;
    }
}

#[tokio::test]
async fn a_retry_at_once_with_the_same_key_gets_the_order_even_at_the_limit() {
    let limits = bazaar_orders::AdmissionLimits {
        per_customer_per_minute: 1,
        max_in_flight: 0,
    };
    for db in TestDb::both("orders").await {
        let shop = support::start_limited_on(limits, db).await;
        let ann = shop.customer();
        let body = items(&[(Uuid::now_v7(), 1)]);

        let answers = join_all((0..4).map(|_| shop.post_order(&ann, &body, Some("the-one")))).await;

        let mut ids = Vec::new();
        for answer in &answers {
            assert!(
                answer.status == StatusCode::ACCEPTED || answer.status == StatusCode::OK,
                "{}: {} {:?}",
                shop.engine(),
                answer.status,
                answer.body
            );
            ids.push(answer.body["id"].clone());
        }
        assert!(
            ids.iter().all(|id| id == &ids[0]),
            "{}: one order: {ids:?}",
            shop.engine()
        );
        assert_eq!(shop.count("orders").await, 1, "{}", shop.engine());
        shop.finish().await;
    }
}

/// A customer's cancellations (eight at once, more than the role's four store connections)
/// against the commit's reply, on both engines: whichever lands first, every request is
/// answered (none waits on a connection another holds while it waits on a lock), the order
/// ends cancelled with one refund and one return, and the customer is told once.
#[tokio::test]
async fn cancellations_at_once_with_the_commit_reply_end_in_one_cancellation() {
    use bazaar_contracts::types;
    use bazaar_saga::Verdict;
    use support::{priced, Shop};
    for db in TestDb::both("orders").await {
        let shop = support::start_limited_on(bazaar_orders::AdmissionLimits::default(), db).await;
        let ann = shop.customer();
        let mug = Uuid::now_v7();
        let id = shop.place(&ann, &[(mug, 1)]).await;
        shop.reserve(id, &priced(&[(mug, 1)], 700, "USD")).await;
        shop.pay(id).await;
        let commit = Shop::reply_to(&shop.latest(id, types::COMMIT_STOCK).await, Verdict::done_empty());
        let uri = format!("/orders/{id}/cancellation");
        let cancels = join_all((0..8).map(|_| shop.call(axum::http::Method::POST, &uri, Some(&ann.token), None)));
        let (answers, committed) = tokio::join!(cancels, shop.deliver(&commit));
        committed.expect("the commit's reply is taken");
        for answer in &answers {
            assert_eq!(
                answer.status,
                StatusCode::ACCEPTED,
                "{}: {:?}",
                shop.engine(),
                answer.body
            );
        }
        let cancellation = format!("{id}/cancel");
        for step in [types::RETURN_STOCK, types::REFUND_PAYMENT] {
            let sent = shop.sent_for(&cancellation).await;
            let command = sent
                .iter()
                .find(|s| s.envelope.event_type == step)
                .unwrap_or_else(|| panic!("{}: no {step} for the cancellation", shop.engine()));
            shop.deliver(&Shop::reply_to(command, Verdict::done_empty()))
                .await
                .expect("the reply is taken");
        }
        let sent: Vec<String> = shop
            .sent_for(&cancellation)
            .await
            .into_iter()
            .map(|s| s.envelope.event_type)
            .collect();
        assert_eq!(sent, [types::RETURN_STOCK, types::REFUND_PAYMENT], "{}", shop.engine());
        assert_eq!(shop.status(id).await, "cancelled", "{}", shop.engine());
        let cancelled = shop
            .outcomes(id)
            .await
            .iter()
            .filter(|(e, _)| e.event_type == types::ORDER_CANCELLED)
            .count();
        assert_eq!(cancelled, 1, "{}", shop.engine());
        shop.finish().await;
    }
}
