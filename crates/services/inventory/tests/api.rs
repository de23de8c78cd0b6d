//! The inventory HTTP API, called in-process through the router the role serves (no socket):
//! anyone browses the catalogue; only an admin adds products or changes stock; bad input is
//! a 4xx `application/problem+json` whose detail says what was wrong; a write-off never
//! leaves fewer units on hand than are reserved.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::json;
use support::{reserve, start};
use uuid::Uuid;

#[tokio::test]
async fn anyone_can_list_products_without_a_token() {
    let inv = start().await;
    inv.add_product("TEE", 2_000, 5).await;
    inv.add_product("MUG", 1_250, 3).await;

    let answer = inv.call(Method::GET, "/products", None, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.content_type().starts_with("application/json"),
        "{}",
        answer.content_type()
    );
    let skus: Vec<&str> = answer
        .body
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["sku"].as_str().expect("sku"))
        .collect();
    assert_eq!(skus, ["MUG", "TEE"], "listed by sku");
}

#[tokio::test]
async fn the_list_pages_with_limit_and_offset() {
    let inv = start().await;
    for sku in ["A", "B", "C"] {
        inv.add_product(sku, 100, 1).await;
    }
    let page = inv.call(Method::GET, "/products?limit=1&offset=1", None, None).await;
    assert_eq!(page.status, StatusCode::OK);
    let skus: Vec<&str> = page
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["B"]);
}

#[tokio::test]
async fn anyone_can_read_a_product_with_its_price_and_stock() {
    let inv = start().await;
    let id = inv.add_product("LAMP", 4_500, 20).await;

    let answer = inv.call(Method::GET, &format!("/products/{id}"), None, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body,
        json!({
            "id": id.to_string(), "sku": "LAMP", "name": "LAMP (test)", "priceCents": 4_500,
            "currency": "USD", "stock": 20, "onHand": 20, "reserved": 0,
        })
    );
}

#[tokio::test]
async fn a_missing_product_is_a_404_problem() {
    let inv = start().await;
    let id = Uuid::now_v7();
    let detail = inv
        .call(Method::GET, &format!("/products/{id}"), None, None)
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(detail.contains(&id.to_string()), "{detail}");
}

#[tokio::test]
async fn a_product_id_that_is_not_a_uuid_is_a_400_problem() {
    let inv = start().await;
    let detail = inv
        .call(Method::GET, "/products/MUG-CLASSIC", None, None)
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("MUG-CLASSIC") && detail.contains("UUID"), "{detail}");
}

#[tokio::test]
async fn adding_a_product_without_a_token_is_401() {
    let inv = start().await;
    let body = json!({"sku": "MUG", "name": "Mug", "priceCents": 100});
    let detail = inv
        .call(Method::POST, "/products", None, Some(body))
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("bearer token"), "{detail}");
    let list = inv.call(Method::GET, "/products", None, None).await;
    assert_eq!(list.body, json!([]), "nothing was added");
}

#[tokio::test]
async fn a_token_signed_by_a_key_users_does_not_publish_is_401() {
    let inv = start().await;
    let forged = bazaar_kit::auth::SigningKey::generate()
        .unwrap()
        .issue(
            Uuid::new_v4(),
            "mallory@example.com",
            &["admin".into()],
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    let body = json!({"sku": "MUG", "name": "Mug", "priceCents": 100});
    inv.call(Method::POST, "/products", Some(&forged), Some(body))
        .await
        .problem(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_customer_cannot_add_a_product() {
    let inv = start().await;
    let body = json!({"sku": "MUG", "name": "Mug", "priceCents": 100});
    let detail = inv
        .call(Method::POST, "/products", Some(&inv.customer()), Some(body))
        .await
        .problem(StatusCode::FORBIDDEN);
    assert!(detail.contains("admin"), "{detail}");
    let list = inv.call(Method::GET, "/products", None, None).await;
    assert_eq!(list.body, json!([]), "nothing was added");
}

#[tokio::test]
async fn an_admin_adds_a_product_in_usd_with_no_stock_by_default() {
    let inv = start().await;
    let body = json!({"sku": "  SOCKS-3 ", "name": " Three pairs of socks ", "priceCents": 900});
    let answer = inv
        .call(Method::POST, "/products", Some(&inv.admin()), Some(body))
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert_eq!(answer.body["sku"], "SOCKS-3", "trimmed");
    assert_eq!(answer.body["name"], "Three pairs of socks", "trimmed");
    assert_eq!(answer.body["currency"], "USD");
    assert_eq!(answer.body["stock"], 0);
    let id: Uuid = answer.body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        inv.product(id).await,
        answer.body,
        "what was returned is what is stored"
    );
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_negative_price_is_refused_naming_the_price() {
    let inv = start().await;
    let body = json!({"sku": "MUG", "name": "Mug", "priceCents": -1});
    let detail = inv
        .call(Method::POST, "/products", Some(&inv.admin()), Some(body))
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("priceCents"), "{detail}");
}

#[tokio::test]
async fn an_empty_sku_is_refused_naming_the_sku() {
    let inv = start().await;
    for sku in ["", "   "] {
        let body = json!({"sku": sku, "name": "Mug", "priceCents": 100});
        let detail = inv
            .call(Method::POST, "/products", Some(&inv.admin()), Some(body))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("sku"), "{detail}");
    }
}

#[tokio::test]
async fn a_duplicate_sku_is_a_409_conflict_naming_the_sku() {
    let inv = start().await;
    let first = inv.add_product("MUG", 100, 7).await;
    let body = json!({"sku": " MUG ", "name": "Another mug", "priceCents": 200, "stock": 3});
    let detail = inv
        .call(Method::POST, "/products", Some(&inv.admin()), Some(body))
        .await
        .problem(StatusCode::CONFLICT);
    assert!(detail.contains("`MUG`"), "{detail}");
    let list = inv.call(Method::GET, "/products", None, None).await;
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(inv.levels(first).await, (7, 7, 0), "the first product is untouched");
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn other_invalid_product_fields_are_refused_naming_the_field() {
    let inv = start().await;
    let admin = inv.admin();
    let long_name = "n".repeat(201);
    let cases = [
        (json!({"sku": "X", "name": " ", "priceCents": 1}), "name"),
        (json!({"sku": "X", "name": long_name, "priceCents": 1}), "name"),
        (json!({"sku": "X".repeat(65), "name": "X", "priceCents": 1}), "sku"),
        (
            json!({"sku": "X", "name": "X", "priceCents": 1_000_000_001}),
            "priceCents",
        ),
        (
            json!({"sku": "X", "name": "X", "priceCents": 1, "currency": "usd"}),
            "currency",
        ),
        (
            json!({"sku": "X", "name": "X", "priceCents": 1, "currency": "EURO"}),
            "currency",
        ),
        (json!({"sku": "X", "name": "X", "priceCents": 1, "stock": -1}), "stock"),
    ];
    for (body, field) in cases {
        let detail = inv
            .call(Method::POST, "/products", Some(&admin), Some(body.clone()))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains(field), "{body}: {detail}");
    }
    let list = inv.call(Method::GET, "/products", None, None).await;
    assert_eq!(list.body, json!([]), "nothing was added");
}

#[tokio::test]
async fn a_malformed_product_body_is_a_problem_saying_what_is_wrong() {
    let inv = start().await;
    let admin = inv.admin();
    let missing = inv
        .call(
            Method::POST,
            "/products",
            Some(&admin),
            Some(json!({"sku": "X", "name": "X"})),
        )
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(missing.contains("priceCents"), "{missing}");
    let unknown = inv
        .call(
            Method::POST,
            "/products",
            Some(&admin),
            Some(json!({"sku": "X", "name": "X", "priceCents": 1, "colour": "red"})),
        )
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(unknown.contains("colour"), "{unknown}");
}

#[tokio::test]
async fn a_restock_raises_stock_and_on_hand() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    let answer = inv
        .call(
            Method::POST,
            &format!("/products/{id}/stock"),
            Some(&inv.admin()),
            Some(json!({"delta": 10})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        (answer.body["stock"].clone(), answer.body["onHand"].clone()),
        (json!(15), json!(15))
    );
    assert_eq!(inv.levels(id).await, (15, 15, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_write_off_lowers_stock_and_on_hand() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    let answer = inv
        .call(
            Method::POST,
            &format!("/products/{id}/stock"),
            Some(&inv.admin()),
            Some(json!({"delta": -5, "reason": "dropped the box"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(inv.levels(id).await, (0, 0, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_write_off_below_what_is_reserved_is_refused() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    inv.ok(&reserve(Uuid::now_v7(), &[(id, 3)])).await;
    assert_eq!(inv.levels(id).await, (2, 5, 3));

    let uri = format!("/products/{id}/stock");
    let detail = inv
        .call(Method::POST, &uri, Some(&inv.admin()), Some(json!({"delta": -3})))
        .await
        .problem(StatusCode::CONFLICT);
    assert!(detail.contains("reserved"), "{detail}");
    assert_eq!(inv.levels(id).await, (2, 5, 3), "nothing changed");

    // Writing off exactly what is free is fine.
    let answer = inv
        .call(Method::POST, &uri, Some(&inv.admin()), Some(json!({"delta": -2})))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(inv.levels(id).await, (0, 3, 3));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn a_zero_stock_change_is_refused() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    let detail = inv
        .call(
            Method::POST,
            &format!("/products/{id}/stock"),
            Some(&inv.admin()),
            Some(json!({"delta": 0})),
        )
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert!(detail.contains("delta"), "{detail}");
}

#[tokio::test]
async fn an_absurd_write_off_is_a_400_not_a_crash() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    let uri = format!("/products/{id}/stock");
    for delta in [i64::MIN, i64::MIN + 1, -1_000_000_001, 1_000_000_001, i64::MAX] {
        let detail = inv
            .call(Method::POST, &uri, Some(&inv.admin()), Some(json!({"delta": delta})))
            .await
            .problem(StatusCode::BAD_REQUEST);
        assert!(detail.contains("delta"), "{delta}: {detail}");
    }
    assert_eq!(inv.levels(id).await, (5, 5, 0));
}

#[tokio::test]
async fn a_restock_cannot_hold_more_than_a_product_may_hold() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 999_999_990).await;
    let uri = format!("/products/{id}/stock");
    let up_to_the_limit = inv
        .call(Method::POST, &uri, Some(&inv.admin()), Some(json!({"delta": 10})))
        .await;
    assert_eq!(up_to_the_limit.status, StatusCode::OK, "{:?}", up_to_the_limit.body);
    let detail = inv
        .call(Method::POST, &uri, Some(&inv.admin()), Some(json!({"delta": 1})))
        .await
        .problem(StatusCode::CONFLICT);
    assert!(detail.contains("1000000000"), "{detail}");
    assert_eq!(inv.levels(id).await, (1_000_000_000, 1_000_000_000, 0));
    inv.assert_stock_adds_up().await;
}

#[tokio::test]
async fn restocking_a_missing_product_is_404() {
    let inv = start().await;
    let id = Uuid::now_v7();
    let detail = inv
        .call(
            Method::POST,
            &format!("/products/{id}/stock"),
            Some(&inv.admin()),
            Some(json!({"delta": 1})),
        )
        .await
        .problem(StatusCode::NOT_FOUND);
    assert!(detail.contains(&id.to_string()), "{detail}");
}

#[tokio::test]
async fn only_an_admin_can_change_stock() {
    let inv = start().await;
    let id = inv.add_product("MUG", 100, 5).await;
    let uri = format!("/products/{id}/stock");
    inv.call(Method::POST, &uri, None, Some(json!({"delta": -5})))
        .await
        .problem(StatusCode::UNAUTHORIZED);
    inv.call(Method::POST, &uri, Some(&inv.customer()), Some(json!({"delta": -5})))
        .await
        .problem(StatusCode::FORBIDDEN);
    assert_eq!(inv.levels(id).await, (5, 5, 0), "nothing changed");
}
