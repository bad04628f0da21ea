//! `kiln bench`: a load generator for HTTP inference servers.
//!
//! Closed loop (a fixed number of requests in flight, swept like perf_analyzer's
//! `--concurrency-range`) or open loop (a constant or Poisson request rate, latencies
//! measured from each request's intended send time as wrk2 does), over HTTP/1.1 or
//! HTTP/2, with or without TLS. Each level runs a warm-up, then fixed windows until the
//! last few agree (perf_analyzer's stability rule) or a window/request cap is reached.

mod args;
mod client;
mod driver;
mod h1;
mod level;
mod payload;
mod plot;
mod report;
mod scrape;
mod stats;
mod ticker;
mod v2;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use args::{BenchArgs, parse_duration, parse_levels};
pub use client::TlsOptions;
pub use driver::Arrival;
pub use payload::{PayloadKind, PayloadSpec, Target};
pub use plot::plot;
pub use report::{LevelReport, Report};
pub use scrape::ServerSide;
pub use stats::{Latency, SendLag};

/// What `kiln bench` reports instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Fetch(String),
    #[error("could not start the load generator: {0}")]
    Runtime(std::io::Error),
    #[error("could not draw the plot: {0}")]
    Plot(String),
}

impl LoadError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// Closed or open loop, with the levels to sweep.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Requests in flight, one level per value.
    Closed { concurrency: Vec<usize> },
    /// Requests per second, one level per value.
    Open { rates: Vec<f64>, arrival: Arrival },
}

/// How long each level runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Not measured: connections open, caches and batchers settle.
    pub warmup: Duration,
    /// Length of one measurement window.
    pub window: Duration,
    /// A level is stable when this many consecutive windows agree…
    pub stable_windows: usize,
    /// …within this fraction of their mean (throughput and the latency metric).
    pub stability: f64,
    /// Give up on stability after this many windows (the level is reported as unstable).
    pub max_windows: usize,
    /// End the level once this many requests were measured.
    pub max_requests: Option<u64>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            warmup: Duration::from_secs(1),
            window: Duration::from_secs(1),
            stable_windows: 3,
            stability: 0.10,
            max_windows: 10,
            max_requests: None,
        }
    }
}

/// Everything one `kiln bench` run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub mode: Mode,
    pub http2: bool,
    /// Connections: HTTP/2 closed loop spreads the concurrency over them; open loop
    /// spreads the rate. HTTP/1.1 closed loop uses one per request in flight.
    pub connections: Option<usize>,
    /// Open loop over HTTP/2: most streams in flight per connection.
    pub max_streams: usize,
    pub threads: Option<usize>,
    pub timing: Timing,
    /// Stability and the latency target use this percentile, or the mean when `None`.
    pub percentile: Option<f64>,
    /// A sweep stops at the first level whose latency metric exceeds this.
    pub latency_target: Option<Duration>,
    pub timeout: Duration,
    pub tls: TlsOptions,
    /// Scrape the server's `/metrics` around each level for queue/compute time and batch size.
    pub server_metrics: bool,
    /// Draw a live progress line on stderr (only when it is a terminal).
    pub progress: bool,
    pub payload: PayloadSpec,
}

impl LoadConfig {
    pub fn new(url: impl Into<String>, mode: Mode) -> Self {
        Self {
            url: url.into(),
            mode,
            http2: false,
            connections: None,
            max_streams: 128,
            threads: None,
            timing: Timing::default(),
            percentile: None,
            latency_target: None,
            timeout: Duration::from_secs(10),
            tls: TlsOptions::default(),
            server_metrics: false,
            progress: false,
            payload: PayloadSpec::default(),
        }
    }
}

/// Runs every level of `config` against its target and returns the report.
pub fn run(config: &LoadConfig) -> Result<Report, LoadError> {
    validate(config)?;
    let target = Target::parse(&config.url)?;
    let connect_timeout = config.timeout.min(Duration::from_secs(5));
    let connector = client::Connector::new(&target, config.http2, &config.tls, connect_timeout)?;
    let helper = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(LoadError::Runtime)?;
    let mut headers = http::HeaderMap::new();
    for (k, v) in &config.payload.headers {
        headers.append(k.clone(), v.clone());
    }
    // Metadata and /metrics go over HTTP/1.1 whatever the load uses.
    let plain = client::Connector::new(&target, false, &config.tls, connect_timeout)?;
    let fetch = |path: &str| helper.block_on(client::fetch(&plain, &target, path, &headers));
    let workload = Arc::new(payload::Workload::prepare(&config.payload, &target, &fetch)?);
    let scrape = |model: Option<&str>| -> Result<scrape::Sample, LoadError> {
        let text = fetch("/metrics")?;
        Ok(scrape::Sample::parse(&String::from_utf8_lossy(&text), model))
    };
    let scraper: level::Scraper<'_> = if config.server_metrics { Some(&scrape) } else { None };

    let mut levels = Vec::new();
    for spec in level::plans(config) {
        let result = level::run(config, &connector, &workload, &spec, scraper)?;
        let over = config.latency_target.is_some_and(|t| result.metric_ms > t.as_secs_f64() * 1000.0);
        levels.push(result);
        if over {
            break;
        }
    }
    Ok(report::build(config, &target, &workload, levels))
}

fn validate(config: &LoadConfig) -> Result<(), LoadError> {
    let bad = |m: &str| Err(LoadError::InvalidArgument(m.into()));
    match &config.mode {
        Mode::Closed { concurrency } if concurrency.is_empty() || concurrency.contains(&0) => {
            return bad("concurrency levels must be at least 1");
        }
        Mode::Open { rates, .. } if rates.is_empty() || rates.iter().any(|r| !r.is_finite() || *r <= 0.0) => {
            return bad("request rates must be positive");
        }
        _ => {}
    }
    if config.connections == Some(0) || config.threads == Some(0) || config.max_streams == 0 {
        return bad("--connections, --threads and --streams must be at least 1");
    }
    if let (Mode::Closed { .. }, false, Some(_)) = (&config.mode, config.http2, config.connections) {
        return bad("over HTTP/1.1 in closed loop the connection count is the concurrency; drop --connections");
    }
    let t = &config.timing;
    if t.window.is_zero() || t.max_windows == 0 || t.stable_windows == 0 {
        return bad("--window, --max-windows and --stable-windows must be positive");
    }
    if !(0.0..=1.0).contains(&t.stability) {
        return bad("--stability is a percentage between 0 and 100");
    }
    if config.percentile.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
        return bad("--percentile must lie between 0 and 100");
    }
    if config.timeout.is_zero() {
        return bad("--timeout must be positive");
    }
    Ok(())
}
