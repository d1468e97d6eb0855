//! Bandwidth probes as a pure state machine: when a viewer's estimate may test a higher rate with a short burst, and what rate the path carried that burst at.
//!
//! Without probes an estimate learns that a path got faster only by climbing into it, which
//! takes seconds (the climb must be slow near a path's last known capacity, or a constrained
//! viewer is flooded). A probe asks the path directly, as libwebrtc's probe controller does:
//! the pacer sends [`PROBE_DURATION`] at 1.5 times the estimate (media first, then redundant
//! retransmissions as padding), the viewer's transport-wide feedback tells when each packet
//! arrived, and the rate the burst arrived at is what the path carried:
//! * received at (nearly) the rate it was sent: the path carries at least that much, and the
//!   next probe, at twice that, follows at once (the estimator believes a carried probe only
//!   once the next confirms it, see [`super::bandwidth`]);
//! * received slower: the path is saturated, the rate it arrived at is its capacity, and
//!   the next probe waits [`PROBE_RETRY`].
//!
//! The estimator says when probing makes sense (transport-wide feedback, no recent overuse
//! or loss, an estimate below the most the ceiling can use); this module keeps the schedule
//! and reads the result. No clock inside: every call takes `now`.

use std::time::{Duration, Instant};

use super::bandwidth::PacketResult;

/// How long a probe lasts at its rate (at least [`PROBE_MIN_PACKETS`] full packets).
const PROBE_DURATION: Duration = Duration::from_millis(50);
/// Fewer packets than this say nothing reliable about a rate.
const PROBE_MIN_PACKETS: usize = 4;
/// A full RTP packet, bytes.
const FULL_PACKET: usize = 1200;
/// A probe right after one the path carried goes to this multiple of the estimate.
const PROBE_FACTOR_AFTER_CARRIED: f64 = 2.0;
/// Any other probe goes to this multiple: on a path that is full (most probes, on a steady
/// constrained path), a smaller step queues less.
const PROBE_FACTOR: f64 = 1.5;
/// After a probe the path did not carry, the next one waits this long.
pub(crate) const PROBE_RETRY: Duration = Duration::from_millis(2500);
/// After overuse or a loss cut, the next probe waits this long (the queue drains first).
const PROBE_AFTER_DECREASE: Duration = Duration::from_secs(1);
/// A burst received at this share of its send rate or more was carried, at the lower of
/// the two rates (libwebrtc's 0.9 misread probes of four or five packets whose arrivals a
/// few milliseconds of jitter spread, on a free path, as saturated; the estimator believes a
/// carried probe only once the next confirms it).
const UNSATURATED: f64 = 0.8;
/// A probe that lost more than this share of its packets was not carried.
const MAX_PROBE_LOSS: f64 = 0.1;
/// A probe not sent or not answered within this is forgotten.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Packets reported while a probe is still being sent, kept for it: far more than a probe
/// and the media beside it send in [`PROBE_TIMEOUT`] at the rates rtcam sends.
const MAX_EARLY_PACKETS: usize = 1024;

/// What the pacer is asked to send: `bytes` at `bps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProbeRequest {
    pub id: u32,
    pub bps: f64,
    pub bytes: usize,
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ProbeOutcome {
    /// The path carried the burst at this rate, bits per second.
    Carried(f64),
    /// The burst arrived slower than it left (or lost packets): the path is full; the rate
    /// it arrived at, if it could be measured (bits per second).
    Saturated(Option<f64>),
}

#[derive(Debug)]
enum State {
    Idle,
    /// Handed to the pacer, not yet all sent. Feedback may already report its first packets
    /// (a probe waits for media and lasts about as long as a browser's feedback interval):
    /// what left since the request is kept for it.
    Requested {
        id: u32,
        at: Instant,
        early: Vec<PacketResult>,
    },
    /// Sent between `first` and `last` (departures, both inclusive); feedback collected.
    Sent {
        id: u32,
        first: Instant,
        last: Instant,
        packets: Vec<PacketResult>,
    },
}

/// One viewer's probe schedule and the probe in flight.
#[derive(Debug)]
pub(crate) struct Prober {
    next_id: u32,
    state: State,
    /// No probe before this.
    not_before: Option<Instant>,
    /// The last probe was carried.
    carried: bool,
}

impl Prober {
    pub fn new() -> Self {
        Self {
            next_id: 1,
            state: State::Idle,
            not_before: None,
            carried: false,
        }
    }

    /// A probe to send now, if none is under way and the schedule allows one; `estimate` and
    /// `max` in bits per second (the caller has checked that probing makes sense).
    pub fn request(&mut self, now: Instant, estimate: f64, max: f64) -> Option<ProbeRequest> {
        self.expire(now);
        if !matches!(self.state, State::Idle) || self.not_before.is_some_and(|t| now < t) {
            return None;
        }
        let factor = if self.carried {
            PROBE_FACTOR_AFTER_CARRIED
        } else {
            PROBE_FACTOR
        };
        let bps = (factor * estimate).min(max);
        if bps <= estimate {
            return None;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.state = State::Requested {
            id,
            at: now,
            early: Vec::new(),
        };
        let bytes = ((bps * PROBE_DURATION.as_secs_f64() / 8.0) as usize)
            .max(PROBE_MIN_PACKETS * FULL_PACKET);
        Some(ProbeRequest { id, bps, bytes })
    }

    /// The pacer sent probe `id`: its first and last packet left at these instants.
    pub fn sent(&mut self, id: u32, first: Instant, last: Instant) {
        if let State::Requested { id: r, early, .. } = &mut self.state
            && *r == id
        {
            let mut packets = std::mem::take(early);
            packets.retain(|p| p.departure >= first && p.departure <= last);
            self.state = State::Sent {
                id,
                first,
                last,
                packets,
            };
        }
    }

    /// The pacer could not send probe `id` (nothing to pad with): try again later.
    pub fn abandoned(&mut self, id: u32, now: Instant) {
        if matches!(self.state, State::Requested { id: r, .. } | State::Sent { id: r, .. } if r == id)
        {
            self.state = State::Idle;
            self.carried = false;
            self.not_before = Some(now + PROBE_RETRY);
        }
    }

    /// Whether a probe is being sent or awaits its feedback.
    #[cfg(test)]
    pub fn busy(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Transport-wide feedback (in send order): the probe's result once feedback has
    /// covered all of it.
    pub fn on_feedback(&mut self, now: Instant, results: &[PacketResult]) -> Option<ProbeOutcome> {
        if let State::Requested { at, early, .. } = &mut self.state {
            let at = *at;
            let room = MAX_EARLY_PACKETS.saturating_sub(early.len());
            early.extend(results.iter().filter(|p| p.departure >= at).take(room));
        }
        let State::Sent {
            first,
            last,
            packets,
            ..
        } = &mut self.state
        else {
            self.expire(now);
            return None;
        };
        let (first, last) = (*first, *last);
        packets.extend(
            results
                .iter()
                .filter(|p| p.departure >= first && p.departure <= last),
        );
        // Feedback reaches past the probe: all of it has been reported (feedback comes in
        // send order, and a report past it means the viewer has seen everything before).
        let complete = results.iter().any(|p| p.departure > last);
        if !complete && now.saturating_duration_since(last) < PROBE_TIMEOUT {
            return None;
        }
        let outcome = evaluate(packets);
        self.finish(now, outcome);
        Some(outcome)
    }

    fn finish(&mut self, now: Instant, outcome: ProbeOutcome) {
        self.state = State::Idle;
        self.carried = matches!(outcome, ProbeOutcome::Carried(_));
        self.not_before = match outcome {
            // Carried: the next probe, at twice the new estimate, may follow at once.
            ProbeOutcome::Carried(_) => None,
            ProbeOutcome::Saturated(_) => Some(now + PROBE_RETRY),
        };
    }

    /// A probe the pacer never sent, or whose feedback never came, is given up.
    fn expire(&mut self, now: Instant) {
        let since = match self.state {
            State::Idle => return,
            State::Requested { at, .. } => at,
            State::Sent { last, .. } => last,
        };
        if now.saturating_duration_since(since) >= PROBE_TIMEOUT {
            self.state = State::Idle;
            self.carried = false;
            self.not_before = Some(now + PROBE_RETRY);
        }
    }

    /// The next probe waits [`PROBE_AFTER_DECREASE`] from `now` (after overuse or loss).
    pub fn defer(&mut self, now: Instant) {
        self.carried = false;
        let until = now + PROBE_AFTER_DECREASE;
        self.not_before = Some(self.not_before.map_or(until, |t| t.max(until)));
    }
}

/// The rate a probe's packets were sent and received at (libwebrtc's probe bitrate
/// estimator): sent, the bytes of all but the last packet over the span of departures;
/// received, the bytes of all but the first arrival over the span of arrivals.
fn evaluate(packets: &[PacketResult]) -> ProbeOutcome {
    let received: Vec<(Duration, usize)> = packets
        .iter()
        .filter_map(|p| p.arrival.map(|a| (a, p.size)))
        .collect();
    let lost = packets.len() - received.len();
    if packets.len() < PROBE_MIN_PACKETS || received.len() < 2 {
        return ProbeOutcome::Saturated(None);
    }
    let (first, last) = (packets[0].departure, packets[packets.len() - 1].departure);
    let send_span = last.saturating_duration_since(first).as_secs_f64();
    let send_bits: usize = packets[..packets.len() - 1].iter().map(|p| p.size).sum();
    let mut arrivals = received;
    arrivals.sort_by_key(|(a, _)| *a);
    let recv_span = arrivals[arrivals.len() - 1]
        .0
        .saturating_sub(arrivals[0].0)
        .as_secs_f64();
    let recv_bits: usize = arrivals[1..].iter().map(|(_, s)| s).sum();
    if send_span < 0.001 || recv_span < 0.001 {
        return ProbeOutcome::Saturated(None);
    }
    let send_bps = send_bits as f64 * 8.0 / send_span;
    let recv_bps = recv_bits as f64 * 8.0 / recv_span;
    if lost as f64 > MAX_PROBE_LOSS * packets.len() as f64 {
        // Lost on the way: the rate that arrived says little (a drop-tail queue overflowed,
        // or random loss).
        ProbeOutcome::Saturated(None)
    } else if recv_bps >= UNSATURATED * send_bps {
        ProbeOutcome::Carried(send_bps.min(recv_bps))
    } else {
        ProbeOutcome::Saturated(Some(recv_bps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` packets of 1200 bytes sent `gap_ms` apart from `t0`, arriving through a bottleneck
    /// of `capacity_bps` (None: lost where `lose(i)`).
    fn burst(
        t0: Instant,
        n: usize,
        gap_ms: f64,
        capacity_bps: f64,
        lose: impl Fn(usize) -> bool,
    ) -> Vec<PacketResult> {
        let mut free = 0.0f64;
        (0..n)
            .map(|i| {
                let sent = i as f64 * gap_ms;
                free = free.max(sent) + 1200.0 * 8.0 / capacity_bps * 1000.0;
                PacketResult {
                    departure: t0 + Duration::from_secs_f64(sent / 1000.0),
                    arrival: (!lose(i)).then(|| Duration::from_secs_f64((20.0 + free) / 1000.0)),
                    size: 1200,
                }
            })
            .collect()
    }

    fn span(p: &[PacketResult]) -> (Instant, Instant) {
        (p[0].departure, p[p.len() - 1].departure)
    }

    #[test]
    fn a_request_is_one_and_a_half_times_the_estimate_capped_at_the_most_and_at_least_four_packets()
    {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 1_000_000.0, 2_350_000.0).unwrap();
        assert_eq!(r.bps, 1_500_000.0);
        assert_eq!(r.bytes, 9375);
        assert!(p.busy());
        assert_eq!(
            p.request(t0, 1_000_000.0, 2_350_000.0),
            None,
            "one at a time"
        );
        let mut p = Prober::new();
        let r = p.request(t0, 2_000_000.0, 2_350_000.0).unwrap();
        assert_eq!(r.bps, 2_350_000.0);
        let mut p = Prober::new();
        assert_eq!(p.request(t0, 100_000.0, 2_350_000.0).unwrap().bytes, 4800);
        let mut p = Prober::new();
        assert_eq!(
            p.request(t0, 2_350_000.0, 2_350_000.0),
            None,
            "at the top: nothing to ask"
        );
    }

    #[test]
    fn a_burst_the_path_carries_gives_its_rate_and_the_next_probe_at_twice_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 666_667.0, 2_350_000.0).unwrap();
        // 1 Mbit/s: a 1200-byte packet every 9.6 ms, through a 3 Mbit/s path.
        let sent = burst(t0, 6, 9.6, 3_000_000.0, |_| false);
        let (first, last) = span(&sent);
        p.sent(r.id, first, last);
        let mut feedback = sent.clone();
        // A media packet after the probe completes the report.
        feedback.push(PacketResult {
            departure: last + Duration::from_millis(5),
            arrival: Some(Duration::from_millis(200)),
            size: 1200,
        });
        let now = last + Duration::from_millis(60);
        match p.on_feedback(now, &feedback) {
            Some(ProbeOutcome::Carried(bps)) => {
                assert!((950_000.0..=1_050_000.0).contains(&bps), "{bps}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.request(now, 1_000_000.0, 2_350_000.0).unwrap().bps,
            2_000_000.0
        );
    }

    #[test]
    fn feedback_that_comes_while_the_probe_is_still_being_sent_counts_for_it() {
        // Chromium reports every 50-60 ms and a probe lasts about 50 ms: traced in the
        // browser test, the first half of a probe was reported before the pacer had sent the
        // rest, and a probe read from the rest alone (one to three packets) was too short to
        // say anything: "saturated" on a free path, and the next probe 2.5 s later.
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 666_667.0, 2_350_000.0).unwrap();
        let before = PacketResult {
            // Sent before the request: not the probe's.
            departure: t0 - Duration::from_millis(5),
            arrival: Some(Duration::from_millis(10)),
            size: 1200,
        };
        let sent = burst(t0, 6, 9.6, 3_000_000.0, |_| false);
        let (first, last) = span(&sent);
        let mut early = vec![before];
        early.extend_from_slice(&sent[..4]);
        assert_eq!(p.on_feedback(t0 + Duration::from_millis(35), &early), None);
        p.sent(r.id, first, last);
        let mut rest = sent[4..].to_vec();
        rest.push(PacketResult {
            departure: last + Duration::from_millis(5),
            arrival: Some(Duration::from_millis(200)),
            size: 1200,
        });
        match p.on_feedback(last + Duration::from_millis(60), &rest) {
            Some(ProbeOutcome::Carried(bps)) => {
                assert!((950_000.0..=1_050_000.0).contains(&bps), "{bps}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_burst_into_a_slower_path_is_saturation_and_the_next_probe_waits() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 500_000.0, 2_350_000.0).unwrap();
        let sent = burst(t0, 6, 9.6, 500_000.0, |_| false);
        let (first, last) = span(&sent);
        p.sent(r.id, first, last);
        // Reported in two parts: the first says nothing yet.
        let now = last + Duration::from_millis(100);
        assert_eq!(p.on_feedback(now, &sent[..3]), None);
        let mut rest = sent[3..].to_vec();
        rest.push(PacketResult {
            departure: last + Duration::from_millis(5),
            arrival: Some(Duration::from_millis(300)),
            size: 1200,
        });
        match p.on_feedback(now, &rest) {
            Some(ProbeOutcome::Saturated(Some(bps))) => {
                assert!((480_000.0..=520_000.0).contains(&bps), "{bps}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p.request(now + PROBE_RETRY / 2, 500_000.0, 2_350_000.0),
            None
        );
        assert_eq!(
            p.request(now + PROBE_RETRY, 500_000.0, 2_350_000.0)
                .unwrap()
                .bps,
            750_000.0
        );
    }

    #[test]
    fn a_lossy_burst_is_not_carried() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 500_000.0, 2_350_000.0).unwrap();
        let sent = burst(t0, 6, 9.6, 3_000_000.0, |i| i == 2);
        let (first, last) = span(&sent);
        p.sent(r.id, first, last);
        let now = last + PROBE_TIMEOUT;
        assert_eq!(
            p.on_feedback(now, &sent),
            Some(ProbeOutcome::Saturated(None))
        );
    }

    #[test]
    fn too_few_packets_or_a_probe_never_sent_or_answered_is_given_up() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let r = p.request(t0, 500_000.0, 2_350_000.0).unwrap();
        let sent = burst(t0, 3, 9.6, 3_000_000.0, |_| false);
        let (first, last) = span(&sent);
        p.sent(r.id, first, last);
        assert_eq!(
            p.on_feedback(last + PROBE_TIMEOUT, &sent),
            Some(ProbeOutcome::Saturated(None))
        );
        // Requested, never sent.
        let t1 = t0 + Duration::from_secs(10);
        let r = p.request(t1, 500_000.0, 2_350_000.0).unwrap();
        assert!(p.busy());
        assert_eq!(p.request(t1 + PROBE_TIMEOUT, 500_000.0, 2_350_000.0), None);
        assert!(!p.busy());
        p.sent(r.id, t1, t1); // too late: ignored
        assert!(!p.busy());
        // Abandoned by the pacer.
        let t2 = t1 + Duration::from_secs(10);
        let r = p.request(t2, 500_000.0, 2_350_000.0).unwrap();
        p.abandoned(r.id, t2);
        assert!(!p.busy());
        assert_eq!(p.request(t2, 500_000.0, 2_350_000.0), None);
        assert!(
            p.request(t2 + PROBE_RETRY, 500_000.0, 2_350_000.0)
                .is_some()
        );
    }

    #[test]
    fn overuse_defers_the_next_probe() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        p.defer(t0);
        assert_eq!(
            p.request(t0 + PROBE_AFTER_DECREASE / 2, 500_000.0, 2_350_000.0),
            None
        );
        assert!(
            p.request(t0 + PROBE_AFTER_DECREASE, 500_000.0, 2_350_000.0)
                .is_some()
        );
    }
}
