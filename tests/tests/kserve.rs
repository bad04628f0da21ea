//! KServe v2 endpoints against real servers: Triton's own Python client, unmodified,
//! plus direct checks of JSON and binary tensor requests.

use std::time::Duration;

use anyhow::{Context, ensure};
use kiln_tests::{TestServer, clients, test_models_config, venv_python, workspace_root};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_http_works_unmodified() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let script = workspace_root().join("tests/python/triton_client_check.py");
    let mut cmd = tokio::process::Command::new(venv_python()?);
    cmd.arg(&script).arg(server.addr.to_string()).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.context("client hung")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "tritonclient checks failed:\n{stdout}\n{stderr}");
    ensure!(stdout.contains("all checks passed"), "unexpected output:\n{stdout}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_and_binary_infer_over_h1_and_h2() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    for (proto, client) in clients()? {
        let a: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let body = json!({
            "id": "x1",
            "inputs": [
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [a.clone()]},
            ],
            "outputs": [{"name": "OUTPUT1"}]
        });
        let resp = client.post(server.url("/v2/models/add_sub/infer")).json(&body).send().await?;
        ensure!(resp.status() == 200, "{proto}: status {}", resp.status());
        let v: Value = resp.json().await?;
        ensure!(v["id"] == "x1" && v["model_name"] == "add_sub", "{proto}: {v}");
        let outputs = v["outputs"].as_array().context("outputs")?;
        ensure!(outputs.len() == 1 && outputs[0]["name"] == "OUTPUT1", "{proto}: only the requested output: {v}");
        let data: Vec<f32> = serde_json::from_value(outputs[0]["data"].clone())?;
        let expected: Vec<f32> = a.iter().map(|x| x - 1.0).collect();
        ensure!(data == expected, "{proto}: OUTPUT1 {data:?}");

        // Binary request and response: JSON header, then raw little-endian tensors.
        let header = json!({
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": true}}]
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend(a.iter().flat_map(|x| x.to_le_bytes()));
        body.extend(std::iter::repeat_n(2.0f32.to_le_bytes(), 16).flatten());
        let resp = client
            .post(server.url("/v2/models/add_sub/infer"))
            .header("Inference-Header-Content-Length", header.len())
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .await?;
        ensure!(resp.status() == 200, "{proto}: binary status {}", resp.status());
        let json_len: usize = resp
            .headers()
            .get("inference-header-content-length")
            .context("no Inference-Header-Content-Length")?
            .to_str()?
            .parse()?;
        let bytes = resp.bytes().await?;
        ensure!(bytes.len() == json_len + 64, "{proto}: body {} bytes, header {json_len}", bytes.len());
        let head: Value = serde_json::from_slice(&bytes[..json_len])?;
        ensure!(head["outputs"][0]["parameters"]["binary_data_size"] == 64, "{proto}: {head}");
        let sums: Vec<f32> =
            bytes[json_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let expected: Vec<f32> = a.iter().map(|x| x + 2.0).collect();
        ensure!(sums == expected, "{proto}: OUTPUT0 {sums:?}");
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_health_and_errors() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).send();
    ensure!(get("/v2/health/live").await?.status() == 200);
    ensure!(get("/v2/health/ready").await?.status() == 200);
    let meta: Value = get("/v2/models/all_types").await?.json().await?;
    ensure!(meta["inputs"].as_array().map(Vec::len) == Some(10), "{meta}");
    ensure!(get("/v2/models/add_sub/versions/1/ready").await?.status() == 200);
    ensure!(get("/v2/models/add_sub/versions/2").await?.status() == 404);
    ensure!(get("/v2/models/..%2F..%2Fetc/ready").await?.status() == 404);
    let index: Value = client.post(server.url("/v2/repository/index")).send().await?.json().await?;
    ensure!(index.as_array().map(Vec::len) == Some(3), "{index}");

    let bad = [
        (json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0]}]}), "elements"),
        (json!({"inputs": [{"name": "NOPE", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}), "NOPE"),
        (
            json!({"inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": vec![1; 16]},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0; 16]}]}),
            "datatype",
        ),
        (
            json!({"inputs": [
                {"name": "INPUT0", "shape": [1, 8], "datatype": "FP32", "data": vec![1.0; 8]},
                {"name": "INPUT1", "shape": [1, 8], "datatype": "FP32", "data": vec![1.0; 8]}]}),
            "shape",
        ),
        (json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32"}]}), "data"),
    ];
    for (body, word) in bad {
        let resp = client.post(server.url("/v2/models/add_sub/infer")).json(&body).send().await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        ensure!(status == 400 && v["type"] == "invalid_parameter", "{body}: {status} {v}");
        ensure!(v["error"].as_str().is_some_and(|e| e.contains(word)), "{body}: message {v}");
    }
    server.shutdown().await
}
