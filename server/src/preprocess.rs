//! Image decoding and the fused resize → centre-crop → normalise → layout step.
//!
//! Only the cropped output pixels are computed: each one is sampled bilinearly (half-pixel
//! centres, edge-clamped) from the source at the position it would have in the resized
//! image, so no intermediate resized image is ever materialised. The GPU kernel will use
//! this same math, which is why it is written out here rather than taken from `image`.

use image::RgbImage;

use crate::config::{ColorOrder, InputConfig, Layout};

pub use kiln_image::{ImageError, decode};

/// A compiled preprocessing recipe for one model input.
#[derive(Debug, Clone)]
pub struct Preprocess {
    resize_shorter: Option<u32>,
    out_h: usize,
    out_w: usize,
    color: ColorOrder,
    layout: Layout,
    scale: [f32; 3],
    offset: [f32; 3],
}

/// One axis of the sampling grid: for each output index, the two source indices and the
/// weight of the second.
struct Axis {
    lo: Vec<usize>,
    hi: Vec<usize>,
    frac: Vec<f32>,
}

impl Axis {
    /// `src`: source length; `resized`: length after resize; `start`: crop offset in the
    /// resized image; `out`: output length.
    fn new(src: usize, resized: usize, start: isize, out: usize) -> Self {
        let ratio = src as f32 / resized as f32;
        let last = src.saturating_sub(1);
        let (mut lo, mut hi, mut frac) = (Vec::with_capacity(out), Vec::with_capacity(out), Vec::with_capacity(out));
        for o in 0..out {
            let pos = ((o as isize + start) as f32 + 0.5) * ratio - 0.5;
            let pos = pos.clamp(0.0, last as f32);
            let l = pos.floor() as usize;
            lo.push(l);
            hi.push((l + 1).min(last));
            frac.push(pos - l as f32);
        }
        Self { lo, hi, frac }
    }
}

impl Preprocess {
    pub fn new(config: &InputConfig) -> Result<Self, String> {
        let (scale, offset) = config.scale_offset()?;
        Ok(Self {
            resize_shorter: config.resize_shorter,
            out_h: config.crop[0] as usize,
            out_w: config.crop[1] as usize,
            color: config.color,
            layout: config.layout,
            scale,
            offset,
        })
    }

    /// The per-image tensor shape (without the batch axis).
    pub fn item_shape(&self) -> [usize; 3] {
        let c = self.color.channels();
        match self.layout {
            Layout::Nchw => [c, self.out_h, self.out_w],
            Layout::Nhwc => [self.out_h, self.out_w, c],
        }
    }

    pub fn item_len(&self) -> usize {
        self.color.channels() * self.out_h * self.out_w
    }

    /// Size of the image after the aspect-keeping resize (height, width).
    fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.resize_shorter {
            None => (h, w),
            Some(s) => {
                let s = s as f64;
                let ratio = s / h.min(w) as f64;
                let rh = if h <= w { s } else { (h as f64 * ratio).round() };
                let rw = if w < h { s } else { (w as f64 * ratio).round() };
                ((rh as usize).max(1), (rw as usize).max(1))
            }
        }
    }

    /// Writes the preprocessed image into `out` (`item_len()` floats).
    pub fn run(&self, image: &RgbImage, out: &mut [f32]) {
        let (w, h) = (image.width() as usize, image.height() as usize);
        debug_assert_eq!(out.len(), self.item_len());
        let (rh, rw) = self.resized_size(h, w);
        // Floor division, as the reference implementations do, so odd margins match.
        let top = (rh as isize - self.out_h as isize).div_euclid(2);
        let left = (rw as isize - self.out_w as isize).div_euclid(2);
        let ys = Axis::new(h, rh, top, self.out_h);
        let xs = Axis::new(w, rw, left, self.out_w);
        let src = image.as_raw();
        let plane = self.out_h * self.out_w;
        let channels = self.color.channels();
        for oy in 0..self.out_h {
            let (row0, row1, fy) = (ys.lo[oy] * w * 3, ys.hi[oy] * w * 3, ys.frac[oy]);
            for ox in 0..self.out_w {
                let (x0, x1, fx) = (xs.lo[ox] * 3, xs.hi[ox] * 3, xs.frac[ox]);
                // Bilinear interpolation is linear, so the luma of the interpolated pixel
                // equals the interpolated luma.
                let sample = |sc: usize| {
                    let p = |i: usize| f32::from(src[i + sc]);
                    let top_v = p(row0 + x0) + (p(row0 + x1) - p(row0 + x0)) * fx;
                    let bot_v = p(row1 + x0) + (p(row1 + x1) - p(row1 + x0)) * fx;
                    top_v + (bot_v - top_v) * fy
                };
                for c in 0..channels {
                    let v = match self.color {
                        ColorOrder::Rgb => sample(c),
                        ColorOrder::Bgr => sample(2 - c),
                        ColorOrder::Gray => 0.299 * sample(0) + 0.587 * sample(1) + 0.114 * sample(2),
                    };
                    let idx = match self.layout {
                        Layout::Nchw => c * plane + oy * self.out_w + ox,
                        Layout::Nhwc => (oy * self.out_w + ox) * channels + c,
                    };
                    out[idx] = v * self.scale[c] + self.offset[c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(resize: Option<u32>, crop: [u32; 2], color: ColorOrder, layout: Layout) -> InputConfig {
        InputConfig {
            name: "x".into(),
            resize_shorter: resize,
            crop,
            color,
            layout,
            mean: None,
            std: None,
            scale: None,
            offset: None,
        }
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 7]))
    }

    #[test]
    fn identity_when_no_resize_and_full_crop() -> Result<(), String> {
        let img = gradient(4, 3);
        let p = Preprocess::new(&config(None, [3, 4], ColorOrder::Rgb, Layout::Nhwc))?;
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        let expected: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v)).collect();
        assert_eq!(out, expected);
        Ok(())
    }

    #[test]
    fn gray_is_one_channel_of_luma_with_the_first_normalisation() -> Result<(), String> {
        let img = gradient(3, 2);
        let mut c = config(None, [2, 3], ColorOrder::Gray, Layout::Nchw);
        c.mean = Some([10.0, 99.0, 99.0]);
        c.std = Some([2.0, 99.0, 99.0]);
        let p = Preprocess::new(&c)?;
        assert_eq!(p.item_shape(), [1, 2, 3]);
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        for (i, px) in img.pixels().enumerate() {
            let luma = 0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2]);
            assert!((out[i] - (luma - 10.0) / 2.0).abs() < 1e-4, "pixel {i}: {} vs {luma}", out[i]);
        }
        Ok(())
    }

    #[test]
    fn centre_crop_picks_the_middle_and_bgr_nchw_reorders() -> Result<(), String> {
        let img = gradient(6, 4);
        let p = Preprocess::new(&config(None, [2, 2], ColorOrder::Bgr, Layout::Nchw))?;
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        // Crop rows 1..3, cols 2..4. Channel 0 is blue (constant 7), channel 2 is red (x*10).
        assert_eq!(&out[0..4], &[7.0; 4]);
        assert_eq!(&out[4..8], &[10.0, 10.0, 20.0, 20.0]);
        assert_eq!(&out[8..12], &[20.0, 30.0, 20.0, 30.0]);
        Ok(())
    }

    #[test]
    fn downscale_by_two_averages_pixel_pairs() -> Result<(), String> {
        // Half-pixel centres: output pixel i samples source position 2i + 0.5.
        let img = gradient(8, 8);
        let p = Preprocess::new(&config(Some(4), [4, 4], ColorOrder::Rgb, Layout::Nhwc))?;
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        let red_row: Vec<f32> = (0..4).map(|x| out[x * 3]).collect();
        assert_eq!(red_row, vec![5.0, 25.0, 45.0, 65.0]);
        Ok(())
    }

    #[test]
    fn resize_keeps_aspect_and_normalises() -> Result<(), String> {
        let mut c = config(Some(256), [224, 224], ColorOrder::Rgb, Layout::Nchw);
        c.mean = Some([127.0; 3]);
        c.std = Some([128.0; 3]);
        let p = Preprocess::new(&c)?;
        assert_eq!(p.resized_size(375, 500), (256, 341));
        assert_eq!(p.resized_size(500, 375), (341, 256));
        let img = RgbImage::from_pixel(500, 375, image::Rgb([255, 127, 0]));
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        let plane = 224 * 224;
        assert!(out[..plane].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(out[plane..2 * plane].iter().all(|&v| v == 0.0));
        assert!(out[2 * plane..].iter().all(|&v| (v + 127.0 / 128.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn tiny_images_are_edge_clamped_not_out_of_bounds() -> Result<(), String> {
        let img = gradient(1, 1);
        let p = Preprocess::new(&config(None, [5, 7], ColorOrder::Rgb, Layout::Nchw))?;
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
        Ok(())
    }
}
