//! Image decoding and the fused resize → centre-crop → normalise → layout step.
//!
//! The math is kiln-kernels' CPU reference ([`kiln_kernels::preprocess::cpu`]), the same
//! that its CUDA kernel implements, so the CPU and GPU backends see the same numbers: only
//! the cropped output pixels are computed, each sampled bilinearly (half-pixel centres,
//! edge-clamped) from the source at the position it would have in the resized image.

use image::RgbImage;
use kiln_kernels::preprocess::{self as kp, ImageView, PixelFormat, Spec};

use crate::config::{ColorOrder, InputConfig, Layout};

pub use kiln_image::{ImageError, decode};

/// A compiled preprocessing recipe for one model input.
#[derive(Debug, Clone)]
pub struct Preprocess {
    spec: Spec,
    /// Resize and crop only, to UINT8 NHWC pixels: the model (a CUDA plan with a
    /// uint8 image input) normalises on the GPU.
    uint8: bool,
}

impl Preprocess {
    /// Resize, crop, normalise and lay out into FP32, as `[input]` says.
    pub fn new(config: &InputConfig) -> Result<Self, String> {
        Self::with_mode(config, false)
    }

    /// Resize and crop into UINT8 NHWC pixels (normalisation happens in the model).
    pub fn uint8(config: &InputConfig) -> Result<Self, String> {
        if config.color == ColorOrder::Gray {
            return Err("input.color: gray images are not supported with a uint8 model input".into());
        }
        Self::with_mode(config, true)
    }

    /// Whether [`Self::run_uint8`] is the step to use.
    pub fn is_uint8(&self) -> bool {
        self.uint8
    }

    fn with_mode(config: &InputConfig, uint8: bool) -> Result<Self, String> {
        let (scale, offset) = if uint8 { ([1.0; 3], [0.0; 3]) } else { config.scale_offset()? };
        let spec = Spec {
            resize: config.resize_shorter.map_or(kp::Resize::None, kp::Resize::ShorterSide),
            channels: match config.color {
                ColorOrder::Rgb => kp::Channels::Rgb,
                ColorOrder::Bgr => kp::Channels::Bgr,
                ColorOrder::Gray => kp::Channels::Gray,
            },
            layout: match config.layout {
                _ if uint8 => kp::Layout::Nhwc,
                Layout::Nchw => kp::Layout::Nchw,
                Layout::Nhwc => kp::Layout::Nhwc,
            },
            scale,
            offset,
            ..Spec::new(config.crop[0], config.crop[1])
        };
        spec.validate().map_err(|e| format!("input preprocessing: {e}"))?;
        Ok(Self { spec, uint8 })
    }

    /// The per-image tensor shape (without the batch axis).
    pub fn item_shape(&self) -> [usize; 3] {
        self.spec.item_shape()
    }

    pub fn item_len(&self) -> usize {
        self.spec.item_len()
    }

    /// Size of the image after the aspect-keeping resize (height, width).
    #[cfg(test)]
    fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        match kp::Geometry::new(w as u32, h as u32, &self.spec) {
            Ok(g) => (g.y.resized as usize, g.x.resized as usize),
            Err(_) => (0, 0),
        }
    }

    /// Writes the preprocessed image into `out` (`item_len()` floats). The spec was
    /// validated in [`Self::new`] and decoded images are at most 16384 px a side, so an
    /// error here is a bug, which the caller reports as an internal error.
    pub fn run(&self, image: &RgbImage, out: &mut [f32]) -> Result<(), kiln_kernels::KernelError> {
        let view = ImageView::packed(image.as_raw(), image.width(), image.height(), PixelFormat::Rgb);
        kp::cpu::preprocess_into(&view, &self.spec, out, 0)
    }

    /// Resized and cropped pixels, rounded to bytes, into `out` (`item_len()` bytes).
    pub fn run_uint8(&self, image: &RgbImage, out: &mut [u8]) -> Result<(), kiln_kernels::KernelError> {
        let mut scratch = vec![0f32; out.len()];
        self.run(image, &mut scratch)?;
        for (o, v) in out.iter_mut().zip(scratch) {
            *o = v.round().clamp(0.0, 255.0) as u8;
        }
        Ok(())
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
    fn uint8_mode_gives_the_resized_pixels_that_normalise_to_the_float_path() -> Result<(), String> {
        let mut c = config(Some(8), [6, 6], ColorOrder::Rgb, Layout::Nchw);
        c.mean = Some([127.0, 127.0, 127.0]);
        c.std = Some([128.0, 128.0, 128.0]);
        let float = Preprocess::new(&c)?;
        let bytes = Preprocess::uint8(&c)?;
        assert!(bytes.is_uint8() && !float.is_uint8());
        assert_eq!(bytes.item_shape(), [6, 6, 3], "NHWC whatever the model's layout");
        let img = gradient(16, 12);
        let mut f = vec![0f32; float.item_len()];
        float.run(&img, &mut f).map_err(|e| e.to_string())?;
        let mut u = vec![0u8; bytes.item_len()];
        bytes.run_uint8(&img, &mut u).map_err(|e| e.to_string())?;
        // Normalising the bytes gives the float path's NCHW values to within half a pixel step.
        for ch in 0..3 {
            for y in 0..6 {
                for x in 0..6 {
                    let from_bytes = (f32::from(u[(y * 6 + x) * 3 + ch]) - 127.0) / 128.0;
                    let direct = f[(ch * 6 + y) * 6 + x];
                    assert!((from_bytes - direct).abs() <= 0.5 / 128.0 + 1e-6, "{from_bytes} vs {direct}");
                }
            }
        }
        assert!(Preprocess::uint8(&config(None, [4, 4], ColorOrder::Gray, Layout::Nchw)).is_err());
        Ok(())
    }

    #[test]
    fn identity_when_no_resize_and_full_crop() -> Result<(), String> {
        let img = gradient(4, 3);
        let p = Preprocess::new(&config(None, [3, 4], ColorOrder::Rgb, Layout::Nhwc))?;
        let mut out = vec![f32::NAN; p.item_len()];
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
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
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
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
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
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
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
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
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
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
        p.run(&img, &mut out).map_err(|e| e.to_string())?;
        assert!(out.iter().all(|v| v.is_finite()));
        Ok(())
    }
}
