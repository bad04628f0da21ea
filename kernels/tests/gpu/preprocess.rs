//! GPU tests: the preprocessing kernel against the CPU reference, on random images of random
//! sizes, formats and pitches, for every option combination; outputs poisoned with NaN first.

use kiln_kernels::KernelError;
use kiln_kernels::preprocess::cpu::preprocess_batch;
use kiln_kernels::preprocess::gpu::Preprocessor;
use kiln_kernels::preprocess::{Channels, Fit, ImageView, Layout, OutDType, PixelFormat, Resize, Spec};

/// xorshift64*: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// An owned random image: random size, format, row padding and (smooth + noisy) content.
struct Img {
    data: Vec<u8>,
    w: u32,
    h: u32,
    pitch: usize,
    format: PixelFormat,
}

impl Img {
    fn random(rng: &mut Rng, max: u32) -> Self {
        let (w, h) = (rng.range(1, max), rng.range(1, max));
        let format = [PixelFormat::Rgb, PixelFormat::Bgr, PixelFormat::Rgba][rng.range(0, 2) as usize];
        let pitch = w as usize * format.bytes_per_pixel() + rng.range(0, 9) as usize;
        let data = (0..pitch * h as usize).map(|_| rng.next() as u8).collect();
        Self { data, w, h, pitch, format }
    }
    fn view(&self) -> ImageView<'_> {
        ImageView { data: &self.data, width: self.w, height: self.h, pitch: self.pitch, format: self.format }
    }
}

fn specs(rng: &mut Rng) -> Vec<Spec> {
    let mut out = Vec::new();
    for resize in [Resize::None, Resize::ShorterSide(0), Resize::Exact] {
        for fit in [Fit::CenterCrop, Fit::Letterbox { pad: [114, 0, 255] }] {
            for antialias in [false, true] {
                for channels in [Channels::Rgb, Channels::Bgr, Channels::Gray] {
                    for layout in [Layout::Nchw, Layout::Nhwc] {
                        for dtype in [OutDType::F32, OutDType::F16] {
                            let resize = match resize {
                                Resize::ShorterSide(_) => Resize::ShorterSide(rng.range(1, 70)),
                                r => r,
                            };
                            let mean = [0; 3].map(|_| 255.0 * rng.unit());
                            let std = [0; 3].map(|_| 255.0 * (0.1 + rng.unit()));
                            let base = Spec::new(rng.range(1, 48), rng.range(1, 48)).mean_std(mean, std);
                            out.push(Spec { resize, fit, antialias, channels, layout, dtype, ..base });
                        }
                    }
                }
            }
        }
    }
    out
}

fn ulps_apart(a: u16, b: u16) -> u32 {
    // Map the sign-magnitude bits onto a monotonic integer line.
    let key = |h: u16| if h & 0x8000 != 0 { -i32::from(h & 0x7FFF) } else { i32::from(h) };
    key(a).abs_diff(key(b))
}

/// Runs `spec` on the GPU into slots 1..=n of an n + 2 slot NaN-poisoned buffer and checks it
/// against the CPU reference; returns the largest error (FP32: absolute; FP16: ulps).
fn check(
    gpu: &kiln_kernels::toolchain::Gpu,
    pre: &Preprocessor,
    imgs: &[Img],
    spec: &Spec,
) -> Result<f64, KernelError> {
    let views: Vec<ImageView<'_>> = imgs.iter().map(Img::view).collect();
    let (item, n) = (spec.item_len(), views.len());
    let drv = |e: cudarc::driver::DriverError| KernelError::Driver(format!("{e:?}"));
    match spec.dtype {
        OutDType::F32 => {
            let mut want = vec![f32::NAN; (n + 2) * item];
            preprocess_batch(&views, spec, &mut want, 1)?;
            let mut dev = gpu.stream.clone_htod(&vec![f32::NAN; want.len()]).map_err(drv)?;
            pre.run_at(&views, spec, &mut dev, 1)?;
            let got = gpu.stream.clone_dtoh(&dev).map_err(drv)?;
            assert!(
                got[..item].iter().chain(&got[(n + 1) * item..]).all(|v| v.is_nan()),
                "wrote outside its slots: {spec:?}"
            );
            let mut worst = 0.0f64;
            for (i, (g, w)) in got[item..(n + 1) * item].iter().zip(&want[item..(n + 1) * item]).enumerate() {
                assert!(!g.is_nan(), "element {i} never written: {spec:?}");
                worst = worst.max(f64::from((g - w).abs()));
            }
            assert!(worst <= 1e-5, "FP32 max abs error {worst} > 1e-5: {spec:?}");
            Ok(worst)
        }
        OutDType::F16 => {
            const NAN16: u16 = 0x7FFF;
            let mut want = vec![NAN16; (n + 2) * item];
            preprocess_batch(&views, spec, &mut want, 1)?;
            let mut dev = gpu.stream.clone_htod(&vec![NAN16; want.len()]).map_err(drv)?;
            pre.run_at(&views, spec, &mut dev, 1)?;
            let got = gpu.stream.clone_dtoh(&dev).map_err(drv)?;
            assert!(
                got[..item].iter().chain(&got[(n + 1) * item..]).all(|&v| v == NAN16),
                "wrote outside its slots: {spec:?}"
            );
            let mut worst = 0u32;
            for (i, (&g, &w)) in got[item..(n + 1) * item].iter().zip(&want[item..(n + 1) * item]).enumerate() {
                assert!(!half::f16::from_bits(g).is_nan(), "element {i} never written: {spec:?}");
                worst = worst.max(ulps_apart(g, w));
            }
            assert!(worst <= 1, "FP16 error of {worst} ulps > 1: {spec:?}");
            Ok(f64::from(worst))
        }
    }
}

#[test]
fn kernel_matches_cpu_reference_for_every_option_combination() -> Result<(), KernelError> {
    let Some(gpu) = super::gpu() else { return Ok(()) };
    let pre = Preprocessor::new(&gpu)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut worst32, mut worst16, mut count) = (0.0f64, 0.0f64, 0);
    for spec in specs(&mut rng) {
        let imgs: Vec<Img> = (0..rng.range(1, 5)).map(|_| Img::random(&mut rng, 90)).collect();
        let e = check(&gpu, &pre, &imgs, &spec)?;
        match spec.dtype {
            OutDType::F32 => worst32 = worst32.max(e),
            OutDType::F16 => worst16 = worst16.max(e),
        }
        count += 1;
    }
    println!("{count} specs: FP32 max abs error {worst32:e}, FP16 max error {worst16} ulp");
    Ok(())
}

#[test]
fn kernel_matches_cpu_reference_on_photo_sized_batches() -> Result<(), KernelError> {
    let Some(gpu) = super::gpu() else { return Ok(()) };
    let pre = Preprocessor::new(&gpu)?;
    let mut rng = Rng(42);
    let imgs: Vec<Img> = (0..6)
        .map(|i| {
            let mut im = Img::random(&mut rng, 8);
            (im.w, im.h) = if i % 2 == 0 { (500, 375) } else { (375 + i, 500 - i) };
            im.pitch = im.w as usize * im.format.bytes_per_pixel() + 64;
            im.data = (0..im.pitch * im.h as usize).map(|_| rng.next() as u8).collect();
            im
        })
        .collect();
    let base = Spec { resize: Resize::ShorterSide(256), ..Spec::new(224, 224) }
        .mean_std([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]);
    for antialias in [false, true] {
        for dtype in [OutDType::F32, OutDType::F16] {
            check(&gpu, &pre, &imgs, &Spec { antialias, dtype, ..base.clone() })?;
        }
    }
    Ok(())
}

#[test]
fn wrong_buffers_are_errors() -> Result<(), KernelError> {
    let Some(gpu) = super::gpu() else { return Ok(()) };
    let pre = Preprocessor::new(&gpu)?;
    let img = Img::random(&mut Rng(7), 20);
    let spec = Spec::new(8, 8);
    let drv = |e: cudarc::driver::DriverError| KernelError::Driver(format!("{e:?}"));
    let mut small = gpu.stream.alloc_zeros::<f32>(spec.item_len() - 1).map_err(drv)?;
    assert!(matches!(pre.run(&[img.view()], &spec, &mut small), Err(KernelError::InvalidArgument(_))));
    let mut halfs = gpu.stream.alloc_zeros::<u16>(spec.item_len()).map_err(drv)?;
    assert!(matches!(pre.run(&[img.view()], &spec, &mut halfs), Err(KernelError::InvalidArgument(_))));
    Ok(())
}
