//! Request routing and the prediction endpoints. Every handler returns
//! `Result<Response, ApiError>`; the error side is rendered by one function.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use kiln_batcher::InferOptions;
use kiln_engine::TensorData;
use serde::Serialize;

use crate::classify::{Classifier, Prediction};
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::model::{Model, ModelInput};
use crate::preprocess::{self, ImageError};
use crate::{AppState, Limits};

pub type HttpResponse = Response<Full<Bytes>>;

/// The OpenAPI 3.1 description of every endpoint; tests check real responses against it.
const OPENAPI: &str = include_str!("openapi.json");

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let started = std::time::Instant::now();
    let labels = metric_labels(&state, &req);
    // An error may be answered before the body was read; HTTP/1 cannot then reuse the
    // connection safely, so tell the client to open a new one instead of racing it.
    let close_on_error = req.version() < http::Version::HTTP_2
        && (req.headers().contains_key(CONTENT_LENGTH) || req.headers().contains_key(http::header::TRANSFER_ENCODING));
    let mut resp = route(&state, req).await.unwrap_or_else(|e| error_response(&e));
    if close_on_error && !resp.status().is_success() {
        resp.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some((endpoint, model)) = labels {
        state.metrics.observe_request(&model, endpoint, resp.status().as_u16(), started.elapsed());
    }
    Ok(resp)
}

/// (endpoint, model) labels for inference requests. The model label is only ever the
/// name of a loaded model (or empty), so clients cannot mint new time series.
fn metric_labels(state: &AppState, req: &Request<Incoming>) -> Option<(&'static str, String)> {
    let path = req.uri().path();
    let loaded = |name: &str| if state.repository.contains(name) { name.to_string() } else { String::new() };
    let endpoint = match path {
        "/predict" => "predict",
        "/predict/batch" => "predict_batch",
        _ if path.starts_with("/v2/models/") && path.ends_with("/infer") => {
            let name = path.trim_start_matches("/v2/models/").split('/').next().unwrap_or_default();
            return Some(("infer", loaded(name)));
        }
        _ => return None,
    };
    let requested = requested_model(req.uri().query());
    let model = match requested {
        Some(name) => loaded(&name),
        None => state.default_model.as_deref().map_or_else(String::new, loaded),
    };
    Some((endpoint, model))
}

async fn route(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path();
    if !is_public(path) {
        check_token(state.auth.inference_token.as_deref(), &req)?;
    }
    if path == "/v2" || path.starts_with("/v2/") {
        return crate::v2::route(state, req).await;
    }
    match (req.method(), path) {
        (&Method::GET, "/health") => health(state),
        (&Method::GET, "/openapi.json") => {
            let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(resp)
        }
        (&Method::GET, "/metrics") => {
            // Rendering reads /proc and, on GPU machines, NVML: keep it off the workers.
            let metrics = Arc::clone(&state.metrics);
            let text = tokio::task::spawn_blocking(move || metrics.render()).await.map_err(ApiError::internal)?;
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            Ok(resp)
        }
        (&Method::POST, "/predict") => predict(state, req, Arity::One).await,
        (&Method::POST, "/predict/batch") => predict(state, req, Arity::Many).await,
        (_, "/health" | "/metrics" | "/openapi.json") => Err(ApiError::method_not_allowed(req.method(), "GET")),
        (_, "/predict" | "/predict/batch") => Err(ApiError::method_not_allowed(req.method(), "POST")),
        _ => Err(ApiError::new(ErrorKind::NotFound, "no such endpoint")),
    }
}

/// Liveness, readiness and metrics stay open so orchestrators and scrapers need no token;
/// model management checks the admin token itself instead of the inference token.
fn is_public(path: &str) -> bool {
    if path.starts_with("/v2/repository/models/") {
        return true;
    }
    matches!(path, "/health" | "/metrics" | "/openapi.json" | "/v2/health/live" | "/v2/health/ready")
}

/// `Authorization: Bearer <token>` when a token is configured. The comparison takes the
/// same time wherever the first differing byte is.
pub(crate) fn check_token(expected: Option<&str>, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = expected else { return Ok(()) };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let same = given.len() == expected.len()
        && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same { Ok(()) } else { Err(ApiError::new(ErrorKind::Unauthorized, "missing or invalid bearer token")) }
}

pub fn error_response(e: &ApiError) -> HttpResponse {
    let body = ErrorBody { error: &e.message, kind: e.kind.type_name() };
    let mut resp = json_response(e.kind.status(), &body);
    match e.kind {
        ErrorKind::Overloaded => {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        ErrorKind::Unauthorized => {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        ErrorKind::MethodNotAllowed => {
            if let Some(allow) = e.allow {
                resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static(allow));
            }
        }
        _ => {}
    }
    resp
}

pub(crate) fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    // Serialising our own plain structs cannot fail; fall back to an empty object anyway.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[derive(Serialize)]
struct ModelStatus {
    name: String,
    version: String,
    ready: bool,
}

fn health(state: &AppState) -> Result<HttpResponse, ApiError> {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        models: Vec<ModelStatus>,
    }
    let mut models: Vec<ModelStatus> = state
        .repository
        .snapshot()
        .values()
        .flat_map(|versions| versions.values())
        .map(|m| ModelStatus { name: m.name.clone(), version: m.version.to_string(), ready: true })
        .collect();
    models.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    Ok(json_response(StatusCode::OK, &Health { status: "ok", models }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arity {
    One,
    Many,
}

impl Arity {
    fn field(self) -> &'static str {
        match self {
            Self::One => "file",
            Self::Many => "files",
        }
    }
}

/// The URL-decoded `model=` query parameter, if any.
fn requested_model(query: Option<&str>) -> Option<String> {
    query.and_then(|q| form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "model").then(|| v.into_owned())))
}

pub(crate) fn select_model(state: &AppState, query: Option<&str>) -> Result<Arc<Model>, ApiError> {
    let requested = requested_model(query);
    let name = match requested.as_deref() {
        Some(name) => name,
        None => state.default_model.as_deref().ok_or_else(|| {
            ApiError::new(ErrorKind::ModelNotFound, "several models are served; choose one with ?model=NAME")
        })?,
    };
    state.repository.get(name, None)
}

/// Reads the whole body, refusing (413) anything over `limit` — by the declared length
/// before reading, and by the bytes actually received for chunked bodies.
pub(crate) async fn read_body(req: Request<Incoming>, limits: &Limits) -> Result<Bytes, ApiError> {
    let limit = limits.max_body_bytes;
    let too_large = || ApiError::new(ErrorKind::PayloadTooLarge, format!("the request body exceeds {limit} bytes"));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // A client trickling its body must not hold a connection and a buffer forever.
    let collect = Limited::new(req.into_body(), limit).collect();
    let body = tokio::time::timeout(limits.body_read_timeout, collect)
        .await
        .map_err(|_| ApiError::new(ErrorKind::RequestTimeout, "the request body was not received in time"))?
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large()
            } else {
                ApiError::new(ErrorKind::InvalidRequest, "the request body could not be read")
            }
        })?;
    Ok(body.to_bytes())
}

/// Reads the multipart body and returns the contents of every `field` part, in order.
async fn read_files(state: &AppState, req: Request<Incoming>, arity: Arity) -> Result<Vec<Bytes>, ApiError> {
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::new(ErrorKind::UnsupportedMediaType, "expected a multipart/form-data body with a boundary")
    })?;
    let body = read_body(req, &state.limits).await?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let bad = |e: multer::Error| ApiError::new(ErrorKind::InvalidMultipart, format!("malformed multipart body: {e}"));
    let max_files = state.limits.max_batch_files;
    let mut files = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        if field.name() != Some(arity.field()) {
            continue;
        }
        if files.len() == max_files {
            return Err(ApiError::new(ErrorKind::TooManyFiles, format!("at most {max_files} files per request")));
        }
        files.push(field.bytes().await.map_err(bad)?);
        if arity == Arity::One {
            break;
        }
    }
    if files.is_empty() {
        return Err(ApiError::new(
            ErrorKind::MissingField,
            format!("the multipart field '{}' is missing", arity.field()),
        ));
    }
    Ok(files)
}

/// Decodes and preprocesses `files` on the blocking pool, each image written straight
/// into its slot of the request's input tensor.
async fn prepare(model: &Arc<Model>, files: Vec<Bytes>) -> Result<ModelInput, ApiError> {
    let model = Arc::clone(model);
    tokio::task::spawn_blocking(move || {
        let classifier = classifier(&model)?;
        let item = classifier.preprocess.item_len();
        let multiple = files.len() > 1;
        let decode =
            |i: usize, bytes: &Bytes| preprocess::decode(bytes).map_err(|e| image_error(e, multiple.then_some(i)));
        let data = if classifier.preprocess.is_uint8() {
            let mut data = vec![0u8; files.len() * item];
            for (i, (bytes, out)) in files.iter().zip(data.chunks_exact_mut(item)).enumerate() {
                classifier.preprocess.run_uint8(&decode(i, bytes)?, out).map_err(ApiError::internal)?;
            }
            TensorData::U8(data)
        } else {
            let mut data = vec![0.0f32; files.len() * item];
            for (i, (bytes, out)) in files.iter().zip(data.chunks_exact_mut(item)).enumerate() {
                classifier.preprocess.run(&decode(i, bytes)?, out).map_err(ApiError::internal)?;
            }
            TensorData::F32(data)
        };
        classifier.image_input(files.len(), data).map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

fn classifier(model: &Model) -> Result<&Classifier, ApiError> {
    model.classifier.as_ref().ok_or_else(|| {
        ApiError::new(ErrorKind::InvalidParameter, "this model takes tensors, not images: use /v2/models/{name}/infer")
    })
}

/// Scheduling options from the query string: `priority=N`, `timeout_ms=N`.
pub(crate) fn infer_options(query: Option<&str>) -> Result<InferOptions, ApiError> {
    let mut options = InferOptions::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = |name: &str| {
            value.parse::<u64>().map_err(|_| {
                ApiError::new(ErrorKind::InvalidParameter, format!("{name} must be a non-negative integer"))
            })
        };
        match key.as_ref() {
            "priority" => {
                let p = number("priority")?;
                options.priority = Some(u32::try_from(p).unwrap_or(u32::MAX));
            }
            "timeout_ms" => match number("timeout_ms")? {
                0 => return Err(ApiError::new(ErrorKind::InvalidParameter, "timeout_ms must be at least 1")),
                ms => options.timeout = Some(Duration::from_millis(ms)),
            },
            _ => {}
        }
    }
    Ok(options)
}

fn image_error(e: ImageError, index: Option<usize>) -> ApiError {
    let which = index.map_or_else(|| "the file".to_string(), |i| format!("file {i}"));
    match e {
        ImageError::Empty => ApiError::new(ErrorKind::EmptyFile, format!("{which} is empty")),
        ImageError::Decode(_) => ApiError::new(ErrorKind::InvalidImage, format!("{which} is not a JPEG or PNG image")),
    }
}

async fn predict(state: &AppState, req: Request<Incoming>, arity: Arity) -> Result<HttpResponse, ApiError> {
    let model = &select_model(state, req.uri().query())?;
    classifier(model)?;
    let options = infer_options(req.uri().query())?;
    let files = read_files(state, req, arity).await?;
    let input = prepare(model, files).await?;
    // Requests larger than max_batch_size are split across batches by the batcher.
    let outputs = model.batcher.infer_with(input, options).await?;
    let predictions = classifier(model)?.postprocess(&outputs).map_err(ApiError::internal)?;
    let version = model.version.to_string();
    match arity {
        Arity::One => {
            #[derive(Serialize)]
            struct One<'a> {
                model: &'a str,
                model_version: &'a str,
                prediction: &'a Prediction,
            }
            let prediction = predictions.first().ok_or_else(|| ApiError::internal("no prediction"))?;
            Ok(json_response(StatusCode::OK, &One { model: &model.name, model_version: &version, prediction }))
        }
        Arity::Many => {
            #[derive(Serialize)]
            struct Many<'a> {
                model: &'a str,
                model_version: &'a str,
                predictions: &'a [Prediction],
            }
            let body = Many { model: &model.name, model_version: &version, predictions: &predictions };
            Ok(json_response(StatusCode::OK, &body))
        }
    }
}
