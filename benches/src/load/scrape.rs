//! Server-side figures from kiln's `/metrics` (Prometheus text), read before and after a
//! level: time in the batcher's queue, time in the backend, and batch sizes.

use std::collections::HashMap;

use serde::Serialize;

const SERIES: [&str; 6] = [
    "kiln_queue_duration_seconds_sum",
    "kiln_queue_duration_seconds_count",
    "kiln_compute_duration_seconds_sum",
    "kiln_compute_duration_seconds_count",
    "kiln_batch_size_sum",
    "kiln_batch_size_count",
];

/// The series of interest, summed over models (or for one model).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sample {
    values: HashMap<&'static str, f64>,
}

impl Sample {
    pub(crate) fn parse(text: &str, model: Option<&str>) -> Self {
        let mut values = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = match line.rsplit_once(' ') {
                Some((s, v)) => (s.trim(), v.trim()),
                None => continue,
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let Some(&key) = SERIES.iter().find(|s| **s == name) else { continue };
            if let Some(m) = model
                && !labels.split(',').any(|l| l.trim() == format!("model=\"{m}\""))
            {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                *values.entry(key).or_insert(0.0) += v;
            }
        }
        Self { values }
    }

    fn get(&self, key: &str) -> f64 {
        self.values.get(key).copied().unwrap_or(0.0)
    }
}

/// What the server did during a level, from the difference of two scrapes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ServerSide {
    /// Batches executed.
    pub batches: f64,
    /// Mean items per executed batch.
    pub avg_batch_size: f64,
    /// Mean time a request waited in the batcher's queue, in milliseconds.
    pub queue_ms: f64,
    /// Mean backend time per batch, in milliseconds.
    pub compute_ms: f64,
}

impl ServerSide {
    /// `None` when the server exposes none of kiln's batching series.
    pub(crate) fn between(before: &Sample, after: &Sample) -> Option<Self> {
        let d = |k: &str| after.get(k) - before.get(k);
        let ratio = |sum: &str, count: &str| if d(count) > 0.0 { d(sum) / d(count) } else { 0.0 };
        if after.values.is_empty() {
            return None;
        }
        Some(Self {
            batches: d("kiln_batch_size_count"),
            avg_batch_size: ratio("kiln_batch_size_sum", "kiln_batch_size_count"),
            queue_ms: 1000.0 * ratio("kiln_queue_duration_seconds_sum", "kiln_queue_duration_seconds_count"),
            compute_ms: 1000.0 * ratio("kiln_compute_duration_seconds_sum", "kiln_compute_duration_seconds_count"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE kiln_batch_size histogram\n\
        kiln_batch_size_sum{model=\"a\"} 10\nkiln_batch_size_count{model=\"a\"} 5\n\
        kiln_batch_size_sum{model=\"b\"} 100\nkiln_batch_size_count{model=\"b\"} 1\n\
        kiln_queue_duration_seconds_sum{model=\"a\"} 0.5\nkiln_queue_duration_seconds_count{model=\"a\"} 10\n\
        kiln_compute_duration_seconds_sum{model=\"a\"} 1.0\nkiln_compute_duration_seconds_count{model=\"a\"} 5\n\
        kiln_requests_total{model=\"a\"} 99\n";

    #[test]
    fn deltas_give_per_request_queue_and_per_batch_compute_time() {
        let after = BEFORE
            .replace("sum{model=\"a\"} 10\n", "sum{model=\"a\"} 50\n")
            .replace("count{model=\"a\"} 5\nkiln_batch_size_sum", "count{model=\"a\"} 15\nkiln_batch_size_sum")
            .replace("seconds_sum{model=\"a\"} 0.5", "seconds_sum{model=\"a\"} 0.7")
            .replace("seconds_count{model=\"a\"} 10", "seconds_count{model=\"a\"} 50")
            .replace("compute_duration_seconds_sum{model=\"a\"} 1.0", "compute_duration_seconds_sum{model=\"a\"} 1.2")
            .replace("compute_duration_seconds_count{model=\"a\"} 5", "compute_duration_seconds_count{model=\"a\"} 15");
        let s = ServerSide::between(&Sample::parse(BEFORE, Some("a")), &Sample::parse(&after, Some("a")));
        let s = s.unwrap_or_else(|| panic!("no server-side figures"));
        assert_eq!(s.batches, 10.0);
        assert!((s.avg_batch_size - 4.0).abs() < 1e-9, "{s:?}");
        assert!((s.queue_ms - 5.0).abs() < 1e-9, "{s:?}");
        assert!((s.compute_ms - 20.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn without_a_model_filter_series_are_summed() {
        let s = Sample::parse(BEFORE, None);
        assert_eq!(s.get("kiln_batch_size_sum"), 110.0);
        assert!(ServerSide::between(&s, &Sample::parse("up 1\n", None)).is_none());
    }
}
