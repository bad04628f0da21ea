//! The served OpenAPI document against the real server: `/openapi.json` must be an
//! OpenAPI 3.1.0 document listing every endpoint, and every real response — successes
//! and every error status kiln can be made to produce — must have a status the document
//! lists for that operation and a body that validates against the schema it declares.
//! The test fails whenever the document and the server disagree, in either direction.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use kiln_server::ErrorKind;
use kiln_tests::{ScratchRepository, TestServer, default_config, photo, test_models_config, workspace_root};
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Method};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single request; generous for unoptimised CPU inference.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const TOKEN: &str = "openapi-test-token";

/// Every endpoint kiln serves, as `(path template, method)`.
const ENDPOINTS: &[(&str, &str)] = &[
    ("/predict", "post"),
    ("/predict/batch", "post"),
    ("/health", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
    ("/v2", "get"),
    ("/v2/health/live", "get"),
    ("/v2/health/ready", "get"),
    ("/v2/models/{name}", "get"),
    ("/v2/models/{name}/versions/{version}", "get"),
    ("/v2/models/{name}/ready", "get"),
    ("/v2/models/{name}/versions/{version}/ready", "get"),
    ("/v2/models/{name}/stats", "get"),
    ("/v2/models/{name}/versions/{version}/stats", "get"),
    ("/v2/models/{name}/infer", "post"),
    ("/v2/models/{name}/versions/{version}/infer", "post"),
    ("/v2/repository/index", "post"),
    ("/v2/repository/models/{name}/load", "post"),
    ("/v2/repository/models/{name}/unload", "post"),
];

/// Endpoints that never need a token.
const PUBLIC: &[&str] = &["/health", "/metrics", "/openapi.json", "/v2/health/live", "/v2/health/ready"];

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Every error kind; the exhaustive match makes a new variant a compile error here.
fn all_error_kinds() -> Vec<ErrorKind> {
    use ErrorKind::*;
    let kinds = ErrorKind::ALL.to_vec();
    for kind in &kinds {
        match kind {
            InvalidRequest | RequestTimeout | Unauthorized | Forbidden | LoadFailed | NotFound | MethodNotAllowed
            | UnsupportedMediaType | InvalidMultipart | MissingField | EmptyFile | InvalidImage | TooManyFiles
            | PayloadTooLarge | ModelNotFound | InvalidParameter | Timeout | Overloaded | Unavailable | Internal => {}
        }
    }
    kinds
}

// ---------------------------------------------------------------------------------------
// The document
// ---------------------------------------------------------------------------------------

/// The parsed document and lookups into it.
#[derive(Debug)]
struct Spec {
    doc: Value,
}

impl Spec {
    async fn fetch(client: &Client, server: &TestServer) -> anyhow::Result<Self> {
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.get(server.url("/openapi.json")).send())
            .await
            .context("GET /openapi.json timed out")??;
        ensure!(resp.status() == 200, "GET /openapi.json: status {}", resp.status());
        let content_type = header(resp.headers(), "content-type");
        ensure!(content_type.starts_with("application/json"), "/openapi.json content-type {content_type:?}");
        let text = resp.text().await?;
        let doc: Value = serde_json::from_str(&text).context("/openapi.json is not JSON")?;
        ensure!(doc["openapi"] == "3.1.0", "openapi is {}, expected \"3.1.0\"", doc["openapi"]);
        ensure!(doc["paths"].is_object() && doc["components"]["schemas"].is_object(), "no paths or schemas");
        Ok(Self { doc })
    }

    /// Follows a local `$ref` (`#/...`) if `v` is one, repeatedly.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> anyhow::Result<&'a Value> {
        for _ in 0..16 {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else { return Ok(v) };
            let pointer = r.strip_prefix('#').with_context(|| format!("non-local $ref {r}"))?;
            v = self.doc.pointer(pointer).with_context(|| format!("$ref {r} does not resolve"))?;
        }
        bail!("$ref chain too long")
    }

    /// The path template matching a concrete path: literal segments must be equal,
    /// `{param}` segments match any non-empty segment; the most literal template wins.
    fn template(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or_default();
        let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        let concrete: Vec<&str> = path.split('/').collect();
        let paths = self.doc["paths"].as_object()?;
        paths
            .keys()
            .filter_map(|template| {
                let segments: Vec<&str> = template.split('/').collect();
                if segments.len() != concrete.len() {
                    return None;
                }
                let mut literal = 0;
                for (t, c) in segments.iter().zip(&concrete) {
                    if t.starts_with('{') && t.ends_with('}') {
                        if c.is_empty() {
                            return None;
                        }
                    } else if t == c {
                        literal += 1;
                    } else {
                        return None;
                    }
                }
                Some((literal, template))
            })
            .max_by_key(|(literal, _)| *literal)
            .map(|(_, t)| t.clone())
    }

    fn operation(&self, template: &str, method: &str) -> Option<&Value> {
        self.doc["paths"].get(template)?.get(method)
    }

    /// A validator for `schema` (a schema object from this document): the document's
    /// `components` ride along in the root so `#/components/...` references resolve.
    fn validator(&self, schema: &Value) -> anyhow::Result<jsonschema::Validator> {
        let mut root = schema.as_object().context("a schema is not an object")?.clone();
        root.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        root.insert("components".into(), self.doc["components"].clone());
        jsonschema::draft202012::new(&Value::Object(root)).map_err(|e| anyhow!("schema {schema} does not compile: {e}"))
    }

    fn validate(&self, schema: &Value, instance: &Value, ctx: &str) -> anyhow::Result<()> {
        let validator = self.validator(schema)?;
        let errors: Vec<String> =
            validator.iter_errors(instance).map(|e| format!("  at '{}': {e}", e.instance_path())).collect();
        ensure!(
            errors.is_empty(),
            "{ctx}: the body does not match the document's schema {schema}:\n{}\nbody: {instance}",
            errors.join("\n")
        );
        Ok(())
    }

    fn schema_named(&self, name: &str) -> anyhow::Result<&Value> {
        self.doc["components"]["schemas"].get(name).with_context(|| format!("components.schemas.{name} is missing"))
    }
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------
// Real requests and their checks
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Body {
    Empty,
    Json(Value),
    Raw { content_type: &'static str, bytes: Vec<u8>, header_len: Option<String> },
    Multipart(Vec<(&'static str, Vec<u8>)>),
}

#[derive(Debug)]
struct Exchange {
    method: Method,
    path: String,
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

/// What one test run has checked: `(template or "<unmatched>", method, status)`.
#[derive(Debug, Default)]
struct Checked(BTreeSet<(String, String, u16)>);

struct Harness<'a> {
    spec: &'a Spec,
    client: &'a Client,
    server: &'a TestServer,
    /// The server requires a bearer token on non-public endpoints.
    auth: bool,
    checked: Checked,
}

impl Harness<'_> {
    async fn send(&self, method: Method, path: &str, body: Body, token: Option<&str>) -> anyhow::Result<Exchange> {
        let mut req = self.client.request(method.clone(), self.server.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req = match body {
            Body::Empty => req,
            Body::Json(v) => req.json(&v),
            Body::Raw { content_type, bytes, header_len } => {
                let req = req.header("content-type", content_type).body(bytes);
                match header_len {
                    Some(n) => req.header("inference-header-content-length", n),
                    None => req,
                }
            }
            Body::Multipart(parts) => {
                req.multipart(parts.into_iter().enumerate().fold(Form::new(), |form, (i, (field, bytes))| {
                    form.part(field, Part::bytes(bytes).file_name(format!("{i}.jpg")))
                }))
            }
        };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, req.send())
            .await
            .with_context(|| format!("{method} {path} timed out"))??;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body =
            tokio::time::timeout(REQUEST_TIMEOUT, resp.bytes()).await.context("reading the body timed out")??;
        Ok(Exchange { method, path: path.to_string(), status, headers, body: body.to_vec() })
    }

    /// Sends the request, checks it against the document and expects `status`.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Body,
        token: Option<&str>,
        status: u16,
    ) -> anyhow::Result<Exchange> {
        if let (Body::Json(request), 200) = (&body, status) {
            self.check_request_body(path, request)?;
        }
        let ex = self.send(method, path, body, token).await?;
        let ctx = format!("{} {}", ex.method, ex.path);
        ensure!(
            ex.status == status,
            "{ctx}: status {} (expected {status}): {}",
            ex.status,
            String::from_utf8_lossy(&ex.body[..ex.body.len().min(500)])
        );
        self.check(&ex, token.is_some())?;
        Ok(ex)
    }

    /// A successful JSON request body must itself be valid per the document.
    fn check_request_body(&self, path: &str, request: &Value) -> anyhow::Result<()> {
        let Some(template) = self.spec.template(path) else { return Ok(()) };
        let Some(op) = self.spec.operation(&template, "post") else { return Ok(()) };
        if let Some(schema) = op.pointer("/requestBody/content/application~1json/schema") {
            self.spec.validate(schema, request, &format!("request body for POST {template}"))?;
        }
        Ok(())
    }

    /// Checks one real response against the document: the status is listed for the
    /// operation, the content type is declared, the body validates, documented headers
    /// are present, and authentication matches the operation's `security`.
    fn check(&mut self, ex: &Exchange, sent_token: bool) -> anyhow::Result<()> {
        let spec = self.spec;
        let method = ex.method.as_str().to_ascii_lowercase();
        let ctx = format!("{} {} -> {}", ex.method, ex.path, ex.status);
        let status_key = ex.status.to_string();
        let (label, response) = match spec.template(&ex.path) {
            None => {
                // No documented path: only the catch-all 404 is acceptable.
                ensure!(ex.status == 404, "{ctx}: an undocumented path answered {}", ex.status);
                let r = spec.doc.pointer("/components/responses/NotFound").context("components.responses.NotFound")?;
                ("<unmatched>".to_string(), r)
            }
            Some(template) => match spec.operation(&template, &method) {
                None => {
                    // An undocumented method on a documented path.
                    let item = &spec.doc["paths"][&template];
                    ensure!(
                        ex.status == 405,
                        "{ctx}: {method} is not documented for {template}, yet the server answered {}",
                        ex.status
                    );
                    let ops: Vec<&Value> = METHODS.iter().filter_map(|m| item.get(*m)).collect();
                    ensure!(!ops.is_empty(), "{template} has no operations");
                    for op in &ops {
                        ensure!(op["responses"].get("405").is_some(), "{ctx}: {template} does not document 405");
                    }
                    (template.clone(), &ops[0]["responses"]["405"])
                }
                Some(op) => {
                    let public = op.get("security").is_some_and(|s| s.as_array().is_some_and(Vec::is_empty));
                    ensure!(
                        public == PUBLIC.contains(&template.as_str()),
                        "{ctx}: {template} security in the document does not match the server's public endpoints"
                    );
                    if self.auth && !sent_token && !public && ex.status != 405 {
                        ensure!(ex.status == 401, "{ctx}: a guarded endpoint answered without a token");
                    }
                    if ex.status == 401 {
                        ensure!(!public, "{ctx}: a public endpoint answered 401");
                    }
                    let r = op["responses"].get(&status_key).with_context(|| {
                        let listed: Vec<&String> =
                            op["responses"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
                        format!(
                            "{ctx}: status {} is not documented for {method} {template} (documented: {listed:?})",
                            ex.status
                        )
                    })?;
                    (template.clone(), r)
                }
            },
        };
        let response = spec.resolve(response)?;
        self.check_content(ex, response, &ctx)?;
        self.checked.0.insert((label, method, ex.status));
        Ok(())
    }

    fn check_content(&self, ex: &Exchange, response: &Value, ctx: &str) -> anyhow::Result<()> {
        let spec = self.spec;
        let content_type = header(&ex.headers, "content-type");
        let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let content = response["content"].as_object().with_context(|| format!("{ctx}: response has no content"))?;
        let declared = content.get(&media).with_context(|| {
            format!("{ctx}: content-type {content_type:?} is not declared (declared: {:?})", content.keys())
        })?;
        // kiln's own response headers are documented where it sends them.
        let documented = response["headers"].as_object();
        for name in ["retry-after", "www-authenticate", "inference-header-content-length"] {
            let listed = documented.is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case(name)));
            ensure!(!ex.headers.contains_key(name) || listed, "{ctx}: header {name} is sent but not documented");
        }
        // Documented headers are sent (the binary-length header only with binary bodies).
        if let Some(headers) = documented {
            for name in headers.keys() {
                let present = ex.headers.contains_key(name.to_ascii_lowercase().as_str());
                if name.eq_ignore_ascii_case("inference-header-content-length") {
                    ensure!(
                        present == (media == "application/octet-stream"),
                        "{ctx}: {name} present: {present}, content-type {media}"
                    );
                } else {
                    ensure!(present, "{ctx}: documented header {name} is missing");
                }
            }
        }
        match media.as_str() {
            "application/json" => {
                let body: Value =
                    serde_json::from_slice(&ex.body).with_context(|| format!("{ctx}: body is not JSON"))?;
                let schema = declared.get("schema").with_context(|| format!("{ctx}: no schema"))?;
                spec.validate(schema, &body, ctx)?;
            }
            "application/octet-stream" => {
                // The binary tensor extension: a JSON header, validated as the JSON form.
                let n: usize = header(&ex.headers, "inference-header-content-length")
                    .parse()
                    .with_context(|| format!("{ctx}: bad Inference-Header-Content-Length"))?;
                let head = ex.body.get(..n).with_context(|| format!("{ctx}: header length {n} past the body"))?;
                let head: Value = serde_json::from_slice(head).with_context(|| format!("{ctx}: header not JSON"))?;
                let schema = content
                    .get("application/json")
                    .and_then(|c| c.get("schema"))
                    .with_context(|| format!("{ctx}: the binary form needs a JSON schema for its header"))?;
                spec.validate(schema, &head, ctx)?;
                let sizes: usize = head["outputs"]
                    .as_array()
                    .context("outputs")?
                    .iter()
                    .filter_map(|o| o["parameters"]["binary_data_size"].as_u64())
                    .map(|n| n as usize)
                    .sum();
                ensure!(ex.body.len() == n + sizes, "{ctx}: binary section is not the declared sizes");
            }
            "application/openmetrics-text" => {
                let text = std::str::from_utf8(&ex.body).with_context(|| format!("{ctx}: metrics not UTF-8"))?;
                ensure!(declared["schema"]["type"] == "string", "{ctx}: metrics schema is not a string");
                ensure!(text.trim_end().ends_with("# EOF"), "{ctx}: not OpenMetrics text: {text}");
            }
            other => bail!("{ctx}: the test does not know how to check {other}"),
        }
        Ok(())
    }

    /// Every `(template, method, status)` in `wanted` was checked.
    fn ensure_checked(&self, wanted: &[(&str, &str, u16)]) -> anyhow::Result<()> {
        let missing: Vec<_> =
            wanted.iter().filter(|(t, m, s)| !self.checked.0.contains(&(t.to_string(), m.to_string(), *s))).collect();
        ensure!(missing.is_empty(), "not checked: {missing:?}\nchecked: {:?}", self.checked.0);
        Ok(())
    }
}

fn harness<'a>(spec: &'a Spec, client: &'a Client, server: &'a TestServer, auth: bool) -> Harness<'a> {
    Harness { spec, client, server, auth, checked: Checked::default() }
}

/// Sends raw HTTP/1.1 bytes on a fresh connection, keeps it open (so an incomplete body
/// stalls) and parses the one response; for what reqwest cannot send.
async fn raw_exchange(server: &TestServer, method: Method, path: &str, request: &str) -> anyhow::Result<Exchange> {
    let mut stream = tokio::net::TcpStream::connect(server.addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |data: &[u8]| -> Option<usize> {
        let end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
        (data.len() >= end + length).then_some(end)
    };
    let read = async {
        loop {
            if complete(&received).is_some() {
                return anyhow::Ok(());
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read).await.with_context(|| format!("raw {method} {path} timed out"))??;
    let end = complete(&received).with_context(|| {
        format!("raw {method} {path}: incomplete response {:?}", String::from_utf8_lossy(&received))
    })?;
    let head = String::from_utf8_lossy(&received[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("raw {method} {path}: status line {status_line:?}"))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').with_context(|| format!("header line {line:?}"))?;
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            reqwest::header::HeaderValue::from_str(value.trim())?,
        );
    }
    Ok(Exchange { method, path: path.to_string(), status, headers, body: received[end..].to_vec() })
}

/// A request whose headers promise 1000 body bytes, followed by only `start`: the body stalls.
fn stalled(path: &str, content_type: &str, start: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: kiln\r\ncontent-type: {content_type}\r\ncontent-length: 1000\r\n\r\n{start}")
}

/// A request whose headers declare a body of 10 MB (over the tests' limits); none follows.
fn oversized(path: &str, content_type: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: kiln\r\ncontent-type: {content_type}\r\ncontent-length: 10000000\r\n\r\n")
}

/// A chunked request whose first chunk size is not hexadecimal: the body cannot be read.
fn broken_chunked(path: &str, content_type: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: kiln\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
    )
}

impl Harness<'_> {
    /// A raw request (see [`raw_exchange`]) checked against the document.
    async fn expect_raw(&mut self, path: &str, request: &str, status: u16) -> anyhow::Result<()> {
        let ex = raw_exchange(self.server, Method::POST, path, request).await?;
        ensure!(
            ex.status == status,
            "raw POST {path}: status {} (expected {status}): {}",
            ex.status,
            String::from_utf8_lossy(&ex.body)
        );
        self.check(&ex, false)
    }
}

fn add_sub_request(batch: usize) -> Value {
    let a: Vec<Vec<f32>> = (0..batch).map(|b| (0..16).map(|i| (b * 16 + i) as f32).collect()).collect();
    json!({
        "id": "req-1",
        "inputs": [
            {"name": "INPUT0", "shape": [batch, 16], "datatype": "FP32", "data": a},
            {"name": "INPUT1", "shape": [batch, 16], "datatype": "FP32", "data": vec![1.0f32; batch * 16]},
        ]
    })
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn document_is_openapi_3_1_and_lists_every_endpoint() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let client = Client::new();
    let spec = Spec::fetch(&client, &server).await?;
    let doc = &spec.doc;

    // Every endpoint, with exactly the documented methods.
    let paths = doc["paths"].as_object().context("paths")?;
    let wanted: BTreeSet<&str> = ENDPOINTS.iter().map(|(p, _)| *p).collect();
    let listed: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    ensure!(wanted == listed, "paths differ: missing {:?}, extra {:?}", &wanted - &listed, &listed - &wanted);
    for (path, method) in ENDPOINTS {
        let item = &paths[*path];
        let methods: Vec<&str> = METHODS.iter().copied().filter(|m| item.get(*m).is_some()).collect();
        ensure!(methods == [*method], "{path}: methods {methods:?}, expected [{method}]");
    }

    // The bearer scheme, applied to all but the public endpoints.
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    ensure!(scheme["type"] == "http" && scheme["scheme"] == "bearer", "bearer scheme: {scheme}");
    ensure!(doc["security"] == json!([{"bearer": []}]), "global security: {}", doc["security"]);
    for (path, method) in ENDPOINTS {
        let op = &paths[*path][*method];
        let public = PUBLIC.contains(path);
        let security = op.get("security");
        if public {
            ensure!(security == Some(&json!([])), "{path}: public, so security must be []");
        } else {
            ensure!(security.is_none() || security == Some(&doc["security"]), "{path}: security {security:?}");
            ensure!(op["responses"].get("401").is_some(), "{path}: guarded but 401 is not documented");
        }
        ensure!(op["responses"].get("200").is_some(), "{path}: no 200 response");
        ensure!(op["responses"].get("405").is_some(), "{path}: no 405 response");
        // Every response resolves, every error response is the Error schema (or a narrowing of it),
        // and every schema compiles.
        let responses = op["responses"].as_object().context("responses")?;
        for (status, response) in responses {
            let response = spec.resolve(response)?;
            let content = response["content"].as_object().with_context(|| format!("{path} {status}: no content"))?;
            for (media, m) in content {
                let Some(schema) = m.get("schema") else { bail!("{path} {status} {media}: no schema") };
                let validator = spec.validator(schema)?;
                let code: u16 = status.parse().with_context(|| format!("{path}: status {status}"))?;
                if code >= 400 {
                    ensure!(media == "application/json", "{path} {status}: errors are JSON, not {media}");
                    let sample = json!({"error": "x", "type": "internal"});
                    let wrong_type = json!({"error": "x", "type": "no_such_type"});
                    let extra = json!({"error": "x", "type": "not_found", "detail": 1});
                    ensure!(!validator.is_valid(&wrong_type), "{path} {status}: accepts an unknown type");
                    ensure!(!validator.is_valid(&extra), "{path} {status}: accepts extra fields");
                    ensure!(
                        validator.is_valid(&sample) == (code == 500),
                        "{path} {status}: the error schema does not narrow its type to the status"
                    );
                }
            }
        }
        if let Some(body) = op.get("requestBody") {
            for (media, m) in body["content"].as_object().context("requestBody content")? {
                let schema = m.get("schema").with_context(|| format!("{path} request {media}: no schema"))?;
                spec.validator(schema)?;
            }
        }
    }
    let multipart = |p: &str, field: &str| {
        doc["paths"][p]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
            .get(field)
            .is_some()
    };
    ensure!(multipart("/predict", "file"), "/predict: multipart field file");
    ensure!(multipart("/predict/batch", "files"), "/predict/batch: multipart field files");
    for p in ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"] {
        let content = &doc["paths"][p]["post"]["requestBody"]["content"];
        ensure!(content.get("application/json").is_some(), "{p}: JSON request body");
        ensure!(content.get("application/octet-stream").is_some(), "{p}: binary request body");
        let params = doc["paths"][p]["post"]["parameters"].as_array().context("infer parameters")?;
        let mut names = Vec::new();
        for param in params {
            names.push(spec.resolve(param)?["name"].as_str().unwrap_or_default().to_ascii_lowercase());
        }
        ensure!(names.contains(&"inference-header-content-length".to_string()), "{p}: parameters {names:?}");
    }
    for p in ["/predict", "/predict/batch"] {
        let mut names = BTreeSet::new();
        for param in doc["paths"][p]["post"]["parameters"].as_array().context("parameters")? {
            let param = spec.resolve(param)?;
            ensure!(param["in"] == "query", "{p}: {param}");
            names.insert(param["name"].as_str().unwrap_or_default().to_string());
        }
        let expected: BTreeSet<String> = ["model", "priority", "timeout_ms"].map(String::from).into();
        ensure!(names == expected, "{p}: query parameters {names:?}");
    }

    // The Error schema: exactly kiln's error types, and each status's narrowing lists
    // exactly the kinds with that status.
    let error = spec.schema_named("Error")?;
    ensure!(error["additionalProperties"] == false, "Error must be strict");
    let documented: BTreeSet<&str> = error["properties"]["type"]["enum"]
        .as_array()
        .context("Error.type.enum")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let kinds = all_error_kinds();
    let served: BTreeSet<&str> = kinds.iter().map(|k| k.type_name()).collect();
    ensure!(documented == served, "Error.type: documented {documented:?}, kiln has {served:?}");
    // The source's type-name table has no more names than the kinds listed above.
    let source = std::fs::read_to_string(workspace_root().join("server/src/error.rs"))?;
    let table = source.split("fn type_name").nth(1).context("type_name in error.rs")?;
    let table = table.split("\n    }\n").next().unwrap_or_default();
    let in_source = table.matches("=> \"").count();
    ensure!(in_source == served.len(), "error.rs has {in_source} type names, the test knows {}", served.len());
    let mut by_status: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
    for kind in &kinds {
        by_status.entry(kind.status().as_u16()).or_default().insert(kind.type_name());
    }
    for (status, types) in &by_status {
        let schema = spec.schema_named(&format!("Error{status}"))?;
        let validator = spec.validator(schema)?;
        for t in &served {
            let body = json!({"error": "message", "type": t});
            ensure!(
                validator.is_valid(&body) == types.contains(t),
                "Error{status}: type {t} accepted: {}, kiln's status for it is {}",
                validator.is_valid(&body),
                status
            );
        }
    }

    // The document's version is the server's.
    let meta: Value = client.get(server.url("/v2")).send().await?.json().await?;
    ensure!(
        doc["info"]["version"] == meta["version"],
        "info.version {} vs server {}",
        doc["info"]["version"],
        meta["version"]
    );
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_endpoints_match_the_document() -> anyhow::Result<()> {
    let mut config = default_config()?;
    config.limits.max_body_bytes = 400_000;
    config.limits.max_batch_files = 3;
    config.limits.body_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await?;
    let flower = photo("flower.jpg")?;
    let china = photo("china.jpg")?;
    ensure!(flower.len() + china.len() < 390_000, "the photos no longer fit the test's body limit");
    let client = Client::builder().http1_only().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, false);
    let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
    let one = |bytes: &[u8]| Body::Multipart(vec![("file", bytes.to_vec())]);

    // Successes.
    let ex = h.expect(post.clone(), "/predict", one(&flower), None, 200).await?;
    let v: Value = serde_json::from_slice(&ex.body)?;
    ensure!(v["prediction"]["label"] == "daisy", "{v}");
    let both = Body::Multipart(vec![("files", flower.clone()), ("files", china.clone())]);
    let ex = h.expect(post.clone(), "/predict/batch?priority=1&timeout_ms=60000", both, None, 200).await?;
    let v: Value = serde_json::from_slice(&ex.body)?;
    ensure!(v["predictions"].as_array().map(Vec::len) == Some(2), "{v}");
    h.expect(post.clone(), "/predict?model=efficientnet_lite0", one(&flower), None, 200).await?;
    h.expect(get.clone(), "/health", Body::Empty, None, 200).await?;
    h.expect(get.clone(), "/metrics", Body::Empty, None, 200).await?;
    h.expect(get.clone(), "/openapi.json", Body::Empty, None, 200).await?;
    h.expect(get.clone(), "/v2", Body::Empty, None, 200).await?;
    h.expect(get.clone(), "/v2/models/efficientnet_lite0", Body::Empty, None, 200).await?;
    h.expect(get.clone(), "/v2/models/efficientnet_lite0/stats", Body::Empty, None, 200).await?;

    // 400
    let junk = Body::Multipart(vec![("other", b"x".to_vec())]);
    h.expect(post.clone(), "/predict", junk.clone(), None, 400).await?;
    h.expect(post.clone(), "/predict/batch", junk, None, 400).await?;
    h.expect(post.clone(), "/predict", one(b""), None, 400).await?;
    h.expect(post.clone(), "/predict?priority=high", one(&flower), None, 400).await?;
    h.expect(post.clone(), "/predict?timeout_ms=0", one(&flower), None, 400).await?;
    h.expect(post.clone(), "/predict?priority=7", one(&flower), None, 400).await?;
    let four = Body::Multipart(vec![("files", b"a".to_vec()); 4]);
    h.expect(post.clone(), "/predict/batch", four, None, 400).await?;
    let broken = Body::Raw {
        content_type: "multipart/form-data; boundary=XYZ",
        bytes: b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc".to_vec(),
        header_len: None,
    };
    h.expect(post.clone(), "/predict", broken, None, 400).await?;
    // 404
    h.expect(post.clone(), "/predict?model=nope", one(&flower), None, 404).await?;
    h.expect(post.clone(), "/predict/batch?model=nope", one(&flower), None, 404).await?;
    h.expect(get.clone(), "/no/such/endpoint", Body::Empty, None, 404).await?;
    h.expect(get.clone(), "/v2/models/nope", Body::Empty, None, 404).await?;
    // 405
    h.expect(get.clone(), "/predict", Body::Empty, None, 405).await?;
    h.expect(get.clone(), "/predict/batch", Body::Empty, None, 405).await?;
    h.expect(post.clone(), "/health", Body::Empty, None, 405).await?;
    h.expect(delete.clone(), "/metrics", Body::Empty, None, 405).await?;
    h.expect(put.clone(), "/openapi.json", Body::Empty, None, 405).await?;
    // 413
    // (Sent raw: the server answers before reading the body, and a client still writing
    // a large body may see a broken pipe instead of the answer.)
    let form = "multipart/form-data; boundary=XYZ";
    h.expect_raw("/predict/batch", &oversized("/predict/batch", form), 413).await?;
    h.expect_raw("/predict", &oversized("/predict", form), 413).await?;
    // 415
    h.expect(post.clone(), "/predict", Body::Json(json!({"file": "x"})), None, 415).await?;
    h.expect(post.clone(), "/predict/batch", Body::Empty, None, 415).await?;
    // 422
    h.expect(post.clone(), "/predict", one(b"not an image at all"), None, 422).await?;
    let mixed = Body::Multipart(vec![("files", flower.clone()), ("files", b"GIF89a nope".to_vec())]);
    h.expect(post.clone(), "/predict/batch", mixed, None, 422).await?;

    // 408: a body that stops arriving; 400: a body that cannot be read.
    h.expect_raw("/predict", &stalled("/predict", form, "--XYZ\r\n"), 408).await?;
    h.expect_raw("/predict/batch", &stalled("/predict/batch", form, ""), 408).await?;
    h.expect_raw("/predict", &broken_chunked("/predict", form), 400).await?;

    h.ensure_checked(&[
        ("/predict", "post", 408),
        ("/predict/batch", "post", 408),
        ("/predict", "post", 200),
        ("/predict/batch", "post", 200),
        ("/health", "get", 200),
        ("/metrics", "get", 200),
        ("/openapi.json", "get", 200),
        ("/predict", "post", 400),
        ("/predict/batch", "post", 400),
        ("/predict", "post", 404),
        ("<unmatched>", "get", 404),
        ("/predict", "get", 405),
        ("/health", "post", 405),
        ("/predict/batch", "post", 413),
        ("/predict", "post", 413),
        ("/predict", "post", 415),
        ("/predict", "post", 422),
        ("/predict/batch", "post", 422),
    ])?;
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kserve_endpoints_match_the_document() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.limits.max_body_bytes = 1 << 20;
    config.limits.body_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await?;
    let client = Client::builder().http1_only().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, false);
    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);

    // Successes: every v2 endpoint, with and without a version.
    for path in [
        "/v2",
        "/v2/",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/add_sub",
        "/v2/models/all_types",
        "/v2/models/add_sub/versions/1",
        "/v2/models/add_sub/ready",
        "/v2/models/add_sub/versions/1/ready",
        "/v2/models/add_sub/stats",
        "/v2/models/identity_fp32/versions/1/stats",
    ] {
        h.expect(get.clone(), path, Body::Empty, None, 200).await?;
    }
    h.expect(post.clone(), "/v2/repository/index", Body::Empty, None, 200).await?;
    let ex = h.expect(post.clone(), "/v2/models/add_sub/infer", Body::Json(add_sub_request(2)), None, 200).await?;
    let v: Value = serde_json::from_slice(&ex.body)?;
    ensure!(v["id"] == "req-1" && v["outputs"].as_array().map(Vec::len) == Some(2), "{v}");
    // Requested outputs, JSON and binary mixed, with a version in the path.
    let mut request = add_sub_request(1);
    request["outputs"] = json!([{"name": "OUTPUT1"}, {"name": "OUTPUT0", "parameters": {"binary_data": true}}]);
    request["parameters"] = json!({"priority": 0, "timeout": 60_000_000});
    let ex = h.expect(post.clone(), "/v2/models/add_sub/versions/1/infer", Body::Json(request), None, 200).await?;
    ensure!(header(&ex.headers, "content-type") == "application/octet-stream", "binary output: {:?}", ex.headers);
    // A binary request: JSON header then raw data; JSON response.
    let head = json!({
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}],
    });
    let head_text = head.to_string();
    let mut bytes = head_text.clone().into_bytes();
    bytes.extend((0..16).flat_map(|i| (i as f32).to_le_bytes()));
    h.check_request_body("/v2/models/identity_fp32/infer", &head)?;
    let binary =
        Body::Raw { content_type: "application/octet-stream", bytes, header_len: Some(head_text.len().to_string()) };
    let ex = h.expect(post.clone(), "/v2/models/identity_fp32/infer", binary, None, 200).await?;
    let v: Value = serde_json::from_slice(&ex.body)?;
    ensure!(v["outputs"][0]["data"][15] == 15.0, "{v}");
    // Every datatype's output passes the response schema.
    let meta: Value =
        serde_json::from_slice(&h.send(get.clone(), "/v2/models/all_types", Body::Empty, None).await?.body)?;
    let mut inputs = Vec::new();
    for input in meta["inputs"].as_array().context("all_types inputs")? {
        let dtype = input["datatype"].as_str().context("datatype")?;
        let data = match dtype {
            "BOOL" => json!([true, false, true, false]),
            "BYTES" => json!(["a", "bc", "", "d"]),
            "FP16" | "FP32" | "FP64" => json!([1.5, "NaN", "Infinity", "-Infinity"]),
            _ => json!([1, 2, 3, 4]),
        };
        inputs.push(json!({"name": input["name"], "shape": [1, 4], "datatype": dtype, "data": data}));
    }
    h.expect(post.clone(), "/v2/models/all_types/infer", Body::Json(json!({"inputs": inputs})), None, 200).await?;

    // 400
    h.expect(post.clone(), "/v2/models/add_sub/infer", Body::Json(json!({"inputs": []})), None, 400).await?;
    let raw = |s: &str| Body::Raw { content_type: "application/json", bytes: s.as_bytes().to_vec(), header_len: None };
    h.expect(post.clone(), "/v2/models/add_sub/infer", raw("{not json"), None, 400).await?;
    h.expect(post.clone(), "/v2/models/add_sub/versions/1/infer", raw("[]"), None, 400).await?;
    // 404
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/stats",
        "/v2/models/add_sub/versions/9",
        "/v2/models/add_sub/versions/9/ready",
        "/v2/models/add_sub/versions/x/stats",
        "/v2/nothing",
    ] {
        h.expect(get.clone(), path, Body::Empty, None, 404).await?;
    }
    h.expect(post.clone(), "/v2/models/nope/infer", Body::Json(add_sub_request(1)), None, 404).await?;
    h.expect(post.clone(), "/v2/models/add_sub/versions/2/infer", Body::Json(add_sub_request(1)), None, 404).await?;
    // 405
    h.expect(post.clone(), "/v2", Body::Empty, None, 405).await?;
    h.expect(post.clone(), "/v2/health/live", Body::Empty, None, 405).await?;
    h.expect(delete.clone(), "/v2/health/ready", Body::Empty, None, 405).await?;
    h.expect(get.clone(), "/v2/repository/index", Body::Empty, None, 405).await?;
    for path in [
        "/v2/models/add_sub",
        "/v2/models/add_sub/versions/1",
        "/v2/models/add_sub/ready",
        "/v2/models/add_sub/versions/1/ready",
        "/v2/models/add_sub/stats",
        "/v2/models/add_sub/versions/1/stats",
        "/v2/models/add_sub/infer",
        "/v2/models/add_sub/versions/1/infer",
    ] {
        h.expect(delete.clone(), path, Body::Empty, None, 405).await?;
    }
    // 403: model management is disabled without an admin token.
    h.expect(post.clone(), "/v2/repository/models/add_sub/load", Body::Empty, None, 403).await?;
    h.expect(post.clone(), "/v2/repository/models/add_sub/unload", Body::Empty, None, 403).await?;
    h.expect(get.clone(), "/v2/repository/models/add_sub/load", Body::Empty, None, 405).await?;
    h.expect(get.clone(), "/v2/repository/models/add_sub/unload", Body::Empty, None, 405).await?;
    // 413: a tiny body declaring a huge tensor, and a body over max_body_bytes.
    let huge = json!({"inputs": [{"name": "INPUT0", "shape": [1_000_000_000u64, 16], "datatype": "FP32"}]});
    h.expect(post.clone(), "/v2/models/identity_fp32/infer", Body::Json(huge), None, 413).await?;
    let path = "/v2/models/identity_fp32/versions/1/infer";
    h.expect_raw(path, &oversized(path, "application/json"), 413).await?;

    // 408: a body that stops arriving; 400: a body that cannot be read.
    for path in ["/v2/models/add_sub/infer", "/v2/models/add_sub/versions/1/infer"] {
        h.expect_raw(path, &stalled(path, "application/json", "{\"inputs\":"), 408).await?;
        h.expect_raw(path, &broken_chunked(path, "application/json"), 400).await?;
    }

    h.ensure_checked(&[
        ("/v2/models/{name}/infer", "post", 408),
        ("/v2/models/{name}/versions/{version}/infer", "post", 408),
        ("/v2", "get", 200),
        ("/v2/health/live", "get", 200),
        ("/v2/health/ready", "get", 200),
        ("/v2/models/{name}", "get", 200),
        ("/v2/models/{name}/versions/{version}", "get", 200),
        ("/v2/models/{name}/ready", "get", 200),
        ("/v2/models/{name}/versions/{version}/ready", "get", 200),
        ("/v2/models/{name}/stats", "get", 200),
        ("/v2/models/{name}/versions/{version}/stats", "get", 200),
        ("/v2/models/{name}/infer", "post", 200),
        ("/v2/models/{name}/versions/{version}/infer", "post", 200),
        ("/v2/repository/index", "post", 200),
        ("/v2/models/{name}/infer", "post", 400),
        ("/v2/models/{name}/versions/{version}/infer", "post", 400),
        ("/v2/models/{name}", "get", 404),
        ("/v2/models/{name}/infer", "post", 404),
        ("/v2/models/{name}/versions/{version}/infer", "post", 404),
        ("<unmatched>", "get", 404),
        ("/v2", "post", 405),
        ("/v2/repository/index", "get", 405),
        ("/v2/models/{name}/infer", "delete", 405),
        ("/v2/models/{name}/infer", "post", 413),
        ("/v2/models/{name}/versions/{version}/infer", "post", 413),
        ("/v2/repository/models/{name}/load", "post", 403),
        ("/v2/repository/models/{name}/unload", "post", 403),
        ("/v2/repository/models/{name}/load", "get", 405),
    ])?;
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_responses_match_the_document() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.auth.inference_token = Some(TOKEN.into());
    // The same token for model management: both are checked against one Authorization header.
    config.auth.admin_token = Some(TOKEN.into());
    let server = TestServer::start(config).await?;
    let client = Client::builder().http2_prior_knowledge().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, true);
    let (get, post) = (Method::GET, Method::POST);

    // Guarded endpoints: 401 without (or with a wrong) token, 200 with it.
    let guarded: Vec<(Method, &str, Body)> = vec![
        (get.clone(), "/v2", Body::Empty),
        (get.clone(), "/v2/models/add_sub", Body::Empty),
        (get.clone(), "/v2/models/add_sub/versions/1", Body::Empty),
        (get.clone(), "/v2/models/add_sub/ready", Body::Empty),
        (get.clone(), "/v2/models/add_sub/versions/1/ready", Body::Empty),
        (get.clone(), "/v2/models/add_sub/stats", Body::Empty),
        (get.clone(), "/v2/models/add_sub/versions/1/stats", Body::Empty),
        (post.clone(), "/v2/models/add_sub/infer", Body::Json(add_sub_request(1))),
        (post.clone(), "/v2/models/add_sub/versions/1/infer", Body::Json(add_sub_request(1))),
        (post.clone(), "/v2/repository/index", Body::Empty),
        (post.clone(), "/v2/repository/models/add_sub/load", Body::Empty),
    ];
    for (method, path, body) in guarded {
        h.expect(method.clone(), path, body.clone(), None, 401).await?;
        h.expect(method.clone(), path, body.clone(), Some("wrong-token"), 401).await?;
        h.expect(method, path, body, Some(TOKEN), 200).await?;
    }
    let form = Body::Multipart(vec![("file", b"x".to_vec())]);
    h.expect(post.clone(), "/predict", form.clone(), None, 401).await?;
    h.expect(post.clone(), "/predict/batch", form.clone(), None, 401).await?;
    // With a token, the image endpoints reach the handler: several models and no default.
    h.expect(post.clone(), "/predict", form.clone(), Some(TOKEN), 404).await?;
    h.expect(post.clone(), "/predict?model=add_sub", form, Some(TOKEN), 400).await?;
    // Model management with the token.
    let unload = "/v2/repository/models/identity_fp32/unload";
    h.expect(post.clone(), unload, Body::Empty, None, 401).await?;
    h.expect(post.clone(), unload, Body::Empty, Some(TOKEN), 200).await?;
    h.expect(post.clone(), unload, Body::Empty, Some(TOKEN), 404).await?;
    h.expect(get.clone(), "/v2/models/identity_fp32", Body::Empty, Some(TOKEN), 404).await?;
    h.expect(post.clone(), "/v2/repository/models/identity_fp32/load", Body::Empty, Some(TOKEN), 200).await?;
    h.expect(get.clone(), "/v2/models/identity_fp32", Body::Empty, Some(TOKEN), 200).await?;
    h.expect(post.clone(), "/v2/repository/models/no_such_model/load", Body::Empty, Some(TOKEN), 400).await?;
    h.expect(post.clone(), "/v2/repository/models/bad%20name/load", Body::Empty, Some(TOKEN), 404).await?;
    // Unknown paths are guarded too: 401 before 404.
    let ex = h.send(get.clone(), "/nowhere", Body::Empty, None).await?;
    ensure!(ex.status == 401, "unknown path without a token: {}", ex.status);

    // Public endpoints need no token.
    for path in PUBLIC {
        h.expect(get.clone(), path, Body::Empty, None, 200).await?;
    }
    let mut wanted: Vec<(&str, &str, u16)> = ENDPOINTS.iter().map(|(p, m)| (*p, *m, 401)).collect();
    wanted.retain(|(p, _, _)| !PUBLIC.contains(p));
    wanted.extend(PUBLIC.iter().map(|p| (*p, "get", 200)));
    wanted.extend([
        ("/v2/repository/models/{name}/load", "post", 200),
        ("/v2/repository/models/{name}/load", "post", 400),
        ("/v2/repository/models/{name}/load", "post", 404),
        ("/v2/repository/models/{name}/unload", "post", 200),
        ("/v2/repository/models/{name}/unload", "post", 404),
    ]);
    h.ensure_checked(&wanted)?;
    server.shutdown().await
}

/// 429 and 504 need a model that is busy: one executor, batches of one, one queue slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_and_deadline_responses_match_the_document() -> anyhow::Result<()> {
    let repo = ScratchRepository::with_config("openapi-overload", |c| {
        c.replace("max_batch_size = 8", "max_batch_size = 1").replace("[batching]", "[batching]\nmax_queue_size = 1")
    })?;
    let server = TestServer::start(repo.config()?).await?;
    let client = Client::builder().http2_prior_knowledge().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, false);
    let flower = photo("flower.jpg")?;

    for (query, wanted) in [("", 429u16), ("?timeout_ms=1", 504)] {
        let mut seen = false;
        for _round in 0..5 {
            let path = format!("/predict{query}");
            let sends =
                (0..24).map(|_| h.send(Method::POST, &path, Body::Multipart(vec![("file", flower.clone())]), None));
            let results = futures_util::future::join_all(sends).await;
            for ex in results {
                let ex = ex?;
                ensure!([200, 429, 504].contains(&ex.status), "{path}: status {}", ex.status);
                h.check(&ex, false)?;
                seen |= ex.status == wanted;
            }
            if seen {
                break;
            }
        }
        ensure!(seen, "no {wanted} from bursts on /predict{query}");
    }
    h.ensure_checked(&[("/predict", "post", 200), ("/predict", "post", 429), ("/predict", "post", 504)])?;
    server.shutdown().await
}

/// GET or POST on a `/v2/models/...` path that exists only with the other method is
/// 405, like any other method there (regression: these used to answer 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_other_method_on_a_model_path_is_405() -> anyhow::Result<()> {
    let server = TestServer::start(test_models_config()?).await?;
    let client = Client::builder().http1_only().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, false);
    let mut failures = Vec::new();
    for (method, path) in [
        (Method::GET, "/v2/models/add_sub/infer"),
        (Method::GET, "/v2/models/add_sub/versions/1/infer"),
        (Method::POST, "/v2/models/add_sub"),
        (Method::POST, "/v2/models/add_sub/versions/1"),
        (Method::POST, "/v2/models/add_sub/ready"),
        (Method::POST, "/v2/models/add_sub/stats"),
    ] {
        if let Err(e) = h.expect(method, path, Body::Empty, None, 405).await {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    server.shutdown().await
}

/// With distinct inference and admin tokens, model management takes the admin token
/// alone (regression: the inference token used to be demanded as well).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_management_works_with_a_distinct_admin_token() -> anyhow::Result<()> {
    let mut config = test_models_config()?;
    config.auth.inference_token = Some(TOKEN.into());
    config.auth.admin_token = Some("admin-token".into());
    let server = TestServer::start(config).await?;
    let client = Client::builder().http1_only().build()?;
    let spec = Spec::fetch(&client, &server).await?;
    let mut h = harness(&spec, &client, &server, true);
    let load = "/v2/repository/models/add_sub/load";
    h.expect(Method::POST, load, Body::Empty, Some(TOKEN), 401).await?;
    h.expect(Method::POST, load, Body::Empty, Some("admin-token"), 200).await?;
    server.shutdown().await
}
