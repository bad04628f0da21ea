//! Explicitly quantised (Q/DQ) ONNX models: a hand-built graph in the layout common
//! quantisation toolkits write — activations through QuantizeLinear → DequantizeLinear,
//! INT8 weights with per-channel scales behind a DequantizeLinear — imported by kiln,
//! whose builder turns the convolution into an INT8 layer with the model's own scales.
//! kiln's result (INT8 emulated as the GPU computes it) must equal ONNX Runtime's within
//! one quantisation step of the output.

use anyhow::{Context, ensure};
use kiln_engine::builder::{BuildOptions, build};
use kiln_engine::graph::Precision;
use kiln_engine::plan::Profile;
use kiln_engine::quant::{INPUT_SCALE, Int8Plan};
use kiln_engine::reference::{RunOptions, run};
use kiln_engine::verify::run_ort;
use kiln_engine::{OrtRuntime, Tensor, TensorData, import};
use kiln_onnx::{DataType, Dim, GraphBuilder, attr_int, attr_ints, tensor_f32, tensor_i8};
use kiln_tests::{TempDir, ort_library};

const S_IN: f32 = 0.05;
const S_OUT: f32 = 0.1;
const C: usize = 4;
const M: usize = 8;

/// x → Q/DQ(S_IN) → Conv(DQ(int8 w, per-channel), bias, pads 1) → Relu → Q/DQ(S_OUT) → y.
fn qdq_model() -> anyhow::Result<kiln_onnx::ModelProto> {
    let mut b = GraphBuilder::new("qdq_conv");
    let dims = [Dim::Symbolic("batch".into()), Dim::Fixed(C as i64), Dim::Fixed(6), Dim::Fixed(6)];
    b.add_input("x", DataType::Float, &dims)?;
    let s_in = b.add_initializer(tensor_f32("s_in", &[], &[S_IN])?)?;
    let s_out = b.add_initializer(tensor_f32("s_out", &[], &[S_OUT])?)?;
    let zero = b.add_initializer(tensor_i8("zero", &[], &[0])?)?;
    // Weights in [-127, 127] with every output channel reaching ±127 (symmetric max scales).
    let mut state = 7u32;
    let mut weights: Vec<i8> = (0..M * C * 9)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((state >> 16) % 255) as i32 - 127
        })
        .map(|v| v as i8)
        .collect();
    for k in 0..M {
        weights[k * C * 9] = if k % 2 == 0 { 127 } else { -127 };
    }
    let wq = b.add_initializer(tensor_i8("w_q", &[M as i64, C as i64, 3, 3], &weights)?)?;
    let scales: Vec<f32> = (0..M).map(|k| 0.002 + 0.001 * k as f32).collect();
    let ws = b.add_initializer(tensor_f32("w_scale", &[M as i64], &scales)?)?;
    let wz = b.add_initializer(tensor_i8("w_zero", &[M as i64], &[0; M])?)?;
    let bias: Vec<f32> = (0..M).map(|k| 0.1 * k as f32 - 0.3).collect();
    let bias = b.add_initializer(tensor_f32("bias", &[M as i64], &bias)?)?;
    let q = b.add_node("QuantizeLinear", &["x", &s_in, &zero], vec![])?;
    let dq = b.add_node("DequantizeLinear", &[&q, &s_in, &zero], vec![])?;
    let w = b.add_node("DequantizeLinear", &[&wq, &ws, &wz], vec![attr_int("axis", 0)])?;
    let conv = b.add_node("Conv", &[&dq, &w, &bias], vec![attr_ints("pads", &[1, 1, 1, 1])])?;
    let relu = b.add_node("Relu", &[&conv], vec![])?;
    let q2 = b.add_node("QuantizeLinear", &[&relu, &s_out, &zero], vec![])?;
    b.add_node_with_outputs("DequantizeLinear", &[&q2, &s_out, &zero], &["y"], vec![])?;
    b.add_output("y", DataType::Float, &[])?;
    Ok(b.finish(17))
}

#[test]
fn a_qdq_convolution_becomes_int8_and_matches_onnx_runtime() -> anyhow::Result<()> {
    let dir = TempDir::new("qdq")?;
    let path = dir.path("qdq.onnx");
    kiln_onnx::save(&qdq_model()?, &path)?;
    let original = import::import_file(&path)?;
    let runtime = OrtRuntime::load(&ort_library()?)?;
    let n = 3;
    let mut state = 11u32;
    let x: Vec<f32> = (0..n * C * 36)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((state >> 8) as f32 / (1u32 << 24) as f32) * 8.0 - 4.0
        })
        .collect();
    let inputs = vec![Tensor::new(vec![n, C, 6, 6], TensorData::F32(x))?];
    let ort = run_ort(&runtime, &path, &original, &inputs)?;
    let want = ort[0].as_f32().context("ORT output")?;

    for precision in [Precision::F32, Precision::F16] {
        let opts = BuildOptions {
            precision,
            profiles: vec![Profile { symbol: "batch".into(), min: 1, opt: 4, max: 8 }],
            ..BuildOptions::default()
        };
        let (plan, report) = build(original.clone(), &opts, |_, _, _| {})?;
        let int8 = Int8Plan::from_graph(&plan.graph);
        ensure!(int8.nodes.len() == 1, "{precision:?}: expected one INT8 convolution: {report}");
        let q = int8.nodes.values().next().context("node")?;
        ensure!(q.input_scale == S_IN, "the model's activation scale is kept: {}", q.input_scale);
        for (k, s) in q.weight_scales.iter().enumerate() {
            let want = 0.002 + 0.001 * k as f32;
            ensure!((s - want).abs() <= want * 1e-6, "channel {k}: weight scale {s}, the model says {want}");
        }
        let conv = plan.graph.nodes.iter().find(|n| n.attrs.get(INPUT_SCALE).is_some()).context("INT8 node")?;
        ensure!(conv.op == "kiln.FusedConv", "{}", conv.op);

        let ours = run(&plan.graph, &inputs, RunOptions { emulate_fp16: precision == Precision::F16 })?;
        let got = ours[0].as_f32().context("kiln output")?;
        ensure!(got.len() == want.len(), "{} vs {} outputs", got.len(), want.len());
        // An FP16 plan also rounds the dequantised output to half precision.
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rounding = if precision == Precision::F16 { largest / 1024.0 } else { 0.0 };
        let worst = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let same = got.iter().zip(want).filter(|(a, b)| (*a - *b).abs() <= rounding).count();
        let step = S_OUT * 1.0001 + rounding;
        ensure!(worst <= step, "{precision:?}: kiln vs ONNX Runtime differ by {worst} (step {S_OUT})");
        ensure!(same * 100 >= got.len() * 95, "{precision:?}: only {same} of {} outputs agree", got.len());
    }
    Ok(())
}

/// kiln's calibration exported as Q/DQ: ONNX Runtime running the exported model computes
/// what kiln's INT8 emulation computes, and kiln importing it recovers the same INT8 layers.
#[test]
fn kilns_calibration_exports_as_a_qdq_model_other_runtimes_run() -> anyhow::Result<()> {
    use kiln_engine::quant::export::qdq_model;
    use kiln_engine::quant::{Calibrator, Method};
    use kiln_tests::resnet::{Depth, resnet};
    let dir = TempDir::new("qdq-export")?;
    let original = resnet(Depth::R18, 10, 5)?;
    let path = dir.path("r18.onnx");
    kiln_onnx::save(&original, &path)?;
    let opts = BuildOptions {
        precision: Precision::F32,
        profiles: vec![Profile { symbol: "batch".into(), min: 1, opt: 2, max: 2 }],
        ..BuildOptions::default()
    };
    let (plan, _) = build(import::import_file(&path)?, &opts, |_, _, _| {})?;
    let input = |seed: u32| -> anyhow::Result<Vec<Tensor>> {
        let mut state = seed;
        let data = (0..2 * 3 * 224 * 224)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((state >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Ok(vec![Tensor::new(vec![2, 3, 224, 224], TensorData::F32(data))?])
    };
    let mut calibrator = Calibrator::new(&plan.graph);
    for seed in [1, 2] {
        calibrator.observe(&plan.graph, &input(seed)?)?;
    }
    let thresholds = calibrator.finish(&plan.graph).thresholds(Method::MinMax);
    let int8 = Int8Plan::new(&plan.graph, &thresholds, &[])?;
    ensure!(int8.nodes.len() == 21, "ResNet-18 has 20 convolutions and one dense layer: {}", int8.nodes.len());

    let (qdq, report) = qdq_model(&original, &int8)?;
    ensure!(report.quantized.len() == 21 && report.skipped.is_empty(), "{report:?}");
    let exported = dir.path("r18-qdq.onnx");
    kiln_onnx::save(&qdq, &exported)?;

    let x = input(3)?;
    let ours = int8.run(&plan.graph, &x, false)?;
    let runtime = OrtRuntime::load(&ort_library()?)?;
    let reimported = import::import_file(&exported)?;
    let theirs = run_ort(&runtime, &exported, &reimported, &x)?;
    let (a, b) = (ours[0].as_f32().context("kiln")?, theirs[0].as_f32().context("ORT")?);
    let range = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    ensure!(worst <= 0.02 * range, "kiln INT8 vs ONNX Runtime on the exported Q/DQ model: {worst} of {range}");
    let fp32 = run(&plan.graph, &x, RunOptions::default())?;
    let float_gap = fp32[0].as_f32().context("fp32")?.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    ensure!(worst < float_gap, "the exported model computes INT8, not FP32 ({worst} vs FP32 gap {float_gap})");

    // Back into kiln: the same layers become INT8 with the exported activation scales.
    let (rebuilt, _) = build(reimported, &opts, |_, _, _| {})?;
    let again = Int8Plan::from_graph(&rebuilt.graph);
    ensure!(again.nodes.len() == 21, "{} INT8 layers after re-import", again.nodes.len());
    for (name, q) in &int8.nodes {
        let r = again.nodes.get(name).with_context(|| format!("{name} lost its INT8 form"))?;
        ensure!(r.input_scale == q.input_scale, "{name}: {} vs {}", r.input_scale, q.input_scale);
    }
    Ok(())
}
