//! What payments does with the events and saga commands it consumes, run through its
//! handlers inside store transactions as the consumer runner runs them (no provider, so the
//! wallet alone pays): `user.registered` opens a wallet with the welcome credit, once;
//! `payments.process` charges exactly the amount into revenue, refuses insufficient funds,
//! a currency the wallet does not hold and a non-positive amount with a reason (and repeats
//! that answer), waits (retries) for a wallet not opened yet, and is idempotent by order id;
//! `payments.refund` gives the money back once, and one that overtakes its payment leaves a
//! voided tombstone so the late payment takes nothing; commands without a saga header or of
//! an unknown type are poison. After every story the ledger sums to zero.

mod support;

use bazaar_contracts::{topics, types};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
};
use serde_json::json;
use support::{command, pay, pay_in, refund, registered, start, welcome, CORRELATION};
use uuid::Uuid;

#[tokio::test]
async fn a_new_user_gets_a_wallet_with_the_welcome_credit() {
    let p = start().await;
    let user = Uuid::now_v7();
    assert!(!p.has_wallet(user).await);

    p.on_user_event(&registered(user)).await.expect("handled");
    assert!(p.has_wallet(user).await);
    assert_eq!(p.wallet(user).await, welcome());
    assert_eq!(welcome(), 100_000, "the default welcome credit");
    assert_eq!(p.count("outbox").await, 0, "opening a wallet announces nothing");
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_redelivered_registration_credits_the_wallet_once() {
    let p = start().await;
    let user = Uuid::now_v7();
    let event = registered(user);
    p.on_user_event(&event).await.expect("handled");
    let entries = p.count("ledger_entry").await;

    // The same delivery again (past the inbox), and the user announced again under a new id.
    p.on_user_event(&event).await.expect("handled");
    p.on_user_event(&registered(user)).await.expect("handled");
    assert_eq!(p.wallet(user).await, welcome(), "credited once");
    assert_eq!(p.count("ledger_entry").await, entries, "no new entries");
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn every_new_user_gets_their_own_wallet() {
    let p = start().await;
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    p.on_user_event(&registered(ann)).await.expect("handled");
    p.on_user_event(&registered(bob)).await.expect("handled");
    assert_eq!(p.wallet(ann).await, welcome());
    assert_eq!(p.wallet(bob).await, welcome());
    assert_eq!(
        p.balance(bazaar_payments::ledger::EXTERNAL).await,
        -2 * welcome(),
        "the credit came from outside"
    );
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn other_user_events_are_ignored() {
    let p = start().await;
    let user = Uuid::now_v7();
    let event = Envelope::new(
        "user.renamed",
        user.to_string(),
        json!({"userId": user, "name": "Bob"}),
        Metadata::default(),
    );
    p.on_user_event(&event).await.expect("not ours, not an error");
    assert!(!p.has_wallet(user).await);
    assert_eq!(p.count("ledger_entry").await, 0);
}

#[tokio::test]
async fn a_registration_that_breaks_its_schema_is_poison() {
    let p = start().await;
    let event = Envelope::new(
        types::USER_REGISTERED,
        "ann",
        json!({"userId": "ann", "email": "ann@example.com", "name": "Ann"}),
        Metadata::default(),
    );
    assert!(matches!(p.on_user_event(&event).await, Err(HandlerError::Poison(_))));
    assert_eq!(p.count("account").await, 0, "rolled back");
}

#[tokio::test]
async fn a_payment_charges_exactly_the_amount_into_revenue() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();

    let payment = p.paid(&pay(order, ann.id, 3_750)).await;
    assert_eq!(p.wallet(ann.id).await, welcome() - 3_750);
    assert_eq!(p.revenue().await, 3_750);
    assert_eq!(p.payment(order).await, Some(("captured".into(), 3_750, None)));
    let stored: String = store::query("SELECT id FROM payment WHERE order_id = $1")
        .bind(order.to_string())
        .fetch_scalar(&p.rt.store)
        .await
        .unwrap();
    assert_eq!(stored, payment.to_string(), "the reply names the stored payment");
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn the_reply_goes_to_the_saga_that_asked() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let cmd = pay(order, ann.id, 100);
    p.ok(&cmd).await;

    let replies = p.outbox(topics::ORDER_SAGA_REPLIES).await;
    assert_eq!(replies.len(), 1);
    let reply = &replies[0];
    assert_eq!(reply.event_type, types::ORDER_SAGA_REPLY);
    assert_eq!(reply.aggregate_id, order.to_string());
    assert_eq!(reply.metadata.source, "payments");
    assert_eq!(reply.metadata.correlation_id, CORRELATION);
    assert_eq!(reply.metadata.causation_id, Some(cmd.event_id.to_string()));
    assert_eq!(reply.payload["sagaId"], order.to_string());
    assert_eq!(reply.payload["step"], "processPayment");
    assert_eq!(reply.payload["compensation"], false);
    assert_eq!(reply.payload["ok"], true);
}

#[tokio::test]
async fn a_payment_of_the_whole_balance_is_taken() {
    let p = start().await;
    let ann = p.customer().await;
    p.ok(&pay(Uuid::now_v7(), ann.id, welcome())).await;
    assert_eq!(p.wallet(ann.id).await, 0);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn insufficient_funds_are_refused_with_a_reason_and_take_nothing() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();

    let reason = p.refused(&pay(order, ann.id, welcome() + 1)).await;
    assert_eq!(
        reason,
        format!("insufficient funds: balance {}, amount {}", welcome(), welcome() + 1)
    );
    assert_eq!(p.wallet(ann.id).await, welcome(), "nothing taken");
    assert_eq!(p.revenue().await, 0);
    assert_eq!(
        p.payment(order).await,
        Some(("failed".into(), welcome() + 1, Some(reason)))
    );
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_declined_payment_resent_is_declined_for_the_same_reason() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let cmd = pay(order, ann.id, welcome() + 1);
    let first = p.refused(&cmd).await;

    // Money arrives meanwhile; the refusal is still final for this order, and says why.
    let deposit = p
        .call(
            axum::http::Method::POST,
            &format!("/accounts/{}/deposits", ann.id),
            Some(&p.admin()),
            Some(json!({"amountCents": 10_000})),
        )
        .await;
    assert!(deposit.status.is_success(), "{:?}", deposit.body);
    let again = p.refused(&cmd).await;
    let resent = p.refused(&pay(order, ann.id, welcome() + 1)).await;
    assert_eq!(again, first, "the first answer, again");
    assert_eq!(resent, first, "the first answer, again");
    assert_eq!(p.wallet(ann.id).await, welcome() + 10_000, "nothing taken");
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_payment_in_a_currency_the_wallet_does_not_hold_is_refused() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();

    // Wallets hold USD; 37.50 EUR must not be taken as 37.50 USD.
    let reason = p.refused(&pay_in(order, ann.id, 3_750, "EUR")).await;
    assert!(reason.contains("USD") && reason.contains("EUR"), "{reason}");
    assert_eq!(p.wallet(ann.id).await, welcome(), "nothing taken");
    assert_eq!(p.revenue().await, 0);
    assert_eq!(p.payment(order).await.map(|(status, ..)| status), Some("failed".into()));
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_payment_of_no_money_is_refused() {
    let p = start().await;
    let ann = p.customer().await;
    for amount in [0, -500] {
        let reason = p.refused(&pay(Uuid::now_v7(), ann.id, amount)).await;
        assert_eq!(reason, "amount must be positive");
    }
    assert_eq!(p.wallet(ann.id).await, welcome(), "nothing moved, nothing credited");
    assert_eq!(p.count("payment").await, 0);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_redelivered_payment_charges_once() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let cmd = pay(order, ann.id, 2_000);

    let first = p.paid(&cmd).await;
    // The same delivery again (past the inbox), and the saga's resend with a new event id.
    let again = p.paid(&cmd).await;
    let resent = p.paid(&pay(order, ann.id, 2_000)).await;
    assert_eq!(again, first, "the same payment");
    assert_eq!(resent, first, "the same payment");
    assert_eq!(p.wallet(ann.id).await, welcome() - 2_000, "charged once");
    assert_eq!(p.revenue().await, 2_000);
    assert_eq!(p.count("payment").await, 1);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_payment_before_the_wallet_opens_is_retried_not_refused() {
    let p = start().await;
    let ann = p.stranger();
    let order = Uuid::now_v7();
    let cmd = pay(order, ann.id, 1_000);

    match p.handle(&cmd).await {
        Err(HandlerError::Transient(reason)) => assert!(reason.contains("no wallet yet"), "{reason}"),
        other => panic!("expected a transient error, got {other:?}"),
    }
    assert_eq!(p.count("outbox").await, 0, "no reply");
    assert_eq!(p.count("payment").await, 0, "nothing recorded");

    // Once user.registered arrives, the retry pays.
    p.on_user_event(&registered(ann.id)).await.expect("handled");
    p.paid(&cmd).await;
    assert_eq!(p.wallet(ann.id).await, welcome() - 1_000);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_refund_gives_the_money_back_once() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    p.paid(&pay(order, ann.id, 4_200)).await;

    let cmd = refund(order);
    let reply = p.handle(&cmd).await.expect("handled");
    assert!(reply.ok && reply.compensation, "{reply:?}");
    assert_eq!(reply.step, "processPayment");
    assert_eq!(p.wallet(ann.id).await, welcome());
    assert_eq!(p.revenue().await, 0);
    assert_eq!(
        p.payment(order).await.map(|(status, ..)| status),
        Some("refunded".into())
    );

    // Redelivered and resent: nothing is given back twice.
    p.ok(&cmd).await;
    p.ok(&refund(order)).await;
    assert_eq!(p.wallet(ann.id).await, welcome());
    assert_eq!(p.revenue().await, 0);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_refunded_order_cannot_be_paid_again() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    p.paid(&pay(order, ann.id, 4_200)).await;
    p.ok(&refund(order)).await;

    let reason = p.refused(&pay(order, ann.id, 4_200)).await;
    assert!(reason.contains("refunded"), "{reason}");
    assert_eq!(p.wallet(ann.id).await, welcome());
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn a_refund_before_its_payment_leaves_a_tombstone_so_the_late_payment_takes_nothing() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();

    p.ok(&refund(order)).await;
    let (status, amount, reason) = p.payment(order).await.expect("a tombstone");
    assert_eq!((status.as_str(), amount), ("voided", 0));
    assert!(reason.is_some_and(|r| r.contains("before payment")));

    let reason = p.refused(&pay(order, ann.id, 1_000)).await;
    assert!(reason.contains("voided"), "{reason}");
    assert_eq!(p.wallet(ann.id).await, welcome(), "nothing taken");
    assert_eq!(p.revenue().await, 0);
    // Refunding again is still fine and still gives nothing.
    p.ok(&refund(order)).await;
    assert_eq!(p.wallet(ann.id).await, welcome());
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn refunding_a_declined_payment_gives_nothing_back() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    p.refused(&pay(order, ann.id, welcome() + 1)).await;

    p.ok(&refund(order)).await;
    assert_eq!(p.wallet(ann.id).await, welcome());
    assert_eq!(p.revenue().await, 0);
    assert_eq!(p.payment(order).await.map(|(status, ..)| status), Some("failed".into()));
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn payments_of_one_customer_share_one_balance() {
    let p = start().await;
    let ann = p.customer().await;
    let bob = p.customer().await;
    p.ok(&pay(Uuid::now_v7(), ann.id, 60_000)).await;
    let reason = p.refused(&pay(Uuid::now_v7(), ann.id, 60_000)).await;
    assert!(reason.contains("balance 40000"), "{reason}");
    p.ok(&pay(Uuid::now_v7(), bob.id, 60_000)).await;
    assert_eq!(p.wallet(ann.id).await, 40_000);
    assert_eq!(p.wallet(bob.id).await, 40_000);
    assert_eq!(p.revenue().await, 120_000);
    p.assert_ledger_balances().await;
}

#[tokio::test]
async fn an_unknown_command_is_poison_and_writes_nothing() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let cmd = command("payments.capture", json!({"orderId": order}), order, false);
    match p.handle(&cmd).await {
        Err(HandlerError::Poison(reason)) => assert!(reason.contains("payments.capture"), "{reason}"),
        other => panic!("expected poison, got {other:?}"),
    }
    assert_eq!(p.count("outbox").await, 0, "no reply");
    assert_eq!(p.wallet(ann.id).await, welcome());
}

#[tokio::test]
async fn a_command_without_its_saga_header_is_poison() {
    let p = start().await;
    let ann = p.customer().await;
    let order = Uuid::now_v7();
    let cmd = Envelope::new(
        types::PROCESS_PAYMENT,
        order.to_string(),
        json!({"orderId": order, "customerId": ann.id, "amountCents": 100, "currency": "USD"}),
        Metadata::default(),
    );
    assert!(matches!(p.handle(&cmd).await, Err(HandlerError::Poison(_))));
    assert_eq!(p.count("outbox").await, 0, "no reply");
    assert_eq!(p.count("payment").await, 0);
    assert_eq!(p.wallet(ann.id).await, welcome());
}

#[tokio::test]
async fn a_payment_whose_payload_breaks_its_schema_is_poison() {
    let p = start().await;
    let order = Uuid::now_v7();
    let cmd = command(
        types::PROCESS_PAYMENT,
        json!({"orderId": order, "customerId": "ann", "amountCents": 100, "currency": "USD"}),
        order,
        false,
    );
    assert!(matches!(p.handle(&cmd).await, Err(HandlerError::Poison(_))));
    assert_eq!(p.count("outbox").await, 0, "no reply");
}
