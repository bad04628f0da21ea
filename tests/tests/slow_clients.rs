//! A client that sends its headers and then trickles (or stalls) its body gets 408 once
//! the body deadline passes, and other clients are served meanwhile.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kiln_tests::{TestServer, test_models_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_body_gets_408_and_others_are_served() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.limits.body_read_timeout = Duration::from_millis(500);
    let server = TestServer::start(config).await?;

    let mut slow = tokio::net::TcpStream::connect(server.addr).await?;
    let head = "POST /v2/models/add_sub/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n{\"inputs\":";
    slow.write_all(head.as_bytes()).await?;
    let started = Instant::now();

    // Meanwhile a normal client is served.
    let ok = reqwest::Client::new().get(server.url("/v2/health/ready")).send().await?;
    ensure!(ok.status() == 200, "concurrent request: {}", ok.status());

    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    ensure!(read.is_ok(), "the server kept the stalled connection open past 10 s");
    let text = String::from_utf8_lossy(&answer);
    ensure!(text.starts_with("HTTP/1.1 408"), "expected 408, got: {text}");
    ensure!(text.contains("\"type\":\"request_timeout\""), "{text}");
    let waited = started.elapsed();
    ensure!(waited >= Duration::from_millis(400), "answered before the deadline: {waited:?}");
    server.shutdown().await.context("shutdown")
}
