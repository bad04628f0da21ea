//! Phase two of lowering: device ops → concrete steps for one binding and one
//! context's buffers. Every shape here is a number and every address a device
//! pointer, so a step list can be replayed (or captured as a CUDA graph) as is.

use kiln_engine::graph::{Node, eval_shape};

use super::analysis::{Analysis, DevOp, DevOpKind, Storage};
use super::{Binding, ops};
use crate::CudaError;
use crate::blas::{GemmArgs, GemmSpec};
use crate::dnn::{ConvArgs, ConvSpec};
use crate::ffi::DevPtr;
use crate::kernels::{
    AttentionArgs, CastArgs, CopyArgs, DwConvI8Args, Elem, EwProgram, GatherArgs, GlobalPoolArgs, LayerNormArgs,
    Pool2dArgs, QuantizeArgs, ReduceArgs, RequantArgs, SoftmaxArgs, row_major_strides,
};

/// Device addresses of one context's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bases {
    pub weights: DevPtr,
    pub arena: DevPtr,
}

/// One unit of device work with everything resolved.
#[derive(Debug, Clone)]
pub enum StepKind {
    Gemm {
        spec: GemmSpec,
        args: GemmArgs,
    },
    Conv {
        spec: ConvSpec,
        args: ConvArgs,
    },
    /// A fused elementwise program; the context uploads it and launches over its elements.
    Elementwise(Box<EwProgram>),
    Cast(CastArgs),
    Copy(CopyArgs),
    Gather(GatherArgs),
    Softmax(SoftmaxArgs),
    LayerNorm(LayerNormArgs),
    Reduce(ReduceArgs),
    Pool(Pool2dArgs),
    GlobalPool(GlobalPoolArgs),
    Attention(AttentionArgs),
    /// An INT8 layer's input into INT8.
    Quantize(QuantizeArgs),
    /// An INT8 layer's epilogue: accumulators to its output.
    Requant(RequantArgs),
    /// A depthwise INT8 convolution to INT32 accumulators.
    DwConvI8(DwConvI8Args),
    /// Zero `bytes` bytes (the padding lanes of a channel-padded input).
    Zero {
        ptr: DevPtr,
        bytes: usize,
    },
    /// Device-to-device copy of `bytes` bytes.
    DtoD {
        src: DevPtr,
        dst: DevPtr,
        bytes: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Step {
    /// The graph node this step implements (for errors and profiles).
    pub node: String,
    pub kind: StepKind,
}

/// What emission knows about one device tensor at this binding.
#[derive(Debug, Clone)]
pub(super) struct View {
    pub ptr: DevPtr,
    pub elem: Elem,
    pub dims: Vec<usize>,
}

impl View {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.elem.size()
    }
}

/// Context handed to each op's emitter.
pub(super) struct Emitter<'a> {
    pub graph: &'a kiln_engine::graph::Graph,
    pub analysis: &'a Analysis,
    pub binding: &'a Binding,
    pub bases: Bases,
    pub steps: Vec<Step>,
}

impl Emitter<'_> {
    pub fn view(&self, dval: usize) -> Result<View, CudaError> {
        let d = &self.analysis.dvals[dval];
        let dims = eval_shape(&d.shape, self.binding).ok_or_else(|| {
            CudaError::InvalidArgument(format!("the shape of {} is not bound by the run's sizes", d.name))
        })?;
        let ptr = match self.analysis.storage(dval) {
            Storage::Weight { offset } => self.bases.weights + offset as u64,
            Storage::Arena { offset } => self.bases.arena + offset as u64,
            Storage::Alias { .. } => unreachable_alias(&d.name)?,
        };
        let view = View { ptr, elem: d.elem, dims };
        if view.bytes() > d.bytes {
            return Err(CudaError::InvalidArgument(format!(
                "{} needs {} bytes at this size, more than the {} planned for the largest profile",
                d.name,
                view.bytes(),
                d.bytes
            )));
        }
        Ok(view)
    }

    pub fn push(&mut self, node: &Node, kind: StepKind) {
        self.steps.push(Step { node: node.name.clone(), kind });
    }

    /// The host value of a constant input, if it is one.
    pub fn constant(&self, node: &Node, i: usize) -> Option<&kiln_engine::Tensor> {
        node.input(i).and_then(|v| self.graph.constant(v))
    }
}

fn unreachable_alias(name: &str) -> Result<DevPtr, CudaError> {
    Err(CudaError::InvalidArgument(format!("alias chain of {name} does not end in a buffer")))
}

/// `src` copied into the zeroed, larger `dst` (same rank) with its element 0 at index `at`.
pub(super) fn pad_copy(
    e: &mut Emitter<'_>,
    name: &str,
    src: &View,
    dst: &View,
    at: [usize; 4],
) -> Result<(), CudaError> {
    if at.len() != dst.dims.len() || src.dims.len() != dst.dims.len() {
        return Err(CudaError::InvalidArgument(format!("{name}: padding of a tensor of rank {}", src.dims.len())));
    }
    e.steps.push(Step { node: name.to_owned(), kind: StepKind::Zero { ptr: dst.ptr, bytes: dst.bytes() } });
    // The source lands at `at` inside the destination; everything else stays zero.
    let dst_strides = row_major_strides(&dst.dims);
    let first: i64 = at.iter().zip(&dst_strides).map(|(&a, &s)| a as i64 * s).sum();
    let copy = CopyArgs {
        dst: dst.ptr + first as u64 * dst.elem.size() as u64,
        src: src.ptr,
        elem_size: src.elem.size(),
        shape: src.dims.clone(),
        src_strides: row_major_strides(&src.dims),
        dst_strides,
    };
    e.steps.push(Step { node: name.to_owned(), kind: StepKind::Copy(copy) });
    Ok(())
}

/// The steps of one run at `binding`, addressing `bases`.
pub fn emit(
    graph: &kiln_engine::graph::Graph,
    analysis: &Analysis,
    binding: &Binding,
    bases: Bases,
) -> Result<Vec<Step>, CudaError> {
    let mut e = Emitter { graph, analysis, binding, bases, steps: Vec::with_capacity(analysis.ops.len()) };
    for op in &analysis.ops {
        emit_op(&mut e, op)?;
    }
    Ok(e.steps)
}

fn emit_op(e: &mut Emitter<'_>, op: &DevOp) -> Result<(), CudaError> {
    let out = |k: usize| op.outs.get(k).copied().ok_or_else(|| CudaError::InvalidArgument("missing output".into()));
    let input = |k: usize| {
        op.ins.get(k).copied().flatten().ok_or_else(|| CudaError::InvalidArgument(format!("missing input {k}")))
    };
    match op.kind {
        DevOpKind::Convert => {
            let (src, dst) = (e.view(input(0)?)?, e.view(out(0)?)?);
            let name = e.analysis.dvals[out(0)?].name.clone();
            let kind = if src.elem == dst.elem {
                StepKind::DtoD { src: src.ptr, dst: dst.ptr, bytes: dst.bytes() }
            } else {
                StepKind::Cast(CastArgs {
                    src: src.ptr,
                    src_elem: src.elem,
                    dst: dst.ptr,
                    dst_elem: dst.elem,
                    n: dst.numel(),
                    boolean: false,
                })
            };
            e.steps.push(Step { node: name, kind });
            Ok(())
        }
        DevOpKind::Pad { at } => {
            let (src, dst) = (e.view(input(0)?)?, e.view(out(0)?)?);
            let name = e.analysis.dvals[out(0)?].name.clone();
            pad_copy(e, &name, &src, &dst, at)
        }
        DevOpKind::Int8(i) => {
            let analysis = e.analysis;
            let layer = analysis.int8.get(i).ok_or_else(|| CudaError::InvalidArgument(format!("INT8 layer {i}")))?;
            super::int8::emit_int8(e, layer)
        }
        DevOpKind::Node(i) => {
            let node = &e.graph.nodes[i];
            ops::emit_node(e, node, op)
        }
    }
}
