//! Datasets and the batch loader.
//!
//! A [`Dataset`] turns example indices into a ready [`Batch`] of tensors; [`epoch_order`] and
//! [`shard_batches`] decide which indices each step (and each data-parallel rank) sees; the [`Loader`]
//! builds those batches on worker threads and hands them back in order.
//!
//! Everything random here (the epoch shuffle, training augmentation) is a pure function of seeds and
//! indices, drawn from a small generator defined in this module rather than a crate's, so a resumed
//! run or another rank reproduces exactly the same data regardless of thread scheduling or dependency
//! upgrades.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::TrainError;

mod csv;
mod folder;
mod loader;
mod mnist;
mod open;
mod text;

pub use folder::{FolderOptions, ImageFolder};
pub use loader::Loader;
pub use mnist::{FASHION_CLASSES, FASHION_MNIST_DIR, FashionMnist, Split};
pub use open::{DataConfig, SharedDataset, datasets, normalize_of};
pub use text::{TextClassification, TextOptions};

/// `(pixel - mean) / std` per channel with pixels in 0..=255 — the same convention as kiln serve's config,
/// so an export can write it there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// The ImageNet statistics most pretrained vision models expect, on the 0..=255 scale.
    pub fn imagenet() -> Self {
        Normalize { mean: vec![123.675, 116.28, 103.53], std: vec![58.395, 57.12, 57.375] }
    }

    /// Fashion-MNIST's pixel mean 0.2860 and std 0.3530, on the 0..=255 scale.
    pub fn fashion_mnist() -> Self {
        Normalize { mean: vec![72.94], std: vec![90.0] }
    }

    /// Per-channel `(scale, offset)` such that `pixel * scale + offset == (pixel - mean) / std`, checked to
    /// have exactly `channels` entries and non-zero, finite standard deviations.
    pub(crate) fn scale_offset(&self, channels: usize) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(TrainError::Config(format!(
                "normalize needs {channels} mean and std values, got {} and {}",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.std.iter().chain(&self.mean).any(|v| !v.is_finite()) || self.std.contains(&0.0) {
            return Err(TrainError::Config(format!("normalize: invalid mean/std {:?} / {:?}", self.mean, self.std)));
        }
        let scale: Vec<f32> = self.std.iter().map(|s| 1.0 / s).collect();
        let offset = self.mean.iter().zip(&self.std).map(|(m, s)| -m / s).collect();
        Ok((scale, offset))
    }
}

/// One batch: model inputs in the order of the model's `Network::inputs()`, and int64 class labels `[B]`.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Vec<Tensor>,
    pub labels: Tensor,
}

/// A labelled classification dataset that can build batches from any thread.
pub trait Dataset: Send + Sync + std::fmt::Debug {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether the dataset has no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class names; class id `i` is `classes()[i]`.
    fn classes(&self) -> &[String];
    /// Builds the batch for these example indices. `augment: Some(seed)` applies training augmentation,
    /// deterministically from `(seed, index)` only — so results never depend on thread scheduling (needed
    /// for exact resume and for DDP equality tests). An example gets the same augmentation whenever the seed
    /// is the same: pass a different seed each epoch ([`epoch_seed`]).
    fn batch(&self, indices: &[usize], augment: Option<u64>) -> Result<Batch, TrainError>;
}

/// The order of one epoch: a permutation of 0..len from (seed, epoch) (shuffle) or 0..len (no shuffle).
pub fn epoch_order(len: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = Rng::new(seed ^ mix(epoch ^ 0x0e90_c4a1_5eed_0001));
        // Fisher–Yates, written out so the order never changes with a dependency's version.
        for i in (1..len).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// The augmentation seed of one epoch, so that each epoch sees each example differently augmented.
pub fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    mix(seed ^ mix(epoch ^ 0xa0a0_5eed_e90c_0003))
}

/// Which examples of an epoch one rank sees: global batches of `global_batch` consecutive entries of
/// `order`; rank r of world w takes the r-th contiguous slice of each global batch (sizes differ by at most
/// one when w does not divide it); `drop_last` drops a final short global batch. Returns per-step index
/// lists for this rank.
///
/// Every rank gets the same number of steps, as collective operations require; a rank's list can be empty
/// when a final short global batch has fewer entries than there are ranks. Invalid arguments
/// (`global_batch == 0`, `world == 0`, `rank >= world`) give no steps: callers validate their configuration.
pub fn shard_batches(
    order: &[usize],
    global_batch: usize,
    rank: usize,
    world: usize,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    if global_batch == 0 || world == 0 || rank >= world {
        return Vec::new();
    }
    order
        .chunks(global_batch)
        .filter(|chunk| !drop_last || chunk.len() == global_batch)
        .map(|chunk| {
            let (base, extra) = (chunk.len() / world, chunk.len() % world);
            let start = rank * base + rank.min(extra);
            let len = base + usize::from(rank < extra);
            chunk[start..start + len].to_vec()
        })
        .collect()
}

/// SplitMix64's finaliser: spreads any input over all 64 bits, so nearby seeds and indices give unrelated
/// streams.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A SplitMix64 generator: small, fast, and fully specified here so streams are stable forever.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(mix(seed))
    }

    /// The augmentation stream of one example: depends on nothing but the run's seed and the index.
    pub(crate) fn for_example(seed: u64, index: usize) -> Self {
        Rng::new(seed ^ mix(index as u64 ^ 0xa5a5_0000_da7a_0002))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the multiply-shift bias is below 2^-32 for any realistic `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    pub(crate) fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// Checks that every index is in range, so datasets can index without panicking.
pub(crate) fn check_indices(indices: &[usize], len: usize) -> Result<(), TrainError> {
    match indices.iter().find(|&&i| i >= len) {
        Some(i) => Err(TrainError::Data(format!("example index {i} is out of range (dataset has {len} examples)"))),
        None => Ok(()),
    }
}

/// A tensor of `shape` from plain data built on the worker thread.
pub(crate) fn tensor_f32(data: &[f32], shape: &[i64]) -> Result<Tensor, TrainError> {
    Ok(Tensor::f_from_slice(data)?.f_view(shape)?)
}

/// An int64 tensor of `shape`.
pub(crate) fn tensor_i64(data: &[i64], shape: &[i64]) -> Result<Tensor, TrainError> {
    Ok(Tensor::f_from_slice(data)?.f_view(shape)?)
}

/// Converts a count or size to a tensor dimension.
pub(crate) fn dim(n: usize) -> Result<i64, TrainError> {
    i64::try_from(n).map_err(|_| TrainError::Shape(format!("dimension {n} does not fit in i64")))
}
