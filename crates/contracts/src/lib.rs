//! The messages bazaar's services exchange: topics, domain events and saga commands.
//!
//! A service depends on this crate, never on another service's crate, so the contract
//! between them is visible in one place. Every payload is camelCase JSON inside a
//! `bazaar_core::envelope::Envelope`; money is integer minor units with a currency. Who
//! consumes which topic is in each service's `SERVICE` spec; its consumer group is its name.

use bazaar_core::message::{schema_of, MessageKind, MessageSpec};
use bazaar_core::saga::SagaReply;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The services that publish and consume these messages, by the name each one's spec
/// carries: the `source` of what it publishes and its consumer group. A participant checks
/// that a command came from [`roles::ORDERS`], and the order saga that each reply came from
/// the participant it asked.
pub mod roles {
    /// Registration and tokens.
    pub const USERS: &str = "users";
    /// The catalogue and stock.
    pub const INVENTORY: &str = "inventory";
    /// Orders and the order saga.
    pub const ORDERS: &str = "orders";
    /// Wallets and payments.
    pub const PAYMENTS: &str = "payments";
    /// Emails and texts.
    pub const NOTIFICATIONS: &str = "notifications";
    /// The storefront and operator console (pages over the public API).
    pub const WEB: &str = "web";
}

/// Topic names.
pub mod topics {
    /// Domain events of users (`user.registered`, `user.verification-requested`,
    /// `user.registration-repeated`).
    pub const USERS_EVENTS: &str = "users.events";
    /// Domain events of orders (`order.confirmed`, `order.cancelled`).
    pub const ORDERS_EVENTS: &str = "orders.events";
    /// Saga commands to inventory.
    pub const INVENTORY_COMMANDS: &str = "inventory.commands";
    /// Saga commands to payments.
    pub const PAYMENTS_COMMANDS: &str = "payments.commands";
    /// Replies of saga participants to the order saga.
    pub const ORDER_SAGA_REPLIES: &str = "orders.saga-replies";
}

/// Event and command types (the envelope's `eventType`).
pub mod types {
    /// A user confirmed their email address and their account is open: [`super::UserRegistered`].
    pub const USER_REGISTERED: &str = "user.registered";
    /// Someone registered an address that is not confirmed yet; mail it this code:
    /// [`super::VerificationRequested`].
    pub const USER_VERIFICATION_REQUESTED: &str = "user.verification-requested";
    /// Someone registered an address that already has an account; tell its owner:
    /// [`super::RegistrationRepeated`].
    pub const USER_REGISTRATION_REPEATED: &str = "user.registration-repeated";
    /// An order was confirmed: [`super::OrderOutcome`].
    pub const ORDER_CONFIRMED: &str = "order.confirmed";
    /// An order was cancelled: [`super::OrderOutcome`].
    pub const ORDER_CANCELLED: &str = "order.cancelled";
    /// Reserve every line of an order or none: [`super::ReserveStock`].
    pub const RESERVE_STOCK: &str = "inventory.reserve";
    /// Release an order's reservation: [`super::OrderRef`].
    pub const RELEASE_STOCK: &str = "inventory.release";
    /// Turn an order's reservation into a sale: [`super::OrderRef`].
    pub const COMMIT_STOCK: &str = "inventory.commit";
    /// Put a cancelled sale's units back on the shelf: [`super::OrderRef`].
    pub const RETURN_STOCK: &str = "inventory.return";
    /// Charge the customer for an order: [`super::ProcessPayment`].
    pub const PROCESS_PAYMENT: &str = "payments.process";
    /// Refund an order's payment: [`super::OrderRef`].
    pub const REFUND_PAYMENT: &str = "payments.refund";
    /// A participant's reply to an order saga command.
    pub const ORDER_SAGA_REPLY: &str = "orders.saga-reply";
}

/// Every message type with the topic that carries it and its payload's schema: what the
/// AsyncAPI document describes and what each consumer holds incoming payloads to.
pub const MESSAGES: &[MessageSpec] = &[
    MessageSpec {
        event_type: types::USER_REGISTERED,
        topic: topics::USERS_EVENTS,
        kind: MessageKind::Event,
        summary: "A user confirmed their address and their account is open.",
        payload: schema_of::<UserRegistered>,
    },
    MessageSpec {
        event_type: types::USER_VERIFICATION_REQUESTED,
        topic: topics::USERS_EVENTS,
        kind: MessageKind::Event,
        summary: "Someone registered an unconfirmed address; mail it this code.",
        payload: schema_of::<VerificationRequested>,
    },
    MessageSpec {
        event_type: types::USER_REGISTRATION_REPEATED,
        topic: topics::USERS_EVENTS,
        kind: MessageKind::Event,
        summary: "Someone registered an address that has an account; tell its owner.",
        payload: schema_of::<RegistrationRepeated>,
    },
    MessageSpec {
        event_type: types::ORDER_CONFIRMED,
        topic: topics::ORDERS_EVENTS,
        kind: MessageKind::Event,
        summary: "An order was reserved, paid and committed.",
        payload: schema_of::<OrderOutcome>,
    },
    MessageSpec {
        event_type: types::ORDER_CANCELLED,
        topic: topics::ORDERS_EVENTS,
        kind: MessageKind::Event,
        summary: "An order was refused or undone; nothing is charged.",
        payload: schema_of::<OrderOutcome>,
    },
    MessageSpec {
        event_type: types::RESERVE_STOCK,
        topic: topics::INVENTORY_COMMANDS,
        kind: MessageKind::Command,
        summary: "Reserve every line of an order, or none.",
        payload: schema_of::<ReserveStock>,
    },
    MessageSpec {
        event_type: types::RELEASE_STOCK,
        topic: topics::INVENTORY_COMMANDS,
        kind: MessageKind::Command,
        summary: "Release an order's reservation (compensation).",
        payload: schema_of::<OrderRef>,
    },
    MessageSpec {
        event_type: types::COMMIT_STOCK,
        topic: topics::INVENTORY_COMMANDS,
        kind: MessageKind::Command,
        summary: "Turn an order's reservation into a sale.",
        payload: schema_of::<OrderRef>,
    },
    MessageSpec {
        event_type: types::RETURN_STOCK,
        topic: topics::INVENTORY_COMMANDS,
        kind: MessageKind::Command,
        summary: "Put a cancelled sale's units back on the shelf.",
        payload: schema_of::<OrderRef>,
    },
    MessageSpec {
        event_type: types::PROCESS_PAYMENT,
        topic: topics::PAYMENTS_COMMANDS,
        kind: MessageKind::Command,
        summary: "Charge the customer for an order.",
        payload: schema_of::<ProcessPayment>,
    },
    MessageSpec {
        event_type: types::REFUND_PAYMENT,
        topic: topics::PAYMENTS_COMMANDS,
        kind: MessageKind::Command,
        summary: "Give an order's payment back (a compensation, or a cancellation).",
        payload: schema_of::<OrderRef>,
    },
    MessageSpec {
        event_type: types::ORDER_SAGA_REPLY,
        topic: topics::ORDER_SAGA_REPLIES,
        kind: MessageKind::Reply,
        summary: "A participant's answer to an order saga command; `data` is the step's result \
                  (`Reserved` for reserveInventory, `Paid` for processPayment).",
        payload: schema_of::<SagaReply>,
    },
];

/// A new user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserRegistered {
    /// The user's id.
    pub user_id: Uuid,
    /// Where to write to them.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Mobile number in E.164 form, for SMS, when the user gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// A code that proves an address is its registrant's, to be mailed to that address only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationRequested {
    /// The account waiting for the code.
    pub user_id: Uuid,
    /// The address to confirm (and the only place the code may go).
    pub email: String,
    /// Display name, for the greeting.
    pub name: String,
    /// The one-time code the registrant enters.
    pub code: String,
    /// Minutes the code stays valid.
    pub valid_minutes: i64,
}

/// A registration for an address that already has a confirmed account: its owner hears of
/// it (the registrant is told nothing different, so registration reveals no accounts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRepeated {
    /// The existing account.
    pub user_id: Uuid,
    /// Its confirmed address.
    pub email: String,
}

/// One line of an order as the customer asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LineRequest {
    /// The product.
    pub product_id: Uuid,
    /// How many (at least 1).
    pub quantity: i64,
}

/// One line as priced by inventory when reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PricedLine {
    /// The product.
    pub product_id: Uuid,
    /// How many.
    pub quantity: i64,
    /// Price of one unit in minor units.
    pub unit_price_cents: i64,
}

/// Reserve stock for an order (saga step `reserveInventory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReserveStock {
    /// The order.
    pub order_id: Uuid,
    /// What to reserve.
    pub lines: Vec<LineRequest>,
}

/// What inventory returns for a successful reservation (merged into the saga's context).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reserved {
    /// The lines with their prices.
    pub priced_lines: Vec<PricedLine>,
    /// Sum of the lines in minor units.
    pub total_cents: i64,
    /// ISO 4217 currency of every line.
    pub currency: String,
}

/// A command about one order that needs nothing else (release, commit, refund).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderRef {
    /// The order.
    pub order_id: Uuid,
}

/// Charge a customer for an order (saga step `processPayment`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessPayment {
    /// The order.
    pub order_id: Uuid,
    /// The paying customer.
    pub customer_id: Uuid,
    /// Amount in minor units.
    pub amount_cents: i64,
    /// ISO 4217 currency.
    pub currency: String,
}

/// What payments returns for a successful charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Paid {
    /// The payment's id.
    pub payment_id: Uuid,
}

/// An order reached its outcome (`order.confirmed` or `order.cancelled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderOutcome {
    /// The order.
    pub order_id: Uuid,
    /// Its customer.
    pub customer_id: Uuid,
    /// Where to tell them.
    pub email: String,
    /// What was charged in minor units (0 when cancelled).
    pub total_cents: i64,
    /// ISO 4217 currency of the total; none for an order cancelled before it was priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Why it was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
