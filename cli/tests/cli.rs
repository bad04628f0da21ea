//! Tests of the real `kiln` binary: start-up, the printed port, serving, SIGTERM, help
//! text, and start-up failures that must be clear messages, not panics.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use kiln_tests::TempDir;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ort_library() -> anyhow::Result<PathBuf> {
    let path = workspace_root().join(".kiln/lib/libonnxruntime.so");
    ensure!(path.is_file(), "{} is missing: run `make setup` first", path.display());
    Ok(path)
}

fn model_repository() -> anyhow::Result<PathBuf> {
    let repo = workspace_root().join("models");
    ensure!(repo.join("efficientnet_lite0/1/model.onnx").is_file(), "no model in {}: run `make setup`", repo.display());
    Ok(repo)
}

/// `kiln` with no KILN_* variables inherited, so only the given flags count.
fn kiln() -> Command {
    let mut cmd = Command::new(KILN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KILN_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// A running `kiln` process, killed (and reaped) on drop whatever the test's outcome.
#[derive(Debug)]
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd.spawn().with_context(|| format!("spawning {KILN}"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Drained continuously so that a chatty server never blocks on a full pipe.
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        Ok(Self { child, stdout: rx, stderr: Some(stderr) })
    }

    /// Waits (bounded) for the next stdout line.
    fn stdout_line(&self, timeout: Duration) -> anyhow::Result<String> {
        self.stdout.recv_timeout(timeout).with_context(|| format!("no stdout line from kiln within {timeout:?}"))
    }

    /// Polls until the process exits; kills it and fails after `timeout`.
    fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("kiln did not exit within {timeout:?}; killed it. stderr:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything kiln wrote to stderr; only complete once the process has exited.
    fn stderr_text(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_none() {
            return "(still running)".into();
        }
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion (bounded) and returns its exit status, stdout and stderr.
fn run_to_end(cmd: Command, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
    let mut running = Running::spawn(cmd)?;
    let status = running.wait(timeout)?;
    let mut stdout = Vec::new();
    while let Ok(line) = running.stdout.recv_timeout(Duration::from_secs(5)) {
        stdout.push(line);
    }
    let stderr = running.stderr_text();
    Ok((status, stdout.join("\n"), stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_port_answers_and_exits_cleanly_on_sigterm() -> anyhow::Result<()> {
    let mut cmd = kiln();
    cmd.arg("serve").arg("--port").arg("0").arg("--model-repository").arg(model_repository()?);
    cmd.arg("--ort-library").arg(ort_library()?);
    let mut server = Running::spawn(cmd)?;

    let line = server.stdout_line(Duration::from_secs(60)).map_err(|e| {
        let stderr = server.stderr_text();
        e.context(format!("stderr: {stderr}"))
    })?;
    let prefix = "kiln listening on http://127.0.0.1:";
    let port: u16 = line
        .strip_prefix(prefix)
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("unexpected first stdout line {line:?}"))?;
    ensure!(port != 0, "kiln printed port 0");

    let photo = workspace_root().join(".kiln/assets/flower.jpg");
    let bytes = std::fs::read(&photo).with_context(|| format!("reading {}", photo.display()))?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let form =
        reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(bytes).file_name("flower.jpg"));
    let resp = client.post(format!("http://127.0.0.1:{port}/predict")).multipart(form).send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the /predict answer is not JSON")?;
    ensure!(status == reqwest::StatusCode::OK, "/predict status {status}, body {body}");
    ensure!(body["prediction"]["label"] == "daisy", "flower.jpg predicted as {}", body["prediction"]["label"]);
    ensure!(body["prediction"]["class_id"] == 985, "flower.jpg class_id {}", body["prediction"]["class_id"]);

    let pid = server.child.id().to_string();
    let kill = Command::new("kill").arg("-TERM").arg(&pid).status().context("running kill -TERM")?;
    ensure!(kill.success(), "kill -TERM {pid} failed: {kill}");
    let exit = tokio::task::block_in_place(|| server.wait(Duration::from_secs(10)))?;
    let stderr = server.stderr_text();
    ensure!(exit.success(), "kiln exited with {exit} after SIGTERM; stderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln panicked:\n{stderr}");
    Ok(())
}

#[test]
fn serve_help_documents_the_options() -> anyhow::Result<()> {
    let mut cmd = kiln();
    cmd.args(["serve", "--help"]);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(30))?;
    ensure!(status.success(), "kiln serve --help exited with {status}; stderr:\n{stderr}");
    for needle in ["--port", "--model-repository", "--default-model", "--ort-library", "KILN_PORT"] {
        ensure!(stdout.contains(needle), "kiln serve --help does not mention {needle}:\n{stdout}");
    }
    Ok(())
}

#[test]
fn invalid_model_config_fails_fast_naming_file_and_field() -> anyhow::Result<()> {
    let dir = TempDir::new("bad-config")?;
    let model_dir = dir.0.join("m");
    std::fs::create_dir_all(&model_dir)?;
    let config = "name = \"m\"\nmax_batch_size = 0\n\n[input]\nname = \"input\"\ncrop = [224, 224]\n\n\
                  [output]\nname = \"logits\"\n";
    std::fs::write(model_dir.join("config.toml"), config)?;

    let mut cmd = kiln();
    cmd.args(["serve", "--port", "0", "--model-repository"]).arg(&dir.0).arg("--ort-library").arg(ort_library()?);
    let started = Instant::now();
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(30))?;
    ensure!(!status.success(), "kiln accepted max_batch_size = 0; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(started.elapsed() < Duration::from_secs(15), "kiln took {:?} to reject the config", started.elapsed());
    ensure!(stderr.contains("config.toml"), "stderr does not name config.toml:\n{stderr}");
    ensure!(stderr.contains("max_batch_size"), "stderr does not name max_batch_size:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln panicked:\n{stderr}");
    ensure!(!stdout.contains("listening"), "kiln claimed to listen:\n{stdout}");
    Ok(())
}

#[test]
fn missing_ort_library_is_a_clear_error() -> anyhow::Result<()> {
    let dir = TempDir::new("no-ort")?;
    let missing = dir.0.join("no-such-dir/libonnxruntime.so");
    let mut cmd = kiln();
    cmd.args(["serve", "--port", "0", "--model-repository"]).arg(model_repository()?);
    cmd.arg("--ort-library").arg(&missing);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(!status.success(), "kiln started without an ONNX Runtime library; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln panicked:\n{stderr}");
    let shown = missing.display().to_string();
    ensure!(stderr.contains(&shown), "stderr does not name {shown}:\n{stderr}");
    ensure!(!stdout.contains("listening"), "kiln claimed to listen:\n{stdout}");
    Ok(())
}

#[test]
fn ort_library_that_is_not_a_library_is_a_clear_error() -> anyhow::Result<()> {
    let dir = TempDir::new("bad-ort")?;
    let fake = dir.0.join("libonnxruntime.so");
    std::fs::write(&fake, b"definitely not an ELF shared object\n")?;
    let mut cmd = kiln();
    cmd.args(["serve", "--port", "0", "--model-repository"]).arg(model_repository()?);
    cmd.arg("--ort-library").arg(&fake);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(!status.success(), "kiln started with a fake ONNX Runtime library; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln panicked:\n{stderr}");
    let shown = fake.display().to_string();
    ensure!(stderr.contains(&shown), "stderr does not name {shown}:\n{stderr}");
    Ok(())
}

#[test]
fn providers_reports_what_can_run_here() -> anyhow::Result<()> {
    let mut cmd = kiln();
    cmd.arg("providers").arg("--ort-library").arg(ort_library()?);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(status.success(), "kiln providers exited with {status}; stderr:\n{stderr}");
    for needle in [
        "ONNX Runtime: ",
        "1.31.1",
        "cpu       (CPUExecutionProvider): ready",
        "tensorrt  (TensorrtExecutionProvider): unavailable: the ONNX Runtime library",
        "ort-cuda  (CUDAExecutionProvider): unavailable",
        "onnxruntime-gpu==1.31.1",
    ] {
        ensure!(stdout.contains(needle), "{needle:?} missing from:\n{stdout}");
    }
    Ok(())
}

#[test]
fn serve_with_an_unavailable_backend_and_no_fallback_fails_clearly() -> anyhow::Result<()> {
    let mut cmd = kiln();
    cmd.args(["serve", "--port", "0", "--backend", "tensorrt", "--model-repository"]).arg(model_repository()?);
    cmd.arg("--ort-library").arg(ort_library()?);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(!status.success(), "kiln served TensorRT without TensorRT; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln panicked:\n{stderr}");
    for needle in ["efficientnet_lite0", "backend tensorrt", "TensorrtExecutionProvider is unavailable"] {
        ensure!(stderr.contains(needle), "{needle:?} missing from:\n{stderr}");
    }
    ensure!(!stdout.contains("listening"), "kiln claimed to listen:\n{stdout}");
    Ok(())
}

/// The tensor test models `make setup` builds: they load in a moment.
fn test_model_repository() -> anyhow::Result<PathBuf> {
    let repo = workspace_root().join(".kiln/test-models");
    ensure!(
        repo.join("identity_fp32/1/model.onnx").is_file(),
        "no test models in {}: run `make setup`",
        repo.display()
    );
    Ok(repo)
}

/// `kiln serve --port 0` on the test models; returns the running server and its port.
fn serve_test_models() -> anyhow::Result<(Running, u16)> {
    let mut cmd = kiln();
    cmd.args(["serve", "--port", "0", "--model-repository"]).arg(test_model_repository()?);
    cmd.arg("--ort-library").arg(ort_library()?);
    let mut server = Running::spawn(cmd)?;
    let line = match server.stdout_line(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(e) => {
            let _ = server.child.kill();
            let _ = server.child.wait();
            return Err(e.context(format!("stderr: {}", server.stderr_text())));
        }
    };
    let port: u16 = line
        .strip_prefix("kiln listening on http://127.0.0.1:")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("unexpected first stdout line {line:?}"))?;
    Ok((server, port))
}

/// Short levels, so that each `kiln bench` run takes well under a second.
const QUICK: [&str; 6] = ["--warmup", "100ms", "--window", "200ms", "--max-windows", "2"];

#[test]
fn bench_prints_the_table_and_writes_json_and_csv() -> anyhow::Result<()> {
    let (_server, port) = serve_test_models()?;
    let dir = TempDir::new("bench")?;
    let (json_path, csv_path) = (dir.0.join("out/report.json"), dir.0.join("out/report.csv"));
    let mut cmd = kiln();
    cmd.arg("bench").arg(format!("http://127.0.0.1:{port}/health")).args(["--concurrency", "2"]).args(QUICK);
    cmd.arg("--json").arg(&json_path).arg("--csv").arg(&csv_path).arg("-q");
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(status.success(), "kiln bench exited with {status}; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln bench panicked:\n{stderr}");
    for needle in ["conc", "req/s", "p50 ms", "p99 ms", "errors", "stable", "HTTP/1.1, closed loop"] {
        ensure!(stdout.contains(needle), "the table lacks {needle:?}:\n{stdout}");
    }

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?,
    )
    .context("the JSON report does not parse")?;
    let level = &json["levels"][0];
    ensure!(level["requests"].as_u64().is_some_and(|n| n > 0), "no request succeeded: {json}");
    ensure!(level["concurrency"] == 2 && level["error_count"] == 0, "{json}");
    ensure!(json["levels"].as_array().map(Vec::len) == Some(1), "one level expected: {json}");

    let csv = std::fs::read_to_string(&csv_path).with_context(|| format!("reading {}", csv_path.display()))?;
    let lines: Vec<&str> = csv.lines().collect();
    ensure!(lines.len() == 2 && lines[0].starts_with("concurrency,"), "a header and one row expected:\n{csv}");
    ensure!(lines[1].starts_with("2,"), "the row is not concurrency 2:\n{csv}");
    Ok(())
}

#[test]
fn bench_with_nothing_listening_fails_without_panicking() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cmd = kiln();
    cmd.arg("bench").arg(format!("http://127.0.0.1:{port}/")).args(QUICK).arg("-q");
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(60))?;
    ensure!(!status.success(), "kiln bench succeeded with nothing listening; stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(stderr.contains("no request succeeded"), "stderr does not say why:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "kiln bench panicked:\n{stderr}");
    ensure!(stdout.contains("connect"), "the table does not list the connect errors:\n{stdout}");
    Ok(())
}

#[test]
fn bench_refuses_bad_arguments_with_a_message() -> anyhow::Result<()> {
    let cases: [(&[&str], &str); 4] = [
        (&["ftp://127.0.0.1:21/"], "scheme"),
        (&["http://127.0.0.1:9/", "--concurrency", "0"], "positive"),
        (&["http://127.0.0.1:9/", "--rate", "0"], "positive"),
        (&["http://127.0.0.1:9/", "--payload", "predict"], "--images"),
    ];
    for (args, needle) in cases {
        let mut cmd = kiln();
        cmd.arg("bench").args(args).args(QUICK).arg("-q");
        let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(30))?;
        ensure!(!status.success(), "kiln bench {args:?} succeeded; stdout:\n{stdout}");
        ensure!(stderr.contains(needle), "kiln bench {args:?}: stderr does not mention {needle:?}:\n{stderr}");
        ensure!(!stderr.contains("panicked"), "kiln bench {args:?} panicked:\n{stderr}");
    }
    Ok(())
}
