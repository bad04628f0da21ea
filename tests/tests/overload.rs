//! Overload and deadlines over HTTP: a model with a tiny queue refuses with 429 and
//! `Retry-After` instead of queueing without bound; a queue deadline gives 504; and
//! every request that was admitted still gets its correct answer.

use std::time::Duration;

use anyhow::{Context, ensure};
use kiln_tests::{ScratchRepository, TestServer, photo};
use reqwest::multipart::{Form, Part};

fn form(image: &[u8]) -> Form {
    Form::new().part("file", Part::bytes(image.to_vec()).file_name("flower.jpg"))
}

async fn burst(server: &TestServer, query: &str, n: usize) -> anyhow::Result<Vec<(u16, Option<String>, String)>> {
    let image = photo("flower.jpg")?;
    let client = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let url = server.url(&format!("/predict{query}"));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, form) = (client.clone(), url.clone(), form(&image));
            tokio::spawn(async move {
                let resp = client.post(&url).multipart(form).send().await?;
                let status = resp.status().as_u16();
                let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
                anyhow::Ok((status, retry, resp.text().await?))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(Duration::from_secs(60), t).await.context("request hung")???);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_with_retry_after() -> anyhow::Result<()> {
    let repo = ScratchRepository::with_config("queue1", |c| {
        c.replace("max_batch_size = 8", "max_batch_size = 1").replace("[batching]", "[batching]\nmax_queue_size = 1")
    })?;
    let server = TestServer::start(repo.config()?).await?;
    let results = burst(&server, "", 24).await?;
    let mut refused = 0;
    for (status, retry, body) in &results {
        match status {
            200 => ensure!(body.contains("\"label\":\"daisy\""), "wrong answer: {body}"),
            429 => {
                refused += 1;
                ensure!(retry.as_deref() == Some("1"), "429 without Retry-After: {retry:?}");
                ensure!(body.contains("\"type\":\"overloaded\""), "body: {body}");
            }
            other => anyhow::bail!("unexpected status {other}: {body}"),
        }
    }
    // 24 requests at once against one executor and one queue slot cannot all be admitted.
    ensure!(refused > 0, "no request was refused: {results:?}");
    ensure!(refused < results.len(), "every request was refused");
    server.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_deadline_answers_504_and_is_never_late() -> anyhow::Result<()> {
    let repo = ScratchRepository::with_config("deadline", |c| c.replace("max_batch_size = 8", "max_batch_size = 1"))?;
    let server = TestServer::start(repo.config()?).await?;
    // A 1 ms queue deadline behind ~8 ms inferences: most requests cannot start in time.
    let results = burst(&server, "?timeout_ms=1", 16).await?;
    let mut expired = 0;
    for (status, _, body) in &results {
        match status {
            200 => ensure!(body.contains("\"label\":\"daisy\""), "wrong answer: {body}"),
            504 => {
                expired += 1;
                ensure!(body.contains("\"type\":\"timeout\""), "body: {body}");
            }
            other => anyhow::bail!("unexpected status {other}: {body}"),
        }
    }
    ensure!(expired > 0, "no request timed out: {results:?}");
    server.shutdown().await
}
