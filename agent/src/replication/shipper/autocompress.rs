//! Compression that turns itself off for data that does not shrink (the
//! mission's "auto-off"): zstd level 1 costs a core's worth of time per
//! ~150 MiB/s, which encrypted or already compressed guest data does not
//! repay. Over each window of [`WINDOW`] raw bytes the ratio is measured;
//! when the output was not at least 5% smaller, chunks go raw from then on,
//! and every [`PROBE_EVERY`] raw bytes one chunk is compressed again to see
//! whether the data changed (a probe that shrinks turns it back on).
//!
//! ```text
//!  on  ──window: out ≥ 95% of raw──▶ off ──probe every 256 MiB: out < 95%──▶ on
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Raw bytes over which the ratio is judged.
pub const WINDOW: u64 = 16 << 20;
/// Raw bytes sent uncompressed between probes.
pub const PROBE_EVERY: u64 = 256 << 20;
/// Compression stays on while the output is below this share of the input.
const KEEP_BELOW: f64 = 0.95;

/// One disk's compression decision, shared by its transfers.
#[derive(Debug, Default)]
pub struct AutoCompress {
    /// Compression asked for at all (the VM's `compressionEnabled`).
    wanted: bool,
    /// Compressing now (else raw until the next probe).
    on: AtomicBool,
    window_raw: AtomicU64,
    window_out: AtomicU64,
    raw_since_off: AtomicU64,
    /// Times it turned off (for status and tests).
    pub turned_off: AtomicU64,
}

impl AutoCompress {
    pub fn new(wanted: bool) -> Self {
        Self { wanted, on: AtomicBool::new(wanted), ..Default::default() }
    }

    /// Whether chunks are compressed now.
    pub fn active(&self) -> bool {
        self.wanted && self.on.load(Relaxed)
    }

    /// `raw` compressed when that is on and it shrank, else `None` (send it raw).
    pub fn encode(&self, raw: &[u8]) -> Option<Vec<u8>> {
        if !self.wanted || raw.is_empty() {
            return None;
        }
        let n = raw.len() as u64;
        if !self.on.load(Relaxed) {
            if self.raw_since_off.fetch_add(n, Relaxed) + n < PROBE_EVERY {
                return None;
            }
            // A probe: does the data shrink again?
            self.raw_since_off.store(0, Relaxed);
            let c = compress(raw)?;
            if (c.len() as f64) < n as f64 * KEEP_BELOW {
                self.window_raw.store(0, Relaxed);
                self.window_out.store(0, Relaxed);
                self.on.store(true, Relaxed);
            }
            return (c.len() < raw.len()).then_some(c);
        }
        let c = compress(raw).filter(|c| c.len() < raw.len());
        let out = c.as_ref().map_or(n, |c| c.len() as u64);
        let wr = self.window_raw.fetch_add(n, Relaxed) + n;
        let wo = self.window_out.fetch_add(out, Relaxed) + out;
        if wr >= WINDOW {
            self.window_raw.store(0, Relaxed);
            self.window_out.store(0, Relaxed);
            if wo as f64 >= wr as f64 * KEEP_BELOW {
                self.raw_since_off.store(0, Relaxed);
                self.on.store(false, Relaxed);
                self.turned_off.fetch_add(1, Relaxed);
            }
        }
        c
    }
}

/// zstd level 1 with this thread's context: a fresh context per chunk
/// allocates (and faults in) its tables again every time.
fn compress(raw: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = CONTEXT.with_borrow_mut(|c| match c {
        Some(z) => z.compress(raw),
        None => zstd::bulk::Compressor::new(1).and_then(|z| c.insert(z).compress(raw)),
    });
    out.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn it_turns_off_for_noise_probes_and_comes_back_for_text() {
        let a = AutoCompress::new(true);
        let chunk = 1 << 20;
        let text: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog. ".iter().cycle().take(chunk).copied().collect();
        // Text stays compressed.
        for _ in 0..32 {
            assert!(a.encode(&text).is_some());
        }
        assert!(a.active());
        // Noise: off after one window, and raw from then on.
        for k in 0..(WINDOW as usize / chunk) {
            let _ = a.encode(&noise(chunk, k as u64 + 7));
        }
        assert!(!a.active(), "off after a window of noise");
        assert_eq!(a.turned_off.load(Relaxed), 1);
        assert!(a.encode(&text).is_none(), "raw until the next probe, whatever the data");
        // The probe comes after PROBE_EVERY raw bytes; text turns it back on.
        let mut back = false;
        for _ in 0..(PROBE_EVERY as usize / chunk + 1) {
            back |= a.encode(&text).is_some();
        }
        assert!(back && a.active(), "a probe of text turns it on again");
        // Not wanted: never compressed.
        let never = AutoCompress::new(false);
        assert!(never.encode(&text).is_none() && !never.active());
    }
}
