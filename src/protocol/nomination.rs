//! Nominating ICE checks the device's agent left unanswered, kept and handed back to it once its own check on that path succeeds: pure, datagrams and `now` in, a datagram to deliver out.
//!
//! rtcam answers offers, so its ICE agent is the controlled one. rtc-ice 0.21.1's controlled
//! agent does not answer a check that carries USE-CANDIDATE on a pair whose own check has not
//! come back yet (`handle_binding_request`): it only sends its own check, and nominates the
//! pair when the viewer checks again. RFC 8445 7.3.1.4 says to answer, and to nominate once
//! that triggered check succeeds; the older `webrtc-ice` does (webrtc-rs/webrtc PR #647).
//! A viewer that nominates aggressively (aiortc, whose first check carries USE-CANDIDATE)
//! races the device's own check, usually loses (the device's check can only be answered once
//! the viewer has the answer, when it also sends its own), and connects on its
//! retransmission: 0.5 s later, and seconds later when loss takes some of them.
//!
//! [`HeldNominations`] sits between one of the device's UDP sockets and the agent. It keeps
//! the last nominating check from each remote address; when a Binding success response
//! arrives from that address (the device's own check there succeeded), the kept check is
//! delivered again right after it, so the agent finds the nomination on a succeeded pair and
//! answers it, one round trip after the check. A check the agent answered (a success
//! response with its transaction id goes back to that address) is forgotten, as is one kept
//! longer than [`HOLD_FOR`]. Nothing is sent to the network: the agent sees again a check it
//! already got (as if the viewer had retransmitted it) and checks its integrity as it does
//! every message's.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A kept check is delivered again only this long after it arrived (the viewer's own
/// retransmissions take over after that).
pub(crate) const HOLD_FOR: Duration = Duration::from_secs(2);
/// Checks kept per socket at most (one per remote address; the oldest goes first).
pub(crate) const MAX_HELD: usize = 16;

const HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_USE_CANDIDATE: u16 = 0x0025;

type TransactionId = [u8; 12];

/// The parts of a STUN message this needs (RFC 8489 §5: header, then attributes).
#[derive(Debug, PartialEq, Eq)]
struct Stun {
    message_type: u16,
    transaction: TransactionId,
    use_candidate: bool,
}

/// Whether `datagram` starts like a STUN message: the two top bits zero and the magic cookie
/// (RTP and DTLS records never do). A cheap test to keep media off the slower path.
pub(crate) fn may_be_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[0] & 0xC0 == 0 && datagram[4..8] == MAGIC_COOKIE
}

impl Stun {
    /// `None` for anything that is not a well-formed STUN message (RTP, DTLS, garbage).
    fn parse(datagram: &[u8]) -> Option<Self> {
        if !may_be_stun(datagram) {
            return None;
        }
        let header = &datagram[..HEADER_LEN];
        let message_type = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if length % 4 != 0 || datagram.len() != HEADER_LEN + length {
            return None;
        }
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&header[8..20]);
        let mut use_candidate = false;
        let mut rest = &datagram[HEADER_LEN..];
        while rest.len() >= 4 {
            let kind = u16::from_be_bytes([rest[0], rest[1]]);
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let padded = 4 + len.div_ceil(4) * 4;
            if padded > rest.len() {
                return None;
            }
            use_candidate |= kind == ATTR_USE_CANDIDATE;
            rest = &rest[padded..];
        }
        rest.is_empty().then_some(Self {
            message_type,
            transaction,
            use_candidate,
        })
    }
}

#[derive(Debug)]
struct Held {
    from: SocketAddr,
    transaction: TransactionId,
    check: Vec<u8>,
    at: Instant,
}

/// One socket's nominating checks that the agent has not answered yet.
#[derive(Debug, Default)]
pub(crate) struct HeldNominations {
    held: VecDeque<Held>,
}

impl HeldNominations {
    /// A datagram arrived from `from`. Returns a kept check to hand to the agent right after
    /// this datagram, when this is the success response that makes it answerable.
    pub fn inbound(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
        let stun = Stun::parse(datagram)?;
        self.held
            .retain(|h| now.saturating_duration_since(h.at) <= HOLD_FOR);
        match stun.message_type {
            BINDING_REQUEST if stun.use_candidate => {
                // A retransmission or a newer check from the same address replaces the kept one.
                self.held.retain(|h| h.from != from);
                if self.held.len() == MAX_HELD {
                    self.held.pop_front();
                }
                self.held.push_back(Held {
                    from,
                    transaction: stun.transaction,
                    check: datagram.to_vec(),
                    at: now,
                });
                None
            }
            BINDING_SUCCESS => {
                let at = self.held.iter().position(|h| h.from == from)?;
                self.held.remove(at).map(|h| h.check)
            }
            _ => None,
        }
    }

    /// The device sends `datagram` to `to`: a success response answering a kept check means
    /// the agent answered it, and it is forgotten.
    pub fn outbound(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.held.is_empty() {
            return;
        }
        if let Some(stun) = Stun::parse(datagram)
            && stun.message_type == BINDING_SUCCESS
        {
            self.held
                .retain(|h| !(h.from == to && h.transaction == stun.transaction));
        }
    }

    /// How many checks are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEWER: &str = "10.0.0.2:40000";
    const OTHER: &str = "10.0.0.3:40000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A STUN message: `attributes` as (type, value).
    fn stun(message_type: u16, transaction: u8, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in attributes {
            body.extend_from_slice(&kind.to_be_bytes());
            body.extend_from_slice(&(value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&message_type.to_be_bytes());
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[transaction; 12]);
        m.extend_from_slice(&body);
        m
    }

    /// A viewer's check as aiortc sends it: username, priority, USE-CANDIDATE, integrity.
    fn nominating_check(transaction: u8) -> Vec<u8> {
        stun(
            BINDING_REQUEST,
            transaction,
            &[
                (0x0006, b"abcd:efgh"),
                (0x0024, &[0, 0, 0, 1]),
                (ATTR_USE_CANDIDATE, &[]),
                (0x0008, &[7; 20]),
            ],
        )
    }

    fn plain_check(transaction: u8) -> Vec<u8> {
        stun(BINDING_REQUEST, transaction, &[(0x0006, b"abcd:efgh")])
    }

    fn success(transaction: u8) -> Vec<u8> {
        stun(
            BINDING_SUCCESS,
            transaction,
            &[(0x0020, &[0, 1, 2, 3, 4, 5, 6, 7])],
        )
    }

    #[test]
    fn an_unanswered_nomination_is_handed_back_after_the_devices_own_check_succeeds() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        let check = nominating_check(1);
        assert_eq!(held.inbound(t0, addr(VIEWER), &check), None);
        // The device's own check on that path comes back: the kept check follows it, once.
        let later = t0 + Duration::from_millis(40);
        assert_eq!(held.inbound(later, addr(VIEWER), &success(9)), Some(check));
        assert_eq!(held.inbound(later, addr(VIEWER), &success(9)), None);
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn a_nomination_the_agent_answered_is_forgotten() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        held.inbound(t0, addr(VIEWER), &nominating_check(1));
        // Another transaction's response, or one to another address, does not count.
        held.outbound(addr(VIEWER), &success(2));
        held.outbound(addr(OTHER), &success(1));
        held.outbound(addr(VIEWER), &plain_check(1));
        assert_eq!(held.len(), 1);
        held.outbound(addr(VIEWER), &success(1));
        assert_eq!(held.len(), 0);
        assert_eq!(held.inbound(t0, addr(VIEWER), &success(9)), None);
    }

    #[test]
    fn only_a_success_from_the_same_address_releases_a_check() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        let check = nominating_check(1);
        held.inbound(t0, addr(VIEWER), &check);
        assert_eq!(held.inbound(t0, addr(OTHER), &success(9)), None);
        // Not a success response: a check, an error response (0x0111), media.
        assert_eq!(held.inbound(t0, addr(VIEWER), &plain_check(3)), None);
        assert_eq!(held.inbound(t0, addr(VIEWER), &stun(0x0111, 4, &[])), None);
        assert_eq!(
            held.inbound(t0, addr(VIEWER), &[0x80, 0x60, 0, 1, 0, 0, 0, 0]),
            None
        );
        assert_eq!(held.inbound(t0, addr(VIEWER), &success(9)), Some(check));
    }

    #[test]
    fn a_check_without_use_candidate_is_not_kept() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        held.inbound(t0, addr(VIEWER), &plain_check(1));
        assert_eq!(held.len(), 0);
        assert_eq!(held.inbound(t0, addr(VIEWER), &success(9)), None);
    }

    #[test]
    fn a_kept_check_expires() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        held.inbound(t0, addr(VIEWER), &nominating_check(1));
        let late = t0 + HOLD_FOR + Duration::from_millis(1);
        assert_eq!(held.inbound(late, addr(VIEWER), &success(9)), None);
        assert_eq!(held.len(), 0);
        // Up to HOLD_FOR it is still handed back.
        held.inbound(t0, addr(VIEWER), &nominating_check(2));
        assert!(
            held.inbound(t0 + HOLD_FOR, addr(VIEWER), &success(9))
                .is_some()
        );
    }

    #[test]
    fn a_retransmission_replaces_the_kept_check_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut held = HeldNominations::default();
        held.inbound(t0, addr(VIEWER), &nominating_check(1));
        held.inbound(t0, addr(VIEWER), &nominating_check(2));
        assert_eq!(held.len(), 1);
        assert_eq!(
            held.inbound(t0, addr(VIEWER), &success(9)),
            Some(nominating_check(2))
        );
        for port in 0..(MAX_HELD as u16 + 5) {
            let from = SocketAddr::from(([10, 0, 0, 9], 1000 + port));
            held.inbound(t0, from, &nominating_check(1));
        }
        assert_eq!(held.len(), MAX_HELD);
        // The oldest went first.
        let first = SocketAddr::from(([10, 0, 0, 9], 1000));
        assert_eq!(held.inbound(t0, first, &success(9)), None);
        let last = SocketAddr::from(([10, 0, 0, 9], 1000 + MAX_HELD as u16 + 4));
        assert!(held.inbound(t0, last, &success(9)).is_some());
    }

    /// rtc-ice itself, sans I/O: a controlled agent (the device) and a controlling one standing
    /// in for the viewer, whose aggressive nomination is written by hand as aiortc sends it.
    mod with_rtc_ice {
        use std::sync::Arc;

        use bytes::BytesMut;
        use rtc::crypto::{RTCCryptoProvider, default_provider};
        use rtc::ice::attributes::control::AttrControlling;
        use rtc::ice::attributes::priority::PriorityAttr;
        use rtc::ice::attributes::use_candidate::UseCandidateAttr;
        use rtc::ice::candidate::CandidateConfig;
        use rtc::ice::candidate::candidate_host::CandidateHostConfig;
        use rtc::ice::state::ConnectionState;
        use rtc::ice::{Agent, AgentConfig};
        use rtc::sansio::Protocol;
        use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
        use rtc::stun::attributes::ATTR_USERNAME;
        use rtc::stun::fingerprint::FINGERPRINT;
        use rtc::stun::integrity::MessageIntegrity;
        use rtc::stun::message::{BINDING_REQUEST as REQUEST, Message, Setter, TransactionId};
        use rtc::stun::textattrs::Username;

        use super::*;

        const DEVICE: &str = "10.0.0.1:5000";

        fn provider() -> Arc<dyn RTCCryptoProvider> {
            default_provider().expect("rtc's default crypto provider")
        }

        fn agent(now: Instant, address: SocketAddr) -> Agent {
            let mut agent = Agent::new(now, Arc::new(AgentConfig::default()), provider())
                .expect("an ICE agent");
            let local = host(address);
            agent.add_local_candidate(local).expect("local candidate");
            agent
        }

        fn host(address: SocketAddr) -> rtc::ice::candidate::Candidate {
            CandidateHostConfig {
                base_config: CandidateConfig {
                    network: "udp".to_owned(),
                    address: address.ip().to_string(),
                    port: address.port(),
                    component: 1,
                    ..Default::default()
                },
                ..Default::default()
            }
            .new_candidate_host()
            .expect("a host candidate")
        }

        fn read(agent: &mut Agent, now: Instant, to: SocketAddr, from: SocketAddr, data: &[u8]) {
            agent
                .handle_read(TaggedBytesMut {
                    now,
                    transport: TransportContext {
                        local_addr: to,
                        peer_addr: from,
                        transport_protocol: TransportProtocol::UDP,
                        ecn: None,
                    },
                    message: BytesMut::from(data),
                })
                .expect("the agent reads a datagram");
        }

        fn written(agent: &mut Agent) -> Vec<(SocketAddr, Vec<u8>)> {
            std::iter::from_fn(|| agent.poll_write())
                .map(|m| (m.transport.peer_addr, m.message.to_vec()))
                .collect()
        }

        fn answers(out: &[(SocketAddr, Vec<u8>)], transaction: TransactionId) -> bool {
            out.iter().any(|(_, d)| {
                Stun::parse(d).is_some_and(|s| {
                    s.message_type == BINDING_SUCCESS && s.transaction == transaction.0
                })
            })
        }

        /// The viewer reads the device's check and answers it.
        fn viewer_answers(viewer: &mut Agent, now: Instant, device_check: &[u8]) -> Vec<u8> {
            read(viewer, now, addr(VIEWER), addr(DEVICE), device_check);
            written(viewer)
                .into_iter()
                .find(|(_, d)| Stun::parse(d).is_some_and(|s| s.message_type == BINDING_SUCCESS))
                .map(|(_, d)| d)
                .expect("the viewer answers the device's check")
        }

        /// Where the race leaves things.
        struct Race {
            device: Agent,
            viewer: Agent,
            /// The viewer's nominating check, and its transaction.
            check: Vec<u8>,
            transaction: TransactionId,
            /// The device's own check of the viewer's candidate, not yet delivered.
            in_flight: Vec<u8>,
            /// What the device sent after reading the check.
            out: Vec<(SocketAddr, Vec<u8>)>,
        }

        /// The race as it happens with aiortc: the device checks the viewer's candidate, and
        /// the viewer's nominating check arrives before that check's response.
        fn race(now: Instant) -> Race {
            let (device_addr, viewer_addr) = (addr(DEVICE), addr(VIEWER));
            let mut device = agent(now, device_addr);
            let mut viewer = agent(now, viewer_addr);
            let device_credentials = device.get_local_credentials().clone();
            let viewer_credentials = viewer.get_local_credentials().clone();
            device
                .add_remote_candidate(host(viewer_addr))
                .expect("remote");
            viewer
                .add_remote_candidate(host(device_addr))
                .expect("remote");
            viewer
                .start_connectivity_checks(
                    now,
                    true,
                    device_credentials.ufrag.clone(),
                    device_credentials.pwd.clone(),
                )
                .expect("viewer starts");
            device
                .start_connectivity_checks(
                    now,
                    false,
                    viewer_credentials.ufrag.clone(),
                    viewer_credentials.pwd.clone(),
                )
                .expect("device starts");
            device.handle_timeout(now).expect("device checks");
            let in_flight = written(&mut device)
                .into_iter()
                .find(|(to, d)| {
                    *to == viewer_addr
                        && Stun::parse(d).is_some_and(|s| s.message_type == BINDING_REQUEST)
                })
                .map(|(_, d)| d)
                .expect("the device checks the viewer's candidate");

            let transaction = TransactionId::new();
            let crypto = provider();
            let setters: Vec<Box<dyn Setter + '_>> = vec![
                Box::new(REQUEST),
                Box::new(transaction),
                Box::new(Username::new(
                    ATTR_USERNAME,
                    format!("{}:{}", device_credentials.ufrag, viewer_credentials.ufrag),
                )),
                Box::new(UseCandidateAttr::new()),
                Box::new(AttrControlling(7)),
                Box::new(PriorityAttr(1_000_000)),
                Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
                    device_credentials.pwd.clone(),
                    crypto.crypto(),
                )),
                Box::new(FINGERPRINT),
            ];
            let mut check = Message::new();
            check.build(&setters).expect("a nominating check");
            read(&mut device, now, device_addr, viewer_addr, &check.raw);
            let out = written(&mut device);
            Race {
                device,
                viewer,
                check: check.raw,
                transaction,
                in_flight,
                out,
            }
        }

        #[test]
        fn rtc_ice_leaves_an_early_nomination_unanswered_until_the_viewer_checks_again() {
            // If this fails, rtc-ice answers such checks itself and `viewer::ice_socket` (with
            // this module) can go.
            let now = Instant::now();
            let (device_addr, viewer_addr) = (addr(DEVICE), addr(VIEWER));
            let Race {
                mut device,
                mut viewer,
                transaction,
                in_flight,
                out,
                ..
            } = race(now);
            assert!(
                !answers(&out, transaction),
                "rtc-ice answered the early nomination"
            );
            // The device's own check succeeds; without a second nominating check nothing is
            // selected.
            let response = viewer_answers(&mut viewer, now, &in_flight);
            read(&mut device, now, device_addr, viewer_addr, &response);
            assert!(!answers(&written(&mut device), transaction));
            assert!(device.get_selected_candidate_pair().is_none());
        }

        #[test]
        fn a_held_nomination_is_answered_once_the_devices_check_succeeds() {
            let now = Instant::now();
            let (device_addr, viewer_addr) = (addr(DEVICE), addr(VIEWER));
            let mut held = HeldNominations::default();
            let Race {
                mut device,
                mut viewer,
                check,
                transaction,
                in_flight,
                out,
            } = race(now);
            // What the socket saw: the check came in, the device's output went out.
            assert_eq!(held.inbound(now, viewer_addr, &check), None);
            for (to, d) in &out {
                held.outbound(*to, d);
            }
            let response = viewer_answers(&mut viewer, now, &in_flight);
            let later = now + Duration::from_millis(40);
            let again = held
                .inbound(later, viewer_addr, &response)
                .expect("the success response releases the kept check");
            read(&mut device, later, device_addr, viewer_addr, &response);
            read(&mut device, later, device_addr, viewer_addr, &again);
            let out = written(&mut device);
            assert!(
                answers(&out, transaction),
                "the nomination was not answered"
            );
            assert!(device.get_selected_candidate_pair().is_some());
            assert_eq!(device.state(), ConnectionState::Connected);
            for (to, d) in &out {
                held.outbound(*to, d);
            }
            assert_eq!(held.len(), 0);
        }
    }

    #[test]
    fn malformed_stun_is_ignored() {
        let good = nominating_check(1);
        assert!(Stun::parse(&good).is_some_and(|s| s.use_candidate));
        // Too short, a wrong cookie, a length that disagrees with the datagram, an attribute
        // running past the end, a DTLS record.
        assert_eq!(Stun::parse(&good[..19]), None);
        let mut cookie = good.clone();
        cookie[5] ^= 1;
        assert_eq!(Stun::parse(&cookie), None);
        assert_eq!(Stun::parse(&good[..good.len() - 4]), None);
        let mut overrun = stun(BINDING_REQUEST, 1, &[(0x0006, b"abcd")]);
        overrun[22] = 0;
        overrun[23] = 40;
        assert_eq!(Stun::parse(&overrun), None);
        assert_eq!(
            Stun::parse(&[
                22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]),
            None
        );
        let mut held = HeldNominations::default();
        let t0 = Instant::now();
        held.inbound(t0, addr(VIEWER), &good[..good.len() - 4]);
        assert_eq!(held.len(), 0);
    }
}
