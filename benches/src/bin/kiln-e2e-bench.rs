//! End-to-end benchmark for the default model: in-process engine throughput at fixed
//! batch sizes, then `/predict` over HTTP/1.1 at several concurrencies with batching on
//! and off. Prints a table and writes JSON. Load goes to loopback only and every phase
//! is bounded in time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use hdrhistogram::Histogram;
use kiln_engine::{Backend, OrtBackend, OrtOptions, OrtRuntime, Tensor, TensorData};
use kiln_server::{Server, ServerConfig};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Engine and end-to-end HTTP benchmark for the default model")]
struct Args {
    /// Model repository holding efficientnet_lite0 (imported by `make setup`).
    #[arg(long, default_value = "models")]
    model_repository: PathBuf,
    #[arg(long, env = "KILN_ORT_LIBRARY", default_value = ".kiln/lib/libonnxruntime.so")]
    ort_library: PathBuf,
    /// Image posted to /predict.
    #[arg(long, default_value = ".kiln/assets/flower.jpg")]
    image: PathBuf,
    /// Seconds measured per phase (after a warm-up of a quarter of that).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "out/bench-e2e.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct EngineRow {
    batch: usize,
    images_per_s: f64,
    ms_per_batch: f64,
}

#[derive(Debug, Serialize)]
struct HttpRow {
    batching: bool,
    concurrency: usize,
    requests: u64,
    errors: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    model: &'static str,
    engine: Vec<EngineRow>,
    http: Vec<HttpRow>,
}

const MODEL: &str = "efficientnet_lite0";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let phase = Duration::from_secs_f64(args.seconds);
    let engine = bench_engine(&args, phase)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let http = runtime.block_on(bench_http(&args, phase))?;
    let report = Report { machine: kiln_bench::machine(), model: MODEL, engine, http };
    print_table(&report);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)?;
    println!("\nwrote {}", args.out.display());
    Ok(())
}

fn bench_engine(args: &Args, phase: Duration) -> anyhow::Result<Vec<EngineRow>> {
    let runtime = OrtRuntime::load(&args.ort_library)?;
    let model = args.model_repository.join(MODEL).join("1/model.onnx");
    let mut backend = OrtBackend::load(&runtime, &model, &OrtOptions::default())?;
    let mut rows = Vec::new();
    for batch in [1usize, 8] {
        let len = batch * 3 * 224 * 224;
        // Values do not change the work a CNN does; a smooth ramp avoids denormals.
        let data: Vec<f32> = (0..len).map(|i| ((i % 255) as f32 - 127.0) / 128.0).collect();
        let input = [Tensor::new(vec![batch, 3, 224, 224], TensorData::F32(data))?];
        let warm = Instant::now();
        while warm.elapsed() < phase / 4 {
            backend.run(&input)?;
        }
        let (start, mut runs) = (Instant::now(), 0u64);
        while start.elapsed() < phase {
            backend.run(&input)?;
            runs += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        rows.push(EngineRow {
            batch,
            images_per_s: (runs as f64 * batch as f64) / secs,
            ms_per_batch: secs * 1e3 / runs as f64,
        });
        eprintln!("engine batch {batch}: {:.1} img/s", rows.last().map_or(0.0, |r| r.images_per_s));
    }
    Ok(rows)
}

/// A throwaway repository whose config differs only in `max_batch_size`; the model
/// files are symlinked, not copied.
fn repository_with_batch(source: &Path, max_batch: usize) -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("kiln-bench-{}-{max_batch}", std::process::id()));
    let dir = root.join(MODEL);
    std::fs::create_dir_all(&dir)?;
    let src = std::fs::canonicalize(source.join(MODEL))?;
    let config = std::fs::read_to_string(src.join("config.toml"))?;
    ensure!(config.contains("max_batch_size = "), "unexpected config layout");
    let config: String = config
        .lines()
        .map(|l| if l.starts_with("max_batch_size") { format!("max_batch_size = {max_batch}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("config.toml"), config)?;
    for entry in ["1", "labels.txt"] {
        let link = dir.join(entry);
        if !link.exists() {
            std::os::unix::fs::symlink(src.join(entry), &link)?;
        }
    }
    Ok(root)
}

async fn bench_http(args: &Args, phase: Duration) -> anyhow::Result<Vec<HttpRow>> {
    let image = std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let mut rows = Vec::new();
    for batching in [true, false] {
        let repo = repository_with_batch(&args.model_repository, if batching { 8 } else { 1 })?;
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let server = Server::bind(ServerConfig::new(addr, &repo, &args.ort_library)).await?;
        let url = format!("http://{}/predict", server.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        for concurrency in [1usize, 16] {
            let row = load(&url, &image, concurrency, phase, batching).await?;
            eprintln!("http batching={batching} c={concurrency}: {:.1} req/s", row.requests_per_s);
            rows.push(row);
        }
        let _ = stop.send(());
        task.await??;
        std::fs::remove_dir_all(&repo)?;
    }
    Ok(rows)
}

/// Closed-loop load: `concurrency` workers, each with its own keep-alive connection.
async fn load(url: &str, image: &[u8], concurrency: usize, phase: Duration, batching: bool) -> anyhow::Result<HttpRow> {
    let image = Arc::new(image.to_vec());
    let warm_until = Instant::now() + phase / 4;
    let end = warm_until + phase;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (url, image) = (url.to_string(), Arc::clone(&image));
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().http1_only().pool_max_idle_per_host(1).build()?;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let part = reqwest::multipart::Part::bytes(image.as_ref().clone()).file_name("image.jpg");
                let form = reqwest::multipart::Form::new().part("file", part);
                let ok = match client.post(&url).multipart(form).send().await {
                    Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if sent < warm_until {
                    continue;
                }
                if ok {
                    hist.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1))?;
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((hist, errors))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for w in workers {
        let (hist, e) = w.await??;
        total.add(&hist)?;
        errors += e;
    }
    Ok(HttpRow {
        batching,
        concurrency,
        requests: total.len(),
        errors,
        requests_per_s: total.len() as f64 / phase.as_secs_f64(),
        p50_ms: total.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: total.value_at_quantile(0.99) as f64 / 1e3,
    })
}

fn print_table(report: &Report) {
    println!("\nmachine: {}\nmodel: {}\n", report.machine, report.model);
    println!("| engine (in-process, ONNX Runtime CPU) | img/s | ms/batch |");
    println!("|---|---:|---:|");
    for r in &report.engine {
        println!("| batch {} | {:.1} | {:.2} |", r.batch, r.images_per_s, r.ms_per_batch);
    }
    println!("\n| /predict over HTTP/1.1 | concurrency | req/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &report.http {
        let mode = if r.batching { "batching on (max 8, 2 ms)" } else { "batching off (max 1)" };
        println!(
            "| {mode} | {} | {:.1} | {:.2} | {:.2} | {} |",
            r.concurrency, r.requests_per_s, r.p50_ms, r.p99_ms, r.errors
        );
    }
}
