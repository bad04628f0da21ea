//! INT8 quantisation and the requantising epilogue against their CPU references (the
//! engine's INT8 emulation), bit for bit: the kernels avoid FMA contraction and use the
//! same roundings, so nothing is left to a tolerance.

use kiln_cuda::kernels::{
    AccLayout, DwConvI8Args, Elem, Int8Act, Int8Out, QuantizeArgs, RequantArgs, quantize_reference,
    requant_copy_reference, requant_reference,
};

use super::{Gpu, TestResult, random, stored};

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan())).count();
    assert_eq!(bad, 0, "{what}: {bad} of {} elements differ", got.len());
}

#[test]
fn quantize_matches_quantize_linear() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(30);
    let mut x = random(&mut rng, 100_000, 40.0);
    // Ties, saturation and NaN.
    x.extend([0.25, -0.25, 0.75, 1e9, -1e9, f32::NAN, 0.0, -0.0]);
    x.truncate(x.len() / 3 * 3);
    // Plain, and rows of 3 channels widened to 4 (an RGB stem for cuDNN's INT8 convolution).
    for (elem, channels, padded) in [(Elem::F32, 1, 1), (Elem::F16, 1, 1), (Elem::F16, 3, 4)] {
        let input = stored(&x, elem);
        let src = g.upload(&input, elem)?;
        let n = input.len() / channels * padded;
        let dst = g.zeros(n, Elem::I8)?;
        let args = QuantizeArgs { src: src.ptr(), src_elem: elem, dst: dst.ptr(), n, scale: 0.5, channels, padded };
        g.k.quantize(&g.stream, &args)?;
        let got = g.download(&dst, n, Elem::I8)?;
        let want: Vec<f32> = quantize_reference(&input, 0.5, channels, padded).into_iter().map(f32::from).collect();
        same_bits(&got, &want, &format!("quantize {elem:?} {channels}→{padded}"));
    }
    Ok(())
}

#[test]
fn requant_matches_the_engine_epilogue() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(31);
    // ResNet-50's last 1×1 layer at batch 8: 7·7·8 rows × 2048 channels, channels last;
    // rows padded to a multiple of 4 accumulators (FP32, as cuDNN writes them); an NCHW map
    // (inner = H·W).
    for (rows, channels, ld, inner, acc_elem) in
        [(392usize, 2048usize, 2048usize, 1usize, Elem::I32), (50, 10, 12, 1, Elem::F32), (64, 32, 32, 49, Elem::I32)]
    {
        let n = rows * channels;
        let acc_i: Vec<i32> = (0..rows * ld).map(|_| rng.i32(-30_000_000..30_000_000)).collect();
        let acc: Vec<f32> = acc_i.iter().map(|&v| v as f32).collect();
        let raw: Vec<u8> = match acc_elem {
            Elem::F32 => acc.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => acc_i.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let alpha: Vec<f32> = (0..channels).map(|_| rng.f32() * 1e-5 + 1e-7).collect();
        let bias = random(&mut rng, channels, 1.0);
        let residual = stored(&random(&mut rng, n, 4.0), Elem::F16);
        let acc_buf = g.upload_raw(&raw)?;
        let alpha_buf = g.upload(&alpha, Elem::F32)?;
        let bias_buf = g.upload(&bias, Elem::F32)?;
        let res_buf = g.upload(&residual, Elem::F16)?;
        let cases = [
            (Int8Out::F32, Int8Act::None, false),
            (Int8Out::F16, Int8Act::Relu, true),
            (Int8Out::I8 { scale: 0.05, via_f16: false }, Int8Act::Clip { lo: 0.0, hi: 6.0 }, true),
            (Int8Out::I8 { scale: 0.05, via_f16: true }, Int8Act::Relu, false),
        ];
        for (out_kind, act, with_residual) in cases {
            let out_elem = match out_kind {
                Int8Out::F32 => Elem::F32,
                Int8Out::F16 => Elem::F16,
                Int8Out::I8 { .. } => Elem::I8,
            };
            let out = g.zeros(n, out_elem)?;
            // FP16/FP32 outputs also write their INT8 copy (the readers in INT8), rounded to
            // FP16 first exactly when the output is FP16.
            let copy = g.zeros(n, Elem::I8)?;
            let also = (out_elem != Elem::I8).then(|| (copy.ptr(), 0.04f32, out_elem == Elem::F16));
            let args = RequantArgs {
                acc: acc_buf.ptr(),
                acc_elem,
                acc_ld: ld,
                out: out.ptr(),
                out_kind,
                alpha: alpha_buf.ptr(),
                bias: Some(bias_buf.ptr()),
                residual: with_residual.then(|| (res_buf.ptr(), Elem::F16)),
                n,
                channels,
                inner,
                act,
                also_i8: also,
            };
            g.k.requant(&g.stream, &args)?;
            let got = g.download(&out, n, out_elem)?;
            let z = with_residual.then_some(residual.as_slice());
            let layout = AccLayout { inner, ld };
            let want = requant_reference(&acc, layout, &alpha, Some(&bias), z, (act, out_kind), n);
            same_bits(&got, &want, &format!("requant {out_kind:?} {act:?} inner {inner} ld {ld} {acc_elem:?}"));
            if let Some((_, scale, via_f16)) = also {
                let y32 = requant_reference(&acc, layout, &alpha, Some(&bias), z, (act, Int8Out::F32), n);
                let want: Vec<f32> = requant_copy_reference(&y32, scale, via_f16).into_iter().map(f32::from).collect();
                same_bits(&g.download(&copy, n, Elem::I8)?, &want, &format!("requant INT8 copy of {out_kind:?}"));
            }
        }
    }
    Ok(())
}

#[test]
fn depthwise_int8_convolution_sums_exactly() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(32);
    // EfficientNet's 5×5 stride-2 depthwise layer, and a 3×3 dilated one.
    for (c, h, k, stride, pad, dil) in [(240usize, 28usize, 5usize, 2usize, 2usize, 1usize), (32, 9, 3, 1, 2, 2)] {
        let out = (h + 2 * pad - dil * (k - 1) - 1) / stride + 1;
        let args = DwConvI8Args {
            x: 0,
            w: 0,
            y: 0,
            n: 3,
            c,
            h,
            w_in: h,
            out: [out, out],
            kernel: [k, k],
            strides: [stride; 2],
            pads: [pad; 2],
            dilations: [dil; 2],
        };
        let [xl, yl] = args.lens();
        let x: Vec<i8> = (0..xl).map(|_| rng.i8(..)).collect();
        let w: Vec<i8> = (0..c * k * k).map(|_| rng.i8(-127..=127)).collect();
        let bytes = |v: &[i8]| v.iter().map(|&b| b as u8).collect::<Vec<u8>>();
        let (xb, wb, yb) = (g.upload_raw(&bytes(&x))?, g.upload_raw(&bytes(&w))?, g.zeros(yl, Elem::I32)?);
        g.k.dwconv_i8(&g.stream, &DwConvI8Args { x: xb.ptr(), w: wb.ptr(), y: yb.ptr(), ..args.clone() })?;
        let got = g.download(&yb, yl, Elem::I32)?;
        let want: Vec<f32> = args.reference(&x, &w).into_iter().map(|v| v as f32).collect();
        same_bits(&got, &want, &format!("depthwise INT8 {c}×{h}² k{k} s{stride} d{dil}"));
    }
    Ok(())
}
