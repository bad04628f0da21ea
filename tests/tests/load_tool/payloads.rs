//! Closed and open loop against real kiln servers: image and KServe payloads, sweeps, outputs.

use super::*;

// ---------------------------------------------------------------------------------------
// Image payloads against a real kiln server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_closed_loop_over_h1_and_h2_checks_labels() -> anyhow::Result<()> {
    let _guard = shared().await;
    let images = image_dir("predict", &[("daisy", "flower.jpg"), ("palace", "china.jpg")])?;
    let server = TestServer::start(default_config()?).await?;
    for http2 in [false, true] {
        let report = load(&predict(&server.url("/"), PayloadKind::Predict, &images.0, http2)).await?;
        let what = if http2 { "predict h2" } else { "predict h1" };
        let level = only(&report)?;
        ensure_clean(level, what)?;
        ensure!(level.items == level.requests, "{what}: one image per request: {level:#?}");
        ensure!(level.concurrency == Some(2) && level.target_rate.is_none(), "{what}: {level:#?}");
        ensure!(level.send_lag.is_none() && level.server.is_none(), "{what}: closed loop, no scrape: {level:#?}");
        ensure!(report.http == if http2 { "2" } else { "1.1" }, "{what}: http {}", report.http);
        let payload = &report.payload;
        ensure!(payload["kind"] == "predict" && payload["distinct_requests"] == 2, "{what}: payload {payload}");
        ensure!(payload["description"].as_str().is_some_and(|d| d.contains("POST /predict ")), "{what}: {payload}");
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_batch_counts_items_and_scrapes_server_metrics() -> anyhow::Result<()> {
    let _guard = shared().await;
    let images = image_dir("batch", &[("daisy", "flower.jpg"), ("palace", "china.jpg")])?;
    let server = TestServer::start(default_config()?).await?;
    let mut config = predict(&server.url("/"), PayloadKind::PredictBatch, &images.0, true);
    config.payload.batch_files = 2;
    config.server_metrics = true;
    let report = load(&config).await?;
    let level = only(&report)?;
    ensure_clean(level, "predict-batch")?;
    ensure!(level.items == 2 * level.requests, "two images per request: {level:#?}");
    ensure!((level.items_per_s - 2.0 * level.throughput_rps).abs() < 1e-6, "{level:#?}");
    let server_side = level.server.context("server_metrics asked for, but no server-side figures")?;
    ensure!(server_side.batches > 0.0 && server_side.avg_batch_size >= 1.0, "{server_side:?}");
    ensure!(server_side.compute_ms > 0.0 && server_side.queue_ms >= 0.0, "{server_side:?}");
    ensure!(report.table().contains("batch"), "the table lacks the server columns:\n{}", report.table());

    // A folder named after the wrong label: every answer is a wrong answer, none a success.
    let tiger = image_dir("tiger", &[("tiger", "flower.jpg")])?;
    let report = load(&predict(&server.url("/"), PayloadKind::Predict, &tiger.0, false)).await?;
    let level = only(&report)?;
    ensure!(error(level, "wrong_answer") > 0, "no wrong_answer counted: {level:#?}");
    ensure!(level.errors.len() == 1 && level.requests == 0, "only wrong answers expected: {level:#?}");
    ensure!(report.table().contains("wrong_answer"), "the table does not list the errors:\n{}", report.table());

    // Without --check-labels the same answers are successes.
    let mut unchecked = predict(&server.url("/"), PayloadKind::Predict, &tiger.0, false);
    unchecked.payload.check_labels = false;
    let report = load(&unchecked).await?;
    ensure_clean(only(&report)?, "predict without label checks")?;
    server.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Sweeps and outputs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_sweep_writes_json_csv_and_plots() -> anyhow::Result<()> {
    let _guard = shared().await;
    let server = TestServer::start(test_models_config()?).await?;
    let mut config = LoadConfig::new(server.url("/health"), Mode::Closed { concurrency: vec![1, 4] });
    config.timing = short(300, 2);
    let report = load(&config).await?;
    ensure!(report.levels.len() == 2, "two levels expected: {:#?}", report.levels);
    for (level, c) in report.levels.iter().zip([1, 4]) {
        ensure_clean(level, &format!("concurrency {c}"))?;
        ensure!(level.concurrency == Some(c) && level.connections == c, "level {c} out of order: {level:#?}");
        ensure!(level.level() == c as f64, "{level:#?}");
    }
    ensure!(report.knee.is_none() && report.latency_target_ms.is_none(), "knee without a target: {:?}", report.knee);

    let out = TempDir::new("outputs")?;
    // Nested folders are created as needed.
    let (json_path, csv_path) = (out.path("a/report.json"), out.path("b/report.csv"));
    report.write_json(&json_path)?;
    report.write_csv(&csv_path)?;

    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    ensure!(json["mode"] == "closed" && json["http"] == "1.1" && json["tls"] == false, "{json}");
    ensure!(json["metric"] == "mean" && json["arrival"].is_null(), "{json}");
    ensure!(json["knee"].is_null() && json["latency_target_ms"].is_null(), "knee/target not null: {json}");
    ensure!(json["payload"]["kind"] == "get", "{json}");
    ensure!(json["window_s"].as_f64().is_some_and(|w| (w - 0.3).abs() < 1e-9), "{json}");
    ensure!(json["tool"].as_str().is_some_and(|t| t.starts_with("kiln bench")), "{json}");
    let levels = json["levels"].as_array().context("levels is not an array")?;
    ensure!(levels.len() == 2, "{json}");
    for (l, (mine, c)) in levels.iter().zip(report.levels.iter().zip([1, 4])) {
        ensure!(l["concurrency"] == c && l["target_rate"].is_null(), "{l}");
        ensure!(l["requests"].as_u64() == Some(mine.requests) && l["error_count"] == 0, "{l}");
        ensure!(l["errors"].as_object().is_some_and(serde_json::Map::is_empty), "{l}");
        ensure!(l["send_lag"].is_null() && l["server"].is_null(), "{l}");
        ensure!(l["stable"].is_boolean() && l["windows"].as_u64().is_some_and(|w| w >= 1), "{l}");
        for field in ["throughput_rps", "items_per_s", "duration_s", "metric_ms"] {
            ensure!(l[field].as_f64().is_some_and(|v| v > 0.0), "levels[].{field}: {l}");
        }
        for field in ["mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms"] {
            ensure!(l["latency"][field].as_f64().is_some_and(|v| v > 0.0), "levels[].latency.{field}: {l}");
        }
        ensure!(l["latency"]["p99_ms"].as_f64() == Some(mine.latency.p99_ms), "{l}");
    }

    let csv = std::fs::read_to_string(&csv_path)?;
    let lines: Vec<&str> = csv.lines().collect();
    ensure!(lines.len() == 3, "a header and one row per level expected:\n{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    ensure!(header.first() == Some(&"concurrency") && header.contains(&"p99_ms"), "{csv}");
    let p99 = header.iter().position(|h| *h == "p99_ms").context("no p99_ms column")?;
    for (row, (level, c)) in lines[1..].iter().zip(report.levels.iter().zip(["1", "4"])) {
        let cells: Vec<&str> = row.split(',').collect();
        ensure!(cells.len() == header.len(), "row and header differ in length:\n{csv}");
        ensure!(cells[0] == c && cells[3] == level.requests.to_string(), "row {row}");
        let p: f64 = cells[p99].parse()?;
        ensure!((p - level.latency.p99_ms).abs() < 1e-3, "row {row}: p99 {p} vs {}", level.latency.p99_ms);
    }

    let (svg, png) = (out.path("plot/sweep.svg"), out.path("plot/sweep.png"));
    plot(&report, &svg, None)?;
    plot(&report, &png, None)?;
    let svg_text = std::fs::read_to_string(&svg)?;
    let start: String = svg_text.chars().take(200).collect();
    ensure!(svg_text.contains("<svg") && svg_text.contains("p99"), "not an SVG plot: {start}");
    let png_bytes = std::fs::read(&png)?;
    ensure!(png_bytes.starts_with(b"\x89PNG\r\n\x1a\n") && png_bytes.len() > 1000, "not a PNG");
    let bad = plot(&report, &out.path("plot.gif"), None);
    ensure!(matches!(bad, Err(LoadError::InvalidArgument(_))), "a .gif plot was not refused: {bad:?}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_target_stops_the_sweep_and_sets_the_knee() -> anyhow::Result<()> {
    let _guard = shared().await;
    let server = TestServer::start(test_models_config()?).await?;
    let mut config = LoadConfig::new(server.url("/health"), Mode::Closed { concurrency: vec![1, 2] });
    config.timing = short(200, 1);
    config.percentile = Some(99.0);

    config.latency_target = Some(Duration::from_secs(10));
    let report = load(&config).await?;
    ensure!(report.levels.len() == 2 && report.knee == Some(2.0), "{:?}: {:#?}", report.knee, report.levels);
    ensure!(report.metric == "p99" && report.latency_target_ms == Some(10_000.0), "{}", report.metric);
    ensure!(report.table().contains("highest level"), "{}", report.table());

    // No level can meet 1 µs: the sweep ends after the first level, with no knee.
    config.latency_target = Some(Duration::from_micros(1));
    let report = load(&config).await?;
    ensure!(report.levels.len() == 1 && report.knee.is_none(), "{:?}: {:#?}", report.knee, report.levels);
    ensure!(report.levels[0].metric_ms == report.levels[0].latency.p99_ms, "{:#?}", report.levels[0]);
    server.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Open loop

async fn open_loop_keeps_its_rate(http2: bool) -> anyhow::Result<()> {
    let _guard = shared().await;
    let server = TestServer::start(test_models_config()?).await?;
    for arrival in [Arrival::Constant, Arrival::Poisson] {
        let what = format!("{arrival:?} over HTTP/{}", if http2 { "2" } else { "1.1" });
        let mut config = LoadConfig::new(server.url("/health"), Mode::Open { rates: vec![200.0], arrival });
        config.http2 = http2;
        config.timing = short(500, 2);
        let report = load(&config).await?;
        let level = only(&report)?;
        ensure_clean(level, &what)?;
        ensure!(level.target_rate == Some(200.0) && level.concurrency.is_none(), "{what}: {level:#?}");
        ensure!(
            (150.0..=250.0).contains(&level.throughput_rps),
            "{what}: {:.1} req/s is not within 25 % of 200: {level:#?}",
            level.throughput_rps
        );
        let lag = level.send_lag.with_context(|| format!("{what}: open loop without send_lag: {level:#?}"))?;
        ensure!(lag.mean_ms >= 0.0 && lag.p99_ms >= 0.0, "{what}: {lag:?}");
        ensure!(
            report.mode == "open" && report.arrival == Some(arrival),
            "{what}: {} {:?}",
            report.mode,
            report.arrival
        );
        ensure!(report.table().contains("rate/s") && report.table().contains("lag ms"), "{}", report.table());
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate_over_http1() -> anyhow::Result<()> {
    open_loop_keeps_its_rate(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate_over_http2() -> anyhow::Result<()> {
    open_loop_keeps_its_rate(true).await
}

// ---------------------------------------------------------------------------------------
// KServe v2 payloads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_json_and_binary_payloads_get_outputs() -> anyhow::Result<()> {
    let _guard = shared().await;
    let server = TestServer::start(test_models_config()?).await?;
    for kind in [PayloadKind::V2Json, PayloadKind::V2Binary] {
        for http2 in [false, true] {
            let what = format!("{kind:?} over {}", if http2 { "h2" } else { "h1" });
            let mut config = closed(&server.url("/"), 2, http2);
            config.payload = PayloadSpec {
                kind,
                model: Some("identity_fp32".into()),
                batch: 4,
                check_labels: true,
                ..Default::default()
            };
            let report = load(&config).await?;
            let level = only(&report)?;
            ensure_clean(level, &what)?;
            ensure!(level.items == 4 * level.requests, "{what}: batch 4 means 4 items a request: {level:#?}");
            let description = report.payload["description"].as_str().unwrap_or_default();
            ensure!(description.contains("/v2/models/identity_fp32/infer"), "{what}: {description}");
        }
    }

    // Tensors from a KServe JSON request file: add_sub's two inputs.
    let dir = TempDir::new("tensors")?;
    let file = dir.path("add_sub.json");
    let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let request = serde_json::json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [a]},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
        ]
    });
    std::fs::write(&file, request.to_string())?;
    for kind in [PayloadKind::V2Json, PayloadKind::V2Binary] {
        let mut config = closed(&server.url("/"), 2, true);
        config.payload = PayloadSpec {
            kind,
            model: Some("add_sub".into()),
            tensors: Some(file.clone()),
            check_labels: true,
            ..Default::default()
        };
        let report = load(&config).await?;
        let level = only(&report)?;
        ensure_clean(level, &format!("{kind:?} with --tensors"))?;
        ensure!(level.items == level.requests, "{kind:?}: {level:#?}");
        ensure!(
            report.payload["description"].as_str().is_some_and(|d| d.contains("add_sub.json")),
            "{}",
            report.payload
        );
    }

    // A model the server does not have: every request answers 404 (its metadata cannot
    // even be read, so random tensors cannot be made: an error, not a panic).
    let mut config = closed(&server.url("/"), 1, false);
    config.payload = PayloadSpec { kind: PayloadKind::V2Json, model: Some("nope".into()), ..Default::default() };
    let result = try_load(&config).await?;
    ensure!(matches!(result, Err(LoadError::Fetch(_))), "metadata of a missing model: {result:?}");
    config.payload.tensors = Some(file);
    let report = load(&config).await?;
    let level = only(&report)?;
    ensure!(level.requests == 0 && error(level, "http_404") > 0, "{level:#?}");
    server.shutdown().await
}

// ---------------------------------------------------------------------------------------
// What reaches the server: TLS, connections, streams, bodies

/// https with both protocols: KServe metadata and `/metrics` are read over HTTP/1.1 even
/// when the load goes over h2 (whose connector offers only `h2` by ALPN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_reads_model_metadata_and_metrics() -> anyhow::Result<()> {
    let _guard = shared().await;
    let dir = TempDir::new("tls")?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert_path, key_path) = (dir.path("cert.pem"), dir.path("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let mut server_config = test_models_config()?;
    server_config.tls = Some(TlsFiles { cert: cert_path, key: key_path });
    let server = TestServer::start(server_config).await?;
    let url = format!("https://{}/", server.addr);
    for http2 in [false, true] {
        let mut config = closed(&url, 2, http2);
        config.tls = TlsOptions { cacert: None, insecure: true };
        config.server_metrics = true;
        config.payload = PayloadSpec {
            kind: PayloadKind::V2Binary,
            model: Some("identity_fp32".into()),
            check_labels: true,
            ..Default::default()
        };
        let what = if http2 { "h2 over TLS" } else { "HTTP/1.1 over TLS" };
        let report = try_load(&config).await?.with_context(|| format!("{what}: run failed"))?;
        let level = only(&report)?;
        ensure_clean(level, what)?;
        ensure!(report.tls && level.server.is_some(), "{what}: {level:#?}");
    }
    server.shutdown().await
}

/// What the server sees: one connection per request in flight over HTTP/1.1, streams
/// multiplexed over the given connections with HTTP/2, and the concurrency asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_see_the_connections_and_concurrency_asked_for() -> anyhow::Result<()> {
    let _guard = shared().await;
    async fn gauged() -> anyhow::Result<(Stub, Arc<AtomicU64>)> {
        let (inflight, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let seen = peak.clone();
        let stub = Stub::start(move |_req| {
            let (inflight, peak) = (inflight.clone(), peak.clone());
            async move {
                let now = inflight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inflight.fetch_sub(1, Ordering::SeqCst);
                respond(StatusCode::OK, "ok")
            }
        })
        .await?;
        Ok((stub, seen))
    }

    let (stub, peak) = gauged().await?;
    let report = load(&closed(&stub.url("/"), 3, false)).await?;
    let level = only(&report)?;
    ensure_clean(level, "h1 concurrency 3")?;
    ensure!(level.connections == 3 && stub.accepted() == 3, "h1: {} connections: {level:#?}", stub.accepted());
    ensure!(peak.load(Ordering::SeqCst) == 3, "h1: peak in flight {}", peak.load(Ordering::SeqCst));

    let (stub, peak) = gauged().await?;
    let mut config = closed(&stub.url("/"), 4, true);
    config.connections = Some(1);
    let report = load(&config).await?;
    let level = only(&report)?;
    ensure_clean(level, "h2 concurrency 4 on one connection")?;
    ensure!(level.connections == 1 && stub.accepted() == 1, "h2: {} connections: {level:#?}", stub.accepted());
    ensure!(peak.load(Ordering::SeqCst) == 4, "h2: peak in flight {}", peak.load(Ordering::SeqCst));
    // Each request takes 5 ms: 4 in flight give at most 800 a second.
    ensure!(level.throughput_rps <= 800.0 * 1.05, "{level:#?}");

    let (stub, _) = gauged().await?;
    let mut config = LoadConfig::new(stub.url("/"), Mode::Open { rates: vec![100.0], arrival: Arrival::Constant });
    config.connections = Some(2);
    config.timing = short(300, 2);
    let report = load(&config).await?;
    let level = only(&report)?;
    ensure_clean(level, "open loop on 2 connections")?;
    ensure!(level.connections == 2 && stub.accepted() == 2, "open: {} connections: {level:#?}", stub.accepted());
    Ok(())
}

/// `post` sends the file as is, with its content type, the extra headers and the URL's
/// path and query; a request cap ends the level early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_payload_sends_body_headers_and_path() -> anyhow::Result<()> {
    let _guard = shared().await;
    const BODY: &[u8] = b"\x00\x01kiln body\xff";
    let stub = Stub::start(|req: Request<Incoming>| async move {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let right = req.method() == hyper::Method::POST
            && req.uri().path() == "/echo"
            && req.uri().query() == Some("x=1&y=2")
            && header("content-type").as_deref() == Some("application/x-kiln")
            && header("authorization").as_deref() == Some("Bearer s3cret")
            && header("x-trace").as_deref() == Some("a");
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if right && body.as_ref() == BODY {
            respond(StatusCode::OK, "ok")
        } else {
            respond(StatusCode::BAD_REQUEST, "wrong request")
        }
    })
    .await?;
    let dir = TempDir::new("post")?;
    let file = dir.path("body.bin");
    std::fs::write(&file, BODY)?;
    let headers = vec![
        (hyper::header::AUTHORIZATION, hyper::header::HeaderValue::from_static("Bearer s3cret")),
        (hyper::header::HeaderName::from_static("x-trace"), hyper::header::HeaderValue::from_static("a")),
    ];
    for http2 in [false, true] {
        let mut config = closed(&stub.url("/echo?x=1&y=2"), 2, http2);
        config.payload = PayloadSpec {
            kind: PayloadKind::Post,
            body: Some(file.clone()),
            content_type: "application/x-kiln".into(),
            headers: headers.clone(),
            ..Default::default()
        };
        config.timing =
            Timing { window: Duration::from_secs(5), max_windows: 4, max_requests: Some(50), ..short(0, 1) };
        let started = std::time::Instant::now();
        let report = load(&config).await?;
        let level = only(&report)?;
        ensure_clean(level, if http2 { "post h2" } else { "post h1" })?;
        ensure!(level.requests >= 50 && level.windows == 1, "the cap of 50 requests did not end the level: {level:#?}");
        ensure!(started.elapsed() < Duration::from_secs(3), "capped level took {:?}", started.elapsed());
    }
    Ok(())
}
