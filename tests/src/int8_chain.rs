//! A small model whose every computing layer runs in INT8 once calibrated, covering each
//! INT8 form and padding of the CUDA engine: a 3-channel 3×3 stride-2 TF-SAME stem with
//! ReLU6 (channels padded 3→4, asymmetric padding materialised, cuDNN), a 1×1 convolution
//! (GEMM), a stride-2 TF-SAME depthwise convolution, a 1×1 convolution to 6 channels with a
//! sigmoid (padded output channels, activation after requantisation), one with a residual,
//! and a dense head on the flattened map. Only INT8 layers and data movement compute, so the
//! engine must equal the reference executor's INT8 emulation exactly.

use kiln_onnx::{DataType, Dim, GraphBuilder, ModelProto, attr_int, attr_ints};

/// The committed copy (relative to the workspace root) that scripts/gpu-stage carries to the
/// GPU machine, where there is no toolchain to generate it.
pub const FIXTURE: &str = "tests/fixtures/int8-chain.onnx";

/// The chain for `[batch, 3, 15, 15]` inputs named `input`; the output is `logits` `[batch, 10]`.
pub fn model() -> anyhow::Result<ModelProto> {
    let mut b = GraphBuilder::new("int8-chain");
    let batch = Dim::Symbolic("batch".into());
    b.add_input("input", DataType::Float, &[batch.clone(), Dim::Fixed(3), Dim::Fixed(15), Dim::Fixed(15)])?;
    let mut rng = fastrand::Rng::with_seed(11);
    let mut conv = |b: &mut GraphBuilder, x: &str, (cin, cout): (usize, usize), k: usize, stride: i64, group: usize| {
        let n = b.unique_name("w");
        let fan = (cin / group * k * k) as f32;
        let w: Vec<f32> = (0..cout * cin / group * k * k).map(|_| (rng.f32() - 0.5) * 3.0 / fan.sqrt()).collect();
        let w = b.add_initializer_f32(&n, &[cout as i64, (cin / group) as i64, k as i64, k as i64], &w)?;
        let n = b.unique_name("b");
        let bias: Vec<f32> = (0..cout).map(|_| rng.f32() - 0.5).collect();
        let bias = b.add_initializer_f32(&n, &[cout as i64], &bias)?;
        // TF "SAME" for stride 2 on an odd size: the extra pixel bottom/right.
        let pads = if stride == 2 { [0, 0, 1, 1] } else { [0; 4] };
        b.add_node(
            "Conv",
            &[x, &w, &bias],
            vec![
                attr_ints("kernel_shape", &[k as i64, k as i64]),
                attr_ints("strides", &[stride, stride]),
                attr_ints("pads", &pads),
                attr_int("group", group as i64),
            ],
        )
    };
    let lo = b.add_initializer_f32("zero", &[], &[0.0])?;
    let hi = b.add_initializer_f32("six", &[], &[6.0])?;
    let x = conv(&mut b, "input", (3, 8), 3, 2, 1)?;
    let x = b.add_node("Clip", &[&x, &lo, &hi], vec![])?;
    let x = conv(&mut b, &x, (8, 12), 1, 1, 1)?;
    let x = b.add_node("Relu", &[&x], vec![])?;
    let x = conv(&mut b, &x, (12, 12), 3, 2, 12)?;
    let x = b.add_node("Relu", &[&x], vec![])?;
    let x = conv(&mut b, &x, (12, 6), 1, 1, 1)?;
    let d = b.add_node("Sigmoid", &[&x], vec![])?;
    let e = conv(&mut b, &d, (6, 6), 1, 1, 1)?;
    let x = b.add_node("Add", &[&e, &d], vec![])?;
    let x = b.add_node("Flatten", &[&x], vec![attr_int("axis", 1)])?;
    // 15 → 7 → 3: a 3×3×6 map.
    let w: Vec<f32> = (0..10 * 54).map(|_| rng.f32() - 0.5).collect();
    let w = b.add_initializer_f32("fc.w", &[10, 54], &w)?;
    let bias = b.add_initializer_f32("fc.b", &[10], &[0.1; 10])?;
    b.add_node_with_outputs("Gemm", &[&x, &w, &bias], &["logits"], vec![attr_int("transB", 1)])?;
    b.add_output("logits", DataType::Float, &[batch, Dim::Fixed(10)])?;
    Ok(b.finish(kiln_onnx::DEFAULT_OPSET))
}
