//! The results of a run: one row per level, as a table, JSON or CSV.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::payload::{Target, Workload, describe};
use super::scrape::ServerSide;
use super::stats::{Latency, SendLag};
use super::{LoadConfig, LoadError, Mode};

/// One level of a sweep.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LevelReport {
    /// Closed loop: requests kept in flight.
    pub concurrency: Option<usize>,
    /// Open loop: requests per second offered.
    pub target_rate: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    /// Measured time (warm-up excluded).
    pub duration_s: f64,
    /// Successful requests in the measured time.
    pub requests: u64,
    /// Inference items those requests carried (images, batch rows).
    pub items: u64,
    pub throughput_rps: f64,
    pub items_per_s: f64,
    pub error_count: u64,
    /// Failed requests by kind: connect, timeout, io, http_<status>, bad_body, wrong_answer.
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful requests; in open loop, from each request's intended send time.
    pub latency: Latency,
    /// Open loop: how late the client itself sent (part of `latency`).
    pub send_lag: Option<SendLag>,
    /// The figure stability and the latency target are judged on (see the report's `metric`).
    pub metric_ms: f64,
    /// Whether the last windows agreed within the stability tolerance.
    pub stable: bool,
    /// Windows the figures come from.
    pub windows: usize,
    /// Server-side figures from `/metrics`, when asked for and available.
    pub server: Option<ServerSide>,
}

impl LevelReport {
    /// The swept value: concurrency or rate.
    pub fn level(&self) -> f64 {
        self.concurrency.map(|c| c as f64).or(self.target_rate).unwrap_or(0.0)
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    pub machine: String,
    pub target: String,
    /// "closed" or "open".
    pub mode: String,
    pub arrival: Option<super::Arrival>,
    pub http: String,
    pub tls: bool,
    pub payload: Value,
    /// "mean" or "pNN": what stability and the latency target judge.
    pub metric: String,
    pub latency_target_ms: Option<f64>,
    pub stability_percent: f64,
    pub window_s: f64,
    pub warmup_s: f64,
    pub levels: Vec<LevelReport>,
    /// The highest level whose metric met the latency target (and had no errors).
    pub knee: Option<f64>,
}

pub(crate) fn build(config: &LoadConfig, target: &Target, workload: &Workload, levels: Vec<LevelReport>) -> Report {
    let (mode, arrival) = match config.mode {
        Mode::Closed { .. } => ("closed", None),
        Mode::Open { arrival, .. } => ("open", Some(arrival)),
    };
    let target_ms = config.latency_target.map(|t| t.as_secs_f64() * 1000.0);
    let knee = target_ms.and_then(|t| {
        levels
            .iter()
            .filter(|l| l.metric_ms <= t && l.error_count == 0 && l.requests > 0)
            .map(LevelReport::level)
            .reduce(f64::max)
    });
    Report {
        tool: format!("kiln bench {}", env!("CARGO_PKG_VERSION")),
        machine: crate::machine(),
        target: target.url(&target.path),
        mode: mode.into(),
        arrival,
        http: if config.http2 { "2".into() } else { "1.1".into() },
        tls: target.is_tls(),
        payload: describe(&config.payload, workload),
        metric: config.percentile.map(|p| format!("p{p}")).unwrap_or_else(|| "mean".into()),
        latency_target_ms: target_ms,
        stability_percent: config.timing.stability * 100.0,
        window_s: config.timing.window.as_secs_f64(),
        warmup_s: config.timing.warmup.as_secs_f64(),
        levels,
        knee,
    }
}

const COLUMNS: [&str; 21] = [
    "concurrency",
    "target_rate",
    "connections",
    "requests",
    "throughput_rps",
    "items_per_s",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "errors",
    "stable",
    "send_lag_mean_ms",
    "send_lag_p99_ms",
    "server_queue_ms",
    "server_compute_ms",
    "server_avg_batch",
    "error_kinds",
];

impl Report {
    /// A fixed-width table for terminals.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ =
            writeln!(out, "{} → {} (HTTP/{}, {} loop), {}", self.tool, self.target, self.http, self.mode, self.machine);
        if let Some(what) = self.payload.get("description").and_then(Value::as_str) {
            let _ = writeln!(out, "sending {what}");
        }
        let first = if self.mode == "open" { "rate/s" } else { "conc" };
        let server = self.levels.iter().any(|l| l.server.is_some());
        let lag = self.levels.iter().any(|l| l.send_lag.is_some());
        let _ = write!(
            out,
            "{first:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7}",
            "req/s", "items/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "stable"
        );
        if lag {
            let _ = write!(out, " {:>9}", "lag ms");
        }
        if server {
            let _ = write!(out, " {:>9} {:>9} {:>6}", "queue ms", "comp. ms", "batch");
        }
        out.push('\n');
        for l in &self.levels {
            let lat = &l.latency;
            let _ = write!(
                out,
                "{:>8} {:>9.0} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>7}",
                l.level(),
                l.throughput_rps,
                l.items_per_s,
                lat.p50_ms,
                lat.p90_ms,
                lat.p95_ms,
                lat.p99_ms,
                lat.p999_ms,
                lat.max_ms,
                l.error_count,
                if l.stable { "yes" } else { "no" }
            );
            if lag {
                let _ = write!(out, " {:>9.3}", l.send_lag.map(|g| g.mean_ms).unwrap_or(0.0));
            }
            if let Some(s) = &l.server {
                let _ = write!(out, " {:>9.2} {:>9.2} {:>6.1}", s.queue_ms, s.compute_ms, s.avg_batch_size);
            }
            out.push('\n');
            if !l.errors.is_empty() {
                let kinds: Vec<String> = l.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
                let _ = writeln!(out, "{:>8} errors: {}", "", kinds.join(", "));
            }
        }
        if let Some(t) = self.latency_target_ms {
            match self.knee {
                Some(k) => {
                    let _ = writeln!(out, "highest level with {} ≤ {t} ms and no errors: {k}", self.metric);
                }
                None => {
                    let _ = writeln!(out, "no level met {} ≤ {t} ms without errors", self.metric);
                }
            }
        }
        out
    }

    pub fn csv(&self) -> String {
        let mut out = COLUMNS.join(",");
        out.push('\n');
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        for l in &self.levels {
            let lat = &l.latency;
            let kinds: Vec<String> = l.errors.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let row = [
                l.concurrency.map(|c| c.to_string()).unwrap_or_default(),
                opt(l.target_rate),
                l.connections.to_string(),
                l.requests.to_string(),
                format!("{:.3}", l.throughput_rps),
                format!("{:.3}", l.items_per_s),
                format!("{:.4}", lat.mean_ms),
                format!("{:.4}", lat.p50_ms),
                format!("{:.4}", lat.p90_ms),
                format!("{:.4}", lat.p95_ms),
                format!("{:.4}", lat.p99_ms),
                format!("{:.4}", lat.p999_ms),
                format!("{:.4}", lat.max_ms),
                l.error_count.to_string(),
                l.stable.to_string(),
                opt(l.send_lag.map(|g| g.mean_ms)),
                opt(l.send_lag.map(|g| g.p99_ms)),
                opt(l.server.map(|s| s.queue_ms)),
                opt(l.server.map(|s| s.compute_ms)),
                opt(l.server.map(|s| s.avg_batch_size)),
                kinds.join(";"),
            ];
            out.push_str(&row.join(","));
            out.push('\n');
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<(), LoadError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| LoadError::InvalidArgument(e.to_string()))?;
        write(path, text.as_bytes())
    }

    pub fn write_csv(&self, path: &Path) -> Result<(), LoadError> {
        write(path, self.csv().as_bytes())
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| LoadError::io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| LoadError::io(path, e))
}
