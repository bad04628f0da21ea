//! INT8 plans on the GPU against the reference executor's INT8 emulation (which the
//! accuracy gate measured): the all-INT8 chain (`tests/fixtures/int8-chain.onnx`) bit for
//! bit; EfficientNet-Lite0 and ResNet-50, whose FP16 pooling and averaging round
//! differently on the GPU (and may move an INT8 input by one quantisation step), by
//! row cosine, top-1, and the share of bit-identical outputs, which is printed.

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

fn against_emulation(file: &str, exact: bool) -> Res {
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
            if exact {
                assert_eq!(same, gv.len(), "{file} batch {batch} output {i}: not bit-identical to the emulation");
            } else {
                assert!(cos >= 0.999, "{file} batch {batch} output {i}: cosine {cos} < 0.999");
                let top1 = |v: &[f32]| v.chunks(row.max(1)).map(argmax).collect::<Vec<_>>();
                assert_eq!(top1(&gv), top1(&wv), "{file} batch {batch}: top-1 differs from the emulation");
            }
        }
    }
    Ok(())
}

#[test]
fn int8_chain_equals_the_emulation_bit_for_bit() -> Res {
    against_emulation("int8-chain.onnx", true)
}

#[test]
fn efficientnet_lite0_int8_agrees_with_the_emulation() -> Res {
    against_emulation("efficientnet-lite0.onnx", false)
}

#[test]
fn resnet50_int8_agrees_with_the_emulation() -> Res {
    against_emulation("resnet50.onnx", false)
}
