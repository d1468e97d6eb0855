//! One viewer's bandwidth estimate as a pure state machine: transport-wide feedback (delay trend, loss), REMB and receiver-report loss in, bits per second out.
//!
//! GCC-style (draft-ietf-rmcat-gcc, libwebrtc's send-side estimator), no clock inside:
//! * **Delay.** Packets reported by transport-wide congestion control (TWCC) are grouped by
//!   send time (5 ms); the growth of one-way delay between groups is smoothed and fitted
//!   over the last 20 groups (trendline), and an adaptive threshold turns the slope into
//!   overuse, underuse or normal.
//! * **Rate control (AIMD).** Overuse: down to 85 % of what the viewer acknowledged receiving.
//!   Normal: up, additively near the last link capacity seen (for [`CAPACITY_MEMORY`] after an
//!   overuse), else multiplicatively at 8 % a second, four times faster each second without
//!   congestion up to 150 % a second (a climb near a path's capacity meets overuse within its
//!   first second, at 8-30 % a second, so only a long climb reaches the fast end; without
//!   TWCC it stays at 8 %). Underuse: hold while the queue drains.
//! * **Probes** ([`super::probe`], as libwebrtc's): with TWCC, a normal and not rising delay
//!   trend, no queue on the path and low loss, below the most the ceiling can use, the pacer
//!   sends a short burst at 1.5 times the estimate (twice, right after one that was carried).
//!   A burst the path carried at its rate is believed once the next, at twice that rate and
//!   sent at once, is carried too (a token bucket lets a short burst through at line rate on
//!   a full path): the estimate then jumps to the first one's rate; if the next is not
//!   carried, up to 95 % of the rate that one arrived at, at most the first one's. A probe
//!   the path did not carry marks the rate it arrived at as the path's capacity, brings an
//!   estimate above 95 % of it down to that (unless it was confirming a carried one), and
//!   the next probe waits 2.5 s. A probe that lost packets on the way makes what the viewer
//!   acknowledged the capacity (as overuse would). So a viewer starts at the ceiling within a
//!   second on a fast path, and comes back to it within a few after a dip, without the climb
//!   near a known capacity being faster.
//! * **Start.** At 1 Mbit/s; a viewer that negotiated TWCC and retransmissions (so probes can
//!   find its path) at 300 kbit/s instead, as libwebrtc starts, below most constrained paths.
//! * **Loss.** More than 10 % lost (TWCC, or a receiver report's fraction lost when there is no
//!   TWCC) cuts the rate by half the loss; 2-10 % holds it (5-10 % with TWCC, whose delay
//!   trend shows congestion before loss does: random loss alone does not stop a climb).
//! * **REMB** from a viewer that sends it caps the estimate.
//!
//! Bounds: never below the floor, never above the ceiling divided by [`VIDEO_SHARE`] (more
//! could never be used). rtcam's viewers are often sent less than their estimate allows (an
//! encoder short of content, a viewer on fewer temporal layers), so no overuse shows as the
//! estimate climbs past their path. Where probes can be sent, the climb is therefore held to
//! 1.5 times what the viewer acknowledged (plus 10 kbit/s), as libwebrtc's is, and only a
//! carried probe lifts it past that (to the next layer, say). Without probes it is not held,
//! or a viewer on one layer could never estimate enough for the next: the bound above keeps
//! it finite, and overuse after a layer switch brings it back down, and the layer with it
//! (the cost: such a viewer on a path too slow for the next layer tries it now and then).
//! A link capacity is forgotten when the acknowledged rate stays above its upper bound for a
//! second, not on one window that a keyframe or a token bucket's burst filled.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[cfg(test)]
use super::probe::PROBE_RETRY;
use super::probe::{ProbeOutcome, ProbeRequest, Prober};

/// One sent packet, as transport-wide feedback reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PacketResult {
    /// When it left the device (after pacing).
    pub departure: Instant,
    /// When it arrived, on the viewer's clock (any origin); `None`: lost.
    pub arrival: Option<Duration>,
    /// Bytes on the wire.
    pub size: usize,
}

/// Where the delay trend says the path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Usage {
    Normal,
    /// The queue at the bottleneck grows: sending faster than the path carries.
    Over,
    /// The queue drains.
    Under,
}

/// The rate controller's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Hold,
    Increase,
    Decrease,
}

/// What the estimate is made of, for the device state and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EstimateStats {
    /// The estimate, bits per second.
    pub estimate_bps: u32,
    /// The viewer's own maximum (REMB), if it sends one.
    pub remb_bps: Option<u32>,
    /// What the viewer acknowledged receiving over the last half second (TWCC).
    pub acked_bps: Option<u32>,
    /// Fraction of packets lost lately (TWCC, else receiver reports), 0..=1.
    pub loss: Option<f64>,
    pub rtt: Option<Duration>,
    /// Transport-wide feedback arrived lately.
    pub twcc: bool,
    pub usage: Usage,
}

/// The share of a viewer's estimate its video may fill; the rest is headroom for
/// retransmissions, RTCP, packet headers and the encoder's rate control overshooting.
pub(crate) const VIDEO_SHARE: f64 = 0.85;
/// Where a new viewer's estimate starts, bits per second.
pub(crate) const START_BITRATE: f64 = 1_000_000.0;
/// Where it starts when probes can find the path (libwebrtc's start): below most constrained
/// paths, so the first keyframe is not lost at the bottleneck; probes take it to the ceiling
/// within about a second on a fast path. Without probes the climb from here would take
/// seconds, so other viewers start at [`START_BITRATE`].
pub(crate) const START_BITRATE_WITH_PROBES: f64 = 300_000.0;
/// A viewer that negotiated transport-wide feedback and sent receiver reports this long apart
/// with none (the first may come before the first feedback) is taken not to send it: its
/// estimate goes to [`START_BITRATE`]. By time, not by count: one report carries a block for
/// each of rtcam's streams it received (media, retransmissions).
const REPORTS_WITHOUT_FEEDBACK_FOR: Duration = Duration::from_secs(1);
/// Send-time span of one packet group.
const GROUP_SPAN: Duration = Duration::from_millis(5);
/// Groups the trend is fitted over.
const TREND_WINDOW: usize = 20;
const TREND_SMOOTHING: f64 = 0.9;
const TREND_GAIN: f64 = 4.0;
/// The trend counts fully once this many deltas were seen.
const TREND_MIN_DELTAS: usize = 60;
const THRESHOLD_INITIAL_MS: f64 = 12.5;
const THRESHOLD_UP: f64 = 0.0087;
const THRESHOLD_DOWN: f64 = 0.039;
/// Above threshold this long (and twice in a row) is overuse.
const OVERUSE_TIME_MS: f64 = 10.0;
/// Overuse takes the rate to this fraction of the acknowledged rate.
const DECREASE_FACTOR: f64 = 0.85;
/// Multiplicative increase per second, at first and at most (after 2.1 s of climbing).
const INCREASE_MIN: f64 = 0.08;
const INCREASE_MAX: f64 = 1.5;
/// The multiplicative increase per second grows by this factor each second of climbing.
const INCREASE_ACCELERATION: f64 = 4.0;
/// After an overuse, the rate grows additively near the capacity it showed for this long.
const CAPACITY_MEMORY: Duration = Duration::from_secs(2);
/// Throughput window for the acknowledged rate.
const ACKED_WINDOW: Duration = Duration::from_millis(500);
/// A link capacity is forgotten once the acknowledged rate has stayed above its upper bound
/// this long: a keyframe, a probe or a token bucket's burst lifts that rate for one
/// [`ACKED_WINDOW`] at most, and a full path measured in such a window is not a faster one.
const CAPACITY_EXCEEDED_FOR: Duration = Duration::from_secs(1);
/// With probes, the climb stops at this multiple of the acknowledged rate (plus
/// [`ACKED_CLIMB_MARGIN`]), as libwebrtc's does: above what the viewer is sent, only a probe
/// tells what the path carries.
const ACKED_CLIMB_LIMIT: f64 = 1.5;
const ACKED_CLIMB_MARGIN: f64 = 10_000.0;
/// Loss above this cuts the rate; between this and the low mark it holds.
const LOSS_HIGH: f64 = 0.10;
/// The low mark with receiver reports only (GCC's); with TWCC the delay trend shows
/// congestion before loss does, so random loss up to the higher mark does not stop a climb.
const LOSS_LOW: f64 = 0.02;
const LOSS_LOW_WITH_DELAY: f64 = 0.05;
/// TWCC loss is measured over this long, and needs this many packets to count.
const LOSS_WINDOW: Duration = Duration::from_secs(1);
const LOSS_MIN_PACKETS: u32 = 20;
/// Without transport-wide feedback this long (after it once came), the estimate decays.
const FEEDBACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The estimate has been the most the ceiling can use, with feedback and no overuse, for this
/// long: the path carries everything rtcam may send it ([`BandwidthEstimator::path_is_clear`]).
const CLEAR_AFTER: Duration = Duration::from_secs(1);
/// A receiver report's loss counts this long.
const RR_LOSS_VALID: Duration = Duration::from_secs(3);
/// Round trip assumed until one is measured.
const DEFAULT_RTT: Duration = Duration::from_millis(100);
/// No probe once the estimate is this close to the most it may be.
const PROBE_BELOW_TOP: f64 = 0.95;
/// A probe the path did not carry sets the estimate to at most this share of the rate it
/// arrived at (libwebrtc's target utilization of a probe's result).
const PROBE_SATURATED_SHARE: f64 = 0.95;
/// A carried probe not confirmed by the next within this is forgotten.
const UNCONFIRMED_FOR: Duration = Duration::from_secs(2);
/// No probe while the path holds more queue than this.
const PROBE_MAX_QUEUE: Duration = Duration::from_millis(20);
/// The queue is measured against the least one-way delay seen over this many seconds
/// (windowed, as the device's and the viewer's clocks drift apart).
const BASE_DELAY_SECONDS: usize = 10;
/// No probe while the delay trend is over this share of the overuse threshold.
const RISING_SHARE: f64 = 0.25;

/// Arrival-time groups of packets sent within [`GROUP_SPAN`] of each other.
#[derive(Debug, Clone, Copy)]
struct Group {
    first_departure: Instant,
    last_departure: Instant,
    first_arrival: Duration,
    last_arrival: Duration,
}

/// The delay between consecutive groups, fitted over the last [`TREND_WINDOW`] groups.
#[derive(Debug, Default)]
struct Trendline {
    current: Option<Group>,
    previous: Option<Group>,
    first_arrival_ms: Option<f64>,
    accumulated_ms: f64,
    smoothed_ms: f64,
    deltas: usize,
    history: VecDeque<(f64, f64)>,
    trend: f64,
    /// The last trend as compared with the threshold.
    modified: f64,
    previous_trend: f64,
    threshold_ms: f64,
    threshold_updated_ms: Option<f64>,
    over_ms: Option<f64>,
    over_count: u32,
    usage: Option<Usage>,
}

impl Trendline {
    fn new() -> Self {
        Self {
            threshold_ms: THRESHOLD_INITIAL_MS,
            ..Self::default()
        }
    }

    fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage::Normal)
    }

    /// The delay grows, if not yet enough to be overuse: over [`RISING_SHARE`] of the threshold.
    fn rising(&self) -> bool {
        self.modified > RISING_SHARE * self.threshold_ms
    }

    /// A packet that arrived; returns the usage when a group completed.
    fn packet(&mut self, departure: Instant, arrival: Duration) -> Option<Usage> {
        let Some(current) = self.current.as_mut() else {
            self.current = Some(Group {
                first_departure: departure,
                last_departure: departure,
                first_arrival: arrival,
                last_arrival: arrival,
            });
            return None;
        };
        if departure < current.first_departure {
            return None; // reordered into an older group: ignored
        }
        let in_group = departure.duration_since(current.first_departure) <= GROUP_SPAN;
        // A burst: arrived back to back with the group although sent later (the path
        // delivered a queue at once); it belongs to the group.
        let burst = {
            let arrival_delta = arrival.saturating_sub(current.last_arrival);
            let send_delta = departure.duration_since(current.last_departure);
            arrival >= current.last_arrival
                && arrival_delta < send_delta
                && arrival_delta <= GROUP_SPAN
                && arrival.saturating_sub(current.first_arrival) < Duration::from_millis(100)
        };
        if in_group || burst {
            current.last_departure = current.last_departure.max(departure);
            current.last_arrival = current.last_arrival.max(arrival);
            return None;
        }
        let done = *current;
        self.current = Some(Group {
            first_departure: departure,
            last_departure: departure,
            first_arrival: arrival,
            last_arrival: arrival,
        });
        let previous = self.previous.replace(done)?;
        if done.last_arrival < previous.last_arrival {
            return None; // reordered: no delta from this pair
        }
        let send_ms = done
            .last_departure
            .duration_since(previous.last_departure)
            .as_secs_f64()
            * 1e3;
        let arrival_ms = (done.last_arrival - previous.last_arrival).as_secs_f64() * 1e3;
        Some(self.delta(arrival_ms - send_ms, send_ms, done.last_arrival))
    }

    fn delta(&mut self, delta_ms: f64, send_delta_ms: f64, arrival: Duration) -> Usage {
        let arrival_ms = arrival.as_secs_f64() * 1e3;
        self.deltas = (self.deltas + 1).min(1000);
        let first = *self.first_arrival_ms.get_or_insert(arrival_ms);
        self.accumulated_ms += delta_ms;
        self.smoothed_ms =
            TREND_SMOOTHING * self.smoothed_ms + (1.0 - TREND_SMOOTHING) * self.accumulated_ms;
        self.history
            .push_back((arrival_ms - first, self.smoothed_ms));
        if self.history.len() > TREND_WINDOW {
            self.history.pop_front();
        }
        if self.history.len() == TREND_WINDOW
            && let Some(slope) = fit_slope(&self.history)
        {
            self.trend = slope;
        }
        self.detect(send_delta_ms, arrival_ms)
    }

    fn detect(&mut self, send_delta_ms: f64, now_ms: f64) -> Usage {
        if self.deltas < 2 {
            self.usage = Some(Usage::Normal);
            return Usage::Normal;
        }
        let modified = self.deltas.min(TREND_MIN_DELTAS) as f64 * self.trend * TREND_GAIN;
        self.modified = modified;
        if modified > self.threshold_ms {
            let over = match self.over_ms {
                None => send_delta_ms / 2.0,
                Some(t) => t + send_delta_ms,
            };
            self.over_ms = Some(over);
            self.over_count += 1;
            if over > OVERUSE_TIME_MS && self.over_count > 1 && self.trend >= self.previous_trend {
                self.over_ms = Some(0.0);
                self.over_count = 0;
                self.usage = Some(Usage::Over);
            }
        } else if modified < -self.threshold_ms {
            self.over_ms = None;
            self.over_count = 0;
            self.usage = Some(Usage::Under);
        } else {
            self.over_ms = None;
            self.over_count = 0;
            self.usage = Some(Usage::Normal);
        }
        self.previous_trend = self.trend;
        self.adapt_threshold(modified, now_ms);
        self.usage()
    }

    /// The threshold follows the trend's magnitude, slowly upwards and faster downwards, so
    /// a path with jittery delay does not read as congested and competing flows do not
    /// starve this one (draft-ietf-rmcat-gcc §5.4).
    fn adapt_threshold(&mut self, modified: f64, now_ms: f64) {
        let last = *self.threshold_updated_ms.get_or_insert(now_ms);
        if modified.abs() > self.threshold_ms + 15.0 {
            self.threshold_updated_ms = Some(now_ms);
            return;
        }
        let k = if modified.abs() < self.threshold_ms {
            THRESHOLD_DOWN
        } else {
            THRESHOLD_UP
        };
        let dt = (now_ms - last).clamp(0.0, 100.0);
        self.threshold_ms =
            (self.threshold_ms + k * (modified.abs() - self.threshold_ms) * dt).clamp(6.0, 600.0);
        self.threshold_updated_ms = Some(now_ms);
    }
}

/// The queue on the path: the one-way delay of the newest packet reported above the least
/// seen lately. The delay is measured between clocks with
/// different origins, so only differences mean anything.
#[derive(Debug, Default)]
struct QueueDelay {
    /// Origin of departures.
    epoch: Option<Instant>,
    /// Least delay per second (when that second began, seconds).
    base: VecDeque<(Instant, f64)>,
    last: Option<f64>,
}

impl QueueDelay {
    fn feedback(&mut self, now: Instant, packets: &[PacketResult]) {
        let epoch = *self
            .epoch
            .get_or_insert_with(|| packets.first().map_or(now, |p| p.departure));
        let delays: Vec<f64> = packets
            .iter()
            .filter_map(|p| {
                let arrival = p.arrival?.as_secs_f64();
                Some(arrival - p.departure.saturating_duration_since(epoch).as_secs_f64())
            })
            .collect();
        let (Some(least), Some(&newest)) =
            (delays.iter().copied().min_by(f64::total_cmp), delays.last())
        else {
            return;
        };
        self.last = Some(newest);
        match self.base.back_mut() {
            Some((start, min))
                if now.saturating_duration_since(*start) < Duration::from_secs(1) =>
            {
                *min = min.min(least);
            }
            _ => {
                self.base.push_back((now, least));
                if self.base.len() > BASE_DELAY_SECONDS {
                    self.base.pop_front();
                }
            }
        }
    }

    /// The queue at the last feedback, if there was any.
    fn queued(&self) -> Option<Duration> {
        let last = self.last?;
        let base = self.base.iter().map(|(_, m)| *m).min_by(f64::total_cmp)?;
        Some(Duration::from_secs_f64((last - base).max(0.0)))
    }
}

/// Least-squares slope of (x, y) points.
fn fit_slope(points: &VecDeque<(f64, f64)>) -> Option<f64> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den != 0.0).then(|| num / den)
}

/// A viewer's bandwidth estimate (see the module documentation).
#[derive(Debug)]
pub(crate) struct BandwidthEstimator {
    floor: f64,
    ceiling: f64,
    rate: f64,
    control: Control,
    trend: Trendline,
    /// Arrivals (viewer clock) and sizes within [`ACKED_WINDOW`] of the newest.
    acked: VecDeque<(Duration, usize)>,
    /// Link capacity seen at overuse.
    capacity: Option<LinkCapacity>,
    last_decrease: Option<Instant>,
    /// When the path last showed its capacity (overuse, or a probe it could not carry).
    capacity_confirmed: Option<Instant>,
    /// Since when the acknowledged rate has been above the capacity's upper bound.
    above_capacity_since: Option<Instant>,
    last_loss_decrease: Option<Instant>,
    /// Last time the rate was raised (or could have been).
    last_increase: Option<Instant>,
    /// Since when the rate has been climbing multiplicatively without congestion.
    climbing_since: Option<Instant>,
    /// TWCC (time of feedback, lost, total) within [`LOSS_WINDOW`].
    twcc_loss: VecDeque<(Instant, u32, u32)>,
    rr_loss: Option<(Instant, f64)>,
    remb: Option<f64>,
    rtt: Option<Duration>,
    last_feedback: Option<Instant>,
    last_timeout_decrease: Option<Instant>,
    /// Since when the estimate has been at the most the ceiling can use, by feedback without
    /// overuse.
    at_top_since: Option<Instant>,
    prober: Prober,
    /// A probe the path carried (bits per second, when), not yet confirmed by the next.
    unconfirmed: Option<(f64, Instant)>,
    queue: QueueDelay,
    /// Started low for probes ([`Self::expect_probes`]): `Some`, with the first receiver
    /// report that came before any transport-wide feedback.
    low_start: Option<Option<Instant>>,
    /// The viewer negotiated what probes need: the climb is held near what it acknowledged.
    probes_negotiated: bool,
}

impl BandwidthEstimator {
    /// Starts at [`START_BITRATE`] (or the most the ceiling can use, if less): a new viewer
    /// on a slow path is not flooded before the first feedback, and one on a fast path climbs
    /// to the ceiling within seconds.
    pub fn new(floor: u32, ceiling: u32) -> Self {
        let floor = f64::from(floor.min(ceiling));
        let ceiling = f64::from(ceiling);
        Self {
            floor,
            ceiling,
            rate: START_BITRATE.min(ceiling / VIDEO_SHARE).max(floor),
            control: Control::Increase,
            trend: Trendline::new(),
            acked: VecDeque::new(),
            capacity: None,
            last_decrease: None,
            capacity_confirmed: None,
            above_capacity_since: None,
            last_loss_decrease: None,
            last_increase: None,
            climbing_since: None,
            twcc_loss: VecDeque::new(),
            rr_loss: None,
            remb: None,
            rtt: None,
            last_feedback: None,
            last_timeout_decrease: None,
            at_top_since: None,
            prober: Prober::new(),
            unconfirmed: None,
            queue: QueueDelay::default(),
            low_start: None,
            probes_negotiated: false,
        }
    }

    /// The viewer negotiated transport-wide feedback and retransmissions (which carry probe
    /// padding): before any feedback, the estimate starts at [`START_BITRATE_WITH_PROBES`]
    /// instead, and probes find the path. Should the viewer send receiver reports and no
    /// transport-wide feedback, it goes back to [`START_BITRATE`] and climbs as before.
    pub fn expect_probes(&mut self) {
        self.probes_negotiated = true;
        if self.last_feedback.is_none() && self.low_start.is_none() {
            self.rate = self.rate.min(START_BITRATE_WITH_PROBES).max(self.floor);
            self.low_start = Some(None);
        }
    }

    /// New floor and ceiling (the ceiling is `encoder.bitrate`, changed by `set-bitrate`).
    pub fn set_bounds(&mut self, floor: u32, ceiling: u32) {
        self.floor = f64::from(floor.min(ceiling));
        self.ceiling = f64::from(ceiling);
        self.rate = self.rate.clamp(self.floor, self.max_rate());
    }

    fn max_rate(&self) -> f64 {
        self.ceiling / VIDEO_SHARE
    }

    /// The estimate, bits per second.
    pub fn estimate(&self) -> u32 {
        let capped = self.remb.map_or(self.rate, |r| self.rate.min(r));
        capped.clamp(self.floor, self.max_rate()) as u32
    }

    fn at_top(&self) -> bool {
        f64::from(self.estimate()) >= self.max_rate().floor()
    }

    /// Whether the path has carried every rate rtcam may send it: the estimate has been the
    /// most the ceiling can use for [`CLEAR_AFTER`], reached and held by feedback without
    /// overuse, loss cuts or a feedback timeout (a start at the top, with a low ceiling,
    /// counts only once feedback confirms it). The pacer allows longer bursts on such a path.
    pub fn path_is_clear(&self, now: Instant) -> bool {
        self.at_top()
            && self
                .at_top_since
                .is_some_and(|t| now.saturating_duration_since(t) >= CLEAR_AFTER)
    }

    pub fn stats(&self, now: Instant) -> EstimateStats {
        EstimateStats {
            estimate_bps: self.estimate(),
            remb_bps: self.remb.map(|r| r as u32),
            acked_bps: self.acked_rate().map(|r| r as u32),
            loss: self.loss(now),
            rtt: self.rtt,
            twcc: self.twcc_active(now),
            usage: self.trend.usage(),
        }
    }

    /// The round trip from receiver reports, once one came.
    pub fn reported_rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// A probe the pacer should send now (see [`super::probe`]): only with transport-wide
    /// feedback to read it, while the delay trend is normal and not rising and the path holds
    /// no queue (a queue says the path is full), loss low, below the most the
    /// ceiling can use and below the viewer's own maximum (REMB).
    pub fn probe_request(&mut self, now: Instant) -> Option<ProbeRequest> {
        let max = self
            .remb
            .map_or(self.max_rate(), |r| r.min(self.max_rate()));
        if !self.twcc_active(now)
            || self.trend.usage() != Usage::Normal
            || self.trend.rising()
            || self.queue.queued().is_none_or(|q| q > PROBE_MAX_QUEUE)
            || self.loss(now).is_some_and(|l| l >= LOSS_LOW)
            || self.rate >= PROBE_BELOW_TOP * max
        {
            return None;
        }
        let base = self.unconfirmed_probe(now).unwrap_or(self.rate);
        self.prober.request(now, base, max)
    }

    /// The rate the last probe carried while it awaits the next one's confirmation.
    fn unconfirmed_probe(&mut self, now: Instant) -> Option<f64> {
        if self
            .unconfirmed
            .is_some_and(|(_, at)| now.saturating_duration_since(at) > UNCONFIRMED_FOR)
        {
            self.unconfirmed = None;
        }
        self.unconfirmed.map(|(bps, _)| bps)
    }

    /// The pacer sent probe `id` between these departures.
    pub fn probe_sent(&mut self, id: u32, first: Instant, last: Instant) {
        self.prober.sent(id, first, last);
    }

    /// The pacer could not send probe `id`.
    pub fn probe_abandoned(&mut self, id: u32, now: Instant) {
        self.prober.abandoned(id, now);
    }

    fn rtt(&self) -> Duration {
        self.rtt.unwrap_or(DEFAULT_RTT)
    }

    fn twcc_active(&self, now: Instant) -> bool {
        self.last_feedback
            .is_some_and(|t| now.saturating_duration_since(t) < 2 * FEEDBACK_TIMEOUT)
    }

    /// Bits per second the viewer received over the last [`ACKED_WINDOW`] (by its clock).
    fn acked_rate(&self) -> Option<f64> {
        let (first, last) = (self.acked.front()?.0, self.acked.back()?.0);
        let span = last.saturating_sub(first);
        if span < ACKED_WINDOW / 2 {
            return None;
        }
        let bytes: usize = self.acked.iter().map(|(_, s)| s).sum();
        Some(bytes as f64 * 8.0 / span.as_secs_f64())
    }

    /// Recent loss: TWCC's when it reports enough packets, else the last receiver report's.
    fn loss(&self, now: Instant) -> Option<f64> {
        let (lost, total) = self
            .twcc_loss
            .iter()
            .filter(|(t, _, _)| now.saturating_duration_since(*t) <= LOSS_WINDOW)
            .fold((0, 0), |(l, n), (_, lost, total)| (l + lost, n + total));
        if total >= LOSS_MIN_PACKETS {
            return Some(f64::from(lost) / f64::from(total));
        }
        if self.twcc_active(now) {
            return None;
        }
        self.rr_loss
            .filter(|(t, _)| now.saturating_duration_since(*t) <= RR_LOSS_VALID)
            .map(|(_, l)| l)
    }

    /// Transport-wide feedback: the packets it reported, in send order. Returns what it told
    /// of a probe, if it completed one (for the logs).
    pub fn on_transport_feedback(
        &mut self,
        now: Instant,
        packets: &[PacketResult],
    ) -> Option<ProbeOutcome> {
        if packets.is_empty() {
            return None;
        }
        self.last_feedback = Some(now);
        let mut lost = 0;
        let mut usage = None;
        self.queue.feedback(now, packets);
        for p in packets {
            match p.arrival {
                Some(arrival) => {
                    self.acked.push_back((arrival, p.size));
                    if let Some(u) = self.trend.packet(p.departure, arrival) {
                        usage = Some(u);
                    }
                }
                None => lost += 1,
            }
        }
        if let Some(&(newest, _)) = self.acked.back() {
            while self
                .acked
                .front()
                .is_some_and(|(t, _)| newest.saturating_sub(*t) > ACKED_WINDOW)
            {
                self.acked.pop_front();
            }
        }
        let outcome = self.prober.on_feedback(now, packets);
        let unconfirmed = self.unconfirmed_probe(now);
        match outcome {
            Some(ProbeOutcome::Saturated(Some(bps))) => {
                // The rate the burst left the bottleneck at is the path's capacity, as
                // overuse would show it: the climb near it is slow again. The estimate comes
                // down to 95 % of it (libwebrtc sets it to a probe's result); a probe that
                // was confirming a carried one lifts it up to that at most (the first was
                // carried: not down).
                self.capacity_seen(now, bps);
                let limit = PROBE_SATURATED_SHARE * bps;
                self.rate = match unconfirmed {
                    Some(carried) => self.rate.max(carried.min(limit)),
                    None => self.rate.min(limit),
                }
                .max(self.floor);
                self.unconfirmed = None;
            }
            Some(ProbeOutcome::Saturated(None)) => {
                // Lost on the way (a full queue) or too few arrived to time: the path is full
                // at a rate not measured. What the viewer acknowledged stands for its
                // capacity, as at overuse, so the climb near it is slow again (a viewer on
                // fewer layers, sending less than its estimate, shows no overuse as it climbs).
                if let Some(acked) = self.acked_rate() {
                    self.capacity_seen(now, acked);
                }
                self.climbing_since = None;
                self.unconfirmed = None;
            }
            Some(ProbeOutcome::Carried(bps)) => {
                // A short burst carried may have passed a token bucket (Linux `tbf`, many
                // home routers' shapers) at line rate on a path that is full, if the bucket
                // was full: the probe that follows at once, at twice this rate, confirms it
                // (carried too) or measures the capacity (above). At the top there is no
                // next one: the estimate goes there.
                let carried = bps.min(self.max_rate());
                let at_top = carried >= PROBE_BELOW_TOP * self.max_rate();
                let confirmed = if at_top {
                    Some(carried)
                } else {
                    unconfirmed.map(|u| u.min(carried))
                };
                self.unconfirmed = (!at_top).then_some((carried, now));
                if let Some(confirmed) = confirmed.filter(|c| *c > self.rate) {
                    self.rate = confirmed;
                    if self.capacity.is_some_and(|c| confirmed > c.upper()) {
                        self.capacity = None;
                    }
                    self.climbing_since = None;
                    self.last_increase = Some(now);
                }
            }
            None => {}
        }
        self.twcc_loss.push_back((now, lost, packets.len() as u32));
        while self
            .twcc_loss
            .front()
            .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > LOSS_WINDOW)
        {
            self.twcc_loss.pop_front();
        }
        self.update(now, usage.unwrap_or(self.trend.usage()));
        outcome
    }

    /// A receiver report block for the stream: loss since the last report (`fraction_lost`
    /// out of 256) and the round trip it implies, if any.
    pub fn on_receiver_report(&mut self, now: Instant, fraction_lost: u8, rtt: Option<Duration>) {
        if let Some(rtt) = rtt {
            self.rtt = Some(match self.rtt {
                Some(old) => (old * 7 + rtt) / 8,
                None => rtt,
            });
        }
        self.rr_loss = Some((now, f64::from(fraction_lost) / 256.0));
        if self.last_feedback.is_none()
            && let Some(first_report) = &mut self.low_start
        {
            let first = *first_report.get_or_insert(now);
            if now.saturating_duration_since(first) >= REPORTS_WITHOUT_FEEDBACK_FOR {
                // Negotiated, never sent: no probes will lift it.
                self.low_start = None;
                self.rate = self
                    .rate
                    .max(START_BITRATE.min(self.max_rate()))
                    .max(self.floor);
            }
        }
        if !self.twcc_active(now) {
            // No delay signal: loss (and REMB) alone steer the rate.
            self.update(now, Usage::Normal);
        }
    }

    /// The viewer's own maximum (REMB).
    pub fn on_remb(&mut self, bps: u64) {
        self.remb = Some(bps as f64);
    }

    /// When [`Self::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let last = self.last_feedback?;
        let due = last + FEEDBACK_TIMEOUT;
        Some(match self.last_timeout_decrease {
            Some(t) if t >= due => t + FEEDBACK_TIMEOUT / 2,
            _ => due,
        })
    }

    /// Transport-wide feedback that stops (a path so congested nothing gets through, or a
    /// viewer gone quiet) decays the estimate by a fifth every half second.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(last) = self.last_feedback else {
            return;
        };
        if now.saturating_duration_since(last) < FEEDBACK_TIMEOUT
            || self
                .last_timeout_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < FEEDBACK_TIMEOUT / 2)
        {
            return;
        }
        self.last_timeout_decrease = Some(now);
        self.rate = (self.rate * 0.8).max(self.floor);
        self.climbing_since = None;
        self.at_top_since = None;
        self.last_increase = Some(now);
        self.control = Control::Hold;
    }

    fn update(&mut self, now: Instant, usage: Usage) {
        self.control = match (self.control, usage) {
            (_, Usage::Over) => Control::Decrease,
            (_, Usage::Under) => Control::Hold,
            (Control::Decrease, Usage::Normal) => Control::Hold,
            (_, Usage::Normal) => Control::Increase,
        };
        let loss = self.loss(now);
        let rtt = self.rtt();
        match self.control {
            Control::Decrease => {
                let since = self.last_decrease.map(|t| now.saturating_duration_since(t));
                if since.is_none_or(|s| s >= rtt.max(Duration::from_millis(100))) {
                    let acked = self.acked_rate();
                    let target = DECREASE_FACTOR * acked.unwrap_or(self.rate);
                    if target < self.rate {
                        self.rate = target;
                    }
                    if let Some(a) = acked {
                        self.capacity_seen(now, a);
                    }
                    self.last_decrease = Some(now);
                    self.climbing_since = None;
                    self.prober.defer(now);
                    self.unconfirmed = None;
                }
                self.control = Control::Hold;
                self.last_increase = Some(now);
            }
            Control::Hold => {
                self.climbing_since = None;
                self.last_increase = Some(now);
            }
            Control::Increase => {
                let low = if self.twcc_active(now) {
                    LOSS_LOW_WITH_DELAY
                } else {
                    LOSS_LOW
                };
                if loss.is_some_and(|l| l >= low) {
                    // Some loss: not the moment to ask for more.
                    self.last_increase = Some(now);
                    self.climbing_since = None;
                } else {
                    self.increase(now, rtt);
                }
            }
        }
        if let Some(l) = loss
            && l > LOSS_HIGH
            && self.last_loss_decrease.is_none_or(|t| {
                now.saturating_duration_since(t) >= Duration::from_millis(300) + rtt
            })
        {
            self.rate *= 1.0 - 0.5 * l;
            self.last_loss_decrease = Some(now);
            self.prober.defer(now);
            self.unconfirmed = None;
            self.climbing_since = None;
        }
        self.rate = self.rate.clamp(self.floor, self.max_rate());
        self.at_top_since = if usage != Usage::Over && self.at_top() {
            Some(self.at_top_since.unwrap_or(now))
        } else {
            None
        };
    }

    fn increase(&mut self, now: Instant, rtt: Duration) {
        let dt = self
            .last_increase
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(Duration::from_millis(500))
            .as_secs_f64();
        self.last_increase = Some(now);
        if dt == 0.0 {
            return;
        }
        if self
            .capacity_confirmed
            .is_some_and(|t| now.saturating_duration_since(t) > CAPACITY_MEMORY)
        {
            // No overuse for a while near the old capacity: it may have grown (a path that
            // recovered from a dip); climb multiplicatively again until told otherwise.
            self.capacity = None;
        }
        let before = self.rate;
        if self.capacity.is_some() {
            // About one packet more per response time (libwebrtc's additive increase).
            let response = rtt.as_secs_f64() + 0.1;
            let packet_bits = 1200.0 * 8.0;
            self.rate += (packet_bits / response).max(4000.0) * dt;
            self.climbing_since = None;
        } else if self.twcc_active(now) {
            // Overuse shows within a round trip or two: climb faster the longer it does not.
            let since = *self.climbing_since.get_or_insert(now);
            let climbed = now.saturating_duration_since(since).as_secs_f64();
            let per_second = (INCREASE_MIN * INCREASE_ACCELERATION.powf(climbed)).min(INCREASE_MAX);
            self.rate *= (1.0 + per_second).powf(dt);
        } else {
            // Receiver reports come once a second: no acceleration on so slow a signal.
            self.rate *= (1.0 + INCREASE_MIN).powf(dt);
        }
        if self.probes_negotiated
            && let Some(acked) = self.acked_rate()
        {
            // A viewer sent fewer layers than its estimate allows shows no overuse as the
            // estimate climbs past its path (in the e2e's (b), 500k to 1.2M in a second on a
            // 600 kbit/s path, then 15 % lost at the next layer): probes lift it past this.
            let limit = ACKED_CLIMB_LIMIT * acked + ACKED_CLIMB_MARGIN;
            self.rate = self.rate.min(limit.max(before));
        }
        let Some(capacity) = self.capacity else {
            return;
        };
        if self.acked_rate().unwrap_or(self.rate) > capacity.upper() {
            // The path carries more than it did at the last overuse, for longer than a
            // burst could make it seem to: that capacity is gone. (Forgotten on one window,
            // it let a 600 kbit/s viewer's climb go multiplicative into loss.)
            let since = *self.above_capacity_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= CAPACITY_EXCEEDED_FOR {
                self.capacity = None;
                self.above_capacity_since = None;
            }
        } else {
            self.above_capacity_since = None;
        }
    }

    /// Learns the link capacity from the acknowledged rate at an overuse; a rate far below
    /// it means the path changed, and the old capacity is forgotten.
    fn capacity_seen(&mut self, now: Instant, acked: f64) {
        self.capacity_confirmed = Some(now);
        self.above_capacity_since = None;
        if self.capacity.is_some_and(|c| acked < c.lower()) {
            self.capacity = None;
        }
        self.capacity
            .get_or_insert_with(|| LinkCapacity::new(acked))
            .update(acked);
    }
}

/// The rate the path carried at overuse, with its spread (libwebrtc's `LinkCapacityEstimator`):
/// near it the rate grows additively, past its upper bound the estimate is dropped.
#[derive(Debug, Clone, Copy)]
struct LinkCapacity {
    kbps: f64,
    /// Variance normalized by the estimate, kbit/s.
    deviation: f64,
}

impl LinkCapacity {
    fn new(bps: f64) -> Self {
        Self {
            kbps: bps / 1e3,
            deviation: 0.4,
        }
    }

    fn update(&mut self, bps: f64) {
        const ALPHA: f64 = 0.05;
        let sample = bps / 1e3;
        self.kbps = (1.0 - ALPHA) * self.kbps + ALPHA * sample;
        let error = self.kbps - sample;
        self.deviation = ((1.0 - ALPHA) * self.deviation
            + ALPHA * error * error / self.kbps.max(1.0))
        .clamp(0.4, 2.5);
    }

    /// Mean plus three standard deviations, bits per second.
    fn upper(&self) -> f64 {
        (self.kbps + 3.0 * (self.deviation * self.kbps).sqrt()) * 1e3
    }

    /// Mean minus three standard deviations, bits per second.
    fn lower(&self) -> f64 {
        (self.kbps - 3.0 * (self.deviation * self.kbps).sqrt()).max(0.0) * 1e3
    }
}

/// Feedback fixtures shared with the pacer's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Feeds `span` of transport-wide feedback from `t0 + from`: a 1200-byte packet every
    /// 10 ms, each arriving after the same delay (no queue), reported every 100 ms.
    pub(crate) fn steady_feedback(
        e: &mut BandwidthEstimator,
        t0: Instant,
        from: Duration,
        span: Duration,
    ) {
        sized_feedback(e, t0, from, span, 1200);
    }

    /// [`steady_feedback`] with packets of `size` bytes (the same timing: no delay trend).
    pub(crate) fn sized_feedback(
        e: &mut BandwidthEstimator,
        t0: Instant,
        from: Duration,
        span: Duration,
        size: usize,
    ) {
        let (from, span) = (from.as_millis() as u64, span.as_millis() as u64);
        for batch in (from..from + span).step_by(100) {
            let packets: Vec<_> = (batch..batch + 100)
                .step_by(10)
                .map(|ms| PacketResult {
                    departure: t0 + Duration::from_millis(ms),
                    arrival: Some(Duration::from_millis(500 + ms)),
                    size,
                })
                .collect();
            e.on_transport_feedback(t0 + Duration::from_millis(batch + 120), &packets);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{sized_feedback, steady_feedback};
    use super::*;
    use crate::viewer::linksim::{self, Feedback, PathState, Second};

    const CEILING: u32 = 2_000_000;
    const FLOOR: u32 = 150_000;

    fn path(capacity_bps: f64) -> PathState {
        PathState {
            capacity_bps,
            buffer_ms: 150.0,
            bucket_bytes: 0.0,
            one_way: Duration::from_millis(20),
            loss: 0.0,
        }
    }

    fn show(name: &str, run: &[Second]) {
        for (i, s) in run.iter().enumerate() {
            eprintln!(
                "{name} t={i:2} est={:7.0}k target={:7.0}k delivered={:7.0}k lost={}/{} queue={:4.0}ms probes={}",
                s.estimate_bps / 1e3,
                s.target_bps / 1e3,
                s.delivered_bps / 1e3,
                s.lost,
                s.sent,
                s.max_queue_ms,
                s.probes
            );
        }
    }

    fn estimator() -> BandwidthEstimator {
        BandwidthEstimator::new(FLOOR, CEILING)
    }

    fn run_twcc(seconds: u64, path: impl Fn(f64) -> PathState) -> Vec<Second> {
        linksim::run(
            &mut estimator(),
            f64::from(CEILING),
            Feedback::Twcc,
            seconds,
            path,
        )
    }

    /// Runs `check` on every second from `from` on; prints the whole run if it fails.
    fn check_from(name: &str, run: &[Second], from: usize, check: impl Fn(&Second) -> bool) {
        if let Some(i) = run
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, s)| !check(s))
            .map(|(i, _)| i)
        {
            show(name, run);
            panic!("{name}: second {i} fails the check (run printed above)");
        }
    }

    /// A probe's packets as feedback reports them: sent at its rate from `at`, arriving
    /// `spacing` times as far apart (1: the path carried it; 2: at half its rate), after the
    /// same delay as [`steady_feedback`]'s; then one media packet after it.
    fn probe_feedback(
        t0: Instant,
        at: Instant,
        r: &ProbeRequest,
        spacing: f64,
    ) -> (Instant, Vec<PacketResult>) {
        let gap = 1200.0 * 8.0 / r.bps;
        let n = r.bytes.div_ceil(1200);
        let offset = at.duration_since(t0).as_secs_f64() + 0.5;
        let mut packets: Vec<PacketResult> = (0..n)
            .map(|i| PacketResult {
                departure: at + Duration::from_secs_f64(i as f64 * gap),
                arrival: Some(Duration::from_secs_f64(offset + i as f64 * gap * spacing)),
                size: 1200,
            })
            .collect();
        let last = packets[n - 1].departure;
        packets.push(PacketResult {
            departure: last + Duration::from_millis(5),
            arrival: Some(Duration::from_secs_f64(
                offset + n as f64 * gap * spacing + 0.005,
            )),
            size: 1200,
        });
        (last, packets)
    }

    #[test]
    fn probes_need_transport_feedback_raise_the_estimate_when_carried_and_stop_at_the_top() {
        let mut e = estimator();
        let t0 = Instant::now();
        assert_eq!(
            e.probe_request(t0),
            None,
            "no feedback to read a probe with"
        );
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_secs(1));
        let mut at = t0 + Duration::from_millis(1_200);
        let before = f64::from(e.estimate());
        let r = e.probe_request(at).expect("a probe");
        assert!(
            (r.bps / before - 1.5).abs() < 0.01,
            "{} against {before}",
            r.bps
        );
        let mut probes = 0;
        let mut previous_bps = before;
        let top = f64::from(CEILING) / VIDEO_SHARE;
        let mut r = Some(r);
        while let Some(probe) = r {
            probes += 1;
            let estimate = f64::from(e.estimate());
            if probes > 1 {
                // At twice the rate the last one carried, or the most the estimate may be.
                let expected = (2.0 * previous_bps).min(top);
                assert!((probe.bps / expected - 1.0).abs() < 0.01, "{probe:?}");
            }
            let (last, feedback) = probe_feedback(t0, at, &probe, 1.0);
            e.probe_sent(probe.id, at, last);
            at = last + Duration::from_millis(100);
            e.on_transport_feedback(at, &feedback);
            if probe.bps >= 0.95 * top {
                assert!(
                    f64::from(e.estimate()) >= 0.98 * probe.bps,
                    "{}",
                    e.estimate()
                );
            } else if probes == 1 {
                // One carried burst may have passed a token bucket: not believed until the
                // next confirms it (the climb since the last feedback aside).
                assert!(
                    f64::from(e.estimate()) < 0.9 * probe.bps,
                    "{} after one probe at {} from {estimate}",
                    e.estimate(),
                    probe.bps
                );
            } else {
                // Confirmed: the estimate is at the rate the one before carried.
                assert!(
                    f64::from(e.estimate()) >= 0.98 * previous_bps,
                    "carried at {previous_bps} and {} bit/s: estimate {}",
                    probe.bps,
                    e.estimate()
                );
            }
            previous_bps = probe.bps;
            r = e.probe_request(at);
            assert!(probes < 5, "still probing at {}", e.estimate());
        }
        assert!(f64::from(e.estimate()) >= 0.95 * f64::from(CEILING) / VIDEO_SHARE);
        assert_eq!(
            e.probe_request(at + Duration::from_secs(10)),
            None,
            "at the top"
        );
    }

    #[test]
    fn a_carried_probe_the_next_does_not_confirm_lifts_it_only_to_what_that_one_measured() {
        let mut e = BandwidthEstimator::new(FLOOR, 10_000_000);
        let t0 = Instant::now();
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_secs(1));
        let at = t0 + Duration::from_millis(1_200);
        let first = e.probe_request(at).expect("a probe");
        let (last, feedback) = probe_feedback(t0, at, &first, 1.0);
        e.probe_sent(first.id, at, last);
        let at = last + Duration::from_millis(100);
        e.on_transport_feedback(at, &feedback);
        let before = f64::from(e.estimate());
        assert!(
            before < 0.9 * first.bps,
            "{before} after a probe at {}",
            first.bps
        );
        // The follow-up, at twice the first's rate, arrives at half its rate: the path
        // carries what the first probe did, no more.
        let second = e.probe_request(at).expect("the follow-up");
        assert!((second.bps / first.bps - 2.0).abs() < 0.01, "{second:?}");
        let (last, feedback) = probe_feedback(t0, at, &second, 2.0);
        e.probe_sent(second.id, at, last);
        e.on_transport_feedback(last + Duration::from_millis(100), &feedback);
        let after = f64::from(e.estimate());
        let measured = second.bps / 2.0;
        assert!(
            (after / (PROBE_SATURATED_SHARE * measured) - 1.0).abs() < 0.05,
            "{after} after a follow-up that arrived at {measured}"
        );
        assert!(after > before && after < first.bps);
    }

    #[test]
    fn a_viewer_with_probes_starts_below_a_600k_path_and_loses_nothing_at_the_start() {
        // Started at 1 Mbit/s, the e2e's (a) viewer lost its first keyframe at the 100 ms queue
        // and froze for 2.6-3.2 s.
        let run = run_twcc(5, |_| PathState {
            buffer_ms: 100.0,
            bucket_bytes: 3000.0,
            ..path(600e3)
        });
        check_from("start", &run, 0, |s| s.lost == 0 && s.max_queue_ms < 100.0);
        assert!(run[0].target_bps < 0.85 * 600e3, "{:?}", run[0]);
    }

    #[test]
    fn a_viewer_that_negotiated_transport_feedback_and_sends_none_starts_over_at_1_mbit_s() {
        let t0 = Instant::now();
        let mut e = estimator();
        e.expect_probes();
        assert_eq!(e.estimate(), START_BITRATE_WITH_PROBES as u32);
        e.expect_probes();
        assert_eq!(e.estimate(), START_BITRATE_WITH_PROBES as u32);
        // One report's two blocks (media and retransmissions) are one report.
        e.on_receiver_report(t0 + Duration::from_secs(1), 0, None);
        e.on_receiver_report(t0 + Duration::from_secs(1), 0, None);
        e.on_receiver_report(t0 + Duration::from_millis(1_900), 0, None);
        // (Receiver reports alone climb it 8 % a second meanwhile.)
        assert!(
            e.estimate() < 400_000,
            "reports within 1 s may all come before the first feedback: {}",
            e.estimate()
        );
        e.on_receiver_report(t0 + Duration::from_secs(2), 0, None);
        assert!(
            e.estimate() >= START_BITRATE as u32,
            "two reports and no feedback: {}",
            e.estimate()
        );
        // With feedback first, the reports change nothing about the start.
        let mut e = estimator();
        e.expect_probes();
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_millis(300));
        let fed = e.estimate();
        assert!(fed < START_BITRATE as u32, "{fed}");
        for k in 1..4 {
            e.on_receiver_report(t0 + Duration::from_millis(300 + k), 0, None);
        }
        assert_eq!(e.estimate(), fed);
        // Once feedback came, a late call does not lower the estimate.
        let mut e = estimator();
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_millis(300));
        let fed = e.estimate();
        e.expect_probes();
        assert_eq!(e.estimate(), fed);
        // A floor above the low start holds.
        let mut e = BandwidthEstimator::new(500_000, CEILING);
        e.expect_probes();
        assert_eq!(e.estimate(), 500_000);
    }

    #[test]
    fn a_token_bucket_does_not_fool_probes_into_flooding_a_600k_path() {
        // tbf's 3000-byte bucket (the e2e tests' shaper) lets a 50 ms probe at 1.5 times the
        // estimate through at line rate on a full 600 kbit/s path; believed, it took the
        // estimate to 850k and lost packets at the 100 ms buffer every few seconds.
        let run = run_twcc(40, |_| PathState {
            buffer_ms: 100.0,
            bucket_bytes: 3000.0,
            ..path(600e3)
        });
        check_from("bucket", &run, 7, |s| {
            s.lost == 0 && s.estimate_bps <= 1.05 * 600e3
        });
    }

    #[test]
    fn through_a_token_bucket_a_dip_to_500k_is_followed_without_loss_and_left_within_3_s() {
        // The e2e's (c) path: tbf with a 3000-byte bucket and a 100 ms queue. A probe below
        // the capacity fills the bucket, so the one after it passes at line rate: only the
        // third, which finds the bucket empty, tells the capacity.
        let run = run_twcc(45, |t| PathState {
            buffer_ms: 100.0,
            bucket_bytes: 3000.0,
            ..path(if (10.0..30.0).contains(&t) {
                500e3
            } else {
                3e6
            })
        });
        check_from("dip", &run[..30], 12, |s| {
            s.estimate_bps <= 600e3 && s.lost == 0
        });
        check_from("after", &run, 33, |s| {
            s.target_bps >= 0.9 * f64::from(CEILING)
        });
    }

    #[test]
    fn a_probe_the_path_does_not_carry_leaves_the_estimate_and_waits_before_the_next() {
        let mut e = estimator();
        let t0 = Instant::now();
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_secs(1));
        let at = t0 + Duration::from_millis(1_200);
        let r = e.probe_request(at).expect("a probe");
        let (last, feedback) = probe_feedback(t0, at, &r, 2.0);
        e.probe_sent(r.id, at, last);
        let before = f64::from(e.estimate());
        let now = last + Duration::from_millis(100);
        e.on_transport_feedback(now, &feedback);
        // Not raised to the probe's rate (the feedback's own small increase aside).
        let after = f64::from(e.estimate());
        assert!(after <= 1.02 * before, "{after} after {before}");
        // Feedback goes on without a queue; the next probe waits its time all the same.
        let from = Duration::from_millis(now.duration_since(t0).as_millis() as u64 + 10);
        steady_feedback(&mut e, t0, from, Duration::from_secs(3));
        let later = t0 + from + Duration::from_secs(3);
        assert_eq!(
            e.probe_request(now + Duration::from_secs(2)),
            None,
            "too soon"
        );
        assert!(
            e.probe_request(later.max(now + PROBE_RETRY)).is_some(),
            "retried"
        );
    }

    #[test]
    fn a_probe_lost_on_the_way_makes_the_climb_near_what_was_acknowledged_slow() {
        // In the e2e's (b), the 600 kbit/s viewer's second probe lost packets at the full
        // queue; climbing on (it sent on one layer, so no overuse showed), its estimate went
        // from 530k to 1.3M in a second and its next layer lost 15 %.
        let mut e = estimator();
        let t0 = Instant::now();
        // Up to the probe, so the acknowledged rate stays what the viewer receives.
        steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_millis(1_200));
        let at = t0 + Duration::from_millis(1_250);
        let r = e.probe_request(at).expect("a probe");
        let (last, mut feedback) = probe_feedback(t0, at, &r, 1.0);
        let n = feedback.len();
        for p in &mut feedback[1..=n / 4] {
            p.arrival = None;
        }
        e.probe_sent(r.id, at, last);
        let now = last + Duration::from_millis(100);
        let outcome = e.on_transport_feedback(now, &feedback);
        assert_eq!(outcome, Some(ProbeOutcome::Saturated(None)));
        let before = f64::from(e.estimate());
        let from = Duration::from_millis(now.duration_since(t0).as_millis() as u64 + 10);
        steady_feedback(&mut e, t0, from, Duration::from_millis(1500));
        let after = f64::from(e.estimate());
        // Additive: about a packet per response time (48 kbit/s a second at a 100 ms RTT).
        assert!(
            after <= before + 100e3,
            "{after:.0} after {before:.0}: the climb accelerated"
        );
        assert!(
            after > before,
            "{after:.0} after {before:.0}: no climb at all"
        );
    }

    #[test]
    fn a_burst_above_a_known_capacity_leaves_the_climb_additive_a_lasting_excess_does_not() {
        // In the e2e's (a), a 500 ms window holding a keyframe (and a probe) acknowledged more
        // than the 600 kbit/s path's capacity bound: forgotten, the climb went from 527k to
        // 755k in a second and lost packets at the queue.
        let t0 = Instant::now();
        let known = |e: &mut BandwidthEstimator, at: Instant| {
            // 960 kbit/s acknowledged at an overuse, the estimate just below it.
            e.capacity_seen(at, 960e3);
            e.rate = 900e3;
        };
        let climb = |bursts: Duration| {
            let mut e = estimator();
            steady_feedback(&mut e, t0, Duration::ZERO, Duration::from_millis(1_000));
            known(&mut e, t0 + Duration::from_millis(1_000));
            // 1500-byte packets at the same times: 1.2 Mbit/s acknowledged, above the bound.
            sized_feedback(&mut e, t0, Duration::from_millis(1_000), bursts, 1500);
            let before = f64::from(e.estimate());
            steady_feedback(
                &mut e,
                t0,
                Duration::from_millis(1_000) + bursts,
                Duration::from_millis(1_000),
            );
            (before, f64::from(e.estimate()), e.capacity.is_some())
        };
        let (before, after, kept) = climb(Duration::from_millis(300));
        assert!(kept, "a 300 ms burst forgot the capacity");
        assert!(
            after > before && after <= before + 100e3,
            "{after:.0} after {before:.0}: not an additive climb"
        );
        let (before, after, kept) = climb(Duration::from_millis(1_500));
        assert!(!kept, "1.5 s above the bound kept the capacity");
        assert!(
            after > before + 100e3,
            "{after:.0} after {before:.0}: still additive"
        );
    }

    #[test]
    fn with_probes_the_climb_stays_near_what_the_viewer_is_sent_without_them_it_goes_on() {
        let t0 = Instant::now();
        let climb = |probes: bool| {
            let mut e = estimator();
            if probes {
                e.expect_probes();
            }
            // 600-byte packets every 10 ms: a viewer sent 480 kbit/s (one layer of three),
            // with no queue (no overuse to stop the climb).
            sized_feedback(&mut e, t0, Duration::ZERO, Duration::from_secs(4), 600);
            f64::from(e.estimate())
        };
        let held = climb(true);
        let limit = ACKED_CLIMB_LIMIT * 480e3 + ACKED_CLIMB_MARGIN;
        assert!(
            // (The window counts its first packet too: 490k acknowledged.)
            (0.9 * limit..=1.03 * limit).contains(&held),
            "with probes: {held:.0}, limit {limit:.0}"
        );
        let free = climb(false);
        assert!(free > 2.0 * limit, "without probes: {free:.0}");
    }

    #[test]
    fn converges_below_a_600k_bottleneck_without_standing_queue_or_loss() {
        let run = run_twcc(25, |_| path(600e3));
        check_from("600k", &run, 8, |s| {
            (350e3..=650e3).contains(&s.estimate_bps)
                && s.target_bps <= 600e3
                && s.max_queue_ms < 100.0
                && s.lost == 0
        });
        let mean: f64 = run[5..].iter().map(|s| s.delivered_bps).sum::<f64>() / 20.0;
        assert!(mean > 0.6 * 600e3, "link used: {mean:.0} bit/s");
    }

    #[test]
    fn probes_take_it_from_the_start_rate_to_the_ceiling_on_a_fast_path_within_1_s() {
        let run = run_twcc(15, |_| path(50e6));
        check_from("fast", &run, 1, |s| {
            s.estimate_bps >= f64::from(CEILING) && s.target_bps >= 0.999 * f64::from(CEILING)
        });
    }

    #[test]
    fn a_dip_to_500k_is_followed_down_and_left_within_5_s() {
        let run = run_twcc(45, |t| {
            path(if (10.0..30.0).contains(&t) {
                500e3
            } else {
                3e6
            })
        });
        check_from("before", &run[..10], 4, |s| {
            s.target_bps >= 0.9 * f64::from(CEILING)
        });
        // A probe the path cannot carry, sent right after a keyframe (the estimate learns of
        // the keyframe's queue a feedback interval and a round trip late), queues up to a
        // probe's worth more than the keyframe alone: 100 ms once in this run.
        check_from("dip", &run[..30], 12, |s| {
            s.estimate_bps <= 600e3 && s.max_queue_ms < 125.0 && s.lost == 0
        });
        check_from("after", &run, 35, |s| {
            s.target_bps >= 0.9 * f64::from(CEILING)
        });
    }

    /// Seconds from the end of a 20 s dip to 500 kbit/s (3 Mbit/s before and after) until the
    /// encoder's target is back at 90 % of the ceiling, for each of 64 moments of the dip's end
    /// (every 125 ms over 8 s: a whole period of the saw-tooth near the dip's capacity, whose
    /// phase at the end decides between an additive and a multiplicative climb). The encoder
    /// makes 75 % of its target, as openh264 does on the test pattern. Sorted.
    fn recoveries_after_a_dip() -> Vec<f64> {
        let ceiling = f64::from(CEILING);
        let mut backs: Vec<f64> = (0..64)
            .map(|k| {
                let end = 30.0 + f64::from(k) * 0.125;
                let (_, targets) =
                    linksim::run_traced(&mut estimator(), ceiling, 0.75, Feedback::Twcc, 45, |t| {
                        path(if (10.0..end).contains(&t) { 500e3 } else { 3e6 })
                    });
                targets
                    .iter()
                    .find(|(t, target)| *t >= end && *target >= 0.9 * ceiling)
                    .map_or(f64::INFINITY, |(t, _)| t - end)
            })
            .collect();
        backs.sort_by(f64::total_cmp);
        backs
    }

    #[test]
    fn after_a_dip_the_target_is_back_within_3_5_s_whatever_the_phase_of_the_saw_tooth() {
        // Measured with probes: median 1.875 s, worst 3.25 s (the next probe comes at most
        // 2.5 s after the last one the dip did not carry). Without probes the climb alone
        // took a median 4.0 s, at worst 5.5 s. The e2e's (c) adds the encoder's rate control
        // and the viewer's 1 s windows.
        let backs = recoveries_after_a_dip();
        eprintln!("target back after (s): {backs:?}");
        let (median, worst) = (backs[backs.len() / 2], backs[backs.len() - 1]);
        assert!(median <= 2.5, "median recovery {median:.3} s");
        assert!(worst <= 3.5, "worst recovery {worst:.3} s");
    }

    #[test]
    fn two_percent_random_loss_costs_no_rate() {
        let run = run_twcc(20, |_| PathState {
            loss: 0.02,
            ..path(5e6)
        });
        check_from("2% loss", &run, 4, |s| {
            s.target_bps >= 0.9 * f64::from(CEILING)
        });
    }

    #[test]
    fn heavy_random_loss_backs_off() {
        let run = run_twcc(10, |_| PathState {
            loss: 0.25,
            ..path(5e6)
        });
        check_from("25% loss", &run, 4, |s| {
            s.estimate_bps < 0.5 * f64::from(CEILING)
        });
    }

    #[test]
    fn receiver_reports_alone_keep_loss_bounded() {
        let mut e = estimator();
        let run = linksim::run(
            &mut e,
            f64::from(CEILING),
            Feedback::ReceiverReports,
            30,
            |_| path(600e3),
        );
        let (lost, sent) = run[5..]
            .iter()
            .fold((0, 0), |(l, n), s| (l + s.lost, n + s.sent));
        if f64::from(lost) > 0.1 * f64::from(sent) {
            show("rr", &run);
            panic!("{lost} of {sent} packets lost with receiver reports only");
        }
        check_from("rr", &run, 5, |s| s.estimate_bps < 1.2e6);
    }

    #[test]
    fn remb_caps_the_estimate() {
        let mut e = estimator();
        let most = (f64::from(CEILING) / VIDEO_SHARE) as u32;
        assert_eq!(e.estimate(), START_BITRATE as u32);
        e.on_remb(400_000);
        assert_eq!(e.estimate(), 400_000);
        e.on_remb(50_000);
        assert_eq!(e.estimate(), FLOOR, "never below the floor");
        e.on_remb(10_000_000);
        assert_eq!(e.estimate(), START_BITRATE as u32);
        e.set_bounds(FLOOR, 700_000);
        assert_eq!(e.estimate(), most.min((700_000.0 / VIDEO_SHARE) as u32));
        assert_eq!(e.stats(Instant::now()).remb_bps, Some(10_000_000));
    }

    #[test]
    fn feedback_that_stops_decays_the_estimate() {
        let t0 = Instant::now();
        let mut e = estimator();
        assert_eq!(e.poll_timeout(), None, "no timer before any feedback");
        let packets: Vec<_> = (0..10u64)
            .map(|i| PacketResult {
                departure: t0 + Duration::from_millis(i * 10),
                arrival: Some(Duration::from_millis(500 + i * 10)),
                size: 1200,
            })
            .collect();
        e.on_transport_feedback(t0 + Duration::from_millis(120), &packets);
        let before = e.estimate();
        let due = e.poll_timeout().unwrap();
        assert_eq!(due, t0 + Duration::from_millis(1120));
        e.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(e.estimate(), before);
        e.handle_timeout(due);
        assert!(e.estimate() < before);
        let next = e.poll_timeout().unwrap();
        assert!(next > due, "the deadline advances");
        for _ in 0..40 {
            let t = e.poll_timeout().unwrap();
            e.handle_timeout(t);
        }
        assert_eq!(e.estimate(), FLOOR);
    }

    #[test]
    fn a_path_is_clear_after_a_second_at_the_top_confirmed_by_feedback() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        // A low ceiling: the estimate starts at the top, but nothing confirms the path yet.
        let mut e = BandwidthEstimator::new(FLOOR, 500_000);
        assert_eq!(e.estimate(), (500_000.0 / VIDEO_SHARE) as u32);
        assert!(!e.path_is_clear(t0), "no feedback yet");
        steady_feedback(&mut e, t0, ms(0), ms(800));
        assert!(
            !e.path_is_clear(t0 + ms(900)),
            "under a second of feedback at the top"
        );
        steady_feedback(&mut e, t0, ms(800), ms(600));
        assert!(e.path_is_clear(t0 + ms(1_500)));
        // Feedback that stops: the timeout's cut ends it.
        let due = e.poll_timeout().unwrap();
        e.handle_timeout(due);
        assert!(!e.path_is_clear(due + ms(1)));
        // A ceiling raised above the estimate: the path has not carried the new top.
        let mut e = BandwidthEstimator::new(FLOOR, 500_000);
        steady_feedback(&mut e, t0, ms(0), ms(1_500));
        assert!(e.path_is_clear(t0 + ms(1_500)));
        e.set_bounds(FLOOR, 2_000_000);
        assert!(!e.path_is_clear(t0 + ms(1_500)));
    }

    #[test]
    fn a_climbing_estimate_is_not_a_clear_path() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut e = estimator();
        steady_feedback(&mut e, t0, ms(0), ms(1_500));
        assert!(f64::from(e.estimate()) < f64::from(CEILING) / VIDEO_SHARE);
        assert!(!e.path_is_clear(t0 + ms(1_600)));
    }

    #[test]
    fn set_bitrate_moves_the_bounds() {
        let mut e = estimator();
        e.set_bounds(FLOOR, 500_000);
        assert_eq!(e.estimate(), (500_000.0 / VIDEO_SHARE) as u32);
        e.set_bounds(FLOOR, 5_000_000);
        assert_eq!(
            e.estimate(),
            (500_000.0 / VIDEO_SHARE) as u32,
            "a higher ceiling is climbed to, not jumped to"
        );
        e.set_bounds(FLOOR, 100_000);
        e.on_remb(1);
        assert_eq!(
            e.estimate(),
            100_000,
            "a floor above the ceiling is the ceiling"
        );
    }
}
