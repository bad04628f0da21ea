//! Softmax, layer normalisation and reductions against the engine's Softmax,
//! Add + LayerNormalization and ReduceMean/ReduceSum (max/min against a direct loop: the engine
//! has no ReduceMax/Min).

use kiln_cuda::kernels::{Elem, LayerNormArgs, ReduceArgs, ReduceKind, SoftmaxArgs};
use kiln_engine::graph::Attr;

use super::{Gpu, TestResult, check, check_elem, f32_tensor, random, reference, stored};

#[test]
fn softmax_matches_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(10);
    // BERT's attention probabilities (B·H·S rows of 128) in both precisions, a vocabulary-sized
    // row count, and rows long enough for the block-per-row kernel (up to 32768).
    let cases = [
        (2 * 12 * 128, 128, Elem::F32, Elem::F32),
        (2 * 12 * 128, 128, Elem::F16, Elem::F16),
        (300, 1000, Elem::F16, Elem::F32),
        (7, 1025, Elem::F32, Elem::F32),
        (8, 3000, Elem::F32, Elem::F16),
        (4, 32768, Elem::F32, Elem::F32),
    ];
    for (rows, cols, x_elem, y_elem) in cases {
        let mut x = random(&mut rng, rows * cols, 8.0);
        // Masked entries, and one fully masked row (NaN, as the reference gives).
        for r in 0..rows {
            x[r * cols + (r * 7) % cols] = f32::NEG_INFINITY;
        }
        x[cols..2 * cols].fill(f32::NEG_INFINITY);
        let x = stored(&x, x_elem);
        let xb = g.upload(&x, x_elem)?;
        let yb = g.zeros(rows * cols, y_elem)?;
        let args = SoftmaxArgs { x: xb.ptr(), x_elem, y: yb.ptr(), y_elem, rows, cols };
        g.k.softmax(&g.stream, &args)?;
        let got = g.download(&yb, rows * cols, y_elem)?;
        let (want, _) = reference("Softmax", &[("axis", Attr::Int(-1))], &[Some(&f32_tensor(&[rows, cols], &x)?)])?;
        check_elem(&got, &want, y_elem, &format!("softmax [{rows}, {cols}] {x_elem:?} -> {y_elem:?}"));
    }
    Ok(())
}

#[test]
fn layernorm_with_residual_matches_add_then_layernorm() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(11);
    // (rows, cols, x/residual elem, y elem, gamma elem, residual?, beta?): MiniLM (384) and
    // BERT-base (768) hidden sizes.
    let cases = [
        (256, 384, Elem::F16, Elem::F16, Elem::F16, true, true),
        (128, 768, Elem::F32, Elem::F32, Elem::F32, true, false),
        (64, 768, Elem::F16, Elem::F32, Elem::F32, false, true),
        (3, 5000, Elem::F32, Elem::F16, Elem::F16, true, true),
    ];
    for (rows, cols, x_elem, y_elem, p_elem, with_res, with_beta) in cases {
        let n = rows * cols;
        // An offset mean, as hidden states have, so a one-pass variance would lose digits.
        let x = stored(&random(&mut rng, n, 2.0).iter().map(|v| v + 3.0).collect::<Vec<_>>(), x_elem);
        let r = stored(&random(&mut rng, n, 1.0), x_elem);
        let gamma = stored(&random(&mut rng, cols, 1.5), p_elem);
        let beta = random(&mut rng, cols, 0.5);
        let (xb, rb, gb, bb) =
            (g.upload(&x, x_elem)?, g.upload(&r, x_elem)?, g.upload(&gamma, p_elem)?, g.upload(&beta, Elem::F32)?);
        let (yb, sb) = (g.zeros(n, y_elem)?, g.zeros(n, x_elem)?);
        let args = LayerNormArgs {
            x: xb.ptr(),
            residual: with_res.then(|| rb.ptr()),
            sum_out: with_res.then(|| sb.ptr()),
            x_elem,
            gamma: gb.ptr(),
            gamma_elem: p_elem,
            beta: with_beta.then(|| bb.ptr()),
            beta_elem: Elem::F32,
            y: yb.ptr(),
            y_elem,
            rows,
            cols,
            eps: 1e-12,
        };
        g.k.layernorm(&g.stream, &args)?;
        let got = g.download(&yb, n, y_elem)?;
        // The residual sum as the unfused Add node stores it (in x's precision).
        let v = if with_res {
            let (sum, _) =
                reference("Add", &[], &[Some(&f32_tensor(&[rows, cols], &x)?), Some(&f32_tensor(&[rows, cols], &r)?)])?;
            let sum = stored(&sum, x_elem);
            check(&g.download(&sb, n, x_elem)?, &sum, 0.0, 0.0, "layernorm residual stream");
            sum
        } else {
            x.clone()
        };
        let (vt, gt, bt) = (f32_tensor(&[rows, cols], &v)?, f32_tensor(&[cols], &gamma)?, f32_tensor(&[cols], &beta)?);
        let attrs = [("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-12))];
        let (want, _) = reference("LayerNormalization", &attrs, &[Some(&vt), Some(&gt), with_beta.then_some(&bt)])?;
        let what = format!("layernorm [{rows}, {cols}] {x_elem:?} -> {y_elem:?}");
        match y_elem {
            Elem::F16 => check_elem(&got, &want, y_elem, &what),
            // FP32 statistics against the reference's f64 ones: ~1e-6 on unit-scale outputs.
            _ => check(&got, &want, 2e-5, 1e-5, &what),
        }
    }
    Ok(())
}

#[test]
fn reductions_match_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(12);
    // (shape, axis, kind, in, out): MiniLM's mean over the hidden axis (rows), a middle axis
    // (columns), and rows long enough for the block-per-row path.
    let cases = [
        (vec![256, 384], 1, ReduceKind::Mean, Elem::F32, Elem::F32),
        (vec![4, 100, 7], 1, ReduceKind::Sum, Elem::F16, Elem::F32),
        (vec![3, 10_000], 1, ReduceKind::Mean, Elem::F32, Elem::F16),
        (vec![2, 128, 384], 1, ReduceKind::Mean, Elem::F16, Elem::F16),
    ];
    for (shape, axis, kind, x_elem, y_elem) in cases {
        let (outer, len, inner) = split(&shape, axis);
        let x = stored(&random(&mut rng, outer * len * inner, 2.0), x_elem);
        let xb = g.upload(&x, x_elem)?;
        let yb = g.zeros(outer * inner, y_elem)?;
        let args = ReduceArgs { x: xb.ptr(), x_elem, y: yb.ptr(), y_elem, outer, len, inner, kind };
        g.k.reduce(&g.stream, &args)?;
        let got = g.download(&yb, outer * inner, y_elem)?;
        let op = if kind == ReduceKind::Mean { "ReduceMean" } else { "ReduceSum" };
        let attrs = [("axes", Attr::Ints(vec![axis as i64])), ("keepdims", Attr::Int(0))];
        let (want, _) = reference(op, &attrs, &[Some(&f32_tensor(&shape, &x)?)])?;
        let what = format!("{op} {shape:?} axis {axis} {x_elem:?} -> {y_elem:?}");
        match y_elem {
            Elem::F16 => check_elem(&got, &want, y_elem, &what),
            // FP32 sums in a different order than the reference's f64 ones.
            _ => check(&got, &want, 1e-5, 1e-5, &what),
        }
    }

    // Max and min, with a NaN in one row (it propagates), rows and columns.
    for (shape, axis) in [(vec![64, 300], 1), (vec![5, 40, 9], 1), (vec![2, 5000], 1)] {
        let (outer, len, inner) = split(&shape, axis);
        let mut x = random(&mut rng, outer * len * inner, 50.0);
        x[inner + 1] = f32::NAN;
        let xb = g.upload(&x, Elem::F32)?;
        for kind in [ReduceKind::Max, ReduceKind::Min] {
            let yb = g.zeros(outer * inner, Elem::F32)?;
            let args =
                ReduceArgs { x: xb.ptr(), x_elem: Elem::F32, y: yb.ptr(), y_elem: Elem::F32, outer, len, inner, kind };
            g.k.reduce(&g.stream, &args)?;
            let mut want = vec![0.0f32; outer * inner];
            for o in 0..outer {
                for k in 0..inner {
                    let col = (0..len).map(|j| x[(o * len + j) * inner + k]);
                    want[o * inner + k] =
                        col.fold(if kind == ReduceKind::Max { f32::NEG_INFINITY } else { f32::INFINITY }, |acc, v| {
                            if acc.is_nan() || v.is_nan() {
                                f32::NAN
                            } else if kind == ReduceKind::Max {
                                acc.max(v)
                            } else {
                                acc.min(v)
                            }
                        });
                }
            }
            check(&g.download(&yb, outer * inner, Elem::F32)?, &want, 0.0, 0.0, &format!("{kind:?} {shape:?}"));
        }
    }
    Ok(())
}

/// `[outer, len, inner]` of `shape` reduced over `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}
