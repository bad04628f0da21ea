//! Connections: optional TLS (rustls, ALPN `h2` and `http/1.1`), HTTP/1.1 and HTTP/2 on
//! one port, a cap on open connections, and graceful-shutdown tracking.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::{AppState, Limits, ServerError, http};

/// A TLS handshake that has not finished by then is dropped (slow-client protection).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the TLS acceptor from PEM files; errors name the file, never echo key material.
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
    let bad = |path: &Path, reason: String| ServerError::Config { path: path.to_path_buf(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, format!("invalid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, format!("cannot read the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Other(format!("TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(cert, format!("certificate and key do not form a usable pair: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    // hyper's default 64 KiB-1 MiB windows throttle multi-megabyte tensor uploads.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(1024)
        // Pings find dead peers, so their connections do not hold a permit forever.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Serves one accepted connection on its own task; `permit` holds its place under the
/// connection cap until it closes.
pub(crate) fn spawn_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    state: Arc<AppState>,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    tokio::spawn(async move {
        let _permit = permit;
        match tls {
            None => {
                // hyper's header timeout only starts once HTTP/1 or HTTP/2 is chosen; a client
                // that never gets that far would otherwise hold its slot forever.
                if first_bytes_arrive(&stream, state.limits.header_read_timeout).await {
                    serve(stream, &builder, watcher, state).await;
                }
            }
            Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve(tls_stream, &builder, watcher, state).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            },
        }
    });
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// True once the client has sent enough to tell HTTP/1 from HTTP/2 (any byte that is
/// not the start of the HTTP/2 preface, or the whole preface) within `deadline`.
async fn first_bytes_arrive(stream: &TcpStream, deadline: Duration) -> bool {
    let wait = async {
        let mut buf = [0u8; 24];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] => return true,
                // A partial preface: peek would return at once again, so pause briefly.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(deadline, wait).await.unwrap_or(false)
}

async fn serve<I>(io: I, builder: &auto::Builder<TokioExecutor>, watcher: Watcher, state: Arc<AppState>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| http::handle(Arc::clone(&state), req));
    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
