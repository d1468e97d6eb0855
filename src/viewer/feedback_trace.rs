//! The text form of what a viewer's bandwidth estimate hears (its bounds and the viewer's feedback): its link writes it to the log at trace level, and tests replay networks recorded that way through the estimator.
//!
//! Recording: run rtcam with `RTCAM__LOG__LEVEL="info,rtcam::viewer::feedback_trace=trace"`
//! (one line per feedback packet: for a test bench, not for a device in use) and keep what
//! follows `rtcam::viewer::feedback_trace: ` on one session's lines (each is in its session's
//! span), e.g. `grep 'session{id=<id> .*feedback_trace: ' rtcam.log | sed 's/.*feedback_trace: //'`.
//! Lines, times in microseconds since the link's first traced input:
//! * `bounds <floor> <ceiling>`: the estimate's floor and ceiling (at the start, and after
//!   `set-bitrate`);
//! * `probes`: the answer negotiated what probes need ([`BandwidthEstimator::expect_probes`]);
//! * `twcc <at> <departure>:<arrival>:<bytes> ...`: transport-wide feedback, each packet
//!   it reported with its departure (device clock, the trace's origin) and arrival (viewer
//!   clock, any origin; `-`: lost);
//! * `rr <at> <fraction lost of 256> <round trip or ->`: a receiver report block;
//! * `remb <at> <bits per second>`.
//!
//! Lines starting with `#` are comments.

use std::fmt;
use std::time::{Duration, Instant};

use super::bandwidth::PacketResult;

/// The log target of the trace lines.
pub(crate) const TARGET: &str = "rtcam::viewer::feedback_trace";

/// A trace's clock: microseconds since the first input traced (departures reported later may
/// be earlier: negative).
#[derive(Debug, Default)]
pub(crate) struct TraceClock {
    origin: Option<Instant>,
}

impl TraceClock {
    fn micros(&mut self, t: Instant) -> i64 {
        let origin = *self.origin.get_or_insert(t);
        match t.checked_duration_since(origin) {
            Some(after) => after.as_micros() as i64,
            None => -(origin.saturating_duration_since(t).as_micros() as i64),
        }
    }
}

/// One packet of transport-wide feedback, as a trace holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TracedPacket {
    pub departure: i64,
    pub arrival: Option<u64>,
    pub size: usize,
}

/// One input of the estimate, as a trace line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    Bounds {
        floor: u32,
        ceiling: u32,
    },
    ExpectProbes,
    Transport {
        at: i64,
        packets: Vec<TracedPacket>,
    },
    ReceiverReport {
        at: i64,
        fraction_lost: u8,
        rtt: Option<u64>,
    },
    Remb {
        at: i64,
        bps: u64,
    },
}

impl Input {
    pub fn transport(clock: &mut TraceClock, now: Instant, packets: &[PacketResult]) -> Self {
        let at = clock.micros(now);
        Input::Transport {
            at,
            packets: packets
                .iter()
                .map(|p| TracedPacket {
                    departure: clock.micros(p.departure),
                    arrival: p.arrival.map(|a| a.as_micros() as u64),
                    size: p.size,
                })
                .collect(),
        }
    }

    pub fn receiver_report(
        clock: &mut TraceClock,
        now: Instant,
        fraction_lost: u8,
        rtt: Option<Duration>,
    ) -> Self {
        Input::ReceiverReport {
            at: clock.micros(now),
            fraction_lost,
            rtt: rtt.map(|r| r.as_micros() as u64),
        }
    }

    pub fn remb(clock: &mut TraceClock, now: Instant, bps: u64) -> Self {
        Input::Remb {
            at: clock.micros(now),
            bps,
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Bounds { floor, ceiling } => write!(f, "bounds {floor} {ceiling}"),
            Input::ExpectProbes => write!(f, "probes"),
            Input::Transport { at, packets } => {
                write!(f, "twcc {at}")?;
                for p in packets {
                    match p.arrival {
                        Some(a) => write!(f, " {}:{a}:{}", p.departure, p.size)?,
                        None => write!(f, " {}:-:{}", p.departure, p.size)?,
                    }
                }
                Ok(())
            }
            Input::ReceiverReport {
                at,
                fraction_lost,
                rtt,
            } => match rtt {
                Some(rtt) => write!(f, "rr {at} {fraction_lost} {rtt}"),
                None => write!(f, "rr {at} {fraction_lost} -"),
            },
            Input::Remb { at, bps } => write!(f, "remb {at} {bps}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod replay {
    //! Reading traces back and replaying them through a [`BandwidthEstimator`].

    use super::*;
    use crate::viewer::bandwidth::BandwidthEstimator;

    fn number<T: std::str::FromStr>(word: Option<&str>, what: &str) -> Result<T, String> {
        let word = word.ok_or_else(|| format!("{what} is missing"))?;
        word.parse()
            .map_err(|_| format!("{what} is not a number: {word:?}"))
    }

    fn optional(word: Option<&str>, what: &str) -> Result<Option<u64>, String> {
        match word {
            Some("-") => Ok(None),
            w => number(w, what).map(Some),
        }
    }

    fn packet(word: &str) -> Result<TracedPacket, String> {
        let mut parts = word.split(':');
        let p = TracedPacket {
            departure: number(parts.next(), "departure")?,
            arrival: optional(parts.next(), "arrival")?,
            size: number(parts.next(), "size")?,
        };
        if parts.next().is_some() {
            return Err(format!("a packet has more than three parts: {word:?}"));
        }
        Ok(p)
    }

    pub(crate) fn parse_line(line: &str) -> Result<Input, String> {
        let mut words = line.split_ascii_whitespace();
        let input = match words.next() {
            Some("bounds") => Input::Bounds {
                floor: number(words.next(), "floor")?,
                ceiling: number(words.next(), "ceiling")?,
            },
            Some("probes") => Input::ExpectProbes,
            Some("twcc") => Input::Transport {
                at: number(words.next(), "time")?,
                packets: words.by_ref().map(packet).collect::<Result<_, _>>()?,
            },
            Some("rr") => Input::ReceiverReport {
                at: number(words.next(), "time")?,
                fraction_lost: number(words.next(), "fraction lost")?,
                rtt: optional(words.next(), "round trip")?,
            },
            Some("remb") => Input::Remb {
                at: number(words.next(), "time")?,
                bps: number(words.next(), "bit rate")?,
            },
            other => return Err(format!("unknown line kind {other:?}")),
        };
        if let Some(extra) = words.next() {
            return Err(format!("unexpected {extra:?} at the end"));
        }
        Ok(input)
    }

    /// A trace's inputs, in order; an error names the line.
    pub(crate) fn parse(text: &str) -> Result<Vec<Input>, String> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|(i, l)| parse_line(l).map_err(|e| format!("line {}: {e}", i + 1)))
            .collect()
    }

    /// When a timed input came (the bounds and the probes line have no time).
    fn time_of(input: &Input) -> Option<i64> {
        match input {
            Input::Transport { at, .. }
            | Input::ReceiverReport { at, .. }
            | Input::Remb { at, .. } => Some(*at),
            Input::Bounds { .. } | Input::ExpectProbes => None,
        }
    }

    /// What the estimate was after an input: seconds since the trace's origin, bits per
    /// second.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Sample {
        pub at_s: f64,
        pub estimate: u32,
    }

    /// Feeds `inputs` to a fresh estimator in order, on a clock that starts at the trace's
    /// origin, with its timeouts run in between as the link runs them. Probes it asks for
    /// are given up at once: the recording's own probe packets are in its feedback already,
    /// as the path treated them, and new ones cannot be added to a recorded path.
    pub(crate) fn replay(inputs: &[Input]) -> Vec<Sample> {
        // Departures may precede the first input: start the clock early enough for any.
        let earliest = inputs
            .iter()
            .flat_map(|i| {
                let departures = match i {
                    Input::Transport { packets, .. } => packets.as_slice(),
                    _ => &[],
                };
                time_of(i)
                    .into_iter()
                    .chain(departures.iter().map(|p| p.departure))
            })
            .min()
            .unwrap_or(0)
            .min(0);
        let base = Instant::now();
        let time = |us: i64| base + Duration::from_micros((us - earliest) as u64);
        let mut estimator: Option<BandwidthEstimator> = None;
        let mut probes = false;
        let mut samples = Vec::new();
        for input in inputs {
            if let Input::Bounds { floor, ceiling } = input {
                match &mut estimator {
                    Some(e) => e.set_bounds(*floor, *ceiling),
                    None => estimator = Some(BandwidthEstimator::new(*floor, *ceiling)),
                }
                continue;
            }
            let e = estimator
                .as_mut()
                .expect("a trace starts with its bounds line");
            let Some(at) = time_of(input) else {
                // The one other untimed input.
                probes = true;
                e.expect_probes();
                continue;
            };
            let now = time(at);
            while let Some(due) = e.poll_timeout().filter(|d| *d <= now) {
                e.handle_timeout(due);
            }
            if probes && let Some(request) = e.probe_request(now) {
                e.probe_abandoned(request.id, now);
            }
            match input {
                Input::Transport { packets, .. } => {
                    let results: Vec<PacketResult> = packets
                        .iter()
                        .map(|p| PacketResult {
                            departure: time(p.departure),
                            arrival: p.arrival.map(Duration::from_micros),
                            size: p.size,
                        })
                        .collect();
                    e.on_transport_feedback(now, &results);
                }
                Input::ReceiverReport {
                    fraction_lost, rtt, ..
                } => e.on_receiver_report(now, *fraction_lost, rtt.map(Duration::from_micros)),
                Input::Remb { bps, .. } => e.on_remb(*bps),
                Input::Bounds { .. } | Input::ExpectProbes => {} // untimed: handled above
            }
            samples.push(Sample {
                at_s: at as f64 / 1e6,
                estimate: e.estimate(),
            });
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use super::replay::{parse, parse_line};
    use super::*;

    #[test]
    fn lines_read_back_as_written() {
        let t0 = Instant::now();
        let mut clock = TraceClock::default();
        let inputs = [
            Input::Bounds {
                floor: 150_000,
                ceiling: 2_000_000,
            },
            Input::ExpectProbes,
            Input::receiver_report(&mut clock, t0, 3, Some(Duration::from_millis(41))),
            Input::transport(
                &mut clock,
                t0 + Duration::from_millis(50),
                &[
                    PacketResult {
                        // Before the origin: a negative time.
                        departure: t0 - Duration::from_millis(5),
                        arrival: Some(Duration::from_micros(7_000_250)),
                        size: 1200,
                    },
                    PacketResult {
                        departure: t0 + Duration::from_millis(1),
                        arrival: None,
                        size: 300,
                    },
                ],
            ),
            Input::remb(&mut clock, t0 + Duration::from_millis(60), 640_000),
            Input::receiver_report(&mut clock, t0 + Duration::from_secs(1), 0, None),
        ];
        let text: String = inputs.iter().map(|i| format!("{i}\n")).collect();
        assert_eq!(
            text,
            "bounds 150000 2000000\nprobes\nrr 0 3 41000\n\
             twcc 50000 -5000:7000250:1200 1000:-:300\nremb 60000 640000\nrr 1000000 0 -\n"
        );
        assert_eq!(parse(&format!("# a comment\n\n{text}")).unwrap(), inputs);
    }

    #[test]
    fn a_malformed_line_is_an_error_that_names_it() {
        for (line, why) in [
            ("twcc 5 1:2", "size is missing"),
            ("twcc 5 1:2:3:4", "more than three parts"),
            ("twcc x", "time is not a number"),
            ("rr 5 300 -", "fraction lost is not a number"),
            ("remb 5 10 11", "unexpected"),
            ("nack 5", "unknown line kind"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(why), "{line:?}: {err}");
        }
        let err = parse("bounds 1 2\nremb x 1\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}

#[cfg(test)]
mod recorded {
    //! The estimator against networks recorded end to end: the viewer (aiortc, sending TWCC
    //! feedback every 100 ms) behind tests/e2e/netem.py paths, recorded from the scenarios of
    //! tests/e2e/test_network.py with adaptation on (each trace's first lines say how). The
    //! replay is open loop: the feedback is what the device's own sending met, so these check
    //! how the estimate reads real feedback, not the closed loop (test_network and
    //! `linksim` do that).

    use super::Input;
    use super::replay::{Sample, parse, replay};

    /// The most the 2 Mbit/s ceiling lets the estimate reach (the ceiling over the video's
    /// share).
    const TOP: f64 = 2_352_941.0;

    fn run(text: &str) -> Vec<Sample> {
        let samples = replay(&parse(text).expect("the trace parses"));
        assert!(samples.len() > 100, "{} samples", samples.len());
        samples
    }

    fn within(samples: &[Sample], from_s: f64, to_s: f64) -> Vec<f64> {
        let out: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_s >= from_s && s.at_s < to_s)
            .map(|s| f64::from(s.estimate))
            .collect();
        assert!(!out.is_empty(), "no samples in {from_s}-{to_s} s");
        out
    }

    fn share(values: &[f64], pred: impl Fn(f64) -> bool) -> f64 {
        values.iter().filter(|v| pred(**v)).count() as f64 / values.len() as f64
    }

    fn first_at(samples: &[Sample], from_s: f64, pred: impl Fn(f64) -> bool) -> Option<f64> {
        samples
            .iter()
            .find(|s| s.at_s >= from_s && pred(f64::from(s.estimate)))
            .map(|s| s.at_s)
    }

    fn median(values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    fn behind_600k_the_estimate_stays_near_the_path() {
        let samples = run(include_str!("traces/a-600k.trace"));
        let steady = within(&samples, 5.0, f64::INFINITY);
        let m = median(&steady);
        assert!((420_000.0..=640_000.0).contains(&m), "median {m}");
        // Probes read above the path now and then; it never lasts.
        let above = share(&steady, |e| e > 1.15 * 600_000.0);
        assert!(
            above <= 0.1,
            "{:.0} % of the time above 690k",
            100.0 * above
        );
        let low = steady.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(low >= 300_000.0, "fell to {low}");
    }

    #[test]
    fn a_dip_to_500k_is_followed_down_and_left_after_it() {
        // The path: 3 Mbit/s, then 500 kbit/s from 6.64 s to 26.64 s of the trace.
        let (dip, recovery) = (6.64, 26.64);
        let samples = run(include_str!("traces/c-dip.trace"));
        let before = within(&samples, 5.0, dip);
        assert!(
            before.iter().all(|e| *e >= 0.95 * TOP),
            "before the dip: {before:?}"
        );
        let down = first_at(&samples, dip, |e| e <= 700_000.0).expect("never followed the dip");
        assert!(down <= dip + 1.5, "down at {down:.1} s");
        let during = within(&samples, dip + 2.0, recovery);
        let m = median(&during);
        assert!(
            (300_000.0..=550_000.0).contains(&m),
            "median in the dip {m}"
        );
        let above = share(&during, |e| e > 1.3 * 500_000.0);
        assert!(above <= 0.1, "{:.0} % of the dip above 650k", 100.0 * above);
        let high = during.iter().copied().fold(0.0, f64::max);
        assert!(high <= 1_000_000.0, "{high} in the dip");
        let back =
            first_at(&samples, recovery, |e| e >= 0.95 * TOP).expect("never back at the top");
        assert!(back <= recovery + 5.0, "back at the top at {back:.1} s");
    }

    #[test]
    fn a_browsers_feedback_on_a_free_path_never_reads_as_congestion() {
        // Chromium's own feedback (its cadence, its 250 us arrival units, its receive timing)
        // on a path with no limit: nothing in it may lower the estimate. The only fall is the
        // test's set-bitrate to 300 kbit/s, after which the estimate is at the new top.
        let inputs = parse(include_str!("traces/chromium-loopback.trace")).expect("parses");
        let lowered = inputs
            .iter()
            .position(|i| {
                matches!(
                    i,
                    Input::Bounds {
                        ceiling: 300_000,
                        ..
                    }
                )
            })
            .expect("the trace has the set-bitrate");
        let before = replay(&inputs[..lowered]);
        assert!(before.len() > 50, "{} samples", before.len());
        for pair in before.windows(2) {
            assert!(
                pair[1].estimate >= pair[0].estimate,
                "fell from {} to {} at {:.2} s",
                pair[0].estimate,
                pair[1].estimate,
                pair[1].at_s
            );
        }
        assert!(
            before.last().is_some_and(|s| s.estimate > 600_000),
            "climbed to {:?}",
            before.last()
        );
        let all = replay(&inputs);
        let after = &all[before.len()..];
        assert!(after.len() > 20, "{} samples after", after.len());
        let top = (300_000.0 / crate::viewer::bandwidth::VIDEO_SHARE) as u32;
        assert!(after.iter().all(|s| s.estimate == top), "{after:?}");
    }

    #[test]
    fn two_percent_random_loss_costs_no_rate() {
        let samples = run(include_str!("traces/d-loss.trace"));
        let top = first_at(&samples, 0.0, |e| e >= 0.95 * TOP).expect("never at the top");
        assert!(top <= 6.0, "at the top at {top:.1} s");
        let after = within(&samples, top, f64::INFINITY);
        assert!(after.iter().all(|e| *e >= 0.95 * TOP), "{after:?}");
    }
}
