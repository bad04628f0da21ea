//! INT8 plans through the lowering: every candidate layer INT8 (or every other one, as
//! the accuracy gate may leave a plan), simulated and compared with the reference
//! executor's INT8 emulation — bit for bit where only INT8 layers and exact ops compute.

use super::*;

/// Marks every INT8 candidate of a built plan, calibrated (min-max) on sample inputs at
/// every test binding; returns how many layers are INT8.
fn mark_int8(graph: &mut Graph, bindings: &[Binding]) -> anyhow::Result<usize> {
    mark_int8_keeping(graph, bindings, |_| false)
}

/// [`mark_int8`] with the candidates `keep` names left in FP16 (as the accuracy gate does).
fn mark_int8_keeping(graph: &mut Graph, bindings: &[Binding], keep: impl Fn(&str) -> bool) -> anyhow::Result<usize> {
    use kiln_engine::quant::{Calibrator, Int8Plan, Method};
    let mut cal = Calibrator::new(graph);
    for (i, b) in bindings.iter().enumerate() {
        cal.observe(graph, &sample_inputs(graph, b, 100 + i as u64)?)?;
    }
    let cache = cal.finish(graph);
    let kept: Vec<String> = graph.nodes.iter().map(|n| n.name.clone()).filter(|n| keep(n)).collect();
    let plan = Int8Plan::new(graph, &cache.thresholds(Method::MinMax), &kept)?;
    plan.apply(graph);
    Ok(plan.nodes.len())
}

/// Lowers `original` as an FP16 plan with every candidate INT8; checks that each INT8 layer
/// got its quantise → product → requantise steps and returns the lowering with its steps at
/// the last of `bindings` (calibrated at all of them).
fn lower_int8_at(original: Graph, bindings: &[Binding]) -> anyhow::Result<(Lowered, Vec<Step>, usize)> {
    let mut marked = 0;
    let l = lower_edited(original, Precision::F16, |g| {
        marked = mark_int8(g, bindings)?;
        Ok(())
    })?;
    ensure!(marked > 0 && l.analysis.int8.len() == marked, "{marked} INT8 layers, {} lowered", l.analysis.int8.len());
    let last = bindings.last().context("no binding")?;
    let steps = emit(&l.graph, &l.analysis, last, BASES)?;
    for layer in &l.analysis.int8 {
        let name = &l.graph.nodes[layer.node].name;
        let kinds: Vec<&str> = steps.iter().filter(|s| &s.node == name).map(|s| sim::kind_name(&s.kind)).collect();
        let product = match layer.form {
            kiln_cuda::lower::Int8Form::Gemm => "Gemm",
            kiln_cuda::lower::Int8Form::Conv => "Conv",
            kiln_cuda::lower::Int8Form::Depthwise => "DwConvI8",
        };
        ensure!(kinds.contains(&product) && kinds.contains(&"Requant"), "{name}: {kinds:?}");
        ensure!(kinds.contains(&"Quantize") == layer.quantize, "{name}: {kinds:?}");
        // A GEMM padded to GEMM_MIN_ROWS reads and writes only bytes planned for it.
        for s in steps.iter().filter(|s| &s.node == name) {
            if let StepKind::Gemm { spec, .. } = &s.kind {
                let input = l.analysis.root(layer.qx.unwrap_or(layer.x));
                let (read, written) = (spec.n * spec.ldb as u64, spec.n * spec.ldc as u64 * 4);
                ensure!(read <= l.analysis.dvals[input].bytes as u64, "{name}: GEMM reads {read} B");
                ensure!(written <= l.analysis.dvals[layer.acc].bytes as u64, "{name}: GEMM writes {written} B");
            }
        }
    }
    let fused = steps
        .iter()
        .filter(
            |s| matches!(&s.kind, StepKind::Requant(r) if matches!(r.out_kind, kiln_cuda::kernels::Int8Out::I8 { .. })),
        )
        .count();
    let quantised = l.analysis.int8.iter().filter(|x| x.quantize).count();
    let copies = l.analysis.int8.iter().filter(|x| x.also_i8.is_some()).count();
    println!(
        "{marked} INT8 layers: {fused} write INT8 for the next, {copies} write an INT8 copy beside FP16, \
         {quantised} quantise an input"
    );
    Ok((l, steps, fused))
}

/// [`lower_int8_at`] at batches 1 and 2.
fn lower_int8(original: Graph) -> anyhow::Result<(Lowered, Vec<Step>, usize)> {
    lower_int8_at(original, &batches())
}

/// The INT8 chain (see `kiln_tests::int8_chain`), imported.
fn int8_chain() -> anyhow::Result<Graph> {
    let dir = TempDir::new("cuda-lowering-int8-chain")?;
    let path = dir.path("chain.onnx");
    kiln_onnx::save(&kiln_tests::int8_chain::model()?, &path)?;
    Ok(import::import_file(&path)?)
}

/// The committed copy the GPU check runs (scripts/gpu-stage) is what the generator makes.
#[test]
fn int8_chain_fixture_is_current() -> anyhow::Result<()> {
    let path = workspace_root().join(kiln_tests::int8_chain::FIXTURE);
    let want = kiln_onnx::encode(&kiln_tests::int8_chain::model()?);
    let have = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    ensure!(have == want, "{} is stale: run `cargo run -p kiln-tests --example int8_chain`", path.display());
    Ok(())
}

#[test]
fn int8_layers_equal_the_emulation_exactly() -> anyhow::Result<()> {
    let (l, steps, fused) = lower_int8(int8_chain()?)?;
    use kiln_cuda::lower::Int8Form;
    let forms: Vec<Int8Form> = l.analysis.int8.iter().map(|x| x.form).collect();
    for form in [Int8Form::Gemm, Int8Form::Conv, Int8Form::Depthwise] {
        ensure!(forms.contains(&form), "no {form:?} layer in {forms:?}");
    }
    ensure!(l.analysis.int8.iter().any(|x| x.padded_x.is_some()), "the stem's padding is not materialised");
    ensure!(l.analysis.int8.iter().any(|x| x.padded == 4 && x.channels == 3), "the stem's channels are not padded");
    ensure!(l.analysis.int8.iter().any(|x| x.pre_act.is_some()), "no activation after requantisation");
    ensure!(l.analysis.int8.iter().any(|x| x.residual.is_some()), "no residual");
    ensure!(fused >= 2, "{fused} layers write INT8 for the next");
    print_steps("INT8 chain", &steps);
    check("INT8 chain", &l, &batches(), 0.0, true)
}

/// The simulated INT8 engine equals the emulation exactly here too: the simulator's FP16
/// pooling sums in the reference's order (a GPU may differ in the last bit there).
#[test]
fn resnet18_int8() -> anyhow::Result<()> {
    let dir = TempDir::new("cuda-lowering-r18-int8")?;
    let (l, _, fused) = lower_int8(import::import_file(&write_resnet(&dir, Depth::R18)?)?)?;
    // Each basic block's first convolution feeds only its second.
    ensure!(fused >= 8, "{fused} layers write INT8 for the next");
    check("ResNet-18 INT8", &l, &batches(), 0.0, true)
}

/// Depthwise layers, TF-SAME pads and ReLU6 in INT8, as the classic INT8 trap.
#[test]
fn efficientnet_lite0_int8() -> anyhow::Result<()> {
    let path = workspace_root().join("models/efficientnet_lite0/1/model.onnx");
    ensure!(path.is_file(), "{} is missing: run `make setup`", path.display());
    let (l, _, _) = lower_int8(import::import_file(&path)?)?;
    ensure!(l.analysis.int8.iter().any(|x| x.form == kiln_cuda::lower::Int8Form::Depthwise));
    check("EfficientNet-Lite0 INT8", &l, &batches(), 0.0, true)
}

/// ResNet-50's stride-1 1×1 convolutions and its head become INT8 GEMMs, the rest cuDNN INT8
/// convolutions; simulated at batch 1 (the heaviest model here).
#[test]
fn resnet50_int8_lowers_pointwise_convs_to_int8_gemms() -> anyhow::Result<()> {
    use kiln_cuda::lower::Int8Form;
    let dir = TempDir::new("cuda-lowering-r50-int8")?;
    let (l, steps, _) = lower_int8(import::import_file(&write_resnet(&dir, Depth::R50)?)?)?;
    let count = |f: Int8Form| l.analysis.int8.iter().filter(|x| x.form == f).count();
    ensure!(count(Int8Form::Gemm) == 34 && count(Int8Form::Conv) == 20, "{:?}", l.analysis.int8.len());
    let int8_gemms = steps
        .iter()
        .filter(|s| matches!(&s.kind, StepKind::Gemm { spec, .. } if spec.elem == kiln_cuda::blas::GemmElem::I8))
        .count();
    ensure!(int8_gemms == 34, "{int8_gemms} INT8 GEMM steps");
    check("ResNet-50 INT8", &l, &batches()[..1], 0.0, true)
}

/// A dense layer whose residual broadcasts (a `[S, N]` constant, as position embeddings are)
/// gets a full-size copy of it, and its few rows (4 per image) run as a padded INT8 GEMM.
#[test]
fn int8_dense_with_broadcast_residual_and_few_rows() -> anyhow::Result<()> {
    use kiln_onnx::{DataType, Dim, GraphBuilder};
    let mut b = GraphBuilder::new("dense-residual");
    let batch = Dim::Symbolic("batch".into());
    b.add_input("x", DataType::Float, &[batch.clone(), Dim::Fixed(4), Dim::Fixed(8)])?;
    let w: Vec<f32> = (0..8 * 12).map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0).collect();
    let w = b.add_initializer_f32("w", &[8, 12], &w)?;
    let pos: Vec<f32> = (0..4 * 12).map(|i| (i % 7) as f32 / 3.0 - 1.0).collect();
    let pos = b.add_initializer_f32("pos", &[4, 12], &pos)?;
    let y = b.add_node("MatMul", &["x", &w], vec![])?;
    b.add_node_with_outputs("Add", &[&y, &pos], &["y"], vec![])?;
    b.add_output("y", DataType::Float, &[batch, Dim::Fixed(4), Dim::Fixed(12)])?;
    let dir = TempDir::new("cuda-lowering-dense-residual")?;
    let path = dir.path("dense.onnx");
    kiln_onnx::save(&b.finish(kiln_onnx::DEFAULT_OPSET), &path)?;
    let (l, steps, _) = lower_int8(import::import_file(&path)?)?;
    ensure!(l.analysis.int8.iter().all(|x| x.residual_full.is_some()), "no full-size residual");
    let rows = steps.iter().find_map(|s| match &s.kind {
        StepKind::Gemm { spec, .. } => Some(spec.n),
        _ => None,
    });
    ensure!(rows == Some(kiln_cuda::lower::GEMM_MIN_ROWS as u64), "GEMM rows {rows:?}");
    // One layer leaves the arena nothing to reuse, so `check`'s arena bound does not apply.
    for (i, binding) in batches().iter().enumerate() {
        let out = simulate(&l, binding, 3 + i as u64)?;
        ensure!(out.rel_err == 0.0, "at {binding:?}: relative error {:.3e}", out.rel_err);
    }
    Ok(())
}

/// A mixed plan, as the accuracy gate leaves one: every other convolution (the stem among
/// them) kept in FP16, so INT8 layers read FP16 producers and FP16 layers read INT8 ones.
#[test]
fn resnet18_mixed_int8_and_fp16() -> anyhow::Result<()> {
    let dir = TempDir::new("cuda-lowering-r18-mixed")?;
    let original = import::import_file(&write_resnet(&dir, Depth::R18)?)?;
    let mut marked = 0;
    let l = lower_edited(original, Precision::F16, |g| {
        let convs: Vec<String> = g.nodes.iter().filter(|n| n.op == "kiln.FusedConv").map(|n| n.name.clone()).collect();
        let keep: Vec<String> = convs.iter().step_by(2).cloned().collect();
        marked = mark_int8_keeping(g, &batches(), |n| keep.iter().any(|k| k == n))?;
        Ok(())
    })?;
    let convs = l.graph.nodes.iter().filter(|n| n.op == "kiln.FusedConv").count();
    ensure!(
        marked == l.analysis.int8.len() && marked == convs / 2 + 1,
        "{marked} INT8 layers of {convs} convolutions + head"
    );
    check("ResNet-18 mixed INT8/FP16", &l, &batches(), 2e-2, true)
}

/// Reads device tensor `dval` at `binding` as an FP32 tensor (FP16 widened, INT8 as values).
fn read_dval(l: &Lowered, mem: &SimMemory, dval: usize, binding: &Binding) -> anyhow::Result<Tensor> {
    let d = &l.analysis.dvals[dval];
    let dims = eval_shape(&d.shape, binding).with_context(|| format!("{}: dims not bound", d.name))?;
    let base = match l.analysis.storage(dval) {
        Storage::Arena { offset } => BASES.arena + offset as u64,
        Storage::Weight { offset } => BASES.weights + offset as u64,
        Storage::Alias { .. } => bail!("{} has no storage", d.name),
    };
    let vals = mem.read(base, d.elem, dims.iter().product())?;
    Ok(Tensor::new(dims, kiln_engine::TensorData::F32(vals))?)
}

/// Runs the steps one by one and, after each INT8 layer, recomputes that layer with the
/// engine's emulation from the FP16 input (and residual) the simulated device holds:
/// the layer's output must be the same bits (within FP16 rounding after an activation the
/// requantiser leaves to the elementwise kernel). Returns the layers equal bit for bit, those
/// within rounding, and those skipped because their input arrived in INT8 from a producer.
fn each_int8_layer_exact(l: &Lowered, binding: &Binding, seed: u64) -> anyhow::Result<[usize; 3]> {
    use kiln_engine::quant::int8;
    let (g, a) = (&l.graph, &l.analysis);
    let (steps, _, mut mem) = ready(l, binding, seed)?;
    let scales = kiln_engine::quant::Int8Plan::from_graph(g);
    let layer_of: HashMap<&str, usize> =
        a.int8.iter().enumerate().map(|(i, x)| (g.nodes[x.node].name.as_str(), i)).collect();
    let (mut checked, mut rounded, mut skipped) = (0, 0, 0);
    for (k, step) in steps.iter().enumerate() {
        sim::run_step(&step.kind, &mut mem)?;
        let last_of_layer = steps.get(k + 1).is_none_or(|n| n.node != step.node);
        let Some(&li) = layer_of.get(step.node.as_str()).filter(|_| last_of_layer) else { continue };
        let layer = &a.int8[li];
        if a.dvals[layer.x].elem == kiln_cuda::kernels::Elem::I8 {
            skipped += 1;
            continue;
        }
        let node = &g.nodes[layer.node];
        let x = read_dval(l, &mem, layer.x, binding)?;
        let z = layer.residual.map(|z| read_dval(l, &mem, z, binding)).transpose()?;
        let w = node.input(1).and_then(|v| g.constant(v)).context("weights")?;
        let bias = node.input(2).and_then(|v| g.constant(v));
        // The plan's scales, as the emulation reads them (not the lowering's copy).
        let q = scales.nodes.get(&node.name).context("scales")?;
        let op = kiln_engine::ops::registry().get(&node.op).context("op")?;
        let want = int8::eval(node, op, &[Some(&x), Some(w), bias, z.as_ref()], q).map_err(|e| anyhow!(e))?;
        let want = kiln_engine::reference::round_f16(&want);
        let got = read_dval(l, &mem, layer.y, binding)?;
        let (gv, wv) = (got.as_f32().context("got")?, want.as_f32().context("want")?);
        let want_codes: Vec<f32>;
        let wv = match layer.out {
            kiln_cuda::kernels::Int8Out::I8 { scale, .. } => {
                want_codes = wv.iter().map(|&v| int8::quantize(v, scale) as f32).collect();
                &want_codes[..]
            }
            _ => wv,
        };
        let differ = gv.iter().zip(wv).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        if !layer.post_act.is_empty() {
            // An activation after requantisation (GELU, sigmoid …) is the elementwise kernel's
            // math, not the reference's: within FP16 rounding of each other.
            let far = gv.iter().zip(wv).filter(|(p, q)| (*p - *q).abs() > 2e-3 * p.abs().max(q.abs()) + 1e-4).count();
            ensure!(far == 0, "{}: {far} outputs beyond FP16 rounding of the emulation at {binding:?}", node.name);
            rounded += 1;
            continue;
        }
        ensure!(
            differ == 0,
            "{}: {differ} of {} outputs differ from the emulation at {binding:?}",
            node.name,
            gv.len()
        );
        checked += 1;
    }
    Ok([checked, rounded, skipped])
}

/// Attention projections and feed-forward layers in INT8 between FP16 LayerNorm, attention
/// and GELU: each INT8 layer equals the emulation exactly given the simulated device's
/// input; the whole model does not (the simulator's FP16 layers round in their own order,
/// and a value one FP16 step away can land on another INT8 code), so it is compared loosely.
#[test]
fn minilm_l6_int8() -> anyhow::Result<()> {
    let path = workspace_root().join(".kiln/assets/minilm-l6-int8.onnx");
    ensure!(path.is_file(), "{} is missing: run `make setup-trainer`", path.display());
    let (l, _, _) = lower_int8_at(import::import_file(&path)?, &text_bindings())?;
    ensure!(l.analysis.int8.len() >= 36, "{} INT8 layers (6 blocks × Q, K, V, output, 2 FFN)", l.analysis.int8.len());
    for (i, b) in text_bindings().iter().enumerate() {
        let [exact, rounded, skipped] = each_int8_layer_exact(&l, b, 40 + i as u64)?;
        println!(
            "MiniLM-L6 INT8 {b:?}: {exact} layers equal the emulation bit for bit, {rounded} (GELU after \
             requantisation) within FP16 rounding, {skipped} with INT8 inputs not checked"
        );
        ensure!(exact + rounded + skipped == l.analysis.int8.len() && exact >= 24);
    }
    check("MiniLM-L6 INT8", &l, &text_bindings(), 0.1, false)
}
