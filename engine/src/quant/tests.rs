use std::collections::BTreeMap;

use super::gate::{GateOptions, Labelled, gate};
use super::int8::{NodeQuant, eval, quantize, weight_scales};
use super::*;
use crate::graph::Attr;
use crate::ops::registry;
use crate::passes::testing::{Lcg, Tb, TestResult, random};
use crate::reference::{RunOptions, run};
use crate::{Tensor, TensorData};

fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::F32(data)).expect("tensor")
}

#[test]
fn quantize_follows_onnx_quantize_linear() {
    assert_eq!(quantize(2.5, 1.0), 2, "ties to even");
    assert_eq!(quantize(-2.5, 1.0), -2);
    assert_eq!(quantize(3.5, 1.0), 4);
    assert_eq!(quantize(300.0, 1.0), 127);
    assert_eq!(quantize(-300.0, 1.0), -128);
    assert_eq!(quantize(f32::NAN, 1.0), 0);
    assert_eq!(quantize(0.26, 0.1), 3);
}

/// Integer reference: NCHW 3×3 convolution, stride 1, pad 1, accumulated in i64.
fn naive_int8_conv(x: &Tensor, w: &Tensor, bias: &[f32], z: &[f32], q: &NodeQuant) -> Vec<f32> {
    let (xs, ws) = (x.as_f32().expect("x"), w.as_f32().expect("w"));
    let [n, c, h, wd] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let m = w.shape()[0];
    let qx: Vec<i64> = xs.iter().map(|&v| i64::from(quantize(v, q.input_scale))).collect();
    let qw: Vec<i64> = ws
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / q.weight_scales[i / (c * 9)]).round_ties_even().clamp(-127.0, 127.0) as i64)
        .collect();
    let mut y = Vec::with_capacity(n * m * h * wd);
    for b in 0..n {
        for k in 0..m {
            for oy in 0..h {
                for ox in 0..wd {
                    let mut acc = 0i64;
                    for ci in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy as isize + ky as isize - 1, ox as isize + kx as isize - 1);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * c + ci) * h + iy as usize) * wd + ix as usize;
                                acc += qx[xi] * qw[((k * c + ci) * 3 + ky) * 3 + kx];
                            }
                        }
                    }
                    let i = ((b * m + k) * h + oy) * wd + ox;
                    let v = acc as f32 * (q.input_scale * q.weight_scales[k]) + bias[k] + z[i];
                    y.push(v.max(0.0));
                }
            }
        }
    }
    y
}

#[test]
fn int8_convolution_is_exact_integer_arithmetic() -> TestResult {
    let (n, c, h, w, m) = (2, 64, 6, 5, 8);
    // Large magnitudes and a long reduction (576) so FP32 accumulation would round.
    let x = random(&[n, c, h, w], 1, 40.0);
    let wt = random(&[m, c, 3, 3], 2, 1.0);
    let bias: Vec<f32> = (0..m).map(|k| k as f32 * 0.25 - 1.0).collect();
    let z = random(&[n, m, h, w], 3, 2.0);
    let node = crate::graph::Node::new("conv", "kiln.FusedConv", (0..4).map(Some).collect(), vec![4])
        .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]))
        .with_attr("activation", Attr::String("relu".into()));
    let op = registry().get("kiln.FusedConv").ok_or("no FusedConv")?;
    let q = NodeQuant { input_scale: 40.0 / 127.0, weight_scales: weight_scales(&node, &wt)? };
    let b = tensor(&[m], bias.clone());
    let y = eval(&node, op, &[Some(&x), Some(&wt), Some(&b), Some(&z)], &q)?;
    let want = naive_int8_conv(&x, &wt, &bias, z.as_f32().ok_or("z")?, &q);
    let got = y.as_f32().ok_or("y")?;
    assert_eq!(got.len(), want.len());
    let mismatched = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(mismatched, 0, "INT8 emulation must match integer arithmetic bit for bit");

    // And it stays close to the FP32 convolution.
    let fp32 = op.eval(&node, &[Some(&x), Some(&wt), Some(&b), Some(&z)])?;
    let f = fp32[0].as_f32().ok_or("fp32")?;
    let scale = f.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let worst = got.iter().zip(f).fold(0f32, |a, (&p, &q)| a.max((p - q).abs()));
    assert!(worst / scale < 0.05, "INT8 vs FP32: {worst} of {scale}");
    Ok(())
}

#[test]
fn int8_dense_is_exact_integer_arithmetic() -> TestResult {
    let (rows, k, cols) = (5, 300, 7);
    let a = random(&[rows, k], 4, 3.0);
    let w = random(&[k, cols], 5, 0.5);
    let node = crate::graph::Node::new("fc", "kiln.Dense", vec![Some(0), Some(1)], vec![2]);
    let op = registry().get("kiln.Dense").ok_or("no Dense")?;
    let q = NodeQuant { input_scale: 3.0 / 127.0, weight_scales: weight_scales(&node, &w)? };
    let y = eval(&node, op, &[Some(&a), Some(&w)], &q)?;
    let (av, wv) = (a.as_f32().ok_or("a")?, w.as_f32().ok_or("w")?);
    for r in 0..rows {
        for j in 0..cols {
            let acc: i64 = (0..k)
                .map(|p| {
                    let qa = i64::from(quantize(av[r * k + p], q.input_scale));
                    let qw = (wv[p * cols + j] / q.weight_scales[j]).round_ties_even().clamp(-127.0, 127.0) as i64;
                    qa * qw
                })
                .sum();
            let want = acc as f32 * (q.input_scale * q.weight_scales[j]);
            assert_eq!(y.as_f32().ok_or("y")?[r * cols + j].to_bits(), want.to_bits(), "row {r} col {j}");
        }
    }
    Ok(())
}

/// NCHW → NHWC for a rank-4 tensor.
fn to_nhwc(t: &Tensor) -> Tensor {
    let [n, c, h, w] = [t.shape()[0], t.shape()[1], t.shape()[2], t.shape()[3]];
    let x = t.as_f32().expect("f32");
    let mut out = vec![0f32; x.len()];
    for (i, &v) in x.iter().enumerate() {
        let (b, ch, y, xx) = (i / (c * h * w), (i / (h * w)) % c, (i / w) % h, i % w);
        out[((b * h + y) * w + xx) * c + ch] = v;
    }
    tensor(&[n, h, w, c], out)
}

#[test]
fn int8_depthwise_and_grouped_convolutions_agree_across_layouts() -> TestResult {
    let op = registry().get("kiln.FusedConv").ok_or("no FusedConv")?;
    // Depthwise (group = channels) and grouped (2 groups), stride 2, clip activation.
    for (c, m, group) in [(16usize, 16usize, 16i64), (8, 12, 2)] {
        let x = random(&[2, c, 9, 7], 40, 0.5);
        let w = random(&[m, c / group as usize, 3, 3], 41, 1.0);
        let bias = random(&[m], 42, 1.0);
        let attrs = |layout: &str| {
            crate::graph::Node::new("dw", "kiln.FusedConv", vec![Some(0), Some(1), Some(2)], vec![3])
                .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1]))
                .with_attr("strides", Attr::Ints(vec![2, 2]))
                .with_attr("group", Attr::Int(group))
                .with_attr("layout", Attr::String(layout.into()))
                .with_attr("activation", Attr::String("clip".into()))
                .with_attr("clip_min", Attr::Float(0.0))
                .with_attr("clip_max", Attr::Float(6.0))
        };
        let (nchw, nhwc) = (attrs("NCHW"), attrs("NHWC"));
        let q = NodeQuant { input_scale: 0.5 / 127.0, weight_scales: weight_scales(&nchw, &w)? };
        let a = eval(&nchw, op, &[Some(&x), Some(&w), Some(&bias)], &q)?;
        let b = eval(&nhwc, op, &[Some(&to_nhwc(&x)), Some(&to_nhwc(&w)), Some(&bias)], &q)?;
        let (a, b) = (to_nhwc(&a), b);
        let same = a.as_f32().ok_or("a")?.iter().zip(b.as_f32().ok_or("b")?).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "group {group}: NHWC INT8 differs from NCHW INT8");
        // And both are INT8, close to (but not) the FP32 convolution.
        let f = op.eval(&nchw, &[Some(&x), Some(&w), Some(&bias)])?;
        let f = to_nhwc(&f[0]);
        let gap =
            a.as_f32().ok_or("a")?.iter().zip(f.as_f32().ok_or("f")?).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(gap > 0.0 && gap < 0.5, "group {group}: INT8 vs FP32 gap {gap}");
    }
    Ok(())
}

/// x [n, 8] → Dense 8→16 (ReLU) → Dense 16→4: logits.
fn classifier(rng: &mut Lcg) -> Result<Graph, GraphError> {
    let mut t = Tb::new();
    let x = t.input("x", &[4, 8]);
    let w1 = t.constant(&[8, 16], rng.vec(128));
    let b1 = t.constant(&[16], rng.vec(16));
    let h = t.node_attrs("kiln.Dense", &[x, w1, b1], vec![("activation", Attr::String("relu".into()))]);
    let w2 = t.constant(&[16, 4], rng.vec(64));
    let y = t.node("kiln.Dense", &[h, w2]);
    t.finish(&[y])
}

#[test]
fn calibration_plan_and_gate_end_to_end() -> TestResult {
    let mut rng = Lcg::new(9);
    let graph = classifier(&mut rng)?;
    assert_eq!(candidates(&graph).len(), 2);
    let batches: Vec<Vec<Tensor>> = (0..8).map(|i| vec![random(&[4, 8], 100 + i, 2.0)]).collect();
    let mut cal = Calibrator::new(&graph);
    for b in &batches {
        cal.observe(&graph, b)?;
    }
    let cache = cal.finish(&graph);
    assert_eq!((cache.samples, cache.histograms.len()), (32, 2));
    let path = std::env::temp_dir().join(format!("kiln-calib-{}.json", std::process::id()));
    cache.save(&path)?;
    assert_eq!(CalibrationCache::load(&path, &graph)?, cache);
    std::fs::remove_file(&path)?;

    // Labels from the FP32 model itself: FP32 accuracy is 100 %.
    let mut data = Labelled::default();
    for b in &batches {
        let out = run(&graph, b, RunOptions::default())?;
        let logits = out[0].as_f32().ok_or("logits")?;
        let labels = logits.chunks(4).map(super::gate::argmax).collect();
        data.batches.push((b.clone(), labels));
    }
    let thresholds = cache.thresholds(Method::MinMax);
    let opts = GateOptions { max_drop: 10.0, fp16: false, sensitivity_samples: 16 };
    let (plan, report) = gate(&graph, &thresholds, &data, opts, &mut |_, _, _| {})?;
    assert_eq!(report.fp32_accuracy, 100.0);
    assert!(report.int8_accuracy_ungated >= 90.0, "{report:?}");
    assert_eq!(plan.nodes.len(), 2, "within the bound, every layer stays INT8: {report:?}");

    // A ruined scale on the first layer: the gate must find it and keep it out of INT8.
    let mut ruined: BTreeMap<String, f32> = thresholds.clone();
    let first_input = graph.values[graph.nodes[0].input(0).ok_or("input")?].name.clone();
    ruined.insert(first_input, 0.05);
    let opts = GateOptions { max_drop: 0.0, fp16: false, sensitivity_samples: 16 };
    let (plan, report) = gate(&graph, &ruined, &data, opts, &mut |_, _, _| {})?;
    assert!(report.int8_accuracy_ungated < 100.0, "saturating the input should cost accuracy: {report:?}");
    assert_eq!(report.sensitivity.first().map(|s| s.0.as_str()), Some(graph.nodes[0].name.as_str()));
    assert_eq!(report.kept_fp16.first(), Some(&graph.nodes[0].name));
    assert!(!plan.nodes.contains_key(&graph.nodes[0].name));
    assert!(report.fp32_accuracy - report.int8_accuracy <= 0.0 + 1e-9, "{report:?}");

    // The plan travels in the graph's node attributes: a plain run computes the same INT8.
    let full = Int8Plan::new(&graph, &thresholds, &[])?;
    let mut marked = graph.clone();
    full.apply(&mut marked);
    assert_eq!(Int8Plan::from_graph(&marked), full);
    let (a, b) = (run(&marked, &batches[0], RunOptions::default())?, full.run(&graph, &batches[0], false)?);
    assert_eq!(a[0].as_f32(), b[0].as_f32());
    let fp32 = run(&graph, &batches[0], RunOptions::default())?;
    assert_ne!(a[0].as_f32(), fp32[0].as_f32(), "INT8 rounding changes something");
    Int8Plan::default().apply(&mut marked);
    assert!(Int8Plan::from_graph(&marked).nodes.is_empty());
    Ok(())
}
