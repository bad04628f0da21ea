//! The CPU preprocessing reference against hand-computed cases and the `image` crate.

use kiln_kernels::KernelError;
use kiln_kernels::preprocess::cpu::{preprocess_batch, preprocess_into};
use kiln_kernels::preprocess::{Channels, Fit, Geometry, ImageView, Layout, OutDType, PixelFormat, Resize, Spec};

type R = Result<(), KernelError>;

/// An RGB image whose pixel (x, y) is `f(x, y)`.
fn rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).flat_map(|(x, y)| f(x, y)).collect()
}

fn gradient(w: u32, h: u32) -> Vec<u8> {
    rgb(w, h, |x, y| [(x * 10) as u8, (y * 10) as u8, 7])
}

fn run(data: &[u8], w: u32, h: u32, spec: &Spec) -> Result<Vec<f32>, KernelError> {
    let mut out = vec![f32::NAN; spec.item_len()];
    preprocess_into(&ImageView::packed(data, w, h, PixelFormat::Rgb), spec, &mut out, 0)?;
    Ok(out)
}

fn nhwc(mut spec: Spec) -> Spec {
    spec.layout = Layout::Nhwc;
    spec
}

#[test]
fn identity_size_copies_the_pixels() -> R {
    let img = gradient(4, 3);
    let out = run(&img, 4, 3, &nhwc(Spec::new(3, 4)))?;
    assert_eq!(out, img.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn constant_image_stays_constant_under_every_resize() -> R {
    let img = rgb(37, 23, |_, _| [200, 100, 50]);
    for (resize, aa) in [
        (Resize::Exact, false),
        (Resize::Exact, true),
        (Resize::ShorterSide(9), true),
        (Resize::ShorterSide(64), false),
    ] {
        for fit in [Fit::CenterCrop, Fit::Letterbox { pad: [200, 100, 50] }] {
            let spec = Spec { resize, antialias: aa, fit, ..Spec::new(16, 12) };
            let out = run(&img, 37, 23, &spec)?;
            let plane = 16 * 12;
            for (c, v) in [200.0f32, 100.0, 50.0].into_iter().enumerate() {
                let ch = &out[c * plane..(c + 1) * plane];
                assert!(ch.iter().all(|&x| (x - v).abs() < 1e-3), "{resize:?} aa={aa} {fit:?} channel {c}: {ch:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn two_by_two_upscales_to_four_by_four_with_half_pixel_centres() -> R {
    // Red goes 0 → 100 along x, green 0 → 200 along y. Output index o samples source
    // position (o + 0.5)/2 − 0.5 = −0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    let img = rgb(2, 2, |x, y| [(x * 100) as u8, (y * 200) as u8, 0]);
    let out = run(&img, 2, 2, &Spec { resize: Resize::Exact, ..Spec::new(4, 4) })?;
    let expect = [0.0, 25.0, 75.0, 100.0];
    for y in 0..4 {
        assert_eq!(&out[y * 4..y * 4 + 4], &expect, "red row {y}");
        for x in 0..4 {
            assert_eq!(out[16 + y * 4 + x], expect[y] * 2.0, "green ({x}, {y})");
        }
    }
    Ok(())
}

#[test]
fn downscale_by_two_averages_pixel_pairs_without_antialias() -> R {
    let img = gradient(8, 8);
    let out = run(&img, 8, 8, &nhwc(Spec { resize: Resize::ShorterSide(4), ..Spec::new(4, 4) }))?;
    let red_row: Vec<f32> = (0..4).map(|x| out[x * 3]).collect();
    assert_eq!(red_row, vec![5.0, 25.0, 45.0, 65.0]);
    Ok(())
}

#[test]
fn antialias_downscale_is_the_widened_triangle_filter() -> R {
    // Ratio 2: output 0 has centre 1.0, taps 0..3 with weights .75 .75 .25 (sum 1.75);
    // output 1 has centre 3.0, taps 1..5 with weights .25 .75 .75 .25 (sum 2).
    let img = gradient(8, 8);
    let spec = nhwc(Spec { resize: Resize::ShorterSide(4), antialias: true, ..Spec::new(4, 4) });
    let out = run(&img, 8, 8, &spec)?;
    let red_row: Vec<f32> = (0..4).map(|x| out[x * 3]).collect();
    let edge = (0.0 * 0.75 + 10.0 * 0.75 + 20.0 * 0.25) / 1.75;
    assert!((red_row[0] - edge).abs() < 1e-5, "{red_row:?}");
    assert_eq!(&red_row[1..3], &[25.0, 45.0]);
    assert!((red_row[3] - (70.0 - edge)).abs() < 1e-4, "{red_row:?}");
    // Upscaled axes ignore the flag.
    let up = Spec { resize: Resize::Exact, ..Spec::new(6, 6) };
    assert_eq!(
        run(&img[..], 8, 8, &Spec { out_h: 16, out_w: 16, ..up.clone() })?,
        run(&img, 8, 8, &Spec { out_h: 16, out_w: 16, antialias: true, ..up })?
    );
    Ok(())
}

#[test]
fn centre_crop_offsets_use_floor_division_and_bgr_reorders() -> R {
    let img = gradient(6, 4);
    let spec = Spec { channels: Channels::Bgr, ..Spec::new(2, 2) };
    let out = run(&img, 6, 4, &spec)?;
    // Crop rows 1..3, cols 2..4. Channel 0 is blue (constant 7), channel 2 is red (x*10).
    assert_eq!(&out[0..4], &[7.0; 4]);
    assert_eq!(&out[4..8], &[10.0, 10.0, 20.0, 20.0]);
    assert_eq!(&out[8..12], &[20.0, 30.0, 20.0, 30.0]);
    // Odd margin: 5 wide into 2 → start floor(3/2) = 1.
    let out = run(&gradient(5, 2), 5, 2, &Spec::new(2, 2))?;
    assert_eq!(&out[0..4], &[10.0, 20.0, 10.0, 20.0]);
    Ok(())
}

#[test]
fn shorter_side_resize_matches_the_old_server_sizes() -> R {
    let spec = Spec { resize: Resize::ShorterSide(256), ..Spec::new(224, 224) };
    let g = Geometry::new(500, 375, &spec)?;
    assert_eq!((g.x.resized, g.y.resized, g.x.start, g.y.start), (341, 256, 58, 16));
    let g = Geometry::new(375, 500, &spec)?;
    assert_eq!((g.x.resized, g.y.resized), (256, 341));
    Ok(())
}

#[test]
fn letterbox_keeps_aspect_centres_and_pads() -> R {
    // 2×1 image into 4×4: fit scale 2 → 4×2, rows 0 and 3 are padding.
    let img = rgb(2, 1, |x, _| [(x * 100) as u8, 0, 0]);
    let spec = nhwc(Spec { resize: Resize::Exact, fit: Fit::Letterbox { pad: [1, 2, 3] }, ..Spec::new(4, 4) });
    let g = Geometry::new(2, 1, &spec)?;
    assert_eq!((g.x.resized, g.y.resized, g.x.start, g.y.start), (4, 2, 0, -1));
    let out = run(&img, 2, 1, &spec)?;
    let px = |x: usize, y: usize| &out[(y * 4 + x) * 3..(y * 4 + x) * 3 + 3];
    for x in 0..4 {
        assert_eq!(px(x, 0), &[1.0, 2.0, 3.0]);
        assert_eq!(px(x, 3), &[1.0, 2.0, 3.0]);
        assert_eq!(px(x, 1), px(x, 2));
    }
    assert_eq!([px(0, 1)[0], px(1, 1)[0], px(2, 1)[0], px(3, 1)[0]], [0.0, 25.0, 75.0, 100.0]);
    // Odd margin: 4×1 into 4×4 → one row at index 2 (start floor(−3/2) = −2).
    let out = run(&rgb(4, 1, |_, _| [9, 9, 9]), 4, 1, &spec)?;
    let rows: Vec<f32> = (0..4).map(|y| out[y * 12]).collect();
    assert_eq!(rows, vec![1.0, 1.0, 9.0, 1.0]);
    // Without resize, a big image is cropped and a small one padded, both centred.
    let spec = Spec { resize: Resize::None, ..spec };
    assert_eq!(Geometry::new(10, 2, &spec)?.x.start, 3);
    assert_eq!(Geometry::new(10, 2, &spec)?.y.start, -1);
    Ok(())
}

#[test]
fn pad_colour_is_normalised_and_converted_like_pixels() -> R {
    let spec = Spec {
        resize: Resize::None,
        fit: Fit::Letterbox { pad: [100, 50, 20] },
        channels: Channels::Gray,
        scale: [0.5, 9.0, 9.0],
        offset: [-1.0, 9.0, 9.0],
        ..Spec::new(3, 3)
    };
    let out = run(&rgb(1, 1, |_, _| [100, 50, 20]), 1, 1, &spec)?;
    let luma = 0.299f32 * 100.0 + 0.587 * 50.0 + 0.114 * 20.0;
    assert!(out.iter().all(|&v| v == luma * 0.5 - 1.0), "{out:?}");
    Ok(())
}

#[test]
fn source_formats_and_row_pitch_give_the_same_output() -> R {
    let (w, h) = (7u32, 5u32);
    let img = rgb(w, h, |x, y| [(x * 30) as u8, (y * 40) as u8, (x * y) as u8]);
    let spec = Spec { resize: Resize::Exact, antialias: true, ..Spec::new(3, 4) };
    let want = run(&img, w, h, &spec)?;
    let bgr: Vec<u8> = img.chunks(3).flat_map(|p| [p[2], p[1], p[0]]).collect();
    // RGBA with 5 bytes of junk at the end of each row.
    let pitch = w as usize * 4 + 5;
    let mut rgba = vec![0xAB; pitch * h as usize];
    for (i, p) in img.chunks(3).enumerate() {
        let (y, x) = (i / w as usize, i % w as usize);
        rgba[y * pitch + x * 4..y * pitch + x * 4 + 4].copy_from_slice(&[p[0], p[1], p[2], 0x55]);
    }
    for view in [
        ImageView::packed(&bgr, w, h, PixelFormat::Bgr),
        ImageView { data: &rgba[..rgba.len() - 5], width: w, height: h, pitch, format: PixelFormat::Rgba },
    ] {
        let mut out = vec![f32::NAN; spec.item_len()];
        preprocess_into(&view, &spec, &mut out, 0)?;
        assert_eq!(out, want, "{:?}", view.format);
    }
    Ok(())
}

#[test]
fn gray_is_luma_with_the_first_normalisation() -> R {
    let img = gradient(3, 2);
    let spec = Spec { channels: Channels::Gray, ..Spec::new(2, 3).mean_std([10.0, 99.0, 99.0], [2.0, 99.0, 99.0]) };
    assert_eq!(spec.item_shape(), [1, 2, 3]);
    let out = run(&img, 3, 2, &spec)?;
    for (i, px) in img.chunks(3).enumerate() {
        let luma = 0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2]);
        assert!((out[i] - (luma - 10.0) / 2.0).abs() < 1e-5, "pixel {i}: {} vs {luma}", out[i]);
    }
    Ok(())
}

#[test]
fn fp16_output_rounds_to_nearest_even() -> R {
    // Offset 2048: halves are 2 apart there, so 2049 and 2051 are ties (→ 2048 and 2052),
    // and 2050.5 rounds up to 2052.
    let img = rgb(3, 1, |x, _| [[1, 3, 2][x as usize], 0, 0]);
    let spec = Spec { offset: [2048.0; 3], scale: [1.0, 1.0, 1.0], dtype: OutDType::F16, ..Spec::new(1, 3) };
    let mut out = vec![half::f16::NAN; spec.item_len()];
    preprocess_into(&ImageView::packed(&img, 3, 1, PixelFormat::Rgb), &spec, &mut out, 0)?;
    assert_eq!(out[..3].iter().map(|v| v.to_f32()).collect::<Vec<_>>(), vec![2048.0, 2052.0, 2050.0]);
    let spec = Spec { offset: [2048.5; 3], ..spec };
    let mut bits = vec![0xFFFFu16; spec.item_len()];
    preprocess_into(&ImageView::packed(&img, 3, 1, PixelFormat::Rgb), &spec, &mut bits, 0)?;
    assert_eq!(half::f16::from_bits(bits[2]).to_f32(), 2050.0); // 2050.5 is below the 2051 tie
    assert_eq!(half::f16::from_bits(bits[0]).to_f32(), 2050.0); // 2049.5 → nearest 2050
    Ok(())
}

#[test]
fn batch_writes_only_its_slots() -> R {
    let a = gradient(9, 6);
    let b = rgb(5, 11, |x, y| [(x * 7) as u8, (y * 3) as u8, 200]);
    let spec = Spec { resize: Resize::ShorterSide(5), ..Spec::new(4, 5) };
    let item = spec.item_len();
    let mut out = vec![-7.0f32; 4 * item];
    let views = [ImageView::packed(&a, 9, 6, PixelFormat::Rgb), ImageView::packed(&b, 5, 11, PixelFormat::Rgb)];
    preprocess_batch(&views, &spec, &mut out, 1)?;
    assert!(out[..item].iter().chain(&out[3 * item..]).all(|&v| v == -7.0));
    assert_eq!(out[item..2 * item], run(&a, 9, 6, &spec)?[..]);
    assert_eq!(out[2 * item..3 * item], run(&b, 5, 11, &spec)?[..]);
    Ok(())
}

#[test]
fn tiny_images_are_edge_clamped_not_out_of_bounds() -> R {
    for aa in [false, true] {
        let spec = Spec { resize: Resize::ShorterSide(2), antialias: aa, ..Spec::new(5, 7) };
        let out = run(&gradient(3, 1), 3, 1, &spec)?;
        assert!(out.iter().all(|v| v.is_finite()), "aa={aa}: {out:?}");
    }
    Ok(())
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let img = gradient(4, 4);
    let ok = ImageView::packed(&img, 4, 4, PixelFormat::Rgb);
    let spec = Spec::new(2, 2);
    let mut out = vec![0.0f32; spec.item_len()];
    let bad_views = [
        ImageView { width: 0, ..ok },
        ImageView { height: 5, ..ok },
        ImageView { pitch: 11, ..ok },
        ImageView { data: &img[..47], ..ok },
    ];
    for v in bad_views {
        assert!(matches!(preprocess_into(&v, &spec, &mut out, 0), Err(KernelError::InvalidArgument(_))), "{v:?}");
    }
    let bad_specs = [
        Spec::new(0, 2),
        Spec { resize: Resize::ShorterSide(0), ..spec.clone() },
        Spec { scale: [f32::NAN, 1.0, 1.0], ..spec.clone() },
        Spec { dtype: OutDType::F16, ..spec.clone() },
        Spec { resize: Resize::ShorterSide(1 << 21), ..spec.clone() },
    ];
    for s in bad_specs {
        let r = preprocess_into(&ImageView::packed(&img[..3 * 4], 4, 1, PixelFormat::Rgb), &s, &mut out, 0);
        assert!(matches!(r, Err(KernelError::InvalidArgument(_))), "{s:?}");
    }
    // A resized side beyond MAX_RESIZED (4096 × 2²⁰ wide).
    let wide = vec![0u8; 4096 * 3];
    let huge = Spec { resize: Resize::ShorterSide(1 << 20), ..spec.clone() };
    let r = preprocess_into(&ImageView::packed(&wide, 4096, 1, PixelFormat::Rgb), &huge, &mut out, 0);
    assert!(matches!(r, Err(KernelError::InvalidArgument(_))));
    assert!(matches!(preprocess_into(&ok, &spec, &mut out, 1), Err(KernelError::InvalidArgument(_))));
    assert!(matches!(preprocess_into(&ok, &spec, &mut out, usize::MAX), Err(KernelError::InvalidArgument(_))));
}

/// Max abs difference between our output (NHWC RGB, no normalisation) and `image`'s resize.
fn max_diff_vs_image_crate(w: u32, h: u32, ow: u32, oh: u32, antialias: bool) -> Result<f32, KernelError> {
    let data = rgb(w, h, |x, y| {
        let v = (x * 37 + y * 91) ^ (x * y);
        [(v % 256) as u8, ((v / 3) % 256) as u8, ((x * 255) / w.max(1)) as u8]
    });
    let ours = run(&data, w, h, &nhwc(Spec { resize: Resize::Exact, antialias, ..Spec::new(oh, ow) }))?;
    let src = image::RgbImage::from_raw(w, h, data).ok_or_else(|| KernelError::InvalidArgument("size".into()))?;
    let theirs = image::imageops::resize(&src, ow, oh, image::imageops::FilterType::Triangle);
    // `image` works in f32 too but rounds its result to u8 (±0.5) and treats the outermost
    // half pixel differently (it renormalises the filter instead of clamping the position),
    // so we compare the interior only.
    let mut worst = 0.0f32;
    for y in 1..oh.saturating_sub(1) {
        for x in 1..ow.saturating_sub(1) {
            for c in 0..3 {
                let i = ((y * ow + x) * 3 + c) as usize;
                worst = worst.max((ours[i] - f32::from(theirs.as_raw()[i])).abs());
            }
        }
    }
    Ok(worst)
}

#[test]
fn bilinear_upscale_matches_the_image_crate_within_rounding() -> R {
    // Stated tolerance: 0.5 (image rounds to u8) plus f32 noise.
    for (w, h, ow, oh) in [(8, 6, 16, 12), (13, 7, 40, 29), (5, 5, 5, 5)] {
        let d = max_diff_vs_image_crate(w, h, ow, oh, false)?;
        assert!(d <= 0.5 + 1e-3, "{w}×{h} → {ow}×{oh}: {d}");
    }
    Ok(())
}

#[test]
fn antialiased_downscale_matches_the_image_crate_within_one_level() -> R {
    // `image` antialiases downscales with the same widened triangle; its rounding to u8 and
    // slightly different tap bounds leave differences of at most one grey level.
    for (w, h, ow, oh) in [(64, 48, 16, 12), (101, 77, 30, 23), (50, 50, 23, 17)] {
        let d = max_diff_vs_image_crate(w, h, ow, oh, true)?;
        assert!(d <= 1.0, "{w}×{h} → {ow}×{oh}: {d}");
    }
    Ok(())
}

/// Files decoded on the thread pool straight into a staging buffer give the same
/// preprocessing as decoding them one by one.
#[test]
fn decoding_straight_into_staging_matches_decoding_alone() -> Result<(), Box<dyn std::error::Error>> {
    use kiln_kernels::preprocess::decode::decode_batch_into;
    let files: Vec<Vec<u8>> = [(31u32, 17u32), (8, 40), (64, 48)]
        .iter()
        .map(|&(w, h)| {
            let img =
                image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8]));
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).map(|()| bytes)
        })
        .collect::<Result<_, _>>()?;
    let refs: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    let spec = Spec::new(16, 16);
    let mut staging = vec![0u8; 31 * 17 * 3 + 8 * 40 * 3 + 64 * 48 * 3];
    let layout = decode_batch_into(&refs, &spec, &mut staging)?;
    assert_eq!(layout.len(), 3);
    for (i, f) in files.iter().enumerate() {
        let decoded = kiln_image::decode(f)?;
        let off = layout.offset(i).ok_or("no offset")?;
        assert_eq!(&staging[off..off + decoded.as_raw().len()], decoded.as_raw().as_slice(), "image {i}");
    }
    let mut small = vec![0u8; 100];
    assert!(decode_batch_into(&refs, &spec, &mut small).is_err());
    let broken: Vec<&[u8]> = vec![&files[0], &[0xFF, 0xD8, 0x00]];
    assert!(decode_batch_into(&broken, &spec, &mut staging).is_err());
    Ok(())
}
