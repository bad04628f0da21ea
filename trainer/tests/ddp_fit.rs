//! Data-parallel training end to end: `mpirun -n 2 kiln-train fit` on CPU reaches the
//! same weights as one process on the same global batches, and both ranks hold the same
//! model.
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
    let single = dir.path("single");
    let mut cmd = Command::new(kiln_train());
    cmd.args(fit_args(&single));
    let one = run(cmd, Duration::from_secs(300));
    assert!(one.status.success(), "single process failed: {}", String::from_utf8_lossy(&one.stderr));
    let one_json = last_json(&one);
    assert_eq!(one_json["world_size"], 1);
    assert_eq!(one_json["steps"], 6);

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

    let (a, b) = (weights(&single), weights(&ddp));
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        worst = worst.max((ta - tb).abs().max().double_value(&[]));
    }
    eprintln!("max |single - ddp| over all weights after 6 steps: {worst:e}");
    assert!(worst <= 1e-5, "DDP weights differ from single-process ones by {worst}");
    // Only rank 0 writes: one checkpoint directory, one log.
    let log = std::fs::read_to_string(ddp.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"epoch\"") && l.contains("eval_accuracy")).count(), 1);
}
