//! The encoder's target over its viewers: the highest rate at least half of them can take, between the floor and the ceiling.
//!
//! One encoder serves every viewer, so its rate is a choice between them. Following the
//! slowest would let one weak link lower everyone's picture; following the fastest would leave
//! most of them on reduced layers. The target is the rate that at least half of the viewers
//! (rounded up) can take whole: with one viewer its own rate, with two the better one, with
//! three the middle one. Viewers below it get the temporal layers that fit
//! (`src/viewer/layers.rs`). A viewer without an estimate yet counts as able to take the
//! ceiling. The result is clamped to `[floor, ceiling]` (`encoder.min_bitrate`,
//! `encoder.bitrate`/`set-bitrate`).

/// `usable`: what each viewer can take for video, bits per second (`None`: no estimate yet).
pub(crate) fn encoder_target(usable: &[Option<u32>], floor: u32, ceiling: u32) -> u32 {
    let floor = floor.min(ceiling);
    let mut rates: Vec<u32> = usable.iter().map(|u| u.unwrap_or(ceiling)).collect();
    if rates.is_empty() {
        return ceiling;
    }
    rates.sort_unstable_by(|a, b| b.cmp(a));
    let at_least_half = rates.len().div_ceil(2);
    rates[at_least_half - 1].clamp(floor, ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: u32 = 150_000;
    const CEILING: u32 = 2_000_000;

    #[test]
    fn one_viewer_sets_the_rate_within_the_bounds() {
        assert_eq!(encoder_target(&[Some(500_000)], FLOOR, CEILING), 500_000);
        assert_eq!(encoder_target(&[Some(5_000_000)], FLOOR, CEILING), CEILING);
        assert_eq!(encoder_target(&[Some(10_000)], FLOOR, CEILING), FLOOR);
        assert_eq!(encoder_target(&[None], FLOOR, CEILING), CEILING);
        assert_eq!(encoder_target(&[], FLOOR, CEILING), CEILING);
    }

    #[test]
    fn a_weak_viewer_does_not_pull_the_others_down() {
        // Two: the better one wins (the weak one gets the lower layers).
        assert_eq!(
            encoder_target(&[Some(510_000), Some(9_000_000)], FLOOR, CEILING),
            CEILING
        );
        // Three: the middle one.
        assert_eq!(
            encoder_target(
                &[Some(510_000), Some(1_200_000), Some(9_000_000)],
                FLOOR,
                CEILING
            ),
            1_200_000
        );
        // Most are weak: the rate most can take.
        assert_eq!(
            encoder_target(
                &[Some(400_000), Some(600_000), Some(700_000), None],
                FLOOR,
                CEILING
            ),
            700_000
        );
    }

    #[test]
    fn a_floor_above_the_ceiling_is_the_ceiling() {
        assert_eq!(encoder_target(&[Some(10_000)], 500_000, 300_000), 300_000);
    }
}
