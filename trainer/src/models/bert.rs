//! A BERT encoder whose parameter names match HuggingFace `BertModel` checkpoints
//! (`embeddings.*`, `encoder.layer.{i}.*`, `pooler.*`), so pretrained weights such as
//! all-MiniLM-L6-v2 load name for name, plus the two heads kiln trains: sentence
//! embeddings (`last_hidden_state`) and text classification (`logits`).

use std::collections::HashMap;
use std::path::Path as FsPath;

use serde::{Deserialize, Serialize};
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use super::layers::{layer_norm, linear};
use super::{Dim, ElemKind, IoSpec, Network, logits_spec};
use crate::eager::Eager;
use crate::error::TrainError;
use crate::ops::{LayerNorm, Linear, Ops, Param};

/// What sits on top of the encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BertHead {
    /// Outputs `last_hidden_state` `[batch, sequence, hidden]` (mean-pool it for sentence embeddings).
    #[default]
    Embeddings,
    /// HuggingFace `BertForSequenceClassification`'s head: pooler (dense + tanh over `[CLS]`),
    /// dropout, `classifier` linear → `logits` `[batch, num_labels]`.
    Classifier { num_labels: i64 },
}

/// The fields of a HuggingFace BERT `config.json` kiln needs (same names, so the file
/// deserialises directly; other fields are ignored), plus kiln's head choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; HuggingFace falls back to `hidden_dropout_prob` when null.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Only `gelu` (exact, erf-based) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Only `absolute` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// kiln's own field; absent from HuggingFace files, where it defaults to the embedding head.
    #[serde(default, rename = "kiln_head")]
    pub head: BertHead,
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_dropout() -> f64 {
    0.1
}

fn default_hidden_act() -> String {
    "gelu".into()
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape (hidden 384, 6 layers, 12 heads, uncased WordPiece vocabulary).
    pub fn minilm_l6() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: default_layer_norm_eps(),
            hidden_dropout_prob: default_dropout(),
            attention_probs_dropout_prob: default_dropout(),
            classifier_dropout: None,
            hidden_act: default_hidden_act(),
            position_embedding_type: default_position_embedding_type(),
            head: BertHead::Embeddings,
        }
    }

    /// Reads a HuggingFace `config.json`.
    pub fn from_hf_json(path: impl AsRef<FsPath>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: not a BERT config.json: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same config with another head.
    pub fn with_head(mut self, head: BertHead) -> Self {
        self.head = head;
        self
    }

    /// Checks sizes and the options this implementation supports.
    pub fn validate(&self) -> Result<(), TrainError> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(TrainError::Config(format!("BERT {name} must be positive, got {v}")));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(TrainError::Config(format!(
                "BERT hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.hidden_act != "gelu" {
            return Err(TrainError::Config(format!("BERT hidden_act {:?} unsupported (only gelu)", self.hidden_act)));
        }
        if self.position_embedding_type != "absolute" {
            return Err(TrainError::Config(format!(
                "BERT position_embedding_type {:?} unsupported (only absolute)",
                self.position_embedding_type
            )));
        }
        let dropouts = [self.hidden_dropout_prob, self.attention_probs_dropout_prob, self.classifier_dropout()];
        if dropouts.iter().any(|p| !(0.0..1.0).contains(p)) {
            return Err(TrainError::Config(format!("BERT dropout probabilities must be in [0, 1), got {dropouts:?}")));
        }
        if let BertHead::Classifier { num_labels } = self.head
            && num_labels < 1
        {
            return Err(TrainError::Config(format!("BERT classifier needs num_labels ≥ 1, got {num_labels}")));
        }
        Ok(())
    }

    fn classifier_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

/// BERT's initialisation: N(0, 0.02) weights, zero biases.
const WEIGHT_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };
const BIAS_INIT: Init = Init::Const(0.0);

fn bert_linear(path: &Path<'_>, in_dim: i64, out_dim: i64) -> Result<Linear, TrainError> {
    linear(path, in_dim, out_dim, WEIGHT_INIT, BIAS_INIT)
}

#[derive(Debug)]
struct Embeddings {
    word: Param,
    position: Param,
    token_type: Param,
    norm: LayerNorm,
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Layer {
    fn new(path: &Path<'_>, cfg: &BertConfig) -> Result<Self, TrainError> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = path / "attention";
        let this = &attn / "self";
        Ok(Layer {
            query: bert_linear(&(&this / "query"), h, h)?,
            key: bert_linear(&(&this / "key"), h, h)?,
            value: bert_linear(&(&this / "value"), h, h)?,
            attention_output: bert_linear(&(&attn / "output" / "dense"), h, h)?,
            attention_norm: layer_norm(&(&attn / "output" / "LayerNorm"), h, eps)?,
            intermediate: bert_linear(&(path / "intermediate" / "dense"), h, cfg.intermediate_size)?,
            output: bert_linear(&(path / "output" / "dense"), cfg.intermediate_size, h)?,
            output_norm: layer_norm(&(path / "output" / "LayerNorm"), h, eps)?,
        })
    }

    /// Post-LN transformer layer, as BERT: `x = LN(x + attn(x))`, `x = LN(x + ffn(x))`.
    fn forward<O: Ops>(&self, ops: &mut O, x: &O::T, bias: &O::T, cfg: &BertConfig) -> Result<O::T, TrainError> {
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.hidden_size / heads;
        let q = ops.linear(x, &self.query)?;
        let q = ops.split_heads(&q, heads)?;
        let k = ops.linear(x, &self.key)?;
        let k = ops.split_heads(&k, heads)?;
        let v = ops.linear(x, &self.value)?;
        let v = ops.split_heads(&v, heads)?;
        let kt = ops.transpose_last(&k)?;
        let scores = ops.matmul(&q, &kt)?;
        let scores = ops.scale(&scores, 1.0 / (head_dim as f64).sqrt())?;
        let scores = ops.add(&scores, bias)?;
        let probs = ops.softmax(&scores)?;
        let probs = ops.dropout(&probs, cfg.attention_probs_dropout_prob)?;
        let context = ops.matmul(&probs, &v)?;
        let context = ops.merge_heads(&context)?;

        let a = ops.linear(&context, &self.attention_output)?;
        let a = ops.dropout(&a, cfg.hidden_dropout_prob)?;
        let a = ops.add(&a, x)?;
        let a = ops.layer_norm(&a, &self.attention_norm)?;

        let f = ops.linear(&a, &self.intermediate)?;
        let f = ops.gelu(&f)?;
        let f = ops.linear(&f, &self.output)?;
        let f = ops.dropout(&f, cfg.hidden_dropout_prob)?;
        let f = ops.add(&f, &a)?;
        ops.layer_norm(&f, &self.output_norm)
    }
}

#[derive(Debug)]
enum Head {
    Embeddings,
    Classifier { pooler: Linear, classifier: Linear },
}

/// BERT encoder plus head. Inputs: `input_ids`, `attention_mask`, `token_type_ids`
/// (int64 `[batch, sequence]`).
#[derive(Debug)]
pub struct Bert {
    cfg: BertConfig,
    /// The `tch::nn::Path` the model was created under (`""` at the root), stripped to get
    /// HuggingFace names.
    prefix: String,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    head: Head,
}

/// Names whose absence from a pretrained file is tolerated: the pooler (sentence-transformers
/// checkpoints drop it) and the classifier (a base checkpoint has none); they keep their init.
const OPTIONAL_PREFIXES: [&str; 2] = ["pooler.", "classifier."];

impl Bert {
    /// Registers the parameters under `path` with HuggingFace's names, initialised as BERT
    /// (N(0, 0.02), zero biases, unit layer norms).
    pub fn new(path: &Path<'_>, cfg: &BertConfig) -> Result<Self, TrainError> {
        cfg.validate()?;
        let h = cfg.hidden_size;
        let emb = path / "embeddings";
        let table = |name: &str, rows: i64| Param::var(&(&emb / name), "weight", &[rows, h], WEIGHT_INIT);
        let embeddings = Embeddings {
            word: table("word_embeddings", cfg.vocab_size)?,
            position: table("position_embeddings", cfg.max_position_embeddings)?,
            token_type: table("token_type_embeddings", cfg.type_vocab_size)?,
            norm: layer_norm(&(&emb / "LayerNorm"), h, cfg.layer_norm_eps)?,
        };
        let layer_root = path / "encoder" / "layer";
        let layers =
            (0..cfg.num_hidden_layers).map(|i| Layer::new(&(&layer_root / i), cfg)).collect::<Result<_, _>>()?;
        let head = match cfg.head {
            BertHead::Embeddings => Head::Embeddings,
            BertHead::Classifier { num_labels } => Head::Classifier {
                pooler: bert_linear(&(path / "pooler" / "dense"), h, h)?,
                classifier: bert_linear(&(path / "classifier"), h, num_labels)?,
            },
        };
        let prefix = path.components().collect::<Vec<_>>().join(".");
        Ok(Bert { cfg: cfg.clone(), prefix, embeddings, layers, head })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The encoder alone: `[batch, sequence]` ids, mask and token types → `last_hidden_state`
    /// `[batch, sequence, hidden]`, whatever the head.
    pub fn encode<O: Ops>(&self, ops: &mut O, ids: &O::T, mask: &O::T, types: &O::T) -> Result<O::T, TrainError> {
        let e = &self.embeddings;
        let words = ops.embedding(ids, &e.word)?;
        let positions = ops.position_embedding(ids, &e.position)?;
        let token_types = ops.embedding(types, &e.token_type)?;
        let x = ops.add(&words, &token_types)?;
        let x = ops.add(&x, &positions)?;
        let x = ops.layer_norm(&x, &e.norm)?;
        let mut x = ops.dropout(&x, self.cfg.hidden_dropout_prob)?;
        let bias = ops.attention_bias(mask)?;
        for layer in &self.layers {
            x = layer.forward(ops, &x, &bias, &self.cfg)?;
        }
        Ok(x)
    }

    /// A parameter's name without the path the model was created under.
    fn hf_name<'a>(&self, name: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            return name;
        }
        name.strip_prefix(self.prefix.as_str()).and_then(|n| n.strip_prefix('.')).unwrap_or(name)
    }

    /// Every parameter with its checkpoint name.
    fn params(&self) -> Vec<&Param> {
        fn linear(l: &Linear) -> impl Iterator<Item = &Param> {
            std::iter::once(&l.weight).chain(l.bias.as_ref())
        }
        fn norm(n: &LayerNorm) -> [&Param; 2] {
            [&n.weight, &n.bias]
        }
        let e = &self.embeddings;
        let mut out = vec![&e.word, &e.position, &e.token_type];
        out.extend(norm(&e.norm));
        for l in &self.layers {
            for fc in [&l.query, &l.key, &l.value, &l.attention_output, &l.intermediate, &l.output] {
                out.extend(linear(fc));
            }
            out.extend(norm(&l.attention_norm));
            out.extend(norm(&l.output_norm));
        }
        if let Head::Classifier { pooler, classifier } = &self.head {
            out.extend(linear(pooler));
            out.extend(linear(classifier));
        }
        out
    }

    /// Loads HuggingFace weights from a `.safetensors` file into this model's tensors (and so
    /// into its `VarStore`). Names are matched as registered (`embeddings.word_embeddings.weight`,
    /// …) or with the `bert.` prefix that `BertFor*` checkpoints use. Every `embeddings.*` and
    /// `encoder.*` tensor is required, with the model's exact shape; `pooler.*` and
    /// `classifier.*` may be absent and then keep their initialisation: their names are
    /// returned. Extra tensors in the file (e.g. `embeddings.position_ids`) are ignored.
    pub fn load_safetensors(&self, path: impl AsRef<FsPath>) -> Result<Vec<String>, TrainError> {
        let path = path.as_ref();
        let err = |message: String| TrainError::Checkpoint { path: path.to_path_buf(), message };
        let file: HashMap<String, Tensor> =
            Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?.into_iter().collect();
        let mut copies = Vec::new();
        let mut missing = Vec::new();
        let mut kept = Vec::new();
        for p in self.params() {
            let name = self.hf_name(&p.name);
            match file.get(name).or_else(|| file.get(&format!("bert.{name}"))) {
                Some(src) if src.size() != p.tensor.size() => {
                    return Err(err(format!(
                        "{name} has shape {:?} in the file but {:?} in the model",
                        src.size(),
                        p.tensor.size()
                    )));
                }
                Some(src) => copies.push((p, src)),
                None if OPTIONAL_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) => kept.push(name.to_owned()),
                None => missing.push(name),
            }
        }
        if !missing.is_empty() {
            let shown = missing.iter().take(8).copied().collect::<Vec<_>>().join(", ");
            return Err(err(format!(
                "{} required tensors missing (with or without a `bert.` prefix), e.g. {shown}",
                missing.len()
            )));
        }
        tch::no_grad(|| -> Result<(), TrainError> {
            for (p, src) in copies {
                // A shallow clone shares storage with the VarStore's variable, so the copy lands there too.
                let mut dst = p.tensor.shallow_clone();
                dst.f_copy_(src)?;
            }
            Ok(())
        })?;
        Ok(kept)
    }
}

impl Network for Bert {
    fn inputs(&self) -> Vec<IoSpec> {
        ["input_ids", "attention_mask", "token_type_ids"]
            .into_iter()
            .map(|name| IoSpec {
                name: name.into(),
                kind: ElemKind::I64,
                dims: vec![Dim::Dynamic("batch"), Dim::Dynamic("sequence")],
            })
            .collect()
    }

    fn outputs(&self) -> Vec<IoSpec> {
        match self.cfg.head {
            BertHead::Embeddings => vec![IoSpec {
                name: "last_hidden_state".into(),
                kind: ElemKind::F32,
                dims: vec![Dim::Dynamic("batch"), Dim::Dynamic("sequence"), Dim::Fixed(self.cfg.hidden_size)],
            }],
            BertHead::Classifier { num_labels } => vec![logits_spec(num_labels)],
        }
    }

    fn forward<O: Ops>(&self, ops: &mut O, inputs: &[O::T]) -> Result<Vec<O::T>, TrainError> {
        let [ids, mask, types] = inputs else {
            return Err(TrainError::Shape(format!(
                "BERT takes 3 inputs (input_ids, attention_mask, token_type_ids), got {}",
                inputs.len()
            )));
        };
        let hidden = self.encode(ops, ids, mask, types)?;
        match &self.head {
            Head::Embeddings => Ok(vec![hidden]),
            Head::Classifier { pooler, classifier } => {
                let cls = ops.first_token(&hidden)?;
                let pooled = ops.linear(&cls, pooler)?;
                let pooled = ops.tanh(&pooled)?;
                let pooled = ops.dropout(&pooled, self.cfg.classifier_dropout())?;
                Ok(vec![ops.linear(&pooled, classifier)?])
            }
        }
    }
}

/// Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the
/// encoder's `last_hidden_state` mean-pooled over real tokens (padding excluded by the
/// attention mask), then L2-normalised → `[sentences, hidden]` on the CPU. Sentences are
/// padded to the longest one (the tokenizer's own padding setting is ignored) and truncated
/// as the tokenizer says, never beyond `max_position_embeddings`. `device` is where the
/// model's parameters live.
pub fn sentence_embeddings(
    model: &Bert,
    device: Device,
    tokenizer: &tokenizers::Tokenizer,
    sentences: &[&str],
) -> Result<Tensor, TrainError> {
    let limit = usize::try_from(model.cfg.max_position_embeddings).unwrap_or(usize::MAX);
    let mut tokenizer = tokenizer.clone();
    let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
    tokenizer.with_padding(None);
    let truncation = match tokenizer.get_truncation() {
        Some(t) if t.max_length <= limit => None,
        Some(t) => Some(tokenizers::TruncationParams { max_length: limit, ..t.clone() }),
        None => Some(tokenizers::TruncationParams { max_length: limit, ..Default::default() }),
    };
    if truncation.is_some() {
        tokenizer.with_truncation(truncation).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    }
    let encodings =
        tokenizer.encode_batch(sentences.to_vec(), true).map_err(|e| TrainError::Tokenizer(e.to_string()))?;

    let (n, seq) = (encodings.len(), encodings.iter().map(|e| e.len()).max().unwrap_or(0));
    let mut ids = vec![i64::from(pad_id); n * seq];
    let mut mask = vec![0i64; n * seq];
    let mut types = vec![0i64; n * seq];
    for (row, e) in encodings.iter().enumerate() {
        let start = row * seq;
        for (i, ((&id, &m), &t)) in e.get_ids().iter().zip(e.get_attention_mask()).zip(e.get_type_ids()).enumerate() {
            ids[start + i] = i64::from(id);
            mask[start + i] = i64::from(m);
            types[start + i] = i64::from(t);
        }
    }
    let shape = [i64::try_from(n).unwrap_or(i64::MAX), i64::try_from(seq).unwrap_or(i64::MAX)];
    if n == 0 || seq == 0 {
        return Ok(Tensor::f_zeros([shape[0], model.cfg.hidden_size], (Kind::Float, Device::Cpu))?);
    }
    let tensor =
        |v: &[i64]| -> Result<Tensor, TrainError> { Ok(Tensor::f_from_slice(v)?.f_view(shape)?.f_to(device)?) };
    let (ids, mask, types) = (tensor(&ids)?, tensor(&mask)?, tensor(&types)?);

    tch::no_grad(|| {
        let hidden = model.encode(&mut Eager::eval(), &ids, &mask, &types)?;
        let weights = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
        let summed = hidden.f_mul(&weights)?.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
        let counts = weights.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?.f_clamp_min(1e-9)?;
        let mean = summed.f_div(&counts)?;
        let norm = mean.f_norm_scalaropt_dim(2.0, [1i64].as_slice(), true)?.f_clamp_min(1e-12)?;
        Ok(mean.f_div(&norm)?.f_to(Device::Cpu)?)
    })
}
