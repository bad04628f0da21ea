use super::*;
use crate::blas::{Epilogue, GemmArgs, GemmElem, GemmSpec};
use crate::dnn::{ConvAct, ConvArgs, ConvElem, ConvLayout, ConvSpec};
use crate::kernels::row_major_strides;

const BASES: Bases = Bases { weights: 0x1_0000_0000, arena: 0x8_0000_0000 };

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5).collect()
}

/// Weights holding `w` as F32 at offset 0, an arena of `arena` bytes.
fn memory(w: &[f32], arena: usize) -> SimMemory {
    let mut bytes = vec![0u8; w.len() * 4];
    encode(w, Elem::F32, &mut bytes);
    SimMemory::new(bytes, arena, 0xff, BASES)
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

#[test]
fn accesses_outside_the_buffers_are_refused() {
    let mut mem = memory(&[1.0; 4], 64);
    assert_eq!(mem.translate(BASES.arena + 60, 4).ok(), Some((Region::Arena, 60)));
    assert_eq!(mem.translate(BASES.weights, 16).ok(), Some((Region::Weights, 0)));
    assert!(mem.translate(BASES.arena + 61, 4).is_err());
    assert!(mem.translate(BASES.weights + 4, 16).is_err());
    assert!(mem.translate(BASES.arena - 4, 4).is_err());
    assert!(mem.bytes_mut(BASES.weights, 4).is_err(), "weights are read-only");
    let steps = [Step { node: "n".into(), kind: StepKind::Zero { ptr: BASES.arena + 32, bytes: 64 } }];
    let err = run(&steps, &mut mem).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("step 0 (Zero of n)"), "{err}");
}

#[test]
fn gemm_matches_row_major_products() -> Result<(), CudaError> {
    // Y[5,3] = relu(X[5,4]·Wᵀ + b + Z) with W stored [3,4] (a 1×1 convolution's OHWI weights).
    let (m, k, n) = (5, 4, 3);
    let (w, bias) = (values(n * k, 1), values(n, 2));
    let (x, z) = (values(m * k, 3), values(m * n, 4));
    let mut weights = w.clone();
    weights.extend(&bias);
    let mut mem = memory(&weights, 256);
    let (xp, zp, yp) = (BASES.arena, BASES.arena + 128, BASES.arena + 192);
    mem.write(xp, Elem::F32, &x)?;
    mem.write(zp, Elem::F32, &z)?;
    let spec = GemmSpec::row_major(m as u64, k as u64, n as u64, true, GemmElem::F32)
        .with_bias()
        .with_residual()
        .with_epilogue(Epilogue::Relu);
    let args = GemmArgs { a: BASES.weights, b: xp, c: Some(zp), d: yp, bias: Some(BASES.weights + 48) };
    run_step(&StepKind::Gemm { spec, args }, &mut mem)?;
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let dot: f32 = (0..k).map(|t| x[r * k + t] * w[c * k + t]).sum();
            (dot + bias[c] + z[i]).max(0.0)
        })
        .collect();
    close(&mem.read(yp, Elem::F32, m * n)?, &want);
    // Two batched products P[2,3]·V[3,2] into one output.
    let spec = GemmSpec::row_major_batched(2, 2, 3, 2, false, GemmElem::F32);
    let (pv, vv) = (values(12, 5), values(12, 6));
    mem.write(xp, Elem::F32, &pv)?;
    mem.write(zp, Elem::F32, &vv)?;
    run_step(&StepKind::Gemm { spec, args: GemmArgs { a: zp, b: xp, c: None, d: yp, bias: None } }, &mut mem)?;
    let want: Vec<f32> = (0..8)
        .map(|i| {
            let (bt, r, c) = (i / 4, (i / 2) % 2, i % 2);
            (0..3).map(|t| pv[bt * 6 + r * 3 + t] * vv[bt * 6 + t * 2 + c]).sum()
        })
        .collect();
    close(&mem.read(yp, Elem::F32, 8)?, &want);
    Ok(())
}

/// Direct convolution on logical NCHW / OIHW arrays.
fn naive_conv(spec: &ConvSpec, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (p, q) = spec.output_hw().unwrap_or((0, 0));
    let (cg, kg) = (spec.c / spec.groups, spec.k / spec.groups);
    let mut y = Vec::new();
    for n in 0..spec.n {
        for k in 0..spec.k {
            for oy in 0..p {
                for ox in 0..q {
                    let mut acc = b[k];
                    for c in 0..cg {
                        for r in 0..spec.r {
                            for s in 0..spec.s {
                                let iy = (oy * spec.stride_h + r * spec.dil_h) as i64 - spec.pad_h as i64;
                                let ix = (ox * spec.stride_w + s * spec.dil_w) as i64 - spec.pad_w as i64;
                                if iy < 0 || ix < 0 || iy >= spec.h as i64 || ix >= spec.w as i64 {
                                    continue;
                                }
                                let ch = (k / kg) * cg + c;
                                let xv = x[((n * spec.c + ch) * spec.h + iy as usize) * spec.w + ix as usize];
                                acc += xv * w[((k * cg + c) * spec.r + r) * spec.s + s];
                            }
                        }
                    }
                    y.push(acc.max(0.0));
                }
            }
        }
    }
    y
}

/// `v` (logical dims, row-major) permuted by `perm`.
fn permute(v: &[f32], dims: &[usize], perm: &[usize]) -> Vec<f32> {
    let own = row_major_strides(dims);
    let out: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let mut res = Vec::with_capacity(v.len());
    for i in 0..v.len() {
        let (mut rem, mut at) = (i, 0i64);
        for (d, &n) in out.iter().enumerate().rev() {
            at += (rem % n) as i64 * own[perm[d]];
            rem /= n;
        }
        res.push(v[at as usize]);
    }
    res
}

#[test]
fn convolutions_match_a_direct_loop_in_both_layouts() -> Result<(), CudaError> {
    let mut grouped = ConvSpec::new([2, 4, 7, 6], 6, [3, 3], ConvLayout::Nchw, ConvElem::F32);
    (grouped.pad_h, grouped.pad_w, grouped.stride_h, grouped.dil_w, grouped.groups) = (1, 2, 2, 2, 2);
    // Depthwise (one filter per channel) has its own path in NHWC.
    let mut depthwise = ConvSpec::new([2, 5, 6, 7], 5, [3, 3], ConvLayout::Nchw, ConvElem::F32);
    (depthwise.pad_h, depthwise.pad_w, depthwise.stride_w, depthwise.groups) = (1, 1, 2, 5);
    for spec in [grouped, depthwise] {
        let spec = ConvSpec { act: ConvAct::Relu, ..spec };
        let [xl, wl, yl] = spec.lens()?;
        let (x, w, b) = (values(xl, 7), values(wl, 8), values(spec.k, 9));
        let want = naive_conv(&spec, &x, &w, &b);
        let (p, q) = spec.output_hw()?;
        for layout in [ConvLayout::Nchw, ConvLayout::Nhwc] {
            let nhwc = layout == ConvLayout::Nhwc;
            let reorder = |v: &[f32], d: [usize; 4]| if nhwc { permute(v, &d, &[0, 2, 3, 1]) } else { v.to_vec() };
            let mut weights = reorder(&w, [spec.k, spec.c / spec.groups, spec.r, spec.s]);
            weights.extend(&b);
            let mut mem = memory(&weights, 4096);
            mem.write(BASES.arena, Elem::F32, &reorder(&x, [spec.n, spec.c, spec.h, spec.w]))?;
            let args = ConvArgs {
                x: BASES.arena,
                w: BASES.weights,
                bias: BASES.weights + 4 * wl as u64,
                z: None,
                y: BASES.arena + 2048,
            };
            run_step(&StepKind::Conv { spec: ConvSpec { layout, ..spec }, args }, &mut mem)?;
            close(&mem.read(args.y, Elem::F32, yl)?, &reorder(&want, [spec.n, spec.k, p, q]));
        }
    }
    Ok(())
}

#[test]
fn copies_transpose_and_reject_overruns() -> Result<(), CudaError> {
    let mut mem = memory(&values(24, 10), 256);
    let own = row_major_strides(&[2, 3, 4]);
    let copy = CopyArgs::contiguous(BASES.arena, BASES.weights, 4, &[4, 2, 3], &[own[2], own[0], own[1]]);
    run_step(&StepKind::Copy(copy.clone()), &mut mem)?;
    close(&mem.read(BASES.arena, Elem::F32, 24)?, &permute(&values(24, 10), &[2, 3, 4], &[2, 0, 1]));
    let over = CopyArgs { shape: vec![5, 2, 3], ..copy.clone() };
    assert!(run_step(&StepKind::Copy(over), &mut mem).is_err(), "reads past the weights");
    // The kernels take their pointers __restrict__: a copy onto its own source is a lowering bug.
    let onto = CopyArgs { src: BASES.arena + 16, ..copy };
    let err = run_step(&StepKind::Copy(onto), &mut mem).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("overlaps the output"), "{err}");
    Ok(())
}
