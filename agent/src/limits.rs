//! The limits every transfer of one agent shares, inbound and outbound
//! together (Hyper-V's MaximumActiveTransfers and a bandwidth cap): a
//! transfer slot held for a whole segment or initial copy, and a token
//! bucket every chunk passes. Both start from the command line and change at
//! once when a ReplicationServer says otherwise (ConfigureSite): a raised
//! limit lets waiting transfers go, a lowered one lets no new transfer start
//! until enough have finished, and running transfers are never cut.
//!
//! ```text
//!  shipper (segment, copy) ─┐                      ┌─ TransferLimit (slots)
//!  receiver (push streams) ─┴─▶ Arc<Limits> ───────┴─ RateLimiter (bytes/s, per chunk)
//! ```

use std::{
    pin::pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// One agent's shared limits.
pub struct Limits {
    pub transfers: TransferLimit,
    pub bandwidth: RateLimiter,
}

impl Limits {
    /// `max_transfers` slots (at least one); `bytes_per_second` 0 or `None` is unlimited.
    pub fn new(max_transfers: usize, bytes_per_second: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            transfers: TransferLimit::new(max_transfers),
            bandwidth: RateLimiter::new(bytes_per_second.unwrap_or(0)),
        })
    }
}

/// How many transfers may run at once; the count can change at any time.
pub struct TransferLimit {
    state: Mutex<Slots>,
    freed: Notify,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub max: usize,
    pub active: usize,
    /// Most transfers that ran at once since the limit was last set.
    pub peak: usize,
}

/// A running transfer's slot, given back when dropped.
pub struct TransferPermit<'a> {
    limit: &'a TransferLimit,
}

impl Drop for TransferPermit<'_> {
    fn drop(&mut self) {
        self.limit.lock().active -= 1;
        self.limit.freed.notify_waiters();
    }
}

impl TransferLimit {
    pub fn new(max: usize) -> Self {
        Self { state: Mutex::new(Slots { max: max.max(1), ..Default::default() }), freed: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until fewer than the limit run, then takes a slot.
    pub async fn acquire(&self) -> TransferPermit<'_> {
        loop {
            // Registered before looking, so a slot freed in between is not missed.
            let mut freed = pin!(self.freed.notified());
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.active < s.max {
                    s.active += 1;
                    s.peak = s.peak.max(s.active);
                    return TransferPermit { limit: self };
                }
            }
            freed.await;
        }
    }

    /// Sets the limit (at least one); waiting transfers go if it rose.
    pub fn set_max(&self, max: usize) {
        let mut s = self.lock();
        if s.max != max.max(1) {
            s.max = max.max(1);
            s.peak = s.active;
        }
        drop(s);
        self.freed.notify_waiters();
    }

    pub fn slots(&self) -> Slots {
        *self.lock()
    }
}

/// A token bucket in bytes per second with one second of burst; 0 is unlimited.
pub struct RateLimiter {
    rate: AtomicU64,
    state: Mutex<(Instant, f64)>,
}

impl RateLimiter {
    pub fn new(bytes_per_second: u64) -> Self {
        Self { rate: AtomicU64::new(bytes_per_second), state: Mutex::new((Instant::now(), 0.0)) }
    }

    /// Bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Takes `n` bytes' worth of tokens; how long the caller must wait before sending them.
    fn take(&self, n: usize) -> Duration {
        let rate = self.rate() as f64;
        if rate == 0.0 {
            return Duration::ZERO;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let tokens = (s.1 + now.duration_since(s.0).as_secs_f64() * rate).min(rate);
        let left = tokens - n as f64;
        *s = (now, left);
        if left >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-left / rate) }
    }

    /// Blocks the calling (non-async) thread until `n` bytes may go.
    pub fn acquire_blocking(&self, n: usize) {
        let wait = self.take(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Waits until `n` bytes may go.
    pub async fn acquire(&self, n: usize) {
        let wait = self.take(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_starts_nothing_new_and_a_raised_one_lets_waiters_go() {
        let limit = Arc::new(TransferLimit::new(2));
        let (a, b) = (limit.acquire().await, limit.acquire().await);
        limit.set_max(1);
        drop(a);
        // One still runs: at the new limit, so nobody else starts.
        let l = limit.clone();
        let waiter = tokio::spawn(async move {
            let _p = l.acquire().await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        // The peak counts from when the limit was set: two were running then.
        assert_eq!(limit.slots(), Slots { max: 1, active: 1, peak: 2 });
        limit.set_max(3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiter.is_finished(), "raising the limit lets the waiter go");
        drop(b);
        assert_eq!(limit.slots().active, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_holds_a_rate_and_zero_means_unlimited() {
        let r = RateLimiter::new(0);
        let t = tokio::time::Instant::now();
        r.acquire(1 << 30).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        r.set_rate(1000);
        // One second of burst accrues from the first use; 3000 bytes more than that wait.
        assert!(r.take(3000) >= Duration::from_secs(2));
    }
}
