//! The CPU reference implementation of [`super`]'s math, also kiln's CPU preprocessing path.
//!
//! Only the output pixels are computed: each is sampled from the source at the position it
//! would have in the resized image, so no intermediate resized image is ever materialised.
//! Every float operation is written out in the order the CUDA kernel performs it (Rust never
//! fuses a multiply-add), which is what makes the two backends agree to the bit.

use rayon::prelude::*;

use super::{AxisGeom, Channels, Fit, Geometry, ImageView, Layout, OutElem, Spec, check_batch};
use crate::KernelError;

/// Preprocesses `images[k]` into slot `first_slot + k` of the batch tensor `out` (slots of
/// `spec.item_len()` elements), images in parallel. Nothing is written on error.
pub fn preprocess_batch<T: OutElem>(
    images: &[ImageView<'_>],
    spec: &Spec,
    out: &mut [T],
    first_slot: usize,
) -> Result<(), KernelError> {
    check_batch(images, spec, T::DTYPE, out.len(), first_slot)?;
    let geoms = images.iter().map(|im| Geometry::new(im.width, im.height, spec)).collect::<Result<Vec<_>, _>>()?;
    let item = spec.item_len();
    let slots = &mut out[first_slot * item..(first_slot + images.len()) * item];
    slots.par_chunks_mut(item).zip(images.par_iter().zip(geoms.par_iter())).for_each(|(dst, (im, g))| {
        write_item(im, g, spec, dst);
    });
    Ok(())
}

/// Preprocesses one image into slot `slot` of `out`, on the calling thread: the serving path
/// calls this per image from its own blocking pool, where a hop to rayon's pool would only
/// add latency.
pub fn preprocess_into<T: OutElem>(
    image: &ImageView<'_>,
    spec: &Spec,
    out: &mut [T],
    slot: usize,
) -> Result<(), KernelError> {
    check_batch(std::slice::from_ref(image), spec, T::DTYPE, out.len(), slot)?;
    let g = Geometry::new(image.width, image.height, spec)?;
    let item = spec.item_len();
    write_item(image, &g, spec, &mut out[slot * item..(slot + 1) * item]);
    Ok(())
}

/// How one output index of one axis reads the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Taps {
    /// Outside the resized image under [`Fit::Letterbox`]: the pad colour.
    Pad,
    /// Bilinear: `a + (b − a)·frac` of source indices `lo` and `hi`.
    Lerp { lo: usize, hi: usize, frac: f32 },
    /// Triangle filter: `Σ weights[k]·p[lo + k] / sum` (sum accumulated in order).
    Tri { lo: usize, weights: Vec<f32>, sum: f32 },
}

impl Taps {
    /// The taps of output index `o` on axis `g` (`letterbox`: pad outside the resized image).
    pub fn new(g: &AxisGeom, o: u32, letterbox: bool) -> Self {
        let r = i64::from(o) + i64::from(g.start);
        let resized = i64::from(g.resized);
        if letterbox && !(0..resized).contains(&r) {
            return Taps::Pad;
        }
        let last = i64::from(g.src) - 1;
        if g.antialias {
            // Repeat the edge where a centre-cropped output overhangs the resized image.
            let r = r.clamp(0, resized - 1);
            let center = (r as f32 + 0.5) * g.ratio;
            let support = g.ratio;
            let lo = (((center - support) + 0.5).floor() as i64).max(0);
            let hi = (((center + support) + 0.5).floor() as i64).min(last + 1);
            let mut sum = 0.0f32;
            let weights = (lo..hi)
                .map(|j| {
                    let t = ((j as f32 + 0.5) - center) * g.inv_ratio;
                    let w = (1.0 - t.abs()).max(0.0);
                    sum += w;
                    w
                })
                .collect();
            Taps::Tri { lo: lo as usize, weights, sum }
        } else {
            let pos = ((r as f32 + 0.5) * g.ratio - 0.5).clamp(0.0, last as f32);
            let lo = pos.floor();
            let hi = (lo as i64 + 1).min(last);
            Taps::Lerp { lo: lo as usize, hi: hi as usize, frac: pos - lo }
        }
    }
}

/// Red, green and blue of pixel `(y, x)` as floats.
#[inline]
fn pixel(im: &ImageView<'_>, offs: [usize; 3], y: usize, x: usize) -> [f32; 3] {
    let base = y * im.pitch + x * im.format.bytes_per_pixel();
    offs.map(|o| f32::from(im.data[base + o]))
}

/// Source row `y` resampled along x.
fn row(im: &ImageView<'_>, offs: [usize; 3], y: usize, xt: &Taps) -> [f32; 3] {
    match xt {
        Taps::Lerp { lo, hi, frac } => {
            let (a, b) = (pixel(im, offs, y, *lo), pixel(im, offs, y, *hi));
            [0, 1, 2].map(|c| a[c] + (b[c] - a[c]) * frac)
        }
        Taps::Tri { lo, weights, sum } => {
            let mut acc = [0.0f32; 3];
            for (k, w) in weights.iter().enumerate() {
                let p = pixel(im, offs, y, lo + k);
                for c in 0..3 {
                    acc[c] += w * p[c];
                }
            }
            acc.map(|a| a / sum)
        }
        // Callers handle padding before sampling.
        Taps::Pad => [0.0; 3],
    }
}

/// Resampled red, green and blue at output position (`yt`, `xt`); `pad` where either pads.
pub fn sample(im: &ImageView<'_>, yt: &Taps, xt: &Taps, pad: [u8; 3]) -> [f32; 3] {
    let offs = im.format.rgb_offsets();
    match yt {
        _ if *yt == Taps::Pad || *xt == Taps::Pad => pad.map(f32::from),
        Taps::Lerp { lo, hi, frac } => {
            let (t, b) = (row(im, offs, *lo, xt), row(im, offs, *hi, xt));
            [0, 1, 2].map(|c| t[c] + (b[c] - t[c]) * frac)
        }
        Taps::Tri { lo, weights, sum } => {
            let mut acc = [0.0f32; 3];
            for (k, w) in weights.iter().enumerate() {
                let r = row(im, offs, lo + k, xt);
                for c in 0..3 {
                    acc[c] += w * r[c];
                }
            }
            acc.map(|a| a / sum)
        }
        Taps::Pad => pad.map(f32::from),
    }
}

/// The unnormalised output channels of one resampled RGB value.
#[inline]
pub fn to_channels(s: [f32; 3], channels: Channels) -> ([f32; 3], usize) {
    match channels {
        Channels::Rgb => (s, 3),
        Channels::Bgr => ([s[2], s[1], s[0]], 3),
        // Bilinear and triangle filters are linear, so the luma of the interpolated pixel
        // equals the interpolated luma.
        Channels::Gray => ([0.299 * s[0] + 0.587 * s[1] + 0.114 * s[2], 0.0, 0.0], 1),
    }
}

fn write_item<T: OutElem>(im: &ImageView<'_>, g: &Geometry, spec: &Spec, out: &mut [T]) {
    let (pad, letterbox) = match spec.fit {
        Fit::Letterbox { pad } => (pad, true),
        Fit::CenterCrop => ([0; 3], false),
    };
    let ys: Vec<Taps> = (0..spec.out_h).map(|o| Taps::new(&g.y, o, letterbox)).collect();
    let xs: Vec<Taps> = (0..spec.out_w).map(|o| Taps::new(&g.x, o, letterbox)).collect();
    let (out_w, plane) = (spec.out_w as usize, spec.out_h as usize * spec.out_w as usize);
    for (oy, yt) in ys.iter().enumerate() {
        for (ox, xt) in xs.iter().enumerate() {
            let (v, n) = to_channels(sample(im, yt, xt, pad), spec.channels);
            for (c, &x) in v[..n].iter().enumerate() {
                let idx = match spec.layout {
                    Layout::Nchw => c * plane + oy * out_w + ox,
                    Layout::Nhwc => (oy * out_w + ox) * n + c,
                };
                out[idx] = T::from_f32(x * spec.scale[c] + spec.offset[c]);
            }
        }
    }
}
