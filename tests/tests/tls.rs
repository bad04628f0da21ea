//! HTTPS: one port serves HTTP/1.1 and HTTP/2 chosen by ALPN, checked with curl (a
//! client independent of kiln's own stack) against a certificate made for the test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use kiln_server::{Server, TlsFiles};
use kiln_tests::{TestServer, default_config, workspace_root};

struct Certs {
    dir: PathBuf,
    files: TlsFiles,
    ca: PathBuf,
}

impl Certs {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("kiln-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem())?;
        std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
        Ok(Self { files: TlsFiles { cert: cert_path.clone(), key: key_path }, ca: cert_path, dir })
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs curl against `https://localhost:PORT{path}` and returns (status line data, body).
async fn curl(server: &TestServer, certs: &Certs, version: &str, extra: &[&str], path: &str) -> anyhow::Result<String> {
    let port = server.addr.port();
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", version, "--cacert"])
        .arg(&certs.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(extra)
        .arg(format!("https://localhost:{port}{path}"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output()).await.context("curl hung")??;
    ensure!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_serves_http1_and_http2_by_alpn() -> anyhow::Result<()> {
    let certs = Certs::new("alpn")?;
    let mut config = default_config()?;
    config.tls = Some(certs.files.clone());
    let server = TestServer::start(config).await?;

    let h1 = curl(&server, &certs, "--http1.1", &[], "/health").await?;
    ensure!(h1.ends_with("1.1 200") && h1.contains("\"status\":\"ok\""), "{h1}");
    let h2 = curl(&server, &certs, "--http2", &[], "/v2/health/ready").await?;
    ensure!(h2.ends_with("2 200"), "HTTP/2 was not negotiated: {h2}");

    let photo = workspace_root().join(".kiln/assets/flower.jpg");
    let form = format!("file=@{}", photo.display());
    let predicted = curl(&server, &certs, "--http2", &["-F", &form], "/predict").await?;
    ensure!(predicted.ends_with("2 200") && predicted.contains("\"label\":\"daisy\""), "{predicted}");

    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::new().get(format!("http://{}/health", server.addr)).send().await;
    ensure!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200), "plain HTTP answered on the TLS port");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_tls_files_fail_at_start_naming_the_file() -> anyhow::Result<()> {
    let certs = Certs::new("bad")?;
    std::fs::write(&certs.files.key, "not a key")?;
    let mut config = default_config()?;
    config.tls = Some(certs.files.clone());
    let err = Server::bind(config).await.err().context("a bad key was accepted")?;
    ensure!(err.to_string().contains("key.pem"), "error does not name the key file: {err}");
    Ok(())
}
