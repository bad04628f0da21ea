//! The CUDA engine's lowering on real models, without a GPU: each plan is
//! analysed at its largest binding, lowered to steps for smaller ones at fake
//! device addresses, and the steps are executed by `kiln_cuda::sim` (which
//! refuses any access outside the weights or the arena). The result must match
//! the reference executor with FP16 emulation, and the lowering must have made
//! its expected choices (1×1 convolutions as GEMMs, a channel-padded stem).
//! `KILN_DUMP_STEPS=1` lists every step (kind and node) of each model.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow, bail, ensure};
use kiln_cuda::lower::{Analysis, Bases, Binding, Step, StepKind, Storage, emit, tensor_bytes, tensor_from_bytes};
use kiln_cuda::sim::{self, SimMemory};
use kiln_engine::builder::{BuildOptions, build};
use kiln_engine::graph::{Graph, Precision, ValueId, eval_shape};
use kiln_engine::plan::Profile;
use kiln_engine::reference::{RunOptions, run};
use kiln_engine::verify::sample_inputs;
use kiln_engine::{DType, Tensor, import};
use kiln_tests::resnet::{Depth, resnet};
use kiln_tests::{TempDir, workspace_root};

mod int8;

const BASES: Bases = Bases { weights: 0x1_0000_0000, arena: 0x8_0000_0000 };
/// Never-written arena bytes read as NaN in every float type, so reading them shows.
const POISON: u8 = 0xff;

/// Small profiles: batch up to 2, sequences up to 16.
fn profiles(graph: &Graph) -> Vec<Profile> {
    let mut out: Vec<Profile> = Vec::new();
    for &i in &graph.inputs {
        for d in graph.shape(i).into_iter().flatten() {
            for s in d.symbols() {
                if !out.iter().any(|p| &p.symbol == s) {
                    let max = if s == import::SEQ { 16 } else { 2 };
                    out.push(Profile { symbol: s.clone(), min: 1, opt: max, max });
                }
            }
        }
    }
    out
}

/// A lowered plan: its graph and the analysis at the profiles' maxima.
struct Lowered {
    graph: Graph,
    analysis: Analysis,
}

fn lower(original: Graph, precision: Precision) -> anyhow::Result<Lowered> {
    lower_edited(original, precision, |_| Ok(()))
}

/// [`lower`] with `edit` applied to the plan's graph before the analysis.
fn lower_edited(
    original: Graph,
    precision: Precision,
    edit: impl FnOnce(&mut Graph) -> anyhow::Result<()>,
) -> anyhow::Result<Lowered> {
    let opts = BuildOptions { precision, profiles: profiles(&original), ..BuildOptions::default() };
    let (mut plan, _) = build(original, &opts, |_, _, _| {})?;
    edit(&mut plan.graph)?;
    let max: Binding = opts.profiles.iter().map(|p| (p.symbol.clone(), p.max)).collect();
    let analysis = Analysis::new(&plan.graph, &max)?;
    Ok(Lowered { graph: plan.graph, analysis })
}

/// The upload area (`[0, analysis.upload_bytes)` of the arena) for one run: the
/// host nodes evaluated with the engine's reference ops, in order, then every
/// uploaded value (a graph input or a host-node result) written at its device
/// tensor's offset as that tensor's element type. `inputs` follow `graph.inputs`.
pub fn fill_uploads(
    graph: &Graph,
    analysis: &Analysis,
    binding: &Binding,
    inputs: &[Tensor],
) -> anyhow::Result<Vec<u8>> {
    ensure!(inputs.len() == graph.inputs.len(), "{} inputs for {} graph inputs", inputs.len(), graph.inputs.len());
    let registry = kiln_engine::ops::registry();
    let mut host: HashMap<ValueId, Tensor> = graph.inputs.iter().copied().zip(inputs.iter().cloned()).collect();
    for &i in &analysis.host_nodes {
        let node = &graph.nodes[i];
        let mut held = Vec::with_capacity(node.inputs.len());
        for v in &node.inputs {
            let Some(v) = *v else {
                held.push(None);
                continue;
            };
            let t = match (graph.constant(v), host.get(&v)) {
                (Some(c), _) => c.clone(),
                (None, Some(t)) => t.clone(),
                // Shape of a device tensor: only its dims matter, which the binding gives.
                (None, None) if node.op == "Shape" => {
                    let ty = graph.value_type(v).context("Shape of a value without a type")?;
                    let dims = eval_shape(ty.shape.as_deref().unwrap_or_default(), binding)
                        .with_context(|| format!("Shape of {}: dims not bound", graph.value(v).name))?;
                    Tensor::zeros(DType::F32, dims)?
                }
                (None, None) => {
                    bail!("host node {} reads {}, which the host does not have", node.name, graph.value(v).name)
                }
            };
            held.push(Some(t));
        }
        let op = registry.get(&node.op).with_context(|| format!("no reference op {}", node.op))?;
        let refs: Vec<Option<&Tensor>> = held.iter().map(Option::as_ref).collect();
        let outs = op.eval(node, &refs).map_err(|e| anyhow!("host node {} ({}): {e}", node.name, node.op))?;
        host.extend(node.outputs.iter().copied().zip(outs));
    }
    let mut area = vec![0u8; analysis.upload_bytes];
    for u in &analysis.uploads {
        let d = &analysis.dvals[u.dval];
        let t = host.get(&u.value).with_context(|| format!("upload {} was never computed", d.name))?;
        let Storage::Arena { offset } = analysis.storage(u.dval) else {
            bail!("upload {} is not in the arena", d.name)
        };
        let bytes = tensor_bytes(t, d.elem).with_context(|| format!("{} ({}) as {:?}", d.name, t.dtype(), d.elem))?;
        let end = offset + bytes.len();
        ensure!(end <= area.len(), "upload {} ends at {end}, past the upload area ({})", d.name, area.len());
        area[offset..end].copy_from_slice(&bytes);
    }
    Ok(area)
}

/// The device-computed graph outputs after a run, by graph value.
fn read_downloads(analysis: &Analysis, binding: &Binding, mem: &SimMemory) -> anyhow::Result<HashMap<ValueId, Tensor>> {
    let mut out = HashMap::new();
    for dl in &analysis.downloads {
        let d = &analysis.dvals[dl.dval];
        let dims = eval_shape(&d.shape, binding).with_context(|| format!("{}: dims not bound", d.name))?;
        let Storage::Arena { offset } = analysis.storage(dl.dval) else {
            bail!("download {} is not in the arena", d.name)
        };
        let bytes = dims.iter().product::<usize>() * d.elem.size();
        out.insert(dl.value, tensor_from_bytes(mem.bytes(BASES.arena + offset as u64, bytes)?, d.elem, dims)?);
    }
    Ok(out)
}

/// One simulated run next to the reference.
struct Outcome {
    steps: Vec<Step>,
    /// max |sim − reference| / max |reference| over every output.
    rel_err: f64,
    /// Top-1 of the first output's rows: (simulated, reference).
    top1: (Vec<usize>, Vec<usize>),
    /// Seconds the simulator took.
    sim_s: f64,
}

/// The steps at `binding`, sample inputs (from `seed`), and the simulated memory holding
/// the weights, a poisoned arena and the inputs' upload area: a run ready to start.
fn ready(l: &Lowered, binding: &Binding, seed: u64) -> anyhow::Result<(Vec<Step>, Vec<Tensor>, SimMemory)> {
    let (g, a) = (&l.graph, &l.analysis);
    let steps = emit(g, a, binding, BASES)?;
    let inputs = sample_inputs(g, binding, seed)?;
    let mut mem = SimMemory::new(a.weights.clone(), a.arena_bytes, POISON, BASES);
    let uploads = fill_uploads(g, a, binding, &inputs)?;
    mem.arena[..uploads.len()].copy_from_slice(&uploads);
    Ok((steps, inputs, mem))
}

fn simulate(l: &Lowered, binding: &Binding, seed: u64) -> anyhow::Result<Outcome> {
    let (g, a) = (&l.graph, &l.analysis);
    let (steps, inputs, mut mem) = ready(l, binding, seed)?;
    let started = Instant::now();
    sim::run(&steps, &mut mem)?;
    let got = read_downloads(a, binding, &mem)?;
    let sim_s = started.elapsed().as_secs_f64();
    let want = run(g, &inputs, RunOptions { emulate_fp16: true })?;
    let (mut rel_err, mut top1) = (0.0f64, (Vec::new(), Vec::new()));
    for (k, (&o, w)) in g.outputs.iter().zip(&want).enumerate() {
        let name = &g.value(o).name;
        let got = got.get(&o).with_context(|| format!("output {name} was not downloaded"))?;
        ensure!(got.shape() == w.shape(), "output {name}: shape {:?} vs reference {:?}", got.shape(), w.shape());
        let (x, y) = (got.as_f32().context("sim output")?, w.as_f32().context("reference output")?);
        let scale = y.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs()))).max(f64::MIN_POSITIVE);
        let mut worst = 0.0f64;
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            let e = f64::from((a - b).abs());
            ensure!(!e.is_nan(), "output {name}[{i}]: {a} vs reference {b}");
            worst = worst.max(e / scale);
        }
        rel_err = rel_err.max(worst);
        if k == 0 {
            top1 = (argmax_rows(got), argmax_rows(w));
        }
    }
    Ok(Outcome { steps, rel_err, top1, sim_s })
}

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    let (Some(&cols), Some(v)) = (t.shape().last(), t.as_f32()) else { return Vec::new() };
    v.chunks(cols.max(1))
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0)
        .collect()
}

/// Sum of every arena tensor's bytes: what a plan without reuse would need.
fn naive_arena(a: &Analysis) -> usize {
    a.dvals.iter().filter(|d| matches!(d.storage, Storage::Arena { .. })).map(|d| d.bytes).sum()
}

/// How many steps of each kind; every step with `KILN_DUMP_STEPS` set.
fn print_steps(label: &str, steps: &[Step]) {
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for s in steps {
        match kinds.iter_mut().find(|(k, _)| *k == sim::kind_name(&s.kind)) {
            Some((_, n)) => *n += 1,
            None => kinds.push((sim::kind_name(&s.kind), 1)),
        }
    }
    println!("{label} steps: {kinds:?}");
    if std::env::var_os("KILN_DUMP_STEPS").is_some() {
        for s in steps {
            println!("  {} {}", sim::kind_name(&s.kind), s.node);
        }
    }
}

/// Simulates `l` at every binding against the reference (`tol`: the largest
/// error relative to the largest reference magnitude; `classifier`: top-1 must agree).
fn check(label: &str, l: &Lowered, bindings: &[Binding], tol: f64, classifier: bool) -> anyhow::Result<()> {
    let naive = naive_arena(&l.analysis);
    ensure!(
        l.analysis.arena_bytes < naive,
        "{label}: arena {} B is not below the naive {naive} B",
        l.analysis.arena_bytes
    );
    for (i, b) in bindings.iter().enumerate() {
        let out = simulate(l, b, 7 + i as u64).with_context(|| format!("{label} at {b:?}"))?;
        println!(
            "{label} {b:?}: {} steps simulated in {:.1} s, max error {:.2e} of the largest output, arena {} B (naive {naive} B)",
            out.steps.len(),
            out.sim_s,
            out.rel_err,
            l.analysis.arena_bytes
        );
        if i == 0 {
            print_steps(label, &out.steps);
        }
        ensure!(out.rel_err <= tol, "{label} at {b:?}: relative error {:.3e} above {tol:e}", out.rel_err);
        if classifier {
            ensure!(out.top1.0 == out.top1.1, "{label} at {b:?}: top-1 {:?} vs reference {:?}", out.top1.0, out.top1.1);
        }
    }
    Ok(())
}

fn batches() -> Vec<Binding> {
    [1, 2].into_iter().map(|n| [("batch".to_string(), n)].into()).collect()
}

fn write_resnet(dir: &TempDir, depth: Depth) -> anyhow::Result<PathBuf> {
    let path = dir.path(&format!("{depth:?}.onnx"));
    kiln_onnx::save(&resnet(depth, 1000, 42)?, &path)?;
    Ok(path)
}

#[test]
fn resnet18_fp16_nhwc_and_fp32_nchw() -> anyhow::Result<()> {
    let dir = TempDir::new("cuda-lowering-r18")?;
    let path = write_resnet(&dir, Depth::R18)?;
    let original = import::import_file(&path)?;
    let l16 = lower(original.clone(), Precision::F16)?;
    check("ResNet-18 FP16 NHWC", &l16, &batches(), 2e-2, true)?;
    let l32 = lower(original, Precision::F32)?;
    check("ResNet-18 FP32 NCHW", &l32, &batches(), 1e-4, true)
}

#[test]
fn resnet50_fp16_lowers_pointwise_convs_to_gemms() -> anyhow::Result<()> {
    let dir = TempDir::new("cuda-lowering-r50")?;
    let path = write_resnet(&dir, Depth::R50)?;
    let l = lower(import::import_file(&path)?, Precision::F16)?;
    let steps = emit(&l.graph, &l.analysis, &[("batch".to_string(), 2)].into(), BASES)?;
    let mut kinds: HashMap<&str, Vec<&'static str>> = HashMap::new();
    for s in &steps {
        kinds.entry(s.node.as_str()).or_default().push(sim::kind_name(&s.kind));
    }
    let (mut gemms, mut convs) = (0, 0);
    for n in l.graph.nodes.iter().filter(|n| n.op == "kiln.FusedConv") {
        let w = n.input(1).and_then(|w| l.graph.shape(w)).context("conv weights without a shape")?;
        let kernel: Vec<i64> = w.iter().map(|d| d.as_fixed().unwrap_or(0)).collect();
        let strides = n.attrs.ints("strides").map_err(|e| anyhow!(e))?.unwrap_or(&[1, 1]).to_vec();
        // OHWI: [K, R, S, C].
        let pointwise = kernel.get(1..3) == Some(&[1, 1][..]) && strides == [1, 1];
        let got = kinds.get(n.name.as_str()).cloned().unwrap_or_default();
        let want = if pointwise { "Gemm" } else { "Conv" };
        ensure!(got.first() == Some(&want), "{} ({kernel:?}, strides {strides:?}) lowered to {got:?}", n.name);
        if pointwise { gemms += 1 } else { convs += 1 }
    }
    ensure!(gemms == 33 && convs == 20, "{gemms} GEMMs and {convs} convolutions");
    // The RGB stem reads its input zero-padded to 8 channels.
    let pad = steps.iter().position(|s| s.node.ends_with(":pad8")).context("no channel padding")?;
    ensure!(matches!(steps[pad].kind, StepKind::Zero { .. }) && matches!(steps[pad + 1].kind, StepKind::Copy(_)));
    let stem = steps.iter().find_map(|s| match &s.kind {
        StepKind::Conv { spec, .. } => Some(spec),
        _ => None,
    });
    ensure!(stem.is_some_and(|s| s.c == 8 && s.r == 7), "stem {stem:?}");
    // Batch 2 only: the heaviest model, and EfficientNet covers the same paths at batch 1.
    check("ResNet-50 FP16", &l, &batches()[1..], 2e-2, true)
}

/// EfficientNet-Lite0 pads its stem and stride-2 depthwise convolutions TF-style
/// (the odd pixel bottom/right): the lowering materialises those pads.
#[test]
fn efficientnet_lite0_fp16() -> anyhow::Result<()> {
    let path = workspace_root().join("models/efficientnet_lite0/1/model.onnx");
    ensure!(path.is_file(), "{} is missing: run `make setup`", path.display());
    let l = lower(import::import_file(&path)?, Precision::F16)?;
    check("EfficientNet-Lite0 FP16", &l, &batches(), 2e-2, true)
}

#[test]
fn minilm_l6_fp16() -> anyhow::Result<()> {
    let path = workspace_root().join(".kiln/assets/minilm-l6-int8.onnx");
    ensure!(path.is_file(), "{} is missing: run `make setup-trainer`", path.display());
    let l = lower(import::import_file(&path)?, Precision::F16)?;
    check("MiniLM-L6 FP16", &l, &text_bindings(), 2e-2, false)
}

fn text_bindings() -> Vec<Binding> {
    [(1, 8), (1, 16), (2, 8), (2, 16)]
        .into_iter()
        .map(|(b, s)| [("batch".to_string(), b), (import::SEQ.to_string(), s)].into())
        .collect()
}

/// Movement and row ops none of the models above use in this combination:
/// Transpose, Slice with a negative step, Concat, Softmax, ReduceMean and a
/// broadcast Add, in FP32 and FP16.
#[test]
fn movement_and_row_ops() -> anyhow::Result<()> {
    use kiln_engine::graph::{Attr, Dim, Node, ValueType};
    use kiln_engine::{Tensor as T, TensorData};
    let mut g = Graph::new("movement", 17);
    let b = Dim::sym("batch");
    let ty = |dims: Vec<Dim>| Some(ValueType::new(DType::F32, dims));
    let f = |n: i64| Dim::fixed(n);
    let x = g.add_value("x", ty(vec![b.clone(), f(6), f(8)]));
    let t = g.add_value("t", ty(vec![b.clone(), f(8), f(6)]));
    let s = g.add_value("s", ty(vec![b.clone(), f(4), f(6)]));
    let c = g.add_value("c", ty(vec![b.clone(), f(4), f(12)]));
    let sm = g.add_value("sm", ty(vec![b.clone(), f(4), f(12)]));
    let r = g.add_value("r", ty(vec![b.clone(), f(4), f(1)]));
    let y = g.add_value("y", ty(vec![b, f(4), f(12)]));
    let ints = |v: Vec<i64>| T::new(vec![v.len()], TensorData::I64(v));
    let starts = g.add_constant("starts", ints(vec![7])?);
    let ends = g.add_constant("ends", ints(vec![-100])?);
    let axes = g.add_constant("axes", ints(vec![1])?);
    let steps = g.add_constant("steps", ints(vec![-2])?);
    g.nodes = vec![
        Node::new("t", "Transpose", vec![Some(x)], vec![t]).with_attr("perm", Attr::Ints(vec![0, 2, 1])),
        Node::new("s", "Slice", vec![Some(t), Some(starts), Some(ends), Some(axes), Some(steps)], vec![s]),
        Node::new("c", "Concat", vec![Some(s), Some(s)], vec![c]).with_attr("axis", Attr::Int(2)),
        Node::new("sm", "Softmax", vec![Some(c)], vec![sm]).with_attr("axis", Attr::Int(-1)),
        Node::new("r", "ReduceMean", vec![Some(sm)], vec![r]).with_attr("axes", Attr::Ints(vec![2])),
        Node::new("y", "Add", vec![Some(sm), Some(r)], vec![y]),
    ];
    g.inputs = vec![x];
    g.outputs = vec![y];
    check("movement FP32", &lower(g.clone(), Precision::F32)?, &batches(), 1e-5, false)?;
    check("movement FP16", &lower(g, Precision::F16)?, &batches(), 2e-2, false)
}
