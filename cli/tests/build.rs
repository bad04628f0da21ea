//! `kiln build` and `kiln inspect` as a user runs them: a real build with
//! `--verify` against ONNX Runtime, the JSON report, inspecting the plan, and
//! clear failures (unsupported ops, bad profiles, corrupt plans) without panics.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, ensure};
use kiln_tests::TempDir;
use kiln_tests::resnet::{Depth, resnet};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn ort_library() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.kiln/lib/libonnxruntime.so");
    ensure!(path.is_file(), "{} is missing: run `make setup` first", path.display());
    Ok(path)
}

fn kiln(args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(KILN)
        .args(args)
        .env_remove("KILN_ORT_LIBRARY")
        .stdin(Stdio::null())
        .output()
        .context("running kiln")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn build_verify_report_and_inspect_a_resnet() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-build")?;
    let model = dir.path("r18.onnx");
    kiln_onnx::save(&resnet(Depth::R18, 10, 3)?, &model)?;
    let (plan, report) = (dir.path("r18.plan"), dir.path("report.json"));
    let lib = ort_library()?;
    let out = kiln(&[
        "build",
        model.to_str().context("path")?,
        "--batch",
        "1:4:16",
        "--out",
        plan.to_str().context("path")?,
        "--report",
        report.to_str().context("path")?,
        "--verify",
        "--verify-batch",
        "1",
        "--ort-library",
        lib.to_str().context("path")?,
    ])?;
    let stdout = text(&out.stdout);
    ensure!(out.status.success(), "kiln build failed: {stdout}\n{}", text(&out.stderr));
    ensure!(stdout.contains("verified against ONNX Runtime"), "{stdout}");
    ensure!(stdout.contains("bn_fold") && stdout.contains("activations at batch=16"), "{stdout}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    ensure!(json["nodes_after"].as_u64() < json["nodes_before"].as_u64(), "{json}");
    ensure!(json["peak_activation_bytes"].as_u64() < json["naive_activation_bytes"].as_u64(), "{json}");
    ensure!(std::fs::read(&plan)?.starts_with(b"KILNPLAN"), "not a plan file");

    let out = kiln(&["inspect", plan.to_str().context("path")?, "--nodes"])?;
    let stdout = text(&out.stdout);
    ensure!(out.status.success(), "{}", text(&out.stderr));
    ensure!(stdout.contains("arch cpu-reference") && stdout.contains("kiln.FusedConv"), "{stdout}");
    ensure!(stdout.contains("profile batch: min 1 opt 4 max 16"), "{stdout}");

    let out = kiln(&["inspect", model.to_str().context("path")?])?;
    ensure!(out.status.success() && text(&out.stdout).contains("BatchNormalization ×"), "{}", text(&out.stdout));
    Ok(())
}

#[test]
fn bad_models_profiles_and_plans_fail_clearly() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-build-bad")?;
    let mut b = kiln_onnx::GraphBuilder::new("bad");
    b.add_input(
        "x",
        kiln_onnx::DataType::Float,
        &[kiln_onnx::Dim::Symbolic("batch".into()), kiln_onnx::Dim::Fixed(4)],
    )?;
    let y = b.add_node("NonZero", &["x"], vec![])?;
    let z = b.add_node("Det", &["x"], vec![])?;
    b.add_output(&y, kiln_onnx::DataType::Int64, &[])?;
    b.add_output(&z, kiln_onnx::DataType::Float, &[])?;
    let bad = dir.path("bad.onnx");
    kiln_onnx::save(&b.finish(17), &bad)?;
    let out = kiln(&["build", bad.to_str().context("path")?])?;
    let stderr = text(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("NonZero") && stderr.contains("Det"), "{stderr}");

    let model = dir.path("r18.onnx");
    kiln_onnx::save(&resnet(Depth::R18, 10, 3)?, &model)?;
    let out = kiln(&["build", model.to_str().context("path")?, "--batch", "8:1:64"])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("MIN ≤ OPT ≤ MAX"), "{}", text(&out.stderr));

    let plan = dir.path("broken.plan");
    std::fs::write(&plan, b"KILNPLAN\x01\x00")?;
    let out = kiln(&["inspect", plan.to_str().context("path")?])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("plan"), "{}", text(&out.stderr));
    Ok(())
}

#[test]
fn build_for_tensorrt_fails_clearly_without_tensorrt() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-build-trt")?;
    let model = dir.path("r18.onnx");
    kiln_onnx::save(&resnet(Depth::R18, 10, 3)?, &model)?;
    let model = model.to_str().context("path")?;
    let cpu = ort_library()?;
    let out = kiln(&["build", model, "--backend", "tensorrt", "--ort-library", cpu.to_str().context("path")?])?;
    let stderr = text(&out.stderr);
    ensure!(!out.status.success(), "a TensorRT build succeeded without TensorRT: {stderr}");
    for needle in ["TensorrtExecutionProvider is unavailable", "CPU-only build", "onnxruntime-gpu==1.31.1"] {
        ensure!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    ensure!(!dir.path("trt_cache").exists(), "a cache directory was created for a build that could not run");

    // An INT8 kiln plan needs calibration data, and kiln-plan flags do not apply to TensorRT.
    let out = kiln(&["build", model, "--precision", "int8"])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("--calib"), "{}", text(&out.stderr));
    let out = kiln(&["build", model, "--backend", "tensorrt", "--verify"])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("--verify applies to kiln plans"),
        "{}",
        text(&out.stderr)
    );

    // The GPU build of ONNX Runtime without TensorRT installed: the missing libraries are named.
    let gpu = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.kiln/ort-gpu/libonnxruntime.so.1.31.1");
    ensure!(gpu.is_file(), "{} is missing: run `scripts/setup --trainer`", gpu.display());
    let gpu = gpu.to_str().context("path")?;
    let out = kiln(&["build", model, "--backend", "tensorrt", "--precision", "int8", "--ort-library", gpu])?;
    let stderr = text(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    if !stderr.contains("libnvinfer.so.10") {
        eprintln!("skipped the GPU-build half: TensorRT seems installed here ({stderr})");
        return Ok(());
    }
    ensure!(stderr.contains("TensorRT 10 for CUDA 13") && stderr.contains("LD_LIBRARY_PATH"), "{stderr}");
    Ok(())
}

#[test]
fn int8_build_of_efficientnet_lite0_calibrates_gates_and_reports() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/efficientnet_lite0/1/model.onnx");
    ensure!(model.is_file(), "{} is missing: run `make setup`", model.display());
    let dir = TempDir::new("cli-int8")?;
    let (cal, acc) = (dir.path("cal"), dir.path("acc"));
    for (photo, class) in [("flower.jpg", "daisy"), ("china.jpg", "palace")] {
        let src = root.join(".kiln/assets").join(photo);
        std::fs::create_dir_all(&cal)?;
        std::fs::copy(&src, cal.join(photo))?;
        std::fs::create_dir_all(acc.join(class))?;
        std::fs::copy(&src, acc.join(class).join(photo))?;
    }
    let (plan, report, cache) = (dir.path("int8.plan"), dir.path("report.json"), dir.path("calib.json"));
    let qdq = dir.path("qdq.onnx");
    let path = |p: &PathBuf| p.to_str().map(str::to_owned).context("path");
    let args = |calib: bool| -> anyhow::Result<Vec<String>> {
        let mut a: Vec<String> = ["build", path(&model)?.as_str(), "--precision", "int8", "--calib-cache"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(path(&cache)?);
        if calib {
            a.extend(["--calib".to_string(), path(&cal)?, "--export-qdq".into(), path(&qdq)?]);
        }
        a.extend(["--accuracy-data".into(), path(&acc)?, "--max-drop".into(), "0.5".into()]);
        a.extend(["--out".into(), path(&plan)?, "--report".into(), path(&report)?]);
        Ok(a)
    };
    let first = args(true)?;
    let out = kiln(&first.iter().map(String::as_str).collect::<Vec<_>>())?;
    let stdout = text(&out.stdout);
    ensure!(out.status.success(), "INT8 build failed: {stdout}\n{}", text(&out.stderr));
    ensure!(stdout.contains("INT8: ") && stdout.contains("top-1 agreement with FP32: 100.00 %"), "{stdout}");
    ensure!(cache.is_file(), "no calibration cache written");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let int8 = &json["int8"];
    let layers = int8["int8_layers"].as_array().context("int8_layers")?.len();
    ensure!(layers == 50 && int8["candidates"] == 50, "every layer stays INT8 on the sample photos: {int8}");
    ensure!(int8["gate"]["kept_fp16"].is_array() && int8["gate"]["agreement"] == 100.0, "{int8}");
    ensure!(int8["gate"]["fp32_accuracy"] == 100.0 && int8["gate"]["int8_accuracy"] == 100.0, "{int8}");
    // The Q/DQ export carries one activation pair per INT8 layer.
    let exported = kiln_onnx::load(&qdq)?;
    let graph = exported.graph.context("no graph")?;
    let pairs = graph.node.iter().filter(|n| n.op_type == "QuantizeLinear").count();
    ensure!(pairs == layers, "{pairs} QuantizeLinear nodes for {layers} INT8 layers");
    ensure!(stdout.contains(&format!("Q/DQ model: {}", qdq.display())), "{stdout}");

    let out = kiln(&["inspect", path(&plan)?.as_str()])?;
    ensure!(text(&out.stdout).contains(&format!("INT8 layers: {layers}")), "{}", text(&out.stdout));

    // The cache alone (no --calib) gives the same INT8 layers.
    let second = args(false)?;
    let out = kiln(&second.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    ensure!(again["int8"]["int8_layers"] == int8["int8_layers"], "{again}");

    // INT8 without calibration data is refused with a message.
    let bare = dir.path("none.json");
    let out = kiln(&["build", path(&model)?.as_str(), "--precision", "int8", "--calib-cache", path(&bare)?.as_str()])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("--calib"), "{}", text(&out.stderr));
    Ok(())
}
