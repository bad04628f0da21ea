// TEMPORARY (helper H1): checks the GPU tests' reference calls on the CPU. Deleted before hand-off.
#[path = "gpu"]
#[allow(dead_code)]
mod gpu {
    pub mod kernels;
}

use gpu::kernels::{f32_tensor, random, reference, stored};
use kiln_cuda::kernels::Elem;
use kiln_engine::graph::Attr;
use kiln_engine::ops::util::tensor_i64;

pub fn device() -> Option<kiln_cuda::device::Device> {
    None
}

#[test]
fn scratch_references() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = fastrand::Rng::with_seed(1);
    let x = random(&mut rng, 20, 300.0);
    for to in [10, 7, 6, 9, 1] {
        reference("Cast", &[("to", Attr::Int(to))], &[Some(&f32_tensor(&[20], &x)?)])?;
    }
    reference("Cast", &[("to", Attr::Int(6))], &[Some(&tensor_i64(vec![2], vec![1, 2])?)])?;
    let i = |v: Vec<i64>| tensor_i64(vec![v.len()], v);
    let t = f32_tensor(&[4, 10], &random(&mut rng, 40, 1.0))?;
    let (w, s) = reference(
        "Slice",
        &[],
        &[Some(&t), Some(&i(vec![1, 9])?), Some(&i(vec![4, 0])?), Some(&i(vec![0, 1])?), Some(&i(vec![1, -2])?)],
    )?;
    assert_eq!(s, vec![3, 5]);
    let tv = t.as_f32().ok_or("f32")?;
    assert_eq!(w[0], tv[19]);
    assert_eq!(w[1], tv[17]);
    assert_eq!(w[5], tv[29]);
    let (w, s) = reference("Expand", &[], &[Some(&f32_tensor(&[3, 1], &[7.0, -8.0, 9.0])?), Some(&i(vec![2, 3, 4])?)])?;
    assert_eq!(s, vec![2, 3, 4]);
    assert_eq!(w[4], -8.0);
    let (_, s) = reference(
        "Concat",
        &[("axis", Attr::Int(1))],
        &[Some(&f32_tensor(&[2, 3, 8], &[0.0; 48])?), Some(&f32_tensor(&[2, 5, 8], &[0.0; 80])?)],
    )?;
    assert_eq!(s, vec![2, 8, 8]);
    let (_, s) = reference(
        "Transpose",
        &[("perm", Attr::Ints(vec![0, 2, 3, 1]))],
        &[Some(&f32_tensor(&[2, 3, 4, 5], &[0.0; 120])?)],
    )?;
    assert_eq!(s, vec![2, 4, 5, 3]);
    let (_, s) = reference(
        "Gather",
        &[("axis", Attr::Int(0))],
        &[Some(&f32_tensor(&[10, 3], &[0.0; 30])?), Some(&tensor_i64(vec![2, 2], vec![-1, 2, 3, 0])?)],
    )?;
    assert_eq!(s, vec![2, 2, 3]);
    reference("Gelu", &[], &[Some(&f32_tensor(&[3], &[0.0; 3])?)])?;
    let (w, _) = reference(
        "Softmax",
        &[("axis", Attr::Int(-1))],
        &[Some(&f32_tensor(&[2, 2], &[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY])?)],
    )?;
    assert!(w[0].is_nan());
    assert_eq!(w[2], 1.0);
    let attrs = [("axis", Attr::Int(-1)), ("epsilon", Attr::Float(1e-12))];
    let v = f32_tensor(&[2, 4], &random(&mut rng, 8, 1.0))?;
    let gm = f32_tensor(&[4], &[1.0; 4])?;
    reference("LayerNormalization", &attrs, &[Some(&v), Some(&gm), None])?;
    reference("LayerNormalization", &attrs, &[Some(&v), Some(&gm), Some(&gm)])?;
    for op in ["ReduceMean", "ReduceSum"] {
        let (_, s) = reference(
            op,
            &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
            &[Some(&f32_tensor(&[4, 100, 7], &[0.0; 2800])?)],
        )?;
        assert_eq!(s, vec![4, 7]);
    }
    let ints = |v: &[i64]| Attr::Ints(v.to_vec());
    for (op, nhwc) in [("MaxPool", true), ("AveragePool", false)] {
        let attrs = [
            ("kernel_shape", ints(&[3, 2])),
            ("strides", ints(&[2, 3])),
            ("dilations", ints(&[1, 1])),
            ("pads", ints(&[1, 0, 1, 1])),
            ("ceil_mode", Attr::Int(1)),
            ("count_include_pad", Attr::Int(1)),
            ("layout", Attr::String(if nhwc { "NHWC" } else { "NCHW" }.into())),
        ];
        let shape: &[usize] = if nhwc { &[2, 7, 6, 3] } else { &[2, 3, 7, 6] };
        let (_, s) = reference(op, &attrs, &[Some(&f32_tensor(shape, &[0.0; 252])?)])?;
        println!("{op} {s:?}");
    }
    let (_, s) = reference(
        "GlobalAveragePool",
        &[("layout", Attr::String("NHWC".into()))],
        &[Some(&f32_tensor(&[2, 7, 7, 4], &[0.0; 392])?)],
    )?;
    assert_eq!(s, vec![2, 1, 1, 4]);
    let q = f32_tensor(&[2, 3, 5, 4], &random(&mut rng, 120, 1.0))?;
    let kt = f32_tensor(&[2, 3, 4, 6], &random(&mut rng, 144, 1.0))?;
    let vv = f32_tensor(&[2, 3, 6, 7], &random(&mut rng, 252, 1.0))?;
    let mut m = vec![0.0f32; 2 * 3 * 5 * 6];
    m[6..12].fill(f32::NEG_INFINITY);
    let mt = f32_tensor(&[2, 3, 5, 6], &m)?;
    let (w, s) = reference(
        "kiln.Attention",
        &[("scale", Attr::Float(0.5)), ("zero_masked_rows", Attr::Int(1))],
        &[Some(&q), Some(&kt), Some(&vv), Some(&mt)],
    )?;
    assert_eq!(s, vec![2, 3, 5, 7]);
    assert!(w[7..14].iter().all(|&x| x == 0.0));
    let (_, s) = reference("kiln.Attention", &[("scale", Attr::Float(0.5))], &[Some(&q), Some(&kt), Some(&vv)])?;
    assert_eq!(s, vec![2, 3, 5, 7]);
    let _ = stored(&[1.0], Elem::F16);
    Ok(())
}
