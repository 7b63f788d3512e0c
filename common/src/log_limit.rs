//! Rate limits for log lines: a flood of the same warning (a misbehaving fleet, a scan of the
//! port) is logged a bounded number of times per window and the rest are counted, so the next
//! line that is logged says how many were held back. One limiter for both binaries.
//!
//! Pure: the caller passes `now`; this module never reads the clock and logs nothing itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Keys remembered at most; past that the memory is cleared (a flood of distinct keys is then
/// logged once each again, still bounded by the rate at which they arrive).
pub const MAX_LOG_LIMIT_KEYS: usize = 1024;

/// How many lines a [`LogLimiter`] lets through, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimit {
    /// Lines logged per window at most.
    pub max_lines: u32,
    /// A window starts with the first line logged after the previous window ended.
    pub window: Duration,
}

/// Lets through [`LogLimit::max_lines`] log lines per [`LogLimit::window`], per key, and counts
/// the rest. Shared by reference between tasks (`&self`).
#[derive(Debug)]
pub struct LogLimiter {
    limit: LogLimit,
    /// Key -> its current window.
    windows: Mutex<HashMap<String, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    n_logged: u32,
    /// Lines held back since the last one logged.
    n_suppressed: u64,
}

impl LogLimiter {
    pub fn new(limit: LogLimit) -> LogLimiter {
        LogLimiter {
            limit,
            windows: Mutex::default(),
        }
    }

    /// One kind of line: `Some(n)` means log now, mentioning the `n` lines suppressed since the
    /// last one logged; `None` means hold this one back (it is counted).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        self.allow_key("", now)
    }

    /// As [`LogLimiter::allow`], with a budget of its own for each `key` (a peer address and
    /// reason, say).
    pub fn allow_key(&self, key: &str, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if !windows.contains_key(key) {
            if windows.len() >= MAX_LOG_LIMIT_KEYS {
                windows.clear();
            }
            windows.insert(
                key.to_owned(),
                Window {
                    start: now,
                    n_logged: 0,
                    n_suppressed: 0,
                },
            );
        }
        let window = windows
            .get_mut(key)
            .expect("the key was inserted above if it was missing");
        if now.saturating_duration_since(window.start) >= self.limit.window {
            window.start = now;
            window.n_logged = 0;
        }
        if window.n_logged < self.limit.max_lines {
            window.n_logged += 1;
            Some(std::mem::take(&mut window.n_suppressed))
        } else {
            window.n_suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    #[test]
    fn counts_what_it_suppresses_and_reports_it_with_the_next_line() {
        let limiter = LogLimiter::new(LogLimit {
            max_lines: 20,
            window: WINDOW,
        });
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(limiter.allow(t0), Some(0));
        }
        assert_eq!(limiter.allow(t0), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(t0 + WINDOW), Some(2));
        assert_eq!(limiter.allow(t0 + WINDOW), Some(0));
    }

    #[test]
    fn one_line_per_window_and_key() {
        let limiter = LogLimiter::new(LogLimit {
            max_lines: 1,
            window: Duration::from_millis(1000),
        });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(limiter.allow_key("a", at(0)), Some(0));
        assert_eq!(limiter.allow_key("a", at(500)), None);
        assert_eq!(limiter.allow_key("a", at(900)), None);
        assert_eq!(limiter.allow_key("b", at(900)), Some(0), "keys are apart");
        // The window is measured from the last line logged, not from the last one held back.
        assert_eq!(limiter.allow_key("a", at(1000)), Some(2));
        assert_eq!(limiter.allow_key("a", at(1999)), None);
        assert_eq!(limiter.allow_key("a", at(2000)), Some(1));
    }

    #[test]
    fn time_that_goes_backwards_stays_in_the_window() {
        let limiter = LogLimiter::new(LogLimit {
            max_lines: 1,
            window: WINDOW,
        });
        let t0 = Instant::now() + WINDOW;
        assert_eq!(limiter.allow(t0), Some(0));
        assert_eq!(limiter.allow(t0 - Duration::from_secs(5)), None);
        assert_eq!(limiter.allow(t0 + WINDOW), Some(1));
    }

    #[test]
    fn the_memory_of_keys_is_bounded() {
        let limiter = LogLimiter::new(LogLimit {
            max_lines: 1,
            window: WINDOW,
        });
        let t0 = Instant::now();
        for idx in 0..MAX_LOG_LIMIT_KEYS {
            assert_eq!(limiter.allow_key(&idx.to_string(), t0), Some(0));
        }
        assert_eq!(limiter.allow_key("0", t0), None);
        // One key more clears the memory: the first key is logged again.
        assert_eq!(limiter.allow_key("new", t0), Some(0));
        assert_eq!(limiter.allow_key("0", t0), Some(0));
        let n_keys = limiter
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(n_keys <= MAX_LOG_LIMIT_KEYS, "{n_keys}");
    }
}
