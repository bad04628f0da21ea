//! Connections for `kiln bench`: kiln's lean HTTP/1.1 client (`h1.rs`) or the `h2` crate over TCP,
//! optionally TLS, one connection per handshake so the tool controls every connection.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::LoadError;
use super::h1::{H1, MAX_BODY, Stream};
use super::payload::{Mismatch, Target, Template, check, wire};
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
    H1(Box<H1>),
    H2(h2::client::SendRequest<Bytes>),
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
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let stream = tokio::time::timeout(self.connect_timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| Failure::Connect)?
                    .map_err(|_| Failure::Connect)?;
                let want: &[u8] = if self.http2 { b"h2" } else { b"http/1.1" };
                if stream.get_ref().1.alpn_protocol().is_some_and(|p| p != want) {
                    return Err(Failure::Connect);
                }
                Stream::Tls(Box::new(stream))
            }
        };
        if !self.http2 {
            return Ok(Sender::H1(Box::new(H1::new(stream))));
        }
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(send))
    }
}

/// HTTP/2 receive windows: the 64 KiB defaults would throttle tensor-sized answers.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

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
        match sender {
            Sender::H1(conn) => {
                let (status, body) = conn.exchange(&template.wire_h1).await?;
                judge(status, body, template, check_body)
            }
            Sender::H2(send) => {
                std::future::poll_fn(|cx| send.poll_ready(cx)).await.map_err(|_| Failure::Closed)?;
                let end = template.body.is_empty();
                let (response, mut stream) =
                    send.send_request(template.request_h2(), end).map_err(|_| Failure::Closed)?;
                if !end {
                    stream.send_data(template.body.clone(), true).map_err(|_| Failure::Io)?;
                }
                let response = response.await.map_err(|_| Failure::Io)?;
                let status = response.status().as_u16();
                let mut body = response.into_body();
                // Only a checked answer is kept; otherwise the data is just acknowledged.
                let mut kept = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.map_err(|_| Failure::Io)?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if check_body {
                        if kept.len() + chunk.len() > MAX_BODY {
                            return Err(Failure::BadBody);
                        }
                        kept.extend_from_slice(&chunk);
                    }
                }
                judge(status, &kept, template, check_body)
            }
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| Failure::Timeout)?
}

fn judge(status: u16, body: &[u8], template: &Template, check_body: bool) -> Result<Answer, Failure> {
    if !(200..300).contains(&status) {
        return Err(Failure::Status(status));
    }
    if check_body {
        check(&template.expect, body).map_err(|m| match m {
            Mismatch::BadBody => Failure::BadBody,
            Mismatch::WrongAnswer => Failure::WrongAnswer,
        })?;
    }
    Ok(Answer { items: template.items })
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
    let Sender::H1(mut conn) = sender else { return Err(LoadError::Fetch(what())) };
    let request = wire(&http::Method::GET, path, &target.authority, headers, &[]);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        conn.exchange(&request).await.map(|(status, body)| (status, Bytes::copy_from_slice(body)))
    })
    .await;
    match answer {
        Ok(Ok((status, body))) if (200..300).contains(&status) => Ok(body),
        Ok(Ok((status, body))) => Err(LoadError::Fetch(format!(
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
