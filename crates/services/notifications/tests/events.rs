//! What notifications does with the events it consumes, run through `Outcomes` inside store
//! transactions as the consumer runner runs them, and how the sender delivers what was
//! queued (sender rounds run by the test, mail and texts written to temporary directories):
//! a new user is remembered and welcomed by email; a confirmation code is mailed to the
//! address being confirmed only, and a repeated registration's notice to the owner; an
//! `order.confirmed` for a known customer
//! queues one email with the total written out, and one text when they gave a phone; an
//! `order.cancelled` says why and that nothing was charged; a redelivered or re-announced
//! event queues nothing more; an outcome whose customer is not known yet is retried (a
//! transient error), never dropped; a payload that breaks its schema is poison. Each queued
//! message is delivered once (`<id>.eml` / `<id>.txt`), and one that cannot be delivered is
//! retried and then given up as `failed`; a number past its daily texts gets none more.

mod support;

use bazaar_contracts::{types, RegistrationRepeated, VerificationRequested};
use bazaar_kit::store;
use bazaar_kit::{
    consumer::HandlerError,
    envelope::{Envelope, Metadata},
};
use serde_json::json;
use support::{cancelled, confirmed, registered, start, CORRELATION};
use uuid::Uuid;

#[tokio::test]
async fn a_new_user_is_welcomed_by_email_once() {
    let n = start().await;
    // A phone is remembered for later texts, but the welcome is an email only.
    let ann = n.stranger("ann@example.com", Some("+14155550123"));
    let event = registered(&ann);
    n.handle(&event).await.expect("handled");
    n.handle(&event).await.expect("handled again");
    n.handle(&registered(&ann)).await.expect("announced again");

    let notes = n.notes().await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = &notes[0];
    assert_eq!(note.about, format!("user.registered:{}", ann.id));
    assert_eq!(
        (note.channel.as_str(), note.recipient.as_str()),
        ("email", "ann@example.com")
    );
    assert_eq!(note.subject, "Welcome to bazaar");
    assert!(note.body.starts_with("Hello Ann,"), "{}", note.body);
    assert_eq!((note.status.as_str(), note.attempts), ("pending", 0));
    assert_eq!(note.correlation_id, CORRELATION);
}

#[tokio::test]
async fn a_confirmation_code_is_mailed_to_the_address_and_nowhere_else() {
    let n = start().await;
    let ann = n.stranger("ann@example.com", Some("+14155550123"));
    let code = VerificationRequested {
        user_id: ann.id,
        email: ann.email.clone(),
        name: "Ann".into(),
        code: "042917".into(),
        valid_minutes: 24 * 60,
    };
    let event = Envelope::new(
        types::USER_VERIFICATION_REQUESTED,
        ann.id.to_string(),
        code,
        Metadata::default(),
    );
    n.handle(&event).await.expect("handled");
    n.handle(&event).await.expect("redelivered");
    let notes = n.notes().await;
    assert_eq!(notes.len(), 1, "one email, no text to an unconfirmed phone: {notes:?}");
    assert_eq!(
        (notes[0].channel.as_str(), notes[0].recipient.as_str()),
        ("email", "ann@example.com")
    );
    assert_eq!(
        notes[0].subject,
        format!("{}042917", bazaar_notifications::CODE_SUBJECT)
    );
    assert!(
        notes[0].body.contains("042917") && notes[0].body.contains("24 hours"),
        "{}",
        notes[0].body
    );

    // Its owner hears of a second registration of a taken address.
    let notice = RegistrationRepeated {
        user_id: ann.id,
        email: ann.email.clone(),
    };
    let event = Envelope::new(
        types::USER_REGISTRATION_REPEATED,
        ann.id.to_string(),
        notice,
        Metadata::default(),
    );
    n.handle(&event).await.expect("handled");
    let notes = n.notes().await;
    assert_eq!(notes.len(), 2);
    assert!(notes.iter().any(|n| n.subject.contains("tried to register")));
}

#[tokio::test]
async fn a_number_past_its_daily_texts_gets_no_more_and_the_emails_still_go() {
    let n = start().await;
    let ann = n.customer("ann@example.com", Some("+14155550123")).await;
    let limit = bazaar_notifications::TEXTS_PER_NUMBER_PER_DAY as usize;
    for _ in 0..limit + 3 {
        n.handle(&cancelled(Uuid::now_v7(), &ann, Some("out of stock")))
            .await
            .expect("handled");
    }
    let notes = n.notes().await;
    let texts: Vec<_> = notes.iter().filter(|n| n.channel == "sms").collect();
    assert_eq!(texts.len(), limit + 3, "every outcome recorded");
    assert_eq!(texts.iter().filter(|t| t.status == "pending").count(), limit);
    assert_eq!(texts.iter().filter(|t| t.status == "suppressed").count(), 3);
    let emails = notes
        .iter()
        .filter(|n| n.channel == "email" && n.about.starts_with("order.cancelled") && n.status == "pending");
    assert_eq!(emails.count(), limit + 3, "the confirmed address still hears of each");
    n.send_round().await;
    assert_eq!(n.sms_files().len(), limit, "suppressed texts are never sent");
}

#[tokio::test]
async fn an_order_confirmed_queues_one_email_with_the_total() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    let order = Uuid::now_v7();

    n.handle(&confirmed(order, &ann, 3_750, "EUR")).await.expect("handled");
    let notes = n.notes_about(&format!("order.confirmed:{order}")).await;
    assert_eq!(notes.len(), 1, "an email and no text: {notes:?}");
    let email = &notes[0];
    assert_eq!(
        (email.channel.as_str(), email.recipient.as_str()),
        ("email", "ann@example.com")
    );
    assert_eq!(email.subject, format!("Order {order} confirmed"));
    assert_eq!(
        email.body,
        format!("Your order {order} is confirmed. We charged 37.50 EUR.\n")
    );
    assert_eq!(email.status, "pending");
    assert_eq!(email.correlation_id, CORRELATION, "the order's correlation id");
}

#[tokio::test]
async fn small_and_round_totals_read_as_money() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    for (cents, words) in [(5, "0.05 USD"), (100, "1.00 USD"), (123_456, "1234.56 USD")] {
        let order = Uuid::now_v7();
        n.handle(&confirmed(order, &ann, cents, "USD")).await.expect("handled");
        let notes = n.notes_about(&format!("order.confirmed:{order}")).await;
        assert!(
            notes[0].body.contains(&format!("We charged {words}.")),
            "{}",
            notes[0].body
        );
    }
}

#[tokio::test]
async fn a_customer_with_a_phone_also_gets_one_text() {
    let n = start().await;
    let ann = n.customer("ann@example.com", Some("+14155550123")).await;
    let order = Uuid::now_v7();

    n.handle(&confirmed(order, &ann, 3_750, "EUR")).await.expect("handled");
    let notes = n.notes_about(&format!("order.confirmed:{order}")).await;
    let channels: Vec<(&str, &str)> = notes
        .iter()
        .map(|n| (n.channel.as_str(), n.recipient.as_str()))
        .collect();
    assert_eq!(
        channels,
        [("email", "ann@example.com"), ("sms", "+14155550123")],
        "{notes:?}"
    );
    let text = &notes[1];
    assert_eq!(text.about, format!("order.confirmed:{order}:sms"));
    assert_eq!(
        text.body,
        format!("Order {order} confirmed"),
        "a text carries the subject"
    );
}

#[tokio::test]
async fn a_cancelled_order_says_why_and_that_nothing_was_charged() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    let order = Uuid::now_v7();

    n.handle(&cancelled(order, &ann, Some("insufficient funds")))
        .await
        .expect("handled");
    let notes = n.notes_about(&format!("order.cancelled:{order}")).await;
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].subject, format!("Order {order} cancelled"));
    assert_eq!(
        notes[0].body,
        format!("Your order {order} was cancelled: insufficient funds. Nothing was charged.\n")
    );

    let other = Uuid::now_v7();
    n.handle(&cancelled(other, &ann, None)).await.expect("handled");
    let notes = n.notes_about(&format!("order.cancelled:{other}")).await;
    assert!(notes[0].body.contains("no reason given"), "{}", notes[0].body);
}

#[tokio::test]
async fn a_redelivered_outcome_queues_nothing_more() {
    let n = start().await;
    let ann = n.customer("ann@example.com", Some("+14155550123")).await;
    let order = Uuid::now_v7();
    let event = confirmed(order, &ann, 3_750, "EUR");
    n.handle(&event).await.expect("handled");
    let before = n.notes().await;

    // The same delivery again (past the inbox), and the outcome announced again under a new id.
    n.handle(&event).await.expect("handled again");
    n.handle(&confirmed(order, &ann, 3_750, "EUR"))
        .await
        .expect("announced again");
    assert_eq!(n.notes().await, before, "nothing more queued");
    assert_eq!(n.notes_about(&format!("order.confirmed:{order}")).await.len(), 2);
}

#[tokio::test]
async fn an_outcome_for_a_customer_not_known_yet_is_retried_not_dropped() {
    let n = start().await;
    let ann = n.stranger("ann@example.com", Some("+14155550123"));
    let order = Uuid::now_v7();
    let event = confirmed(order, &ann, 3_750, "EUR");

    match n.handle(&event).await {
        Err(HandlerError::Transient(reason)) => assert!(reason.contains(&ann.id.to_string()), "{reason}"),
        other => panic!("expected a transient error (retry), got {other:?}"),
    }
    assert!(n.notes().await.is_empty(), "nothing queued");

    // Their registration arrives; the retried outcome now queues the email and the text.
    n.handle(&registered(&ann)).await.expect("handled");
    n.handle(&event).await.expect("handled on retry");
    assert_eq!(n.notes_about(&format!("order.confirmed:{order}")).await.len(), 2);
}

#[tokio::test]
async fn a_confirmed_order_without_a_currency_is_poison() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    let order = Uuid::now_v7();
    let event = Envelope::new(
        types::ORDER_CONFIRMED,
        order.to_string(),
        json!({"orderId": order, "customerId": ann.id, "email": ann.email, "totalCents": 100}),
        Metadata::default(),
    );
    match n.handle(&event).await {
        Err(HandlerError::Poison(reason)) => assert!(reason.contains("currency"), "{reason}"),
        other => panic!("expected poison, got {other:?}"),
    }
    assert!(n.notes_about(&format!("order.confirmed:{order}")).await.is_empty());
}

#[tokio::test]
async fn an_outcome_that_breaks_its_schema_is_poison() {
    let n = start().await;
    let event = Envelope::new(
        types::ORDER_CONFIRMED,
        "o-1",
        json!({"orderId": "o-1", "email": "ann@example.com"}),
        Metadata::default(),
    );
    assert!(matches!(n.handle(&event).await, Err(HandlerError::Poison(_))));
    assert!(n.notes().await.is_empty());
}

#[tokio::test]
async fn other_events_are_ignored() {
    let n = start().await;
    let event = Envelope::new(
        "order.shipped",
        "o-1",
        json!({"orderId": Uuid::now_v7()}),
        Metadata::default(),
    );
    n.handle(&event).await.expect("not ours, not an error");
    assert!(n.notes().await.is_empty());
}

#[tokio::test]
async fn the_sender_delivers_each_message_once() {
    let n = start().await;
    let ann = n.customer("ann@example.com", Some("+14155550123")).await;
    let order = Uuid::now_v7();
    n.handle(&confirmed(order, &ann, 3_750, "EUR")).await.expect("handled");
    let notes = n.notes().await;
    assert_eq!(notes.len(), 3, "welcome, confirmation email, confirmation text");

    n.send_round().await;
    let sent = n.notes().await;
    assert!(sent.iter().all(|s| s.status == "sent" && s.attempts == 1), "{sent:?}");
    let mail = n.mail_files();
    let texts = n.sms_files();
    assert_eq!(mail.len(), 2, "{mail:?}");
    assert_eq!(texts.len(), 1, "{texts:?}");

    // Each file is named by its notification and says what the row says.
    let email = notes
        .iter()
        .find(|s| s.about == format!("order.confirmed:{order}"))
        .unwrap();
    let eml = std::fs::read_to_string(n.mail_dir().join(format!("{}.eml", email.id))).expect("the .eml");
    assert!(eml.contains("To: ann@example.com"), "{eml}");
    assert!(eml.contains(&format!("Subject: Order {order} confirmed")), "{eml}");
    assert!(
        eml.contains(&format!("Message-ID: <{}@bazaar.local>", email.id)),
        "{eml}"
    );
    // The body is quoted-printable: join its soft line breaks.
    let body = eml.replace("=\r\n", "").replace("=\n", "");
    assert!(body.contains("We charged 37.50 EUR."), "{eml}");
    let text = notes.iter().find(|s| s.channel == "sms").unwrap();
    let txt = std::fs::read_to_string(n.sms_dir().join(format!("{}.txt", text.id))).expect("the .txt");
    assert_eq!(txt, format!("To: +14155550123\n\nOrder {order} confirmed\n"));

    // Later rounds send nothing again.
    std::fs::remove_file(n.mail_dir().join(format!("{}.eml", email.id))).unwrap();
    n.send_round().await;
    n.send_round().await;
    assert_eq!(n.mail_files().len(), 1, "not written again");
    assert_eq!(n.sms_files().len(), 1);
    assert_eq!(n.notes().await, sent, "nothing changed");
}

#[tokio::test]
async fn a_backlog_larger_than_a_batch_goes_out_in_one_round() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    for _ in 0..450 {
        n.handle(&confirmed(Uuid::now_v7(), &ann, 1_000, "EUR"))
            .await
            .expect("handled");
    }
    n.send_round().await;
    let notes = n.notes().await;
    assert_eq!(notes.len(), 451, "welcome and 450 confirmations");
    assert!(notes.iter().all(|s| s.status == "sent" && s.attempts == 1));
    assert_eq!(n.mail_files().len(), 451);
}

#[tokio::test]
async fn a_message_that_cannot_be_delivered_is_retried_then_given_up() {
    let n = start().await;
    n.customer("ann@example.com", None).await;
    let broken = n.customer("not an address", None).await;
    n.send_round().await;
    assert_eq!(n.mail_files().len(), 1, "the good one went out");

    let stuck = |notes: Vec<support::Note>| {
        notes
            .into_iter()
            .find(|s| s.about == format!("user.registered:{}", broken.id))
            .unwrap()
    };
    let note = stuck(n.notes().await);
    assert_eq!(
        (note.status.as_str(), note.attempts),
        ("pending", 1),
        "kept for a retry"
    );
    for _ in 0..20 {
        n.send_round().await;
    }
    let note = stuck(n.notes().await);
    assert_eq!(
        (note.status.as_str(), note.attempts),
        ("failed", 10),
        "given up after 10 tries"
    );
    let error: Option<String> = store::query("SELECT last_error FROM notification WHERE id = $1")
        .bind(&note.id)
        .fetch_scalar(&n.rt.store)
        .await
        .unwrap();
    assert!(error.is_some_and(|e| e.contains("not an address")));
    assert_eq!(n.mail_files().len(), 1);
}
