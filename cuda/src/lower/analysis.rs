//! Phase one of lowering: placement, device element types, casts, the weight
//! blob and the arena layout, computed once per engine at the largest binding.

use std::collections::{HashMap, HashSet};

use half::f16;
use kiln_engine::graph::{Dim, Graph, NodeIssue, Precision, ValueId, eval_shape};
use kiln_engine::memory::{BufferSlot, place};
use kiln_engine::{DType, Tensor, TensorData};

use super::{ALIGN, Binding};
use crate::CudaError;
use crate::kernels::Elem;

/// Ops whose output is a new view of their input's bytes.
const ALIASES: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"];
/// Ops that move data without computing on it: the output keeps the input's element type.
const MOVEMENT: &[&str] = &["Transpose", "Expand", "Slice", "Concat", "Gather"];

/// Where a device tensor's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// In the engine's weight blob (shared by every context).
    Weight { offset: usize },
    /// In each context's arena.
    Arena { offset: usize },
    /// The bytes of another device tensor (a reshape); resolved by [`Analysis::storage`].
    Alias { of: usize },
}

/// One tensor on the device.
#[derive(Debug, Clone)]
pub struct DVal {
    pub name: String,
    pub elem: Elem,
    pub shape: Vec<Dim>,
    pub storage: Storage,
    /// Bytes at the largest binding.
    pub bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevOpKind {
    /// Graph node `i`, on device tensors.
    Node(usize),
    /// Element-type conversion of `ins[0]` into `outs[0]` (same shape), or a
    /// plain copy when both have the same type (graph outputs).
    Convert,
    /// `ins[0]` copied into the zeroed, larger `outs[0]` (same rank) with its
    /// element 0 at index `at`: a convolution input with its channels padded to
    /// a multiple of 8 (the width tensor cores need: a 3-channel RGB stem) and/or
    /// its asymmetric spatial padding (TF "SAME") materialised, which cuDNN
    /// cannot apply (it pads symmetrically).
    Pad { at: [usize; 4] },
    /// INT8 layer `Analysis::int8[i]`: quantise, integer product, requantise.
    Int8(usize),
}

/// One unit of device work, over device tensors (indices into [`Analysis::dvals`]).
#[derive(Debug, Clone)]
pub struct DevOp {
    pub kind: DevOpKind,
    /// Per graph-node input (`None` for an omitted optional input); for [`DevOpKind::Int8`]
    /// every tensor the op reads, in no particular order (its `Int8Layer` names them).
    pub ins: Vec<Option<usize>>,
    pub outs: Vec<usize>,
}

/// A tensor that crosses between host and device every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub value: ValueId,
    pub dval: usize,
}

/// The engine-wide lowering decisions; see the module docs.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub dvals: Vec<DVal>,
    pub ops: Vec<DevOp>,
    /// Graph node indices evaluated on the host, in order.
    pub host_nodes: Vec<usize>,
    /// The host nodes whose results depend only on input shapes and constants
    /// (the same for every run at one binding).
    pub static_host_nodes: HashSet<usize>,
    /// Host values the device reads (graph inputs, host-node results): copied
    /// into `[0, upload_bytes)` of the arena, in this order, before each run.
    pub uploads: Vec<Transfer>,
    pub upload_bytes: usize,
    /// Graph outputs computed on the device, gathered in
    /// `[download_offset, download_offset + download_bytes)` for one copy back.
    pub downloads: Vec<Transfer>,
    pub download_offset: usize,
    pub download_bytes: usize,
    pub arena_bytes: usize,
    pub weights: Vec<u8>,
    /// A zero block in the weights, for convolutions without a bias (cuDNN's
    /// fused call always reads one).
    pub zeros_offset: Option<usize>,
    /// The device tensor holding each graph value the device computes or reads.
    pub value_dval: HashMap<ValueId, usize>,
    /// Convolution nodes whose input 0 already holds their padding ([`DevOpKind::Pad`]).
    pub prepadded: HashSet<usize>,
    /// The INT8 layers, indexed by [`DevOpKind::Int8`].
    pub int8: Vec<super::int8::Int8Layer>,
}

fn natural_elem(d: DType) -> Option<Elem> {
    Some(match d {
        DType::F32 => Elem::F32,
        DType::F16 => Elem::F16,
        DType::I64 => Elem::I64,
        DType::I32 => Elem::I32,
        DType::Bool | DType::U8 => Elem::U8,
        _ => return None,
    })
}

pub(super) fn precision_elem(p: Precision) -> Elem {
    match p {
        Precision::F16 => Elem::F16,
        Precision::F32 => Elem::F32,
    }
}

fn is_float(e: Elem) -> bool {
    matches!(e, Elem::F32 | Elem::F16)
}

/// Bytes of `t` as `elem` on the device, or `None` for a conversion kiln does not make.
pub fn tensor_bytes(t: &Tensor, elem: Elem) -> Option<Vec<u8>> {
    let mut out = vec![0u8; t.data().len().checked_mul(elem.size())?];
    write_tensor_bytes(t, elem, &mut out)?;
    Some(out)
}

/// Writes `t` as `elem` into the start of `dst` (a pinned staging buffer, a weight blob) and
/// returns the bytes written; `None` for a conversion kiln does not make or a `dst` too small.
pub fn write_tensor_bytes(t: &Tensor, elem: Elem, dst: &mut [u8]) -> Option<usize> {
    fn put<T: Copy, const N: usize>(src: &[T], dst: &mut [u8], f: impl Fn(T) -> Option<[u8; N]>) -> Option<usize> {
        let len = src.len().checked_mul(N)?;
        for (d, &x) in dst.get_mut(..len)?.chunks_exact_mut(N).zip(src) {
            d.copy_from_slice(&f(x)?);
        }
        Some(len)
    }
    match (t.data(), elem) {
        (TensorData::F32(v), Elem::F32) => put(v, dst, |x| Some(x.to_le_bytes())),
        (TensorData::F32(v), Elem::F16) => put(v, dst, |x| Some(f16::from_f32(x).to_le_bytes())),
        (TensorData::F16(v), Elem::F16) => put(v, dst, |x| Some(x.to_le_bytes())),
        (TensorData::F16(v), Elem::F32) => put(v, dst, |x| Some(x.to_f32().to_le_bytes())),
        (TensorData::I64(v), Elem::I64) => put(v, dst, |x| Some(x.to_le_bytes())),
        (TensorData::I32(v), Elem::I32) => put(v, dst, |x| Some(x.to_le_bytes())),
        (TensorData::I64(v), Elem::I32) => put(v, dst, |x| i32::try_from(x).ok().map(i32::to_le_bytes)),
        (TensorData::Bool(v), Elem::U8) => put(v, dst, |b| Some([u8::from(b)])),
        (TensorData::U8(v), Elem::U8) => {
            dst.get_mut(..v.len())?.copy_from_slice(v);
            Some(v.len())
        }
        _ => None,
    }
}

/// Which element type a device node needs for input `i`, when it needs one.
fn required_elem(graph: &Graph, node: usize, i: usize, have: Elem) -> Option<Elem> {
    let n = &graph.nodes[node];
    if !is_float(have) || ALIASES.contains(&n.op.as_str()) || MOVEMENT.contains(&n.op.as_str()) {
        return None;
    }
    match (n.op.as_str(), i) {
        // The kernels read these in either float type (and compute in FP32).
        ("Cast", _) | ("kiln.Attention", 3) | ("LayerNormalization" | "Softmax", _) => None,
        _ => Some(precision_elem(n.precision)),
    }
}

pub(super) struct Builder<'g> {
    pub(super) graph: &'g Graph,
    pub(super) consumers: HashMap<ValueId, Vec<usize>>,
    max: &'g Binding,
    pub(super) a: Analysis,
    converted: HashMap<(usize, Elem), usize>,
    /// INT8 copies of device tensors by (tensor, scale bits, row width): quantised once by
    /// their first INT8 reader (or written by their INT8 producer) and shared.
    pub(super) quantized: HashMap<(usize, u32, usize), usize>,
    issues: Vec<NodeIssue>,
}

impl Analysis {
    /// Analyses `graph` with every symbol at its largest value (`max`).
    pub fn new(graph: &Graph, max: &Binding) -> Result<Analysis, CudaError> {
        let mut b = Builder {
            graph,
            consumers: graph.consumers(),
            max,
            a: Analysis {
                dvals: Vec::new(),
                ops: Vec::new(),
                host_nodes: Vec::new(),
                static_host_nodes: HashSet::new(),
                uploads: Vec::new(),
                upload_bytes: 0,
                downloads: Vec::new(),
                download_offset: 0,
                download_bytes: 0,
                arena_bytes: 0,
                weights: Vec::new(),
                zeros_offset: None,
                value_dval: HashMap::new(),
                prepadded: HashSet::new(),
                int8: Vec::new(),
            },
            converted: HashMap::new(),
            quantized: HashMap::new(),
            issues: Vec::new(),
        };
        b.place_nodes();
        b.outputs();
        b.zero_block();
        if !b.issues.is_empty() {
            return Err(CudaError::Unsupported(b.issues));
        }
        b.layout()?;
        Ok(b.a)
    }

    /// The storage behind `dval`, following aliases.
    pub fn storage(&self, dval: usize) -> Storage {
        let mut d = dval;
        // Alias chains are acyclic by construction (an alias points to an earlier tensor).
        while let Storage::Alias { of } = self.dvals[d].storage {
            d = of;
        }
        self.dvals[d].storage
    }

    /// The tensor that owns `dval`'s bytes (following aliases).
    pub fn root(&self, dval: usize) -> usize {
        let mut d = dval;
        while let Storage::Alias { of } = self.dvals[d].storage {
            d = of;
        }
        d
    }
}

impl Builder<'_> {
    pub(super) fn issue(&mut self, node: usize, reason: impl Into<String>) {
        let n = &self.graph.nodes[node];
        self.issues.push(NodeIssue { node: n.name.clone(), op: n.op.clone(), reason: reason.into() });
    }

    fn bytes_of(&self, shape: &[Dim], elem: Elem) -> Option<usize> {
        let dims = eval_shape(shape, self.max)?;
        dims.iter().try_fold(elem.size(), |acc, &d| acc.checked_mul(d))
    }

    pub(super) fn new_dval(&mut self, name: String, elem: Elem, shape: Vec<Dim>, storage: Storage) -> Option<usize> {
        let bytes = self.bytes_of(&shape, elem)?;
        self.a.dvals.push(DVal { name, elem, shape, storage, bytes });
        Some(self.a.dvals.len() - 1)
    }

    /// Appends `bytes` to the weight blob as a new device tensor.
    pub(super) fn push_weight(&mut self, name: String, elem: Elem, shape: Vec<Dim>, bytes: &[u8]) -> usize {
        let offset = self.a.weights.len().next_multiple_of(ALIGN);
        self.a.weights.resize(offset, 0);
        self.a.weights.extend_from_slice(bytes);
        self.a.dvals.push(DVal { name, elem, shape, storage: Storage::Weight { offset }, bytes: bytes.len() });
        self.a.dvals.len() - 1
    }

    fn place_nodes(&mut self) {
        let g = self.graph;
        let mut host: HashSet<ValueId> = g.inputs.iter().copied().collect();
        // Values that depend only on input shapes and constants.
        let mut shape_only: HashSet<ValueId> = HashSet::new();
        for (i, node) in g.nodes.iter().enumerate() {
            let inputs_on_host =
                node.inputs.iter().flatten().all(|v| host.contains(v) || g.values[*v].constant.is_some());
            let float_out = node
                .outputs
                .iter()
                .any(|&o| g.value_type(o).is_none_or(|t| matches!(t.dtype, DType::F32 | DType::F16 | DType::F64)));
            if node.op == "Shape" || (inputs_on_host && !float_out) {
                let static_node = node.op == "Shape"
                    || node.inputs.iter().flatten().all(|v| shape_only.contains(v) || g.values[*v].constant.is_some());
                if static_node {
                    self.a.static_host_nodes.insert(i);
                    shape_only.extend(node.outputs.iter().copied());
                }
                self.a.host_nodes.push(i);
                host.extend(node.outputs.iter().copied());
                continue;
            }
            self.device_node(i, &host);
        }
    }

    /// The device tensor for graph value `v` as read by a device node.
    pub(super) fn input_dval(&mut self, node: usize, v: ValueId, host: &HashSet<ValueId>) -> Option<usize> {
        if let Some(&d) = self.a.value_dval.get(&v) {
            return Some(d);
        }
        let g = self.graph;
        let value = &g.values[v];
        let Some(ty) = value.ty.as_ref() else {
            self.issue(node, format!("input {} has no known type", value.name));
            return None;
        };
        let Some(natural) = natural_elem(ty.dtype) else {
            self.issue(node, format!("input {} is {}, which the CUDA engine does not handle", value.name, ty.dtype));
            return None;
        };
        let shape = ty.shape.clone().unwrap_or_default();
        let d = if let Some(t) = value.constant.as_ref() {
            let elem = if natural == Elem::F32 && value.storage == Precision::F16 { Elem::F16 } else { natural };
            let shape: Vec<Dim> = t.shape().iter().map(|&n| Dim::fixed(n as i64)).collect();
            let Some(bytes) = tensor_bytes(t, elem) else {
                self.issue(node, format!("constant {} ({}) cannot be stored on the device", value.name, t.dtype()));
                return None;
            };
            self.push_weight(value.name.clone(), elem, shape, &bytes)
        } else if host.contains(&v) {
            let Some(d) = self.new_dval(value.name.clone(), natural, shape, Storage::Arena { offset: 0 }) else {
                self.issue(node, format!("input {} has a shape the profiles do not bound", value.name));
                return None;
            };
            self.a.uploads.push(Transfer { value: v, dval: d });
            d
        } else {
            self.issue(node, format!("input {} is computed by no earlier node", value.name));
            return None;
        };
        self.a.value_dval.insert(v, d);
        Some(d)
    }

    fn feeds_only_fp16(&self, op: &str, v: ValueId) -> bool {
        let readers = self.consumers.get(&v).map_or(&[][..], Vec::as_slice);
        matches!(op, "LayerNormalization" | "Softmax")
            && !self.graph.is_output(v)
            && !readers.is_empty()
            && readers.iter().all(|&c| {
                let n = &self.graph.nodes[c];
                n.precision == Precision::F16 && !ALIASES.contains(&n.op.as_str()) && !MOVEMENT.contains(&n.op.as_str())
            })
    }

    /// `d` as `elem`: itself, or a converted copy (made once per pair).
    pub(super) fn convert(&mut self, node: usize, d: usize, elem: Elem) -> Option<usize> {
        if self.a.dvals[d].elem == elem {
            return Some(d);
        }
        if let Some(&c) = self.converted.get(&(d, elem)) {
            return Some(c);
        }
        let src = self.a.dvals[d].clone();
        let c = if let Storage::Weight { offset } = src.storage {
            // Constants are converted once, on the host.
            let raw = &self.a.weights[offset..offset + src.bytes];
            let bytes: Vec<u8> = match (src.elem, elem) {
                (Elem::F32, Elem::F16) => raw
                    .chunks_exact(4)
                    .flat_map(|c| f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                    .collect(),
                (Elem::F16, Elem::F32) => {
                    raw.chunks_exact(2).flat_map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes()).collect()
                }
                _ => {
                    self.issue(node, format!("constant {} cannot be converted to {elem:?}", src.name));
                    return None;
                }
            };
            self.push_weight(format!("{}:{elem:?}", src.name), elem, src.shape, &bytes)
        } else {
            let c = self.new_dval(format!("{}:{elem:?}", src.name), elem, src.shape, Storage::Arena { offset: 0 })?;
            self.a.ops.push(DevOp { kind: DevOpKind::Convert, ins: vec![Some(d)], outs: vec![c] });
            c
        };
        self.converted.insert((d, elem), c);
        Some(c)
    }

    fn device_node(&mut self, i: usize, host: &HashSet<ValueId>) {
        let g = self.graph;
        let node = &g.nodes[i];
        if !super::ops::supported(&node.op) {
            self.issue(i, "no GPU implementation");
            return;
        }
        if node.attrs.get(kiln_engine::quant::INPUT_SCALE).is_some() {
            self.int8_node(i, host);
            return;
        }
        let mut ins = Vec::with_capacity(node.inputs.len());
        for (k, v) in node.inputs.iter().enumerate() {
            let Some(v) = *v else {
                ins.push(None);
                continue;
            };
            let Some(d) = self.input_dval(i, v, host) else { return };
            let have = self.a.dvals[d].elem;
            let d = match required_elem(g, i, k, have) {
                Some(want) => match self.convert(i, d, want) {
                    Some(c) => c,
                    None => return,
                },
                None => d,
            };
            ins.push(Some(d));
        }
        if node.op == "kiln.FusedConv" && !self.pad_input(i, &mut ins) {
            return;
        }
        let first_in = ins.first().copied().flatten();
        let mut outs = Vec::with_capacity(node.outputs.len());
        for &o in &node.outputs {
            let value = &g.values[o];
            let Some(ty) = value.ty.as_ref() else {
                self.issue(i, format!("output {} has no known type", value.name));
                return;
            };
            let Some(natural) = natural_elem(ty.dtype) else {
                self.issue(i, format!("output {} is {}", value.name, ty.dtype));
                return;
            };
            let op = node.op.as_str();
            let moving = ALIASES.contains(&op) || MOVEMENT.contains(&op);
            let elem = match first_in {
                // Gather's output follows its data input (0), like every movement op.
                Some(src) if moving => self.a.dvals[src].elem,
                // FP32 normalisations whose readers all compute in FP16 store FP16 directly
                // (what those readers would round to anyway), saving a cast pass.
                _ if natural == Elem::F32 && self.feeds_only_fp16(op, o) => Elem::F16,
                _ if natural == Elem::F32 => precision_elem(node.precision),
                _ => natural,
            };
            let shape = ty.shape.clone().unwrap_or_default();
            let storage = match first_in {
                Some(src) if ALIASES.contains(&op) => Storage::Alias { of: src },
                _ => Storage::Arena { offset: 0 },
            };
            let Some(d) = self.new_dval(value.name.clone(), elem, shape, storage) else {
                self.issue(i, format!("output {} has a shape the profiles do not bound", value.name));
                return;
            };
            self.a.value_dval.insert(o, d);
            outs.push(d);
        }
        self.a.ops.push(DevOp { kind: DevOpKind::Node(i), ins, outs });
    }

    /// Materialises the padding cuDNN cannot apply itself into a zeroed copy of
    /// a convolution's input: a dense NHWC FP16 convolution's channels (and its
    /// OHWI weights, with zeros) to a multiple of 8, and asymmetric spatial pads
    /// (the convolution then runs unpadded). `false` after an issue.
    fn pad_input(&mut self, i: usize, ins: &mut [Option<usize>]) -> bool {
        let node = &self.graph.nodes[i];
        let nhwc = node.attrs.string("layout", "NCHW").is_ok_and(|l| l == "NHWC");
        let group = node.attrs.int("group", 1).unwrap_or(1);
        let spatial = match node.attrs.ints("pads") {
            Ok(Some(&[t, l, b, r])) if t != b || l != r => Some([t, l, b, r]),
            _ => None,
        };
        let (Some(Some(x)), Some(Some(w))) = (ins.first().copied(), ins.get(1).copied()) else { return true };
        let (xv, wv) = (self.a.dvals[x].clone(), self.a.dvals[w].clone());
        let c = wv.shape.last().and_then(|d| d.as_fixed()).unwrap_or(0) as usize;
        let weight_offset = match wv.storage {
            Storage::Weight { offset } => Some(offset),
            _ => None,
        };
        let channels = nhwc && group == 1 && xv.elem == Elem::F16 && c != 0 && !c.is_multiple_of(8);
        let channels = channels && weight_offset.is_some();
        if !channels && spatial.is_none() {
            return true;
        }
        let mut xshape = xv.shape.clone();
        let mut at = [0usize; 4];
        if let Some([t, l, b, r]) = spatial {
            let (ha, wa) = if nhwc { (1, 2) } else { (2, 3) };
            for (axis, before, after) in [(ha, t, b), (wa, l, r)] {
                let Some(size) = xshape.get(axis).and_then(Dim::as_fixed) else {
                    self.issue(i, "asymmetric padding of an input without fixed spatial dims");
                    return false;
                };
                xshape[axis] = Dim::fixed(size + before + after);
                at[axis] = before as usize;
            }
            self.a.prepadded.insert(i);
        }
        let mut xname = format!("{}:pad", xv.name);
        if let (true, Some(offset)) = (channels, weight_offset) {
            let cp = c.next_multiple_of(8);
            let es = wv.elem.size();
            let raw = self.a.weights[offset..offset + wv.bytes].to_vec();
            let mut padded = Vec::with_capacity(raw.len() / c * cp);
            for row in raw.chunks_exact(c * es) {
                padded.extend_from_slice(row);
                padded.resize(padded.len() + (cp - c) * es, 0);
            }
            let mut wshape = wv.shape.clone();
            if let (Some(a), Some(b)) = (wshape.last_mut(), xshape.last_mut()) {
                *a = Dim::fixed(cp as i64);
                *b = Dim::fixed(cp as i64);
            }
            ins[1] = Some(self.push_weight(format!("{}:pad{cp}", wv.name), wv.elem, wshape, &padded));
            xname = format!("{}:pad{cp}", xv.name);
        }
        let Some(xp) = self.new_dval(xname, xv.elem, xshape, Storage::Arena { offset: 0 }) else {
            self.issue(i, "padded input has a shape the profiles do not bound");
            return false;
        };
        self.a.ops.push(DevOp { kind: DevOpKind::Pad { at }, ins: vec![Some(x)], outs: vec![xp] });
        ins[0] = Some(xp);
        true
    }

    /// Zeros for the widest convolution without a bias (4 bytes per channel covers FP32).
    fn zero_block(&mut self) {
        let widest = self
            .a
            .ops
            .iter()
            .filter_map(|op| match op.kind {
                DevOpKind::Node(i) if self.graph.nodes[i].op == "kiln.FusedConv" => op.outs.first(),
                _ => None,
            })
            .filter_map(|&d| self.a.dvals[d].shape.iter().map(|s| s.as_fixed().unwrap_or(0) as usize).max())
            .chain(self.a.int8.iter().map(|l| l.out_padded))
            .max();
        if let Some(n) = widest {
            let offset = self.a.weights.len().next_multiple_of(ALIGN);
            self.a.weights.resize(offset + n * 4, 0);
            self.a.zeros_offset = Some(offset);
        }
    }

    /// Every device-computed graph output is copied (and converted to its
    /// declared type) into the download area.
    fn outputs(&mut self) {
        let g = self.graph;
        for &o in &g.outputs {
            let Some(&d) = self.a.value_dval.get(&o) else { continue };
            if matches!(self.a.dvals[d].storage, Storage::Weight { .. }) || self.a.uploads.iter().any(|u| u.value == o)
            {
                continue;
            }
            let value = &g.values[o];
            let Some(elem) = value.ty.as_ref().and_then(|t| natural_elem(t.dtype)) else { continue };
            let src = self.a.dvals[d].clone();
            let Some(out) = self.new_dval(format!("{}:out", value.name), elem, src.shape, Storage::Arena { offset: 0 })
            else {
                continue;
            };
            self.a.ops.push(DevOp { kind: DevOpKind::Convert, ins: vec![Some(d)], outs: vec![out] });
            self.a.downloads.push(Transfer { value: o, dval: out });
        }
    }

    /// Upload area, download area, then every other arena tensor packed by lifetime.
    fn layout(&mut self) -> Result<(), CudaError> {
        let mut offset = 0usize;
        for u in &self.a.uploads {
            self.a.dvals[u.dval].storage = Storage::Arena { offset };
            offset = (offset + self.a.dvals[u.dval].bytes).next_multiple_of(ALIGN);
        }
        self.a.upload_bytes = offset;
        self.a.download_offset = offset;
        for dl in &self.a.downloads {
            self.a.dvals[dl.dval].storage = Storage::Arena { offset };
            offset = (offset + self.a.dvals[dl.dval].bytes).next_multiple_of(ALIGN);
        }
        self.a.download_bytes = offset - self.a.download_offset;
        let fixed: HashSet<usize> = self.a.uploads.iter().chain(&self.a.downloads).map(|t| t.dval).collect();

        // Lifetimes in op indices, aliases folded into their root.
        let mut life: HashMap<usize, (usize, usize)> = HashMap::new();
        for (k, op) in self.a.ops.iter().enumerate() {
            for d in op.outs.iter().chain(op.ins.iter().flatten()) {
                let r = self.a.root(*d);
                if fixed.contains(&r) || !matches!(self.a.dvals[r].storage, Storage::Arena { .. }) {
                    continue;
                }
                let e = life.entry(r).or_insert((k, k));
                e.0 = e.0.min(k);
                e.1 = e.1.max(k);
            }
        }
        let mut ids: Vec<usize> = life.keys().copied().collect();
        ids.sort_unstable();
        let mut slots: Vec<BufferSlot> = ids
            .iter()
            .map(|&d| BufferSlot {
                value: d,
                offset: 0,
                size: self.a.dvals[d].bytes,
                first: life[&d].0,
                last: life[&d].1,
            })
            .collect();
        let packed = place(&mut slots, ALIGN)?;
        for s in &slots {
            self.a.dvals[s.value].storage = Storage::Arena { offset: offset + s.offset };
        }
        self.a.arena_bytes = (offset + packed).next_multiple_of(ALIGN);
        Ok(())
    }
}

/// A host tensor of `dims` from device bytes of `elem` (FP16 widened to FP32,
/// bytes to BOOL) — how downloaded outputs become the graph's declared types.
pub fn tensor_from_bytes(raw: &[u8], elem: Elem, dims: Vec<usize>) -> Result<Tensor, CudaError> {
    let data = match elem {
        Elem::F32 => {
            TensorData::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        Elem::F16 => TensorData::F32(raw.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Elem::I64 => TensorData::I64(
            raw.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        ),
        Elem::I32 => {
            TensorData::I32(raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        Elem::U8 => TensorData::Bool(raw.iter().map(|&b| b != 0).collect()),
        Elem::I8 => TensorData::I32(raw.iter().map(|&b| i32::from(b as i8)).collect()),
    };
    Tensor::new(dims, data).map_err(|e| CudaError::InvalidArgument(format!("output tensor: {e}")))
}
