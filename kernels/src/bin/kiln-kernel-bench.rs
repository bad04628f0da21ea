//! `kiln-kernel-bench`: copy bandwidths and the preprocessing path's rates on one GPU.
//!
//! Rows: pinned H2D GB/s, device-to-device copy GB/s (read + write counted), and the
//! pipelined H2D + compute rate of [`kiln_kernels::pipeline::Pipeline`] for batches of 256
//! 500×375 RGB uint8 images (the JPEG-sized input of the preprocessing benchmark), against the
//! measured H2D bandwidth. Prints a table; `--out PATH` also writes the numbers as JSON.
//! Without a GPU it says why and exits with status 2.

use std::fmt::Write as _;
use std::time::Instant;

use kiln_kernels::KernelError;
use kiln_kernels::pipeline::{Pipeline, PipelineConfig};
use kiln_kernels::preprocess::decode::decode_batch_into;
use kiln_kernels::preprocess::gpu::{BatchLayout, Preprocessor};
use kiln_kernels::preprocess::{ImageView, OutDType, PixelFormat, Resize, Spec};
use kiln_kernels::toolchain::{self, Gpu};

const IMAGES: usize = 256;
const SRC_W: usize = 500;
const SRC_H: usize = 375;

struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    note: String,
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Best of `reps` timings of `f` (each call must end synchronised), after one warm-up call.
fn best_secs(reps: usize, mut f: impl FnMut() -> Result<(), KernelError>) -> Result<f64, KernelError> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn run(gpu: &Gpu) -> Result<Vec<Row>, KernelError> {
    let batch_bytes = IMAGES * SRC_W * SRC_H * 3;
    let stream = gpu.stream.clone();
    let mut rows = Vec::new();

    // Pinned H2D: one batch of source images per copy.
    let host = gpu.alloc_pinned(batch_bytes)?;
    let mut dev = stream.alloc_zeros::<u8>(batch_bytes).map_err(KernelError::driver("kiln-kernel-bench"))?;
    let h2d = best_secs(10, || {
        stream.memcpy_htod(&host, &mut dev).map_err(KernelError::driver("kiln-kernel-bench"))?;
        stream.synchronize().map_err(KernelError::driver("kiln-kernel-bench"))
    })?;
    let h2d_gbps = gbps(batch_bytes, h2d);
    rows.push(Row {
        name: "pinned H2D",
        value: h2d_gbps,
        unit: "GB/s",
        note: format!("{} MB per copy", batch_bytes >> 20),
    });

    // D2D: counts bytes read + written, as the NOTES.md figure (4.2 TB/s on the H200) does.
    let mut dev2 = stream.alloc_zeros::<u8>(batch_bytes).map_err(KernelError::driver("kiln-kernel-bench"))?;
    let d2d = best_secs(20, || {
        stream.memcpy_dtod(&dev, &mut dev2).map_err(KernelError::driver("kiln-kernel-bench"))?;
        stream.synchronize().map_err(KernelError::driver("kiln-kernel-bench"))
    })?;
    let d2d_gbps = gbps(2 * batch_bytes, d2d);
    rows.push(Row { name: "device D2D copy", value: d2d_gbps, unit: "GB/s", note: "read + write".into() });
    drop((host, dev, dev2));

    // The preprocessing kernel alone: 256 JPEG-sized images → shorter side 256 → centre crop
    // 224 → FP16 NCHW, already on the device. GB/s counts source bytes read + output written.
    let pixels: Vec<u8> = (0..SRC_W * SRC_H * 3).map(|i| (i * 7 % 251) as u8).collect();
    let images: Vec<ImageView<'_>> =
        (0..IMAGES).map(|_| ImageView::packed(&pixels, SRC_W as u32, SRC_H as u32, PixelFormat::Rgb)).collect();
    let out_elems = IMAGES * 3 * 224 * 224;
    for antialias in [false, true] {
        let mut spec = Spec::new(224, 224).mean_std([123.7, 116.3, 103.5], [58.4, 57.1, 57.4]);
        spec.resize = Resize::ShorterSide(256);
        spec.dtype = OutDType::F16;
        spec.antialias = antialias;
        let layout = BatchLayout::new(&images, &spec)?;
        let mut packed = vec![0u8; layout.bytes()];
        layout.pack_into(&images, &mut packed)?;
        let pre = Preprocessor::new(gpu)?;
        let src = stream.clone_htod(&packed).map_err(KernelError::driver("kiln-kernel-bench"))?;
        let mut out = stream.alloc_zeros::<u16>(out_elems).map_err(KernelError::driver("kiln-kernel-bench"))?;
        let secs = best_secs(20, || {
            pre.launch(&layout, &src.as_view(), &mut out, 0)?;
            pre.stream().synchronize().map_err(KernelError::driver("kiln-kernel-bench"))
        })?;
        let moved = gbps(layout.bytes() + out_elems * 2, secs);
        rows.push(Row {
            name: if antialias { "kernel, antialias" } else { "kernel" },
            value: IMAGES as f64 / secs,
            unit: "img/s",
            note: format!("{moved:.0} GB/s = {:.0}% of D2D copy (target ≥ 50%)", 100.0 * moved / d2d_gbps),
        });
    }

    // Pipelined: the H2D copy of batch i+1 (pinned, copy stream) overlaps the kernel on batch i
    // (compute stream). Slots are filled once (CPU decode speed is measured separately), so
    // this is the GPU-side rate against the measured pinned H2D bandwidth.
    let mut spec = Spec::new(224, 224).mean_std([123.7, 116.3, 103.5], [58.4, 57.1, 57.4]);
    spec.resize = Resize::ShorterSide(256);
    spec.dtype = OutDType::F16;
    let layout = BatchLayout::new(&images, &spec)?;
    let pipeline = Pipeline::new(gpu, PipelineConfig { slots: 3, slot_bytes: layout.bytes() })?;
    let pre = Preprocessor::new(gpu)?.with_stream(pipeline.compute_stream().clone());
    let mut out =
        pipeline.compute_stream().alloc_zeros::<u16>(out_elems).map_err(KernelError::driver("kiln-kernel-bench"))?;
    let batches = 12;
    // Each pinned slot is packed once, on its first use: host-side packing is CPU work (the
    // decode threads' job), and this row measures what the GPU side sustains.
    let packed_slots = std::cell::Cell::new(0usize);
    let pipelined = best_secs(3, || {
        for _ in 0..batches {
            let staged = pipeline.stage(|buf| {
                if packed_slots.get() < 3 {
                    packed_slots.set(packed_slots.get() + 1);
                    if layout.pack_into(&images, buf).is_err() {
                        return 0;
                    }
                }
                layout.bytes()
            })?;
            pipeline.submit(staged, |_, input| pre.launch(&layout, input, &mut out, 0))?;
        }
        pipeline.synchronize()
    })?;
    let pipe_gbps = gbps(batches * layout.bytes(), pipelined);
    rows.push(Row {
        name: "pipelined H2D + kernel",
        value: pipe_gbps,
        unit: "GB/s",
        note: format!("{:.0}% of pinned H2D (target ≥ 80%)", 100.0 * pipe_gbps / h2d_gbps),
    });
    rows.push(Row {
        name: "pipelined images",
        value: (batches * IMAGES) as f64 / pipelined,
        unit: "img/s",
        note: format!("{SRC_W}×{SRC_H} RGB uint8 → 224² FP16, batch {IMAGES}"),
    });
    // CPU decode straight into a pinned slot on every core (rayon's pool), the host side of
    // the pipeline: a synthetic 500×375 JPEG (quality 90) per image.
    let jpeg = synthetic_jpeg()?;
    let files: Vec<&[u8]> = (0..IMAGES).map(|_| jpeg.as_slice()).collect();
    let mut pinned = gpu.alloc_pinned(layout.bytes())?;
    let slot = pinned.as_mut_slice().map_err(KernelError::driver("kiln-kernel-bench"))?;
    let secs = best_secs(3, || decode_batch_into(&files, &spec, slot).map(drop))?;
    let cores = rayon::current_num_threads();
    rows.push(Row {
        name: "CPU decode → pinned",
        value: IMAGES as f64 / secs,
        unit: "img/s",
        note: format!(
            "{cores} threads, {:.0} img/s per thread, {} KB JPEG",
            IMAGES as f64 / secs / cores as f64,
            jpeg.len() >> 10
        ),
    });
    Ok(rows)
}

/// A photo-like 500×375 JPEG: smooth gradients plus a deterministic texture.
fn synthetic_jpeg() -> Result<Vec<u8>, KernelError> {
    let img = image::RgbImage::from_fn(SRC_W as u32, SRC_H as u32, |x, y| {
        let t = ((x * 31 + y * 17) % 23) as u8;
        image::Rgb([(x / 2) as u8 ^ t, (y * 2 / 3) as u8, ((x + y) / 4) as u8 ^ (t << 2)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .map_err(|e| KernelError::InvalidArgument(format!("encode benchmark JPEG: {e}")))?;
    Ok(out)
}

fn json(gpu: &Gpu, rows: &[Row]) -> String {
    let mut s = String::from("{\n");
    let esc = |t: &str| t.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = writeln!(s, "  \"device\": \"{}\",\n  \"arch\": \"{}\",", esc(gpu.name()), gpu.arch());
    s.push_str("  \"rows\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let comma = if i + 1 < rows.len() { "," } else { "" };
        let _ = writeln!(
            s,
            "    {{\"name\": \"{}\", \"value\": {:.3}, \"unit\": \"{}\", \"note\": \"{}\"}}{comma}",
            esc(r.name),
            r.value,
            r.unit,
            esc(&r.note)
        );
    }
    s.push_str("  ]\n}\n");
    s
}

fn main() {
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next(),
            "-h" | "--help" => {
                println!("usage: kiln-kernel-bench [--out RESULT.json]");
                return;
            }
            other => {
                eprintln!("kiln-kernel-bench: unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    let gpu = match toolchain::cuda_available().and_then(|()| Gpu::open(0)) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("kiln-kernel-bench needs a CUDA GPU: {e}");
            std::process::exit(2);
        }
    };
    let rows = match run(&gpu) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("kiln-kernel-bench: {e}");
            std::process::exit(1);
        }
    };
    println!("kiln-kernel-bench on {} ({})", gpu.name(), gpu.arch());
    println!("{:<22} {:>12}  {:<6} note", "measurement", "value", "unit");
    for r in &rows {
        println!("{:<22} {:>12.1}  {:<6} {}", r.name, r.value, r.unit, r.note);
    }
    if let Some(path) = out
        && let Err(e) = std::fs::write(&path, json(&gpu, &rows))
    {
        eprintln!("kiln-kernel-bench: write {path}: {e}");
        std::process::exit(1);
    }
}
