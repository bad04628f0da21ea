//! The whole pipeline on real data: train the small CNN on Fashion-MNIST (a shortened
//! run), export it with kiln's own ONNX writer, serve it with kiln's server, and classify
//! real test images sent over HTTP as PNG files.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::path::Path;

use kiln_server::ServerConfig;
use kiln_tests::{TempDir, TestServer};
use kiln_trainer::data::{Dataset, FashionMnist, Split};
use kiln_trainer::ddp::{Ddp, DdpOptions};
use kiln_trainer::eager::Eager;
use kiln_trainer::models::Network;
use kiln_trainer::package::{self, ExportOptions};
use kiln_trainer::train::{self, FitOptions};

mod support;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use support::FASHION;
use tch::Kind;

const IMAGES: usize = 200;

fn png(pixels: &[u8]) -> Vec<u8> {
    let img = image::GrayImage::from_raw(28, 28, pixels.to_vec()).unwrap();
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trained_exported_and_served_model_classifies_test_images_over_http() -> anyhow::Result<()> {
    if !support::fashion_present() {
        return Ok(());
    }
    let ort = kiln_tests::ort_library()?;
    let work = TempDir::new("serve-fashion")?;
    let run_dir = work.path("run");
    let config = support::one_epoch_cnn(4096, 1, 16);
    let report = tokio::task::block_in_place(|| {
        let ddp = Ddp::init(DdpOptions::default())?;
        train::fit(
            config,
            &FitOptions { run_dir: run_dir.clone(), resume: None, extend_epochs: None, progress: false },
            &ddp,
        )
    })?;
    let trained_accuracy = report.history[0].eval_accuracy;
    assert!(trained_accuracy > 0.7, "a 4k-image epoch reaches well above chance: {trained_accuracy}");

    // Export into a model repository, checked against libtorch in ONNX Runtime.
    let repo = work.path("models");
    let onnx = repo.join("fashion_mnist/1/model.onnx");
    let options = ExportOptions { opset: 17, force: false, ort_library: Some(ort.clone()), max_batch_size: 32 };
    let exported = tokio::task::block_in_place(|| package::export(&run_dir, &onnx, &options))?;
    let diff = exported.max_abs_diff.unwrap();
    assert!(diff <= package::PARITY_TOLERANCE, "ONNX Runtime vs libtorch: {diff}");
    let config_toml = std::fs::read_to_string(repo.join("fashion_mnist/config.toml"))?;
    assert!(config_toml.contains("color = \"gray\""), "{config_toml}");
    let labels = std::fs::read_to_string(repo.join("fashion_mnist/labels.txt"))?;
    assert_eq!(labels.lines().count(), 10);

    // What libtorch itself predicts for the same images, from the checkpoint.
    let test = FashionMnist::load(Path::new(FASHION), Split::Test)?.limit(IMAGES);
    let expected: Vec<i64> = tokio::task::block_in_place(|| -> anyhow::Result<Vec<i64>> {
        let ckpt = kiln_trainer::checkpoint::resolve(&run_dir)?;
        let meta = kiln_trainer::checkpoint::load_meta(&ckpt)?;
        let mut built = train::Built::new(&meta.config.model, tch::Device::Cpu)?;
        kiln_trainer::checkpoint::load_weights(&ckpt, &mut built.vs)?;
        let indices: Vec<usize> = (0..IMAGES).collect();
        let batch = test.batch(&indices, None)?;
        let logits = tch::no_grad(|| built.model.forward(&mut Eager::eval(), &batch.inputs))?;
        Ok(Vec::<i64>::try_from(&logits[0].argmax(-1, false).to_kind(Kind::Int64))?)
    })?;

    let server = TestServer::start(ServerConfig::new("127.0.0.1:0".parse()?, repo.clone(), ort)).await?;
    let client = reqwest::Client::new();
    let (mut agree, mut correct) = (0, 0);
    for chunk in (0..IMAGES).collect::<Vec<_>>().chunks(25) {
        let form = chunk.iter().fold(Form::new(), |form, &i| {
            form.part("files", Part::bytes(png(test.image(i).0)).file_name(format!("{i}.png")))
        });
        let resp = client.post(server.url("/predict/batch")).multipart(form).send().await?;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await?;
        assert_eq!(body["model"], "fashion_mnist");
        let predictions = body["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), chunk.len());
        for (p, &i) in predictions.iter().zip(chunk) {
            let class = p["class_id"].as_i64().unwrap();
            let label = p["label"].as_str().unwrap();
            assert_eq!(label, test.classes()[class as usize]);
            agree += usize::from(class == expected[i]);
            correct += usize::from(class == test.image(i).1);
        }
    }
    server.shutdown().await?;
    // PNG → server preprocessing → ONNX Runtime must give libtorch's answer for every image.
    assert_eq!(agree, IMAGES, "served predictions differ from libtorch's on {} images", IMAGES - agree);
    // A one-epoch model on 4k images: far above chance (10 %), far from converged.
    assert!(correct as f64 / IMAGES as f64 > 0.6, "served accuracy {correct}/{IMAGES} (eval {trained_accuracy})");
    eprintln!(
        "served {correct}/{IMAGES} correct; eval accuracy of the run {trained_accuracy:.3}; ONNX parity {diff:.2e}"
    );
    Ok(())
}
