//! A trivial HTTP endpoint for load-generator benchmarks: every request, whatever its
//! method or path, gets `200 OK` with the 2-byte body `ok`. HTTP/1.1 and HTTP/2 (h2c,
//! prior knowledge) share one port through hyper-util's auto builder, as in kiln itself,
//! but nothing else of kiln runs, so the server costs as little as hyper allows.
//!
//! `--port 0` lets the OS pick a port; the address is printed on stdout as
//! `listening on http://ADDR`. The process exits on SIGTERM or ctrl-c.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "Trivial HTTP/1.1 + h2c server answering 200 \"ok\" to everything (load-generator benchmarks)")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on (0: the OS picks one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(SocketAddr::new(args.host, args.port)))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().context("no local address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{local}").context("cannot write to stdout")?;
        out.flush().context("cannot flush stdout")?;
    }

    let builder = auto::Builder::new(TokioExecutor::new());
    let accept = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(answer);
                // Clients closing their connections mid-request is normal at the end of a run.
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });

    shutdown_signal().await?;
    accept.abort();
    Ok(())
}

async fn answer(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// Resolves on SIGTERM (Unix) or ctrl-c.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot watch ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("cannot watch ctrl-c")?;
    Ok(())
}
