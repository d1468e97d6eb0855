//! A viewer's video: the sending track, the RTP writer fed from the pipeline (choosing the frames its link takes), and keyframe requests from RTCP.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpRtxParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::PeerConnection;

use super::bandwidth::VIDEO_SHARE;
use super::layers::LayerSelector;
use super::link::Link;
use super::peer::{h264_codec, is_keyframe_request};
use crate::media::fanout::SubscriberId;
use crate::media::frame::EncodedFrame;
use crate::media::pipeline::{PipelineError, PipelineHandle, UsableRate};
use crate::state::{LinkBoard, ViewerLink};

/// One viewer's keyframe requests (PLI/FIR) reach the encoder at most this often: a viewer
/// on a lossy link must not make everyone's stream all keyframes.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// A viewer's link is shown in the device state this often.
const LINK_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A viewer's congestion control, as its writer and RTCP reader use it.
pub(crate) struct Adaptive {
    pub link: Link,
    /// `encoder.min_bitrate`: the estimate's floor (the ceiling follows `encoder.bitrate`).
    pub min_bitrate: u32,
    pub links: LinkBoard,
    /// The anonymized session id the state shows.
    pub viewer: String,
}

/// What the writer tells the RTCP reader and the pipeline.
#[derive(Default)]
struct Shared {
    /// The viewer gets every layer and its pacer is not behind: its keyframe requests may
    /// reach the encoder. A viewer that cannot keep up waits for the next periodic keyframe
    /// instead of forcing one on everyone.
    keeping_up: AtomicBool,
    requests_ignored: AtomicU64,
    /// What it can take for video (read by the capture thread's rate policy).
    usable: UsableRate,
}

/// RTP time between the cached frames a new viewer gets at once (H.264 passthrough): their
/// capture times lie in the past, and spreading them that far apart would make the viewer
/// play them out and stay that far behind. A tick apart it decodes them at once and shows
/// the live picture; each still has its own timestamp.
const PREROLL_SPACING: Duration = Duration::from_millis(1);

/// The sending side of a viewer's video, added to the peer connection before the answer.
pub(crate) struct VideoSender {
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
}

fn random_u32() -> u32 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

impl VideoSender {
    /// Adds rtcam's H.264 track to `pc`.
    pub async fn add_to(pc: &Arc<dyn PeerConnection>) -> Result<Self, String> {
        let ssrc = random_u32();
        let rtx_ssrc = std::iter::repeat_with(random_u32)
            .find(|r| *r != ssrc)
            .unwrap_or(!ssrc);
        let track = TrackLocalStaticSample::new(
            Instant::now(),
            MediaStreamTrack::new(
                "rtcam".to_owned(),
                "rtcam-video".to_owned(),
                "rtcam video".to_owned(),
                RtpCodecKind::Video,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        // Retransmissions and probe padding on their own SSRC (RFC 4588) when
                        // the viewer offers RTX; webrtc-rs drops it when the viewer does not.
                        rtx: Some(RTCRtpRtxParameters { ssrc: rtx_ssrc }),
                        ..Default::default()
                    },
                    codec: h264_codec(),
                    ..Default::default()
                }],
            ),
        )
        .map_err(|e| e.to_string())?;
        let track = Arc::new(track);
        pc.add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { track, ssrc })
    }

    /// Subscribes to encoded frames and starts the writer and the RTCP reader, both tracked
    /// and ending with `cancel`. With `adaptive`, the writer sends what the viewer's link
    /// takes and reports it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        pipeline: &PipelineHandle,
        key: SubscriberId,
        payload_type: u8,
        queue_frames: usize,
        adaptive: Option<Adaptive>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<(), PipelineError> {
        let (frames_tx, frames) = mpsc::channel::<EncodedFrame>(queue_frames);
        let shared = Arc::new(Shared {
            keeping_up: AtomicBool::new(true),
            ..Shared::default()
        });
        let gated = adaptive.is_some();
        let usable = adaptive.as_ref().map(|a| {
            // Known before the first frame: the encoder starts at a rate this viewer takes.
            let start = VIDEO_SHARE * f64::from(a.link.estimate());
            shared.usable.store(start as u32, Ordering::Relaxed);
            shared.usable.clone()
        });
        pipeline.subscribe(key, frames_tx, usable)?;
        let adaptive = adaptive.map(|a| AdaptiveWriter::new(a, key, pipeline, shared.clone()));
        tracker.spawn(
            write_frames(
                self.track.clone(),
                self.ssrc,
                payload_type,
                frames,
                adaptive,
                cancel.clone(),
            )
            .in_current_span(),
        );
        let gate = gated.then_some(shared);
        tracker.spawn(
            read_rtcp(self.track.clone(), pipeline.clone(), gate, cancel.clone()).in_current_span(),
        );
        Ok(())
    }
}

/// The writer's side of a viewer's congestion control.
struct AdaptiveWriter {
    a: Adaptive,
    key: SubscriberId,
    selector: LayerSelector,
    shared: Arc<Shared>,
    /// `encoder.bitrate`, the estimate's ceiling.
    status: tokio::sync::watch::Receiver<crate::media::status::PipelineStatus>,
    sent: VecDeque<Instant>,
    next_report: Instant,
}

impl AdaptiveWriter {
    fn new(a: Adaptive, key: SubscriberId, pipeline: &PipelineHandle, shared: Arc<Shared>) -> Self {
        let mut status = pipeline.status();
        status.mark_changed(); // the first frame applies the current ceiling
        Self {
            a,
            key,
            selector: LayerSelector::default(),
            shared,
            status,
            sent: VecDeque::new(),
            next_report: Instant::now(),
        }
    }

    /// True when `frame` goes to this viewer.
    fn offer(&mut self, now: Instant, frame: &EncodedFrame) -> bool {
        if self.status.has_changed().unwrap_or(false) {
            let ceiling = self.status.borrow_and_update().bitrate;
            self.a.link.set_bounds(self.a.min_bitrate, ceiling);
        }
        let estimate = self.a.link.estimate();
        let backlog = self.a.link.backlog();
        self.shared.usable.store(
            (VIDEO_SHARE * f64::from(estimate)) as u32,
            Ordering::Relaxed,
        );
        let verdict = self.selector.offer(now, frame, estimate, backlog);
        let (layer, layers) = self.selector.layers();
        self.shared
            .keeping_up
            .store(layer + 1 == layers && verdict.is_ok(), Ordering::Relaxed);
        if let Err(why) = verdict {
            tracing::trace!(
                seq = frame.seq,
                layer = frame.temporal_id,
                ?why,
                "frame skipped"
            );
        } else {
            self.sent.push_back(now);
        }
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > Duration::from_secs(1))
        {
            self.sent.pop_front();
        }
        if now >= self.next_report {
            self.next_report = now + LINK_REPORT_INTERVAL;
            self.report(now);
        }
        verdict.is_ok()
    }

    fn report(&self, now: Instant) {
        let r = self.a.link.report(now);
        let (layer, layers) = self.selector.layers();
        let e = r.estimate;
        tracing::debug!(
            estimate = e.estimate_bps,
            remb = e.remb_bps,
            acked = e.acked_bps,
            loss = e.loss,
            rtt_ms = e.rtt.map(|d| d.as_millis() as u64),
            usage = ?e.usage,
            layer,
            layers,
            fps = self.sent.len(),
            backlog_ms = r.backlog.as_millis() as u64,
            retransmitted = r.counters.retransmitted,
            retransmissions_dropped = r.counters.retransmissions_dropped,
            probes = r.counters.probes,
            padding_packets = r.counters.padding_packets,
            "link"
        );
        let feedback = if e.twcc {
            "twcc"
        } else if e.remb_bps.is_some() {
            "remb"
        } else {
            "loss"
        };
        self.a.links.set(
            self.key,
            ViewerLink {
                viewer: self.a.viewer.clone(),
                estimate_bps: e.estimate_bps,
                feedback,
                layer,
                layers,
                fps: self.sent.len() as u32,
                rtt_ms: e.rtt.map(|d| d.as_millis() as u32),
                loss_permille: e.loss.map(|l| (l * 1000.0).round() as u32),
                retransmitted: r.counters.retransmitted,
                retransmissions_dropped: r.counters.retransmissions_dropped,
                keyframe_requests_ignored: self.shared.requests_ignored.load(Ordering::Relaxed),
            },
        );
    }
}

impl Drop for AdaptiveWriter {
    fn drop(&mut self) {
        self.a.links.remove(self.key);
    }
}

async fn write_frames(
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
    mut frames: mpsc::Receiver<EncodedFrame>,
    mut adaptive: Option<AdaptiveWriter>,
    cancel: CancellationToken,
) {
    let mut previous: Option<Instant> = None;
    let mut sent = 0u64;
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => break,
            f = frames.recv() => match f { Some(f) => f, None => break },
        };
        if let Some(preroll) = &frame.preroll {
            // A new viewer's start from the GOP cache: the cached frames first, back to back.
            tracing::debug!(
                frames = preroll.len(),
                first_seq = preroll.first().map(|f| f.seq),
                "starting from the cached GOP"
            );
            for f in preroll.iter() {
                // Through the viewer's layer choice too, so it knows the decoder has the IDR.
                if let Some(a) = adaptive.as_mut()
                    && !a.offer(Instant::now(), f)
                {
                    continue;
                }
                // Sent now: the send-time extension must not claim they left long ago.
                let now = Instant::now();
                write_sample(&track, ssrc, payload_type, f, now, PREROLL_SPACING).await;
                sent += 1;
            }
        }
        if let Some(a) = adaptive.as_mut()
            && !a.offer(Instant::now(), &frame)
        {
            continue;
        }
        // RTP time advances by the capture interval, so frames skipped for this viewer do
        // not compress its timeline.
        let duration = previous
            .map(|p| frame.captured_at.saturating_duration_since(p))
            .filter(|d| !d.is_zero())
            .unwrap_or(frame.duration);
        previous = Some(frame.captured_at);
        let at = frame.captured_at;
        write_sample(&track, ssrc, payload_type, &frame, at, duration).await;
        sent += 1;
        if sent == 1 {
            tracing::debug!(
                seq = frame.seq,
                keyframe = frame.keyframe,
                "first frame sent"
            );
        }
    }
}

/// Sends one access unit made `at`; `duration` is how far RTP time moves on after it.
async fn write_sample(
    track: &TrackLocalStaticSample,
    ssrc: u32,
    payload_type: u8,
    frame: &EncodedFrame,
    at: Instant,
    duration: Duration,
) {
    let sample = Sample {
        data: frame.data.clone(),
        duration,
        ..Sample::new(at)
    };
    if let Err(e) = track
        .sample_writer(ssrc, payload_type)
        .write_sample(&sample)
        .await
    {
        tracing::debug!(error = %e, "write_sample failed");
    }
}

/// Passes the viewer's keyframe requests to the encoder, at most one per
/// [`KEYFRAME_REQUEST_INTERVAL`]; with a `gate` (adaptation), only while the viewer keeps up.
async fn read_rtcp(
    track: Arc<TrackLocalStaticSample>,
    pipeline: PipelineHandle,
    gate: Option<Arc<Shared>>,
    cancel: CancellationToken,
) {
    let mut last_request: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = track.poll() => e,
        };
        match event {
            Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                if !packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                    continue;
                }
                let now = Instant::now();
                if last_request.is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL) {
                    tracing::trace!(
                        "PLI/FIR within {KEYFRAME_REQUEST_INTERVAL:?} of the last one; ignored"
                    );
                    if let Some(g) = &gate {
                        g.requests_ignored.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if let Some(g) = &gate
                    && !g.keeping_up.load(Ordering::Relaxed)
                {
                    tracing::trace!(
                        "PLI/FIR from a viewer that cannot keep up: it waits for the next periodic keyframe"
                    );
                    g.requests_ignored.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                last_request = Some(now);
                tracing::debug!("PLI/FIR from viewer");
                pipeline.request_keyframe();
            }
            Some(_) => {}
            None => break,
        }
    }
}
