//! The GPU build of ONNX Runtime (PyPI onnxruntime-gpu 1.31.1, its libraries extracted by
//! `scripts/setup --trainer`) on a machine without TensorRT, CUDA or a driver — what a user
//! sees after `pip install onnxruntime-gpu` alone: both GPU providers are compiled in, and
//! loading them fails with the exact libraries that are missing and what to install. With
//! a fallback, the same library serves on its CPU provider.
//!
//! Its own test binary: ONNX Runtime allows one library per process.

use std::path::PathBuf;

use anyhow::{Context, ensure};
use kiln_engine::providers::probe;
use kiln_server::ServerConfig;
use kiln_tests::{
    TempDir, TestServer, add_sub_load_error, add_sub_repository, check_add_sub_infer, loopback_config, workspace_root,
};
use serde_json::Value;

fn gpu_ort_library() -> anyhow::Result<PathBuf> {
    let path = workspace_root().join(".kiln/ort-gpu/libonnxruntime.so.1.31.1");
    ensure!(path.is_file(), "{} is missing: run `scripts/setup --trainer` (make test does)", path.display());
    Ok(path)
}

/// On a machine that has TensorRT the premise does not hold; say so instead of failing.
fn tensorrt_absent() -> anyhow::Result<bool> {
    let trt = workspace_root().join(".kiln/ort-gpu/libonnxruntime_providers_tensorrt.so");
    let missing = probe::missing_libraries(&trt).map_err(anyhow::Error::msg)?;
    if missing.iter().any(|m| m.starts_with("libnvinfer")) {
        return Ok(true);
    }
    eprintln!("skipped: TensorRT's libraries load on this machine (missing only {missing:?})");
    Ok(false)
}

fn config(repo: PathBuf) -> anyhow::Result<ServerConfig> {
    loopback_config(repo, gpu_ort_library()?)
}

async fn load_error(tag: &str, model_config: &str) -> anyhow::Result<String> {
    add_sub_load_error(tag, model_config, gpu_ort_library()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorrt_names_every_missing_library_and_what_to_install() -> anyhow::Result<()> {
    if !tensorrt_absent()? {
        return Ok(());
    }
    let err = load_error("gpu-trt", "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"tensorrt\"\n").await?;
    for needle in [
        "TensorrtExecutionProvider is unavailable",
        "libnvinfer.so.10",
        "libnvonnxparser.so.10",
        "which the loader cannot find",
        "TensorRT 10 for CUDA 13",
        "LD_LIBRARY_PATH",
    ] {
        ensure!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    ensure!(!err.contains("CPU-only build"), "the GPU build was taken for a CPU one: {err}");
    // Every library the message names really is missing, and every missing one is named.
    let trt = workspace_root().join(".kiln/ort-gpu/libonnxruntime_providers_tensorrt.so");
    for lib in probe::missing_libraries(&trt).map_err(anyhow::Error::msg)? {
        ensure!(err.contains(&lib), "{lib} is missing but not named: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ort_cuda_names_its_missing_libraries() -> anyhow::Result<()> {
    let cuda = workspace_root().join(".kiln/ort-gpu/libonnxruntime_providers_cuda.so");
    let missing = probe::missing_libraries(&cuda).map_err(anyhow::Error::msg)?;
    if missing.is_empty() {
        eprintln!("skipped: the CUDA provider's libraries all load on this machine");
        return Ok(());
    }
    let err = load_error("gpu-cuda", "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"ort-cuda\"\n").await?;
    ensure!(err.contains("CUDAExecutionProvider is unavailable"), "{err}");
    for lib in &missing {
        ensure!(err.contains(lib.as_str()), "{lib} missing from: {err}");
    }
    if missing.iter().any(|m| m == "libcuda.so.1") {
        ensure!(err.contains("NVIDIA driver"), "{err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_build_serves_on_its_cpu_provider_after_falling_back() -> anyhow::Result<()> {
    if !tensorrt_absent()? {
        return Ok(());
    }
    let dir = TempDir::new("gpu-fallback")?;
    let model_config =
        "name = \"add_sub\"\nmax_batch_size = 8\nbackend = \"tensorrt\"\nfallback = [\"ort-cuda\", \"cpu\"]\n";
    let repo = add_sub_repository(&dir, model_config)?;
    let server = TestServer::start(config(repo)?).await?;
    let client = reqwest::Client::new();
    check_add_sub_infer(&client, &server.url("/v2/models/add_sub/infer")).await?;
    let meta: Value = client.get(server.url("/v2/models/add_sub")).send().await?.json().await?;
    // Where CUDA and cuDNN are installed (but not TensorRT) the CUDA provider serves instead.
    let cuda = workspace_root().join(".kiln/ort-gpu/libonnxruntime_providers_cuda.so");
    let cuda_loads = probe::missing_libraries(&cuda).map_err(anyhow::Error::msg)?.is_empty();
    let want = if cuda_loads { "ort-cuda" } else { "cpu" };
    ensure!(meta["backend"]["serving"] == want && meta["backend"]["requested"] == "tensorrt", "{meta}");
    let version = probe::onnxruntime_version(&gpu_ort_library()?);
    ensure!(version.starts_with("1.31.1 (ORT Build Info"), "not the pinned GPU build: {version}");
    server.shutdown().await.context("shutdown")
}
