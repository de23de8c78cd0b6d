//! The payments HTTP API, called in-process through the router the role serves (no socket):
//! `GET /accounts/me` shows the caller's wallet balance once `user.registered` opened it (a
//! 404 saying to retry before), and needs a token; deposits are for admins only, must be a
//! positive amount within the limit to an existing wallet, and move the balance (the ledger
//! still sums to zero); `GET /payments/{orderId}` shows the payment of an order to its own
//! customer only (anyone else gets the same 404 as for no payment at all).

mod support;

use axum::http::{Method, StatusCode};
use serde_json::json;
use support::{pay, refund, start, welcome, Customer, Payments};
use uuid::Uuid;

/// `POST /accounts/{user}/deposits` of `amount` with `token`.
async fn deposit(p: &Payments, user: Uuid, amount: i64, token: Option<&str>) -> support::Answer {
    p.call(
        Method::POST,
        &format!("/accounts/{user}/deposits"),
        token,
        Some(json!({ "amountCents": amount })),
    )
    .await
}

/// `GET /payments/{order}` as `customer`.
async fn payment_of(p: &Payments, order: Uuid, customer: &Customer) -> support::Answer {
    p.call(Method::GET, &format!("/payments/{order}"), Some(&customer.token), None)
        .await
}

#[tokio::test]
async fn my_account_shows_the_welcome_credit_in_usd() {
    let p = start().await;
    let ann = p.customer().await;
    let body = p
        .call(Method::GET, "/accounts/me", Some(&ann.token), None)
        .await
        .expect(StatusCode::OK);
    assert_eq!(
        body,
        json!({"userId": ann.id.to_string(), "balanceCents": welcome(), "currency": "USD"})
    );
}

#[tokio::test]
async fn my_account_needs_a_token() {
    let p = start().await;
    let detail = p
        .call(Method::GET, "/accounts/me", None, None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bearer token"), "{detail}");
}

#[tokio::test]
async fn my_account_before_the_wallet_opens_is_a_404_saying_to_retry() {
    let p = start().await;
    let ann = p.stranger();
    let detail = p
        .call(Method::GET, "/accounts/me", Some(&ann.token), None)
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(
        detail.contains("no wallet yet") && detail.contains("try again"),
        "{detail}"
    );
}

#[tokio::test]
async fn my_account_follows_payments_and_refunds() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    p.ok(&pay(order, ann.id, 1_999)).await;
    assert_eq!(p.account_balance(&ann).await, welcome() - 1_999);
    p.ok(&refund(order)).await;
    assert_eq!(p.account_balance(&ann).await, welcome());
}

#[tokio::test]
async fn an_admin_deposit_moves_the_balance() {
    let p = start().await;
    let ann = p.customer().await;
    let body = deposit(&p, ann.id, 25_000, Some(&p.admin()))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(
        body,
        json!({"userId": ann.id.to_string(), "balanceCents": welcome() + 25_000, "currency": "USD"})
    );
    assert_eq!(p.account_balance(&ann).await, welcome() + 25_000);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn deposits_are_for_admins_only() {
    let p = start().await;
    let ann = p.customer().await;

    let detail = deposit(&p, ann.id, 25_000, None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bearer token"), "{detail}");
    // Not even into one's own wallet.
    let detail = deposit(&p, ann.id, 25_000, Some(&ann.token))
        .await
        .problem(StatusCode::FORBIDDEN);
    assert!(detail.contains("admin"), "{detail}");
    assert_eq!(p.account_balance(&ann).await, welcome(), "nothing moved");
}

#[tokio::test]
async fn a_deposit_must_be_positive_and_within_the_limit() {
    let p = start().await;
    let ann = p.customer().await;
    let admin = p.admin();
    for amount in [0, -1, 100_000_001] {
        let detail = deposit(&p, ann.id, amount, Some(&admin))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("amountCents"), "{detail}");
    }
    assert_eq!(p.account_balance(&ann).await, welcome(), "nothing moved");
    // The limit itself is allowed.
    deposit(&p, ann.id, 100_000_000, Some(&admin))
        .await
        .expect(StatusCode::CREATED);
    assert_eq!(p.account_balance(&ann).await, welcome() + 100_000_000);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_deposit_with_unknown_fields_is_refused_naming_them() {
    let p = start().await;
    let ann = p.customer().await;
    let detail = p
        .call(
            Method::POST,
            &format!("/accounts/{}/deposits", ann.id),
            Some(&p.admin()),
            Some(json!({"amountCents": 100, "currency": "EUR"})),
        )
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("unknown field `currency`"), "{detail}");
    assert_eq!(p.account_balance(&ann).await, welcome(), "nothing moved");
}

#[tokio::test]
async fn a_deposit_to_a_wallet_that_does_not_exist_is_404_and_opens_none() {
    let p = start().await;
    let ghost = Uuid::now_v7();
    let detail = deposit(&p, ghost, 100, Some(&p.admin()))
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(detail.contains(&ghost.to_string()), "{detail}");
    assert!(!p.has_wallet(ghost).await);
    assert_eq!(p.count("ledger_entry").await, 0);
}

#[tokio::test]
async fn a_deposit_to_a_user_id_that_is_not_a_uuid_is_400() {
    let p = start().await;
    let detail = p
        .call(
            Method::POST,
            "/accounts/ann/deposits",
            Some(&p.admin()),
            Some(json!({"amountCents": 100})),
        )
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("`ann`") && detail.contains("UUID"), "{detail}");
}

#[tokio::test]
async fn a_customer_sees_the_payment_of_their_order() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let payment = p.paid(&pay(order, ann.id, 3_750)).await;

    let body = payment_of(&p, order, &ann).await.expect(StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "id": payment.to_string(), "orderId": order.to_string(), "amountCents": 3_750,
            "currency": "USD", "status": "captured", "reason": null,
        })
    );
}

#[tokio::test]
async fn a_declined_or_refunded_payment_shows_what_became_of_it() {
    let p = start().await;
    let ann = p.customer().await;
    let declined = Uuid::now_v7();
    let reason = p.refused(&pay(declined, ann.id, welcome() + 1)).await;
    let body = payment_of(&p, declined, &ann).await.expect(StatusCode::OK);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["reason"], reason.as_str());

    let refunded = Uuid::now_v7();
    p.ok(&pay(refunded, ann.id, 500)).await;
    p.ok(&refund(refunded)).await;
    let body = payment_of(&p, refunded, &ann).await.expect(StatusCode::OK);
    assert_eq!(body["status"], "refunded");
}

#[tokio::test]
async fn someone_elses_payment_is_the_same_404_as_no_payment() {
    let p = start().await;
    let ann = p.customer().await;
    let bob = p.customer().await;
    let order = Uuid::now_v7();
    p.ok(&pay(order, ann.id, 3_750)).await;

    let theirs = payment_of(&p, order, &bob).await.problem(StatusCode::NOT_FOUND);
    assert_eq!(theirs, format!("no payment for order {order}"));
    let nothing = Uuid::now_v7();
    let none = payment_of(&p, nothing, &bob).await.problem(StatusCode::NOT_FOUND);
    assert_eq!(none, format!("no payment for order {nothing}"));
    // Nor does a refund that overtook its payment show anyone a payment.
    let voided = Uuid::now_v7();
    p.ok(&refund(voided)).await;
    payment_of(&p, voided, &ann).await.problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_payment_needs_a_token_and_an_order_id() {
    let p = start().await;
    let ann = p.customer().await;
    p.call(Method::GET, &format!("/payments/{}", Uuid::now_v7()), None, None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    let detail = p
        .call(Method::GET, "/payments/order-1", Some(&ann.token), None)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("`order-1`") && detail.contains("UUID"), "{detail}");
}
