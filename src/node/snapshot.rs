//! When to take a snapshot, and what one holds: the snapshot payload's format (membership plus
//! the map), the counters of raftexample's `maybeTriggerSnapshot`, and the task a snapshot
//! thread (or the simulator) runs to stream the captured map into its `.snap` file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use bytes::Bytes;
use raft::prelude::*;
use tokio::sync::oneshot;

use crate::channels::SnapshotSource;
use crate::snap::Snapshotter;

/// Above this size a snapshot is taken only once the log since the last one holds at least
/// as many bytes (as well as `--snapshot-count` entries): each snapshot rewrites the whole
/// map, so with a fixed entry count a growing map makes every snapshot dearer, while this keeps
/// the snapshot work per byte written constant (about one byte rewritten per byte logged; a
/// restart replays at most about a snapshot's worth of log). Small maps keep raftexample's
/// plain count.
const AMORTIZE_ABOVE: u64 = 4 << 20;

/// Snapshot payload: the membership the log no longer holds after compaction, and the map.
/// Laid out as bincode 1.3 lays out `(members, removed, kv as bytes)`, then a trailer of the
/// learners kept as read replicas (see [`super::learners::encode_trailer`]; snapshots written
/// before learners existed have none).
#[derive(Debug, PartialEq)]
pub struct SnapshotData {
    pub members: BTreeMap<u64, String>,
    pub removed: BTreeSet<u64>,
    /// The state machine's encoding of the map; shares the snapshot's buffer.
    pub kv: Bytes,
    /// Learners kept as read replicas.
    pub kept: BTreeSet<u64>,
}

/// The payload up to the map: members, removed ids and the map's length. The map follows,
/// streamed by the state machine straight into the `.snap` file.
pub fn data_header(
    members: &BTreeMap<u64, String>,
    removed: &BTreeSet<u64>,
    kv_len: u64,
) -> Vec<u8> {
    let mut buf =
        bincode::serialize(&(members, removed)).expect("serialising ids and strings cannot fail");
    buf.extend_from_slice(&kv_len.to_le_bytes());
    buf
}

pub fn decode_data(data: &Bytes) -> Result<SnapshotData, String> {
    let (members, removed): (BTreeMap<u64, String>, BTreeSet<u64>) =
        bincode::deserialize(data).map_err(|e| e.to_string())?;
    let at = bincode::serialized_size(&(&members, &removed)).map_err(|e| e.to_string())? as usize;
    let len = data
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or("truncated before the map")?;
    if len > (data.len() - at - 8) as u64 {
        return Err(format!(
            "map length {len} exceeds the {} bytes present",
            data.len() - at - 8
        ));
    }
    let end = at + 8 + len as usize;
    Ok(SnapshotData {
        members,
        removed,
        kv: data.slice(at + 8..end),
        kept: super::learners::decode_trailer(&data[end..])?,
    })
}

/// A snapshot to take: everything but the map, which the I/O shell captures once the kvstore
/// has applied `wait`'s batch (so the map holds exactly the entries up to `meta.index`).
pub struct SnapshotTask {
    pub meta: SnapshotMetadata,
    pub members: BTreeMap<u64, String>,
    pub removed: BTreeSet<u64>,
    /// Learners kept as read replicas.
    pub kept: BTreeSet<u64>,
    /// Fires when the kvstore has applied the last batch sent (raftexample's `applyDoneC`).
    pub wait: Option<oneshot::Receiver<()>>,
}

/// A `.snap` file written for a [`SnapshotTask`]: its metadata, path and data size.
pub struct Written {
    pub meta: SnapshotMetadata,
    pub path: PathBuf,
    pub data_len: u64,
}

/// A snapshot written, or why it could not be.
pub type SnapshotDone = Result<Written, crate::snap::Error>;

/// A snapshot whose `.snap.tmp` file is written and synced (see [`SnapshotTask::begin`]).
pub struct Begun {
    meta: SnapshotMetadata,
    tmp: crate::snap::TmpSnapshot,
    data_len: u64,
}

impl Begun {
    /// Renames the file into place: the snapshot exists from now on.
    pub fn finish(self, snapshotter: &Snapshotter) -> SnapshotDone {
        Ok(Written {
            path: snapshotter.commit(self.tmp)?,
            meta: self.meta,
            data_len: self.data_len,
        })
    }
}

impl SnapshotTask {
    /// Streams the header, the captured map and the trailer into the `.snap` file and makes
    /// it durable: the expensive part, run off the raft loop.
    pub fn write(self, snapshotter: &Snapshotter, source: &dyn SnapshotSource) -> SnapshotDone {
        self.begin(snapshotter, source)?.finish(snapshotter)
    }

    /// [`Self::write`] up to the rename: the simulator lets other work (a purge, say) run
    /// before [`Begun::finish`], as it may while a real snapshot thread writes.
    pub fn begin(
        self,
        snapshotter: &Snapshotter,
        source: &dyn SnapshotSource,
    ) -> Result<Begun, crate::snap::Error> {
        let kv_len = source.encoded_len();
        let header = data_header(&self.members, &self.removed, kv_len);
        let trailer = super::learners::encode_trailer(&self.kept);
        let data_len = header.len() as u64 + kv_len + trailer.len() as u64;
        let tmp = snapshotter.write_tmp(&self.meta, data_len, |w| {
            w.write_all(&header)?;
            source.write_to(w)?;
            w.write_all(&trailer)
        })?;
        // The state may now use the durable file in place of its own copy. If the file cannot
        // be mapped, it keeps its own: that costs memory, not correctness.
        if let Ok((data, pages)) = snapshotter.map_data(&tmp) {
            let at = header.len();
            source.written(data.slice(at..at + kv_len as usize), pages);
        }
        Ok(Begun {
            meta: self.meta,
            tmp,
            data_len,
        })
    }
}

/// raftexample's snapshot trigger: counts what was applied since the last snapshot.
pub struct Policy {
    pub snapshot_count: u64,
    pub catchup_entries: u64,
    pub max_snapshots: usize,
    /// Index of the newest snapshot taken or installed.
    pub index: u64,
    /// Payload size of the newest snapshot, and entry bytes applied since it was taken.
    pub bytes: u64,
    pub log_bytes: u64,
    /// Writes applied since the last snapshot was taken or installed: PUTs (an entry packs
    /// several) plus other entries, one each, which is what raftexample's entry count meant.
    pub writes: u64,
    /// A snapshot is being written; one at a time.
    pub in_flight: bool,
}

impl Policy {
    pub fn due(&self) -> bool {
        !self.in_flight
            && self.writes > self.snapshot_count
            && (self.bytes < AMORTIZE_ABOVE || self.log_bytes >= self.bytes)
    }

    /// A snapshot now covers everything applied.
    pub fn reset(&mut self, index: u64, bytes: u64) {
        self.index = index;
        self.bytes = bytes;
        self.log_bytes = 0;
        self.writes = 0;
    }

    pub fn count(&mut self, e: &Entry) {
        self.log_bytes += e.data.len() as u64;
        self.writes += entry_writes(e);
    }
}

/// The writes an entry counts for as raftexample counts entries: its PUTs, or 1 for any other
/// entry (a membership change, a new leader's no-op).
pub fn entry_writes(e: &Entry) -> u64 {
    match e.get_entry_type() {
        EntryType::EntryNormal if !e.data.is_empty() => crate::kvstore::count_writes(&e.data),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// The payload keeps the layout bincode gives `(members, removed, kv)` with `kv` as bytes,
    /// decodes to what was encoded, and a truncated one is an error, not a panic.
    #[test]
    fn snapshot_data_round_trip() {
        #[derive(Serialize)]
        struct Bincode<'a> {
            members: &'a BTreeMap<u64, String>,
            removed: &'a BTreeSet<u64>,
            #[serde(serialize_with = "as_bytes")]
            kv: &'a [u8],
        }
        fn as_bytes<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
        let members: BTreeMap<u64, String> =
            [(1, "http://a".to_string()), (3, "http://c".into())].into();
        let removed: BTreeSet<u64> = [2].into();
        let kv = b"map bytes".to_vec();
        let mut enc = data_header(&members, &removed, kv.len() as u64);
        enc.extend_from_slice(&kv);
        let old = bincode::serialize(&Bincode {
            members: &members,
            removed: &removed,
            kv: &kv,
        })
        .unwrap();
        assert_eq!(enc, old);
        let enc = Bytes::from(enc);
        let got = decode_data(&enc).unwrap();
        assert_eq!(
            got,
            SnapshotData {
                members,
                removed,
                kv: kv.clone().into(),
                kept: BTreeSet::new(),
            }
        );
        for cut in 0..enc.len() {
            assert!(
                decode_data(&enc.slice(..cut)).is_err(),
                "prefix of {cut} bytes"
            );
        }
        // Kept learners follow the map; a cut inside them is an error too.
        let kept: BTreeSet<u64> = [4, 9].into();
        let mut with = enc.to_vec();
        with.extend_from_slice(&super::super::learners::encode_trailer(&kept));
        let with = Bytes::from(with);
        let got = decode_data(&with).unwrap();
        assert_eq!((got.kv, got.kept), (Bytes::from(kv), kept));
        for cut in enc.len() + 1..with.len() {
            assert!(
                decode_data(&with.slice(..cut)).is_err(),
                "prefix of {cut} bytes"
            );
        }
    }
}
