//! Retries inside a budget: over each ten seconds, retries may add at most a fifth to the
//! requests proxied (plus a few, so a quiet gateway can still retry). When upstreams fail
//! because they are overloaded, retrying every failure would multiply their load; past the
//! budget a failed attempt is answered as it failed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window the budget is counted over.
const WINDOW: Duration = Duration::from_secs(10);
/// Retries allowed per request in the window.
const RATIO: f64 = 0.2;
/// Retries allowed in every window whatever the traffic.
const FLOOR: u64 = 10;

#[derive(Debug)]
struct Window {
    started: Instant,
    requests: u64,
    retries: u64,
}

/// The gateway's shared retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    window: Mutex<Window>,
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget {
            window: Mutex::new(Window {
                started: Instant::now(),
                requests: 0,
                retries: 0,
            }),
        }
    }
}

impl RetryBudget {
    fn current(&self) -> std::sync::MutexGuard<'_, Window> {
        let mut window = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if window.started.elapsed() >= WINDOW {
            *window = Window {
                started: Instant::now(),
                requests: 0,
                retries: 0,
            };
        }
        window
    }

    /// Counts a request sent upstream for the first time.
    pub fn request(&self) {
        self.current().requests += 1;
    }

    /// Takes a retry from the budget, or says there is none left.
    pub fn try_retry(&self) -> bool {
        let mut window = self.current();
        let allowed = FLOOR + (window.requests as f64 * RATIO) as u64;
        if window.retries < allowed {
            window.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_a_fifth_of_requests_plus_a_floor() {
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.request();
        }
        let granted = (0..1000).filter(|_| budget.try_retry()).count();
        assert_eq!(granted as u64, FLOOR + 20);
    }

    #[test]
    fn a_quiet_gateway_still_retries_a_few() {
        let budget = RetryBudget::default();
        assert!(budget.try_retry());
    }
}
