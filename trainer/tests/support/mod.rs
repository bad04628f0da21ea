//! What the tests that train the small CNN on Fashion-MNIST share: where the data is,
//! whether it is installed, and the shortened one-epoch CPU run they train.

use std::path::Path;

use kiln_trainer::models::ModelConfig;
use kiln_trainer::optim::AdamWConfig;
use kiln_trainer::train::{DataConfig, DeviceChoice, FitConfig};

/// The Debian package dataset-fashion-mnist (`make setup-trainer`).
pub const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// Whether the dataset is installed; says why the test is skipped when not.
pub fn fashion_present() -> bool {
    let ok = Path::new(FASHION).join("t10k-images-idx3-ubyte.gz").is_file();
    if !ok {
        eprintln!("skipped: {FASHION} missing (Debian package dataset-fashion-mnist; `make setup-trainer`)");
    }
    ok
}

/// One epoch of the small CNN on the first `train_limit` training images, on the CPU.
pub fn one_epoch_cnn(train_limit: usize, seed: u64, log_every: u64) -> FitConfig {
    FitConfig {
        model: ModelConfig::small_cnn(0),
        data: DataConfig::FashionMnist { dir: FASHION.into(), train_limit: Some(train_limit), eval_limit: Some(1000) },
        epochs: 1,
        batch_size: 64,
        eval_batch_size: 250,
        lr: 3e-3,
        min_lr: 1e-4,
        warmup_steps: 5,
        adamw: AdamWConfig::default(),
        clip_grad_norm: None,
        amp: false,
        seed,
        workers: 2,
        device: DeviceChoice::Cpu,
        checkpoint_every: None,
        max_steps: None,
        init_from: None,
        log_every,
        grad_accum: 1,
    }
}
