//! The orders HTTP API, called in-process through the router the role serves (no socket):
//! placing an order (202, `Location`, the pending order and its lines), what a placement
//! refuses (no token, no items, bad quantities, too many lines, unknown fields, a reused
//! `Idempotency-Key` with another body) and that a refused placement stores nothing; that
//! the same key returns the same order; that customers see only their own orders, listed
//! newest first and paged; `?waitFor=outcome`; and the operators' `/sagas` routes.

mod support;

use bazaar_kit::store;
use std::{sync::Arc, time::Duration};

use axum::http::{header, Method, StatusCode};
use bazaar_contracts::types;
use serde_json::{json, Value};
use support::{items, priced, start, Shop};
use uuid::Uuid;

fn product() -> Uuid {
    Uuid::now_v7()
}

/// Asserts nothing was placed: no order, no saga, no command.
async fn nothing_placed(shop: &Shop) {
    assert_eq!(shop.count("orders").await, 0, "no order row");
    assert_eq!(shop.count("saga").await, 0, "no saga");
    assert_eq!(shop.count("outbox").await, 0, "no command");
}

#[tokio::test]
async fn placing_an_order_answers_202_with_the_pending_order_its_location_and_lines() {
    let shop = start().await;
    let ann = shop.customer();
    let (mug, tee) = (product(), product());

    let answer = shop.post_order(&ann, &items(&[(mug, 2), (tee, 1)]), None).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    assert!(
        answer.content_type().starts_with("application/json"),
        "{}",
        answer.content_type()
    );
    let order = &answer.body;
    let id: Uuid = order["id"].as_str().expect("id").parse().expect("a UUID");
    assert_eq!(
        answer.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/orders/{id}").as_str())
    );
    assert_eq!(order["status"], "pending");
    assert_eq!(order["customerId"], ann.id.to_string());
    assert_eq!(
        order["lines"],
        json!([{"productId": mug, "quantity": 2}, {"productId": tee, "quantity": 1}])
    );
    assert_eq!(order["totalCents"], Value::Null, "not priced yet");
    assert_eq!(order["currency"], Value::Null);
    assert_eq!(order["reason"], Value::Null);
    assert!(order["createdAt"].as_str().is_some_and(|t| !t.is_empty()), "{order}");

    // What was answered is what is stored, and the saga is running its first step.
    let shown = shop.order(&ann, id).await;
    for field in ["id", "customerId", "status", "lines", "totalCents", "createdAt"] {
        assert_eq!(shown[field], order[field], "{field}");
    }
    assert_eq!(shown["saga"]["status"], "running");
    assert_eq!(shown["saga"]["step"], "reserveInventory");
    assert_eq!(shop.sent_types(id).await, [types::RESERVE_STOCK]);
}

#[tokio::test]
async fn an_order_needs_a_valid_token() {
    let shop = start().await;
    let ann = shop.customer();
    let id = shop.place(&ann, &[(product(), 1)]).await;
    let body = items(&[(product(), 1)]);
    let foreign = bazaar_kit::auth::SigningKey::generate()
        .expect("a key")
        .issue(ann.id, "ann@example.com", &[], Duration::from_secs(60))
        .expect("token");

    for token in [None, Some("not-a-token"), Some(foreign.as_str())] {
        let detail = shop
            .call(Method::POST, "/orders", token, Some(body.clone()))
            .await
            .problem(StatusCode::UNAUTHORIZED);
        assert!(detail.contains("token"), "{detail}");
        shop.call(Method::GET, "/orders", token, None)
            .await
            .problem(StatusCode::UNAUTHORIZED);
        shop.call(Method::GET, &format!("/orders/{id}"), token, None)
            .await
            .problem(StatusCode::UNAUTHORIZED);
    }
    assert_eq!(shop.count("orders").await, 1, "only the order placed with a token");
}

#[tokio::test]
async fn an_order_without_items_is_refused() {
    let shop = start().await;
    let detail = shop
        .post_order(&shop.customer(), &json!({"items": []}), None)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("at least one item"), "{detail}");
    nothing_placed(&shop).await;
}

#[tokio::test]
async fn a_quantity_outside_1_to_10000_is_refused_naming_the_product() {
    let shop = start().await;
    let ann = shop.customer();
    for quantity in [0, -1, 10_001, i64::MAX] {
        let bad = product();
        let detail = shop
            .post_order(&ann, &items(&[(product(), 1), (bad, quantity)]), None)
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(
            detail.contains(&bad.to_string()) && detail.contains("between 1 and 10000"),
            "{quantity}: {detail}"
        );
    }
    nothing_placed(&shop).await;

    // The bounds themselves are fine.
    shop.place(&ann, &[(product(), 1), (product(), 10_000)]).await;
}

#[tokio::test]
async fn more_than_100_lines_are_refused() {
    let shop = start().await;
    let ann = shop.customer();
    let lines: Vec<(Uuid, i64)> = (0..101).map(|_| (product(), 1)).collect();
    let detail = shop
        .post_order(&ann, &items(&lines), None)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("at most 100"), "{detail}");
    nothing_placed(&shop).await;

    shop.place(&ann, &lines[..100]).await;
}

#[tokio::test]
async fn unknown_fields_in_an_order_are_refused_naming_them() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = product();
    let cases = [
        (
            json!({"items": [{"productId": mug, "quantity": 1}], "coupon": "FREE"}),
            "coupon",
        ),
        (
            json!({"items": [{"productId": mug, "quantity": 1, "size": "XL"}]}),
            "size",
        ),
    ];
    for (body, field) in cases {
        let detail = shop
            .post_order(&ann, &body, None)
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(field), "{body}: {detail}");
    }
    nothing_placed(&shop).await;
}

#[tokio::test]
async fn a_malformed_order_body_is_a_problem_saying_what_is_wrong() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = product();
    let cases = [
        (json!({}), "items"),
        (json!({"items": [{"productId": mug}]}), "quantity"),
        (json!({"items": [{"productId": "mug", "quantity": 1}]}), "productId"),
        (json!({"items": [{"productId": mug, "quantity": 1.5}]}), "quantity"),
    ];
    for (body, field) in cases {
        let detail = shop
            .post_order(&ann, &body, None)
            .await
            .problem(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(detail.contains(field), "{body}: {detail}");
    }

    let not_json = shop
        .send(
            axum::http::Request::post("/orders")
                .header(header::AUTHORIZATION, format!("Bearer {}", ann.token))
                .header(header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from("{\"items\": ["))
                .expect("request"),
        )
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(not_json.to_lowercase().contains("json"), "{not_json}");

    let no_content_type = shop
        .send(
            axum::http::Request::post("/orders")
                .header(header::AUTHORIZATION, format!("Bearer {}", ann.token))
                .body(axum::body::Body::from(items(&[(mug, 1)]).to_string()))
                .expect("request"),
        )
        .await
        .problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(no_content_type.contains("application/json"), "{no_content_type}");
    nothing_placed(&shop).await;
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_order() {
    let shop = start().await;
    let ann = shop.customer();
    let body = items(&[(product(), 2)]);

    let first = shop
        .post_order(&ann, &body, Some("k-1"))
        .await
        .expect(StatusCode::ACCEPTED);
    let again = shop.post_order(&ann, &body, Some("k-1")).await;
    assert_eq!(again.status, StatusCode::OK, "a retry answers 200: {:?}", again.body);
    assert_eq!(again.body, first, "the same order");
    assert_eq!(shop.count("orders").await, 1, "one order row");
    assert_eq!(shop.count("saga").await, 1, "one saga");
    let id: Uuid = first["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        shop.sent_types(id).await,
        [types::RESERVE_STOCK],
        "one reservation asked for"
    );

    // A new key is a new order.
    shop.post_order(&ann, &body, Some("k-2"))
        .await
        .expect(StatusCode::ACCEPTED);
    assert_eq!(shop.count("orders").await, 2);
}

#[tokio::test]
async fn the_same_idempotency_key_with_another_body_is_refused() {
    let shop = start().await;
    let ann = shop.customer();
    let mug = product();
    let first = shop
        .post_order(&ann, &items(&[(mug, 1)]), Some("k-1"))
        .await
        .expect(StatusCode::ACCEPTED);

    let detail = shop
        .post_order(&ann, &items(&[(mug, 2)]), Some("k-1"))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("Idempotency-Key"), "{detail}");
    assert_eq!(shop.count("orders").await, 1);
    let id: Uuid = first["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        shop.order(&ann, id).await["lines"],
        json!([{"productId": mug, "quantity": 1}]),
        "the first order is untouched"
    );
}

#[tokio::test]
async fn two_concurrent_requests_with_one_idempotency_key_place_one_order() {
    let shop = start().await;
    let ann = shop.customer();
    let body = items(&[(product(), 1)]);

    // Interleaved, both find no order under the key before either inserts, so one meets the
    // unique index and must answer with the order the other placed (a retry racing its original).
    let (a, b) = tokio::join!(
        shop.post_order(&ann, &body, Some("same")),
        shop.post_order(&ann, &body, Some("same"))
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::ACCEPTED],
        "{:?} {:?}",
        a.body,
        b.body
    );
    assert_eq!(a.body["id"], b.body["id"]);
    assert_eq!(shop.count("orders").await, 1);
    assert_eq!(shop.count("saga").await, 1);
}

#[tokio::test]
async fn an_idempotency_key_belongs_to_one_customer() {
    let shop = start().await;
    let body = items(&[(product(), 1)]);
    let ann = shop.post_order(&shop.customer(), &body, Some("k-1")).await;
    let ben = shop.post_order(&shop.customer(), &body, Some("k-1")).await;
    assert_eq!((ann.status, ben.status), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_ne!(ann.body["id"], ben.body["id"], "each customer gets their own order");
}

#[tokio::test]
async fn an_empty_or_overlong_idempotency_key_is_refused() {
    let shop = start().await;
    let ann = shop.customer();
    let body = items(&[(product(), 1)]);
    for key in [String::new(), "k".repeat(201)] {
        let detail = shop
            .post_order(&ann, &body, Some(&key))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("Idempotency-Key"), "{detail}");
    }
    nothing_placed(&shop).await;
    shop.post_order(&ann, &body, Some(&"k".repeat(200)))
        .await
        .expect(StatusCode::ACCEPTED);
}

#[tokio::test]
async fn another_customers_order_is_404() {
    let shop = start().await;
    let (ann, ben) = (shop.customer(), shop.customer());
    let id = shop.place(&ann, &[(product(), 1)]).await;

    let theirs = shop
        .get(&format!("/orders/{id}"), &ben)
        .await
        .problem(StatusCode::NOT_FOUND);
    let missing = Uuid::now_v7();
    let nobodys = shop
        .get(&format!("/orders/{missing}"), &ben)
        .await
        .problem(StatusCode::NOT_FOUND);
    assert_eq!(
        theirs.replace(&id.to_string(), "ID"),
        nobodys.replace(&missing.to_string(), "ID"),
        "someone else's order reads as one that does not exist"
    );
    // Waiting on it tells nothing either.
    shop.get(&format!("/orders/{id}?waitFor=outcome&timeout=1"), &ben)
        .await
        .problem(StatusCode::NOT_FOUND);
    shop.get(&format!("/orders/{id}"), &ann).await.expect(StatusCode::OK);
}

#[tokio::test]
async fn an_order_id_that_is_not_a_uuid_is_a_400() {
    let shop = start().await;
    let detail = shop
        .get("/orders/not-a-uuid", &shop.customer())
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("not-a-uuid"), "{detail}");
}

#[tokio::test]
async fn get_orders_lists_only_mine_newest_first() {
    let shop = start().await;
    let (ann, ben) = (shop.customer(), shop.customer());
    let first = shop.place(&ann, &[(product(), 1)]).await;
    let bens = shop.place(&ben, &[(product(), 1)]).await;
    let second = shop.place(&ann, &[(product(), 2)]).await;

    let list = shop.get("/orders", &ann).await.expect(StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.to_string(), first.to_string()]);
    let list = shop.get("/orders", &ben).await.expect(StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], bens.to_string());
    assert_eq!(
        shop.get("/orders", &shop.customer()).await.expect(StatusCode::OK),
        json!([]),
        "a new customer has none"
    );
}

#[tokio::test]
async fn get_orders_pages_with_limit_and_offset() {
    let shop = start().await;
    let ann = shop.customer();
    let mut placed = Vec::new();
    for _ in 0..5 {
        placed.push(shop.place(&ann, &[(product(), 1)]).await.to_string());
        // Distinct creation times, so "newest first" has one answer.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    placed.reverse();

    let page = |uri: String| {
        let shop = &shop;
        let ann = &ann;
        async move {
            let list = shop.get(&uri, ann).await.expect(StatusCode::OK);
            list.as_array()
                .expect("a list")
                .iter()
                .map(|o| o["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page("/orders?limit=2".into()).await, placed[..2]);
    assert_eq!(page("/orders?limit=2&offset=2".into()).await, placed[2..4]);
    assert_eq!(page("/orders?limit=2&offset=4".into()).await, placed[4..]);
    assert!(page("/orders?offset=5".into()).await.is_empty());
    // Out-of-range values are clamped rather than refused.
    assert_eq!(page("/orders?limit=0".into()).await, placed[..1]);
    assert_eq!(page("/orders?offset=-3".into()).await, placed);
    let detail = shop
        .get("/orders?limit=lots", &ann)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("limit"), "{detail}");
}

#[tokio::test]
async fn wait_for_outcome_answers_once_the_saga_settles() {
    let shop = Arc::new(start().await);
    let ann = shop.customer();
    let mug = product();
    let id = shop.place(&ann, &[(mug, 2)]).await;

    let participants = {
        let shop = shop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            shop.confirm(id, &priced(&[(mug, 2)], 1_250, "EUR")).await;
        })
    };
    let started = std::time::Instant::now();
    let order = shop
        .get(&format!("/orders/{id}?waitFor=outcome&timeout=5"), &ann)
        .await
        .expect(StatusCode::OK);
    let waited = started.elapsed();
    participants.await.expect("the participants ran");

    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["totalCents"], 2_500);
    assert_eq!(order["saga"]["status"], "completed");
    assert!(
        waited >= Duration::from_millis(300),
        "answered before the outcome: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "answered {waited:?} after placing, not soon after the outcome"
    );
}

#[tokio::test]
async fn wait_for_outcome_answers_at_the_timeout_while_still_pending() {
    let shop = start().await;
    let ann = shop.customer();
    let id = shop.place(&ann, &[(product(), 1)]).await;

    let started = std::time::Instant::now();
    let order = shop
        .get(&format!("/orders/{id}?waitFor=outcome&timeout=1"), &ann)
        .await
        .expect(StatusCode::OK);
    let waited = started.elapsed();
    assert_eq!(order["status"], "pending");
    assert_eq!(order["saga"]["step"], "reserveInventory");
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // A settled order answers at once.
    shop.answer(id, types::RESERVE_STOCK, bazaar_saga::Verdict::refused("out of stock"))
        .await;
    let started = std::time::Instant::now();
    let order = shop
        .get(&format!("/orders/{id}?waitFor=outcome&timeout=30"), &ann)
        .await
        .expect(StatusCode::OK);
    assert_eq!(order["status"], "cancelled");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn wait_for_change_answers_when_the_saga_moves_past_what_was_seen() {
    let shop = Arc::new(start().await);
    let ann = shop.customer();
    let mug = product();
    let id = shop.place(&ann, &[(mug, 1)]).await;
    let now = shop.get(&format!("/orders/{id}"), &ann).await.expect(StatusCode::OK);
    let seen = now["saga"]["history"].as_array().expect("a history").len();

    // Nothing new: it answers at the timeout with what was seen.
    let started = std::time::Instant::now();
    let same = shop
        .get(&format!("/orders/{id}?waitFor=change&seen={seen}&timeout=1"), &ann)
        .await
        .expect(StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(same["saga"]["history"].as_array().map(Vec::len), Some(seen));

    // A reply moves the saga: the waiting request answers soon after, with the new entry.
    let participants = {
        let shop = shop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            shop.confirm(id, &priced(&[(mug, 1)], 1_250, "EUR")).await;
        })
    };
    let started = std::time::Instant::now();
    let moved = shop
        .get(&format!("/orders/{id}?waitFor=change&seen={seen}&timeout=10"), &ann)
        .await
        .expect(StatusCode::OK);
    let waited = started.elapsed();
    participants.await.expect("the participants ran");
    assert!(
        moved["saga"]["history"].as_array().map(Vec::len) > Some(seen),
        "{moved}"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "answered before the move: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "answered {waited:?} after placing");

    shop.get(&format!("/orders/{id}?waitFor=change&seen=-1"), &ann)
        .await
        .problem(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn wait_for_anything_but_outcome_is_a_400() {
    let shop = start().await;
    let ann = shop.customer();
    let id = shop.place(&ann, &[(product(), 1)]).await;
    let detail = shop
        .get(&format!("/orders/{id}?waitFor=payment"), &ann)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("outcome") && detail.contains("payment"), "{detail}");
    shop.get(&format!("/orders/{id}?waitFor=outcome&timeout=-1"), &ann)
        .await
        .problem(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn sagas_are_for_admins_only() {
    let shop = start().await;
    let ann = shop.customer();
    let id = shop.place(&ann, &[(product(), 1)]).await;
    for (method, uri) in [
        (Method::GET, "/sagas".to_string()),
        (Method::GET, "/sagas?status=running".to_string()),
        (Method::GET, format!("/sagas/{id}")),
        (Method::POST, format!("/sagas/{id}/retry")),
    ] {
        let detail = shop
            .call(method.clone(), &uri, Some(&ann.token), None)
            .await
            .problem(StatusCode::FORBIDDEN);
        assert!(detail.contains("admin"), "{method} {uri}: {detail}");
        shop.call(method, &uri, None, None)
            .await
            .problem(StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn an_admin_lists_sagas_by_status_stuck_by_default() {
    let shop = start().await;
    let admin = shop.admin();
    let id = shop.place(&shop.customer(), &[(product(), 1)]).await;

    assert_eq!(
        shop.get("/sagas", &admin).await.expect(StatusCode::OK),
        json!([]),
        "none stuck"
    );
    let running = shop.get("/sagas?status=running", &admin).await.expect(StatusCode::OK);
    assert_eq!(running.as_array().unwrap().len(), 1, "{running}");
    assert_eq!(running[0]["id"], id.to_string());
    assert_eq!(running[0]["kind"], "order");
    assert_eq!(running[0]["context"]["orderId"], id.to_string());

    let detail = shop
        .get("/sagas?status=bogus", &admin)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("bogus") && detail.contains("stuck"), "{detail}");
}

#[tokio::test]
async fn an_admin_reads_a_sagas_state_and_history() {
    let shop = start().await;
    let admin = shop.admin();
    let id = shop.place(&shop.customer(), &[(product(), 1)]).await;

    let saga = shop.get(&format!("/sagas/{id}"), &admin).await.expect(StatusCode::OK);
    assert_eq!(saga["saga"]["id"], id.to_string());
    assert_eq!(saga["saga"]["status"], "running");
    assert_eq!(saga["saga"]["attempts"], 1);
    assert_eq!(saga["history"][0]["entry"], "started", "{saga}");

    let missing = Uuid::now_v7();
    let detail = shop
        .get(&format!("/sagas/{missing}"), &admin)
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(detail.contains(&missing.to_string()), "{detail}");
    shop.get("/sagas/nope", &admin).await.problem(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn retrying_a_saga_that_is_not_stuck_is_a_409() {
    let shop = start().await;
    let admin = shop.admin();
    let id = shop.place(&shop.customer(), &[(product(), 1)]).await;

    for saga in [id, Uuid::now_v7()] {
        let detail = shop
            .call(Method::POST, &format!("/sagas/{saga}/retry"), Some(&admin.token), None)
            .await
            .problem(StatusCode::CONFLICT);
        assert!(detail.contains("not stuck"), "{detail}");
    }
    assert_eq!(shop.sent_types(id).await, [types::RESERVE_STOCK], "nothing was resent");
}

#[tokio::test]
async fn retrying_a_stuck_saga_sends_its_compensation_again() {
    let shop = start().await;
    let admin = shop.admin();
    let ann = shop.customer();
    let mug = product();
    let id = shop.place(&ann, &[(mug, 1)]).await;
    shop.reserve(id, &priced(&[(mug, 1)], 500, "USD")).await;
    shop.answer(
        id,
        types::PROCESS_PAYMENT,
        bazaar_saga::Verdict::refused("card declined"),
    )
    .await;
    // The release kept failing until the engine gave up (what the timer does after
    // COMPENSATION_ATTEMPTS failures), leaving the order pending.
    store::query("UPDATE saga SET status = 'stuck', deadline = NULL WHERE id = $1")
        .bind(id.to_string())
        .execute(&shop.rt.store)
        .await
        .expect("mark stuck");
    let stuck = shop.get("/sagas", &admin).await.expect(StatusCode::OK);
    assert_eq!(stuck[0]["id"], id.to_string(), "{stuck}");

    let answer = shop
        .call(Method::POST, &format!("/sagas/{id}/retry"), Some(&admin.token), None)
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    assert_eq!(
        shop.sent_types(id).await,
        [
            types::RESERVE_STOCK,
            types::PROCESS_PAYMENT,
            types::RELEASE_STOCK,
            types::RELEASE_STOCK
        ]
    );
    shop.answer(id, types::RELEASE_STOCK, bazaar_saga::Verdict::done_empty())
        .await;
    let order = shop.order(&ann, id).await;
    assert_eq!(order["status"], "cancelled", "{order}");
    assert!(order["reason"].as_str().unwrap().contains("card declined"), "{order}");
}

#[tokio::test]
async fn a_customer_past_their_orders_a_minute_is_told_when_to_come_back_and_others_are_not() {
    let shop = support::start_limited(bazaar_orders::AdmissionLimits {
        per_customer_per_minute: 3,
        max_in_flight: 0,
    })
    .await;
    let (ann, bob) = (shop.customer(), shop.customer());
    let product = Uuid::now_v7();
    let first = shop
        .post_order(&ann, &items(&[(product, 1)]), Some("first"))
        .await
        .expect(StatusCode::ACCEPTED);
    for _ in 0..2 {
        shop.place(&ann, &[(product, 1)]).await;
    }
    let refused = shop.post_order(&ann, &items(&[(product, 1)]), None).await;
    let detail = refused.problem(StatusCode::TOO_MANY_REQUESTS);
    assert!(detail.contains("3 orders in the last minute"), "{detail}");
    let wait: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert_eq!(shop.count("orders").await, 3, "nothing placed");
    // A retry of an order already placed is still answered; another customer is not limited.
    let again = shop
        .post_order(&ann, &items(&[(product, 1)]), Some("first"))
        .await
        .expect(StatusCode::OK);
    assert_eq!(again["id"], first["id"]);
    shop.place(&bob, &[(product, 1)]).await;
}

#[tokio::test]
async fn new_orders_are_shed_with_503_while_too_many_sagas_are_in_flight_and_admitted_again_after() {
    let shop = support::start_limited(bazaar_orders::AdmissionLimits {
        per_customer_per_minute: 0,
        max_in_flight: 2,
    })
    .await;
    let ann = shop.customer();
    let product = Uuid::now_v7();
    let mut placed = vec![
        shop.place(&ann, &[(product, 1)]).await,
        shop.place(&ann, &[(product, 1)]).await,
    ];
    // The count of sagas in flight is re-read four times a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let shed = loop {
        let answer = shop.post_order(&ann, &items(&[(product, 1)]), None).await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            break answer;
        }
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
        placed.push(answer.body["id"].as_str().unwrap().parse().unwrap());
        assert!(std::time::Instant::now() < deadline, "never shed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shed.headers["retry-after"], "1");
    assert!(shed.problem(StatusCode::SERVICE_UNAVAILABLE).contains("at capacity"));
    let stored = shop.count("orders").await;
    assert_eq!(stored, placed.len() as i64, "a shed order stored nothing");
    // Sagas finish until one fewer than the limit runs; new orders are admitted again.
    for order in &placed[1..] {
        shop.confirm(*order, &priced(&[(product, 1)], 250, "USD")).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shop.post_order(&ann, &items(&[(product, 1)]), None).await.status != StatusCode::ACCEPTED {
        assert!(std::time::Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shop.count("orders").await, stored + 1);
}
