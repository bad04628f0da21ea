//! Bad input to `POST /v2/models/{name}/infer`, over HTTP/1.1 and h2c: every malformed,
//! inconsistent or hostile request gets the right 4xx status and a JSON error with the
//! right `type` and a message that leaks no server paths; the server keeps answering
//! valid requests correctly afterwards. Plus slow clients that never finish their headers.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use kiln_tests::{TestServer, clients, test_models_config};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const IDENTITY: &str = "/v2/models/identity_fp32/infer";
const ADD_SUB: &str = "/v2/models/add_sub/infer";
const ALL_TYPES: &str = "/v2/models/all_types/infer";
/// Substrings that would reveal the server's files in an error message.
const LEAKS: &[&str] = &["/work", ".kiln", "src/", ".rs", "/home", "/tmp", "kiln_server::", "alloc::"];

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    path: String,
    body: Vec<u8>,
    /// `Inference-Header-Content-Length`, sent verbatim.
    header_len: Option<String>,
    status: u16,
    kind: &'static str,
}

impl Case {
    fn raw(name: &'static str, path: &str, body: impl Into<Vec<u8>>, status: u16, kind: &'static str) -> Self {
        Self { name, path: path.to_string(), body: body.into(), header_len: None, status, kind }
    }

    fn json(name: &'static str, path: &str, body: Value, status: u16, kind: &'static str) -> Self {
        Self::raw(name, path, body.to_string(), status, kind)
    }

    /// A bad request: 400 `invalid_parameter`.
    fn bad(name: &'static str, path: &str, body: Value) -> Self {
        Self::json(name, path, body, 400, "invalid_parameter")
    }

    /// A binary-extension request: the JSON header, then `data`; `header_len` overrides
    /// the correct `Inference-Header-Content-Length`.
    fn binary(name: &'static str, path: &str, header: Value, data: &[u8], header_len: Option<&str>) -> Self {
        let head = header.to_string();
        let len = header_len.map_or_else(|| head.len().to_string(), str::to_string);
        let mut body = head.into_bytes();
        body.extend_from_slice(data);
        Self { name, path: path.to_string(), body, header_len: Some(len), status: 400, kind: "invalid_parameter" }
    }
}

fn fp32(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32).collect()
}

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One valid identity_fp32 input with the given fields overridden.
fn identity_input(overrides: Value) -> Value {
    let mut input = json!({"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": fp32(16)});
    if let (Some(input), Some(overrides)) = (input.as_object_mut(), overrides.as_object()) {
        for (k, v) in overrides {
            input.insert(k.clone(), v.clone());
        }
    }
    input
}

fn identity(overrides: Value) -> Value {
    json!({"inputs": [identity_input(overrides)]})
}

fn add_sub(batch0: usize, batch1: usize) -> Value {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [batch0, 16], "datatype": "FP32", "data": fp32(batch0 * 16)},
        {"name": "INPUT1", "shape": [batch1, 16], "datatype": "FP32", "data": fp32(batch1 * 16)},
    ]})
}

/// A binary identity_fp32 request header for one `[1, 16]` FP32 input of `size` bytes.
fn binary_header(size: Value) -> Value {
    json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": size}}]})
}

/// A BYTES request for all_types' INPUT_BYTES, `[1, 4]`, whose binary data is `data`.
fn bytes_header(size: usize) -> Value {
    json!({"inputs": [{"name": "INPUT_BYTES", "shape": [1, 4], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]})
}

fn cases() -> Vec<Case> {
    let data16 = le(&fp32(16));
    let mut past_end = 100u32.to_le_bytes().to_vec();
    past_end.extend_from_slice(&[0u8; 12]);
    let mut trailing_bytes = Vec::new();
    for element in [&b"a"[..], b"b", b"c", b"d"] {
        trailing_bytes.extend_from_slice(&(element.len() as u32).to_le_bytes());
        trailing_bytes.extend_from_slice(element);
    }
    trailing_bytes.extend_from_slice(b"junk");
    let many_inputs: Vec<Value> = (0..65)
        .map(|i| json!({"name": format!("IN{i}"), "shape": [1, 1], "datatype": "FP32", "data": [1.0]}))
        .collect();

    vec![
        // Malformed JSON.
        Case::raw("truncated JSON", IDENTITY, r#"{"inputs": ["#, 400, "invalid_parameter"),
        Case::raw("JSON syntax error", IDENTITY, "{inputs: []}", 400, "invalid_parameter"),
        Case::raw("empty body", IDENTITY, "", 400, "invalid_parameter"),
        Case::raw("binary garbage", IDENTITY, vec![0xff, 0xfe, 0x00, 0x01], 400, "invalid_parameter"),
        Case::raw(
            "invalid UTF-8 in a string",
            IDENTITY,
            b"{\"id\": \"\xff\xfe\", \"inputs\": []}".to_vec(),
            400,
            "invalid_parameter",
        ),
        // JSON that is not an object.
        Case::bad("array", IDENTITY, json!([1, 2])),
        Case::bad("string", IDENTITY, json!("inputs")),
        Case::bad("number", IDENTITY, json!(42)),
        Case::bad("null", IDENTITY, json!(null)),
        Case::bad("boolean", IDENTITY, json!(true)),
        // `inputs` missing or not an array of objects.
        Case::bad("no inputs", IDENTITY, json!({})),
        Case::bad("inputs is an object", IDENTITY, json!({"inputs": {}})),
        Case::bad("inputs is a string", IDENTITY, json!({"inputs": "INPUT0"})),
        Case::bad("inputs is null", IDENTITY, json!({"inputs": null})),
        Case::bad("input is a number", IDENTITY, json!({"inputs": [1]})),
        Case::bad("empty inputs", IDENTITY, json!({"inputs": []})),
        Case::bad(
            "input without a name",
            IDENTITY,
            json!({"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": fp32(16)}]}),
        ),
        Case::bad(
            "input without a shape",
            IDENTITY,
            json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "data": fp32(16)}]}),
        ),
        Case::bad(
            "input without a datatype",
            IDENTITY,
            json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "data": fp32(16)}]}),
        ),
        Case::bad("data missing", IDENTITY, identity(json!({"data": null}))),
        Case::bad("id is a number", IDENTITY, json!({"id": 5, "inputs": [identity_input(json!({}))]})),
        Case::bad("parameters is an array", IDENTITY, json!({"parameters": [], "inputs": [identity_input(json!({}))]})),
        Case::bad("outputs is an object", IDENTITY, json!({"outputs": {}, "inputs": [identity_input(json!({}))]})),
        // Wrong shapes for the model.
        Case::bad("rank 1", IDENTITY, identity(json!({"shape": [16]}))),
        Case::bad("rank 3", IDENTITY, identity(json!({"shape": [1, 16, 1]}))),
        Case::bad("fixed axis too short", IDENTITY, identity(json!({"shape": [1, 8], "data": fp32(8)}))),
        Case::bad("fixed axis too long", IDENTITY, identity(json!({"shape": [1, 17], "data": fp32(17)}))),
        Case::bad("empty batch", IDENTITY, identity(json!({"shape": [0, 16], "data": []}))),
        Case::bad("scalar shape", IDENTITY, identity(json!({"shape": [], "data": [1.0]}))),
        Case::bad("fractional dimension", IDENTITY, identity(json!({"shape": [1.5, 16]}))),
        Case::bad("shape is a string", IDENTITY, identity(json!({"shape": "1,16"}))),
        // Negative dimensions.
        Case::bad("negative batch", IDENTITY, identity(json!({"shape": [-1, 16]}))),
        Case::bad("negative axis", IDENTITY, identity(json!({"shape": [1, -16]}))),
        // Element count does not match the shape.
        Case::bad("too few elements", IDENTITY, identity(json!({"shape": [2, 16]}))),
        Case::bad("too many elements", IDENTITY, identity(json!({"data": fp32(17)}))),
        Case::bad("nested data too short", IDENTITY, identity(json!({"shape": [2, 16], "data": [fp32(16), fp32(15)]}))),
        // Wrong datatype for the model.
        Case::bad("INT32 for FP32", IDENTITY, identity(json!({"datatype": "INT32", "data": vec![1; 16]}))),
        Case::bad("FP64 for FP32", IDENTITY, identity(json!({"datatype": "FP64"}))),
        Case::bad("BYTES for FP32", IDENTITY, identity(json!({"datatype": "BYTES", "data": vec!["a"; 16]}))),
        Case::bad("FP16 for FP32", IDENTITY, identity(json!({"datatype": "FP16"}))),
        // Datatype names that do not exist.
        Case::bad("FLOAT32", IDENTITY, identity(json!({"datatype": "FLOAT32"}))),
        Case::bad("lower-case fp32", IDENTITY, identity(json!({"datatype": "fp32"}))),
        Case::bad("UINT16", IDENTITY, identity(json!({"datatype": "UINT16"}))),
        Case::bad("empty datatype", IDENTITY, identity(json!({"datatype": ""}))),
        Case::bad("numeric datatype", IDENTITY, identity(json!({"datatype": 11}))),
        // Values that do not fit the datatype.
        Case::bad("string in FP32 data", IDENTITY, identity(json!({"data": [vec!["x"; 16]]}))),
        Case::bad("FP32 overflow", IDENTITY, identity(json!({"data": vec![1e39; 16]}))),
        Case::bad("object in data", IDENTITY, identity(json!({"data": [{"a": 1}]}))),
        Case::bad("boolean in FP32 data", IDENTITY, identity(json!({"data": vec![true; 16]}))),
        Case::bad(
            "UINT8 300",
            ALL_TYPES,
            json!({"inputs": [{"name": "INPUT_UINT8", "shape": [1, 4], "datatype": "UINT8", "data": [1, 2, 3, 300]}]}),
        ),
        Case::bad(
            "INT8 fraction",
            ALL_TYPES,
            json!({"inputs": [{"name": "INPUT_INT8", "shape": [1, 4], "datatype": "INT8", "data": [1, 2, 3, 1.5]}]}),
        ),
        Case::bad(
            "BOOL as number",
            ALL_TYPES,
            json!({"inputs": [{"name": "INPUT_BOOL", "shape": [1, 4], "datatype": "BOOL", "data": [1, 0, 1, 0]}]}),
        ),
        // Huge declared shapes are refused before anything is allocated.
        Case::json(
            "huge shape",
            IDENTITY,
            identity(json!({"shape": [1_000_000_000u64, 16], "data": []})),
            413,
            "payload_too_large",
        ),
        Case::json(
            "huge shape without data",
            IDENTITY,
            json!({"inputs": [{"name": "INPUT0", "shape": [1_000_000_000u64, 16], "datatype": "FP32"}]}),
            413,
            "payload_too_large",
        ),
        Case::json(
            "overflowing shape",
            IDENTITY,
            identity(json!({"shape": [i64::MAX, i64::MAX]})),
            413,
            "payload_too_large",
        ),
        Case::json(
            "huge BYTES shape",
            ALL_TYPES,
            json!({"inputs": [{"name": "INPUT_BYTES", "shape": [1u64 << 40, 4], "datatype": "BYTES", "data": ["a"]}]}),
            413,
            "payload_too_large",
        ),
        Case {
            status: 413,
            kind: "payload_too_large",
            ..Case::binary(
                "huge binary shape",
                IDENTITY,
                json!({"inputs": [{"name": "INPUT0", "shape": [1_000_000_000u64, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}),
                &data16,
                None,
            )
        },
        Case::json("65 inputs", IDENTITY, json!({"inputs": many_inputs}), 413, "payload_too_large"),
        // The binary tensor data extension.
        Case::binary("truncated binary data", IDENTITY, binary_header(json!(64)), &data16[..32], None),
        Case::binary(
            "trailing binary bytes",
            IDENTITY,
            binary_header(json!(64)),
            &[&data16[..], &[0, 0, 0, 0]].concat(),
            None,
        ),
        Case::binary("header length past the body", IDENTITY, binary_header(json!(64)), &data16, Some("100000")),
        Case::binary("header length cuts the JSON", IDENTITY, binary_header(json!(64)), &data16, Some("10")),
        Case::binary("non-numeric header length", IDENTITY, binary_header(json!(64)), &data16, Some("abc")),
        Case::binary("negative header length", IDENTITY, binary_header(json!(64)), &data16, Some("-5")),
        Case::binary("header length with junk", IDENTITY, binary_header(json!(64)), &data16, Some("12abc")),
        Case::binary("empty header length", IDENTITY, binary_header(json!(64)), &data16, Some("")),
        Case::binary(
            "binary_data_size does not match the shape",
            IDENTITY,
            binary_header(json!(60)),
            &data16[..60],
            None,
        ),
        Case::binary("binary_data_size negative", IDENTITY, binary_header(json!(-64)), &data16, None),
        Case::binary("binary_data_size is a string", IDENTITY, binary_header(json!("64")), &data16, None),
        Case::bad("binary_data_size without the header length", IDENTITY, binary_header(json!(64))),
        Case::binary(
            "both data and binary_data_size",
            IDENTITY,
            identity(json!({"parameters": {"binary_data_size": 64}})),
            &data16,
            None,
        ),
        Case::binary("BYTES length prefix past the end", ALL_TYPES, bytes_header(16), &past_end, None),
        Case::binary(
            "BYTES data too short for its prefixes",
            ALL_TYPES,
            bytes_header(8),
            &[1, 0, 0, 0, b'a', 0, 0, 0],
            None,
        ),
        Case::binary("BYTES trailing bytes", ALL_TYPES, bytes_header(trailing_bytes.len()), &trailing_bytes, None),
        // Unknown models, versions and names that try to escape the repository.
        Case::json("unknown model", "/v2/models/nope/infer", identity(json!({})), 404, "model_not_found"),
        Case::json(
            "unknown version",
            "/v2/models/identity_fp32/versions/2/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json(
            "non-numeric version",
            "/v2/models/identity_fp32/versions/latest/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json(
            "negative version",
            "/v2/models/identity_fp32/versions/-1/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json(
            "path traversal",
            "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json("relative model path", "/v2/models/..%2Fx/infer", identity(json!({})), 404, "model_not_found"),
        Case::json(
            "absolute model path",
            "/v2/models/%2Fetc%2Fpasswd/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json(
            "NUL in the model name",
            "/v2/models/identity_fp32%00/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        Case::json(
            "traversal to the repository",
            "/v2/models/..%2Fidentity_fp32/infer",
            identity(json!({})),
            404,
            "model_not_found",
        ),
        // Names the model does not have.
        Case::bad("unknown input", IDENTITY, identity(json!({"name": "NOPE"}))),
        Case::bad(
            "unknown requested output",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "outputs": [{"name": "NOPE"}]}),
        ),
        Case::bad(
            "binary_data is a string",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": "yes"}}]}),
        ),
        Case::bad(
            "binary_data_output is a number",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"binary_data_output": 1}}),
        ),
        Case::bad("missing input", ADD_SUB, json!({"inputs": [identity_input(json!({}))]})),
        Case::bad(
            "duplicate input",
            IDENTITY,
            json!({"inputs": [identity_input(json!({})), identity_input(json!({}))]}),
        ),
        // Scheduling parameters.
        Case::bad(
            "priority out of range",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"priority": 2}}),
        ),
        Case::bad(
            "priority huge",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"priority": u64::MAX}}),
        ),
        Case::bad(
            "priority negative",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"priority": -1}}),
        ),
        Case::bad(
            "priority fractional",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"priority": 1.5}}),
        ),
        Case::bad(
            "priority a string",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"priority": "high"}}),
        ),
        Case::bad("timeout 0", IDENTITY, json!({"inputs": [identity_input(json!({}))], "parameters": {"timeout": 0}})),
        Case::bad(
            "timeout negative",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"timeout": -5}}),
        ),
        Case::bad(
            "timeout a string",
            IDENTITY,
            json!({"inputs": [identity_input(json!({}))], "parameters": {"timeout": "10"}}),
        ),
        // Inputs that disagree about the batch.
        Case::bad("batch axis mismatch", ADD_SUB, add_sub(1, 2)),
        Case::bad("batch axis mismatch, larger first", ADD_SUB, add_sub(3, 1)),
    ]
}

/// Checks one error response: status, JSON body, `type`, and a message that leaks nothing.
async fn check_case(client: &reqwest::Client, server: &TestServer, proto: &str, case: &Case) -> anyhow::Result<()> {
    let ctx = format!("{proto}: {}", case.name);
    let mut req = client
        .post(server.url(&case.path))
        .header("content-type", if case.header_len.is_some() { "application/octet-stream" } else { "application/json" })
        .body(case.body.clone());
    if let Some(n) = &case.header_len {
        req = req.header("inference-header-content-length", n.as_str());
    }
    let resp =
        tokio::time::timeout(REQUEST_TIMEOUT, req.send()).await.with_context(|| format!("{ctx}: timed out"))??;
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.bytes())
        .await
        .with_context(|| format!("{ctx}: body timed out"))??;
    let text = String::from_utf8_lossy(&body);
    ensure!(status == case.status, "{ctx}: status {status}, expected {}: {text}", case.status);
    ensure!(content_type.starts_with("application/json"), "{ctx}: content-type {content_type:?}");
    let v: Value = serde_json::from_slice(&body).with_context(|| format!("{ctx}: body is not JSON: {text}"))?;
    let object = v.as_object().with_context(|| format!("{ctx}: body is not an object: {v}"))?;
    ensure!(object.len() == 2, "{ctx}: error body has fields other than error and type: {v}");
    ensure!(v["type"] == case.kind, "{ctx}: type {}, expected {}: {v}", v["type"], case.kind);
    let message = v["error"].as_str().with_context(|| format!("{ctx}: no error message: {v}"))?;
    ensure!(!message.trim().is_empty(), "{ctx}: empty error message");
    if let Some(leak) = LEAKS.iter().find(|l| message.contains(*l)) {
        bail!("{ctx}: the error message leaks {leak:?}: {message}");
    }
    Ok(())
}

/// A valid add_sub request of `batch` items and its checked answer.
async fn check_add_sub(client: &reqwest::Client, server: &TestServer, batch: usize, ctx: &str) -> anyhow::Result<()> {
    let a: Vec<f32> = (0..batch * 16).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..batch * 16).map(|i| 1000.0 - i as f32).collect();
    let body = json!({
        "id": format!("batch-{batch}"),
        "inputs": [
            {"name": "INPUT0", "shape": [batch, 16], "datatype": "FP32", "data": a},
            {"name": "INPUT1", "shape": [batch, 16], "datatype": "FP32", "data": b},
        ]
    });
    let send = client.post(server.url(ADD_SUB)).json(&body).send();
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, send).await.with_context(|| format!("{ctx}: timed out"))??;
    let status = resp.status();
    let text = tokio::time::timeout(REQUEST_TIMEOUT, resp.text()).await.context("body timed out")??;
    ensure!(status == 200, "{ctx}: batch {batch}: status {status}: {text}");
    let v: Value = serde_json::from_str(&text)?;
    ensure!(v["id"] == format!("batch-{batch}"), "{ctx}: id {}", v["id"]);
    let outputs = v["outputs"].as_array().with_context(|| format!("{ctx}: no outputs: {v}"))?;
    ensure!(outputs.len() == 2, "{ctx}: {} outputs", outputs.len());
    for output in outputs {
        ensure!(output["shape"] == json!([batch, 16]), "{ctx}: {} shape {}", output["name"], output["shape"]);
        let data: Vec<f32> = serde_json::from_value(output["data"].clone())?;
        let expected: Vec<f32> = match output["name"].as_str() {
            Some("OUTPUT0") => a.iter().zip(&b).map(|(x, y)| x + y).collect(),
            Some("OUTPUT1") => a.iter().zip(&b).map(|(x, y)| x - y).collect(),
            other => bail!("{ctx}: unexpected output {other:?}"),
        };
        ensure!(data == expected, "{ctx}: batch {batch}: {} is wrong", output["name"]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_infer_requests_get_precise_errors_over_h1_and_h2() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let cases = cases();
    let mut failures = Vec::new();
    for (proto, client) in clients()? {
        for case in &cases {
            if let Err(e) = check_case(&client, &server, proto, case).await {
                failures.push(format!("{e:#}"));
            }
        }
    }
    ensure!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len() * 2, failures.join("\n"));
    // The server is unharmed: valid requests still get correct answers on both protocols.
    for (proto, client) in clients()? {
        check_add_sub(&client, &server, 1, proto).await?;
        check_add_sub(&client, &server, 3, proto).await?;
    }
    server.shutdown().await
}

/// add_sub's max_batch_size is 8: a request of 20 items is split across batches and
/// its answers joined in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_larger_than_max_batch_size_is_split_and_correct() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let meta: Value = reqwest::get(server.url("/v2/models/add_sub")).await?.json().await?;
    ensure!(meta["inputs"][0]["shape"] == json!([-1, 16]), "add_sub metadata changed: {meta}");
    for (proto, client) in clients()? {
        check_add_sub(&client, &server, 20, proto).await?;
        check_add_sub(&client, &server, 8, proto).await?;
        check_add_sub(&client, &server, 9, proto).await?;
    }
    let stats: Value = reqwest::get(server.url("/v2/models/add_sub/stats")).await?.json().await?;
    let executions = stats["model_stats"][0]["execution_count"].as_u64().context("execution_count")?;
    let items = stats["model_stats"][0]["inference_count"].as_u64().context("inference_count")?;
    ensure!(items == 2 * (20 + 8 + 9), "inference_count {items}");
    // No batch exceeds 8, so at least ceil(20/8) + 1 + ceil(9/8) batches per protocol.
    ensure!(executions >= 2 * (3 + 1 + 2), "execution_count {executions}: batches were not split");
    server.shutdown().await
}

/// Writes `prefix` on a raw connection and never sends more; returns how long the
/// server took to close it (or an error if it stayed open past `limit`).
async fn time_until_closed(server: &TestServer, prefix: &[u8], limit: Duration) -> anyhow::Result<Duration> {
    let mut stream = tokio::net::TcpStream::connect(server.addr).await?;
    let started = Instant::now();
    stream.write_all(prefix).await?;
    stream.flush().await?;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(started.elapsed()).unwrap_or_default();
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => bail!(
                "the server kept a connection with an unfinished request open for {:?}; received {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that sends part of its request headers and then nothing is cut off after
/// the header read timeout (10 s), while other clients are served normally meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_client_is_disconnected_and_others_are_served() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let partial = b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: appl";
    let slow = time_until_closed(&server, partial, Duration::from_secs(15));
    let normal = async {
        // Give the slow connection a head start, then use the server normally.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        for (proto, client) in clients()? {
            check_add_sub(&client, &server, 2, proto).await?;
        }
        anyhow::Ok(started.elapsed())
    };
    let (slow, normal) = tokio::join!(slow, normal);
    let (slow, normal) = (slow?, normal?);
    ensure!(normal < Duration::from_secs(5), "normal requests took {normal:?} while a slow client waited");
    ensure!(slow >= Duration::from_secs(5), "the slow connection was closed after only {slow:?}");
    ensure!(slow <= Duration::from_secs(15), "the slow connection stayed open {slow:?}");
    // And the server still works afterwards.
    let [(proto, client), _] = clients()?;
    check_add_sub(&client, &server, 1, proto).await?;
    server.shutdown().await
}

/// A connection that sends nothing, or only the start of the HTTP/2 preface, is closed
/// after the header deadline (hyper's own timeout starts only once it chose a protocol).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_never_sends_a_request_is_closed() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let limit = Duration::from_secs(15);
    let (silent, preface) =
        tokio::join!(time_until_closed(&server, b"", limit), time_until_closed(&server, b"PRI * HTTP/2.0\r\n", limit),);
    silent.context("a connection that sends nothing")?;
    preface.context("a connection that sends part of the HTTP/2 preface")?;
    server.shutdown().await
}

/// Silent connections must not hold `max_connections` permits forever, which would
/// refuse everyone else without using any bandwidth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_do_not_exhaust_the_connection_cap() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.limits.max_connections = 4;
    let server = TestServer::start(config).await?;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await?);
    }
    // Past the 10 s header read timeout, the silent connections should be gone.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let client = reqwest::Client::builder().http1_only().build()?;
    check_add_sub(&client, &server, 1, "after silent connections").await?;
    drop(silent);
    server.shutdown().await
}
