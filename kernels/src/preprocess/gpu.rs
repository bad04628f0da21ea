//! The CUDA preprocessing kernel (`cu/preprocess.cu`): one launch preprocesses a batch of
//! differently sized uint8 images into slots of a batch tensor on the device.
//!
//! The images travel packed back to back (each keeps its row pitch) with one descriptor per
//! image ([`DESC_WORDS`] u32 words, floats as their bits): the host computes each image's
//! [`Geometry`] once, exactly as the CPU reference does, so both backends agree to the bit.
// The only unsafe code is the kernel launch; see the SAFETY comment there.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};

use super::{Channels, Fit, Geometry, ImageView, Layout, OutDType, OutElem, PixelFormat, Spec, check_batch, invalid};
use crate::KernelError;
use crate::sources::PREPROCESS;
use crate::toolchain::Gpu;

/// u32 words per image descriptor (`DESC_WORDS` in `preprocess.cu`).
pub const DESC_WORDS: usize = 16;
/// Threads per block; each thread writes two output pixels (see preprocess.cu).
const BLOCK: u32 = 256;
/// CUDA's limit on `gridDim.y`, which indexes the images of a launch.
pub const MAX_BATCH: usize = 65_535;

/// Where each image of a batch sits in the packed upload, and its descriptor.
#[derive(Debug, Clone)]
pub struct BatchLayout {
    spec: Spec,
    descs: Vec<u32>,
    /// Byte offset of each image in the packed buffer.
    offsets: Vec<usize>,
    bytes: usize,
}

impl BatchLayout {
    /// Validates the images against `spec` and lays them out back to back.
    pub fn new(images: &[ImageView<'_>], spec: &Spec) -> Result<Self, KernelError> {
        for (i, im) in images.iter().enumerate() {
            im.validate().map_err(|e| invalid(format!("image {i}: {e}")))?;
        }
        Self::lay_out(images, spec)
    }

    /// The layout of packed RGB images of the given `(width, height)`, before their pixels
    /// exist: what decoding straight into a pinned staging buffer needs
    /// ([`super::decode::decode_batch_into`]).
    pub fn for_sizes(sizes: &[(u32, u32)], spec: &Spec) -> Result<Self, KernelError> {
        let views: Vec<ImageView<'_>> = sizes
            .iter()
            .map(|&(w, h)| ImageView {
                data: &[],
                width: w,
                height: h,
                pitch: w as usize * 3,
                format: PixelFormat::Rgb,
            })
            .collect();
        Self::lay_out(&views, spec)
    }

    /// Byte offset of image `i` in the packed buffer.
    pub fn offset(&self, i: usize) -> Option<usize> {
        self.offsets.get(i).copied()
    }

    fn lay_out(images: &[ImageView<'_>], spec: &Spec) -> Result<Self, KernelError> {
        spec.validate()?;
        if images.len() > MAX_BATCH {
            return Err(invalid(format!("{} images in one launch; at most {MAX_BATCH}", images.len())));
        }
        let mut descs = Vec::with_capacity(images.len() * DESC_WORDS);
        let mut offsets = Vec::with_capacity(images.len());
        let mut bytes = 0usize;
        for (i, im) in images.iter().enumerate() {
            im.validate_shape().map_err(|e| invalid(format!("image {i}: {e}")))?;
            let pitch =
                u32::try_from(im.pitch).map_err(|_| invalid(format!("image {i}: pitch {} too large", im.pitch)))?;
            let g = Geometry::new(im.width, im.height, spec)?;
            let off = bytes as u64;
            descs.extend_from_slice(&[
                off as u32,
                (off >> 32) as u32,
                im.width,
                im.height,
                pitch,
                im.format.code(),
                g.x.resized,
                g.y.resized,
                g.x.start as u32,
                g.y.start as u32,
                g.x.ratio.to_bits(),
                g.y.ratio.to_bits(),
                g.x.inv_ratio.to_bits(),
                g.y.inv_ratio.to_bits(),
                u32::from(g.x.antialias),
                u32::from(g.y.antialias),
            ]);
            offsets.push(bytes);
            bytes += im.span();
        }
        Ok(Self { spec: spec.clone(), descs, offsets, bytes })
    }

    /// Bytes of the packed upload.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The descriptors, [`DESC_WORDS`] per image.
    pub fn descriptors(&self) -> &[u32] {
        &self.descs
    }

    /// Copies the images into `dst` (e.g. a pinned staging buffer), `bytes()` long at least.
    pub fn pack_into(&self, images: &[ImageView<'_>], dst: &mut [u8]) -> Result<(), KernelError> {
        if images.len() != self.len() || dst.len() < self.bytes {
            return Err(invalid(format!(
                "pack {} images into {} bytes; layout has {} images, {} bytes",
                images.len(),
                dst.len(),
                self.len(),
                self.bytes
            )));
        }
        for (i, (im, &off)) in images.iter().zip(&self.offsets).enumerate() {
            let span = im.span();
            let fits = self.offsets.get(i + 1).copied().unwrap_or(self.bytes) - off == span;
            if !fits || im.data.len() < span {
                return Err(invalid(format!("image {i} differs from the one the layout was made for")));
            }
            dst[off..off + span].copy_from_slice(&im.data[..span]);
        }
        Ok(())
    }
}

/// The preprocessing kernel, loaded on one GPU.
#[derive(Debug)]
pub struct Preprocessor {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Preprocessor {
    /// Compiles (or takes from the disk cache) and loads the kernel; runs on `gpu.stream`.
    pub fn new(gpu: &Gpu) -> Result<Self, KernelError> {
        Ok(Self { func: gpu.function(&PREPROCESS, "kiln_preprocess")?, stream: gpu.stream.clone() })
    }

    /// Runs on `stream` instead (e.g. a pipeline's compute stream).
    pub fn with_stream(mut self, stream: Arc<CudaStream>) -> Self {
        self.stream = stream;
        self
    }

    /// The stream the kernel runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Preprocesses `images[k]` into slot `k` of `out` (`f32` for FP32, `u16` bits for FP16).
    pub fn run<T: OutElem>(
        &self,
        images: &[ImageView<'_>],
        spec: &Spec,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        self.run_at(images, spec, out, 0)
    }

    /// As [`Self::run`], into slots `first_slot..`: packs and uploads the images (pageable
    /// memory; the pipeline uses [`Self::launch`] with its pinned buffers instead).
    pub fn run_at<T: OutElem>(
        &self,
        images: &[ImageView<'_>],
        spec: &Spec,
        out: &mut CudaSlice<T>,
        first_slot: usize,
    ) -> Result<(), KernelError> {
        check_batch(images, spec, T::DTYPE, out.len(), first_slot)?;
        if images.is_empty() {
            return Ok(());
        }
        let layout = BatchLayout::new(images, spec)?;
        let mut packed = vec![0u8; layout.bytes()];
        layout.pack_into(images, &mut packed)?;
        let src = self.stream.clone_htod(&packed).map_err(KernelError::driver("preprocess upload images"))?;
        self.launch(&layout, &src.as_view(), out, first_slot)
    }

    /// Launches on already uploaded images: `src` holds what [`BatchLayout::pack_into`] wrote.
    /// Asynchronous on [`Self::stream`]; the descriptors are uploaded here (a few bytes each).
    pub fn launch<T: OutElem>(
        &self,
        layout: &BatchLayout,
        src: &CudaView<'_, u8>,
        out: &mut CudaSlice<T>,
        first_slot: usize,
    ) -> Result<(), KernelError> {
        let spec = &layout.spec;
        if spec.dtype != T::DTYPE {
            return Err(invalid(format!("spec asks for {:?} output but the buffer holds {:?}", spec.dtype, T::DTYPE)));
        }
        let n = layout.len();
        let need = first_slot.checked_add(n).and_then(|s| s.checked_mul(spec.item_len()));
        if need.is_none_or(|need| need > out.len()) || src.len() < layout.bytes() {
            return Err(invalid(format!(
                "launch of {n} images at slot {first_slot}: output has {} elements, source {} of {} bytes",
                out.len(),
                src.len(),
                layout.bytes()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let descs = self
            .stream
            .clone_htod(layout.descriptors())
            .map_err(KernelError::driver("preprocess upload descriptors"))?;
        let plane = spec.out_h * spec.out_w;
        let cfg = LaunchConfig {
            // Two output pixels per thread (see preprocess.cu).
            grid_dim: (plane.div_ceil(2 * BLOCK), n as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (first_slot, out_h, out_w) = (first_slot as u64, spec.out_h as i32, spec.out_w as i32);
        let channels: i32 = match spec.channels {
            Channels::Rgb => 0,
            Channels::Bgr => 1,
            Channels::Gray => 2,
        };
        let layout_code: i32 = i32::from(spec.layout == Layout::Nhwc);
        let (letterbox, pad) = match spec.fit {
            Fit::Letterbox { pad } => (1i32, pad.map(f32::from)),
            Fit::CenterCrop => (0, [0.0; 3]),
        };
        let f16: i32 = i32::from(spec.dtype == OutDType::F16);
        let (s, o) = (spec.scale, spec.offset);
        let mut b = self.stream.launch_builder(&self.func);
        b.arg(src).arg(&descs).arg(out).arg(&first_slot).arg(&out_h).arg(&out_w);
        b.arg(&channels).arg(&layout_code).arg(&letterbox).arg(&f16);
        b.arg(&pad[0]).arg(&pad[1]).arg(&pad[2]);
        b.arg(&s[0]).arg(&s[1]).arg(&s[2]).arg(&o[0]).arg(&o[1]).arg(&o[2]);
        // SAFETY: the arguments match the kernel's signature in preprocess.cu one for one
        // (pointer, pointer, pointer, u64, 6 × i32, 9 × f32). Every access stays in bounds:
        // the descriptors hold exactly `n` entries made by `BatchLayout::new` from validated
        // images, `src` is at least `layout.bytes()` long so every image's span fits, the
        // grid covers `n` images × `plane` pixels (threads past `plane` return), and the
        // output holds slots `first_slot..first_slot + n` of `item_len` elements of the
        // element size the kernel writes (f32 or u16, checked through `T::DTYPE` above).
        unsafe { b.launch(cfg) }.map_err(KernelError::driver("preprocess launch"))?;
        Ok(())
    }
}
