//! INT8 quantisation and the requantising epilogue against their CPU references (the
//! engine's INT8 emulation), bit for bit: the kernels avoid FMA contraction and use the
//! same roundings, so nothing is left to a tolerance.

use kiln_cuda::kernels::{Elem, Int8Act, Int8Out, QuantizeArgs, RequantArgs, quantize_reference, requant_reference};

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
    for elem in [Elem::F32, Elem::F16] {
        let input = stored(&x, elem);
        let src = g.upload(&input, elem)?;
        let dst = g.zeros(input.len(), Elem::U8)?;
        g.k.quantize(
            &g.stream,
            &QuantizeArgs { src: src.ptr(), src_elem: elem, dst: dst.ptr(), n: input.len(), scale: 0.5 },
        )?;
        let got: Vec<f32> =
            g.download(&dst, input.len(), Elem::U8)?.into_iter().map(|v| (v as u8 as i8) as f32).collect();
        let want: Vec<f32> = quantize_reference(&input, 0.5).into_iter().map(f32::from).collect();
        same_bits(&got, &want, &format!("quantize {elem:?}"));
    }
    Ok(())
}

#[test]
fn requant_matches_the_engine_epilogue() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(31);
    // ResNet-50's last 1×1 layer at batch 8: 7·7·8 rows × 2048 channels, channels last;
    // and an NCHW map (inner = H·W).
    for (rows, channels, inner) in [(392usize, 2048usize, 1usize), (64, 32, 49)] {
        let n = rows * channels;
        let acc: Vec<i32> = (0..n).map(|_| rng.i32(-3_000_000..3_000_000)).collect();
        let alpha: Vec<f32> = (0..channels).map(|_| rng.f32() * 1e-5 + 1e-7).collect();
        let bias = random(&mut rng, channels, 1.0);
        let residual = stored(&random(&mut rng, n, 4.0), Elem::F16);
        let acc_buf = g.upload_raw(&acc.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
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
                Int8Out::I8 { .. } => Elem::U8,
            };
            let out = g.zeros(n, out_elem)?;
            let args = RequantArgs {
                acc: acc_buf.ptr(),
                out: out.ptr(),
                out_kind,
                alpha: alpha_buf.ptr(),
                bias: Some(bias_buf.ptr()),
                residual: with_residual.then(|| (res_buf.ptr(), Elem::F16)),
                n,
                channels,
                inner,
                act,
            };
            g.k.requant(&g.stream, &args)?;
            let mut got = g.download(&out, n, out_elem)?;
            if out_elem == Elem::U8 {
                got = got.into_iter().map(|v| (v as u8 as i8) as f32).collect();
            }
            let z = with_residual.then_some(residual.as_slice());
            let want = requant_reference(&acc, &alpha, Some(&bias), z, inner, act, out_kind);
            same_bits(&got, &want, &format!("requant {out_kind:?} {act:?} inner {inner}"));
        }
    }
    Ok(())
}
