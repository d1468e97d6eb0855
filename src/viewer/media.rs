//! A viewer's video: the sending track, the RTP writer fed from the pipeline, and keyframe requests from RTCP.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::PeerConnection;

use super::peer::{h264_codec, is_keyframe_request};
use crate::media::fanout::SubscriberId;
use crate::media::frame::EncodedFrame;
use crate::media::pipeline::{PipelineError, PipelineHandle};

/// One viewer's keyframe requests (PLI/FIR) reach the encoder at most this often: a viewer
/// on a lossy link must not make everyone's stream all keyframes.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

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
    /// and ending with `cancel`.
    pub fn start(
        &self,
        pipeline: &PipelineHandle,
        key: SubscriberId,
        payload_type: u8,
        queue_frames: usize,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<(), PipelineError> {
        let (frames_tx, frames) = mpsc::channel::<EncodedFrame>(queue_frames);
        pipeline.subscribe(key, frames_tx)?;
        tracker.spawn(
            write_frames(
                self.track.clone(),
                self.ssrc,
                payload_type,
                frames,
                cancel.clone(),
            )
            .in_current_span(),
        );
        tracker.spawn(
            read_rtcp(self.track.clone(), pipeline.clone(), cancel.clone()).in_current_span(),
        );
        Ok(())
    }
}

async fn write_frames(
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
    mut frames: mpsc::Receiver<EncodedFrame>,
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
                // Sent now: the send-time extension must not claim they left long ago.
                let now = Instant::now();
                write_sample(&track, ssrc, payload_type, f, now, PREROLL_SPACING).await;
                sent += 1;
            }
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

async fn read_rtcp(
    track: Arc<TrackLocalStaticSample>,
    pipeline: PipelineHandle,
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
