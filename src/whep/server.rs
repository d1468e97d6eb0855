//! The WHEP listener (`[whep]`): bounded HTTP/1.1 on tokio, one request per connection, requests handed to the session registry.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use webrtc::peer_connection::RTCIceServer;

use super::{MAX_HEAD_BYTES, MAX_PATCH_BYTES, Policy, Request, Response, Route};
use crate::protocol::signal::{DeviceMessage, ErrorCode, IceCandidate, Rejection};
use crate::protocol::topics::SessionId;
use crate::signaling::{SignalingHandle, WhepAction, WhepCall};

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head, then its body, and to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the registry has to accept or refuse a request.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a new session has to produce its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Device messages a WHEP session may queue before its response is written (answer,
/// candidates, end of candidates, an error).
const OUT_QUEUE: usize = 64;

/// Everything the server needs, injected.
pub(crate) struct WhepParts {
    pub listen: SocketAddr,
    pub policy: Policy,
    pub signaling: SignalingHandle,
    /// STUN/TURN servers for the `Link` headers, at a given Unix time in milliseconds.
    pub ice_servers: Arc<dyn Fn(u64) -> Vec<RTCIceServer> + Send + Sync>,
    /// How long the answer waits for the device's candidates.
    pub gather_timeout: Duration,
    /// HTTPS: the server configuration (`whep.tls_cert_file`, `whep.tls_key_file`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The rustls server configuration for HTTPS from a PEM certificate chain and its key.
pub(crate) fn tls_server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate in the certificate file".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: not valid PEM: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| format!("TLS set-up refused: {e}"))
}

/// A bound WHEP listener.
pub(crate) struct WhepServer {
    listener: TcpListener,
    parts: Arc<WhepParts>,
}

impl WhepServer {
    pub async fn bind(parts: WhepParts) -> Result<Self> {
        let listener = TcpListener::bind(parts.listen)
            .await
            .with_context(|| format!("whep.listen = \"{}\": cannot listen", parts.listen))?;
        Ok(Self {
            listener,
            parts: Arc::new(parts),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel`; every connection task is joined before it returns.
    pub async fn run(self, cancel: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let connections = tokio_util::task::TaskTracker::new();
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "whep: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let parts = self.parts.clone();
            let cancel = cancel.clone();
            connections.spawn(async move {
                let _permit = permit;
                let serve = async {
                    match &parts.tls {
                        None => serve_connection(stream, &parts).await,
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                            match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => serve_connection(tls_stream, &parts).await,
                                Ok(Err(e)) => Err(e),
                                Err(_) => Err(io::ErrorKind::TimedOut.into()),
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = serve => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "whep: connection ended");
                        }
                    }
                }
            });
        }
        connections.close();
        connections.wait().await;
        tracing::debug!("WHEP server stopped");
    }
}

/// Why a request could not be read: answer with this response.
fn refuse(status: u16, why: &str) -> Response {
    Response::text(status, why)
}

/// Reads one request: the head within [`MAX_HEAD_BYTES`] and [`IO_TIMEOUT`], then a body of
/// exactly `Content-Length` bytes, at most `max_body`.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_body: usize,
    io_timeout: Duration,
) -> io::Result<Result<Request, Response>> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    // Whole-phase deadlines, not per read: a client sending a byte at a time cannot hold a
    // connection longer than these.
    let head_deadline = tokio::time::Instant::now() + io_timeout;
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(Err(refuse(431, "request head too large")));
        }
        let n = match tokio::time::timeout_at(head_deadline, stream.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Err(refuse(408, "request head not received in time"))),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD_BYTES {
        return Ok(Err(refuse(431, "request head too large")));
    }
    let mut request = match parse_head(&buf[..head_end]) {
        Ok(r) => r,
        Err(resp) => return Ok(Err(resp)),
    };
    if request.header("transfer-encoding").is_some() {
        return Ok(Err(refuse(
            411,
            "send the body with Content-Length (no chunked encoding)",
        )));
    }
    let length = match request.header("content-length") {
        None if matches!(request.method.as_str(), "POST" | "PATCH") => {
            return Ok(Err(refuse(411, "Content-Length required")));
        }
        None => 0,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => return Ok(Err(refuse(400, "bad Content-Length"))),
        },
    };
    if length > max_body {
        return Ok(Err(refuse(
            413,
            &format!("the body is larger than {max_body} bytes"),
        )));
    }
    let mut body = buf.split_off(head_end + 4);
    if body.len() > length {
        body.truncate(length);
    }
    let body_deadline = tokio::time::Instant::now() + io_timeout;
    while body.len() < length {
        let n = match tokio::time::timeout_at(body_deadline, stream.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Err(refuse(408, "request body not received in time"))),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = n.min(length - body.len());
        body.extend_from_slice(&chunk[..take]);
    }
    request.body = body;
    Ok(Ok(request))
}

/// Parses a request line and headers (names lower-cased).
pub(crate) fn parse_head(head: &[u8]) -> Result<Request, Response> {
    let text = std::str::from_utf8(head).map_err(|_| refuse(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, "bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(505, "HTTP/1.x only"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Err(refuse(400, "bad header line"));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(refuse(400, "bad header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        body: Vec::new(),
    })
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    parts: &WhepParts,
) -> io::Result<()> {
    let max_body = parts.policy.max_sdp_bytes.max(MAX_PATCH_BYTES);
    let (response, cors) = match read_request(&mut stream, max_body, IO_TIMEOUT).await? {
        Err(resp) => (resp, Vec::new()),
        Ok(req) => match super::cors(&req, &parts.policy) {
            Err(resp) => (resp, Vec::new()),
            Ok(cors) => (handle(&req, parts).await, cors),
        },
    };
    write_response(&mut stream, response, &cors).await
}

/// Carries out one request.
async fn handle(req: &Request, parts: &WhepParts) -> Response {
    match super::route(req, &parts.policy) {
        Route::Respond(r) => r,
        Route::Offer { sdp, bearer } => offer(parts, sdp, bearer).await,
        Route::Patch {
            id,
            bearer,
            candidates,
        } => {
            let had = bearer.is_some();
            match call(parts, id, bearer, WhepAction::Candidates(candidates)).await {
                Ok(()) => Response::new(204),
                Err(r) => super::rejection_response(&r, had),
            }
        }
        Route::Delete { id, bearer } => {
            let had = bearer.is_some();
            match call(parts, id, bearer, WhepAction::End).await {
                Ok(()) => Response::text(200, "session ended"),
                Err(r) => super::rejection_response(&r, had),
            }
        }
    }
}

/// Sends one call to the registry and waits (bounded) for its verdict.
async fn call(
    parts: &WhepParts,
    id: SessionId,
    bearer: Option<String>,
    action: WhepAction,
) -> Result<(), Rejection> {
    let (reply, verdict) = oneshot::channel();
    parts
        .signaling
        .whep(WhepCall {
            id,
            bearer,
            action,
            reply,
        })
        .map_err(|e| Rejection::new(ErrorCode::Busy, e.to_string()))?;
    match tokio::time::timeout(REGISTRY_TIMEOUT, verdict).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Rejection::new(
            ErrorCode::Busy,
            "the device is shutting down",
        )),
        Err(_) => Err(Rejection::new(
            ErrorCode::Busy,
            "the session registry did not answer in time",
        )),
    }
}

/// A fresh, unguessable session id: the session URL is what PATCH and DELETE address.
fn new_session_id() -> Option<SessionId> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    SessionId::parse(&format!("whep-{hex}"))
}

async fn offer(parts: &WhepParts, sdp: String, bearer: Option<String>) -> Response {
    let Some(id) = new_session_id() else {
        return Response::text(500, "no random session id");
    };
    let had = bearer.is_some();
    let (out, mut messages) = mpsc::channel(OUT_QUEUE);
    if let Err(r) = call(parts, id.clone(), bearer, WhepAction::Offer { sdp, out }).await {
        return super::rejection_response(&r, had);
    }
    // The session runs; collect its answer and candidates for the response.
    let mut answer: Option<String> = None;
    let mut candidates: Vec<IceCandidate> = Vec::new();
    let mut complete = false;
    let answer_deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    let mut deadline = answer_deadline;
    loop {
        let msg = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            m = messages.recv() => m,
        };
        match msg {
            Some(DeviceMessage::Answer { sdp, .. }) => {
                answer = Some(sdp);
                deadline = tokio::time::Instant::now() + parts.gather_timeout;
            }
            Some(DeviceMessage::Candidate {
                candidate: Some(c), ..
            }) => candidates.push(c),
            Some(DeviceMessage::Candidate {
                candidate: None, ..
            }) => {
                complete = true;
                if answer.is_some() {
                    break;
                }
            }
            Some(DeviceMessage::Error { code, reason, .. }) => {
                return super::rejection_response(&Rejection::new(code, reason), had);
            }
            Some(DeviceMessage::Bye { reason, .. }) => {
                return Response::text(503, &format!("the session ended: {reason:?}"));
            }
            // Only an MQTT viewer asks for these (§4.9); WHEP hands them out as Link headers.
            Some(DeviceMessage::IceServers { .. }) => {}
            None => break,
        }
    }
    let Some(answer) = answer else {
        // The session keeps running until its connect timeout; nobody will ever connect.
        let _ = call(parts, id, None, WhepAction::End).await;
        return Response::text(503, "no answer in time; retry later")
            .with("Retry-After", super::RETRY_AFTER_BUSY_S.to_string());
    };
    tracing::debug!(session = %id, candidates = candidates.len(), complete, "WHEP answer");
    let sdp = super::answer_with_candidates(&answer, &candidates, complete);
    let links = super::link_headers(&(parts.ice_servers)(crate::outbound::unix_ms()));
    super::created(&parts.policy, &id, sdp, &links)
}

async fn write_response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    response: Response,
    cors: &[(String, String)],
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        response.status,
        super::reason(response.status),
        response.body.len()
    );
    for (name, value) in response.headers.iter().chain(cors) {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&response.body).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    }
    // A refused oversized body may still be arriving.
    crate::web::lingering_close(stream).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_or_refuse() {
        let r = parse_head(b"POST /whep HTTP/1.1\r\nContent-Type: application/sdp\r\nX-A:  b ")
            .unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, "/whep");
        assert_eq!(r.header("content-type"), Some("application/sdp"));
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(parse_head(b"POST /whep HTTP/2").unwrap_err().status, 505);
        assert_eq!(parse_head(b"POST /whep").unwrap_err().status, 400);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nnocolon").unwrap_err().status,
            400
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nBad Name: x")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(parse_head(&[0xff]).unwrap_err().status, 400);
    }

    #[test]
    fn tls_config_needs_a_matching_certificate_and_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["cam.lan".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        assert!(tls_server_config(cert_pem.as_bytes(), key_pem.as_bytes()).is_ok());
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(tls_server_config(cert_pem.as_bytes(), other.as_bytes()).is_err());
        assert!(tls_server_config(b"", key_pem.as_bytes()).is_err());
        assert!(tls_server_config(cert_pem.as_bytes(), b"junk").is_err());
    }

    #[tokio::test]
    async fn a_slow_client_gets_408_within_the_head_deadline() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let trickle = tokio::spawn(async move {
            // A byte every 50 ms: each read is quick, the whole head never completes.
            for b in b"POST /whep HTTP/1.1\r\nX: y".iter().cycle().take(100) {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let timeout = Duration::from_millis(400);
        let start = tokio::time::Instant::now();
        let r = read_request(&mut server, 1024, timeout).await.unwrap();
        assert_eq!(r.unwrap_err().status, 408);
        assert!(start.elapsed() < timeout + Duration::from_millis(300));
        trickle.abort();
    }

    #[tokio::test]
    async fn requests_are_read_with_their_body_and_limits() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(b"PATCH /whep/w1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloEXTRA")
            .await
            .unwrap();
        let r = read_request(&mut server, 1024, IO_TIMEOUT)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.method.as_str(), r.body.as_slice()),
            ("PATCH", &b"hello"[..])
        );
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(b"POST /whep HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_request(&mut server, 1024, IO_TIMEOUT)
                .await
                .unwrap()
                .unwrap_err()
                .status,
            413
        );
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(b"POST /whep HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_request(&mut server, 1024, IO_TIMEOUT)
                .await
                .unwrap()
                .unwrap_err()
                .status,
            411
        );
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(b"POST /whep HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_request(&mut server, 1024, IO_TIMEOUT)
                .await
                .unwrap()
                .unwrap_err()
                .status,
            411
        );
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        client.write_all(big.as_bytes()).await.unwrap();
        assert_eq!(
            read_request(&mut server, 1024, IO_TIMEOUT)
                .await
                .unwrap()
                .unwrap_err()
                .status,
            431
        );
    }

    #[test]
    fn session_ids_are_valid_and_distinct() {
        let a = new_session_id().unwrap();
        let b = new_session_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 5 + 32);
    }
}
