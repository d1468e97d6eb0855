//! The capture/encode thread and its handle: runs the source only while someone needs pictures, encodes once, fans out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::controls::{ControlError, ControlInfo};
use super::encoder::EncoderSettings;
use super::fanout::{Delivery, Fanout, SubscriberId};
use super::frame::{EncodedFrame, I420Buffer};
use super::passthrough::{CameraStream, Outcome};
use super::policy::encoder_target;
use super::source::{
    CaptureChange, CaptureParams, CapturedFrame, FrameSource, SourceError, SourceOpener,
};
use super::status::{CounterSnapshot, PipelineCounters, PipelineStatus};
use super::video_encoder::{EncodeOutcome, HardwareChoice, HardwareOpener, VideoEncoder};
use crate::log_limit::LogLimiter;
use crate::protocol::sdp::SentStream;

/// What a viewer can take for video, bits per second, as its session last measured it (0: no
/// estimate yet). The capture thread reads it for the encoder's target
/// ([`super::policy::encoder_target`]).
pub(crate) type UsableRate = Arc<AtomicU32>;

/// The encoder target is reconsidered this often.
const POLICY_INTERVAL: Duration = Duration::from_millis(500);

/// Requests queued to the capture thread (bounded: see [`CONTROL_QUEUE`]).
enum Request {
    Subscribe {
        id: SubscriberId,
        sink: mpsc::Sender<EncodedFrame>,
        usable: Option<UsableRate>,
    },
    Unsubscribe {
        id: SubscriberId,
    },
    SetBitrate {
        bps: u32,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    /// A copy of the next captured picture (capture runs briefly if nobody watches).
    Snapshot {
        reply: oneshot::Sender<Result<I420Buffer, String>>,
    },
    /// The source's controls (the source is opened briefly if nobody watches).
    ListControls {
        reply: oneshot::Sender<Result<Vec<ControlInfo>, ControlError>>,
    },
    SetControl {
        name: String,
        value: i64,
        reply: oneshot::Sender<Result<i64, ControlError>>,
    },
    /// New size and/or rate: capture restarts, viewers stay connected.
    Reconfigure {
        change: CaptureChange,
        reply: oneshot::Sender<Result<CaptureParams, String>>,
    },
    Shutdown,
}

/// Requests the capture thread has not taken yet, at most. A full queue makes requests fail
/// with [`PipelineError::Busy`] instead of waiting.
const CONTROL_QUEUE: usize = 64;

/// Why a request to the capture thread failed before it was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PipelineError {
    #[error("capture pipeline is not running")]
    Gone,
    #[error("the capture pipeline is busy ({CONTROL_QUEUE} requests queued); retry later")]
    Busy,
}

/// Cloneable handle to the capture thread.
#[derive(Clone)]
pub(crate) struct PipelineHandle {
    tx: mpsc::Sender<Request>,
    status: watch::Receiver<PipelineStatus>,
    counters: Arc<PipelineCounters>,
    /// Set by anyone, taken by the capture thread before the next frame: keyframe requests
    /// coalesce here and can never be lost to a full queue.
    keyframe: Arc<AtomicBool>,
}

impl PipelineHandle {
    /// The capture thread's published state.
    pub fn status(&self) -> watch::Receiver<PipelineStatus> {
        self.status.clone()
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// See [`PipelineCounters::capture_is_healthy`].
    pub fn capture_is_healthy(&self, window: Duration) -> bool {
        self.counters.capture_is_healthy(window)
    }

    fn try_send(&self, request: Request) -> Result<(), PipelineError> {
        self.tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PipelineError::Busy,
            mpsc::error::TrySendError::Closed(_) => PipelineError::Gone,
        })
    }

    /// Starts sending encoded frames to `sink`, from the next keyframe on. With the rate
    /// policy on, `usable` is what this viewer can take (see [`UsableRate`]).
    pub fn subscribe(
        &self,
        id: SubscriberId,
        sink: mpsc::Sender<EncodedFrame>,
        usable: Option<UsableRate>,
    ) -> Result<(), PipelineError> {
        self.try_send(Request::Subscribe { id, sink, usable })
    }

    /// Never blocks. Should the queue be full, the closed sink is noticed on the next frame.
    pub fn unsubscribe(&self, id: SubscriberId) {
        if self.try_send(Request::Unsubscribe { id }).is_err() {
            tracing::debug!(id, "unsubscribe left to the closed sink");
        }
    }

    /// The next encoded frame will be a keyframe. Never blocks, never lost.
    pub fn request_keyframe(&self) {
        self.keyframe.store(true, Ordering::Relaxed);
    }

    /// Sends a request carrying a reply channel and waits for the capture thread's answer.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, PipelineError> {
        let (reply, rx) = oneshot::channel();
        self.try_send(make(reply))?;
        rx.await.map_err(|_| PipelineError::Gone)
    }

    pub async fn list_controls(
        &self,
    ) -> Result<Result<Vec<ControlInfo>, ControlError>, PipelineError> {
        self.request(|reply| Request::ListControls { reply }).await
    }

    /// Validates `value` against the driver's range, then sets it.
    pub async fn set_control(
        &self,
        name: String,
        value: i64,
    ) -> Result<Result<i64, ControlError>, PipelineError> {
        self.request(|reply| Request::SetControl { name, value, reply })
            .await
    }

    /// The next captured picture, copied out of the capture buffer.
    pub async fn snapshot(&self) -> Result<Result<I420Buffer, String>, PipelineError> {
        self.request(|reply| Request::Snapshot { reply }).await
    }

    /// Applies `change` to the current size and rate; on failure the previous settings stay.
    pub async fn reconfigure(
        &self,
        change: CaptureChange,
    ) -> Result<Result<CaptureParams, String>, PipelineError> {
        self.request(|reply| Request::Reconfigure { change, reply })
            .await
    }

    /// Sets `encoder.bitrate`: the encoder's rate, or with the rate policy on its ceiling.
    pub async fn set_bitrate(&self, bps: u32) -> Result<Result<u32, String>, PipelineError> {
        self.request(|reply| Request::SetBitrate { bps, reply })
            .await
    }
}

/// Static pipeline settings.
#[derive(Debug, Clone)]
pub(crate) struct PipelineConfig {
    pub encoder: EncoderSettings,
    /// Configured picture size and rate (the source may deliver another).
    pub capture: CaptureParams,
    /// Wait between attempts to (re)open a failed camera while viewers watch.
    pub reopen_delay: Duration,
    /// The encoder follows its viewers' usable rates ([`super::policy`]) between
    /// `min_bitrate` and `encoder.bitrate`; false: it runs at `encoder.bitrate`.
    pub rate_policy: bool,
    pub min_bitrate: u32,
    /// Finds and opens a hardware encoder when capture starts (`encoder.backend`); `None`:
    /// openh264 only.
    pub hardware: Option<HardwareOpener>,
    /// The camera may deliver H.264 itself (`capture.format = "H264"`, or `auto` with
    /// `prefer_camera_h264`): the stream's profile is unknown until the camera was read.
    pub camera_h264: bool,
    /// Bound of the GOP cache new viewers of a camera's own H.264 start from (0: none).
    pub gop_cache_bytes: usize,
}

/// What rtcam's encoders will send for this picture size, rate and bitrate: Constrained
/// Baseline at the lowest H.264 level that allows it (what openh264 writes into its SPS).
pub(crate) fn encoded_stream(width: u32, height: u32, fps: u32, bitrate: u32) -> SentStream {
    let demand = super::h264::level::StreamDemand {
        width,
        height,
        fps,
        bitrate_bps: bitrate,
    };
    // Beyond every level: say 5.2, the highest the level table allows at these rates.
    let idc = super::h264::level::select(demand).map_or(52, |l| l.idc);
    SentStream::constrained_baseline(idc)
}

/// Starts the capture/encode thread. It ends when `cancel` fires or every handle is gone;
/// join it with the returned handle.
pub(crate) fn spawn(
    config: PipelineConfig,
    opener: SourceOpener,
    cancel: CancellationToken,
) -> std::io::Result<(PipelineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
    let (status_tx, status_rx) = watch::channel(PipelineStatus {
        capturing: false,
        viewers: 0,
        params: config.capture,
        bitrate: config.encoder.bitrate,
        encoder_bitrate: config.encoder.bitrate,
        source: None,
        controls: Default::default(),
        camera_error: None,
        encoder: None,
        h264: (!config.camera_h264).then(|| {
            let c = config.capture;
            encoded_stream(c.width, c.height, c.fps, config.encoder.bitrate)
        }),
    });
    let counters = Arc::new(PipelineCounters::default());
    let keyframe = Arc::new(AtomicBool::new(false));
    let handle = PipelineHandle {
        tx: tx.clone(),
        status: status_rx,
        counters: counters.clone(),
        keyframe: keyframe.clone(),
    };
    // Wakes the thread out of its idle wait on shutdown. The thread also checks the token
    // between frames, so this is only needed while it sleeps in `blocking_recv`.
    let waker_cancel = cancel.clone();
    let waker = async move {
        waker_cancel.cancelled().await;
        let _ = tx.send(Request::Shutdown).await;
    };
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(waker);
    }
    let thread = std::thread::Builder::new()
        .name("rtcam-capture".into())
        .spawn(move || {
            let mut worker = Worker {
                config,
                opener,
                rx,
                status: status_tx,
                counters,
                keyframe,
                cancel,
                fanout: Fanout::default(),
                usable: Vec::new(),
                next_policy: Instant::now(),
                running: None,
                snapshots: Vec::new(),
                control_ops: Vec::new(),
                open_failures: 0,
                failure_log: LogLimiter::new(Duration::from_secs(60), 1),
                hardware_failed: None,
                camera_bitrate_unavailable: None,
            };
            worker.run();
        })?;
    Ok((handle, thread))
}

struct Running {
    source: Box<dyn FrameSource>,
    coder: Coder,
    frame_duration: Duration,
    /// Encoder timestamps count from here.
    started: Instant,
}

/// What turns the source's output into H.264.
enum Coder {
    Encode {
        encoder: VideoEncoder,
        out: Vec<u8>,
    },
    /// The camera sends H.264 itself: passed through.
    Camera(Box<CameraStream>),
}

impl Coder {
    fn status(&self) -> &super::video_encoder::EncoderStatus {
        match self {
            Self::Encode { encoder, .. } => encoder.status(),
            Self::Camera(c) => c.status(),
        }
    }
}

struct Worker {
    config: PipelineConfig,
    opener: SourceOpener,
    rx: mpsc::Receiver<Request>,
    status: watch::Sender<PipelineStatus>,
    counters: Arc<PipelineCounters>,
    keyframe: Arc<AtomicBool>,
    cancel: CancellationToken,
    fanout: Fanout<mpsc::Sender<EncodedFrame>>,
    /// Subscribers' usable rates, for the rate policy.
    usable: Vec<(SubscriberId, UsableRate)>,
    next_policy: Instant,
    running: Option<Running>,
    /// Waiting for the next picture.
    snapshots: Vec<oneshot::Sender<Result<I420Buffer, String>>>,
    /// Control requests waiting for the source to open.
    control_ops: Vec<ControlOp>,
    /// Failed attempts to open the camera in a row.
    open_failures: u64,
    /// Repeated camera failures: one line a minute, not one per attempt.
    failure_log: LogLimiter,
    /// Why the hardware encoder is not used (missing, or it failed): openh264 from then on,
    /// without looking again, until the service restarts.
    hardware_failed: Option<String>,
    /// Why the bitrate cannot be changed: the last camera passed its own H.264 through and
    /// has no bitrate control.
    camera_bitrate_unavailable: Option<String>,
}

enum ControlOp {
    List(oneshot::Sender<Result<Vec<ControlInfo>, ControlError>>),
    Set {
        name: String,
        value: i64,
        reply: oneshot::Sender<Result<i64, ControlError>>,
    },
}

impl Worker {
    fn wants_frames(&self) -> bool {
        !self.fanout.is_empty() || !self.snapshots.is_empty()
    }

    fn run(&mut self) {
        let mut next_open_attempt = Instant::now();
        while !self.cancel.is_cancelled() {
            if !self.wants_frames() && self.control_ops.is_empty() {
                self.stop_capture();
                // Idle: sleep until someone asks for something.
                self.counters.set_idle(true);
                let next = self.rx.blocking_recv();
                self.counters.set_idle(false);
                self.counters.progressed();
                let Some(c) = next else { break };
                if !self.handle(c) {
                    break;
                }
                continue;
            }
            if !self.drain_controls() {
                break;
            }
            if self.running.is_none() {
                let now = Instant::now();
                if now < next_open_attempt {
                    // Keep serving control messages while waiting to retry the camera; waiting
                    // on purpose is progress for the watchdog.
                    self.counters.progressed();
                    std::thread::sleep((next_open_attempt - now).min(Duration::from_millis(50)));
                    continue;
                }
                self.counters.progressed();
                if let Err(e) = self.start_capture() {
                    next_open_attempt = Instant::now() + self.open_failed(&e);
                    continue;
                }
            }
            self.run_control_ops();
            if !self.wants_frames() {
                continue; // opened only for control requests
            }
            self.set_capturing(true);
            if let Err(e) = self.capture_one() {
                if let SourceError::BadFrame(_) = e {
                    tracing::debug!(error = %e, "skipping frame");
                    self.counters.frame_corrupt();
                    continue;
                }
                self.counters.source_error();
                self.stop_capture();
                let delay = self.config.reopen_delay;
                tracing::warn!(error = %e, retry_in = ?delay, "capture failed; releasing the camera and retrying");
                self.set_camera_error(Some(e.to_string()));
                next_open_attempt = Instant::now() + delay;
            }
        }
        self.stop_capture();
        self.fanout = Fanout::default();
        self.viewers_changed();
        tracing::debug!("capture thread finished");
    }

    /// Answers what waited for the camera, records the error and says when to try again.
    fn open_failed(&mut self, e: &SourceError) -> Duration {
        for s in self.snapshots.drain(..) {
            let _ = s.send(Err(e.to_string()));
        }
        for op in self.control_ops.drain(..) {
            let err = ControlError::Failed(e.to_string());
            match op {
                ControlOp::List(r) => drop(r.send(Err(err))),
                ControlOp::Set { reply, .. } => drop(reply.send(Err(err))),
            }
        }
        self.counters.source_error();
        self.open_failures += 1;
        self.set_camera_error(Some(e.to_string()));
        // A camera that cannot do what is configured will not learn it in a second.
        let delay = match e {
            SourceError::Unsupported(_) => self.config.reopen_delay * 10,
            _ => self.config.reopen_delay,
        };
        let retries = !self.fanout.is_empty();
        if let Some(suppressed) = self.failure_log.allow(Instant::now()) {
            if retries {
                tracing::warn!(error = %e, attempts = self.open_failures, suppressed, retry_in = ?delay, "cannot open the camera");
            } else {
                // Nobody watches: the next attempt comes with the next request.
                tracing::warn!(error = %e, attempts = self.open_failures, suppressed, "cannot open the camera");
            }
        }
        delay
    }

    /// Applies queued controls; false on shutdown.
    fn drain_controls(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(c) => {
                    if !self.handle(c) {
                        return false;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Subscribe { id, sink, usable } => {
                self.fanout.subscribe(id, sink);
                self.usable.retain(|(i, _)| *i != id);
                if let Some(u) = usable {
                    self.usable.push((id, u));
                }
                self.viewers_changed();
            }
            Request::Unsubscribe { id } => {
                self.fanout.unsubscribe(id);
                self.usable.retain(|(i, _)| *i != id);
                self.viewers_changed();
            }
            Request::SetBitrate { bps, reply } => {
                let result = match self.running.as_mut() {
                    Some(Running {
                        coder: Coder::Encode { .. },
                        ..
                    }) if self.config.rate_policy => {
                        // The ceiling: the target follows at once if it is above.
                        self.config.encoder.bitrate = bps;
                        self.apply_policy()
                    }
                    Some(Running {
                        coder: Coder::Encode { .. },
                        ..
                    }) => self.set_encoder_bitrate(bps),
                    Some(r) => match r.source.coded() {
                        Some(camera) => camera.set_bitrate(bps).map(drop),
                        None => Err("the source has no bitrate".into()),
                    },
                    None => match &self.camera_bitrate_unavailable {
                        Some(why) => Err(why.clone()),
                        None if self.config.rate_policy => {
                            self.config.encoder.bitrate = bps;
                            self.apply_policy()
                        }
                        None => self.set_encoder_bitrate(bps),
                    },
                };
                self.encoder_changed();
                if result.is_ok() {
                    self.config.encoder.bitrate = bps;
                    self.status
                        .send_if_modified(|s| replace(&mut s.bitrate, bps));
                }
                let _ = reply.send(result.map(|()| bps));
            }
            Request::Snapshot { reply } => self.snapshots.push(reply),
            Request::ListControls { reply } => self.control_ops.push(ControlOp::List(reply)),
            Request::SetControl { name, value, reply } => {
                self.control_ops.push(ControlOp::Set { name, value, reply });
            }
            Request::Reconfigure { change, reply } => {
                let _ = reply.send(self.reconfigure(change));
            }
            Request::Shutdown => return false,
        }
        true
    }

    /// Answers queued control requests against the open source. What they reveal is
    /// published before each reply goes out, so a caller that got its reply sees it in the
    /// status.
    fn run_control_ops(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        for op in std::mem::take(&mut self.control_ops) {
            match op {
                ControlOp::List(reply) => {
                    let result = r.source.controls();
                    if let Ok(list) = &result {
                        remember(&self.status, list.iter().map(|c| (c.name.clone(), c.value)));
                    }
                    let _ = reply.send(result);
                }
                ControlOp::Set { name, value, reply } => {
                    let result = r.source.controls().and_then(|list| {
                        let info = list
                            .into_iter()
                            .find(|c| c.name == name)
                            .ok_or_else(|| ControlError::Unknown(name.clone()))?;
                        info.validate(value)?;
                        r.source.set_control(&info, value)
                    });
                    if let Ok(applied) = result {
                        remember(&self.status, [(name, applied)]);
                    }
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Applies new capture parameters; restarts a running capture and rolls back on failure.
    fn reconfigure(&mut self, change: CaptureChange) -> Result<CaptureParams, String> {
        let previous = self.config.capture;
        let wanted = change.apply(previous);
        self.config.capture = wanted;
        if self.running.is_none() {
            self.publish_params(wanted);
            return Ok(wanted);
        }
        self.stop_capture();
        match self.start_capture() {
            Ok(()) => Ok(self.status.borrow().params),
            Err(e) => {
                tracing::warn!(error = %e, "new capture settings failed; restoring the previous ones");
                self.config.capture = previous;
                if let Err(e2) = self.start_capture() {
                    tracing::warn!(error = %e2, "previous capture settings failed too; will retry");
                    self.set_camera_error(Some(e2.to_string()));
                }
                Err(e.to_string())
            }
        }
    }

    fn publish_params(&self, p: CaptureParams) {
        self.status.send_if_modified(|s| replace(&mut s.params, p));
    }

    fn set_capturing(&self, capturing: bool) {
        self.status
            .send_if_modified(|s| replace(&mut s.capturing, capturing));
    }

    fn set_camera_error(&self, error: Option<String>) {
        self.status
            .send_if_modified(|s| replace(&mut s.camera_error, error));
    }

    fn viewers_changed(&mut self) {
        let n = self.fanout.len() as u32;
        self.status.send_if_modified(|s| replace(&mut s.viewers, n));
        let fanout = &self.fanout;
        self.usable.retain(|(id, _)| fanout.contains(*id));
    }

    /// Gives the running encoder (and the status) a new target.
    fn set_encoder_bitrate(&mut self, bps: u32) -> Result<(), String> {
        if let Some(Running {
            coder: Coder::Encode { encoder, .. },
            ..
        }) = self.running.as_mut()
        {
            encoder.set_bitrate(bps).map_err(|e| e.to_string())?;
        }
        self.status
            .send_if_modified(|s| replace(&mut s.encoder_bitrate, bps));
        Ok(())
    }

    /// The rate policy's target now.
    fn policy_target(&self) -> u32 {
        let usable: Vec<Option<u32>> = self
            .usable
            .iter()
            .map(|(_, u)| Some(u.load(Ordering::Relaxed)).filter(|&b| b > 0))
            .chain(
                // Viewers that report nothing count as able to take the ceiling.
                std::iter::repeat_n(None, self.fanout.len().saturating_sub(self.usable.len())),
            )
            .collect();
        encoder_target(
            &usable,
            self.config.min_bitrate,
            self.config.encoder.bitrate,
        )
    }

    /// Moves the encoder to the policy's target when it differs by more than 2 % (or sits
    /// outside the bounds).
    fn apply_policy(&mut self) -> Result<(), String> {
        self.next_policy = Instant::now() + POLICY_INTERVAL;
        if let Some(Running {
            coder: Coder::Camera(_),
            ..
        }) = &self.running
        {
            return Ok(()); // a camera's own H.264: its bitrate is set-bitrate's alone
        }
        let target = self.policy_target();
        let current = self.status.borrow().encoder_bitrate;
        let ceiling = self.config.encoder.bitrate;
        if current > ceiling || u64::from(target.abs_diff(current)) * 50 > u64::from(current) {
            self.set_encoder_bitrate(target)?;
        }
        Ok(())
    }

    fn start_capture(&mut self) -> Result<(), SourceError> {
        let mut source = (self.opener)(self.config.capture)?;
        let info = source.info();
        let mut settings = self.config.encoder;
        settings.fps = info.fps;
        if self.config.rate_policy && source.coded().is_none() {
            settings.bitrate = self.policy_target();
        }
        self.status
            .send_if_modified(|s| replace(&mut s.encoder_bitrate, settings.bitrate));
        let frame_duration = Duration::from_secs(1) / info.fps.max(1);
        let coder = match source.coded() {
            Some(camera) => {
                // The bitrate set since the last open (set-bitrate), where the camera can.
                self.camera_bitrate_unavailable = camera.set_bitrate(settings.bitrate).err();
                Coder::Camera(Box::new(CameraStream::new(
                    camera,
                    self.config.gop_cache_bytes,
                    frame_duration,
                )))
            }
            None => {
                self.camera_bitrate_unavailable = None;
                Coder::Encode {
                    encoder: self.make_encoder(settings, &info)?,
                    out: Vec::new(),
                }
            }
        };
        tracing::info!(width = info.width, height = info.height, fps = info.fps, format = %info.pixel_format, stride = info.stride, "camera opened");
        if self.open_failures > 0 {
            tracing::info!(attempts = self.open_failures, "camera available again");
            self.open_failures = 0;
        }
        let params = CaptureParams {
            width: info.width,
            height: info.height,
            fps: info.fps,
        };
        // The camera's SPS; for an encoder, until its first keyframe shows the SPS, what it
        // is expected to make.
        let expected = match &coder {
            Coder::Camera(c) => c.stream(),
            Coder::Encode { .. } => {
                encoded_stream(info.width, info.height, info.fps, settings.bitrate)
            }
        };
        self.status.send_if_modified(|s| {
            let changed = s.params != params
                || s.source.as_ref() != Some(&info)
                || s.camera_error.is_some()
                || s.h264 != Some(expected);
            s.params = params;
            s.source = Some(info);
            s.camera_error = None;
            s.h264 = Some(expected);
            changed
        });
        self.running = Some(Running {
            source,
            coder,
            frame_duration,
            started: Instant::now(),
        });
        self.encoder_changed();
        Ok(())
    }

    /// The hardware encoder `encoder.backend` selects, else openh264 (and why).
    fn make_encoder(
        &mut self,
        settings: EncoderSettings,
        info: &super::source::SourceInfo,
    ) -> Result<VideoEncoder, SourceError> {
        let software = |reason: String, fallback: Option<String>| {
            VideoEncoder::software(settings, reason, fallback)
                .map_err(|e| SourceError::Unsupported(format!("encoder: {e}")))
        };
        if let Some(why) = &self.hardware_failed {
            return software(why.clone(), Some(why.clone()));
        }
        let Some(opener) = &self.config.hardware else {
            return software("openh264 only".into(), None);
        };
        match (opener.0)(info, &settings) {
            HardwareChoice::NotWanted { reason } => software(reason, None),
            HardwareChoice::Unavailable { reason } => {
                tracing::warn!(%reason, "no hardware encoder; encoding with openh264");
                self.hardware_failed = Some(reason.clone());
                software(reason.clone(), Some(reason))
            }
            HardwareChoice::Opened { encoder, reason } => {
                Ok(VideoEncoder::hardware(settings, encoder, reason))
            }
        }
    }

    /// Publishes the encoder's status; remembers a hardware failure.
    fn encoder_changed(&mut self) {
        let Some(r) = self.running.as_ref() else {
            return;
        };
        let status = r.coder.status().clone();
        if status.fallback.is_some() && self.hardware_failed.is_none() {
            self.hardware_failed = status.fallback.clone();
        }
        self.status
            .send_if_modified(|s| replace(&mut s.encoder, Some(status)));
    }

    /// Publishes the stream's profile and level as a keyframe's SPS states them.
    fn stream_seen(&self, access_unit: &[u8]) {
        publish_stream(&self.status, access_unit);
    }

    fn stop_capture(&mut self) {
        if self.running.take().is_some() {
            self.set_capturing(false);
            tracing::info!("camera released");
        }
    }

    fn capture_one(&mut self) -> Result<(), SourceError> {
        if self.config.rate_policy
            && Instant::now() >= self.next_policy
            && let Err(e) = self.apply_policy()
        {
            tracing::debug!(error = %e, "encoder target not applied");
        }
        // Invariant: called only after start_capture succeeded.
        let Some(r) = self.running.as_mut() else {
            return Ok(());
        };
        let Coder::Encode { encoder, out } = &mut r.coder else {
            return self.capture_coded();
        };
        if self.fanout.wants_keyframe() | self.keyframe.swap(false, Ordering::Relaxed) {
            encoder.request_keyframe();
        }
        let mut encoded: Option<Result<(EncodeOutcome, CapturedFrame), String>> = None;
        let started = r.started;
        let target_bps = encoder.bitrate();
        let snapshots = &mut self.snapshots;
        r.source.next_frame(&mut |view, meta| {
            if !snapshots.is_empty() {
                // Only for snapshots: one copy out of the capture buffer.
                let mut copy = I420Buffer::default();
                copy.copy_from(view);
                for s in snapshots.drain(..) {
                    let _ = s.send(Ok(copy.clone()));
                }
            }
            let ts = meta.captured_at.duration_since(started).as_millis() as u64;
            let result = encoder.encode(view, &meta, ts, out).map(|e| (e, meta));
            encoded = Some(result);
        })?;
        let Some(result) = encoded else {
            return Ok(());
        };
        // A hardware fallback, or a new way pictures reach the encoder, goes to the status.
        let published = self
            .status
            .borrow()
            .encoder
            .as_ref()
            .map(|s| (s.backend, s.input));
        let current = r.coder.status();
        if published != Some((current.backend, current.input)) {
            self.encoder_changed();
        }
        let Some(Running {
            coder: Coder::Encode { out, .. },
            frame_duration,
            ..
        }) = self.running.as_mut()
        else {
            return Ok(());
        };
        let (outcome, meta) = result.map_err(|e| SourceError::BadFrame(format!("encode: {e}")))?;
        let keyframe = outcome.keyframe;
        let temporal_id = outcome.temporal_id;
        if out.is_empty() {
            return Ok(()); // the encoder skipped this picture
        }
        self.counters.frame_encoded(outcome.bytes_copied);
        // Hand the bitstream over without copying; the next frame gets a fresh Vec.
        let capacity = out.capacity();
        let data = Bytes::from(std::mem::replace(out, Vec::with_capacity(capacity)));
        let frame = EncodedFrame {
            data,
            keyframe,
            seq: meta.seq,
            captured_at: meta.captured_at,
            duration: *frame_duration,
            temporal_id,
            target_bps,
            preroll: None,
        };
        if keyframe {
            self.stream_seen(&frame.data);
        }
        let d = self.fanout.deliver(&frame);
        self.delivered(d);
        Ok(())
    }

    fn delivered(&mut self, d: Delivery) {
        self.counters.frames_dropped(d.dropped as u64);
        if d.closed > 0 {
            self.viewers_changed();
        }
    }

    /// One access unit of the camera's own H.264: checked, passed on (a new viewer gets the
    /// cached GOP first), cached.
    fn capture_coded(&mut self) -> Result<(), SourceError> {
        for s in self.snapshots.drain(..) {
            let _ = s.send(Err(
                "snapshots are unavailable: the camera sends H.264, which rtcam passes through without decoding pictures".into(),
            ));
        }
        let Some(Running {
            source,
            coder: Coder::Camera(stream),
            ..
        }) = self.running.as_mut()
        else {
            return Ok(());
        };
        let Some(camera) = source.coded() else {
            return Err(SourceError::Unsupported(
                "the camera stopped sending H.264".into(),
            ));
        };
        let asked = self.keyframe.swap(false, Ordering::Relaxed);
        // A new viewer with nothing cached to start from needs an IDR.
        if asked || (self.fanout.wants_keyframe() && stream.start().is_empty()) {
            stream.force_keyframe(camera, Instant::now());
        }
        let d = match stream.next(camera)? {
            Outcome::Frame {
                frame,
                bytes_copied,
            } => {
                self.counters.frame_encoded(bytes_copied);
                if frame.keyframe {
                    publish_stream(&self.status, &frame.data);
                }
                let d = self.fanout.deliver_after(&frame, stream.start());
                stream.sent(&frame);
                d
            }
            Outcome::Kept => return Ok(()),
            Outcome::Dropped { corrupt, reason } => {
                if corrupt {
                    self.counters.frame_corrupt();
                }
                tracing::debug!(corrupt, %reason, "camera access unit dropped");
                return Ok(());
            }
        };
        self.delivered(d);
        Ok(())
    }
}

/// Publishes the stream's profile and level as an access unit's SPS states them.
fn publish_stream(status: &watch::Sender<PipelineStatus>, access_unit: &[u8]) {
    if let Some((profile_idc, constraints, level_idc)) =
        super::h264::annexb::profile_level(access_unit)
    {
        let seen = Some(SentStream {
            profile_idc,
            constraints,
            level_idc,
        });
        status.send_if_modified(|s| replace(&mut s.h264, seen));
    }
}

/// Publishes control values in the status.
fn remember(
    status: &watch::Sender<PipelineStatus>,
    values: impl IntoIterator<Item = (String, i64)>,
) {
    status.send_if_modified(|s| {
        let mut changed = false;
        for (name, value) in values {
            changed |= s.controls.insert(name, value) != Some(value);
        }
        changed
    });
}

/// Stores `value` in `slot`; true when that changed it (for `send_if_modified`).
fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        false
    } else {
        *slot = value;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::frame::I420View;
    use crate::media::test_pattern::TestPattern;
    use std::sync::atomic::AtomicU32;

    fn test_config(width: u32, height: u32, reopen_delay: Duration) -> PipelineConfig {
        PipelineConfig {
            encoder: EncoderSettings {
                bitrate: 500_000,
                fps: 30,
                keyframe_interval: 30,
                temporal_layers: 1,
            },
            capture: CaptureParams {
                width,
                height,
                fps: 30,
            },
            reopen_delay,
            rate_policy: false,
            min_bitrate: 150_000,
            hardware: None,
            camera_h264: false,
            gop_cache_bytes: 0,
        }
    }

    fn spawn_pattern(cancel: &CancellationToken) -> (PipelineHandle, std::thread::JoinHandle<()>) {
        spawn(
            test_config(320, 240, Duration::from_millis(50)),
            Box::new(|p: CaptureParams| {
                if p.width > 1000 {
                    return Err(SourceError::Unsupported("too wide for this test".into()));
                }
                Ok(Box::new(TestPattern::new(p.width, p.height, p.fps, true))
                    as Box<dyn FrameSource>)
            }),
            cancel.clone(),
        )
        .unwrap()
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        // Generous: a loaded CI machine may not run the capture thread for a while.
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn join(thread: std::thread::JoinHandle<()>) {
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_failing_hardware_encoder_falls_back_to_openh264_without_a_gap() {
        use crate::media::video_encoder::{HardwareChoice, HardwareOpener, HwEncode, HwEncoded};
        /// Encodes two pictures, then times out like a stuck M2M encoder.
        struct Stuck(u32);
        impl HwEncode for Stuck {
            fn describe(&self) -> (String, String) {
                ("/dev/video11".into(), "stuck".into())
            }
            fn encode(
                &mut self,
                _: &I420View<'_>,
                _: Option<crate::media::source::DmaBufRef>,
                keyframe: bool,
                out: &mut Vec<u8>,
            ) -> Result<HwEncoded, String> {
                self.0 += 1;
                if self.0 > 2 {
                    return Err("timed out".into());
                }
                *out = vec![0, 0, 0, 1, if keyframe { 0x65 } else { 0x41 }, 0x80];
                Ok(HwEncoded {
                    keyframe,
                    bytes_copied: 0,
                    input: "dmabuf",
                })
            }
            fn set_bitrate(&mut self, _: u32) -> Result<u32, Result<String, String>> {
                Err(Err("gone".into()))
            }
            fn keyframes_unavailable(&self) -> Option<String> {
                None
            }
        }
        let cancel = CancellationToken::new();
        let mut config = test_config(320, 240, Duration::from_millis(50));
        config.hardware = Some(HardwareOpener(Arc::new(|_, _| HardwareChoice::Opened {
            encoder: Box::new(Stuck(0)),
            reason: "test".into(),
        })));
        let (handle, thread) = spawn(
            config,
            Box::new(|p: CaptureParams| {
                Ok(Box::new(TestPattern::new(p.width, p.height, p.fps, true))
                    as Box<dyn FrameSource>)
            }),
            cancel.clone(),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        handle.subscribe(1, tx, None).unwrap();
        let mut frames = Vec::new();
        for _ in 0..6 {
            let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            frames.push(f);
        }
        // Two from the hardware encoder (6 bytes each), then openh264 from the very next
        // picture on, starting with an IDR: no picture lost, no gap.
        assert_eq!(frames[0].data.len(), 6);
        assert!(
            frames[2].keyframe && frames[2].data.len() > 6,
            "openh264 takes over with an IDR"
        );
        let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive pictures: {seqs:?}"
        );
        let status = handle.status().borrow().encoder.clone().unwrap();
        assert_eq!(status.backend, "openh264");
        assert_eq!(status.fallback.as_deref(), Some("timed out"));
        cancel.cancel();
        join(thread).await;
    }

    #[tokio::test]
    async fn captures_only_while_subscribed_and_starts_with_a_keyframe() {
        let cancel = CancellationToken::new();
        let (handle, thread) = spawn_pattern(&cancel);
        let status = handle.status();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!status.borrow().capturing, "idle without viewers");

        // Listing controls opens the camera briefly but is not "capturing".
        let controls = handle.list_controls().await.unwrap().unwrap();
        assert_eq!(controls[0].name, "brightness");
        assert!(
            !status.borrow().capturing,
            "a control probe is not capturing"
        );

        let (tx, mut rx) = mpsc::channel(8);
        handle.subscribe(1, tx, None).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(first.keyframe, "a new viewer starts at a keyframe");
        // The stream's profile and level, as its SPS says (openh264: Constrained Baseline).
        let sps = crate::media::h264::annexb::profile_level(&first.data).unwrap();
        assert_eq!((sps.0, sps.1), (0x42, 0xc0));
        wait_for("the SPS in the status", || {
            status
                .borrow()
                .h264
                .map(|h| (h.profile_idc, h.constraints, h.level_idc))
                == Some(sps)
        })
        .await;
        let second = rx.recv().await.unwrap();
        assert!(second.seq > first.seq);
        assert!(status.borrow().capturing);
        assert_eq!(status.borrow().viewers, 1);
        assert_eq!(handle.counters().bytes_copied_per_frame, 0);
        assert!(handle.counters().frames_encoded >= 2);

        // A keyframe request is honoured on the next frame.
        handle.request_keyframe();
        let mut saw_requested = false;
        for _ in 0..3 {
            if rx.recv().await.unwrap().keyframe {
                saw_requested = true;
                break;
            }
        }
        assert!(
            saw_requested,
            "requested keyframe arrives within a frame or two"
        );

        assert!(matches!(
            handle.set_control("brightness".into(), 65).await.unwrap(),
            Err(ControlError::OutOfRange(_))
        ));
        assert!(matches!(
            handle.set_control("zoom".into(), 1).await.unwrap(),
            Err(ControlError::Unknown(_))
        ));
        assert_eq!(
            handle.set_control("brightness".into(), -20).await,
            Ok(Ok(-20))
        );
        assert_eq!(status.borrow().controls.get("brightness"), Some(&-20));
        let snap = handle.snapshot().await.unwrap().unwrap();
        assert_eq!((snap.width, snap.height), (320, 240));
        assert_eq!(snap.data[239 * 320], 160, "white bar (180) darkened by 20");
        assert!(crate::media::pattern::read_stamp(&snap.data, 320, 320).is_some());
        assert_eq!(handle.set_bitrate(300_000).await, Ok(Ok(300_000)));
        assert_eq!(status.borrow().bitrate, 300_000);

        // Live changes: rate and size arrive as separate partial changes, both stick.
        let fps = handle.reconfigure(CaptureChange {
            fps: Some(15),
            ..Default::default()
        });
        let size = handle.reconfigure(CaptureChange {
            width: Some(160),
            height: Some(120),
            fps: None,
        });
        let (a, b) = tokio::join!(fps, size);
        assert!(a.unwrap().is_ok() && b.unwrap().is_ok());
        let wanted = CaptureParams {
            width: 160,
            height: 120,
            fps: 15,
        };
        assert_eq!(status.borrow().params, wanted);
        let mut saw_keyframe_after = false;
        for _ in 0..10 {
            let f = rx.recv().await.unwrap();
            if f.keyframe && f.seq == 0 {
                saw_keyframe_after = true;
                break;
            }
        }
        assert!(
            saw_keyframe_after,
            "restarted capture begins with a keyframe"
        );
        // A failing change is refused and leaves the pipeline as it was.
        let too_wide = CaptureChange {
            width: Some(1920),
            height: Some(1080),
            fps: None,
        };
        assert!(handle.reconfigure(too_wide).await.unwrap().is_err());
        assert_eq!(status.borrow().params, wanted);
        // The rollback released and reopened the camera: `capturing` is false until the
        // capture loop runs again (long enough to be seen under qemu), so wait for it before
        // a closed queue's effect on it is checked below.
        wait_for("capture to resume", || status.borrow().capturing).await;
        assert!(rx.recv().await.is_some(), "still streaming");

        // A viewer that goes away without unsubscribing is noticed by its closed queue.
        drop(rx);
        wait_for("capture to stop", || !status.borrow().capturing).await;
        assert_eq!(status.borrow().viewers, 0);

        // Snapshots work with nobody watching: capture runs for one picture and stops.
        let snap = handle.snapshot().await.unwrap().unwrap();
        assert_eq!((snap.width, snap.height), (160, 120));
        wait_for("capture to stop again", || !status.borrow().capturing).await;

        cancel.cancel();
        join(thread).await;
    }

    #[tokio::test]
    async fn a_cameras_h264_is_passed_through_and_a_late_viewer_starts_from_the_cached_gop() {
        // IDRs every 8 access units (with SPS/PPS, as openh264 makes them).
        let units = Arc::new(crate::media::h264::annexb::tests::encoded_stream(16, 8));
        let cancel = CancellationToken::new();
        let mut config = test_config(160, 96, Duration::from_millis(50));
        config.camera_h264 = true;
        config.gop_cache_bytes = 1 << 20;
        let (handle, thread) = spawn(
            config,
            crate::media::passthrough::tests::H264Camera::opener(units.clone()),
            cancel.clone(),
        )
        .unwrap();
        let status = handle.status();
        assert_eq!(
            status.borrow().h264,
            None,
            "unknown until the camera was read"
        );
        let (tx, mut rx) = mpsc::channel(64);
        handle.subscribe(1, tx, None).unwrap();
        let mut early = Vec::new();
        while early.len() < 11 {
            let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(f.preroll.is_none());
            early.push(f);
        }
        // Bit for bit what the camera sent; the flagged buffer (3) and the garbage (5) are
        // dropped and counted.
        let seqs: Vec<u64> = early.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12]);
        for f in &early {
            assert_eq!(&f.data[..], &units[f.seq as usize % 16][..]);
            assert_eq!(f.keyframe, f.seq % 8 == 0, "keyframe flag from the stream");
        }
        assert_eq!(handle.counters().frames_corrupt, 2);
        let s = status.borrow().clone();
        assert_eq!(
            s.h264.map(|h| h.profile_level_id()).as_deref(),
            Some("42c00c")
        );
        let encoder = s.encoder.unwrap();
        assert_eq!((encoder.backend, encoder.input), ("camera", "passthrough"));
        assert!(
            encoder
                .keyframes_unavailable
                .unwrap()
                .contains("FORCE_KEY_FRAME")
        );
        // A viewer joining mid-GOP starts at once: the last IDR (8) and what followed, then
        // the live frames, with no gap.
        let (tx2, mut rx2) = mpsc::channel(8);
        handle.subscribe(2, tx2, None).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx2.recv())
            .await
            .unwrap()
            .unwrap();
        let preroll = first.preroll.clone().expect("the cached GOP");
        assert!(preroll[0].keyframe && preroll[0].seq % 8 == 0);
        let mut joined: Vec<u64> = preroll.iter().map(|f| f.seq).collect();
        joined.push(first.seq);
        assert!(joined.windows(2).all(|w| w[1] == w[0] + 1), "{joined:?}");
        assert!(!first.keyframe, "joined mid-GOP");
        let next = rx2.recv().await.unwrap();
        assert_eq!(next.seq, first.seq + 1);
        // Bitrate and snapshots are unavailable, with the reason.
        let e = handle.set_bitrate(500_000).await.unwrap().unwrap_err();
        assert!(e.contains("BITRATE"), "{e}");
        let e = handle.snapshot().await.unwrap().unwrap_err();
        assert!(e.contains("passes through"), "{e}");
        cancel.cancel();
        join(thread).await;
    }

    /// A camera whose driver call never returns (until released by the test).
    struct StuckSource {
        release: Arc<AtomicBool>,
    }

    impl FrameSource for StuckSource {
        fn info(&self) -> crate::media::source::SourceInfo {
            crate::media::source::SourceInfo {
                width: 160,
                height: 120,
                fps: 30,
                pixel_format: "stuck".into(),
                stride: 160,
            }
        }
        fn next_frame(
            &mut self,
            _consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
        ) -> Result<(), SourceError> {
            while !self.release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(SourceError::Device("released".into()))
        }
    }

    #[tokio::test]
    async fn watchdog_health_is_idle_or_recent_progress_never_a_stuck_camera() {
        let cancel = CancellationToken::new();
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let (handle, thread) = spawn(
            test_config(160, 120, Duration::from_millis(20)),
            Box::new(move |_| {
                Ok(Box::new(StuckSource { release: r.clone() }) as Box<dyn FrameSource>)
            }),
            cancel.clone(),
        )
        .unwrap();
        let counters = handle.counters.clone();
        let window = Duration::from_millis(200);
        wait_for("the idle wait", || counters.is_idle()).await;
        tokio::time::sleep(window * 2).await;
        assert!(
            handle.capture_is_healthy(window),
            "idle by design, long after the last progress"
        );
        let (tx, _rx) = mpsc::channel(8);
        handle.subscribe(1, tx, None).unwrap();
        wait_for("the capture to get stuck", || {
            !counters.is_idle() && !handle.capture_is_healthy(window)
        })
        .await;
        release.store(true, Ordering::Relaxed);
        wait_for("the capture thread to retry", || {
            handle.capture_is_healthy(window)
        })
        .await;
        cancel.cancel();
        join(thread).await;
    }

    #[tokio::test]
    async fn failing_source_is_retried_and_its_error_is_published() {
        let cancel = CancellationToken::new();
        let attempts = Arc::new(AtomicU32::new(0));
        let a = attempts.clone();
        let (handle, thread) = spawn(
            test_config(160, 120, Duration::from_millis(20)),
            Box::new(move |_| {
                if a.fetch_add(1, Ordering::Relaxed) < 3 {
                    Err(SourceError::Device(
                        "open /dev/video9: no such device".into(),
                    ))
                } else {
                    Ok(Box::new(TestPattern::new(160, 120, 30, true)) as Box<dyn FrameSource>)
                }
            }),
            cancel.clone(),
        )
        .unwrap();
        let mut status = handle.status();
        let (tx, mut rx) = mpsc::channel(8);
        handle.subscribe(7, tx, None).unwrap();
        let error = status
            .wait_for(|s| s.camera_error.is_some())
            .await
            .unwrap()
            .camera_error
            .clone();
        assert!(error.unwrap().contains("/dev/video9"));
        let frame = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(frame.keyframe);
        assert!(attempts.load(Ordering::Relaxed) >= 4);
        assert_eq!(handle.counters().source_errors, 3);
        assert_eq!(
            status.borrow().camera_error,
            None,
            "cleared once frames flow"
        );
        cancel.cancel();
        join(thread).await;
        assert_eq!(
            handle.set_bitrate(200_000).await,
            Err(PipelineError::Gone),
            "gone after shutdown"
        );
    }
}
