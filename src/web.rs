//! Static file server for the browser viewer (`[web]`): GET/HEAD only, files under one root, nothing else.
//!
//! Signaling stays on MQTT; this only hands the built page (web/dist) to a browser. It is a
//! deliberately small HTTP/1.1 server on tokio (one request per connection, `Connection:
//! close`): no new dependency, and nothing here parses more than a request line and headers
//! of at most [`MAX_HEAD_BYTES`].

use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::WebConfig;

/// Largest request line + headers accepted.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Largest file served (the viewer bundle is a few hundred KiB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// Time allowed for a client to send its request head, and to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The viewer's directory as served: it exists and has an index.html (also `check-config`'s
/// check, src/preflight.rs). Returns the canonical path.
pub(crate) fn check_root(root: &Path) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(root).with_context(|| {
        format!(
            "{:?}: not found (build the viewer: cd web && npm ci && npm run build)",
            root.display().to_string()
        )
    })?;
    if !canonical.join("index.html").is_file() {
        bail!(
            "{:?} has no index.html (build the viewer: cd web && npm ci && npm run build)",
            root.display().to_string()
        );
    }
    Ok(canonical)
}

/// A bound, ready-to-run web server.
pub struct WebServer {
    listener: TcpListener,
    root: PathBuf,
}

impl WebServer {
    /// Checks `web.root` and binds `web.listen`; errors name the key.
    pub async fn bind(config: &WebConfig) -> Result<Self> {
        let root = check_root(&config.root).map_err(|e| anyhow::anyhow!("web.root = {e:#}"))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("web.listen = \"{}\": cannot listen", config.listen))?;
        Ok(Self { listener, root })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires; open connections are dropped then.
    pub async fn run(self, cancel: CancellationToken) {
        let root = Arc::new(self.root);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        // Every connection task is joined before `run` returns.
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
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "web: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let root = root.clone();
            let cancel = cancel.clone();
            connections.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = tokio::time::timeout(IO_TIMEOUT * 3, serve_connection(stream, &root)) => {
                        if let Ok(Err(e)) = r {
                            tracing::debug!(%peer, error = %e, "web: connection ended");
                        }
                    }
                }
            });
        }
        connections.close();
        connections.wait().await;
        tracing::debug!("web server stopped");
    }
}

/// What a request asks for, after parsing.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// GET (`head == false`) or HEAD of a path relative to the root.
    File { rel: PathBuf, head: bool },
    /// Answer with this status and a short text body.
    Refuse(u16),
}

/// Parses a request head (request line and headers, without the final blank line).
pub fn parse_request(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Refuse(400);
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Refuse(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Refuse(505);
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::Refuse(405),
    };
    match resolve_target(target) {
        Some(rel) => Request::File { rel, head },
        None => Request::Refuse(400),
    }
}

/// Maps a request target to a safe path relative to the root: no `..`, no absolute parts,
/// no NUL or backslash, percent-escapes decoded. A trailing `/` means its `index.html`.
pub fn resolve_target(target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(path)?;
    if decoded.contains(['\0', '\\']) {
        return None;
    }
    let mut rel = PathBuf::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return None,
            s => rel.push(s),
        }
    }
    // Every component must be a plain name (no prefix/root sneaking in).
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    if decoded.ends_with('/') || rel.as_os_str().is_empty() {
        rel.push("index.html");
    }
    Some(rel)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The Content-Type for a file name.
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Reads the head (up to the blank line); `None` if the client sent too much or closed.
async fn read_head(stream: &mut TcpStream) -> io::Result<Result<Vec<u8>, u16>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if end > MAX_HEAD_BYTES {
                return Ok(Err(431));
            }
            buf.truncate(end);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(Err(431));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_connection(mut stream: TcpStream, root: &Path) -> io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    };
    let (status, ctype, body, head_only) = match head.map(|h| parse_request(&h)) {
        Err(status) | Ok(Request::Refuse(status)) => {
            (status, "text/plain; charset=utf-8", None, false)
        }
        Ok(Request::File { rel, head }) => match load(root, &rel).await {
            Ok(bytes) => (200, content_type(&rel), Some(bytes), head),
            Err(status) => (status, "text/plain; charset=utf-8", None, head),
        },
    };
    let body = body.unwrap_or_else(|| format!("{status} {}\n", reason(status)).into_bytes());
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
         Referrer-Policy: no-referrer\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 405 {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        if !head_only {
            stream.write_all(&body).await?;
        }
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    }
    lingering_close(&mut stream).await;
    Ok(())
}

/// Lingering close: reads (up to 64 KiB, for up to 1 s) what the client may still be sending,
/// e.g. an oversized head or a refused body, so that closing does not reset the connection
/// before it has read the response. Shared with the WHEP listener.
pub(crate) async fn lingering_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads `root/rel` if it is a regular file inside the root (symlinks out of it are refused).
/// Runs the file system calls on the blocking pool (tokio's `fs` feature is not enabled).
async fn load(root: &Path, rel: &Path) -> Result<Vec<u8>, u16> {
    let (root, rel) = (root.to_path_buf(), rel.to_path_buf());
    tokio::task::spawn_blocking(move || load_blocking(&root, &rel))
        .await
        .unwrap_or(Err(500))
}

fn load_blocking(root: &Path, rel: &Path) -> Result<Vec<u8>, u16> {
    let mut path = root.join(rel);
    let mut meta = std::fs::metadata(&path).map_err(|_| 404u16)?;
    if meta.is_dir() {
        path.push("index.html");
        meta = std::fs::metadata(&path).map_err(|_| 404u16)?;
    }
    let real = std::fs::canonicalize(&path).map_err(|_| 404u16)?;
    if !real.starts_with(root) || !meta.is_file() {
        return Err(404);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(413);
    }
    std::fs::read(&real).map_err(|_| 500u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(rel: &str) -> Request {
        Request::File {
            rel: PathBuf::from(rel),
            head: false,
        }
    }

    #[test]
    fn request_lines_parse() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x"),
            file("index.html")
        );
        assert_eq!(parse_request(b"GET /app.js?v=1 HTTP/1.1"), file("app.js"));
        assert_eq!(
            parse_request(b"HEAD /a/b.css HTTP/1.0"),
            Request::File {
                rel: PathBuf::from("a/b.css"),
                head: true
            }
        );
        assert_eq!(parse_request(b"POST / HTTP/1.1"), Request::Refuse(405));
        assert_eq!(parse_request(b"GET / HTTP/2"), Request::Refuse(505));
        assert_eq!(parse_request(b"GET /"), Request::Refuse(400));
        assert_eq!(parse_request(b"GET  / HTTP/1.1"), Request::Refuse(400));
        assert_eq!(parse_request(&[0xff, 0xfe]), Request::Refuse(400));
    }

    #[test]
    fn traversal_is_refused() {
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/etc/passwd",
            "/a/%2E%2E/%2e%2e/x",
            "/a%5c..%5cb",
            "/a%00b",
            "relative",
            "http://host/x",
            "/%zz",
            "/%e",
        ] {
            assert_eq!(resolve_target(bad), None, "{bad}");
        }
        assert_eq!(
            resolve_target("//x//y/"),
            Some(PathBuf::from("x/y/index.html"))
        );
        assert_eq!(resolve_target("/./a"), Some(PathBuf::from("a")));
        assert_eq!(resolve_target("/a%20b"), Some(PathBuf::from("a b")));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("a/app.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x")), "application/octet-stream");
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_files_under_root_only_and_stops_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("index.html"), "<p>hi</p>").unwrap();
        std::fs::write(root.join("app.js"), "let x = 1;").unwrap();
        std::fs::write(root.join("sub/index.html"), "sub").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("link.txt")).unwrap();

        let config = WebConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().unwrap(),
            root: root.clone(),
        };
        let server = WebServer::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.run(cancel.clone()));

        let r = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("Content-Type: text/html; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(
            r.contains("Content-Length: 9\r\n") && r.ends_with("<p>hi</p>"),
            "{r}"
        );
        let r = get(addr, "GET /app.js HTTP/1.1\r\n\r\n").await;
        assert!(
            r.contains("text/javascript") && r.ends_with("let x = 1;"),
            "{r}"
        );
        let r = get(addr, "GET /sub HTTP/1.1\r\n\r\n").await;
        assert!(r.ends_with("\r\n\r\nsub"), "{r}");
        let r = get(addr, "HEAD /app.js HTTP/1.1\r\n\r\n").await;
        assert!(
            r.contains("Content-Length: 10\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        for (req, status) in [
            ("GET /link.txt HTTP/1.1\r\n\r\n", "404"),
            ("GET /../secret.txt HTTP/1.1\r\n\r\n", "400"),
            ("GET /%2e%2e/secret.txt HTTP/1.1\r\n\r\n", "400"),
            ("GET /nope HTTP/1.1\r\n\r\n", "404"),
            ("DELETE / HTTP/1.1\r\n\r\n", "405"),
        ] {
            let r = get(addr, req).await;
            assert!(r.starts_with(&format!("HTTP/1.1 {status} ")), "{req}: {r}");
            assert!(!r.contains("secret\n") && !r.ends_with("secret"), "{r}");
        }
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES + 10)
        );
        assert!(get(addr, &huge).await.starts_with("HTTP/1.1 431 "));

        // An idle connection does not keep the server from stopping.
        let _idle = TcpStream::connect(addr).await.unwrap();
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("server stops on cancel")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn bind_names_the_key_when_the_root_is_missing() {
        let config = WebConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().unwrap(),
            root: "/nonexistent/rtcam-web".into(),
        };
        let e = WebServer::bind(&config).await.err().unwrap().to_string();
        assert!(e.contains("web.root") && e.contains("npm run build"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let config = WebConfig {
            root: dir.path().into(),
            ..config
        };
        let e = WebServer::bind(&config).await.err().unwrap().to_string();
        assert!(e.contains("index.html"), "{e}");
    }
}
