//! The byte layout of the state machine's keys and values: the only place that knows it.
//!
//! Keys (in one sled tree, so one `apply_batch` is atomic for data and applied state; the
//! kinds CONV, DEDUPE and RUN live in the state index instead, `index.rs`,
//! reaching it through INDEX_LOG items of sled's batches):
//! ```text
//! [KEY_FORMAT_V1 u8][group u32 BE][generation u32 BE][kind u8][rest]
//!   kind META (1): rest empty                      -> applied log id + membership
//!   kind CONV (2): rest = escaped conversation id  -> the conversation's last seq
//!   kind ENV  (3): rest = escaped conversation id, seq u64 BE -> one envelope
//!   kind DEDUPE (4): rest = escaped conversation id, message_id [16] -> seq, committed_at
//!   kind DEDUPE_TIME (5): rest = entry time u64 BE, log index u64 BE
//!                     -> the (conversation, message_id) pairs that entry added
//!   kind EXPIRY (6): rest = expires_at_ms u64 BE, escaped conversation id, seq u64 BE -> empty
//!   kind CURSOR (7): rest = escaped conversation id, escaped reader id -> seq, updated_at
//!   kind RETENTION (8): rest = escaped conversation id -> empty (the limits are in CONV)
//!   kind RUN (9): rest = escaped conversation id, first seq u64 BE
//!                 -> where a run of the conversation's envelopes lies in an envelope segment
//!   kind SEGS (10): rest empty -> the group's envelope segments as the checkpoint left them
//!   kind INDEX_LOG (11): rest = number u64 BE -> a checkpoint's writes to the state index
//! ```
//! RUN and SEGS items are this node's own (they point into its files): only checkpoints write
//! them, snapshots and replica comparisons never carry them (`sm.rs` turns runs back into
//! envelopes there).
//! The format version comes first, then the big-endian group id, so sled's order is the
//! group's order and a group's data is one contiguous range. The generation changes when a
//! snapshot is installed (written beside the old data, then switched to atomically).
//!
//! Conversation ids are escaped order-preservingly: each 0x00 byte becomes 0x00 0xFF and the
//! id ends with 0x00 0x01, so the order of encoded keys equals the order of
//! `(group, conversation bytes, seq)`, and the end of the id cannot be mistaken for an
//! escaped zero whatever bytes (a seq) follow it.
//!
//! Values: `[VALUE_FORMAT_V1 u8][crc32c u32 LE of the body][body]`, checked on every read.

use crate::types::GroupId;

pub const KEY_FORMAT_V1: u8 = 1;
pub const VALUE_FORMAT_V1: u8 = 1;

pub const KIND_META: u8 = 1;
pub const KIND_CONV: u8 = 2;
pub const KIND_ENV: u8 = 3;
pub const KIND_DEDUPE: u8 = 4;
pub const KIND_DEDUPE_TIME: u8 = 5;
pub const KIND_EXPIRY: u8 = 6;
pub const KIND_CURSOR: u8 = 7;
pub const KIND_RETENTION: u8 = 8;
pub const KIND_RUN: u8 = 9;
pub const KIND_SEGS: u8 = 10;
/// A checkpoint's writes of the state index's kinds (CONV, DEDUPE, RUN), kept
/// in sled until the state index holds them durably (`index.rs`).
pub const KIND_INDEX_LOG: u8 = 11;

/// `[ver][group][gen]`.
pub const GEN_PREFIX_LEN: usize = 9;

/// Why a key or value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

pub fn gen_prefix(group: GroupId, generation: u32) -> [u8; GEN_PREFIX_LEN] {
    let mut k = [0u8; GEN_PREFIX_LEN];
    k[0] = KEY_FORMAT_V1;
    k[1..5].copy_from_slice(&group.to_be_bytes());
    k[5..9].copy_from_slice(&generation.to_be_bytes());
    k
}

/// The prefix of every key of `group`, whatever the generation.
pub fn group_prefix(group: GroupId) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = KEY_FORMAT_V1;
    k[1..5].copy_from_slice(&group.to_be_bytes());
    k
}

const ESCAPED_ZERO: u8 = 0xFF;
const END: u8 = 0x01;

fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        out.push(b);
        if b == 0 {
            out.push(ESCAPED_ZERO);
        }
    }
    out.extend_from_slice(&[0, END]);
}

/// Reads an escaped string from the front of `b`; returns it and the rest.
fn take_escaped(b: &[u8]) -> Result<(Vec<u8>, &[u8]), DecodeError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0 {
            match b.get(i + 1) {
                Some(&ESCAPED_ZERO) => {
                    out.push(0);
                    i += 2;
                    continue;
                }
                Some(&END) => return Ok((out, &b[i + 2..])),
                other => return Err(DecodeError(format!("bad escape 0x00 {other:?} in a conversation id"))),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Err(DecodeError("escaped conversation id has no terminator".into()))
}

pub fn meta_key(group: GroupId, generation: u32) -> Vec<u8> {
    let mut k = gen_prefix(group, generation).to_vec();
    k.push(KIND_META);
    k
}

pub fn conv_key(group: GroupId, generation: u32, conversation: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(GEN_PREFIX_LEN + 3 + conversation.len());
    k.extend_from_slice(&gen_prefix(group, generation));
    k.push(KIND_CONV);
    push_escaped(&mut k, conversation);
    k
}

pub fn env_key(group: GroupId, generation: u32, conversation: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(GEN_PREFIX_LEN + 11 + conversation.len());
    k.extend_from_slice(&gen_prefix(group, generation));
    k.push(KIND_ENV);
    push_escaped(&mut k, conversation);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `[ver][group][gen][kind]`: the start of every key of one kind.
pub fn kind_prefix(group: GroupId, generation: u32, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(GEN_PREFIX_LEN + 1 + 16);
    k.extend_from_slice(&gen_prefix(group, generation));
    k.push(kind);
    k
}

/// The start of every key of `kind` under one conversation (ENV, DEDUPE, CURSOR).
pub fn conv_prefix(group: GroupId, generation: u32, kind: u8, conversation: &[u8]) -> Vec<u8> {
    let mut k = kind_prefix(group, generation, kind);
    push_escaped(&mut k, conversation);
    k
}

pub fn dedupe_key(group: GroupId, generation: u32, conversation: &[u8], message_id: &[u8; 16]) -> Vec<u8> {
    let mut k = conv_prefix(group, generation, KIND_DEDUPE, conversation);
    k.extend_from_slice(message_id);
    k
}

pub fn dedupe_time_key(group: GroupId, generation: u32, at_ms: u64, index: u64) -> Vec<u8> {
    let mut k = kind_prefix(group, generation, KIND_DEDUPE_TIME);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn expiry_key(group: GroupId, generation: u32, at_ms: u64, conversation: &[u8], seq: u64) -> Vec<u8> {
    let mut k = kind_prefix(group, generation, KIND_EXPIRY);
    k.extend_from_slice(&at_ms.to_be_bytes());
    push_escaped(&mut k, conversation);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn cursor_key(group: GroupId, generation: u32, conversation: &[u8], reader: &[u8]) -> Vec<u8> {
    let mut k = conv_prefix(group, generation, KIND_CURSOR, conversation);
    push_escaped(&mut k, reader);
    k
}

pub fn retention_key(group: GroupId, generation: u32, conversation: &[u8]) -> Vec<u8> {
    conv_prefix(group, generation, KIND_RETENTION, conversation)
}

pub fn run_key(group: GroupId, generation: u32, conversation: &[u8], first_seq: u64) -> Vec<u8> {
    let mut k = conv_prefix(group, generation, KIND_RUN, conversation);
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

/// A checkpoint's index log of one group: numbered in checkpoint order.
pub fn index_log_key(group: GroupId, generation: u32, number: u64) -> Vec<u8> {
    let mut k = kind_prefix(group, generation, KIND_INDEX_LOG);
    k.extend_from_slice(&number.to_be_bytes());
    k
}

pub fn segs_key(group: GroupId, generation: u32) -> Vec<u8> {
    kind_prefix(group, generation, KIND_SEGS)
}

/// The RUN key of a run starting at `first_seq`, from an envelope key without its seq (the
/// same conversation; the kind byte changes), without decoding the conversation id.
pub fn run_key_from_env_prefix(env_without_seq: &[u8], first_seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(env_without_seq.len() + 8);
    k.extend_from_slice(env_without_seq);
    if let Some(kind) = k.get_mut(GEN_PREFIX_LEN) {
        *kind = KIND_RUN;
    }
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

/// The seq at the end of an envelope key (its last 8 bytes), without decoding the rest.
pub fn env_key_seq(env: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = env.get(env.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn take_u64<'a>(b: &'a [u8], what: &str) -> Result<(u64, &'a [u8]), DecodeError> {
    if b.len() < 8 {
        return Err(DecodeError(format!("{what}: {} bytes where 8 were expected", b.len())));
    }
    let (h, t) = b.split_at(8);
    let mut a = [0u8; 8];
    a.copy_from_slice(h);
    Ok((u64::from_be_bytes(a), t))
}

fn no_tail(tail: &[u8], what: &str) -> Result<(), DecodeError> {
    if tail.is_empty() {
        Ok(())
    } else {
        Err(DecodeError(format!("{} trailing bytes after a {what} key", tail.len())))
    }
}

/// A decoded key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Meta { group: GroupId, generation: u32 },
    Conv { group: GroupId, generation: u32, conversation: Vec<u8> },
    Env { group: GroupId, generation: u32, conversation: Vec<u8>, seq: u64 },
    Dedupe { conversation: Vec<u8>, message_id: [u8; 16] },
    DedupeTime { at_ms: u64, index: u64 },
    Expiry { at_ms: u64, conversation: Vec<u8>, seq: u64 },
    Cursor { conversation: Vec<u8>, reader: Vec<u8> },
    Retention { conversation: Vec<u8> },
    Run { conversation: Vec<u8>, first_seq: u64 },
    Segs,
    IndexLog { number: u64 },
}

/// The group and generation of a key (its first `GEN_PREFIX_LEN` bytes), if it is long
/// enough and of the known format.
pub fn group_and_generation(k: &[u8]) -> Option<(GroupId, u32)> {
    match k {
        [KEY_FORMAT_V1, g0, g1, g2, g3, n0, n1, n2, n3, ..] => {
            Some((u32::from_be_bytes([*g0, *g1, *g2, *g3]), u32::from_be_bytes([*n0, *n1, *n2, *n3])))
        }
        _ => None,
    }
}

pub fn decode_key(k: &[u8]) -> Result<Key, DecodeError> {
    if k.len() < GEN_PREFIX_LEN + 1 {
        return Err(DecodeError(format!("key of {} bytes is too short", k.len())));
    }
    let Some((group, generation)) = group_and_generation(k) else {
        return Err(DecodeError(format!("unknown key format {}", k[0])));
    };
    let rest = &k[GEN_PREFIX_LEN + 1..];
    match k[GEN_PREFIX_LEN] {
        KIND_META if rest.is_empty() => Ok(Key::Meta { group, generation }),
        KIND_CONV => match take_escaped(rest)? {
            (conversation, []) => Ok(Key::Conv { group, generation, conversation }),
            _ => Err(DecodeError("trailing bytes after a conversation key".into())),
        },
        KIND_ENV => {
            let (conversation, tail) = take_escaped(rest)?;
            let seq: [u8; 8] =
                tail.try_into().map_err(|_| DecodeError(format!("envelope key has {} seq bytes", tail.len())))?;
            Ok(Key::Env { group, generation, conversation, seq: u64::from_be_bytes(seq) })
        }
        KIND_DEDUPE => {
            let (conversation, tail) = take_escaped(rest)?;
            let message_id: [u8; 16] =
                tail.try_into().map_err(|_| DecodeError(format!("dedupe key has {} message id bytes", tail.len())))?;
            Ok(Key::Dedupe { conversation, message_id })
        }
        KIND_DEDUPE_TIME => {
            let (at_ms, tail) = take_u64(rest, "dedupe time")?;
            let (index, tail) = take_u64(tail, "dedupe index")?;
            no_tail(tail, "dedupe time")?;
            Ok(Key::DedupeTime { at_ms, index })
        }
        KIND_EXPIRY => {
            let (at_ms, tail) = take_u64(rest, "expiry time")?;
            let (conversation, tail) = take_escaped(tail)?;
            let (seq, tail) = take_u64(tail, "expiry seq")?;
            no_tail(tail, "expiry")?;
            Ok(Key::Expiry { at_ms, conversation, seq })
        }
        KIND_CURSOR => {
            let (conversation, tail) = take_escaped(rest)?;
            let (reader, tail) = take_escaped(tail)?;
            no_tail(tail, "cursor")?;
            Ok(Key::Cursor { conversation, reader })
        }
        KIND_RETENTION => {
            let (conversation, tail) = take_escaped(rest)?;
            no_tail(tail, "retention")?;
            Ok(Key::Retention { conversation })
        }
        KIND_RUN => {
            let (conversation, tail) = take_escaped(rest)?;
            let (first_seq, tail) = take_u64(tail, "run first seq")?;
            no_tail(tail, "run")?;
            Ok(Key::Run { conversation, first_seq })
        }
        KIND_SEGS => {
            no_tail(rest, "segments")?;
            Ok(Key::Segs)
        }
        KIND_INDEX_LOG => {
            let (number, tail) = take_u64(rest, "index log number")?;
            no_tail(tail, "index log")?;
            Ok(Key::IndexLog { number })
        }
        other => Err(DecodeError(format!("unknown key kind {other}"))),
    }
}

/// `[format][crc32c u32 LE]` before every value's body.
pub const VALUE_HEADER_LEN: usize = 5;

/// Frames a value body with its format version and CRC.
pub fn encode_value(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE_HEADER_LEN + body.len());
    v.push(VALUE_FORMAT_V1);
    v.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Checks a value's version and CRC and returns its body.
pub fn decode_value(v: &[u8]) -> Result<&[u8], DecodeError> {
    if v.len() < VALUE_HEADER_LEN {
        return Err(DecodeError(format!("value of {} bytes is too short", v.len())));
    }
    if v[0] != VALUE_FORMAT_V1 {
        return Err(DecodeError(format!("unknown value format {}", v[0])));
    }
    let crc = u32::from_le_bytes([v[1], v[2], v[3], v[4]]);
    if crc32c::crc32c(&v[VALUE_HEADER_LEN..]) != crc {
        return Err(DecodeError("value crc mismatch".into()));
    }
    Ok(&v[VALUE_HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Property: the order of encoded envelope keys equals the order of
        /// (group, conversation bytes, seq), and decoding inverts encoding.
        #[test]
        fn key_order_equals_tuple_order(
            a in (any::<u32>(), proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), Just(1u8), any::<u8>()], 0..12), any::<u64>()),
            b in (any::<u32>(), proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), Just(1u8), any::<u8>()], 0..12), any::<u64>()),
        ) {
            let ka = env_key(a.0, 1, &a.1, a.2);
            let kb = env_key(b.0, 1, &b.1, b.2);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_key(&ka).unwrap(), Key::Env { group: a.0, generation: 1, conversation: a.1.clone(), seq: a.2 });
            let ca = conv_key(a.0, 1, &a.1);
            let cb = conv_key(b.0, 1, &b.1);
            prop_assert_eq!(ca.cmp(&cb), (a.0, &a.1).cmp(&(b.0, &b.1)));
        }

        /// Property: every key kind decodes back to what was encoded, whatever bytes the
        /// ids hold.
        #[test]
        fn every_key_kind_round_trips(
            conv in proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), Just(1u8), any::<u8>()], 0..12),
            reader in proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()], 0..12),
            id in any::<[u8; 16]>(),
            t in any::<u64>(),
            n in any::<u64>(),
        ) {
            prop_assert_eq!(decode_key(&dedupe_key(3, 1, &conv, &id)).unwrap(), Key::Dedupe { conversation: conv.clone(), message_id: id });
            prop_assert_eq!(decode_key(&dedupe_time_key(3, 1, t, n)).unwrap(), Key::DedupeTime { at_ms: t, index: n });
            prop_assert_eq!(decode_key(&expiry_key(3, 1, t, &conv, n)).unwrap(), Key::Expiry { at_ms: t, conversation: conv.clone(), seq: n });
            prop_assert_eq!(decode_key(&cursor_key(3, 1, &conv, &reader)).unwrap(), Key::Cursor { conversation: conv.clone(), reader: reader.clone() });
            prop_assert_eq!(decode_key(&retention_key(3, 1, &conv)).unwrap(), Key::Retention { conversation: conv.clone() });
            // Expiry keys sort by time first: housekeeping scans a prefix range.
            prop_assert!(expiry_key(3, 1, t, &conv, n) < expiry_key(3, 1, t.saturating_add(1).max(t), &[0xFF; 13], 0) || t == u64::MAX);
        }

        #[test]
        fn decoding_garbage_never_panics(k in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_key(&k);
            let _ = decode_value(&k);
        }
    }

    /// Regression: a seq whose first byte is 0xFF right after the id's end must not read
    /// as an escaped zero (found by the property test with a one-byte terminator).
    #[test]
    fn id_end_is_unambiguous_before_any_seq() {
        for conv in [&b""[..], b"\0", b"a\0", b"\0\xFF"] {
            let k = env_key(1, 1, conv, u64::MAX);
            assert_eq!(
                decode_key(&k).unwrap(),
                Key::Env { group: 1, generation: 1, conversation: conv.to_vec(), seq: u64::MAX }
            );
        }
        assert!(env_key(1, 1, b"a", u64::MAX) < env_key(1, 1, b"a\0", 0));
    }

    #[test]
    fn value_crc_catches_a_flipped_bit() {
        let mut v = encode_value(b"hello");
        assert_eq!(decode_value(&v).unwrap(), b"hello");
        v[7] ^= 1;
        assert!(decode_value(&v).is_err());
    }
}
