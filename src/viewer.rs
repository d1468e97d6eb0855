//! One WebRTC viewer session: answer the offer, trickle ICE, send encoded frames, serve the data channel.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_H264;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCCertificate,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceGatheringState, RTCIceServer,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

use crate::control::{Controller, Origin, Outcome};
use crate::forwarding::RouterMsg;
use crate::media::frame::EncodedFrame;
use crate::media::pipeline::PipelineHandle;
use crate::ports::PortPool;
use crate::protocol::command::CHUNK_BYTES;
use crate::protocol::signal::{ByeReason, DeviceMessage, ErrorCode, IceCandidate, Rejection};
use crate::protocol::topics::SessionId;
use crate::ratelimit::TokenBucket;
use crate::sessions::SessionKey;

/// The H.264 payload type rtcam offers to match; browsers pick their own in the offer.
const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";
/// Set once a peer connection could not open its mDNS socket; later sessions skip mDNS.
static MDNS_UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// Label of the control data channel.
pub const CONTROL_LABEL: &str = "control";

/// WebRTC settings shared by every session.
pub struct WebrtcSettings {
    pub ice_servers: Vec<RTCIceServer>,
    /// One DTLS certificate for every session (cached on disk by the service).
    pub certificate: RTCCertificate,
    pub bind_addresses: Vec<IpAddr>,
    pub ports: PortPool,
    pub connect_timeout: Duration,
    pub disconnect_timeout: Duration,
    pub queue_frames: usize,
}

/// Where a session's outbound signaling goes (the MQTT `out` topic in production).
pub trait SignalTransport: Send + Sync + 'static {
    fn send(&self, id: &SessionId, message: &DeviceMessage);
}

/// Everything a session needs, injected.
pub struct SessionContext {
    pub settings: WebrtcSettings,
    pub pipeline: PipelineHandle,
    pub controller: Controller,
    /// Commands per second and burst allowed per viewer.
    pub command_rate: (u32, u32),
    pub signal: Arc<dyn SignalTransport>,
    /// MQTT publishing for command replies.
    pub publisher: Arc<dyn crate::control::Publisher>,
    pub ended: mpsc::Sender<SessionEnded>,
}

/// Inputs from the viewer, routed by the signaling task.
#[derive(Debug)]
pub enum SessionInput {
    Candidate(Option<IceCandidate>),
    Bye,
}

/// Sent to the signaling task when a session is gone.
#[derive(Debug)]
pub struct SessionEnded {
    pub id: SessionId,
    pub key: SessionKey,
}

/// The signaling task's handle to a running session.
pub struct SessionHandle {
    pub inputs: mpsc::Sender<SessionInput>,
}

/// Starts a session task for an offer.
pub fn spawn_session(
    ctx: Arc<SessionContext>,
    id: SessionId,
    key: SessionKey,
    offer_sdp: String,
    cancel: CancellationToken,
) -> SessionHandle {
    let (tx, rx) = mpsc::channel(64);
    let span = tracing::info_span!("viewer", session = %id, key);
    tokio::spawn(
        async move {
            tracing::info!("offer received");
            let end = run_session(&ctx, &id, key, offer_sdp, rx, cancel).await;
            match &end {
                End::ViewerBye => tracing::info!("viewer said bye"),
                End::Bye(reason) => {
                    tracing::info!(?reason, "session closed");
                    ctx.signal.send(&id, &DeviceMessage::bye(*reason));
                }
                End::Rejected(r) => {
                    tracing::warn!(code = %r.code, reason = %r.reason, "session failed");
                    ctx.signal.send(&id, &DeviceMessage::error(r));
                }
            }
            let _ = ctx.ended.send(SessionEnded { id, key }).await;
        }
        .instrument(span),
    );
    SessionHandle { inputs: tx }
}

enum End {
    ViewerBye,
    Bye(ByeReason),
    Rejected(Rejection),
}

/// Peer connection events, forwarded from the handler into the session task.
enum PcEvent {
    Candidate(RTCPeerConnectionIceEvent),
    GatheringComplete,
    State(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
}

struct Handler {
    tx: mpsc::Sender<PcEvent>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let _ = self.tx.send(PcEvent::Candidate(event)).await;
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.tx.send(PcEvent::GatheringComplete).await;
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.tx.send(PcEvent::State(state)).await;
    }

    async fn on_data_channel(&self, data_channel: Arc<dyn DataChannel>) {
        let _ = self.tx.send(PcEvent::DataChannel(data_channel)).await;
    }
}

fn internal(e: impl std::fmt::Display) -> End {
    End::Rejected(Rejection::new(ErrorCode::Internal, e.to_string()))
}

fn random_u32() -> u32 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

/// The H.264 codec rtcam sends: Constrained Baseline, packetization-mode=1.
pub fn h264_codec() -> RTCRtpCodec {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: H264_FMTP.to_owned(),
        rtcp_feedback: vec![fb("ccm", "fir"), fb("nack", ""), fb("nack", "pli")],
    }
}

/// One peer connection with rtcam's codec, interceptors, ICE servers and certificate.
async fn build_peer_connection(
    settings: &WebrtcSettings,
    addrs: &[SocketAddr],
    events: &mpsc::Sender<PcEvent>,
    mdns: MulticastDnsMode,
) -> Result<Arc<dyn PeerConnection>, String> {
    let mut media_engine = MediaEngine::default();
    media_engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: h264_codec(),
                payload_type: 102,
            },
            RtpCodecKind::Video,
        )
        .map_err(|e| e.to_string())?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)
        .map_err(|e| e.to_string())?
        .with(Slot::from(14_000), KeyframeRequestInterceptor::default());
    let config = RTCConfigurationBuilder::new()
        .with_ice_servers(settings.ice_servers.clone())
        .with_certificates(vec![settings.certificate.clone()])
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(config)
        .with_media_engine(media_engine)
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(mdns)
                .build(),
        )
        .with_interceptor_registry(registry)
        .with_handler(Arc::new(Handler { tx: events.clone() }))
        .with_udp_addrs(addrs.to_vec())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(pc))
}

async fn run_session(
    ctx: &SessionContext,
    id: &SessionId,
    key: SessionKey,
    offer_sdp: String,
    mut inputs: mpsc::Receiver<SessionInput>,
    cancel: CancellationToken,
) -> End {
    let settings = &ctx.settings;
    let lease = match settings.ports.lease(&settings.bind_addresses) {
        Ok(l) => l,
        Err(e) => return internal(e),
    };
    let offer = match RTCSessionDescription::offer(offer_sdp) {
        Ok(o) => o,
        Err(e) => return End::Rejected(Rejection::new(ErrorCode::BadSdp, e.to_string())),
    };

    let codec = h264_codec();
    let (ev_tx, mut events) = mpsc::channel(64);
    let addrs: Vec<SocketAddr> = settings
        .bind_addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, lease.port))
        .collect();
    // mDNS lets the device resolve browsers' `.local` host candidates on a LAN, but needs a
    // multicast-capable interface; without one, stream anyway with mDNS off (and remember).
    let mdns = if MDNS_UNAVAILABLE.load(Ordering::Relaxed) {
        MulticastDnsMode::Disabled
    } else {
        MulticastDnsMode::QueryOnly
    };
    let pc = match build_peer_connection(settings, &addrs, &ev_tx, mdns).await {
        Ok(pc) => pc,
        Err(e) if mdns != MulticastDnsMode::Disabled => {
            MDNS_UNAVAILABLE.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "mDNS unavailable (no multicast route?); viewers' .local candidates will not resolve");
            match build_peer_connection(settings, &addrs, &ev_tx, MulticastDnsMode::Disabled).await
            {
                Ok(pc) => pc,
                Err(e) => return internal(format!("peer connection: {e}")),
            }
        }
        Err(e) => return internal(format!("peer connection: {e}")),
    };
    drop(ev_tx);
    let session_cancel = cancel.child_token();
    let end = negotiate_and_stream(
        ctx,
        id,
        key,
        &pc,
        offer,
        codec,
        &mut inputs,
        &mut events,
        &session_cancel,
    )
    .await;
    // Teardown: stop helpers, stop frames, close the connection, free the port.
    session_cancel.cancel();
    ctx.pipeline.unsubscribe(key);
    if tokio::time::timeout(Duration::from_secs(3), pc.close())
        .await
        .is_err()
    {
        tracing::warn!("peer connection close timed out");
    }
    drop(lease);
    end
}

#[allow(clippy::too_many_arguments)]
async fn negotiate_and_stream(
    ctx: &SessionContext,
    id: &SessionId,
    key: SessionKey,
    pc: &Arc<dyn PeerConnection>,
    offer: RTCSessionDescription,
    codec: RTCRtpCodec,
    inputs: &mut mpsc::Receiver<SessionInput>,
    events: &mut mpsc::Receiver<PcEvent>,
    cancel: &CancellationToken,
) -> End {
    let settings = &ctx.settings;
    let ssrc = random_u32();
    let track = match TrackLocalStaticSample::new(
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
                codec,
                ..Default::default()
            }],
        ),
    ) {
        Ok(t) => Arc::new(t),
        Err(e) => return internal(e),
    };
    let sender = match pc.add_track(track.clone() as Arc<dyn TrackLocal>).await {
        Ok(s) => s,
        Err(e) => return internal(e),
    };
    if let Err(e) = pc.set_remote_description(offer).await {
        return End::Rejected(Rejection::new(ErrorCode::BadSdp, e.to_string()));
    }
    let answer = match pc.create_answer(None).await {
        Ok(a) => a,
        Err(e) => return End::Rejected(Rejection::new(ErrorCode::BadSdp, e.to_string())),
    };
    let answer_sdp = answer.sdp.clone();
    if let Err(e) = pc.set_local_description(answer).await {
        return End::Rejected(Rejection::new(ErrorCode::BadSdp, e.to_string()));
    }
    if !answer_sdp.contains("a=sendonly") && !answer_sdp.contains("a=sendrecv") {
        return End::Rejected(Rejection::new(
            ErrorCode::BadSdp,
            "the offer has no video section rtcam can send H.264 (packetization-mode=1) on",
        ));
    }
    let bundle_mid = first_mid(&answer_sdp).unwrap_or_else(|| "0".to_owned());
    tracing::debug!(sdp = %answer_sdp, "answer");
    ctx.signal.send(id, &DeviceMessage::answer(answer_sdp));
    let offered_at = Instant::now();

    let connect_deadline = tokio::time::sleep(settings.connect_timeout);
    tokio::pin!(connect_deadline);
    let mut connected = false;
    let mut disconnected_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            // Shutdown first: at shutdown the input channel closes too, and that must not
            // read as the viewer's own bye.
            biased;
            _ = cancel.cancelled() => return End::Bye(ByeReason::Shutdown),
            _ = &mut connect_deadline, if !connected => {
                tracing::warn!(timeout = ?settings.connect_timeout, "viewer did not connect in time");
                return End::Bye(ByeReason::Timeout);
            }
            _ = tick.tick() => {
                if let Some(since) = disconnected_since
                    && since.elapsed() >= settings.disconnect_timeout
                {
                    tracing::info!("viewer disconnected too long");
                    return End::Bye(ByeReason::Timeout);
                }
            }
            input = inputs.recv() => match input {
                Some(SessionInput::Bye) => return End::ViewerBye,
                None => return End::Bye(ByeReason::Shutdown),
                Some(SessionInput::Candidate(None)) => {}
                Some(SessionInput::Candidate(Some(c))) => {
                    let init = RTCIceCandidateInit {
                        candidate: c.candidate,
                        sdp_mid: c.sdp_mid,
                        sdp_mline_index: c.sdp_mline_index,
                        username_fragment: c.username_fragment,
                        url: None,
                    };
                    if let Err(e) = pc.add_ice_candidate(init).await {
                        tracing::info!(error = %e, "remote candidate refused");
                        ctx.signal.send(id, &DeviceMessage::error(&Rejection::new(
                            ErrorCode::BadCandidate,
                            e.to_string(),
                        )));
                    }
                }
            },
            event = events.recv() => match event {
                None => return End::Bye(ByeReason::Closed),
                Some(PcEvent::Candidate(ev)) => match ev.candidate.to_json() {
                    // webrtc-rs leaves the mid empty; browsers need it. Everything is bundled
                    // on the first media section, so that is where every candidate belongs.
                    Ok(init) => ctx.signal.send(id, &DeviceMessage::candidate(Some(IceCandidate {
                        candidate: init.candidate,
                        sdp_mid: Some(bundle_mid.clone()),
                        sdp_mline_index: Some(0),
                        username_fragment: init.username_fragment,
                    }))),
                    Err(e) => tracing::warn!(error = %e, "cannot serialize local candidate"),
                },
                Some(PcEvent::GatheringComplete) => {
                    ctx.signal.send(id, &DeviceMessage::candidate(None));
                }
                Some(PcEvent::DataChannel(dc)) => {
                    tokio::spawn(
                        serve_data_channel(
                            dc,
                            id.clone(),
                            ctx.controller.clone(),
                            ctx.command_rate,
                            cancel.clone(),
                        )
                        .in_current_span(),
                    );
                }
                Some(PcEvent::State(state)) => {
                    tracing::debug!(%state, "connection state");
                    match state {
                        RTCPeerConnectionState::Connected => {
                            disconnected_since = None;
                            if !connected {
                                connected = true;
                                tracing::info!(setup_ms = offered_at.elapsed().as_millis() as u64, "viewer connected");
                                let payload_type = match sender.get_parameters().await {
                                    Ok(p) => match p.rtp_parameters.codecs.first() {
                                        Some(c) => c.payload_type,
                                        None => return internal("no negotiated H.264 codec"),
                                    },
                                    Err(e) => return internal(e),
                                };
                                if let Err(e) = start_media(ctx, key, track.clone(), ssrc, payload_type, cancel).await {
                                    return internal(e);
                                }
                            }
                        }
                        RTCPeerConnectionState::Disconnected => {
                            disconnected_since.get_or_insert_with(Instant::now);
                        }
                        RTCPeerConnectionState::Failed => return End::Bye(ByeReason::IceFailed),
                        RTCPeerConnectionState::Closed => return End::Bye(ByeReason::Closed),
                        _ => {}
                    }
                }
            },
        }
    }
}

/// Subscribes to encoded frames and forwards PLI/FIR as keyframe requests.
async fn start_media(
    ctx: &SessionContext,
    key: SessionKey,
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
    cancel: &CancellationToken,
) -> Result<(), crate::media::pipeline::PipelineGone> {
    let (frames_tx, mut frames) = mpsc::channel::<EncodedFrame>(ctx.settings.queue_frames);
    ctx.pipeline.subscribe(key, frames_tx).await?;
    let writer_track = track.clone();
    let writer_cancel = cancel.clone();
    tokio::spawn(
        async move {
            let mut previous: Option<Instant> = None;
            let mut sent = 0u64;
            loop {
                let frame = tokio::select! {
                    _ = writer_cancel.cancelled() => break,
                    f = frames.recv() => match f { Some(f) => f, None => break },
                };
                // RTP time advances by the capture interval, so frames skipped for this
                // viewer do not compress its timeline.
                let duration = previous
                    .map(|p| frame.captured_at.saturating_duration_since(p))
                    .filter(|d| !d.is_zero())
                    .unwrap_or(frame.duration);
                previous = Some(frame.captured_at);
                let sample = Sample {
                    data: frame.data,
                    duration,
                    ..Sample::new(frame.captured_at)
                };
                if let Err(e) = writer_track
                    .sample_writer(ssrc, payload_type)
                    .write_sample(&sample)
                    .await
                {
                    tracing::debug!(error = %e, "write_sample failed");
                }
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
        .in_current_span(),
    );
    let pipeline = ctx.pipeline.clone();
    let rtcp_cancel = cancel.clone();
    tokio::spawn(
        async move {
            loop {
                let event = tokio::select! {
                    _ = rtcp_cancel.cancelled() => break,
                    e = track.poll() => e,
                };
                match event {
                    Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                        if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                            tracing::debug!("PLI/FIR from viewer");
                            pipeline.request_keyframe();
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        .in_current_span(),
    );
    Ok(())
}

/// Answers every command on the `control` channel, one reply per message.
async fn serve_data_channel(
    dc: Arc<dyn DataChannel>,
    id: SessionId,
    controller: Controller,
    rate: (u32, u32),
    cancel: CancellationToken,
) {
    let label = dc.label().await.unwrap_or_default();
    if label != CONTROL_LABEL {
        tracing::info!(%label, "ignoring data channel with unknown label");
        return;
    }
    // Replies to forwarded commands and service events arrive here from the router.
    let (relay_tx, mut relay) = mpsc::channel::<String>(32);
    controller.router().send(RouterMsg::Register {
        session: id.as_str().to_owned(),
        tx: relay_tx,
    });
    let origin = Origin::Viewer(id.clone());
    let mut limiter = TokenBucket::new(rate.0, rate.1, Instant::now());
    loop {
        let (text, attachment) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = relay.recv() => match r { Some(t) => (t, None), None => break },
            e = dc.poll() => match e {
                Some(DataChannelEvent::OnMessage(message)) => {
                    match controller.handle_message(&origin, &message.data, &mut limiter).await {
                        Outcome::Reply { text, attachment, .. } => (text, attachment),
                        Outcome::Forwarded => continue,
                    }
                }
                Some(DataChannelEvent::OnClose) | None => break,
                Some(_) => continue,
            },
        };
        if let Err(e) = dc.send_text(&text).await {
            tracing::debug!(error = %e, "data channel send failed");
            break;
        }
        // Binary data follows its reply header as CHUNK_BYTES-sized binary messages.
        if let Some(data) = attachment {
            for chunk in data.chunks(CHUNK_BYTES) {
                if let Err(e) = dc.send(bytes::BytesMut::from(chunk)).await {
                    tracing::debug!(error = %e, "data channel send failed");
                    break;
                }
            }
        }
    }
    controller.router().send(RouterMsg::Unregister {
        session: id.as_str().to_owned(),
    });
}

/// The `a=mid:` of the first media section.
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
        .map(str::to_owned)
}

fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// Marks inbound PLI/FIR for delivery to the application (webrtc 0.21 drops other RTCP at
/// the end of the chain). Sits above every built-in interceptor, so they see all RTCP first.
#[derive(Default)]
struct KeyframeRequestInterceptor {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestInterceptor {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| is_keyframe_request(p.as_ref()))
                .cloned()
                .collect();
            if !requests.is_empty() {
                msg.message.packet = Packet::Rtcp(requests);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.writes.pop_front()
    }
}

impl Interceptor for KeyframeRequestInterceptor {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_mid_is_found() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\na=mid:video0\r\nm=application 9\r\na=mid:1\r\n";
        assert_eq!(first_mid(sdp).as_deref(), Some("video0"));
        assert_eq!(first_mid("v=0\r\n"), None);
    }

    #[test]
    fn codec_is_constrained_baseline_mode_1() {
        let c = h264_codec();
        assert!(c.sdp_fmtp_line.contains("packetization-mode=1"));
        assert!(c.sdp_fmtp_line.contains("profile-level-id=42e01f"));
        assert!(
            c.rtcp_feedback
                .iter()
                .any(|f| f.typ == "nack" && f.parameter == "pli")
        );
    }
}
