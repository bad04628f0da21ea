//! Shared fixtures for the end-to-end tests: where `make setup` put things, and a
//! helper that starts a real kiln server on a loopback port chosen by the OS.

pub mod int8_chain;
pub mod resnet;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, ensure};
use kiln_server::{Server, ServerConfig};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ONNX Runtime library installed by `make setup` (or `KILN_ORT_LIBRARY`).
pub fn ort_library() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("KILN_ORT_LIBRARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".kiln/lib/libonnxruntime.so"));
    ensure!(path.is_file(), "{} is missing: run `make setup` first", path.display());
    Ok(path)
}

/// The model repository with the imported default model.
pub fn model_repository() -> anyhow::Result<PathBuf> {
    let repo = workspace_root().join("models");
    ensure!(
        repo.join("efficientnet_lite0/1/model.onnx").is_file(),
        "the default model is missing from {}: run `make setup` first",
        repo.display()
    );
    Ok(repo)
}

/// One of the sample photos extracted by `make setup` (`flower.jpg`, `china.jpg`).
pub fn photo(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = workspace_root().join(".kiln/assets").join(name);
    std::fs::read(&path).with_context(|| format!("reading {} (run `make setup` first)", path.display()))
}

/// A server configuration for the default repository on 127.0.0.1, port 0.
pub fn default_config() -> anyhow::Result<ServerConfig> {
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(ServerConfig::new(addr, model_repository()?, ort_library()?))
}

/// A running in-process server; dropping it stops accepting connections.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), kiln_server::ServerError>>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr, stop: Some(stop), task: Some(task) })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful stop: waits until connections and queues are drained.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// HTTP/1.1-only and HTTP/2 prior-knowledge (h2c) clients.
pub fn clients() -> anyhow::Result<[(&'static str, reqwest::Client); 2]> {
    let h1 = reqwest::Client::builder().http1_only().build()?;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    Ok([("http/1.1", h1), ("h2c", h2)])
}

/// A unique scratch directory under the system's temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let path = std::env::temp_dir().join(format!("kiln-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway model repository holding the default model with an edited
/// `config.toml`; the model and labels are symlinked, not copied. Removed on drop.
#[derive(Debug)]
pub struct ScratchRepository {
    pub path: PathBuf,
}

impl ScratchRepository {
    pub fn with_config(tag: &str, edit: impl Fn(&str) -> String) -> anyhow::Result<Self> {
        let source = std::fs::canonicalize(model_repository()?.join("efficientnet_lite0"))?;
        let path = std::env::temp_dir().join(format!("kiln-test-{}-{tag}", std::process::id()));
        let dir = path.join("efficientnet_lite0");
        std::fs::create_dir_all(&dir)?;
        let config = std::fs::read_to_string(source.join("config.toml"))?;
        std::fs::write(dir.join("config.toml"), edit(&config))?;
        for entry in ["1", "labels.txt"] {
            let link = dir.join(entry);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(source.join(entry), &link)?;
            }
        }
        Ok(Self { path })
    }

    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        Ok(ServerConfig::new(addr, &self.path, ort_library()?))
    }
}

impl Drop for ScratchRepository {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The tensor test models (`identity_fp32`, `add_sub`, `all_types`) built by `make setup`.
pub fn test_model_repository() -> anyhow::Result<PathBuf> {
    let repo = workspace_root().join(".kiln/test-models");
    ensure!(repo.join("all_types/1/model.onnx").is_file(), "{} is missing: run `make setup` first", repo.display());
    Ok(repo)
}

/// A repository in `dir` holding the `add_sub` test model as version 1 with `config`
/// (its `config.toml`); returns the repository root.
pub fn add_sub_repository(dir: &TempDir, config: &str) -> anyhow::Result<PathBuf> {
    let source = std::fs::canonicalize(test_model_repository()?.join("add_sub/1/model.onnx"))?;
    let model_dir = dir.path("repo/add_sub");
    std::fs::create_dir_all(model_dir.join("1"))?;
    std::fs::copy(&source, model_dir.join("1/model.onnx"))?;
    std::fs::write(model_dir.join("config.toml"), config)?;
    Ok(dir.path("repo"))
}

/// A server configuration for `repo` on 127.0.0.1, port 0, with the ONNX Runtime `ort`.
pub fn loopback_config(repo: PathBuf, ort: PathBuf) -> anyhow::Result<ServerConfig> {
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(ServerConfig::new(addr, repo, ort))
}

/// The error `Server::bind` returns for an `add_sub` repository whose config is
/// `model_config`; an error itself if the model loaded.
pub async fn add_sub_load_error(tag: &str, model_config: &str, ort: PathBuf) -> anyhow::Result<String> {
    let dir = TempDir::new(tag)?;
    let repo = add_sub_repository(&dir, model_config)?;
    match Server::bind(loopback_config(repo, ort)?).await {
        Ok(_) => anyhow::bail!("the model loaded with {model_config:?}"),
        Err(e) => Ok(e.to_string()),
    }
}

/// One `add_sub` request (INPUT0 = 3, INPUT1 = 1 over 16 elements) and its checked answer
/// (OUTPUT0 = 4, OUTPUT1 = 2 everywhere).
pub async fn check_add_sub_infer(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let request = serde_json::json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![3.0f32; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
    ]});
    let resp = client.post(url).json(&request).send().await?;
    ensure!(resp.status() == 200, "status {}: {}", resp.status(), resp.text().await?);
    let body: serde_json::Value = resp.json().await?;
    let outputs = body["outputs"].as_array().context("no outputs")?;
    for (name, want) in [("OUTPUT0", 4.0), ("OUTPUT1", 2.0)] {
        let out = outputs.iter().find(|o| o["name"] == name).with_context(|| format!("{name} missing: {body}"))?;
        let data = out["data"].as_array().context("no data")?;
        ensure!(data.len() == 16 && data.iter().all(|v| v.as_f64() == Some(want)), "{name}: {out}");
    }
    Ok(())
}

/// A server configuration for the tensor test models on 127.0.0.1, port 0.
pub fn test_models_config() -> anyhow::Result<ServerConfig> {
    let addr: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(ServerConfig::new(addr, test_model_repository()?, ort_library()?))
}

/// The project venv's Python (with Triton's client), set up by `make setup`.
pub fn venv_python() -> anyhow::Result<PathBuf> {
    let python = workspace_root().join(".kiln/venv/bin/python");
    ensure!(python.is_file(), "{} is missing: run `make setup` first", python.display());
    Ok(python)
}
