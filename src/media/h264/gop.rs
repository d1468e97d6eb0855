//! Passthrough of camera H.264: SPS/PPS kept and put in front of IDRs that lack them, and a GOP cache bounded in bytes from which a new viewer starts at once.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use super::annexb::{AnnexBError, NalKind, PictureKind, parse_access_unit, pps_ids, sps_id};
use crate::media::frame::EncodedFrame;

/// Why a camera access unit was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassthroughError {
    #[error(transparent)]
    Corrupt(#[from] AnnexBError),
    #[error("IDR before any SPS/PPS: a decoder could not start from it")]
    NoParameterSets,
    #[error("non-IDR picture before the first IDR")]
    BeforeFirstIdr,
}

/// Real SPS and PPS are tens of bytes (scaling lists add a few hundred): bigger is garbage,
/// and the cache stays small (at most 288 entries of this size).
const MAX_PARAMETER_SET_BYTES: usize = 4096;

/// The parameter sets seen so far, by id (at most 32 SPS and 256 PPS, as H.264 allows).
#[derive(Debug, Default)]
pub struct ParameterSets {
    sps: BTreeMap<u32, Bytes>,
    pps: BTreeMap<u32, Bytes>,
}

impl ParameterSets {
    /// Remembers an SPS or PPS NAL unit (without start code); other kinds are ignored.
    fn remember(&mut self, kind: NalKind, nal: &[u8]) -> Result<(), AnnexBError> {
        if matches!(kind, NalKind::Sps | NalKind::Pps) && nal.len() > MAX_PARAMETER_SET_BYTES {
            return Err(AnnexBError::Invalid {
                offset: 0,
                what: "parameter set",
                reason: "larger than 4 KiB",
            });
        }
        match kind {
            NalKind::Sps => {
                let id = sps_id(nal, 0)?;
                self.sps.insert(id, Bytes::copy_from_slice(nal));
            }
            NalKind::Pps => {
                let (id, _) = pps_ids(nal, 0)?;
                self.pps.insert(id, Bytes::copy_from_slice(nal));
            }
            _ => {}
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.sps.is_empty() || self.pps.is_empty()
    }

    /// Every SPS then every PPS, each behind a 4-byte start code.
    fn annex_b_len(&self) -> usize {
        self.sps
            .values()
            .chain(self.pps.values())
            .map(|n| 4 + n.len())
            .sum()
    }
}

/// Checks each access unit a camera delivers and makes every IDR one a decoder can start
/// from. Pure: no I/O, no clock.
#[derive(Debug, Default)]
pub struct Passthrough {
    parameter_sets: ParameterSets,
    seen_idr: bool,
}

impl Passthrough {
    /// Accepts one camera buffer. Returns the frame to send (its `keyframe` set from the
    /// stream itself; an IDR that lacked SPS/PPS gets the cached ones put in front), or
    /// None for a buffer of parameter sets only (kept for the next IDR). A corrupt or
    /// truncated access unit is an error with the reason: the caller drops it and counts.
    pub fn accept(
        &mut self,
        mut frame: EncodedFrame,
    ) -> Result<Option<EncodedFrame>, PassthroughError> {
        let au = parse_access_unit(&frame.data)?;
        let (mut has_sps, mut has_pps) = (false, false);
        for nal in &au.nals {
            self.parameter_sets.remember(nal.kind, nal.data)?;
            has_sps |= nal.kind == NalKind::Sps;
            has_pps |= nal.kind == NalKind::Pps;
        }
        match au.picture {
            None => Ok(None),
            Some(PictureKind::NonIdr) => {
                if !self.seen_idr {
                    return Err(PassthroughError::BeforeFirstIdr);
                }
                frame.keyframe = false;
                Ok(Some(frame))
            }
            Some(PictureKind::Idr) => {
                if self.parameter_sets.is_empty() {
                    return Err(PassthroughError::NoParameterSets);
                }
                self.seen_idr = true;
                frame.keyframe = true;
                if !(has_sps && has_pps) {
                    frame.data = self.with_parameter_sets(&frame.data);
                }
                Ok(Some(frame))
            }
        }
    }

    /// Frames were lost before the next one: what follows may refer to a missing picture,
    /// so non-IDR pictures are refused again until the next IDR (the parameter sets stay).
    pub fn discontinuity(&mut self) {
        self.seen_idr = false;
    }

    /// `access_unit` with every cached SPS and PPS in front (after a leading delimiter,
    /// which must stay first).
    fn with_parameter_sets(&self, access_unit: &[u8]) -> Bytes {
        let ps = &self.parameter_sets;
        let mut out = BytesMut::with_capacity(ps.annex_b_len() + access_unit.len());
        let mut rest = access_unit;
        if let Ok(au) = parse_access_unit(access_unit)
            && let [first, second, ..] = au.nals.as_slice()
            && first.kind == NalKind::Aud
        {
            // Keep the delimiter (with its start code) first.
            let cut = second.offset - start_code_len(access_unit, second.offset);
            out.extend_from_slice(&access_unit[..cut]);
            rest = &access_unit[cut..];
        }
        for nal in ps.sps.values().chain(ps.pps.values()) {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(nal);
        }
        out.extend_from_slice(rest);
        out.freeze()
    }
}

/// Length of the start code before the NAL unit at `offset` (3, or 4 with a zero before).
fn start_code_len(data: &[u8], offset: usize) -> usize {
    if offset >= 4 && data[offset - 4] == 0 {
        4
    } else {
        3
    }
}

/// The last IDR and every frame after it, while they fit in `max_bytes`: a new viewer is
/// sent these first and so starts at once instead of waiting for the camera's next IDR.
/// When the bound is exceeded the cache is dropped until the next IDR (a viewer then waits
/// for it, as without a cache).
#[derive(Debug)]
pub struct GopCache {
    frames: Vec<EncodedFrame>,
    bytes: usize,
    max_bytes: usize,
    /// False between an overflow (or the start) and the next IDR.
    valid: bool,
}

impl GopCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            frames: Vec::new(),
            bytes: 0,
            max_bytes,
            valid: false,
        }
    }

    /// Adds a frame that went through [`Passthrough::accept`] (so an IDR carries its
    /// parameter sets).
    pub fn push(&mut self, frame: &EncodedFrame) {
        if frame.keyframe {
            self.clear();
            self.valid = true;
        } else if !self.valid {
            return;
        }
        if self.bytes + frame.data.len() > self.max_bytes {
            self.clear();
            return;
        }
        self.bytes += frame.data.len();
        self.frames.push(frame.clone());
    }

    /// What a new viewer gets first: the last IDR and what followed, oldest first (shared
    /// `Bytes`, no copy); empty when there is no complete GOP to start from.
    pub fn start(&self) -> &[EncodedFrame] {
        &self.frames
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets the GOP (frames were lost): empty until the next IDR.
    pub fn reset(&mut self) {
        self.clear();
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
        self.valid = false;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::media::h264::annexb::tests::encoded_stream;

    fn frame(data: Vec<u8>, seq: u64) -> EncodedFrame {
        EncodedFrame {
            data: Bytes::from(data),
            // Deliberately wrong: passthrough must take it from the stream.
            keyframe: seq % 2 == 1,
            seq,
            captured_at: Instant::now(),
            duration: Duration::from_millis(33),
            temporal_id: 0,
            target_bps: 1_000_000,
            preroll: None,
        }
    }

    /// Splits openh264's first access unit into (parameter sets, IDR without them).
    fn split_first(au: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let parsed = parse_access_unit(au).unwrap();
        let slice = parsed.nals.iter().find(|n| n.kind.is_slice()).unwrap();
        let cut = slice.offset - start_code_len(au, slice.offset);
        (au[..cut].to_vec(), au[cut..].to_vec())
    }

    #[test]
    fn idr_without_parameter_sets_gets_the_cached_ones() {
        let stream = encoded_stream(3, 60);
        let (ps, bare_idr) = split_first(&stream[0]);
        let mut p = Passthrough::default();
        // A camera that sends SPS/PPS in a buffer of their own, then the IDR alone.
        assert!(matches!(p.accept(frame(ps.clone(), 0)), Ok(None)));
        let idr = p.accept(frame(bare_idr.clone(), 1)).unwrap().unwrap();
        assert!(idr.keyframe);
        assert_eq!(
            &idr.data[..],
            &stream[0][..],
            "same bytes as the encoder's own IDR"
        );
        let au = parse_access_unit(&idr.data).unwrap();
        assert!(au.has(NalKind::Sps) && au.has(NalKind::Pps));
        // An IDR that has them passes unchanged, without a copy.
        let full = frame(stream[0].clone(), 2);
        let ptr = full.data.as_ptr();
        let out = p.accept(full).unwrap().unwrap();
        assert_eq!(out.data.as_ptr(), ptr);
        let next = p.accept(frame(stream[1].clone(), 3)).unwrap().unwrap();
        assert!(!next.keyframe);
    }

    #[test]
    fn delimiter_stays_first() {
        let stream = encoded_stream(1, 60);
        let (ps, bare_idr) = split_first(&stream[0]);
        let mut p = Passthrough::default();
        p.accept(frame(ps, 0)).unwrap();
        let mut with_aud = vec![0, 0, 0, 1, 0x09, 0x10];
        with_aud.extend_from_slice(&bare_idr);
        let out = p.accept(frame(with_aud, 1)).unwrap().unwrap();
        let kinds: Vec<NalKind> = parse_access_unit(&out.data)
            .unwrap()
            .nals
            .iter()
            .map(|n| n.kind)
            .collect();
        assert_eq!(kinds[..3], [NalKind::Aud, NalKind::Sps, NalKind::Pps]);
        assert!(kinds[3].is_slice());
    }

    #[test]
    fn pictures_before_a_usable_idr_are_refused() {
        let stream = encoded_stream(2, 60);
        let (_, bare_idr) = split_first(&stream[0]);
        let mut p = Passthrough::default();
        assert_eq!(
            p.accept(frame(stream[1].clone(), 0)).unwrap_err(),
            PassthroughError::BeforeFirstIdr
        );
        assert_eq!(
            p.accept(frame(bare_idr, 1)).unwrap_err(),
            PassthroughError::NoParameterSets
        );
        assert!(p.accept(frame(stream[0].clone(), 2)).unwrap().is_some());
        assert!(p.accept(frame(stream[1].clone(), 3)).unwrap().is_some());
        // After lost frames, pictures wait for the next IDR again.
        p.discontinuity();
        assert_eq!(
            p.accept(frame(stream[1].clone(), 4)).unwrap_err(),
            PassthroughError::BeforeFirstIdr
        );
        assert!(p.accept(frame(stream[0].clone(), 5)).unwrap().is_some());
    }

    #[test]
    fn gop_cache_starts_at_the_last_idr_and_drops_when_over_its_bound() {
        let stream = encoded_stream(12, 5); // IDRs at 0, 5, 10
        let mut p = Passthrough::default();
        let frames: Vec<EncodedFrame> = stream
            .iter()
            .enumerate()
            .map(|(i, au)| p.accept(frame(au.clone(), i as u64)).unwrap().unwrap())
            .collect();
        assert_eq!(
            frames
                .iter()
                .filter(|f| f.keyframe)
                .map(|f| f.seq)
                .collect::<Vec<_>>(),
            [0, 5, 10]
        );
        let mut cache = GopCache::new(1 << 20);
        assert!(cache.start().is_empty());
        for f in &frames[..8] {
            cache.push(f);
        }
        let seqs: Vec<u64> = cache.start().iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [5, 6, 7]);
        assert!(cache.start()[0].keyframe);
        assert_eq!(
            cache.bytes(),
            frames[5..8].iter().map(|f| f.data.len()).sum::<usize>()
        );
        // A bound that holds the IDR and one more frame: the third overflows, the cache is
        // dropped and stays empty until the next IDR.
        let bound = frames[5].data.len() + frames[6].data.len();
        let mut small = GopCache::new(bound);
        for f in &frames[5..10] {
            small.push(f);
            if f.seq == 6 {
                assert_eq!(small.start().len(), 2);
            }
        }
        assert!(small.start().is_empty());
        small.push(&frames[10]);
        assert_eq!(small.start().len(), 1);
        // An IDR bigger than the bound is never cached.
        let mut tiny = GopCache::new(10);
        tiny.push(&frames[0]);
        tiny.push(&frames[1]);
        assert!(tiny.start().is_empty());
    }

    /// xorshift64*: reproducible mutations without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn mutated_and_truncated_access_units_are_errors_never_panics() {
        let stream = encoded_stream(6, 3);
        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let mut p = Passthrough::default();
        let mut cache = GopCache::new(64 * 1024);
        let (mut errors, mut accepted) = (0, 0);
        for round in 0..20_000u64 {
            let mut au = stream[rng.below(stream.len())].clone();
            for _ in 0..=rng.below(4) {
                let len = au.len();
                match rng.below(7) {
                    0 => au[rng.below(len)] ^= 1 << rng.below(8),
                    1 => au.truncate(rng.below(len + 1)),
                    2 => au.insert(rng.below(len + 1), rng.next() as u8),
                    3 => {
                        let at = rng.below(len);
                        au.remove(at);
                    }
                    4 => {
                        let at = rng.below(len + 1);
                        au.splice(at..at, [0, 0, 1]);
                    }
                    5 => {
                        // Splice in a piece of another access unit.
                        let other = &stream[rng.below(stream.len())];
                        let a = rng.below(other.len());
                        let b = a + rng.below(other.len() - a + 1);
                        let at = rng.below(len + 1);
                        au.splice(at..at, other[a..b].iter().copied());
                    }
                    _ => au = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                }
                if au.is_empty() {
                    break;
                }
            }
            match p.accept(frame(au, round)) {
                Ok(Some(f)) => {
                    accepted += 1;
                    cache.push(&f);
                    assert!(cache.bytes() <= 64 * 1024);
                    // Whatever was accepted parses again, and an IDR carries SPS and PPS.
                    let again = parse_access_unit(&f.data).expect("accepted output parses");
                    if f.keyframe {
                        assert!(again.has(NalKind::Sps) && again.has(NalKind::Pps));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    errors += 1;
                }
            }
        }
        assert!(errors > 5_000, "garbage was refused: {errors}");
        assert!(accepted > 100, "near-valid units still pass: {accepted}");
        if let Some(first) = cache.start().first() {
            assert!(first.keyframe);
        }
    }
}
