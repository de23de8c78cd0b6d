//! Confirming that an email address belongs to whoever registered it.
//!
//! Registration stores the account unconfirmed and mails a six-digit code (through
//! notifications) to the address. The account opens, and money and messages start to flow
//! (`user.registered`: a wallet, a welcome), only when someone presents that code together
//! with the account's password: the code proves the mailbox, the password that the one who
//! holds it chose this account. Someone who registers another person's address first never
//! sees the code, and a later registration by the owner replaces their password, so squatting
//! an address wins nothing.
//!
//! Bounds: a code lives a day and dies after five wrong guesses; an address is sent at most
//! three codes (or "you already have an account" notices) an hour, whoever asks.

use std::time::Duration;

use ring::{
    digest::{digest, SHA256},
    rand::{SecureRandom, SystemRandom},
};

/// How long a code stays valid.
pub const CODE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Wrong guesses that void a code.
pub const GUESSES: i64 = 5;
/// Messages (codes or notices) one address is sent per [`SEND_WINDOW`].
pub const SENDS_PER_WINDOW: i64 = 3;
/// The window [`SENDS_PER_WINDOW`] counts over.
pub const SEND_WINDOW: Duration = Duration::from_secs(3600);

/// A fresh six-digit code.
pub fn new_code() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; 8];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(format!("{:06}", u64::from_le_bytes(bytes) % 1_000_000))
}

/// What is stored of a code: its SHA-256, so the store alone cannot confirm an address.
pub fn code_hash(code: &str) -> String {
    digest(&SHA256, code.trim().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether an address sent its last message at `since` and `sent` messages since may be sent
/// another at `now` (milliseconds), and the window and count to store if so.
pub fn may_send(sent: i64, since: i64, now: i64) -> Option<(i64, i64)> {
    if now - since >= SEND_WINDOW.as_millis() as i64 {
        Some((now, 1))
    } else if sent < SENDS_PER_WINDOW {
        Some((since, sent + 1))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits_and_differ() {
        let (a, b) = (new_code().unwrap(), new_code().unwrap());
        assert!(a.len() == 6 && a.chars().all(|c| c.is_ascii_digit()));
        assert_ne!(code_hash(&a), code_hash(&b), "two codes alike (one in a million)");
        assert_eq!(code_hash(" 123456 "), code_hash("123456"));
    }

    #[test]
    fn an_address_gets_three_messages_an_hour() {
        let hour = SEND_WINDOW.as_millis() as i64;
        assert_eq!(may_send(0, 0, hour * 10), Some((hour * 10, 1)));
        assert_eq!(may_send(1, 100, 200), Some((100, 2)));
        assert_eq!(may_send(3, 100, 200), None);
        assert_eq!(may_send(3, 100, 100 + hour), Some((100 + hour, 1)));
    }
}
