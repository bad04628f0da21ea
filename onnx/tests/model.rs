//! kiln-onnx against itself (encode → decode) and against the reference implementation
//! (Python's `onnx` package reads what we write, and we read what it writes).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_onnx::proto::tensor_shape_proto::dimension;
use kiln_onnx::proto::type_proto;
use kiln_onnx::{
    AttributeType, DataType, Dim, GraphBuilder, ModelProto, OnnxError, attr_float, attr_floats, attr_int, attr_ints,
    attr_string, attr_tensor, tensor_f32,
};

/// `y = Relu(x · W + b)` with `x: [batch, 3]` and a symbolic batch dimension.
fn mlp() -> Result<ModelProto, OnnxError> {
    let mut g = GraphBuilder::new("mlp");
    g.add_input("x", DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(3)])?;
    let w = g.add_initializer_f32("w", &[3, 2], &[1.0, -1.0, 0.5, 2.0, -0.25, 0.0])?;
    let b = g.add_initializer_f32("b", &[2], &[0.1, -0.2])?;
    let mm = g.add_node("MatMul", &["x", &w], vec![])?;
    let sum = g.add_node("Add", &[&mm, &b], vec![])?;
    g.add_node_with_outputs("Relu", &[&sum], &["y"], vec![])?;
    g.add_output("y", DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(2)])?;
    Ok(g.finish(kiln_onnx::DEFAULT_OPSET))
}

/// A graph exercising every attribute helper and an INT64 initializer.
fn attributes() -> Result<ModelProto, OnnxError> {
    let mut g = GraphBuilder::new("attrs");
    g.add_input("x", DataType::Float, &[Dim::Symbolic("n".into()), Dim::Fixed(4)])?;
    let shape = g.add_initializer_i64("shape", &[2], &[0, -1])?;
    let r = g.add_node("Reshape", &["x", &shape], vec![attr_int("allowzero", 0)])?;
    let s = g.add_node("Softmax", &[&r], vec![attr_int("axis", -1)])?;
    let e = g.add_node("LeakyRelu", &[&s], vec![attr_float("alpha", 0.0)])?;
    let c = g.add_node("Constant", &[], vec![attr_floats("value_floats", &[1.0, 2.0, 3.0, 4.0])])?;
    let k = g.add_node("Constant", &[], vec![attr_tensor("value", tensor_f32("", &[1], &[2.0])?)])?;
    let e = g.add_node("Mul", &[&e, &c], vec![])?;
    let e = g.add_node("Mul", &[&e, &k], vec![])?;
    let t = g.add_node("Transpose", &[&e], vec![attr_ints("perm", &[1, 0])])?;
    let p = g.add_node("Pad", &[&t, "pads"], vec![attr_string("mode", "reflect")]);
    // `pads` is not defined: the builder refuses before anything is added.
    assert!(matches!(p, Err(OnnxError::UnknownValue(ref n)) if n == "pads"));
    g.add_node_with_outputs("Identity", &[&t], &["y"], vec![])?;
    g.add_output("y", DataType::Float, &[Dim::Fixed(4), Dim::Symbolic("n".into())])?;
    let mut model = g.finish(kiln_onnx::DEFAULT_OPSET);
    model.doc_string = "attribute helpers".into();
    model.metadata_props.push(kiln_onnx::StringStringEntryProto { key: "k".into(), value: "v".into() });
    Ok(model)
}

#[test]
fn encode_decode_round_trip() -> Result<(), OnnxError> {
    for model in [mlp()?, attributes()?] {
        let bytes = kiln_onnx::encode(&model);
        assert_eq!(kiln_onnx::decode(&bytes)?, model);
    }
    // The zero-valued attributes keep their presence (ONNX Runtime checks `has_i`/`has_f`).
    let model = kiln_onnx::decode(&kiln_onnx::encode(&attributes()?))?;
    let graph = model.graph.unwrap();
    assert_eq!(graph.node[0].attribute[0].i, Some(0));
    assert_eq!(graph.node[2].attribute[0].f, Some(0.0));
    assert_eq!(graph.node[7].attribute[0].r#type, AttributeType::Ints as i32);
    assert_eq!(graph.initializer[0].to_i64()?, vec![0, -1]);
    Ok(())
}

#[test]
fn builder_rejects_bad_graphs() -> Result<(), OnnxError> {
    let mut g = GraphBuilder::new("bad");
    g.add_input("x", DataType::Float, &[Dim::Fixed(1)])?;
    assert!(matches!(g.add_input("x", DataType::Float, &[]), Err(OnnxError::DuplicateName(_))));
    assert!(matches!(g.add_initializer_f32("x", &[], &[1.0]), Err(OnnxError::DuplicateName(_))));
    assert!(matches!(g.add_initializer_f32("w", &[2, 2], &[1.0; 3]), Err(OnnxError::DataLength { .. })));
    assert!(matches!(g.add_output("nope", DataType::Float, &[]), Err(OnnxError::UnknownValue(_))));
    assert!(matches!(g.add_node_with_outputs("Relu", &["x"], &["x"], vec![]), Err(OnnxError::DuplicateName(_))));
    assert_eq!(g.unique_name("x"), "x_1");
    let y = g.add_node("Relu", &["x"], vec![])?;
    assert!(g.contains(&y));
    assert!(matches!(g.add_input("z", DataType::Float, &[Dim::Fixed(-2)]), Err(OnnxError::Invalid(_))));
    let scalar = tensor_f32("s", &[], &[2.5])?;
    assert_eq!(scalar.to_f32()?, vec![2.5]);
    assert!(scalar.to_i64().is_err());
    Ok(())
}

#[test]
fn save_and_load() -> Result<(), OnnxError> {
    let dir = Scratch::new("save");
    let path = dir.0.join("mlp.onnx");
    let model = mlp()?;
    kiln_onnx::save(&model, &path)?;
    assert_eq!(kiln_onnx::load(&path)?, model);
    assert!(matches!(kiln_onnx::load(dir.0.join("missing.onnx")), Err(OnnxError::Io { .. })));
    assert!(matches!(kiln_onnx::decode(&[0xff, 0xff, 0xff]), Err(OnnxError::Decode(_))));
    Ok(())
}

/// The onnx package checks (with full shape inference) and reads back what we write.
#[test]
fn python_onnx_checker_accepts_our_models() -> Result<(), OnnxError> {
    let Some(python) = venv_python() else { return Ok(()) };
    let dir = Scratch::new("checker");
    let (mlp_path, attrs_path) = (dir.0.join("mlp.onnx"), dir.0.join("attrs.onnx"));
    kiln_onnx::save(&mlp()?, &mlp_path)?;
    kiln_onnx::save(&attributes()?, &attrs_path)?;
    let script = r#"
import sys, onnx
from onnx import helper, numpy_helper
for path in sys.argv[1:]:
    onnx.checker.check_model(onnx.load(path), full_check=True)
m = onnx.load(sys.argv[1])
assert m.ir_version == 10 and m.opset_import[0].version == 17, m.opset_import
assert [n.op_type for n in m.graph.node] == ["MatMul", "Add", "Relu"]
assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2
w = numpy_helper.to_array(m.graph.initializer[0])
assert w.shape == (3, 2) and w[1, 1] == 2.0 and w.dtype.name == "float32", w
inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
a = onnx.load(sys.argv[2])
attrs = {n.op_type: {x.name: helper.get_attribute_value(x) for x in n.attribute} for n in a.graph.node}
assert attrs["Reshape"] == {"allowzero": 0} and attrs["Softmax"] == {"axis": -1}, attrs
assert attrs["LeakyRelu"] == {"alpha": 0.0} and attrs["Transpose"] == {"perm": [1, 0]}, attrs
assert [helper.get_attribute_value(n.attribute[0]) for n in a.graph.node if n.op_type == "Constant"][0] == [1, 2, 3, 4]
assert a.graph.node[0].attribute[0].HasField("i")
assert list(numpy_helper.to_array(a.graph.initializer[0])) == [0, -1]
assert a.metadata_props[0].key == "k" and a.doc_string == "attribute helpers"
print("ok")
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(&mlp_path).arg(&attrs_path).output().unwrap();
    assert!(
        out.status.success(),
        "python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// We read what `onnx.helper` writes: checks field numbers we never write ourselves.
#[test]
fn reads_models_written_by_python_onnx() -> Result<(), OnnxError> {
    let Some(python) = venv_python() else { return Ok(()) };
    let dir = Scratch::new("py");
    let path = dir.0.join("py.onnx");
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, TensorProto
t_float = helper.make_tensor("tf", TensorProto.FLOAT, [2], [1.5, -2.0])
t_int = helper.make_tensor("ti", TensorProto.INT64, [3], [7, -8, 9])
t_raw = helper.make_tensor("tr", TensorProto.FLOAT, [2], np.array([3.0, 4.0], np.float32).tobytes(), raw=True)
t_dbl = helper.make_tensor("td", TensorProto.DOUBLE, [1], [0.25])
sub = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "sub",
    [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
node = helper.make_node("Custom", ["x", "", "tf"], ["y"], name="n0", domain="kiln.test", doc_string="d",
    f=0.5, i=-3, s="str", t=t_int, g=sub, fs=[1.0, 2.0], is_=[4, 5], ss=["a", "b"], ts=[t_float, t_raw], gs=[sub])
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None])
y = helper.make_tensor_value_info("y", TensorProto.INT64, [])
vi = helper.make_tensor_value_info("v", TensorProto.FLOAT16, [5])
graph = helper.make_graph([node], "pygraph", [x], [y], [t_float, t_int, t_raw, t_dbl], doc_string="gd", value_info=[vi])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("kiln.test", 1)],
    producer_name="py", producer_version="9", domain="dom", model_version=4, doc_string="md")
helper.set_model_props(model, {"author": "kiln"})
onnx.save(model, sys.argv[1])
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(&path).output().unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    let m = kiln_onnx::load(&path)?;
    assert_eq!((m.producer_name.as_str(), m.producer_version.as_str(), m.domain.as_str()), ("py", "9", "dom"));
    assert_eq!((m.model_version, m.doc_string.as_str()), (4, "md"));
    assert_eq!(m.opset_import.len(), 2);
    assert_eq!((m.opset_import[1].domain.as_str(), m.opset_import[1].version), ("kiln.test", 1));
    assert_eq!((m.metadata_props[0].key.as_str(), m.metadata_props[0].value.as_str()), ("author", "kiln"));
    let g = m.graph.unwrap();
    assert_eq!((g.name.as_str(), g.doc_string.as_str()), ("pygraph", "gd"));
    let n = &g.node[0];
    assert_eq!(
        (n.op_type.as_str(), n.name.as_str(), n.domain.as_str(), n.doc_string.as_str()),
        ("Custom", "n0", "kiln.test", "d")
    );
    assert_eq!((n.input.clone(), n.output.clone()), (vec!["x".into(), String::new(), "tf".into()], vec!["y".into()]));
    let attr = |name: &str| n.attribute.iter().find(|a| a.name == name).unwrap();
    assert_eq!((attr("f").f, attr("f").r#type), (Some(0.5), AttributeType::Float as i32));
    assert_eq!((attr("i").i, attr("i").r#type), (Some(-3), AttributeType::Int as i32));
    assert_eq!(attr("s").s.as_deref(), Some(&b"str"[..]));
    assert_eq!(attr("t").t.as_ref().unwrap().to_i64()?, vec![7, -8, 9]);
    assert_eq!(attr("g").g.as_ref().unwrap().node[0].op_type, "Identity");
    assert_eq!((attr("fs").floats.clone(), attr("is_").ints.clone()), (vec![1.0, 2.0], vec![4, 5]));
    assert_eq!(attr("ss").strings, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(attr("ts").r#type, AttributeType::Tensors as i32);
    assert_eq!((attr("ts").tensors[1].to_f32()?, attr("gs").graphs.len()), (vec![3.0, 4.0], 1));
    let init = |name: &str| g.initializer.iter().find(|t| t.name == name).unwrap();
    assert_eq!(init("tf").to_f32()?, vec![1.5, -2.0]);
    assert_eq!((init("ti").to_i64()?, init("ti").dims.clone()), (vec![7, -8, 9], vec![3]));
    assert_eq!(init("tr").to_f32()?, vec![3.0, 4.0]);
    assert_eq!((init("td").data_type, init("td").double_data.clone()), (DataType::Double as i32, vec![0.25]));
    let Some(type_proto::Value::TensorType(x)) = g.input[0].r#type.as_ref().unwrap().value.clone() else {
        panic!("x is not a tensor")
    };
    assert_eq!(x.elem_type, DataType::Float as i32);
    let dims: Vec<_> = x.shape.unwrap().dim.into_iter().map(|d| d.value).collect();
    assert_eq!(dims, vec![Some(dimension::Value::DimParam("batch".into())), Some(dimension::Value::DimValue(3)), None]);
    assert_eq!(g.value_info[0].name, "v");
    Ok(())
}

fn venv_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.kiln/venv/bin/python");
    if python.is_file() {
        Some(python)
    } else {
        println!("skipped: {} is missing (run `make setup`)", python.display());
        None
    }
}

/// A scratch directory removed on drop (kiln-onnx has no dev-dependency on kiln-tests).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let path = std::env::temp_dir().join(format!("kiln-onnx-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
