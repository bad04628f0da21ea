//! `kiln perf` as a user runs it: a plan from the real `kiln build`, then a
//! run that, without a GPU, fails with one clear line and exit code 1 (no
//! panic, no backtrace) — and on a GPU machine measures and writes JSON.
//! Missing plans and bad flags are clear errors too.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, ensure};
use kiln_onnx::{DataType, Dim, GraphBuilder};
use kiln_tests::TempDir;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn kiln(args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(KILN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("KILN_TIMING_CACHE")
        .stdin(Stdio::null())
        .output()
        .context("running kiln")?;
    let stderr = text(&out.stderr);
    ensure!(!stderr.contains("panicked") && !stderr.contains("stack backtrace"), "kiln panicked: {stderr}");
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tiny plan: y = relu(x) + x over [batch, 8].
fn tiny_plan(dir: &TempDir) -> anyhow::Result<String> {
    tiny_plan_as(dir, "tiny", "fp16")
}

fn tiny_plan_as(dir: &TempDir, name: &str, precision: &str) -> anyhow::Result<String> {
    let mut b = GraphBuilder::new("tiny");
    b.add_input("x", DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(8)])?;
    let r = b.add_node("Relu", &["x"], vec![])?;
    let y = b.add_node("Add", &[r.as_str(), "x"], vec![])?;
    b.add_output(&y, DataType::Float, &[Dim::Symbolic("batch".into()), Dim::Fixed(8)])?;
    let model = dir.path("tiny.onnx");
    kiln_onnx::save(&b.finish(17), &model)?;
    let plan = dir.path(&format!("{name}.plan")).to_str().context("path")?.to_owned();
    let out = kiln(&[
        "build",
        model.to_str().context("path")?,
        "--precision",
        precision,
        "--batch",
        "1:2:4",
        "--out",
        &plan,
    ])?;
    ensure!(out.status.success(), "kiln build failed: {}\n{}", text(&out.stdout), text(&out.stderr));
    Ok(plan)
}

#[test]
fn perf_runs_on_a_gpu_or_fails_cleanly_without_one() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-perf")?;
    let plan = tiny_plan(&dir)?;
    let json = dir.path("perf.json");
    let json_arg = json.to_str().context("path")?;
    let out = kiln(&[
        "perf",
        &plan,
        "--batch",
        "1,4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--no-progress",
        "--json",
        json_arg,
    ])?;
    let stderr = text(&out.stderr);
    match kiln_cuda::device::available() {
        Err(reason) => {
            ensure!(out.status.code() == Some(1), "expected exit code 1, got {:?}: {stderr}", out.status.code());
            let line = stderr.lines().find(|l| l.contains("kiln perf:")).context("no error line")?;
            ensure!(line.contains("CUDA unavailable") && line.contains("tiny.plan"), "{stderr}");
            ensure!(!stderr.contains("Caused by"), "the error should be one line: {stderr}");
            ensure!(!json.exists(), "no JSON without results");
            println!("skipped the GPU half ({reason}); error line: {line}");
        }
        Ok(()) => {
            ensure!(out.status.success(), "kiln perf failed: {stderr}");
            let stdout = text(&out.stdout);
            ensure!(stdout.contains("samples/s") && stdout.contains("compute ms"), "{stdout}");
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
            let results = doc["results"].as_array().context("results")?;
            ensure!(results.len() == 2 && doc["device"].as_str().is_some_and(|d| !d.is_empty()), "{doc}");
            for r in results {
                ensure!(r["runs"].as_u64() > Some(0) && r["samples_per_s"].as_f64() > Some(0.0), "{r}");
                ensure!(r["latency_ms"]["p50"].as_f64() <= r["latency_ms"]["p99"].as_f64(), "{r}");
            }
            // Above the plan's batch profile: refused before measuring.
            let out = kiln(&["perf", &plan, "--batch", "5", "--duration", "1", "--no-progress"])?;
            ensure!(
                out.status.code() == Some(1) && text(&out.stderr).contains("largest batch 4"),
                "{}",
                text(&out.stderr)
            );
        }
    }
    Ok(())
}

#[test]
fn missing_plans_and_bad_flags_are_clear_errors() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-perf-bad")?;
    let missing = dir.path("missing.plan");
    let out = kiln(&["perf", missing.to_str().context("path")?, "--duration", "1"])?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1) && stderr.contains("missing.plan"), "{stderr}");

    for (flags, needle) in [
        (&["--batch", "0"][..], "--batch"),
        (&["--batch", "1,x"][..], "--batch"),
        (&["--cuda-graph", "maybe"][..], "--cuda-graph"),
        (&["--duration", "0"][..], "--duration"),
        (&["--streams", "0"][..], "--streams"),
        (&["--tactics", "fast"][..], "--tactics"),
    ] {
        let mut args = vec!["perf", "some.plan"];
        args.extend_from_slice(flags);
        let out = kiln(&args)?;
        let stderr = text(&out.stderr);
        ensure!(out.status.code() == Some(2) && stderr.contains(needle), "{flags:?}: {stderr}");
    }
    let out = kiln(&["perf", "--help"])?;
    ensure!(out.status.success() && text(&out.stdout).contains("--cuda-graph"), "{}", text(&out.stdout));
    Ok(())
}

#[test]
fn several_plans_write_a_table_on_a_gpu_and_nothing_without_one() -> anyhow::Result<()> {
    let dir = TempDir::new("cli-perf-table")?;
    let fp32 = tiny_plan_as(&dir, "tiny-fp32", "fp32")?;
    let fp16 = tiny_plan_as(&dir, "tiny-fp16", "fp16")?;
    let doc = dir.path("BENCHMARKS.md");
    let before = "# Benchmarks\n\nkept as is\n";
    std::fs::write(&doc, before)?;
    let torch = dir.path("torch.json");
    std::fs::write(
        &torch,
        r#"{"tool": "torch_baseline", "gpu": "g", "torch": "2.9", "results": [
            {"model": "tiny", "mode": "eager-fp32", "batch": 1, "throughput": 10.0,
             "latency_ms": {"p50": 0.5, "p99": 0.75}}]}"#,
    )?;
    let json = dir.path("perf.json");
    let p = |p: &std::path::Path| p.to_str().map(str::to_owned).context("path");
    let (doc_arg, torch_arg, json_arg) = (p(&doc)?, p(&torch)?, p(&json)?);
    let base = ["perf", &fp32, &fp16, "--batch", "1,4", "--duration", "0.5", "--warmup", "0.1", "--no-progress"];

    // Bad inputs to the table are refused before anything is measured, the file untouched.
    let bad_torch = dir.path("bad.json");
    std::fs::write(&bad_torch, "{\"tool\": \"torch_baseline\", \"results\": [{\"model\": 1}]}")?;
    let mut args = base.to_vec();
    args.extend(["--table", &doc_arg, "--torch-json", bad_torch.to_str().context("path")?]);
    let out = kiln(&args)?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1) && stderr.contains("bad.json: results[0]: no \"model\""), "{stderr}");
    ensure!(!text(&out.stdout).contains("kiln perf: "), "measured before refusing: {}", text(&out.stdout));
    let marked = dir.path("marked.md");
    std::fs::write(&marked, "<!-- kiln perf --table end -->\n<!-- kiln perf --table begin -->\n")?;
    let mut args = base.to_vec();
    args.extend(["--table", marked.to_str().context("path")?]);
    let out = kiln(&args)?;
    ensure!(out.status.code() == Some(1) && text(&out.stderr).contains("marker"), "{}", text(&out.stderr));
    // --torch-json belongs to --table.
    let out = kiln(&["perf", &fp32, "--torch-json", &torch_arg])?;
    ensure!(out.status.code() == Some(2) && text(&out.stderr).contains("--table"), "{}", text(&out.stderr));

    let mut args = base.to_vec();
    args.extend(["--table", &doc_arg, "--torch-json", &torch_arg, "--json", &json_arg]);
    let out = kiln(&args)?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    match kiln_cuda::device::available() {
        Err(reason) => {
            ensure!(out.status.code() == Some(1), "expected exit code 1, got {:?}: {stderr}", out.status.code());
            let line = stderr.lines().find(|l| l.contains("kiln perf:")).context("no error line")?;
            ensure!(line.contains("no plan could be measured") && line.contains("tiny-fp16.plan"), "{stderr}");
            ensure!(line.contains("CUDA unavailable"), "{stderr}");
            // Each plan was read on the CPU first: its precision comes from the plan.
            ensure!(stdout.contains("tiny-fp32.plan (FP32): failed: cannot load"), "{stdout}");
            ensure!(stdout.contains("tiny-fp16.plan (FP16): failed: cannot load"), "{stdout}");
            ensure!(std::fs::read_to_string(&doc)? == before, "no table of failures");
            ensure!(!json.exists(), "no JSON without results");
            println!("skipped the GPU half ({reason}); error line: {line}");
        }
        Ok(()) => {
            ensure!(out.status.success(), "kiln perf failed: {stderr}\n{stdout}");
            let docs: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
            let docs = docs.as_array().context("several plans: an array")?;
            ensure!(docs.len() == 2 && docs.iter().all(|d| d["tool"] == "kiln perf"), "{docs:?}");
            ensure!(docs[0]["precision"] == "FP32" && docs[1]["precision"] == "FP16", "{docs:?}");
            let written = std::fs::read_to_string(&doc)?;
            ensure!(written.starts_with(before), "{written}");
            for row in ["| tiny-fp32 | kiln | FP32 |", "| tiny-fp16 | kiln | FP16 |", "| tiny | PyTorch eager-fp32 |"] {
                ensure!(written.contains(row) && stdout.contains(row), "{row}: {written}");
            }
            ensure!(
                written.contains("(batch 4)") && written.ends_with("<!-- kiln perf --table end -->\n"),
                "{written}"
            );
        }
    }
    Ok(())
}
