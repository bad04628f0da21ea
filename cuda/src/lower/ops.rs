//! Per-op emission: each graph op the CUDA engine runs, as library calls and
//! kernel launches. [`supported`] is the list the analysis checks up front.

use kiln_engine::graph::Node;
use kiln_engine::{Tensor, TensorData};

use super::analysis::{DevOp, DevOpKind};
use super::emit::{Emitter, StepKind, View};
use crate::CudaError;
use crate::blas::{Epilogue, GemmArgs, GemmElem, GemmSpec};
use crate::dnn::{ConvAct, ConvArgs, ConvElem, ConvLayout, ConvSpec};
use crate::kernels::{
    AttentionArgs, AttentionMask, CastArgs, CopyArgs, Elem, EwOp, EwProgram, GatherArgs, GlobalPoolArgs, LayerNormArgs,
    Layout, Pool2dArgs, PoolKind, ReduceArgs, ReduceKind, Reg, SoftmaxArgs, row_major_strides,
};

/// Ops with one elementwise opcode (`Max`/`Min` may have more than two inputs).
const ELEMENTWISE: &[(&str, EwOp)] = &[
    ("Add", EwOp::Add),
    ("Sub", EwOp::Sub),
    ("Mul", EwOp::Mul),
    ("Div", EwOp::Div),
    ("Pow", EwOp::Pow),
    ("Max", EwOp::Max),
    ("Min", EwOp::Min),
    ("Neg", EwOp::Neg),
    ("Abs", EwOp::Abs),
    ("Exp", EwOp::Exp),
    ("Log", EwOp::Log),
    ("Sqrt", EwOp::Sqrt),
    ("Reciprocal", EwOp::Recip),
    ("Tanh", EwOp::Tanh),
    ("Sigmoid", EwOp::Sigmoid),
    ("Relu", EwOp::Relu),
    ("Erf", EwOp::Erf),
    ("Equal", EwOp::Equal),
    ("Less", EwOp::Less),
    ("Greater", EwOp::Greater),
    ("LessOrEqual", EwOp::LessOrEqual),
    ("GreaterOrEqual", EwOp::GreaterOrEqual),
    ("And", EwOp::And),
    ("Or", EwOp::Or),
    ("Xor", EwOp::Xor),
    ("Not", EwOp::Not),
    ("Floor", EwOp::Floor),
    ("Ceil", EwOp::Ceil),
    ("Round", EwOp::Round),
    ("IsNaN", EwOp::IsNan),
    ("HardSwish", EwOp::HardSwish),
];

/// Every op the CUDA engine runs on the device.
pub fn supported(op: &str) -> bool {
    ELEMENTWISE.iter().any(|(n, _)| *n == op)
        || matches!(
            op,
            "kiln.FusedConv"
                | "kiln.Dense"
                | "kiln.Attention"
                | "MatMul"
                | "LayerNormalization"
                | "Softmax"
                | "MaxPool"
                | "AveragePool"
                | "GlobalAveragePool"
                | "ReduceMean"
                | "ReduceSum"
                | "ReduceMax"
                | "ReduceMin"
                | "Gather"
                | "Transpose"
                | "Expand"
                | "Slice"
                | "Concat"
                | "Cast"
                | "Where"
                | "Clip"
                | "Gelu"
                | "LeakyRelu"
                | "HardSigmoid"
                | "Reshape"
                | "Flatten"
                | "Squeeze"
                | "Unsqueeze"
                | "Identity"
        )
}

fn bad(node: &Node, why: impl std::fmt::Display) -> CudaError {
    CudaError::InvalidArgument(format!("{} ({}): {why}", node.name, node.op))
}

fn attr<T>(node: &Node, r: Result<T, String>) -> Result<T, CudaError> {
    r.map_err(|m| bad(node, m))
}

/// Element strides that read `dims` broadcast (numpy rules) to `out`.
pub(super) fn broadcast_strides(dims: &[usize], out: &[usize]) -> Option<Vec<i64>> {
    if dims.len() > out.len() {
        return None;
    }
    let own = row_major_strides(dims);
    let lead = out.len() - dims.len();
    let mut strides = vec![0i64; out.len()];
    for (k, (&d, &s)) in dims.iter().zip(&own).enumerate() {
        match d {
            1 => {}
            d if d == out[lead + k] => strides[lead + k] = s,
            _ => return None,
        }
    }
    Some(strides)
}

fn norm_axis(node: &Node, axis: i64, rank: usize) -> Result<usize, CudaError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(bad(node, format!("axis {axis} out of range for rank {rank}")))
    }
}

fn gemm_elem(node: &Node, e: Elem) -> Result<GemmElem, CudaError> {
    match e {
        Elem::F16 => Ok(GemmElem::F16),
        Elem::F32 => Ok(GemmElem::F32),
        other => Err(bad(node, format!("GEMM on {other:?} elements"))),
    }
}

/// An activation the GEMM or convolution could not apply, as ops on one register.
pub(super) fn activation_ops(node: &Node) -> Result<Vec<(EwOp, f32, f32)>, CudaError> {
    let name = attr(node, node.attrs.string("activation", "none"))?;
    Ok(match name.as_str() {
        "none" => vec![],
        "relu" => vec![(EwOp::Relu, 0.0, 0.0)],
        "gelu" => vec![(EwOp::Gelu, 0.0, 0.0)],
        "gelu_tanh" => vec![(EwOp::GeluTanh, 0.0, 0.0)],
        "tanh" => vec![(EwOp::Tanh, 0.0, 0.0)],
        "sigmoid" => vec![(EwOp::Sigmoid, 0.0, 0.0)],
        "silu" => vec![(EwOp::Silu, 0.0, 0.0)],
        "clip" => {
            let lo = attr(node, node.attrs.float("clip_min", f32::NEG_INFINITY))?;
            let hi = attr(node, node.attrs.float("clip_max", f32::INFINITY))?;
            vec![(EwOp::Clip, lo, hi)]
        }
        other => return Err(bad(node, format!("activation {other:?}"))),
    })
}

/// `y = act(y + z)` in place, for what an epilogue could not fuse.
fn post_ops(
    e: &mut Emitter<'_>,
    node: &Node,
    y: &View,
    z: Option<&View>,
    act: &[(EwOp, f32, f32)],
) -> Result<(), CudaError> {
    if z.is_none() && act.is_empty() {
        return Ok(());
    }
    let mut b = EwProgram::builder(&y.dims, y.ptr, y.elem);
    let mut r = b.input(y.ptr, y.elem, &row_major_strides(&y.dims));
    if let Some(z) = z {
        let s = broadcast_strides(&z.dims, &y.dims).ok_or_else(|| bad(node, "residual does not broadcast"))?;
        let zr = b.input(z.ptr, z.elem, &s);
        r = b.binary(EwOp::Add, r, zr);
    }
    for &(op, i0, i1) in act {
        r = b.op(op, r, 0, 0, i0, i1);
    }
    let _ = r;
    let program = b.finish()?;
    e.push(node, StepKind::Elementwise(Box::new(program)));
    Ok(())
}

/// Emits the steps of one graph node.
pub(super) fn emit_node(e: &mut Emitter<'_>, node: &Node, op: &DevOp) -> Result<(), CudaError> {
    let views: Vec<Option<View>> = op.ins.iter().map(|d| d.map(|d| e.view(d)).transpose()).collect::<Result<_, _>>()?;
    let outs: Vec<View> = op.outs.iter().map(|&d| e.view(d)).collect::<Result<_, _>>()?;
    let input = |k: usize| views.get(k).and_then(Option::as_ref).ok_or_else(|| bad(node, format!("input {k} missing")));
    let y = outs.first().ok_or_else(|| bad(node, "no output"))?;
    if y.numel() == 0 {
        return Ok(());
    }
    let o = node.op.as_str();
    if let Some(&(_, code)) = ELEMENTWISE.iter().find(|(n, _)| *n == o) {
        return elementwise(e, node, &views, y, code, 0.0, 0.0);
    }
    match o {
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" => Ok(()),
        "kiln.FusedConv" => {
            let prepadded = matches!(op.kind, DevOpKind::Node(i) if e.analysis.prepadded.contains(&i));
            conv(e, node, &views, y, prepadded)
        }
        "kiln.Dense" => dense(e, node, &views, y),
        "MatMul" => matmul(e, node, input(0)?, input(1)?, y),
        "kiln.Attention" => attention(e, node, &views, y),
        "Gelu" => {
            let tanh = attr(node, node.attrs.string("approximate", "none"))? == "tanh";
            elementwise(e, node, &views, y, if tanh { EwOp::GeluTanh } else { EwOp::Gelu }, 0.0, 0.0)
        }
        "LeakyRelu" => {
            let alpha = attr(node, node.attrs.float("alpha", 0.01))?;
            elementwise(e, node, &views, y, EwOp::LeakyRelu, alpha, 0.0)
        }
        "HardSigmoid" => {
            let alpha = attr(node, node.attrs.float("alpha", 0.2))?;
            let beta = attr(node, node.attrs.float("beta", 0.5))?;
            elementwise(e, node, &views, y, EwOp::HardSigmoid, alpha, beta)
        }
        "Clip" => {
            let bound = |k: usize, default: f32| match e.constant(node, k) {
                None if node.input(k).is_none() => Ok(default),
                Some(t) => scalar(t).ok_or_else(|| bad(node, "Clip bounds must be scalars")),
                None => Err(bad(node, "Clip bounds computed at run time are not supported on the GPU")),
            };
            let (lo, hi) = (bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?);
            // ONNX Clip with min > max gives max everywhere; the kernel's clip wants lo ≤ hi.
            let (lo, hi) = if lo > hi { (hi, hi) } else { (lo, hi) };
            elementwise(e, node, &views[..1], y, EwOp::Clip, lo, hi)
        }
        "Where" => elementwise(e, node, &views, y, EwOp::Where, 0.0, 0.0),
        "Cast" => {
            let x = input(0)?;
            let to_bool = node.attrs.int("to", 0).ok() == Some(9);
            let args =
                CastArgs { src: x.ptr, src_elem: x.elem, dst: y.ptr, dst_elem: y.elem, n: y.numel(), boolean: to_bool };
            e.push(node, StepKind::Cast(args));
            Ok(())
        }
        "LayerNormalization" => layer_norm(e, node, &views, y),
        "Softmax" => {
            let x = input(0)?;
            let axis = norm_axis(node, attr(node, node.attrs.int("axis", -1))?, x.dims.len())?;
            if axis + 1 != x.dims.len() {
                return Err(bad(node, "softmax over an axis other than the last"));
            }
            let cols = x.dims[axis];
            let args = SoftmaxArgs { x: x.ptr, x_elem: x.elem, y: y.ptr, y_elem: y.elem, rows: x.numel() / cols, cols };
            e.push(node, StepKind::Softmax(args));
            Ok(())
        }
        "MaxPool" | "AveragePool" => pool(e, node, input(0)?, y),
        "GlobalAveragePool" => {
            let x = input(0)?;
            let layout = layout(node)?;
            let (n, c) = match (layout, x.dims.as_slice()) {
                (Layout::Nhwc, [n, .., c]) | (Layout::Nchw, [n, c, ..]) => (*n, *c),
                _ => return Err(bad(node, format!("GlobalAveragePool of a rank-{} tensor", x.dims.len()))),
            };
            let spatial = x.numel() / (n * c).max(1);
            let args = GlobalPoolArgs { x: x.ptr, y: y.ptr, elem: y.elem, layout, n, c, spatial };
            e.push(node, StepKind::GlobalPool(args));
            Ok(())
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" => reduce(e, node, input(0)?, y),
        "Gather" => {
            let (table, idx) = (input(0)?, input(1)?);
            if attr(node, node.attrs.int("axis", 0))? != 0 {
                return Err(bad(node, "Gather on an axis other than 0"));
            }
            let rows = *table.dims.first().ok_or_else(|| bad(node, "Gather from a scalar"))?;
            let row_len = table.numel() / rows.max(1);
            let args = GatherArgs {
                out: y.ptr,
                table: table.ptr,
                idx: idx.ptr,
                idx_elem: idx.elem,
                elem: table.elem,
                n_idx: idx.numel(),
                rows,
                row_len,
                err: None,
            };
            e.push(node, StepKind::Gather(args));
            Ok(())
        }
        "Transpose" => {
            let x = input(0)?;
            let rank = x.dims.len();
            let perm: Vec<usize> = match attr(node, node.attrs.ints("perm"))? {
                Some(p) => p.iter().map(|&a| norm_axis(node, a, rank)).collect::<Result<_, _>>()?,
                None => (0..rank).rev().collect(),
            };
            let own = row_major_strides(&x.dims);
            let src_strides: Vec<i64> = perm.iter().map(|&a| own[a]).collect();
            e.push(node, StepKind::Copy(CopyArgs::contiguous(y.ptr, x.ptr, x.elem.size(), &y.dims, &src_strides)));
            Ok(())
        }
        "Expand" => {
            let x = input(0)?;
            let s = broadcast_strides(&x.dims, &y.dims).ok_or_else(|| bad(node, "Expand shape does not broadcast"))?;
            e.push(node, StepKind::Copy(CopyArgs::contiguous(y.ptr, x.ptr, x.elem.size(), &y.dims, &s)));
            Ok(())
        }
        "Slice" => slice(e, node, input(0)?, y),
        "Concat" => {
            let rank = y.dims.len();
            let axis = norm_axis(node, attr(node, node.attrs.int("axis", 0))?, rank)?;
            let out_strides = row_major_strides(&y.dims);
            let mut at = 0usize;
            for x in views.iter().flatten() {
                let dst = y.ptr + (at as i64 * out_strides[axis]) as u64 * y.elem.size() as u64;
                let copy = CopyArgs {
                    dst,
                    src: x.ptr,
                    elem_size: x.elem.size(),
                    shape: x.dims.clone(),
                    src_strides: row_major_strides(&x.dims),
                    dst_strides: out_strides.clone(),
                };
                if x.numel() > 0 {
                    e.push(node, StepKind::Copy(copy));
                }
                at += x.dims.get(axis).copied().unwrap_or(0);
            }
            Ok(())
        }
        other => Err(bad(node, format!("{other} is not implemented on the GPU"))),
    }
}

fn ints_of(t: &Tensor) -> Option<Vec<i64>> {
    match t.data() {
        TensorData::I64(v) => Some(v.clone()),
        TensorData::I32(v) => Some(v.iter().map(|&x| i64::from(x)).collect()),
        _ => None,
    }
}

/// Slice with constant starts/axes/steps as one strided copy (the output's
/// extent is already inferred, so the ends are not needed).
fn slice(e: &mut Emitter<'_>, node: &Node, x: &View, y: &View) -> Result<(), CudaError> {
    let rank = x.dims.len();
    let konst = |k: usize| -> Result<Option<Vec<i64>>, CudaError> {
        match (node.input(k), e.constant(node, k)) {
            (None, _) => Ok(None),
            (Some(_), Some(t)) => ints_of(t).map(Some).ok_or_else(|| bad(node, "slice parameters must be integers")),
            (Some(_), None) => Err(bad(node, "slice parameters computed at run time are not supported on the GPU")),
        }
    };
    let starts = konst(1)?.ok_or_else(|| bad(node, "starts missing"))?;
    let axes: Vec<usize> = match konst(3)? {
        Some(a) => a.iter().map(|&a| norm_axis(node, a, rank)).collect::<Result<_, _>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = konst(4)?.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || steps.len() != starts.len() || steps.contains(&0) {
        return Err(bad(node, "starts, axes and steps disagree"));
    }
    let own = row_major_strides(&x.dims);
    let mut strides = own.clone();
    let mut offset = 0i64;
    for ((&a, &s0), &step) in axes.iter().zip(&starts).zip(&steps) {
        let dim = x.dims[a] as i64;
        let s = if s0 < 0 { s0 + dim } else { s0 };
        let s = if step > 0 { s.clamp(0, dim) } else { s.clamp(0, dim - 1) };
        offset += s * own[a];
        strides[a] = own[a] * step;
    }
    let src = x.ptr.wrapping_add((offset * x.elem.size() as i64) as u64);
    e.push(node, StepKind::Copy(CopyArgs::contiguous(y.ptr, src, x.elem.size(), &y.dims, &strides)));
    Ok(())
}

fn scalar(t: &Tensor) -> Option<f32> {
    match t.data() {
        TensorData::F32(v) if v.len() == 1 => Some(v[0]),
        TensorData::F16(v) if v.len() == 1 => Some(v[0].to_f32()),
        TensorData::I64(v) if v.len() == 1 => Some(v[0] as f32),
        _ => None,
    }
}

/// One op over broadcast inputs (chained pairwise for variadic Max/Min).
fn elementwise(
    e: &mut Emitter<'_>,
    node: &Node,
    views: &[Option<View>],
    y: &View,
    code: EwOp,
    imm0: f32,
    imm1: f32,
) -> Result<(), CudaError> {
    let mut b = EwProgram::builder(&y.dims, y.ptr, y.elem);
    let mut regs: Vec<Reg> = Vec::new();
    for v in views.iter().flatten() {
        let s = broadcast_strides(&v.dims, &y.dims).ok_or_else(|| bad(node, "inputs do not broadcast"))?;
        regs.push(b.input(v.ptr, v.elem, &s));
    }
    let arity = code.arity();
    let r = match (arity, regs.as_slice()) {
        (1, [a]) => b.op(code, *a, 0, 0, imm0, imm1),
        (2, [first, rest @ ..]) if !rest.is_empty() => {
            rest.iter().fold(*first, |acc, &r| b.op(code, acc, r, 0, imm0, imm1))
        }
        (3, [a, bb, c]) => b.op(code, *a, *bb, *c, imm0, imm1),
        _ => return Err(bad(node, format!("{} inputs for a {arity}-operand op", regs.len()))),
    };
    let _ = r;
    e.push(node, StepKind::Elementwise(Box::new(b.finish()?)));
    Ok(())
}

fn layout(node: &Node) -> Result<Layout, CudaError> {
    match attr(node, node.attrs.string("layout", "NCHW"))?.as_str() {
        "NHWC" => Ok(Layout::Nhwc),
        _ => Ok(Layout::Nchw),
    }
}

fn pair(node: &Node, name: &str, default: usize) -> Result<[usize; 2], CudaError> {
    match attr(node, node.attrs.ints(name))? {
        None => Ok([default; 2]),
        Some([a, b]) if *a >= 0 && *b >= 0 => Ok([*a as usize, *b as usize]),
        Some(v) => Err(bad(node, format!("{name} {v:?}: only 2-D is supported on the GPU"))),
    }
}

fn pads4(node: &Node) -> Result<[usize; 4], CudaError> {
    match attr(node, node.attrs.ints("pads"))? {
        None => Ok([0; 4]),
        Some(p) if p.len() == 4 && p.iter().all(|&v| v >= 0) => {
            Ok([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
        }
        Some(p) => Err(bad(node, format!("pads {p:?}: only 2-D is supported on the GPU"))),
    }
}

/// `[n, c, h, w]` of a 4-D activation in `layout`.
fn nchw(node: &Node, dims: &[usize], layout: Layout) -> Result<[usize; 4], CudaError> {
    match (dims, layout) {
        ([n, c, h, w], Layout::Nchw) | ([n, h, w, c], Layout::Nhwc) => Ok([*n, *c, *h, *w]),
        _ => Err(bad(node, format!("expected a 4-D activation, got {dims:?}"))),
    }
}

fn pool(e: &mut Emitter<'_>, node: &Node, x: &View, y: &View) -> Result<(), CudaError> {
    let layout = layout(node)?;
    let [n, c, h, w] = nchw(node, &x.dims, layout)?;
    let [_, _, oh, ow] = nchw(node, &y.dims, layout)?;
    let kind = if node.op == "MaxPool" { PoolKind::Max } else { PoolKind::Average };
    let args = Pool2dArgs {
        x: x.ptr,
        y: y.ptr,
        elem: y.elem,
        layout,
        kind,
        n,
        c,
        h,
        w,
        out: [oh, ow],
        kernel: pair(node, "kernel_shape", 1)?,
        strides: pair(node, "strides", 1)?,
        dilations: pair(node, "dilations", 1)?,
        pads: pads4(node)?,
        count_include_pad: attr(node, node.attrs.int("count_include_pad", 0))? != 0,
    };
    e.push(node, StepKind::Pool(args));
    Ok(())
}

fn reduce(e: &mut Emitter<'_>, node: &Node, x: &View, y: &View) -> Result<(), CudaError> {
    let rank = x.dims.len();
    let axes: Vec<usize> = match (attr(node, node.attrs.ints("axes"))?, e.constant(node, 1)) {
        (Some(a), _) => a.iter().map(|&a| norm_axis(node, a, rank)).collect::<Result<_, _>>()?,
        (None, Some(t)) => match t.data() {
            TensorData::I64(v) => v.iter().map(|&a| norm_axis(node, a, rank)).collect::<Result<_, _>>()?,
            _ => return Err(bad(node, "axes must be INT64")),
        },
        (None, None) => (0..rank).collect(),
    };
    let (lo, hi) = (axes.iter().min().copied().unwrap_or(0), axes.iter().max().copied().unwrap_or(0));
    if axes.len() != hi - lo + 1 {
        return Err(bad(node, format!("reduction over non-adjacent axes {axes:?}")));
    }
    let prod = |r: std::ops::Range<usize>| x.dims[r].iter().product::<usize>();
    let kind = match node.op.as_str() {
        "ReduceSum" => ReduceKind::Sum,
        "ReduceMax" => ReduceKind::Max,
        "ReduceMin" => ReduceKind::Min,
        _ => ReduceKind::Mean,
    };
    let args = ReduceArgs {
        x: x.ptr,
        x_elem: x.elem,
        y: y.ptr,
        y_elem: y.elem,
        outer: prod(0..lo),
        len: prod(lo..hi + 1),
        inner: prod(hi + 1..rank),
        kind,
    };
    e.push(node, StepKind::Reduce(args));
    Ok(())
}

fn layer_norm(e: &mut Emitter<'_>, node: &Node, views: &[Option<View>], y: &View) -> Result<(), CudaError> {
    let x = views.first().and_then(Option::as_ref).ok_or_else(|| bad(node, "input missing"))?;
    let gamma = views.get(1).and_then(Option::as_ref).ok_or_else(|| bad(node, "scale missing"))?;
    let beta = views.get(2).and_then(Option::as_ref);
    let axis = norm_axis(node, attr(node, node.attrs.int("axis", -1))?, x.dims.len())?;
    let cols: usize = x.dims[axis..].iter().product();
    if gamma.numel() != cols || beta.is_some_and(|b| b.numel() != cols) {
        return Err(bad(node, "scale and bias must cover the normalised axes exactly"));
    }
    let args = LayerNormArgs {
        x: x.ptr,
        residual: None,
        sum_out: None,
        x_elem: x.elem,
        gamma: gamma.ptr,
        gamma_elem: gamma.elem,
        beta: beta.map(|b| b.ptr),
        beta_elem: beta.map_or(gamma.elem, |b| b.elem),
        y: y.ptr,
        y_elem: y.elem,
        rows: x.numel() / cols.max(1),
        cols,
        eps: attr(node, node.attrs.float("epsilon", 1e-5))?,
    };
    e.push(node, StepKind::LayerNorm(args));
    Ok(())
}

fn attention(e: &mut Emitter<'_>, node: &Node, views: &[Option<View>], y: &View) -> Result<(), CudaError> {
    let get = |k: usize| views.get(k).and_then(Option::as_ref).ok_or_else(|| bad(node, format!("input {k} missing")));
    let (q, kt, v) = (get(0)?, get(1)?, get(2)?);
    let ([b, h, s, d], [_, _, _, sk], [_, _, _, dv]) = (
        <[usize; 4]>::try_from(q.dims.as_slice()).map_err(|_| bad(node, "Q must be 4-D"))?,
        <[usize; 4]>::try_from(kt.dims.as_slice()).map_err(|_| bad(node, "KT must be 4-D"))?,
        <[usize; 4]>::try_from(v.dims.as_slice()).map_err(|_| bad(node, "V must be 4-D"))?,
    );
    let mask = match views.get(3).and_then(Option::as_ref) {
        None => None,
        Some(m) => {
            let s4 = broadcast_strides(&m.dims, &[b, h, s, sk]).ok_or_else(|| bad(node, "mask does not broadcast"))?;
            Some(AttentionMask { ptr: m.ptr, elem: m.elem, strides: [s4[0], s4[1], s4[2], s4[3]] })
        }
    };
    let args = AttentionArgs {
        q: q.ptr,
        kt: kt.ptr,
        v: v.ptr,
        mask,
        y: y.ptr,
        elem: y.elem,
        batch: b,
        heads: h,
        s,
        sk,
        d,
        dv,
        scale: attr(node, node.attrs.float("scale", 1.0))?,
        zero_masked_rows: attr(node, node.attrs.int("zero_masked_rows", 0))? != 0,
    };
    e.push(node, StepKind::Attention(args));
    Ok(())
}

/// The operands of one GEMM-shaped node: `y = act(x·w + bias + z)`.
struct GemmOperands<'v> {
    x: &'v View,
    w: &'v View,
    bias: Option<&'v View>,
    z: Option<&'v View>,
    y: &'v View,
}

/// Emits `spec` with what cuBLASLt can fuse — bias, the residual as beta·C when
/// it has the output's shape and type, then ReLU or GELU-tanh as the epilogue —
/// and the rest (a broadcast residual, other activations) as one elementwise
/// program after it. The epilogue applies after the residual, as kiln.Dense and
/// kiln.FusedConv do (act(x·w + b + z)), so an unfused residual keeps the
/// activation unfused too.
fn fused_gemm(
    e: &mut Emitter<'_>,
    node: &Node,
    mut spec: GemmSpec,
    o: &GemmOperands<'_>,
    mut act: Vec<(EwOp, f32, f32)>,
) -> Result<(), CudaError> {
    if o.bias.is_some() {
        spec = spec.with_bias();
    }
    let residual = o.z.is_some_and(|z| z.dims == o.y.dims && z.elem == o.y.elem);
    if residual {
        spec = spec.with_residual();
    }
    if o.z.is_none() || residual {
        let epilogue = match act.as_slice() {
            [(EwOp::Relu, _, _)] => Some(Epilogue::Relu),
            [(EwOp::GeluTanh, _, _)] => Some(Epilogue::Gelu),
            _ => None,
        };
        if let Some(ep) = epilogue {
            spec = spec.with_epilogue(ep);
            act.clear();
        }
    }
    let args = GemmArgs {
        a: o.w.ptr,
        b: o.x.ptr,
        c: if residual { o.z.map(|z| z.ptr) } else { None },
        d: o.y.ptr,
        bias: o.bias.map(|b| b.ptr),
    };
    e.push(node, StepKind::Gemm { spec, args });
    post_ops(e, node, o.y, if residual { None } else { o.z }, &act)
}

fn dense(e: &mut Emitter<'_>, node: &Node, views: &[Option<View>], y: &View) -> Result<(), CudaError> {
    let get = |k: usize| views.get(k).and_then(Option::as_ref);
    let (a, w) = (get(0).ok_or_else(|| bad(node, "A missing"))?, get(1).ok_or_else(|| bad(node, "W missing"))?);
    let [k, n] = <[usize; 2]>::try_from(w.dims.as_slice()).map_err(|_| bad(node, "W must be 2-D"))?;
    let m = a.numel() / k.max(1);
    let spec = GemmSpec::row_major(m as u64, k as u64, n as u64, false, gemm_elem(node, y.elem)?);
    let operands = GemmOperands { x: a, w, bias: get(2), z: get(3), y };
    fused_gemm(e, node, spec, &operands, activation_ops(node)?)
}

fn matmul(e: &mut Emitter<'_>, node: &Node, a: &View, b: &View, y: &View) -> Result<(), CudaError> {
    let elem = gemm_elem(node, y.elem)?;
    let (ra, rb) = (a.dims.len(), b.dims.len());
    if ra < 2 || rb < 2 {
        return Err(bad(node, "MatMul of vectors is not supported on the GPU"));
    }
    let (m, k, n) = (a.dims[ra - 2], a.dims[ra - 1], b.dims[rb - 1]);
    let spec = if rb == 2 {
        GemmSpec::row_major((a.numel() / k.max(1)) as u64, k as u64, n as u64, false, elem)
    } else if a.dims[..ra - 2] == b.dims[..rb - 2] {
        let count: usize = a.dims[..ra - 2].iter().product();
        GemmSpec::row_major_batched(count as u64, m as u64, k as u64, n as u64, false, elem)
    } else {
        return Err(bad(node, "MatMul with broadcast batch axes is not supported on the GPU"));
    };
    e.push(node, StepKind::Gemm { spec, args: GemmArgs { a: b.ptr, b: a.ptr, c: None, d: y.ptr, bias: None } });
    Ok(())
}

/// `prepadded`: input 0 already holds the node's padding (see `DevOpKind::Pad`).
fn conv(e: &mut Emitter<'_>, node: &Node, views: &[Option<View>], y: &View, prepadded: bool) -> Result<(), CudaError> {
    let get = |k: usize| views.get(k).and_then(Option::as_ref);
    let (x, w) = (get(0).ok_or_else(|| bad(node, "X missing"))?, get(1).ok_or_else(|| bad(node, "W missing"))?);
    let layout = layout(node)?;
    let [n, c, h, wd] = nchw(node, &x.dims, layout)?;
    let [_, k, _, _] = nchw(node, &y.dims, layout)?;
    let [kr, ks] = match (w.dims.as_slice(), layout) {
        ([_, r, s, _], Layout::Nhwc) | ([_, _, r, s], Layout::Nchw) => [*r, *s],
        _ => return Err(bad(node, "W must be 4-D")),
    };
    let groups = attr(node, node.attrs.int("group", 1))?.max(1) as usize;
    let strides = pair(node, "strides", 1)?;
    let dil = pair(node, "dilations", 1)?;
    let [pt, pl, pb, pr] = if prepadded { [0; 4] } else { pads4(node)? };
    if pt != pb || pl != pr {
        return Err(bad(node, format!("asymmetric padding {:?} (cuDNN pads symmetrically)", [pt, pl, pb, pr])));
    }
    let bias = get(2);
    let z = get(3);
    let mut act = activation_ops(node)?;
    let pointwise = kr == 1 && ks == 1 && strides == [1, 1] && pt == 0 && pl == 0 && groups == 1;
    if pointwise && layout == Layout::Nhwc {
        // NHWC activations are a row-major [N·H·W, C] matrix; OHWI weights are [K, C].
        let spec = GemmSpec::row_major((n * h * wd) as u64, c as u64, k as u64, true, gemm_elem(node, y.elem)?);
        return fused_gemm(e, node, spec, &GemmOperands { x, w, bias, z, y }, act);
    }
    let elem = match y.elem {
        Elem::F16 => ConvElem::F16,
        Elem::F32 => ConvElem::F32,
        other => return Err(bad(node, format!("convolution on {other:?}"))),
    };
    let conv_layout = if layout == Layout::Nhwc { ConvLayout::Nhwc } else { ConvLayout::Nchw };
    let mut spec = ConvSpec::new([n, c, h, wd], k, [kr, ks], conv_layout, elem);
    spec.pad_h = pt;
    spec.pad_w = pl;
    spec.stride_h = strides[0];
    spec.stride_w = strides[1];
    spec.dil_h = dil[0];
    spec.dil_w = dil[1];
    spec.groups = groups;
    let residual = z.is_some_and(|z| z.dims == y.dims && z.elem == y.elem);
    spec.residual = residual;
    let fuse_act = z.is_none() || residual;
    match act.as_slice() {
        _ if !fuse_act => {}
        [(EwOp::Relu, _, _)] => {
            spec.act = ConvAct::Relu;
            act.clear();
        }
        [(EwOp::Clip, lo, hi)] if *lo == 0.0 && hi.is_finite() => {
            spec.act = ConvAct::ClippedRelu(f64::from(*hi));
            act.clear();
        }
        _ => {}
    }
    let zeros = e.analysis.zeros_offset.ok_or_else(|| bad(node, "no zero bias planned"))?;
    let args = ConvArgs {
        x: x.ptr,
        w: w.ptr,
        bias: bias.map_or(e.bases.weights + zeros as u64, |b| b.ptr),
        z: if residual { z.map(|z| z.ptr) } else { None },
        y: y.ptr,
    };
    e.push(node, StepKind::Conv { spec, args });
    post_ops(e, node, y, if residual { None } else { z }, &act)
}
