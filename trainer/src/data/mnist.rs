//! Fashion-MNIST, and any dataset in MNIST's IDX format.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use super::{Batch, Dataset, Normalize, Rng, check_indices, dim, tensor_f32, tensor_i64};
use crate::error::TrainError;

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's class names, in label order.
pub const FASHION_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;
/// No IDX file kiln reads is anywhere near this; it bounds what a corrupt or hostile gzip can inflate to.
const MAX_FILE_BYTES: u64 = 1 << 30;
/// Augmentation's largest random shift, in pixels.
const MAX_SHIFT: i64 = 2;

/// Which half of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `train-*` (60 000 examples in Fashion-MNIST).
    Train,
    /// `t10k-*` (10 000 examples).
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Grey-scale images with integer labels, held in memory as raw bytes.
///
/// Batches are `[B, 1, rows, cols]` f32 normalised with [`FashionMnist::normalize`]. Training augmentation
/// is a horizontal flip with probability 0.5 and a random shift of up to 2 pixels on each axis, filling
/// with 0 pixels (the background).
#[derive(Debug, Clone)]
pub struct FashionMnist {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    classes: Vec<String>,
    normalize: Normalize,
    scale: f32,
    offset: f32,
}

impl FashionMnist {
    /// The default data directory, [`FASHION_MNIST_DIR`].
    pub fn default_dir() -> PathBuf {
        PathBuf::from(FASHION_MNIST_DIR)
    }

    /// Reads `{train,t10k}-images-idx3-ubyte[.gz]` and `{train,t10k}-labels-idx1-ubyte[.gz]` from `dir`.
    pub fn load(dir: &Path, split: Split) -> Result<Self, TrainError> {
        let prefix = split.prefix();
        let images = read_idx(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = read_idx(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        Self::from_idx(&images.0, &images.1, &labels.0, &labels.1)
    }

    /// Parses the contents of an images and a labels IDX file (already decompressed); the paths are only
    /// for error messages.
    fn from_idx(images_path: &Path, images: &[u8], labels_path: &Path, labels: &[u8]) -> Result<Self, TrainError> {
        let bad = |path: &Path, what: String| TrainError::Data(format!("{}: {what}", path.display()));
        let header = |bytes: &[u8], path: &Path, words: usize| -> Result<Vec<u32>, TrainError> {
            if bytes.len() < 4 * words {
                return Err(bad(path, format!("truncated IDX header ({} bytes)", bytes.len())));
            }
            Ok(bytes[..4 * words].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let ih = header(images, images_path, 4)?;
        if ih[0] != IMAGES_MAGIC {
            return Err(bad(
                images_path,
                format!("magic number {} is not an IDX image file's ({IMAGES_MAGIC})", ih[0]),
            ));
        }
        let (count, rows, cols) = (ih[1] as usize, ih[2] as usize, ih[3] as usize);
        if rows == 0 || cols == 0 || rows > 4096 || cols > 4096 {
            return Err(bad(images_path, format!("implausible image size {rows}×{cols}")));
        }
        let expected = count.checked_mul(rows * cols).and_then(|n| n.checked_add(16));
        if expected != Some(images.len()) {
            return Err(bad(
                images_path,
                format!(
                    "{} bytes, but the header promises {count} images of {rows}×{cols} (+16 header bytes)",
                    images.len()
                ),
            ));
        }
        let lh = header(labels, labels_path, 2)?;
        if lh[0] != LABELS_MAGIC {
            return Err(bad(
                labels_path,
                format!("magic number {} is not an IDX label file's ({LABELS_MAGIC})", lh[0]),
            ));
        }
        let label_count = lh[1] as usize;
        if label_count.checked_add(8) != Some(labels.len()) {
            return Err(bad(
                labels_path,
                format!("{} bytes, but the header promises {label_count} labels (+8 header bytes)", labels.len()),
            ));
        }
        if label_count != count {
            return Err(bad(labels_path, format!("{label_count} labels for {count} images")));
        }
        let labels = labels[8..].to_vec();
        let classes: Vec<String> = FASHION_CLASSES.iter().map(|s| s.to_string()).collect();
        if let Some(pos) = labels.iter().position(|&l| usize::from(l) >= classes.len()) {
            return Err(bad(
                labels_path,
                format!("label {} of example {pos} is not below {}", labels[pos], classes.len()),
            ));
        }
        let normalize = Normalize::fashion_mnist();
        let (scale, offset) = normalize.scale_offset(1)?;
        Ok(FashionMnist {
            pixels: images[16..].to_vec(),
            labels,
            rows,
            cols,
            classes,
            normalize,
            scale: scale[0],
            offset: offset[0],
        })
    }

    /// Renames the classes (e.g. for MNIST digits); every label must be below `names.len()`.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self, TrainError> {
        if let Some(&l) = self.labels.iter().find(|&&l| usize::from(l) >= names.len()) {
            return Err(TrainError::Config(format!("label {l} has no name among {} class names", names.len())));
        }
        self.classes = names;
        Ok(self)
    }

    /// Replaces the normalisation (one mean and one std).
    pub fn with_normalize(mut self, normalize: Normalize) -> Result<Self, TrainError> {
        let (scale, offset) = normalize.scale_offset(1)?;
        (self.scale, self.offset, self.normalize) = (scale[0], offset[0], normalize);
        Ok(self)
    }

    /// Keeps only the first `n` examples (all of them if there are fewer).
    pub fn limit(mut self, n: usize) -> Self {
        let n = n.min(self.labels.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.rows * self.cols);
        self
    }

    /// A copy holding only these examples, in this order.
    pub fn subset(&self, indices: &[usize]) -> Result<Self, TrainError> {
        check_indices(indices, self.len())?;
        let size = self.rows * self.cols;
        let mut pixels = Vec::with_capacity(indices.len() * size);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * size..(i + 1) * size]);
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(FashionMnist { pixels, labels, classes: self.classes.clone(), normalize: self.normalize.clone(), ..*self })
    }

    /// Example `i`'s raw pixels (`rows × cols`, row-major, 0 = background) and label. Panics if `i` is out
    /// of range, like slice indexing.
    pub fn image(&self, i: usize) -> (&[u8], i64) {
        let size = self.rows * self.cols;
        (&self.pixels[i * size..(i + 1) * size], i64::from(self.labels[i]))
    }

    /// All labels, in example order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Image height and width (28×28 for (Fashion-)MNIST).
    pub fn image_size(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The normalisation applied to batches.
    pub fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    /// Writes example `i`, normalised and optionally augmented, into `out` (`rows × cols` floats).
    fn write_example(&self, i: usize, augment: Option<u64>, out: &mut [f32]) {
        let (src, _) = self.image(i);
        let (rows, cols) = (self.rows as i64, self.cols as i64);
        let (flip, dy, dx) = match augment {
            Some(seed) => {
                let mut rng = Rng::for_example(seed, i);
                let span = (2 * MAX_SHIFT + 1) as u64;
                let flip = rng.coin();
                let dy = rng.below(span) as i64 - MAX_SHIFT;
                let dx = rng.below(span) as i64 - MAX_SHIFT;
                (flip, dy, dx)
            }
            None => (false, 0, 0),
        };
        let background = self.offset; // a 0 pixel, normalised
        for y in 0..rows {
            let sy = y - dy;
            for x in 0..cols {
                let sx0 = x - dx;
                let sx = if flip { cols - 1 - sx0 } else { sx0 };
                let v = if (0..rows).contains(&sy) && (0..cols).contains(&sx) {
                    f32::from(src[(sy * cols + sx) as usize]) * self.scale + self.offset
                } else {
                    background
                };
                out[(y * cols + x) as usize] = v;
            }
        }
    }
}

impl Dataset for FashionMnist {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn batch(&self, indices: &[usize], augment: Option<u64>) -> Result<Batch, TrainError> {
        check_indices(indices, self.len())?;
        let size = self.rows * self.cols;
        let mut data = vec![0f32; indices.len() * size];
        for (&i, out) in indices.iter().zip(data.chunks_exact_mut(size.max(1))) {
            self.write_example(i, augment, out);
        }
        let labels: Vec<i64> = indices.iter().map(|&i| i64::from(self.labels[i])).collect();
        let b = dim(indices.len())?;
        Ok(Batch {
            inputs: vec![tensor_f32(&data, &[b, 1, dim(self.rows)?, dim(self.cols)?])?],
            labels: tensor_i64(&labels, &[b])?,
        })
    }
}

/// Reads `dir/name.gz` (gunzipped) or else `dir/name`, returning the path read and its bytes.
fn read_idx(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), TrainError> {
    let gz = dir.join(format!("{name}.gz"));
    let plain = dir.join(name);
    let (path, compressed) = if gz.is_file() {
        (gz, true)
    } else if plain.is_file() {
        (plain, false)
    } else {
        return Err(TrainError::Data(format!(
            "neither {} nor {} exists (Debian: apt install dataset-fashion-mnist)",
            gz.display(),
            plain.display()
        )));
    };
    let file = std::fs::File::open(&path).map_err(|e| TrainError::io(&path, e))?;
    let mut bytes = Vec::new();
    let read = if compressed {
        GzDecoder::new(file).take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)
    } else {
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)
    };
    // A corrupt gzip stream is a data problem, not an I/O failure of the disk.
    read.map_err(|e| TrainError::Data(format!("{}: cannot read: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TrainError::Data(format!("{}: larger than {MAX_FILE_BYTES} bytes", path.display())));
    }
    Ok((path, bytes))
}
