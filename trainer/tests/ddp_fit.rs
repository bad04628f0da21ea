//! Data-parallel training end to end: `mpirun -n 2 kiln-train fit` on CPU reaches the
//! same weights as one process on the same global batches, and both ranks hold the same
//! model.
//!
//! The exact comparison is with a single process that splits each global batch the same
//! way (`--grad-accum 2`): every number is then computed in the same order, so only the
//! all-reduce could differ. A single process on whole batches rounds differently (other
//! convolution blocking, other summation order), and Adam turns rounding noise in
//! near-zero gradient elements into steps of up to the learning rate, so that
//! comparison gets a loose bound that still catches a wrong average.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_tests::TempDir;
use tch::Tensor;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn kiln_train() -> &'static str {
    env!("CARGO_BIN_EXE_kiln-train")
}

/// Runs a command to completion, killing it after `limit`.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let id = child.id();
    let start = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::metadata(format!("/proc/{id}")).is_err() {
                return;
            }
        }
        let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    let _ = watchdog.join();
    out
}

fn fit_args(out: &Path) -> Vec<String> {
    let s = |v: &str| v.to_string();
    vec![
        s("fit"),
        s("--model"),
        s("small-cnn"),
        s("--no-batch-norm"),
        s("--dropout"),
        s("0"),
        s("--train-limit"),
        s("768"),
        s("--eval-limit"),
        s("128"),
        s("--epochs"),
        s("1"),
        s("--batch-size"),
        s("128"),
        s("--lr"),
        s("1e-3"),
        s("--warmup-steps"),
        s("2"),
        s("--seed"),
        s("5"),
        s("--device"),
        s("cpu"),
        s("--threads"),
        s("1"),
        s("--workers"),
        s("1"),
        s("--no-progress"),
        s("--out"),
        out.display().to_string(),
    ]
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| {
        panic!("no JSON summary; stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    serde_json::from_str(line).unwrap()
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
    }
    worst
}

fn weights(run: &Path) -> Vec<(String, Tensor)> {
    let dir = kiln_trainer::checkpoint::resolve(run).unwrap();
    let mut w = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn two_mpi_ranks_reach_the_single_process_weights() {
    if !Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: {FASHION} missing (`make setup-trainer`)");
        return;
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("skipped: mpirun not found (Debian openmpi-bin; `make setup-trainer`)");
        return;
    }
    let dir = TempDir::new("ddp-fit").unwrap();
    let single = |name: &str, accum: &str| {
        let out = dir.path(name);
        let mut cmd = Command::new(kiln_train());
        cmd.args(fit_args(&out)).args(["--grad-accum", accum]);
        let res = run(cmd, Duration::from_secs(300));
        assert!(res.status.success(), "single process failed: {}", String::from_utf8_lossy(&res.stderr));
        let json = last_json(&res);
        assert_eq!(json["world_size"], 1);
        assert_eq!(json["steps"], 6);
        (out, json)
    };
    let (split, split_json) = single("single-accum", "2");
    check_eval_and_export(&split, &split_json, &dir);
    let (whole, _) = single("single", "1");

    let ddp = dir.path("ddp");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--bind-to", "none", "-n", "2", kiln_train()])
        .args(fit_args(&ddp))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let two = run(cmd, Duration::from_secs(300));
    assert!(two.status.success(), "mpirun -n 2 failed: {}", String::from_utf8_lossy(&two.stderr));
    let two_json = last_json(&two);
    assert_eq!(two_json["world_size"], 2);
    assert_eq!(two_json["steps"], 6);
    let prints = two_json["replica_fingerprints"].as_array().unwrap();
    assert_eq!(prints.len(), 2);
    assert_eq!(prints[0], prints[1], "ranks hold different weights");

    let exact = max_diff(&weights(&split), &weights(&ddp));
    let loose = max_diff(&weights(&whole), &weights(&ddp));
    eprintln!(
        "max |weight difference| after 6 steps: DDP vs one process with the same split {exact:e}, vs whole batches {loose:e}"
    );
    assert!(exact <= 1e-5, "DDP weights differ from the single process's by {exact}");
    assert!(loose <= 1e-3, "DDP weights differ from whole-batch training by {loose}");
    // With batch norm each rank's running statistics come from its own shard; rank 0's are
    // taken before evaluation and saving, so the replicas still end identical.
    let bn = dir.path("ddp-bn");
    let mut cmd = Command::new("mpirun");
    let args: Vec<String> = fit_args(&bn).into_iter().filter(|a| a != "--no-batch-norm").collect();
    cmd.args(["--oversubscribe", "--bind-to", "none", "-n", "2", kiln_train()])
        .args(args)
        .args(["--max-steps", "3"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let with_bn = run(cmd, Duration::from_secs(300));
    assert!(with_bn.status.success(), "mpirun -n 2 with batch norm: {}", String::from_utf8_lossy(&with_bn.stderr));
    let bn_prints = last_json(&with_bn)["replica_fingerprints"].as_array().unwrap().clone();
    assert_eq!(bn_prints[0], bn_prints[1]);

    // Only rank 0 writes: one checkpoint directory, one log.
    let log = std::fs::read_to_string(ddp.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"epoch\"") && l.contains("eval_accuracy")).count(), 1);
}

/// `kiln-train eval` reproduces the run's final evaluation, and `kiln-train export` writes a
/// served model directory whose ONNX passed the parity check.
fn check_eval_and_export(run_dir: &Path, fit: &serde_json::Value, dir: &TempDir) {
    let mut cmd = Command::new(kiln_train());
    cmd.args(["eval", "--checkpoint"]).arg(run_dir).args(["--device", "cpu"]);
    let out = run_cmd(cmd);
    let eval = last_json(&out);
    assert_eq!(eval["examples"], 128);
    assert_eq!(eval["accuracy"], fit["eval_accuracy"], "{eval} vs {fit}");

    let Ok(ort) = kiln_tests::ort_library() else {
        eprintln!("export not checked: no ONNX Runtime library");
        return;
    };
    let onnx = dir.path("models").join("fmnist/3/model.onnx");
    let mut cmd = Command::new(kiln_train());
    cmd.args(["export", "--checkpoint"]).arg(run_dir).arg("--out").arg(&onnx).env("KILN_ORT_LIBRARY", ort);
    let exported = last_json(&run_cmd(cmd));
    let diff: f64 = exported["max_abs_diff"].as_f64().unwrap();
    assert!(diff <= 1e-4, "{exported}");
    assert!(onnx.is_file() && dir.path("models").join("fmnist/config.toml").is_file());
    assert_eq!(std::fs::read_to_string(dir.path("models").join("fmnist/labels.txt")).unwrap().lines().count(), 10);

    // A broken checkpoint path is a clear error and a non-zero exit, not a panic.
    let mut cmd = Command::new(kiln_train());
    cmd.args(["export", "--checkpoint", "/nonexistent/run", "--out"]).arg(dir.path("x.onnx")).arg("--no-verify");
    let bad = run(cmd, Duration::from_secs(60));
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("/nonexistent/run") && !stderr.contains("panicked"), "{stderr}");
}

fn run_cmd(cmd: Command) -> Output {
    let out = run(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}
