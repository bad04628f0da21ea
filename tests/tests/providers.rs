//! `backend = "tensorrt"` / `"ort-cuda"` on this machine's CPU-only ONNX Runtime: with a
//! fallback the model serves on the CPU and says so (metadata and `/metrics`); without one
//! it fails to load with a message naming the missing provider and what to install; the
//! fallback order is honoured.

use anyhow::{Context, ensure};
use kiln_server::ServerConfig;
use kiln_tests::{
    TempDir, TestServer, add_sub_load_error, add_sub_repository, check_add_sub_infer, clients, loopback_config,
    ort_library,
};
use serde_json::{Value, json};

fn config(repo: std::path::PathBuf) -> anyhow::Result<ServerConfig> {
    loopback_config(repo, ort_library()?)
}

async fn load_error(tag: &str, model_config: &str) -> anyhow::Result<String> {
    add_sub_load_error(tag, model_config, ort_library()?).await
}

async fn metadata(server: &TestServer) -> anyhow::Result<Value> {
    Ok(reqwest::Client::new().get(server.url("/v2/models/add_sub")).send().await?.json().await?)
}

async fn metrics(server: &TestServer) -> anyhow::Result<String> {
    Ok(reqwest::Client::new().get(server.url("/metrics")).send().await?.text().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorrt_with_a_cpu_fallback_serves_and_reports_the_fallback() -> anyhow::Result<()> {
    let dir = TempDir::new("trt-fallback")?;
    let model_config = r#"
        name = "add_sub"
        max_batch_size = 8
        backend = "tensorrt"
        fallback = ["cpu"]
        [tensorrt]
        precision = "fp16"
        batch = [1, 4, 8]
        engine_cache_dir = "trt"
    "#;
    let repo = add_sub_repository(&dir, model_config)?;
    let server = TestServer::start(config(repo)?).await?;
    for (proto, client) in clients()? {
        check_add_sub_infer(&client, &server.url("/v2/models/add_sub/infer")).await.context(proto)?;
    }
    let meta = metadata(&server).await?;
    let want = json!({"requested": "tensorrt", "serving": "cpu", "engine": "onnxruntime-cpu", "precision": "fp32"});
    ensure!(meta["backend"] == want, "metadata: {meta}");
    ensure!(meta["platform"] == "onnxruntime_onnx", "{meta}");
    let text = metrics(&server).await?;
    let series = r#"kiln_model_backend_info{model="add_sub",version="1",requested="tensorrt",serving="cpu",engine="onnxruntime-cpu",precision="fp32"} 1"#;
    ensure!(text.contains(series), "no {series} in:\n{text}");
    // The TensorRT set-up never ran, so no engine cache was created.
    ensure!(!dir.path("repo/add_sub/trt").exists(), "a cache directory appeared for a backend that did not load");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorrt_without_a_fallback_fails_naming_the_provider() -> anyhow::Result<()> {
    let err = load_error("trt-nofallback", "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"tensorrt\"\n").await?;
    for needle in [
        "add_sub",
        "backend tensorrt",
        "TensorrtExecutionProvider is unavailable",
        "built without the TensorrtExecutionProvider",
        "onnxruntime-gpu==1.31.1",
        "no fallback configured",
    ] {
        ensure!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    let err = load_error("cuda-nofallback", "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"ort-cuda\"\n").await?;
    ensure!(err.contains("CUDAExecutionProvider is unavailable"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_order_is_honoured() -> anyhow::Result<()> {
    // Every backend fails here: the error lists them in the configured order.
    let err = load_error(
        "order-fail",
        "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"tensorrt\"\nfallback = [\"tensorrt\", \"ort-cuda\"]\n",
    )
    .await?;
    let trt = err.find("backend tensorrt").context(err.clone())?;
    let cuda = err.find("backend ort-cuda").context(err.clone())?;
    ensure!(trt < cuda, "tensorrt must be tried before ort-cuda: {err}");
    ensure!(err.matches("backend tensorrt").count() == 1, "tensorrt tried twice: {err}");
    ensure!(!err.contains("no fallback configured"), "{err}");

    // The first backend that loads serves: here the CPU, third in line.
    let dir = TempDir::new("order-ok")?;
    let model_config =
        "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"ort-cuda\"\nfallback = [\"tensorrt\", \"cpu\"]\n";
    let repo = add_sub_repository(&dir, model_config)?;
    let server = TestServer::start(config(repo)?).await?;
    check_add_sub_infer(&reqwest::Client::new(), &server.url("/v2/models/add_sub/infer")).await?;
    let meta = metadata(&server).await?;
    ensure!(meta["backend"]["requested"] == "ort-cuda" && meta["backend"]["serving"] == "cpu", "{meta}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kilns_cuda_engine_without_a_gpu_falls_back_too() -> anyhow::Result<()> {
    if kiln_cuda::device::available().is_ok() {
        eprintln!("skipped: this machine has a GPU, so the CUDA engine would serve");
        return Ok(());
    }
    let dir = TempDir::new("cuda-fallback")?;
    let repo =
        add_sub_repository(&dir, "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"cuda\"\nfallback = [\"cpu\"]\n")?;
    let server = TestServer::start(config(repo)?).await?;
    check_add_sub_infer(&reqwest::Client::new(), &server.url("/v2/models/add_sub/infer")).await?;
    let meta = metadata(&server).await?;
    let want = json!({"requested": "cuda", "serving": "cpu", "engine": "onnxruntime-cpu", "precision": "fp32"});
    ensure!(meta["backend"] == want, "{meta}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_backend_overrides_the_config_and_keeps_its_fallback() -> anyhow::Result<()> {
    let dir = TempDir::new("override")?;
    let repo = add_sub_repository(&dir, "name = \"add_sub\"\nmax_batch_size = 8\nfallback = [\"cpu\"]\n")?;
    let mut cfg = config(repo)?;
    cfg.backend = Some(kiln_server::BackendKind::TensorRt);
    let server = TestServer::start(cfg).await?;
    let meta = metadata(&server).await?;
    ensure!(meta["backend"]["requested"] == "tensorrt" && meta["backend"]["serving"] == "cpu", "{meta}");
    server.shutdown().await
}
