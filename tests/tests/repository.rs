//! Model repository management over HTTP: versions and their policy, load and unload
//! behind the admin token, reloads under traffic without a failed request, and a
//! failed load that leaves the previous versions serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, ensure};
use kiln_server::ServerConfig;
use kiln_tests::{TestServer, ort_library, test_model_repository};
use serde_json::{Value, json};

/// A repository holding `add_sub` as versions 1 and 2 (same graph), with `config`.
struct TwoVersions {
    root: PathBuf,
}

impl TwoVersions {
    fn new(tag: &str, config: &str) -> anyhow::Result<Self> {
        let source = std::fs::canonicalize(test_model_repository()?.join("add_sub/1"))?;
        let root = std::env::temp_dir().join(format!("kiln-repo-{}-{tag}", std::process::id()));
        let dir = root.join("add_sub");
        std::fs::create_dir_all(&dir)?;
        for v in ["1", "2"] {
            if std::fs::symlink_metadata(dir.join(v)).is_err() {
                std::os::unix::fs::symlink(&source, dir.join(v))?;
            }
        }
        std::fs::write(dir.join("config.toml"), config)?;
        Ok(Self { root })
    }

    fn write_config(&self, config: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.root.join("add_sub/config.toml"), config)?)
    }

    fn server_config(&self, admin: Option<&str>) -> anyhow::Result<ServerConfig> {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let mut config = ServerConfig::new(addr, &self.root, ort_library()?);
        config.auth.admin_token = admin.map(str::to_string);
        Ok(config)
    }
}

impl Drop for TwoVersions {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const BOTH: &str = "name = \"add_sub\"\nmax_batch_size = 8\n[version_policy]\nlatest = 2\n";
const LATEST: &str = "name = \"add_sub\"\nmax_batch_size = 8\n";

fn request() -> Value {
    json!({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": vec![3.0f32; 16]},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": vec![1.0f32; 16]},
    ]})
}

async fn infer(client: &reqwest::Client, server: &TestServer, path: &str) -> anyhow::Result<u16> {
    let resp = client.post(server.url(path)).json(&request()).send().await?;
    let status = resp.status().as_u16();
    if status == 200 {
        let v: Value = resp.json().await?;
        ensure!(v["outputs"][0]["data"][0] == 4.0, "wrong answer: {v}");
    }
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_policy_serves_each_version() -> anyhow::Result<()> {
    let repo = TwoVersions::new("versions", BOTH)?;
    let server = TestServer::start(repo.server_config(None)?).await?;
    let client = reqwest::Client::new();
    let meta: Value = client.get(server.url("/v2/models/add_sub")).send().await?.json().await?;
    ensure!(meta["versions"] == json!(["2", "1"]), "{meta}");
    for path in
        ["/v2/models/add_sub/infer", "/v2/models/add_sub/versions/1/infer", "/v2/models/add_sub/versions/2/infer"]
    {
        ensure!(infer(&client, &server, path).await? == 200, "{path}");
    }
    ensure!(infer(&client, &server, "/v2/models/add_sub/versions/3/infer").await? == 404);
    let index: Value = client.post(server.url("/v2/repository/index")).send().await?.json().await?;
    ensure!(index.as_array().map(Vec::len) == Some(2), "{index}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn management_is_off_without_an_admin_token() -> anyhow::Result<()> {
    let repo = TwoVersions::new("off", LATEST)?;
    let server = TestServer::start(repo.server_config(None)?).await?;
    let resp = reqwest::Client::new().post(server.url("/v2/repository/models/add_sub/unload")).send().await?;
    ensure!(resp.status() == 403, "status {}", resp.status());
    let body: Value = resp.json().await?;
    ensure!(body["type"] == "forbidden", "{body}");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_unload_and_reload_under_traffic() -> anyhow::Result<()> {
    let repo = TwoVersions::new("manage", LATEST)?;
    let server = Arc::new(TestServer::start(repo.server_config(Some("adm1n"))?).await?);
    let client = reqwest::Client::new();
    let admin = |action: &str, name: &str| {
        client.post(server.url(&format!("/v2/repository/models/{name}/{action}"))).bearer_auth("adm1n").send()
    };

    let wrong = client.post(server.url("/v2/repository/models/add_sub/unload")).bearer_auth("nope").send().await?;
    ensure!(wrong.status() == 401, "wrong admin token: {}", wrong.status());
    for name in ["..%2F..%2Fetc", "..", "no_such_model"] {
        let r = admin("load", name).await?;
        // ".." is normalised away by the client, leaving a path with no such route (405).
        ensure!([400, 404, 405].contains(&r.status().as_u16()), "{name}: {}", r.status());
    }

    // Reloads while traffic flows: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (server, stop, ok, failed, client) =
            (Arc::clone(&server), Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed), client.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match infer(&client, &server, "/v2/models/add_sub/infer").await {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for config in [BOTH, LATEST, BOTH] {
        repo.write_config(config)?;
        let r = admin("load", "add_sub").await?;
        ensure!(r.status() == 200, "reload: {}", r.status());
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    ensure!(failed.load(Ordering::Relaxed) == 0, "{} requests failed during reloads", failed.load(Ordering::Relaxed));
    ensure!(ok.load(Ordering::Relaxed) > 0, "no traffic flowed");
    let meta: Value = client.get(server.url("/v2/models/add_sub")).send().await?.json().await?;
    ensure!(meta["versions"] == json!(["2", "1"]), "after reloads: {meta}");

    // A broken config fails the load and the old versions keep serving.
    repo.write_config("name = \"add_sub\"\nmax_batch_size = 0\n")?;
    let r = admin("load", "add_sub").await?;
    ensure!(r.status() == 400, "broken load: {}", r.status());
    let body: Value = r.json().await?;
    ensure!(body["type"] == "load_failed", "{body}");
    ensure!(!body["error"].as_str().unwrap_or_default().contains('/'), "path leaked: {body}");
    ensure!(infer(&client, &server, "/v2/models/add_sub/versions/1/infer").await? == 200, "old version gone");

    // Unload, then load again.
    repo.write_config(LATEST)?;
    ensure!(admin("unload", "add_sub").await?.status() == 200);
    ensure!(infer(&client, &server, "/v2/models/add_sub/infer").await? == 404, "still serving after unload");
    ensure!(admin("unload", "add_sub").await?.status() == 404, "double unload");
    ensure!(admin("load", "add_sub").await?.status() == 200);
    ensure!(infer(&client, &server, "/v2/models/add_sub/infer").await? == 200, "not serving after load");
    let server = Arc::try_unwrap(server).map_err(|_| anyhow::anyhow!("server still shared"))?;
    server.shutdown().await.context("shutdown")
}
