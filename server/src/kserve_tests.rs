use std::error::Error;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use kiln_engine::{ModelMetadata, TensorSpec};

type TestResult = Result<(), Box<dyn Error>>;

const LIMITS: DecodeLimits = DecodeLimits { max_tensor_elements: 1 << 20, max_inputs: 16 };

fn decode(body: impl Into<Vec<u8>>, header_len: Option<usize>) -> Result<InferRequest, ApiError> {
    decode_infer_request(Bytes::from(body.into()), header_len, &LIMITS)
}

fn decode_json(doc: &Value) -> Result<InferRequest, ApiError> {
    decode(doc.to_string(), None)
}

/// Builds a request body from tensors by encoding them as a response and renaming
/// `outputs` to `inputs`: the two documents share their per-tensor layout.
fn request_body(tensors: &[(String, Tensor, bool)]) -> Result<(Vec<u8>, Option<usize>), Box<dyn Error>> {
    let outputs: Vec<InferOutput<'_>> =
        tensors.iter().map(|(name, tensor, binary)| InferOutput { name, tensor, binary: *binary }).collect();
    let (body, header_len) = encode_infer_response("m", "1", None, &outputs);
    let split = header_len.unwrap_or(body.len());
    let (header, binary) = body.split_at(split);
    let mut doc: Map<String, Value> = serde_json::from_slice(header)?;
    let inputs = doc.remove("outputs").ok_or("no outputs")?;
    let mut out = serde_json::to_vec(&json!({ "inputs": inputs }))?;
    let new_len = out.len();
    out.extend_from_slice(binary);
    Ok((out, header_len.map(|_| new_len)))
}

fn round_trip(tensors: &[(String, Tensor, bool)]) -> Result<Vec<Tensor>, Box<dyn Error>> {
    let (body, header_len) = request_body(tensors)?;
    let req = decode(body, header_len)?;
    Ok(req.inputs.into_iter().map(|i| i.tensor).collect())
}

fn samples() -> Result<Vec<Tensor>, Box<dyn Error>> {
    let h = f16::from_f32;
    Ok(vec![
        Tensor::new(vec![3], TensorData::Bool(vec![true, false, true]))?,
        Tensor::new(vec![2, 2], TensorData::U8(vec![0, 1, 254, 255]))?,
        Tensor::new(vec![2], TensorData::I8(vec![i8::MIN, i8::MAX]))?,
        Tensor::new(vec![2], TensorData::I16(vec![i16::MIN, i16::MAX]))?,
        Tensor::new(vec![1, 2], TensorData::I32(vec![i32::MIN, i32::MAX]))?,
        Tensor::new(vec![3], TensorData::I64(vec![i64::MIN, 0, i64::MAX]))?,
        Tensor::new(vec![3], TensorData::F16(vec![h(1.5), h(-0.1), f16::MAX]))?,
        Tensor::new(vec![3], TensorData::F32(vec![0.1, -3.4e38, f32::MIN_POSITIVE]))?,
        Tensor::new(vec![2], TensorData::F64(vec![0.1, -1e300]))?,
        Tensor::new(vec![3], TensorData::Bytes(vec![b"hello".to_vec(), vec![], "é".as_bytes().to_vec()]))?,
        Tensor::new(vec![0, 4], TensorData::F32(vec![]))?,
        Tensor::new(vec![], TensorData::I32(vec![7]))?,
    ])
}

#[test]
fn every_dtype_round_trips_as_json_and_binary() -> TestResult {
    for binary in [false, true] {
        let tensors: Vec<_> = samples()?.into_iter().enumerate().map(|(i, t)| (format!("t{i}"), t, binary)).collect();
        let decoded = round_trip(&tensors)?;
        let expected: Vec<_> = tensors.into_iter().map(|(_, t, _)| t).collect();
        assert_eq!(decoded, expected, "binary={binary}");
    }
    Ok(())
}

#[test]
fn mixed_json_and_binary_inputs_round_trip() -> TestResult {
    let tensors: Vec<_> = samples()?.into_iter().enumerate().map(|(i, t)| (format!("t{i}"), t, i % 2 == 0)).collect();
    let decoded = round_trip(&tensors)?;
    assert_eq!(decoded, tensors.into_iter().map(|(_, t, _)| t).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn non_finite_floats_travel_as_strings() -> TestResult {
    let t = Tensor::new(vec![3], TensorData::F32(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]))?;
    let (body, header_len) =
        encode_infer_response("m", "1", Some("r"), &[InferOutput { name: "x", tensor: &t, binary: false }]);
    assert_eq!(header_len, None);
    let doc: Value = serde_json::from_slice(&body)?;
    assert_eq!(doc["outputs"][0]["data"], json!(["NaN", "Infinity", "-Infinity"]));
    assert_eq!(doc["id"], "r");
    let back = round_trip(&[("x".into(), t, false)])?;
    let Some(TensorData::F32(v)) = back.first().map(Tensor::data) else { return Err("not f32".into()) };
    assert!(v[0].is_nan() && v[1] == f32::INFINITY && v[2] == f32::NEG_INFINITY);
    Ok(())
}

#[test]
fn response_layout() -> TestResult {
    let a = Tensor::new(vec![2], TensorData::I32(vec![1, 2]))?;
    let b = Tensor::new(vec![1], TensorData::Bytes(vec![vec![0xff, b'a']]))?;
    let outputs =
        [InferOutput { name: "a", tensor: &a, binary: true }, InferOutput { name: "b", tensor: &b, binary: false }];
    let (body, header_len) = encode_infer_response("m", "3", None, &outputs);
    let n = header_len.ok_or("expected a binary header length")?;
    let doc: Value = serde_json::from_slice(body.get(..n).ok_or("short")?)?;
    assert_eq!(
        doc,
        json!({"model_name": "m", "model_version": "3", "outputs": [
            {"name": "a", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "BYTES", "shape": [1], "data": ["\u{fffd}a"]},
        ]})
    );
    assert_eq!(body.get(n..), Some(&[1, 0, 0, 0, 2, 0, 0, 0][..]));
    Ok(())
}

#[test]
fn nested_json_data_is_flattened_row_major() -> TestResult {
    let req = decode_json(&json!({"id": "x", "inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]},
        {"name": "b", "shape": [2], "datatype": "INT64", "data": [-1, 3.0]},
    ]}))?;
    assert_eq!(req.id.as_deref(), Some("x"));
    assert_eq!(req.inputs[0].tensor.data(), &TensorData::F32(vec![1.0, 2.5, 3.0, 4.0]));
    assert_eq!(req.inputs[0].tensor.shape(), &[2, 2]);
    assert_eq!(req.inputs[1].tensor.data(), &TensorData::I64(vec![-1, 3]));
    assert_eq!(req.outputs, None);
    Ok(())
}

#[test]
fn requested_outputs_override_the_binary_default() -> TestResult {
    let req = decode_json(&json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "a", "shape": [1], "datatype": "BOOL", "data": [true], "parameters": {"k": 1}}],
        "outputs": [{"name": "x"}, {"name": "y", "parameters": {"binary_data": false}}],
    }))?;
    assert!(req.binary_outputs_default);
    assert_eq!(req.inputs[0].parameters.get("k"), Some(&json!(1)));
    let expected =
        vec![RequestedOutput { name: "x".into(), binary: true }, RequestedOutput { name: "y".into(), binary: false }];
    assert_eq!(req.outputs, Some(expected));
    let req = decode_json(&json!({
        "inputs": [], "outputs": [{"name": "x", "parameters": {"binary_data": true}}, {"name": "y"}],
    }))?;
    assert!(!req.binary_outputs_default);
    let flags: Vec<bool> = req.outputs.unwrap_or_default().iter().map(|o| o.binary).collect();
    assert_eq!(flags, [true, false]);
    Ok(())
}

fn input(datatype: &str, shape: Value, data: Value) -> Value {
    json!({"inputs": [{"name": "in0", "shape": shape, "datatype": datatype, "data": data}]})
}

fn assert_invalid(result: Result<InferRequest, ApiError>, kind: ErrorKind, needle: &str) {
    match result {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => {
            assert_eq!(e.kind, kind, "{}", e.message);
            assert!(e.message.contains(needle), "{:?} lacks {needle:?}", e.message);
        }
    }
}

#[test]
fn json_errors_name_the_input_and_problem() {
    use ErrorKind::{InvalidParameter as Bad, PayloadTooLarge as Big};
    let cases = [
        (input("FP32", json!([3]), json!([1, 2])), Bad, "data has 2 elements but its shape needs 3"),
        (input("UINT8", json!([1]), json!([300])), Bad, "element 0 is not a valid UINT8"),
        (input("INT8", json!([2]), json!([1, -129])), Bad, "element 1 is not a valid INT8"),
        (input("INT32", json!([1]), json!([1.5])), Bad, "not a valid INT32"),
        (input("INT64", json!([1]), json!([u64::MAX])), Bad, "not a valid INT64"),
        (input("BOOL", json!([1]), json!([1])), Bad, "not a valid BOOL"),
        (input("BYTES", json!([1]), json!([1])), Bad, "not a valid BYTES"),
        (input("FP32", json!([1]), json!(["x"])), Bad, "not a valid FP32"),
        (input("FP32", json!([1]), json!([1e300])), Bad, "not a valid FP32"),
        (input("FP16", json!([1]), json!([70000])), Bad, "not a valid FP16"),
        (input("FP8", json!([1]), json!([1])), Bad, "unknown datatype 'FP8'"),
        (input("FP32", json!([2, -1]), json!([])), Bad, "shape dimension -1 is negative"),
        (input("FP32", json!([1_000_000_000u64, 1_000_000_000u64]), json!([])), Big, "exceeds the limit"),
        (input("FP32", json!([u64::MAX >> 1, 4]), json!([])), Big, "exceeds the limit"),
        (input("FP32", json!([1]), json!([null])), Bad, "invalid inference request"),
        (json!({"inputs": [{"name": "in0", "shape": [1], "datatype": "FP32"}]}), Bad, "input 'in0': data is missing"),
        (
            json!({"inputs": [{"name": "a", "shape": [0], "datatype": "FP32", "data": []}, {"name": "a", "shape": [0], "datatype": "FP32", "data": []}]}),
            Bad,
            "'a' appears more than once",
        ),
        (
            json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "parameters": {"binary_data_size": 4}}]}),
            Bad,
            "both data and",
        ),
        (
            json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}),
            Bad,
            "requires the Inference-Header-Content-Length",
        ),
        (
            json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": -4}}]}),
            Bad,
            "must be a non-negative integer",
        ),
        (
            json!({"inputs": [], "parameters": {"binary_data_output": "yes"}}),
            Bad,
            "binary_data_output must be a boolean",
        ),
        (json!({"inputs": [], "outputs": [{"name": "o", "parameters": {"binary_data": 1}}]}), Bad, "output 'o'"),
        (json!({"inputs": [{"name": "a"}]}), Bad, "missing field `shape`"),
        (
            json!({"inputs": vec![json!({"name": "a", "shape": [0], "datatype": "FP32", "data": []}); 17]}),
            Big,
            "17 inputs",
        ),
    ];
    for (doc, kind, needle) in cases {
        assert_invalid(decode_json(&doc), kind, needle);
    }
    assert_invalid(decode("{\"inputs\": [", None), ErrorKind::InvalidParameter, "ends unexpectedly");
    assert_invalid(decode("{\"inputs\": ]", None), ErrorKind::InvalidParameter, "not valid JSON");
    assert_invalid(decode("[]", None), ErrorKind::InvalidParameter, "an inference request object");
}

/// A binary request for `in0` whose header declares `size` bytes, followed by `tail`.
fn binary_request(datatype: &str, shape: Value, size: u64, tail: &[u8]) -> Result<InferRequest, ApiError> {
    let header = json!({"inputs": [{"name": "in0", "shape": shape, "datatype": datatype,
        "parameters": {"binary_data_size": size}}]})
    .to_string();
    let n = header.len();
    let mut body = header.into_bytes();
    body.extend_from_slice(tail);
    decode(body, Some(n))
}

#[test]
fn binary_errors_are_caught() -> TestResult {
    let bad = ErrorKind::InvalidParameter;
    assert_eq!(
        binary_request("INT16", json!([2]), 4, &[1, 0, 2, 0])?.inputs[0].tensor.data(),
        &TensorData::I16(vec![1, 2])
    );
    assert_invalid(
        binary_request("INT16", json!([2]), 3, &[1, 0, 2]),
        bad,
        "binary_data_size is 3 but 2 INT16 elements take 4",
    );
    assert_invalid(
        binary_request("INT16", json!([2]), 4, &[1, 0, 2]),
        bad,
        "runs past the end of the body (3 bytes left)",
    );
    assert_invalid(binary_request("INT16", json!([2]), 4, &[1, 0, 2, 0, 9]), bad, "1 bytes of binary data follow");
    assert_invalid(binary_request("BYTES", json!([1]), 6, &[5, 0, 0, 0, b'a', b'b']), bad, "BYTES element 0 runs past");
    assert_invalid(
        binary_request("BYTES", json!([2]), 10, &[1, 0, 0, 0, b'a', 9, 0, 0, 0, b'b']),
        bad,
        "BYTES element 1 runs past",
    );
    assert_invalid(
        binary_request("BYTES", json!([1]), 6, &[1, 0, 0, 0, b'a', 0]),
        bad,
        "1 bytes follow the last BYTES",
    );
    assert_invalid(binary_request("BYTES", json!([1000]), 4, &[0; 4]), bad, "cannot hold 1000 BYTES elements");
    assert_invalid(
        binary_request("FP32", json!([1u64 << 40]), 4, &[0; 4]),
        ErrorKind::PayloadTooLarge,
        "exceeds the limit",
    );
    assert_invalid(decode("{}", Some(3)), bad, "Inference-Header-Content-Length 3 exceeds the body length 2");
    // Bytes after the header without any binary input are trailing data too.
    assert_invalid(decode("{\"inputs\":[]}xy", Some(13)), bad, "2 bytes of binary data follow");
    Ok(())
}

#[test]
fn metadata_documents() -> TestResult {
    use kiln_engine::Dim;
    let spec = |name: &str, dtype, shape| TensorSpec { name: name.into(), dtype, shape };
    let meta = ModelMetadata {
        inputs: vec![spec("x", DType::F32, vec![Dim::Dynamic, Dim::Fixed(3), Dim::Fixed(224), Dim::Fixed(224)])],
        outputs: vec![spec("y", DType::I64, vec![Dim::Dynamic])],
    };
    let versions = vec!["1".to_string()];
    let doc = serde_json::to_value(model_metadata("resnet", &versions, "onnxruntime_onnx", &meta))?;
    assert_eq!(
        doc,
        json!({"name": "resnet", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
            "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}]})
    );
    let doc = serde_json::to_value(server_metadata(&["binary_tensor_data"]))?;
    assert_eq!(
        doc,
        json!({"name": "kiln", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]})
    );
    Ok(())
}

fn tensor_strategy() -> impl Strategy<Value = Tensor> {
    (0usize..10, prop::collection::vec(0usize..4, 0..4))
        .prop_flat_map(|(dtype, shape)| {
            let n: usize = shape.iter().product();
            macro_rules! elems {
                ($s:expr) => {
                    prop::collection::vec($s, n)
                };
            }
            let data = match dtype {
                0 => elems!(any::<bool>()).prop_map(TensorData::Bool).boxed(),
                1 => elems!(any::<u8>()).prop_map(TensorData::U8).boxed(),
                2 => elems!(any::<i8>()).prop_map(TensorData::I8).boxed(),
                3 => elems!(any::<i16>()).prop_map(TensorData::I16).boxed(),
                4 => elems!(any::<i32>()).prop_map(TensorData::I32).boxed(),
                5 => elems!(any::<i64>()).prop_map(TensorData::I64).boxed(),
                // Finite values only: NaN != NaN would fail the equality check, not the codec.
                6 => elems!(-65504.0f32..65504.0)
                    .prop_map(|v| TensorData::F16(v.into_iter().map(f16::from_f32).collect()))
                    .boxed(),
                7 => elems!(prop::num::f32::NORMAL | prop::num::f32::ZERO | prop::num::f32::SUBNORMAL)
                    .prop_map(TensorData::F32)
                    .boxed(),
                8 => elems!(prop::num::f64::NORMAL | prop::num::f64::ZERO).prop_map(TensorData::F64).boxed(),
                _ => elems!(prop::collection::vec(any::<u8>(), 0..6)).prop_map(TensorData::Bytes).boxed(),
            };
            (Just(shape), data)
        })
        .prop_filter_map("shape matches data", |(shape, data)| Tensor::new(shape, data).ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), header_len in prop::option::of(0usize..600)) {
        let _ = decode(body, header_len);
    }

    #[test]
    fn arbitrary_headers_and_tails_never_panic(
        dims in prop::collection::vec(-2i64..1 << 40, 0..3),
        dtype in prop::sample::select(vec!["BOOL", "UINT8", "INT64", "FP16", "FP64", "BYTES", "NOPE"]),
        size in prop::option::of(0u64..64),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut params = Map::new();
        if let Some(size) = size {
            params.insert("binary_data_size".into(), json!(size));
        }
        let header = json!({"inputs": [{"name": "a", "shape": dims, "datatype": dtype, "parameters": params}]}).to_string();
        let n = header.len();
        let mut body = header.into_bytes();
        body.extend_from_slice(&tail);
        let _ = decode(body, Some(n));
    }

    #[test]
    fn valid_binary_requests_round_trip(tensors in prop::collection::vec(tensor_strategy(), 1..4)) {
        let named: Vec<_> = tensors.iter().enumerate().map(|(i, t)| (format!("in{i}"), t.clone(), true)).collect();
        let decoded = round_trip(&named).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, tensors);
    }
}
