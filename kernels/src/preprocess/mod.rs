//! Image preprocessing: uint8 HWC → resize → crop/letterbox → normalise → NCHW/NHWC FP32/FP16.
//!
//! [`cpu`] is the reference implementation and [`gpu`] the CUDA kernel of the same math;
//! both take their per-image geometry from [`Geometry::new`], so the two agree to the bit
//! (every float operation is done in the same order, without fused multiply-adds).
//!
//! The math, per output pixel `(oy, ox)` and axis (source length `S`, resized length `R`,
//! start `s` of the output window in the resized image, `ratio = S / R` in f32):
//! - resized index `r = o + s`;
//! - bilinear (upscale, or downscale without antialias): `pos = (r + 0.5)·ratio − 0.5`
//!   clamped to `[0, S − 1]`, taps `floor(pos)` and `min(floor(pos) + 1, S − 1)`,
//!   `a + (b − a)·frac` — exactly the old server's math;
//! - antialias (downscale only, `R < S`): the triangle filter widened by `ratio`, as PIL and
//!   torchvision do: centre `c = (r + 0.5)·ratio`, taps `j` in
//!   `[max(floor(c − ratio + 0.5), 0), min(floor(c + ratio + 0.5), S))`, weights
//!   `max(0, 1 − |(j + 0.5 − c)/ratio|)`, normalised by their sum (float, not rounded to u8);
//! - gray is the luma `0.299·R + 0.587·G + 0.114·B` of the interpolated pixel;
//! - `out = v·scale[c] + offset[c]`, then FP16 by round-to-nearest-even when asked.

pub mod cpu;
pub mod decode;
pub mod gpu;

use crate::KernelError;

/// Pixel layout of a uint8 source image (alpha, if any, is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb,
    Bgr,
    Rgba,
}

impl PixelFormat {
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb | PixelFormat::Bgr => 3,
            PixelFormat::Rgba => 4,
        }
    }

    /// Byte offsets of red, green and blue inside one pixel.
    pub fn rgb_offsets(self) -> [usize; 3] {
        match self {
            PixelFormat::Rgb | PixelFormat::Rgba => [0, 1, 2],
            PixelFormat::Bgr => [2, 1, 0],
        }
    }

    /// Code shared with the kernel (`FMT_*` in `preprocess.cu`).
    pub(crate) fn code(self) -> u32 {
        match self {
            PixelFormat::Rgb => 0,
            PixelFormat::Bgr => 1,
            PixelFormat::Rgba => 2,
        }
    }
}

/// A borrowed uint8 HWC image; rows start `pitch` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pub data: &'a [u8],
    pub width: u32,
    pub height: u32,
    /// Bytes from the start of one row to the next (≥ width × bytes per pixel).
    pub pitch: usize,
    pub format: PixelFormat,
}

impl<'a> ImageView<'a> {
    /// A tightly packed image (`pitch = width × bytes per pixel`).
    pub fn packed(data: &'a [u8], width: u32, height: u32, format: PixelFormat) -> Self {
        Self { data, width, height, pitch: width as usize * format.bytes_per_pixel(), format }
    }

    /// Bytes the image spans in `data` (the last row needs no padding).
    pub fn span(&self) -> usize {
        (self.height as usize).saturating_sub(1) * self.pitch + self.width as usize * self.format.bytes_per_pixel()
    }

    /// Size and pitch only (what a batch layout needs before the pixels exist).
    pub fn validate_shape(&self) -> Result<(), KernelError> {
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || w > MAX_DIM || h > MAX_DIM {
            return Err(invalid(format!("image size {w}×{h}: each side must be in 1..={MAX_DIM}")));
        }
        let row = w as usize * self.format.bytes_per_pixel();
        if self.pitch < row {
            return Err(invalid(format!("pitch {} is less than a row of {row} bytes", self.pitch)));
        }
        Ok(())
    }

    /// Shape, pitch, and that `data` holds every row.
    pub fn validate(&self) -> Result<(), KernelError> {
        self.validate_shape()?;
        let (w, h) = (self.width, self.height);
        let row = w as usize * self.format.bytes_per_pixel();
        let need = (h as usize - 1).checked_mul(self.pitch).and_then(|v| v.checked_add(row));
        match need {
            Some(n) if n <= self.data.len() => Ok(()),
            _ => Err(invalid(format!(
                "{w}×{h} {:?} image with pitch {} needs more than the {} bytes given",
                self.format,
                self.pitch,
                self.data.len()
            ))),
        }
    }
}

/// Largest source or output side accepted: keeps every source index exact in f32 (< 2²⁴).
pub const MAX_DIM: u32 = 1 << 20;
/// Largest resized side: resized indices stay inside the kernel's i32 arithmetic (both
/// backends convert them to f32 the same way).
pub const MAX_RESIZED: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Keep the source size.
    None,
    /// Scale so that the shorter side is this long, keeping the aspect ratio (sizes rounded).
    ShorterSide(u32),
    /// Fill the output: stretched to `out_h × out_w` with [`Fit::CenterCrop`]; with
    /// [`Fit::Letterbox`] the aspect-keeping fit (the limiting side fills the output).
    Exact,
}

/// How the resized image is placed on the output, centred (offsets by floor division).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Crop what overflows; where the resized image is smaller than the output its edge
    /// pixels are repeated (the old server's behaviour).
    CenterCrop,
    /// Crop what overflows; pad with this RGB colour (normalised like any pixel) where the
    /// resized image does not cover the output.
    Letterbox { pad: [u8; 3] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    Rgb,
    Bgr,
    /// One channel: luma, normalised with `scale[0]` and `offset[0]`.
    Gray,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Rgb | Channels::Bgr => 3,
            Channels::Gray => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDType {
    F32,
    /// IEEE half precision, round-to-nearest-even of the FP32 value.
    F16,
}

/// One model input's preprocessing recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub out_h: u32,
    pub out_w: u32,
    pub resize: Resize,
    pub fit: Fit,
    /// Triangle-filter the downscaled axes (like PIL / torchvision `antialias=True`).
    pub antialias: bool,
    pub channels: Channels,
    /// `out = x·scale + offset`, i.e. `scale = 1/std`, `offset = −mean/std` for `(x − mean)/std`.
    pub scale: [f32; 3],
    pub offset: [f32; 3],
    pub layout: Layout,
    pub dtype: OutDType,
}

impl Spec {
    /// `out_h × out_w` RGB, no resize, centre crop, identity normalisation, NCHW FP32.
    pub fn new(out_h: u32, out_w: u32) -> Self {
        Self {
            out_h,
            out_w,
            resize: Resize::None,
            fit: Fit::CenterCrop,
            antialias: false,
            channels: Channels::Rgb,
            scale: [1.0; 3],
            offset: [0.0; 3],
            layout: Layout::Nchw,
            dtype: OutDType::F32,
        }
    }

    /// Scale and offset for `(x − mean) / std` (per channel, in pixel units 0..255).
    pub fn mean_std(mut self, mean: [f32; 3], std: [f32; 3]) -> Self {
        for c in 0..3 {
            self.scale[c] = 1.0 / std[c];
            self.offset[c] = -mean[c] / std[c];
        }
        self
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        if self.out_h == 0 || self.out_w == 0 || self.out_h > MAX_DIM || self.out_w > MAX_DIM {
            return Err(invalid(format!(
                "output size {}×{}: each side must be in 1..={MAX_DIM}",
                self.out_h, self.out_w
            )));
        }
        if self.item_len().checked_mul(4).is_none_or(|b| b > u32::MAX as usize) {
            return Err(invalid(format!("output item {}×{} is too large", self.out_h, self.out_w)));
        }
        if let Resize::ShorterSide(s) = self.resize
            && (s == 0 || s > MAX_DIM)
        {
            return Err(invalid(format!("resize shorter side {s}: must be in 1..={MAX_DIM}")));
        }
        if self.scale.iter().chain(&self.offset).any(|v| !v.is_finite()) {
            return Err(invalid(format!("scale {:?} / offset {:?} must be finite", self.scale, self.offset)));
        }
        Ok(())
    }

    pub fn channel_count(&self) -> usize {
        self.channels.count()
    }

    /// Elements per image in the output tensor.
    pub fn item_len(&self) -> usize {
        self.channel_count() * self.out_h as usize * self.out_w as usize
    }

    /// The per-image tensor shape (without the batch axis).
    pub fn item_shape(&self) -> [usize; 3] {
        let (c, h, w) = (self.channel_count(), self.out_h as usize, self.out_w as usize);
        match self.layout {
            Layout::Nchw => [c, h, w],
            Layout::Nhwc => [h, w, c],
        }
    }
}

/// One axis of an image's geometry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AxisGeom {
    /// Source length.
    pub src: u32,
    /// Length after resize.
    pub resized: u32,
    /// Output index 0 sits at this index of the resized image (negative: padded/clamped).
    pub start: i32,
    /// `src / resized` in f32 (source pixels per resized pixel).
    pub ratio: f32,
    /// Triangle filter of half-width `ratio` instead of bilinear (antialiased downscale).
    pub antialias: bool,
    /// `1 / ratio` in f32 (the triangle's slope), used only with `antialias`.
    pub inv_ratio: f32,
}

impl AxisGeom {
    fn new(src: u32, resized: u32, out: u32, antialias: bool) -> Self {
        let ratio = src as f32 / resized as f32;
        Self {
            src,
            resized,
            // Floor division, as the reference implementations do, so odd margins match.
            start: (i64::from(resized) - i64::from(out)).div_euclid(2) as i32,
            ratio,
            antialias: antialias && resized < src,
            inv_ratio: 1.0 / ratio,
        }
    }
}

/// Where one image lands on the output: computed once on the host, used by both backends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub y: AxisGeom,
    pub x: AxisGeom,
}

impl Geometry {
    pub fn new(width: u32, height: u32, spec: &Spec) -> Result<Self, KernelError> {
        let (h, w) = (u64::from(height), u64::from(width));
        let (rh, rw) = match (spec.resize, spec.fit) {
            (Resize::None, _) => (h, w),
            // The old server's rounding, in f64.
            (Resize::ShorterSide(s), _) => {
                let s = f64::from(s);
                let ratio = s / h.min(w) as f64;
                let rh = if h <= w { s } else { (h as f64 * ratio).round() };
                let rw = if w < h { s } else { (w as f64 * ratio).round() };
                ((rh as u64).max(1), (rw as u64).max(1))
            }
            (Resize::Exact, Fit::CenterCrop) => (u64::from(spec.out_h), u64::from(spec.out_w)),
            (Resize::Exact, Fit::Letterbox { .. }) => {
                let (oh, ow) = (f64::from(spec.out_h), f64::from(spec.out_w));
                let scale = (oh / h as f64).min(ow / w as f64);
                let rh = ((h as f64 * scale).round() as u64).clamp(1, u64::from(spec.out_h));
                let rw = ((w as f64 * scale).round() as u64).clamp(1, u64::from(spec.out_w));
                (rh, rw)
            }
        };
        if rh > u64::from(MAX_RESIZED) || rw > u64::from(MAX_RESIZED) {
            return Err(invalid(format!("{width}×{height} image resizes to {rw}×{rh}, beyond {MAX_RESIZED} per side")));
        }
        Ok(Self {
            y: AxisGeom::new(height, rh as u32, spec.out_h, spec.antialias),
            x: AxisGeom::new(width, rw as u32, spec.out_w, spec.antialias),
        })
    }
}

pub(crate) fn invalid(msg: String) -> KernelError {
    KernelError::InvalidArgument(msg)
}

/// An output element type: `f32` for [`OutDType::F32`]; `half::f16` or its bits as `u16`
/// (what a `CudaSlice` holds) for [`OutDType::F16`].
pub trait OutElem: Copy + Send + Sync + 'static {
    const DTYPE: OutDType;
    fn from_f32(v: f32) -> Self;
}

impl OutElem for f32 {
    const DTYPE: OutDType = OutDType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl OutElem for half::f16 {
    const DTYPE: OutDType = OutDType::F16;
    fn from_f32(v: f32) -> Self {
        // half's conversion rounds to nearest even, like CUDA's __float2half_rn.
        half::f16::from_f32(v)
    }
}

impl OutElem for u16 {
    const DTYPE: OutDType = OutDType::F16;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v).to_bits()
    }
}

/// Checks a batch call: spec, every image, dtype and room for slots `first_slot..first_slot + n`.
pub(crate) fn check_batch(
    images: &[ImageView<'_>],
    spec: &Spec,
    dtype: OutDType,
    out_len: usize,
    first_slot: usize,
) -> Result<(), KernelError> {
    spec.validate()?;
    if spec.dtype != dtype {
        return Err(invalid(format!("spec asks for {:?} output but the buffer holds {dtype:?}", spec.dtype)));
    }
    for (i, im) in images.iter().enumerate() {
        im.validate().map_err(|e| invalid(format!("image {i}: {e}")))?;
    }
    let need = first_slot.checked_add(images.len()).and_then(|n| n.checked_mul(spec.item_len()));
    match need {
        Some(n) if n <= out_len => Ok(()),
        _ => Err(invalid(format!(
            "output of {out_len} elements has no room for slots {first_slot}..{} of {} elements",
            first_slot.saturating_add(images.len()),
            spec.item_len()
        ))),
    }
}
