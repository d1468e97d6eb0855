//! H.264 level for a picture size, frame rate and bitrate (Table A-1), and the limits of hardware encoders such as the Pi's bcm2835-codec.

use thiserror::Error;

/// One row of H.264 Table A-1 (the limits passthrough and encoders care about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// "3.1", "4", "1b"...
    pub name: &'static str,
    /// `level_idc` in the SPS (1b is signalled as 11 with constraint_set3_flag in
    /// Baseline; it is listed for completeness and never chosen).
    pub idc: u8,
    /// Index in V4L2's `V4L2_CID_MPEG_VIDEO_H264_LEVEL` menu (`V4L2_MPEG_VIDEO_H264_LEVEL_*`).
    pub v4l2_menu: u32,
    /// MaxMBPS: macroblocks per second.
    pub max_mbps: u32,
    /// MaxFS: macroblocks per frame.
    pub max_fs: u32,
    /// MaxBR in 1000 bit/s (the VCL factor of Baseline, Main and Extended profiles).
    pub max_br_kbps: u32,
}

const fn level(
    name: &'static str,
    idc: u8,
    v4l2_menu: u32,
    max_mbps: u32,
    max_fs: u32,
    max_br_kbps: u32,
) -> Level {
    Level {
        name,
        idc,
        v4l2_menu,
        max_mbps,
        max_fs,
        max_br_kbps,
    }
}

/// H.264 (ITU-T Rec. H.264, Annex A) Table A-1, lowest level first.
pub const LEVELS: [Level; 20] = [
    level("1", 10, 0, 1_485, 99, 64),
    level("1b", 11, 1, 1_485, 99, 128),
    level("1.1", 11, 2, 3_000, 396, 192),
    level("1.2", 12, 3, 6_000, 396, 384),
    level("1.3", 13, 4, 11_880, 396, 768),
    level("2", 20, 5, 11_880, 396, 2_000),
    level("2.1", 21, 6, 19_800, 792, 4_000),
    level("2.2", 22, 7, 20_250, 1_620, 4_000),
    level("3", 30, 8, 40_500, 1_620, 10_000),
    level("3.1", 31, 9, 108_000, 3_600, 14_000),
    level("3.2", 32, 10, 216_000, 5_120, 20_000),
    level("4", 40, 11, 245_760, 8_192, 20_000),
    level("4.1", 41, 12, 245_760, 8_192, 50_000),
    level("4.2", 42, 13, 522_240, 8_704, 50_000),
    level("5", 50, 14, 589_824, 22_080, 135_000),
    level("5.1", 51, 15, 983_040, 36_864, 240_000),
    level("5.2", 52, 16, 2_073_600, 36_864, 240_000),
    level("6", 60, 17, 4_177_920, 139_264, 240_000),
    level("6.1", 61, 18, 8_355_840, 139_264, 480_000),
    level("6.2", 62, 19, 16_711_680, 139_264, 800_000),
];

/// What a stream asks of a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDemand {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_bps: u32,
}

impl StreamDemand {
    /// Macroblocks per frame (16x16, sizes rounded up).
    pub fn frame_mbs(&self) -> u64 {
        u64::from(self.width.div_ceil(16)) * u64::from(self.height.div_ceil(16))
    }

    pub fn mbs_per_second(&self) -> u64 {
        self.frame_mbs() * u64::from(self.fps)
    }

    /// Whether `level` allows this stream: frame size, rate, bitrate, and each side at
    /// most sqrt(8 * MaxFS) macroblocks (A.3.1 f).
    pub fn fits(&self, level: &Level) -> bool {
        let side_limit = u64::from(level.max_fs) * 8;
        let (w_mbs, h_mbs) = (
            u64::from(self.width.div_ceil(16)),
            u64::from(self.height.div_ceil(16)),
        );
        self.frame_mbs() <= u64::from(level.max_fs)
            && self.mbs_per_second() <= u64::from(level.max_mbps)
            && u64::from(self.bitrate_bps) <= u64::from(level.max_br_kbps) * 1000
            && w_mbs * w_mbs <= side_limit
            && h_mbs * h_mbs <= side_limit
    }
}

/// Why no level (or no level the encoder supports) fits.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LevelError {
    #[error("{0:?} is empty (zero size, rate or bitrate)")]
    Empty(StreamDemand),
    #[error(
        "{demand:?} exceeds every H.264 level ({frame_mbs} macroblocks per frame, {mbps} per second)"
    )]
    BeyondLevels {
        demand: StreamDemand,
        frame_mbs: u64,
        mbps: u64,
    },
    #[error("{encoder}: {reason}")]
    Encoder {
        encoder: &'static str,
        reason: String,
    },
}

/// The lowest level that allows `demand` (1b is skipped: it is Baseline-only signalling).
pub fn select(demand: StreamDemand) -> Result<&'static Level, LevelError> {
    if demand.width == 0 || demand.height == 0 || demand.fps == 0 || demand.bitrate_bps == 0 {
        return Err(LevelError::Empty(demand));
    }
    LEVELS
        .iter()
        .filter(|l| l.name != "1b")
        .find(|l| demand.fits(l))
        .ok_or(LevelError::BeyondLevels {
            demand,
            frame_mbs: demand.frame_mbs(),
            mbps: demand.mbs_per_second(),
        })
}

/// Known limits of one hardware encoder, beyond what its driver reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderLimits {
    /// The V4L2 driver name (`VIDIOC_QUERYCAP` `driver`).
    pub driver: &'static str,
    pub max_width: u32,
    pub max_height: u32,
    pub max_bitrate_bps: u32,
    /// Highest `level_idc` it accepts.
    pub max_level_idc: u8,
    /// Why these numbers (for `rtcam probe` and the docs).
    pub note: &'static str,
}

/// Raspberry Pi 3/4/Zero 2 W/CM4's VideoCore encoder behind `/dev/video11`. Reported by
/// users and peers (not measured here): reliable up to 1920 pixels wide; 1080p30 needs
/// level 4 or 4.1; 25 Mbit/s is refused where 20 Mbit/s works; it refuses to start when
/// the level is below what size and rate need.
pub const BCM2835_CODEC: EncoderLimits = EncoderLimits {
    driver: "bcm2835-codec",
    max_width: 1920,
    max_height: 1920,
    max_bitrate_bps: 20_000_000,
    max_level_idc: 42,
    note: "width <= 1920, <= 20 Mbit/s, level 4/4.1 for 1080p30, up to level 4.2",
};

/// Hardware encoders with limits rtcam knows of, by V4L2 driver name.
pub fn known_limits(driver: &str) -> Option<&'static EncoderLimits> {
    [&BCM2835_CODEC].into_iter().find(|l| l.driver == driver)
}

/// The level to configure on an encoder with `limits`: the lowest that allows `demand`,
/// after checking the encoder's own size, bitrate and level limits.
pub fn select_for(
    limits: &EncoderLimits,
    demand: StreamDemand,
) -> Result<&'static Level, LevelError> {
    let refuse = |reason: String| LevelError::Encoder {
        encoder: limits.driver,
        reason,
    };
    if demand.width > limits.max_width || demand.height > limits.max_height {
        return Err(refuse(format!(
            "{}x{} is larger than {}x{}",
            demand.width, demand.height, limits.max_width, limits.max_height
        )));
    }
    if demand.bitrate_bps > limits.max_bitrate_bps {
        return Err(refuse(format!(
            "{} bit/s is above its {} bit/s",
            demand.bitrate_bps, limits.max_bitrate_bps
        )));
    }
    let level = select(demand)?;
    if level.idc > limits.max_level_idc {
        return Err(refuse(format!(
            "{}x{} at {} fps needs level {}",
            demand.width, demand.height, demand.fps, level.name
        )));
    }
    Ok(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(width: u32, height: u32, fps: u32, bitrate_bps: u32) -> StreamDemand {
        StreamDemand {
            width,
            height,
            fps,
            bitrate_bps,
        }
    }

    #[test]
    fn common_modes_get_the_expected_level() {
        for (w, h, fps, bps, want) in [
            (176, 144, 15, 64_000, "1"),
            (352, 288, 30, 384_000, "1.3"),
            (640, 480, 30, 1_000_000, "3"),
            (640, 480, 60, 1_000_000, "3.1"),
            (1280, 720, 30, 2_500_000, "3.1"),
            (1280, 720, 60, 4_000_000, "3.2"),
            (1920, 1080, 30, 4_000_000, "4"),
            (1920, 1080, 30, 25_000_000, "4.1"),
            (1920, 1080, 60, 8_000_000, "4.2"),
            (3840, 2160, 30, 20_000_000, "5.1"),
        ] {
            let l = select(demand(w, h, fps, bps)).unwrap();
            assert_eq!(l.name, want, "{w}x{h}@{fps} {bps}");
        }
    }

    #[test]
    fn limits_are_inclusive_and_each_one_counts() {
        // 1080p30 is 8160 MBs/frame (<= 8192) and 244800 MB/s (<= 245760): level 4.
        assert_eq!(
            select(demand(1920, 1080, 30, 20_000_000)).unwrap().name,
            "4"
        );
        // One bit more than 20 Mbit/s: 4.1.
        assert_eq!(
            select(demand(1920, 1080, 30, 20_000_001)).unwrap().name,
            "4.1"
        );
        // 31 fps: 252960 MB/s > 245760 -> 4.2.
        assert_eq!(
            select(demand(1920, 1080, 31, 1_000_000)).unwrap().name,
            "4.2"
        );
        // A strip within MaxFS but wider than sqrt(8 * MaxFS) macroblocks: 2048x64 is 512
        // MBs (level 2.1 by size), but 128 MBs wide needs 8 * MaxFS >= 16384, i.e.
        // MaxFS >= 2048 -> level 3.1.
        assert_eq!(select(demand(2048, 64, 1, 64_000)).unwrap().name, "3.1");
        assert!(matches!(
            select(demand(16384, 16384, 60, 1)),
            Err(LevelError::BeyondLevels { .. })
        ));
        assert!(matches!(
            select(demand(0, 480, 30, 1)),
            Err(LevelError::Empty(_))
        ));
        // The table is ordered and its V4L2 menu indices are consecutive.
        for (i, pair) in LEVELS.windows(2).enumerate() {
            assert!(pair[0].max_mbps <= pair[1].max_mbps);
            assert_eq!(pair[0].v4l2_menu as usize, i);
        }
    }

    #[test]
    fn bcm2835_codec_limits() {
        let bcm = known_limits("bcm2835-codec").unwrap();
        let l = select_for(bcm, demand(1920, 1080, 30, 20_000_000)).unwrap();
        assert_eq!((l.name, l.idc, l.v4l2_menu), ("4", 40, 11));
        let e = select_for(bcm, demand(1920, 1080, 30, 25_000_000)).unwrap_err();
        assert!(e.to_string().contains("25000000 bit/s"), "{e}");
        let e = select_for(bcm, demand(2560, 1440, 30, 8_000_000)).unwrap_err();
        assert!(e.to_string().contains("larger than 1920x1920"), "{e}");
        assert_eq!(
            select_for(bcm, demand(1280, 720, 30, 2_500_000))
                .unwrap()
                .name,
            "3.1"
        );
        // 1080p at 90 fps would need level 5: beyond what the codec takes.
        let e = select_for(bcm, demand(1920, 1080, 90, 8_000_000)).unwrap_err();
        assert!(e.to_string().contains("needs level 5"), "{e}");
        assert!(known_limits("vicodec").is_none());
    }
}
