//! WHEP (docs/whep.md, RFC 9725 style): HTTP requests to signaling calls and results to HTTP responses, as pure functions.
//!
//! The socket side is in [`server`]; everything that decides a status code is here and is
//! tested without a network. Sessions themselves live in the session registry
//! (src/signaling): WHEP is its second transport beside MQTT.

pub(crate) mod server;

use webrtc::peer_connection::RTCIceServer;

use crate::protocol::signal::{ErrorCode, IceCandidate, Rejection};
use crate::protocol::topics::SessionId;

/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8192;
/// Largest PATCH body (an SDP fragment with candidates).
pub const MAX_PATCH_BYTES: usize = 16 * 1024;
/// Candidates one PATCH may carry (the registry caps the session's total, too).
pub const MAX_CANDIDATES_PER_PATCH: usize = 32;
/// `Retry-After` seconds when every viewer slot is taken.
pub const RETRY_AFTER_FULL_S: u32 = 10;
/// `Retry-After` seconds when the device is momentarily busy.
pub const RETRY_AFTER_BUSY_S: u32 = 1;

/// What the WHEP endpoint accepts, from `[whep]`.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// The endpoint's path, e.g. `/whep`; sessions are `<path>/<id>`.
    pub path: String,
    /// Origins allowed by CORS; `*` allows every origin.
    pub allowed_origins: Vec<String>,
    /// Largest SDP offer (`webrtc.max_sdp_bytes`).
    pub max_sdp_bytes: usize,
}

/// A parsed HTTP request: header names in lower case.
#[derive(Debug, Clone, Default)]
pub(crate) struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Authorization: Bearer` credential, else an `access_token` query parameter
    /// (RFC 6750 §2.3; for clients such as go2rtc that cannot set headers).
    pub fn bearer(&self) -> Option<String> {
        if let Some(value) = self.header("authorization") {
            let (scheme, token) = value.trim().split_once(' ')?;
            let token = token.trim();
            return (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
                .then(|| token.to_owned());
        }
        let query = self.target.split_once('?')?.1.split('#').next()?;
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
            .filter(|t| {
                // JWTs are base64url and dots: nothing to percent-decode.
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            })
            .map(str::to_owned)
    }
}

/// An HTTP response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A refusal with a one-line text reason.
    pub fn text(status: u16, reason: &str) -> Self {
        let mut r = Self::new(status);
        r.headers
            .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
        r.body = format!("{reason}\n").into_bytes();
        r
    }

    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a request asks for after the checks that need no session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Route {
    /// Answer at once (refusals, CORS preflight).
    Respond(Response),
    /// POST: open a session with this offer.
    Offer { sdp: String, bearer: Option<String> },
    /// PATCH: trickle these candidates into the session.
    Patch {
        id: SessionId,
        bearer: Option<String>,
        candidates: Vec<Option<IceCandidate>>,
    },
    /// DELETE: end the session.
    Delete {
        id: SessionId,
        bearer: Option<String>,
    },
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The session's ETag: it names the ICE session, which never restarts here.
pub fn etag(id: &SessionId) -> String {
    format!("\"{id}\"")
}

/// The media type of a `Content-Type` value, lower case, without parameters.
fn media_type(value: Option<&str>) -> String {
    value
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

const ENDPOINT_METHODS: &str = "POST, OPTIONS";
const SESSION_METHODS: &str = "PATCH, DELETE, OPTIONS";

/// Routes a request (its body already read within the limits the server enforces).
pub(crate) fn route(req: &Request, policy: &Policy) -> Route {
    let path = req.target.split(['?', '#']).next().unwrap_or("");
    let session = match path.strip_prefix(policy.path.as_str()) {
        Some("" | "/") => None,
        Some(rest) => match rest.strip_prefix('/').and_then(SessionId::parse) {
            Some(id) => Some(id),
            None => return Route::Respond(Response::text(404, "no such WHEP resource")),
        },
        None => {
            return Route::Respond(Response::text(
                404,
                &format!("no such resource; the WHEP endpoint is {}", policy.path),
            ));
        }
    };
    if req.method == "OPTIONS" {
        let allow = if session.is_some() {
            SESSION_METHODS
        } else {
            ENDPOINT_METHODS
        };
        let mut r = Response::new(204).with("Allow", allow);
        if session.is_none() {
            r = r.with("Accept-Post", "application/sdp");
        } else {
            r = r.with("Accept-Patch", "application/trickle-ice-sdpfrag");
        }
        return Route::Respond(r);
    }
    match (session, req.method.as_str()) {
        (None, "POST") => {
            if media_type(req.header("content-type")) != "application/sdp" {
                return Route::Respond(
                    Response::text(415, "the offer must be Content-Type: application/sdp")
                        .with("Accept-Post", "application/sdp"),
                );
            }
            if req.body.len() > policy.max_sdp_bytes {
                return Route::Respond(too_large(policy.max_sdp_bytes));
            }
            let Ok(sdp) = String::from_utf8(req.body.clone()) else {
                return Route::Respond(Response::text(400, "the offer is not UTF-8"));
            };
            if sdp.trim().is_empty() {
                return Route::Respond(Response::text(400, "the offer is empty"));
            }
            Route::Offer {
                sdp,
                bearer: req.bearer(),
            }
        }
        (Some(id), "PATCH") => {
            if media_type(req.header("content-type")) != "application/trickle-ice-sdpfrag" {
                return Route::Respond(
                    Response::text(
                        415,
                        "PATCH takes Content-Type: application/trickle-ice-sdpfrag",
                    )
                    .with("Accept-Patch", "application/trickle-ice-sdpfrag"),
                );
            }
            match req.header("if-match").map(str::trim) {
                None => {}
                Some("*") => {
                    return Route::Respond(Response::text(
                        422,
                        "ICE restarts are not supported; open a new session",
                    ));
                }
                Some(tag) if tag == etag(&id) => {}
                Some(_) => {
                    return Route::Respond(Response::text(
                        412,
                        "If-Match does not match this session's ETag",
                    ));
                }
            }
            if req.body.len() > MAX_PATCH_BYTES {
                return Route::Respond(too_large(MAX_PATCH_BYTES));
            }
            let Ok(frag) = std::str::from_utf8(&req.body) else {
                return Route::Respond(Response::text(400, "the SDP fragment is not UTF-8"));
            };
            match parse_sdpfrag(frag) {
                Ok(candidates) => Route::Patch {
                    id,
                    bearer: req.bearer(),
                    candidates,
                },
                Err(why) => Route::Respond(Response::text(400, &why)),
            }
        }
        (Some(id), "DELETE") => Route::Delete {
            id,
            bearer: req.bearer(),
        },
        (None, _) => Route::Respond(
            Response::text(405, "the WHEP endpoint takes POST (and OPTIONS)")
                .with("Allow", ENDPOINT_METHODS),
        ),
        (Some(_), _) => Route::Respond(
            Response::text(405, "a WHEP session takes PATCH and DELETE (and OPTIONS)")
                .with("Allow", SESSION_METHODS),
        ),
    }
}

fn too_large(limit: usize) -> Response {
    Response::text(413, &format!("the body is larger than {limit} bytes"))
}

/// The candidates of a trickle SDP fragment (RFC 8840): `a=candidate:` lines under their
/// `a=mid:`, `a=end-of-candidates` as `None`, with the fragment's `a=ice-ufrag`.
pub(crate) fn parse_sdpfrag(frag: &str) -> Result<Vec<Option<IceCandidate>>, String> {
    let mut ufrag: Option<String> = None;
    let mut mid: Option<String> = None;
    let mut mline: Option<u16> = None;
    let mut out: Vec<Option<IceCandidate>> = Vec::new();
    for line in frag.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        if let Some(u) = line.strip_prefix("a=ice-ufrag:") {
            ufrag = Some(u.trim().to_owned());
        } else if line.starts_with("m=") {
            mline = Some(mline.map_or(0, |n| n.saturating_add(1)));
            mid = None;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.trim().to_owned());
        } else if let Some(c) = line.strip_prefix("a=candidate:") {
            if c.trim().is_empty() {
                return Err("an empty a=candidate line".into());
            }
            out.push(Some(IceCandidate {
                candidate: format!("candidate:{}", c.trim()),
                sdp_mid: mid.clone(),
                sdp_mline_index: mline.or(Some(0)),
                username_fragment: None,
            }));
        } else if line == "a=end-of-candidates" {
            out.push(None);
        } else if !line.contains('=') {
            return Err(format!(
                "not an SDP line: {:?}",
                line.chars().take(40).collect::<String>()
            ));
        }
        if out.len() > MAX_CANDIDATES_PER_PATCH {
            return Err(format!(
                "more than {MAX_CANDIDATES_PER_PATCH} candidates in one PATCH"
            ));
        }
    }
    for c in out.iter_mut().flatten() {
        c.username_fragment = ufrag.clone();
    }
    Ok(out)
}

/// The HTTP status (and extra headers) for a registry rejection.
pub(crate) fn rejection_response(r: &Rejection, had_bearer: bool) -> Response {
    let status = match r.code {
        ErrorCode::Unauthorized | ErrorCode::Stale | ErrorCode::Replayed => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::UnknownSession => 404,
        ErrorCode::SessionExists => 409,
        ErrorCode::SdpTooLarge | ErrorCode::PayloadTooLarge => 413,
        ErrorCode::TooManyCandidates => 422,
        ErrorCode::MaxViewers | ErrorCode::Busy => 503,
        ErrorCode::Internal => 500,
        ErrorCode::BadSdp
        | ErrorCode::BadCandidate
        | ErrorCode::BadJson
        | ErrorCode::BadSchema
        | ErrorCode::UnsupportedVersion => 400,
    };
    let mut resp = Response::text(status, &format!("{}: {}", r.code, r.reason));
    match status {
        401 => {
            let challenge = if had_bearer {
                "Bearer realm=\"rtcam\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"rtcam\""
            };
            resp = resp.with("WWW-Authenticate", challenge);
        }
        503 => {
            let after = if r.code == ErrorCode::MaxViewers {
                RETRY_AFTER_FULL_S
            } else {
                RETRY_AFTER_BUSY_S
            };
            resp = resp.with("Retry-After", after.to_string());
        }
        _ => {}
    }
    resp
}

/// The answer with the device's candidates in its first media section (everything is
/// bundled there) and, when gathering finished, `a=end-of-candidates`.
pub(crate) fn answer_with_candidates(
    answer: &str,
    candidates: &[IceCandidate],
    complete: bool,
) -> String {
    let mut extra = String::new();
    for c in candidates {
        let line = c.candidate.strip_prefix("a=").unwrap_or(&c.candidate);
        extra.push_str("a=");
        extra.push_str(line);
        extra.push_str("\r\n");
    }
    if complete {
        extra.push_str("a=end-of-candidates\r\n");
    }
    let lines: Vec<&str> = answer.split_inclusive('\n').collect();
    let mut out = String::with_capacity(answer.len() + extra.len());
    let mut sections = 0;
    let mut inserted = false;
    for line in &lines {
        if line.starts_with("m=") {
            sections += 1;
            if sections == 2 && !inserted {
                out.push_str(&extra);
                inserted = true;
            }
        }
        if line.starts_with("a=candidate:") || line.starts_with("a=end-of-candidates") {
            // The answer may carry what webrtc-rs gathered already; ours replace them.
            continue;
        }
        out.push_str(line);
        if !line.ends_with('\n') {
            out.push_str("\r\n");
        }
    }
    if !inserted && sections > 0 {
        out.push_str(&extra);
    }
    out
}

/// Quotes a Link parameter value (RFC 9110 quoted-string).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        if ch == '"' || ch == '\\' {
            out.push('\\');
        }
        if !ch.is_control() {
            out.push(ch);
        }
    }
    out.push('"');
    out
}

/// `Link: <url>; rel="ice-server"` values for the ICE servers (RFC 9725 §4.6), with the
/// username and credential of TURN servers.
pub(crate) fn link_headers(servers: &[RTCIceServer]) -> Vec<String> {
    let mut out = Vec::new();
    for s in servers {
        for url in &s.urls {
            if url.contains(['<', '>', '\r', '\n']) {
                continue;
            }
            let mut v = format!("<{url}>; rel=\"ice-server\"");
            let turn = url.starts_with("turn:") || url.starts_with("turns:");
            if turn && !s.username.is_empty() {
                v.push_str(&format!(
                    "; username={}; credential={}; credential-type=\"password\"",
                    quoted(&s.username),
                    quoted(&s.credential)
                ));
            }
            out.push(v);
        }
    }
    out
}

/// CORS headers for a request from `origin`; `Err` with a 403 response when the origin is
/// not allowed. Requests without `Origin` (not from a browser page) get none.
pub(crate) fn cors(req: &Request, policy: &Policy) -> Result<Vec<(String, String)>, Response> {
    let Some(origin) = req.header("origin") else {
        return Ok(Vec::new());
    };
    let any = policy.allowed_origins.iter().any(|o| o == "*");
    if !any && !policy.allowed_origins.iter().any(|o| o == origin) {
        return Err(Response::text(
            403,
            "this Origin is not allowed (whep.allowed_origins)",
        ));
    }
    let mut h = vec![
        (
            "Access-Control-Allow-Origin".to_owned(),
            if any {
                "*".to_owned()
            } else {
                origin.to_owned()
            },
        ),
        (
            "Access-Control-Expose-Headers".to_owned(),
            "Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After, WWW-Authenticate"
                .to_owned(),
        ),
    ];
    if !any {
        h.push(("Vary".into(), "Origin".into()));
    }
    if req.method == "OPTIONS" {
        h.push((
            "Access-Control-Allow-Methods".into(),
            "POST, PATCH, DELETE, OPTIONS".into(),
        ));
        h.push((
            "Access-Control-Allow-Headers".into(),
            "Authorization, Content-Type, If-Match".into(),
        ));
        h.push(("Access-Control-Max-Age".into(), "600".into()));
    }
    Ok(h)
}

/// The `201 Created` response to an accepted offer.
pub(crate) fn created(
    policy: &Policy,
    id: &SessionId,
    answer: String,
    links: &[String],
) -> Response {
    let mut r = Response::new(201)
        .with("Content-Type", "application/sdp")
        .with("Location", format!("{}/{id}", policy.path))
        .with("ETag", etag(id))
        .with("Accept-Patch", "application/trickle-ice-sdpfrag");
    for l in links {
        r = r.with("Link", l.clone());
    }
    r.body = answer.into_bytes();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            path: "/whep".into(),
            allowed_origins: vec!["https://ha.example".into()],
            max_sdp_bytes: 100,
        }
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request {
        Request {
            method: method.into(),
            target: target.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), (*v).to_owned()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn status(r: Route) -> u16 {
        match r {
            Route::Respond(r) => r.status,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn post_routes_an_offer_with_its_bearer() {
        let r = route(
            &req(
                "POST",
                "/whep",
                &[
                    ("Content-Type", "application/sdp; charset=utf-8"),
                    ("Authorization", "bearer  abc.def.ghi "),
                ],
                "v=0\r\n",
            ),
            &policy(),
        );
        assert_eq!(
            r,
            Route::Offer {
                sdp: "v=0\r\n".into(),
                bearer: Some("abc.def.ghi".into())
            }
        );
        let r = route(
            &req(
                "POST",
                "/whep/",
                &[
                    ("Content-Type", "application/sdp"),
                    ("Authorization", "Basic xyz"),
                ],
                "v=0",
            ),
            &policy(),
        );
        assert_eq!(
            r,
            Route::Offer {
                sdp: "v=0".into(),
                bearer: None
            }
        );
        // go2rtc cannot set headers: the credential may come as `access_token`.
        let q = req(
            "POST",
            "/whep?x=1&access_token=a.b-c_d",
            &[("Content-Type", "application/sdp")],
            "v=0",
        );
        assert_eq!(q.bearer().as_deref(), Some("a.b-c_d"));
        let q = req("POST", "/whep?access_token=a%20b", &[], "");
        assert_eq!(q.bearer(), None);
    }

    #[test]
    fn bad_posts_get_their_status() {
        let p = policy();
        let sdp = [("Content-Type", "application/sdp")];
        assert_eq!(status(route(&req("POST", "/whep", &[], "v=0"), &p)), 415);
        assert_eq!(
            status(route(
                &req("POST", "/whep", &[("Content-Type", "text/plain")], "v=0"),
                &p
            )),
            415
        );
        assert_eq!(
            status(route(&req("POST", "/whep", &sdp, &"a".repeat(101)), &p)),
            413
        );
        assert_eq!(status(route(&req("POST", "/whep", &sdp, " \r\n"), &p)), 400);
        let mut bad_utf8 = req("POST", "/whep", &sdp, "");
        bad_utf8.body = vec![0xff, 0xfe];
        assert_eq!(status(route(&bad_utf8, &p)), 400);
        assert_eq!(status(route(&req("GET", "/whep", &[], ""), &p)), 405);
        assert_eq!(status(route(&req("POST", "/other", &sdp, "v=0"), &p)), 404);
        assert_eq!(status(route(&req("POST", "/whepx", &sdp, "v=0"), &p)), 404);
        let Route::Respond(r) = route(&req("PUT", "/whep", &[], ""), &p) else {
            panic!()
        };
        assert_eq!(r.header("Allow"), Some("POST, OPTIONS"));
    }

    #[test]
    fn session_requests_route_and_refuse() {
        let p = policy();
        let frag = [("Content-Type", "application/trickle-ice-sdpfrag")];
        let body = "a=ice-ufrag:abcd\r\na=ice-pwd:x\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host\r\na=end-of-candidates\r\n";
        let Route::Patch {
            id,
            bearer,
            candidates,
        } = route(&req("PATCH", "/whep/w1", &frag, body), &p)
        else {
            panic!("patch")
        };
        assert_eq!(id.as_str(), "w1");
        assert_eq!(bearer, None);
        assert_eq!(candidates.len(), 2);
        let c = candidates[0].as_ref().unwrap();
        assert_eq!(
            c.candidate,
            "candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host"
        );
        assert_eq!(c.sdp_mid.as_deref(), Some("0"));
        assert_eq!(c.sdp_mline_index, Some(0));
        assert_eq!(c.username_fragment.as_deref(), Some("abcd"));
        assert_eq!(candidates[1], None);
        // If-Match: the session's ETag passes, another fails, `*` (ICE restart) is refused.
        let tag = etag(&SessionId::parse("w1").unwrap());
        let with = |m: &str| {
            route(
                &req(
                    "PATCH",
                    "/whep/w1",
                    &[
                        ("Content-Type", "application/trickle-ice-sdpfrag"),
                        ("If-Match", m),
                    ],
                    body,
                ),
                &p,
            )
        };
        assert!(matches!(with(&tag), Route::Patch { .. }));
        assert_eq!(status(with("\"other\"")), 412);
        assert_eq!(status(with("*")), 422);
        assert_eq!(
            status(route(
                &req(
                    "PATCH",
                    "/whep/w1",
                    &[("Content-Type", "application/sdp")],
                    body
                ),
                &p
            )),
            415
        );
        assert_eq!(
            status(route(
                &req("PATCH", "/whep/w1", &frag, &"a=x\r\n".repeat(4000)),
                &p
            )),
            413
        );
        assert_eq!(
            status(route(&req("PATCH", "/whep/w1", &frag, "garbage line"), &p)),
            400
        );
        assert_eq!(
            route(
                &req("DELETE", "/whep/w1", &[("Authorization", "Bearer t")], ""),
                &p
            ),
            Route::Delete {
                id: SessionId::parse("w1").unwrap(),
                bearer: Some("t".into())
            }
        );
        assert_eq!(status(route(&req("DELETE", "/whep/a b", &[], ""), &p)), 404);
        assert_eq!(status(route(&req("DELETE", "/whep/a/b", &[], ""), &p)), 404);
        assert_eq!(status(route(&req("POST", "/whep/w1", &frag, ""), &p)), 405);
        assert_eq!(status(route(&req("DELETE", "/whep", &[], ""), &p)), 405);
    }

    #[test]
    fn too_many_candidates_in_one_patch_are_refused() {
        let line = "a=candidate:1 1 udp 1 10.0.0.2 5000 typ host\r\n";
        assert!(parse_sdpfrag(&line.repeat(MAX_CANDIDATES_PER_PATCH)).is_ok());
        assert!(parse_sdpfrag(&line.repeat(MAX_CANDIDATES_PER_PATCH + 1)).is_err());
        assert!(parse_sdpfrag("a=candidate:\r\n").is_err());
    }

    #[test]
    fn options_and_cors() {
        let p = policy();
        let Route::Respond(r) = route(&req("OPTIONS", "/whep", &[], ""), &p) else {
            panic!()
        };
        assert_eq!(r.status, 204);
        assert_eq!(r.header("Accept-Post"), Some("application/sdp"));
        let pre = req(
            "OPTIONS",
            "/whep",
            &[
                ("Origin", "https://ha.example"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ],
            "",
        );
        let h = cors(&pre, &p).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            get("Access-Control-Allow-Origin"),
            Some("https://ha.example")
        );
        assert!(
            get("Access-Control-Allow-Headers")
                .unwrap()
                .contains("Authorization")
        );
        assert!(
            get("Access-Control-Allow-Headers")
                .unwrap()
                .contains("Content-Type")
        );
        assert!(
            get("Access-Control-Allow-Methods")
                .unwrap()
                .contains("PATCH")
        );
        assert!(
            get("Access-Control-Expose-Headers")
                .unwrap()
                .contains("Location")
        );
        assert_eq!(get("Vary"), Some("Origin"));
        let evil = req("POST", "/whep", &[("Origin", "https://evil.example")], "");
        assert_eq!(cors(&evil, &p).unwrap_err().status, 403);
        assert!(cors(&req("POST", "/whep", &[], ""), &p).unwrap().is_empty());
        let any = Policy {
            allowed_origins: vec!["*".into()],
            ..p
        };
        let h = cors(&evil, &any).unwrap();
        assert!(h.contains(&("Access-Control-Allow-Origin".into(), "*".into())));
    }

    #[test]
    fn rejections_map_to_statuses() {
        let r = |code| rejection_response(&Rejection::new(code, "why"), false);
        let u = r(ErrorCode::Unauthorized);
        assert_eq!(u.status, 401);
        assert_eq!(u.header("WWW-Authenticate"), Some("Bearer realm=\"rtcam\""));
        let u = rejection_response(&Rejection::new(ErrorCode::Unauthorized, "x"), true);
        assert!(
            u.header("WWW-Authenticate")
                .unwrap()
                .contains("invalid_token")
        );
        assert_eq!(r(ErrorCode::Forbidden).status, 403);
        assert_eq!(r(ErrorCode::UnknownSession).status, 404);
        let full = r(ErrorCode::MaxViewers);
        assert_eq!(full.status, 503);
        assert_eq!(full.header("Retry-After"), Some("10"));
        assert_eq!(r(ErrorCode::Busy).header("Retry-After"), Some("1"));
        assert_eq!(r(ErrorCode::BadSdp).status, 400);
        assert_eq!(r(ErrorCode::SdpTooLarge).status, 413);
        assert_eq!(r(ErrorCode::TooManyCandidates).status, 422);
        assert_eq!(r(ErrorCode::Internal).status, 500);
        assert_eq!(r(ErrorCode::SessionExists).status, 409);
        assert!(
            String::from_utf8(full.body)
                .unwrap()
                .starts_with("max-viewers: why")
        );
    }

    #[test]
    fn candidates_go_into_the_first_media_section() {
        let answer = "v=0\r\ns=-\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=candidate:old 1 udp 1 1.1.1.1 1 typ host\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n";
        let c = IceCandidate {
            candidate: "candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        };
        let out = answer_with_candidates(answer, &[c], true);
        assert_eq!(
            out,
            "v=0\r\ns=-\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n"
        );
        let single = "v=0\r\nm=video 9 X 96\r\na=mid:0";
        assert_eq!(
            answer_with_candidates(single, &[], false),
            "v=0\r\nm=video 9 X 96\r\na=mid:0\r\n"
        );
    }

    #[test]
    fn link_headers_carry_turn_credentials() {
        let servers = vec![
            RTCIceServer {
                urls: vec!["stun:stun.example:3478".into()],
                ..Default::default()
            },
            RTCIceServer {
                urls: vec!["turn:turn.example:3478?transport=udp".into()],
                username: "1700000000:cam".into(),
                credential: "p\"w".into(),
            },
        ];
        assert_eq!(
            link_headers(&servers),
            vec![
                "<stun:stun.example:3478>; rel=\"ice-server\"".to_owned(),
                "<turn:turn.example:3478?transport=udp>; rel=\"ice-server\"; username=\"1700000000:cam\"; credential=\"p\\\"w\"; credential-type=\"password\"".to_owned(),
            ]
        );
    }

    #[test]
    fn created_has_location_etag_and_links() {
        let id = SessionId::parse("wabc").unwrap();
        let r = created(
            &policy(),
            &id,
            "v=0\r\n".into(),
            &["<stun:x>; rel=\"ice-server\"".into()],
        );
        assert_eq!(r.status, 201);
        assert_eq!(r.header("Location"), Some("/whep/wabc"));
        assert_eq!(r.header("ETag"), Some("\"wabc\""));
        assert_eq!(r.header("Content-Type"), Some("application/sdp"));
        assert_eq!(r.header("Link"), Some("<stun:x>; rel=\"ice-server\""));
        assert_eq!(r.body, b"v=0\r\n");
    }
}
