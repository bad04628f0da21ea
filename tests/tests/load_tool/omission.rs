//! Coordinated omission: open loop shows the queueing that closed loop hides.

use super::*;

// ---------------------------------------------------------------------------------------
// Coordinated omission

/// Answers at once, except every 10th request, which waits 50 ms.
async fn stalling_server() -> anyhow::Result<Stub> {
    let count = Arc::new(AtomicU64::new(0));
    Stub::start(move |_req| {
        let n = count.fetch_add(1, Ordering::Relaxed);
        async move {
            if n % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            respond(StatusCode::OK, "ok")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sees_the_queueing_closed_loop_hides() -> anyhow::Result<()> {
    let _alone = EXCLUSIVE.write().await;
    let timing = Timing {
        warmup: Duration::from_millis(300),
        window: Duration::from_secs(1),
        stable_windows: 3,
        stability: 0.10,
        max_windows: 3,
        max_requests: None,
    };

    let stub = stalling_server().await?;
    let mut config = LoadConfig::new(stub.url("/"), Mode::Closed { concurrency: vec![1] });
    config.timing = timing.clone();
    config.percentile = Some(75.0);
    let closed_report = load(&config).await?;
    let closed_level = only(&closed_report)?;
    drop(stub);

    let stub = stalling_server().await?;
    let mut config = LoadConfig::new(stub.url("/"), Mode::Open { rates: vec![100.0], arrival: Arrival::Constant });
    config.connections = Some(1);
    config.timing = timing;
    config.percentile = Some(75.0);
    let open_report = load(&config).await?;
    let open_level = only(&open_report)?;

    let summary = format!("closed loop: {closed_level:#?}\nopen loop: {open_level:#?}");
    ensure_clean(closed_level, "closed loop")?;
    ensure_clean(open_level, "open loop")?;
    ensure!(closed_report.metric == "p75" && open_report.metric == "p75", "{summary}");
    ensure!(open_level.duration_s >= 2.5 && closed_level.duration_s >= 2.5, "~3 s measured each: {summary}");
    ensure!(open_level.connections == 1, "{summary}");
    // The stalled requests themselves show up either way…
    ensure!(closed_level.latency.p99_ms >= 40.0, "closed-loop p99 misses the stalls: {summary}");
    ensure!(open_level.latency.p99_ms >= 40.0, "open-loop p99 misses the stalls: {summary}");
    // …but only the open loop charges the requests queued behind a stall for their wait.
    ensure!(closed_level.metric_ms < 5.0, "closed-loop p75 should be a fast answer: {summary}");
    ensure!(open_level.metric_ms >= 10.0, "open-loop p75 should include queueing: {summary}");
    ensure!(open_level.latency.mean_ms >= 2.0 * closed_level.latency.mean_ms, "open-loop mean too low: {summary}");
    ensure!((80.0..=120.0).contains(&open_level.throughput_rps), "open loop off its rate: {summary}");
    Ok(())
}
