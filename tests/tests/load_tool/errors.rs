//! Failures are counted by kind, never raised; bad arguments are errors, not panics.

use super::*;

// ---------------------------------------------------------------------------------------
// Errors are counted, not raised

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_counts_connect_errors() -> anyhow::Result<()> {
    let _guard = shared().await;
    let url = format!("http://127.0.0.1:{}/", free_port()?);
    for http2 in [false, true] {
        let report = load(&closed(&url, 2, http2)).await?;
        let level = only(&report)?;
        ensure!(level.requests == 0 && level.items == 0, "{level:#?}");
        ensure!(error(level, "connect") > 0 && level.errors.len() == 1, "only connect errors expected: {level:#?}");
        ensure!(level.error_count == error(level, "connect"), "{level:#?}");
        ensure!(level.latency.max_ms == 0.0 && level.metric_ms == 0.0, "latency without a success: {level:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_count_by_status() -> anyhow::Result<()> {
    let _guard = shared().await;
    let stub = Stub::start(|_req| async { respond(StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":\"boom\"}") }).await?;
    for http2 in [false, true] {
        let report = load(&closed(&stub.url("/"), 2, http2)).await?;
        let level = only(&report)?;
        ensure!(level.requests == 0, "{level:#?}");
        ensure!(error(level, "http_500") > 0 && level.errors.len() == 1, "only http_500 expected: {level:#?}");
        // An error status leaves the connection usable: no reconnects, so there are many.
        ensure!(error(level, "http_500") > 20, "{level:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_time_out() -> anyhow::Result<()> {
    let _guard = shared().await;
    let stub = Stub::silent().await?;
    for http2 in [false, true] {
        let what = if http2 { "h2" } else { "h1" };
        let mut config = closed(&stub.url("/"), 2, http2);
        config.timeout = Duration::from_millis(200);
        config.timing = short(500, 2);
        let report = load(&config).await?;
        let level = only(&report)?;
        ensure!(level.requests == 0, "{what}: {level:#?}");
        ensure!(error(level, "timeout") > 0 && level.errors.len() == 1, "{what}: only timeouts expected: {level:#?}");
        // 2 lanes, one 200 ms timeout after another: about 10 a second.
        ensure!(level.error_count <= 2 * (level.duration_s / 0.2).ceil() as u64 + 2, "{what}: {level:#?}");
    }
    Ok(())
}

/// An HTTP/1.1 server may close the connection after an answer (`Connection: close`; kiln
/// does so after error answers to requests with a body, hyper whenever a request body was
/// left unread). The tool must reconnect without counting an error for the request it
/// had not sent yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_close_the_connection_add_no_errors() -> anyhow::Result<()> {
    let _guard = shared().await;
    for status in [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE] {
        let stub = Stub::start(move |_req| async move {
            let mut resp = respond(status, "bye");
            resp.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            resp
        })
        .await?;
        for open in [false, true] {
            let mut config = closed(&stub.url("/"), 1, false);
            if open {
                config.mode = Mode::Open { rates: vec![100.0], arrival: Arrival::Constant };
                config.connections = Some(1);
            }
            let what = format!("{status} in {} loop", if open { "open" } else { "closed" });
            let report = load(&config).await?;
            let level = only(&report)?;
            let answered = level.requests + error(level, &format!("http_{}", status.as_u16()));
            ensure!(answered > 0, "{what}: {level:#?}");
            ensure!(error(level, "io") == 0, "{what}: io errors for connections closed after an answer: {level:#?}");
        }
    }
    Ok(())
}

/// Open loop against a server that is down: each request due is one `connect` error —
/// not each reconnection attempt, so the count follows the rate, not the connection count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_against_a_down_server_counts_the_requests_due() -> anyhow::Result<()> {
    let _guard = shared().await;
    let url = format!("http://127.0.0.1:{}/", free_port()?);
    let mut config = LoadConfig::new(url, Mode::Open { rates: vec![20.0], arrival: Arrival::Constant });
    config.timing = short(500, 2);
    let report = load(&config).await?;
    let level = only(&report)?;
    let due = 20.0 * level.duration_s;
    ensure!(level.requests == 0 && error(level, "connect") > 0, "{level:#?}");
    ensure!(
        (level.error_count as f64) <= 1.5 * due + 5.0,
        "{} connect errors for about {due:.0} requests due: {level:#?}",
        level.error_count
    );
    Ok(())
}

/// Answers with a wrong body: label and output checks must call it `bad_body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_missing_the_checked_fields_are_bad_bodies() -> anyhow::Result<()> {
    let _guard = shared().await;
    let stub = Stub::start(|req: Request<Incoming>| async move {
        // Read the body: hyper closes an HTTP/1.1 connection whose request body was left unread.
        let _ = req.into_body().collect().await;
        respond(StatusCode::OK, "{\"status\":\"ok\"}")
    })
    .await?;
    let images = image_dir("badbody", &[("daisy", "flower.jpg")])?;
    let file = images.path("tensors.json");
    std::fs::write(&file, r#"{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#)?;
    let mut v2 = closed(&stub.url("/"), 1, true);
    v2.payload = PayloadSpec {
        kind: PayloadKind::V2Binary,
        model: Some("m".into()),
        tensors: Some(file),
        check_labels: true,
        ..Default::default()
    };
    let cases = [
        ("predict", predict(&stub.url("/"), PayloadKind::Predict, &images.0, false)),
        ("predict-batch", predict(&stub.url("/"), PayloadKind::PredictBatch, &images.0, true)),
        ("v2", v2),
    ];
    for (what, config) in &cases {
        let report = load(config).await?;
        let level = only(&report)?;
        ensure!(level.requests == 0, "{what}: {level:#?}");
        ensure!(error(level, "bad_body") > 0 && level.errors.len() == 1, "{what}: only bad_body expected: {level:#?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Arguments

#[test]
fn bad_arguments_are_errors_not_panics() -> anyhow::Result<()> {
    let url = "http://127.0.0.1:9/";
    let mut cases: Vec<(&str, LoadConfig)> = vec![
        ("concurrency 0", LoadConfig::new(url, Mode::Closed { concurrency: vec![0] })),
        ("no concurrency", LoadConfig::new(url, Mode::Closed { concurrency: vec![] })),
        ("rate 0", LoadConfig::new(url, Mode::Open { rates: vec![0.0], arrival: Arrival::Constant })),
        ("rate NaN", LoadConfig::new(url, Mode::Open { rates: vec![f64::NAN], arrival: Arrival::Poisson })),
        ("ftp URL", LoadConfig::new("ftp://127.0.0.1:21/", Mode::Closed { concurrency: vec![1] })),
        ("no scheme", LoadConfig::new("127.0.0.1:8000", Mode::Closed { concurrency: vec![1] })),
    ];
    let mut predict = LoadConfig::new(url, Mode::Closed { concurrency: vec![1] });
    predict.payload.kind = PayloadKind::Predict;
    cases.push(("predict without images", predict.clone()));
    let empty = TempDir::new("empty")?;
    predict.payload.images = Some(empty.0.clone());
    cases.push(("predict with an empty folder", predict));
    let mut v2 = LoadConfig::new(url, Mode::Closed { concurrency: vec![1] });
    v2.payload.kind = PayloadKind::V2Json;
    cases.push(("v2 without a model", v2));
    let mut post = LoadConfig::new(url, Mode::Closed { concurrency: vec![1] });
    post.payload.kind = PayloadKind::Post;
    cases.push(("post without a body", post));
    let mut conns = LoadConfig::new(url, Mode::Closed { concurrency: vec![2] });
    conns.connections = Some(2);
    cases.push(("connections in closed loop over HTTP/1.1", conns));
    let mut timeout = LoadConfig::new(url, Mode::Closed { concurrency: vec![1] });
    timeout.timeout = Duration::ZERO;
    cases.push(("zero timeout", timeout));
    let mut percentile = LoadConfig::new(url, Mode::Closed { concurrency: vec![1] });
    percentile.percentile = Some(101.0);
    cases.push(("percentile 101", percentile));

    for (what, config) in &cases {
        match run(config) {
            Err(LoadError::InvalidArgument(msg)) => ensure!(!msg.is_empty(), "{what}: empty message"),
            other => anyhow::bail!("{what}: expected InvalidArgument, got {other:?}"),
        }
    }
    Ok(())
}
