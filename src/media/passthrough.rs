//! The camera's own H.264 in the capture thread: checked access units, SPS/PPS in front of IDRs, the GOP cache new viewers start from, forced keyframes.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::frame::EncodedFrame;
use super::h264::gop::{GopCache, Passthrough, PassthroughError};
use super::source::{CodedSource, SourceError};
use super::video_encoder::EncoderStatus;
use crate::protocol::sdp::SentStream;

/// An IDR is asked of the camera at most this often while none arrives: a camera takes a
/// frame or two to answer, and every request could make another IDR.
const FORCE_INTERVAL: Duration = Duration::from_secs(1);

/// What one camera buffer became.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Pass it on: to viewers already watching as it is; to a new one after [`start`].
    ///
    /// [`start`]: CameraStream::start
    Frame {
        frame: EncodedFrame,
        /// Bytes copied out of the camera's buffer (the access unit; no pixels).
        bytes_copied: u64,
    },
    /// Parameter sets only: kept for the IDRs that lack them.
    Kept,
    /// Not passed on. `corrupt`: unusable data (not valid H.264, an IDR without parameter
    /// sets, or a picture that depends on a frame the driver lost), counted; otherwise the
    /// pictures before the first IDR, which are normal at the start.
    Dropped { corrupt: bool, reason: String },
}

/// The camera's H.264 stream as the capture thread passes it through.
pub(crate) struct CameraStream {
    passthrough: Passthrough,
    cache: GopCache,
    status: EncoderStatus,
    stream: SentStream,
    frame_duration: Duration,
    /// When an IDR was last asked for; cleared when one arrives.
    forced_at: Option<Instant>,
    /// The driver lost frames: what follows until the next IDR refers to a missing picture.
    lost: bool,
}

impl CameraStream {
    /// For a camera opened with `capture.format = "H264"`; `cache_bytes` bounds the GOP cache
    /// (0: none).
    pub fn new(coded: &dyn CodedSource, cache_bytes: usize, frame_duration: Duration) -> Self {
        let (profile_idc, constraints, level_idc) = coded.profile_level();
        Self {
            passthrough: Passthrough::default(),
            cache: GopCache::new(cache_bytes),
            status: EncoderStatus {
                backend: "camera",
                device: None,
                input: "passthrough",
                reason: format!(
                    "the camera's own H.264, passed through without re-encoding ({})",
                    coded.applied()
                ),
                fallback: None,
                keyframes_unavailable: coded.keyframes_unavailable(),
            },
            stream: SentStream {
                profile_idc,
                constraints,
                level_idc,
            },
            frame_duration,
            forced_at: None,
            lost: false,
        }
    }

    pub fn status(&self) -> &EncoderStatus {
        &self.status
    }

    /// The profile and level of the camera's SPS.
    pub fn stream(&self) -> SentStream {
        self.stream
    }

    /// What a new viewer gets before the next frame: the last IDR and what followed.
    pub fn start(&self) -> &[EncodedFrame] {
        self.cache.start()
    }

    /// Asks the camera for an IDR (a viewer's PLI, the `keyframe` command, or a new viewer
    /// with nothing cached), unless it cannot or was just asked.
    pub fn force_keyframe(&mut self, coded: &mut dyn CodedSource, now: Instant) {
        if self.status.keyframes_unavailable.is_some()
            || self
                .forced_at
                .is_some_and(|t| now.duration_since(t) < FORCE_INTERVAL)
        {
            return;
        }
        self.forced_at = Some(now);
        if let Err(e) = coded.force_keyframe() {
            tracing::debug!("asking the camera for an IDR: {e}");
        }
    }

    /// Reads the camera's next buffer and decides what it becomes. Camera failures and
    /// buffers the driver flagged are errors (the caller counts `BadFrame`).
    pub fn next(&mut self, coded: &mut dyn CodedSource) -> Result<Outcome, SourceError> {
        let mut got = None;
        coded.next_access_unit(&mut |data, meta| {
            // The one copy: out of the camera's buffer, which goes straight back to the driver.
            got = Some((Bytes::copy_from_slice(data), meta));
        })?;
        let Some((data, meta)) = got else {
            return Ok(Outcome::Kept);
        };
        Ok(self.accept(data, meta.seq, meta.captured_at, meta.lost_before))
    }

    /// Checks one access unit (see [`next`](Self::next)); pure, for the tests.
    fn accept(&mut self, data: Bytes, seq: u64, captured_at: Instant, lost_before: u32) -> Outcome {
        if lost_before > 0 {
            // The pictures after a loss may refer to what was lost: start again at an IDR.
            tracing::debug!(
                lost_before,
                "the camera's driver lost frames; waiting for an IDR"
            );
            self.passthrough.discontinuity();
            self.cache.reset();
            self.lost = true;
        }
        let bytes_copied = data.len() as u64;
        let frame = EncodedFrame {
            data,
            keyframe: false,
            seq,
            captured_at,
            duration: self.frame_duration,
            // One layer; no encoder target of rtcam's: a viewer's layer choice goes by the
            // bytes measured.
            temporal_id: 0,
            target_bps: u32::MAX,
            preroll: None,
        };
        match self.passthrough.accept(frame) {
            Ok(None) => Outcome::Kept,
            Ok(Some(frame)) => {
                if frame.keyframe {
                    self.forced_at = None;
                    self.lost = false;
                }
                Outcome::Frame {
                    frame,
                    bytes_copied,
                }
            }
            Err(PassthroughError::BeforeFirstIdr) => Outcome::Dropped {
                corrupt: self.lost,
                reason: if self.lost {
                    "refers to a frame the driver lost; waiting for an IDR".into()
                } else {
                    "before the first IDR".into()
                },
            },
            Err(e) => Outcome::Dropped {
                corrupt: true,
                reason: e.to_string(),
            },
        }
    }

    /// Remembers a frame that was passed on, for viewers that come later.
    pub fn sent(&mut self, frame: &EncodedFrame) {
        self.cache.push(frame);
    }
}

/// The capture thread's own work per access unit in passthrough, with no camera: the copy out
/// of the buffer, the checks, SPS/PPS in front of IDRs and the GOP cache. For the benchmark.
pub struct PassthroughStage(CameraStream);

impl PassthroughStage {
    pub fn new(cache_bytes: usize, frame_duration: Duration) -> Self {
        Self(CameraStream {
            passthrough: Passthrough::default(),
            cache: GopCache::new(cache_bytes),
            status: EncoderStatus {
                backend: "camera",
                device: None,
                input: "passthrough",
                reason: "no camera (benchmark)".into(),
                fallback: None,
                keyframes_unavailable: None,
            },
            stream: SentStream {
                profile_idc: 0,
                constraints: 0,
                level_idc: 0,
            },
            frame_duration,
            forced_at: None,
            lost: false,
        })
    }

    /// One camera buffer holding `data`: what goes to viewers, if anything.
    pub fn push(&mut self, data: &[u8], seq: u64) -> Option<Bytes> {
        match self
            .0
            .accept(Bytes::copy_from_slice(data), seq, Instant::now(), 0)
        {
            Outcome::Frame { frame, .. } => {
                self.0.sent(&frame);
                Some(frame.data)
            }
            Outcome::Kept | Outcome::Dropped { .. } => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::media::h264::annexb::tests::encoded_stream;
    use crate::media::h264::annexb::{NalKind, parse_access_unit};
    use crate::media::source::CodedMeta;
    use std::sync::Arc;

    /// A camera that plays access units, can (or cannot) force IDRs, and counts requests.
    struct FakeCamera {
        units: Vec<(Vec<u8>, u32)>,
        next: usize,
        can_force: bool,
        forced: u32,
        flag_error_at: Option<usize>,
    }

    impl CodedSource for FakeCamera {
        fn next_access_unit(
            &mut self,
            consume: &mut dyn FnMut(&[u8], CodedMeta),
        ) -> Result<(), SourceError> {
            let i = self.next;
            self.next += 1;
            if self.flag_error_at == Some(i) {
                return Err(SourceError::BadFrame("flagged".into()));
            }
            let (au, lost_before) = &self.units[i % self.units.len()];
            consume(
                au,
                CodedMeta {
                    seq: i as u64,
                    captured_at: Instant::now(),
                    lost_before: *lost_before,
                },
            );
            Ok(())
        }
        fn force_keyframe(&mut self) -> Result<(), String> {
            self.forced += 1;
            Ok(())
        }
        fn keyframes_unavailable(&self) -> Option<String> {
            (!self.can_force).then(|| "no V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME control".into())
        }
        fn set_bitrate(&mut self, _bps: u32) -> Result<u32, String> {
            Err("no V4L2_CID_MPEG_VIDEO_BITRATE control".into())
        }
        fn profile_level(&self) -> (u8, u8, u8) {
            (0x42, 0xc0, 12)
        }
        fn applied(&self) -> String {
            "the camera has no bitrate or GOP control".into()
        }
    }

    /// A camera that sends H.264 itself: openh264's access units, paced at 100 fps, with a
    /// flagged buffer and a corrupt one among them.
    pub(crate) struct H264Camera {
        units: Arc<Vec<Vec<u8>>>,
        next: usize,
    }

    impl H264Camera {
        /// Opens a new camera (from the first unit) each time capture starts.
        pub(crate) fn opener(units: Arc<Vec<Vec<u8>>>) -> crate::media::source::SourceOpener {
            Box::new(move |_| {
                Ok(Box::new(H264Camera {
                    units: units.clone(),
                    next: 0,
                })
                    as Box<dyn crate::media::source::FrameSource>)
            })
        }
    }

    impl crate::media::source::FrameSource for H264Camera {
        fn info(&self) -> crate::media::source::SourceInfo {
            crate::media::source::SourceInfo {
                width: 160,
                height: 96,
                fps: 30,
                pixel_format: "H264".into(),
                stride: 0,
            }
        }
        fn next_frame(
            &mut self,
            _consume: &mut dyn FnMut(
                &crate::media::frame::I420View<'_>,
                crate::media::source::CapturedFrame,
            ),
        ) -> Result<(), SourceError> {
            Err(SourceError::Unsupported("H.264 only".into()))
        }
        fn coded(&mut self) -> Option<&mut dyn crate::media::source::CodedSource> {
            Some(self)
        }
    }

    impl crate::media::source::CodedSource for H264Camera {
        fn next_access_unit(
            &mut self,
            consume: &mut dyn FnMut(&[u8], crate::media::source::CodedMeta),
        ) -> Result<(), SourceError> {
            std::thread::sleep(Duration::from_millis(10));
            let i = self.next;
            self.next += 1;
            let meta = crate::media::source::CodedMeta {
                seq: i as u64,
                captured_at: Instant::now(),
                lost_before: 0,
            };
            match i {
                3 => Err(SourceError::BadFrame("flagged".into())),
                5 => {
                    consume(b"\0\0\x01\x41garbage", meta);
                    Ok(())
                }
                _ => {
                    consume(&self.units[i % self.units.len()], meta);
                    Ok(())
                }
            }
        }
        fn force_keyframe(&mut self) -> Result<(), String> {
            Err("cannot".into())
        }
        fn keyframes_unavailable(&self) -> Option<String> {
            Some("no V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME control".into())
        }
        fn set_bitrate(&mut self, _bps: u32) -> Result<u32, String> {
            Err("no V4L2_CID_MPEG_VIDEO_BITRATE control".into())
        }
        fn profile_level(&self) -> (u8, u8, u8) {
            (0x42, 0xc0, 12)
        }
        fn applied(&self) -> String {
            "the camera has no bitrate or GOP control".into()
        }
    }

    fn camera(units: Vec<(Vec<u8>, u32)>, can_force: bool) -> FakeCamera {
        FakeCamera {
            units,
            next: 0,
            can_force,
            forced: 0,
            flag_error_at: None,
        }
    }

    fn seqs(frames: &[EncodedFrame]) -> Vec<u64> {
        frames.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn passes_frames_through_and_caches_the_gop_for_new_viewers() {
        // IDRs (with SPS/PPS) at 0, 4, 8; the camera joins mid-GOP at 2.
        let stream = encoded_stream(10, 4);
        let units: Vec<(Vec<u8>, u32)> = stream[2..].iter().map(|u| (u.clone(), 0)).collect();
        let mut cam = camera(units, false);
        let mut s = CameraStream::new(&cam, 1 << 20, Duration::from_millis(33));
        assert_eq!(s.status().backend, "camera");
        assert!(
            s.status()
                .keyframes_unavailable
                .as_deref()
                .unwrap()
                .contains("FORCE_KEY_FRAME")
        );
        assert_eq!(s.stream().profile_level_id(), "42c00c");
        let mut sent = Vec::new();
        for _ in 0..8 {
            match s.next(&mut cam).unwrap() {
                Outcome::Frame {
                    frame,
                    bytes_copied,
                } => {
                    assert_eq!(bytes_copied, frame.data.len() as u64);
                    s.sent(&frame);
                    sent.push(frame);
                }
                Outcome::Dropped { corrupt, reason } => {
                    assert!(!corrupt, "the start is not corruption: {reason}");
                    assert!(sent.is_empty());
                }
                Outcome::Kept => panic!("no parameter-set-only units here"),
            }
        }
        // Units 2 and 3 come before the first IDR (4); 4..=9 pass, bit for bit.
        assert_eq!(seqs(&sent), [2, 3, 4, 5, 6, 7]);
        assert!(sent[0].keyframe && sent[4].keyframe && !sent[1].keyframe);
        for f in &sent {
            assert_eq!(&f.data[..], &stream[f.seq as usize + 2][..]);
        }
        // A new viewer starts from the last IDR (unit 8, seq 6) and what followed.
        assert_eq!(seqs(s.start()), [6, 7]);
        assert!(s.start()[0].keyframe);
        // Without the control nothing is asked of the camera.
        s.force_keyframe(&mut cam, Instant::now());
        assert_eq!(cam.forced, 0);
    }

    #[test]
    fn keyframes_are_asked_for_at_most_once_a_second_until_one_comes() {
        let stream = encoded_stream(3, 60);
        let mut cam = camera(stream.iter().map(|u| (u.clone(), 0)).collect(), true);
        let mut s = CameraStream::new(&cam, 1 << 20, Duration::from_millis(33));
        assert_eq!(s.status().keyframes_unavailable, None);
        let t = Instant::now();
        s.force_keyframe(&mut cam, t);
        s.force_keyframe(&mut cam, t + Duration::from_millis(300));
        assert_eq!(cam.forced, 1);
        s.force_keyframe(&mut cam, t + Duration::from_millis(1100));
        assert_eq!(cam.forced, 2);
        // An IDR arrives: the next request goes out at once.
        assert!(
            matches!(s.next(&mut cam).unwrap(), Outcome::Frame { frame, .. } if frame.keyframe)
        );
        s.force_keyframe(&mut cam, t + Duration::from_millis(1200));
        assert_eq!(cam.forced, 3);
    }

    #[test]
    fn corrupt_flagged_and_orphaned_units_are_dropped_and_counted_never_passed() {
        let stream = encoded_stream(8, 4); // IDRs at 0 and 4
        // Cut inside the slice header (a cut inside the slice data is not visible without
        // decoding: the driver's bytesused and error flag are what tell of those).
        let mut truncated = stream[1].clone();
        truncated.truncate(5);
        let units = vec![
            (stream[0].clone(), 0),
            (stream[1].clone(), 0),
            (truncated, 0),
            (b"\x00\x00\x01\x85garbage".to_vec(), 0),
            // The driver lost a frame before this one: it and what follows until the IDR at
            // 4 cannot be decoded.
            (stream[3].clone(), 1),
            (stream[4].clone(), 0),
            (stream[5].clone(), 0),
        ];
        let mut cam = camera(units, false);
        cam.flag_error_at = Some(7);
        let mut s = CameraStream::new(&cam, 1 << 20, Duration::from_millis(33));
        let mut outcomes = Vec::new();
        for _ in 0..7 {
            let o = s.next(&mut cam).unwrap();
            if let Outcome::Frame { frame, .. } = &o {
                s.sent(frame);
            }
            outcomes.push(o);
        }
        let kinds: Vec<&str> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Frame { .. } => "frame",
                Outcome::Kept => "kept",
                Outcome::Dropped { corrupt: true, .. } => "corrupt",
                Outcome::Dropped { corrupt: false, .. } => "skipped",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "frame", "frame", "corrupt", "corrupt", "corrupt", "frame", "frame"
            ]
        );
        if let Outcome::Dropped { reason, .. } = &outcomes[4] {
            assert!(reason.contains("lost"), "{reason}");
        }
        // The loss emptied the cache; it starts again at the IDR.
        assert_eq!(seqs(s.start()), [5, 6]);
        let first = parse_access_unit(&s.start()[0].data).unwrap();
        assert!(first.has(NalKind::Sps));
        // A buffer the driver flagged is the caller's to count.
        assert!(matches!(s.next(&mut cam), Err(SourceError::BadFrame(_))));
    }

    #[test]
    fn a_zero_byte_cache_keeps_nothing() {
        let stream = encoded_stream(3, 60);
        let mut cam = camera(stream.iter().map(|u| (u.clone(), 0)).collect(), false);
        let mut s = CameraStream::new(&cam, 0, Duration::from_millis(33));
        for _ in 0..3 {
            if let Outcome::Frame { frame, .. } = s.next(&mut cam).unwrap() {
                s.sent(&frame);
            }
        }
        assert!(s.start().is_empty());
    }
}
