//! `kiln bench`'s command line, and turning it into a [`LoadConfig`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use http::{HeaderName, HeaderValue};

use super::{Arrival, LoadConfig, LoadError, Mode, PayloadKind, PayloadSpec, Report, Timing, TlsOptions, plot, run};

/// Load-test an HTTP inference endpoint (closed or open loop, HTTP/1.1 or HTTP/2).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Target URL, e.g. http://127.0.0.1:8000 (the payload picks the path unless the URL names one).
    pub url: String,
    /// What each request carries.
    #[arg(long, value_enum, default_value = "get")]
    pub payload: PayloadKind,
    /// Folder of .jpg/.png images for predict payloads (sub-folder names are the labels for --check-labels).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Images per /predict/batch request.
    #[arg(long, default_value_t = 4)]
    pub batch_files: usize,
    /// Model name: `?model=` for /predict, the KServe route for v2 payloads, the /metrics filter.
    #[arg(long)]
    pub model: Option<String>,
    /// Batch size given to a dynamic leading dimension of KServe inputs.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// KServe v2 JSON request whose tensors are sent (instead of random data of the model's shape).
    #[arg(long)]
    pub tensors: Option<PathBuf>,
    /// Request body for --payload post.
    #[arg(long)]
    pub body: Option<PathBuf>,
    /// Content-Type for --payload post.
    #[arg(long, default_value = "application/octet-stream")]
    pub content_type: String,
    /// Check each answer: /predict labels against the image's folder name, KServe answers for outputs.
    #[arg(long)]
    pub check_labels: bool,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Closed loop: requests in flight, a list or a sweep: 8 | 1,4,16 | 1:64:x2 | 4:32:+4.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<String>,
    /// Open loop: requests per second, a list or a sweep (as for --concurrency).
    #[arg(long)]
    pub rate: Option<String>,
    /// Open-loop arrivals.
    #[arg(long, value_enum, default_value = "constant")]
    pub arrival: Arrival,
    /// HTTP/2 (prior knowledge on http://, ALPN on https://).
    #[arg(long)]
    pub http2: bool,
    /// Connections (HTTP/2 closed loop: the concurrency is spread over them; open loop: the rate is).
    #[arg(long)]
    pub connections: Option<usize>,
    /// Open loop over HTTP/2: most streams in flight per connection.
    #[arg(long, default_value_t = 128)]
    pub streams: usize,
    /// Client threads (default: one per core, at most one per connection).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Unmeasured time at the start of each level.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Measurement window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub window: Duration,
    /// Consecutive windows that must agree for a level to be stable.
    #[arg(long, default_value_t = 3)]
    pub stable_windows: usize,
    /// Tolerance, in percent of their mean, within which those windows must agree.
    #[arg(long, default_value_t = 10.0)]
    pub stability: f64,
    /// Most windows per level before it is reported as unstable.
    #[arg(long, default_value_t = 10)]
    pub max_windows: usize,
    /// End each level after this many measured requests.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Judge stability and --latency-target on this percentile (default: the mean).
    #[arg(long)]
    pub percentile: Option<f64>,
    /// Stop a sweep at the first level whose latency exceeds this, and report the knee.
    #[arg(long, value_parser = parse_duration)]
    pub latency_target: Option<Duration>,
    /// A request without a complete answer by then counts as a timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// PEM certificates to trust for https:// (default: the system's).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Accept any server certificate (self-signed test servers only).
    #[arg(long)]
    pub insecure: bool,
    /// Scrape the server's /metrics around each level: server-side queue and compute time, batch size.
    #[arg(long)]
    pub server_metrics: bool,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write one CSV row per level.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Plot latency percentiles against throughput (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// TrueType font for --plot.
    #[arg(long)]
    pub font: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

impl BenchArgs {
    pub fn to_config(&self) -> Result<LoadConfig, LoadError> {
        let mode = match (&self.concurrency, &self.rate) {
            (_, Some(rates)) => Mode::Open { rates: parse_levels(rates)?, arrival: self.arrival },
            (Some(c), None) => Mode::Closed { concurrency: to_counts(parse_levels(c)?)? },
            (None, None) => Mode::Closed { concurrency: vec![1] },
        };
        let headers = self.headers.iter().map(|h| parse_header(h)).collect::<Result<Vec<_>, _>>()?;
        let mut config = LoadConfig::new(self.url.clone(), mode);
        config.http2 = self.http2;
        config.connections = self.connections;
        config.max_streams = self.streams;
        config.threads = self.threads;
        config.timing = Timing {
            warmup: self.warmup,
            window: self.window,
            stable_windows: self.stable_windows,
            stability: self.stability / 100.0,
            max_windows: self.max_windows,
            max_requests: self.max_requests,
        };
        config.percentile = self.percentile;
        config.latency_target = self.latency_target;
        config.timeout = self.timeout;
        config.tls = TlsOptions { cacert: self.cacert.clone(), insecure: self.insecure };
        config.server_metrics = self.server_metrics;
        config.progress = !self.quiet && std::io::stderr().is_terminal();
        config.payload = PayloadSpec {
            kind: self.payload,
            images: self.images.clone(),
            batch_files: self.batch_files,
            model: self.model.clone(),
            batch: self.batch,
            tensors: self.tensors.clone(),
            body: self.body.clone(),
            content_type: self.content_type.clone(),
            check_labels: self.check_labels,
            headers,
        };
        Ok(config)
    }

    /// Runs the benchmark, prints the table and writes the requested files.
    pub fn execute(&self) -> Result<Report, LoadError> {
        let config = self.to_config()?;
        let report = run(&config)?;
        print!("{}", report.table());
        if let Some(p) = &self.json {
            report.write_json(p)?;
        }
        if let Some(p) = &self.csv {
            report.write_csv(p)?;
        }
        if let Some(p) = &self.plot {
            plot(&report, p, self.font.as_deref())?;
        }
        Ok(report)
    }
}

fn parse_header(h: &str) -> Result<(HeaderName, HeaderValue), LoadError> {
    let bad = || LoadError::InvalidArgument(format!("bad header '{h}': expected \"Name: value\""));
    let (name, value) = h.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

fn to_counts(levels: Vec<f64>) -> Result<Vec<usize>, LoadError> {
    levels
        .into_iter()
        .map(|v| {
            if v >= 1.0 && v.fract() == 0.0 && v <= 1e6 {
                Ok(v as usize)
            } else {
                Err(LoadError::InvalidArgument(format!("concurrency {v} is not a whole number from 1 to 1000000")))
            }
        })
        .collect()
}

/// Levels: `8`, `1,4,16`, `START:END:xFACTOR` (geometric) or `START:END:+STEP` / `START:END:STEP` (linear).
pub fn parse_levels(text: &str) -> Result<Vec<f64>, LoadError> {
    let bad = |why: &str| LoadError::InvalidArgument(format!("bad levels '{text}': {why}"));
    let num = |s: &str| {
        s.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| bad("not a positive number"))
    };
    let parts: Vec<&str> = text.split(':').collect();
    let levels = match parts.as_slice() {
        [list] => list.split(',').map(num).collect::<Result<Vec<_>, _>>()?,
        [start, end, step] => {
            let (start, end) = (num(start)?, num(end)?);
            if end < start {
                return Err(bad("the end is below the start"));
            }
            let step = step.trim();
            let next: Box<dyn Fn(f64) -> f64> = if let Some(f) = step.strip_prefix('x') {
                let f = num(f)?;
                if f <= 1.0 {
                    return Err(bad("the factor must exceed 1"));
                }
                Box::new(move |v| v * f)
            } else {
                let s = num(step.strip_prefix('+').unwrap_or(step))?;
                Box::new(move |v| v + s)
            };
            let mut levels = vec![start];
            let mut v = next(start);
            while v <= end * (1.0 + 1e-9) {
                levels.push(v);
                if levels.len() > 1000 {
                    return Err(bad("more than 1000 levels"));
                }
                v = next(v);
            }
            levels
        }
        _ => return Err(bad("expected N, a comma list, or START:END:STEP")),
    };
    Ok(levels)
}

/// `250us`, `20ms`, `1.5s`, `2m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, LoadError> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (value, unit) = t.split_at(split);
    let bad = || LoadError::InvalidArgument(format!("bad duration '{text}': use e.g. 500ms, 2s, 1m"));
    let value: f64 = value.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_as_lists_and_sweeps() -> Result<(), LoadError> {
        assert_eq!(parse_levels("8")?, vec![8.0]);
        assert_eq!(parse_levels("1,4,16")?, vec![1.0, 4.0, 16.0]);
        assert_eq!(parse_levels("1:64:x2")?, vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        assert_eq!(parse_levels("100:400:+100")?, vec![100.0, 200.0, 300.0, 400.0]);
        assert_eq!(parse_levels("4:10:3")?, vec![4.0, 7.0, 10.0]);
        for bad in ["", "0", "8:4:+1", "1:8:x1", "1:8", "a", "1:100000:+0.01"] {
            assert!(parse_levels(bad).is_err(), "{bad} should be refused");
        }
        assert!(to_counts(vec![1.5]).is_err());
        Ok(())
    }

    #[test]
    fn durations_take_units() -> Result<(), LoadError> {
        assert_eq!(parse_duration("250us")?, Duration::from_micros(250));
        assert_eq!(parse_duration("20ms")?, Duration::from_millis(20));
        assert_eq!(parse_duration("1.5s")?, Duration::from_millis(1500));
        assert_eq!(parse_duration("2")?, Duration::from_secs(2));
        assert_eq!(parse_duration("1m")?, Duration::from_secs(60));
        assert!(parse_duration("5h").is_err() && parse_duration("ms").is_err() && parse_duration("-1s").is_err());
        Ok(())
    }

    #[test]
    fn headers_need_a_name_and_a_value() -> Result<(), LoadError> {
        let (k, v) = parse_header("Authorization: Bearer abc")?;
        assert_eq!((k.as_str(), v.to_str().unwrap_or_default()), ("authorization", "Bearer abc"));
        assert!(parse_header("no colon").is_err() && parse_header("bad name: x").is_err());
        Ok(())
    }
}
