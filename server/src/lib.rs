//! kiln's prediction server: the model repository, HTTP/1.1 and HTTP/2 (h2c) on one
//! port, and the glue from requests to the batcher.

mod classify;
mod config;
mod error;
mod http;
mod kserve;
mod listen;
mod metrics;
mod model;
mod preprocess;
mod repository;
mod v2;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use classify::Prediction;
pub use config::{BackendKind, InputConfig, ModelConfig};
pub use error::{ApiError, ErrorKind};
pub use model::Model;
pub use preprocess::Preprocess;

/// Failures at start-up or while serving. Start-up errors name the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("model repository {}: {reason}", path.display())]
    Repository { path: PathBuf, reason: String },
    #[error("model {name} failed to start: {reason}")]
    ModelStart { name: String, reason: String },
    #[error(transparent)]
    Engine(#[from] kiln_engine::EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

/// Request-size limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_files: usize,
    /// Largest tensor (in elements) a KServe request may declare.
    pub max_tensor_elements: usize,
    /// Time a client has to send its request headers (slow-client protection).
    pub header_read_timeout: Duration,
    /// Open connections at most; more are closed on accept.
    pub max_connections: usize,
    /// Time a client has to send a whole request body once its headers arrived.
    pub body_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 << 20,
            max_batch_files: 64,
            max_tensor_elements: 16 << 20,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Bearer tokens; `None` leaves that class of endpoints open.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// Required by every endpoint except health and metrics.
    pub inference_token: Option<String>,
    /// Required by model-management endpoints, which are disabled without it.
    pub admin_token: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    // Never print the tokens themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("inference_token", &self.inference_token.as_ref().map(|_| "<set>"))
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub model_repository: PathBuf,
    pub default_model: Option<String>,
    pub ort_library: PathBuf,
    pub limits: Limits,
    pub auth: AuthConfig,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this PEM certificate chain and key.
    pub tls: Option<TlsFiles>,
    /// How long shutdown waits for open connections before closing them.
    pub drain_timeout: Duration,
    /// Serve every model with this backend, whatever its config says (`kiln serve --backend`);
    /// each model's `fallback` list still applies.
    pub backend: Option<config::BackendKind>,
}

impl ServerConfig {
    pub fn new(addr: SocketAddr, model_repository: impl Into<PathBuf>, ort_library: impl Into<PathBuf>) -> Self {
        Self {
            addr,
            model_repository: model_repository.into(),
            default_model: None,
            ort_library: ort_library.into(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            tls: None,
            drain_timeout: Duration::from_secs(30),
            backend: None,
        }
    }
}

#[derive(Debug)]
pub(crate) struct AppState {
    repository: Arc<repository::Repository>,
    default_model: Option<String>,
    limits: Limits,
    auth: AuthConfig,
    metrics: Arc<metrics::Metrics>,
}

/// A bound, loaded server: models are ready and the socket accepts connections once
/// [`Server::serve`] runs.
pub struct Server {
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("listener", &self.listener).field("tls", &self.tls.is_some()).finish()
    }
}

impl Server {
    /// Loads every model of the repository, then binds the socket (port 0 picks a free one).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        // TLS files are checked before any model loads, so a typo fails fast.
        let tls = config.tls.as_ref().map(|t| listen::tls_acceptor(&t.cert, &t.key)).transpose()?;
        let repo = config.model_repository.clone();
        let ort = config.ort_library.clone();
        let backend = config.backend;
        let metrics = metrics::Metrics::new();
        let for_models = Arc::clone(&metrics);
        let repository = tokio::task::spawn_blocking(move || {
            repository::Repository::open(&repo, &ort, backend, for_models).map(Arc::new)
        })
        .await
        .map_err(|e| ServerError::Other(e.to_string()))??;
        let names = repository.snapshot();
        let default_model = match config.default_model {
            Some(name) if names.contains_key(&name) => Some(name),
            Some(name) => {
                return Err(ServerError::Repository {
                    path: config.model_repository,
                    reason: format!("default model {name:?} is not in the repository"),
                });
            }
            None if names.len() == 1 => names.keys().next().cloned(),
            None => None,
        };
        let listener =
            TcpListener::bind(config.addr).await.map_err(|source| ServerError::Bind { addr: config.addr, source })?;
        let state = Arc::new(AppState { repository, default_model, limits: config.limits, auth: config.auth, metrics });
        Ok(Self { listener, state, tls, drain_timeout: config.drain_timeout })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener.local_addr().map_err(|e| ServerError::Other(e.to_string()))
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open connections
    /// finish (up to the drain timeout) and drains every model's queue.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let builder = listen::http_builder(&self.state.limits);
        let connections = Arc::new(tokio::sync::Semaphore::new(self.state.limits.max_connections));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Usually fd exhaustion: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    // Over the cap, close at once rather than queue sockets without bound.
                    let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                        tracing::warn!("connection limit reached; refusing a connection");
                        continue;
                    };
                    listen::spawn_connection(
                        stream,
                        self.tls.clone(),
                        builder.clone(),
                        graceful.watcher(),
                        Arc::clone(&self.state),
                        permit,
                    );
                }
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        tracing::info!("shutting down: draining connections");
        if tokio::time::timeout(self.drain_timeout, graceful.shutdown()).await.is_err() {
            tracing::warn!("drain timeout reached; closing remaining connections");
        }
        let state = self.state;
        tokio::task::spawn_blocking(move || {
            state.repository.shutdown();
        })
        .await
        .map_err(|e| ServerError::Other(e.to_string()))
    }
}
