//! Offer SDP rules (docs/protocol.md §4.1): what rtcam can answer honestly for the H.264 stream it sends, and the offer narrowed to exactly that.

use super::signal::{ErrorCode, Rejection};

/// What rtcam's encoders send: H.264 Constrained Baseline with packetization-mode=1 (STAP-A,
/// FU-A). The codec rtcam registers with webrtc-rs carries it; the answer itself repeats the
/// offered payload type's parameters (see [`check_offer`]).
pub const SENT_PROFILE_LEVEL_ID: &str = "42e01f";

/// The H.264 stream rtcam sends, as SDP names it: `profile_idc`, the constraint_set flags and
/// `level_idc`, the three bytes after an SPS's header and of a `profile-level-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentStream {
    pub profile_idc: u8,
    pub constraints: u8,
    pub level_idc: u8,
}

/// constraint_set0..5 flags in the `profile-iop` byte.
const SET0: u8 = 0x80;
const SET1: u8 = 0x40;
const SET3: u8 = 0x10;
const SET4: u8 = 0x08;
const SET5: u8 = 0x04;

impl SentStream {
    /// What rtcam's encoders produce: Constrained Baseline (openh264 writes `42c0..`:
    /// constraint_set0 and constraint_set1) at `level_idc`.
    pub const fn constrained_baseline(level_idc: u8) -> Self {
        Self {
            profile_idc: 0x42,
            constraints: SET0 | SET1,
            level_idc,
        }
    }

    /// As an SDP `profile-level-id`, e.g. `640028`.
    pub fn profile_level_id(&self) -> String {
        format!(
            "{:02x}{:02x}{:02x}",
            self.profile_idc, self.constraints, self.level_idc
        )
    }

    pub fn profile(&self) -> Profile {
        Profile::classify(self.profile_idc, self.constraints)
    }

    /// The level's name, e.g. `3.1`, `4`, `1b`.
    pub fn level_name(&self) -> String {
        level_name(self.profile_idc, self.constraints, self.level_idc)
    }
}

/// An H.264 profile as RFC 6184 Table 5 tells them apart by `profile_idc` and the
/// constraint_set flags (constraint_set4/5, which Table 5 predates, are tolerated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    ConstrainedBaseline,
    Baseline,
    Main,
    Extended,
    High,
    ConstrainedHigh,
    /// Any other `profile_idc` (High 10, 4:2:2, 4:4:4, intra and scalable profiles...).
    Other(u8),
}

impl Profile {
    pub fn classify(profile_idc: u8, iop: u8) -> Self {
        match profile_idc {
            0x42 if iop & SET1 != 0 => Self::ConstrainedBaseline,
            0x42 => Self::Baseline,
            0x4d if iop & SET0 != 0 => Self::ConstrainedBaseline,
            0x4d => Self::Main,
            0x58 if iop & (SET0 | SET1) == SET0 | SET1 => Self::ConstrainedBaseline,
            0x58 if iop & SET0 != 0 => Self::Baseline,
            0x58 => Self::Extended,
            0x64 if iop & (SET4 | SET5) == SET4 | SET5 => Self::ConstrainedHigh,
            0x64 => Self::High,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::ConstrainedBaseline => "Constrained Baseline".into(),
            Self::Baseline => "Baseline".into(),
            Self::Main => "Main".into(),
            Self::Extended => "Extended".into(),
            Self::High => "High".into(),
            Self::ConstrainedHigh => "Constrained High".into(),
            Self::Other(0x6e) => "High 10".into(),
            Self::Other(0x7a) => "High 4:2:2".into(),
            Self::Other(0xf4) => "High 4:4:4 Predictive".into(),
            Self::Other(idc) => format!("profile_idc {idc}"),
        }
    }
}

/// Orders levels: `level_idc` times ten, with level 1b (signalled as `level_idc` 11 plus
/// constraint_set3 in the Baseline, Main and Extended profiles, or as 9) between 1 and 1.1.
fn level_rank(profile_idc: u8, iop: u8, level_idc: u8) -> u16 {
    let is_1b = level_idc == 9
        || (level_idc == 11 && iop & SET3 != 0 && matches!(profile_idc, 0x42 | 0x4d | 0x58));
    if is_1b {
        105
    } else {
        u16::from(level_idc) * 10
    }
}

fn level_name(profile_idc: u8, iop: u8, level_idc: u8) -> String {
    match level_rank(profile_idc, iop, level_idc) {
        105 => "1b".into(),
        _ if level_idc.is_multiple_of(10) => format!("{}", level_idc / 10),
        _ => format!("{}.{}", level_idc / 10, level_idc % 10),
    }
}

/// An offered `profile-level-id`: (profile_idc, profile-iop, level_idc).
fn parse_profile_level_id(s: &str) -> Option<(u8, u8, u8)> {
    if s.len() != 6 || !s.is_ascii() {
        return None;
    }
    let byte = |i: usize| u8::from_str_radix(&s[i..i + 2], 16).ok();
    Some((byte(0)?, byte(2)?, byte(4)?))
}

/// Whether a receiver that offered `profile_level_id` takes `stream`. A Constrained
/// Baseline stream (rtcam's encoders, or a camera sending it) follows the rules of
/// docs/protocol.md §4; any other profile (a camera's own Main or High) needs a payload type
/// of that same profile (RFC 6184 §8.2.2: the profile is used symmetrically; a Constrained
/// High stream may also go to a High payload type), never one that only promises
/// Constrained Baseline.
fn offer_takes(profile_level_id: &str, stream: &SentStream) -> bool {
    let Some((idc, iop, _)) = parse_profile_level_id(profile_level_id) else {
        return false;
    };
    match stream.profile() {
        Profile::ConstrainedBaseline => accepts_constrained_baseline(profile_level_id),
        Profile::Other(s) => idc == s,
        sent => {
            let offered = Profile::classify(idc, iop);
            offered == sent || (sent == Profile::ConstrainedHigh && offered == Profile::High)
        }
    }
}

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
    /// Set when the stream's level is above every level the viewer declared it can receive
    /// (browsers declare 3.1 and decode more): the session goes ahead and says so.
    pub level_note: Option<String>,
    /// The viewer offered one section and no `a=group:BUNDLE` (GStreamer webrtcbin at its
    /// default `bundle-policy` does). The WebRTC stack answers only sections in the offer's
    /// BUNDLE group, so [`CheckedOffer::sdp`] carries a group of that one section, and
    /// [`answer_for_viewer`] takes it out of the answer again: an answerer must not bundle
    /// what was not offered bundled (RFC 8843 §7.3).
    pub bundle_group_added: bool,
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
    let Some((profile_idc, iop, _)) = parse_profile_level_id(profile_level_id) else {
        return false;
    };
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

/// An offered payload type's `profile-level-id`; RFC 6184: none means 42000a (Baseline,
/// level 1).
fn plid<'a>(o: &Offered<'a>) -> &'a str {
    fmtp_param(o.fmtp, "profile-level-id").unwrap_or("42000a")
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

/// Checks that rtcam can answer `sdp` honestly for `stream` (docs/protocol.md §4) and returns
/// it with only the payload types rtcam will use; otherwise a `bad-sdp` rejection naming
/// what is missing.
///
/// Levels: the answer repeats the chosen payload type's parameters (webrtc-rs does), so with
/// `level-asymmetry-allowed=1` its level is what rtcam could receive, which means nothing
/// for a device that receives no video, and without it the offered level (the answer's
/// level must not exceed it). Either way the level that bounds what rtcam sends is the
/// offer's: payload types that declare at least the stream's level are preferred; when none
/// does, the offer is still answered (browsers declare 3.1 and decode 4.x) and
/// [`CheckedOffer::level_note`] says so.
#[cfg(test)]
pub fn check_offer(sdp: &str, stream: &SentStream) -> Result<CheckedOffer, Rejection> {
    check_offer_for(sdp, stream, false)
}

/// [`check_offer`]; with `audio_allowed`, audio sections are accepted too and left to the
/// answer to decline (rtcam sends no audio): WHEP clients such as go2rtc always offer one
/// (docs/whep.md §2).
pub fn check_offer_for(
    sdp: &str,
    stream: &SentStream,
    audio_allowed: bool,
) -> Result<CheckedOffer, Rejection> {
    let (session, sections) = parse(sdp)?;
    if sections.is_empty() {
        return Err(bad(
            "the offer has no media section; rtcam needs one video section (m=video)",
        ));
    }
    for s in &sections {
        let allowed =
            matches!(s.kind, "video" | "application") || (audio_allowed && s.kind == "audio");
        if !allowed {
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
    let bundle_group = session
        .iter()
        .find_map(|l| l.strip_prefix("a=group:BUNDLE"));
    if sections.len() > 1 {
        let bundled: Vec<&str> = bundle_group
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
    let taking: Vec<&&Offered<'_>> = mode1
        .iter()
        .copied()
        .filter(|o| offer_takes(plid(o), stream))
        .collect();
    if taking.is_empty() {
        let profiles: Vec<&str> = mode1.iter().map(|o| plid(o)).collect();
        let sent = stream.profile().name();
        return Err(bad(format!(
            "no H.264 payload type with packetization-mode=1 accepts {sent} (offered profile-level-id {}); rtcam sends {sent} ({})",
            profiles.join(", "),
            stream.profile_level_id()
        )));
    }
    let stream_rank = level_rank(stream.profile_idc, stream.constraints, stream.level_idc);
    let declared = |o: &Offered<'_>| {
        parse_profile_level_id(plid(o)).map_or(0, |(idc, iop, level)| level_rank(idc, iop, level))
    };
    let enough: Vec<&&Offered<'_>> = taking
        .iter()
        .copied()
        .filter(|o| declared(o) >= stream_rank)
        .collect();
    let level_note = if enough.is_empty() {
        let highest = taking
            .iter()
            .filter_map(|o| parse_profile_level_id(plid(o)))
            .max_by_key(|&(idc, iop, level)| level_rank(idc, iop, level))
            .map_or("1".into(), |(idc, iop, level)| level_name(idc, iop, level));
        Some(format!(
            "the stream is H.264 level {}, above level {highest}, the highest the viewer declared it receives",
            stream.level_name()
        ))
    } else {
        None
    };
    let chosen = if enough.is_empty() { taking } else { enough };
    let accepted: Vec<&str> = chosen.iter().map(|o| o.pt).collect();
    // Retransmission payload types that repair an accepted one stay too.
    let rtx: Vec<&str> = offered
        .iter()
        .filter(|o| o.codec == "RTX")
        .filter(|o| fmtp_param(o.fmtp, "apt").is_some_and(|apt| accepted.contains(&apt)))
        .map(|o| o.pt)
        .collect();
    let keep = |pt: &str| accepted.contains(&pt) || rtx.contains(&pt);
    let payload_types = accepted.iter().filter_map(|pt| pt.parse().ok()).collect();
    let bundle_group_added = bundle_group.is_none();
    let mut session = session;
    let added_group;
    if bundle_group_added {
        // One section (more without a group were refused above).
        added_group = format!("a=group:BUNDLE {video_mid}");
        session.push(&added_group);
    }
    Ok(CheckedOffer {
        sdp: rewrite(&session, &sections, video_mid, &keep),
        payload_types,
        video_mid: video_mid.to_owned(),
        level_note,
        bundle_group_added,
    })
}

/// The answer as the viewer gets it: without the BUNDLE group rtcam added to the offer.
pub fn answer_for_viewer(answer: &str, offer: &CheckedOffer) -> String {
    if !offer.bundle_group_added {
        return answer.to_owned();
    }
    let mut out = String::with_capacity(answer.len());
    for line in answer.split_inclusive('\n') {
        if !line.trim_end().starts_with("a=group:BUNDLE") {
            out.push_str(line);
        }
    }
    out
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

/// Whether an answer's video section, sending payload type `pt`, negotiated what bandwidth
/// probes need: transport-wide feedback (its header extension and `transport-cc` feedback) and
/// a retransmission payload type for `pt`, whose stream carries the probes' padding.
pub fn answer_carries_probes(answer: &str, pt: u8) -> bool {
    let Ok((_, sections)) = parse(answer) else {
        return false;
    };
    let Some(video) = sections.iter().find(|s| s.kind == "video" && s.port != "0") else {
        return false;
    };
    let pt = pt.to_string();
    let extension = video
        .attr("extmap")
        .any(|v| v.split_whitespace().nth(1) == Some(rtc::sdp::extmap::TRANSPORT_CC_URI));
    let feedback = video.attr("rtcp-fb").any(|v| {
        let mut parts = v.split_whitespace();
        matches!(parts.next(), Some(p) if p == "*" || p == pt)
            && parts.next() == Some("transport-cc")
    });
    let repairs_pt = video
        .attr("rtpmap")
        .filter_map(|v| {
            let (rtx_pt, codec) = v.split_once(' ')?;
            codec
                .to_ascii_lowercase()
                .starts_with("rtx/")
                .then_some(rtx_pt)
        })
        .any(|rtx_pt| {
            video.attr("fmtp").any(|v| {
                v.split_once(' ').is_some_and(|(p, params)| {
                    p == rtx_pt && fmtp_param(params, "apt") == Some(pt.as_str())
                })
            })
        });
    extension && feedback && repairs_pt
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What openh264 sends at 720p30: Constrained Baseline, level 3.1.
    const CB31: SentStream = SentStream::constrained_baseline(0x1f);

    fn cb_offer(sdp: &str) -> Result<CheckedOffer, Rejection> {
        check_offer(sdp, &CB31)
    }

    fn stream(plid: &str) -> SentStream {
        let (profile_idc, constraints, level_idc) = parse_profile_level_id(plid).unwrap();
        SentStream {
            profile_idc,
            constraints,
            level_idc,
        }
    }

    /// One video section offering each (payload type, profile-level-id) in mode 1.
    fn offering(pts: &[(u8, &str)]) -> String {
        let list: Vec<String> = pts.iter().map(|(pt, _)| pt.to_string()).collect();
        let fmtps: String = pts
            .iter()
            .map(|(pt, plid)| {
                format!(
                    "a=rtpmap:{pt} H264/90000\r\na=fmtp:{pt} level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={plid}\r\n"
                )
            })
            .collect();
        offer(&list.join(" "), &fmtps, "")
    }

    #[test]
    fn profiles_and_levels_are_named_as_rfc_6184_table_5_does() {
        for (plid, profile) in [
            ("42e01f", Profile::ConstrainedBaseline),
            ("42c01e", Profile::ConstrainedBaseline),
            ("42001f", Profile::Baseline),
            ("4de01f", Profile::ConstrainedBaseline),
            ("4d001f", Profile::Main),
            ("4d0028", Profile::Main),
            ("58c01f", Profile::ConstrainedBaseline),
            ("58801f", Profile::Baseline),
            ("58001f", Profile::Extended),
            ("640028", Profile::High),
            ("640c1f", Profile::ConstrainedHigh),
            ("6e0028", Profile::Other(0x6e)),
        ] {
            assert_eq!(stream(plid).profile(), profile, "{plid}");
        }
        assert_eq!(stream("640028").profile_level_id(), "640028");
        assert_eq!(CB31.profile_level_id(), "42c01f");
        assert_eq!(stream("42e01f").level_name(), "3.1");
        assert_eq!(stream("640028").level_name(), "4");
        assert_eq!(
            stream("42f00b").level_name(),
            "1b",
            "11 with constraint_set3"
        );
        assert_eq!(
            stream("64000b").level_name(),
            "1.1",
            "no 1b in High by set3"
        );
        assert!(level_rank(0x42, 0xf0, 11) < level_rank(0x42, 0xe0, 11));
        assert_eq!(Profile::Other(0x6e).name(), "High 10");
    }

    #[test]
    fn a_camera_stream_needs_a_payload_type_of_its_own_profile() {
        // Chrome-like: Baseline, Constrained Baseline, Main, Constrained High and High.
        let chrome = offering(&[
            (102, "42001f"),
            (106, "42e01f"),
            (39, "4d001f"),
            (112, "640c1f"),
            (123, "64001f"),
        ]);
        // A High camera: only the High payload type, never one that promises Constrained
        // Baseline.
        assert_eq!(
            check_offer(&chrome, &stream("640028"))
                .unwrap()
                .payload_types,
            vec![123]
        );
        assert_eq!(
            check_offer(&chrome, &stream("4d0028"))
                .unwrap()
                .payload_types,
            vec![39]
        );
        // Constrained High goes to Constrained High or High payload types.
        assert_eq!(
            check_offer(&chrome, &stream("640c28"))
                .unwrap()
                .payload_types,
            vec![112, 123]
        );
        // A camera set to Constrained Baseline follows rtcam's own rules.
        assert_eq!(
            check_offer(&chrome, &stream("42e01f"))
                .unwrap()
                .payload_types,
            vec![102, 106]
        );
        // Firefox-like: Constrained Baseline and Baseline only. A High camera is refused,
        // naming both profiles.
        let firefox = offering(&[(126, "42e01f"), (97, "42001f")]);
        let r = reason(check_offer(&firefox, &stream("640028")));
        assert!(
            r.contains("accepts High") && r.contains("640028") && r.contains("42e01f"),
            "{r}"
        );
        let r = reason(check_offer(&firefox, &stream("4d0028")));
        assert!(r.contains("Main"), "{r}");
        // A profile the table does not name must match exactly.
        assert!(check_offer(&offering(&[(96, "6e0028")]), &stream("6e0028")).is_ok());
        assert!(check_offer(&chrome, &stream("6e0028")).is_err());
    }

    #[test]
    fn payload_types_that_declare_the_stream_level_are_preferred_else_it_is_noted() {
        let both = offering(&[(100, "42e01f"), (101, "42e02a")]);
        // 1080p30 from openh264 is level 4: the payload type declaring 4.2 is taken.
        let c = check_offer(&both, &SentStream::constrained_baseline(0x28)).unwrap();
        assert_eq!((c.payload_types, c.level_note), (vec![101], None));
        // At level 3.1 both declare enough.
        let c = check_offer(&both, &CB31).unwrap();
        assert_eq!(c.payload_types, vec![100, 101]);
        // Browsers declare 3.1 only: answered, and the note says why it is worth saying.
        let c = check_offer(
            &offering(&[(100, "42e01f")]),
            &SentStream::constrained_baseline(0x28),
        )
        .unwrap();
        assert_eq!(c.payload_types, vec![100]);
        let note = c.level_note.unwrap();
        assert!(
            note.contains("level 4,") && note.contains("level 3.1"),
            "{note}"
        );
        // No profile-level-id: level 1 is declared.
        let bare = offer(
            "100",
            "a=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n",
            "",
        );
        assert!(
            cb_offer(&bare)
                .unwrap()
                .level_note
                .unwrap()
                .contains("level 1,")
        );
    }

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
        let c = cb_offer(&chrome_like()).unwrap();
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
        assert_eq!(cb_offer(&c.sdp).unwrap().sdp, c.sdp);
    }

    #[test]
    fn mode_0_only_is_refused_naming_the_packetization_mode() {
        let o = offer(
            "127",
            "a=rtpmap:127 H264/90000\r\na=fmtp:127 packetization-mode=0;profile-level-id=42e01f\r\n",
            "",
        );
        assert!(reason(cb_offer(&o)).contains("packetization-mode=1"));
        // No packetization-mode at all means mode 0.
        let o = offer(
            "127",
            "a=rtpmap:127 H264/90000\r\na=fmtp:127 profile-level-id=42e01f\r\n",
            "",
        );
        assert!(reason(cb_offer(&o)).contains("packetization-mode=1"));
    }

    #[test]
    fn high_only_is_refused_naming_the_profile() {
        let o = offer(
            "121",
            "a=rtpmap:121 H264/90000\r\na=fmtp:121 packetization-mode=1;profile-level-id=640c1f\r\n",
            "",
        );
        let r = reason(cb_offer(&o));
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
        assert!(reason(cb_offer(&o)).contains("4d001f"));
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
            assert_eq!(cb_offer(&o).unwrap().payload_types, vec![100], "{plid}");
        }
        // Missing profile-level-id: 42000a, Baseline.
        let o = offer(
            "100",
            "a=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n",
            "",
        );
        assert!(cb_offer(&o).is_ok());
        assert!(!accepts_constrained_baseline("zz0000") && !accepts_constrained_baseline("42"));
    }

    #[test]
    fn no_h264_and_no_video_are_refused() {
        let o = offer("96", "a=rtpmap:96 VP8/90000\r\n", "");
        assert!(reason(cb_offer(&o)).contains("no H.264"));
        let o = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n";
        assert!(reason(cb_offer(o)).contains("no video section"));
        assert!(reason(cb_offer("v=0\r\ns=-\r\n")).contains("no media section"));
        assert!(reason(cb_offer("hello")).contains("v=0"));
    }

    #[test]
    fn extra_media_sections_are_refused() {
        let audio = chrome_like().replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 1 2")
            + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n";
        assert!(reason(cb_offer(&audio)).contains("m=audio"));
        // WHEP (go2rtc offers audio too): accepted and kept for the answer to decline.
        let whep = check_offer_for(&audio, &CB31, true).unwrap();
        assert!(
            whep.sdp.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"),
            "{}",
            whep.sdp
        );
        let two_videos =
            chrome_like() + "m=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:2\r\na=recvonly\r\n";
        assert!(reason(cb_offer(&two_videos)).contains("2 video sections"));
    }

    #[test]
    fn unbundled_offers_are_refused_naming_bundle() {
        let o = chrome_like().replace("a=group:BUNDLE 0 1\r\n", "");
        let r = reason(cb_offer(&o));
        assert!(r.contains("BUNDLE") && r.contains("max-bundle"), "{r}");
        let o = chrome_like().replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0");
        assert!(reason(cb_offer(&o)).contains("\"1\""));
        // A lone video section needs no group.
        let lone = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 100\r\na=mid:v\r\na=recvonly\r\na=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n";
        assert_eq!(cb_offer(lone).unwrap().video_mid, "v");
    }

    #[test]
    fn a_lone_unbundled_section_is_bundled_for_the_stack_and_unbundled_in_the_answer() {
        // webrtc-rs answers only sections in the offer's BUNDLE group: without one, the video
        // section of a lone-section offer (webrtcbin's default) came back rejected.
        let lone = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 100\r\na=mid:video0\r\na=recvonly\r\na=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1\r\n";
        let c = cb_offer(lone).unwrap();
        assert!(c.bundle_group_added);
        assert!(
            c.sdp.contains("t=0 0\r\na=group:BUNDLE video0\r\nm=video"),
            "{}",
            c.sdp
        );
        let answer = "v=0\r\no=- 3 4 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE video0\r\nm=video 9 UDP/TLS/RTP/SAVPF 100\r\na=mid:video0\r\na=sendonly\r\n";
        let to_viewer = answer_for_viewer(answer, &c);
        assert_eq!(to_viewer, answer.replace("a=group:BUNDLE video0\r\n", ""));
        assert_eq!(check_answer(&to_viewer, &c), Ok(100));
        // An offer that bundles keeps its group, and the answer is passed on as it is.
        let bundled = lone.replace("t=0 0\r\n", "t=0 0\r\na=group:BUNDLE video0\r\n");
        let c = cb_offer(&bundled).unwrap();
        assert!(!c.bundle_group_added);
        assert_eq!(c.sdp.matches("a=group:BUNDLE").count(), 1, "{}", c.sdp);
        assert_eq!(answer_for_viewer(answer, &c), answer);
        let c = cb_offer(&chrome_like()).unwrap();
        assert!(!c.bundle_group_added);
    }

    #[test]
    fn send_only_or_rejected_video_is_refused() {
        let o = chrome_like().replace("a=recvonly", "a=sendonly");
        assert!(reason(cb_offer(&o)).contains("sendonly"));
        let o = chrome_like().replace("m=video 9", "m=video 0");
        assert!(reason(cb_offer(&o)).contains("port 0"));
        let o = chrome_like().replace("a=mid:0\r\n", "");
        assert!(reason(cb_offer(&o)).contains("a=mid"));
    }

    #[test]
    fn answers_must_use_an_accepted_payload_type() {
        let c = cb_offer(&chrome_like()).unwrap();
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
    fn probes_need_transport_feedback_and_retransmissions_for_the_sent_type() {
        let answer = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\na=mid:0\r\na=sendonly\r\n\
             a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n\
             a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack\r\na=rtcp-fb:102 transport-cc\r\n\
             a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n";
        assert!(answer_carries_probes(answer, 102));
        // Retransmissions for another payload type only.
        assert!(!answer_carries_probes(answer, 96));
        assert!(answer_carries_probes(
            &answer.replace("a=rtcp-fb:102 transport-cc", "a=rtcp-fb:* transport-cc"),
            102
        ));
        for missing in [
            "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n",
            "a=rtcp-fb:102 transport-cc\r\n",
            "a=rtpmap:103 rtx/90000\r\n",
            "a=fmtp:103 apt=102\r\n",
        ] {
            assert!(
                !answer_carries_probes(&answer.replace(missing, ""), 102),
                "without {missing:?}"
            );
        }
        // Extension in the data channel's section only; a rejected video section; garbage.
        let elsewhere = answer.replace(
            "a=mid:1\r\n",
            "a=mid:1\r\na=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n",
        );
        assert!(!answer_carries_probes(
            &elsewhere.replacen(
                "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\na=rtpmap:102",
                "a=rtpmap:102",
                1
            ),
            102
        ));
        assert!(!answer_carries_probes(
            &answer.replace("m=video 9", "m=video 0"),
            102
        ));
        assert!(!answer_carries_probes("garbage", 102));
    }

    #[test]
    fn lf_only_and_garbage_never_panic() {
        let lf = chrome_like().replace("\r\n", "\n");
        assert_eq!(cb_offer(&lf).unwrap().payload_types, vec![102]);
        for s in [
            "",
            "v=0",
            "v=0\nm=",
            "v=0\nm=video",
            "v=0\nm=video 9 X",
            "v=0\nm=video 9 X 1 2\na=fmtp:",
            "\u{0}\r\n\r\n",
        ] {
            let _ = cb_offer(s);
        }
    }
}
