//! cuBLASLt GEMMs and cuDNN fused convolutions against the engine's reference
//! ops (kiln.Dense, MatMul, kiln.FusedConv), every enumerated algorithm of
//! every plan. FP16 inputs are rounded to FP16 before the reference sees them,
//! so the tolerance only covers accumulation order and the output's rounding:
//! |got − want| ≤ TOL·max(1, |want|) with TOL 2e-2 for FP16 (K up to 2048,
//! inputs in [-1, 1], weights scaled by 1/√K) and 1e-3 for FP32 (plain FP32
//! compute, no TF32).
//!
//! Outputs are filled with NaN before each run, so an algorithm that writes
//! nothing (or, for cuDNN, reads `z` although alpha2 is 0) cannot pass.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use half::f16;
use kiln_cuda::CudaError;
use kiln_cuda::blas::{Blas, Epilogue, GemmArgs, GemmElem, GemmPlan, GemmSpec};
use kiln_cuda::device::Device;
use kiln_cuda::dnn::{ConvAct, ConvArgs, ConvElem, ConvLayout, ConvPlan, ConvSpec, Dnn};
use kiln_cuda::ffi::DevPtr;
use kiln_cuda::ffi::mem::{DeviceBuffer, dtoh, htod};
use kiln_engine::graph::{Attr, Node};
use kiln_engine::ops::registry;
use kiln_engine::{Tensor, TensorData};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WORKSPACE: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prec {
    F16,
    F32,
}

impl Prec {
    fn tol(self) -> f32 {
        match self {
            Self::F16 => 2e-2,
            Self::F32 => 1e-3,
        }
    }

    fn gemm(self) -> GemmElem {
        match self {
            Self::F16 => GemmElem::F16,
            Self::F32 => GemmElem::F32,
        }
    }

    fn conv(self) -> ConvElem {
        match self {
            Self::F16 => ConvElem::F16,
            Self::F32 => ConvElem::F32,
        }
    }

    /// What the device sees of `v`.
    fn round(self, v: &[f32]) -> Vec<f32> {
        match self {
            Self::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            Self::F32 => v.to_vec(),
        }
    }

    fn bytes(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            Self::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        }
    }

    fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Self::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Self::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Uniform values in [-scale, scale], already rounded to `p`.
fn random(rng: &mut fastrand::Rng, n: usize, scale: f32, p: Prec) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect();
    p.round(&v)
}

fn upload(stream: &Arc<CudaStream>, v: &[f32], p: Prec) -> Result<DeviceBuffer, CudaError> {
    DeviceBuffer::from_host(stream, &p.bytes(v))
}

/// Overwrites `buf` with all-ones bytes: NaN in FP16 and FP32.
fn poison(stream: &Arc<CudaStream>, buf: &DeviceBuffer) -> Result<(), CudaError> {
    htod(stream, &vec![0xFF; buf.len()], buf.ptr(), buf.len())?;
    stream.synchronize().map_err(CudaError::driver("synchronize"))
}

fn download(stream: &Arc<CudaStream>, buf: &DeviceBuffer, p: Prec) -> Result<Vec<f32>, CudaError> {
    let mut bytes = vec![0u8; buf.len()];
    dtoh(stream, buf.ptr(), buf.len(), &mut bytes)?;
    stream.synchronize().map_err(CudaError::driver("synchronize"))?;
    Ok(p.decode(&bytes))
}

fn tensor(shape: &[usize], v: &[f32]) -> Result<Tensor, Box<dyn std::error::Error>> {
    Ok(Tensor::new(shape.to_vec(), TensorData::F32(v.to_vec()))?)
}

/// Evaluates reference op `op` (FP32) on `inputs`.
fn reference(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let op = registry().get(&node.op).ok_or_else(|| format!("no reference op {}", node.op))?;
    let out = op.eval(node, inputs)?;
    let y = out.first().and_then(Tensor::as_f32).ok_or("reference returned no FP32 output")?;
    Ok(y.to_vec())
}

fn check(got: &[f32], want: &[f32], tol: f32, what: &str) -> TestResult {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        let err = if err.is_nan() { f32::INFINITY } else { err };
        if err > worst.1 {
            worst = (i, err);
        }
    }
    let (i, err) = worst;
    assert!(err <= tol, "{what}: element {i} is {} but the reference says {} (error {err} > {tol})", got[i], want[i]);
    println!("{what}: max error {err:.2e}");
    Ok(())
}

// ---------------------------------------------------------------- cuBLASLt

struct GemmCase<'a> {
    stream: &'a Arc<CudaStream>,
    blas: &'a Blas,
    spec: GemmSpec,
    args: GemmArgs,
    out: &'a DeviceBuffer,
    prec: Prec,
    /// Poison D before each run (not when D is also the residual C).
    poison: bool,
}

/// Runs every algorithm of the plan and checks each against `want`.
fn run_all(case: &GemmCase<'_>, want: &[f32], what: &str) -> Result<GemmPlan, Box<dyn std::error::Error>> {
    let plan = case.blas.plan(&case.spec, WORKSPACE)?;
    assert!(plan.algo_count() >= 1);
    let ws = DeviceBuffer::zeroed(case.stream, plan.max_workspace_bytes())?;
    for i in 0..plan.algo_count() {
        if case.poison {
            poison(case.stream, case.out)?;
        }
        case.blas.run(case.stream, &plan, i, &case.args, ws.ptr(), ws.len())?;
        let got = download(case.stream, case.out, case.prec)?;
        let id = plan.algo_id(i).unwrap_or("?");
        check(&got, want, case.prec.tol(), &format!("{what} {:?} algo {i} ({id})", case.prec))?;
    }
    Ok(plan)
}

/// Row-major Y[m,n] = act(X[m,k]·W[k,n] + b (+ Z)) through cuBLASLt vs kiln.Dense.
fn dense_case(dev: &Device, m: usize, k: usize, n: usize, epilogue: Epilogue, residual: bool, p: Prec) -> TestResult {
    let stream = dev.new_stream()?;
    let blas = Blas::new()?;
    let mut rng = fastrand::Rng::with_seed(7);
    let x = random(&mut rng, m * k, 1.0, p);
    let w = random(&mut rng, k * n, 1.0 / (k as f32).sqrt(), p);
    let b = random(&mut rng, n, 0.5, p);
    let z = random(&mut rng, m * n, 1.0, p);
    let act = match epilogue {
        Epilogue::None => "none",
        Epilogue::Relu => "relu",
        // cuBLASLt's GELU epilogue is the tanh approximation.
        Epilogue::Gelu => "gelu_tanh",
    };
    let inputs = if residual { vec![Some(0), Some(1), Some(2), Some(3)] } else { vec![Some(0), Some(1), Some(2)] };
    let node = Node::new("dense", "kiln.Dense", inputs, vec![4]).with_attr("activation", Attr::String(act.into()));
    let (tx, tw, tb, tz) = (tensor(&[m, k], &x)?, tensor(&[k, n], &w)?, tensor(&[n], &b)?, tensor(&[m, n], &z)?);
    let want = reference(&node, &[Some(&tx), Some(&tw), Some(&tb), residual.then_some(&tz)])?;

    let (dx, dw, db, dz) =
        (upload(&stream, &x, p)?, upload(&stream, &w, p)?, upload(&stream, &b, p)?, upload(&stream, &z, p)?);
    let out = DeviceBuffer::zeroed(&stream, m * n * p.size())?;
    let mut spec =
        GemmSpec::row_major(m as u64, k as u64, n as u64, false, p.gemm()).with_bias().with_epilogue(epilogue);
    if residual {
        spec = spec.with_residual();
    }
    let args = GemmArgs { a: dw.ptr(), b: dx.ptr(), c: residual.then(|| dz.ptr()), d: out.ptr(), bias: Some(db.ptr()) };
    let case = GemmCase { stream: &stream, blas: &blas, spec, args, out: &out, prec: p, poison: true };
    run_all(&case, &want, &format!("dense {m}x{k}x{n} {act} residual={residual}"))?;
    if residual {
        // C ≠ D: the residual input is left as it was.
        assert_eq!(download(&stream, &dz, p)?, z, "the residual C was modified");
    }
    Ok(())
}

#[test]
fn dense_bias_relu() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    dense_case(&dev, 96, 512, 256, Epilogue::Relu, false, Prec::F16)?;
    dense_case(&dev, 96, 512, 256, Epilogue::Relu, false, Prec::F32)
}

#[test]
fn dense_bias_gelu_is_gelu_tanh() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    dense_case(&dev, 64, 2048, 128, Epilogue::Gelu, false, Prec::F16)?;
    dense_case(&dev, 64, 2048, 128, Epilogue::Gelu, false, Prec::F32)
}

#[test]
fn dense_residual_out_of_place() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    dense_case(&dev, 40, 384, 96, Epilogue::None, true, Prec::F16)?;
    dense_case(&dev, 40, 384, 96, Epilogue::Relu, true, Prec::F16)?;
    dense_case(&dev, 40, 384, 96, Epilogue::None, true, Prec::F32)
}

/// The residual added in place (C = D), as the engine does when the residual's
/// buffer dies at this node: D holds Z before the GEMM.
#[test]
fn dense_residual_in_place() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let stream = dev.new_stream()?;
    let blas = Blas::new()?;
    let (m, k, n, p) = (33, 256, 64, Prec::F16);
    let mut rng = fastrand::Rng::with_seed(11);
    let x = random(&mut rng, m * k, 1.0, p);
    let w = random(&mut rng, k * n, 1.0 / (k as f32).sqrt(), p);
    let z = random(&mut rng, m * n, 1.0, p);
    let node = Node::new("dense", "kiln.Dense", vec![Some(0), Some(1), None, Some(3)], vec![4]);
    let want = reference(
        &node,
        &[Some(&tensor(&[m, k], &x)?), Some(&tensor(&[k, n], &w)?), None, Some(&tensor(&[m, n], &z)?)],
    )?;
    let (dx, dw, out) = (upload(&stream, &x, p)?, upload(&stream, &w, p)?, upload(&stream, &z, p)?);
    let spec = GemmSpec::row_major(m as u64, k as u64, n as u64, false, p.gemm()).with_residual();
    let plan = blas.plan(&spec, WORKSPACE)?;
    let ws = DeviceBuffer::zeroed(&stream, plan.max_workspace_bytes())?;
    let z_bytes = p.bytes(&z);
    for i in 0..plan.algo_count() {
        htod(&stream, &z_bytes, out.ptr(), out.len())?;
        let args = GemmArgs { a: dw.ptr(), b: dx.ptr(), c: Some(out.ptr()), d: out.ptr(), bias: None };
        blas.run(&stream, &plan, i, &args, ws.ptr(), ws.len())?;
        check(&download(&stream, &out, p)?, &want, p.tol(), &format!("in-place residual algo {i}"))?;
    }
    Ok(())
}

/// Attention-style strided batches: Y_i = X_i·R_i, R stored [k,n] or (`rhs_t`) [n,k], vs MatMul.
#[test]
fn batched_strided_gemm() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let stream = dev.new_stream()?;
    let blas = Blas::new()?;
    let (count, m, k, n) = (6, 32, 64, 48);
    for p in [Prec::F16, Prec::F32] {
        for rhs_t in [false, true] {
            let mut rng = fastrand::Rng::with_seed(3);
            let x = random(&mut rng, count * m * k, 1.0, p);
            let r = random(&mut rng, count * k * n, 1.0 / (k as f32).sqrt(), p);
            // The reference wants R as [count, k, n]; the device gets it as stored.
            let stored: Vec<f32> = if rhs_t {
                let mut t = vec![0.0; r.len()];
                for bi in 0..count {
                    for ki in 0..k {
                        for ni in 0..n {
                            t[(bi * n + ni) * k + ki] = r[(bi * k + ki) * n + ni];
                        }
                    }
                }
                t
            } else {
                r.clone()
            };
            let node = Node::new("mm", "MatMul", vec![Some(0), Some(1)], vec![2]);
            let want = reference(&node, &[Some(&tensor(&[count, m, k], &x)?), Some(&tensor(&[count, k, n], &r)?)])?;
            let (dx, dr) = (upload(&stream, &x, p)?, upload(&stream, &stored, p)?);
            let out = DeviceBuffer::zeroed(&stream, count * m * n * p.size())?;
            let spec = GemmSpec::row_major_batched(count as u64, m as u64, k as u64, n as u64, rhs_t, p.gemm());
            let args = GemmArgs { a: dr.ptr(), b: dx.ptr(), c: None, d: out.ptr(), bias: None };
            let case = GemmCase { stream: &stream, blas: &blas, spec, args, out: &out, prec: p, poison: true };
            run_all(&case, &want, &format!("batched {count}x[{m}x{k}x{n}] rhs_t={rhs_t}"))?;
        }
    }
    Ok(())
}

/// A stride-1 1×1 NHWC convolution as one GEMM over N·H·W rows with OHWI
/// weights [K, C] (transposed A), bias, residual and ReLU, vs kiln.FusedConv.
#[test]
fn pointwise_conv_as_gemm() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let stream = dev.new_stream()?;
    let blas = Blas::new()?;
    let (nb, h, wd, c, kout, p) = (2, 7, 7, 64, 128, Prec::F16);
    let mut rng = fastrand::Rng::with_seed(5);
    let x = random(&mut rng, nb * h * wd * c, 1.0, p);
    let w = random(&mut rng, kout * c, 1.0 / (c as f32).sqrt(), p);
    let b = random(&mut rng, kout, 0.5, p);
    let z = random(&mut rng, nb * h * wd * kout, 1.0, p);
    let spec = ConvSpec {
        act: ConvAct::Relu,
        residual: true,
        ..ConvSpec::new([nb, c, h, wd], kout, [1, 1], ConvLayout::Nhwc, ConvElem::F16)
    };
    let node = conv_node(&spec);
    let want = reference(
        &node,
        &[
            Some(&tensor(&[nb, h, wd, c], &x)?),
            Some(&tensor(&[kout, 1, 1, c], &w)?),
            Some(&tensor(&[kout], &b)?),
            Some(&tensor(&[nb, h, wd, kout], &z)?),
        ],
    )?;
    let (dx, dw, db, dz) =
        (upload(&stream, &x, p)?, upload(&stream, &w, p)?, upload(&stream, &b, p)?, upload(&stream, &z, p)?);
    let out = DeviceBuffer::zeroed(&stream, z.len() * p.size())?;
    let gemm = GemmSpec::row_major((nb * h * wd) as u64, c as u64, kout as u64, true, GemmElem::F16)
        .with_bias()
        .with_residual()
        .with_epilogue(Epilogue::Relu);
    let args = GemmArgs { a: dw.ptr(), b: dx.ptr(), c: Some(dz.ptr()), d: out.ptr(), bias: Some(db.ptr()) };
    let case = GemmCase { stream: &stream, blas: &blas, spec: gemm, args, out: &out, prec: p, poison: true };
    run_all(&case, &want, "1x1 conv as GEMM")?;
    Ok(())
}

#[test]
fn gemm_run_rejects_bad_arguments() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let stream = dev.new_stream()?;
    let blas = Blas::new()?;
    let spec = GemmSpec::row_major(16, 32, 64, false, GemmElem::F16).with_bias();
    let plan = blas.plan(&spec, WORKSPACE)?;
    let buf = DeviceBuffer::zeroed(&stream, 1 << 16)?;
    let ws = DeviceBuffer::zeroed(&stream, plan.max_workspace_bytes())?;
    let p = buf.ptr();
    let good = GemmArgs { a: p, b: p + 4096, c: None, d: p + 8192, bias: Some(p + 16384) };
    blas.run(&stream, &plan, 0, &good, ws.ptr(), ws.len())?;
    let rejected = |args: GemmArgs, algo: usize, ws_bytes: usize| {
        matches!(blas.run(&stream, &plan, algo, &args, ws.ptr(), ws_bytes), Err(CudaError::InvalidArgument(_)))
    };
    assert!(rejected(good, plan.algo_count(), ws.len()), "algorithm index out of range");
    assert!(rejected(GemmArgs { bias: None, ..good }, 0, ws.len()), "missing bias");
    assert!(rejected(GemmArgs { a: 0, ..good }, 0, ws.len()), "null A");
    assert!(rejected(GemmArgs { b: p + 4098, ..good }, 0, ws.len()), "misaligned B");
    assert!(rejected(GemmArgs { c: Some(p), ..good }, 0, ws.len()), "C without beta");
    if let Some(i) = (0..plan.algo_count()).find(|&i| plan.workspace_bytes(i).unwrap_or(0) > 0) {
        assert!(rejected(good, i, 0), "workspace too small");
    }
    let missing_c = blas.plan(&spec.with_residual(), WORKSPACE)?;
    assert!(matches!(blas.run(&stream, &missing_c, 0, &good, ws.ptr(), ws.len()), Err(CudaError::InvalidArgument(_))));
    let bad = GemmSpec { lda: 1, ..spec };
    assert!(matches!(blas.plan(&bad, WORKSPACE), Err(CudaError::InvalidArgument(_))));
    stream.synchronize()?;
    Ok(())
}

// ---------------------------------------------------------------- cuDNN

/// The kiln.FusedConv node `spec` describes (inputs x, w, b and z if residual).
fn conv_node(spec: &ConvSpec) -> Node {
    let mut inputs = vec![Some(0), Some(1), Some(2)];
    if spec.residual {
        inputs.push(Some(3));
    }
    let layout = match spec.layout {
        ConvLayout::Nhwc => "NHWC",
        ConvLayout::Nchw => "NCHW",
    };
    let (ph, pw) = (spec.pad_h as i64, spec.pad_w as i64);
    let node = Node::new("conv", "kiln.FusedConv", inputs, vec![4])
        .with_attr("layout", Attr::String(layout.into()))
        .with_attr("pads", Attr::Ints(vec![ph, pw, ph, pw]))
        .with_attr("strides", Attr::Ints(vec![spec.stride_h as i64, spec.stride_w as i64]))
        .with_attr("dilations", Attr::Ints(vec![spec.dil_h as i64, spec.dil_w as i64]))
        .with_attr("group", Attr::Int(spec.groups as i64));
    match spec.act {
        ConvAct::Identity => node,
        ConvAct::Relu => node.with_attr("activation", Attr::String("relu".into())),
        ConvAct::ClippedRelu(c) => node
            .with_attr("activation", Attr::String("clip".into()))
            .with_attr("clip_min", Attr::Float(0.0))
            .with_attr("clip_max", Attr::Float(c as f32)),
    }
}

fn shape(spec: &ConvSpec, [n, c, h, w]: [usize; 4]) -> Vec<usize> {
    match spec.layout {
        ConvLayout::Nhwc => vec![n, h, w, c],
        ConvLayout::Nchw => vec![n, c, h, w],
    }
}

/// Host data of one convolution: what the device gets and what the reference gets.
struct ConvData {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    z: Vec<f32>,
    want: Vec<f32>,
}

/// Random data for `spec` and the reference output.
fn conv_data(spec: &ConvSpec, p: Prec, seed: u64, w_scale: f32) -> Result<ConvData, Box<dyn std::error::Error>> {
    let [xl, wl, yl] = spec.lens()?;
    let (oh, ow) = spec.output_hw()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let fan_in = (spec.c / spec.groups * spec.r * spec.s) as f32;
    let x = random(&mut rng, xl, 1.0, p);
    let w = random(&mut rng, wl, w_scale / fan_in.sqrt(), p);
    let b = random(&mut rng, spec.k, 0.5, p);
    let z = random(&mut rng, yl, 1.0, p);
    let cg = spec.c / spec.groups;
    let w_shape = match spec.layout {
        ConvLayout::Nhwc => vec![spec.k, spec.r, spec.s, cg],
        ConvLayout::Nchw => vec![spec.k, cg, spec.r, spec.s],
    };
    let tz = tensor(&shape(spec, [spec.n, spec.k, oh, ow]), &z)?;
    let want = reference(
        &conv_node(spec),
        &[
            Some(&tensor(&shape(spec, [spec.n, spec.c, spec.h, spec.w]), &x)?),
            Some(&tensor(&w_shape, &w)?),
            Some(&tensor(&[spec.k], &b)?),
            spec.residual.then_some(&tz),
        ],
    )?;
    Ok(ConvData { x, w, b, z, want })
}

/// Runs every algorithm of `spec`'s plan on `data` (the device's x and w) and
/// checks each against `want`. With `in_place`, z is the output buffer.
fn conv_all(
    dnn: &Dnn,
    spec: &ConvSpec,
    d: &ConvData,
    p: Prec,
    in_place: bool,
    what: &str,
) -> Result<ConvPlan, Box<dyn std::error::Error>> {
    let stream = dnn.stream().clone();
    let plan = dnn.plan(spec)?;
    assert!(plan.algo_count() >= 1);
    let (dx, dw, db, dz) =
        (upload(&stream, &d.x, p)?, upload(&stream, &d.w, p)?, upload(&stream, &d.b, p)?, upload(&stream, &d.z, p)?);
    let out = DeviceBuffer::zeroed(&stream, d.want.len() * p.size())?;
    let ws = DeviceBuffer::zeroed(&stream, plan.max_workspace_bytes())?;
    let z_bytes = p.bytes(&d.z);
    for i in 0..plan.algo_count() {
        let z = match (spec.residual, in_place) {
            (false, _) => None,
            (true, false) => Some(dz.ptr()),
            (true, true) => Some(out.ptr()),
        };
        if in_place {
            htod(&stream, &z_bytes, out.ptr(), out.len())?;
        } else {
            poison(&stream, &out)?;
        }
        let args = ConvArgs { x: dx.ptr(), w: dw.ptr(), bias: db.ptr(), z, y: out.ptr() };
        let id = plan.algo_id(i).unwrap_or("?");
        match dnn.run(&plan, i, &args, ws.ptr(), ws.len()) {
            Ok(()) => {}
            // The fused call may refuse a heuristic candidate; candidate 0 must run.
            Err(CudaError::Dnn(e)) if i > 0 => {
                println!("{what} {p:?} algo {i} ({id}) refused by the fused call: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let got = download(&stream, &out, p)?;
        check(&got, &d.want, p.tol(), &format!("{what} {:?} algo {i} ({id})", p))?;
    }
    Ok(plan)
}

fn conv_spec(nchw: [usize; 4], k: usize, r: usize, pad: usize, stride: usize, p: Prec, layout: ConvLayout) -> ConvSpec {
    ConvSpec {
        pad_h: pad,
        pad_w: pad,
        stride_h: stride,
        stride_w: stride,
        ..ConvSpec::new(nchw, k, [r, r], layout, p.conv())
    }
}

/// The ResNet stem: 7×7, stride 2, pad 3, with the 3 input channels padded to 8
/// (zero weights; the padded input channels hold noise that must not matter).
#[test]
fn cudnn_stem_7x7_s2_padded_channels() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let dnn = Dnn::new(&dev.new_stream()?)?;
    let p = Prec::F16;
    let real = ConvSpec { act: ConvAct::Relu, ..conv_spec([2, 3, 32, 32], 64, 7, 3, 2, p, ConvLayout::Nhwc) };
    let mut d = conv_data(&real, p, 21, 1.0)?;
    let padded = ConvSpec { c: 8, ..real };
    let mut rng = fastrand::Rng::with_seed(22);
    let pixels = real.n * real.h * real.w;
    d.x = (0..pixels)
        .flat_map(|i| {
            let noise = random(&mut rng, 5, 1.0, p);
            d.x[i * 3..i * 3 + 3].iter().copied().chain(noise).collect::<Vec<_>>()
        })
        .collect();
    d.w = d.w.chunks_exact(3).flat_map(|c| c.iter().copied().chain([0.0; 5])).collect();
    let plan = conv_all(&dnn, &padded, &d, p, false, "stem 7x7/2 C 3→8 relu")?;
    println!("stem algorithms: {:?}", (0..plan.algo_count()).filter_map(|i| plan.algo_id(i)).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn cudnn_3x3_relu_nhwc_fp16_and_nchw_fp32() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let dnn = Dnn::new(&dev.new_stream()?)?;
    for (p, layout) in [(Prec::F16, ConvLayout::Nhwc), (Prec::F32, ConvLayout::Nchw)] {
        let spec = ConvSpec { act: ConvAct::Relu, ..conv_spec([2, 32, 14, 14], 64, 3, 1, 1, p, layout) };
        conv_all(&dnn, &spec, &conv_data(&spec, p, 31, 1.0)?, p, false, &format!("3x3 relu {layout:?}"))?;
    }
    Ok(())
}

/// ResNet's downsampling branch: 1×1, stride 2, no activation (identity, so
/// only IMPLICIT_PRECOMP_GEMM is a candidate).
#[test]
fn cudnn_strided_1x1_identity() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let dnn = Dnn::new(&dev.new_stream()?)?;
    let p = Prec::F16;
    let spec = conv_spec([2, 64, 14, 14], 128, 1, 0, 2, p, ConvLayout::Nhwc);
    let plan = conv_all(&dnn, &spec, &conv_data(&spec, p, 41, 1.0)?, p, false, "1x1/2 identity")?;
    assert_eq!(plan.algo_count(), 1);
    assert_eq!(plan.algo_id(0), Some("IMPLICIT_PRECOMP_GEMM"));
    Ok(())
}

/// MobileNet's depthwise 3×3 (groups = C) with ReLU6, stride 1 and 2; weights
/// scaled so that some outputs exceed 6.
#[test]
fn cudnn_depthwise_3x3_relu6() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let dnn = Dnn::new(&dev.new_stream()?)?;
    for p in [Prec::F16, Prec::F32] {
        for stride in [1, 2] {
            let spec = ConvSpec {
                groups: 32,
                act: ConvAct::ClippedRelu(6.0),
                ..conv_spec([2, 32, 16, 16], 32, 3, 1, stride, p, ConvLayout::Nhwc)
            };
            let d = conv_data(&spec, p, 51 + stride as u64, 9.0)?;
            assert!(d.want.contains(&6.0), "the data should reach the clip");
            conv_all(&dnn, &spec, &d, p, false, &format!("depthwise 3x3/{stride} relu6"))?;
        }
    }
    Ok(())
}

/// Identity + residual (z ≠ y), and ReLU + residual accumulated in place (z = y).
#[test]
fn cudnn_residual() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let dnn = Dnn::new(&dev.new_stream()?)?;
    let p = Prec::F16;
    let spec = ConvSpec { residual: true, ..conv_spec([2, 64, 8, 8], 64, 3, 1, 1, p, ConvLayout::Nhwc) };
    conv_all(&dnn, &spec, &conv_data(&spec, p, 61, 1.0)?, p, false, "3x3 identity + z")?;
    let spec = ConvSpec { act: ConvAct::Relu, ..spec };
    conv_all(&dnn, &spec, &conv_data(&spec, p, 62, 1.0)?, p, true, "3x3 relu + z in place")?;
    let spec = ConvSpec { r: 1, s: 1, pad_h: 0, pad_w: 0, k: 256, ..spec };
    conv_all(&dnn, &spec, &conv_data(&spec, p, 63, 1.0)?, p, false, "1x1 relu + z")?;
    Ok(())
}

#[test]
fn cudnn_run_rejects_bad_arguments() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let stream = dev.new_stream()?;
    let dnn = Dnn::new(&stream)?;
    let spec = ConvSpec { residual: true, ..conv_spec([1, 8, 8, 8], 8, 3, 1, 1, Prec::F16, ConvLayout::Nhwc) };
    let plan = dnn.plan(&spec)?;
    let buf = DeviceBuffer::zeroed(&stream, 1 << 16)?;
    let ws = DeviceBuffer::zeroed(&stream, plan.max_workspace_bytes())?;
    let p: DevPtr = buf.ptr();
    let good = ConvArgs { x: p, w: p + 4096, bias: p + 8192, z: Some(p + 12288), y: p + 16384 };
    dnn.run(&plan, 0, &good, ws.ptr(), ws.len())?;
    let rejected = |args: ConvArgs, algo: usize| {
        matches!(dnn.run(&plan, algo, &args, ws.ptr(), ws.len()), Err(CudaError::InvalidArgument(_)))
    };
    assert!(rejected(good, plan.algo_count()), "algorithm index out of range");
    assert!(rejected(ConvArgs { z: None, ..good }, 0), "missing residual");
    assert!(rejected(ConvArgs { bias: 0, ..good }, 0), "null bias");
    assert!(rejected(ConvArgs { y: p + 1, ..good }, 0), "misaligned y");
    if plan.workspace_bytes(0).unwrap_or(0) > 0 {
        assert!(matches!(dnn.run(&plan, 0, &good, ws.ptr(), 0), Err(CudaError::InvalidArgument(_))), "no workspace");
    }
    assert!(matches!(dnn.plan(&ConvSpec { groups: 3, ..spec }), Err(CudaError::InvalidArgument(_))));
    stream.synchronize()?;
    Ok(())
}
