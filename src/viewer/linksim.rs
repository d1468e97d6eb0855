//! Test support: a simulated path (pacer, bottleneck queue, delay, random loss, feedback) to drive the bandwidth estimator in closed loop.
//!
//! Time is simulated in 1 ms steps from an arbitrary `Instant`; nothing sleeps. The sender
//! makes 30 frames a second at its target rate (a keyframe every 2 s, four times the size),
//! cuts them into 1200-byte packets and paces them at 1.1 times the estimate (probes, when the
//! estimator asks, at their own rate, padded with 1200-byte packets); the bottleneck
//! serves at the path's capacity with a drop-tail buffer, as a token bucket (Linux `tbf`) that
//! may let a few packets through at line rate; packets then take the one-way delay
//! and may be lost at random. The viewer sends transport-wide feedback every 100 ms and a
//! receiver report every second; both take the one-way delay back.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::bandwidth::{BandwidthEstimator, PacketResult, VIDEO_SHARE};

const PACING_FACTOR: f64 = 1.1;

/// What the path does at a given moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathState {
    pub capacity_bps: f64,
    /// Bottleneck buffer, in milliseconds at the capacity.
    pub buffer_ms: f64,
    /// Token bucket, bytes: after an idle moment this much passes the bottleneck at once
    /// (`tbf`'s burst; 0: a plain queue served at the capacity).
    pub bucket_bytes: f64,
    pub one_way: Duration,
    /// Random loss after the bottleneck, 0..=1.
    pub loss: f64,
}

/// What the viewer sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feedback {
    Twcc,
    /// Receiver reports only (and REMB if the test feeds it).
    ReceiverReports,
}

/// One second of what happened.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Second {
    pub estimate_bps: f64,
    pub target_bps: f64,
    pub delivered_bps: f64,
    pub lost: u32,
    pub sent: u32,
    /// Worst queueing delay at the bottleneck in this second, ms.
    pub max_queue_ms: f64,
    /// Probes sent in this second.
    pub probes: u32,
}

struct Sent {
    departure_ms: u64,
    size: usize,
    arrival_ms: Option<f64>,
    reported: bool,
}

/// A deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs `seconds` of the closed loop; `path(t)` gives the path at second `t`.
pub(crate) fn run(
    estimator: &mut BandwidthEstimator,
    ceiling: f64,
    feedback: Feedback,
    seconds: u64,
    path: impl Fn(f64) -> PathState,
) -> Vec<Second> {
    run_traced(estimator, ceiling, 1.0, feedback, seconds, path).0
}

/// [`run`] with an encoder that makes `encoder_yield` of its target (openh264 on easy content
/// undershoots), returning also the encoder's target each time it is set: (seconds, bits per
/// second).
pub(crate) fn run_traced(
    estimator: &mut BandwidthEstimator,
    ceiling: f64,
    encoder_yield: f64,
    feedback: Feedback,
    seconds: u64,
    path: impl Fn(f64) -> PathState,
) -> (Vec<Second>, Vec<(f64, f64)>) {
    if feedback == Feedback::Twcc {
        // The simulated viewer has transport-wide feedback and retransmissions (probes pad).
        estimator.expect_probes();
    }
    let mut targets = Vec::new();
    let epoch = Instant::now();
    let at = |ms: u64| epoch + Duration::from_millis(ms);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sent: Vec<Sent> = Vec::new();
    let mut pacer: VecDeque<usize> = VecDeque::new();
    let mut budget_bits = 0.0f64;
    let mut probe = None;
    let mut bottleneck_free_at = 0.0f64; // ms
    let mut tokens_bits = 0.0f64; // in the bucket at bottleneck_free_at
    let mut feedback_due: VecDeque<(u64, Vec<PacketResult>)> = VecDeque::new();
    let mut rr_due: VecDeque<(u64, u8)> = VecDeque::new();
    let mut next_report = 0usize; // first packet not yet reported
    let mut rr_base = (0usize, 0u32); // packets and losses at the last receiver report
    let mut target = ceiling;
    let mut seconds_out = vec![Second::default(); seconds as usize];
    let mut frame = 0u64;
    for ms in 0..seconds * 1000 {
        let now = at(ms);
        let second = (ms / 1000) as usize;
        let p = path(ms as f64 / 1000.0);
        // Encoder: follows the video share of the estimate (the policy with one viewer),
        // every 500 ms.
        if ms % 500 == 0 {
            target = (VIDEO_SHARE * f64::from(estimator.estimate())).min(ceiling);
            targets.push((ms as f64 / 1000.0, target));
        }
        if ms * 30 / 1000 >= frame {
            let mut bytes = (encoder_yield * target / 8.0 / 30.0) as usize;
            if frame.is_multiple_of(60) {
                bytes *= 4;
            }
            while bytes > 0 {
                let size = bytes.min(1200);
                pacer.push_back(size);
                bytes -= size;
            }
            frame += 1;
        }
        // Pacer at PACING_FACTOR times the estimate, in the real pacer's bursts; a probe
        // (the real pacer's: media first, then padding) when the estimator asks for one.
        let mut leaving: Vec<usize> = Vec::new();
        if probe.is_none()
            && let Some(r) = estimator.probe_request(now)
        {
            probe = Some((r, 0.0f64, r.bytes as isize, None::<u64>));
        }
        if let Some((r, budget, left, first)) = &mut probe {
            *budget = (*budget + r.bps / 1000.0).min(super::link::burst(r.bps, false));
            while *budget > 0.0 && *left > 0 {
                let size = pacer.pop_front().unwrap_or(1200);
                *budget -= size as f64 * 8.0;
                *left -= size as isize;
                first.get_or_insert(ms);
                leaving.push(size);
            }
            if *left <= 0 {
                estimator.probe_sent(r.id, at(first.unwrap_or(ms)), now);
                seconds_out[second].probes += 1;
                probe = None;
                budget_bits = 0.0;
            }
        } else {
            let pace = PACING_FACTOR * f64::from(estimator.estimate());
            budget_bits = (budget_bits + pace / 1000.0)
                .min(super::link::burst(pace, estimator.path_is_clear(now)));
            while let Some(&size) = pacer.front() {
                if budget_bits < 0.0 {
                    break;
                }
                budget_bits -= size as f64 * 8.0;
                pacer.pop_front();
                leaving.push(size);
            }
        }
        for size in leaving {
            // Bottleneck: a FIFO served at the capacity, through a token bucket filled at
            // the capacity while the queue is idle.
            let start = bottleneck_free_at.max(ms as f64);
            let bits = size as f64 * 8.0;
            let tokens = (tokens_bits + (start - bottleneck_free_at) / 1000.0 * p.capacity_bps)
                .min(p.bucket_bytes * 8.0);
            let leaves = if tokens >= bits {
                start
            } else {
                start + (bits - tokens) / p.capacity_bps * 1000.0
            };
            let queue_ms = leaves - ms as f64 - bits / p.capacity_bps * 1000.0;
            let s = &mut seconds_out[second];
            s.sent += 1;
            s.max_queue_ms = s.max_queue_ms.max(queue_ms);
            let arrival_ms = if queue_ms > p.buffer_ms {
                None // drop-tail
            } else {
                tokens_bits = (tokens - bits).max(0.0);
                bottleneck_free_at = leaves;
                (rng.next() >= p.loss)
                    .then_some(bottleneck_free_at + p.one_way.as_secs_f64() * 1000.0)
            };
            sent.push(Sent {
                departure_ms: ms,
                size,
                arrival_ms,
                reported: false,
            });
        }
        // The viewer reports every 100 ms what arrived by then (and what is missing before
        // the newest arrival).
        if ms % 100 == 0 && feedback == Feedback::Twcc {
            let newest = sent
                .iter()
                .rposition(|x| x.arrival_ms.is_some_and(|a| a <= ms as f64));
            if let Some(newest) = newest {
                let mut batch = Vec::new();
                for x in &mut sent[next_report..=newest] {
                    if x.reported {
                        continue;
                    }
                    let arrived = x.arrival_ms.filter(|a| *a <= ms as f64);
                    if arrived.is_none() && x.arrival_ms.is_some() {
                        continue; // still in flight: reported next time
                    }
                    x.reported = true;
                    batch.push(PacketResult {
                        departure: at(x.departure_ms),
                        arrival: arrived.map(|a| Duration::from_secs_f64(a / 1000.0)),
                        size: x.size,
                    });
                }
                while next_report < sent.len() && sent[next_report].reported {
                    next_report += 1;
                }
                feedback_due.push_back((ms + p.one_way.as_millis() as u64, batch));
            }
        }
        if ms % 1000 == 999 {
            let arrived = |x: &Sent| x.arrival_ms.is_some_and(|a| a <= ms as f64);
            let done = sent.iter().rposition(arrived).map_or(rr_base.0, |i| i + 1);
            let window = &sent[rr_base.0..done.max(rr_base.0)];
            let lost = window.iter().filter(|x| !arrived(x)).count() as u32;
            let fraction = if window.is_empty() {
                0
            } else {
                (256 * lost as usize / window.len()).min(255) as u8
            };
            rr_base = (done.max(rr_base.0), rr_base.1 + lost);
            rr_due.push_back((ms + p.one_way.as_millis() as u64, fraction));
        }
        while feedback_due.front().is_some_and(|(t, _)| *t <= ms) {
            let (_, batch) = feedback_due.pop_front().unwrap();
            estimator.on_transport_feedback(now, &batch);
        }
        while rr_due.front().is_some_and(|(t, _)| *t <= ms) {
            let (_, fraction) = rr_due.pop_front().unwrap();
            estimator.on_receiver_report(now, fraction, Some(p.one_way * 2));
        }
        if estimator.poll_timeout().is_some_and(|t| t <= now) {
            estimator.handle_timeout(now);
        }
        let s = &mut seconds_out[second];
        s.estimate_bps = f64::from(estimator.estimate());
        s.target_bps = target;
    }
    for x in &sent {
        if let Some(a) = x.arrival_ms {
            let second = (a / 1000.0) as usize;
            if let Some(s) = seconds_out.get_mut(second) {
                s.delivered_bps += x.size as f64 * 8.0;
            }
        } else if let Some(s) = seconds_out.get_mut((x.departure_ms / 1000) as usize) {
            s.lost += 1;
        }
    }
    (seconds_out, targets)
}
