//! What `kiln bench` sends: request templates built once before the run, so that making a
//! request costs a few reference-count increments, and the checks applied to each answer.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde_json::{Value, json};

use super::LoadError;
use super::v2::{self, Tensor};

/// The kinds of request body `kiln bench` can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadKind {
    /// `GET` the URL (health checks, trivial endpoints).
    Get,
    /// `POST` the file given by `--body` as is.
    Post,
    /// `POST /predict`: one image per request, cycling through `--images`.
    Predict,
    /// `POST /predict/batch`: `--batch-files` images per request.
    PredictBatch,
    /// KServe v2 inference request with JSON tensors.
    V2Json,
    /// KServe v2 inference request with binary tensors (binary tensor extension).
    V2Binary,
}

/// Where the requests' contents come from.
#[derive(Debug, Clone)]
pub struct PayloadSpec {
    pub kind: PayloadKind,
    /// Images for `predict` and `predict-batch` (searched recursively).
    pub images: Option<PathBuf>,
    /// Files per `/predict/batch` request.
    pub batch_files: usize,
    /// Model for `?model=` and the KServe routes.
    pub model: Option<String>,
    /// Size given to a dynamic leading (batch) dimension of KServe inputs.
    pub batch: usize,
    /// A KServe v2 JSON request whose tensors are sent instead of random ones.
    pub tensors: Option<PathBuf>,
    /// Body for `post`.
    pub body: Option<PathBuf>,
    pub content_type: String,
    /// Compare each `/predict` answer's label with the image's folder name.
    pub check_labels: bool,
    /// Extra request headers (authorization and the like).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Default for PayloadSpec {
    fn default() -> Self {
        Self {
            kind: PayloadKind::Get,
            images: None,
            batch_files: 4,
            model: None,
            batch: 1,
            tensors: None,
            body: None,
            content_type: "application/octet-stream".into(),
            check_labels: false,
            headers: Vec::new(),
        }
    }
}

/// What an answer must contain besides a 2xx status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expect {
    Status,
    /// `/predict`: `prediction.label`.
    Label(String),
    /// `/predict/batch`: `predictions[i].label`, in order.
    Labels(Vec<String>),
    /// KServe: a JSON header with an `outputs` array.
    V2Outputs,
}

/// One prepared request.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    method: Method,
    uri_h2: Uri,
    headers_h2: HeaderMap,
    /// The whole HTTP/1.1 request, head and body, as it goes on the wire.
    pub wire_h1: Bytes,
    pub body: Bytes,
    /// Inference items the request carries (images, batch rows): for items/s.
    pub items: u64,
    pub expect: Expect,
}

impl Template {
    fn new(target: &Target, method: Method, path: &str, headers: HeaderMap, body: Bytes) -> Result<Self, LoadError> {
        let bad = |e: http::Error| LoadError::InvalidArgument(format!("bad request path '{path}': {e}"));
        let _: Uri = path.parse().map_err(|e: http::uri::InvalidUri| bad(e.into()))?;
        let uri_h2 = Uri::builder()
            .scheme(target.scheme.as_str())
            .authority(target.authority.as_str())
            .path_and_query(path)
            .build()
            .map_err(bad)?;
        let wire_h1 = Bytes::from(wire(&method, path, &target.authority, &headers, &body));
        Ok(Self { method, uri_h2, headers_h2: headers, wire_h1, body, items: 1, expect: Expect::Status })
    }

    /// The HTTP/2 request head; the body goes separately.
    pub(crate) fn request_h2(&self) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri_h2.clone();
        *req.headers_mut() = self.headers_h2.clone();
        req
    }
}

/// Serialises an HTTP/1.1 request: request line, Host, the given headers, a
/// Content-Length when there is a body (or the method usually has one), then the body.
pub(crate) fn wire(method: &Method, path: &str, authority: &str, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\n").as_bytes());
    for (name, value) in headers {
        if name == HOST || name == http::header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Scheme, authority and path of the URL under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub authority: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, LoadError> {
        let bad = |why: &str| LoadError::InvalidArgument(format!("bad URL '{url}': {why}"));
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme (http:// or https://)"))?.to_string();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(default_port);
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        Ok(Self { scheme, host, port, authority: authority.as_str().to_string(), path })
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == "https"
    }

    /// The URL's own path, or `default` when the URL names none.
    fn endpoint(&self, default: &str) -> String {
        if self.path == "/" { default.to_string() } else { self.path.clone() }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.authority)
    }
}

/// The prepared requests of a run, used round-robin.
#[derive(Debug)]
pub struct Workload {
    pub(crate) templates: Vec<Template>,
    /// For reports: what was sent.
    pub description: String,
}

impl Workload {
    pub(crate) fn get(&self, i: usize) -> &Template {
        &self.templates[i % self.templates.len()]
    }

    /// Builds the templates; KServe payloads without `--tensors` read the model's input
    /// metadata from the server first.
    pub fn prepare(
        spec: &PayloadSpec,
        target: &Target,
        fetch: &dyn Fn(&str) -> Result<Bytes, LoadError>,
    ) -> Result<Self, LoadError> {
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            headers.append(k.clone(), v.clone());
        }
        let query = spec.model.as_ref().map(|m| format!("?model={}", path_escape(m))).unwrap_or_default();
        let (templates, description) = match spec.kind {
            PayloadKind::Get => {
                let t = Template::new(target, Method::GET, &target.path, headers, Bytes::new())?;
                (vec![t], format!("GET {}", target.path))
            }
            PayloadKind::Post => {
                let path = spec.body.as_ref().ok_or_else(|| arg("--payload post needs --body FILE"))?;
                headers.insert(CONTENT_TYPE, header_value(&spec.content_type)?);
                let body = read(path)?;
                let t = Template::new(target, Method::POST, &target.path, headers, Bytes::from(body))?;
                (vec![t], format!("POST {} ({})", target.path, path.display()))
            }
            PayloadKind::Predict | PayloadKind::PredictBatch => image_templates(spec, target, headers, &query)?,
            PayloadKind::V2Json | PayloadKind::V2Binary => v2_templates(spec, target, headers, fetch)?,
        };
        if templates.is_empty() {
            return Err(arg("nothing to send"));
        }
        Ok(Self { templates, description })
    }
}

fn image_templates(
    spec: &PayloadSpec,
    target: &Target,
    headers: HeaderMap,
    query: &str,
) -> Result<(Vec<Template>, String), LoadError> {
    let dir = spec.images.as_ref().ok_or_else(|| arg("--payload predict/predict-batch needs --images DIR"))?;
    let images = find_images(dir)?;
    let batch = spec.kind == PayloadKind::PredictBatch;
    let per_request = if batch { spec.batch_files.max(1) } else { 1 };
    let path = target.endpoint(if batch { "/predict/batch" } else { "/predict" }) + query;
    // Enough requests that every image is sent and batch requests mix images differently.
    let count = images.len().max(1);
    let mut templates = Vec::with_capacity(count);
    for start in 0..count {
        let picked: Vec<&(PathBuf, Vec<u8>, String)> =
            (0..per_request).map(|j| &images[(start * per_request + j) % images.len()]).collect();
        let boundary = format!("kiln-bench-{start:08x}");
        let field = if batch { "files" } else { "file" };
        let mut body = Vec::new();
        for (file, bytes, _) in &picked {
            let name = file.file_name().map(|n| n.to_string_lossy().replace('"', "")).unwrap_or_default();
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let mut h = headers.clone();
        h.insert(CONTENT_TYPE, header_value(&format!("multipart/form-data; boundary={boundary}"))?);
        let mut t = Template::new(target, Method::POST, &path, h, Bytes::from(body))?;
        t.items = per_request as u64;
        if spec.check_labels {
            let labels: Vec<String> = picked.iter().map(|(_, _, label)| label.clone()).collect();
            t.expect = if batch { Expect::Labels(labels) } else { Expect::Label(labels[0].clone()) };
        }
        templates.push(t);
    }
    let what = if batch { format!("{per_request} images") } else { "1 image".into() };
    Ok((templates, format!("POST {path} ({what} per request, {} files from {})", images.len(), dir.display())))
}

fn v2_templates(
    spec: &PayloadSpec,
    target: &Target,
    headers: HeaderMap,
    fetch: &dyn Fn(&str) -> Result<Bytes, LoadError>,
) -> Result<(Vec<Template>, String), LoadError> {
    let model = spec.model.as_deref().ok_or_else(|| arg("KServe payloads need --model NAME"))?;
    let escaped = path_escape(model);
    let path = target.endpoint(&format!("/v2/models/{escaped}/infer"));
    let (bodies, source): (Vec<Vec<Tensor>>, String) = match &spec.tensors {
        Some(file) => {
            let text = read(file)?;
            (vec![v2::tensors_from_request(&text)?], format!("tensors from {}", file.display()))
        }
        None => {
            let meta = fetch(&format!("/v2/models/{escaped}"))?;
            let inputs = v2::inputs_from_metadata(&meta, spec.batch)?;
            // A few different random bodies, so no cache along the way sees one request.
            let mut rng = fastrand::Rng::with_seed(0x6b69_6c6e);
            (
                (0..4).map(|_| v2::random_tensors(&inputs, &mut rng)).collect(),
                format!("random tensors, batch {}", spec.batch),
            )
        }
    };
    let binary = spec.kind == PayloadKind::V2Binary;
    let mut templates = Vec::new();
    for tensors in &bodies {
        let mut h = headers.clone();
        let items = tensors.first().and_then(|t| t.shape.first().copied()).unwrap_or(1).max(1) as u64;
        let body = if binary {
            let (header_len, body) = v2::encode_binary(tensors)?;
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(HeaderName::from_static("inference-header-content-length"), HeaderValue::from(header_len));
            body
        } else {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            v2::encode_json(tensors)?
        };
        let mut t = Template::new(target, Method::POST, &path, h, Bytes::from(body))?;
        t.items = items;
        if spec.check_labels {
            t.expect = Expect::V2Outputs;
        }
        templates.push(t);
    }
    let encoding = if binary { "binary" } else { "JSON" };
    Ok((templates, format!("POST {path} ({encoding} tensors, {source})")))
}

/// Checks an answer's body against what its request expects; `Err` says what was wrong.
pub(crate) fn check(expect: &Expect, body: &[u8]) -> Result<(), Mismatch> {
    let parse = || serde_json::from_slice::<Value>(body).map_err(|_| Mismatch::BadBody);
    match expect {
        Expect::Status => Ok(()),
        Expect::Label(want) => {
            let v = parse()?;
            let got = v.pointer("/prediction/label").and_then(Value::as_str).ok_or(Mismatch::BadBody)?;
            if got == want { Ok(()) } else { Err(Mismatch::WrongAnswer) }
        }
        Expect::Labels(want) => {
            let v = parse()?;
            let got = v.get("predictions").and_then(Value::as_array).ok_or(Mismatch::BadBody)?;
            let labels: Option<Vec<&str>> = got.iter().map(|p| p.get("label").and_then(Value::as_str)).collect();
            let labels = labels.ok_or(Mismatch::BadBody)?;
            if labels.len() == want.len() && labels.iter().zip(want).all(|(a, b)| a == b) {
                Ok(())
            } else {
                Err(Mismatch::WrongAnswer)
            }
        }
        Expect::V2Outputs => {
            // Binary answers put the JSON header first: read one JSON value, ignore the rest.
            let v = serde_json::Deserializer::from_slice(body)
                .into_iter::<Value>()
                .next()
                .and_then(Result::ok)
                .ok_or(Mismatch::BadBody)?;
            if v.get("outputs").is_some_and(Value::is_array) { Ok(()) } else { Err(Mismatch::BadBody) }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mismatch {
    BadBody,
    WrongAnswer,
}

/// Image files under `dir` (recursively, sorted), each with its parent folder's name as label.
fn find_images(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>, String)>, LoadError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| LoadError::io(&d, e))?;
        for entry in entries {
            let path = entry.map_err(|e| LoadError::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
                Some("jpg" | "jpeg" | "png")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(arg(&format!("no .jpg/.jpeg/.png files under {}", dir.display())));
    }
    files
        .into_iter()
        .map(|p| {
            let bytes = read(&p)?;
            let label =
                p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok((p, bytes, label))
        })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| LoadError::io(path, e))
}

fn header_value(v: &str) -> Result<HeaderValue, LoadError> {
    HeaderValue::from_str(v).map_err(|_| arg(&format!("'{v}' is not a valid header value")))
}

fn arg(msg: &str) -> LoadError {
    LoadError::InvalidArgument(msg.to_string())
}

fn path_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON summary of the payload for reports.
pub(crate) fn describe(spec: &PayloadSpec, workload: &Workload) -> Value {
    json!({ "kind": spec.kind, "description": workload.description, "distinct_requests": workload.templates.len() })
}
