//! Proposals on their way into raft: PUTs held while the leader's disk is busy, packed into
//! entries, and stepped in bounded `MsgPropose`s.

use protobuf::Message as _;
use raft::prelude::*;

use crate::channels::{Apply, Proposal};
use crate::storage::RaftStorage;

/// Encoded PUTs packed into one entry; a batch larger than this continues in the next one.
pub const ENTRY_BYTES: usize = 256 << 10;
/// Largest `MsgPropose` stepped at once (an entry larger than this goes alone), which is also
/// raft's cap on the entries of one `MsgAppend`: on a follower the message is forwarded whole
/// to the leader, and one stream frame must carry it (see `transport::MAX_FRAME`) without
/// holding up the heartbeats behind it for long.
pub const PROPOSE_BYTES: usize = 1 << 20;
// A message holds at most PROPOSE_BYTES of entries, or one entry, which is no larger than a
// WAL record (see `config::MAX_REQUEST_BYTES`); either fits a frame.
const _: () = assert!(
    PROPOSE_BYTES < crate::transport::MAX_FRAME
        && crate::wal::MAX_RECORD_LEN + (1 << 20) < crate::transport::MAX_FRAME
);

/// Proposals waiting to be proposed as one batch, and the ids of the local ones, reported to
/// the kvstore if raft drops them (entries forwarded by followers have none: their proposer
/// waits on its own node for the entry to apply). Local PUTs are packed back to back into as
/// few entries as [`ENTRY_BYTES`] allows (see [`crate::kvstore::decode_puts`]): raft's
/// bookkeeping, the log kept in memory and the WAL all cost per entry.
#[derive(Default)]
pub struct Held {
    /// Entries ready to propose: packed ones and those followers forwarded (packed there).
    entries: Vec<Entry>,
    /// PUTs packed into the next entry.
    packing: Vec<u8>,
    /// Local proposals and forwarded entries held, which bounds the batch.
    pub count: usize,
    ids: Vec<u64>,
    /// How many of `ids` each of `entries` carries, and how many `packing` does.
    entry_ids: Vec<usize>,
    packing_ids: usize,
}

impl Held {
    pub fn push(&mut self, p: Proposal) {
        if !self.packing.is_empty() && self.packing.len() + p.data.len() > ENTRY_BYTES {
            self.seal();
        }
        if self.packing.is_empty() {
            self.packing = p.data;
        } else {
            self.packing.extend_from_slice(&p.data);
        }
        self.ids.push(p.id);
        self.packing_ids += 1;
        self.count += 1;
    }

    pub fn forwarded(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for e in entries {
            self.entries.push(e);
            self.entry_ids.push(0);
            self.count += 1;
        }
    }

    pub fn seal(&mut self) {
        if self.packing.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.packing);
        // The entry stays in the in-memory log until compacted; growth slack would stay too.
        data.shrink_to_fit();
        self.entries.push(Entry {
            data: data.into(),
            ..Default::default()
        });
        self.entry_ids.push(std::mem::take(&mut self.packing_ids));
    }

    /// Proposes everything held in `MsgPropose`s of up to [`PROPOSE_BYTES`] (what
    /// `RawNode::propose` builds, with many entries instead of one), so raft appends and
    /// replicates them together and a follower forwards them to the leader in few messages.
    /// Returns what to tell the kvstore about the PUTs of the messages raft dropped.
    pub fn propose(&mut self, node: &mut RawNode<RaftStorage>) -> Option<Apply> {
        if self.count == 0 {
            return None;
        }
        self.seal();
        let Held {
            entries,
            ids,
            entry_ids,
            ..
        } = std::mem::take(self);
        let mut ids = ids.into_iter();
        let mut dropped = Vec::new();
        let mut reason = String::new();
        let mut chunk = Vec::new();
        let (mut chunk_ids, mut chunk_bytes) = (0, 0);
        let mut entries = entries.into_iter().zip(entry_ids).peekable();
        while let Some((e, n)) = entries.next() {
            // The entry's own bytes plus its tag and length in the message.
            chunk_bytes += e.compute_size() as usize + 6;
            chunk_ids += n;
            chunk.push(e);
            let next_fits = entries
                .peek()
                .is_some_and(|(e, _)| chunk_bytes + e.compute_size() as usize + 6 <= PROPOSE_BYTES);
            if next_fits {
                continue;
            }
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = node.raft.id;
            m.set_entries(std::mem::take(&mut chunk).into());
            let res = node.step(m);
            crate::metrics::proposals(res.is_ok(), chunk_ids);
            let these = ids.by_ref().take(chunk_ids);
            match res {
                Ok(()) => these.for_each(drop),
                Err(e) => {
                    dropped.extend(these);
                    reason = e.to_string();
                }
            }
            (chunk_ids, chunk_bytes) = (0, 0);
        }
        (!dropped.is_empty()).then_some(Apply::Dropped {
            ids: dropped,
            reason,
        })
    }
}
