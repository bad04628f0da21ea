//! The fused elementwise program (`elementwise.cu`): up to [`EW_MAX_INPUTS`] broadcast inputs
//! and [`EW_MAX_OPS`] FP32 ops per output element, one launch per fused region.
//!
//! [`EwProgram`] is `#[repr(C)]` and byte for byte the kernel's `EwProgram` (size and offsets
//! asserted at compile time on both sides). The engine builds one with [`EwBuilder`], uploads
//! [`EwProgram::to_bytes`] once per batch size and launches [`Kernels::elementwise`] with its
//! device address. [`EwProgram::eval_cpu`] runs the same program on the CPU with the same
//! formulas ([`EwOp::apply`]).
//!
//! Registers: `r0..r3` hold the inputs converted to float, op `i` writes `r(4 + i)`; the output
//! is the last op's register, or `r0` without ops (a plain broadcast or cast copy).

use std::mem::{offset_of, size_of};

use cudarc::driver::CudaStream;

use super::{Elem, Kernels, Launch, invalid, long, numel, ptr, run, stride_blocks};
use crate::CudaError;
use crate::ffi::DevPtr;
use crate::ffi::launch::{Dims, KArg};

pub use super::ew_math::EwOp;

pub const EW_MAX_INPUTS: usize = 4;
pub const EW_MAX_OPS: usize = 16;
pub const EW_MAX_RANK: usize = 6;
/// Threads per block: the kernel's shared register file has one column per thread.
const EW_BLOCK: u32 = 256;

/// A register of an elementwise program.
pub type Reg = u32;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
struct InputSlot {
    ptr: u64,
    elem: i32,
    pad: i32,
    strides: [i64; EW_MAX_RANK],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
struct OpSlot {
    opcode: i32,
    a: i32,
    b: i32,
    c: i32,
    imm0: f32,
    imm1: f32,
}

/// A validated elementwise program (build it with [`EwBuilder`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EwProgram {
    /// Output shape after merging axes, outermost first; the first `rank` entries are used.
    shape: [i64; EW_MAX_RANK],
    inputs: [InputSlot; EW_MAX_INPUTS],
    out: u64,
    out_elem: i32,
    rank: i32,
    n_inputs: i32,
    n_ops: i32,
    ops: [OpSlot; EW_MAX_OPS],
}

// The layout `elementwise.cu` static_asserts too.
const _: () = assert!(size_of::<InputSlot>() == 64 && size_of::<OpSlot>() == 24);
const _: () = assert!(size_of::<EwProgram>() == 712);
const _: () = assert!(offset_of!(EwProgram, inputs) == 48 && offset_of!(EwProgram, out) == 304);
const _: () = assert!(offset_of!(EwProgram, out_elem) == 312 && offset_of!(EwProgram, n_ops) == 324);
const _: () = assert!(offset_of!(EwProgram, ops) == 328);

/// Builds an [`EwProgram`]; every check happens in [`EwBuilder::finish`].
#[derive(Debug, Clone)]
pub struct EwBuilder {
    shape: Vec<usize>,
    out: DevPtr,
    out_elem: Elem,
    inputs: Vec<(DevPtr, Elem, Vec<i64>)>,
    ops: Vec<(EwOp, [Reg; 3], f32, f32)>,
}

impl EwProgram {
    /// Starts a program writing `out_shape` (contiguous) elements of `out_elem` at `out`.
    pub fn builder(out_shape: &[usize], out: DevPtr, out_elem: Elem) -> EwBuilder {
        EwBuilder { shape: out_shape.to_vec(), out, out_elem, inputs: Vec::new(), ops: Vec::new() }
    }

    /// Output elements (what [`Kernels::elementwise`] is launched over).
    pub fn len(&self) -> usize {
        self.shape[..self.rank as usize].iter().map(|&d| d as usize).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The output shape after merging axes.
    pub fn merged_shape(&self) -> Vec<usize> {
        self.shape[..self.rank as usize].iter().map(|&d| d as usize).collect()
    }

    /// The program's bytes in the kernel's layout (little-endian), for upload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(size_of::<EwProgram>());
        self.shape.iter().for_each(|v| b.extend(v.to_le_bytes()));
        for i in &self.inputs {
            b.extend(i.ptr.to_le_bytes());
            b.extend(i.elem.to_le_bytes());
            b.extend(i.pad.to_le_bytes());
            i.strides.iter().for_each(|v| b.extend(v.to_le_bytes()));
        }
        b.extend(self.out.to_le_bytes());
        for v in [self.out_elem, self.rank, self.n_inputs, self.n_ops] {
            b.extend(v.to_le_bytes());
        }
        for o in &self.ops {
            for v in [o.opcode, o.a, o.b, o.c] {
                b.extend(v.to_le_bytes());
            }
            b.extend(o.imm0.to_le_bytes());
            b.extend(o.imm1.to_le_bytes());
        }
        b
    }

    /// Runs the program on the CPU: `inputs[k]` holds input k's stored values as f32, indexed
    /// by the same strides. Output conversion is applied (FP16 rounding, integer truncation),
    /// so the result is what the kernel stores, read back as f32.
    pub fn eval_cpu(&self, inputs: &[&[f32]]) -> Result<Vec<f32>, CudaError> {
        let (rank, n_in) = (self.rank as usize, self.n_inputs as usize);
        if inputs.len() != n_in {
            return Err(invalid(format!("program has {n_in} inputs, got {}", inputs.len())));
        }
        let shape = self.merged_shape();
        if self.is_empty() {
            return Ok(Vec::new());
        }
        for (k, data) in inputs.iter().enumerate() {
            let (mut lo, mut hi) = (0i64, 0i64);
            for (&n, &s) in shape.iter().zip(&self.inputs[k].strides) {
                let reach = (n as i64 - 1) * s;
                if reach < 0 { lo += reach } else { hi += reach }
            }
            if lo < 0 || hi >= data.len() as i64 {
                return Err(invalid(format!("input {k} of {} values is indexed up to {hi}", data.len())));
            }
        }
        let out_elem = decode_elem(self.out_elem)?;
        let mut regs = [0.0f32; EW_MAX_INPUTS + EW_MAX_OPS];
        let mut idx = vec![0usize; rank];
        let mut out = Vec::with_capacity(self.len());
        for _ in 0..self.len() {
            for (k, data) in inputs.iter().enumerate() {
                let off: i64 = idx.iter().zip(&self.inputs[k].strides).map(|(&i, &s)| i as i64 * s).sum();
                regs[k] = data[off as usize];
            }
            for (i, o) in self.ops[..self.n_ops as usize].iter().enumerate() {
                let op = EwOp::ALL[o.opcode as usize];
                let r = |x: i32| regs[x as usize];
                regs[EW_MAX_INPUTS + i] = op.apply(r(o.a), r(o.b), r(o.c), o.imm0, o.imm1);
            }
            let last = if self.n_ops > 0 { EW_MAX_INPUTS + self.n_ops as usize - 1 } else { 0 };
            out.push(store_as(out_elem, regs[last]));
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}

fn decode_elem(code: i32) -> Result<Elem, CudaError> {
    [Elem::F32, Elem::F16, Elem::I64, Elem::I32, Elem::U8]
        .into_iter()
        .find(|e| e.code() == code)
        .ok_or_else(|| invalid(format!("element code {code}")))
}

/// `v` as the kernel stores it into `elem`, read back as f32.
fn store_as(elem: Elem, v: f32) -> f32 {
    match elem {
        Elem::F32 => v,
        Elem::F16 => half::f16::from_f32(v).to_f32(),
        Elem::I64 => v as i64 as f32,
        Elem::I32 => v as i64 as i32 as f32,
        Elem::U8 => f32::from(v as i64 as u8),
        Elem::I8 => f32::from(v as i64 as i8),
    }
}

impl EwBuilder {
    /// Adds an input read with `strides` (elements, one per output axis, 0 = broadcast);
    /// returns its register.
    pub fn input(&mut self, ptr: DevPtr, elem: Elem, strides: &[i64]) -> Reg {
        self.inputs.push((ptr, elem, strides.to_vec()));
        (self.inputs.len() - 1) as Reg
    }

    /// Adds `op` over registers `a`, `b`, `c` (unused ones are ignored) with immediates
    /// `imm0`, `imm1`; returns the register of its result.
    pub fn op(&mut self, op: EwOp, a: Reg, b: Reg, c: Reg, imm0: f32, imm1: f32) -> Reg {
        self.ops.push((op, [a, b, c], imm0, imm1));
        (EW_MAX_INPUTS + self.ops.len() - 1) as Reg
    }

    pub fn unary(&mut self, op: EwOp, a: Reg) -> Reg {
        self.op(op, a, 0, 0, 0.0, 0.0)
    }

    pub fn binary(&mut self, op: EwOp, a: Reg, b: Reg) -> Reg {
        self.op(op, a, b, 0, 0.0, 0.0)
    }

    /// Validates counts, register references, strides and rank (after merging axes that are
    /// contiguous for every input) and lays the program out.
    pub fn finish(&self) -> Result<EwProgram, CudaError> {
        let rank = self.shape.len();
        numel(&self.shape, "elementwise output")?;
        ptr(self.out, "elementwise output")?;
        if self.inputs.len() > EW_MAX_INPUTS {
            return Err(invalid(format!("{} elementwise inputs (at most {EW_MAX_INPUTS})", self.inputs.len())));
        }
        if self.ops.len() > EW_MAX_OPS {
            return Err(invalid(format!("{} elementwise ops (at most {EW_MAX_OPS})", self.ops.len())));
        }
        if self.inputs.is_empty() && self.ops.is_empty() {
            return Err(invalid("an elementwise program needs an input or an op"));
        }
        for (k, (p, _, strides)) in self.inputs.iter().enumerate() {
            ptr(*p, "elementwise input")?;
            if strides.len() != rank {
                return Err(invalid(format!("input {k} has {} strides for rank {rank}", strides.len())));
            }
            let span = self
                .shape
                .iter()
                .zip(strides)
                .try_fold(0i128, |acc, (&n, &s)| acc.checked_add((n as i128 - 1).max(0) * i128::from(s).abs()));
            if span.is_none_or(|s| s > i128::from(i64::MAX)) {
                return Err(invalid(format!("input {k} offsets exceed 64 bits")));
            }
        }
        let mut ops = [OpSlot { opcode: 0, a: 0, b: 0, c: 0, imm0: 0.0, imm1: 0.0 }; EW_MAX_OPS];
        for (i, &(op, regs, imm0, imm1)) in self.ops.iter().enumerate() {
            let defined = |r: Reg| {
                let r = r as usize;
                r < self.inputs.len() || (EW_MAX_INPUTS..EW_MAX_INPUTS + i).contains(&r)
            };
            let mut used = [0i32; 3];
            for (slot, &r) in used.iter_mut().zip(&regs).take(op.arity()) {
                if !defined(r) {
                    return Err(invalid(format!("op {i} ({op:?}) reads register r{r}, which holds nothing yet")));
                }
                *slot = r as i32;
            }
            if op == EwOp::Clip && (imm0.is_nan() || imm1.is_nan() || imm0 > imm1) {
                return Err(invalid(format!("clip range [{imm0}, {imm1}] is empty")));
            }
            ops[i] = OpSlot { opcode: op.code(), a: used[0], b: used[1], c: used[2], imm0, imm1 };
        }
        let axes = self.merged_axes();
        if axes.len() > EW_MAX_RANK {
            return Err(invalid(format!("elementwise rank {} after merging axes (at most {EW_MAX_RANK})", axes.len())));
        }
        let mut shape = [1i64; EW_MAX_RANK];
        let mut inputs = [InputSlot { ptr: 0, elem: 0, pad: 0, strides: [0; EW_MAX_RANK] }; EW_MAX_INPUTS];
        for (d, (n, strides)) in axes.iter().enumerate() {
            shape[d] = long(*n, "elementwise dim")?;
            for (k, &s) in strides.iter().enumerate() {
                inputs[k].strides[d] = s;
            }
        }
        for (slot, (p, elem, _)) in inputs.iter_mut().zip(&self.inputs) {
            slot.ptr = *p;
            slot.elem = elem.code();
        }
        Ok(EwProgram {
            shape,
            inputs,
            out: self.out,
            out_elem: self.out_elem.code(),
            rank: axes.len() as i32,
            n_inputs: self.inputs.len() as i32,
            n_ops: self.ops.len() as i32,
            ops,
        })
    }

    /// Output axes without size-1 axes, neighbours merged where every input is contiguous
    /// across them: `(len, stride per input)`.
    fn merged_axes(&self) -> Vec<(usize, Vec<i64>)> {
        let mut axes: Vec<(usize, Vec<i64>)> = Vec::new();
        for (d, &n) in self.shape.iter().enumerate() {
            if n == 1 {
                continue;
            }
            let strides: Vec<i64> = self.inputs.iter().map(|i| i.2[d]).collect();
            match axes.last_mut() {
                Some((len, prev)) if prev.iter().zip(&strides).all(|(&p, &s)| p == s.wrapping_mul(n as i64)) => {
                    *len *= n;
                    *prev = strides;
                }
                _ => axes.push((n, strides)),
            }
        }
        axes
    }
}

/// The launch of a program at `program` over `n` elements.
pub(crate) fn plan(program: DevPtr, n: usize) -> Result<Option<Launch>, CudaError> {
    let prog = ptr(program, "elementwise program")?;
    if !program.is_multiple_of(8) {
        return Err(invalid(format!("elementwise program at {program:#x} is not 8-byte aligned")));
    }
    if n == 0 {
        return Ok(None);
    }
    let args = vec![prog, KArg::I64(long(n, "elementwise n")?)];
    Ok(Some(Launch { dims: Dims::linear(stride_blocks(n, EW_BLOCK), EW_BLOCK), args }))
}

impl Kernels {
    /// Runs the program uploaded at `program` (the bytes of [`EwProgram::to_bytes`]) over its
    /// `n` = [`EwProgram::len`] output elements (the kernel never goes past the program's shape).
    /// The address must be 8-byte aligned (a buffer start, or an offset that is a multiple of 8).
    pub fn elementwise(&self, stream: &CudaStream, program: DevPtr, n: usize) -> Result<(), CudaError> {
        run(stream, &self.elementwise, plan(program, n)?)
    }
}

#[cfg(test)]
#[path = "elementwise_tests.rs"]
mod tests;
