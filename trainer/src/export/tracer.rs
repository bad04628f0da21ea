//! [`OnnxTracer`]: the [`Ops`] interpreter whose values are ONNX value names. Running a
//! model's forward pass through it records the pass as an ONNX graph.

use std::collections::{HashMap, HashSet};

use kiln_onnx::{DataType, GraphBuilder, ModelProto, attr_float, attr_int, attr_ints};
use tch::{Device, Kind};

use crate::error::TrainError;
use crate::models::{Dim, ElemKind, IoSpec};
use crate::ops::{BatchNorm, Conv2d, LayerNorm, Linear, Ops, Param, Pool};

/// Records [`Ops`] calls as ONNX nodes (opset 17 semantics). Parameters become FP32
/// initializers named exactly like the [`Param`], added once however often they are used.
///
/// The tracer keeps the rank of every value it has produced: ONNX's Transpose needs a
/// full permutation, and `linear` picks Gemm (rank 2) or MatMul + Add (any other rank).
#[derive(Debug)]
pub struct OnnxTracer {
    graph: GraphBuilder,
    ranks: HashMap<String, usize>,
    /// Initializer names already taken by parameters (and their transposed copies).
    params: HashSet<String>,
    /// Small constants (shapes, axes, scalars) by content, so each is stored once.
    consts: HashMap<String, String>,
}

impl OnnxTracer {
    /// An empty trace for a graph called `graph_name`.
    pub fn new(graph_name: &str) -> Self {
        OnnxTracer {
            graph: GraphBuilder::new(graph_name),
            ranks: HashMap::new(),
            params: HashSet::new(),
            consts: HashMap::new(),
        }
    }

    /// Declares a graph input and returns its value name (the spec's name).
    pub fn add_input(&mut self, spec: &IoSpec) -> Result<String, TrainError> {
        self.graph.add_input(&spec.name, data_type(spec.kind), &onnx_dims(&spec.dims)).map_err(export_err)?;
        self.ranks.insert(spec.name.clone(), spec.dims.len());
        Ok(spec.name.clone())
    }

    /// Declares `value` as the graph output `spec.name`, through an Identity node when
    /// the traced value carries another name.
    pub fn add_output(&mut self, value: &str, spec: &IoSpec) -> Result<(), TrainError> {
        let rank = self.rank(value)?;
        if rank != spec.dims.len() {
            return Err(TrainError::Export(format!(
                "output {} is declared with {} dims but the traced value has rank {rank}",
                spec.name,
                spec.dims.len()
            )));
        }
        if value != spec.name {
            self.graph.add_node_with_outputs("Identity", &[value], &[&spec.name], vec![]).map_err(export_err)?;
            self.ranks.insert(spec.name.clone(), rank);
        }
        self.graph.add_output(&spec.name, data_type(spec.kind), &onnx_dims(&spec.dims)).map_err(export_err)
    }

    /// The model holding everything traced so far.
    pub fn finish(self, opset: i64) -> ModelProto {
        self.graph.finish(opset)
    }

    /// The rank of a traced value.
    pub fn rank(&self, value: &str) -> Result<usize, TrainError> {
        self.ranks.get(value).copied().ok_or_else(|| TrainError::Export(format!("value {value:?} was not traced")))
    }

    /// Adds one node with one output of rank `rank`.
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<kiln_onnx::AttributeProto>,
        rank: usize,
    ) -> Result<String, TrainError> {
        let out = self.graph.add_node(op, inputs, attrs).map_err(export_err)?;
        self.ranks.insert(out.clone(), rank);
        Ok(out)
    }

    /// The initializer for `param`, added on first use.
    fn param(&mut self, param: &Param) -> Result<String, TrainError> {
        if !self.params.contains(&param.name) {
            let (dims, data) = read_param(param, false)?;
            self.graph.add_initializer_f32(&param.name, &dims, &data).map_err(export_err)?;
            self.params.insert(param.name.clone());
            self.ranks.insert(param.name.clone(), dims.len());
        }
        Ok(param.name.clone())
    }

    /// `<name>_t`: a 2-D parameter stored transposed, for MatMul's `x · Wᵀ`.
    fn param_transposed(&mut self, param: &Param) -> Result<String, TrainError> {
        let name = format!("{}_t", param.name);
        if !self.params.contains(&name) {
            let (dims, data) = read_param(param, true)?;
            self.graph.add_initializer_f32(&name, &dims, &data).map_err(export_err)?;
            self.params.insert(name.clone());
            self.ranks.insert(name.clone(), 2);
        }
        Ok(name)
    }

    /// An INT64 constant (dims empty for a scalar), shared by content.
    fn const_i64(&mut self, dims: &[i64], values: &[i64]) -> Result<String, TrainError> {
        let key = format!("i64{dims:?}{values:?}");
        if let Some(name) = self.consts.get(&key) {
            return Ok(name.clone());
        }
        let name = self.graph.unique_name(&format!("const_i64_{}", self.consts.len()));
        self.graph.add_initializer_i64(&name, dims, values).map_err(export_err)?;
        self.ranks.insert(name.clone(), dims.len());
        self.consts.insert(key, name.clone());
        Ok(name)
    }

    /// An FP32 scalar constant, shared by (bit-exact) value.
    fn const_f32(&mut self, value: f32) -> Result<String, TrainError> {
        let key = format!("f32:{:08x}", value.to_bits());
        if let Some(name) = self.consts.get(&key) {
            return Ok(name.clone());
        }
        let name = self.graph.unique_name(&format!("const_f32_{}", self.consts.len()));
        self.graph.add_initializer_f32(&name, &[], &[value]).map_err(export_err)?;
        self.ranks.insert(name.clone(), 0);
        self.consts.insert(key, name.clone());
        Ok(name)
    }

    fn expect_rank(&self, value: &str, want: usize, op: &str) -> Result<usize, TrainError> {
        let rank = self.rank(value)?;
        if rank == want {
            Ok(rank)
        } else {
            Err(TrainError::Shape(format!("{op} expects a rank-{want} input, got rank {rank}")))
        }
    }
}

impl Ops for OnnxTracer {
    type T = String;

    fn conv2d(&mut self, x: &String, conv: &Conv2d) -> Result<String, TrainError> {
        self.expect_rank(x, 4, "conv2d")?;
        let kernel = conv.weight.tensor.size();
        let [_, _, kh, kw] = kernel[..] else {
            return Err(TrainError::Shape(format!("conv2d weight {} has dims {kernel:?}", conv.weight.name)));
        };
        let w = self.param(&conv.weight)?;
        let b = conv.bias.as_ref().map(|b| self.param(b)).transpose()?;
        let mut inputs = vec![x.as_str(), &w];
        inputs.extend(b.as_deref());
        let (s, p) = (conv.stride, conv.padding);
        let attrs = vec![
            attr_ints("kernel_shape", &[kh, kw]),
            attr_ints("strides", &[s, s]),
            attr_ints("pads", &[p, p, p, p]),
            attr_ints("dilations", &[1, 1]),
            attr_int("group", conv.groups),
        ];
        self.node("Conv", &inputs, attrs, 4)
    }

    fn batch_norm(&mut self, x: &String, bn: &BatchNorm) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        let scale = self.param(&bn.weight)?;
        let bias = self.param(&bn.bias)?;
        let mean = self.param(&bn.running_mean)?;
        let var = self.param(&bn.running_var)?;
        // Inference form (training_mode = 0): normalises with the running statistics.
        let attrs = vec![attr_float("epsilon", bn.eps as f32), attr_float("momentum", (1.0 - bn.momentum) as f32)];
        self.node("BatchNormalization", &[x, &scale, &bias, &mean, &var], attrs, rank)
    }

    fn linear(&mut self, x: &String, fc: &Linear) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        if rank == 2 {
            let w = self.param(&fc.weight)?;
            let b = fc.bias.as_ref().map(|b| self.param(b)).transpose()?;
            let mut inputs = vec![x.as_str(), &w];
            inputs.extend(b.as_deref());
            return self.node("Gemm", &inputs, vec![attr_int("transB", 1)], 2);
        }
        let w_t = self.param_transposed(&fc.weight)?;
        let y = self.node("MatMul", &[x, &w_t], vec![], rank)?;
        match &fc.bias {
            Some(bias) => {
                let b = self.param(bias)?;
                self.node("Add", &[&y, &b], vec![], rank)
            }
            None => Ok(y),
        }
    }

    fn layer_norm(&mut self, x: &String, ln: &LayerNorm) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        let scale = self.param(&ln.weight)?;
        let bias = self.param(&ln.bias)?;
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", ln.eps as f32)];
        self.node("LayerNormalization", &[x, &scale, &bias], attrs, rank)
    }

    fn embedding(&mut self, ids: &String, table: &Param) -> Result<String, TrainError> {
        let rank = self.rank(ids)?;
        let t = self.param(table)?;
        self.node("Gather", &[&t, ids], vec![attr_int("axis", 0)], rank + 1)
    }

    fn position_embedding(&mut self, like: &String, table: &Param) -> Result<String, TrainError> {
        self.rank(like)?;
        let t = self.param(table)?;
        // Shape(start=1, end=2) is `[S]`, already the 1-D `ends` Slice wants.
        let seq = self.node("Shape", &[like], vec![attr_int("start", 1), attr_int("end", 2)], 1)?;
        let zero = self.const_i64(&[1], &[0])?;
        let rows = self.node("Slice", &[&t, &zero, &seq, &zero], vec![], 2)?;
        self.node("Unsqueeze", &[&rows, &zero], vec![], 3)
    }

    fn relu(&mut self, x: &String) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        self.node("Relu", &[x], vec![], rank)
    }

    fn gelu(&mut self, x: &String) -> Result<String, TrainError> {
        // Opset 17 has no Gelu: x · 0.5 · (1 + erf(x / √2)), written as libtorch computes it.
        let rank = self.rank(x)?;
        let inv_sqrt2 = self.const_f32(std::f32::consts::FRAC_1_SQRT_2)?;
        let one = self.const_f32(1.0)?;
        let half = self.const_f32(0.5)?;
        let scaled = self.node("Mul", &[x, &inv_sqrt2], vec![], rank)?;
        let erf = self.node("Erf", &[&scaled], vec![], rank)?;
        let shifted = self.node("Add", &[&erf, &one], vec![], rank)?;
        let gated = self.node("Mul", &[x, &shifted], vec![], rank)?;
        self.node("Mul", &[&gated, &half], vec![], rank)
    }

    fn tanh(&mut self, x: &String) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        self.node("Tanh", &[x], vec![], rank)
    }

    fn add(&mut self, a: &String, b: &String) -> Result<String, TrainError> {
        let rank = self.rank(a)?.max(self.rank(b)?);
        self.node("Add", &[a, b], vec![], rank)
    }

    fn scale(&mut self, x: &String, factor: f64) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        let factor = self.const_f32(factor as f32)?;
        self.node("Mul", &[x, &factor], vec![], rank)
    }

    fn matmul(&mut self, a: &String, b: &String) -> Result<String, TrainError> {
        let rank = self.rank(a)?.max(self.rank(b)?);
        self.node("MatMul", &[a, b], vec![], rank)
    }

    fn softmax(&mut self, x: &String) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        self.node("Softmax", &[x], vec![attr_int("axis", -1)], rank)
    }

    fn dropout(&mut self, x: &String, _p: f64) -> Result<String, TrainError> {
        Ok(x.clone())
    }

    fn max_pool2d(&mut self, x: &String, pool: Pool) -> Result<String, TrainError> {
        self.expect_rank(x, 4, "max_pool2d")?;
        let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
        let attrs =
            vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[s, s]), attr_ints("pads", &[p, p, p, p])];
        self.node("MaxPool", &[x], attrs, 4)
    }

    fn global_avg_pool(&mut self, x: &String) -> Result<String, TrainError> {
        self.expect_rank(x, 4, "global_avg_pool")?;
        let pooled = self.node("GlobalAveragePool", &[x], vec![], 4)?;
        self.node("Flatten", &[&pooled], vec![attr_int("axis", 1)], 2)
    }

    fn flatten(&mut self, x: &String) -> Result<String, TrainError> {
        self.rank(x)?;
        self.node("Flatten", &[x], vec![attr_int("axis", 1)], 2)
    }

    fn split_heads(&mut self, x: &String, heads: i64) -> Result<String, TrainError> {
        self.expect_rank(x, 3, "split_heads")?;
        // 0 copies N and S from the input, so batch and sequence stay dynamic.
        let shape = self.const_i64(&[4], &[0, 0, heads, -1])?;
        let split = self.node("Reshape", &[x, &shape], vec![], 4)?;
        self.node("Transpose", &[&split], vec![attr_ints("perm", &[0, 2, 1, 3])], 4)
    }

    fn merge_heads(&mut self, x: &String) -> Result<String, TrainError> {
        self.expect_rank(x, 4, "merge_heads")?;
        let swapped = self.node("Transpose", &[x], vec![attr_ints("perm", &[0, 2, 1, 3])], 4)?;
        let shape = self.const_i64(&[3], &[0, 0, -1])?;
        self.node("Reshape", &[&swapped, &shape], vec![], 3)
    }

    fn first_token(&mut self, x: &String) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        if rank < 2 {
            return Err(TrainError::Shape(format!("first_token expects rank ≥ 2, got {rank}")));
        }
        // A scalar index drops the axis, as libtorch's select does.
        let zero = self.const_i64(&[], &[0])?;
        self.node("Gather", &[x, &zero], vec![attr_int("axis", 1)], rank - 1)
    }

    fn transpose_last(&mut self, x: &String) -> Result<String, TrainError> {
        let rank = self.rank(x)?;
        if rank < 2 {
            return Err(TrainError::Shape(format!("transpose_last expects rank ≥ 2, got {rank}")));
        }
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 2, rank - 1);
        self.node("Transpose", &[x], vec![attr_ints("perm", &perm)], rank)
    }

    fn attention_bias(&mut self, mask: &String) -> Result<String, TrainError> {
        let rank = self.rank(mask)?;
        let keep = self.node("Cast", &[mask], vec![attr_int("to", DataType::Float as i64)], rank)?;
        let axes = self.const_i64(&[2], &[1, 2])?;
        let keep = self.node("Unsqueeze", &[&keep, &axes], vec![], rank + 2)?;
        let one = self.const_f32(1.0)?;
        let min = self.const_f32(f32::MIN)?;
        let dropped = self.node("Sub", &[&one, &keep], vec![], rank + 2)?;
        self.node("Mul", &[&dropped, &min], vec![], rank + 2)
    }
}

/// A parameter's dims and FP32 values (transposed for a 2-D `transpose`), copied to the CPU.
fn read_param(param: &Param, transpose: bool) -> Result<(Vec<i64>, Vec<f32>), TrainError> {
    tch::no_grad(|| {
        let mut tensor = param.tensor.f_detach()?;
        if transpose {
            if tensor.dim() != 2 {
                return Err(TrainError::Shape(format!("{} is not 2-D: {:?}", param.name, tensor.size())));
            }
            tensor = tensor.f_transpose(0, 1)?;
        }
        let dims = tensor.size();
        let flat = tensor.f_contiguous()?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_reshape([-1])?;
        Ok((dims, Vec::<f32>::try_from(&flat)?))
    })
}

fn data_type(kind: ElemKind) -> DataType {
    match kind {
        ElemKind::F32 => DataType::Float,
        ElemKind::I64 => DataType::Int64,
    }
}

fn onnx_dims(dims: &[Dim]) -> Vec<kiln_onnx::Dim> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) => kiln_onnx::Dim::Fixed(*n),
            Dim::Dynamic(name) => kiln_onnx::Dim::Symbolic((*name).to_string()),
        })
        .collect()
}

pub(super) fn export_err(e: kiln_onnx::OnnxError) -> TrainError {
    TrainError::Export(e.to_string())
}
