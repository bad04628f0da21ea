//! The engine builder on real models: ResNet-18/50 (generated fixtures),
//! EfficientNet-Lite0 (the default model) and MiniLM-L6 (the PyPI ONNX export).
//! After every pass the reference executor must agree with ONNX Runtime, and the
//! expected rewrites must have happened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use kiln_engine::builder::{BuildOptions, BuildReport, build};
use kiln_engine::graph::{Graph, Precision};
use kiln_engine::plan::Profile;
use kiln_engine::reference::{RunOptions, run};
use kiln_engine::verify::{compare, run_ort, sample_inputs};
use kiln_engine::{OrtRuntime, Tensor, TensorData, import};
use kiln_tests::resnet::{Depth, resnet};
use kiln_tests::{TempDir, ort_library, workspace_root};

fn runtime() -> anyhow::Result<OrtRuntime> {
    Ok(OrtRuntime::load(&ort_library()?)?)
}

fn profiles(graph: &Graph) -> Vec<Profile> {
    let mut out = Vec::new();
    for &i in &graph.inputs {
        for d in graph.shape(i).into_iter().flatten() {
            for s in d.symbols() {
                if !out.iter().any(|p: &Profile| &p.symbol == s) {
                    let (min, opt, max) = if s == import::SEQ { (1, 128, 512) } else { (1, 8, 64) };
                    out.push(Profile { symbol: s.clone(), min, opt, max });
                }
            }
        }
    }
    out
}

fn build_with(path: &Path, precision: Precision) -> anyhow::Result<(Graph, Graph, BuildReport)> {
    let original = import::import_file(path)?;
    let opts = BuildOptions {
        precision,
        profiles: profiles(&original),
        source: path.display().to_string(),
        ..BuildOptions::default()
    };
    let (plan, report) = build(original.clone(), &opts, |_, _, _| {})?;
    Ok((original, plan.graph, report))
}

fn count(report: &BuildReport, op: &str) -> usize {
    report.ops_after.iter().find(|(o, _)| o == op).map_or(0, |(_, n)| *n)
}

fn count_before(report: &BuildReport, op: &str) -> usize {
    report.ops_before.iter().find(|(o, _)| o == op).map_or(0, |(_, n)| *n)
}

/// Reference (optimised graph) vs ONNX Runtime (original file); returns the worst relative error.
fn worst_error(rt: &OrtRuntime, path: &Path, graph: &Graph, inputs: &[Tensor], fp16: bool) -> anyhow::Result<f64> {
    let ours = run(graph, inputs, RunOptions { emulate_fp16: fp16 })?;
    let theirs = run_ort(rt, path, graph, inputs)?;
    let names: Vec<String> = graph.outputs.iter().map(|&o| graph.value(o).name.clone()).collect();
    let errors = compare(&names, &ours, &theirs)?;
    Ok(errors.iter().map(|e| e.max_rel).fold(0.0, f64::max))
}

fn write_resnet(dir: &TempDir, depth: Depth) -> anyhow::Result<PathBuf> {
    let path = dir.path(&format!("{depth:?}.onnx"));
    kiln_onnx::save(&resnet(depth, 1000, 42)?, &path)?;
    Ok(path)
}

fn resnet_case(depth: Depth, batch: usize) -> anyhow::Result<()> {
    let dir = TempDir::new("builder-resnet")?;
    let path = write_resnet(&dir, depth)?;
    let (original, optimised, report) = build_with(&path, Precision::F32)?;
    let convs = count_before(&report, "Conv");
    ensure!(convs > 0, "fixture has no convolutions");
    ensure!(count(&report, "BatchNormalization") == 0, "batch norms left: {:?}", report.ops_after);
    ensure!(count(&report, "Conv") == 0 && count(&report, "kiln.FusedConv") == convs, "{:?}", report.ops_after);
    ensure!(count(&report, "Relu") == 0 && count(&report, "Add") == 0, "unfused Relu/Add: {:?}", report.ops_after);
    ensure!(report.peak_activation_bytes < report.naive_activation_bytes, "no buffer reuse");
    let bindings: HashMap<String, usize> = [("batch".into(), batch)].into();
    let inputs = sample_inputs(&original, &bindings, 1)?;
    let rt = runtime()?;
    let before = worst_error(&rt, &path, &original, &inputs, false)?;
    let after = worst_error(&rt, &path, &optimised, &inputs, false)?;
    ensure!(before <= 1e-4, "reference before passes differs from ONNX Runtime: {before:e}");
    ensure!(after <= 1e-4, "reference after passes differs from ONNX Runtime: {after:e}");
    Ok(())
}

#[test]
fn resnet18_all_passes_match_onnx_runtime() -> anyhow::Result<()> {
    resnet_case(Depth::R18, 2)
}

#[test]
fn resnet50_all_passes_match_onnx_runtime() -> anyhow::Result<()> {
    resnet_case(Depth::R50, 1)
}

fn efficientnet() -> PathBuf {
    workspace_root().join("models/efficientnet_lite0/1/model.onnx")
}

/// Decode, resize the shorter side to 256, centre-crop 224, (x − 127) / 128, NCHW.
fn photo_tensor(names: &[&str]) -> anyhow::Result<Tensor> {
    let mut data = Vec::new();
    for name in names {
        let bytes = kiln_tests::photo(name)?;
        let img = kiln_image::decode(&bytes)?;
        let (w, h) = img.dimensions();
        let scale = 256.0 / w.min(h) as f32;
        let (nw, nh) = ((w as f32 * scale).round() as u32, (h as f32 * scale).round() as u32);
        let img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        let (x0, y0) = ((nw - 224) / 2, (nh - 224) / 2);
        for c in 0..3 {
            for y in 0..224 {
                for x in 0..224 {
                    data.push((f32::from(img.get_pixel(x0 + x, y0 + y)[c]) - 127.0) / 128.0);
                }
            }
        }
    }
    Ok(Tensor::new(vec![names.len(), 3, 224, 224], TensorData::F32(data))?)
}

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    let (Some(&cols), Some(v)) = (t.shape().last(), t.as_f32()) else { return Vec::new() };
    v.chunks(cols)
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0)
        .collect()
}

#[test]
fn efficientnet_lite0_fp32_matches_and_fp16_keeps_top1() -> anyhow::Result<()> {
    let path = efficientnet();
    let rt = runtime()?;
    let (original, fp32, report) = build_with(&path, Precision::F32)?;
    ensure!(count(&report, "Clip") == 0, "ReLU6 not fused: {:?}", report.ops_after);
    let photos = photo_tensor(&["flower.jpg", "china.jpg"])?;
    let err = worst_error(&rt, &path, &fp32, std::slice::from_ref(&photos), false)?;
    ensure!(err <= 1e-4, "FP32 plan differs from ONNX Runtime: {err:e}");
    let (_, fp16, report16) = build_with(&path, Precision::F16)?;
    ensure!(report16.weight_bytes * 2 <= report.weight_bytes + 1024, "FP16 weights not halved");
    let top32 = argmax_rows(&run(&fp32, std::slice::from_ref(&photos), RunOptions::default())?[0]);
    let top16 = argmax_rows(&run(&fp16, std::slice::from_ref(&photos), RunOptions { emulate_fp16: true })?[0]);
    ensure!(top32 == top16, "top-1 FP32 {top32:?} vs FP16 {top16:?}");
    // The plan must still classify like the original graph: daisy (985) and palace (698).
    let orig_top = argmax_rows(&run(&original, &[photos], RunOptions::default())?[0]);
    ensure!(orig_top == top32, "optimised top-1 {top32:?} vs original {orig_top:?}");
    Ok(())
}

fn minilm() -> anyhow::Result<PathBuf> {
    let p = workspace_root().join(".kiln/assets/minilm-l6-int8.onnx");
    ensure!(p.is_file(), "{} is missing: run `make setup-trainer`", p.display());
    Ok(p)
}

/// Mean over unmasked positions, L2-normalised: the sentence embedding.
fn embed(hidden: &Tensor, mask: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    let (v, s) = (hidden.as_f32().context("hidden state is not FP32")?, hidden.shape());
    let TensorData::I64(m) = mask.data() else { anyhow::bail!("mask is not INT64") };
    let (b, t, d) = (s[0], s[1], s[2]);
    Ok((0..b)
        .map(|i| {
            let mut e = vec![0f32; d];
            for j in 0..t {
                if m[i * t + j] != 0 {
                    for k in 0..d {
                        e[k] += v[(i * t + j) * d + k];
                    }
                }
            }
            let n = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            e.iter().map(|x| x / n).collect()
        })
        .collect())
}

#[test]
fn minilm_fp32_matches_and_fp16_embeddings_agree() -> anyhow::Result<()> {
    let path = minilm()?;
    let rt = runtime()?;
    let (original, fp32, report) = build_with(&path, Precision::F32)?;
    ensure!(count(&report, "kiln.Attention") == 6, "attention blocks: {:?}", report.ops_after);
    // Reshape targets computed from Shape at run time must all have become constants
    // (Shape may remain only where the mask is built from the dynamic sizes).
    for n in fp32.nodes.iter().filter(|n| n.op == "Reshape") {
        ensure!(n.input(1).and_then(|t| fp32.constant(t)).is_some(), "{} has a run-time target", n.name);
    }
    let bindings: HashMap<String, usize> = [("batch".into(), 2), ("seq".into(), 16)].into();
    let inputs = sample_inputs(&original, &bindings, 3)?;
    let err = worst_error(&rt, &path, &fp32, &inputs, false)?;
    ensure!(err <= 1e-4, "FP32 plan differs from ONNX Runtime: {err:e}");
    let (_, fp16, _) = build_with(&path, Precision::F16)?;
    let mask_at =
        original.inputs.iter().position(|&i| original.value(i).name.contains("mask")).context("no mask input")?;
    let e32 = embed(&run(&fp32, &inputs, RunOptions::default())?[0], &inputs[mask_at])?;
    let e16 = embed(&run(&fp16, &inputs, RunOptions { emulate_fp16: true })?[0], &inputs[mask_at])?;
    for (a, b) in e32.iter().zip(&e16) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        ensure!(cos >= 0.999, "FP16 embedding cosine {cos}");
    }
    Ok(())
}

#[test]
fn unsupported_ops_are_all_listed_in_one_error() -> anyhow::Result<()> {
    let mut b = kiln_onnx::GraphBuilder::new("bad");
    b.add_input("x", kiln_onnx::DataType::Float, &[kiln_onnx::Dim::Fixed(4)])?;
    let y = b.add_node("Relu", &["x"], vec![])?;
    let z = b.add_node("NonZero", &[&y], vec![])?;
    let w = b.add_node("Relu", &[&y], vec![])?;
    let v = b.add_node("Hardmax", &[&w], vec![])?;
    b.add_output(&z, kiln_onnx::DataType::Int64, &[])?;
    b.add_output(&v, kiln_onnx::DataType::Float, &[])?;
    let err = match import::import_model(&b.finish(17), None) {
        Ok(_) => anyhow::bail!("import accepted unsupported ops"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("2 unsupported") && err.contains("NonZero") && err.contains("Hardmax"), "{err}");
    Ok(())
}

#[test]
fn plan_round_trip_keeps_graph_and_outputs() -> anyhow::Result<()> {
    let dir = TempDir::new("builder-plan")?;
    let path = write_resnet(&dir, Depth::R18)?;
    let original = import::import_file(&path)?;
    let opts = BuildOptions { profiles: profiles(&original), ..BuildOptions::default() };
    let (plan, _) = build(original.clone(), &opts, |_, _, _| {})?;
    let file = dir.path("r18.plan");
    kiln_engine::plan::save(&plan, &file)?;
    let loaded = kiln_engine::plan::load(&file, &kiln_engine::plan::Expect::default())?;
    ensure!(loaded.graph.nodes.len() == plan.graph.nodes.len());
    ensure!(loaded.graph.weight_bytes() == plan.graph.weight_bytes());
    let bindings: HashMap<String, usize> = [("batch".into(), 1)].into();
    let inputs = sample_inputs(&original, &bindings, 5)?;
    let a = run(&plan.graph, &inputs, RunOptions::default())?;
    let b = run(&loaded.graph, &inputs, RunOptions::default())?;
    ensure!(a == b, "a loaded plan computes something else");
    Ok(())
}
