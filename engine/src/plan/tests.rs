use std::sync::Arc;

use half::f16;

use super::*;
use crate::graph::{Attr, Dim, Node, ValueType, fixed_shape};
use crate::{DType, Tensor, TensorData};

fn t(shape: &[usize], data: TensorData) -> Tensor {
    Tensor::new(shape.to_vec(), data).unwrap_or_else(|e| panic!("test tensor: {e}"))
}

/// A small graph touching every dtype, attribute kind and IR field a plan stores.
fn sample_graph() -> Graph {
    let mut g = Graph::new("sample", 17);
    let x = g.add_value("x", Some(ValueType::new(DType::F32, vec![Dim::sym("batch"), Dim::fixed(4)])));
    g.inputs.push(x);
    let w = g.add_constant("w", t(&[4, 3], TensorData::F32((0..12).map(|i| 0.1 * i as f32 - 0.55).collect())));
    g.values[w].storage = Precision::F16;
    let b = g.add_constant("b", t(&[3], TensorData::F32(vec![0.1, -0.2, 1e-8])));
    let others = [
        g.add_constant("i64", t(&[2], TensorData::I64(vec![-1, i64::MAX]))),
        g.add_constant("bool", t(&[2], TensorData::Bool(vec![true, false]))),
        g.add_constant("u8", t(&[1], TensorData::U8(vec![200]))),
        g.add_constant("i8", t(&[1], TensorData::I8(vec![-7]))),
        g.add_constant("i16", t(&[1], TensorData::I16(vec![-300]))),
        g.add_constant("i32", t(&[2, 1], TensorData::I32(vec![5, -5]))),
        g.add_constant("f64", t(&[1], TensorData::F64(vec![std::f64::consts::PI]))),
        g.add_constant("f16", t(&[1], TensorData::F16(vec![f16::from_f32(-1.25)]))),
        g.add_constant("bytes", t(&[2], TensorData::Bytes(vec![b"kiln".to_vec(), vec![]]))),
        g.add_constant("scalar", t(&[], TensorData::F32(vec![2.5]))),
        g.add_constant("empty", t(&[0, 3], TensorData::F32(vec![]))),
    ];
    let y = g.add_value("y", Some(ValueType::new(DType::F32, vec![Dim::sym("batch"), Dim::fixed(3)])));
    let mut mm = Node::new("mm", "MatMul", vec![Some(x), Some(w)], vec![y]);
    mm.precision = Precision::F16;
    mm.kernel = "sm90_hgemm_128x128x32".into();
    g.nodes.push(mm);
    let s = g.add_value("s", Some(ValueType::new(DType::I64, fixed_shape(&[2]))));
    g.values[s].sym = Some(vec![Dim::sym("batch").mul(&Dim::fixed(3)), Dim::fixed(3)]);
    g.nodes.push(Node::new("shape", "Shape", vec![Some(y)], vec![s]));
    let z = g.add_value("z", Some(ValueType { dtype: DType::F32, shape: None }));
    let dense = Node::new("dense", "kiln.Dense", vec![Some(y), Some(b), None, Some(s)], vec![z])
        .with_attr("activation", Attr::String("clip".into()))
        .with_attr("clip_min", Attr::Float(-0.1))
        .with_attr("clip_max", Attr::Float(6.0))
        .with_attr("axes", Attr::Ints(vec![-1, 0, i64::MIN]))
        .with_attr("group", Attr::Int(32))
        .with_attr("scales", Attr::Floats(vec![0.1, 1.0 / 3.0, -0.0, f32::MIN_POSITIVE, f32::MAX]))
        .with_attr("names", Attr::Strings(vec!["a".into(), "é\"\\\n".into()]))
        .with_attr("value", Attr::Tensor(t(&[2], TensorData::F32(vec![0.7, -1e-30]))))
        .with_attr("ints", Attr::Tensor(t(&[1, 2], TensorData::I64(vec![3, -4]))))
        .with_attr("mask", Attr::Tensor(t(&[1], TensorData::Bool(vec![true]))))
        .with_attr("half", Attr::Tensor(t(&[1], TensorData::F16(vec![f16::from_f32(0.3)]))))
        .with_attr("f64", Attr::Tensor(t(&[1], TensorData::F64(vec![0.1]))));
    g.nodes.push(dense);
    let u = g.add_value("u", None);
    let inputs = others.iter().map(|&v| Some(v)).collect();
    g.nodes.push(Node::new("custom", "Custom", inputs, vec![u]));
    g.outputs.extend([z, u]);
    g
}

fn sample_plan() -> Plan {
    let mut settings = BuildSettings::new("sm_90", Precision::F16, "sample.onnx");
    settings.profiles = vec![
        Profile { symbol: "batch".into(), min: 1, opt: 8, max: 64 },
        Profile { symbol: "seq".into(), min: 1, opt: 128, max: 512 },
    ];
    Plan { settings, graph: sample_graph() }
}

fn any() -> Expect {
    Expect::default()
}

fn err_text<T>(r: Result<T, GraphError>) -> String {
    match r {
        Ok(_) => "unexpectedly Ok".into(),
        Err(e) => e.to_string(),
    }
}

/// Field-by-field equality (the IR types do not derive `PartialEq`).
fn assert_same_graph(a: &Graph, b: &Graph) {
    assert_eq!((&a.name, a.opset, &a.inputs, &a.outputs), (&b.name, b.opset, &b.inputs, &b.outputs));
    assert_eq!(a.values.len(), b.values.len());
    for (va, vb) in a.values.iter().zip(&b.values) {
        assert_eq!((&va.name, &va.ty, &va.sym, va.storage), (&vb.name, &vb.ty, &vb.sym, vb.storage));
        assert_eq!(va.constant.as_deref(), vb.constant.as_deref(), "constant {}", va.name);
    }
    assert_eq!(a.nodes.len(), b.nodes.len());
    for (na, nb) in a.nodes.iter().zip(&b.nodes) {
        assert_eq!((&na.name, &na.op, &na.inputs, &na.outputs), (&nb.name, &nb.op, &nb.inputs, &nb.outputs));
        assert_eq!((&na.attrs, na.precision, &na.kernel), (&nb.attrs, nb.precision, &nb.kernel));
    }
}

/// The sample graph as a loaded plan must see it: FP16-stored weights rounded.
fn rounded(mut g: Graph) -> Graph {
    for v in &mut g.values {
        if v.storage == Precision::F16 {
            v.constant = v.constant.as_deref().map(|c| Arc::new(crate::reference::round_f16(c)));
        }
    }
    g
}

#[test]
fn round_trip_keeps_graph_settings_and_weights() -> Result<(), GraphError> {
    let plan = sample_plan();
    let bytes = to_bytes(&plan);
    let loaded = from_bytes(&bytes, &Expect { arch: Some("sm_90".into()), precision: Some(Precision::F16) })?;
    assert_eq!(loaded.settings, plan.settings);
    assert_same_graph(&loaded.graph, &rounded(plan.graph.clone()));
    // FP16 storage really is stored at half size, and rounds as f16 does.
    let w = loaded.graph.constant(1).and_then(Tensor::as_f32).unwrap_or_default();
    let orig = plan.graph.constant(1).and_then(Tensor::as_f32).unwrap_or_default();
    assert_eq!(w.len(), 12);
    for (l, o) in w.iter().zip(orig) {
        assert_eq!(*l, f16::from_f32(*o).to_f32());
        assert!((l - o).abs() <= o.abs() * 1e-3, "{l} vs {o}");
    }
    assert!(w.iter().zip(orig).any(|(l, o)| l != o), "0.1-steps are not all exact in FP16");
    // Saving the loaded plan again gives the same bytes: nothing is lost twice.
    assert_eq!(to_bytes(&loaded), bytes);
    Ok(())
}

#[test]
fn save_and_load_through_a_file() -> Result<(), GraphError> {
    let dir = std::env::temp_dir().join(format!("kiln-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| GraphError::Invalid(e.to_string()))?;
    let path = dir.join("sample.plan");
    let plan = sample_plan();
    save(&plan, &path)?;
    let loaded = load(&path, &any())?;
    assert_same_graph(&loaded.graph, &rounded(plan.graph));
    let e = err_text(load(&path, &Expect { arch: Some("sm_80".into()), precision: None }));
    assert!(e.contains("sample.plan") && e.contains("arch sm_90"), "{e}");
    assert!(matches!(load(&dir.join("missing.plan"), &any()), Err(GraphError::Io { .. })));
    std::fs::remove_dir_all(&dir).map_err(|e| GraphError::Invalid(e.to_string()))?;
    Ok(())
}

#[test]
fn blob_is_aligned_and_half_size_for_fp16_weights() {
    let plan = sample_plan();
    let bytes = to_bytes(&plan);
    let header_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default()) as usize;
    let blob_len = u64::from_le_bytes(bytes[20..28].try_into().unwrap_or_default()) as usize;
    let blob_start = (PREAMBLE + header_len).next_multiple_of(64);
    assert_eq!(blob_start % 64, 0);
    assert_eq!(bytes.len(), blob_start + blob_len + 4);
    let json: serde_json::Value = serde_json::from_slice(&bytes[PREAMBLE..PREAMBLE + header_len]).unwrap_or_default();
    let w = &json["graph"]["values"][1]["constant"];
    assert_eq!(w["stored"], "FP16");
    assert_eq!(w["bytes"], 24, "12 weights at 2 bytes");
    assert_eq!(json["settings"]["arch"], "sm_90");
    assert_eq!(json["graph"]["nodes"][0]["kernel"], "sm90_hgemm_128x128x32");
    let offsets: Vec<u64> = json["graph"]["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["constant"]["offset"].as_u64())
        .collect();
    assert_eq!(offsets.len(), 13);
    assert!(offsets.iter().all(|o| o % 64 == 0));
}

#[test]
fn non_finite_float_attributes_survive() -> Result<(), GraphError> {
    let mut plan = sample_plan();
    let attrs = &mut plan.graph.nodes[2].attrs;
    attrs.insert("clip_min", Attr::Float(f32::NEG_INFINITY));
    attrs.insert("odd", Attr::Floats(vec![f32::NAN, f32::INFINITY]));
    attrs.insert("t", Attr::Tensor(t(&[2], TensorData::F64(vec![f64::NAN, f64::NEG_INFINITY]))));
    let loaded = from_bytes(&to_bytes(&plan), &any())?;
    let a = &loaded.graph.nodes[2].attrs;
    assert_eq!(a.float("clip_min", 0.0), Ok(f32::NEG_INFINITY));
    assert!(matches!(a.get("odd"), Some(Attr::Floats(v)) if v[0].is_nan() && v[1] == f32::INFINITY));
    let t64 = a.tensor("t").ok().flatten().map(|t| t.data().clone());
    assert!(matches!(t64, Some(TensorData::F64(v)) if v[0].is_nan() && v[1] == f64::NEG_INFINITY));
    Ok(())
}

#[test]
fn wrong_magic_is_refused() {
    let mut bytes = to_bytes(&sample_plan());
    bytes[0] = b'X';
    assert!(err_text(from_bytes(&bytes, &any())).contains("bad magic"));
    assert!(err_text(from_bytes(b"PK\x03\x04 a zip file", &any())).contains("bad magic"));
    assert!(err_text(from_bytes(b"", &any())).contains("truncated"));
}

#[test]
fn other_format_version_is_refused() {
    let mut bytes = to_bytes(&sample_plan());
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = err_text(from_bytes(&bytes, &any()));
    assert!(e.contains("format version 2 is not supported") && e.contains("reads version 1"), "{e}");
}

#[test]
fn other_arch_precision_or_kiln_version_is_refused() -> Result<(), GraphError> {
    let bytes = to_bytes(&sample_plan());
    let e = err_text(from_bytes(&bytes, &Expect { arch: Some("sm_80".into()), precision: None }));
    assert!(e.contains("built for arch sm_90") && e.contains("needs sm_80"), "{e}");
    let e = err_text(from_bytes(&bytes, &Expect { arch: None, precision: Some(Precision::F32) }));
    assert!(e.contains("built for precision F16") && e.contains("F32 was requested"), "{e}");
    from_bytes(&bytes, &Expect { arch: Some("sm_90".into()), precision: Some(Precision::F16) })?;
    let mut old = sample_plan();
    old.settings.kiln_version = "0.0.1".into();
    let e = err_text(from_bytes(&to_bytes(&old), &any()));
    assert!(e.contains("built by kiln 0.0.1") && e.contains(KILN_VERSION), "{e}");
    let mut bad = sample_plan();
    bad.settings.profiles[0].opt = 100;
    assert!(err_text(from_bytes(&to_bytes(&bad), &any())).contains("profile batch"));
    Ok(())
}

#[test]
fn every_truncation_is_refused() {
    let bytes = to_bytes(&sample_plan());
    for len in 0..bytes.len() {
        let e = err_text(from_bytes(&bytes[..len], &any()));
        assert!(e.contains("truncated"), "prefix of {len} bytes: {e}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(err_text(from_bytes(&longer, &any())).contains("unexpected bytes"));
}

#[test]
fn flipped_blob_byte_fails_the_checksum() {
    let mut bytes = to_bytes(&sample_plan());
    let at = bytes.len() - 10;
    bytes[at] ^= 0x01;
    let e = err_text(from_bytes(&bytes, &any()));
    assert!(e.contains("checksum mismatch"), "{e}");
}

/// A change to a plan's header JSON.
type Edit = fn(&mut serde_json::Value);

/// Re-frames a plan after editing its header JSON, with a fresh checksum, so
/// that only the loader's own checks can catch the edit.
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (header, blob) = split(bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut json: serde_json::Value = serde_json::from_slice(header).unwrap_or_else(|e| panic!("{e}"));
    edit(&mut json);
    assemble(&serde_json::to_vec(&json).unwrap_or_default(), blob)
}

#[test]
fn out_of_range_and_inconsistent_tensors_are_refused() -> Result<(), GraphError> {
    let bytes = to_bytes(&sample_plan());
    from_bytes(&rewrite(&bytes, |_| {}), &any())?; // the re-framing itself is faithful
    let cases: [(&str, Edit); 7] = [
        ("outside the", |j| j["graph"]["values"][2]["constant"]["offset"] = 1u64.wrapping_shl(40).into()),
        ("outside the", |j| j["graph"]["values"][2]["constant"]["bytes"] = u64::MAX.into()),
        ("not 64-byte aligned", |j| j["graph"]["values"][2]["constant"]["offset"] = 8.into()),
        ("do not hold", |j| j["graph"]["values"][2]["constant"]["shape"] = serde_json::json!([4])),
        ("overflows", |j| j["graph"]["values"][2]["constant"]["shape"] = serde_json::json!([u64::MAX, 2])),
        ("cannot be stored as", |j| j["graph"]["values"][1]["storage"] = "F32".into()),
        ("unknown dtype", |j| j["graph"]["values"][2]["constant"]["dtype"] = "FP8".into()),
    ];
    for (want, edit) in cases {
        let e = err_text(from_bytes(&rewrite(&bytes, edit), &any()));
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    Ok(())
}

#[test]
fn bad_graph_references_are_refused() {
    let bytes = to_bytes(&sample_plan());
    let cases: [(&str, Edit); 6] = [
        ("refers to value 99", |j| j["graph"]["nodes"][0]["inputs"][0] = 99.into()),
        ("refers to value 1000", |j| j["graph"]["nodes"][1]["outputs"][0] = 1000.into()),
        ("graph output list", |j| j["graph"]["outputs"][0] = 77.into()),
        ("graph input list", |j| j["graph"]["inputs"][0] = 77.into()),
        ("before it is computed", |j| j["graph"]["nodes"].as_array_mut().into_iter().for_each(|n| n.swap(0, 1))),
        ("attribute value", |j| j["graph"]["nodes"][2]["attrs"]["value"]["tensor"]["shape"] = serde_json::json!([3])),
    ];
    for (want, edit) in cases {
        let e = err_text(from_bytes(&rewrite(&bytes, edit), &any()));
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    let e = err_text(from_bytes(&assemble(b"{\"settings\": 1", &[]), &any()));
    assert!(e.contains("header is not valid"), "{e}");
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = to_bytes(&sample_plan());
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(b.len());
            b[at] ^= 1 + rng.below(255) as u8;
        }
        assert!(from_bytes(&b, &any()).is_err(), "a corrupted plan loaded");
    }
    // Edits behind a valid checksum reach the JSON and graph checks: any
    // outcome but a panic is acceptable there.
    let (header, blob) = split(&bytes).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2000 {
        let mut h = header.to_vec();
        let mut bl = blob.to_vec();
        for _ in 0..1 + rng.below(3) {
            if rng.below(4) == 0 && !bl.is_empty() {
                let at = rng.below(bl.len());
                bl[at] ^= 1 + rng.below(255) as u8;
            } else {
                let at = rng.below(h.len());
                h[at] = b"0123456789-:,{}[]\"eE.nul"[rng.below(24)];
            }
        }
        let _ = from_bytes(&assemble(&h, &bl), &any());
    }
}
