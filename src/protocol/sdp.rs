//! Offer SDP rules (docs/protocol.md §4.1): what rtcam can answer honestly, and the offer narrowed to exactly that.

use super::signal::{ErrorCode, Rejection};

/// What rtcam sends: H.264 Constrained Baseline with packetization-mode=1 (STAP-A, FU-A).
pub const SENT_PROFILE_LEVEL_ID: &str = "42e01f";

/// An offer rtcam can answer, narrowed to what it will really send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedOffer {
    /// The offer with every video payload type rtcam would not honour removed, so the answer
    /// can only pick one it does.
    pub sdp: String,
    /// The H.264 payload types left (acceptable ones).
    pub payload_types: Vec<u8>,
    /// `a=mid` of the video section.
    pub video_mid: String,
}

/// A media section: its `m=` line split up, and its attribute lines.
struct Section<'a> {
    kind: &'a str,
    port: &'a str,
    proto: &'a str,
    formats: Vec<&'a str>,
    lines: Vec<&'a str>,
}

impl Section<'_> {
    fn attr<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s str> + 's {
        let prefix = format!("a={name}");
        self.lines.iter().filter_map(move |l| {
            let rest = l.strip_prefix(prefix.as_str())?;
            match rest.strip_prefix(':') {
                Some(value) => Some(value),
                None if rest.is_empty() => Some(""),
                None => None,
            }
        })
    }

    fn mid(&self) -> Option<&str> {
        self.attr("mid").next()
    }

    fn direction(&self) -> &'static str {
        for d in ["sendrecv", "sendonly", "recvonly", "inactive"] {
            if self.attr(d).next().is_some() {
                return d;
            }
        }
        "sendrecv" // RFC 4566's default
    }
}

fn bad(reason: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::BadSdp, reason)
}

/// Splits an SDP into its session part and media sections.
fn parse(sdp: &str) -> Result<(Vec<&str>, Vec<Section<'_>>), Rejection> {
    let mut session = Vec::new();
    let mut sections: Vec<Section<'_>> = Vec::new();
    for line in sdp.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.is_empty() {
            continue;
        }
        if let Some(m) = line.strip_prefix("m=") {
            let mut parts = m.split(' ');
            let (Some(kind), Some(port), Some(proto)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(format!("malformed media line {line:?}")));
            };
            sections.push(Section {
                kind,
                port,
                proto,
                formats: parts.filter(|f| !f.is_empty()).collect(),
                lines: Vec::new(),
            });
        } else if let Some(s) = sections.last_mut() {
            s.lines.push(line);
        } else {
            session.push(line);
        }
    }
    if !session.first().is_some_and(|l| l.starts_with("v=0")) {
        return Err(bad("not an SDP description (it must start with v=0)"));
    }
    Ok((session, sections))
}

/// H.264 profiles a receiver can name that a Constrained Baseline stream satisfies, decided
/// from `profile_idc` and the constraint-set flags as H.264 Annex A defines them: Baseline
/// (0x42, any flags) and the Main/Extended declarations with constraint_set1 (which promise
/// Constrained Baseline compatibility).
fn accepts_constrained_baseline(profile_level_id: &str) -> bool {
    if profile_level_id.len() != 6 || !profile_level_id.is_ascii() {
        return false;
    }
    let Ok(profile_idc) = u8::from_str_radix(&profile_level_id[0..2], 16) else {
        return false;
    };
    let Ok(iop) = u8::from_str_radix(&profile_level_id[2..4], 16) else {
        return false;
    };
    const SET1: u8 = 0x40;
    match profile_idc {
        0x42 => true,
        0x4d | 0x58 => iop & SET1 != 0,
        _ => false,
    }
}

/// `key=value` from an fmtp parameter list.
fn fmtp_param<'a>(params: &'a str, key: &str) -> Option<&'a str> {
    params.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
    })
}

/// One offered video payload type, as far as rtcam cares.
#[derive(Debug)]
struct Offered<'a> {
    pt: &'a str,
    codec: String,
    fmtp: &'a str,
}

fn offered_formats<'a>(video: &'a Section<'a>) -> Vec<Offered<'a>> {
    video
        .formats
        .iter()
        .map(|pt| {
            let codec = video
                .attr("rtpmap")
                .find_map(|v| v.strip_prefix(pt)?.strip_prefix(' '))
                .and_then(|v| v.split('/').next())
                .unwrap_or("")
                .to_ascii_uppercase();
            let fmtp = video
                .attr("fmtp")
                .find_map(|v| v.strip_prefix(pt)?.strip_prefix(' '))
                .unwrap_or("");
            Offered { pt, codec, fmtp }
        })
        .collect()
}

/// Checks that rtcam can answer `sdp` honestly (docs/protocol.md §4.1) and returns it with
/// only the payload types rtcam will use; otherwise a `bad-sdp` rejection naming what is
/// missing.
pub fn check_offer(sdp: &str) -> Result<CheckedOffer, Rejection> {
    let (session, sections) = parse(sdp)?;
    if sections.is_empty() {
        return Err(bad(
            "the offer has no media section; rtcam needs one video section (m=video)",
        ));
    }
    for s in &sections {
        if !matches!(s.kind, "video" | "application") {
            return Err(bad(format!(
                "the offer has an m={} section; rtcam sends one video track and takes at most one data channel: remove it",
                s.kind
            )));
        }
    }
    let videos: Vec<&Section<'_>> = sections.iter().filter(|s| s.kind == "video").collect();
    let video = match videos.as_slice() {
        [v] => *v,
        [] => {
            return Err(bad(
                "the offer has no video section (m=video); add a recvonly video transceiver",
            ));
        }
        more => {
            return Err(bad(format!(
                "the offer has {} video sections; rtcam sends one video track: offer one",
                more.len()
            )));
        }
    };
    if sections.iter().filter(|s| s.kind == "application").count() > 1 {
        return Err(bad(
            "the offer has more than one application (data channel) section",
        ));
    }
    if video.port == "0" {
        return Err(bad("the offer's video section is rejected (port 0)"));
    }
    if !matches!(video.direction(), "recvonly" | "sendrecv") {
        return Err(bad(format!(
            "the video section is {}; it must be recvonly (or sendrecv) to receive rtcam's video",
            video.direction()
        )));
    }
    let Some(video_mid) = video.mid() else {
        return Err(bad("the video section has no a=mid"));
    };
    for s in &sections {
        if s.mid().is_none() {
            return Err(bad(format!("the m={} section has no a=mid", s.kind)));
        }
    }
    if sections.len() > 1 {
        let bundled: Vec<&str> = session
            .iter()
            .find_map(|l| l.strip_prefix("a=group:BUNDLE"))
            .map(|g| g.split(' ').filter(|m| !m.is_empty()).collect())
            .unwrap_or_default();
        if let Some(missing) = sections
            .iter()
            .filter_map(|s| s.mid())
            .find(|m| !bundled.contains(m))
        {
            return Err(bad(format!(
                "the offer must bundle all its media sections (a=group:BUNDLE with every mid; mid {missing:?} is not bundled): rtcam uses one transport; with GStreamer webrtcbin set bundle-policy=max-bundle"
            )));
        }
    }

    let offered = offered_formats(video);
    let h264: Vec<&Offered<'_>> = offered.iter().filter(|o| o.codec == "H264").collect();
    if h264.is_empty() {
        return Err(bad(
            "the video section offers no H.264; rtcam sends H.264 only",
        ));
    }
    let mode1: Vec<&&Offered<'_>> = h264
        .iter()
        .filter(|o| fmtp_param(o.fmtp, "packetization-mode") == Some("1"))
        .collect();
    if mode1.is_empty() {
        return Err(bad(
            "no H.264 payload type with packetization-mode=1; rtcam sends FU-A and STAP-A packets, which packetization-mode=0 forbids",
        ));
    }
    let accepted: Vec<&str> = mode1
        .iter()
        .filter(|o| {
            // RFC 6184: no profile-level-id means 42000a (Baseline, level 1).
            accepts_constrained_baseline(fmtp_param(o.fmtp, "profile-level-id").unwrap_or("42000a"))
        })
        .map(|o| o.pt)
        .collect();
    if accepted.is_empty() {
        let profiles: Vec<&str> = mode1
            .iter()
            .map(|o| fmtp_param(o.fmtp, "profile-level-id").unwrap_or("42000a"))
            .collect();
        return Err(bad(format!(
            "no H.264 payload type with packetization-mode=1 accepts Constrained Baseline (offered profile-level-id {}); rtcam sends Constrained Baseline ({SENT_PROFILE_LEVEL_ID})",
            profiles.join(", ")
        )));
    }
    // Retransmission payload types that repair an accepted one stay too.
    let rtx: Vec<&str> = offered
        .iter()
        .filter(|o| o.codec == "RTX")
        .filter(|o| fmtp_param(o.fmtp, "apt").is_some_and(|apt| accepted.contains(&apt)))
        .map(|o| o.pt)
        .collect();
    let keep = |pt: &str| accepted.contains(&pt) || rtx.contains(&pt);
    let payload_types = accepted.iter().filter_map(|pt| pt.parse().ok()).collect();
    Ok(CheckedOffer {
        sdp: rewrite(&session, &sections, video_mid, &keep),
        payload_types,
        video_mid: video_mid.to_owned(),
    })
}

/// The offer again, with the video section's payload types limited to `keep`.
fn rewrite(
    session: &[&str],
    sections: &[Section<'_>],
    video_mid: &str,
    keep: &dyn Fn(&str) -> bool,
) -> String {
    let mut out = String::new();
    let mut push = |line: &str| {
        out.push_str(line);
        out.push_str("\r\n");
    };
    for l in session {
        push(l);
    }
    for s in sections {
        let is_video = s.kind == "video" && s.mid() == Some(video_mid);
        if !is_video {
            push(&format!(
                "m={} {} {} {}",
                s.kind,
                s.port,
                s.proto,
                s.formats.join(" ")
            ));
            s.lines.iter().for_each(|l| push(l));
            continue;
        }
        let formats: Vec<&str> = s.formats.iter().copied().filter(|pt| keep(pt)).collect();
        push(&format!(
            "m={} {} {} {}",
            s.kind,
            s.port,
            s.proto,
            formats.join(" ")
        ));
        for l in &s.lines {
            let pt_attr = ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"]
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .map(|rest| rest.split(' ').next().unwrap_or(""));
            match pt_attr {
                // `a=rtcp-fb:*` applies to every payload type.
                Some(pt) if pt != "*" && !keep(pt) => {}
                _ => push(l),
            }
        }
    }
    out
}

/// Checks that an answer made from a [`CheckedOffer`] really uses one of its payload types.
pub fn check_answer(answer: &str, offer: &CheckedOffer) -> Result<u8, Rejection> {
    let internal = |why: String| Rejection::new(ErrorCode::Internal, why);
    let (_, sections) = parse(answer).map_err(|r| internal(r.reason))?;
    let video = sections
        .iter()
        .find(|s| s.kind == "video" && s.port != "0")
        .ok_or_else(|| internal("the answer has no active video section".into()))?;
    let pt: u8 = video
        .formats
        .first()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| internal("the answer's video section has no payload type".into()))?;
    if !offer.payload_types.contains(&pt) {
        return Err(internal(format!(
            "the answer picked payload type {pt}, not one of {:?}",
            offer.payload_types
        )));
    }
    if !matches!(video.direction(), "sendonly" | "sendrecv") {
        return Err(internal(format!(
            "the answer's video section is {}",
            video.direction()
        )));
    }
    Ok(pt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A browser-like offer: video with several H.264 variants and VP8, plus a data channel.
    fn offer(video_formats: &str, fmtps: &str, extra: &str) -> String {
        format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF {video_formats}\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n\
             a=rtcp-mux\r\n{fmtps}a=rtcp-fb:* transport-cc\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\na=sctp-port:5000\r\n{extra}"
        )
    }

    fn chrome_like() -> String {
        offer(
            "96 97 102 103 127 121",
            "a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
             a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack pli\r\n\
             a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r\n\
             a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n\
             a=rtpmap:127 H264/90000\r\na=fmtp:127 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f\r\n\
             a=rtpmap:121 H264/90000\r\na=fmtp:121 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f\r\n",
            "",
        )
    }

    fn reason(r: Result<CheckedOffer, Rejection>) -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.code, ErrorCode::BadSdp);
        e.reason
    }

    #[test]
    fn browser_offer_is_narrowed_to_mode_1_baseline_and_its_rtx() {
        let c = check_offer(&chrome_like()).unwrap();
        assert_eq!(c.payload_types, vec![102]);
        assert_eq!(c.video_mid, "0");
        assert!(
            c.sdp.contains("m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\n"),
            "{}",
            c.sdp
        );
        for gone in ["a=rtpmap:96", "a=fmtp:97", "a=rtpmap:127", "a=fmtp:121"] {
            assert!(!c.sdp.contains(gone), "{gone} in {}", c.sdp);
        }
        for kept in [
            "a=rtcp-fb:102 nack pli",
            "a=fmtp:103 apt=102",
            "a=rtcp-fb:* transport-cc",
            "m=application",
            "a=group:BUNDLE 0 1",
        ] {
            assert!(c.sdp.contains(kept), "{kept} missing in {}", c.sdp);
        }
        // The narrowed offer is itself acceptable and stays the same.
        assert_eq!(check_offer(&c.sdp).unwrap().sdp, c.sdp);
    }

    #[test]
    fn mode_0_only_is_refused_naming_the_packetization_mode() {
        let o = offer(
            "127",
            "a=rtpmap:127 H264/90000\r\na=fmtp:127 packetization-mode=0;profile-level-id=42e01f\r\n",
            "",
        );
        assert!(reason(check_offer(&o)).contains("packetization-mode=1"));
        // No packetization-mode at all means mode 0.
        let o = offer(
            "127",
            "a=rtpmap:127 H264/90000\r\na=fmtp:127 profile-level-id=42e01f\r\n",
            "",
        );
        assert!(reason(check_offer(&o)).contains("packetization-mode=1"));
    }

    #[test]
    fn high_only_is_refused_naming_the_profile() {
        let o = offer(
            "121",
            "a=rtpmap:121 H264/90000\r\na=fmtp:121 packetization-mode=1;profile-level-id=640c1f\r\n",
            "",
        );
        let r = reason(check_offer(&o));
        assert!(
            r.contains("640c1f") && r.contains("Constrained Baseline"),
            "{r}"
        );
        // Main without constraint_set1 cannot promise Constrained Baseline either.
        let o = offer(
            "100",
            "a=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1;profile-level-id=4d001f\r\n",
            "",
        );
        assert!(reason(check_offer(&o)).contains("4d001f"));
    }

    #[test]
    fn baseline_variants_are_accepted() {
        for plid in ["42e01f", "42001f", "42c01e", "4d401f", "58c01f"] {
            let o = offer(
                "100",
                &format!(
                    "a=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1;profile-level-id={plid}\r\n"
                ),
                "",
            );
            assert_eq!(check_offer(&o).unwrap().payload_types, vec![100], "{plid}");
        }
        // Missing profile-level-id: 42000a, Baseline.
        let o = offer(
            "100",
            "a=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n",
            "",
        );
        assert!(check_offer(&o).is_ok());
        assert!(!accepts_constrained_baseline("zz0000") && !accepts_constrained_baseline("42"));
    }

    #[test]
    fn no_h264_and_no_video_are_refused() {
        let o = offer("96", "a=rtpmap:96 VP8/90000\r\n", "");
        assert!(reason(check_offer(&o)).contains("no H.264"));
        let o = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n";
        assert!(reason(check_offer(o)).contains("no video section"));
        assert!(reason(check_offer("v=0\r\ns=-\r\n")).contains("no media section"));
        assert!(reason(check_offer("hello")).contains("v=0"));
    }

    #[test]
    fn extra_media_sections_are_refused() {
        let audio = chrome_like().replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2")
            + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n";
        assert!(reason(check_offer(&audio)).contains("m=audio"));
        let two_videos =
            chrome_like() + "m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:2\r\na=recvonly\r\n";
        assert!(reason(check_offer(&two_videos)).contains("2 video sections"));
    }

    #[test]
    fn unbundled_offers_are_refused_naming_bundle() {
        let o = chrome_like().replace("a=group:BUNDLE 0 1\r\n", "");
        let r = reason(check_offer(&o));
        assert!(r.contains("BUNDLE") && r.contains("max-bundle"), "{r}");
        let o = chrome_like().replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0");
        assert!(reason(check_offer(&o)).contains("\"1\""));
        // A lone video section needs no group.
        let lone = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 100\r\na=mid:v\r\na=recvonly\r\na=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n";
        assert_eq!(check_offer(lone).unwrap().video_mid, "v");
    }

    #[test]
    fn send_only_or_rejected_video_is_refused() {
        let o = chrome_like().replace("a=recvonly", "a=sendonly");
        assert!(reason(check_offer(&o)).contains("sendonly"));
        let o = chrome_like().replace("m=video 9", "m=video 0");
        assert!(reason(check_offer(&o)).contains("port 0"));
        let o = chrome_like().replace("a=mid:0\r\n", "");
        assert!(reason(check_offer(&o)).contains("a=mid"));
    }

    #[test]
    fn answers_must_use_an_accepted_payload_type() {
        let c = check_offer(&chrome_like()).unwrap();
        let answer = |pt: &str, dir: &str| {
            format!(
                "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF {pt}\r\na=mid:0\r\na={dir}\r\n"
            )
        };
        assert_eq!(check_answer(&answer("102", "sendonly"), &c), Ok(102));
        assert_eq!(
            check_answer(&answer("127", "sendonly"), &c)
                .unwrap_err()
                .code,
            ErrorCode::Internal
        );
        assert!(check_answer(&answer("102", "inactive"), &c).is_err());
        assert!(check_answer("garbage", &c).is_err());
    }

    #[test]
    fn lf_only_and_garbage_never_panic() {
        let lf = chrome_like().replace("\r\n", "\n");
        assert_eq!(check_offer(&lf).unwrap().payload_types, vec![102]);
        for s in [
            "",
            "v=0",
            "v=0\nm=",
            "v=0\nm=video",
            "v=0\nm=video 9 X",
            "v=0\nm=video 9 X 1 2\na=fmtp:",
            "\u{0}\r\n\r\n",
        ] {
            let _ = check_offer(s);
        }
    }
}
