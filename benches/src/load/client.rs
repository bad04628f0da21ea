//! Connections for `kiln bench`: hyper's low-level HTTP/1.1 and HTTP/2 client over TCP,
//! optionally TLS, one connection per handshake so the tool controls every connection.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::LoadError;
use super::payload::{Mismatch, Target, Template, check};
use super::stats::Failure;

/// TLS settings for https targets.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Trust these PEM certificates instead of the system's roots.
    pub cacert: Option<std::path::PathBuf>,
    /// Accept any certificate (self-signed test servers). Never for real measurements
    /// across networks you do not control.
    pub insecure: bool,
}

/// Opens connections to one target.
#[derive(Clone)]
pub(crate) struct Connector {
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    pub http2: bool,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("addr", &self.addr).field("tls", &self.tls.is_some()).finish()
    }
}

/// A ready connection's request handle.
#[derive(Debug)]
pub(crate) enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Another handle on the same connection: HTTP/2 multiplexes streams, HTTP/1.1 cannot.
    pub(crate) fn stream(&self) -> Option<Sender> {
        match self {
            Self::H1(_) => None,
            Self::H2(send) => Some(Self::H2(send.clone())),
        }
    }
}

impl Connector {
    pub(crate) fn new(
        target: &Target,
        http2: bool,
        tls: &TlsOptions,
        connect_timeout: Duration,
    ) -> Result<Self, LoadError> {
        let addr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|e| LoadError::InvalidArgument(format!("cannot resolve {}: {e}", target.host)))?
            .next()
            .ok_or_else(|| LoadError::InvalidArgument(format!("{} resolves to no address", target.host)))?;
        let tls = if target.is_tls() {
            let config = client_config(tls, http2)?;
            let name = ServerName::try_from(target.host.clone())
                .map_err(|_| LoadError::InvalidArgument(format!("'{}' is not a valid TLS server name", target.host)))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self { addr, tls, http2, connect_timeout })
    }

    pub(crate) async fn connect(&self) -> Result<Sender, Failure> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| Failure::Connect)?
            .map_err(|_| Failure::Connect)?;
        // Requests are small and latency is the point: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let stream = tokio::time::timeout(self.connect_timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| Failure::Connect)?
                    .map_err(|_| Failure::Connect)?;
                let want: &[u8] = if self.http2 { b"h2" } else { b"http/1.1" };
                if stream.get_ref().1.alpn_protocol().is_some_and(|p| p != want) {
                    return Err(Failure::Connect);
                }
                self.handshake(TokioIo::new(stream)).await
            }
        }
    }

    async fn handshake<T>(&self, io: TokioIo<T>) -> Result<Sender, Failure>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if self.http2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.map_err(|_| Failure::Connect)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(send))
        } else {
            let (send, conn) = http1::handshake(io).await.map_err(|_| Failure::Connect)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(send))
        }
    }
}

/// What one exchange yielded when it succeeded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    pub items: u64,
}

/// Sends one request and reads the whole answer, within `timeout`. A failure tells the
/// caller whether the connection is still usable.
pub(crate) async fn exchange(
    sender: &mut Sender,
    template: &Template,
    timeout: Duration,
    check_body: bool,
) -> Result<Answer, Failure> {
    let work = async {
        let response = match sender {
            Sender::H1(send) => {
                send.ready().await.map_err(|_| Failure::Closed)?;
                send.send_request(template.request(false)).await.map_err(|_| Failure::Io)?
            }
            Sender::H2(send) => {
                send.ready().await.map_err(|_| Failure::Closed)?;
                send.send_request(template.request(true)).await.map_err(|_| Failure::Io)?
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|_| Failure::Io)?.to_bytes();
        if !status.is_success() {
            return Err(Failure::Status(status.as_u16()));
        }
        if check_body {
            check(&template.expect, &body).map_err(|m| match m {
                Mismatch::BadBody => Failure::BadBody,
                Mismatch::WrongAnswer => Failure::WrongAnswer,
            })?;
        }
        Ok(Answer { items: template.items })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| Failure::Timeout)?
}

/// One plain `GET` on a fresh connection (metadata and `/metrics`), outside the measurement;
/// `connector` must be an HTTP/1.1 one.
pub(crate) async fn fetch(
    connector: &Connector,
    target: &Target,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<Bytes, LoadError> {
    let what = || format!("GET {}", target.url(path));
    let sender = connector.connect().await.map_err(|_| LoadError::Fetch(format!("{}: could not connect", what())))?;
    let Sender::H1(mut send) = sender else { return Err(LoadError::Fetch(what())) };
    let mut req = http::Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = path.parse().map_err(|_| LoadError::Fetch(format!("{}: bad path", what())))?;
    *req.headers_mut() = headers.clone();
    if let Ok(host) = http::HeaderValue::from_str(&target.authority) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let work = async {
        send.ready().await.ok()?;
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(Some((status, body))) if status.is_success() => Ok(body),
        Ok(Some((status, body))) => Err(LoadError::Fetch(format!(
            "{}: HTTP {status}: {}",
            what(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
        _ => Err(LoadError::Fetch(format!("{}: no answer", what()))),
    }
}

fn client_config(opts: &TlsOptions, http2: bool) -> Result<ClientConfig, LoadError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LoadError::Tls(e.to_string()))?;
    let mut config = if opts.insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
    } else {
        builder.with_root_certificates(roots(opts.cacert.as_deref())?).with_no_client_auth()
    };
    config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    Ok(config)
}

fn roots(cacert: Option<&Path>) -> Result<RootCertStore, LoadError> {
    let mut store = RootCertStore::empty();
    match cacert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| LoadError::Tls(format!("cannot read {}: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| LoadError::Tls(format!("bad certificate in {}: {e}", path.display())))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(LoadError::Tls(format!("no usable certificate in {}", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    Ok(store)
}

/// `--insecure`: any server certificate is accepted; signatures are still checked so the
/// handshake is a real one.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
