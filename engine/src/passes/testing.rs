//! Test support for the passes: a deterministic generator, two ways to build a
//! graph (node by node with [`Tb`], or as an ONNX model through the importer),
//! and the before/after equivalence check every pass test makes.

use kiln_onnx::{DataType, Dim as OnnxDim, GraphBuilder, OnnxError, attr_float, attr_int, attr_ints};

use super::{Pass, PassContext, PassStats, run_pass};
use crate::graph::{Attr, Dim, Graph, GraphError, Node, ValueId, ValueType, shape_string};
use crate::reference::{RunOptions, run};
use crate::{DType, Tensor, TensorData};

/// A tiny LCG: reproducible test data without extra crates.
#[derive(Debug)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u32() as f32 / (1u64 << 31) as f32) - 1.0
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        self.next_u32() as usize % n.max(1)
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Positive values in [lo, lo + 1).
    pub fn positive(&mut self, n: usize, lo: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (self.f32() + 1.0) / 2.0).collect()
    }
}

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `n` values in [-scale, scale) from generator `seed`.
pub fn random_data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    Lcg::new(seed).vec(n).into_iter().map(|x| x * scale).collect()
}

/// A tensor of [`random_data`].
pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let data = random_data(shape.iter().product(), seed, scale);
    Tensor::new(shape.to_vec(), TensorData::F32(data)).expect("random")
}

/// Random FP32 inputs for every graph input (symbols bound to `sym_size`).
pub fn random_inputs(graph: &Graph, sym_size: usize, rng: &mut Lcg) -> Result<Vec<Tensor>, String> {
    graph
        .inputs
        .iter()
        .map(|&id| {
            let ty = graph.value_type(id).ok_or("input without type")?;
            let shape = ty.shape.as_ref().ok_or("input without shape")?;
            let dims: Vec<usize> = shape.iter().map(|d| d.as_fixed().map_or(sym_size, |n| n as usize)).collect();
            let n: usize = dims.iter().product();
            let data = match ty.dtype {
                DType::F32 => TensorData::F32(rng.vec(n)),
                DType::I64 => TensorData::I64((0..n).map(|_| rng.below(4) as i64).collect()),
                d => return Err(format!("no random data for {d} ({})", shape_string(shape))),
            };
            Tensor::new(dims, data).map_err(|e| e.to_string())
        })
        .collect()
}

/// Builds a graph node by node; `finish` infers every type.
#[derive(Debug)]
pub struct Tb {
    pub g: Graph,
    count: usize,
}

impl Tb {
    pub fn new() -> Self {
        Self { g: Graph::new("test", 17), count: 0 }
    }

    pub fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let dims = shape.iter().map(|&d| Dim::fixed(d as i64)).collect();
        let id = self.g.add_value(name, Some(ValueType::new(DType::F32, dims)));
        self.g.inputs.push(id);
        id
    }

    pub fn constant(&mut self, shape: &[usize], data: Vec<f32>) -> ValueId {
        let name = self.g.fresh_name("c");
        let t = Tensor::new(shape.to_vec(), TensorData::F32(data)).expect("constant");
        self.g.add_constant(name, t)
    }

    pub fn scalar(&mut self, x: f32) -> ValueId {
        self.constant(&[], vec![x])
    }

    pub fn ints(&mut self, data: &[i64]) -> ValueId {
        let name = self.g.fresh_name("i");
        let t = Tensor::new(vec![data.len()], TensorData::I64(data.to_vec())).expect("ints");
        self.g.add_constant(name, t)
    }

    pub fn node(&mut self, op: &str, inputs: &[ValueId]) -> ValueId {
        self.node_attrs(op, inputs, vec![])
    }

    pub fn node_attrs(&mut self, op: &str, inputs: &[ValueId], attrs: Vec<(&str, Attr)>) -> ValueId {
        self.count += 1;
        let out = self.g.add_value(format!("{}_{}_out", op.to_lowercase(), self.count), None);
        let mut n = Node::new(format!("{op}_{}", self.count), op, inputs.iter().map(|&v| Some(v)).collect(), vec![out]);
        for (k, v) in attrs {
            n.attrs.insert(k, v);
        }
        self.g.nodes.push(n);
        out
    }

    pub fn finish(mut self, outputs: &[ValueId]) -> Result<Graph, GraphError> {
        self.g.outputs = outputs.to_vec();
        crate::infer::infer_shapes(&mut self.g)?;
        Ok(self.g)
    }
}

/// A named symbolic ONNX dim.
pub fn sym(name: &str) -> OnnxDim {
    OnnxDim::Symbolic(name.into())
}

/// ONNX dims: `-1` is the symbolic batch `N`.
pub fn dims(spec: &[i64]) -> Vec<OnnxDim> {
    spec.iter().map(|&d| if d < 0 { sym("N") } else { OnnxDim::Fixed(d) }).collect()
}

/// An FP32 model input with the [`dims`] of `spec`.
pub fn input(b: &mut GraphBuilder, name: &str, spec: &[i64]) -> Result<String, OnnxError> {
    input_dims(b, name, &dims(spec))
}

/// An FP32 model input with any dims, e.g. named symbols from [`sym`].
pub fn input_dims(b: &mut GraphBuilder, name: &str, dims: &[OnnxDim]) -> Result<String, OnnxError> {
    b.add_input(name, DataType::Float, dims)?;
    Ok(name.to_string())
}

/// A random FP32 initializer named after `hint`.
pub fn weight(b: &mut GraphBuilder, rng: &mut Lcg, hint: &str, shape: &[i64]) -> Result<String, OnnxError> {
    let n = shape.iter().product::<i64>() as usize;
    let name = b.unique_name(hint);
    b.add_initializer_f32(&name, shape, &rng.vec(n))
}

pub fn values(b: &mut GraphBuilder, hint: &str, shape: &[i64], data: &[f32]) -> Result<String, OnnxError> {
    let name = b.unique_name(hint);
    b.add_initializer_f32(&name, shape, data)
}

pub fn ints(b: &mut GraphBuilder, hint: &str, data: &[i64]) -> Result<String, OnnxError> {
    let name = b.unique_name(hint);
    b.add_initializer_i64(&name, &[data.len() as i64], data)
}

pub fn output(b: &mut GraphBuilder, name: &str) -> Result<(), OnnxError> {
    b.add_output(name, DataType::Float, &[])
}

/// A square-kernel Conv with random weights (and bias when asked).
#[allow(clippy::too_many_arguments)]
pub fn conv(
    b: &mut GraphBuilder,
    rng: &mut Lcg,
    x: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    pad: i64,
    group: i64,
    bias: bool,
) -> Result<String, OnnxError> {
    let w = weight(b, rng, "w", &[cout, cin / group, k, k])?;
    let mut inputs = vec![x.to_string(), w];
    if bias {
        inputs.push(weight(b, rng, "b", &[cout])?);
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.add_node(
        "Conv",
        &refs,
        vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("strides", &[stride, stride]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_int("group", group),
        ],
    )
}

/// BatchNormalization with random statistics.
pub fn batch_norm(b: &mut GraphBuilder, rng: &mut Lcg, x: &str, c: i64) -> Result<String, OnnxError> {
    let n = c as usize;
    let scale = values(b, "bn_scale", &[c], &rng.positive(n, 0.5))?;
    let bias = weight(b, rng, "bn_bias", &[c])?;
    let mean = weight(b, rng, "bn_mean", &[c])?;
    let var = values(b, "bn_var", &[c], &rng.positive(n, 0.2))?;
    b.add_node("BatchNormalization", &[x, &scale, &bias, &mean, &var], vec![attr_float("epsilon", 1e-3)])
}

/// The builder's model (opset 17) through the ONNX importer.
pub fn import(b: GraphBuilder) -> Result<Graph, String> {
    crate::import::import_model(&b.finish(17), None).map_err(|e| e.to_string())
}

pub fn count(graph: &Graph, op: &str) -> usize {
    graph.nodes.iter().filter(|n| n.op == op).count()
}

/// Largest difference relative to max(1, |expected|) over all FP32 outputs;
/// other outputs must be equal. NaN anywhere is an error.
pub fn max_rel_diff(expected: &[Tensor], got: &[Tensor]) -> Result<f32, String> {
    if expected.len() != got.len() {
        return Err(format!("{} outputs expected, {} got", expected.len(), got.len()));
    }
    let mut worst = 0f32;
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        if e.shape() != g.shape() {
            return Err(format!("output {i}: shape {:?} vs {:?}", e.shape(), g.shape()));
        }
        let (TensorData::F32(e), TensorData::F32(g)) = (e.data(), g.data()) else {
            if e.data() != g.data() {
                return Err(format!("output {i}: non-float outputs differ"));
            }
            continue;
        };
        for (a, b) in e.iter().zip(g) {
            let d = (a - b).abs() / a.abs().max(1.0);
            if d.is_nan() {
                return Err(format!("output {i}: NaN in outputs: {a} vs {b}"));
            }
            worst = worst.max(d);
        }
    }
    Ok(worst)
}

/// Runs `pass` on `graph` (in place) through the runner with the default
/// context and checks the reference outputs on `inputs` stay within a
/// relative `tol` ([`max_rel_diff`]).
pub fn check_pass(pass: &dyn Pass, graph: &mut Graph, inputs: &[Tensor], tol: f32) -> Result<PassStats, String> {
    check_pass_with(pass, graph, &PassContext::default(), inputs, tol, false)
}

/// [`check_pass`] under context `cx`, emulating the rewritten graph's FP16
/// nodes when `fp16`.
pub fn check_pass_with(
    pass: &dyn Pass,
    graph: &mut Graph,
    cx: &PassContext,
    inputs: &[Tensor],
    tol: f32,
    fp16: bool,
) -> Result<PassStats, String> {
    let before = run(graph, inputs, RunOptions::default()).map_err(|e| format!("before: {e}"))?;
    let stats = run_pass(pass, graph, cx).map_err(|e| e.to_string())?;
    let after = run(graph, inputs, RunOptions { emulate_fp16: fp16 }).map_err(|e| format!("after: {e}"))?;
    let diff = max_rel_diff(&before, &after)?;
    if diff > tol {
        return Err(format!("outputs differ after {} by {diff} (tolerance {tol})", pass.name()));
    }
    Ok(stats)
}
