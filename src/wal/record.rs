//! Record framing: encoding and decoding of single WAL records on byte buffers.
//!
//! Nothing here touches the file system, so every byte of the format can be
//! pinned down by unit tests. The frame layout is specified in the parent
//! module's docs.

use std::fmt;

use bytes::Bytes;
use protobuf::Message;
use raft::prelude::{Entry, HardState};

/// Bytes before the record body: `u32 LE length` + `u32 LE crc32c`.
pub const FRAME_HEADER_LEN: usize = 8;

/// Largest accepted body (type byte + payload). The encoder refuses bigger
/// records, so the decoder can treat any bigger length as damage instead of
/// trusting it for an allocation or a slice.
pub const MAX_RECORD_LEN: usize = 64 << 20;

const TYPE_HEADER: u8 = 1;
const TYPE_ENTRY: u8 = 2;
const TYPE_HARD_STATE: u8 = 3;
const TYPE_SNAPSHOT: u8 = 4;

const HEADER_PAYLOAD_LEN: usize = 8 + 8 + 4;
const SNAPSHOT_PAYLOAD_LEN: usize = 8 + 8;

/// A snapshot marker: the WAL's record that a snapshot at (index, term) exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalSnapshot {
    pub index: u64,
    pub term: u64,
}

/// First record of every segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Must equal the sequence number in the file name.
    pub seq: u64,
    /// Must equal the first index in the file name.
    pub first_index: u64,
    /// CRC chain value at the end of the previous segment (0 for the first):
    /// it seeds this segment's chain, so a segment can be verified alone
    /// after older ones were released, and it links segments together.
    pub prev_crc: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Header(SegmentHeader),
    Entry(Entry),
    HardState(HardState),
    Snapshot(WalSnapshot),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    TooLarge(usize),
    Protobuf(String),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLarge(n) => {
                write!(
                    f,
                    "record of {n} bytes exceeds the {MAX_RECORD_LEN}-byte limit"
                )
            }
            EncodeError::Protobuf(e) => write!(f, "protobuf encode: {e}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame runs past the end of the buffer.
    Truncated {
        need: u64,
        have: usize,
    },
    ZeroLength,
    TooLong(u32),
    CrcMismatch {
        stored: u32,
        computed: u32,
    },
    UnknownType(u8),
    BadPayload(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { need, have } => {
                write!(f, "truncated record: needs {need} bytes, {have} left")
            }
            DecodeError::ZeroLength => f.write_str("zero record length"),
            DecodeError::TooLong(n) => {
                write!(
                    f,
                    "record length {n} exceeds the {MAX_RECORD_LEN}-byte limit"
                )
            }
            DecodeError::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:08x}, computed {computed:08x})"
                )
            }
            DecodeError::UnknownType(t) => write!(f, "unknown record type {t}"),
            DecodeError::BadPayload(e) => write!(f, "undecodable payload: {e}"),
        }
    }
}

/// A record read back from a buffer.
#[derive(Debug)]
pub struct Decoded {
    pub record: Record,
    /// Frame size in bytes, header included.
    pub len: usize,
    /// Chain value after this record: seed for the next one.
    pub crc: u32,
}

impl Record {
    fn type_byte(&self) -> u8 {
        match self {
            Record::Header(_) => TYPE_HEADER,
            Record::Entry(_) => TYPE_ENTRY,
            Record::HardState(_) => TYPE_HARD_STATE,
            Record::Snapshot(_) => TYPE_SNAPSHOT,
        }
    }
}

/// Appends one framed record to `out`, chaining its CRC from `prev_crc`, and
/// returns the new chain value. On error `out` is left as it was.
pub fn encode(rec: &Record, prev_crc: u32, out: &mut Vec<u8>) -> Result<u32, EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.push(rec.type_byte());
    let payload = match rec {
        Record::Header(h) => {
            out.extend_from_slice(&h.seq.to_le_bytes());
            out.extend_from_slice(&h.first_index.to_le_bytes());
            out.extend_from_slice(&h.prev_crc.to_le_bytes());
            Ok(())
        }
        Record::Entry(e) => e.write_to_vec(out),
        Record::HardState(hs) => hs.write_to_vec(out),
        Record::Snapshot(s) => {
            out.extend_from_slice(&s.index.to_le_bytes());
            out.extend_from_slice(&s.term.to_le_bytes());
            Ok(())
        }
    };
    if let Err(e) = payload {
        out.truncate(start);
        return Err(EncodeError::Protobuf(e.to_string()));
    }
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    if body_len > MAX_RECORD_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge(body_len));
    }
    let crc = crc32c::crc32c_append(prev_crc, &out[start + FRAME_HEADER_LEN..]);
    // body_len <= MAX_RECORD_LEN, so it fits in a u32.
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(crc)
}

/// Decodes the record at the start of `buf`, checking its CRC against the
/// chain seeded with `prev_crc`. `buf` must not be empty (that is EOF, which
/// the caller handles). Never panics and never allocates from an unchecked
/// length.
#[cfg(test)]
pub fn decode(buf: &[u8], prev_crc: u32) -> Result<Decoded, DecodeError> {
    decode_in(buf, prev_crc, None)
}

/// [`decode`] of a `buf` inside `backing`: an entry's data is then a slice of `backing`
/// rather than a copy (replaying a WAL of large values copied each one more time).
pub fn decode_in(
    buf: &[u8],
    prev_crc: u32,
    backing: Option<&Bytes>,
) -> Result<Decoded, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(DecodeError::Truncated {
            need: FRAME_HEADER_LEN as u64,
            have: buf.len(),
        });
    }
    let len = le_u32(&buf[0..4]);
    let stored = le_u32(&buf[4..8]);
    if len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    let total = FRAME_HEADER_LEN as u64 + u64::from(len);
    if total > buf.len() as u64 {
        return Err(DecodeError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    if len as usize > MAX_RECORD_LEN {
        return Err(DecodeError::TooLong(len));
    }
    let total = total as usize;
    let body = &buf[FRAME_HEADER_LEN..total];
    let computed = crc32c::crc32c_append(prev_crc, body);
    if computed != stored {
        return Err(DecodeError::CrcMismatch { stored, computed });
    }
    Ok(Decoded {
        record: decode_body(body, backing)?,
        len: total,
        crc: computed,
    })
}

/// Reads the `prev_crc` of a header record at the start of `buf` without
/// checking its CRC: the chain seed is needed before the CRC can be checked.
pub fn peek_prev_crc(buf: &[u8]) -> Option<u32> {
    let body_end = FRAME_HEADER_LEN + 1 + HEADER_PAYLOAD_LEN;
    if buf.len() < body_end
        || le_u32(&buf[0..4]) as usize != 1 + HEADER_PAYLOAD_LEN
        || buf[FRAME_HEADER_LEN] != TYPE_HEADER
    {
        return None;
    }
    Some(le_u32(&buf[body_end - 4..body_end]))
}

fn decode_body(body: &[u8], backing: Option<&Bytes>) -> Result<Record, DecodeError> {
    let (ty, payload) = match body.split_first() {
        Some((ty, payload)) => (*ty, payload),
        None => return Err(DecodeError::ZeroLength),
    };
    let bad = |e: protobuf::ProtobufError| DecodeError::BadPayload(e.to_string());
    let wrong_len = |want: usize| {
        DecodeError::BadPayload(format!(
            "type {ty} payload is {} bytes, want {want}",
            payload.len()
        ))
    };
    match ty {
        TYPE_HEADER if payload.len() == HEADER_PAYLOAD_LEN => Ok(Record::Header(SegmentHeader {
            seq: le_u64(&payload[0..8]),
            first_index: le_u64(&payload[8..16]),
            prev_crc: le_u32(&payload[16..20]),
        })),
        TYPE_HEADER => Err(wrong_len(HEADER_PAYLOAD_LEN)),
        TYPE_ENTRY => match backing {
            Some(b) => Entry::parse_from_carllerche_bytes(&b.slice_ref(payload)),
            None => Entry::parse_from_bytes(payload),
        }
        .map(Record::Entry)
        .map_err(bad),
        TYPE_HARD_STATE => HardState::parse_from_bytes(payload)
            .map(Record::HardState)
            .map_err(bad),
        TYPE_SNAPSHOT if payload.len() == SNAPSHOT_PAYLOAD_LEN => {
            Ok(Record::Snapshot(WalSnapshot {
                index: le_u64(&payload[0..8]),
                term: le_u64(&payload[8..16]),
            }))
        }
        TYPE_SNAPSHOT => Err(wrong_len(SNAPSHOT_PAYLOAD_LEN)),
        other => Err(DecodeError::UnknownType(other)),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn samples() -> Vec<Record> {
        let hs = HardState {
            term: 7,
            vote: 2,
            commit: 41,
            ..Default::default()
        };
        vec![
            Record::Header(SegmentHeader {
                seq: 3,
                first_index: 100,
                prev_crc: 0xdead_beef,
            }),
            Record::Entry(entry(5, 2, &[0xff, 0x00, 0xfe])),
            Record::Entry(entry(6, 2, b"")),
            Record::HardState(hs),
            Record::HardState(HardState::default()),
            Record::Snapshot(WalSnapshot {
                index: 1 << 40,
                term: 9,
            }),
        ]
    }

    #[test]
    fn round_trip_every_type_with_chained_crc() {
        let mut buf = Vec::new();
        let mut crc = 0x1234_5678;
        let seed = crc;
        for rec in samples() {
            crc = encode(&rec, crc, &mut buf).unwrap();
        }
        let (mut off, mut crc) = (0, seed);
        for want in samples() {
            let d = decode(&buf[off..], crc).unwrap();
            assert_eq!(d.record, want);
            off += d.len;
            crc = d.crc;
        }
        assert_eq!(off, buf.len());
    }

    #[test]
    fn framing_is_byte_exact() {
        let rec = Record::Snapshot(WalSnapshot { index: 5, term: 2 });
        let mut buf = Vec::new();
        let crc = encode(&rec, 0, &mut buf).unwrap();
        let mut body = vec![TYPE_SNAPSHOT];
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend_from_slice(&2u64.to_le_bytes());
        let mut want = 17u32.to_le_bytes().to_vec();
        want.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        want.extend_from_slice(&body);
        assert_eq!(buf, want);
        assert_eq!(crc, crc32c::crc32c(&body));

        // Chained: the next record's crc is seeded with this one's.
        let crc2 = encode(&rec, crc, &mut buf).unwrap();
        assert_eq!(crc2, crc32c::crc32c_append(crc, &body));
        assert_eq!(&buf[want.len() + 4..want.len() + 8], &crc2.to_le_bytes());
    }

    #[test]
    fn header_prev_crc_is_peekable() {
        let mut buf = Vec::new();
        let h = SegmentHeader {
            seq: 1,
            first_index: 2,
            prev_crc: 0xabcd_0123,
        };
        encode(&Record::Header(h), h.prev_crc, &mut buf).unwrap();
        assert_eq!(peek_prev_crc(&buf), Some(0xabcd_0123));
        assert_eq!(peek_prev_crc(&buf[..buf.len() - 1]), None);
    }

    #[test]
    fn wrong_seed_is_a_crc_mismatch() {
        let mut buf = Vec::new();
        encode(&Record::Entry(entry(1, 1, b"x")), 1, &mut buf).unwrap();
        assert!(matches!(
            decode(&buf, 2),
            Err(DecodeError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn damaged_frames_are_classified() {
        let mut buf = Vec::new();
        encode(&Record::Entry(entry(1, 1, b"abc")), 0, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..cut.max(1)], 0),
                Err(DecodeError::Truncated { .. })
            ));
        }
        assert_eq!(decode(&[0; 16], 0).unwrap_err(), DecodeError::ZeroLength);

        let mut big = vec![0; 16];
        big[..4].copy_from_slice(&(MAX_RECORD_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode(&big, 0),
            Err(DecodeError::Truncated { .. })
        ));

        let mut unknown = Vec::new();
        let body = [99u8, 1, 2];
        unknown.extend_from_slice(&3u32.to_le_bytes());
        unknown.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        unknown.extend_from_slice(&body);
        assert_eq!(
            decode(&unknown, 0).unwrap_err(),
            DecodeError::UnknownType(99)
        );
    }

    #[test]
    fn oversized_record_is_refused() {
        let mut buf = vec![1, 2, 3];
        let rec = Record::Entry(entry(1, 1, &vec![0; MAX_RECORD_LEN]));
        assert!(matches!(
            encode(&rec, 0, &mut buf),
            Err(EncodeError::TooLarge(_))
        ));
        assert_eq!(buf, [1, 2, 3]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 1..256), seed: u32) {
            let _ = decode(&buf, seed);
        }

        /// A valid CRC over garbage must still only ever yield an error.
        #[test]
        fn garbage_body_with_valid_crc_never_panics(
            ty in 0u8..8,
            payload in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut body = vec![ty];
            body.extend_from_slice(&payload);
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            let _ = decode(&buf, 0);
        }
    }
}
