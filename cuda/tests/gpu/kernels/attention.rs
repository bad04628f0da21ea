//! Fused attention against the engine's `kiln.Attention` (Q·Kᵀ·scale + mask, softmax, ·V).

use kiln_cuda::kernels::{AttentionArgs, AttentionMask, Elem};
use kiln_engine::graph::Attr;

use super::{Gpu, TestResult, check, check_elem, f32_tensor, random, reference, stored};

/// One attention problem; `mask` is `(dims, elem)` of an additive mask broadcast to
/// `[B, H, S, Sk]` (its values are made up in `run_case`).
struct Case {
    b: usize,
    h: usize,
    s: usize,
    sk: usize,
    d: usize,
    dv: usize,
    elem: Elem,
    mask: Option<([usize; 4], Elem)>,
    zero_masked_rows: bool,
}

/// Element strides of a mask of `dims` broadcast to `[B, H, S, Sk]` (0 on size-1 axes).
fn mask_strides(dims: [usize; 4]) -> [i64; 4] {
    let mut strides = [0i64; 4];
    let mut s = 1i64;
    for a in (0..4).rev() {
        strides[a] = if dims[a] == 1 { 0 } else { s };
        s *= dims[a] as i64;
    }
    strides
}

fn run_case(g: &Gpu, c: &Case, rng: &mut fastrand::Rng) -> TestResult {
    let (b, h, s, sk, d, dv) = (c.b, c.h, c.s, c.sk, c.d, c.dv);
    let q = stored(&random(rng, b * h * s * d, 1.0), c.elem);
    let kt = stored(&random(rng, b * h * d * sk, 1.0), c.elem);
    let v = stored(&random(rng, b * h * sk * dv, 1.0), c.elem);
    let scale = 1.0 / (d as f32).sqrt();
    let (qb, kb, vb) = (g.upload(&q, c.elem)?, g.upload(&kt, c.elem)?, g.upload(&v, c.elem)?);
    let yb = g.zeros(b * h * s * dv, c.elem)?;
    let mut mask_values = None;
    let mut mask_buf = None;
    if let Some((dims, elem)) = c.mask {
        let n: usize = dims.iter().product();
        // HF-style padding (-10000) on the tail keys of every other batch item, -inf holes, and
        // query row 1 of each (b, h) slice fully masked when the mask has a query axis.
        let mut m = vec![0.0f32; n];
        for (i, x) in m.iter_mut().enumerate() {
            let key = i % dims[3];
            let row = (i / dims[3]) % dims[2];
            let batch = i / (dims[3] * dims[2] * dims[1]);
            if batch % 2 == 1 && key + 20 >= dims[3] {
                *x = -10000.0;
            } else if rng.u32(0..10) == 0 || (dims[2] > 1 && row == 1) {
                *x = f32::NEG_INFINITY;
            } else if dims[2] > 1 {
                *x = (rng.f32() - 0.5) * 2.0;
            }
        }
        let m = stored(&m, elem);
        mask_buf = Some(g.upload(&m, elem)?);
        mask_values = Some((m, dims));
    }
    let args = AttentionArgs {
        q: qb.ptr(),
        kt: kb.ptr(),
        v: vb.ptr(),
        mask: c.mask.zip(mask_buf.as_ref()).map(|((dims, elem), buf)| AttentionMask {
            ptr: buf.ptr(),
            elem,
            strides: mask_strides(dims),
        }),
        y: yb.ptr(),
        elem: c.elem,
        batch: b,
        heads: h,
        s,
        sk,
        d,
        dv,
        scale,
        zero_masked_rows: c.zero_masked_rows,
    };
    g.k.attention(&g.stream, &args)?;
    let got = g.download(&yb, b * h * s * dv, c.elem)?;

    let (qt, ktt, vt) =
        (f32_tensor(&[b, h, s, d], &q)?, f32_tensor(&[b, h, d, sk], &kt)?, f32_tensor(&[b, h, sk, dv], &v)?);
    let mt = match &mask_values {
        Some((m, dims)) => Some(f32_tensor(dims, m)?),
        None => None,
    };
    let attrs = [("scale", Attr::Float(scale)), ("zero_masked_rows", Attr::Int(i64::from(c.zero_masked_rows)))];
    let mut inputs = vec![Some(&qt), Some(&ktt), Some(&vt)];
    if let Some(m) = &mt {
        inputs.push(Some(m));
    }
    let (want, shape) = reference("kiln.Attention", &attrs, &inputs)?;
    assert_eq!(shape, vec![b, h, s, dv]);
    let what = format!(
        "attention B{b} H{h} S{s} Sk{sk} D{d} Dv{dv} {:?} mask {:?} zero_masked_rows {}",
        c.elem, c.mask, c.zero_masked_rows
    );
    match c.elem {
        Elem::F16 => check_elem(&got, &want, c.elem, &what),
        // Outputs are convex combinations of V (|v| ≤ 1): FP32 order differences stay ~1e-6.
        _ => check(&got, &want, 1e-5, 1e-5, &what),
    }
    Ok(())
}

#[test]
fn attention_matches_the_engine_at_bert_shapes() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(30);
    let cases = [
        // MiniLM/BERT: [B, 1, 1, Sk] padding mask, FP16 activations, FP32 mask.
        Case {
            b: 2,
            h: 12,
            s: 128,
            sk: 128,
            d: 64,
            dv: 64,
            elem: Elem::F16,
            mask: Some(([2, 1, 1, 128], Elem::F32)),
            zero_masked_rows: true,
        },
        Case {
            b: 2,
            h: 12,
            s: 128,
            sk: 128,
            d: 64,
            dv: 64,
            elem: Elem::F32,
            mask: Some(([2, 1, 1, 128], Elem::F16)),
            zero_masked_rows: false,
        },
        // Sequence 512.
        Case {
            b: 1,
            h: 12,
            s: 512,
            sk: 512,
            d: 64,
            dv: 64,
            elem: Elem::F16,
            mask: Some(([1, 1, 1, 512], Elem::F32)),
            zero_masked_rows: true,
        },
        Case { b: 1, h: 4, s: 512, sk: 512, d: 64, dv: 64, elem: Elem::F32, mask: None, zero_masked_rows: false },
    ];
    for c in &cases {
        run_case(&g, c, &mut rng)?;
    }
    Ok(())
}

#[test]
fn attention_odd_sizes_full_masks_and_masked_rows() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(31);
    let cases = [
        // Sizes that are not multiples of the 16-query and 32-key tiles, Dv ≠ D, a full
        // per-query mask whose row 1 is all -inf: NaN without the guard, zeros with it.
        Case {
            b: 2,
            h: 3,
            s: 37,
            sk: 45,
            d: 24,
            dv: 40,
            elem: Elem::F32,
            mask: Some(([2, 3, 37, 45], Elem::F16)),
            zero_masked_rows: false,
        },
        Case {
            b: 2,
            h: 3,
            s: 37,
            sk: 45,
            d: 24,
            dv: 40,
            elem: Elem::F32,
            mask: Some(([2, 3, 37, 45], Elem::F32)),
            zero_masked_rows: true,
        },
        Case {
            b: 2,
            h: 2,
            s: 5,
            sk: 70,
            d: 8,
            dv: 16,
            elem: Elem::F16,
            mask: Some(([2, 1, 5, 70], Elem::F16)),
            zero_masked_rows: true,
        },
        // The largest head size, a single query, and one key.
        Case { b: 1, h: 2, s: 20, sk: 300, d: 128, dv: 128, elem: Elem::F16, mask: None, zero_masked_rows: false },
        Case { b: 3, h: 1, s: 1, sk: 33, d: 100, dv: 1, elem: Elem::F32, mask: None, zero_masked_rows: false },
        Case { b: 1, h: 1, s: 9, sk: 1, d: 16, dv: 128, elem: Elem::F32, mask: None, zero_masked_rows: true },
    ];
    for c in &cases {
        run_case(&g, c, &mut rng)?;
    }
    Ok(())
}
