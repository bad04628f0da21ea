//! A CPU executor for lowered step lists: the CPU reference of every [`Step`].
//!
//! [`run`] executes the steps of [`crate::lower::emit`] over a [`SimMemory`] — the
//! weight blob and one arena, each at the fake device address its [`Bases`] say —
//! with the same math as the GPU: values stored as the step's element type (FP16
//! through `half`), everything accumulated in FP32, GEMMs with cuBLASLt's
//! column-major semantics and epilogues, convolutions with cuDNN's fused
//! `act(conv + bias + z)`, and kiln's kernels as their `.cu` files describe them.
//!
//! Its point is addressing: every access must fall entirely inside the weights
//! (read-only) or the arena, and a step's output must not overlap its inputs
//! (the kernels take their pointers `__restrict__`; only the documented in-place
//! cases are allowed), so a lowering that computes a wrong offset, size or stride
//! fails here with [`CudaError::InvalidArgument`] naming the step, on any
//! machine, instead of corrupting memory on a GPU.

mod int8;
mod linalg;
mod rows;

use std::sync::OnceLock;

use half::f16;

use crate::CudaError;
use crate::blas::GemmElem;
use crate::dnn::ConvElem;
use crate::ffi::DevPtr;
use crate::kernels::{CastArgs, CopyArgs, Elem, EwProgram, GatherArgs};
use crate::lower::{Bases, Step, StepKind};

/// Which buffer an address falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    Weights,
    Arena,
}

/// The device memory of one execution context, on the host.
#[derive(Debug, Clone)]
pub struct SimMemory {
    pub weights: Vec<u8>,
    pub arena: Vec<u8>,
    pub bases: Bases,
}

fn invalid(msg: impl Into<String>) -> CudaError {
    CudaError::InvalidArgument(msg.into())
}

/// An input and an output (address, bytes) that must not overlap: the kernels take their
/// pointers `__restrict__`, and the libraries only allow the documented in-place cases.
fn disjoint(what: &str, (a, a_len): (DevPtr, usize), (b, b_len): (DevPtr, usize)) -> Result<(), CudaError> {
    let overlap = a_len > 0 && b_len > 0 && a < b.saturating_add(b_len as u64) && b < a.saturating_add(a_len as u64);
    if overlap {
        return Err(invalid(format!("{what} at {a:#x} (+{a_len} B) overlaps the output at {b:#x} (+{b_len} B)")));
    }
    Ok(())
}

impl SimMemory {
    /// The weights as given and an arena of `arena_bytes` bytes, all `fill`.
    pub fn new(weights: Vec<u8>, arena_bytes: usize, fill: u8, bases: Bases) -> Self {
        Self { weights, arena: vec![fill; arena_bytes], bases }
    }

    /// The buffer and offset of `bytes` bytes at `ptr`, which must lie entirely inside one buffer.
    pub fn translate(&self, ptr: DevPtr, bytes: usize) -> Result<(Region, usize), CudaError> {
        for (region, base, len) in [
            (Region::Arena, self.bases.arena, self.arena.len()),
            (Region::Weights, self.bases.weights, self.weights.len()),
        ] {
            let Some(off) = ptr.checked_sub(base).and_then(|o| usize::try_from(o).ok()) else { continue };
            if off <= len {
                if bytes <= len - off {
                    return Ok((region, off));
                }
                return Err(invalid(format!(
                    "{bytes} bytes at {ptr:#x} ({region:?} + {off}) run past the end of the {region:?} ({len} bytes)"
                )));
            }
        }
        Err(invalid(format!("{bytes} bytes at {ptr:#x} are in neither the weights nor the arena")))
    }

    /// `len` bytes at `ptr`.
    pub fn bytes(&self, ptr: DevPtr, len: usize) -> Result<&[u8], CudaError> {
        let (region, off) = self.translate(ptr, len)?;
        Ok(match region {
            Region::Arena => &self.arena[off..off + len],
            Region::Weights => &self.weights[off..off + len],
        })
    }

    /// `len` writable bytes at `ptr` (arena only: the weights are read-only).
    pub fn bytes_mut(&mut self, ptr: DevPtr, len: usize) -> Result<&mut [u8], CudaError> {
        match self.translate(ptr, len)? {
            (Region::Arena, off) => Ok(&mut self.arena[off..off + len]),
            (Region::Weights, off) => Err(invalid(format!("write of {len} bytes into the weights at offset {off}"))),
        }
    }

    /// `n` elements of `elem` at `ptr`, as f32.
    pub fn read(&self, ptr: DevPtr, elem: Elem, n: usize) -> Result<Vec<f32>, CudaError> {
        let len = n.checked_mul(elem.size()).ok_or_else(|| invalid(format!("read of {n} elements overflows")))?;
        Ok(decode(self.bytes(ptr, len)?, elem))
    }

    /// Stores `vals` as `elem` at `ptr`, as a kernel's output conversion does.
    pub fn write(&mut self, ptr: DevPtr, elem: Elem, vals: &[f32]) -> Result<(), CudaError> {
        let out = self.bytes_mut(ptr, vals.len() * elem.size())?;
        encode(vals, elem, out);
        Ok(())
    }
}

/// Every FP16 bit pattern as f32: a table lookup per element keeps the
/// simulator usable in unoptimised test builds.
fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect())
}

/// Stored elements as f32 (integers converted, as the kernels load them).
pub fn decode(bytes: &[u8], elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => {
            let mut out = vec![0.0f32; bytes.len() / 4];
            for (i, o) in out.iter_mut().enumerate() {
                *o = f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
            }
            out
        }
        Elem::F16 => {
            let table = f16_table();
            let mut out = vec![0.0f32; bytes.len() / 2];
            for (i, o) in out.iter_mut().enumerate() {
                *o = table[usize::from(bytes[2 * i]) | usize::from(bytes[2 * i + 1]) << 8];
            }
            out
        }
        Elem::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(le8(c)) as f32).collect(),
        Elem::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        Elem::U8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        Elem::I8 => bytes.iter().map(|&b| f32::from(b as i8)).collect(),
    }
}

/// `vals` stored as `elem`: FP16 rounds to nearest, integers truncate and saturate (NaN → 0).
pub fn encode(vals: &[f32], elem: Elem, out: &mut [u8]) {
    match elem {
        Elem::F32 => {
            for (i, v) in vals.iter().enumerate() {
                out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Elem::F16 => {
            for (i, v) in vals.iter().enumerate() {
                let [lo, hi] = f16::from_f32(*v).to_bits().to_le_bytes();
                out[2 * i] = lo;
                out[2 * i + 1] = hi;
            }
        }
        Elem::I64 => out.chunks_exact_mut(8).zip(vals).for_each(|(o, v)| o.copy_from_slice(&(*v as i64).to_le_bytes())),
        Elem::I32 => {
            out.chunks_exact_mut(4).zip(vals).for_each(|(o, v)| o.copy_from_slice(&(*v as i64 as i32).to_le_bytes()))
        }
        Elem::U8 => out.iter_mut().zip(vals).for_each(|(o, v)| *o = *v as i64 as u8),
        Elem::I8 => out.iter_mut().zip(vals).for_each(|(o, v)| *o = *v as i64 as i8 as u8),
    }
}

fn le8(c: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[..8]);
    b
}

/// Runs `steps` in order; the first failure names its step.
pub fn run(steps: &[Step], mem: &mut SimMemory) -> Result<(), CudaError> {
    for (i, step) in steps.iter().enumerate() {
        run_step(&step.kind, mem).map_err(|e| match e {
            CudaError::InvalidArgument(m) => {
                invalid(format!("step {i} ({} of {}): {m}", kind_name(&step.kind), step.node))
            }
            other => other,
        })?;
    }
    Ok(())
}

/// A step kind's name, for errors and counts.
pub fn kind_name(kind: &StepKind) -> &'static str {
    match kind {
        StepKind::Gemm { .. } => "Gemm",
        StepKind::Conv { .. } => "Conv",
        StepKind::Elementwise(_) => "Elementwise",
        StepKind::Cast(_) => "Cast",
        StepKind::Copy(_) => "Copy",
        StepKind::Gather(_) => "Gather",
        StepKind::Softmax(_) => "Softmax",
        StepKind::LayerNorm(_) => "LayerNorm",
        StepKind::Reduce(_) => "Reduce",
        StepKind::Pool(_) => "Pool",
        StepKind::GlobalPool(_) => "GlobalPool",
        StepKind::Attention(_) => "Attention",
        StepKind::Quantize(_) => "Quantize",
        StepKind::Requant(_) => "Requant",
        StepKind::DwConvI8(_) => "DwConvI8",
        StepKind::Zero { .. } => "Zero",
        StepKind::DtoD { .. } => "DtoD",
    }
}

/// Executes one step.
pub fn run_step(kind: &StepKind, mem: &mut SimMemory) -> Result<(), CudaError> {
    match kind {
        StepKind::Gemm { spec, args } if spec.elem == GemmElem::I8 => int8::gemm(mem, spec, args),
        StepKind::Gemm { spec, args } => linalg::gemm(mem, spec, args),
        StepKind::Conv { spec, args } if spec.elem == ConvElem::I8 => int8::conv(mem, spec, args),
        StepKind::Conv { spec, args } => linalg::conv(mem, spec, args),
        StepKind::Quantize(a) => int8::quantize(mem, a),
        StepKind::Requant(a) => int8::requant(mem, a),
        StepKind::DwConvI8(a) => int8::dwconv(mem, a),
        StepKind::Elementwise(p) => elementwise(mem, p),
        StepKind::Cast(a) => cast(mem, a),
        StepKind::Copy(a) => copy(mem, a),
        StepKind::Gather(a) => gather(mem, a),
        StepKind::Softmax(a) => rows::softmax(mem, a),
        StepKind::LayerNorm(a) => rows::layer_norm(mem, a),
        StepKind::Reduce(a) => rows::reduce(mem, a),
        StepKind::Pool(a) => rows::pool(mem, a),
        StepKind::GlobalPool(a) => rows::global_pool(mem, a),
        StepKind::Attention(a) => rows::attention(mem, a),
        StepKind::Zero { ptr, bytes } => {
            mem.bytes_mut(*ptr, *bytes)?.fill(0);
            Ok(())
        }
        StepKind::DtoD { src, dst, bytes } => {
            disjoint("device copy source", (*src, *bytes), (*dst, *bytes))?;
            let data = mem.bytes(*src, *bytes)?.to_vec();
            mem.bytes_mut(*dst, *bytes)?.copy_from_slice(&data);
            Ok(())
        }
    }
}

/// The elementwise program as the kernel receives it: its bytes (`EwProgram::to_bytes`,
/// the layout `elementwise.cu` asserts) give each input's address, type and strides, so
/// the simulator reads exactly what the GPU would and `EwProgram::eval_cpu` does the math.
fn elementwise(mem: &mut SimMemory, p: &EwProgram) -> Result<(), CudaError> {
    let b = p.to_bytes();
    if b.len() != std::mem::size_of::<EwProgram>() {
        return Err(invalid(format!("elementwise program of {} bytes", b.len())));
    }
    let i64_at = |o: usize| i64::from_le_bytes(le8(&b[o..o + 8]));
    let i32_at = |o: usize| i32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let elem_of = |code: i32| {
        [Elem::F32, Elem::F16, Elem::I64, Elem::I32, Elem::U8]
            .into_iter()
            .find(|e| e.code() == code)
            .ok_or_else(|| invalid(format!("element code {code}")))
    };
    let (rank, n_inputs) = (i32_at(316) as usize, i32_at(320) as usize);
    let shape = p.merged_shape();
    let mut inputs = Vec::with_capacity(n_inputs);
    for k in 0..n_inputs {
        let at = 48 + 64 * k;
        let (ptr, elem) = (i64_at(at) as u64, elem_of(i32_at(at + 8))?);
        let mut hi = 0i64;
        for (d, &n) in shape.iter().enumerate().take(rank) {
            let s = i64_at(at + 16 + 8 * d);
            if s < 0 {
                return Err(invalid(format!("elementwise input {k} has a negative stride {s}")));
            }
            hi += (n as i64 - 1) * s;
        }
        let span = if p.is_empty() { 0 } else { hi as usize + 1 };
        inputs.push(mem.read(ptr, elem, span)?);
    }
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let out = p.eval_cpu(&refs)?;
    mem.write(i64_at(304) as u64, elem_of(i32_at(312))?, &out)
}

/// The engine's Cast: integers never pass through a float; float → integer saturates.
fn cast(mem: &mut SimMemory, a: &CastArgs) -> Result<(), CudaError> {
    if a.boolean && a.dst_elem != Elem::U8 {
        return Err(invalid(format!("a boolean cast writes U8, not {:?}", a.dst_elem)));
    }
    if a.src_elem == Elem::I8 || a.dst_elem == Elem::I8 {
        return Err(invalid("cast of INT8 elements"));
    }
    disjoint("cast source", (a.src, a.n * a.src_elem.size()), (a.dst, a.n * a.dst_elem.size()))?;
    let src = mem.bytes(a.src, a.n * a.src_elem.size())?.to_vec();
    let out = mem.bytes_mut(a.dst, a.n * a.dst_elem.size())?;
    let ints: Option<Vec<i64>> = match a.src_elem {
        Elem::I64 => Some(src.chunks_exact(8).map(|c| i64::from_le_bytes(le8(c))).collect()),
        Elem::I32 => {
            Some(src.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect())
        }
        Elem::U8 => Some(src.iter().map(|&v| i64::from(v)).collect()),
        Elem::I8 => Some(src.iter().map(|&v| i64::from(v as i8)).collect()),
        Elem::F32 | Elem::F16 => None,
    };
    match ints {
        Some(v) => {
            let as_float: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            match a.dst_elem {
                Elem::F32 | Elem::F16 => encode(&as_float, a.dst_elem, out),
                Elem::I64 => out.chunks_exact_mut(8).zip(&v).for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
                Elem::I32 => {
                    out.chunks_exact_mut(4).zip(&v).for_each(|(o, x)| o.copy_from_slice(&(*x as i32).to_le_bytes()))
                }
                Elem::U8 | Elem::I8 => {
                    out.iter_mut().zip(&v).for_each(|(o, x)| *o = if a.boolean { u8::from(*x != 0) } else { *x as u8 })
                }
            }
        }
        None => {
            let v = decode(&src, a.src_elem);
            if a.boolean {
                out.iter_mut().zip(&v).for_each(|(o, x)| *o = u8::from(*x != 0.0));
            } else {
                encode(&v, a.dst_elem, out);
            }
        }
    }
    Ok(())
}

/// Lowest and highest element offset `shape` reaches through `strides`.
fn reach(shape: &[usize], strides: &[i64]) -> (i64, i64) {
    let (mut lo, mut hi) = (0i64, 0i64);
    for (&n, &s) in shape.iter().zip(strides) {
        let r = (n as i64 - 1) * s;
        if r < 0 { lo += r } else { hi += r }
    }
    (lo, hi)
}

fn copy(mem: &mut SimMemory, a: &CopyArgs) -> Result<(), CudaError> {
    let rank = a.shape.len();
    if a.src_strides.len() != rank || a.dst_strides.len() != rank || ![1, 2, 4, 8].contains(&a.elem_size) {
        return Err(invalid(format!("copy of {:?} with strides {:?} / {:?}", a.shape, a.src_strides, a.dst_strides)));
    }
    if a.shape.contains(&0) {
        return Ok(());
    }
    let es = a.elem_size as i64;
    let ((slo, shi), (dlo, dhi)) = (reach(&a.shape, &a.src_strides), reach(&a.shape, &a.dst_strides));
    let (src0, dst0) = (a.src.wrapping_add_signed(slo * es), a.dst.wrapping_add_signed(dlo * es));
    let (src_len, dst_len) = (((shi - slo + 1) * es) as usize, ((dhi - dlo + 1) * es) as usize);
    disjoint("copy source", (src0, src_len), (dst0, dst_len))?;
    let src = mem.bytes(src0, src_len)?.to_vec();
    let dst = mem.bytes_mut(dst0, dst_len)?;
    // The innermost axis moves as one run when it is contiguous on both sides.
    let inner_run = rank > 0 && a.src_strides[rank - 1] == 1 && a.dst_strides[rank - 1] == 1;
    let (outer, run) = if inner_run { (&a.shape[..rank - 1], a.shape[rank - 1]) } else { (&a.shape[..], 1) };
    let run_bytes = run * a.elem_size;
    let mut idx = vec![0usize; outer.len()];
    loop {
        let at = |strides: &[i64], lo: i64| idx.iter().zip(strides).map(|(&i, &s)| i as i64 * s).sum::<i64>() - lo;
        let (s, d) = ((at(&a.src_strides, slo) * es) as usize, (at(&a.dst_strides, dlo) * es) as usize);
        dst[d..d + run_bytes].copy_from_slice(&src[s..s + run_bytes]);
        let mut axis = outer.len();
        loop {
            if axis == 0 {
                return Ok(());
            }
            axis -= 1;
            idx[axis] += 1;
            if idx[axis] < outer[axis] {
                break;
            }
            idx[axis] = 0;
        }
    }
}

fn gather(mem: &mut SimMemory, a: &GatherArgs) -> Result<(), CudaError> {
    let idx: Vec<i64> = match a.idx_elem {
        Elem::I64 => mem.bytes(a.idx, a.n_idx * 8)?.chunks_exact(8).map(|c| i64::from_le_bytes(le8(c))).collect(),
        Elem::I32 => mem
            .bytes(a.idx, a.n_idx * 4)?
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => return Err(invalid(format!("gather indices must be I64 or I32, got {other:?}"))),
    };
    let row = a.row_len * a.elem.size();
    let rows = a.rows as i64;
    disjoint("gather table", (a.table, a.rows * row), (a.out, a.n_idx * row))?;
    disjoint("gather indices", (a.idx, a.n_idx * a.idx_elem.size()), (a.out, a.n_idx * row))?;
    let mut out = vec![0u8; a.n_idx * row];
    let mut bad = false;
    for (i, &j) in idx.iter().enumerate() {
        let j = if j < 0 { j + rows } else { j };
        if !(0..rows).contains(&j) {
            bad = true;
            continue;
        }
        out[i * row..(i + 1) * row].copy_from_slice(mem.bytes(a.table + j as u64 * row as u64, row)?);
    }
    mem.bytes_mut(a.out, out.len())?.copy_from_slice(&out);
    if let (true, Some(err)) = (bad, a.err) {
        mem.bytes_mut(err, 4)?.copy_from_slice(&1i32.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
