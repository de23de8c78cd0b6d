//! Who is visiting: the shopper's token and cart, kept in cookies.
//!
//! The token lives in an `HttpOnly`, `SameSite=Lax` cookie, so page scripts never see it and
//! other sites cannot post forms with it; the web role verifies it with users' public keys
//! like every other role. The cart is a plain cookie of product ids and quantities: prices
//! and stock are read from the catalogue each time, so a forged cart buys nothing it could
//! not buy anyway.

use axum::{extract::FromRequestParts, http::request::Parts};
use bazaar_kit::auth::Claims;
use http::{header, HeaderMap, HeaderValue};
use uuid::Uuid;

use crate::{api::Line, Web};

/// The token cookie.
pub const SESSION_COOKIE: &str = "bazaar_session";
/// The cart cookie.
pub const CART_COOKIE: &str = "bazaar_cart";

/// Most lines a cart holds.
pub const CART_LINES: usize = 20;
/// Most units of one product in a cart (the API's own limit is higher).
pub const MAX_QUANTITY: i64 = 99;

/// A signed-in shopper.
#[derive(Debug, Clone)]
pub struct Shopper {
    /// The token to call the API with.
    pub token: String,
    /// What it says.
    pub claims: Claims,
}

/// The visitor of a page: signed in or not, and their cart.
#[derive(Debug, Clone)]
pub struct Visitor {
    /// The shopper, when a valid token came with the request.
    pub shopper: Option<Shopper>,
    /// The cart.
    pub cart: Cart,
    /// Whether the visitor reached the shop over TLS (the gateway's `X-Forwarded-Proto`,
    /// which it takes only from a proxy it trusts).
    pub https: bool,
}

impl FromRequestParts<Web> for Visitor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Visitor, Self::Rejection> {
        let shopper = match cookie(&parts.headers, SESSION_COOKIE) {
            Some(token) => match web.rt.tokens.verify(token).await {
                Ok(claims) => Some(Shopper {
                    token: token.to_string(),
                    claims,
                }),
                // Expired or from a retired key: the visitor is simply signed out.
                Err(_) => None,
            },
            None => None,
        };
        let cart = cookie(&parts.headers, CART_COOKIE).map(Cart::parse).unwrap_or_default();
        let https = parts
            .headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes() == b"https");
        Ok(Visitor { shopper, cart, https })
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Visitor {
    /// A `Set-Cookie` value for `name`, readable by the server only, living `max_age`
    /// seconds (0 deletes it), and sent back only over TLS when the visitor came over TLS.
    pub fn cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.https { "; Secure" } else { "" };
        // Token and cart values are made of cookie-safe characters; a value that is not
        // cannot be set, and an empty one is set instead.
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("bazaar_invalid=; Max-Age=0"))
    }
}

/// Products and quantities a shopper means to buy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart(Vec<(Uuid, i64)>);

impl Cart {
    /// Reads `id:qty.id:qty`; anything malformed leaves that line out.
    pub fn parse(text: &str) -> Cart {
        let lines = text
            .split('.')
            .filter_map(|item| {
                let (id, qty) = item.split_once(':')?;
                let qty: i64 = qty.parse().ok()?;
                Some((id.parse().ok()?, qty.clamp(1, MAX_QUANTITY)))
            })
            .take(CART_LINES)
            .collect();
        Cart(lines)
    }

    /// The cookie value.
    pub fn encode(&self) -> String {
        let items: Vec<String> = self.0.iter().map(|(id, qty)| format!("{id}:{qty}")).collect();
        items.join(".")
    }

    /// Adds `quantity` of `product` (capped per product); false when the cart is full.
    pub fn add(&mut self, product: Uuid, quantity: i64) -> bool {
        if let Some(line) = self.0.iter_mut().find(|(id, _)| *id == product) {
            line.1 = (line.1 + quantity).clamp(1, MAX_QUANTITY);
            return true;
        }
        if self.0.len() >= CART_LINES {
            return false;
        }
        self.0.push((product, quantity.clamp(1, MAX_QUANTITY)));
        true
    }

    /// Takes `product` out.
    pub fn remove(&mut self, product: Uuid) {
        self.0.retain(|(id, _)| *id != product);
    }

    /// The lines as an order places them.
    pub fn lines(&self) -> Vec<Line> {
        self.0
            .iter()
            .map(|&(product_id, quantity)| Line { product_id, quantity })
            .collect()
    }

    /// Units in the cart.
    pub fn units(&self) -> i64 {
        self.0.iter().map(|(_, q)| q).sum()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cart_survives_its_cookie_and_drops_what_is_malformed() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut cart = Cart::default();
        assert!(cart.add(a, 2));
        assert!(cart.add(b, 1));
        assert!(cart.add(a, 1));
        assert_eq!(Cart::parse(&cart.encode()), cart);
        assert_eq!(cart.units(), 4);
        let forged = format!("{a}:1000.nonsense.{b}:x.:3");
        assert_eq!(Cart::parse(&forged).lines().len(), 1);
        assert_eq!(Cart::parse(&forged).units(), MAX_QUANTITY);
    }

    #[test]
    fn a_full_cart_refuses_new_products() {
        let mut cart = Cart::default();
        for _ in 0..CART_LINES {
            assert!(cart.add(Uuid::new_v4(), 1));
        }
        assert!(!cart.add(Uuid::new_v4(), 1));
    }

    #[test]
    fn cookies_are_secure_when_the_visitor_came_over_tls() {
        let visitor = |https| Visitor {
            shopper: None,
            cart: Cart::default(),
            https,
        };
        let over_tls = visitor(true).cookie(SESSION_COOKIE, "t", 60);
        assert!(over_tls.to_str().unwrap().ends_with("HttpOnly; SameSite=Lax; Secure"));
        let plain = visitor(false).cookie(SESSION_COOKIE, "t", 60);
        assert!(!plain.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; bazaar_cart=x:1; b=2"));
        assert_eq!(cookie(&headers, CART_COOKIE), Some("x:1"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), None);
    }
}
