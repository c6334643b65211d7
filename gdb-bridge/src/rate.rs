//! A byte counter with its recent rate (over the last second or so), for `monitor link` and
//! the control socket's status: totals alone cannot tell a busy link from an idle one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back the rate looks.
const WINDOW: Duration = Duration::from_secs(1);
/// Samples are at least this far apart.
const STEP: Duration = Duration::from_millis(100);

/// Bytes so far, and samples of the total for the rate.
#[derive(Default)]
pub struct Rate {
    total: AtomicU64,
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Rate {
    /// Counts `n` bytes.
    pub fn add(&self, n: u64) {
        let total = self.total.fetch_add(n, Ordering::Relaxed) + n;
        let mut s = self.samples.lock().expect("rate");
        let now = Instant::now();
        if s.back().is_none_or(|&(at, _)| now - at >= STEP) {
            s.push_back((now, total));
        }
        while s.len() > 2 && s.get(1).is_some_and(|&(at, _)| now - at > WINDOW) {
            s.pop_front();
        }
    }

    /// Bytes so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes per second over the last second (0 when nothing moved in it).
    pub fn per_second(&self) -> u64 {
        let total = self.total();
        let s = self.samples.lock().expect("rate");
        let now = Instant::now();
        let Some(&(at, then)) = s.iter().find(|&&(at, _)| now - at <= WINDOW * 2) else {
            return 0;
        };
        // Measured from the oldest sample still in the window; the bytes counted in that
        // sample itself are left out with its instant.
        let secs = (now - at).as_secs_f64().max(STEP.as_secs_f64());
        ((total - then) as f64 / secs) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_follows_recent_bytes_and_falls_to_zero() {
        let r = Rate::default();
        assert_eq!(r.per_second(), 0);
        r.add(100);
        for _ in 0..3 {
            std::thread::sleep(STEP);
            r.add(1000);
        }
        let rate = r.per_second();
        // 3000 bytes in about 0.3 s.
        assert!((5_000..=11_000).contains(&rate), "{rate}");
        assert_eq!(r.total(), 3100);
        std::thread::sleep(WINDOW * 2 + STEP);
        assert_eq!(r.per_second(), 0);
    }
}
