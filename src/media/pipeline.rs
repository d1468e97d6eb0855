//! The capture/encode thread: runs the source only while viewers watch, encodes once, fans out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::controls::{ControlError, ControlInfo, ControlKind};
use super::encoder::{EncoderSettings, H264Encoder};
use super::fanout::{Fanout, SubscriberId};
use super::frame::{EncodedFrame, I420Buffer, I420View};
use super::pattern::PatternGenerator;

/// What a source delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub pixel_format: String,
    /// Bytes per line of the (first) plane as the source delivers it.
    pub stride: u32,
}

/// Per-frame facts from the source.
#[derive(Debug, Clone, Copy)]
pub struct CapturedFrame {
    pub seq: u64,
    pub captured_at: Instant,
    /// Pixel bytes copied or converted before the encoder could read the picture.
    pub bytes_copied: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The device failed (gone, I/O error): close it and reopen later.
    #[error("camera error: {0}")]
    Device(String),
    /// The device works but cannot give what is configured: reopening will not help soon.
    #[error("camera unsupported: {0}")]
    Unsupported(String),
    #[error("camera delivered no frame for {0:?}")]
    Stalled(Duration),
    /// One unusable frame; the next may be fine.
    #[error("bad frame: {0}")]
    BadFrame(String),
}

/// A picture source: a camera or the test pattern.
pub trait FrameSource: Send {
    fn info(&self) -> SourceInfo;
    /// Blocks until the next picture and hands it to `consume`, borrowed.
    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError>;
    /// The source's controls with their current values.
    fn controls(&mut self) -> Result<Vec<ControlInfo>, ControlError> {
        Ok(Vec::new())
    }
    /// Sets a control (already validated against `controls()`); returns the applied value.
    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        let _ = value;
        Err(ControlError::Unknown(info.name.clone()))
    }
}

/// Picture geometry and rate asked of a source; the source reports what it really delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureParams {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// Opens the configured source each time capture starts.
pub type SourceOpener =
    Box<dyn FnMut(CaptureParams) -> Result<Box<dyn FrameSource>, SourceError> + Send>;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, modulo 2^32, as drawn into the test pattern.
pub fn unix_ms_u32() -> u32 {
    unix_ms() as u32
}

/// Synthetic frames paced at the configured rate, stamped with frame number and time.
pub struct TestPattern {
    generator: PatternGenerator,
    buffer: I420Buffer,
    info: SourceInfo,
    seq: u64,
    next_due: Option<Instant>,
    paced: bool,
    /// Luma offset of the picture below the stamp rows; shared so it outlives reopening.
    brightness: Arc<std::sync::atomic::AtomicI64>,
    /// Fresh noise in the bottom band of every frame (`capture.test_pattern_noise`).
    noise: bool,
}

impl TestPattern {
    /// `paced = false` produces frames as fast as asked (benchmarks).
    pub fn new(width: u32, height: u32, fps: u32, paced: bool) -> Self {
        Self {
            generator: PatternGenerator::new(width as usize, height as usize),
            buffer: I420Buffer::default(),
            info: SourceInfo {
                width,
                height,
                fps,
                pixel_format: "test-pattern".into(),
                stride: width,
            },
            seq: 0,
            next_due: None,
            paced,
            brightness: Arc::default(),
            noise: false,
        }
    }

    /// Adds a band of fresh noise under the box to every frame, so the stream needs all the
    /// bitrate it is given (docs/protocol.md §5.1).
    pub fn with_noise(mut self, noise: bool) -> Self {
        self.noise = noise;
        self
    }

    /// Uses (and keeps) this brightness setting across reopenings.
    pub fn with_brightness(mut self, brightness: Arc<std::sync::atomic::AtomicI64>) -> Self {
        self.brightness = brightness;
        self
    }

    fn brightness_info(&self) -> ControlInfo {
        ControlInfo {
            name: "brightness".into(),
            kind: ControlKind::Integer,
            min: -64,
            max: 64,
            step: 1,
            default: 0,
            value: self.brightness.load(Ordering::Relaxed),
            menu: Vec::new(),
        }
    }
}

impl FrameSource for TestPattern {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError> {
        if self.paced {
            let period = Duration::from_secs(1) / self.info.fps;
            let now = Instant::now();
            let due = self.next_due.unwrap_or(now);
            if due > now {
                std::thread::sleep(due - now);
            }
            // After a long stall, restart the cadence rather than bursting to catch up.
            let next = due + period;
            self.next_due = Some(if next < Instant::now() {
                Instant::now()
            } else {
                next
            });
        }
        let captured_at = Instant::now();
        self.generator
            .render(self.seq as u32, unix_ms_u32(), &mut self.buffer);
        let offset = self.brightness.load(Ordering::Relaxed);
        if offset != 0 {
            // Below the two stamp rows only, so the frame number stays readable.
            let (w, b) = (
                self.buffer.width,
                super::pattern::cell_size(self.buffer.width),
            );
            let (y, _, _) = self.buffer.planes_mut();
            for p in &mut y[2 * b * w..] {
                *p = (i64::from(*p) + offset).clamp(16, 235) as u8;
            }
        }
        if self.noise {
            let (w, h) = (self.buffer.width, self.buffer.height);
            let rows = super::pattern::noise_rows(w, h);
            let (y, _, _) = self.buffer.planes_mut();
            super::pattern::fill_noise(&mut y[rows.start * w..rows.end * w], self.seq);
        }
        consume(
            &self.buffer.view(),
            CapturedFrame {
                seq: self.seq,
                captured_at,
                bytes_copied: 0,
            },
        );
        self.seq += 1;
        Ok(())
    }

    fn controls(&mut self) -> Result<Vec<ControlInfo>, ControlError> {
        Ok(vec![self.brightness_info()])
    }

    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        if info.name != "brightness" {
            return Err(ControlError::Unknown(info.name.clone()));
        }
        self.brightness.store(value, Ordering::Relaxed);
        Ok(value)
    }
}

/// Live counters, read by the state publisher and the benchmarks.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub capturing: AtomicBool,
    pub viewers: AtomicU32,
    pub width: AtomicU32,
    pub height: AtomicU32,
    pub fps: AtomicU32,
    pub bitrate: AtomicU32,
    pub frames_encoded: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub bytes_copied_last: AtomicU64,
    pub bytes_copied_total: AtomicU64,
    pub source_errors: AtomicU64,
    /// Bumped on every change a dashboard cares about right away (viewers, capturing).
    pub generation: AtomicU64,
    /// Milliseconds since `epoch` when the capture thread last made progress (a frame, or an
    /// attempt to open the camera). The watchdog reads it.
    last_progress_ms: AtomicU64,
    /// True while the capture thread waits for work with the camera closed (idle by design).
    idle: std::sync::atomic::AtomicBool,
    epoch: std::sync::OnceLock<Instant>,
    /// What the open (or last opened) source delivers.
    source: std::sync::Mutex<Option<SourceInfo>>,
    /// Last known control values, for the state topic.
    controls: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
}

impl PipelineStats {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    fn progressed(&self) {
        self.last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// What the open (or last opened) source delivers: format, size, stride.
    pub fn source_info(&self) -> Option<SourceInfo> {
        // Plain data: a poisoned lock still holds a valid value.
        self.source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Last known control values by name.
    pub fn control_values(&self) -> std::collections::BTreeMap<String, i64> {
        // Plain map of integers: a poisoned lock still holds valid data.
        self.controls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn remember_controls(&self, controls: &[ControlInfo]) {
        let mut map = self.controls.lock().unwrap_or_else(|p| p.into_inner());
        for c in controls {
            map.insert(c.name.clone(), c.value);
        }
        drop(map);
        self.bump();
    }

    /// True when the capture thread made progress within `window`.
    pub fn progress_is_recent(&self, window: Duration) -> bool {
        self.now_ms()
            .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed))
            <= window.as_millis() as u64
    }

    /// The watchdog's question: is the capture thread alive? Yes while it is idle by design
    /// (camera closed, waiting for a viewer) or made progress (a frame, a retry of the camera)
    /// within `window`; no when it is stuck, e.g. in a driver call that never returns.
    pub fn capture_is_healthy(&self, window: Duration) -> bool {
        self.idle.load(Ordering::Relaxed) || self.progress_is_recent(window)
    }
}

/// Requests to the capture thread.
pub enum Control {
    Subscribe {
        id: SubscriberId,
        sink: mpsc::Sender<EncodedFrame>,
    },
    Unsubscribe {
        id: SubscriberId,
    },
    Keyframe,
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
        params: CaptureParams,
        reply: oneshot::Sender<Result<CaptureParams, String>>,
    },
    Shutdown,
}

/// The pipeline is gone (shut down or crashed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("capture pipeline is not running")]
pub struct PipelineGone;

/// Cloneable handle to the capture thread.
#[derive(Clone)]
pub struct PipelineHandle {
    tx: mpsc::Sender<Control>,
    stats: Arc<PipelineStats>,
}

impl PipelineHandle {
    pub fn stats(&self) -> &Arc<PipelineStats> {
        &self.stats
    }

    pub async fn subscribe(
        &self,
        id: SubscriberId,
        sink: mpsc::Sender<EncodedFrame>,
    ) -> Result<(), PipelineGone> {
        self.tx
            .send(Control::Subscribe { id, sink })
            .await
            .map_err(|_| PipelineGone)
    }

    /// Never blocks: used from drop paths too.
    pub fn unsubscribe(&self, id: SubscriberId) {
        if self.tx.try_send(Control::Unsubscribe { id }).is_err() {
            // Queue full or thread gone: the closed sink is noticed on the next frame anyway.
            tracing::debug!(id, "unsubscribe deferred to sink close");
        }
    }

    /// Never blocks; keyframe requests coalesce, so a full queue may drop one.
    pub fn request_keyframe(&self) {
        let _ = self.tx.try_send(Control::Keyframe);
    }

    /// Sends a request carrying a reply channel and waits for the capture thread's answer.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, PipelineGone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| PipelineGone)?;
        rx.await.map_err(|_| PipelineGone)
    }

    pub async fn list_controls(&self) -> Result<Vec<ControlInfo>, ControlError> {
        self.request(|reply| Control::ListControls { reply })
            .await
            .map_err(|e| ControlError::Failed(e.to_string()))?
    }

    /// Validates `value` against the driver's range, then sets it.
    pub async fn set_control(&self, name: String, value: i64) -> Result<i64, ControlError> {
        self.request(|reply| Control::SetControl { name, value, reply })
            .await
            .map_err(|e| ControlError::Failed(e.to_string()))?
    }

    /// The next captured picture, copied out of the capture buffer.
    pub async fn snapshot(&self) -> Result<I420Buffer, String> {
        self.request(|reply| Control::Snapshot { reply })
            .await
            .map_err(|e| e.to_string())?
    }

    /// Changes size and rate; on failure the previous settings stay in force.
    pub async fn reconfigure(&self, params: CaptureParams) -> Result<CaptureParams, String> {
        self.request(|reply| Control::Reconfigure { params, reply })
            .await
            .map_err(|e| e.to_string())?
    }

    /// What capture is currently set to.
    pub fn params(&self) -> CaptureParams {
        CaptureParams {
            width: self.stats.width.load(Ordering::Relaxed),
            height: self.stats.height.load(Ordering::Relaxed),
            fps: self.stats.fps.load(Ordering::Relaxed),
        }
    }

    pub async fn set_bitrate(&self, bps: u32) -> Result<u32, String> {
        self.request(|reply| Control::SetBitrate { bps, reply })
            .await
            .map_err(|e| e.to_string())?
    }
}

/// Static pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub encoder: EncoderSettings,
    /// Configured picture size and rate (the source may deliver another).
    pub capture: CaptureParams,
    /// Wait between attempts to (re)open a failed camera while viewers watch.
    pub reopen_delay: Duration,
}

/// Starts the capture/encode thread. It ends when `cancel` fires or every handle is gone.
pub fn spawn(
    config: PipelineConfig,
    opener: SourceOpener,
    cancel: CancellationToken,
) -> std::io::Result<(PipelineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(256);
    let stats = Arc::new(PipelineStats::default());
    stats
        .bitrate
        .store(config.encoder.bitrate, Ordering::Relaxed);
    stats.fps.store(config.capture.fps, Ordering::Relaxed);
    stats.width.store(config.capture.width, Ordering::Relaxed);
    stats.height.store(config.capture.height, Ordering::Relaxed);
    let handle = PipelineHandle {
        tx: tx.clone(),
        stats: stats.clone(),
    };
    // Wakes the thread out of its idle wait on shutdown.
    let waker_cancel = cancel.clone();
    let waker = async move {
        waker_cancel.cancelled().await;
        let _ = tx.send(Control::Shutdown).await;
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
                stats,
                cancel,
                fanout: Fanout::default(),
                running: None,
                snapshots: Vec::new(),
                control_ops: Vec::new(),
            };
            worker.run();
        })?;
    Ok((handle, thread))
}

struct Running {
    source: Box<dyn FrameSource>,
    encoder: H264Encoder,
    out: Vec<u8>,
    frame_duration: Duration,
    /// Encoder timestamps count from here.
    started: Instant,
}

struct Worker {
    config: PipelineConfig,
    opener: SourceOpener,
    rx: mpsc::Receiver<Control>,
    stats: Arc<PipelineStats>,
    cancel: CancellationToken,
    fanout: Fanout<mpsc::Sender<EncodedFrame>>,
    running: Option<Running>,
    /// Waiting for the next picture.
    snapshots: Vec<oneshot::Sender<Result<I420Buffer, String>>>,
    /// Control requests waiting for the source to open.
    control_ops: Vec<ControlOp>,
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
    fn run(&mut self) {
        let mut next_open_attempt = Instant::now();
        while !self.cancel.is_cancelled() {
            if self.fanout.is_empty() && self.snapshots.is_empty() && self.control_ops.is_empty() {
                self.stop_capture();
                // Idle: sleep until someone asks for something.
                self.stats.idle.store(true, Ordering::Relaxed);
                let next = self.rx.blocking_recv();
                self.stats.idle.store(false, Ordering::Relaxed);
                self.stats.progressed();
                match next {
                    Some(c) => {
                        if !self.handle(c) {
                            break;
                        }
                    }
                    None => break,
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
                    self.stats.progressed();
                    std::thread::sleep((next_open_attempt - now).min(Duration::from_millis(50)));
                    continue;
                }
                self.stats.progressed();
                if let Err(e) = self.start_capture() {
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
                    self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                    // A camera that cannot do what is configured will not learn it in a second.
                    let delay = match e {
                        SourceError::Unsupported(_) => self.config.reopen_delay * 10,
                        _ => self.config.reopen_delay,
                    };
                    tracing::error!(error = %e, retry_in = ?delay, "cannot start capture");
                    next_open_attempt = Instant::now() + delay;
                    continue;
                }
            }
            self.run_control_ops();
            if self.fanout.is_empty() && self.snapshots.is_empty() {
                continue; // opened only for control requests
            }
            if let Err(e) = self.capture_one() {
                match e {
                    SourceError::BadFrame(_) => {
                        tracing::warn!(error = %e, "skipping frame");
                    }
                    _ => {
                        self.stats.source_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "capture failed; releasing the camera and retrying");
                        self.stop_capture();
                        next_open_attempt = Instant::now() + self.config.reopen_delay;
                    }
                }
            }
        }
        self.stop_capture();
        self.fanout = Fanout::default();
        self.stats.viewers.store(0, Ordering::Relaxed);
        tracing::debug!("capture thread finished");
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

    fn handle(&mut self, control: Control) -> bool {
        match control {
            Control::Subscribe { id, sink } => {
                self.fanout.subscribe(id, sink);
                self.viewers_changed();
            }
            Control::Unsubscribe { id } => {
                self.fanout.unsubscribe(id);
                self.viewers_changed();
            }
            Control::Keyframe => {
                if let Some(r) = self.running.as_mut() {
                    r.encoder.request_keyframe();
                }
            }
            Control::SetBitrate { bps, reply } => {
                self.config.encoder.bitrate = bps;
                let result = match self.running.as_mut() {
                    Some(r) => r.encoder.set_bitrate(bps).map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                if result.is_ok() {
                    self.stats.bitrate.store(bps, Ordering::Relaxed);
                    self.stats.bump();
                }
                let _ = reply.send(result.map(|()| bps));
            }
            Control::Snapshot { reply } => self.snapshots.push(reply),
            Control::ListControls { reply } => self.control_ops.push(ControlOp::List(reply)),
            Control::SetControl { name, value, reply } => {
                self.control_ops.push(ControlOp::Set { name, value, reply });
            }
            Control::Reconfigure { params, reply } => {
                let _ = reply.send(self.reconfigure(params));
            }
            Control::Shutdown => return false,
        }
        true
    }

    /// Answers queued control requests against the open source.
    fn run_control_ops(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        for op in std::mem::take(&mut self.control_ops) {
            match op {
                ControlOp::List(reply) => {
                    let result = r.source.controls();
                    if let Ok(list) = &result {
                        self.stats.remember_controls(list);
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
                        let applied = r.source.set_control(&info, value)?;
                        self.stats.remember_controls(&[ControlInfo {
                            value: applied,
                            ..info
                        }]);
                        Ok(applied)
                    });
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Applies new capture parameters; restarts a running capture and rolls back on failure.
    fn reconfigure(&mut self, params: CaptureParams) -> Result<CaptureParams, String> {
        let previous = self.config.capture;
        self.config.capture = params;
        if self.running.is_none() {
            self.publish_params(params);
            return Ok(params);
        }
        self.stop_capture();
        match self.start_capture() {
            Ok(()) => Ok(self.current_params()),
            Err(e) => {
                tracing::warn!(error = %e, "new capture settings failed; restoring the previous ones");
                self.config.capture = previous;
                if let Err(e2) = self.start_capture() {
                    tracing::error!(error = %e2, "previous capture settings failed too; will retry");
                }
                Err(e.to_string())
            }
        }
    }

    fn current_params(&self) -> CaptureParams {
        CaptureParams {
            width: self.stats.width.load(Ordering::Relaxed),
            height: self.stats.height.load(Ordering::Relaxed),
            fps: self.stats.fps.load(Ordering::Relaxed),
        }
    }

    fn publish_params(&self, p: CaptureParams) {
        self.stats.width.store(p.width, Ordering::Relaxed);
        self.stats.height.store(p.height, Ordering::Relaxed);
        self.stats.fps.store(p.fps, Ordering::Relaxed);
        self.stats.bump();
    }

    fn viewers_changed(&self) {
        self.stats
            .viewers
            .store(self.fanout.len() as u32, Ordering::Relaxed);
        self.stats.bump();
    }

    fn start_capture(&mut self) -> Result<(), SourceError> {
        let source = (self.opener)(self.config.capture)?;
        let info = source.info();
        let mut settings = self.config.encoder;
        settings.fps = info.fps;
        let encoder = H264Encoder::new(settings)
            .map_err(|e| SourceError::Unsupported(format!("encoder: {e}")))?;
        self.publish_params(CaptureParams {
            width: info.width,
            height: info.height,
            fps: info.fps,
        });
        self.stats.capturing.store(true, Ordering::Relaxed);
        tracing::info!(width = info.width, height = info.height, fps = info.fps, format = %info.pixel_format, stride = info.stride, "capture started");
        let frame_duration = Duration::from_secs(1) / info.fps.max(1);
        *self.stats.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        self.stats.bump();
        self.running = Some(Running {
            source,
            encoder,
            out: Vec::new(),
            frame_duration,
            started: Instant::now(),
        });
        Ok(())
    }

    fn stop_capture(&mut self) {
        if self.running.take().is_some() {
            self.stats.capturing.store(false, Ordering::Relaxed);
            self.stats.bump();
            tracing::info!("capture stopped");
        }
    }

    fn capture_one(&mut self) -> Result<(), SourceError> {
        // Invariant: called only after start_capture succeeded.
        let Some(r) = self.running.as_mut() else {
            return Ok(());
        };
        if self.fanout.wants_keyframe() {
            r.encoder.request_keyframe();
        }
        let mut encoded: Option<Result<(bool, CapturedFrame), String>> = None;
        let (encoder, out, started) = (&mut r.encoder, &mut r.out, r.started);
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
            let result = encoder
                .encode(view, ts, out)
                .map(|e| (e.keyframe, meta))
                .map_err(|e| e.to_string());
            encoded = Some(result);
        })?;
        let Some(result) = encoded else {
            return Ok(());
        };
        let (keyframe, meta) = result.map_err(|e| SourceError::BadFrame(format!("encode: {e}")))?;
        self.stats
            .bytes_copied_last
            .store(meta.bytes_copied as u64, Ordering::Relaxed);
        self.stats
            .bytes_copied_total
            .fetch_add(meta.bytes_copied as u64, Ordering::Relaxed);
        if r.out.is_empty() {
            return Ok(()); // the encoder skipped this picture
        }
        self.stats.frames_encoded.fetch_add(1, Ordering::Relaxed);
        self.stats.progressed();
        // Hand the bitstream over without copying; the next frame gets a fresh Vec.
        let capacity = r.out.capacity();
        let data = Bytes::from(std::mem::replace(&mut r.out, Vec::with_capacity(capacity)));
        let frame = EncodedFrame {
            data,
            keyframe,
            seq: meta.seq,
            captured_at: meta.captured_at,
            duration: r.frame_duration,
        };
        let d = self.fanout.deliver(&frame);
        if d.dropped > 0 {
            self.stats
                .frames_dropped
                .fetch_add(d.dropped as u64, Ordering::Relaxed);
        }
        if d.closed > 0 {
            self.viewers_changed();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(width: u32, height: u32, reopen_delay: Duration) -> PipelineConfig {
        PipelineConfig {
            encoder: EncoderSettings {
                bitrate: 500_000,
                fps: 30,
                keyframe_interval: 30,
            },
            capture: CaptureParams {
                width,
                height,
                fps: 30,
            },
            reopen_delay,
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
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn captures_only_while_subscribed_and_starts_with_a_keyframe() {
        let cancel = CancellationToken::new();
        let (handle, thread) = spawn_pattern(&cancel);
        let stats = handle.stats().clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !stats.capturing.load(Ordering::Relaxed),
            "idle without viewers"
        );

        let (tx, mut rx) = mpsc::channel(8);
        handle.subscribe(1, tx).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(first.keyframe, "a new viewer starts at a keyframe");
        let second = rx.recv().await.unwrap();
        assert!(second.seq > first.seq);
        assert!(stats.capturing.load(Ordering::Relaxed));
        assert_eq!(stats.viewers.load(Ordering::Relaxed), 1);
        assert_eq!(stats.bytes_copied_last.load(Ordering::Relaxed), 0);

        let controls = handle.list_controls().await.unwrap();
        assert_eq!(controls[0].name, "brightness");
        assert!(matches!(
            handle.set_control("brightness".into(), 65).await,
            Err(ControlError::OutOfRange(_))
        ));
        assert!(matches!(
            handle.set_control("zoom".into(), 1).await,
            Err(ControlError::Unknown(_))
        ));
        assert_eq!(handle.set_control("brightness".into(), -20).await, Ok(-20));
        assert_eq!(stats.control_values().get("brightness"), Some(&-20));
        let snap = handle.snapshot().await.unwrap();
        assert_eq!((snap.width, snap.height), (320, 240));
        assert_eq!(snap.data[239 * 320], 160, "white bar (180) darkened by 20");
        assert!(crate::media::pattern::read_stamp(&snap.data, 320, 320).is_some());
        assert_eq!(handle.set_bitrate(300_000).await, Ok(300_000));
        assert_eq!(stats.bitrate.load(Ordering::Relaxed), 300_000);

        // Live resolution change: the same viewer keeps receiving, from a keyframe.
        let wanted = CaptureParams {
            width: 160,
            height: 120,
            fps: 15,
        };
        assert_eq!(handle.reconfigure(wanted).await, Ok(wanted));
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
        let too_wide = CaptureParams {
            width: 1920,
            height: 1080,
            fps: 30,
        };
        assert!(handle.reconfigure(too_wide).await.is_err());
        assert_eq!(handle.params(), wanted);
        assert!(rx.recv().await.is_some(), "still streaming");

        // A viewer that goes away without unsubscribing is noticed by its closed queue.
        drop(rx);
        wait_for("capture to stop", || {
            !stats.capturing.load(Ordering::Relaxed)
        })
        .await;
        assert_eq!(stats.viewers.load(Ordering::Relaxed), 0);

        // Snapshots work with nobody watching: capture runs for one picture and stops.
        let snap = handle.snapshot().await.unwrap();
        assert_eq!((snap.width, snap.height), (160, 120));
        wait_for("capture to stop again", || {
            !stats.capturing.load(Ordering::Relaxed)
        })
        .await;

        cancel.cancel();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    /// A camera whose driver call never returns (until released by the test).
    struct StuckSource {
        release: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FrameSource for StuckSource {
        fn info(&self) -> SourceInfo {
            SourceInfo {
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
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = release.clone();
        let (handle, thread) = spawn(
            test_config(160, 120, Duration::from_millis(20)),
            Box::new(move |_| {
                Ok(Box::new(StuckSource { release: r.clone() }) as Box<dyn FrameSource>)
            }),
            cancel.clone(),
        )
        .unwrap();
        let stats = handle.stats().clone();
        let window = Duration::from_millis(200);
        wait_for("the idle wait", || stats.idle.load(Ordering::Relaxed)).await;
        tokio::time::sleep(window * 2).await;
        assert!(
            stats.capture_is_healthy(window),
            "idle by design, long after the last progress"
        );
        let (tx, _rx) = mpsc::channel(8);
        handle.subscribe(1, tx).await.unwrap();
        wait_for("the capture to get stuck", || {
            !stats.idle.load(Ordering::Relaxed) && !stats.capture_is_healthy(window)
        })
        .await;
        release.store(true, Ordering::Relaxed);
        wait_for("the capture thread to retry", || {
            stats.capture_is_healthy(window)
        })
        .await;
        cancel.cancel();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn failing_source_is_retried_not_fatal() {
        let cancel = CancellationToken::new();
        let attempts = Arc::new(AtomicU32::new(0));
        let a = attempts.clone();
        let (handle, thread) = spawn(
            test_config(160, 120, Duration::from_millis(20)),
            Box::new(move |_| {
                if a.fetch_add(1, Ordering::Relaxed) < 3 {
                    Err(SourceError::Device("no such device".into()))
                } else {
                    Ok(Box::new(TestPattern::new(160, 120, 30, true)) as Box<dyn FrameSource>)
                }
            }),
            cancel.clone(),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        handle.subscribe(7, tx).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(frame.keyframe);
        assert!(attempts.load(Ordering::Relaxed) >= 4);
        assert_eq!(handle.stats().source_errors.load(Ordering::Relaxed), 3);
        cancel.cancel();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert!(
            handle.set_bitrate(200_000).await.is_err(),
            "gone after shutdown"
        );
    }
}
