//! Zoo models: output shapes in training and evaluation, torchvision-exact ResNet
//! parameter names and counts, gradients that flow, and BERT's padding mask.
#![allow(clippy::unwrap_used)]

use kiln_trainer::TrainError;
use kiln_trainer::eager::Eager;
use kiln_trainer::models::{Arch, BertConfig, BertHead, Dim, ElemKind, ModelConfig, Network, Zoo};
use kiln_trainer::ops::{BatchNorm, Conv2d, LayerNorm, Linear, Ops, Param, Pool};
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

fn build(cfg: &ModelConfig) -> (VarStore, Zoo) {
    let vs = VarStore::new(Device::Cpu);
    let zoo = Zoo::new(&vs.root(), cfg).unwrap();
    (vs, zoo)
}

fn trainable_count(vs: &VarStore) -> i64 {
    vs.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum()
}

/// Runs `zoo` on random images in train and eval mode for batches 1 and 4.
fn check_image_model(cfg: &ModelConfig) {
    let (_vs, zoo) = build(cfg);
    let inputs = zoo.inputs();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].name, "image");
    assert_eq!(inputs[0].kind, ElemKind::F32);
    let (c, s) = (cfg.in_channels, cfg.image_size);
    assert_eq!(inputs[0].dims, vec![Dim::Dynamic("batch"), Dim::Fixed(c), Dim::Fixed(s), Dim::Fixed(s)]);
    let outputs = zoo.outputs();
    assert_eq!(outputs[0].name, "logits");
    assert_eq!(outputs[0].dims, vec![Dim::Dynamic("batch"), Dim::Fixed(cfg.num_classes)]);
    for batch in [1, 4] {
        let x = Tensor::randn([batch, c, s, s], (Kind::Float, Device::Cpu));
        for mut ops in [Eager::train(), Eager::eval()] {
            // Batch norm cannot train on a single value per channel (ResNet's last stage at batch 1 is 1×1).
            if ops.train && batch == 1 && cfg.arch != Arch::SmallCnn {
                continue;
            }
            let out = tch::no_grad(|| zoo.forward(&mut ops, std::slice::from_ref(&x))).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].size(), vec![batch, cfg.num_classes], "{:?} train={}", cfg.arch, ops.train);
            assert!(out[0].isfinite().all().int64_value(&[]) == 1);
        }
    }
}

#[test]
fn small_cnn_shapes() {
    check_image_model(&ModelConfig::small_cnn(10));
    // Any size divisible by 4, any channel count.
    check_image_model(&ModelConfig { in_channels: 3, image_size: 32, ..ModelConfig::small_cnn(7) });
}

#[test]
fn small_cnn_rejects_sizes_not_divisible_by_4() {
    let vs = VarStore::new(Device::Cpu);
    let err = Zoo::new(&vs.root(), &ModelConfig { image_size: 30, ..ModelConfig::small_cnn(10) }).unwrap_err();
    assert!(err.to_string().contains("divisible by 4"), "{err}");
}

#[test]
fn resnet_shapes() {
    // Smaller images than 224 keep the test fast; the architecture is size-agnostic.
    check_image_model(&ModelConfig { image_size: 64, ..ModelConfig::resnet18(10) });
    check_image_model(&ModelConfig { image_size: 64, in_channels: 1, ..ModelConfig::resnet50(5) });
}

#[test]
fn resnet_parameter_counts_match_torchvision() {
    let (vs, _) = build(&ModelConfig::resnet18(1000));
    assert_eq!(trainable_count(&vs), 11_689_512);
    let (vs, _) = build(&ModelConfig::resnet50(1000));
    assert_eq!(trainable_count(&vs), 25_557_032);
}

#[test]
fn resnet_names_match_torchvision() {
    let (vs, _) = build(&ModelConfig::resnet18(1000));
    let vars = vs.variables();
    // torchvision's resnet18 state dict has 122 entries, 20 of them `num_batches_tracked`.
    assert_eq!(vars.len(), 102);
    for (name, shape) in [
        ("conv1.weight", vec![64, 3, 7, 7]),
        ("bn1.running_var", vec![64]),
        ("layer1.0.conv1.weight", vec![64, 64, 3, 3]),
        ("layer2.0.conv1.weight", vec![128, 64, 3, 3]),
        ("layer2.0.downsample.0.weight", vec![128, 64, 1, 1]),
        ("layer2.0.downsample.1.running_mean", vec![128]),
        ("layer4.1.bn2.bias", vec![512]),
        ("fc.weight", vec![1000, 512]),
        ("fc.bias", vec![1000]),
    ] {
        assert_eq!(vars.get(name).map(Tensor::size), Some(shape), "{name}");
    }
    assert!(!vars.contains_key("layer1.0.downsample.0.weight"));

    let (vs, _) = build(&ModelConfig::resnet50(1000));
    let vars = vs.variables();
    // torchvision's resnet50 state dict: 53 convs + 53 batch norms × 5 + fc's 2 = 320 entries, minus
    // the 53 `num_batches_tracked`.
    assert_eq!(vars.len(), 267);
    for (name, shape) in [
        ("layer1.0.conv1.weight", vec![64, 64, 1, 1]),
        ("layer1.0.conv3.weight", vec![256, 64, 1, 1]),
        ("layer1.0.downsample.0.weight", vec![256, 64, 1, 1]),
        ("layer3.5.conv2.weight", vec![256, 256, 3, 3]),
        ("layer4.0.downsample.1.weight", vec![2048]),
        ("fc.weight", vec![1000, 2048]),
    ] {
        assert_eq!(vars.get(name).map(Tensor::size), Some(shape), "{name}");
    }
}

/// Eager, plus a log of every convolution's weight name and stride.
struct ConvLog {
    inner: Eager,
    convs: Vec<(String, i64)>,
}

macro_rules! delegate {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $name(&mut self, $($arg: $ty),*) -> Result<Tensor, TrainError> { self.inner.$name($($arg),*) })*
    };
}

impl Ops for ConvLog {
    type T = Tensor;

    fn conv2d(&mut self, x: &Tensor, conv: &Conv2d) -> Result<Tensor, TrainError> {
        self.convs.push((conv.weight.name.clone(), conv.stride));
        self.inner.conv2d(x, conv)
    }

    delegate! {
        batch_norm(x: &Tensor, bn: &BatchNorm);
        linear(x: &Tensor, fc: &Linear);
        layer_norm(x: &Tensor, ln: &LayerNorm);
        embedding(ids: &Tensor, table: &Param);
        position_embedding(like: &Tensor, table: &Param);
        relu(x: &Tensor);
        gelu(x: &Tensor);
        tanh(x: &Tensor);
        add(a: &Tensor, b: &Tensor);
        scale(x: &Tensor, factor: f64);
        matmul(a: &Tensor, b: &Tensor);
        softmax(x: &Tensor);
        dropout(x: &Tensor, p: f64);
        max_pool2d(x: &Tensor, pool: Pool);
        global_avg_pool(x: &Tensor);
        flatten(x: &Tensor);
        split_heads(x: &Tensor, heads: i64);
        merge_heads(x: &Tensor);
        first_token(x: &Tensor);
        transpose_last(x: &Tensor);
        attention_bias(mask: &Tensor);
    }
}

#[test]
fn resnet_strides_follow_torchvision_v1_5() {
    let (_vs, zoo) = build(&ModelConfig { image_size: 32, ..ModelConfig::resnet50(10) });
    let mut ops = ConvLog { inner: Eager::eval(), convs: Vec::new() };
    let x = Tensor::randn([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| zoo.forward(&mut ops, std::slice::from_ref(&x))).unwrap();
    assert_eq!(out[0].size(), vec![1, 10]);
    assert_eq!(ops.convs.len(), 53);
    let strided: Vec<&str> = ops.convs.iter().filter(|(_, s)| *s != 1).map(|(n, _)| n.as_str()).collect();
    // The stem, then each stage's first 3×3 conv and its projection (none in layer1, whose stride is 1).
    assert_eq!(
        strided,
        [
            "conv1.weight",
            "layer2.0.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer3.0.conv2.weight",
            "layer3.0.downsample.0.weight",
            "layer4.0.conv2.weight",
            "layer4.0.downsample.0.weight",
        ]
    );

    let (_vs, zoo) = build(&ModelConfig { image_size: 32, ..ModelConfig::resnet18(10) });
    let mut ops = ConvLog { inner: Eager::eval(), convs: Vec::new() };
    tch::no_grad(|| zoo.forward(&mut ops, std::slice::from_ref(&x))).unwrap();
    assert_eq!(ops.convs.len(), 20);
    let strided: Vec<&str> = ops.convs.iter().filter(|(_, s)| *s != 1).map(|(n, _)| n.as_str()).collect();
    assert_eq!(strided.len(), 7);
    assert_eq!(strided[1], "layer2.0.conv1.weight");
}

#[test]
fn small_cnn_learns_a_fixed_batch() {
    tch::manual_seed(0);
    let cfg = ModelConfig::small_cnn(10);
    let (vs, zoo) = build(&cfg);
    let x = Tensor::randn([16, 1, 28, 28], (Kind::Float, Device::Cpu));
    let y = Tensor::arange(16, (Kind::Int64, Device::Cpu)).remainder(10);
    let eval_loss = || {
        tch::no_grad(|| {
            let logits = zoo.forward(&mut Eager::eval(), std::slice::from_ref(&x)).unwrap();
            logits[0].cross_entropy_for_logits(&y).double_value(&[])
        })
    };
    let mut opt = tch::nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.01).unwrap();
    let train_step = |opt: &mut tch::nn::Optimizer| {
        let logits = zoo.forward(&mut Eager::train(), std::slice::from_ref(&x)).unwrap();
        let loss = logits[0].cross_entropy_for_logits(&y);
        opt.backward_step(&loss);
    };
    // A few steps first so the batch-norm running statistics describe this batch.
    for _ in 0..3 {
        train_step(&mut opt);
    }
    let before = eval_loss();
    for _ in 0..15 {
        train_step(&mut opt);
    }
    let after = eval_loss();
    eprintln!("fixed-batch loss {before:.4} → {after:.4}");
    assert!(after < before * 0.5, "loss {before} → {after}");
    // Every trainable tensor received a gradient.
    for t in vs.trainable_variables() {
        assert!(t.grad().defined(), "a parameter got no gradient");
    }
}

fn tiny_bert(head: BertHead) -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..BertConfig::minilm_l6()
    }
    .with_head(head)
}

fn bert_inputs(lengths: &[i64], seq: i64, vocab: i64) -> Vec<Tensor> {
    let n = lengths.len() as i64;
    let ids = Tensor::randint_low(1, vocab, [n, seq], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(seq, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let lens = Tensor::from_slice(lengths).unsqueeze(1);
    let mask = positions.lt_tensor(&lens).to_kind(Kind::Int64);
    let ids = &ids * &mask;
    let types = Tensor::zeros([n, seq], (Kind::Int64, Device::Cpu));
    vec![ids, mask, types]
}

#[test]
fn bert_embedding_shapes_with_padding() {
    let cfg = ModelConfig::bert(BertConfig::minilm_l6());
    let (_vs, zoo) = build(&cfg);
    let names: Vec<_> = zoo.inputs().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(zoo.outputs()[0].name, "last_hidden_state");
    assert_eq!(zoo.outputs()[0].dims, vec![Dim::Dynamic("batch"), Dim::Dynamic("sequence"), Dim::Fixed(384)]);
    for (lengths, seq) in [(vec![5i64], 5i64), (vec![7, 3, 1, 7], 7)] {
        let inputs = bert_inputs(&lengths, seq, 30522);
        for mut ops in [Eager::train(), Eager::eval()] {
            let out = tch::no_grad(|| zoo.forward(&mut ops, &inputs)).unwrap();
            assert_eq!(out[0].size(), vec![lengths.len() as i64, seq, 384]);
        }
    }
}

#[test]
fn bert_padding_does_not_change_real_tokens() {
    let (_vs, zoo) = build(&ModelConfig::bert(tiny_bert(BertHead::Embeddings)));
    let inputs = bert_inputs(&[4], 9, 50);
    let short: Vec<Tensor> = inputs.iter().map(|t| t.narrow(1, 0, 4)).collect();
    let (long, short) = tch::no_grad(|| {
        (zoo.forward(&mut Eager::eval(), &inputs).unwrap(), zoo.forward(&mut Eager::eval(), &short).unwrap())
    });
    let diff = (long[0].narrow(1, 0, 4) - &short[0]).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "padding changed real tokens by {diff}");
}

#[test]
fn bert_classifier_shapes_and_names() {
    let cfg = ModelConfig::bert(tiny_bert(BertHead::Classifier { num_labels: 3 }));
    assert_eq!(cfg.num_classes, 3);
    let (vs, zoo) = build(&cfg);
    assert_eq!(zoo.outputs()[0].name, "logits");
    assert_eq!(zoo.outputs()[0].dims, vec![Dim::Dynamic("batch"), Dim::Fixed(3)]);
    let vars = vs.variables();
    for name in [
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.1.attention.self.query.weight",
        "encoder.layer.1.attention.output.LayerNorm.bias",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.bias",
        "pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(vars.contains_key(name), "{name} missing");
    }
    let inputs = bert_inputs(&[6, 2], 6, 50);
    for mut ops in [Eager::train(), Eager::eval()] {
        let out = zoo.forward(&mut ops, &inputs).unwrap();
        assert_eq!(out[0].size(), vec![2, 3]);
    }
    // The head's num_labels and ModelConfig::num_classes must agree.
    let bad = ModelConfig { num_classes: 4, ..cfg };
    assert!(Zoo::new(&VarStore::new(Device::Cpu).root(), &bad).is_err());
}

#[test]
fn model_config_round_trips_through_json() {
    for cfg in [
        ModelConfig::small_cnn(10),
        ModelConfig::resnet50(100),
        ModelConfig::bert(BertConfig::minilm_l6().with_head(BertHead::Classifier { num_labels: 4 })),
    ] {
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<ModelConfig>(&text).unwrap(), cfg, "{text}");
    }
}

#[test]
fn bert_config_reads_huggingface_json() {
    let json = r#"{"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 384,
        "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
        "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 6, "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": 30522, "transformers_version": "4.8.2"}"#;
    let cfg: BertConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg, BertConfig::minilm_l6());
    assert_eq!(cfg.head, BertHead::Embeddings);
    let bad: BertConfig = serde_json::from_str(&json.replace("\"gelu\"", "\"relu\"")).unwrap();
    assert!(bad.validate().is_err());
}
