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
use serde::Serialize;

use crate::AppState;
use crate::classify::{Classifier, Prediction};
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::model::{Model, ModelInput};
use crate::preprocess::{self, ImageError};

pub type HttpResponse = Response<Full<Bytes>>;

pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    Ok(route(&state, req).await.unwrap_or_else(|e| error_response(&e)))
}

async fn route(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/health") => health(state),
        (&Method::POST, "/predict") => predict(state, req, Arity::One).await,
        (&Method::POST, "/predict/batch") => predict(state, req, Arity::Many).await,
        (_, "/health" | "/predict" | "/predict/batch") => {
            Err(ApiError::new(ErrorKind::MethodNotAllowed, format!("{} is not allowed here", req.method())))
        }
        _ => Err(ApiError::new(ErrorKind::NotFound, "no such endpoint")),
    }
}

pub fn error_response(e: &ApiError) -> HttpResponse {
    let body = ErrorBody { error: &e.message, kind: e.kind.type_name() };
    let mut resp = json_response(e.kind.status(), &body);
    if e.kind == ErrorKind::Overloaded {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    // Serialising our own plain structs cannot fail; fall back to an empty object anyway.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[derive(Serialize)]
struct ModelStatus<'a> {
    name: &'a str,
    version: String,
    ready: bool,
}

fn health(state: &AppState) -> Result<HttpResponse, ApiError> {
    #[derive(Serialize)]
    struct Health<'a> {
        status: &'static str,
        models: Vec<ModelStatus<'a>>,
    }
    let mut models: Vec<ModelStatus<'_>> = state
        .models
        .values()
        .map(|m| ModelStatus { name: &m.name, version: m.version.to_string(), ready: true })
        .collect();
    models.sort_by(|a, b| a.name.cmp(b.name));
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

fn select_model<'a>(state: &'a AppState, query: Option<&str>) -> Result<&'a Arc<Model>, ApiError> {
    let requested = query
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "model").then(|| v.into_owned())));
    let name = match requested.as_deref() {
        Some(name) => name,
        None => state.default_model.as_deref().ok_or_else(|| {
            ApiError::new(ErrorKind::ModelNotFound, "several models are served; choose one with ?model=NAME")
        })?,
    };
    state.models.get(name).ok_or_else(|| ApiError::new(ErrorKind::ModelNotFound, "unknown model"))
}

/// Reads the multipart body and returns the contents of every `field` part, in order.
async fn read_files(state: &AppState, req: Request<Incoming>, arity: Arity) -> Result<Vec<Bytes>, ApiError> {
    let limit = state.limits.max_body_bytes;
    let too_large = || ApiError::new(ErrorKind::PayloadTooLarge, format!("the request body exceeds {limit} bytes"));
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::new(ErrorKind::UnsupportedMediaType, "expected a multipart/form-data body with a boundary")
    })?;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), limit).collect().await.map_err(|e| {
        if e.downcast_ref::<LengthLimitError>().is_some() {
            too_large()
        } else {
            ApiError::new(ErrorKind::InvalidMultipart, "the request body could not be read")
        }
    })?;
    let body = body.to_bytes();
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
        let mut data = vec![0.0f32; files.len() * item];
        for (i, (bytes, out)) in files.iter().zip(data.chunks_exact_mut(item)).enumerate() {
            let image = preprocess::decode(bytes).map_err(|e| image_error(e, multiple.then_some(i)))?;
            classifier.preprocess.run(&image, out);
        }
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
fn infer_options(query: Option<&str>) -> Result<InferOptions, ApiError> {
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
    let model = select_model(state, req.uri().query())?;
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
