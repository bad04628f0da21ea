//! GPU tests of kiln's NVRTC kernels (`kiln_cuda::kernels`): every family on random inputs
//! (fixed seeds) against the engine's CPU reference ops, at the shapes ResNet-50 and
//! MiniLM/BERT run. This file holds the shared helpers and the data movement and elementwise
//! tests; `kernels/rows.rs` (softmax, layernorm, reduce), `kernels/pool.rs` and
//! `kernels/attention.rs` the rest.
//!
//! Tolerances (per check, `|got − want| ≤ abs + rel·|want|`): FP32 outputs 1e-5 relative plus a
//! small absolute term for sums; FP16 outputs 2e-3 absolute + 1e-2 relative (the reference runs
//! in FP32 on the FP16-rounded inputs, so the gap is FP32 accumulation order plus one rounding).

mod attention;
mod pool;
mod quant;
mod rows;

use std::error::Error;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::f16;
use kiln_cuda::device::Device;
use kiln_cuda::ffi::mem::{self, DeviceBuffer};
use kiln_cuda::kernels::{CastArgs, CopyArgs, Elem, EwOp, EwProgram, GatherArgs, Kernels, row_major_strides};
use kiln_engine::graph::{Attr, Node};
use kiln_engine::ops::registry;
use kiln_engine::ops::util::{broadcast_strides, tensor_f32, tensor_i64};
use kiln_engine::{Tensor, TensorData};

pub(crate) type TestResult = Result<(), Box<dyn Error>>;

/// The kernels and one stream on the test GPU.
pub(crate) struct Gpu {
    pub k: Kernels,
    pub stream: Arc<CudaStream>,
}

impl Gpu {
    pub(crate) fn new(dev: &Device) -> Result<Gpu, Box<dyn Error>> {
        Ok(Gpu { k: Kernels::load(dev)?, stream: dev.new_stream()? })
    }

    /// `v` stored as `elem` in a new device buffer (synchronised, so `v`'s bytes may go).
    pub(crate) fn upload(&self, v: &[f32], elem: Elem) -> Result<DeviceBuffer, Box<dyn Error>> {
        let bytes = to_bytes(v, elem);
        let buf = DeviceBuffer::from_host(&self.stream, &bytes)?;
        self.stream.synchronize()?;
        Ok(buf)
    }

    pub(crate) fn upload_raw(&self, bytes: &[u8]) -> Result<DeviceBuffer, Box<dyn Error>> {
        let buf = DeviceBuffer::from_host(&self.stream, bytes)?;
        self.stream.synchronize()?;
        Ok(buf)
    }

    pub(crate) fn zeros(&self, n: usize, elem: Elem) -> Result<DeviceBuffer, Box<dyn Error>> {
        Ok(DeviceBuffer::zeroed(&self.stream, n * elem.size())?)
    }

    /// The first `n` elements of `buf` as f32, after the stream's work so far.
    pub(crate) fn download(&self, buf: &DeviceBuffer, n: usize, elem: Elem) -> Result<Vec<f32>, Box<dyn Error>> {
        let mut bytes = vec![0u8; n * elem.size()];
        mem::dtoh(&self.stream, buf.ptr(), buf.len(), &mut bytes)?;
        self.stream.synchronize()?;
        Ok(from_bytes(&bytes, elem))
    }
}

pub(crate) fn to_bytes(v: &[f32], elem: Elem) -> Vec<u8> {
    match elem {
        Elem::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Elem::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Elem::I64 => v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
        Elem::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        Elem::U8 => v.iter().map(|&x| x as u8).collect(),
        Elem::I8 => v.iter().map(|&x| x as i8 as u8).collect(),
    }
}

pub(crate) fn from_bytes(b: &[u8], elem: Elem) -> Vec<f32> {
    let chunks = b.chunks_exact(elem.size());
    match elem {
        Elem::F32 => chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Elem::F16 => chunks.map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Elem::I64 => chunks.map(|c| i64::from_le_bytes(std::array::from_fn(|i| c[i])) as f32).collect(),
        Elem::I32 => chunks.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        Elem::U8 => chunks.map(|c| f32::from(c[0])).collect(),
        Elem::I8 => chunks.map(|c| f32::from(c[0] as i8)).collect(),
    }
}

/// `v` as stored in `elem` (what the kernel reads), back as f32.
pub(crate) fn stored(v: &[f32], elem: Elem) -> Vec<f32> {
    from_bytes(&to_bytes(v, elem), elem)
}

pub(crate) fn random(rng: &mut fastrand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
}

pub(crate) fn f32_tensor(shape: &[usize], v: &[f32]) -> Result<Tensor, Box<dyn Error>> {
    Ok(tensor_f32(shape.to_vec(), v.to_vec())?)
}

/// The engine's reference `op` on `inputs` (None: an omitted optional input); its first output
/// as f32 (BOOL as 0/1) and its shape.
pub(crate) fn reference(
    op: &str,
    attrs: &[(&str, Attr)],
    inputs: &[Option<&Tensor>],
) -> Result<(Vec<f32>, Vec<usize>), Box<dyn Error>> {
    let ids = (0..inputs.len()).map(|i| inputs[i].map(|_| i)).collect();
    let mut node = Node::new("n", op, ids, vec![inputs.len()]);
    for (name, value) in attrs {
        node = node.with_attr(name, value.clone());
    }
    let def = registry().get(op).ok_or_else(|| format!("no reference op {op}"))?;
    let out = def.eval(&node, inputs)?;
    let t = out.into_iter().next().ok_or("no output")?;
    let values = match t.data() {
        TensorData::F32(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
        TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        TensorData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
        other => return Err(format!("reference output of {:?}", other.dtype()).into()),
    };
    Ok((values, t.shape().to_vec()))
}

/// Asserts `|got − want| ≤ abs + rel·|want|` everywhere (NaN only against NaN, equal infinities).
pub(crate) fn check(got: &[f32], want: &[f32], abs: f32, rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() || g.is_nan() {
            w.is_nan() && g.is_nan()
        } else if w.is_infinite() || g.is_infinite() {
            g == w
        } else {
            let err = (g - w).abs();
            if err > worst.0 {
                worst = (err, i);
            }
            err <= abs + rel * w.abs()
        };
        assert!(ok, "{what}[{i}]: got {g}, expected {w}");
    }
    println!("{what}: {} values, max abs error {:e} at {}", got.len(), worst.0, worst.1);
}

/// The tolerance of an output of `elem` (see the module comment).
pub(crate) fn check_elem(got: &[f32], want: &[f32], elem: Elem, what: &str) {
    match elem {
        Elem::F16 => check(got, want, 2e-3, 1e-2, what),
        _ => check(got, want, 1e-6, 1e-5, what),
    }
}

#[test]
fn cast_matches_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(1);
    let mut x = random(&mut rng, 10_000, 300.0);
    x.extend([0.0, -0.0, 0.5, -0.5, 65504.0, 70000.0, 1e10, -1e10, f32::NAN, f32::INFINITY]);
    // (source elem, destination elem, boolean, ONNX `to`): exact except FP16 rounding, which the
    // reference does too (Cast to FLOAT16 rounds and keeps FP32 storage).
    let cases = [
        (Elem::F32, Elem::F16, false, 10),
        (Elem::F32, Elem::I64, false, 7),
        (Elem::F32, Elem::I32, false, 6),
        (Elem::F32, Elem::U8, true, 9),
        (Elem::F16, Elem::F32, false, 1),
        (Elem::I64, Elem::F32, false, 1),
        (Elem::I32, Elem::F16, false, 10),
        (Elem::I64, Elem::I32, false, 6),
        (Elem::U8, Elem::F32, false, 1),
    ];
    for (src_elem, dst_elem, boolean, to) in cases {
        // Integer sources hold what fits them (the reference reads the same stored values).
        let finite: Vec<f32> = x.iter().map(|&v| if v.is_finite() { v.clamp(-1e6, 1e6) } else { 3.0 }).collect();
        let input = match src_elem {
            Elem::F32 | Elem::F16 => stored(&x, src_elem),
            Elem::U8 => finite.iter().map(|v| v.abs().trunc() % 256.0).collect(),
            _ => stored(&finite, src_elem),
        };
        let src = g.upload(&input, src_elem)?;
        let dst = g.zeros(input.len(), dst_elem)?;
        let args = CastArgs { src: src.ptr(), src_elem, dst: dst.ptr(), dst_elem, n: input.len(), boolean };
        g.k.cast(&g.stream, &args)?;
        let got = g.download(&dst, input.len(), dst_elem)?;
        let t = match src_elem {
            Elem::F32 | Elem::F16 => f32_tensor(&[input.len()], &input)?,
            _ => tensor_i64(vec![input.len()], input.iter().map(|&v| v as i64).collect())?,
        };
        let (want, _) = reference("Cast", &[("to", Attr::Int(to))], &[Some(&t)])?;
        check(&got, &want, 0.0, 0.0, &format!("cast {src_elem:?} -> {dst_elem:?}"));
    }
    Ok(())
}

/// Runs `copies` (each a CopyArgs built from the output buffer's address) and returns the output.
fn run_copies(
    g: &Gpu,
    out: &DeviceBuffer,
    n: usize,
    elem: Elem,
    copies: &[CopyArgs],
) -> Result<Vec<f32>, Box<dyn Error>> {
    for c in copies {
        g.k.copy_strided(&g.stream, c)?;
    }
    g.download(out, n, elem)
}

#[test]
fn copy_strided_does_transpose_slice_expand_and_concat() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(2);

    // Transpose [2, 3, 4, 5] by (0, 2, 3, 1), FP16 (2-byte elements).
    let x = stored(&random(&mut rng, 120, 4.0), Elem::F16);
    let xb = g.upload(&x, Elem::F16)?;
    let out = g.zeros(120, Elem::F16)?;
    let st = row_major_strides(&[2, 3, 4, 5]);
    let copy = CopyArgs::contiguous(out.ptr(), xb.ptr(), 2, &[2, 4, 5, 3], &[st[0], st[2], st[3], st[1]]);
    let got = run_copies(&g, &out, 120, Elem::F16, &[copy])?;
    let perm = [("perm", Attr::Ints(vec![0, 2, 3, 1]))];
    let (want, _) = reference("Transpose", &perm, &[Some(&f32_tensor(&[2, 3, 4, 5], &x)?)])?;
    check(&got, &want, 0.0, 0.0, "transpose");

    // Slice x[1:4, 9:0:-2] of [4, 10] FP32: starts at (1, 9), strides (10, -2).
    let x = random(&mut rng, 40, 4.0);
    let xb = g.upload(&x, Elem::F32)?;
    let out = g.zeros(15, Elem::F32)?;
    let copy = CopyArgs::contiguous(out.ptr(), xb.at(19 * 4, 4)?, 4, &[3, 5], &[10, -2]);
    let got = run_copies(&g, &out, 15, Elem::F32, &[copy])?;
    let i = |v: Vec<i64>| tensor_i64(vec![v.len()], v);
    let (starts, ends, axes, steps) = (i(vec![1, 9])?, i(vec![4, 0])?, i(vec![0, 1])?, i(vec![1, -2])?);
    let t = f32_tensor(&[4, 10], &x)?;
    let (want, shape) = reference("Slice", &[], &[Some(&t), Some(&starts), Some(&ends), Some(&axes), Some(&steps)])?;
    assert_eq!(shape, vec![3, 5]);
    check(&got, &want, 0.0, 0.0, "slice");

    // Expand [3, 1] to [2, 3, 4] (8-byte elements: INT64 values).
    let x: Vec<f32> = vec![7.0, -8.0, 9.0];
    let xb = g.upload(&x, Elem::I64)?;
    let out = g.zeros(24, Elem::I64)?;
    let src: Vec<i64> = broadcast_strides(&[3, 1], &[2, 3, 4]).into_iter().map(|s| s as i64).collect();
    let copy = CopyArgs::contiguous(out.ptr(), xb.ptr(), 8, &[2, 3, 4], &src);
    let got = run_copies(&g, &out, 24, Elem::I64, &[copy])?;
    let (want, _) = reference("Expand", &[], &[Some(&f32_tensor(&[3, 1], &x)?), Some(&i(vec![2, 3, 4])?)])?;
    check(&got, &want, 0.0, 0.0, "expand");

    // Concat [2, 3, 8] and [2, 5, 8] on axis 1 (one copy per input into the [2, 8, 8] output).
    let (a, b) = (random(&mut rng, 48, 1.0), random(&mut rng, 80, 1.0));
    let (ab, bb) = (g.upload(&a, Elem::F32)?, g.upload(&b, Elem::F32)?);
    let out = g.zeros(128, Elem::F32)?;
    let dst = row_major_strides(&[2, 8, 8]);
    let first =
        CopyArgs { dst_strides: dst.clone(), ..CopyArgs::contiguous(out.ptr(), ab.ptr(), 4, &[2, 3, 8], &[24, 8, 1]) };
    let second = CopyArgs {
        dst_strides: dst,
        ..CopyArgs::contiguous(out.at(3 * 8 * 4, 4)?, bb.ptr(), 4, &[2, 5, 8], &[40, 8, 1])
    };
    let got = run_copies(&g, &out, 128, Elem::F32, &[first, second])?;
    let (ta, tb) = (f32_tensor(&[2, 3, 8], &a)?, f32_tensor(&[2, 5, 8], &b)?);
    let (want, _) = reference("Concat", &[("axis", Attr::Int(1))], &[Some(&ta), Some(&tb)])?;
    check(&got, &want, 0.0, 0.0, "concat");
    Ok(())
}

#[test]
fn gather_rows_like_the_engine_and_flags_bad_indices() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(3);
    // MiniLM's word embeddings: [30522, 384] FP16, batch 2 × 128 token ids, some negative.
    let (rows, row_len) = (30522, 384);
    let table = stored(&random(&mut rng, rows * row_len, 0.5), Elem::F16);
    let ids: Vec<i64> =
        (0..256).map(|k| if k % 17 == 0 { -(rng.i64(1..=rows as i64)) } else { rng.i64(0..rows as i64) }).collect();
    let tb = g.upload(&table, Elem::F16)?;
    let ib = g.upload_raw(&ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let out = g.zeros(256 * row_len, Elem::F16)?;
    let err = g.zeros(1, Elem::I32)?;
    let args = GatherArgs {
        out: out.ptr(),
        table: tb.ptr(),
        idx: ib.ptr(),
        idx_elem: Elem::I64,
        elem: Elem::F16,
        n_idx: 256,
        rows,
        row_len,
        err: Some(err.ptr()),
    };
    g.k.gather(&g.stream, &args)?;
    let got = g.download(&out, 256 * row_len, Elem::F16)?;
    let (want, _) = reference(
        "Gather",
        &[("axis", Attr::Int(0))],
        &[Some(&f32_tensor(&[rows, row_len], &table)?), Some(&tensor_i64(vec![2, 128], ids.clone())?)],
    )?;
    check(&got, &want, 0.0, 0.0, "gather [30522, 384] FP16");
    assert_eq!(g.download(&err, 1, Elem::I32)?, vec![0.0]);

    // INT32 indices, 3-float rows (4-byte units), one index out of range.
    let table: Vec<f32> = (0..30).map(|v| v as f32).collect();
    let tb = g.upload(&table, Elem::F32)?;
    let ib = g.upload(&[2.0, -1.0, 10.0, 0.0], Elem::I32)?;
    let out = g.upload(&[5.0; 12], Elem::F32)?;
    let args = GatherArgs {
        table: tb.ptr(),
        idx: ib.ptr(),
        idx_elem: Elem::I32,
        elem: Elem::F32,
        n_idx: 4,
        rows: 10,
        row_len: 3,
        out: out.ptr(),
        ..args
    };
    g.k.gather(&g.stream, &args)?;
    let got = g.download(&out, 12, Elem::F32)?;
    assert_eq!(got, vec![6.0, 7.0, 8.0, 27.0, 28.0, 29.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    assert_eq!(g.download(&err, 1, Elem::I32)?, vec![1.0]);
    Ok(())
}

#[test]
fn elementwise_programs_match_eval_cpu_and_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(4);

    // BERT's FFN epilogue on [256, 3072] FP16: gelu(h + bias) + residual, bias FP32 broadcast.
    let out_shape = [256, 3072];
    let n = 256 * 3072;
    let h = stored(&random(&mut rng, n, 3.0), Elem::F16);
    let bias = random(&mut rng, 3072, 1.0);
    let res = stored(&random(&mut rng, n, 1.0), Elem::F16);
    let (hb, bb, rb) = (g.upload(&h, Elem::F16)?, g.upload(&bias, Elem::F32)?, g.upload(&res, Elem::F16)?);
    let out = g.zeros(n, Elem::F16)?;
    let mut b = EwProgram::builder(&out_shape, out.ptr(), Elem::F16);
    let hr = b.input(hb.ptr(), Elem::F16, &[3072, 1]);
    let br = b.input(bb.ptr(), Elem::F32, &[0, 1]);
    let rr = b.input(rb.ptr(), Elem::F16, &[3072, 1]);
    let s = b.binary(EwOp::Add, hr, br);
    let a = b.unary(EwOp::Gelu, s);
    b.binary(EwOp::Add, a, rr);
    let prog = b.finish()?;
    let pb = g.upload_raw(&prog.to_bytes())?;
    g.k.elementwise(&g.stream, pb.ptr(), prog.len())?;
    let got = g.download(&out, n, Elem::F16)?;
    check_elem(&got, &prog.eval_cpu(&[&h, &bias, &res])?, Elem::F16, "gelu(h + b) + r vs eval_cpu");
    let (added, _) = reference("Add", &[], &[Some(&f32_tensor(&out_shape, &h)?), Some(&f32_tensor(&[3072], &bias)?)])?;
    let (act, _) = reference("Gelu", &[], &[Some(&f32_tensor(&out_shape, &added)?)])?;
    let (want, _) =
        reference("Add", &[], &[Some(&f32_tensor(&out_shape, &act)?), Some(&f32_tensor(&out_shape, &res)?)])?;
    check_elem(&got, &want, Elem::F16, "gelu(h + b) + r vs the engine");

    // Every opcode once, FP32, through a chain over a [3, 1, 5] × [4, 1] broadcast.
    let out_shape = [3, 4, 5];
    let (x, y) = (random(&mut rng, 15, 2.0), random(&mut rng, 4, 2.0));
    let (xb, yb) = (g.upload(&x, Elem::F32)?, g.upload(&y, Elem::F32)?);
    let xs: Vec<i64> = broadcast_strides(&[3, 1, 5], &out_shape).into_iter().map(|s| s as i64).collect();
    let ys: Vec<i64> = broadcast_strides(&[4, 1], &out_shape).into_iter().map(|s| s as i64).collect();
    for op in EwOp::ALL {
        let out = g.zeros(60, Elem::F32)?;
        let mut b = EwProgram::builder(&out_shape, out.ptr(), Elem::F32);
        let (xr, yr) = (b.input(xb.ptr(), Elem::F32, &xs), b.input(yb.ptr(), Elem::F32, &ys));
        let cond = b.binary(EwOp::Greater, xr, yr);
        let (imm0, imm1) = if op == EwOp::Clip { (-0.5, 0.75) } else { (0.3, -0.2) };
        b.op(op, if op == EwOp::Where { cond } else { xr }, yr, xr, imm0, imm1);
        let prog = b.finish()?;
        let pb = g.upload_raw(&prog.to_bytes())?;
        g.k.elementwise(&g.stream, pb.ptr(), prog.len())?;
        let got = g.download(&out, 60, Elem::F32)?;
        // CUDA's expf/tanhf/erff/powf are within a few ulp of Rust's.
        check(&got, &prog.eval_cpu(&[&x, &y])?, 1e-6, 1e-5, &format!("{op:?}"));
    }

    // A comparison into BOOL bytes and a cast to INT64 over 5 M elements (grid-stride loop).
    let n = 5_000_000;
    let x = random(&mut rng, n, 100.0);
    let xb = g.upload(&x, Elem::F32)?;
    for (elem, op) in [(Elem::U8, EwOp::Less), (Elem::I64, EwOp::Affine)] {
        let out = g.zeros(n, elem)?;
        let mut b = EwProgram::builder(&[n], out.ptr(), elem);
        let xr = b.input(xb.ptr(), Elem::F32, &[1]);
        let c = b.op(EwOp::Const, 0, 0, 0, 1.5, 0.0);
        b.op(op, xr, c, 0, 2.0, 0.5);
        let prog = b.finish()?;
        let pb = g.upload_raw(&prog.to_bytes())?;
        g.k.elementwise(&g.stream, pb.ptr(), prog.len())?;
        check(&g.download(&out, n, elem)?, &prog.eval_cpu(&[&x])?, 0.0, 0.0, &format!("{op:?} -> {elem:?}"));
    }
    Ok(())
}
