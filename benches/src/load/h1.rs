//! A lean HTTP/1.1 client connection: the request is serialised once per template, sent
//! with one write, and the answer parsed in place with `httparse` into a reused buffer.
//! A load generator spends most of its user time in the client stack, and a general
//! client (task per connection, channels, header maps per request) costs it several
//! times what the bytes do.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::stats::Failure;

/// Plain TCP or TLS.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// One HTTP/1.1 connection, one request at a time.
#[derive(Debug)]
pub(crate) struct H1 {
    stream: Stream,
    buf: Vec<u8>,
    body: Vec<u8>,
    closed: bool,
}

/// Most headers an answer may carry.
const MAX_HEADERS: usize = 64;
/// Largest answer head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest answer body kept: a bigger (or endless) one counts as a bad body, so a
/// misbehaving server cannot make the client grow without bound.
pub(crate) const MAX_BODY: usize = 256 << 20;

impl H1 {
    pub(crate) fn new(stream: Stream) -> Self {
        Self { stream, buf: Vec::with_capacity(16 << 10), body: Vec::new(), closed: false }
    }

    /// Sends `wire` (a complete serialised request) and reads the answer: its status and
    /// body. `Closed` means the server had ended the connection before the request could
    /// be answered at all (nothing of an answer arrived).
    pub(crate) async fn exchange(&mut self, wire: &[u8]) -> Result<(u16, &[u8]), Failure> {
        if self.closed {
            return Err(Failure::Closed);
        }
        self.buf.clear();
        if self.stream.write_all(wire).await.is_err() {
            self.closed = true;
            return Err(Failure::Closed);
        }
        // Head: status, framing, keep-alive.
        let (status, head_len, framing, close) = loop {
            if let Some(head) = parse_head(&self.buf)? {
                if (100..200).contains(&head.0) {
                    // An interim answer (100 Continue): drop it and read on.
                    self.buf.drain(..head.1);
                    continue;
                }
                break head;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(self.fail(Failure::BadBody));
            }
            if self.fill().await? == 0 {
                let nothing = self.buf.is_empty();
                self.closed = true;
                return Err(if nothing { Failure::Closed } else { Failure::Io });
            }
        };
        let bodyless = status == 204 || status == 304;
        let range = match framing {
            _ if bodyless => head_len..head_len,
            Framing::Length(n) if n > MAX_BODY => return Err(self.fail(Failure::BadBody)),
            Framing::Length(n) => {
                while self.buf.len() < head_len + n {
                    if self.fill().await? == 0 {
                        return Err(self.fail(Failure::Io));
                    }
                }
                head_len..head_len + n
            }
            Framing::UntilClose => {
                while self.fill().await? > 0 {}
                self.closed = true;
                head_len..self.buf.len()
            }
            Framing::Chunked => loop {
                match decode_chunked(&self.buf[head_len..], &mut self.body) {
                    Ok(Some(_)) => break 0..0,
                    Ok(None) => {
                        if self.fill().await? == 0 {
                            return Err(self.fail(Failure::Io));
                        }
                    }
                    Err(()) => return Err(self.fail(Failure::BadBody)),
                }
            },
        };
        if close {
            self.closed = true;
        }
        if framing == Framing::Chunked && !bodyless { Ok((status, &self.body)) } else { Ok((status, &self.buf[range])) }
    }

    fn fail(&mut self, f: Failure) -> Failure {
        self.closed = true;
        f
    }

    async fn fill(&mut self) -> Result<usize, Failure> {
        if self.buf.len() > MAX_HEAD + MAX_BODY {
            return Err(self.fail(Failure::BadBody));
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 << 10);
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(n) => Ok(n),
            Err(_) => Err(self.fail(Failure::Io)),
        }
    }
}

/// `Some((status, head length, framing, connection-close))` once the whole head is in `buf`.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, Framing, bool)>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failure::BadBody),
    };
    let status = resp.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or(Failure::BadBody)?;
            if framing != Framing::Chunked {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if h.value.split(|b| *b == b',').any(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked")) {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            if h.value.split(|b| *b == b',').any(|v| v.trim_ascii().eq_ignore_ascii_case(b"close")) {
                close = true;
            } else if h.value.trim_ascii().eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    Ok(Some((status, head_len, framing, close)))
}

/// Decodes a chunked body from its start; `Ok(None)` until the final chunk and the
/// trailers' end are in `data`. Restarts from scratch on each call: chunked answers are
/// rare in inference APIs, and simplicity beats a resumable state machine here.
fn decode_chunked(data: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ()> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(eol) = find_crlf(&data[pos..]) else { return Ok(None) };
        let line = &data[pos..pos + eol];
        let size_text = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
        let size = std::str::from_utf8(size_text).ok().and_then(|s| usize::from_str_radix(s, 16).ok()).ok_or(())?;
        pos += eol + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let Some(eol) = find_crlf(&data[pos..]) else { return Ok(None) };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if size > MAX_BODY {
            return Err(());
        }
        if data.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[pos..pos + size]);
        if &data[pos + size..pos + size + 2] != b"\r\n" {
            return Err(());
        }
        pos += size + 2;
    }
}

fn find_crlf(data: &[u8]) -> Option<usize> {
    data.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_status_framing_and_keep_alive() -> Result<(), Failure> {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
        assert_eq!(h, Some((200, 38, Framing::Length(2), false)));
        let h = parse_head(b"HTTP/1.1 503 X\r\ntransfer-encoding: gzip, chunked\r\nConnection: close\r\n\r\n")?;
        assert_eq!(h.map(|h| (h.0, h.2, h.3)), Some((503, Framing::Chunked, true)));
        assert_eq!(parse_head(b"HTTP/1.0 200 OK\r\n\r\n")?.map(|h| (h.2, h.3)), Some((Framing::UntilClose, true)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")?, None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        Ok(())
    }

    #[test]
    fn chunked_bodies_decode_only_when_complete() {
        let mut out = Vec::new();
        let full = b"4;ext=1\r\nkiln\r\n6\r\n bench\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(decode_chunked(full, &mut out), Ok(Some(full.len())));
        assert_eq!(out, b"kiln bench");
        for cut in 0..full.len() {
            assert_eq!(decode_chunked(&full[..cut], &mut out), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode_chunked(b"zz\r\n", &mut out), Err(()));
        assert_eq!(decode_chunked(b"2\r\nabcd\r\n", &mut out), Err(()));
        assert_eq!(decode_chunked(b"ffffffffffffffff\r\n", &mut out), Err(()));
    }
}
