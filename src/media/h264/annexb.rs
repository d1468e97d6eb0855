//! Annex-B H.264 access units: split at start codes, check every NAL unit header and the order of NAL units, classify the access unit.

use thiserror::Error;

/// NAL unit types (H.264 Table 7-1) that passthrough tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NalKind {
    /// Coded slice of a non-IDR picture (type 1) or a data partition (2-4).
    NonIdrSlice,
    /// Coded slice of an IDR picture (type 5).
    IdrSlice,
    /// Supplemental enhancement information (6).
    Sei,
    /// Sequence parameter set (7).
    Sps,
    /// Picture parameter set (8).
    Pps,
    /// Access unit delimiter (9).
    Aud,
    /// End of sequence or stream, filler, SPS extension, prefix/subset SPS and other types
    /// (10-23) that a decoder may skip.
    Other(u8),
}

impl NalKind {
    /// Slices: the NAL units that carry the picture (VCL).
    pub fn is_slice(self) -> bool {
        matches!(self, Self::NonIdrSlice | Self::IdrSlice)
    }

    /// Types that may only come before the first slice of an access unit (7.4.1.2.3).
    fn precedes_slices(self) -> bool {
        matches!(self, Self::Sei | Self::Sps | Self::Pps | Self::Aud)
    }
}

/// One NAL unit inside an access unit, without its start code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NalUnit<'a> {
    pub kind: NalKind,
    /// `nal_ref_idc`: 0 for pictures nothing refers to.
    pub ref_idc: u8,
    /// The NAL unit from its header byte on (emulation prevention bytes included).
    pub data: &'a [u8],
    /// Where `data` starts in the access unit.
    pub offset: usize,
}

/// What kind of picture an access unit carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PictureKind {
    /// An IDR picture: a decoder can start here (given SPS and PPS).
    Idr,
    /// Any other picture: needs the pictures before it.
    NonIdr,
}

/// A split and checked access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit<'a> {
    pub nals: Vec<NalUnit<'a>>,
    /// None for an access unit of parameter sets (and SEI) only, as some cameras send
    /// SPS and PPS in a buffer of their own before the first IDR.
    pub picture: Option<PictureKind>,
}

impl AccessUnit<'_> {
    pub fn has(&self, kind: NalKind) -> bool {
        self.nals.iter().any(|n| n.kind == kind)
    }
}

/// Why an access unit was refused. Every reason names the byte offset where it applies.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnnexBError {
    #[error("empty access unit")]
    Empty,
    #[error("no start code at the beginning (stream must be Annex-B)")]
    NoStartCode,
    #[error("empty NAL unit at byte {offset}")]
    EmptyNal { offset: usize },
    #[error("NAL unit at byte {offset} has forbidden_zero_bit set")]
    ForbiddenBit { offset: usize },
    #[error("NAL unit at byte {offset} has unspecified type {nal_type}")]
    UnspecifiedType { offset: usize, nal_type: u8 },
    #[error("{kind:?} at byte {offset} after the first slice (two access units in one buffer?)")]
    OutOfOrder { offset: usize, kind: NalKind },
    #[error("IDR and non-IDR slices in one access unit (byte {offset})")]
    MixedSlices { offset: usize },
    #[error("{what} at byte {offset} is truncated")]
    Truncated { offset: usize, what: &'static str },
    #[error("{what} at byte {offset} is invalid: {reason}")]
    Invalid {
        offset: usize,
        what: &'static str,
        reason: &'static str,
    },
    #[error(
        "access unit does not start with the first slice of a picture (first_mb_in_slice {first_mb} at byte {offset})"
    )]
    MissingFirstSlice { offset: usize, first_mb: u32 },
}

/// Splits an Annex-B buffer at its 3- and 4-byte start codes (leading zero bytes before
/// the first start code and trailing zero bytes after a NAL unit are allowed and dropped).
/// Each item is (offset, NAL unit bytes); emulation prevention bytes are left in place,
/// since a start code can never occur inside a NAL unit.
pub fn split(data: &[u8]) -> Result<Vec<(usize, &[u8])>, AnnexBError> {
    if data.iter().all(|&b| b == 0) {
        return Err(AnnexBError::Empty);
    }
    let first = find_start_code(data, 0).ok_or(AnnexBError::NoStartCode)?;
    if data[..first].iter().any(|&b| b != 0) {
        return Err(AnnexBError::NoStartCode);
    }
    let mut nals = Vec::new();
    let mut start = first + 3;
    loop {
        let next = find_start_code(data, start);
        let end = next.unwrap_or(data.len());
        // Zero bytes before the next start code are its 4th byte or trailing_zero_8bits.
        let trimmed = data[start..end]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(start, |i| start + i + 1);
        if trimmed == start {
            return Err(AnnexBError::EmptyNal { offset: start });
        }
        nals.push((start, &data[start..trimmed]));
        match next {
            Some(n) => start = n + 3,
            None => return Ok(nals),
        }
    }
}

/// Splits an Annex-B stream (a `.h264` file) into access units, each with its start codes:
/// a new one begins at an access unit delimiter, at an SPS, PPS, SEI or other non-VCL unit
/// that follows a slice, and at a slice that starts a picture (`first_mb_in_slice` 0) after
/// one (H.264 7.4.1.2.3, for streams without redundant pictures). Leading zero bytes go with
/// the first unit.
pub fn access_units(stream: &[u8]) -> Result<Vec<&[u8]>, AnnexBError> {
    let mut starts = Vec::new();
    let mut had_slice = false;
    for (offset, nal) in split(stream)? {
        let nal_type = nal[0] & 0x1F;
        let slice = matches!(nal_type, 1 | 5);
        let begins = match nal_type {
            9 => true,
            6..=8 | 10..=18 => had_slice,
            1 | 5 => had_slice && slice_header(nal, offset)?.first_mb == 0,
            _ => false,
        };
        if begins || starts.is_empty() {
            // Back over the start code (with a leading zero byte, if any).
            let code = if offset >= 4 && stream[offset - 4] == 0 {
                4
            } else {
                3
            };
            starts.push(if starts.is_empty() { 0 } else { offset - code });
            had_slice = false;
        }
        had_slice |= slice;
    }
    Ok(starts
        .iter()
        .zip(starts.iter().skip(1).chain([&stream.len()]))
        .map(|(&a, &b)| &stream[a..b])
        .collect())
}

/// Index of the next `00 00 01` at or after `from`.
fn find_start_code(data: &[u8], from: usize) -> Option<usize> {
    data.get(from..)?
        .windows(3)
        .position(|w| w == [0, 0, 1])
        .map(|i| from + i)
}

/// Splits and checks one access unit: every NAL unit header, the order of NAL units
/// (parameter sets, SEI and delimiter before the first slice), one kind of slice, and the
/// first slice header (it must start the picture). Garbage and truncated input give an
/// error, never a panic.
pub fn parse_access_unit(data: &[u8]) -> Result<AccessUnit<'_>, AnnexBError> {
    let mut nals = Vec::new();
    let mut picture = None;
    for (offset, bytes) in split(data)? {
        let header = bytes[0];
        if header & 0x80 != 0 {
            return Err(AnnexBError::ForbiddenBit { offset });
        }
        let nal_type = header & 0x1F;
        let kind = match nal_type {
            1..=4 => NalKind::NonIdrSlice,
            5 => NalKind::IdrSlice,
            6 => NalKind::Sei,
            7 => NalKind::Sps,
            8 => NalKind::Pps,
            9 => NalKind::Aud,
            10..=23 => NalKind::Other(nal_type),
            _ => return Err(AnnexBError::UnspecifiedType { offset, nal_type }),
        };
        let ref_idc = header >> 5;
        match kind {
            NalKind::Sps => {
                sps_id(bytes, offset)?;
            }
            NalKind::Pps => {
                pps_ids(bytes, offset)?;
            }
            NalKind::IdrSlice if ref_idc == 0 => {
                return Err(AnnexBError::Invalid {
                    offset,
                    what: "IDR slice",
                    reason: "nal_ref_idc is 0",
                });
            }
            _ => {}
        }
        if kind.is_slice() {
            let this = if kind == NalKind::IdrSlice {
                PictureKind::Idr
            } else {
                PictureKind::NonIdr
            };
            let header = slice_header(bytes, offset)?;
            match picture {
                None if header.first_mb != 0 => {
                    return Err(AnnexBError::MissingFirstSlice {
                        offset,
                        first_mb: header.first_mb,
                    });
                }
                None => picture = Some(this),
                Some(p) if p != this => return Err(AnnexBError::MixedSlices { offset }),
                Some(_) => {}
            }
        } else if picture.is_some() && kind.precedes_slices() {
            return Err(AnnexBError::OutOfOrder { offset, kind });
        }
        if kind == NalKind::Aud && !nals.is_empty() {
            return Err(AnnexBError::OutOfOrder { offset, kind });
        }
        nals.push(NalUnit {
            kind,
            ref_idc,
            data: bytes,
            offset,
        });
    }
    Ok(AccessUnit { nals, picture })
}

/// The fields of a slice header passthrough checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceHeader {
    pub first_mb: u32,
    pub slice_type: u32,
    pub pps_id: u32,
}

fn slice_header(nal: &[u8], offset: usize) -> Result<SliceHeader, AnnexBError> {
    let what = "slice header";
    let mut r = RbspReader::new(&nal[1..], offset, what);
    let first_mb = r.ue()?;
    let slice_type = r.ue()?;
    let pps_id = r.ue()?;
    if slice_type > 9 {
        return Err(r.invalid("slice_type above 9"));
    }
    if pps_id > 255 {
        return Err(r.invalid("pic_parameter_set_id above 255"));
    }
    Ok(SliceHeader {
        first_mb,
        slice_type,
        pps_id,
    })
}

/// `seq_parameter_set_id` of an SPS NAL unit (after profile, constraint flags and level).
pub fn sps_id(nal: &[u8], offset: usize) -> Result<u32, AnnexBError> {
    let what = "SPS";
    if nal.len() < 5 {
        return Err(AnnexBError::Truncated { offset, what });
    }
    let mut r = RbspReader::new(&nal[1..], offset, what);
    r.bits(24)?; // profile_idc, constraint_set flags, level_idc
    let id = r.ue()?;
    if id > 31 {
        return Err(r.invalid("seq_parameter_set_id above 31"));
    }
    Ok(id)
}

/// (`profile_idc`, constraint_set flags, `level_idc`) of the first SPS in an Annex-B access
/// unit: what an SDP `profile-level-id` says about the stream. None without a (readable) SPS.
pub fn profile_level(access_unit: &[u8]) -> Option<(u8, u8, u8)> {
    let nals = split(access_unit).ok()?;
    let (offset, sps) = nals.into_iter().find(|(_, n)| n[0] & 0x1F == 7)?;
    let mut r = RbspReader::new(&sps[1..], offset, "SPS");
    let mut byte = || r.bits(8).ok().map(|b| b as u8);
    Some((byte()?, byte()?, byte()?))
}

/// (`pic_parameter_set_id`, `seq_parameter_set_id`) of a PPS NAL unit.
pub fn pps_ids(nal: &[u8], offset: usize) -> Result<(u32, u32), AnnexBError> {
    let what = "PPS";
    let mut r = RbspReader::new(&nal[1..], offset, what);
    let pps = r.ue()?;
    let sps = r.ue()?;
    if pps > 255 || sps > 31 {
        return Err(r.invalid("parameter set id out of range"));
    }
    Ok((pps, sps))
}

/// Bit reader over a NAL unit's payload that skips emulation prevention bytes
/// (`00 00 03` reads as `00 00`).
struct RbspReader<'a> {
    data: &'a [u8],
    byte: usize,
    bit: u8,
    zeros: u8,
    offset: usize,
    what: &'static str,
}

impl<'a> RbspReader<'a> {
    fn new(data: &'a [u8], offset: usize, what: &'static str) -> Self {
        Self {
            data,
            byte: 0,
            bit: 0,
            zeros: 0,
            offset,
            what,
        }
    }

    fn truncated(&self) -> AnnexBError {
        AnnexBError::Truncated {
            offset: self.offset,
            what: self.what,
        }
    }

    fn invalid(&self, reason: &'static str) -> AnnexBError {
        AnnexBError::Invalid {
            offset: self.offset,
            what: self.what,
            reason,
        }
    }

    fn bit(&mut self) -> Result<u32, AnnexBError> {
        if self.bit == 0 {
            // Entering a new byte: drop an emulation prevention byte.
            if self.zeros >= 2 && self.data.get(self.byte) == Some(&3) {
                self.byte += 1;
                self.zeros = 0;
            }
            let b = *self.data.get(self.byte).ok_or_else(|| self.truncated())?;
            self.zeros = if b == 0 { self.zeros + 1 } else { 0 };
        }
        let b = self.data[self.byte];
        let value = u32::from((b >> (7 - self.bit)) & 1);
        self.bit += 1;
        if self.bit == 8 {
            self.bit = 0;
            self.byte += 1;
        }
        Ok(value)
    }

    fn bits(&mut self, n: u32) -> Result<u32, AnnexBError> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }

    /// Unsigned Exp-Golomb code, `ue(v)` (9.1), up to 32 bits.
    fn ue(&mut self) -> Result<u32, AnnexBError> {
        let mut leading = 0;
        while self.bit()? == 0 {
            leading += 1;
            if leading > 31 {
                return Err(self.invalid("Exp-Golomb code longer than 32 bits"));
            }
        }
        let rest = self.bits(leading)?;
        Ok(((1u64 << leading) - 1 + u64::from(rest)) as u32)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::media::encoder::{EncoderSettings, H264Encoder};
    use crate::media::frame::I420Buffer;
    use crate::media::pattern::PatternGenerator;

    /// Real access units from openh264: the first is SPS + PPS + IDR, then P pictures, an IDR
    /// every `keyframe_interval` frames.
    pub(crate) fn encoded_stream(frames: u32, keyframe_interval: u32) -> Vec<Vec<u8>> {
        let (w, h) = (160, 96);
        let mut enc = H264Encoder::new(EncoderSettings {
            bitrate: 300_000,
            fps: 30,
            keyframe_interval,
            temporal_layers: 1,
        })
        .expect("encoder");
        let pattern = PatternGenerator::new(w, h);
        let mut picture = I420Buffer::default();
        (0..frames)
            .map(|seq| {
                pattern.render(seq, seq * 33, &mut picture);
                let mut out = Vec::new();
                enc.encode(&picture.view(), u64::from(seq) * 33, &mut out)
                    .expect("encode");
                out
            })
            .collect()
    }

    #[test]
    fn splits_three_and_four_byte_start_codes() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, // 4-byte start code
            0, 0, 1, 0x68, 3, // 3-byte
            0, 0, 0, 0, 1, 0x65, 4, 0, 0, // trailing zeros, then the end
        ];
        let nals = split(&data).unwrap();
        assert_eq!(
            nals,
            vec![
                (4, &[0x67, 1, 2][..]),
                (10, &[0x68, 3][..]),
                (17, &[0x65, 4][..])
            ]
        );
        // Leading zero bytes are allowed; anything else before the first start code is not.
        assert_eq!(split(&[0, 0, 0, 0, 1, 9, 0x10]).unwrap().len(), 1);
        assert_eq!(split(&[7, 0, 0, 1, 9]), Err(AnnexBError::NoStartCode));
        assert_eq!(split(&[0x65, 1, 2]), Err(AnnexBError::NoStartCode));
        assert_eq!(split(&[]), Err(AnnexBError::Empty));
        assert_eq!(split(&[0, 0, 0]), Err(AnnexBError::Empty));
        assert_eq!(
            split(&[0, 0, 1, 0x09, 0x10, 0, 0, 1]),
            Err(AnnexBError::EmptyNal { offset: 8 })
        );
        assert_eq!(
            split(&[0, 0, 1, 0, 0, 1, 0x09]),
            Err(AnnexBError::EmptyNal { offset: 3 })
        );
    }

    #[test]
    fn classifies_encoder_output() {
        let stream = encoded_stream(4, 60);
        let first = parse_access_unit(&stream[0]).unwrap();
        assert_eq!(first.picture, Some(PictureKind::Idr));
        assert!(first.has(NalKind::Sps) && first.has(NalKind::Pps));
        let kinds: Vec<NalKind> = first.nals.iter().map(|n| n.kind).collect();
        let slice_at = kinds.iter().position(|k| k.is_slice()).unwrap();
        assert!(kinds[..slice_at].contains(&NalKind::Sps));
        for au in &stream[1..] {
            let au = parse_access_unit(au).unwrap();
            assert_eq!(au.picture, Some(PictureKind::NonIdr));
            assert!(!au.has(NalKind::Sps));
        }
        // The parameter sets alone: no picture, but a valid access unit for passthrough.
        let ps_end = first.nals[slice_at].offset - 4;
        let ps = parse_access_unit(&stream[0][..ps_end]).unwrap();
        assert_eq!(ps.picture, None);
        assert_eq!(sps_id(first.nals[0].data, 0), Ok(0));
    }

    #[test]
    fn bad_headers_and_order_are_refused_with_a_reason() {
        let stream = encoded_stream(2, 60);
        let idr = &stream[0];
        let au = parse_access_unit(idr).unwrap();
        let slice = au.nals.iter().find(|n| n.kind.is_slice()).unwrap().offset;

        let mut bad = idr.clone();
        bad[slice] |= 0x80;
        assert_eq!(
            parse_access_unit(&bad),
            Err(AnnexBError::ForbiddenBit { offset: slice })
        );
        let mut bad = idr.clone();
        bad[slice] = (bad[slice] & 0xE0) | 30;
        assert!(matches!(
            parse_access_unit(&bad),
            Err(AnnexBError::UnspecifiedType { nal_type: 30, .. })
        ));
        // An IDR picture followed by a P picture's slice: two pictures in one buffer.
        let p = &stream[1];
        let mut two = idr.clone();
        two.extend_from_slice(p);
        assert!(matches!(
            parse_access_unit(&two),
            Err(AnnexBError::MixedSlices { .. })
        ));
        // Parameter sets after the slice.
        let mut late = idr.clone();
        late.extend_from_slice(&idr[..slice - 4]);
        assert!(matches!(
            parse_access_unit(&late),
            Err(AnnexBError::OutOfOrder {
                kind: NalKind::Sps,
                ..
            })
        ));
        // A slice header cut short.
        assert!(matches!(
            parse_access_unit(&idr[..slice + 1]),
            Err(AnnexBError::Truncated { .. })
        ));
        // A picture that starts in the middle (first_mb_in_slice != 0): ue(v) 5 is 00110.
        let mut middle = idr[..slice + 1].to_vec();
        middle.extend_from_slice(&[0b0011_0100, 0x80, 0x80]);
        assert!(matches!(
            parse_access_unit(&middle),
            Err(AnnexBError::MissingFirstSlice { first_mb: 5, .. })
        ));
    }

    #[test]
    fn a_stream_splits_back_into_its_access_units() {
        let stream = encoded_stream(12, 5);
        let joined: Vec<u8> = stream.concat();
        let units = access_units(&joined).unwrap();
        assert_eq!(units.len(), stream.len());
        for (got, want) in units.iter().zip(&stream) {
            assert_eq!(got, &want.as_slice());
        }
        // Delimiters start units too, and leading zeros stay with the first.
        let mut with_aud = vec![0, 0];
        for u in &stream[..3] {
            with_aud.extend_from_slice(&[0, 0, 0, 1, 0x09, 0x10]);
            with_aud.extend_from_slice(u);
        }
        let units = access_units(&with_aud).unwrap();
        assert_eq!(units.len(), 3);
        assert!(units[0].starts_with(&[0, 0, 0, 0, 0, 1, 0x09]));
        assert!(units[1].starts_with(&[0, 0, 0, 1, 0x09]));
        for u in units {
            assert!(parse_access_unit(u).unwrap().picture.is_some());
        }
        assert!(access_units(b"no start code").is_err());
    }

    #[test]
    fn profile_and_level_come_from_the_sps() {
        let stream = encoded_stream(2, 60);
        // openh264: Constrained Baseline (constraint_set0 and 1), level 1.2 at 160x96.
        assert_eq!(profile_level(&stream[0]), Some((0x42, 0xc0, 12)));
        assert_eq!(profile_level(&stream[1]), None, "a P picture has no SPS");
        assert_eq!(profile_level(&[0, 0, 1, 0x67, 0x64]), None, "truncated");
        assert_eq!(profile_level(b"garbage"), None);
    }

    #[test]
    fn exp_golomb_skips_emulation_prevention() {
        // 00 00 03 01: the 03 is dropped, so the bits are 0000 0000 0000 0000 0000 0001.
        let data = [0x00, 0x00, 0x03, 0x01, 0x80];
        let mut r = RbspReader::new(&data, 0, "test");
        assert_eq!(r.bits(16).unwrap(), 0);
        assert_eq!(r.bits(8).unwrap(), 1);
        // ue(v): 1 -> 0, 010 -> 1, 011 -> 2, 00100 -> 3.
        let data = [0b1010_0110, 0b0100_0000];
        let mut r = RbspReader::new(&data, 0, "test");
        assert_eq!(
            (
                r.ue().unwrap(),
                r.ue().unwrap(),
                r.ue().unwrap(),
                r.ue().unwrap()
            ),
            (0, 1, 2, 3)
        );
        assert!(r.ue().is_err(), "runs out of bits: truncated");
        let zeros = [0u8; 8];
        assert!(matches!(
            RbspReader::new(&zeros, 0, "t").ue(),
            Err(AnnexBError::Invalid { .. })
        ));
    }
}
