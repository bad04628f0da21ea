//! The queue delay the scheduler waits for a batch to fill: fixed, or adaptive.
//!
//! Adaptive control rule (with `target_p99` = T, upper bound D = `max_queue_delay`):
//! executors report each request's latency (admission → answer). Every window of at
//! least 64 requests and 50 ms, the controller takes the window's p99 latency L and
//! the delay d that was in force. L − d estimates the latency that is not the
//! deliberate wait (waiting for an executor + compute), so the delay that would put the
//! p99 at 90% of the target is d* = 0.9·T − (L − d). The new delay is
//! clamp(d/2 + d*/2, 0, D): halfway there, for stability. Under light load d grows
//! towards D and batches fill; as load or compute time rises the delay shrinks, down
//! to zero when the target can only just be met.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WINDOW_MIN_SAMPLES: usize = 64;
const WINDOW_MIN_TIME: Duration = Duration::from_millis(50);
const HEADROOM: f64 = 0.9;

#[derive(Debug)]
pub(crate) struct QueueDelay {
    current_ns: AtomicU64,
    target: Option<Duration>,
    max: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    samples: Vec<u64>,
    started: Instant,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl QueueDelay {
    pub(crate) fn new(max: Duration, target: Option<Duration>) -> Self {
        // Adaptive mode starts from no delay (always within target) and grows.
        let start = if target.is_some() { Duration::ZERO } else { max };
        Self {
            current_ns: AtomicU64::new(nanos(start)),
            target,
            max,
            window: Mutex::new(Window { samples: Vec::with_capacity(256), started: Instant::now() }),
        }
    }

    pub(crate) fn current(&self) -> Duration {
        Duration::from_nanos(self.current_ns.load(Ordering::Relaxed))
    }

    /// Feeds request latencies; a no-op for a fixed delay.
    pub(crate) fn observe(&self, latencies: impl Iterator<Item = Duration>) {
        let Some(target) = self.target else { return };
        let Ok(mut window) = self.window.lock() else { return };
        window.samples.extend(latencies.map(nanos));
        if window.samples.len() < WINDOW_MIN_SAMPLES || window.started.elapsed() < WINDOW_MIN_TIME {
            return;
        }
        let n = window.samples.len();
        let rank = (n * 99).div_ceil(100).saturating_sub(1);
        let (_, &mut p99, _) = window.samples.select_nth_unstable(rank);
        window.samples.clear();
        window.started = Instant::now();
        drop(window);
        let next = next_delay(self.current(), Duration::from_nanos(p99), target, self.max);
        self.current_ns.store(nanos(next), Ordering::Relaxed);
    }
}

/// One step of the control rule in the module documentation.
pub(crate) fn next_delay(current: Duration, p99: Duration, target: Duration, max: Duration) -> Duration {
    let d = current.as_secs_f64();
    let other = (p99.as_secs_f64() - d).max(0.0);
    let ideal = HEADROOM * target.as_secs_f64() - other;
    let next = (0.5 * d + 0.5 * ideal).clamp(0.0, max.as_secs_f64());
    Duration::from_secs_f64(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn grows_when_latency_is_far_below_target() {
        let next = next_delay(MS(0), MS(2), MS(20), MS(50));
        assert!(next > MS(7) && next < MS(9), "{next:?}");
    }

    #[test]
    fn shrinks_to_zero_when_compute_alone_exceeds_target() {
        let next = next_delay(MS(10), MS(40), MS(20), MS(50));
        assert_eq!(next, Duration::ZERO);
    }

    #[test]
    fn never_exceeds_the_configured_bound() {
        assert_eq!(next_delay(MS(5), MS(6), MS(1000), MS(5)), MS(5));
    }

    #[test]
    fn converges_on_a_fixed_point() {
        // Latency = delay + 4 ms of other work: the fixed point is 0.9·20 − 4 = 14 ms.
        let mut d = Duration::ZERO;
        for _ in 0..30 {
            d = next_delay(d, d + MS(4), MS(20), MS(100));
        }
        assert!((d.as_secs_f64() - 0.014).abs() < 1e-4, "{d:?}");
    }

    #[test]
    fn fixed_mode_ignores_observations() {
        let q = QueueDelay::new(MS(3), None);
        q.observe((0..1000).map(|_| MS(100)));
        assert_eq!(q.current(), MS(3));
    }
}
