//! Recording: every worker thread owns a shard (a histogram and counters behind an
//! uncontended lock); the controller swaps shards out at each window boundary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Why a request did not count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Failure {
    /// TCP connect, TLS or HTTP handshake failed (or the request could not be sent for that reason).
    Connect,
    /// No complete answer within `--timeout`.
    Timeout,
    /// The connection broke mid-request.
    Io,
    /// The connection was closed before the request went out (the server ended it after
    /// the previous answer): not a failed request — the caller reconnects and sends it.
    Closed,
    /// A non-2xx status.
    Status(u16),
    /// The body was not what the endpoint answers (unparseable, fields missing).
    BadBody,
    /// The body parsed but held the wrong answer (`--check-labels`).
    WrongAnswer,
}

impl Failure {
    pub(crate) fn key(self) -> String {
        match self {
            Self::Connect => "connect".into(),
            Self::Timeout => "timeout".into(),
            Self::Io => "io".into(),
            Self::Closed => "closed".into(),
            Self::Status(code) => format!("http_{code}"),
            Self::BadBody => "bad_body".into(),
            Self::WrongAnswer => "wrong_answer".into(),
        }
    }

    /// Whether an HTTP/1.1 connection must be dropped after this failure (the answer was not
    /// read to its end); an HTTP/2 connection survives a timed-out stream.
    pub(crate) fn breaks(self, http2: bool) -> bool {
        match self {
            Self::Connect | Self::Io | Self::Closed => true,
            Self::Timeout => !http2,
            Self::Status(_) | Self::BadBody | Self::WrongAnswer => false,
        }
    }
}

/// Latencies are recorded in microseconds, 1 µs to one hour, three significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// What one window (or a merge of windows) saw.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub latency: Histogram<u64>,
    /// Open loop: how late each request actually went out (the client's own delay).
    pub lag: Histogram<u64>,
    pub ok: u64,
    pub items: u64,
    pub errors: BTreeMap<Failure, u64>,
}

impl Window {
    pub(crate) fn new() -> Self {
        Self { latency: histogram(), lag: histogram(), ok: 0, items: 0, errors: BTreeMap::new() }
    }

    pub(crate) fn merge(&mut self, other: &Window) {
        // Both histograms share bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.lag.add(&other.lag);
        self.ok += other.ok;
        self.items += other.items;
        for (k, n) in &other.errors {
            *self.errors.entry(*k).or_default() += n;
        }
    }

    pub(crate) fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One worker thread's recorder.
#[derive(Debug)]
pub(crate) struct Shard {
    window: Mutex<Window>,
    /// Completed requests (successes and failures) since the level started: for the progress line.
    pub done: AtomicU64,
}

impl Shard {
    pub(crate) fn new() -> Self {
        Self { window: Mutex::new(Window::new()), done: AtomicU64::new(0) }
    }

    pub(crate) fn success(&self, latency: Duration, items: u64, lag: Option<Duration>) {
        let us = |d: Duration| d.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.latency.saturating_record(us(latency));
        if let Some(lag) = lag {
            w.lag.saturating_record(us(lag));
        }
        w.ok += 1;
        w.items += items;
        drop(w);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self, failure: Failure, count: u64) {
        if count == 0 {
            return;
        }
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        *w.errors.entry(failure).or_default() += count;
        drop(w);
        self.done.fetch_add(count, Ordering::Relaxed);
    }

    /// Takes what was recorded since the last call.
    pub(crate) fn take(&self) -> Window {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *w, Window::new())
    }
}

/// Client-side latency percentiles of a level, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Open loop: how late the client sent, in milliseconds. Latencies count from the
/// intended send time, so this much of them is the client's own doing.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SendLag {
    pub mean_ms: f64,
    pub p99_ms: f64,
}

impl SendLag {
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self { mean_ms: h.mean() / 1000.0, p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0 })
    }
}

/// The latency figure stability and latency targets are judged on: a percentile, or the mean.
pub(crate) fn metric_ms(h: &Histogram<u64>, percentile: Option<f64>) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    match percentile {
        Some(p) => h.value_at_quantile(p / 100.0) as f64 / 1000.0,
        None => h.mean() / 1000.0,
    }
}

/// perf_analyzer's rule: the last `n` windows' throughput and latency each lie within
/// ±`tolerance` (a fraction) of their mean.
pub(crate) fn is_stable(windows: &[(f64, f64)], n: usize, tolerance: f64) -> bool {
    if n == 0 || windows.len() < n {
        return false;
    }
    let last = &windows[windows.len() - n..];
    let within = |values: Vec<f64>| {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().all(|v| (v - mean).abs() <= tolerance * mean.abs())
    };
    within(last.iter().map(|w| w.0).collect()) && within(last.iter().map(|w| w.1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stability_needs_enough_windows_within_tolerance() {
        assert!(!is_stable(&[(100.0, 1.0), (100.0, 1.0)], 3, 0.1));
        assert!(is_stable(&[(50.0, 9.0), (100.0, 1.0), (105.0, 1.05), (96.0, 0.97)], 3, 0.1));
        assert!(!is_stable(&[(100.0, 1.0), (100.0, 1.0), (100.0, 1.5)], 3, 0.1));
        assert!(!is_stable(&[(100.0, 1.0), (130.0, 1.0), (100.0, 1.0)], 3, 0.1));
        assert!(is_stable(&[(0.0, 0.0), (0.0, 0.0), (0.0, 0.0)], 3, 0.1));
    }

    #[test]
    fn shards_hand_over_and_reset_their_window() {
        let shard = Shard::new();
        shard.success(Duration::from_micros(1500), 4, None);
        shard.success(Duration::from_micros(500), 4, Some(Duration::from_micros(70)));
        shard.failure(Failure::Status(503), 2);
        shard.failure(Failure::Connect, 0);
        let w = shard.take();
        assert_eq!((w.ok, w.items, w.error_total()), (2, 8, 2));
        assert_eq!(w.errors.get(&Failure::Status(503)), Some(&2));
        assert_eq!(shard.done.load(Ordering::Relaxed), 4);
        let lat = Latency::of(&w.latency);
        assert!((lat.mean_ms - 1.0).abs() < 0.01 && (lat.max_ms - 1.5).abs() < 0.01, "{lat:?}");
        assert_eq!((w.lag.len(), w.lag.max()), (1, 70));
        assert_eq!(shard.take().ok, 0);
    }

    #[test]
    fn failures_name_themselves_and_know_what_breaks_a_connection() {
        assert_eq!(Failure::Status(500).key(), "http_500");
        assert!(Failure::Timeout.breaks(false) && !Failure::Timeout.breaks(true));
        assert!(!Failure::WrongAnswer.breaks(false));
    }
}
