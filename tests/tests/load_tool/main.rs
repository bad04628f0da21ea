//! `kiln bench`'s load generator (`kiln_bench::load`) end to end: closed and open loop over
//! HTTP/1.1 and HTTP/2 against real kiln servers (image and KServe payloads, answers
//! checked), the JSON/CSV/plot outputs, error counting against tiny misbehaving servers
//! written here, coordinated-omission correction, and argument errors.
//!
//! Every level is short (a few hundred milliseconds) so that the file runs in seconds on a
//! 2-core CI machine. The timing-sensitive coordinated-omission test runs alone: it takes
//! [`EXCLUSIVE`] for writing while every other test that generates load takes it for reading.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_bench::load::{
    Arrival, LevelReport, LoadConfig, LoadError, Mode, PayloadKind, PayloadSpec, Report, Timing, TlsOptions, plot, run,
};
use kiln_server::TlsFiles;
use kiln_tests::{TempDir, TestServer, default_config, photo, test_models_config};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{RwLock, RwLockReadGuard};

/// Taken for writing by the timing-sensitive test, for reading by every other load test.
static EXCLUSIVE: LazyLock<RwLock<()>> = LazyLock::new(|| RwLock::new(()));

async fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().await
}

/// A short level: 200 ms warm-up, then `windows` windows of `window_ms` (fewer if the
/// last two agree within 10 %).
fn short(window_ms: u64, windows: usize) -> Timing {
    Timing {
        warmup: Duration::from_millis(200),
        window: Duration::from_millis(window_ms),
        stable_windows: 2,
        stability: 0.10,
        max_windows: windows,
        max_requests: None,
    }
}

fn closed(url: &str, concurrency: usize, http2: bool) -> LoadConfig {
    let mut config = LoadConfig::new(url, Mode::Closed { concurrency: vec![concurrency] });
    config.http2 = http2;
    config.timing = short(300, 2);
    config
}

/// Runs the load generator off the async workers (it blocks and spawns its own threads).
/// A plain thread rather than `spawn_blocking`: a run that hangs fails the test after a
/// minute instead of blocking the runtime's shutdown for ever.
async fn try_load(config: &LoadConfig) -> anyhow::Result<Result<Report, LoadError>> {
    let config = config.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("load-run".into()).spawn(move || {
        let _ = tx.send(run(&config));
    })?;
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .context("kiln_bench::load::run hung")?
        .context("kiln_bench::load::run panicked")
}

async fn load(config: &LoadConfig) -> anyhow::Result<Report> {
    try_load(config).await?.with_context(|| format!("run failed for {}", config.url))
}

/// The only level of a one-level run.
fn only(report: &Report) -> anyhow::Result<&LevelReport> {
    ensure!(report.levels.len() == 1, "expected one level, got {:#?}", report.levels);
    report.levels.first().context("no level")
}

fn error(level: &LevelReport, kind: &str) -> u64 {
    level.errors.get(kind).copied().unwrap_or(0)
}

/// A clean level: something succeeded and nothing failed.
fn ensure_clean(level: &LevelReport, what: &str) -> anyhow::Result<()> {
    ensure!(level.requests > 0, "{what}: no request succeeded: {level:#?}");
    ensure!(level.error_count == 0 && level.errors.is_empty(), "{what}: errors: {level:#?}");
    ensure!(level.throughput_rps > 0.0 && level.duration_s > 0.0, "{what}: {level:#?}");
    let lat = &level.latency;
    ensure!(lat.p50_ms > 0.0 && lat.p50_ms <= lat.p99_ms && lat.p99_ms <= lat.max_ms, "{what}: {lat:?}");
    Ok(())
}

/// A folder of sample photos, each `(label, photo)` written to `<dir>/<label>/<photo>`.
fn image_dir(tag: &str, layout: &[(&str, &str)]) -> anyhow::Result<TempDir> {
    let dir = TempDir::new(tag)?;
    for (label, name) in layout {
        let sub = dir.path(label);
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(name), photo(name)?)?;
    }
    Ok(dir)
}

fn predict(url: &str, kind: PayloadKind, images: &Path, http2: bool) -> LoadConfig {
    let mut config = closed(url, 2, http2);
    config.payload = PayloadSpec { kind, images: Some(images.to_path_buf()), check_labels: true, ..Default::default() };
    config
}

// ---------------------------------------------------------------------------------------
// Tiny servers

/// An HTTP/1.1 + h2c server on 127.0.0.1 answering with `handler`; stops accepting on drop.
#[derive(Debug)]
struct Stub {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    async fn start<F, Fut>(handler: F) -> anyhow::Result<Self>
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, accepted, task })
    }

    /// A server that accepts and reads every connection but never answers.
    async fn silent() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        Ok(Self { addr, accepted, task })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// A loopback port on which nothing listens (bound by the OS, then released).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

mod errors;
mod omission;
mod payloads;
