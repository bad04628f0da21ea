//! End-to-end tests of the HTTP API: a real in-process kiln server on a loopback port,
//! exercised over HTTP/1.1 and HTTP/2 (h2c prior knowledge).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use kiln_tests::{TestServer, clients, default_config, photo, workspace_root};
use reqwest::multipart::{Form, Part};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;

const MODEL: &str = "efficientnet_lite0";
/// Upper bound for any single request; generous for unoptimised CPU inference.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A sample photo and its expected top-1 class.
#[derive(Debug, Clone, Copy)]
struct Sample {
    file: &'static str,
    label: &'static str,
    class_id: u64,
}

const FLOWER: Sample = Sample { file: "flower.jpg", label: "daisy", class_id: 985 };
const CHINA: Sample = Sample { file: "china.jpg", label: "palace", class_id: 698 };

fn part(bytes: Vec<u8>, file_name: &str) -> Part {
    Part::bytes(bytes).file_name(file_name.to_string())
}

fn single_form(bytes: Vec<u8>) -> Form {
    Form::new().part("file", part(bytes, "upload.jpg"))
}

fn batch_form(files: Vec<Vec<u8>>) -> Form {
    files
        .into_iter()
        .enumerate()
        .fold(Form::new(), |form, (i, bytes)| form.part("files", part(bytes, &format!("{i}.jpg"))))
}

/// Sends `req` (bounded by [`REQUEST_TIMEOUT`]) and returns the status and the JSON body.
async fn send(req: RequestBuilder) -> anyhow::Result<(StatusCode, Value)> {
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, req.send()).await.context("request timed out")??;
    let status = resp.status();
    let content_type =
        resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.bytes()).await.context("reading the body timed out")??;
    let json: Value = serde_json::from_slice(&body).with_context(|| {
        format!("status {status}: body is not JSON: {:?}", String::from_utf8_lossy(&body[..body.len().min(400)]))
    })?;
    ensure!(content_type.starts_with("application/json"), "status {status}: content-type {content_type:?}");
    Ok((status, json))
}

/// Checks one prediction object and returns its top-k scores.
fn check_prediction(p: &Value, expected: Sample, ctx: &str) -> anyhow::Result<Vec<f64>> {
    ensure!(p["label"] == expected.label, "{ctx}: label {} (expected {:?})", p["label"], expected.label);
    ensure!(p["class_id"] == expected.class_id, "{ctx}: class_id {} (expected {})", p["class_id"], expected.class_id);
    let score = p["score"].as_f64().with_context(|| format!("{ctx}: score missing in {p}"))?;
    ensure!(score > 0.0 && score <= 1.0, "{ctx}: score {score} outside (0, 1]");
    let top_k = p["top_k"].as_array().with_context(|| format!("{ctx}: top_k missing in {p}"))?;
    ensure!(top_k.len() == 5, "{ctx}: top_k has {} entries, expected 5", top_k.len());
    let mut scores = Vec::with_capacity(top_k.len());
    for (i, class) in top_k.iter().enumerate() {
        let s = class["score"].as_f64().with_context(|| format!("{ctx}: top_k[{i}] has no score: {class}"))?;
        ensure!(s > 0.0 && s <= 1.0, "{ctx}: top_k[{i}] score {s} outside (0, 1]");
        ensure!(class["label"].as_str().is_some_and(|l| !l.is_empty()), "{ctx}: top_k[{i}] has no label: {class}");
        ensure!(class["class_id"].as_u64().is_some(), "{ctx}: top_k[{i}] has no class_id: {class}");
        scores.push(s);
    }
    ensure!(scores.windows(2).all(|w| w[0] >= w[1]), "{ctx}: top_k not sorted descending: {scores:?}");
    let first = &top_k[0];
    ensure!(
        first["label"] == p["label"] && first["class_id"] == p["class_id"] && first["score"] == p["score"],
        "{ctx}: top_k[0] {first} differs from the prediction {p}"
    );
    let ids: std::collections::HashSet<u64> = top_k.iter().filter_map(|c| c["class_id"].as_u64()).collect();
    ensure!(ids.len() == 5, "{ctx}: top_k repeats a class: {top_k:?}");
    Ok(scores)
}

fn check_model_fields(body: &Value, ctx: &str) -> anyhow::Result<()> {
    ensure!(body["model"] == MODEL, "{ctx}: model {} in {body}", body["model"]);
    ensure!(body["model_version"] == "1", "{ctx}: model_version {} in {body}", body["model_version"]);
    Ok(())
}

/// POST /predict of one sample; checks the answer and returns its top-k scores.
async fn predict_one(client: &reqwest::Client, url: &str, sample: Sample, ctx: &str) -> anyhow::Result<Vec<f64>> {
    let (status, body) = send(client.post(url).multipart(single_form(photo(sample.file)?))).await?;
    ensure!(status == StatusCode::OK, "{ctx}: status {status}, body {body}");
    check_model_fields(&body, ctx)?;
    check_prediction(&body["prediction"], sample, ctx)
}

/// POST /predict/batch of `samples`; checks every prediction, in order, and returns their top-k scores.
async fn predict_batch(
    client: &reqwest::Client,
    url: &str,
    samples: &[Sample],
    ctx: &str,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let files = samples.iter().map(|s| photo(s.file)).collect::<anyhow::Result<Vec<_>>>()?;
    let (status, body) = send(client.post(url).multipart(batch_form(files))).await?;
    ensure!(status == StatusCode::OK, "{ctx}: status {status}, body {body}");
    check_model_fields(&body, ctx)?;
    let predictions = body["predictions"].as_array().with_context(|| format!("{ctx}: no predictions in {body}"))?;
    ensure!(predictions.len() == samples.len(), "{ctx}: {} predictions for {} files", predictions.len(), samples.len());
    predictions
        .iter()
        .zip(samples)
        .enumerate()
        .map(|(i, (p, s))| check_prediction(p, *s, &format!("{ctx}, file {i} ({})", s.file)))
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, ctx: &str) -> anyhow::Result<()> {
    ensure!(a.len() == b.len(), "{ctx}: {} vs {} scores", a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        ensure!((x - y).abs() <= tol, "{ctx}: score {i} differs: {x} vs {y} (tolerance {tol})");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn predict_single_photo_over_h1_and_h2() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    for (proto, client) in clients()? {
        for sample in [FLOWER, CHINA] {
            predict_one(&client, &server.url("/predict"), sample, &format!("{proto} {}", sample.file)).await?;
        }
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_predictions_keep_order_and_match_single_scores() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    for (proto, client) in clients()? {
        let flower = predict_one(&client, &server.url("/predict"), FLOWER, &format!("{proto} single flower")).await?;
        let china = predict_one(&client, &server.url("/predict"), CHINA, &format!("{proto} single china")).await?;
        let batch =
            predict_batch(&client, &server.url("/predict/batch"), &[FLOWER, CHINA, FLOWER], &format!("{proto} batch"))
                .await?;
        for (i, (got, want)) in batch.iter().zip([&flower, &china, &flower]).enumerate() {
            assert_close(got, want, 1e-5, &format!("{proto} batch file {i} vs single request"))?;
        }
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_larger_than_max_batch_size_is_split_and_kept_in_order() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    // max_batch_size is 8 in models/efficientnet_lite0/config.toml: 11 files make chunks of 8 + 3.
    let samples: Vec<Sample> = (0..11).map(|i| if i % 2 == 0 { FLOWER } else { CHINA }).collect();
    for (proto, client) in clients()? {
        let flower = predict_one(&client, &server.url("/predict"), FLOWER, &format!("{proto} single flower")).await?;
        let china = predict_one(&client, &server.url("/predict"), CHINA, &format!("{proto} single china")).await?;
        let batch =
            predict_batch(&client, &server.url("/predict/batch"), &samples, &format!("{proto} batch of 11")).await?;
        for (i, got) in batch.iter().enumerate() {
            let want = if i % 2 == 0 { &flower } else { &china };
            assert_close(got, want, 1e-5, &format!("{proto} batch of 11, file {i} vs single request"))?;
        }
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_query_parameter_selects_or_rejects() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    for (proto, client) in clients()? {
        let url = server.url(&format!("/predict?model={MODEL}"));
        predict_one(&client, &url, CHINA, &format!("{proto} ?model={MODEL}")).await?;
        let url = server.url(&format!("/predict?other=1&model={MODEL}"));
        predict_one(&client, &url, FLOWER, &format!("{proto} ?other=1&model={MODEL}")).await?;
        // Scheduling options within range are accepted.
        let url = server.url(&format!("/predict?model={MODEL}&priority=1&timeout_ms=60000"));
        predict_one(&client, &url, FLOWER, &format!("{proto} priority and timeout")).await?;
        // Query values are URL-decoded: %5F is '_'.
        let encoded = MODEL.replace('_', "%5F");
        let url = server.url(&format!("/predict?model={encoded}"));
        predict_one(&client, &url, FLOWER, &format!("{proto} ?model={encoded}")).await?;
        let url = server.url(&format!("/predict/batch?model={MODEL}"));
        predict_batch(&client, &url, &[CHINA, FLOWER], &format!("{proto} batch ?model={MODEL}")).await?;

        for path in ["/predict?model=nope", "/predict/batch?model=nope"] {
            let form = if path.contains("batch") {
                batch_form(vec![photo(FLOWER.file)?])
            } else {
                single_form(photo(FLOWER.file)?)
            };
            let (status, body) = send(client.post(server.url(path)).multipart(form)).await?;
            check_error(status, &body, StatusCode::NOT_FOUND, "model_not_found", &format!("{proto} POST {path}"))?;
        }
        // The connection (or stream) that carried the rejected request is still usable.
        predict_one(&client, &server.url("/predict"), FLOWER, &format!("{proto} after model_not_found")).await?;
    }
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reports_ok_and_lists_the_model() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    for (proto, client) in clients()? {
        let (status, body) = send(client.get(server.url("/health"))).await?;
        ensure!(status == StatusCode::OK, "{proto}: /health status {status}, body {body}");
        ensure!(body["status"] == "ok", "{proto}: /health status field {} in {body}", body["status"]);
        let models = body["models"].as_array().with_context(|| format!("{proto}: no models in {body}"))?;
        let model = models
            .iter()
            .find(|m| m["name"] == MODEL)
            .with_context(|| format!("{proto}: {MODEL} not listed in {body}"))?;
        ensure!(model["version"] == "1", "{proto}: version {} in {model}", model["version"]);
        ensure!(model["ready"] == true, "{proto}: model not ready: {model}");
    }
    server.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Error cases
// ---------------------------------------------------------------------------------------

/// Fragments that would betray server-side paths or source locations in a client message.
fn leaks(message: &str) -> Option<String> {
    let root = workspace_root();
    let root = root.to_string_lossy();
    let fragments = ["/work", ".kiln", "/home", "/root", "/tmp", "/usr", "/src/", ".rs:", "model.onnx", "config.toml"];
    fragments.iter().map(|f| f.to_string()).chain([root.into_owned()]).find(|f| message.contains(f.as_str()))
}

fn check_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str, ctx: &str) -> anyhow::Result<()> {
    ensure!(status == want, "{ctx}: status {status}, expected {want}; body {body}");
    ensure!(body["type"] == kind, "{ctx}: type {} expected {kind:?}; body {body}", body["type"]);
    let message = body["error"].as_str().with_context(|| format!("{ctx}: no error message in {body}"))?;
    ensure!(!message.trim().is_empty(), "{ctx}: empty error message");
    if let Some(fragment) = leaks(message) {
        bail!("{ctx}: error message {message:?} leaks {fragment:?}");
    }
    let keys: Vec<&String> = body.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    ensure!(keys.len() == 2, "{ctx}: error body has fields {keys:?}, expected error and type");
    Ok(())
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Raw {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
    /// `(field name, file bytes)` parts, in order.
    Multipart(Vec<(&'static str, Vec<u8>)>),
}

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    body: Body,
    status: StatusCode,
    kind: &'static str,
}

impl Case {
    fn new(
        name: &'static str,
        method: Method,
        path: &'static str,
        body: Body,
        status: u16,
        kind: &'static str,
    ) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
        Self { name, method, path, body, status, kind }
    }

    fn request(&self, client: &reqwest::Client, server: &TestServer) -> RequestBuilder {
        let req = client.request(self.method.clone(), server.url(self.path));
        match &self.body {
            Body::None => req,
            Body::Raw { content_type, bytes } => {
                req.header(reqwest::header::CONTENT_TYPE, *content_type).body(bytes.clone())
            }
            Body::Multipart(parts) => {
                let form = parts.iter().enumerate().fold(Form::new(), |f, (i, (field, bytes))| {
                    f.part(*field, part(bytes.clone(), &format!("{i}.jpg")))
                });
                req.multipart(form)
            }
        }
    }
}

async fn run_cases(server: &TestServer, cases: &[Case]) -> anyhow::Result<()> {
    for (proto, client) in clients()? {
        for case in cases {
            let ctx = format!("{proto} {} ({} {})", case.name, case.method, case.path);
            let (status, body) = send(case.request(&client, server)).await.with_context(|| ctx.clone())?;
            check_error(status, &body, case.status, case.kind, &ctx)?;
        }
    }
    Ok(())
}

fn jpeg_header_then_garbage() -> Vec<u8> {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00];
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    bytes
}

fn png_header_then_garbage() -> Vec<u8> {
    let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8));
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_get_json_errors_and_the_server_stays_healthy() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    let flower = photo(FLOWER.file)?;
    let text = b"this is a plain text file, not an image\n".repeat(20);
    let json = br#"{"file": "flower.jpg"}"#.to_vec();
    let post = Method::POST;
    let cases = vec![
        Case::new(
            "json body",
            post.clone(),
            "/predict",
            Body::Raw { content_type: "application/json", bytes: json.clone() },
            415,
            "unsupported_media_type",
        ),
        Case::new(
            "json body (batch)",
            post.clone(),
            "/predict/batch",
            Body::Raw { content_type: "application/json", bytes: json },
            415,
            "unsupported_media_type",
        ),
        Case::new(
            "multipart without boundary",
            post.clone(),
            "/predict",
            Body::Raw { content_type: "multipart/form-data", bytes: flower.clone() },
            415,
            "unsupported_media_type",
        ),
        Case::new("no body, no content type", post.clone(), "/predict", Body::None, 415, "unsupported_media_type"),
        Case::new(
            "multipart body without parts",
            post.clone(),
            "/predict",
            Body::Raw { content_type: "multipart/form-data; boundary=abc", bytes: b"garbage garbage".to_vec() },
            400,
            "invalid_multipart",
        ),
        Case::new(
            "unterminated multipart part",
            post.clone(),
            "/predict",
            Body::Raw {
                content_type: "multipart/form-data; boundary=abc",
                bytes: b"--abc\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nxx".to_vec(),
            },
            400,
            "invalid_multipart",
        ),
        Case::new(
            "field named image instead of file",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("image", flower.clone())]),
            400,
            "missing_field",
        ),
        Case::new(
            "batch with field file instead of files",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("file", flower.clone())]),
            400,
            "missing_field",
        ),
        Case::new(
            "text file as image",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", text.clone())]),
            422,
            "invalid_image",
        ),
        Case::new(
            "empty file",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", Vec::new())]),
            400,
            "empty_file",
        ),
        Case::new(
            "empty file in a batch",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("files", flower.clone()), ("files", Vec::new())]),
            400,
            "empty_file",
        ),
        Case::new(
            "JPEG header then garbage",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", jpeg_header_then_garbage())]),
            422,
            "invalid_image",
        ),
        Case::new(
            "JPEG cut off halfway",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", flower[..flower.len() / 2].to_vec())]),
            422,
            "invalid_image",
        ),
        Case::new(
            "PNG header then garbage",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", png_header_then_garbage())]),
            422,
            "invalid_image",
        ),
        Case::new(
            "one bad file among good ones",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("files", flower.clone()), ("files", text), ("files", flower.clone())]),
            422,
            "invalid_image",
        ),
        Case::new(
            "priority outside the model's levels",
            post.clone(),
            "/predict?priority=9",
            Body::Multipart(vec![("file", flower.clone())]),
            400,
            "invalid_parameter",
        ),
        Case::new(
            "timeout that is not a number",
            post.clone(),
            "/predict?timeout_ms=soon",
            Body::Multipart(vec![("file", flower.clone())]),
            400,
            "invalid_parameter",
        ),
        Case::new(
            "zero timeout",
            post.clone(),
            "/predict/batch?timeout_ms=0",
            Body::Multipart(vec![("files", flower.clone())]),
            400,
            "invalid_parameter",
        ),
        Case::new("unknown path", Method::GET, "/nope", Body::None, 404, "not_found"),
        Case::new(
            "unknown path (POST)",
            post.clone(),
            "/predict/nope",
            Body::Multipart(vec![("file", flower.clone())]),
            404,
            "not_found",
        ),
        Case::new("GET /predict", Method::GET, "/predict", Body::None, 405, "method_not_allowed"),
        Case::new("GET /predict/batch", Method::GET, "/predict/batch", Body::None, 405, "method_not_allowed"),
        Case::new("POST /health", post, "/health", Body::None, 405, "method_not_allowed"),
    ];
    run_cases(&server, &cases).await?;

    // The index of the bad file is reported, so clients can tell which upload failed.
    let [(_, client), _] = clients()?;
    let files = vec![flower.clone(), b"not an image".to_vec(), flower];
    let (status, body) = send(client.post(server.url("/predict/batch")).multipart(batch_form(files))).await?;
    check_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_image", "batch with file 1 bad")?;
    let message = body["error"].as_str().unwrap_or_default();
    ensure!(message.contains('1'), "the error {message:?} does not name file 1");

    // Still healthy: valid requests over both protocols get correct answers.
    for (proto, client) in clients()? {
        predict_one(&client, &server.url("/predict"), FLOWER, &format!("{proto} after the errors")).await?;
        predict_batch(&client, &server.url("/predict/batch"), &[CHINA, FLOWER], &format!("{proto} after the errors"))
            .await?;
    }
    server.shutdown().await
}

/// Sends a raw HTTP/1.1 request whose body is chunked (no Content-Length), so the server
/// only learns the size while reading; returns the status code and the body text.
fn chunked_post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    // The server may answer 413 and close before the whole body is sent: ignore write errors.
    let _ = (|| -> std::io::Result<()> {
        for chunk in body.chunks(16 << 10) {
            stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
            stream.write_all(chunk)?;
            stream.write_all(b"\r\n")?;
        }
        stream.write_all(b"0\r\n\r\n")
    })();
    let mut response = Vec::new();
    // A reset after the response was sent is fine; what was read so far is the answer.
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status_line = text.lines().next().with_context(|| format!("no response: {text:?}"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_limits_are_enforced() -> anyhow::Result<()> {
    let mut config = default_config()?;
    config.limits.max_body_bytes = 100_000;
    config.limits.max_batch_files = 2;
    let server = TestServer::start(config).await?;
    let flower = photo(FLOWER.file)?;
    ensure!(flower.len() > 100_000, "flower.jpg is only {} bytes; the limit test needs > 100 kB", flower.len());
    let tiny = || b"tiny, not an image".to_vec();
    let post = Method::POST;
    let cases = vec![
        Case::new(
            "body over max_body_bytes",
            post.clone(),
            "/predict",
            Body::Multipart(vec![("file", flower.clone())]),
            413,
            "payload_too_large",
        ),
        Case::new(
            "batch body over max_body_bytes",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("files", flower.clone())]),
            413,
            "payload_too_large",
        ),
        Case::new(
            "too many files",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("files", tiny()), ("files", tiny()), ("files", tiny())]),
            400,
            "too_many_files",
        ),
        // Exactly max_batch_files files pass the count check and fail later, at decoding.
        Case::new(
            "max_batch_files files",
            post.clone(),
            "/predict/batch",
            Body::Multipart(vec![("files", tiny()), ("files", tiny())]),
            422,
            "invalid_image",
        ),
        // /predict reads only the first `file` part; more of them are not a batch.
        Case::new(
            "single predict with three file parts",
            post,
            "/predict",
            Body::Multipart(vec![("file", tiny()), ("file", tiny()), ("file", tiny())]),
            422,
            "invalid_image",
        ),
    ];
    run_cases(&server, &cases).await?;

    // Without Content-Length the limit is enforced while reading the body.
    let boundary = "kilnboundary7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"flower.jpg\"\r\n\
         Content-Type: image/jpeg\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&flower);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let addr = server.addr;
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let (status, text) = tokio::task::spawn_blocking(move || chunked_post(addr, "/predict", &content_type, &body))
        .await
        .context("chunked request task")??;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("chunked 413: body {text:?}"))?;
    let status = StatusCode::from_u16(status)?;
    check_error(status, &json, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "chunked body over the limit")?;

    for (proto, client) in clients()? {
        let (status, body) = send(client.get(server.url("/health"))).await?;
        ensure!(status == StatusCode::OK && body["status"] == "ok", "{proto}: /health after limits: {status} {body}");
    }
    server.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Concurrency and shutdown
// ---------------------------------------------------------------------------------------

/// A deterministic, well-mixed choice of sample for request `i`.
fn sample_for(i: usize) -> Sample {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    if h & 1 == 0 { FLOWER } else { CHINA }
}

/// A spawned request: its index, the sample it sent, and the task awaiting the answer.
type InFlight = (usize, Sample, tokio::task::JoinHandle<anyhow::Result<(StatusCode, Value)>>);

/// Spawns one /predict request per index, alternating HTTP/1.1 and h2c clients.
fn spawn_requests(server: &TestServer, n: usize) -> anyhow::Result<Vec<InFlight>> {
    let [(_, h1), (_, h2)] = clients()?;
    let flower = photo(FLOWER.file)?;
    let china = photo(CHINA.file)?;
    let url = server.url("/predict");
    Ok((0..n)
        .map(|i| {
            let sample = sample_for(i);
            let client = if i % 2 == 0 { h1.clone() } else { h2.clone() };
            let bytes = if sample.file == FLOWER.file { flower.clone() } else { china.clone() };
            let req = client.post(&url).multipart(single_form(bytes));
            (i, sample, tokio::spawn(send(req)))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_their_own_answers() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    // Reference scores from sequential requests.
    let [(_, h1), _] = clients()?;
    let flower_ref = predict_one(&h1, &server.url("/predict"), FLOWER, "reference flower").await?;
    let china_ref = predict_one(&h1, &server.url("/predict"), CHINA, "reference china").await?;

    let requests = spawn_requests(&server, 64)?;
    let (mut flowers, mut chinas) = (0, 0);
    for (i, sample, task) in requests {
        let proto = if i % 2 == 0 { "http/1.1" } else { "h2c" };
        let ctx = format!("request {i} ({proto}, {})", sample.file);
        let (status, body) = task.await.context("request task panicked")?.with_context(|| ctx.clone())?;
        ensure!(status == StatusCode::OK, "{ctx}: status {status}, body {body}");
        let scores = check_prediction(&body["prediction"], sample, &ctx)?;
        let reference = if sample.file == FLOWER.file { &flower_ref } else { &china_ref };
        assert_close(&scores, reference, 1e-5, &ctx)?;
        if sample.file == FLOWER.file { flowers += 1 } else { chinas += 1 }
    }
    ensure!(flowers > 0 && chinas > 0, "the mix is not mixed: {flowers} flowers, {chinas} chinas");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_in_flight_requests() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    let addr = server.addr;
    // Warm up both protocols so the 16 requests below are in flight, not still connecting.
    for (proto, client) in clients()? {
        predict_one(&client, &server.url("/predict"), FLOWER, &format!("{proto} warm-up")).await?;
    }
    let requests = spawn_requests(&server, 16)?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::time::timeout(Duration::from_secs(60), server.shutdown())
        .await
        .context("shutdown did not finish within 60 s")?
        .context("shutdown returned an error")?;

    let mut answered = 0;
    let mut failed = Vec::new();
    for (i, sample, task) in requests {
        let ctx = format!("request {i} ({})", sample.file);
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .with_context(|| format!("{ctx}: still running 10 s after shutdown returned"))?
            .context("request task panicked")?;
        match result {
            Ok((status, body)) => {
                ensure!(status == StatusCode::OK, "{ctx}: status {status} during shutdown, body {body}");
                check_prediction(&body["prediction"], sample, &ctx)?;
                answered += 1;
            }
            // Requests the server never started may fail at the connection level.
            Err(e) => failed.push(format!("{ctx}: {e:#}")),
        }
    }
    ensure!(answered > 0, "no request was answered during the graceful shutdown: {failed:?}");

    // After shutdown the port no longer accepts connections.
    let [(_, h1), _] = clients()?;
    let after = tokio::time::timeout(REQUEST_TIMEOUT, h1.get(format!("http://{addr}/health")).send()).await?;
    ensure!(after.is_err(), "the server still answers after shutdown: {after:?}");
    Ok(())
}

/// RFC 9110: a 405 answer must list what the resource accepts in `Allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_not_allowed_names_the_allowed_methods() -> anyhow::Result<()> {
    let server = TestServer::start(default_config()?).await?;
    let cases = [
        (Method::GET, "/predict", "POST"),
        (Method::PUT, "/predict/batch", "POST"),
        (Method::POST, "/health", "GET"),
        (Method::DELETE, "/metrics", "GET"),
        (Method::PUT, "/v2/health/live", "GET"),
        (Method::POST, "/v2", "GET"),
        (Method::GET, "/v2/models/efficientnet_lite0/infer", "POST"),
        (Method::PUT, "/v2/models/efficientnet_lite0/versions/1/infer", "POST"),
        (Method::POST, "/v2/models/efficientnet_lite0", "GET"),
        (Method::POST, "/v2/models/efficientnet_lite0/ready", "GET"),
        (Method::GET, "/v2/repository/index", "POST"),
    ];
    for (proto, client) in clients()? {
        for (method, path, allow) in &cases {
            let resp = client.request(method.clone(), server.url(path)).send().await?;
            let ctx = format!("{proto} {method} {path}");
            ensure!(resp.status() == StatusCode::METHOD_NOT_ALLOWED, "{ctx}: status {}", resp.status());
            let got = resp.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            ensure!(got == *allow, "{ctx}: Allow {got:?}, expected {allow:?}");
            let body: Value = resp.json().await?;
            ensure!(body["type"] == "method_not_allowed", "{ctx}: body {body}");
        }
    }
    server.shutdown().await
}
