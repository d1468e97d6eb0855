//! The replay cache (docs/protocol.md §9.4 step 5): digests of accepted signed messages, bounded, with explicit time.

use std::collections::{BTreeSet, HashMap};

use super::AuthError;

/// Remembers each accepted message until the clock passes `ts + 2 * max_skew`: a message
/// is stale after `ts + max_skew` anyway, and the second window keeps a backward clock step
/// of up to `max_skew` from reopening replays.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    retain_ms: u64,
    expiry_by_digest: HashMap<[u8; 32], u64>,
    by_expiry: BTreeSet<(u64, [u8; 32])>,
}

impl ReplayCache {
    pub fn new(capacity: usize, max_skew_ms: u64) -> Self {
        Self {
            capacity,
            retain_ms: max_skew_ms.saturating_mul(2),
            expiry_by_digest: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.expiry_by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry_by_digest.is_empty()
    }

    /// Forgets every entry whose time has passed.
    fn prune(&mut self, now_ms: u64) {
        while let Some(&(expiry, digest)) = self.by_expiry.first() {
            if expiry > now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.expiry_by_digest.remove(&digest);
        }
    }

    /// True when `digest` was accepted and is still remembered at `now_ms`.
    pub fn contains(&self, digest: &[u8; 32], now_ms: u64) -> bool {
        self.expiry_by_digest
            .get(digest)
            .is_some_and(|expiry| *expiry > now_ms)
    }

    /// Refuses a digest seen before ([`AuthError::Replayed`]); otherwise remembers it. A cache
    /// full of unexpired entries refuses with [`AuthError::ReplayCacheFull`] instead of
    /// forgetting one early.
    pub fn check_and_insert(
        &mut self,
        digest: [u8; 32],
        ts_ms: u64,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        self.prune(now_ms);
        if self.expiry_by_digest.contains_key(&digest) {
            return Err(AuthError::Replayed);
        }
        if self.expiry_by_digest.len() >= self.capacity {
            return Err(AuthError::ReplayCacheFull);
        }
        let expiry = ts_ms.saturating_add(self.retain_ms);
        self.expiry_by_digest.insert(digest, expiry);
        self.by_expiry.insert((expiry, digest));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_digest_is_accepted_once() {
        let mut c = ReplayCache::new(10, 60_000);
        assert_eq!(c.check_and_insert(d(1), 1_000, 1_000), Ok(()));
        assert_eq!(
            c.check_and_insert(d(1), 1_000, 1_001),
            Err(AuthError::Replayed)
        );
        assert_eq!(c.check_and_insert(d(2), 1_000, 1_001), Ok(()));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn entries_live_for_two_windows_after_their_timestamp() {
        let mut c = ReplayCache::new(10, 60_000);
        c.check_and_insert(d(1), 1_000, 1_000).unwrap();
        assert_eq!(
            c.check_and_insert(d(1), 1_000, 120_999),
            Err(AuthError::Replayed)
        );
        // At ts + 2 windows it is forgotten (and the message would be stale anyway).
        assert_eq!(c.check_and_insert(d(1), 1_000, 121_000), Ok(()));
        // A future-dated message is kept until its own ts + 2 windows.
        let mut c = ReplayCache::new(10, 60_000);
        c.check_and_insert(d(2), 61_000, 1_000).unwrap();
        assert_eq!(
            c.check_and_insert(d(2), 61_000, 180_999),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn a_backward_clock_step_within_the_window_does_not_reopen_replays() {
        let mut c = ReplayCache::new(10, 60_000);
        c.check_and_insert(d(1), 100_000, 100_000).unwrap();
        // Time moves on past ts + window: the message is stale but still remembered...
        c.check_and_insert(d(9), 200_000, 200_000).unwrap();
        // ...so after the clock steps back 60 s it is fresh again, and still refused.
        assert_eq!(
            c.check_and_insert(d(1), 100_000, 140_000),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn a_full_cache_refuses_instead_of_forgetting() {
        let mut c = ReplayCache::new(2, 60_000);
        c.check_and_insert(d(1), 0, 0).unwrap();
        c.check_and_insert(d(2), 10, 10).unwrap();
        assert_eq!(
            c.check_and_insert(d(3), 20, 20),
            Err(AuthError::ReplayCacheFull)
        );
        assert_eq!(c.check_and_insert(d(1), 0, 20), Err(AuthError::Replayed));
        // Once the oldest expires there is room again.
        assert_eq!(c.check_and_insert(d(3), 120_000, 120_000), Ok(()));
        assert_eq!(c.len(), 2, "d(1) expired, d(2) and d(3) remain");
        assert!(!c.is_empty());
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let mut c = ReplayCache::new(4, u64::MAX);
        c.check_and_insert(d(1), u64::MAX, 0).unwrap();
        assert_eq!(
            c.check_and_insert(d(1), u64::MAX, u64::MAX - 1),
            Err(AuthError::Replayed)
        );
    }
}
