//! Max/average pooling and global average pooling against the engine's MaxPool, AveragePool and
//! GlobalAveragePool, in NHWC (kiln's FP16 layout) and NCHW.

use kiln_cuda::kernels::{Elem, GlobalPoolArgs, Layout, Pool2dArgs, PoolKind};
use kiln_engine::graph::Attr;

use super::{Gpu, TestResult, check, check_elem, f32_tensor, random, reference, stored};

/// One pooling case: NCHW dims `[n, c, h, w]`, kernel, strides, dilations, ONNX pads, ceil mode.
struct Case {
    dims: [usize; 4],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: [usize; 4],
    ceil: bool,
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

#[test]
fn pool2d_matches_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(20);
    let cases = [
        // ResNet-50's stem max pool: 3×3, stride 2, pad 1 on 112² × 64.
        Case {
            dims: [2, 64, 112, 112],
            kernel: [3, 3],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [1, 1, 1, 1],
            ceil: false,
        },
        // Asymmetric pads with ceil mode (a last window that overhangs), and dilation.
        Case { dims: [2, 3, 7, 6], kernel: [3, 2], strides: [2, 3], dilations: [1, 1], pads: [1, 0, 1, 1], ceil: true },
        Case {
            dims: [1, 5, 9, 8],
            kernel: [2, 2],
            strides: [1, 1],
            dilations: [2, 2],
            pads: [1, 1, 0, 0],
            ceil: false,
        },
        Case {
            dims: [3, 16, 14, 14],
            kernel: [2, 2],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [0, 0, 0, 0],
            ceil: false,
        },
    ];
    for case in &cases {
        let [n, c, h, w] = case.dims;
        for (kind, op, include_pad) in [
            (PoolKind::Max, "MaxPool", false),
            (PoolKind::Average, "AveragePool", false),
            (PoolKind::Average, "AveragePool", true),
        ] {
            for (layout, elem) in [(Layout::Nhwc, Elem::F16), (Layout::Nchw, Elem::F32)] {
                let shape = if layout == Layout::Nhwc { [n, h, w, c] } else { [n, c, h, w] };
                let x = stored(&random(&mut rng, n * c * h * w, 4.0), elem);
                let attrs = [
                    ("kernel_shape", ints(&case.kernel)),
                    ("strides", ints(&case.strides)),
                    ("dilations", ints(&case.dilations)),
                    ("pads", ints(&case.pads)),
                    ("ceil_mode", Attr::Int(i64::from(case.ceil))),
                    ("count_include_pad", Attr::Int(i64::from(include_pad))),
                    ("layout", Attr::String(if layout == Layout::Nhwc { "NHWC" } else { "NCHW" }.into())),
                ];
                let (want, out_shape) = reference(op, &attrs, &[Some(&f32_tensor(&shape, &x)?)])?;
                let out =
                    if layout == Layout::Nhwc { [out_shape[1], out_shape[2]] } else { [out_shape[2], out_shape[3]] };
                let xb = g.upload(&x, elem)?;
                let yb = g.zeros(want.len(), elem)?;
                let args = Pool2dArgs {
                    x: xb.ptr(),
                    y: yb.ptr(),
                    elem,
                    layout,
                    kind,
                    n,
                    c,
                    h,
                    w,
                    out,
                    kernel: case.kernel,
                    strides: case.strides,
                    dilations: case.dilations,
                    pads: case.pads,
                    count_include_pad: include_pad,
                };
                g.k.pool2d(&g.stream, &args)?;
                let got = g.download(&yb, want.len(), elem)?;
                let what =
                    format!("{op} {layout:?} {:?} k{:?} s{:?} pad {include_pad}", case.dims, case.kernel, case.strides);
                // Max is exact; averages are FP32 sums of the same taps in the same order.
                if kind == PoolKind::Max {
                    check(&got, &want, 0.0, 0.0, &what);
                } else {
                    check_elem(&got, &want, elem, &what);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn global_average_pool_matches_the_engine() -> TestResult {
    let Some(dev) = crate::device() else { return Ok(()) };
    let g = Gpu::new(&dev)?;
    let mut rng = fastrand::Rng::with_seed(21);
    // ResNet-50's head (7² × 2048) in both layouts, and a larger image with few channels.
    let cases = [
        (Layout::Nhwc, Elem::F16, [4, 2048, 7, 7]),
        (Layout::Nchw, Elem::F32, [4, 2048, 7, 7]),
        (Layout::Nhwc, Elem::F32, [2, 40, 56, 56]),
        (Layout::Nchw, Elem::F16, [3, 33, 28, 28]),
    ];
    for (layout, elem, [n, c, h, w]) in cases {
        let shape = if layout == Layout::Nhwc { [n, h, w, c] } else { [n, c, h, w] };
        let x = stored(&random(&mut rng, n * c * h * w, 3.0), elem);
        let attrs = [("layout", Attr::String(if layout == Layout::Nhwc { "NHWC" } else { "NCHW" }.into()))];
        let (want, _) = reference("GlobalAveragePool", &attrs, &[Some(&f32_tensor(&shape, &x)?)])?;
        let xb = g.upload(&x, elem)?;
        let yb = g.zeros(n * c, elem)?;
        let args = GlobalPoolArgs { x: xb.ptr(), y: yb.ptr(), elem, layout, n, c, spatial: h * w };
        g.k.global_avg_pool(&g.stream, &args)?;
        let got = g.download(&yb, n * c, elem)?;
        check_elem(&got, &want, elem, &format!("GlobalAveragePool {layout:?} {elem:?} [{n}, {c}, {h}, {w}]"));
    }
    Ok(())
}
