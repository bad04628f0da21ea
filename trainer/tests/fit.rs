//! The training loop on real Fashion-MNIST (a subset): a resumed run reaches the same
//! weights bit for bit, checkpoints and logs are written, and bad resumes are errors.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use kiln_tests::TempDir;
use kiln_trainer::checkpoint;
use kiln_trainer::ddp::{Ddp, DdpOptions};
use kiln_trainer::models::ModelConfig;
use kiln_trainer::optim::AdamWConfig;
use kiln_trainer::train::{self, DataConfig, DeviceChoice, FitConfig, FitOptions};
use tch::Tensor;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// libtorch's random generator is process-wide and each run re-seeds it every step, so
/// runs in one process must not overlap (kiln-train runs one per process).
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_RUN_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

fn have_data() -> bool {
    let ok = Path::new(FASHION).join("t10k-images-idx3-ubyte.gz").is_file();
    if !ok {
        eprintln!("skipped: {FASHION} missing (Debian package dataset-fashion-mnist; `make setup-trainer`)");
    }
    ok
}

fn config(epochs: u64) -> FitConfig {
    FitConfig {
        model: ModelConfig::small_cnn(10),
        data: DataConfig::FashionMnist { dir: FASHION.into(), train_limit: Some(640), eval_limit: Some(200) },
        epochs,
        batch_size: 64,
        eval_batch_size: 100,
        lr: 2e-3,
        min_lr: 1e-5,
        warmup_steps: 3,
        adamw: AdamWConfig::default(),
        clip_grad_norm: Some(5.0),
        amp: false,
        seed: 11,
        workers: 2,
        device: DeviceChoice::Cpu,
        checkpoint_every: None,
        max_steps: None,
        init_from: None,
        log_every: 2,
        grad_accum: 1,
    }
}

fn options(dir: &Path, resume: Option<PathBuf>) -> FitOptions {
    FitOptions { run_dir: dir.to_path_buf(), resume, extend_epochs: None, progress: false }
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn assert_identical(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{a:?} vs {b:?}");
    for (name, x) in &ta {
        let y = &tb[name];
        assert!(x.equal(y), "{name} differs between {a:?} and {b:?}");
    }
}

#[test]
fn an_interrupted_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    if !have_data() {
        return;
    }
    let _serial = serial();
    tch::set_num_threads(2);
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    let full = TempDir::new("fit-full").unwrap();
    let report = train::fit(config(2), &options(&full.0, None), &ddp).unwrap();
    assert_eq!(report.steps, 20);
    assert_eq!(report.history.len(), 2);
    let end = report.last_checkpoint.unwrap();

    // Interrupted mid-epoch at step 7, then continued from the run directory.
    let split = TempDir::new("fit-split").unwrap();
    let mut first = config(2);
    first.max_steps = Some(7);
    let partial = train::fit(first, &options(&split.0, None), &ddp).unwrap();
    assert_eq!(partial.steps, 7);
    let meta = checkpoint::load_meta(&partial.last_checkpoint.unwrap()).unwrap();
    assert_eq!((meta.epoch, meta.step, meta.step_in_epoch), (0, 7, 7));
    let resumed = train::fit(config(2), &options(&split.0, Some(split.0.clone())), &ddp).unwrap();
    assert_eq!(resumed.steps, 20);
    let resumed_end = resumed.last_checkpoint.unwrap();

    assert_identical(&end.join("model.safetensors"), &resumed_end.join("model.safetensors"));
    assert_identical(&end.join("optimizer.safetensors"), &resumed_end.join("optimizer.safetensors"));
    let (m1, m2) = (checkpoint::load_meta(&end).unwrap(), checkpoint::load_meta(&resumed_end).unwrap());
    assert_eq!(m1.history.last().map(|h| h.eval_loss), m2.history.last().map(|h| h.eval_loss));

    // The run wrote its log and curves; the resumed run appended to the same log.
    let log = std::fs::read_to_string(split.0.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.iter().filter(|r| r["kind"] == "epoch").count(), 2);
    assert!(steps.iter().any(|r| r["kind"] == "step" && r["step"] == 6));
    assert!(steps.iter().any(|r| r["kind"] == "step" && r["step"] == 20));
    assert!(
        full.0.join("curves.svg").is_file() || !Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists()
    );
}

#[test]
fn training_improves_on_the_untrained_model_and_eval_matches_the_checkpoint() {
    if !have_data() {
        return;
    }
    let _serial = serial();
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    let dir = TempDir::new("fit-learn").unwrap();
    let report = train::fit(config(2), &options(&dir.0, None), &ddp).unwrap();
    let last = report.history.last().unwrap();
    // 1,280 examples seen: far from converged, but far above chance (10 %).
    assert!(last.eval_accuracy > 0.4, "eval accuracy {}", last.eval_accuracy);
    assert!(report.history[1].train_loss < report.history[0].train_loss);

    let ckpt = checkpoint::resolve(&dir.0).unwrap();
    let meta = checkpoint::load_meta(&ckpt).unwrap();
    assert_eq!(meta.classes.len(), 10);
    assert_eq!(meta.classes[9], "Ankle boot");
    let mut built = train::Built::new(&meta.config.model, tch::Device::Cpu).unwrap();
    checkpoint::load_weights(&ckpt, &mut built.vs).unwrap();
    let (_, eval_set) = train::datasets(&meta.config.data, &meta.config.model).unwrap();
    let again = train::evaluate(&built, &eval_set, 64, &ddp, 1, false).unwrap();
    assert_eq!(again.examples, 200);
    assert!((again.accuracy - last.eval_accuracy).abs() < 1e-9, "{} vs {}", again.accuracy, last.eval_accuracy);
}

#[test]
fn bad_configurations_and_resumes_are_errors() {
    if !have_data() {
        return;
    }
    let _serial = serial();
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    let dir = TempDir::new("fit-bad").unwrap();
    let missing = train::fit(config(1), &options(&dir.0, Some(dir.path("nothing-here"))), &ddp);
    assert!(matches!(missing, Err(kiln_trainer::TrainError::Checkpoint { .. })), "{missing:?}");

    let mut zero = config(1);
    zero.batch_size = 0;
    assert!(matches!(train::fit(zero, &options(&dir.0, None), &ddp), Err(kiln_trainer::TrainError::Config(_))));

    let mut huge = config(1);
    huge.batch_size = 100_000;
    let err = train::fit(huge, &options(&dir.0, None), &ddp).unwrap_err().to_string();
    assert!(err.contains("fewer than one batch"), "{err}");

    // A checkpoint whose meta.json is damaged is refused with the file named.
    let fake = dir.path("fake-ckpt");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("meta.json"), b"{ not json").unwrap();
    let err = train::fit(config(1), &options(&dir.0, Some(fake.clone())), &ddp).unwrap_err().to_string();
    assert!(err.contains("meta.json"), "{err}");
}

/// Text classification fine-tuning: MiniLM-L6's pretrained encoder (HF safetensors via
/// `init_from`) with a new classifier head, on a CSV tokenised by its tokenizer.json.
#[test]
fn bert_fine_tunes_from_pretrained_minilm_on_a_csv() {
    let assets = kiln_tests::workspace_root().join(".kiln/assets/minilm-l6");
    if !assets.join("model.safetensors").is_file() {
        eprintln!("skipped: MiniLM-L6 assets missing (`make setup-trainer`)");
        return;
    }
    let _serial = serial();
    let dir = TempDir::new("fit-text").unwrap();
    let animals = ["The cat sleeps on the warm sofa", "A dog chased the ball in the park", "Horses graze in the field"];
    let money =
        ["The bank raised interest rates", "Stocks fell after the earnings report", "Bond yields climbed again"];
    let mut csv = String::from("text,label\n");
    for i in 0..8 {
        for (a, m) in animals.iter().zip(&money) {
            csv.push_str(&format!("\"{a}, day {i}\",animals\n\"{m}, day {i}\",finance\n"));
        }
    }
    let data = dir.path("train.csv");
    std::fs::write(&data, csv).unwrap();
    let bert = kiln_trainer::models::BertConfig::from_hf_json(assets.join("config.json"))
        .unwrap()
        .with_head(kiln_trainer::models::BertHead::Classifier { num_labels: 0 });
    let mut cfg = config(2);
    cfg.model = ModelConfig::bert(bert);
    cfg.data = DataConfig::Text {
        train: data.clone(),
        eval: data,
        tokenizer: assets.join("tokenizer.json"),
        max_len: 32,
        has_header: true,
    };
    cfg.batch_size = 8;
    cfg.lr = 2e-4;
    cfg.init_from = Some(assets.join("model.safetensors"));
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    let report = train::fit(cfg, &options(&dir.0, None), &ddp).unwrap();
    assert_eq!(report.steps, 12);
    let last = report.history.last().unwrap();
    assert!(last.eval_accuracy >= 0.9, "{:?}", report.history);

    // The encoder started from MiniLM (moved only by 12 small steps), not from scratch.
    let ckpt = checkpoint::resolve(&dir.0).unwrap();
    let trained = tensors(&ckpt.join("model.safetensors"));
    let pretrained = tensors(&assets.join("model.safetensors"));
    let name = "embeddings.word_embeddings.weight";
    let drift = (&trained[name] - &pretrained[name]).abs().mean(tch::Kind::Float).double_value(&[]);
    assert!(drift < 2e-3, "mean |Δ| {drift}");
    let meta = checkpoint::load_meta(&ckpt).unwrap();
    assert_eq!(meta.classes, vec!["animals".to_string(), "finance".to_string()]);
}
