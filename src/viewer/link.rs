//! A viewer's congestion control inside webrtc-rs's interceptor chain: feedback into its bandwidth estimate, pacing, probes and the retransmission budget out, shared with its writer through a `Link`.
//!
//! webrtc-rs 0.21 gives the pieces this is built on: TWCC feedback decoding (`convert_twcc`),
//! the NACK responder and the RTCP packet types. Its `CongestionControlInterceptor` + `Gcc` estimator are not used:
//! `Gcc` hears only TWCC (no REMB, no receiver reports), starts at 300 kbit/s and climbs 8 % a
//! second, its delay detector compares the raw per-group delay with the threshold (libwebrtc
//! scales it by the number of deltas), its estimate reaches the application only through
//! `get_stats`, and the send history counts packets a lost feedback packet did not cover as
//! lost. What rtcam adds here:
//! * [`TwccHistory`]: matches TWCC feedback to what was sent and hands it to rtcam's own
//!   estimator ([`super::bandwidth`]).
//! * [`FeedbackTap`]: reads REMB, receiver reports (loss; round trip from the sender reports it
//!   saw leave) and stamps the absolute send time (for viewers that estimate with REMB) on each
//!   packet as it leaves the pacer.
//! * [`TwccNumbering`]: the transport-wide sequence numbers, on the retransmission (RTX)
//!   stream too (webrtc-rs's `TwccSenderInterceptor` numbers only the media SSRC).
//! * [`PacedSender`]: paces at [`PACING_FACTOR`] times the estimate, in bursts of
//!   [`BURST_INTERVAL`] ([`CLEAR_BURST_INTERVAL`] on a path that carries the ceiling), sends
//!   retransmissions first but only within their budget and while still useful, sends the
//!   estimate's bandwidth probes (media, then RTX copies of recent packets as padding), and
//!   tells the writer how much is queued (webrtc-rs's pacer follows only its own estimate and
//!   hides its queue).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket, convert_twcc};
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp::extension::abs_send_time_extension::AbsSendTimeExtension;
use rtc::rtp::extension::transport_cc_extension::TransportCcExtension;
use rtc::sansio::Protocol;
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};

use super::bandwidth::{BandwidthEstimator, EstimateStats, PacketResult};
use super::feedback_trace::{self, Input, TraceClock};
use super::probe::ProbeRequest;

/// Packets leave at this multiple of the estimate: a keyframe is spread over several frame
/// intervals instead of bursting into the path's buffer, while the video (at most
/// [`super::bandwidth::VIDEO_SHARE`] of the estimate) never waits long.
pub(crate) const PACING_FACTOR: f64 = 1.1;
/// Retransmissions may use this share of the estimate (part of the headroom the video leaves).
const RETRANSMIT_SHARE: f64 = 0.1;
/// A packet first sent longer ago than this is not sent again: the viewer has given up on it
/// or asked for a keyframe, and sending it would only delay what is current.
const RETRANSMIT_MAX_AGE: Duration = Duration::from_millis(500);
/// The pacer refuses new media beyond this much queued (the writer keeps far below it).
const MAX_BACKLOG: Duration = Duration::from_secs(2);
/// Sent-time slots kept for retransmission age checks (by RTP sequence number).
const SENT_SLOTS: usize = 4096;

/// Counters a viewer's link keeps, for the device state and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LinkCounters {
    pub nack_packets: u64,
    pub retransmitted: u64,
    /// Retransmissions not sent: too old or over budget.
    pub retransmissions_dropped: u64,
    /// Media packets refused by a full pacer.
    pub pacer_dropped: u64,
    /// Bandwidth probes sent, and of their packets those that were padding.
    pub probes: u64,
    pub padding_packets: u64,
}

#[derive(Debug)]
struct LinkState {
    estimator: BandwidthEstimator,
    /// Bytes waiting in the pacer.
    backlog_bytes: usize,
    counters: LinkCounters,
    trace_clock: TraceClock,
    /// The floor and ceiling last set (the writer sets them again at every pipeline change).
    bounds: (u32, u32),
    /// The session's span: feedback arrives in webrtc-rs's tasks, outside it, and the lines
    /// logged from it (trace lines, probe reads) must still say whose they are.
    span: tracing::Span,
}

impl LinkState {
    /// Logs an input of the estimate as a [`feedback_trace`] line, when that target logs at
    /// trace level (`input` is not even built otherwise).
    fn trace(&mut self, input: impl FnOnce(&mut TraceClock) -> Input) {
        if tracing::enabled!(target: feedback_trace::TARGET, tracing::Level::TRACE) {
            let line = input(&mut self.trace_clock);
            self.span
                .in_scope(|| tracing::trace!(target: feedback_trace::TARGET, "{line}"));
        }
    }
}

/// One viewer's congestion state, shared by its interceptors and its writer.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    state: Arc<Mutex<LinkState>>,
}

/// A snapshot of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkReport {
    pub estimate: EstimateStats,
    pub backlog: Duration,
    pub counters: LinkCounters,
}

impl Link {
    pub fn new(floor: u32, ceiling: u32) -> Self {
        let mut state = LinkState {
            estimator: BandwidthEstimator::new(floor, ceiling),
            backlog_bytes: 0,
            counters: LinkCounters::default(),
            trace_clock: TraceClock::default(),
            bounds: (floor, ceiling),
            span: tracing::Span::current(),
        };
        state.trace(|_| Input::Bounds { floor, ceiling });
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Plain numbers: a panic elsewhere cannot leave them unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bandwidth estimate, bits per second.
    pub fn estimate(&self) -> u32 {
        self.lock().estimator.estimate()
    }

    /// The pacing rate (bits per second) and the largest burst (bits) at `now`.
    fn pacing(&self, now: Instant) -> (f64, f64) {
        let s = self.lock();
        let rate = pacing_rate(s.estimator.estimate());
        (rate, burst(rate, s.estimator.path_is_clear(now)))
    }

    /// The round trip from the viewer's receiver reports, once one came.
    fn rtt(&self) -> Option<Duration> {
        self.lock().estimator.reported_rtt()
    }

    /// A probe to send now, if the estimate wants one (see [`super::probe`]).
    fn probe_request(&self, now: Instant) -> Option<ProbeRequest> {
        self.lock().estimator.probe_request(now)
    }

    /// How long what waits in the pacer takes to leave.
    pub fn backlog(&self) -> Duration {
        let s = self.lock();
        backlog_time(s.backlog_bytes, s.estimator.estimate())
    }

    /// The answer negotiated transport-wide feedback and retransmissions: the estimate starts
    /// low and probes find the path ([`BandwidthEstimator::expect_probes`]).
    pub fn expect_probes(&self) {
        let mut s = self.lock();
        s.trace(|_| Input::ExpectProbes);
        s.estimator.expect_probes();
    }

    /// New floor and ceiling for the estimate (`encoder.min_bitrate`, `encoder.bitrate`).
    pub fn set_bounds(&self, floor: u32, ceiling: u32) {
        let mut s = self.lock();
        if s.bounds == (floor, ceiling) {
            return;
        }
        s.bounds = (floor, ceiling);
        s.trace(|_| Input::Bounds { floor, ceiling });
        s.estimator.set_bounds(floor, ceiling);
    }

    pub fn report(&self, now: Instant) -> LinkReport {
        let s = self.lock();
        LinkReport {
            estimate: s.estimator.stats(now),
            backlog: backlog_time(s.backlog_bytes, s.estimator.estimate()),
            counters: s.counters,
        }
    }
}

fn pacing_rate(estimate: u32) -> f64 {
    PACING_FACTOR * f64::from(estimate)
}

fn backlog_time(bytes: usize, estimate: u32) -> Duration {
    Duration::from_secs_f64(bytes as f64 * 8.0 / pacing_rate(estimate).max(1.0))
}

/// The transport-wide-cc header extension id of each bound stream's SSRCs, media and RTX
/// (both carry the transport-wide sequence number).
#[derive(Debug, Default)]
struct TwccStreams(std::collections::HashMap<u32, u8>);

impl TwccStreams {
    fn bind(&mut self, info: &StreamInfo) {
        if let Some(ext) = info
            .rtp_header_extensions
            .iter()
            .find(|e| e.uri == rtc::sdp::extmap::TRANSPORT_CC_URI)
            && let Ok(id) = u8::try_from(ext.id)
            && (1..=14).contains(&id)
        {
            self.0.insert(info.ssrc, id);
            if let Some(rtx) = info.ssrc_rtx {
                self.0.insert(rtx, id);
            }
        }
    }

    fn unbind(&mut self, info: &StreamInfo) {
        self.0.remove(&info.ssrc);
        if let Some(rtx) = info.ssrc_rtx {
            self.0.remove(&rtx);
        }
    }

    fn get(&self, ssrc: &u32) -> Option<&u8> {
        self.0.get(ssrc)
    }
}

/// Writes the transport-wide sequence number on every RTP packet of a bound stream, its
/// retransmission (RTX) stream included. webrtc-rs's `TwccSenderInterceptor` numbers only
/// the media SSRC, so retransmissions and probe padding, which leave on the RTX SSRC, would
/// be invisible to the feedback the estimate and the probes read.
#[derive(Default)]
pub(crate) struct TwccNumbering {
    next: u16,
    ext_ids: TwccStreams,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for TwccNumbering {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(rtp) = &mut msg.message.packet
            && let Some(&id) = self.ext_ids.get(&rtp.header.ssrc)
        {
            let ext = TransportCcExtension {
                transport_sequence: self.next,
            };
            self.next = self.next.wrapping_add(1);
            if let Ok(raw) = ext.marshal() {
                let _ = rtp.header.set_extension(id, raw.freeze());
            }
        }
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.writes.pop_front()
    }
}

impl Interceptor for TwccNumbering {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.ext_ids.bind(info);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.ext_ids.unbind(info);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Sent-packet slots kept for matching TWCC feedback (by transport-wide sequence number).
const TWCC_SLOTS: usize = 8192;

/// The send history TWCC feedback is matched against: every RTP packet's transport-wide
/// sequence number (written by webrtc-rs's `TwccSenderInterceptor` just before), release
/// instant and size on the way out; the viewer's feedback (`TransportLayerCc`, decoded with
/// webrtc-rs's `convert_twcc`) on the way in, handed to the link's estimate. Wire-most, so it
/// sees every packet that leaves, retransmissions included.
///
/// Why not webrtc-rs's `CongestionControlInterceptor`: its history reports every packet that
/// no feedback covered as lost, so one lost feedback packet (a tenth of a second of video)
/// reads as a loss burst; here only what the viewer reported as missing counts.
pub(crate) struct TwccHistory {
    link: Link,
    ext_ids: TwccStreams,
    /// By sequence number modulo the slot count: (sequence number, departure, bytes).
    sent: Vec<Option<(u16, Instant, usize)>>,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl TwccHistory {
    pub fn new(link: Link) -> Self {
        Self {
            link,
            ext_ids: TwccStreams::default(),
            sent: vec![None; TWCC_SLOTS],
            reads: VecDeque::new(),
            writes: VecDeque::new(),
        }
    }

    fn feedback(&mut self, now: Instant, fb: &TransportLayerCc) {
        let mut results: Vec<PacketResult> = convert_twcc(fb)
            .into_iter()
            .filter_map(|ack| {
                let seq = ack.sequence_number;
                let (_, departure, size) =
                    self.sent[usize::from(seq) % TWCC_SLOTS].filter(|(s, _, _)| *s == seq)?;
                Some(PacketResult {
                    departure,
                    arrival: if ack.arrived { ack.arrival } else { None },
                    size,
                })
            })
            .collect();
        if results.is_empty() {
            return;
        }
        results.sort_by_key(|r| r.departure);
        let mut link = self.link.lock();
        link.trace(|clock| Input::transport(clock, now, &results));
        if let Some(outcome) = link.estimator.on_transport_feedback(now, &results) {
            let estimate = link.estimator.estimate();
            link.span
                .in_scope(|| tracing::debug!(?outcome, estimate, "probe read"));
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for TwccHistory {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for fb in packets
                .iter()
                .filter_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
            {
                self.feedback(msg.now, fb);
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(rtp) = &msg.message.packet
            && let Some(&id) = self.ext_ids.get(&rtp.header.ssrc)
            && let Some(mut raw) = rtp.header.get_extension(id)
            && let Ok(ext) = TransportCcExtension::unmarshal(&mut raw)
        {
            let seq = ext.transport_sequence;
            let size = rtp.header.marshal_size() + rtp.payload.len();
            self.sent[usize::from(seq) % TWCC_SLOTS] = Some((seq, msg.now, size));
        }
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.writes.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.link.lock().estimator.handle_timeout(now);
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.link.lock().estimator.poll_timeout()
    }
}

impl Interceptor for TwccHistory {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.ext_ids.bind(info);
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.ext_ids.unbind(info);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Reads REMB and receiver reports into the link's estimate, remembers the sender reports
/// that leave (for the round trip), and stamps the absolute send time on RTP leaving the
/// pacer. Wire-ward of the pacer, so the stamp is the release instant.
pub(crate) struct FeedbackTap {
    link: Link,
    local_ssrcs: HashSet<u32>,
    abs_send_time_id: Option<u8>,
    /// Middle 32 bits of the NTP time of recent sender reports, and when they left.
    sender_reports: VecDeque<(u32, Instant)>,
    /// Origin of the absolute send time (any will do: the viewer uses differences).
    epoch: Option<Instant>,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl FeedbackTap {
    pub fn new(link: Link) -> Self {
        Self {
            link,
            local_ssrcs: HashSet::new(),
            abs_send_time_id: None,
            sender_reports: VecDeque::new(),
            epoch: None,
            reads: VecDeque::new(),
            writes: VecDeque::new(),
        }
    }

    fn read_rtcp(&mut self, now: Instant, packet: &dyn rtc::rtcp::Packet) {
        let any = packet.as_any();
        if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
            for block in rr
                .reports
                .iter()
                .filter(|b| self.local_ssrcs.contains(&b.ssrc))
            {
                let rtt = self.round_trip(now, block.last_sender_report, block.delay);
                let mut link = self.link.lock();
                link.trace(|clock| Input::receiver_report(clock, now, block.fraction_lost, rtt));
                link.estimator
                    .on_receiver_report(now, block.fraction_lost, rtt);
            }
        } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
            if remb.bitrate.is_finite() && remb.bitrate >= 0.0 {
                let bps = remb.bitrate as u64;
                let mut link = self.link.lock();
                link.trace(|clock| Input::remb(clock, now, bps));
                link.estimator.on_remb(bps);
            }
        } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>()
            && self.local_ssrcs.contains(&nack.media_ssrc)
        {
            self.link.lock().counters.nack_packets += 1;
        }
    }

    /// RFC 3550 §6.4.1: the report's "last SR" names a sender report seen leaving; the round
    /// trip is the time since minus the delay the viewer held it (1/65536 s units).
    fn round_trip(&self, now: Instant, last_sr: u32, delay: u32) -> Option<Duration> {
        if last_sr == 0 {
            return None;
        }
        let (_, sent) = self
            .sender_reports
            .iter()
            .find(|(middle, _)| *middle == last_sr)?;
        let held = Duration::from_secs_f64(f64::from(delay) / 65536.0);
        now.saturating_duration_since(*sent).checked_sub(held)
    }

    fn stamp(&mut self, now: Instant, packet: &mut rtc::rtp::Packet) {
        let Some(id) = self.abs_send_time_id else {
            return;
        };
        let since = now.saturating_duration_since(*self.epoch.get_or_insert(now));
        let ntp =
            (since.as_secs() << 32) | ((u64::from(since.subsec_nanos()) << 32) / 1_000_000_000);
        if let Ok(raw) = AbsSendTimeExtension::new(ntp).marshal() {
            let _ = packet.header.set_extension(id, raw.freeze());
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for FeedbackTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for p in packets {
                self.read_rtcp(msg.now, p.as_ref());
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        match &mut msg.message.packet {
            Packet::Rtp(rtp) if self.local_ssrcs.contains(&rtp.header.ssrc) => {
                self.stamp(msg.now, rtp);
            }
            Packet::Rtcp(packets) => {
                for sr in packets
                    .iter()
                    .filter_map(|p| p.as_any().downcast_ref::<SenderReport>())
                {
                    self.sender_reports
                        .push_back(((sr.ntp_time >> 16) as u32, msg.now));
                    if self.sender_reports.len() > 16 {
                        self.sender_reports.pop_front();
                    }
                }
            }
            _ => {}
        }
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.writes.pop_front()
    }
}

impl Interceptor for FeedbackTap {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.local_ssrcs.insert(info.ssrc);
        if let Some(ext) = info
            .rtp_header_extensions
            .iter()
            .find(|e| e.uri == rtc::sdp::extmap::ABS_SEND_TIME_URI)
        {
            self.abs_send_time_id = u8::try_from(ext.id).ok().filter(|id| (1..=14).contains(id));
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.local_ssrcs.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// One media packet's send times, for retransmission checks.
#[derive(Debug, Clone, Copy)]
struct SentSlot {
    seq: u16,
    first: Instant,
    resent: Option<Instant>,
}

/// A token bucket in bits. A packet goes while the bucket holds anything and may take it into
/// debt: a packet larger than a slow path's whole burst must still go, and the refill repays
/// the debt, so over time the rate is the refill rate.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    bits: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new() -> Self {
        Self {
            bits: 0.0,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        if let Some(last) = self.last {
            self.bits += now.saturating_duration_since(last).as_secs_f64() * rate;
        } else {
            self.bits = burst;
        }
        self.bits = self.bits.min(burst);
        self.last = Some(now);
    }

    /// Whether a packet may go now, whatever its size.
    fn has_credit(&self) -> bool {
        self.bits > 0.0
    }

    fn spend(&mut self, bytes: usize) {
        self.bits -= bytes as f64 * 8.0;
    }
}

/// The pacer's bursts: this long at the pacing rate, so a burst queues about this long at a
/// bottleneck of the estimated rate. Each burst leaves in one wake-up of the whole WebRTC
/// stack (not one per packet). Longer bursts would mean fewer wake-ups, but while the
/// estimate climbs they seemed to slow the climb after a dip: 15 and 20 ms in the closed-loop
/// simulation (worst 5.5 s against 4.1 s in `linksim`, when it sampled only 2 s of the
/// saw-tooth's phases), 10 ms in the end-to-end dip (full rate back 4.0-6.0 s after it in
/// four runs, 3.2-5.2 s at 5 ms in three); not measured since.
const BURST_INTERVAL: Duration = Duration::from_millis(5);
/// Bursts on a path that has carried the most rtcam may send it for a while (the estimate
/// held at the top by feedback: [`BandwidthEstimator::path_is_clear`]): a 2 Mbit/s frame
/// leaves in one or two wake-ups instead of three or four, while a keyframe is still spread
/// over several frame intervals. Such a burst queues at most this long at a bottleneck that
/// carries the estimate (RFC 9002 7.7: a sender that knows the path absorbs larger bursts may
/// allow them); overuse lowers the estimate and brings the short bursts back. 25 ms and more
/// made the simulated dip (`linksim`) meet overuse right after the estimate reached the top.
///
/// [`BandwidthEstimator::path_is_clear`]: super::bandwidth::BandwidthEstimator::path_is_clear
const CLEAR_BURST_INTERVAL: Duration = Duration::from_millis(20);

/// A full RTP packet, bits.
const FULL_PACKET_BITS: f64 = 1200.0 * 8.0;

/// The most the pacer sends at once: two full packets or [`BURST_INTERVAL`] at the rate
/// ([`CLEAR_BURST_INTERVAL`] on a clear path), whichever is more.
pub(crate) fn burst(rate: f64, clear_path: bool) -> f64 {
    let interval = if clear_path {
        CLEAR_BURST_INTERVAL
    } else {
        BURST_INTERVAL
    };
    (2.0 * FULL_PACKET_BITS).max(rate * interval.as_secs_f64())
}

/// Media packets kept for probe padding: the last this many released.
const PADDING_SOURCES: usize = 32;

/// A media packet probe padding may repeat.
struct PaddingSource {
    sequence_number: u16,
    timestamp: u32,
    payload: bytes::Bytes,
    transport: rtc::shared::TransportContext,
}

/// A bandwidth probe being sent (see [`super::probe`]).
struct ActiveProbe {
    id: u32,
    bps: f64,
    bucket: Bucket,
    bytes_left: isize,
    first: Option<Instant>,
}

/// Paces RTP at [`PACING_FACTOR`] times the link's estimate; retransmissions go first, within
/// [`RETRANSMIT_SHARE`] of the estimate, only for packets sent within [`RETRANSMIT_MAX_AGE`]
/// and not again within a round trip of the last time (libwebrtc's rule: a viewer that asks
/// again for every packet still missing, as aiortc does at each new loss, would otherwise
/// spend the budget on copies in flight). RTCP passes straight through.
///
/// Probes: when the estimate asks for one and the stream has an RTX (RFC 4588) SSRC, the
/// pacer sends the probe's bytes at the probe's rate, media first, then padding: RTX copies
/// of media packets just sent (the viewer already has them and drops them; libwebrtc pads
/// the same way). The pacer numbers every RTX packet itself (webrtc-rs's NACK responder
/// numbers only its own), so retransmissions and padding share one sequence.
pub(crate) struct PacedSender {
    link: Link,
    queue: VecDeque<TaggedPacket>,
    queued_bytes: usize,
    media: Bucket,
    /// The largest burst at the last release, bits (for the next wake-up).
    burst_bits: f64,
    retransmit: Bucket,
    /// When each RTP sequence number (by slot) was first released, and last sent again.
    first_sent: Vec<Option<SentSlot>>,
    /// The RTX (RFC 4588) SSRCs of the bound streams: a retransmission on one of them has its
    /// own sequence number and carries the original one in its first two payload bytes.
    rtx_ssrcs: HashSet<u32>,
    /// Media SSRC → its RTX SSRC and payload type, for padding.
    rtx_of: std::collections::HashMap<u32, (u32, u8)>,
    /// The next RTX sequence number.
    rtx_sequence: u16,
    /// Recent media packets, by media SSRC, for padding.
    padding_sources: VecDeque<(u32, PaddingSource)>,
    padding_next: usize,
    probe: Option<ActiveProbe>,
    released: VecDeque<TaggedPacket>,
    reads: VecDeque<TaggedPacket>,
}

impl PacedSender {
    pub fn new(link: Link) -> Self {
        Self {
            link,
            queue: VecDeque::new(),
            queued_bytes: 0,
            media: Bucket::new(),
            burst_bits: 2.0 * FULL_PACKET_BITS,
            retransmit: Bucket::new(),
            first_sent: vec![None; SENT_SLOTS],
            rtx_ssrcs: HashSet::new(),
            rtx_of: std::collections::HashMap::new(),
            rtx_sequence: random_sequence_number(),
            padding_sources: VecDeque::new(),
            padding_next: 0,
            probe: None,
            released: VecDeque::new(),
            reads: VecDeque::new(),
        }
    }

    /// The media sequence number a retransmission repeats: an RTX packet's original sequence
    /// number (the first two bytes of its payload), else its own.
    fn original_sequence_number(&self, rtp: &rtc::rtp::Packet) -> Option<u16> {
        if self.rtx_ssrcs.contains(&rtp.header.ssrc) {
            let osn = rtp.payload.get(..2)?;
            Some(u16::from_be_bytes([osn[0], osn[1]]))
        } else {
            Some(rtp.header.sequence_number)
        }
    }

    fn size(msg: &TaggedPacket) -> usize {
        match &msg.message.packet {
            Packet::Rtp(rtp) => rtp.header.marshal_size() + rtp.payload.len(),
            _ => 0,
        }
    }

    fn publish_backlog(&self) {
        self.link.lock().backlog_bytes = self.queued_bytes;
    }

    /// Admits a retransmission, or says why not.
    fn admit_retransmission(
        &mut self,
        now: Instant,
        seq: u16,
        bytes: usize,
        estimate: u32,
    ) -> bool {
        let rtt = self.link.rtt();
        let Some(slot) = self.first_sent[usize::from(seq) % SENT_SLOTS]
            .as_mut()
            .filter(|s| s.seq == seq)
        else {
            return false;
        };
        if now.saturating_duration_since(slot.first) > RETRANSMIT_MAX_AGE {
            return false;
        }
        if let (Some(resent), Some(rtt)) = (slot.resent, rtt)
            && now.saturating_duration_since(resent) < rtt
        {
            // The copy sent last is still on its way.
            return false;
        }
        let rate = RETRANSMIT_SHARE * f64::from(estimate);
        // Up to 100 ms of the share at once: a burst of losses is repaired promptly.
        self.retransmit
            .refill(now, rate, (rate * 0.1).max(FULL_PACKET_BITS));
        // An RTX copy of a full packet is larger than a slow viewer's whole burst: it goes on
        // credit, as media does, and the share repays the debt.
        if !self.retransmit.has_credit() {
            return false;
        }
        self.retransmit.spend(bytes);
        slot.resent = Some(now);
        true
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for PacedSender {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        let Packet::Rtp(rtp) = &msg.message.packet else {
            // Feedback is only useful while it is fresh.
            self.released.push_back(msg);
            return Ok(());
        };
        let now = msg.now;
        let size = Self::size(&msg);
        let estimate = self.link.estimate();
        if msg.message.has(&Attribute::Retransmission) {
            let admitted = self
                .original_sequence_number(rtp)
                .is_some_and(|seq| self.admit_retransmission(now, seq, size, estimate));
            let mut s = self.link.lock();
            if admitted {
                s.counters.retransmitted += 1;
            } else {
                s.counters.retransmissions_dropped += 1;
                return Ok(());
            }
            drop(s);
            self.queued_bytes += size;
            self.queue.push_front(msg);
        } else {
            if backlog_time(self.queued_bytes + size, estimate) > MAX_BACKLOG {
                self.link.lock().counters.pacer_dropped += 1;
                return Ok(());
            }
            self.queued_bytes += size;
            self.queue.push_back(msg);
        }
        self.handle_timeout(now)
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.released.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        if self.probe.is_none()
            && !self.padding_sources.is_empty()
            && let Some(request) = self.link.probe_request(now)
        {
            self.probe = Some(ActiveProbe {
                id: request.id,
                bps: request.bps,
                // Starts with no burst: the packets leave evenly spaced at the probe's rate,
                // which is what the estimate measures the path with.
                bucket: Bucket {
                    bits: 1.0,
                    last: Some(now),
                },
                bytes_left: request.bytes as isize,
                first: None,
            });
        }
        if let Some(probe) = self.probe.take() {
            self.send_probe(now, probe);
        } else {
            let (rate, burst) = self.link.pacing(now);
            self.burst_bits = burst;
            self.media.refill(now, rate, burst);
            while let Some(head) = self.queue.front() {
                let size = Self::size(head);
                if !self.media.has_credit() {
                    break;
                }
                self.media.spend(size);
                let Some(packet) = self.queue.pop_front() else {
                    break;
                };
                self.queued_bytes -= size;
                self.release(now, packet);
            }
        }
        self.publish_backlog();
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        if let Some(probe) = &self.probe {
            let last = probe.bucket.last?;
            let wait = (1.0 - probe.bucket.bits).max(0.0) / probe.bps.max(1.0);
            return Some(last + Duration::from_secs_f64(wait).max(Duration::from_micros(500)));
        }
        if self.queue.is_empty() {
            return None;
        }
        let last = self.media.last?;
        let rate = pacing_rate(self.link.estimate());
        // Wake when a whole burst (or all that waits, if less) may leave, rather than as soon
        // as the budget turns positive, which releases one packet per wake-up: the same rate
        // and the same largest burst, with a fraction of the wake-ups, each of which costs a
        // pass over the whole WebRTC stack. Packets leave while the budget is positive, so
        // `n` packets need a budget above `n - 1` of them.
        let queued_bits = self.queued_bytes as f64 * 8.0;
        let wanted = self
            .burst_bits
            .min(queued_bits - FULL_PACKET_BITS + 1.0)
            .max(1.0);
        let wait = (wanted - self.media.bits).max(0.0) / rate.max(1.0);
        Some(last + Duration::from_secs_f64(wait).max(Duration::from_micros(500)))
    }
}

impl PacedSender {
    /// Releases a packet: it departs now (the send history and the absolute send time see
    /// the release instant); media is remembered for retransmission ages and padding, RTX
    /// gets the next RTX sequence number.
    fn release(&mut self, now: Instant, mut packet: TaggedPacket) {
        packet.now = now;
        let retransmission = packet.message.has(&Attribute::Retransmission);
        if let Packet::Rtp(rtp) = &mut packet.message.packet {
            if self.rtx_ssrcs.contains(&rtp.header.ssrc) {
                rtp.header.sequence_number = self.rtx_sequence;
                self.rtx_sequence = self.rtx_sequence.wrapping_add(1);
            } else if !retransmission {
                let seq = rtp.header.sequence_number;
                self.first_sent[usize::from(seq) % SENT_SLOTS] = Some(SentSlot {
                    seq,
                    first: now,
                    resent: None,
                });
                if self.rtx_of.contains_key(&rtp.header.ssrc) {
                    if self.padding_sources.len() == PADDING_SOURCES {
                        self.padding_sources.pop_front();
                    }
                    self.padding_sources.push_back((
                        rtp.header.ssrc,
                        PaddingSource {
                            sequence_number: seq,
                            timestamp: rtp.header.timestamp,
                            payload: rtp.payload.clone(),
                            transport: packet.transport,
                        },
                    ));
                }
            }
        }
        self.released.push_back(packet);
    }

    /// Padding: an RTX copy of a recent media packet (cycling through them), not yet numbered.
    fn padding(&mut self, now: Instant) -> Option<TaggedPacket> {
        if self.padding_sources.is_empty() {
            return None;
        }
        let (ssrc, source) = &self.padding_sources[self.padding_next % self.padding_sources.len()];
        self.padding_next = self.padding_next.wrapping_add(1);
        let &(rtx_ssrc, rtx_payload_type) = self.rtx_of.get(ssrc)?;
        let mut payload = bytes::BytesMut::with_capacity(2 + source.payload.len());
        payload.extend_from_slice(&source.sequence_number.to_be_bytes());
        payload.extend_from_slice(&source.payload);
        let rtp = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                ssrc: rtx_ssrc,
                payload_type: rtx_payload_type,
                timestamp: source.timestamp,
                ..Default::default()
            },
            payload: payload.freeze(),
        };
        Some(TaggedPacket {
            now,
            transport: source.transport,
            message: rtc::interceptor::AttributedPacket::new(Packet::Rtp(rtp)),
        })
    }

    /// Sends what the probe's budget allows now, media first; when all its bytes are out,
    /// tells the estimate when it left. Normal pacing resumes from an empty budget.
    fn send_probe(&mut self, now: Instant, mut probe: ActiveProbe) {
        probe.bucket.refill(now, probe.bps, burst(probe.bps, false));
        let mut out_of_padding = false;
        while probe.bucket.has_credit() && probe.bytes_left > 0 {
            let packet = match self.queue.pop_front() {
                Some(p) => {
                    self.queued_bytes -= Self::size(&p);
                    p
                }
                None => match self.padding(now) {
                    Some(p) => {
                        self.link.lock().counters.padding_packets += 1;
                        p
                    }
                    None => {
                        out_of_padding = true;
                        break;
                    }
                },
            };
            let size = Self::size(&packet);
            probe.bucket.spend(size);
            probe.bytes_left -= size as isize;
            probe.first.get_or_insert(now);
            self.release(now, packet);
        }
        let mut link = self.link.lock();
        if probe.bytes_left <= 0 {
            link.counters.probes += 1;
            link.estimator
                .probe_sent(probe.id, probe.first.unwrap_or(now), now);
            drop(link);
            self.media = Bucket::new();
            self.media.refill(now, 0.0, 0.0);
        } else if out_of_padding {
            // Nothing to pad with (the stream was unbound): a partial probe reads as too few
            // packets, or as what it is if enough left.
            match probe.first {
                Some(first) => link.estimator.probe_sent(probe.id, first, now),
                None => link.estimator.probe_abandoned(probe.id, now),
            }
        } else {
            drop(link);
            self.probe = Some(probe);
        }
    }
}

/// A random first RTX sequence number (RFC 3550 5.1: unpredictable, for the encryption).
fn random_sequence_number() -> u16 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 2];
    // Falls back to 0 (what webrtc-rs's NACK responder starts at) if the system has no
    // randomness to give, which only makes the numbers predictable.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u16::from_be_bytes(bytes)
}

impl Interceptor for PacedSender {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        if let Some(rtx) = info.ssrc_rtx {
            self.rtx_ssrcs.insert(rtx);
            if let Some(pt) = info.payload_type_rtx {
                self.rtx_of.insert(info.ssrc, (rtx, pt));
            }
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        if let Some(rtx) = info.ssrc_rtx {
            self.rtx_ssrcs.remove(&rtx);
        }
        self.rtx_of.remove(&info.ssrc);
        self.padding_sources.retain(|(ssrc, _)| *ssrc != info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viewer::bandwidth;
    use bytes::Bytes;
    use rtc::interceptor::{AttributedPacket, RTPHeaderExtension, Registry, Slot};
    use rtc::rtcp::reception_report::ReceptionReport;
    use rtc::shared::TransportContext;

    const SSRC: u32 = 0x1234;
    const RTX_SSRC: u32 = 0x5678;
    const RTX_PT: u8 = 103;
    const CEILING: u32 = 1_000_000;

    fn rtp(seq: u16) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                ssrc: SSRC,
                sequence_number: seq,
                payload_type: 102,
                ..Default::default()
            },
            payload: Bytes::from(vec![0u8; 1188]),
        }
    }

    fn tagged(now: Instant, packet: Packet, retransmission: bool) -> TaggedPacket {
        let mut message = AttributedPacket::new(packet);
        if retransmission {
            message.add(Attribute::Retransmission);
        }
        TaggedPacket {
            now,
            transport: TransportContext::default(),
            message,
        }
    }

    fn stream() -> StreamInfo {
        StreamInfo {
            ssrc: SSRC,
            ssrc_rtx: Some(RTX_SSRC),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::ABS_SEND_TIME_URI.into(),
                id: 3,
            }],
            ..Default::default()
        }
    }

    /// The chain rtcam builds, minus webrtc-rs's own interceptors.
    fn chain(link: &Link) -> impl Interceptor {
        let mut chain = Registry::new()
            .with(Slot::from(2_500), FeedbackTap::new(link.clone()))
            .with(Slot::Pacer, PacedSender::new(link.clone()))
            .build();
        chain.bind_local_stream(&stream());
        chain
    }

    /// Writes `packet` at `at` (as a retransmission or not) and returns how many packets left.
    fn write_and_count(
        chain: &mut (impl Interceptor + ?Sized),
        at: Instant,
        packet: rtc::rtp::Packet,
        retransmission: bool,
    ) -> usize {
        chain
            .handle_write(tagged(at, Packet::Rtp(packet), retransmission))
            .unwrap();
        drain(chain).len()
    }

    /// Runs the chain's timers until it has nothing queued; returns what left, when.
    fn drain(chain: &mut (impl Interceptor + ?Sized)) -> Vec<(Instant, TaggedPacket)> {
        let mut out = Vec::new();
        loop {
            while let Some(p) = chain.poll_write() {
                out.push((p.now, p));
            }
            let Some(t) = chain.poll_timeout() else {
                return out;
            };
            chain.handle_timeout(t).unwrap();
        }
    }

    fn seq_of(p: &TaggedPacket) -> u16 {
        match &p.message.packet {
            Packet::Rtp(r) => r.header.sequence_number,
            _ => panic!("not RTP"),
        }
    }

    #[test]
    fn a_burst_leaves_at_the_pacing_rate_and_the_backlog_is_published() {
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        for seq in 0..20 {
            chain
                .handle_write(tagged(t0, Packet::Rtp(rtp(seq)), false))
                .unwrap();
        }
        assert!(
            link.backlog() > Duration::from_millis(100),
            "{:?}",
            link.backlog()
        );
        let out = drain(&mut chain);
        assert_eq!(
            out.iter().map(|(_, p)| seq_of(p)).collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
        let span = out.last().unwrap().0 - out[0].0;
        let rate = f64::from(link.estimate()) * PACING_FACTOR;
        // Every bit after the first (full) burst is paid for at the pacing rate; the last
        // packet leaves the budget one packet below zero.
        let expected = (19.0 * FULL_PACKET_BITS - burst(rate, false)) / rate;
        assert!(
            (span.as_secs_f64() - expected).abs() < 0.01,
            "20 packets over {span:?}, expected about {expected:.3} s"
        );
        assert_eq!(link.backlog(), Duration::ZERO);
    }

    #[test]
    fn a_backlog_leaves_in_whole_bursts_not_one_packet_per_wake_up() {
        // A keyframe of 28 full packets: it leaves in whole bursts (here the two-packet
        // floor), each burst one wake-up, not one wake-up per packet.
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        for seq in 0..28 {
            chain
                .handle_write(tagged(t0, Packet::Rtp(rtp(seq)), false))
                .unwrap();
        }
        let out = drain(&mut chain);
        assert_eq!(out.len(), 28);
        let rate = f64::from(link.estimate()) * PACING_FACTOR;
        // Packets leave while the budget is positive: a full budget lets this many go.
        let per_burst = (burst(rate, false) / FULL_PACKET_BITS).ceil() as usize;
        let sizes: Vec<usize> = wake_ups(&out).iter().map(|(_, n)| *n).collect();
        assert!(per_burst >= 2, "{per_burst}");
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n == per_burst)
                && sizes[sizes.len() - 1] <= per_burst,
            "{per_burst} packets per wake-up: {sizes:?}"
        );
        // The rate is unchanged: after the first (full) burst, every bit is paid for at the
        // pacing rate, the last packet leaving the budget one packet below zero.
        let span = (out.last().unwrap().0 - t0).as_secs_f64();
        let expected = (27.0 * FULL_PACKET_BITS - burst(rate, false)) / rate;
        assert!(
            (span - expected).abs() < 0.001,
            "{span} s, expected {expected}"
        );
    }

    /// Groups what left by release instant: the packets of each wake-up.
    fn wake_ups(out: &[(Instant, TaggedPacket)]) -> Vec<(Instant, usize)> {
        let mut groups: Vec<(Instant, usize)> = Vec::new();
        for (t, _) in out {
            match groups.last_mut() {
                Some((at, n)) if at == t => *n += 1,
                _ => groups.push((*t, 1)),
            }
        }
        groups
    }

    #[test]
    fn on_a_clear_path_a_frame_leaves_in_one_wake_up_and_a_keyframe_is_still_paced() {
        let link = Link::new(150_000, 2_000_000);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        let write = |chain: &mut dyn Interceptor, at: Instant, seqs: std::ops::Range<u16>| {
            for seq in seqs {
                chain
                    .handle_write(tagged(at, Packet::Rtp(rtp(seq)), false))
                    .unwrap();
            }
            wake_ups(&drain(chain))
        };
        // Before any feedback, a frame of 6 full packets (1.5 Mbit/s at 30 fps) leaves in
        // short bursts.
        let before = write(&mut chain, t0, 0..6);
        assert!(before.len() >= 3, "{before:?}");
        // Six seconds of feedback without a queue: the estimate climbs to the top and holds.
        bandwidth::testing::steady_feedback(
            &mut link.lock().estimator,
            t0,
            Duration::ZERO,
            Duration::from_secs(6),
        );
        let mut at = t0 + Duration::from_secs(6);
        assert!(link.lock().estimator.path_is_clear(at));
        let rate = f64::from(link.estimate()) * PACING_FACTOR;
        let per_burst = (burst(rate, true) / FULL_PACKET_BITS).ceil() as usize;
        assert!(per_burst >= 6, "{per_burst}");
        // The same frame now leaves at once.
        let clear = write(&mut chain, at, 6..12);
        assert_eq!(clear.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![6]);
        // A keyframe of 40 packets is still spread at the pacing rate, in bursts of the
        // clear path's length.
        at += Duration::from_millis(100);
        let keyframe = write(&mut chain, at, 12..52);
        let sizes: Vec<usize> = keyframe.iter().map(|(_, n)| *n).collect();
        assert!(
            sizes.len() >= 4 && sizes.iter().all(|&n| n <= per_burst),
            "{sizes:?}"
        );
        let span = (keyframe.last().unwrap().0 - at).as_secs_f64();
        let expected = (39.0 * FULL_PACKET_BITS - burst(rate, true)) / rate;
        assert!(
            (span - expected).abs() < 0.002,
            "{span} s, expected {expected}"
        );
    }

    #[test]
    fn retransmissions_go_first_within_their_age_and_budget() {
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        chain
            .handle_write(tagged(t0, Packet::Rtp(rtp(1)), false))
            .unwrap();
        drain(&mut chain);
        // Media queued, then a retransmission of 1: it overtakes the media.
        let t1 = t0 + Duration::from_millis(100);
        for seq in 2..8 {
            chain
                .handle_write(tagged(t1, Packet::Rtp(rtp(seq)), false))
                .unwrap();
        }
        chain
            .handle_write(tagged(t1, Packet::Rtp(rtp(1)), true))
            .unwrap();
        let order: Vec<u16> = drain(&mut chain).iter().map(|(_, p)| seq_of(p)).collect();
        // Before it only what the full budget let go the moment the media was queued.
        let per_burst = (burst(f64::from(link.estimate()) * PACING_FACTOR, false)
            / FULL_PACKET_BITS)
            .ceil() as usize;
        let first_retransmission = order.iter().position(|s| *s == 1).unwrap();
        assert!(first_retransmission <= per_burst, "{order:?}");
        // Never sent, or sent too long ago: not sent again.
        chain
            .handle_write(tagged(t1, Packet::Rtp(rtp(999)), true))
            .unwrap();
        let late = t0 + RETRANSMIT_MAX_AGE + Duration::from_millis(1);
        chain
            .handle_write(tagged(late, Packet::Rtp(rtp(1)), true))
            .unwrap();
        assert!(drain(&mut chain).is_empty());
        let c = link.report(late).counters;
        assert_eq!((c.retransmitted, c.retransmissions_dropped), (1, 2));
        // A storm of requests: only the budget's worth goes out.
        let t2 = late + Duration::from_millis(10);
        for seq in 100..300 {
            chain
                .handle_write(tagged(t2, Packet::Rtp(rtp(seq)), false))
                .unwrap();
        }
        drain(&mut chain);
        let t3 = t2 + Duration::from_millis(200);
        for seq in 100..300 {
            chain
                .handle_write(tagged(t3, Packet::Rtp(rtp(seq)), true))
                .unwrap();
        }
        let resent = drain(&mut chain).len() as f64;
        let budget = RETRANSMIT_SHARE * f64::from(link.estimate()) * 0.1 / (1200.0 * 8.0);
        assert!(
            resent <= budget + 1.0,
            "{resent} retransmitted, budget {budget:.1}"
        );
        assert!(resent >= 1.0);
    }

    #[test]
    fn a_packet_asked_for_again_within_a_round_trip_of_its_copy_is_not_sent_again() {
        // aiortc asks again for every packet still missing at each new loss: in the e2e's
        // (d), copies still in flight spent the budget, and the next loss was not repaired.
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        chain
            .handle_write(tagged(t0, Packet::Rtp(rtp(1)), false))
            .unwrap();
        drain(&mut chain);
        let ask = |chain: &mut dyn Interceptor, ms: u64| {
            write_and_count(chain, t0 + Duration::from_millis(ms), rtp(1), true)
        };
        // (Requests 110 ms or more apart: the budget, a packet per 96 ms at the 1 Mbit/s
        // start, is never what holds one back.) No round trip known yet: each is answered.
        assert_eq!(ask(&mut chain, 10), 1);
        assert_eq!(ask(&mut chain, 120), 1);
        link.lock()
            .estimator
            .on_receiver_report(t0, 0, Some(Duration::from_millis(150)));
        assert_eq!(ask(&mut chain, 240), 0, "within 150 ms of the last copy");
        assert_eq!(
            ask(&mut chain, 280),
            1,
            "a round trip later: that copy was lost"
        );
        let c = link.report(t0 + Duration::from_millis(280)).counters;
        assert_eq!((c.retransmitted, c.retransmissions_dropped), (3, 1));
    }

    #[test]
    fn receiver_reports_and_remb_reach_the_estimate_and_packets_carry_their_send_time() {
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        let sr = SenderReport {
            ssrc: SSRC,
            ntp_time: 0xAABB_CCDD_EEFF_0011,
            ..Default::default()
        };
        chain
            .handle_write(tagged(t0, Packet::Rtcp(vec![Box::new(sr)]), false))
            .unwrap();
        chain
            .handle_write(tagged(t0, Packet::Rtp(rtp(7)), false))
            .unwrap();
        let out = drain(&mut chain);
        let stamped = out
            .iter()
            .find_map(|(_, p)| match &p.message.packet {
                Packet::Rtp(r) => r.header.get_extension(3),
                _ => None,
            })
            .expect("absolute send time on the RTP packet");
        assert_eq!(stamped.len(), 3);

        // The viewer held the report 10 ms and answers 50 ms after it left: 40 ms round trip.
        let rr = ReceiverReport {
            ssrc: 1,
            reports: vec![ReceptionReport {
                ssrc: SSRC,
                fraction_lost: 128,
                last_sender_report: 0xCCDD_EEFF,
                delay: 655, // 10 ms in 1/65536 s
                ..Default::default()
            }],
            ..Default::default()
        };
        let remb = ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 400_000.0,
            ssrcs: vec![SSRC],
        };
        let t1 = t0 + Duration::from_millis(50);
        chain
            .handle_read(tagged(
                t1,
                Packet::Rtcp(vec![Box::new(rr), Box::new(remb)]),
                false,
            ))
            .unwrap();
        let report = link.report(t1);
        let rtt = report.estimate.rtt.unwrap();
        assert!(
            rtt.abs_diff(Duration::from_millis(40)) < Duration::from_millis(1),
            "{rtt:?}"
        );
        assert_eq!(report.estimate.loss, Some(0.5));
        assert!(link.estimate() <= 400_000, "{}", link.estimate());
    }

    /// An RFC 4588 retransmission of `original`, with its own sequence number.
    fn rtx(rtx_seq: u16, original: u16) -> rtc::rtp::Packet {
        let mut payload = original.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0u8; 1188]);
        rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                ssrc: RTX_SSRC,
                sequence_number: rtx_seq,
                payload_type: 103,
                ..Default::default()
            },
            payload: Bytes::from(payload),
        }
    }

    #[test]
    fn a_full_sized_rtx_copy_is_sent_on_a_slow_link() {
        // The e2e's (a) at 600 kbit/s: the budget held at most one 1200-byte packet, and an
        // RTX copy (its 2-byte original sequence number on top) is larger, so below about
        // 960 kbit/s no lost full packet was ever repaired and the viewer waited for a keyframe.
        let link = Link::new(150_000, CEILING);
        link.lock().estimator.on_remb(500_000);
        assert_eq!(link.estimate(), 500_000);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        assert_eq!(write_and_count(&mut chain, t0, rtp(1), false), 1);
        assert_eq!(write_and_count(&mut chain, t0, rtp(2), false), 1);
        let t1 = t0 + Duration::from_millis(60);
        assert_eq!(
            write_and_count(&mut chain, t1, rtx(0, 1), true),
            1,
            "the first copy"
        );
        // The first copy took the budget (one packet's burst) into debt: a second copy at the
        // same moment is refused, and one 250 ms later (12.5 kbit of a 50 kbit/s share) goes.
        assert_eq!(
            write_and_count(&mut chain, t1, rtx(1, 2), true),
            0,
            "within the budget's debt"
        );
        let t2 = t1 + Duration::from_millis(250);
        assert_eq!(
            write_and_count(&mut chain, t2, rtx(2, 2), true),
            1,
            "once the budget refilled"
        );
        let c = link.report(t2).counters;
        assert_eq!((c.retransmitted, c.retransmissions_dropped), (2, 1));
    }

    #[test]
    fn an_rtx_retransmission_is_judged_by_the_packet_it_repeats() {
        let link = Link::new(150_000, CEILING);
        let mut chain = chain(&link);
        let t0 = Instant::now();
        chain
            .handle_write(tagged(t0, Packet::Rtp(rtp(500)), false))
            .unwrap();
        drain(&mut chain);
        // RTX sequence numbers are their own: 7 was never sent as media, 500 was.
        let t1 = t0 + Duration::from_millis(100);
        chain
            .handle_write(tagged(t1, Packet::Rtp(rtx(7, 500)), true))
            .unwrap();
        let out = drain(&mut chain);
        assert_eq!(out.len(), 1, "the repair of 500 is sent");
        chain
            .handle_write(tagged(t1, Packet::Rtp(rtx(500, 7)), true))
            .unwrap();
        assert!(drain(&mut chain).is_empty(), "7 was never sent");
        let c = link.report(t1).counters;
        assert_eq!((c.retransmitted, c.retransmissions_dropped), (1, 1));
    }

    /// A TWCC report from `base`: `statuses` (true: arrived); packet n arrives at (n + 1) × 10 ms.
    fn twcc(base: u16, statuses: &[bool]) -> TransportLayerCc {
        use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
            PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, SymbolTypeTcc,
        };
        let symbol = |arrived: bool| {
            if arrived {
                SymbolTypeTcc::PacketReceivedLargeDelta
            } else {
                SymbolTypeTcc::PacketNotReceived
            }
        };
        let packet_chunks = statuses
            .iter()
            .map(|arrived| {
                PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                    type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                    packet_status_symbol: symbol(*arrived),
                    run_length: 1,
                })
            })
            .collect();
        let mut previous_us = 0;
        let mut recv_deltas = Vec::new();
        for (i, arrived) in statuses.iter().enumerate() {
            if *arrived {
                let at_us = (i64::from(base) + i as i64 + 1) * 10_000;
                recv_deltas.push(RecvDelta {
                    type_tcc_packet: symbol(true),
                    delta: at_us - previous_us,
                });
                previous_us = at_us;
            }
        }
        TransportLayerCc {
            sender_ssrc: 1,
            media_ssrc: SSRC,
            base_sequence_number: base,
            packet_status_count: statuses.len() as u16,
            reference_time: 0,
            fb_pkt_count: 0,
            packet_chunks,
            recv_deltas,
        }
    }

    fn rtp_fields(p: &TaggedPacket) -> (u32, u8, u16, Bytes) {
        match &p.message.packet {
            Packet::Rtp(r) => (
                r.header.ssrc,
                r.header.payload_type,
                r.header.sequence_number,
                r.payload.clone(),
            ),
            _ => panic!("not RTP"),
        }
    }

    #[test]
    fn a_probe_leaves_at_its_rate_media_first_then_rtx_padding_in_the_one_rtx_sequence() {
        let link = Link::new(150_000, 2_000_000);
        let mut chain = Registry::new()
            .with(Slot::Pacer, PacedSender::new(link.clone()))
            .build();
        chain.bind_local_stream(&StreamInfo {
            payload_type_rtx: Some(RTX_PT),
            ..stream()
        });
        let t0 = Instant::now();
        // Before any feedback: no probe (nothing could read it).
        for seq in 0..3 {
            chain
                .handle_write(tagged(t0, Packet::Rtp(rtp(seq)), false))
                .unwrap();
        }
        assert_eq!(drain(&mut chain).len(), 3);
        assert_eq!(link.report(t0).counters.probes, 0);
        // A second of feedback without a queue: the estimate (about 1.1 Mbit/s) asks for a
        // probe at one and a half times itself when the next packet comes.
        bandwidth::testing::steady_feedback(
            &mut link.lock().estimator,
            t0,
            Duration::ZERO,
            Duration::from_secs(1),
        );
        let at = t0 + Duration::from_millis(1_200);
        let estimate = f64::from(link.estimate());
        chain
            .handle_write(tagged(at, Packet::Rtp(rtp(3)), false))
            .unwrap();
        let out = drain(&mut chain);
        let counters = link.report(at).counters;
        assert_eq!(counters.probes, 1);
        assert_eq!(counters.padding_packets as usize, out.len() - 1);
        assert!(out.len() >= 5, "{} packets", out.len());
        // Media first, then RTX copies of the packets sent (original sequence number first).
        assert_eq!(rtp_fields(&out[0].1).2, 3);
        let padding: Vec<_> = out[1..].iter().map(|(_, p)| rtp_fields(p)).collect();
        let first_rtx = padding[0].2;
        for (i, (ssrc, pt, seq, payload)) in padding.iter().enumerate() {
            assert_eq!((*ssrc, *pt), (RTX_SSRC, RTX_PT));
            assert_eq!(*seq, first_rtx.wrapping_add(i as u16), "one RTX sequence");
            let osn = u16::from_be_bytes([payload[0], payload[1]]);
            assert!(osn <= 3, "repeats a packet sent: {osn}");
            assert_eq!(payload.len(), 2 + 1188);
        }
        // Evenly spaced at the probe's rate, not the pacing rate.
        let span = (out.last().unwrap().0 - out[0].0).as_secs_f64();
        let rate = (out.len() - 1) as f64 * 1200.0 * 8.0 / span;
        assert!(
            (1.45 * estimate..=1.55 * estimate).contains(&rate),
            "{rate:.0} bit/s against an estimate of {estimate:.0}"
        );
        // A retransmission on the RTX stream (numbered by webrtc-rs's responder from 0)
        // continues the pacer's RTX sequence.
        let mut rtx = rtp(0);
        rtx.header.ssrc = RTX_SSRC;
        rtx.header.payload_type = RTX_PT;
        rtx.payload = Bytes::from([&[0u8, 3][..], &[0u8; 1188][..]].concat());
        let later = out.last().unwrap().0;
        chain
            .handle_write(tagged(later, Packet::Rtp(rtx), true))
            .unwrap();
        let repaired = drain(&mut chain);
        assert_eq!(repaired.len(), 1);
        assert_eq!(
            rtp_fields(&repaired[0].1).2,
            padding.last().unwrap().2.wrapping_add(1)
        );
    }

    #[test]
    fn transport_wide_numbers_cover_the_rtx_stream_too() {
        const TWCC_ID: u8 = 5;
        let mut numbering = TwccNumbering::default();
        numbering.bind_local_stream(&StreamInfo {
            ssrc: SSRC,
            ssrc_rtx: Some(RTX_SSRC),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.into(),
                id: TWCC_ID.into(),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        for (ssrc, expected) in [
            (SSRC, Some(0)),
            (RTX_SSRC, Some(1)),
            (0x9999, None),
            (SSRC, Some(2)),
        ] {
            let mut packet = rtp(7);
            packet.header.ssrc = ssrc;
            numbering
                .handle_write(tagged(t0, Packet::Rtp(packet), false))
                .unwrap();
            let out = numbering.poll_write().expect("passed on");
            let Packet::Rtp(r) = &out.message.packet else {
                panic!("not RTP")
            };
            let number = r.header.get_extension(TWCC_ID).map(|mut raw| {
                TransportCcExtension::unmarshal(&mut raw)
                    .unwrap()
                    .transport_sequence
            });
            assert_eq!(number, expected, "SSRC {ssrc:#x}");
        }
    }

    #[test]
    fn twcc_feedback_counts_as_lost_only_what_the_viewer_reported_missing() {
        const TWCC_ID: u8 = 5;
        let link = Link::new(150_000, CEILING);
        let mut history = TwccHistory::new(link.clone());
        history.bind_local_stream(&StreamInfo {
            ssrc: SSRC,
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.into(),
                id: TWCC_ID.into(),
            }],
            ..Default::default()
        });
        let t0 = Instant::now();
        for seq in 0..100u16 {
            let mut packet = rtp(seq);
            let ext = TransportCcExtension {
                transport_sequence: seq,
            };
            packet
                .header
                .set_extension(TWCC_ID, ext.marshal().unwrap().into())
                .unwrap();
            let at = t0 + Duration::from_millis(10 * u64::from(seq));
            history
                .handle_write(tagged(at, Packet::Rtp(packet), false))
                .unwrap();
            assert!(history.poll_write().is_some(), "packet {seq} passed on");
        }
        // Feedback for 0-19 with 5 missing; the one for 20-39 is lost on the way; 40-99 all
        // arrived; and a report of packets never sent, which must count for nothing.
        let mut first = [true; 20];
        first[5] = false;
        let reports = [
            (0, first.to_vec()),
            (40, vec![true; 60]),
            (1_000, vec![false; 20]),
        ];
        let t1 = t0 + Duration::from_millis(1_050);
        for (base, statuses) in reports {
            history
                .handle_read(tagged(
                    t1,
                    Packet::Rtcp(vec![Box::new(twcc(base, &statuses))]),
                    false,
                ))
                .unwrap();
            assert!(history.poll_read().is_some(), "feedback passed on");
        }
        let stats = link.report(t1).estimate;
        assert!(stats.twcc);
        assert_eq!(stats.loss, Some(1.0 / 80.0));
        // 1200-byte packets 10 ms apart on the viewer's clock: about 1 Mbit/s received.
        let acked = stats.acked_bps.expect("an acknowledged rate");
        assert!((900_000..=1_050_000).contains(&acked), "{acked}");
    }
}
