mod build;
mod int8;
mod perf;
mod perf_table;
mod trt;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kiln_bench::load::BenchArgs;
use kiln_server::{BackendKind, Limits, Server, ServerConfig, TlsFiles};

/// kiln: a high-performance deep-learning inference server.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve every model of a model repository over HTTP/1.1 and HTTP/2 (h2c).
    Serve(Box<ServeArgs>),
    /// Load-test an HTTP endpoint: closed-loop concurrency or open-loop rate sweeps, HTTP/1.1
    /// or HTTP/2, latency percentiles corrected for coordinated omission.
    Bench(Box<BenchArgs>),
    /// Build an optimised engine plan from an ONNX model (like trtexec): folding, fusion,
    /// FP16 assignment, memory planning; `--verify` checks it against ONNX Runtime.
    Build(Box<build::BuildArgs>),
    /// Summarise an ONNX model or a kiln plan: inputs, outputs, op counts, weights.
    Inspect(build::InspectArgs),
    /// Measure a plan on the CUDA engine (like trtexec's run half): throughput, latency
    /// percentiles and the H2D / compute / D2H split per batch size, over several streams.
    Perf(Box<perf::PerfArgs>),
    /// Report which ONNX Runtime execution providers (TensorRT, CUDA, CPU) can run here,
    /// and for each one that cannot, the missing libraries and what to install.
    Providers(trt::ProvidersArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KILN_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on; 0 picks a free port and prints it.
    #[arg(long, env = "KILN_PORT", default_value_t = 8000)]
    port: u16,
    /// Directory with one sub-directory per model (`<name>/config.toml`, `<name>/<version>/model.onnx`).
    #[arg(long, env = "KILN_MODEL_REPOSITORY", default_value = "models")]
    model_repository: PathBuf,
    /// Model used when a request names none (`?model=NAME`); defaults to the only model, if there is one.
    #[arg(long, env = "KILN_DEFAULT_MODEL")]
    default_model: Option<String>,
    /// Path of the ONNX Runtime shared library (`make setup` installs one here).
    #[arg(long, env = "KILN_ORT_LIBRARY", default_value = ".kiln/lib/libonnxruntime.so")]
    ort_library: PathBuf,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "KILN_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Most files accepted by one `/predict/batch` request.
    #[arg(long, env = "KILN_MAX_BATCH_FILES", default_value_t = 64)]
    max_batch_files: usize,
    /// Largest tensor, in elements, a KServe v2 request may declare.
    #[arg(long, env = "KILN_MAX_TENSOR_ELEMENTS", default_value_t = 16 << 20)]
    max_tensor_elements: usize,
    /// Require `Authorization: Bearer <token>` on every endpoint but health and metrics.
    /// Prefer the environment variable: flags show up in process listings.
    #[arg(long, env = "KILN_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Enables `POST /v2/repository/models/{name}/load|unload`, guarded by this token.
    #[arg(long, env = "KILN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// PEM certificate chain: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN). Needs --tls-key.
    #[arg(long, env = "KILN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most open connections; more are closed on accept.
    #[arg(long, env = "KILN_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Serve every model with this backend instead of its config's: `cuda` runs kiln's CUDA
    /// engine (the version's model.plan, or an FP16 plan built from model.onnx at load);
    /// `tensorrt` and `ort-cuda` ONNX Runtime's GPU providers (configured by each model's
    /// [tensorrt] / [ort_cuda] tables; its `fallback` list still applies).
    #[arg(long, env = "KILN_BACKEND", value_parser = ["cpu", "onnxruntime", "cuda", "tensorrt", "ort-cuda"])]
    backend: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(*args))
        }
        Command::Bench(args) => {
            let report = args.execute().context("kiln bench failed")?;
            // A run in which nothing succeeded is a failure for scripts that check the status.
            anyhow::ensure!(report.levels.iter().any(|l| l.requests > 0), "no request succeeded");
            Ok(())
        }
        Command::Build(args) => build::build(&args),
        Command::Inspect(args) => build::inspect(&args),
        Command::Perf(args) => perf::perf(&args),
        Command::Providers(args) => trt::providers(&args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = ServerConfig::new(SocketAddr::new(args.host, args.port), args.model_repository, args.ort_library);
    config.backend = args.backend.as_deref().and_then(BackendKind::parse);
    config.default_model = args.default_model;
    config.limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_batch_files: args.max_batch_files,
        max_tensor_elements: args.max_tensor_elements,
        max_connections: args.max_connections.max(1),
        ..Limits::default()
    };
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsFiles { cert, key });
    }
    config.auth.inference_token = args.auth_token.filter(|t| !t.is_empty());
    config.auth.admin_token = args.admin_token.filter(|t| !t.is_empty());
    let server = Server::bind(config).await.context("kiln serve could not start")?;
    let addr = server.local_addr()?;
    let scheme = if server.is_tls() { "https" } else { "http" };
    // Scripts and tests read this line to find the port when --port 0 was given.
    println!("kiln listening on {scheme}://{addr}");
    std::io::stdout().flush()?;
    server.serve(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
