//! `kiln build --precision int8`: calibration data through the model's own preprocessing
//! (a folder of images, or IDX files such as Fashion-MNIST's), the calibration cache,
//! the INT8 plan, and the accuracy gate on labelled data.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use indicatif::ProgressBar;
use kiln_engine::graph::Graph;
use kiln_engine::quant::gate::{GateOptions, GateReport, Labelled, gate};
use kiln_engine::quant::{CalibrationCache, Calibrator, Int8Plan, Method, candidates};
use kiln_engine::{Tensor, TensorData};
use kiln_server::{ModelConfig, Preprocess};
use serde::Serialize;

/// Items per batch through the reference executor.
const BATCH: usize = 32;

/// Preprocessed items with their labels, when the source has them.
struct Dataset {
    item_shape: Vec<usize>,
    items: Vec<Vec<f32>>,
    labels: Vec<Option<usize>>,
}

/// One batch of model inputs with the labels of its items (where known).
type Batch = (Vec<Tensor>, Vec<Option<usize>>);

impl Dataset {
    fn batches(&self) -> anyhow::Result<Vec<Batch>> {
        let mut out = Vec::new();
        for (items, labels) in self.items.chunks(BATCH).zip(self.labels.chunks(BATCH)) {
            let mut shape = vec![items.len()];
            shape.extend(&self.item_shape);
            let data = items.concat();
            out.push((vec![Tensor::new(shape, TensorData::F32(data))?], labels.to_vec()));
        }
        Ok(out)
    }
}

/// What the INT8 build did, for the printed and the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Int8Summary {
    pub method: String,
    pub calibration_samples: usize,
    pub calibration_cache: Option<PathBuf>,
    pub candidates: usize,
    pub int8_layers: Vec<String>,
    pub gate: Option<GateReport>,
}

fn read_maybe_gz(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing {}", path.display()))?;
        return Ok(out);
    }
    Ok(raw)
}

/// An IDX file (`magic 0x00000800 | type, dims as big-endian u32, bytes`) of u8 values.
fn idx(path: &Path, rank: usize) -> anyhow::Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let bad = || format!("{} is not an IDX file of rank {rank}", path.display());
    ensure!(bytes.len() >= 4 + 4 * rank && bytes[..3] == [0, 0, 8] && bytes[3] as usize == rank, bad());
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize)
        .collect();
    let body = bytes[4 + 4 * rank..].to_vec();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    ensure!(count == Some(body.len()), bad());
    Ok((dims, body))
}

fn load_idx(images: &Path, pre: &Preprocess, limit: usize) -> anyhow::Result<Dataset> {
    let (dims, pixels) = idx(images, 3)?;
    let name = images.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let labels_path = images.with_file_name(name.replace("images-idx3", "labels-idx1"));
    let labels = if labels_path != images && labels_path.is_file() { Some(idx(&labels_path, 1)?.1) } else { None };
    if let Some(l) = &labels {
        ensure!(l.len() >= dims[0], "{}: {} labels for {} images", labels_path.display(), l.len(), dims[0]);
    }
    let (h, w) = (dims[1], dims[2]);
    let mut data = Dataset { item_shape: pre.item_shape().to_vec(), items: Vec::new(), labels: Vec::new() };
    for i in spread(dims[0], limit) {
        let gray = &pixels[i * h * w..(i + 1) * h * w];
        let rgb: Vec<u8> = gray.iter().flat_map(|&p| [p, p, p]).collect();
        let image = kiln_image::RgbImage::from_raw(w as u32, h as u32, rgb).context("IDX image size")?;
        let mut item = vec![0f32; pre.item_len()];
        pre.run(&image, &mut item)?;
        data.items.push(item);
        data.labels.push(labels.as_ref().map(|l| usize::from(l[i])));
    }
    Ok(data)
}

/// `limit` indices spread evenly over `0..n` (all of them when `limit >= n`): class-sorted
/// folders and files must not yield only the first classes.
fn spread(n: usize, limit: usize) -> Vec<usize> {
    if limit >= n {
        return (0..n).collect();
    }
    (0..limit).map(|i| i * n / limit).collect()
}

fn image_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            image_files(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_string_lossy().to_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Images under `dir` (sorted, recursively); an image in `dir/<class>/` is labelled with
/// `<class>`: a name from `classes` or a class index.
fn load_images(dir: &Path, pre: &Preprocess, limit: usize, classes: &[String]) -> anyhow::Result<Dataset> {
    let mut all = Vec::new();
    image_files(dir, &mut all)?;
    all.sort();
    let files: Vec<PathBuf> = spread(all.len(), limit).into_iter().map(|i| all[i].clone()).collect();
    ensure!(!files.is_empty(), "no .jpg/.jpeg/.png images under {}", dir.display());
    let mut data = Dataset { item_shape: pre.item_shape().to_vec(), items: Vec::new(), labels: Vec::new() };
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let image = kiln_image::decode(&bytes).with_context(|| format!("decoding {}", file.display()))?;
        let mut item = vec![0f32; pre.item_len()];
        pre.run(&image, &mut item)?;
        let class = file.parent().filter(|p| *p != dir).and_then(|p| p.file_name()).map(|n| n.to_string_lossy());
        let label = class.and_then(|c| classes.iter().position(|k| *k == c).or_else(|| c.parse().ok()));
        data.items.push(item);
        data.labels.push(label);
    }
    Ok(data)
}

/// The preprocessing and class names of the model's config.
pub struct ModelData {
    pre: Preprocess,
    classes: Vec<String>,
}

impl ModelData {
    pub fn new(config: &ModelConfig, dir: &Path) -> anyhow::Result<Self> {
        let input = config.input.as_ref().context("INT8 calibration of images needs the config's [input] table")?;
        let pre = Preprocess::new(input).map_err(anyhow::Error::msg)?;
        let classes = match config.output.as_ref().and_then(|o| o.labels.as_ref()) {
            Some(file) => std::fs::read_to_string(dir.join(file))
                .with_context(|| format!("reading {}", dir.join(file).display()))?
                .lines()
                .map(|l| l.trim().to_string())
                .collect(),
            None => Vec::new(),
        };
        Ok(Self { pre, classes })
    }

    fn load(&self, src: &Path, limit: usize) -> anyhow::Result<Dataset> {
        if src.is_dir() {
            return load_images(src, &self.pre, limit, &self.classes);
        }
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.contains("idx3") {
            return load_idx(src, &self.pre, limit);
        }
        bail!("{}: expected a folder of images or an IDX images file (*-images-idx3-ubyte[.gz])", src.display())
    }
}

/// Options of the INT8 half of `kiln build`.
pub struct Int8Options<'a> {
    pub calib: &'a Path,
    pub method: Method,
    pub method_name: String,
    pub calib_limit: usize,
    pub cache: Option<&'a Path>,
    pub accuracy: Option<&'a Path>,
    pub accuracy_limit: usize,
    pub max_drop: f64,
}

/// Calibrates `graph` (a built FP16 plan's graph), chooses its INT8 layers (through the
/// gate when labelled data is given) and marks them in the graph.
pub fn quantise(
    graph: &mut Graph,
    data: &ModelData,
    o: &Int8Options<'_>,
    progress: &ProgressBar,
) -> anyhow::Result<Int8Summary> {
    ensure!(graph.inputs.len() == 1, "INT8 calibration from images needs a model with one input");
    ensure!(
        Int8Plan::from_graph(graph).nodes.is_empty(),
        "the model is already quantised (Q/DQ): build it with --precision fp16 or fp32, which keep its scales"
    );
    let cache = match o.cache.filter(|p| p.is_file()) {
        Some(path) => {
            progress.set_message(format!("calibration cache {}", path.display()));
            CalibrationCache::load(path, graph)?
        }
        None => {
            let set = data.load(o.calib, o.calib_limit)?;
            let batches = set.batches()?;
            progress.set_length(batches.len() as u64);
            progress.set_position(0);
            let mut cal = Calibrator::new(graph);
            for (i, (inputs, _)) in batches.iter().enumerate() {
                progress.set_message(format!("calibrating on {} samples", set.items.len()));
                cal.observe(graph, inputs)?;
                progress.set_position(i as u64 + 1);
            }
            let cache = cal.finish(graph);
            ensure!(cache.samples > 0, "{}: no calibration samples", o.calib.display());
            if let Some(path) = o.cache {
                cache.save(path)?;
            }
            cache
        }
    };
    let thresholds = cache.thresholds(o.method);
    let uncalibrated: Vec<&str> = candidates(graph)
        .into_iter()
        .filter_map(|i| graph.nodes[i].input(0))
        .map(|v| graph.values[v].name.as_str())
        .filter(|name| !thresholds.contains_key(*name))
        .collect();
    ensure!(uncalibrated.is_empty(), "the calibration cache has no histogram for {}", uncalibrated.join(", "));
    let (plan, report) = match o.accuracy {
        Some(src) => {
            let set = data.load(src, o.accuracy_limit)?;
            let mut labelled = Labelled::default();
            for (inputs, labels) in set.batches()? {
                let labels: Option<Vec<usize>> = labels.into_iter().collect();
                let labels = labels.with_context(|| format!("{}: every item needs a label", src.display()))?;
                labelled.batches.push((inputs, labels));
            }
            let opts = GateOptions { max_drop: o.max_drop, fp16: true, sensitivity_samples: 256 };
            let mut report_progress = |stage: &str, done: usize, total: usize| {
                progress.set_length(total as u64);
                progress.set_position(done as u64);
                progress.set_message(format!("accuracy gate: {stage}"));
            };
            let (plan, report) = gate(graph, &thresholds, &labelled, opts, &mut report_progress)?;
            (plan, Some(report))
        }
        None => (Int8Plan::new(graph, &thresholds, &[])?, None),
    };
    plan.apply(graph);
    Ok(Int8Summary {
        method: o.method_name.clone(),
        calibration_samples: cache.samples,
        calibration_cache: o.cache.map(Path::to_path_buf),
        candidates: candidates(graph).len(),
        int8_layers: plan.names_in_order(graph),
        gate: report,
    })
}

impl std::fmt::Display for Int8Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "INT8: {} of {} layers ({} calibration, {} samples)",
            self.int8_layers.len(),
            self.candidates,
            self.method,
            self.calibration_samples
        )?;
        if let Some(g) = &self.gate {
            let kept = if g.kept_fp16.is_empty() { "none".to_string() } else { g.kept_fp16.join(", ") };
            writeln!(f, "  kept in FP16 by the accuracy gate: {kept}")?;
            writeln!(
                f,
                "  top-1 on {} samples: FP32 {:.2} %, INT8 {:.2} % (gate off: {:.2} %), allowed drop {} points",
                g.samples, g.fp32_accuracy, g.int8_accuracy, g.int8_accuracy_ungated, g.max_drop
            )?;
            writeln!(f, "  top-1 agreement with FP32: {:.2} %", g.agreement)?;
        }
        Ok(())
    }
}
