//! Images in one sub-folder per class, decoded on demand.

use std::path::{Path, PathBuf};

use kiln_image::decode;

use super::{Batch, Dataset, Normalize, Rng, check_indices, dim, tensor_f32, tensor_i64};
use crate::error::TrainError;

const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// How [`ImageFolder`] prepares images.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderOptions {
    /// Side of the square model input.
    pub image_size: u32,
    pub normalize: Normalize,
    /// Evaluation resizes the shorter side to this before the centre crop; `None`: `image_size · 256/224`.
    pub resize_shorter: Option<u32>,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions { image_size: 224, normalize: Normalize::imagenet(), resize_shorter: None }
    }
}

/// An image-classification dataset laid out as `dir/<class>/<image>.{jpg,jpeg,png}`.
///
/// Class ids follow the sorted sub-folder names; files are listed once at open and decoded (to RGB) each
/// time a batch needs them. Batches are `[B, 3, S, S]` f32, NCHW, normalised.
///
/// * Evaluation: resize the shorter side to `resize_shorter` and centre-crop, with the sampling kiln
///   serve uses (half-pixel-centred bilinear, no antialiasing, floor-divided crop margins), so the
///   accuracy measured here is the accuracy served.
/// * Training (`augment: Some(seed)`): torchvision's `RandomResizedCrop` (area scale 0.08–1, log-uniform
///   aspect ratio 3/4–4/3, 10 tries, then a centre crop of the clamped ratio) resized bilinearly to S×S,
///   then a horizontal flip with probability 0.5.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    files: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
    size: usize,
    resize_shorter: usize,
    normalize: Normalize,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl ImageFolder {
    /// Lists `dir`'s class sub-folders and their images.
    pub fn open(dir: &Path, options: FolderOptions) -> Result<Self, TrainError> {
        let (scale, offset) = options.normalize.scale_offset(3)?;
        if options.image_size == 0 || options.image_size > 4096 {
            return Err(TrainError::Config(format!("image size {} is out of range", options.image_size)));
        }
        let resize_shorter = options.resize_shorter.unwrap_or(options.image_size * 256 / 224);
        if resize_shorter < options.image_size {
            return Err(TrainError::Config(format!(
                "resize_shorter {resize_shorter} is smaller than the crop {}",
                options.image_size
            )));
        }
        let mut class_dirs: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
            let entry = entry.map_err(|e| TrainError::io(dir, e))?;
            let path = entry.path();
            if path.is_dir() {
                let name = entry.file_name().into_string().map_err(|n| {
                    TrainError::Data(format!("class folder name {n:?} in {} is not UTF-8", dir.display()))
                })?;
                if !name.starts_with('.') {
                    class_dirs.push((name, path));
                }
            }
        }
        class_dirs.sort();
        if class_dirs.is_empty() {
            return Err(TrainError::Data(format!("{} has no class sub-folders", dir.display())));
        }
        let mut files = Vec::new();
        for (id, (_, class_dir)) in class_dirs.iter().enumerate() {
            let mut images = Vec::new();
            for entry in std::fs::read_dir(class_dir).map_err(|e| TrainError::io(class_dir, e))? {
                let path = entry.map_err(|e| TrainError::io(class_dir, e))?.path();
                let is_image = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
                // Hidden files are editor and OS debris (e.g. macOS `._x.jpg`), never training images.
                let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
                if is_image && !hidden && path.is_file() {
                    images.push(path);
                }
            }
            // read_dir's order is the file system's; sorting makes example indices reproducible.
            images.sort();
            files.extend(images.into_iter().map(|p| (p, id as i64)));
        }
        if files.is_empty() {
            return Err(TrainError::Data(format!("no .jpg/.jpeg/.png images under {}", dir.display())));
        }
        Ok(ImageFolder {
            files,
            classes: class_dirs.into_iter().map(|(name, _)| name).collect(),
            size: options.image_size as usize,
            resize_shorter: resize_shorter as usize,
            normalize: options.normalize,
            scale,
            offset,
        })
    }

    /// The image files with their class ids, in example order.
    pub fn files(&self) -> &[(PathBuf, i64)] {
        &self.files
    }

    /// The normalisation applied to batches.
    pub fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    /// Keeps only the first `n` examples (in class-then-file order: use [`ImageFolder::subset`] for a mix).
    pub fn limit(mut self, n: usize) -> Self {
        self.files.truncate(n);
        self
    }

    /// A copy holding only these examples, in this order.
    pub fn subset(&self, indices: &[usize]) -> Result<Self, TrainError> {
        check_indices(indices, self.len())?;
        let files = indices.iter().map(|&i| self.files[i].clone()).collect();
        Ok(ImageFolder { files, ..self.clone() })
    }

    /// Decodes, crops, resizes and normalises example `i` into `out` (`3 × S × S` floats).
    fn write_example(&self, i: usize, augment: Option<u64>, out: &mut [f32]) -> Result<(), TrainError> {
        let path = &self.files[i].0;
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let image = decode(&bytes).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let s = self.size;
        let (xs, ys) = match augment {
            None => {
                let (rh, rw) = resized_size(h, w, self.resize_shorter);
                // Floor division, as kiln serve and the reference implementations do, so odd margins match.
                let top = (rh as isize - s as isize).div_euclid(2);
                let left = (rw as isize - s as isize).div_euclid(2);
                let (ry, rx) = (h as f64 / rh as f64, w as f64 / rw as f64);
                (Axis::new(left as f64 * rx, rx, 0, w, s, false), Axis::new(top as f64 * ry, ry, 0, h, s, false))
            }
            Some(seed) => {
                let mut rng = Rng::for_example(seed, i);
                let (top, left, ch, cw) = random_resized_crop(&mut rng, h, w);
                let flip = rng.coin();
                let (ry, rx) = (ch as f64 / s as f64, cw as f64 / s as f64);
                (Axis::new(left as f64, rx, left, cw, s, flip), Axis::new(top as f64, ry, top, ch, s, false))
            }
        };
        let src = image.as_raw();
        let plane = s * s;
        for oy in 0..s {
            let (row0, row1, fy) = (ys.lo[oy] * w * 3, ys.hi[oy] * w * 3, ys.frac[oy]);
            for ox in 0..s {
                let (x0, x1, fx) = (xs.lo[ox] * 3, xs.hi[ox] * 3, xs.frac[ox]);
                for c in 0..3 {
                    let p = |i: usize| f32::from(src[i + c]);
                    let top_v = p(row0 + x0) + (p(row0 + x1) - p(row0 + x0)) * fx;
                    let bot_v = p(row1 + x0) + (p(row1 + x1) - p(row1 + x0)) * fx;
                    let v = top_v + (bot_v - top_v) * fy;
                    out[c * plane + oy * s + ox] = v * self.scale[c] + self.offset[c];
                }
            }
        }
        Ok(())
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn batch(&self, indices: &[usize], augment: Option<u64>) -> Result<Batch, TrainError> {
        check_indices(indices, self.len())?;
        let item = 3 * self.size * self.size;
        let mut data = vec![0f32; indices.len() * item];
        for (&i, out) in indices.iter().zip(data.chunks_exact_mut(item)) {
            self.write_example(i, augment, out)?;
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.files[i].1).collect();
        let (b, s) = (dim(indices.len())?, dim(self.size)?);
        Ok(Batch { inputs: vec![tensor_f32(&data, &[b, 3, s, s])?], labels: tensor_i64(&labels, &[b])? })
    }
}

/// Size `(height, width)` after resizing the shorter side to `shorter`, keeping the aspect ratio.
fn resized_size(h: usize, w: usize, shorter: usize) -> (usize, usize) {
    let s = shorter as f64;
    let ratio = s / h.min(w) as f64;
    let rh = if h <= w { s } else { (h as f64 * ratio).round() };
    let rw = if w < h { s } else { (w as f64 * ratio).round() };
    ((rh as usize).max(1), (rw as usize).max(1))
}

/// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)` of the crop.
fn random_resized_crop(rng: &mut Rng, h: usize, w: usize) -> (usize, usize, usize, usize) {
    let (min_ratio, max_ratio) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    let area = (h * w) as f64;
    for _ in 0..10 {
        let target = area * rng.uniform(0.08, 1.0);
        let ratio = rng.uniform(min_ratio.ln(), max_ratio.ln()).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.below((h - ch + 1) as u64) as usize;
            let left = rng.below((w - cw + 1) as u64) as usize;
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < min_ratio {
        ((w as f64 / min_ratio).round() as usize, w)
    } else if in_ratio > max_ratio {
        (h, (h as f64 * max_ratio).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// One axis of the bilinear sampling grid: for each output index, the two source indices and the weight
/// of the second.
struct Axis {
    lo: Vec<usize>,
    hi: Vec<usize>,
    frac: Vec<f32>,
}

impl Axis {
    /// Output `o` samples the source at `base + (o + 0.5)·ratio − 0.5` (half-pixel centres), clamped to the
    /// source window `[start, start + len)`; `flip` mirrors the output.
    fn new(base: f64, ratio: f64, start: usize, len: usize, out: usize, flip: bool) -> Self {
        let (first, last) = (start as f64, (start + len.max(1) - 1) as f64);
        let (mut lo, mut hi, mut frac) = (Vec::with_capacity(out), Vec::with_capacity(out), Vec::with_capacity(out));
        for o in 0..out {
            let o = if flip { out - 1 - o } else { o };
            let pos = (base + (o as f64 + 0.5) * ratio - 0.5).clamp(first, last);
            let l = pos.floor();
            lo.push(l as usize);
            hi.push((l + 1.0).min(last) as usize);
            frac.push((pos - l) as f32);
        }
        Axis { lo, hi, frac }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_resized_crops_stay_inside_with_torchvision_ranges() {
        let mut fallback = 0;
        for (i, (h, w)) in [(300, 400), (50, 500), (500, 40), (1, 1), (7, 3)].into_iter().cycle().take(2000).enumerate()
        {
            let mut rng = Rng::for_example(9, i);
            let (top, left, ch, cw) = random_resized_crop(&mut rng, h, w);
            assert!(ch >= 1 && cw >= 1 && top + ch <= h && left + cw <= w, "{h}×{w}: {top},{left} {ch}×{cw}");
            let (area, ratio) = ((ch * cw) as f64 / (h * w) as f64, cw as f64 / ch as f64);
            if (h, w) == (300, 400) {
                assert!((0.07..=1.0).contains(&area) && (0.74..=1.35).contains(&ratio), "{area} {ratio}");
            }
            if (h, w) == (50, 500) && (ch, cw) == (50, 67) {
                fallback += 1; // too wide for any try: centre crop at ratio 4/3
                assert_eq!((top, left), (0, 216));
            }
        }
        assert!(fallback > 0);
    }

    #[test]
    fn flipped_axis_mirrors() {
        let a = Axis::new(0.0, 2.0, 0, 8, 4, false);
        let b = Axis::new(0.0, 2.0, 0, 8, 4, true);
        assert_eq!(a.lo, [0, 2, 4, 6]);
        assert_eq!(b.lo, [6, 4, 2, 0]);
        assert_eq!(a.frac, [0.5; 4]);
    }
}
