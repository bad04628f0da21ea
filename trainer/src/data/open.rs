//! What a run's data configuration opens: the training and evaluation sets.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Dataset, FashionMnist, FolderOptions, ImageFolder, Normalize, Split, TextClassification, TextOptions};
use crate::error::TrainError;
use crate::models::ModelConfig;

/// Which data a run trains and evaluates on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataConfig {
    /// IDX files (Fashion-MNIST or MNIST); `*_limit` keep the first n examples.
    FashionMnist { dir: PathBuf, train_limit: Option<usize>, eval_limit: Option<usize> },
    /// One sub-folder per class in each of `train` and `eval`.
    ImageFolder { train: PathBuf, eval: PathBuf },
    /// CSV/TSV of (text, label), tokenised with `tokenizer` (a tokenizer.json);
    /// `has_header`: the first row names the columns and is skipped.
    Text {
        train: PathBuf,
        eval: PathBuf,
        tokenizer: PathBuf,
        max_len: usize,
        #[serde(default)]
        has_header: bool,
    },
}

/// A dataset the loader threads share.
pub type SharedDataset = Arc<dyn Dataset>;

/// Opens the training and evaluation sets; both must have the same classes.
pub fn datasets(data: &DataConfig, model: &ModelConfig) -> Result<(SharedDataset, SharedDataset), TrainError> {
    let (train, eval): (SharedDataset, SharedDataset) = match data {
        DataConfig::FashionMnist { dir, train_limit, eval_limit } => {
            let mut train = FashionMnist::load(dir, Split::Train)?;
            let mut eval = FashionMnist::load(dir, Split::Test)?;
            if let Some(n) = train_limit {
                train = train.limit(*n);
            }
            if let Some(n) = eval_limit {
                eval = eval.limit(*n);
            }
            (Arc::new(train), Arc::new(eval))
        }
        DataConfig::ImageFolder { train, eval } => {
            let options = FolderOptions { image_size: model.image_size as u32, ..FolderOptions::default() };
            (Arc::new(ImageFolder::open(train, options.clone())?), Arc::new(ImageFolder::open(eval, options)?))
        }
        DataConfig::Text { train, eval, tokenizer, max_len, has_header } => {
            let options = TextOptions { max_len: *max_len, has_header: *has_header, ..TextOptions::default() };
            (
                Arc::new(TextClassification::load(train, tokenizer, options.clone())?),
                Arc::new(TextClassification::load(eval, tokenizer, options)?),
            )
        }
    };
    if train.classes() != eval.classes() {
        return Err(TrainError::Data(format!(
            "the training and evaluation sets have different classes: {:?} vs {:?}",
            train.classes(),
            eval.classes()
        )));
    }
    Ok((train, eval))
}

/// The input normalisation a trained image model expects (kiln serve's `mean`/`std`).
pub fn normalize_of(data: &DataConfig) -> Option<Normalize> {
    match data {
        DataConfig::FashionMnist { .. } => Some(Normalize::fashion_mnist()),
        DataConfig::ImageFolder { .. } => Some(FolderOptions::default().normalize),
        DataConfig::Text { .. } => None,
    }
}
