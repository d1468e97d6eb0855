//! BT.601 video range (Y 16-235, Cb/Cr 16-240) ↔ JFIF full range (0-255) lookup tables.

/// Per-sample lookup tables for one direction of range conversion.
pub struct RangeLuts {
    pub luma: [u8; 256],
    pub chroma: [u8; 256],
}

impl RangeLuts {
    /// Limited (video) range to full (JFIF) range: for JPEG snapshots of encoder pictures.
    pub fn limited_to_full() -> Self {
        Self::build(
            |y| (y - 16.0) * 255.0 / 219.0,
            |c| (c - 128.0) * 255.0 / 224.0 + 128.0,
        )
    }

    /// Full (JFIF) range to limited (video) range: the reference the MJPEG path's arithmetic
    /// is tested against.
    #[cfg(test)]
    pub fn full_to_limited() -> Self {
        Self::build(
            |y| 16.0 + y * 219.0 / 255.0,
            |c| 128.0 + (c - 128.0) * 224.0 / 255.0,
        )
    }

    fn build(luma_of: impl Fn(f32) -> f32, chroma_of: impl Fn(f32) -> f32) -> Self {
        let mut luma = [0u8; 256];
        let mut chroma = [0u8; 256];
        for i in 0..256 {
            let v = f32::from(i as u8);
            luma[i] = luma_of(v).round().clamp(0.0, 255.0) as u8;
            chroma[i] = chroma_of(v).round().clamp(0.0, 255.0) as u8;
        }
        Self { luma, chroma }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_end_points_and_round_trip_closely() {
        let to_full = RangeLuts::limited_to_full();
        let to_limited = RangeLuts::full_to_limited();
        assert_eq!((to_full.luma[16], to_full.luma[235]), (0, 255));
        // 16 maps to 0.5, rounded up.
        assert_eq!(
            (to_full.chroma[16], to_full.chroma[128], to_full.chroma[240]),
            (1, 128, 255)
        );
        assert_eq!((to_limited.luma[0], to_limited.luma[255]), (16, 235));
        assert_eq!(
            (
                to_limited.chroma[0],
                to_limited.chroma[128],
                to_limited.chroma[255]
            ),
            (16, 128, 240)
        );
        for v in 16..=235usize {
            let back = to_limited.luma[usize::from(to_full.luma[v])];
            assert!(back.abs_diff(v as u8) <= 1, "{v} -> {back}");
        }
    }
}
