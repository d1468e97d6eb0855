//! webrtc-rs set-up for one viewer: the peer connection with rtcam's codec, interceptors, ICE servers and certificate.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_RTX};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::mpsc;
use webrtc::data_channel::DataChannel;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCCertificate,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, Registry, SettingEngineBuilder, register_default_interceptors,
};

use super::ice_socket::IceRuntime;
use super::link::{FeedbackTap, Link, PacedSender, TwccHistory, TwccNumbering};
use super::session::Timeouts;
use crate::ports::PortPool;
use crate::protocol::sdp::SENT_PROFILE_LEVEL_ID;
use crate::protocol::turn::IceServerSet;
use crate::state::LinkBoard;

/// WebRTC settings shared by every session.
pub(crate) struct WebrtcSettings {
    /// STUN and TURN servers; TURN credentials for coturn's REST scheme are minted per peer
    /// connection.
    pub ice_servers: IceServerSet,
    /// One DTLS certificate for every session (cached on disk by the service).
    pub certificate: RTCCertificate,
    pub bind_addresses: Vec<IpAddr>,
    pub ports: PortPool,
    pub timeouts: Timeouts,
    /// Encoded frames queued per viewer before it skips to the next keyframe.
    pub queue_frames: usize,
    /// Set when the host cannot do multicast (probed at start, see [`multicast_available`])
    /// or a peer connection could not open its mDNS socket: sessions then skip mDNS.
    pub mdns_unavailable: AtomicBool,
    /// Congestion control per viewer (`webrtc.adaptation`); `None`: every viewer gets every
    /// frame, unpaced.
    pub adaptation: Option<Adaptation>,
}

/// What adaptive sessions share.
pub(crate) struct Adaptation {
    /// `encoder.min_bitrate`: no viewer's estimate goes below it.
    pub min_bitrate: u32,
    /// Where each session shows its link in the device state.
    pub links: LinkBoard,
}

/// Peer connection events, forwarded from webrtc-rs's handler into the session task.
pub(crate) enum PcEvent {
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

/// The H.264 codec rtcam registers: Constrained Baseline, packetization-mode=1. webrtc-rs
/// matches offered payload types against it (profile first, else by name) and its answer
/// repeats the chosen payload type's own parameters; which payload types are left to choose
/// from (those that take the stream's real profile) is decided by `protocol::sdp::check_offer_for`.
pub fn h264_codec() -> RTCRtpCodec {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: format!(
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={SENT_PROFILE_LEVEL_ID}"
        ),
        rtcp_feedback: vec![fb("ccm", "fir"), fb("nack", ""), fb("nack", "pli")],
    }
}

/// webrtc-rs's default chain (NACK, receiver/sender reports, TWCC feedback for what rtcam
/// receives) plus rtcam's keyframe-request tap; with a `link`, also congestion control: TWCC
/// numbering (media and RTX) and its send history feeding the link's estimate, the feedback
/// tap (REMB, receiver reports, absolute send time) and the pacer with the retransmission
/// budget and the probes.
fn interceptors(media_engine: &mut MediaEngine, link: Option<&Link>) -> Result<Registry, String> {
    let registry = register_default_interceptors(Registry::new(), media_engine)
        .map_err(|e| e.to_string())?
        .with(Slot::from(14_000), KeyframeRequestInterceptor::default());
    let Some(link) = link else {
        return Ok(registry);
    };
    // register_default_interceptors negotiated transport-cc (feedback and header extension);
    // REMB needs the absolute send time on every packet and goog-remb.
    media_engine
        .register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: rtc::sdp::extmap::ABS_SEND_TIME_URI.to_owned(),
            },
            RtpCodecKind::Video,
            None,
        )
        .map_err(|e| e.to_string())?;
    media_engine.register_feedback(
        RTCPFeedback {
            typ: "goog-remb".into(),
            parameter: String::new(),
        },
        RtpCodecKind::Video,
    );
    Ok(registry
        .with(Slot::CongestionControl, TwccHistory::new(link.clone()))
        .with(Slot::TwccSender, TwccNumbering::default())
        // Wire-ward of the pacer (the send time is the release instant), app-ward of the
        // TWCC numbering.
        .with(Slot::from(2_500), FeedbackTap::new(link.clone()))
        .with(Slot::Pacer, PacedSender::new(link.clone())))
}

async fn build_with(
    settings: &WebrtcSettings,
    addrs: &[SocketAddr],
    events: &mpsc::Sender<PcEvent>,
    mdns: MulticastDnsMode,
    link: Option<&Link>,
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
    // Its retransmission stream (RFC 4588): repairs and probe padding on an SSRC of their own,
    // for viewers that offer it.
    media_engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_RTX.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: "apt=102".to_owned(),
                    rtcp_feedback: vec![],
                },
                payload_type: 103,
            },
            RtpCodecKind::Video,
        )
        .map_err(|e| e.to_string())?;
    let registry = interceptors(&mut media_engine, link)?;
    let ice_servers = settings
        .ice_servers
        .for_device(crate::outbound::unix_ms() / 1000)
        .into_iter()
        .map(rtc_ice_server)
        .collect();
    let config = RTCConfigurationBuilder::new()
        .with_ice_servers(ice_servers)
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
        // Its UDP sockets answer aggressive nominations a round trip after the check, not at
        // the viewer's retransmission (`protocol::nomination`).
        .with_runtime(IceRuntime::runtime())
        .with_handler(Arc::new(Handler { tx: events.clone() }))
        .with_udp_addrs(addrs.to_vec())
        .build()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(pc))
}

/// One peer connection bound to `port` on every configured address, its events going to
/// `events`. mDNS lets the device resolve browsers' `.local` host candidates on a LAN, but
/// needs a multicast-capable interface; without one, rtcam streams anyway with mDNS off (and
/// remembers that, so it is said once).
pub(crate) async fn build(
    settings: &WebrtcSettings,
    port: u16,
    events: &mpsc::Sender<PcEvent>,
    link: Option<&Link>,
) -> Result<Arc<dyn PeerConnection>, String> {
    let addrs: Vec<SocketAddr> = settings
        .bind_addresses
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    if settings.mdns_unavailable.load(Ordering::Relaxed) {
        return build_with(settings, &addrs, events, MulticastDnsMode::Disabled, link).await;
    }
    match build_with(settings, &addrs, events, MulticastDnsMode::QueryOnly, link).await {
        Ok(pc) => Ok(pc),
        Err(e) => {
            if !settings.mdns_unavailable.swap(true, Ordering::Relaxed) {
                tracing::info!(error = %e, "mDNS unavailable (no multicast route?): viewers' .local candidates will not resolve; streaming without mDNS");
            }
            build_with(settings, &addrs, events, MulticastDnsMode::Disabled, link).await
        }
    }
}

/// The connected candidate pair as "<local type> -> <remote type>" (e.g. "relay -> prflx"),
/// for the log line of a connected viewer: how it reached the device.
pub(crate) async fn selected_path(pc: &Arc<dyn PeerConnection>) -> Option<String> {
    for sender in pc.get_senders().await {
        let Ok(Some(dtls)) = sender.transport().await else {
            continue;
        };
        if let Ok(Some(pair)) = dtls.ice_transport().get_selected_candidate_pair().await {
            return Some(format!("{} -> {}", pair.local().typ, pair.remote().typ));
        }
    }
    None
}

/// Whether this host can join the mDNS multicast group. Probed once at start: asking
/// webrtc-rs for mDNS without a multicast route makes it log an I/O error per session.
pub(crate) fn multicast_available() -> bool {
    let mdns_group = std::net::Ipv4Addr::new(224, 0, 0, 251);
    std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.join_multicast_v4(&mdns_group, &std::net::Ipv4Addr::UNSPECIFIED))
        .is_ok()
}

/// True for an RTCP packet that asks for a keyframe (PLI or FIR).
pub(crate) fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
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

/// webrtc-rs's form of one ICE server (empty strings where there is no credential).
pub(crate) fn rtc_ice_server(s: crate::protocol::turn::IceServer) -> RTCIceServer {
    RTCIceServer {
        urls: s.urls,
        username: s.username.unwrap_or_default(),
        credential: s
            .credential
            .map(|c| c.expose().to_owned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
