//! all-MiniLM-L6-v2 loaded from HuggingFace safetensors into kiln's BERT gives the same
//! sentence embeddings as the reference ONNX export run by ONNX Runtime.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use kiln_engine::{Backend, OrtBackend, OrtOptions, OrtRuntime, TensorData};
use kiln_trainer::models::{Bert, BertConfig, BertHead, sentence_embeddings};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Varied lengths so that padding to the longest is exercised; pairs (0, 1) and (5, 6) are paraphrases.
const SENTENCES: [&str; 8] = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today after the central bank unexpectedly raised interest rates again.",
    "Cats sleep.",
    "The quick brown fox jumps over the lazy dog near the riverbank while the children watch from the old bridge.",
    "How do I reset my password?",
    "I forgot my login credentials; how can I recover them?",
    "Photosynthesis converts light energy into chemical energy in plants.",
];

struct Assets {
    config: PathBuf,
    weights: PathBuf,
    tokenizer: PathBuf,
    onnx: PathBuf,
    ort: PathBuf,
}

fn assets() -> Option<Assets> {
    let root = kiln_tests::workspace_root().join(".kiln/assets");
    let dir = root.join("minilm-l6");
    let ort = match kiln_tests::ort_library() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping: {e}");
            return None;
        }
    };
    let a = Assets {
        config: dir.join("config.json"),
        weights: dir.join("model.safetensors"),
        tokenizer: dir.join("tokenizer.json"),
        onnx: root.join("minilm-l6-int8.onnx"),
        ort,
    };
    for p in [&a.config, &a.weights, &a.tokenizer, &a.onnx] {
        if !p.is_file() {
            eprintln!("skipping: {} is missing (run scripts/setup-trainer)", p.display());
            return None;
        }
    }
    Some(a)
}

fn load_minilm(a: &Assets, head: BertHead) -> (VarStore, Bert, Vec<String>) {
    let vs = VarStore::new(Device::Cpu);
    let cfg = BertConfig::from_hf_json(&a.config).unwrap().with_head(head);
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads), (384, 6, 12));
    let bert = Bert::new(&vs.root(), &cfg).unwrap();
    let kept = bert.load_safetensors(&a.weights).unwrap();
    (vs, bert, kept)
}

/// Tokenizes like `sentence_embeddings` (padded to the longest sentence): `(ids, mask, types, n, seq)`.
fn tokenize(tokenizer: &tokenizers::Tokenizer) -> (Vec<i64>, Vec<i64>, Vec<i64>, usize, usize) {
    let mut tokenizer = tokenizer.clone();
    tokenizer.with_padding(None);
    let enc = tokenizer.encode_batch(SENTENCES.to_vec(), true).unwrap();
    let (n, seq) = (enc.len(), enc.iter().map(|e| e.len()).max().unwrap());
    let (mut ids, mut mask, mut types) = (vec![0i64; n * seq], vec![0i64; n * seq], vec![0i64; n * seq]);
    for (r, e) in enc.iter().enumerate() {
        for i in 0..e.len() {
            ids[r * seq + i] = i64::from(e.get_ids()[i]);
            mask[r * seq + i] = i64::from(e.get_attention_mask()[i]);
            types[r * seq + i] = i64::from(e.get_type_ids()[i]);
        }
    }
    (ids, mask, types, n, seq)
}

/// The reference: ONNX Runtime's `last_hidden_state`, mean-pooled with the mask and L2-normalised.
fn onnx_embeddings(a: &Assets, tokenizer: &tokenizers::Tokenizer) -> Tensor {
    let (ids, mask, types, n, seq) = tokenize(tokenizer);
    let runtime = OrtRuntime::load(&a.ort).unwrap();
    let mut backend = OrtBackend::load(&runtime, &a.onnx, &OrtOptions::default()).unwrap();
    let feeds: Vec<kiln_engine::Tensor> = backend
        .metadata()
        .inputs
        .iter()
        .map(|spec| {
            let data = match spec.name.as_str() {
                "input_ids" => ids.clone(),
                "attention_mask" => mask.clone(),
                "token_type_ids" => types.clone(),
                other => panic!("unexpected ONNX input {other}"),
            };
            kiln_engine::Tensor::new(vec![n, seq], TensorData::I64(data)).unwrap()
        })
        .collect();
    let outputs = backend.run(&feeds).unwrap();
    let index = backend.metadata().outputs.iter().position(|s| s.name == "last_hidden_state").unwrap();
    let hidden = &outputs[index];
    assert_eq!(hidden.shape(), [n, seq, 384]);
    let hidden = Tensor::from_slice(hidden.as_f32().unwrap()).view([n as i64, seq as i64, 384]);
    let weights = Tensor::from_slice(&mask).view([n as i64, seq as i64, 1]).to_kind(Kind::Float);
    let mean =
        (hidden * &weights).sum_dim_intlist(1, false, Kind::Float) / weights.sum_dim_intlist(1, false, Kind::Float);
    let norm = mean.norm_scalaropt_dim(2.0, 1, true);
    mean / norm
}

fn cosine(a: &Tensor, b: &Tensor, i: i64, j: i64) -> f64 {
    // Rows are unit vectors, so the dot product is the cosine.
    (a.get(i) * b.get(j)).sum(Kind::Double).double_value(&[])
}

#[test]
fn minilm_matches_onnx_runtime() {
    let Some(a) = assets() else { return };
    let tokenizer = tokenizers::Tokenizer::from_file(&a.tokenizer).unwrap();
    let (_vs, bert, kept) = load_minilm(&a, BertHead::Embeddings);
    assert!(kept.is_empty(), "{kept:?}");

    let ours = sentence_embeddings(&bert, Device::Cpu, &tokenizer, &SENTENCES).unwrap();
    assert_eq!(ours.size(), [SENTENCES.len() as i64, 384]);
    let reference = onnx_embeddings(&a, &tokenizer);

    let sims: Vec<f64> = (0..SENTENCES.len() as i64).map(|i| cosine(&ours, &reference, i, i)).collect();
    eprintln!("cosine(kiln, onnx) per sentence: {sims:?}");
    for (s, sim) in SENTENCES.iter().zip(&sims) {
        assert!(*sim >= 0.999, "cosine {sim} < 0.999 for {s:?}");
    }

    // Padding must not leak into a sentence's embedding: each alone gives the same vector.
    for (i, s) in SENTENCES.iter().enumerate() {
        let alone = sentence_embeddings(&bert, Device::Cpu, &tokenizer, &[s]).unwrap();
        let sim = cosine(&alone, &ours, 0, i as i64);
        assert!(sim > 0.99999, "sentence {i} alone vs padded: cosine {sim}");
    }

    // Sanity of the embedding space: paraphrases are closer than unrelated sentences.
    let (para_a, unrelated_a) = (cosine(&ours, &ours, 0, 1), cosine(&ours, &ours, 0, 2));
    let (para_b, unrelated_b) = (cosine(&ours, &ours, 5, 6), cosine(&ours, &ours, 5, 3));
    eprintln!("paraphrases {para_a:.3} / {para_b:.3}, unrelated {unrelated_a:.3} / {unrelated_b:.3}");
    assert!(para_a > unrelated_a + 0.2, "{para_a} vs {unrelated_a}");
    assert!(para_b > unrelated_b + 0.2, "{para_b} vs {unrelated_b}");
}

#[test]
fn minilm_loads_into_a_classifier() {
    let Some(a) = assets() else { return };
    // The checkpoint has a pooler but no classifier: only the classifier keeps its init.
    let (_vs, _bert, kept) = load_minilm(&a, BertHead::Classifier { num_labels: 4 });
    assert_eq!(kept, ["classifier.weight", "classifier.bias"]);

    // A model registered under a sub-path still finds its HuggingFace names.
    let vs = VarStore::new(Device::Cpu);
    let cfg = BertConfig::from_hf_json(&a.config).unwrap();
    let bert = Bert::new(&(vs.root() / "student"), &cfg).unwrap();
    assert!(bert.load_safetensors(&a.weights).unwrap().is_empty());
    let loaded = &vs.variables()["student.embeddings.word_embeddings.weight"];
    assert!(loaded.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    let tokenizer = tokenizers::Tokenizer::from_file(&a.tokenizer).unwrap();
    let none = sentence_embeddings(&bert, Device::Cpu, &tokenizer, &[]).unwrap();
    assert_eq!(none.size(), [0, 384]);
}

#[test]
fn missing_or_mismatched_tensors_fail_clearly() {
    let Some(a) = assets() else { return };
    let vs = VarStore::new(Device::Cpu);
    // A deeper model than the file: layer 6 is missing.
    let cfg = BertConfig { num_hidden_layers: 7, ..BertConfig::from_hf_json(&a.config).unwrap() };
    let bert = Bert::new(&vs.root(), &cfg).unwrap();
    let err = bert.load_safetensors(&a.weights).unwrap_err().to_string();
    assert!(err.contains("required tensors missing") && err.contains("encoder.layer.6."), "{err}");

    let vs = VarStore::new(Device::Cpu);
    let cfg = BertConfig { intermediate_size: 1024, ..BertConfig::from_hf_json(&a.config).unwrap() };
    let bert = Bert::new(&vs.root(), &cfg).unwrap();
    let err = bert.load_safetensors(&a.weights).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

/// kiln's own FP32 ONNX export of MiniLM (dynamic batch and sequence) run by ONNX Runtime
/// matches the libtorch forward pass within 1e-4, padded sequences included.
#[test]
fn minilm_exported_by_kiln_matches_libtorch() {
    let Some(a) = assets() else { return };
    let cfg = kiln_trainer::models::ModelConfig::bert(
        BertConfig::from_hf_json(&a.config).unwrap().with_head(BertHead::Embeddings),
    );
    let built = kiln_trainer::train::Built::new(&cfg, Device::Cpu).unwrap();
    built.model.as_bert().unwrap().load_safetensors(&a.weights).unwrap();
    let dir = kiln_tests::TempDir::new("minilm-export").unwrap();
    let onnx = dir.path("minilm.onnx");
    kiln_trainer::export::export_to_file(&built.model, &onnx, 17).unwrap();
    let diff = kiln_trainer::package::verify(&built, &onnx, &a.ort).unwrap();
    eprintln!("MiniLM-L6 FP32 export: max |ONNX Runtime - libtorch| = {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}
