//! KServe v2 tensors for `kiln bench`: read from a model's metadata or a request file,
//! filled with random data, encoded as JSON or with the binary tensor extension.

use kiln_engine::f16;
use serde_json::{Map, Value, json};

use super::LoadError;

/// One input tensor's declaration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InputSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// An input tensor with data, kept as JSON-ready values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Vec<Value>,
}

/// Most elements one generated or loaded tensor may hold (a request body of a few hundred MB).
const MAX_ELEMENTS: i64 = 64 << 20;

fn bad(msg: String) -> LoadError {
    LoadError::InvalidArgument(msg)
}

/// The inputs of `GET /v2/models/{name}`, with a dynamic leading dimension set to `batch`.
pub(crate) fn inputs_from_metadata(body: &[u8], batch: usize) -> Result<Vec<InputSpec>, LoadError> {
    let meta: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the model metadata is not JSON: {e}")))?;
    let inputs =
        meta.get("inputs").and_then(Value::as_array).ok_or_else(|| bad("the model metadata has no inputs".into()))?;
    inputs
        .iter()
        .map(|i| {
            let name = i.get("name").and_then(Value::as_str).ok_or_else(|| bad("an input has no name".into()))?;
            let datatype = i
                .get("datatype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("input '{name}' has no datatype")))?;
            let dims =
                i.get("shape").and_then(Value::as_array).ok_or_else(|| bad(format!("input '{name}' has no shape")))?;
            let mut shape = Vec::with_capacity(dims.len());
            for (axis, d) in dims.iter().enumerate() {
                let d = d.as_i64().ok_or_else(|| bad(format!("input '{name}': shape holds a non-integer")))?;
                shape.push(match d {
                    -1 if axis == 0 => i64::try_from(batch).unwrap_or(i64::MAX),
                    d if d < 0 => {
                        return Err(bad(format!(
                            "input '{name}' has a dynamic dimension {axis}; give the tensors with --tensors FILE"
                        )));
                    }
                    d => d,
                });
            }
            let elements = shape.iter().try_fold(1i64, |n, d| n.checked_mul(*d));
            if elements.is_none_or(|n| !(0..=MAX_ELEMENTS).contains(&n)) {
                return Err(bad(format!("input '{name}': shape {shape:?} exceeds {MAX_ELEMENTS} elements")));
            }
            Ok(InputSpec { name: name.into(), datatype: datatype.into(), shape })
        })
        .collect()
}

/// The inputs of a KServe v2 JSON inference request (nested `data` arrays are flattened).
pub(crate) fn tensors_from_request(body: &[u8]) -> Result<Vec<Tensor>, LoadError> {
    let req: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the tensors file is not JSON: {e}")))?;
    let inputs = req
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the tensors file has no inputs array".into()))?;
    inputs
        .iter()
        .map(|i| {
            let spec = inputs_from_metadata(&serde_json::to_vec(&json!({ "inputs": [i] })).unwrap_or_default(), 1)?
                .pop()
                .ok_or_else(|| bad("an input could not be read".into()))?;
            let mut data = Vec::new();
            flatten(i.get("data").ok_or_else(|| bad(format!("input '{}' has no data", spec.name)))?, &mut data);
            let want: i64 = spec.shape.iter().product();
            if data.len() as i64 != want {
                return Err(bad(format!("input '{}': {} values for shape {:?}", spec.name, data.len(), spec.shape)));
            }
            Ok(Tensor { name: spec.name, datatype: spec.datatype, shape: spec.shape, data })
        })
        .collect()
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

/// Random values of each input's type: floats in [0, 1), small integers, short strings.
pub(crate) fn random_tensors(inputs: &[InputSpec], rng: &mut fastrand::Rng) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|i| {
            let n = i.shape.iter().product::<i64>().max(0) as usize;
            let data = (0..n)
                .map(|_| match i.datatype.as_str() {
                    "FP16" | "FP32" | "FP64" => json!(f64::from(rng.f32())),
                    "BOOL" => json!(rng.bool()),
                    "BYTES" => json!(format!("kiln-{}", rng.u32(..1000))),
                    _ => json!(rng.u8(..100)),
                })
                .collect();
            Tensor { name: i.name.clone(), datatype: i.datatype.clone(), shape: i.shape.clone(), data }
        })
        .collect()
}

pub(crate) fn encode_json(tensors: &[Tensor]) -> Result<Vec<u8>, LoadError> {
    let inputs: Vec<Value> = tensors
        .iter()
        .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data }))
        .collect();
    serde_json::to_vec(&json!({ "inputs": inputs })).map_err(|e| bad(format!("could not encode the request: {e}")))
}

/// The binary tensor extension: a JSON header (its length goes in
/// `Inference-Header-Content-Length`) followed by each input's raw little-endian bytes.
pub(crate) fn encode_binary(tensors: &[Tensor]) -> Result<(usize, Vec<u8>), LoadError> {
    let mut raw = Vec::new();
    let mut inputs = Vec::with_capacity(tensors.len());
    for t in tensors {
        let start = raw.len();
        for v in &t.data {
            push_element(&t.datatype, v, &mut raw).map_err(|why| bad(format!("input '{}': {why}", t.name)))?;
        }
        let mut params = Map::new();
        params.insert("binary_data_size".into(), json!(raw.len() - start));
        inputs.push(json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": params }));
    }
    let header = json!({ "inputs": inputs, "parameters": { "binary_data_output": true } });
    let mut body = serde_json::to_vec(&header).map_err(|e| bad(format!("could not encode the request: {e}")))?;
    let header_len = body.len();
    body.extend_from_slice(&raw);
    Ok((header_len, body))
}

fn push_element(datatype: &str, v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    let float = || v.as_f64().ok_or_else(|| format!("{v} is not a number"));
    let int = || v.as_i64().or_else(|| v.as_bool().map(i64::from)).ok_or_else(|| format!("{v} is not an integer"));
    let uint = || v.as_u64().ok_or_else(|| format!("{v} is not an unsigned integer"));
    match datatype {
        "FP32" => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
        "FP64" => out.extend_from_slice(&float()?.to_le_bytes()),
        "FP16" => out.extend_from_slice(&f16::from_f64(float()?).to_le_bytes()),
        "INT8" => out.extend_from_slice(&(int()? as i8).to_le_bytes()),
        "INT16" => out.extend_from_slice(&(int()? as i16).to_le_bytes()),
        "INT32" => out.extend_from_slice(&(int()? as i32).to_le_bytes()),
        "INT64" => out.extend_from_slice(&int()?.to_le_bytes()),
        "UINT8" => out.push(uint()? as u8),
        "UINT16" => out.extend_from_slice(&(uint()? as u16).to_le_bytes()),
        "UINT32" => out.extend_from_slice(&(uint()? as u32).to_le_bytes()),
        "UINT64" => out.extend_from_slice(&uint()?.to_le_bytes()),
        "BOOL" => out.push(u8::from(v.as_bool().ok_or_else(|| format!("{v} is not a boolean"))?)),
        "BYTES" => {
            let s = v.as_str().ok_or_else(|| format!("{v} is not a string"))?;
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        other => return Err(format!("datatype {other} is not supported")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_batch_dimension_is_filled_and_others_refused() -> Result<(), LoadError> {
        let meta = br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,3]}]}"#;
        let inputs = inputs_from_metadata(meta, 4)?;
        assert_eq!(inputs, vec![InputSpec { name: "x".into(), datatype: "FP32".into(), shape: vec![4, 3] }]);
        let huge = br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[4611686018427387904,4]}]}"#;
        assert!(inputs_from_metadata(huge, 1).is_err());
        let dynamic = br#"{"inputs":[{"name":"ids","datatype":"INT64","shape":[-1,-1]}]}"#;
        let err = inputs_from_metadata(dynamic, 1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("dynamic dimension 1"), "{err}");
        Ok(())
    }

    #[test]
    fn binary_encoding_matches_the_extension_layout() -> Result<(), LoadError> {
        let tensors = tensors_from_request(
            br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[1,2],"data":[[1.5,-2]]},
                           {"name":"s","datatype":"BYTES","shape":[1],"data":["hi"]},
                           {"name":"h","datatype":"FP16","shape":[1],"data":[1.0]}]}"#,
        )?;
        let (header_len, body) = encode_binary(&tensors)?;
        let header: Value = serde_json::from_slice(&body[..header_len]).map_err(|e| bad(e.to_string()))?;
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(header["inputs"][1]["parameters"]["binary_data_size"], 6);
        assert_eq!(header["inputs"][2]["parameters"]["binary_data_size"], 2);
        let raw = &body[header_len..];
        assert_eq!(&raw[..8], [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat().as_slice());
        assert_eq!(&raw[8..14], b"\x02\0\0\0hi");
        assert_eq!(&raw[14..], 0x3c00u16.to_le_bytes());
        Ok(())
    }

    #[test]
    fn wrong_value_counts_and_types_are_errors() {
        let short = tensors_from_request(br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[3],"data":[1,2]}]}"#);
        assert!(short.is_err());
        let t = Tensor { name: "a".into(), datatype: "INT32".into(), shape: vec![1], data: vec![json!("x")] };
        assert!(encode_binary(&[t]).is_err());
    }

    #[test]
    fn random_tensors_have_the_declared_element_count() {
        let spec = InputSpec { name: "x".into(), datatype: "UINT8".into(), shape: vec![2, 3, 4] };
        let t = random_tensors(&[spec], &mut fastrand::Rng::with_seed(1));
        assert_eq!(t[0].data.len(), 24);
        assert!(t[0].data.iter().all(|v| v.as_u64().is_some_and(|n| n < 100)));
    }
}
