//! `/metrics` moves with traffic; bearer-token auth guards everything but health and
//! metrics.

use anyhow::{Context, ensure};
use kiln_tests::{TestServer, test_models_config};
use serde_json::{Value, json};

fn add_sub_request() -> Value {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![2.0f32; 16]},
    ]})
}

/// The value of the first sample line that starts with `series` (name plus labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_requests_batches_and_errors() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let client = reqwest::Client::new();
    let metrics = || async {
        let resp = client.get(server.url("/metrics")).send().await?;
        ensure!(resp.status() == 200, "metrics status {}", resp.status());
        anyhow::Ok(resp.text().await?)
    };
    let before = metrics().await?;
    ensure!(sample(&before, "kiln_process_resident_memory_bytes").is_some_and(|v| v > 0.0), "{before}");
    ensure!(!before.contains("kiln_gpu_"), "GPU metrics without a GPU:\n{before}");

    for _ in 0..5 {
        let r = client.post(server.url("/v2/models/add_sub/infer")).json(&add_sub_request()).send().await?;
        ensure!(r.status() == 200);
    }
    let bad = client.post(server.url("/v2/models/add_sub/infer")).json(&json!({"inputs": []})).send().await?;
    ensure!(bad.status() == 400);

    let after = metrics().await?;
    let ok = sample(&after, r#"kiln_requests_total{model="add_sub",endpoint="infer",status="200"}"#)
        .context(format!("no 200 counter:\n{after}"))?;
    ensure!(ok == 5.0, "200 count {ok}");
    let failed = sample(&after, r#"kiln_requests_total{model="add_sub",endpoint="infer",status="400"}"#);
    ensure!(failed == Some(1.0), "400 count {failed:?}");
    let inferred = sample(&after, r#"kiln_inference_count_total{model="add_sub"}"#);
    ensure!(inferred == Some(5.0), "inference count {inferred:?}");
    let batches = sample(&after, r#"kiln_batch_size_count{model="add_sub"}"#).context("no batch histogram")?;
    ensure!((1.0..=5.0).contains(&batches), "batches {batches}");
    ensure!(after.contains(r#"kiln_model_ready{model="all_types",version="1"} 1"#), "{after}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_guards_inference_but_not_health() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.auth.inference_token = Some("s3cret-token".into());
    let server = TestServer::start(config).await?;
    let client = reqwest::Client::new();
    let infer = server.url("/v2/models/add_sub/infer");

    let none = client.post(&infer).json(&add_sub_request()).send().await?;
    ensure!(none.status() == 401, "no token: {}", none.status());
    ensure!(none.headers().get("www-authenticate").is_some(), "no WWW-Authenticate");
    let body: Value = none.json().await?;
    ensure!(body["type"] == "unauthorized", "{body}");

    for wrong in ["Bearer s3cret-tokeN", "Bearer s3cret", "Basic s3cret-token", "s3cret-token"] {
        let r = client.post(&infer).header("Authorization", wrong).json(&add_sub_request()).send().await?;
        ensure!(r.status() == 401, "{wrong:?}: {}", r.status());
    }
    let good = client.post(&infer).bearer_auth("s3cret-token").json(&add_sub_request()).send().await?;
    ensure!(good.status() == 200, "good token: {}", good.status());
    ensure!(client.get(server.url("/v2/models/add_sub")).send().await?.status() == 401, "metadata is guarded");

    for open in ["/health", "/v2/health/live", "/v2/health/ready", "/metrics"] {
        let r = client.get(server.url(open)).send().await?;
        ensure!(r.status() == 200, "{open}: {}", r.status());
    }
    server.shutdown().await
}
