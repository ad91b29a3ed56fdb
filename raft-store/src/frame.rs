//! The record frame shared by every append-only file of this crate (the WAL's segments and
//! the envelope segments): `body_len u32 LE | crc32c u32 LE of body | body`.
//!
//! Only the frame lives here; what a body holds is each file's own business
//! (`wal/record.rs`, `envseg.rs`).

/// `body_len` + `crc`.
pub const FRAME_LEN: usize = 8;

/// Appends one framed record to `buf`: reserves the frame, lets `body` write the body, then
/// fills in its length and CRC.
pub fn push(buf: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_LEN]);
    body(buf);
    let body_len = (buf.len() - start - FRAME_LEN) as u32;
    let crc = crc32c::crc32c(&buf[start + FRAME_LEN..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, PartialEq, Eq)]
pub enum Damage {
    /// Fewer than [`FRAME_LEN`] bytes are left.
    ShortFrame,
    /// The frame names a body longer than the caller's limit.
    TooLong { body_len: usize, max_body: usize },
    /// The body runs past the end of the data.
    PastEnd { body_len: usize },
    /// The whole record is there but its CRC does not match.
    CrcMismatch,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::ShortFrame => write!(f, "incomplete record frame"),
            Damage::TooLong { body_len, max_body } => write!(f, "record length {body_len} over the limit {max_body}"),
            Damage::PastEnd { body_len } => write!(f, "record of {body_len} bytes runs past the end of the file"),
            Damage::CrcMismatch => write!(f, "record crc mismatch"),
        }
    }
}

/// Reads the record that starts at `pos` in `data`, checking its length against `max_body`
/// and its CRC. Returns the body and the offset where the next record starts.
pub fn parse(data: &[u8], pos: usize, max_body: usize) -> Result<(&[u8], usize), Damage> {
    let frame = data.get(pos..pos.saturating_add(FRAME_LEN)).ok_or(Damage::ShortFrame)?;
    let body_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
    if body_len > max_body {
        return Err(Damage::TooLong { body_len, max_body });
    }
    let end = pos + FRAME_LEN + body_len;
    let body = data.get(pos + FRAME_LEN..end).ok_or(Damage::PastEnd { body_len })?;
    if crc32c::crc32c(body) != crc {
        return Err(Damage::CrcMismatch);
    }
    Ok((body, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_record_parses_back_and_every_damage_is_named() {
        let mut buf = b"xx".to_vec();
        push(&mut buf, |b| b.extend_from_slice(b"hello"));
        let end = buf.len();
        assert_eq!(parse(&buf, 2, 64), Ok((&b"hello"[..], end)));
        assert_eq!(parse(&buf, 2, 4), Err(Damage::TooLong { body_len: 5, max_body: 4 }));
        assert_eq!(parse(&buf[..end - 1], 2, 64), Err(Damage::PastEnd { body_len: 5 }));
        assert_eq!(parse(&buf[..5], 2, 64), Err(Damage::ShortFrame));
        assert_eq!(parse(&buf, end, 64), Err(Damage::ShortFrame));
        buf[end - 1] ^= 1;
        assert_eq!(parse(&buf, 2, 64), Err(Damage::CrcMismatch));
        assert_eq!(Damage::CrcMismatch.to_string(), "record crc mismatch");
    }
}
