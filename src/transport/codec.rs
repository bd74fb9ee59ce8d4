//! The wire format of raft messages between peers: protobuf, length-delimited, as a batch
//! (`POST /raft`) or as the frames of a stream.

use bytes::{Buf, Bytes, BytesMut};
use protobuf::{CodedInputStream, Message as _};
use raft::prelude::Message;

use super::{Error, MAX_FRAME};

/// Encodes messages as a protobuf length-delimited stream.
pub fn encode_batch(msgs: &[Message]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_batch_into(msgs, &mut buf);
    buf
}

/// [`encode_batch`], appending to `buf` (the stream sender reuses one buffer).
pub(super) fn encode_batch_into(msgs: &[Message], buf: &mut Vec<u8>) {
    buf.reserve(msgs.iter().map(|m| m.compute_size() as usize + 5).sum());
    for m in msgs {
        m.write_length_delimited_to_vec(buf)
            .expect("writing a protobuf message to a Vec cannot fail");
    }
}

/// Entry and snapshot data in the messages are slices of `buf`, not copies.
pub fn decode_batch(buf: &Bytes) -> Result<Vec<Message>, Error> {
    let mut is = CodedInputStream::from_carllerche_bytes(buf);
    let mut msgs = Vec::new();
    while !is.eof()? {
        msgs.push(is.read_message::<Message>()?);
    }
    Ok(msgs)
}

/// Takes one length-delimited message off the front of `buf`, if it holds a whole one.
pub(super) fn next_frame(buf: &mut BytesMut) -> Result<Option<Message>, Error> {
    let mut len: u64 = 0;
    let mut header = 0;
    loop {
        let Some(&b) = buf.get(header) else {
            return Ok(None);
        };
        if header == 10 {
            return Err(Error::BadLength);
        }
        len |= u64::from(b & 0x7f) << (7 * header);
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if len > MAX_FRAME as u64 {
        return Err(Error::FrameTooLarge(len));
    }
    let len = len as usize;
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    buf.advance(header);
    // Frozen, so a snapshot's data is a slice of the frame rather than a copy of it.
    let frame = buf.split_to(len).freeze();
    Ok(Some(Message::parse_from_carllerche_bytes(&frame)?))
}
