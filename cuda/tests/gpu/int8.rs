//! INT8 plans on the GPU against the reference executor's INT8 emulation (which the
//! accuracy gate measured). The all-INT8 chain (`tests/fixtures/int8-chain.onnx`) must be
//! almost entirely bit-identical: only its sigmoid (the elementwise kernel's `expf`, not
//! correctly rounded) can move a value by one FP16 step and so one INT8 code downstream.
//! EfficientNet-Lite0 and ResNet-50, whose FP16 pooling and averaging also round differently
//! on the GPU, are compared by row cosine and top-1. Every test prints the share of
//! bit-identical outputs.

use std::collections::HashMap;

use kiln_cuda::engine::{Engine, EngineOptions};
use kiln_engine::plan::Plan;
use kiln_engine::quant::{Calibrator, Int8Plan, Method};
use kiln_engine::reference::{RunOptions, run};

use super::engine::{Res, f32s, inputs, min_row_cosine, model, plan_of};

/// The FP16 plan of `file` with every INT8 candidate marked, calibrated (99.99th
/// percentile) on one random batch; `None` when the model is not staged.
fn int8_plan(file: &str) -> Result<Option<Plan>, Box<dyn std::error::Error>> {
    let Some(path) = model(file) else { return Ok(None) };
    let (_, mut plan) = plan_of(&path)?;
    let mut cal = Calibrator::new(&plan.graph);
    let binding = HashMap::from([("batch".to_string(), 4)]);
    cal.observe(&plan.graph, &inputs(&plan.graph, &binding, 1)?)?;
    let cache = cal.finish(&plan.graph);
    let marked = Int8Plan::new(&plan.graph, &cache.thresholds(Method::Percentile { percentile: 99.99 }), &[])?;
    assert!(!marked.nodes.is_empty(), "{file}: no INT8 layer");
    marked.apply(&mut plan.graph);
    println!("{file}: {} INT8 layers", marked.nodes.len());
    Ok(Some(plan))
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

/// `min_identical`: the share of outputs that must be bit-identical to the emulation.
fn against_emulation(file: &str, min_identical: f64) -> Res {
    let Some(_dev) = crate::device() else { return Ok(()) };
    let Some(plan) = int8_plan(file)? else { return Ok(()) };
    let engine = Engine::load(plan.clone(), &EngineOptions::default())?;
    let mut ctx = engine.context()?;
    for batch in [1usize, 8] {
        let binding = HashMap::from([("batch".to_string(), batch)]);
        let x = inputs(&plan.graph, &binding, 20 + batch as u64)?;
        let want = run(&plan.graph, &x, RunOptions { emulate_fp16: true })?;
        let got = ctx.run(&x)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.shape(), w.shape(), "{file} output {i} shape");
            let (gv, wv) = (f32s(g), f32s(w));
            let same = gv.iter().zip(&wv).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            let worst = gv.iter().zip(&wv).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let row = *g.shape().last().unwrap_or(&1);
            let cos = min_row_cosine(&gv, &wv, row);
            println!(
                "{file} batch {batch} output {i}: {same}/{} bit-identical to the emulation, max |Δ| {worst:.3e}, min row cosine {cos:.6}",
                gv.len()
            );
            let share = same as f64 / gv.len().max(1) as f64;
            assert!(share >= min_identical, "{file} batch {batch} output {i}: {share:.3} bit-identical");
            assert!(cos >= 0.999, "{file} batch {batch} output {i}: cosine {cos} < 0.999");
            let top1 = |v: &[f32]| v.chunks(row.max(1)).map(argmax).collect::<Vec<_>>();
            assert_eq!(top1(&gv), top1(&wv), "{file} batch {batch}: top-1 differs from the emulation");
        }
    }
    Ok(())
}

#[test]
fn int8_chain_is_bit_identical_to_the_emulation() -> Res {
    against_emulation("int8-chain.onnx", 0.9)
}

#[test]
fn efficientnet_lite0_int8_agrees_with_the_emulation() -> Res {
    against_emulation("efficientnet-lite0.onnx", 0.0)
}

#[test]
fn resnet50_int8_agrees_with_the_emulation() -> Res {
    against_emulation("resnet50.onnx", 0.0)
}
