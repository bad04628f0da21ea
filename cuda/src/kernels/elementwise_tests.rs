//! CPU tests of the elementwise program: layout, builder validation, and `eval_cpu` against the
//! engine's reference ops (the oracle the GPU kernel is later checked against too).

use kiln_engine::graph::{Attr, Node};
use kiln_engine::ops::registry;
use kiln_engine::ops::util::{broadcast_dims, broadcast_strides, tensor_bool, tensor_f32};
use kiln_engine::{Tensor, TensorData};

use super::*;

const OUT: DevPtr = 0x10_000;

fn ptr_of(k: usize) -> DevPtr {
    0x1000 * (k as u64 + 1)
}

/// Element strides of an input of `shape` broadcast to `out`.
fn strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    broadcast_strides(shape, out).into_iter().map(|s| s as i64).collect()
}

/// The engine's op on `inputs`, its output as f32 (BOOL as 0/1).
fn engine(op: &str, attrs: &[(&str, Attr)], inputs: &[&Tensor]) -> Result<Vec<f32>, String> {
    let mut node = Node::new("n", op, (0..inputs.len()).map(Some).collect(), vec![inputs.len()]);
    for (name, value) in attrs {
        node = node.with_attr(name, value.clone());
    }
    let def = registry().get(op).ok_or(format!("no op {op}"))?;
    let out = def.eval(&node, &inputs.iter().map(|t| Some(*t)).collect::<Vec<_>>())?;
    Ok(match out[0].data() {
        TensorData::F32(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|&b| f32::from(u8::from(b))).collect(),
        other => return Err(format!("unexpected output {:?}", other.dtype())),
    })
}

fn values(rng: &mut fastrand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(ok, "{what}[{i}]: {g} vs {w}");
    }
}

/// One engine op against a one-op program with the same broadcasting.
fn check_op(op: EwOp, engine_op: &str, attrs: &[(&str, Attr)], shapes: &[&[usize]], scale: f32) {
    let mut rng = fastrand::Rng::with_seed(7);
    let out_shape = shapes
        .iter()
        .skip(1)
        .fold(shapes[0].to_vec(), |acc, s| broadcast_dims(&acc, s).unwrap_or_else(|e| panic!("{e}")));
    let data: Vec<Vec<f32>> = shapes.iter().map(|s| values(&mut rng, s.iter().product(), scale)).collect();
    let tensors: Vec<Tensor> = shapes
        .iter()
        .zip(&data)
        .map(|(s, d)| tensor_f32(s.to_vec(), d.clone()).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let want = engine(engine_op, attrs, &tensors.iter().collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
    let mut b = EwProgram::builder(&out_shape, OUT, Elem::F32);
    let regs: Vec<Reg> =
        shapes.iter().enumerate().map(|(k, s)| b.input(ptr_of(k), Elem::F32, &strides(s, &out_shape))).collect();
    let r = |i: usize| regs.get(i).copied().unwrap_or(0);
    b.op(op, r(0), r(1), r(2), 0.0, 0.0);
    let prog = b.finish().unwrap_or_else(|e| panic!("{op:?}: {e}"));
    let got = prog.eval_cpu(&data.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
    assert_close(&got, &want, 2e-6, engine_op);
}

#[test]
fn layout_matches_the_kernel() -> Result<(), CudaError> {
    let mut b = EwProgram::builder(&[2, 3], OUT, Elem::F16);
    let x = b.input(0x1234, Elem::F32, &[3, 1]);
    b.op(EwOp::Clip, x, 0, 0, 0.0, 6.0);
    let p = b.finish()?;
    let bytes = p.to_bytes();
    assert_eq!(bytes.len(), 712);
    let word = |off: usize| i32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]);
    let long = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap_or_default());
    assert_eq!(long(0), 6, "[2, 3] merges into one axis of 6");
    assert_eq!(long(48), 0x1234);
    assert_eq!(long(64), 1, "input 0 stride");
    assert_eq!(long(304), OUT);
    assert_eq!([word(312), word(316), word(320), word(324)], [1, 1, 1, 1]);
    assert_eq!(word(328), EwOp::Clip.code());
    assert_eq!(f32::from_le_bytes([bytes[348], bytes[349], bytes[350], bytes[351]]), 6.0);
    assert_eq!(p.len(), 6);
    Ok(())
}

#[test]
fn builder_rejects_bad_programs() {
    let base = || EwProgram::builder(&[4, 5], OUT, Elem::F32);
    let mut b = base();
    for k in 0..5 {
        b.input(ptr_of(k), Elem::F32, &[5, 1]);
    }
    assert!(b.finish().is_err(), "five inputs");
    let mut b = base();
    let x = b.input(ptr_of(0), Elem::F32, &[5, 1]);
    for _ in 0..17 {
        b.unary(EwOp::Relu, x);
    }
    assert!(b.finish().is_err(), "seventeen ops");
    let mut b = base();
    b.input(ptr_of(0), Elem::F32, &[5, 1]);
    b.binary(EwOp::Add, 0, 1);
    assert!(b.finish().is_err(), "r1 holds no input");
    let mut b = base();
    let x = b.input(ptr_of(0), Elem::F32, &[5, 1]);
    b.binary(EwOp::Add, x, 4);
    assert!(b.finish().is_err(), "an op reading its own result");
    let mut b = base();
    let x = b.input(ptr_of(0), Elem::F32, &[5, 1]);
    b.op(EwOp::Clip, x, 0, 0, 6.0, 0.0);
    assert!(b.finish().is_err(), "inverted clip");
    let mut b = base();
    b.input(ptr_of(0), Elem::F32, &[1]);
    assert!(b.finish().is_err(), "strides of the wrong rank");
    let mut b = base();
    b.input(0, Elem::F32, &[5, 1]);
    assert!(b.finish().is_err(), "null input");
    assert!(base().finish().is_err(), "nothing to compute");
    let mut b = EwProgram::builder(&[4, 5], 0, Elem::F32);
    b.input(ptr_of(0), Elem::F32, &[5, 1]);
    assert!(b.finish().is_err(), "null output");
    // Unused operands are ignored (and zeroed), whatever they say.
    let mut b = base();
    let x = b.input(ptr_of(0), Elem::F32, &[5, 1]);
    b.op(EwOp::Exp, x, 99, 99, 0.0, 0.0);
    assert!(b.finish().is_ok());
}

#[test]
fn axes_merge_before_the_rank_limit() -> Result<(), CudaError> {
    // Bias add over [2, 3, 4]: x contiguous, bias [4] → two axes of 6 and 4.
    let mut b = EwProgram::builder(&[2, 3, 4], OUT, Elem::F32);
    let x = b.input(ptr_of(0), Elem::F32, &[12, 4, 1]);
    let bias = b.input(ptr_of(1), Elem::F32, &[0, 0, 1]);
    b.binary(EwOp::Add, x, bias);
    assert_eq!(b.finish()?.merged_shape(), vec![6, 4]);
    // Rank 8 with only size-1 and contiguous axes is fine; 7 unmergeable axes are not.
    let shape = [1, 2, 1, 2, 2, 2, 2, 2];
    let mut b = EwProgram::builder(&shape, OUT, Elem::F32);
    b.input(ptr_of(0), Elem::F32, &[64, 32, 32, 16, 8, 4, 2, 1]);
    assert_eq!(b.finish()?.merged_shape(), vec![64]);
    let shape = [2usize; 7];
    let mut b = EwProgram::builder(&shape, OUT, Elem::F32);
    let spread: Vec<i64> = (0..7).map(|i| 1 << (2 * i)).collect();
    b.input(ptr_of(0), Elem::F32, &spread);
    assert!(b.finish().is_err());
    Ok(())
}

#[test]
fn eval_cpu_matches_engine_binary_ops() {
    let (a, b): (&[usize], &[usize]) = (&[2, 3, 4], &[3, 1]);
    check_op(EwOp::Add, "Add", &[], &[a, b], 3.0);
    check_op(EwOp::Sub, "Sub", &[], &[a, b], 3.0);
    check_op(EwOp::Mul, "Mul", &[], &[b, a], 3.0);
    check_op(EwOp::Div, "Div", &[], &[a, &[4]], 3.0);
    check_op(EwOp::Max, "Max", &[], &[a, b], 3.0);
    check_op(EwOp::Min, "Min", &[], &[a, b], 3.0);
    check_op(EwOp::Less, "Less", &[], &[a, b], 3.0);
    check_op(EwOp::Greater, "Greater", &[], &[a, b], 3.0);
    check_op(EwOp::GreaterOrEqual, "GreaterOrEqual", &[], &[a, b], 3.0);
}

#[test]
fn eval_cpu_matches_engine_unary_ops() {
    let s: &[usize] = &[5, 7];
    check_op(EwOp::Exp, "Exp", &[], &[s], 4.0);
    check_op(EwOp::Tanh, "Tanh", &[], &[s], 4.0);
    check_op(EwOp::Sigmoid, "Sigmoid", &[], &[s], 20.0);
    check_op(EwOp::Relu, "Relu", &[], &[s], 4.0);
    check_op(EwOp::Erf, "Erf", &[], &[s], 4.0);
    check_op(EwOp::Gelu, "Gelu", &[], &[s], 5.0);
    check_op(EwOp::GeluTanh, "Gelu", &[("approximate", Attr::String("tanh".into()))], &[s], 5.0);
    check_op(EwOp::Neg, "Neg", &[], &[s], 4.0);
    check_op(EwOp::Recip, "Reciprocal", &[], &[s], 4.0);
    check_op(EwOp::HardSwish, "HardSwish", &[], &[s], 6.0);
    check_op(EwOp::IsNan, "IsNaN", &[], &[s], 1.0);
}

#[test]
fn eval_cpu_matches_engine_ops_with_immediates() -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(11);
    let x = values(&mut rng, 24, 8.0);
    let t = tensor_f32(vec![4, 6], x.clone())?;
    let run = |op: EwOp, imm0: f32, imm1: f32| -> Result<Vec<f32>, CudaError> {
        let mut b = EwProgram::builder(&[4, 6], OUT, Elem::F32);
        let r = b.input(ptr_of(0), Elem::F32, &[6, 1]);
        b.op(op, r, 0, 0, imm0, imm1);
        b.finish()?.eval_cpu(&[&x])
    };
    let lo = tensor_f32(vec![], vec![0.0])?;
    let hi = tensor_f32(vec![], vec![6.0])?;
    let e = |s: CudaError| s.to_string();
    assert_close(&run(EwOp::Clip, 0.0, 6.0).map_err(e)?, &engine("Clip", &[], &[&t, &lo, &hi])?, 0.0, "Clip");
    let alpha = [("alpha", Attr::Float(0.1))];
    assert_close(&run(EwOp::LeakyRelu, 0.1, 0.0).map_err(e)?, &engine("LeakyRelu", &alpha, &[&t])?, 0.0, "Leaky");
    let hs = [("alpha", Attr::Float(0.25)), ("beta", Attr::Float(0.4))];
    assert_close(&run(EwOp::HardSigmoid, 0.25, 0.4).map_err(e)?, &engine("HardSigmoid", &hs, &[&t])?, 1e-7, "HS");
    let abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let sq = tensor_f32(vec![4, 6], abs.clone())?;
    let mut b = EwProgram::builder(&[4, 6], OUT, Elem::F32);
    let r = b.input(ptr_of(0), Elem::F32, &[6, 1]);
    b.unary(EwOp::Sqrt, r);
    assert_close(&b.finish().map_err(e)?.eval_cpu(&[&abs]).map_err(e)?, &engine("Sqrt", &[], &[&sq])?, 0.0, "Sqrt");
    let two = tensor_f32(vec![1], vec![2.0])?;
    let mut b = EwProgram::builder(&[4, 6], OUT, Elem::F32);
    let r = b.input(ptr_of(0), Elem::F32, &[6, 1]);
    let c = b.op(EwOp::Const, 0, 0, 0, 2.0, 0.0);
    b.binary(EwOp::Pow, r, c);
    assert_close(&b.finish().map_err(e)?.eval_cpu(&[&x]).map_err(e)?, &engine("Pow", &[], &[&t, &two])?, 0.0, "Pow");
    Ok(())
}

#[test]
fn where_and_fused_chain_match_the_engine() -> Result<(), String> {
    let e = |s: CudaError| s.to_string();
    let mut rng = fastrand::Rng::with_seed(3);
    // Where(cond [2, 1, 4] bool, x [2, 3, 4], y [4]).
    let cond: Vec<bool> = (0..8).map(|_| rng.bool()).collect();
    let (x, y) = (values(&mut rng, 24, 2.0), values(&mut rng, 4, 2.0));
    let want = engine(
        "Where",
        &[],
        &[
            &tensor_bool(vec![2, 1, 4], cond.clone())?,
            &tensor_f32(vec![2, 3, 4], x.clone())?,
            &tensor_f32(vec![4], y.clone())?,
        ],
    )?;
    let out = [2, 3, 4];
    let mut b = EwProgram::builder(&out, OUT, Elem::F32);
    let c = b.input(ptr_of(0), Elem::U8, &strides(&[2, 1, 4], &out));
    let xr = b.input(ptr_of(1), Elem::F32, &strides(&[2, 3, 4], &out));
    let yr = b.input(ptr_of(2), Elem::F32, &strides(&[4], &out));
    b.op(EwOp::Where, c, xr, yr, 0.0, 0.0);
    let cond_f: Vec<f32> = cond.iter().map(|&v| f32::from(u8::from(v))).collect();
    assert_close(&b.finish().map_err(e)?.eval_cpu(&[&cond_f, &x, &y]).map_err(e)?, &want, 0.0, "Where");

    // A fused bias + GELU + residual, against the three engine ops in turn, rounded to FP16.
    let (h, bias, res) = (values(&mut rng, 24, 3.0), values(&mut rng, 4, 1.0), values(&mut rng, 24, 1.0));
    let t = |s: Vec<usize>, v: &[f32]| tensor_f32(s, v.to_vec());
    let added = engine("Add", &[], &[&t(vec![2, 3, 4], &h)?, &t(vec![4], &bias)?])?;
    let act = engine("Gelu", &[], &[&t(vec![2, 3, 4], &added)?])?;
    let want: Vec<f32> = engine("Add", &[], &[&t(vec![2, 3, 4], &act)?, &t(vec![2, 3, 4], &res)?])?
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    let mut b = EwProgram::builder(&out, OUT, Elem::F16);
    let hr = b.input(ptr_of(0), Elem::F16, &strides(&[2, 3, 4], &out));
    let br = b.input(ptr_of(1), Elem::F32, &strides(&[4], &out));
    let rr = b.input(ptr_of(2), Elem::F16, &strides(&[2, 3, 4], &out));
    let s = b.binary(EwOp::Add, hr, br);
    let g = b.unary(EwOp::Gelu, s);
    b.binary(EwOp::Add, g, rr);
    let got = b.finish().map_err(e)?.eval_cpu(&[&h, &bias, &res]).map_err(e)?;
    // One FP16 ulp: f32 GELU may round across an FP16 boundary where the engine's f64 GELU does not.
    assert_close(&got, &want, 1e-3, "bias+gelu+residual");
    Ok(())
}

#[test]
fn output_conversions_and_plain_copies() -> Result<(), CudaError> {
    let x = [-2.7f32, -0.5, 0.4, 3.9, 300.2, f32::NAN];
    let copy = |elem: Elem| -> Result<Vec<f32>, CudaError> {
        let mut b = EwProgram::builder(&[6], OUT, elem);
        b.input(ptr_of(0), Elem::F32, &[1]);
        b.finish()?.eval_cpu(&[&x])
    };
    assert_eq!(copy(Elem::I64)?, vec![-2.0, 0.0, 0.0, 3.0, 300.0, 0.0]);
    assert_eq!(copy(Elem::U8)?, vec![254.0, 0.0, 0.0, 3.0, 44.0, 0.0]);
    assert_eq!(copy(Elem::F16)?[4], 300.25);
    // A broadcast copy of a [3] row into [2, 3].
    let mut b = EwProgram::builder(&[2, 3], OUT, Elem::F32);
    b.input(ptr_of(0), Elem::F32, &[0, 1]);
    assert_eq!(b.finish()?.eval_cpu(&[&[1.0, 2.0, 3.0]])?, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    // Too short an input is an error, not a panic.
    let mut b = EwProgram::builder(&[2, 3], OUT, Elem::F32);
    b.input(ptr_of(0), Elem::F32, &[3, 1]);
    assert!(b.finish()?.eval_cpu(&[&[1.0, 2.0]]).is_err());
    assert!(b.finish()?.eval_cpu(&[]).is_err());
    Ok(())
}

#[test]
fn launch_plan() -> Result<(), CudaError> {
    assert!(plan(0, 10).is_err());
    assert!(plan(0x1004, 10).is_err(), "misaligned program");
    assert!(plan(0x1000, 0)?.is_none());
    let l = plan(0x1000, 1 << 20)?.ok_or_else(|| invalid("expected a launch"))?;
    assert_eq!((l.dims.grid.0, l.dims.block.0), (4096, 256));
    Ok(())
}
