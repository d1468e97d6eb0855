//! Rate limits for log lines that remote input or a repeating fault can cause: a few lines, then one summary per interval.

use std::time::{Duration, Instant};

/// Lets `burst` lines through per `interval`; the first line after a quiet spell reports how
/// many were held back. Pure: the caller passes the clock.
#[derive(Debug, Clone)]
pub(crate) struct LogLimiter {
    interval: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst: burst.max(1),
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines held back since the last
    /// one logged (log it as a field); `None` when this line should be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_interval_with_the_count_held_back() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10), 3);
        let allowed: Vec<_> = (0..100).map(|_| l.allow(t0)).collect();
        assert_eq!(allowed.iter().filter(|a| a.is_some()).count(), 3);
        assert_eq!(allowed[0], Some(0));
        assert_eq!(l.allow(t0 + Duration::from_secs(5)), None);
        // Next window: the first line carries what was held back (97 + 1).
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(98));
        assert_eq!(l.allow(t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn clock_going_backwards_keeps_the_window() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut l = LogLimiter::new(Duration::from_secs(1), 1);
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 - Duration::from_secs(3)), None);
    }
}
