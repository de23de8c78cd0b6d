//! Per-account sign-in throttling: a password guesser, or a flood of sign-ins for one account,
//! is slowed down before it costs any password hashing.
//!
//! Each address (registered or not: an unknown one is throttled the same way, so the answer
//! says nothing about which exist) may have two sign-ins in flight at once and five failures
//! for free; after that every further failure locks it for twice as long as the one before,
//! from one second up to fifteen minutes. A locked or busy address is answered 429 with
//! `Retry-After` at once. Per-client limits are the gateway's (its authentication routes have
//! their own, stricter rate limit); this is the per-account half, in each instance's memory.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Sign-ins of one address in flight at once.
const IN_FLIGHT: u32 = 2;
/// Failures before the first lock.
const FREE_FAILURES: u32 = 5;
/// The longest lock.
const LONGEST_LOCK: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered; past it, those with nothing in flight and no lock are forgotten.
const REMEMBERED: usize = 100_000;

/// What is known of one address's recent sign-ins.
#[derive(Debug, Default)]
struct Account {
    in_flight: u32,
    failures: u32,
    locked_until: Option<Instant>,
}

/// The throttle shared by an instance's sign-in handlers.
#[derive(Debug, Clone, Default)]
pub struct LoginThrottle {
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

/// Why a sign-in was not let through, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    /// How long to wait.
    pub retry_after: Duration,
}

impl LoginThrottle {
    /// Lets a sign-in for `email` start, or says how long it must wait.
    pub fn admit(&self, email: &str) -> Result<Attempt, Throttled> {
        let now = Instant::now();
        let mut accounts = self.accounts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if accounts.len() >= REMEMBERED && !accounts.contains_key(email) {
            accounts.retain(|_, a| a.in_flight > 0 || a.locked_until.is_some_and(|t| t > now));
        }
        let account = accounts.entry(email.to_string()).or_default();
        if let Some(until) = account.locked_until.filter(|t| *t > now) {
            return Err(Throttled {
                retry_after: until - now,
            });
        }
        if account.in_flight >= IN_FLIGHT {
            return Err(Throttled {
                retry_after: Duration::from_secs(1),
            });
        }
        account.in_flight += 1;
        Ok(Attempt {
            throttle: self.clone(),
            email: email.to_string(),
            outcome: None,
        })
    }

    fn finish(&self, email: &str, succeeded: Option<bool>) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(account) = accounts.get_mut(email) else { return };
        account.in_flight = account.in_flight.saturating_sub(1);
        match succeeded {
            Some(true) => {
                account.failures = 0;
                account.locked_until = None;
            }
            Some(false) => {
                account.failures += 1;
                if let Some(over) = account.failures.checked_sub(FREE_FAILURES) {
                    let lock = Duration::from_secs(1u64 << over.min(20)).min(LONGEST_LOCK);
                    account.locked_until = Some(Instant::now() + lock);
                }
            }
            // Shed or failed for another reason: it says nothing about the password.
            None => {}
        }
        if account.in_flight == 0 && account.failures == 0 {
            accounts.remove(email);
        }
    }
}

/// A sign-in in flight; dropping it without an outcome counts it as neither.
#[derive(Debug)]
pub struct Attempt {
    throttle: LoginThrottle,
    email: String,
    outcome: Option<bool>,
}

impl Attempt {
    /// Records whether the password matched.
    pub fn matched(mut self, matched: bool) {
        self.outcome = Some(matched);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.throttle.finish(&self.email, self.outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_are_free_then_each_locks_longer() {
        let throttle = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            throttle.admit("a@x.io").expect("free").matched(false);
        }
        let first = throttle.admit("a@x.io").expect_err("locked");
        assert!(first.retry_after <= Duration::from_secs(1));
        // Another address is untouched.
        throttle.admit("b@x.io").expect("another account").matched(true);
    }

    #[test]
    fn a_success_clears_the_failures() {
        let throttle = LoginThrottle::default();
        for _ in 0..FREE_FAILURES - 1 {
            throttle.admit("a@x.io").expect("free").matched(false);
        }
        throttle.admit("a@x.io").expect("free").matched(true);
        for _ in 0..FREE_FAILURES {
            throttle.admit("a@x.io").expect("free again").matched(false);
        }
        assert!(throttle.admit("a@x.io").is_err());
    }

    #[test]
    fn only_two_sign_ins_of_one_account_run_at_once() {
        let throttle = LoginThrottle::default();
        let one = throttle.admit("a@x.io").expect("first");
        let _two = throttle.admit("a@x.io").expect("second");
        assert_eq!(
            throttle.admit("a@x.io").expect_err("third waits").retry_after,
            Duration::from_secs(1)
        );
        drop(one);
        throttle.admit("a@x.io").expect("a turn freed");
    }

    #[test]
    fn locks_grow_but_never_past_fifteen_minutes() {
        let throttle = LoginThrottle::default();
        for _ in 0..40 {
            if let Ok(attempt) = throttle.admit("a@x.io") {
                attempt.matched(false);
            }
            // Expire the lock so the next failure can be recorded.
            let mut accounts = throttle.accounts.lock().unwrap();
            accounts.get_mut("a@x.io").unwrap().locked_until = None;
        }
        throttle.admit("a@x.io").expect("unlocked").matched(false);
        let wait = throttle.admit("a@x.io").expect_err("locked").retry_after;
        assert!(wait <= LONGEST_LOCK && wait > LONGEST_LOCK - Duration::from_secs(5));
    }
}
