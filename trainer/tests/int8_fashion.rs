//! INT8 on real labelled data: the small CNN trained by kiln's trainer on Fashion-MNIST,
//! exported to ONNX, built into an FP16 kiln plan, calibrated on 500 training images
//! through the serving preprocessing, and gated on all 10,000 test images: INT8 (emulated
//! as the GPU computes it) may lose at most 0.5 points of top-1 accuracy. The numbers
//! with the gate off are printed as well.

use std::path::Path;

use anyhow::Context;
use kiln_engine::builder::{BuildOptions, build};
use kiln_engine::graph::Precision;
use kiln_engine::plan::Profile;
use kiln_engine::quant::gate::{GateOptions, Labelled, gate};
use kiln_engine::quant::{Calibrator, Method, candidates};
use kiln_engine::{Tensor, TensorData};
use kiln_server::{ModelConfig, Preprocess};
use kiln_tests::TempDir;
use kiln_trainer::data::{FashionMnist, Split};
use kiln_trainer::ddp::{Ddp, DdpOptions};
use kiln_trainer::package::{self, ExportOptions};
use kiln_trainer::train::{self, FitOptions};

mod support;
use support::FASHION;

const CALIBRATION: usize = 500;
const BATCH: usize = 100;

/// `images` (indices into `set`) preprocessed as `kiln serve` would, in batches.
fn batches(set: &FashionMnist, pre: &Preprocess, count: usize) -> anyhow::Result<Labelled> {
    let (h, w) = set.image_size();
    let mut out = Labelled::default();
    let indices: Vec<usize> = (0..count).collect();
    for chunk in indices.chunks(BATCH) {
        let mut data = Vec::with_capacity(chunk.len() * pre.item_len());
        let mut labels = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let (pixels, label) = set.image(i);
            let rgb: Vec<u8> = pixels.iter().flat_map(|&p| [p, p, p]).collect();
            let image = kiln_image::RgbImage::from_raw(w as u32, h as u32, rgb).context("image size")?;
            let mut item = vec![0f32; pre.item_len()];
            pre.run(&image, &mut item)?;
            data.extend(item);
            labels.push(usize::try_from(label)?);
        }
        let mut shape = vec![chunk.len()];
        shape.extend(pre.item_shape());
        out.batches.push((vec![Tensor::new(shape, TensorData::F32(data))?], labels));
    }
    Ok(out)
}

#[test]
fn int8_fashion_mnist_loses_at_most_half_a_point_with_the_gate() -> anyhow::Result<()> {
    if !support::fashion_present() {
        return Ok(());
    }
    let ort = kiln_tests::ort_library()?;
    let work = TempDir::new("int8-fashion")?;
    let run_dir = work.path("run");
    let config = support::one_epoch_cnn(16384, 3, 32);
    let ddp = Ddp::init(DdpOptions::default())?;
    let options = FitOptions { run_dir: run_dir.clone(), resume: None, extend_epochs: None, progress: false };
    train::fit(config, &options, &ddp)?;
    let onnx = work.path("models/fashion_mnist/1/model.onnx");
    let export = ExportOptions { opset: 17, force: false, ort_library: Some(ort), max_batch_size: 128 };
    package::export(&run_dir, &onnx, &export)?;

    // The FP16 plan `kiln build --precision int8` starts from.
    let graph = kiln_engine::import::import_file(&onnx)?;
    let opts = BuildOptions {
        precision: Precision::F16,
        profiles: vec![Profile { symbol: "batch".into(), min: 1, opt: BATCH, max: BATCH }],
        ..BuildOptions::default()
    };
    let (plan, _) = build(graph, &opts, |_, _, _| {})?;
    let graph = plan.graph;

    let model_config = ModelConfig::load(&work.path("models/fashion_mnist/config.toml"))?;
    let pre = Preprocess::new(model_config.input.as_ref().context("no [input]")?).map_err(anyhow::Error::msg)?;
    let train_set = FashionMnist::load(Path::new(FASHION), Split::Train)?;
    let test_set = FashionMnist::load(Path::new(FASHION), Split::Test)?;
    let mut calibrator = Calibrator::new(&graph);
    for (inputs, _) in &batches(&train_set, &pre, CALIBRATION)?.batches {
        calibrator.observe(&graph, inputs)?;
    }
    let cache = calibrator.finish(&graph);
    assert_eq!(cache.samples, CALIBRATION);
    let test = batches(&test_set, &pre, 10_000)?;
    // Every calibration method, gated: each must stay within half a point while keeping
    // (nearly) every layer in INT8.
    for method in [Method::Percentile { percentile: 99.99 }, Method::MinMax, Method::Entropy] {
        let thresholds = cache.thresholds(method);
        let gate_opts = GateOptions { max_drop: 0.5, fp16: true, sensitivity_samples: 500 };
        let (plan, report) = gate(&graph, &thresholds, &test, gate_opts, &mut |_, _, _| {})?;
        eprintln!(
            "{method:?}: FP32 {:.2} %, INT8 gate off {:.2} %, gate on {:.2} % ({} of {} layers INT8, kept FP16: \
             {:?}), top-1 agreement {:.2} %",
            report.fp32_accuracy,
            report.int8_accuracy_ungated,
            report.int8_accuracy,
            plan.nodes.len(),
            candidates(&graph).len(),
            report.kept_fp16,
            report.agreement
        );
        assert_eq!(report.samples, 10_000);
        assert!(report.fp32_accuracy > 70.0, "the trained model is far above chance: {report:?}");
        assert!(
            report.fp32_accuracy - report.int8_accuracy <= 0.5,
            "{method:?}: lost more than 0.5 points: {report:?}"
        );
        assert!(plan.nodes.len() + 1 >= candidates(&graph).len(), "{method:?}: the gate kept too much out: {report:?}");
    }
    Ok(())
}
