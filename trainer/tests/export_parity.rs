//! Export parity: a model exported by kiln's own tracer, run by ONNX Runtime, must
//! compute what libtorch computes (`Eager::eval()`), for several batch sizes and sequence
//! lengths. Two purpose-built networks together call every `Ops` method; the zoo models
//! are checked as they ship.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use anyhow::{Context, ensure};
use kiln_engine::{Backend, OrtBackend, OrtOptions, OrtRuntime, TensorData};
use kiln_onnx::{DataType, Dim as OnnxDim, GraphBuilder};
use kiln_tests::TempDir;
use kiln_trainer::TrainError;
use kiln_trainer::eager::Eager;
use kiln_trainer::export::{export, export_to_file};
use kiln_trainer::models::{BertConfig, BertHead, Dim, ElemKind, IoSpec, ModelConfig, Network, Zoo};
use kiln_trainer::ops::{BatchNorm, Conv2d, LayerNorm, Linear, Ops, Param, Pool};
use tch::nn::{Init, Path as VarPath, VarStore};
use tch::{Device, Kind, Tensor};

/// Largest allowed |ORT − libtorch| per element.
const TOLERANCE: f32 = 1e-4;

fn spec(name: &str, kind: ElemKind, dims: Vec<Dim>) -> IoSpec {
    IoSpec { name: name.into(), kind, dims }
}

fn var(p: &VarPath<'_>, name: &str, dims: &[i64]) -> Result<Param, TrainError> {
    Param::var(p, name, dims, Init::Randn { mean: 0.0, stdev: 0.3 })
}

fn linear(p: &VarPath<'_>, i: i64, o: i64, bias: bool) -> Result<Linear, TrainError> {
    let bias = if bias { Some(var(p, "bias", &[o])?) } else { None };
    Ok(Linear {
        weight: Param::var(p, "weight", &[o, i], Init::Randn { mean: 0.0, stdev: (1.0 / i as f64).sqrt() })?,
        bias,
    })
}

fn batch_norm(p: &VarPath<'_>, c: i64) -> Result<BatchNorm, TrainError> {
    Ok(BatchNorm {
        weight: Param::var(p, "weight", &[c], Init::Uniform { lo: 0.5, up: 1.5 })?,
        bias: var(p, "bias", &[c])?,
        running_mean: Param::buffer(p, "running_mean", &[c], 0.0)?,
        running_var: Param::buffer(p, "running_var", &[c], 1.0)?,
        eps: 1e-5,
        momentum: 0.5,
    })
}

fn layer_norm(p: &VarPath<'_>, dim: i64) -> Result<LayerNorm, TrainError> {
    Ok(LayerNorm {
        weight: Param::var(p, "weight", &[dim], Init::Uniform { lo: 0.5, up: 1.5 })?,
        bias: var(p, "bias", &[dim])?,
        eps: 1e-12,
    })
}

/// Conv / batch norm / pooling / linear on `[batch, 3, 16, 16]` → `logits [batch, 5]`
/// and `flat [batch, 128]`.
struct ConvNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    fc1: Linear,
    fc2: Linear,
}

impl ConvNet {
    fn new(p: &VarPath<'_>) -> Result<Self, TrainError> {
        let conv = |name: &str, i: i64, o: i64, groups: i64, bias: bool| -> Result<Conv2d, TrainError> {
            let p = p / name;
            let weight = Param::var(&p, "weight", &[o, i / groups, 3, 3], Init::Randn { mean: 0.0, stdev: 0.2 })?;
            let bias = if bias { Some(var(&p, "bias", &[o])?) } else { None };
            Ok(Conv2d { weight, bias, stride: 1, padding: 1, groups })
        };
        Ok(ConvNet {
            conv1: conv("conv1", 3, 8, 1, true)?,
            bn1: batch_norm(&(p / "bn1"), 8)?,
            conv2: conv("conv2", 8, 8, 2, false)?,
            bn2: batch_norm(&(p / "bn2"), 8)?,
            fc1: linear(&(p / "fc1"), 8, 16, true)?,
            fc2: linear(&(p / "fc2"), 16, 5, false)?,
        })
    }
}

impl Network for ConvNet {
    fn inputs(&self) -> Vec<IoSpec> {
        let dims = vec![Dim::Dynamic("batch"), Dim::Fixed(3), Dim::Fixed(16), Dim::Fixed(16)];
        vec![spec("image", ElemKind::F32, dims)]
    }

    fn outputs(&self) -> Vec<IoSpec> {
        vec![
            spec("logits", ElemKind::F32, vec![Dim::Dynamic("batch"), Dim::Fixed(5)]),
            spec("flat", ElemKind::F32, vec![Dim::Dynamic("batch"), Dim::Fixed(128)]),
        ]
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        let x = ops.conv2d(&inputs[0], &self.conv1)?;
        let x = ops.batch_norm(&x, &self.bn1)?;
        let x = ops.relu(&x)?;
        let x = ops.max_pool2d(&x, Pool { kernel: 3, stride: 2, padding: 1 })?;
        let y = ops.conv2d(&x, &self.conv2)?;
        let y = ops.batch_norm(&y, &self.bn2)?;
        let y = ops.scale(&y, 0.5)?;
        let y = ops.add(&y, &x)?;
        let y = ops.relu(&y)?;
        let flat = ops.max_pool2d(&y, Pool { kernel: 2, stride: 2, padding: 0 })?;
        let flat = ops.flatten(&flat)?;
        let g = ops.global_avg_pool(&y)?;
        let h = ops.linear(&g, &self.fc1)?;
        let h = ops.tanh(&h)?;
        let h = ops.dropout(&h, 0.5)?;
        Ok(vec![ops.linear(&h, &self.fc2)?, flat])
    }
}

/// One post-LN transformer layer over `input_ids` / `attention_mask` `[batch, sequence]`
/// → `hidden [batch, sequence, 16]` and `pooled [batch, 16]`.
struct TinyTransformer {
    tokens: Param,
    positions: Param,
    ln0: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    up: Linear,
    down: Linear,
    ln2: LayerNorm,
    pool: Linear,
}

const HIDDEN: i64 = 16;
const HEADS: i64 = 4;
const VOCAB: i64 = 50;

impl TinyTransformer {
    fn new(p: &VarPath<'_>) -> Result<Self, TrainError> {
        Ok(TinyTransformer {
            tokens: var(&(p / "tokens"), "weight", &[VOCAB, HIDDEN])?,
            positions: var(&(p / "positions"), "weight", &[12, HIDDEN])?,
            ln0: layer_norm(&(p / "ln0"), HIDDEN)?,
            q: linear(&(p / "q"), HIDDEN, HIDDEN, true)?,
            // No bias: the rank-3 linear without Add.
            k: linear(&(p / "k"), HIDDEN, HIDDEN, false)?,
            v: linear(&(p / "v"), HIDDEN, HIDDEN, true)?,
            o: linear(&(p / "o"), HIDDEN, HIDDEN, true)?,
            ln1: layer_norm(&(p / "ln1"), HIDDEN)?,
            up: linear(&(p / "up"), HIDDEN, 32, true)?,
            down: linear(&(p / "down"), 32, HIDDEN, true)?,
            ln2: layer_norm(&(p / "ln2"), HIDDEN)?,
            pool: linear(&(p / "pool"), HIDDEN, HIDDEN, true)?,
        })
    }
}

impl Network for TinyTransformer {
    fn inputs(&self) -> Vec<IoSpec> {
        let dims = || vec![Dim::Dynamic("batch"), Dim::Dynamic("sequence")];
        vec![spec("input_ids", ElemKind::I64, dims()), spec("attention_mask", ElemKind::I64, dims())]
    }

    fn outputs(&self) -> Vec<IoSpec> {
        vec![
            spec("hidden", ElemKind::F32, vec![Dim::Dynamic("batch"), Dim::Dynamic("sequence"), Dim::Fixed(HIDDEN)]),
            spec("pooled", ElemKind::F32, vec![Dim::Dynamic("batch"), Dim::Fixed(HIDDEN)]),
        ]
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        let (ids, mask) = (&inputs[0], &inputs[1]);
        let words = ops.embedding(ids, &self.tokens)?;
        let positions = ops.position_embedding(ids, &self.positions)?;
        let x = ops.add(&words, &positions)?;
        let x = ops.layer_norm(&x, &self.ln0)?;
        let x = ops.dropout(&x, 0.1)?;
        let bias = ops.attention_bias(mask)?;
        let q = ops.linear(&x, &self.q)?;
        let q = ops.split_heads(&q, HEADS)?;
        let k = ops.linear(&x, &self.k)?;
        let k = ops.split_heads(&k, HEADS)?;
        let v = ops.linear(&x, &self.v)?;
        let v = ops.split_heads(&v, HEADS)?;
        let kt = ops.transpose_last(&k)?;
        let scores = ops.matmul(&q, &kt)?;
        let scores = ops.scale(&scores, 0.5)?;
        let scores = ops.add(&scores, &bias)?;
        let probs = ops.softmax(&scores)?;
        let context = ops.matmul(&probs, &v)?;
        let context = ops.merge_heads(&context)?;
        let a = ops.linear(&context, &self.o)?;
        let a = ops.add(&a, &x)?;
        let a = ops.layer_norm(&a, &self.ln1)?;
        let f = ops.linear(&a, &self.up)?;
        let f = ops.gelu(&f)?;
        let f = ops.linear(&f, &self.down)?;
        let f = ops.add(&f, &a)?;
        let hidden = ops.layer_norm(&f, &self.ln2)?;
        let cls = ops.first_token(&hidden)?;
        let pooled = ops.linear(&cls, &self.pool)?;
        Ok(vec![hidden, ops.tanh(&pooled)?])
    }
}

fn runtime() -> anyhow::Result<OrtRuntime> {
    // One ONNX Runtime environment per process; `load` hands back the same one every time.
    Ok(OrtRuntime::load(&kiln_tests::ort_library()?)?)
}

/// Exports `net`, checks the file with Python's onnx checker (when the venv exists) and loads it in ORT.
fn exported<N: Network>(net: &N, dir: &TempDir, name: &str) -> anyhow::Result<OrtBackend> {
    exported_at(net, dir, name, kiln_onnx::DEFAULT_OPSET)
}

fn exported_at<N: Network>(net: &N, dir: &TempDir, name: &str, opset: i64) -> anyhow::Result<OrtBackend> {
    let path = dir.path(name);
    export_to_file(net, &path, opset)?;
    python_check(&path)?;
    Ok(OrtBackend::load(&runtime()?, &path, &OrtOptions { intra_threads: 2, ..OrtOptions::default() })?)
}

fn python_check(path: &Path) -> anyhow::Result<()> {
    let Ok(python) = kiln_tests::venv_python() else {
        println!("onnx checker skipped: the project venv is missing (run `make setup`)");
        return Ok(());
    };
    let script = "import sys, onnx; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)";
    let out = std::process::Command::new(python).args(["-c", script]).arg(path).output()?;
    ensure!(out.status.success(), "onnx checker rejected {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn to_engine(t: &Tensor) -> anyhow::Result<kiln_engine::Tensor> {
    let shape = t.size().iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>()?;
    let flat = t.f_contiguous()?.f_reshape([-1])?;
    let data = match t.kind() {
        Kind::Float => TensorData::F32(Vec::<f32>::try_from(&flat)?),
        Kind::Int64 => TensorData::I64(Vec::<i64>::try_from(&flat)?),
        other => anyhow::bail!("unsupported input kind {other:?}"),
    };
    Ok(kiln_engine::Tensor::new(shape, data)?)
}

/// Runs `inputs` through libtorch (eval) and ORT; returns the largest difference over all outputs.
fn compare<N: Network>(net: &N, ort: &mut OrtBackend, inputs: &[Tensor]) -> anyhow::Result<f32> {
    let names: Vec<String> = ort.metadata().outputs.iter().map(|o| o.name.clone()).collect();
    ensure!(names == net.outputs().iter().map(|o| o.name.clone()).collect::<Vec<_>>(), "output names {names:?}");
    let expected = tch::no_grad(|| net.forward(&mut Eager::eval(), inputs))?;
    let feeds = inputs.iter().map(to_engine).collect::<anyhow::Result<Vec<_>>>()?;
    let got = ort.run(&feeds)?;
    let mut worst = 0.0f32;
    for ((want, have), name) in expected.iter().zip(&got).zip(&names) {
        let want_shape: Vec<usize> = want.size().iter().map(|&d| d as usize).collect();
        ensure!(have.shape() == want_shape.as_slice(), "{name}: ORT shape {:?}, libtorch {want_shape:?}", have.shape());
        let want = Vec::<f32>::try_from(&want.f_contiguous()?.f_reshape([-1])?)?;
        let have = have.as_f32().context("ORT output is not FP32")?;
        // A vanishing reference would make the comparison meaningless.
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        ensure!(scale > 1e-3, "{name}: libtorch output is all ~0 (max |v| = {scale})");
        for (a, b) in want.iter().zip(have) {
            ensure!(a.is_finite() && b.is_finite(), "{name}: non-finite value (libtorch {a}, ORT {b})");
            worst = worst.max((a - b).abs());
        }
    }
    ensure!(worst <= TOLERANCE, "max |ORT − libtorch| = {worst} > {TOLERANCE}");
    Ok(worst)
}

/// A few training-mode forwards so the batch norms' running statistics are not the trivial 0/1.
fn warm_batch_norm<N: Network>(net: &N, inputs: impl Fn() -> anyhow::Result<Vec<Tensor>>) -> anyhow::Result<()> {
    for _ in 0..3 {
        let x = inputs()?;
        tch::no_grad(|| net.forward(&mut Eager::train(), &x))?;
    }
    Ok(())
}

fn image(n: i64, c: i64, side: i64) -> anyhow::Result<Tensor> {
    Ok(Tensor::f_randn([n, c, side, side], (Kind::Float, Device::Cpu))?)
}

/// Random ids, a mask with random right padding (the first token always kept), zero token types.
fn text(n: i64, s: i64, vocab: i64) -> anyhow::Result<[Tensor; 3]> {
    let ids = Tensor::f_randint(vocab, [n, s], (Kind::Int64, Device::Cpu))?;
    let lengths = Tensor::f_randint(s, [n, 1], (Kind::Int64, Device::Cpu))?.f_add_scalar(1)?;
    let positions = Tensor::f_arange(s, (Kind::Int64, Device::Cpu))?.f_unsqueeze(0)?;
    let mask = positions.f_lt_tensor(&lengths)?.f_to_kind(Kind::Int64)?;
    let types = Tensor::f_zeros([n, s], (Kind::Int64, Device::Cpu))?;
    Ok([ids, mask, types])
}

#[test]
fn conv_net_matches_libtorch() -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let net = ConvNet::new(&vs.root())?;
    warm_batch_norm(&net, || Ok(vec![image(4, 3, 16)?]))?;
    let dir = TempDir::new("export-conv")?;
    let mut ort = exported(&net, &dir, "conv.onnx")?;
    for n in [1, 3, 8] {
        let diff = compare(&net, &mut ort, &[image(n, 3, 16)?])?;
        println!("conv net, batch {n}: max diff {diff:e}");
    }
    Ok(())
}

#[test]
fn transformer_matches_libtorch() -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let net = TinyTransformer::new(&vs.root())?;
    let dir = TempDir::new("export-transformer")?;
    let mut ort = exported(&net, &dir, "transformer.onnx")?;
    for n in [1, 3, 8] {
        for s in [5, 12] {
            let [ids, mask, _] = text(n, s, VOCAB)?;
            let diff = compare(&net, &mut ort, &[ids, mask])?;
            println!("transformer, batch {n}, sequence {s}: max diff {diff:e}");
        }
    }
    Ok(())
}

/// The newest opset the exporter accepts exports the same computation.
#[test]
fn newest_opset_matches_libtorch() -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let (conv, transformer) = (ConvNet::new(&(vs.root() / "conv"))?, TinyTransformer::new(&(vs.root() / "tiny"))?);
    let dir = TempDir::new("export-opset")?;
    let opset = *kiln_trainer::export::OPSETS.end();
    let mut ort = exported_at(&conv, &dir, "conv.onnx", opset)?;
    compare(&conv, &mut ort, &[image(2, 3, 16)?])?;
    let mut ort = exported_at(&transformer, &dir, "transformer.onnx", opset)?;
    let [ids, mask, _] = text(2, 6, VOCAB)?;
    compare(&transformer, &mut ort, &[ids, mask])?;
    Ok(())
}

#[test]
fn exported_graph_shape() -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let net = TinyTransformer::new(&vs.root())?;
    let model = export(&net, 17)?;
    let graph = model.graph.context("no graph")?;
    // Every parameter once, by its checkpoint name; linear weights used by MatMul as `_t` copies.
    let names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    for name in ["tokens.weight", "positions.weight", "q.weight_t", "k.weight_t", "pool.weight", "ln2.bias"] {
        ensure!(names.iter().filter(|n| **n == name).count() == 1, "{name} in {names:?}");
    }
    ensure!(!names.contains(&"q.weight"), "q.weight is only used transposed");
    let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    ensure!(inputs == ["input_ids", "attention_mask"], "{inputs:?}");
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
    for op in ["Gather", "Shape", "Slice", "Unsqueeze", "LayerNormalization", "Erf", "Softmax", "Cast", "Gemm"] {
        ensure!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    ensure!(!ops.contains(&"Dropout"), "dropout must vanish from the graph");
    Ok(())
}

#[test]
fn export_rejects_bad_requests() -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let net = ConvNet::new(&vs.root())?;
    ensure!(matches!(export(&net, 16), Err(TrainError::Export(_))), "opset 16 has no LayerNormalization");
    let dir = TempDir::new("export-bad")?;
    let missing = dir.path("no/such/dir/model.onnx");
    ensure!(matches!(export_to_file(&net, &missing, 17), Err(TrainError::Io { .. })), "unwritable path");
    // A declared output rank that does not match the traced value.
    struct Wrong;
    impl Network for Wrong {
        fn inputs(&self) -> Vec<IoSpec> {
            vec![spec("x", ElemKind::F32, vec![Dim::Dynamic("batch"), Dim::Fixed(4)])]
        }
        fn outputs(&self) -> Vec<IoSpec> {
            vec![spec("y", ElemKind::F32, vec![Dim::Dynamic("batch")])]
        }
        fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
            Ok(vec![ops.relu(&inputs[0])?])
        }
    }
    ensure!(matches!(export(&Wrong, 17), Err(TrainError::Export(_))), "rank mismatch accepted");
    Ok(())
}

/// A graph written with kiln-onnx's builder alone runs in ONNX Runtime.
#[test]
fn hand_built_graph_runs_in_ort() -> anyhow::Result<()> {
    let mut g = GraphBuilder::new("mlp");
    g.add_input("x", DataType::Float, &[OnnxDim::Symbolic("batch".into()), OnnxDim::Fixed(3)])?;
    let w = g.add_initializer_f32("w", &[3, 2], &[1.0, -1.0, 0.5, 2.0, -0.25, 0.0])?;
    let b = g.add_initializer_f32("b", &[2], &[0.1, -0.2])?;
    let mm = g.add_node("MatMul", &["x", &w], vec![])?;
    let sum = g.add_node("Add", &[&mm, &b], vec![])?;
    g.add_node_with_outputs("Relu", &[&sum], &["y"], vec![])?;
    g.add_output("y", DataType::Float, &[OnnxDim::Symbolic("batch".into()), OnnxDim::Fixed(2)])?;
    let dir = TempDir::new("export-mlp")?;
    let path = dir.path("mlp.onnx");
    kiln_onnx::save(&g.finish(17), &path)?;
    let mut ort = OrtBackend::load(&runtime()?, &path, &OrtOptions::default())?;
    let x = kiln_engine::Tensor::new(vec![2, 3], TensorData::F32(vec![1.0, 2.0, 3.0, -1.0, 0.0, 1.0]))?;
    let y = ort.run(&[x])?;
    // Row 1: [1 + 1 − 0.75 + 0.1, −1 + 4 + 0 − 0.2]; row 2: [−1 − 0.25 + 0.1 → 0 (ReLU), 1 − 0.2].
    ensure!(y[0].shape() == [2, 2], "{:?}", y[0].shape());
    let got = y[0].as_f32().context("fp32")?;
    for (a, b) in got.iter().zip([1.35f32, 2.8, 0.0, 0.8]) {
        ensure!((a - b).abs() < 1e-6, "{got:?}");
    }
    Ok(())
}

/// Adds N(0, `std`) noise to every parameter, so that no layer is trivially the identity
/// (unit layer norms, zero biases, BERT's tiny N(0, 0.02) weights).
fn perturb(vs: &VarStore, std: f64) -> anyhow::Result<()> {
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, mut t) in vs.variables() {
            if t.kind() == Kind::Float && !name.ends_with("running_mean") && !name.ends_with("running_var") {
                let noise = t.f_randn_like()?.f_mul_scalar(std)?;
                let _ = t.f_add_(&noise)?;
            }
        }
        Ok(())
    })
}

fn zoo_image_parity(cfg: &ModelConfig, tag: &str) -> anyhow::Result<()> {
    let vs = VarStore::new(Device::Cpu);
    let net = Zoo::new(&vs.root(), cfg)?;
    perturb(&vs, 0.02)?;
    let (c, side) = (cfg.in_channels, cfg.image_size);
    warm_batch_norm(&net, || Ok(vec![image(4, c, side)?]))?;
    let dir = TempDir::new(&format!("export-{tag}"))?;
    let mut ort = exported(&net, &dir, &format!("{tag}.onnx"))?;
    for n in [1, 3, 8] {
        let diff = compare(&net, &mut ort, &[image(n, c, side)?])?;
        println!("{tag}, batch {n}: max diff {diff:e}");
    }
    Ok(())
}

#[test]
fn zoo_small_cnn_matches_libtorch() -> anyhow::Result<()> {
    zoo_image_parity(&ModelConfig::small_cnn(10), "small-cnn")
}

/// ResNets at 64×64 rather than 224×224: the same layers, a sixteenth of the work.
#[test]
fn zoo_resnet18_matches_libtorch() -> anyhow::Result<()> {
    zoo_image_parity(&ModelConfig { image_size: 64, ..ModelConfig::resnet18(10) }, "resnet18")
}

#[test]
fn zoo_resnet50_matches_libtorch() -> anyhow::Result<()> {
    zoo_image_parity(&ModelConfig { image_size: 64, ..ModelConfig::resnet50(10) }, "resnet50")
}

#[test]
fn zoo_bert_matches_libtorch() -> anyhow::Result<()> {
    let small = BertConfig {
        vocab_size: 100,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 32,
        ..BertConfig::minilm_l6()
    };
    for head in [BertHead::Embeddings, BertHead::Classifier { num_labels: 3 }] {
        let vs = VarStore::new(Device::Cpu);
        let net = Zoo::new(&vs.root(), &ModelConfig::bert(small.clone().with_head(head)))?;
        perturb(&vs, 0.1)?;
        let dir = TempDir::new("export-bert")?;
        let mut ort = exported(&net, &dir, "bert.onnx")?;
        for n in [1, 3, 8] {
            for s in [7, 16] {
                let [ids, mask, _] = text(n, s, small.vocab_size)?;
                let types = Tensor::f_randint(small.type_vocab_size, [n, s], (Kind::Int64, Device::Cpu))?;
                let diff = compare(&net, &mut ort, &[ids, mask, types])?;
                println!("bert {head:?}, batch {n}, sequence {s}: max diff {diff:e}");
            }
        }
    }
    Ok(())
}
