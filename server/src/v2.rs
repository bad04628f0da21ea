//! KServe v2 / Open Inference Protocol endpoints (the REST API Triton's clients speak):
//! server and model metadata, health, and `infer` with JSON or binary tensors.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode};
use hyper::body::Incoming;
use kiln_batcher::{BatchError, InferOptions};
use kiln_engine::{Dim, Tensor, TensorData, TensorSpec};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ErrorKind};
use crate::http::{HttpResponse, check_token, json_response, read_body};
use crate::kserve::{self, DecodeLimits, InferOutput, InferRequest};
use crate::model::{Model, ModelInput};
use crate::repository::valid_name;

const HEADER_LEN: &str = "inference-header-content-length";
/// Protocol extensions kiln implements, as reported by `GET /v2`.
const EXTENSIONS: &[&str] = &["binary_tensor_data", "parameters", "statistics"];

pub async fn route(state: &AppState, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').skip(2).collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, []) => Ok(json_response(StatusCode::OK, &kserve::server_metadata(EXTENSIONS))),
        (&Method::GET, ["health", "live"]) => Ok(json_response(StatusCode::OK, &json!({"live": true}))),
        (&Method::GET, ["health", "ready"]) => Ok(json_response(StatusCode::OK, &json!({"ready": true}))),
        (&Method::GET, ["models", name, rest @ ..]) => {
            let (model, rest) = resolve(state, name, rest)?;
            match rest {
                [] => Ok(metadata(state, &model)),
                ["ready"] => {
                    let body = json!({"name": model.name, "version": model.version.to_string(), "ready": true});
                    Ok(json_response(StatusCode::OK, &body))
                }
                ["stats"] => Ok(json_response(StatusCode::OK, &statistics(&model))),
                ["infer"] => Err(ApiError::method_not_allowed(&method, "POST")),
                _ => Err(not_found()),
            }
        }
        (&Method::POST, ["models", name, rest @ ..]) => {
            let (model, rest) = resolve(state, name, rest)?;
            match rest {
                ["infer"] => infer(state, &model, req).await,
                [] | ["ready"] | ["stats"] => Err(ApiError::method_not_allowed(&method, "GET")),
                _ => Err(not_found()),
            }
        }
        (&Method::POST, ["repository", "index"]) => Ok(json_response(StatusCode::OK, &index(state))),
        (&Method::POST, ["repository", "models", name, action @ ("load" | "unload")]) => {
            let name = (*name).to_string();
            let action = *action;
            manage(state, &req, name, action).await
        }
        (_, ["health", _] | []) => Err(ApiError::method_not_allowed(&method, "GET")),
        (_, ["repository", ..]) => Err(ApiError::method_not_allowed(&method, "POST")),
        (_, ["models", .., "infer"]) => Err(ApiError::method_not_allowed(&method, "POST")),
        (_, ["models", ..]) => Err(ApiError::method_not_allowed(&method, "GET")),
        _ => Err(not_found()),
    }
}

/// `load` (re)reads a model from the repository directory, `unload` stops serving it.
/// Disabled unless an admin token is configured, and guarded by it.
async fn manage(
    state: &AppState,
    req: &Request<Incoming>,
    name: String,
    action: &str,
) -> Result<HttpResponse, ApiError> {
    let Some(token) = state.auth.admin_token.as_deref() else {
        return Err(ApiError::new(ErrorKind::Forbidden, "model management is disabled (no admin token configured)"));
    };
    check_token(Some(token), req)?;
    if !valid_name(&name) {
        return Err(ApiError::new(ErrorKind::ModelNotFound, "unknown model"));
    }
    if action == "unload" {
        // Dropping the last handle of a model joins its threads: keep that off the workers.
        let repository = Arc::clone(&state.repository);
        let target = name.clone();
        let unloaded =
            tokio::task::spawn_blocking(move || repository.unload(&target)).await.map_err(ApiError::internal)?;
        if !unloaded {
            return Err(ApiError::new(ErrorKind::ModelNotFound, "unknown model"));
        }
        tracing::info!(model = %name, "model unloaded");
        return Ok(json_response(StatusCode::OK, &json!({"name": name, "state": "UNAVAILABLE"})));
    }
    let repository = Arc::clone(&state.repository);
    let loaded = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || repository.load(&name)).await.map_err(ApiError::internal)?
    };
    match loaded {
        Ok(()) => Ok(json_response(StatusCode::OK, &json!({"name": name, "state": "READY"}))),
        Err(e) => {
            tracing::warn!(model = %name, error = %e, "model load failed; previous versions keep serving");
            Err(ApiError::new(
                ErrorKind::LoadFailed,
                format!("model {name} failed to load (see the server log); any previous versions keep serving"),
            ))
        }
    }
}

fn not_found() -> ApiError {
    ApiError::new(ErrorKind::NotFound, "no such endpoint")
}

/// `{name}` or `{name}/versions/{v}`; the name is only ever a map key, never a path.
fn resolve<'p>(state: &AppState, name: &str, rest: &'p [&'p str]) -> Result<(Arc<Model>, &'p [&'p str]), ApiError> {
    match rest {
        ["versions", v, tail @ ..] => {
            let version =
                v.parse::<u64>().map_err(|_| ApiError::new(ErrorKind::ModelNotFound, "unknown model version"))?;
            Ok((state.repository.get(name, Some(version))?, tail))
        }
        _ => Ok((state.repository.get(name, None)?, rest)),
    }
}

fn metadata(state: &AppState, model: &Model) -> HttpResponse {
    let table = state.repository.snapshot();
    let mut versions: Vec<String> =
        table.get(&model.name).map(|v| v.keys().map(u64::to_string).collect()).unwrap_or_default();
    versions.reverse(); // newest first
    let mut doc = kserve::model_metadata(&model.name, &versions, model.backend_name(), &model.metadata);
    doc.backend = Some(kserve::BackendDoc {
        requested: model.config.backend.name(),
        serving: model.serving.name(),
        engine: model.engine,
        precision: model.precision,
    });
    json_response(StatusCode::OK, &doc)
}

fn statistics(model: &Model) -> Value {
    let s = model.batcher.stats();
    json!({
        "model_stats": [{
            "name": model.name,
            "version": model.version.to_string(),
            "inference_count": s.items,
            "execution_count": s.batches,
            "queue_ns_total": u64::try_from(s.queue_time.as_nanos()).unwrap_or(u64::MAX),
            "compute_ns_total": u64::try_from(s.compute_time.as_nanos()).unwrap_or(u64::MAX),
            "rejected": s.rejected,
            "expired": s.expired,
            "cancelled": s.cancelled,
            "queued": s.queued_now,
            "queue_delay_us": u64::try_from(s.queue_delay.as_micros()).unwrap_or(u64::MAX),
        }]
    })
}

fn index(state: &AppState) -> Value {
    let mut entries: Vec<Value> = state
        .repository
        .snapshot()
        .values()
        .flat_map(|versions| versions.values())
        .map(|m| json!({"name": m.name, "version": m.version.to_string(), "state": "READY"}))
        .collect();
    entries
        .sort_by(|a, b| (a["name"].as_str(), a["version"].as_str()).cmp(&(b["name"].as_str(), b["version"].as_str())));
    Value::Array(entries)
}

/// Scheduling options from the request's `parameters`: `priority` and `timeout`
/// (microseconds, as in Triton's protocol).
fn options(parameters: &serde_json::Map<String, Value>) -> Result<InferOptions, ApiError> {
    let bad =
        |name: &str| ApiError::new(ErrorKind::InvalidParameter, format!("parameter {name} must be a positive integer"));
    let mut options = InferOptions::default();
    if let Some(p) = parameters.get("priority") {
        let p = p.as_u64().ok_or_else(|| bad("priority"))?;
        // Triton: 0 means the model's default level.
        if p > 0 {
            options.priority = Some(u32::try_from(p).unwrap_or(u32::MAX));
        }
    }
    if let Some(t) = parameters.get("timeout") {
        let us = t.as_u64().filter(|&us| us > 0).ok_or_else(|| bad("timeout"))?;
        options.timeout = Some(Duration::from_micros(us));
    }
    Ok(options)
}

/// Orders the request's tensors as the model declares its inputs, checking names,
/// datatypes, ranks, fixed axes and a common batch size.
fn model_input(model: &Model, request: &mut InferRequest) -> Result<ModelInput, ApiError> {
    let bad = |msg: String| ApiError::new(ErrorKind::InvalidParameter, msg);
    let specs = &model.metadata.inputs;
    if let Some(unknown) = request.inputs.iter().find(|i| !specs.iter().any(|s| s.name == i.name)) {
        return Err(bad(format!("the model has no input {:?}", unknown.name)));
    }
    let mut tensors = Vec::with_capacity(specs.len());
    for spec in specs {
        let position = request
            .inputs
            .iter()
            .position(|i| i.name == spec.name)
            .ok_or_else(|| bad(format!("input {:?} is missing", spec.name)))?;
        let input = request.inputs.swap_remove(position);
        check_tensor(spec, &input.tensor).map_err(|e| bad(format!("input {:?}: {e}", spec.name)))?;
        tensors.push(input.tensor);
    }
    if !request.inputs.is_empty() {
        return Err(bad("an input was given more than once".into()));
    }
    let batch = tensors.first().map(Tensor::batch);
    if tensors.iter().any(|t| Some(t.batch()) != batch) {
        return Err(bad("all inputs must have the same batch size (first axis)".into()));
    }
    Ok(ModelInput(tensors))
}

fn check_tensor(spec: &TensorSpec, tensor: &Tensor) -> Result<(), String> {
    if tensor.dtype() != spec.dtype {
        return Err(format!("datatype {} but the model expects {}", tensor.dtype(), spec.dtype));
    }
    let shape = tensor.shape();
    let fits = shape.len() == spec.shape.len()
        && shape.iter().zip(&spec.shape).all(|(&got, want)| matches!(want, Dim::Dynamic) || *want == Dim::Fixed(got));
    if !fits {
        return Err(format!("shape {shape:?} does not match the model's {:?}", spec.shape_i64()));
    }
    if shape.first() == Some(&0) {
        return Err("the batch axis is empty".into());
    }
    // ONNX strings are UTF-8: refuse here, not inside a batch shared with other clients.
    if let TensorData::Bytes(items) = tensor.data()
        && items.iter().any(|b| std::str::from_utf8(b).is_err())
    {
        return Err("BYTES elements must be UTF-8 for this model".into());
    }
    Ok(())
}

async fn infer(state: &AppState, model: &Arc<Model>, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let header_len = match req.headers().get(HEADER_LEN) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
            ApiError::new(ErrorKind::InvalidParameter, "Inference-Header-Content-Length must be a byte count")
        })?),
    };
    let body: Bytes = read_body(req, &state.limits).await?;
    let limits = DecodeLimits { max_tensor_elements: state.limits.max_tensor_elements, max_inputs: 64 };
    // Parsing up to max_body_bytes of JSON is CPU work: keep it off the async workers.
    let mut request = tokio::task::spawn_blocking(move || kserve::decode_infer_request(body, header_len, &limits))
        .await
        .map_err(ApiError::internal)??;
    let options = options(&request.parameters)?;
    // Resolve requested outputs before spending compute on the request.
    let specs = &model.metadata.outputs;
    let selection: Vec<(usize, bool)> = match &request.outputs {
        None => (0..specs.len()).map(|i| (i, request.binary_outputs_default)).collect(),
        Some(wanted) => wanted
            .iter()
            .map(|w| {
                specs.iter().position(|s| s.name == w.name).map(|i| (i, w.binary)).ok_or_else(|| {
                    ApiError::new(ErrorKind::InvalidParameter, format!("the model has no output {:?}", w.name))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let input = model_input(model, &mut request)?;
    let outputs = model.batcher.infer_with(input, options).await.map_err(|e| match e {
        // For tensors the item count is the batch axis the client declared.
        BatchError::BadItemCount { items, reason } => {
            ApiError::new(ErrorKind::InvalidParameter, format!("a batch of {items}: {reason}"))
        }
        other => ApiError::from(other),
    })?;
    let selected = selection
        .into_iter()
        .map(|(i, binary)| {
            let tensor = outputs.get(i).ok_or_else(|| ApiError::internal("output count mismatch"))?;
            Ok(InferOutput { name: &specs[i].name, tensor, binary })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let version = model.version.to_string();
    let (body, json_len) = kserve::encode_infer_response(&model.name, &version, request.id.as_deref(), &selected);
    let mut resp = json_response(StatusCode::OK, &());
    *resp.body_mut() = http_body_util::Full::new(Bytes::from(body));
    if let Some(n) = json_len {
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        headers.insert(HEADER_LEN, HeaderValue::from(n));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use kiln_engine::{DType, Dim, Tensor, TensorData, TensorSpec};

    use super::check_tensor;

    #[test]
    fn check_tensor_refuses_what_would_fail_a_shared_batch() -> Result<(), Box<dyn std::error::Error>> {
        let spec = TensorSpec { name: "s".into(), dtype: DType::Bytes, shape: vec![Dim::Dynamic, Dim::Fixed(2)] };
        let good = Tensor::new(vec![1, 2], TensorData::Bytes(vec![b"ok".to_vec(), "é".as_bytes().to_vec()]))?;
        assert!(check_tensor(&spec, &good).is_ok());
        let not_utf8 = Tensor::new(vec![1, 2], TensorData::Bytes(vec![b"ok".to_vec(), vec![0xff, 0xfe]]))?;
        assert!(check_tensor(&spec, &not_utf8).is_err_and(|e| e.contains("UTF-8")));
        let wrong_shape = Tensor::new(vec![1, 1], TensorData::Bytes(vec![b"x".to_vec()]))?;
        assert!(check_tensor(&spec, &wrong_shape).is_err());
        let empty = Tensor::new(vec![0, 2], TensorData::Bytes(vec![]))?;
        assert!(check_tensor(&spec, &empty).is_err());
        Ok(())
    }
}
