//! The agent's bandwidth limit: one token bucket shared by all its transfers.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket in bytes per second, shared by an agent's transfers.
pub struct RateLimiter {
    rate: u64,
    state: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> Self {
        Self { rate: bytes_per_second.max(1), state: Mutex::new((Instant::now(), 0.0)) }
    }

    /// Blocks the calling (non-async) thread until `n` bytes may go.
    pub fn acquire_blocking(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // At most one second of burst.
            let tokens =
                (s.1 + now.duration_since(s.0).as_secs_f64() * self.rate as f64).min(self.rate as f64);
            let left = tokens - n as f64;
            *s = (now, left);
            if left >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-left / self.rate as f64) }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}
