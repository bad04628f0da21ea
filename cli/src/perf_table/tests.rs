//! `kiln perf --table` on synthetic results: no GPU needed.

use anyhow::ensure;

use super::*;

/// A kiln point whose GPU compute alone runs at 1.5× its end-to-end rate.
fn point(batch: usize, samples_per_s: f64, p50_ms: f64, p99_ms: f64) -> BatchPoint {
    BatchPoint { batch, samples_per_s, p50_ms, p99_ms, compute_samples_per_s: Some(samples_per_s * 1.5) }
}

fn torch_doc() -> String {
    serde_json::json!({
        "tool": "torch_baseline", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.9.0", "cuda": "13.0",
        "results": [
            {"model": "resnet50", "mode": "eager-fp32", "batch": 1, "throughput": 250.4,
             "latency_ms": {"p50": 3.9, "p99": 4.25}},
            {"model": "resnet50", "mode": "eager-fp32", "batch": 256, "throughput": 2900.0,
             "latency_ms": {"p50": 88.0, "p99": 90.0}},
            {"model": "resnet50", "mode": "compile-fp16", "batch": 256, "throughput": 12345.6,
             "latency_ms": {"p50": 20.0, "p99": 21.0}},
            {"model": "resnet50", "mode": "cuda-graph-fp16", "batch": 1, "error": "RuntimeError: capture | failed"},
            {"model": "bert-base", "mode": "eager-fp16", "batch": 1, "throughput": 900.0,
             "latency_ms": {"p50": 1.1, "p99": 1.2}},
            {"model": "minilm-l6", "error": "build: ImportError: no transformers"}
        ]
    })
    .to_string()
}

fn table() -> anyhow::Result<Table> {
    Ok(Table {
        gpus: vec!["NVIDIA H100 80GB HBM3".into()],
        kiln_setup: "1 stream(s), CUDA graph on".into(),
        plans: vec![
            PlanRow {
                model: "resnet50-fp32".into(),
                precision: precision_label(Precision::F32, 0),
                plan_bytes: Some(102_000_000),
                points: vec![point(1, 400.0, 2.5, 2.75), point(64, 3000.0, 21.3, 22.0), point(256, 2950.5, 86.0, 90.0)],
                ..PlanRow::default()
            },
            PlanRow {
                model: "resnet50-fp16".into(),
                precision: precision_label(Precision::F16, 0),
                plan_bytes: Some(51_000_000),
                points: vec![point(64, 9000.0, 7.0, 7.5)],
                failed: vec![(256, "out of memory".into())],
                ..PlanRow::default()
            },
            PlanRow {
                model: "resnet50-int8".into(),
                precision: precision_label(Precision::F16, 53),
                plan_bytes: Some(51_500_000),
                error: Some("cannot load x.plan on the CUDA engine: out of\nmemory".into()),
                ..PlanRow::default()
            },
        ],
        torch: Some(parse_torch(&torch_doc(), "torch.json")?),
    })
}

fn row<'a>(text: &'a str, start: &str) -> anyhow::Result<&'a str> {
    text.lines().find(|l| l.starts_with(start)).with_context(|| format!("no row {start:?} in\n{text}"))
}

#[test]
fn precision_labels_come_from_settings_and_int8_layers() {
    assert_eq!(precision_label(Precision::F32, 0), "FP32");
    assert_eq!(precision_label(Precision::F16, 0), "FP16");
    assert_eq!(precision_label(Precision::F16, 1), "INT8 (1 layer, rest FP16)");
    assert_eq!(precision_label(Precision::F16, 53), "INT8 (53 layers, rest FP16)");
    assert_eq!(precision_label(Precision::F32, 6), "INT8 (6 layers, rest FP32)");
}

#[test]
fn rows_show_batch_one_latency_best_throughput_and_size() -> anyhow::Result<()> {
    let text = render(&table()?);
    ensure!(text.starts_with("GPU: NVIDIA H100 80GB HBM3.\n"), "{text}");
    ensure!(text.contains("TensorRT rows appear only where TensorRT was measured"), "{text}");
    ensure!(text.contains("torch 2.9.0 (CUDA 13.0)") && text.contains("1 stream(s), CUDA graph on"), "{text}");
    ensure!(
        row(&text, "| resnet50-fp32 |")?
            == "| resnet50-fp32 | kiln | FP32 | 2.500 | 2.750 | 3,000 (batch 64) | 4,500 (batch 64) | 97.3 MiB |",
        "{text}"
    );
    // Batch 1 not measured: dashes; batch 256 failed but 64 gives the best throughput.
    ensure!(
        row(&text, "| resnet50-fp16 |")?
            == "| resnet50-fp16 | kiln | FP16 | – | – | 9,000 (batch 64) | 13,500 (batch 64) | 48.6 MiB |",
        "{text}"
    );
    ensure!(
        row(&text, "| resnet50-int8 |")?
            == "| resnet50-int8 | kiln | INT8 (53 layers, rest FP16) | failed | failed | failed | failed | 49.1 MiB |",
        "{text}"
    );
    ensure!(
        row(&text, "| resnet50 | PyTorch eager-fp32 |")?
            == "| resnet50 | PyTorch eager-fp32 | FP32 | 3.900 | 4.250 | 2,900 (batch 256) | 2,900 (batch 256) | – |",
        "{text}"
    );
    ensure!(
        row(&text, "| resnet50 | PyTorch compile-fp16 |")?
            == "| resnet50 | PyTorch compile-fp16 | FP16 | – | – | 12,346 (batch 256) | 12,346 (batch 256) | – |",
        "{text}"
    );
    ensure!(
        row(&text, "| resnet50 | PyTorch cuda-graph-fp16 |")?
            == "| resnet50 | PyTorch cuda-graph-fp16 | FP16 | failed | failed | failed | failed | – |",
        "{text}"
    );
    // Other models of the torch run are not this table's.
    ensure!(!text.contains("bert-base") && !text.contains("minilm"), "{text}");
    // Failures are listed below, one line each, without breaking the table.
    ensure!(text.contains("- kiln resnet50-fp16 batch 256: out of memory\n"), "{text}");
    ensure!(text.contains("cannot load x.plan on the CUDA engine: out of memory\n"), "{text}");
    ensure!(text.contains("- PyTorch resnet50 cuda-graph-fp16 batch 1: RuntimeError: capture \\| failed"), "{text}");
    let table_rows = text.lines().filter(|l| l.starts_with('|')).count();
    ensure!(table_rows == 2 + 3 + 3, "header, separator, 3 kiln and 3 torch rows:\n{text}");
    Ok(())
}

#[test]
fn no_torch_and_no_gpu_are_said_so() -> anyhow::Result<()> {
    let mut t = table()?;
    t.torch = None;
    t.gpus.clear();
    let text = render(&t);
    ensure!(text.contains("GPU: unknown") && text.contains("PyTorch: not given"), "{text}");
    ensure!(!text.contains("| PyTorch"), "{text}");
    let mut t = table()?;
    if let Some(run) = t.torch.as_mut() {
        run.gpu = Some("NVIDIA A100".into());
    }
    ensure!(render(&t).contains("PyTorch ran on NVIDIA A100: not comparable"));
    let mut t = table()?;
    for p in &mut t.plans {
        p.model = "bert-base-fp16".into();
    }
    t.plans.truncate(1);
    let text = render(&t);
    ensure!(row(&text, "| bert-base | PyTorch eager-fp16 |")?.contains("| 1.100 | 1.200 | 900 (batch 1) |"), "{text}");
    t.plans[0].model = "vit".into();
    ensure!(render(&t).contains("- PyTorch: no results for vit in the --torch-json file"));
    Ok(())
}

#[test]
fn torch_models_match_plan_names() {
    let names = ["resnet50", "bert-base", "bert"];
    assert_eq!(torch_model_for("resnet50", &names), Some("resnet50"));
    assert_eq!(torch_model_for("resnet50-int8", &names), Some("resnet50"));
    assert_eq!(torch_model_for("resnet50_fp16", &names), Some("resnet50"));
    assert_eq!(torch_model_for("bert-base-fp16", &names), Some("bert-base"));
    assert_eq!(torch_model_for("resnet500", &names), None);
    assert_eq!(thousands(0.4), "0");
    assert_eq!(thousands(999.5), "1,000");
    assert_eq!(thousands(1_234_567.0), "1,234,567");
}

#[test]
fn malformed_torch_json_is_a_clear_error() -> anyhow::Result<()> {
    let run = parse_torch(&torch_doc(), "torch.json")?;
    ensure!(run.points.len() == 5 && run.model_errors.len() == 1, "{run:?}");
    for (text, needle) in [
        ("{not json", "torch.json is not valid JSON"),
        ("[]", "not a torch_baseline.py --json file"),
        (r#"{"tool": "kiln perf", "results": []}"#, "\"tool\" is Some(\"kiln perf\")"),
        (r#"{"tool": "torch_baseline"}"#, "\"results\" is missing"),
        (r#"{"tool": "torch_baseline", "results": [{"mode": "eager-fp32"}]}"#, "results[0]: no \"model\""),
        (
            r#"{"tool": "torch_baseline", "results": [{"model": "m", "mode": "x", "batch": -1}]}"#,
            "results[0]: \"batch\" is missing",
        ),
        (
            r#"{"tool": "torch_baseline", "results": [{"model": "m", "mode": "x", "batch": 1,
                "latency_ms": {"p50": 1, "p99": 2}}]}"#,
            "results[0]: \"throughput\" is missing",
        ),
        (
            r#"{"tool": "torch_baseline", "results": [{"model": "m", "mode": "x", "batch": 1,
                "throughput": 5, "latency_ms": {"p50": 1}}]}"#,
            "\"latency_ms.p99\" is missing",
        ),
    ] {
        let e = match parse_torch(text, "torch.json") {
            Ok(r) => bail!("{text} parsed: {r:?}"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(e.contains(needle), "{text}: {e}");
    }
    Ok(())
}

#[test]
fn the_table_replaces_what_is_between_the_markers_only() -> anyhow::Result<()> {
    let before = "# Benchmarks\r\n\nintro\n";
    let after = "\n\n## Later section\n\nno trailing newline";
    let doc = format!("{before}{BEGIN}\nold table\n| a |\n{END}{after}");
    let once = insert_table(&doc, "| new |\n")?;
    ensure!(once == format!("{before}{BEGIN}\n| new |\n{END}{after}"), "{once:?}");
    // Again: the same file, whatever the table was.
    ensure!(insert_table(&once, "| new |")? == once);
    let twice = insert_table(&once, "| newer |\n\n")?;
    ensure!(twice.starts_with(before) && twice.ends_with(&format!("{END}{after}")), "{twice:?}");
    ensure!(twice.contains("| newer |\n<!--") && !twice.contains("| new |"), "{twice:?}");
    // Markers with nothing between them.
    ensure!(insert_table(&format!("x{BEGIN}{END}y"), "t")? == format!("x{BEGIN}\nt\n{END}y"));
    Ok(())
}

#[test]
fn a_section_is_appended_when_markers_are_missing() -> anyhow::Result<()> {
    let section = format!("{HEADING}\n\n{BEGIN}\n| t |\n{END}\n");
    ensure!(insert_table("", "| t |\n")? == section);
    ensure!(insert_table("# B\n", "| t |")? == format!("# B\n\n{section}"));
    ensure!(insert_table("# B", "| t |")? == format!("# B\n\n{section}"));
    // Appended once: the next run finds the markers.
    let once = insert_table("# B\n", "| t |")?;
    ensure!(insert_table(&once, "| u |")? == format!("# B\n\n{HEADING}\n\n{BEGIN}\n| u |\n{END}\n"));
    Ok(())
}

#[test]
fn broken_markers_are_refused() {
    for doc in [
        format!("a {BEGIN} b"),
        format!("a {END} b"),
        format!("{END}\n{BEGIN}"),
        format!("{BEGIN}{END}{BEGIN}{END}"),
        format!("{BEGIN}{BEGIN}{END}"),
    ] {
        let err = insert_table(&doc, "t").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not one of each in that order"), "{doc:?}: {err:?}");
        assert!(check_markers(&doc).is_err());
    }
    assert!(check_markers("plain").is_ok());
}

#[test]
fn writes_are_atomic_renames() -> anyhow::Result<()> {
    let dir = kiln_tests::TempDir::new("perf-table")?;
    let path = dir.path("BENCHMARKS.md");
    write_atomic(&path, "first\n")?;
    write_atomic(&path, "second\n")?;
    ensure!(std::fs::read_to_string(&path)? == "second\n");
    let names: Vec<String> = std::fs::read_dir(&dir.0)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    ensure!(names == ["BENCHMARKS.md"], "temporary files left: {names:?}");
    // A directory that does not exist: an error naming the file, nothing written.
    let bad = dir.path("missing/BENCHMARKS.md");
    let e = write_atomic(&bad, "x").err().map(|e| format!("{e:#}")).unwrap_or_default();
    ensure!(e.contains("missing/BENCHMARKS.md"), "{e}");
    Ok(())
}

#[test]
fn throughput_ratios_to_the_fp16_plan_use_the_largest_common_batch() -> anyhow::Result<()> {
    let mut t = table()?;
    // FP32 and FP16 share batch 64 only (FP16 failed at 256); the INT8 plan failed outright.
    let text = render(&t);
    assert!(
        text.contains("- resnet50-fp32 (FP32): 0.33× resnet50-fp16 end to end, 0.33× compute only, at batch 64"),
        "{text}"
    );
    assert!(!text.contains("- resnet50-int8"), "{text}");
    t.plans[2].error = None;
    // End to end bound by the copies (1.2×), the GPU's own work faster (1.8×).
    let mut int8 = point(64, 10_800.0, 4.0, 4.2);
    int8.compute_samples_per_s = Some(24_300.0);
    t.plans[2].points = vec![point(1, 900.0, 1.1, 1.2), int8];
    let text = render(&t);
    assert!(
        text.contains(
            "- resnet50-int8 (INT8 (53 layers, rest FP16)): 1.20× resnet50-fp16 end to end, 1.80× compute only, at batch 64"
        ),
        "{text}"
    );
    // Without a measured FP16 plan there is nothing to compare with.
    t.plans[1].error = Some("failed".into());
    assert!(!render(&t).contains("Throughput against the FP16 plan"));
    Ok(())
}
