//! The notifications HTTP API, called in-process through the router the role serves (no
//! socket): `GET /notifications` needs a token; it shows a customer only what was sent to
//! their own email (asking for someone else's with `?recipient=` is 403, naming themselves is
//! fine), and an admin everyone's or one recipient's; it lists newest first, pages with
//! `limit` and `offset`, and shows each message's delivery status.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::Value;
use support::{confirmed, start, Notifications, CORRELATION};
use uuid::Uuid;

/// The `about` of each listed notification.
fn abouts(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|n| n["about"].as_str().expect("about").to_string())
        .collect()
}

/// The `recipient` of each listed notification.
fn recipients(list: &[Value]) -> Vec<&str> {
    list.iter()
        .map(|n| n["recipient"].as_str().expect("recipient"))
        .collect()
}

/// Ann (with a phone) and Bob, each welcomed, and one confirmed order each.
async fn two_customers(n: &Notifications) -> (support::Customer, support::Customer) {
    let ann = n.customer("ann@example.com", Some("+14155550123")).await;
    let bob = n.customer("bob@example.com", None).await;
    n.handle(&confirmed(Uuid::now_v7(), &ann, 100, "USD"))
        .await
        .expect("handled");
    n.handle(&confirmed(Uuid::now_v7(), &bob, 200, "USD"))
        .await
        .expect("handled");
    (ann, bob)
}

#[tokio::test]
async fn the_list_needs_a_token() {
    let n = start().await;
    let detail = n
        .call(Method::GET, "/notifications", None, None)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bearer token"), "{detail}");
}

#[tokio::test]
async fn a_customer_sees_only_what_was_sent_to_them() {
    let n = start().await;
    let (ann, bob) = two_customers(&n).await;

    let list = n.list("/notifications", &bob.token).await;
    assert_eq!(recipients(&list), ["bob@example.com", "bob@example.com"]);
    let list = n.list("/notifications", &ann.token).await;
    assert!(recipients(&list).iter().all(|r| *r == "ann@example.com"), "{list:?}");
    assert_eq!(list.len(), 2, "ann's welcome and confirmation emails");
}

#[tokio::test]
async fn a_customer_asking_for_someone_elses_is_403() {
    let n = start().await;
    let (ann, bob) = two_customers(&n).await;
    let detail = n
        .call(
            Method::GET,
            "/notifications?recipient=bob@example.com",
            Some(&ann.token),
            None,
        )
        .await
        .problem(StatusCode::FORBIDDEN);
    assert!(detail.contains("admin"), "{detail}");

    // Naming themselves is the same as naming no one.
    let own = n.list("/notifications?recipient=bob@example.com", &bob.token).await;
    assert_eq!(own, n.list("/notifications", &bob.token).await);
}

#[tokio::test]
async fn an_admin_sees_everyones_or_one_recipients() {
    let n = start().await;
    two_customers(&n).await;
    let admin = n.admin();

    let all = n.list("/notifications", &admin).await;
    assert_eq!(all.len(), 5, "two welcomes, two confirmation emails, one text: {all:?}");
    let bobs = n.list("/notifications?recipient=bob@example.com", &admin).await;
    assert_eq!(recipients(&bobs), ["bob@example.com", "bob@example.com"]);
    let texts = n.list("/notifications?recipient=%2B14155550123", &admin).await;
    assert_eq!(recipients(&texts), ["+14155550123"]);
    assert_eq!(texts[0]["channel"], "sms");
    let nobody = n.list("/notifications?recipient=nobody@example.com", &admin).await;
    assert!(nobody.is_empty());
}

#[tokio::test]
async fn the_list_is_newest_first_and_pages_with_limit_and_offset() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    let orders: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    for order in &orders {
        n.handle(&confirmed(*order, &ann, 100, "USD")).await.expect("handled");
    }
    let all = abouts(&n.list("/notifications", &ann.token).await);
    let mut want: Vec<String> = orders.iter().rev().map(|o| format!("order.confirmed:{o}")).collect();
    want.push(format!("user.registered:{}", ann.id));
    assert_eq!(all, want, "newest first");

    let page = abouts(&n.list("/notifications?limit=2&offset=1", &ann.token).await);
    assert_eq!(page, &want[1..3]);
    let last = abouts(&n.list("/notifications?limit=2&offset=4", &ann.token).await);
    assert_eq!(last, &want[4..]);
    let past = n.list("/notifications?limit=2&offset=5", &ann.token).await;
    assert!(past.is_empty());
    // Out-of-range values are bounded rather than refused.
    let one = abouts(&n.list("/notifications?limit=0&offset=-3", &ann.token).await);
    assert_eq!(one, &want[..1]);
}

#[tokio::test]
async fn a_page_that_is_not_a_number_is_a_400_problem() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    n.call(Method::GET, "/notifications?limit=lots", Some(&ann.token), None)
        .await
        .problem(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn each_entry_shows_what_was_sent_and_whether_it_went() {
    let n = start().await;
    let ann = n.customer("ann@example.com", None).await;
    let list = n.list("/notifications", &ann.token).await;
    let entry = &list[0];
    assert_eq!(entry["about"], format!("user.registered:{}", ann.id));
    assert_eq!(entry["channel"], "email");
    assert_eq!(entry["recipient"], "ann@example.com");
    assert_eq!(entry["subject"], "Welcome to bazaar");
    assert_eq!(entry["status"], "pending");
    assert_eq!(entry["attempts"], 0);
    assert_eq!(entry["lastError"], Value::Null);
    assert_eq!(entry["sentAt"], Value::Null);
    assert_eq!(entry["correlationId"], CORRELATION);
    let created = entry["createdAt"].as_str().expect("createdAt");
    chrono::DateTime::parse_from_rfc3339(created).expect("an RFC 3339 time");
    assert!(entry.get("body").is_none(), "the list does not repeat the message");

    n.send_round().await;
    let list = n.list("/notifications", &ann.token).await;
    assert_eq!(list[0]["status"], "sent");
    assert_eq!(list[0]["attempts"], 1);
    let sent = list[0]["sentAt"].as_str().expect("sentAt");
    assert!(
        chrono::DateTime::parse_from_rfc3339(sent).unwrap() >= chrono::DateTime::parse_from_rfc3339(created).unwrap()
    );
    assert_eq!(list[0]["id"], entry["id"]);
}
