//! The KServe v2 / Open Inference Protocol REST codec: request decoding, response
//! encoding (JSON and the binary tensor data extension) and the metadata documents.
//! Pure functions over bytes, so the HTTP layer stays thin and the codec can be fuzzed.

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use half::f16;
use kiln_engine::{DType, Tensor, TensorData};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorKind};

#[derive(Debug, Clone, PartialEq)]
pub struct InferInput {
    pub name: String,
    pub tensor: Tensor,
    pub parameters: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    pub binary: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub inputs: Vec<InferInput>,
    pub outputs: Option<Vec<RequestedOutput>>,
    /// Request-level `parameters.binary_data_output`: the default for outputs that do not
    /// say, including every output when `outputs` is absent.
    pub binary_outputs_default: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_tensor_elements: usize,
    pub max_inputs: usize,
}

#[derive(Deserialize)]
#[serde(expecting = "an inference request object")]
struct RawRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
#[serde(expecting = "an input tensor object")]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<FlatData>,
}

#[derive(Deserialize)]
#[serde(expecting = "a requested output object")]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// One JSON element of `data`. The datatype may appear after `data` in the object, so
/// elements are kept untyped until the whole input is read; nesting is flattened on the fly.
enum Scalar {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Box<str>),
}

struct FlatData(Vec<Scalar>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        Flatten(&mut out).deserialize(d)?;
        Ok(FlatData(out))
    }
}

thread_local! {
    /// JSON elements the request being parsed may still hold. Untyped elements cost 24
    /// bytes each before the shape can be checked, so the parse itself must be bounded;
    /// parsing is synchronous on one thread, which makes a thread-local budget exact.
    static JSON_BUDGET: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Appends one JSON value to the vector, recursing into arrays (serde_json bounds the depth).
struct Flatten<'a>(&'a mut Vec<Scalar>);

impl Flatten<'_> {
    fn push<E: de::Error>(self, v: Scalar) -> Result<(), E> {
        let left = JSON_BUDGET.with(std::cell::Cell::get);
        if left == 0 {
            return Err(E::custom("tensor data has more elements than the server accepts"));
        }
        JSON_BUDGET.with(|b| b.set(left - 1));
        self.0.push(v);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor data (numbers, booleans, strings or nested arrays of them)")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Scalar::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Scalar::UInt(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Scalar::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Scalar::Str(v.into()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.push(Scalar::Str(v.into_boxed_str()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidParameter, message)
}

/// serde_json's messages describe the client's JSON (position, expected type, field name);
/// the `expecting` attributes above keep Rust type names out of them.
fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => bad("the inference request JSON ends unexpectedly"),
        Category::Syntax | Category::Io => {
            bad(format!("the inference request is not valid JSON (line {}, column {})", e.line(), e.column()))
        }
        Category::Data => bad(format!("invalid inference request: {e}")),
    }
}

fn bool_param(params: &Map<String, Value>, key: &str, owner: &str) -> Result<Option<bool>, ApiError> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("{owner}: parameters.{key} must be a boolean"))),
    }
}

/// Decodes an inference request. `header_len` is the `Inference-Header-Content-Length`
/// header: when present, the body is that many bytes of JSON followed by the binary data
/// of every input that declares `parameters.binary_data_size`, in input order.
pub fn decode_infer_request(
    body: Bytes,
    header_len: Option<usize>,
    limits: &DecodeLimits,
) -> Result<InferRequest, ApiError> {
    JSON_BUDGET.with(|b| b.set(limits.max_tensor_elements));
    let (header, mut binary) = match header_len {
        None => (&body[..], None),
        Some(n) => {
            let (header, binary) = body.split_at_checked(n).ok_or_else(|| {
                bad(format!("Inference-Header-Content-Length {n} exceeds the body length {}", body.len()))
            })?;
            (header, Some(binary))
        }
    };
    let raw: RawRequest = serde_json::from_slice(header).map_err(|e| json_error(&e))?;
    if raw.inputs.len() > limits.max_inputs {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("{} inputs exceed the limit of {}", raw.inputs.len(), limits.max_inputs),
        ));
    }
    let parameters = raw.parameters.unwrap_or_default();
    let binary_outputs_default = bool_param(&parameters, "binary_data_output", "request")?.unwrap_or(false);
    let inputs =
        raw.inputs.into_iter().map(|input| decode_input(input, &mut binary, limits)).collect::<Result<Vec<_>, _>>()?;
    if let Some(rest) = binary.filter(|rest| !rest.is_empty()) {
        return Err(bad(format!("{} bytes of binary data follow the last binary input", rest.len())));
    }
    let mut names = HashSet::with_capacity(inputs.len());
    if let Some(dup) = inputs.iter().find(|i| !names.insert(i.name.as_str())) {
        return Err(bad(format!("input '{}' appears more than once", dup.name)));
    }
    let outputs = raw
        .outputs
        .map(|outs| {
            outs.into_iter()
                .map(|out| {
                    let owner = format!("output '{}'", out.name);
                    let params = out.parameters.unwrap_or_default();
                    let binary = bool_param(&params, "binary_data", &owner)?.unwrap_or(binary_outputs_default);
                    Ok(RequestedOutput { name: out.name, binary })
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .transpose()?;
    Ok(InferRequest { id: raw.id, parameters, inputs, outputs, binary_outputs_default })
}

/// `binary` is the not-yet-consumed binary section, `None` without the header-length header.
fn decode_input(raw: RawInput, binary: &mut Option<&[u8]>, limits: &DecodeLimits) -> Result<InferInput, ApiError> {
    let name = raw.name;
    let dtype = DType::from_name(&raw.datatype)
        .ok_or_else(|| bad(format!("input '{name}': unknown datatype '{}'", raw.datatype)))?;
    let shape = raw
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("input '{name}': shape dimension {d} is negative"))))
        .collect::<Result<Vec<_>, _>>()?;
    // Checked before any tensor allocation: a tiny header can declare an enormous shape.
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= limits.max_tensor_elements)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("input '{name}': shape {shape:?} exceeds the limit of {} elements", limits.max_tensor_elements),
            )
        })?;
    let parameters = raw.parameters.unwrap_or_default();
    let binary_size = parameters
        .get("binary_data_size")
        .map(|v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                bad(format!("input '{name}': parameters.binary_data_size must be a non-negative integer"))
            })
        })
        .transpose()?;
    let data = match (raw.data, binary_size) {
        (Some(_), Some(_)) => {
            return Err(bad(format!("input '{name}': has both data and parameters.binary_data_size")));
        }
        (None, None) => return Err(bad(format!("input '{name}': data is missing"))),
        (Some(FlatData(values)), None) => from_json(&name, dtype, count, values)?,
        (None, Some(size)) => {
            let rest = binary.as_mut().ok_or_else(|| {
                bad(format!("input '{name}': binary_data_size requires the Inference-Header-Content-Length header"))
            })?;
            let (chunk, tail) = rest.split_at_checked(size).ok_or_else(|| {
                bad(format!(
                    "input '{name}': binary_data_size {size} runs past the end of the body ({} bytes left)",
                    rest.len()
                ))
            })?;
            *rest = tail;
            from_binary(&name, dtype, count, chunk)?
        }
    };
    let tensor = Tensor::new(shape, data).map_err(|_| bad(format!("input '{name}': data does not match its shape")))?;
    Ok(InferInput { name, tensor, parameters })
}

/// Converts each element, returning the index of the first one that does not fit.
fn convert<T>(values: Vec<Scalar>, f: impl Fn(Scalar) -> Option<T>) -> Result<Vec<T>, usize> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        out.push(f(v).ok_or(i)?);
    }
    Ok(out)
}

/// Integral and in range for `T`: 3.0 is accepted, 1.5 and 300 (for UINT8) are not.
fn int<T: TryFrom<i64>>(s: Scalar) -> Option<T> {
    // i64::MIN is -2^63, exactly representable, so this range is exactly i64's.
    let limit = -(i64::MIN as f64);
    let v = match s {
        Scalar::Int(v) => v,
        Scalar::UInt(v) => i64::try_from(v).ok()?,
        Scalar::Float(f) if f.fract() == 0.0 && (-limit..limit).contains(&f) => f as i64,
        _ => return None,
    };
    T::try_from(v).ok()
}

/// Non-finite values travel as the strings of the protobuf JSON mapping (see `JsonFloat`).
fn float(s: Scalar) -> Option<f64> {
    match s {
        Scalar::Int(v) => Some(v as f64),
        Scalar::UInt(v) => Some(v as f64),
        Scalar::Float(v) => Some(v),
        Scalar::Str(s) => match &*s {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        Scalar::Bool(_) => None,
    }
}

/// Rejects finite values that overflow the narrower type instead of silently making them infinite.
fn narrow<T>(v: f64, cast: impl Fn(f64) -> T, is_infinite: impl Fn(&T) -> bool) -> Option<T> {
    let x = cast(v);
    (!is_infinite(&x) || v.is_infinite()).then_some(x)
}

fn from_json(name: &str, dtype: DType, count: usize, values: Vec<Scalar>) -> Result<TensorData, ApiError> {
    if values.len() != count {
        return Err(bad(format!("input '{name}': data has {} elements but its shape needs {count}", values.len())));
    }
    let at = |i: usize| bad(format!("input '{name}': data element {i} is not a valid {} value", dtype.name()));
    Ok(match dtype {
        DType::Bool => {
            TensorData::Bool(convert(values, |s| if let Scalar::Bool(b) = s { Some(b) } else { None }).map_err(at)?)
        }
        DType::U8 => TensorData::U8(convert(values, int).map_err(at)?),
        DType::I8 => TensorData::I8(convert(values, int).map_err(at)?),
        DType::I16 => TensorData::I16(convert(values, int).map_err(at)?),
        DType::I32 => TensorData::I32(convert(values, int).map_err(at)?),
        DType::I64 => TensorData::I64(convert(values, int).map_err(at)?),
        DType::F16 => TensorData::F16(
            convert(values, |s| narrow(float(s)?, f16::from_f64, |x: &f16| x.is_infinite())).map_err(at)?,
        ),
        DType::F32 => {
            TensorData::F32(convert(values, |s| narrow(float(s)?, |v| v as f32, |x| x.is_infinite())).map_err(at)?)
        }
        DType::F64 => TensorData::F64(convert(values, float).map_err(at)?),
        DType::Bytes => TensorData::Bytes(
            convert(values, |s| if let Scalar::Str(s) = s { Some(s.into_boxed_bytes().into_vec()) } else { None })
                .map_err(at)?,
        ),
    })
}

/// The one copy from the body into the typed vector; `chunks_exact` makes the
/// `try_into` infallible, so the fallback is never used.
fn le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
}

fn from_binary(name: &str, dtype: DType, count: usize, chunk: &[u8]) -> Result<TensorData, ApiError> {
    if let Some(width) = dtype.size_of() {
        let expected = count.saturating_mul(width);
        if chunk.len() != expected {
            return Err(bad(format!(
                "input '{name}': binary_data_size is {} but {count} {dtype} elements take {expected} bytes",
                chunk.len()
            )));
        }
    }
    Ok(match dtype {
        DType::Bool => TensorData::Bool(chunk.iter().map(|&b| b != 0).collect()),
        DType::U8 => TensorData::U8(chunk.to_vec()),
        DType::I8 => TensorData::I8(le(chunk, i8::from_le_bytes)),
        DType::I16 => TensorData::I16(le(chunk, i16::from_le_bytes)),
        DType::I32 => TensorData::I32(le(chunk, i32::from_le_bytes)),
        DType::I64 => TensorData::I64(le(chunk, i64::from_le_bytes)),
        DType::F16 => TensorData::F16(le(chunk, f16::from_le_bytes)),
        DType::F32 => TensorData::F32(le(chunk, f32::from_le_bytes)),
        DType::F64 => TensorData::F64(le(chunk, f64::from_le_bytes)),
        DType::Bytes => TensorData::Bytes(bytes_from_binary(name, count, chunk)?),
    })
}

/// BYTES elements are each a 4-byte little-endian length followed by that many bytes.
fn bytes_from_binary(name: &str, count: usize, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ApiError> {
    // Every element needs at least its length prefix; checking first bounds the allocation.
    if count > chunk.len() / 4 {
        return Err(bad(format!("input '{name}': {} bytes cannot hold {count} BYTES elements", chunk.len())));
    }
    let mut out = Vec::with_capacity(count);
    let mut rest = chunk;
    for i in 0..count {
        let truncated = || bad(format!("input '{name}': BYTES element {i} runs past the end of its binary data"));
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| truncated())?;
        let (element, tail) = tail.split_at_checked(len).ok_or_else(truncated)?;
        out.push(element.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad(format!("input '{name}': {} bytes follow the last BYTES element", rest.len())));
    }
    Ok(out)
}

pub struct InferOutput<'a> {
    pub name: &'a str,
    pub tensor: &'a Tensor,
    pub binary: bool,
}

impl fmt::Debug for InferOutput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tensor's data can be megabytes; its shape and dtype identify it in logs.
        f.debug_struct("InferOutput")
            .field("name", &self.name)
            .field("dtype", &self.tensor.dtype())
            .field("shape", &self.tensor.shape())
            .field("binary", &self.binary)
            .finish()
    }
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinaryParams {
    binary_data_size: usize,
}

/// Streams a tensor as a flat JSON array: serde_json formats each number directly
/// (itoa/ryu), with no intermediate `Value` per element.
struct JsonData<'a>(&'a TensorData);

/// JSON has no NaN or infinities, and `null` would lose which one it was. They are
/// written as the strings "NaN", "Infinity" and "-Infinity", as the protobuf JSON mapping
/// (and so KServe's gRPC-JSON gateways) does; the decoder accepts the same strings.
struct JsonFloat(f64, bool);

impl Serialize for JsonFloat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Self(v, single) = *self;
        match v {
            // Narrowing back is exact: the value came from an f32 (or f16).
            _ if v.is_finite() && single => s.serialize_f32(v as f32),
            _ if v.is_finite() => s.serialize_f64(v),
            _ if v.is_nan() => s.serialize_str("NaN"),
            _ if v > 0.0 => s.serialize_str("Infinity"),
            _ => s.serialize_str("-Infinity"),
        }
    }
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::Bool(v) => s.collect_seq(v),
            TensorData::U8(v) => s.collect_seq(v),
            TensorData::I8(v) => s.collect_seq(v),
            TensorData::I16(v) => s.collect_seq(v),
            TensorData::I32(v) => s.collect_seq(v),
            TensorData::I64(v) => s.collect_seq(v),
            // FP16 is written as the f32 it widens to exactly: JSON has no half type.
            TensorData::F16(v) => s.collect_seq(v.iter().map(|x| JsonFloat(x.to_f64(), true))),
            TensorData::F32(v) => s.collect_seq(v.iter().map(|&x| JsonFloat(f64::from(x), true))),
            TensorData::F64(v) => s.collect_seq(v.iter().map(|&x| JsonFloat(x, false))),
            // JSON strings must be UTF-8, so invalid sequences become U+FFFD here; clients that
            // need arbitrary bytes ask for binary output, which is lossless.
            TensorData::Bytes(v) => s.collect_seq(v.iter().map(|b| String::from_utf8_lossy(b))),
        }
    }
}

/// BYTES length prefixes are u32: a longer element (over 4 GiB) is cut to fit so the framing
/// of everything after it stays intact. The size computation and the writer share this.
fn framed(b: &[u8]) -> &[u8] {
    b.get(..u32::MAX as usize).unwrap_or(b)
}

fn binary_size(data: &TensorData) -> usize {
    match data {
        TensorData::Bytes(v) => v.iter().map(|b| 4 + framed(b).len()).sum(),
        other => other.len() * other.dtype().size_of().unwrap_or(0),
    }
}

fn write_binary(out: &mut Vec<u8>, data: &TensorData) {
    macro_rules! le {
        ($v:expr) => {
            $v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::U8(v) => out.extend_from_slice(v),
        TensorData::I8(v) => le!(v),
        TensorData::I16(v) => le!(v),
        TensorData::I32(v) => le!(v),
        TensorData::I64(v) => le!(v),
        TensorData::F16(v) => le!(v),
        TensorData::F32(v) => le!(v),
        TensorData::F64(v) => le!(v),
        TensorData::Bytes(v) => {
            for b in v.iter().map(|b| framed(b)) {
                out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// Returns the body and, if any output is binary, the JSON header length for the
/// `Inference-Header-Content-Length` response header.
pub fn encode_infer_response(
    model_name: &str,
    model_version: &str,
    id: Option<&str>,
    outputs: &[InferOutput<'_>],
) -> (Vec<u8>, Option<usize>) {
    let docs = outputs
        .iter()
        .map(|o| OutputJson {
            name: o.name,
            datatype: o.tensor.dtype().name(),
            shape: o.tensor.shape(),
            parameters: o.binary.then(|| BinaryParams { binary_data_size: binary_size(o.tensor.data()) }),
            data: (!o.binary).then_some(JsonData(o.tensor.data())),
        })
        .collect();
    let doc = ResponseJson { model_name, model_version, id, outputs: docs };
    let mut body = Vec::new();
    if let Err(e) = serde_json::to_writer(&mut body, &doc) {
        // Unreachable with these types (string keys, no fallible Serialize); never send half a document.
        let e = ApiError::internal(e);
        return (format!(r#"{{"error":"{}","type":"internal"}}"#, e.message).into_bytes(), None);
    }
    if !outputs.iter().any(|o| o.binary) {
        return (body, None);
    }
    let header_len = body.len();
    body.reserve(outputs.iter().filter(|o| o.binary).map(|o| binary_size(o.tensor.data())).sum());
    for o in outputs.iter().filter(|o| o.binary) {
        write_binary(&mut body, o.tensor.data());
    }
    (body, Some(header_len))
}

// The metadata documents live beside the codec.
#[path = "kserve_meta.rs"]
mod meta;
pub use meta::{BackendDoc, model_metadata, server_metadata};

#[cfg(test)]
#[path = "kserve_tests.rs"]
mod tests;
