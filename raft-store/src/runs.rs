//! Runs: a conversation's envelopes of one checkpoint, moved out of sled into the group's
//! envelope segment (`envseg.rs`) as one contiguous stretch of records, with one sled item
//! (kind RUN, `keys.rs`) saying where they lie. Step 2b of `docs/ENVELOPE-STORE.md`.
//!
//! ```text
//! RUN value (framed by keys::encode_value)
//!            = segment u64 BE | offset u64 BE | bytes u32 BE | count u32 BE
//! run record = the frame of `frame.rs` around
//!              format u8 (= 2) | seq u64 LE | the envelope's sled value as it was (ENV value)
//! SEGS value = format u8 (= 1) | has mark u8 | [segment u64 BE | end u64 BE] (the segments'
//!              durable mark) | n u32 BE | n x (segment u64 BE | offset u64 BE | bytes u32 BE)
//!              (erased runs to zero) | m u32 BE | m x (segment u64 BE | RUN items in it u64 BE)
//! ```
//! A run's records hold the seqs `first_seq .. first_seq + count`, in order, where
//! `first_seq` is in the RUN key. A run whose bytes are all zero was erased
//! (`Segments::zero`) after its RUN item was deleted; a reader that still found the item
//! (a crash before the deletion reached sled, replayed later) reads it as removed.

use std::collections::BTreeMap;

use crate::envseg::Durable;
use crate::frame;
use crate::keys;

/// A stretch of a segment: `(segment, offset, bytes)`.
pub type Stretch = (u64, u64, u32);

/// A run's records: `(seq, ENV value)`.
pub type Records<'a> = Vec<(u64, &'a [u8])>;

/// Format byte of a run record's body (1 is `envseg`'s own envelope record).
pub const RUN_RECORD_FORMAT: u8 = 2;
/// Format byte of a SEGS value's body.
const SEGS_FORMAT: u8 = 1;
/// A run holds at most this many bytes of records: a reader reads a run whole, so this
/// bounds what one read of a run costs; a checkpoint splits longer stretches.
pub const MAX_RUN_BYTES: usize = 64 << 10;
/// `format | seq`.
const RECORD_HEAD: usize = 1 + 8;
/// What a run record adds to the ENV value it carries: its frame and head.
pub const RECORD_OVERHEAD: usize = frame::FRAME_LEN + RECORD_HEAD;

/// Where a run lies (the RUN item's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRef {
    pub segment: u64,
    pub offset: u64,
    pub bytes: u32,
    pub count: u32,
}

impl RunRef {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.segment.to_be_bytes());
        b[8..16].copy_from_slice(&self.offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.bytes.to_be_bytes());
        b[20..24].copy_from_slice(&self.count.to_be_bytes());
        keys::encode_value(&b)
    }

    pub fn decode(v: &[u8]) -> Result<RunRef, keys::DecodeError> {
        let b = keys::decode_value(v)?;
        if b.len() != 24 {
            return Err(keys::DecodeError(format!("run value of {} bytes, expected 24", b.len())));
        }
        let u64_at =
            |i: usize| u64::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let r = RunRef { segment: u64_at(0), offset: u64_at(8), bytes: u32_at(16), count: u32_at(20) };
        if r.count == 0
            || r.bytes as usize > MAX_RUN_BYTES * 2
            || (r.bytes as usize) < r.count as usize * frame::FRAME_LEN
        {
            return Err(keys::DecodeError(format!("run of {} records in {} bytes", r.count, r.bytes)));
        }
        Ok(r)
    }

    /// The last seq of a run that starts at `first_seq`.
    pub fn last_seq(&self, first_seq: u64) -> u64 {
        first_seq + u64::from(self.count) - 1
    }
}

/// Appends one run record (seq and the envelope's ENV value) to `buf`.
pub fn push_record(buf: &mut Vec<u8>, seq: u64, env_value: &[u8]) {
    frame::push(buf, |b| {
        b.push(RUN_RECORD_FORMAT);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(env_value);
    });
}

/// The records of a run read back: `(seq, ENV value)` of each, checked (frames, CRCs,
/// format, seqs `first_seq..` in order, exactly `count` of them filling `bytes`); `None` if
/// the run was erased (all zeros).
pub fn parse_run(bytes: &[u8], first_seq: u64, count: u32, max_body: usize) -> Result<Option<Records<'_>>, String> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0;
    while pos < bytes.len() {
        let (body, end) = frame::parse(bytes, pos, max_body).map_err(|d| format!("run record at +{pos}: {d}"))?;
        if body.len() < RECORD_HEAD || body[0] != RUN_RECORD_FORMAT {
            return Err(format!("run record at +{pos}: not a run record (format {:?})", body.first()));
        }
        let seq = u64::from_le_bytes([body[1], body[2], body[3], body[4], body[5], body[6], body[7], body[8]]);
        let want = first_seq + out.len() as u64;
        if seq != want {
            return Err(format!("run record at +{pos} has seq {seq}, expected {want}"));
        }
        out.push((seq, &body[RECORD_HEAD..]));
        pos = end;
    }
    if out.len() != count as usize {
        return Err(format!("run holds {} records, its index says {count}", out.len()));
    }
    Ok(Some(out))
}

/// The SEGS value: the segments' durable mark, and the stretches of erased runs that are to
/// be zeroed (done after the checkpoint that deleted their items is flushed; done again at
/// open if a crash came first: zeroing is idempotent, nothing is ever written there again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegsState {
    pub mark: Option<Durable>,
    /// `(segment, offset, bytes)`.
    pub to_zero: Vec<Stretch>,
    /// segment -> how many RUN items point into it (segments with none are not listed:
    /// they can be deleted, all but the active one).
    pub live: BTreeMap<u64, u64>,
}

/// At most this many segments with live runs per group (64 MiB each by default: 64 TiB).
pub const MAX_LIVE_SEGMENTS: usize = 1 << 20;

/// At most this many stretches to zero in one SEGS value (20 bytes each): a checkpoint lists
/// every erased run not yet zeroed, and fails (the node stops) rather than forget one.
pub const MAX_TO_ZERO: usize = 1 << 22;

pub fn encode_segs(s: &SegsState) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + 1 + 16 + 4 + s.to_zero.len() * 20);
    b.push(SEGS_FORMAT);
    match s.mark {
        Some(m) => {
            b.push(1);
            b.extend_from_slice(&m.segment.to_be_bytes());
            b.extend_from_slice(&m.end.to_be_bytes());
        }
        None => b.push(0),
    }
    b.extend_from_slice(&(s.to_zero.len() as u32).to_be_bytes());
    for (seg, off, len) in &s.to_zero {
        b.extend_from_slice(&seg.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }
    b.extend_from_slice(&(s.live.len() as u32).to_be_bytes());
    for (seg, n) in &s.live {
        b.extend_from_slice(&seg.to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
    }
    keys::encode_value(&b)
}

pub fn decode_segs(v: &[u8]) -> Result<SegsState, keys::DecodeError> {
    let b = keys::decode_value(v)?;
    let bad = |why: &str| keys::DecodeError(format!("segments value: {why}"));
    let u64_at = |i: usize| -> Result<u64, keys::DecodeError> {
        let s: [u8; 8] = b.get(i..i + 8).and_then(|s| s.try_into().ok()).ok_or_else(|| bad("too short"))?;
        Ok(u64::from_be_bytes(s))
    };
    if b.first() != Some(&SEGS_FORMAT) {
        return Err(bad(&format!("format {:?}", b.first())));
    }
    let (mark, mut i) = match b.get(1) {
        Some(1) => (Some(Durable { segment: u64_at(2)?, end: u64_at(10)? }), 18),
        Some(0) => (None, 2),
        _ => return Err(bad("bad mark flag")),
    };
    let u32_at = |i: usize| -> Result<usize, keys::DecodeError> {
        let s: [u8; 4] = b.get(i..i + 4).and_then(|s| s.try_into().ok()).ok_or_else(|| bad("too short"))?;
        Ok(u32::from_be_bytes(s) as usize)
    };
    let n = u32_at(i)?;
    i += 4;
    if n > MAX_TO_ZERO || b.len() < i + n * 20 {
        return Err(bad(&format!("{} bytes for {n} stretches to zero", b.len())));
    }
    let mut to_zero = Vec::with_capacity(n);
    for _ in 0..n {
        to_zero.push((u64_at(i)?, u64_at(i + 8)?, u32_at(i + 16)? as u32));
        i += 20;
    }
    let n = u32_at(i)?;
    i += 4;
    if n > MAX_LIVE_SEGMENTS || b.len() != i + n * 16 {
        return Err(bad(&format!("{} bytes for {n} live segments", b.len())));
    }
    let mut live = BTreeMap::new();
    for _ in 0..n {
        live.insert(u64_at(i)?, u64_at(i + 8)?);
        i += 16;
    }
    Ok(SegsState { mark, to_zero, live })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: a run's records parse back in order; a zeroed run reads as erased; a wrong
    /// seq, a wrong count and a flipped byte are each refused with a reason.
    #[test]
    fn runs_parse_back_and_damage_is_refused() {
        let mut buf = Vec::new();
        for (i, v) in [b"aa".as_slice(), b"bbb", b""].iter().enumerate() {
            push_record(&mut buf, 7 + i as u64, v);
        }
        let got = parse_run(&buf, 7, 3, 1 << 20).expect("parse").expect("not erased");
        assert_eq!(got, vec![(7, &b"aa"[..]), (8, &b"bbb"[..]), (9, &b""[..])]);
        assert!(parse_run(&buf, 8, 3, 1 << 20).unwrap_err().contains("expected 8"));
        assert!(parse_run(&buf, 7, 2, 1 << 20).unwrap_err().contains("says 2"));
        assert_eq!(parse_run(&vec![0u8; buf.len()], 7, 3, 1 << 20), Ok(None));
        let mut bad = buf.clone();
        bad[12] ^= 1;
        assert!(parse_run(&bad, 7, 3, 1 << 20).unwrap_err().contains("crc"));
        let r = RunRef { segment: 3, offset: 32, bytes: buf.len() as u32, count: 3 };
        assert_eq!(RunRef::decode(&r.encode()), Ok(r));
        assert_eq!(r.last_seq(7), 9);
        for s in [
            SegsState::default(),
            SegsState {
                mark: Some(Durable { segment: 2, end: 999 }),
                to_zero: vec![(2, 40, 77), (3, 32, 1)],
                live: [(1, 5), (2, 1)].into_iter().collect(),
            },
        ] {
            assert_eq!(decode_segs(&encode_segs(&s)), Ok(s));
        }
    }
}
