//! `RaftStorage`: the in-memory raft log that `RawNode` reads, a port of etcd's `MemoryStorage`.
//!
//! The raft task owns it (through `RawNode::mut_store`) and is its only writer: it appends what
//! the WAL has made durable and installs or creates snapshots. raft-rs's own `MemStorage` cannot
//! serve a snapshot that carries data and loses the term of the compaction point, which is why
//! this exists. It reads and writes no channel.

use std::path::PathBuf;
use std::sync::{mpsc, Mutex};

use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::vfs::Disk;

/// Entries since the last compaction plus the last snapshot (its data in memory, or in its
/// `.snap` file).
///
/// `ents[0]` is a dummy entry whose index and term are those of the compaction point, so
/// `term(first_index - 1)` always answers, as raft requires.
pub struct RaftStorage {
    hard_state: HardState,
    /// The newest snapshot, served to followers behind the compacted log.
    snapshot: Snapshot,
    /// Set when `snapshot` carries only metadata and its data is read from this file on
    /// demand (raft asks only when a follower is behind the compacted log).
    snapshot_file: Option<PathBuf>,
    /// What `snapshot_file` is read from.
    disk: Disk,
    /// The snapshot file being read for a follower, off the raft task.
    loading: Mutex<Option<Loading>>,
    /// Read snapshot files on the raft task instead (the simulator: one thread, one seed).
    inline_reads: bool,
    conf_state: ConfState,
    ents: Vec<Entry>,
}

impl Default for RaftStorage {
    fn default() -> Self {
        RaftStorage::new(Disk::default())
    }
}

/// A snapshot file being read by a thread of its own.
struct Loading {
    index: u64,
    done: mpsc::Receiver<Result<Snapshot, crate::snap::Error>>,
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl RaftStorage {
    pub fn new(disk: Disk) -> RaftStorage {
        RaftStorage {
            hard_state: HardState::default(),
            snapshot: Snapshot::default(),
            snapshot_file: None,
            disk,
            loading: Mutex::new(None),
            inline_reads: false,
            conf_state: ConfState::default(),
            ents: vec![Entry::default()],
        }
    }

    /// Snapshot files are read when raft asks, on its own thread, so that a seed replays.
    pub fn read_snapshots_inline(&mut self) {
        self.inline_reads = true;
    }

    fn offset(&self) -> u64 {
        self.ents[0].index
    }

    fn last(&self) -> u64 {
        self.offset() + self.ents.len() as u64 - 1
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Records a commit index learnt from a `LightReady`, which raft-rs never repeats in a `Ready.hs`.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// The newest snapshot, as saved by `create_snapshot` or `apply_snapshot`.
    pub fn last_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Replaces the whole log with `snap` (a snapshot received from the leader or loaded at start).
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> raft::Result<()> {
        let meta = snap.get_metadata();
        if meta.index < self.snapshot.get_metadata().index {
            return Err(store_err(StorageError::SnapshotOutOfDate));
        }
        self.ents = vec![Entry {
            index: meta.index,
            term: meta.term,
            ..Default::default()
        }];
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap;
        self.snapshot_file = None;
        Ok(())
    }

    /// Builds the snapshot at `index` (≤ last index) from the application's `data`; the caller
    /// saves it to disk, then compacts.
    pub fn create_snapshot(
        &mut self,
        index: u64,
        cs: ConfState,
        data: Vec<u8>,
    ) -> raft::Result<&Snapshot> {
        if index <= self.snapshot.get_metadata().index {
            return Err(store_err(StorageError::SnapshotOutOfDate));
        }
        if index > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let term = self.ents[(index - self.offset()) as usize].term;
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs);
        self.snapshot = snap;
        self.snapshot_file = None;
        Ok(&self.snapshot)
    }

    /// Adopts a snapshot built elsewhere from the state at its index (≤ last index), unless a
    /// newer one (say, from the leader) arrived meanwhile. Returns whether it was adopted.
    pub fn set_snapshot(&mut self, snap: Snapshot) -> bool {
        let index = snap.get_metadata().index;
        if index <= self.snapshot.get_metadata().index || index > self.last() {
            return false;
        }
        self.snapshot = snap;
        self.snapshot_file = None;
        true
    }

    /// [`Self::set_snapshot`] for a snapshot whose data stays in the `.snap` file at `path`.
    pub fn set_snapshot_on_disk(&mut self, meta: SnapshotMetadata, path: PathBuf) -> bool {
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        let adopted = self.set_snapshot(snap);
        if adopted {
            self.snapshot_file = Some(path);
        }
        adopted
    }

    /// Drops the in-memory data of the current snapshot, which is durable in `path`.
    pub fn release_snapshot_data(&mut self, path: PathBuf) {
        self.snapshot.data = Default::default();
        self.snapshot_file = Some(path);
    }

    /// The index to compact to after a snapshot at `index` (≤ last index) so that the entries
    /// kept up to `index` weigh at least `keep` in all, or the current compaction point if the
    /// whole log weighs less.
    pub fn catchup_start(&self, index: u64, keep: u64, weight: impl Fn(&Entry) -> u64) -> u64 {
        let offset = self.offset();
        if keep == 0 {
            return index.max(offset);
        }
        let end = (index.min(self.last()).saturating_sub(offset) + 1) as usize;
        let mut total = 0;
        for e in self.ents[1..end].iter().rev() {
            total += weight(e);
            if total >= keep {
                return e.index - 1;
            }
        }
        offset
    }

    /// Drops entries before `compact_index`; it becomes the new dummy entry.
    pub fn compact(&mut self, compact_index: u64) -> raft::Result<()> {
        let offset = self.offset();
        if compact_index <= offset {
            // Already compacted: a snapshot count below the catch-up count asks for this often.
            return Ok(());
        }
        if compact_index > self.last() {
            return Err(store_err(StorageError::Unavailable));
        }
        let i = (compact_index - offset) as usize;
        self.ents.drain(..i);
        let dummy = &mut self.ents[0];
        dummy.data = Default::default();
        dummy.context = Default::default();
        dummy.set_entry_type(EntryType::EntryNormal);
        Ok(())
    }

    /// Appends entries that the WAL already holds, truncating any conflicting suffix.
    pub fn append(&mut self, entries: &[Entry]) -> raft::Result<()> {
        let Some(first_new) = entries.first() else {
            return Ok(());
        };
        let first = self.offset() + 1;
        let last_new = first_new.index + entries.len() as u64 - 1;
        if last_new < first {
            // Everything is already compacted away.
            return Ok(());
        }
        // Skip the part of `entries` that is already compacted.
        let skip = first.saturating_sub(first_new.index) as usize;
        let entries = &entries[skip..];
        let start = entries[0].index;
        if start > self.last() + 1 {
            return Err(store_err(StorageError::Unavailable));
        }
        self.ents.truncate((start - self.offset()) as usize);
        self.ents.extend_from_slice(entries);
        Ok(())
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let offset = self.offset();
        if low <= offset {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(store_err(StorageError::Unavailable));
        }
        let mut ents = self.ents[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let offset = self.offset();
        if idx < offset {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(self.ents[(idx - offset) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.offset() + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index == 0 {
            // Nothing taken yet; raft retries later. Only reachable if entries were compacted
            // without a snapshot, which this crate never does.
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        let Some(path) = &self.snapshot_file else {
            return Ok(self.snapshot.clone());
        };
        let meta = self.snapshot.get_metadata();
        if self.inline_reads {
            return crate::snap::read(&self.disk, path, meta.term, meta.index)
                .map_err(|_| store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut loading = self
            .loading
            .lock()
            .expect("a panic while holding the loading lock");
        if let Some(l) = loading.take().filter(|l| l.index == meta.index) {
            match l.done.try_recv() {
                // Handed out once: a file of hundreds of MB is not kept in memory for a
                // follower that may never ask again.
                Ok(Ok(snap)) => return Ok(snap),
                Err(mpsc::TryRecvError::Empty) => {
                    *loading = Some(l);
                    return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
                }
                // Unreadable (disk trouble) or the reader died: read it again.
                Ok(Err(_)) | Err(mpsc::TryRecvError::Disconnected) => {}
            }
        }
        // Reading, checking and decoding a large file takes seconds, during which the raft
        // task would send no heartbeat: a thread does it, and raft, told to retry, asks again
        // on the follower's next heartbeat response.
        let (tx, done) = mpsc::channel();
        let (disk, path, term, index) = (self.disk.clone(), path.clone(), meta.term, meta.index);
        let started = std::thread::Builder::new()
            .name("snapshot-read".into())
            .spawn(move || {
                let _ = tx.send(crate::snap::read(&disk, &path, term, index));
            });
        if started.is_ok() {
            *loading = Some(Loading { index, done });
        }
        Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn storage_with(n: u64) -> RaftStorage {
        let mut s = RaftStorage::default();
        s.append(&(1..=n).map(|i| ent(i, 1)).collect::<Vec<_>>())
            .expect("append to empty storage");
        s
    }

    #[test]
    fn append_truncates_conflicting_suffix() {
        let mut s = storage_with(5);
        s.append(&[ent(3, 2), ent(4, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 1);
    }

    /// Catch-up after a snapshot keeps the newest entries that weigh `keep` in all, never
    /// more than the log holds.
    #[test]
    fn catchup_start_weighs_entries() {
        let mut s = storage_with(10);
        // Entry i weighs i: entries 10, 9 and 8 weigh 27.
        let w = |e: &Entry| e.index;
        assert_eq!(s.catchup_start(10, 27, w), 7);
        assert_eq!(s.catchup_start(10, 28, w), 6);
        assert_eq!(s.catchup_start(10, 1, w), 9);
        assert_eq!(s.catchup_start(10, 0, w), 10);
        assert_eq!(s.catchup_start(8, 15, w), 6);
        assert_eq!(s.catchup_start(10, 1000, w), 0);
        s.compact(4).unwrap();
        assert_eq!(s.catchup_start(10, 1000, w), 4);
        assert_eq!(s.catchup_start(10, 3, |_| 1), 7);
    }

    /// A snapshot kept on disk is read back whole when raft asks for it; while its file is
    /// unreadable raft is told to retry later.
    #[test]
    fn snapshot_on_disk_is_served_from_its_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let snapper = crate::snap::Snapshotter::new(&Disk::default(), dir.path(), &logger).unwrap();
        let mut s = storage_with(10);
        let mut snap = Snapshot {
            data: b"\xffmap".to_vec().into(),
            ..Default::default()
        };
        snap.mut_metadata().index = 8;
        snap.mut_metadata().term = 1;
        let path = snapper.save(&snap).unwrap();
        assert!(s.set_snapshot_on_disk(snap.get_metadata().clone(), path.clone()));
        assert!(s.last_snapshot().data.is_empty());
        // The first ask starts a read off the caller's thread; a later one gets the result.
        assert!(unavailable(&s));
        let long = std::time::Duration::from_secs(5);
        assert_eq!(served(&s, long), Some(snap.clone()));
        // Handed out once; the next ask reads the file again.
        assert!(unavailable(&s));
        assert_eq!(served(&s, long), Some(snap));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(served(&s, std::time::Duration::from_millis(200)), None);
    }

    fn unavailable(s: &RaftStorage) -> bool {
        matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        )
    }

    /// Asks until the snapshot is served (for up to `timeout`); `None` if it never is.
    fn served(s: &RaftStorage, timeout: std::time::Duration) -> Option<Snapshot> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            match s.snapshot(0, 2) {
                Ok(snap) => return Some(snap),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
            }
        }
        None
    }

    #[test]
    fn snapshot_compact_keeps_term_of_compaction_point() {
        let mut s = storage_with(10);
        let snap = s
            .create_snapshot(8, ConfState::default(), b"\xff\x00data".to_vec())
            .unwrap()
            .clone();
        assert_eq!(snap.get_metadata().index, 8);
        s.compact(6).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 1);
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(7, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
        let served = s.snapshot(0, 2).unwrap();
        assert_eq!(&served.data[..], b"\xff\x00data");
    }

    #[test]
    fn apply_snapshot_replaces_log() {
        let mut s = storage_with(3);
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.apply_snapshot(snap).unwrap();
        assert_eq!(s.first_index().unwrap(), 21);
        assert_eq!(s.last_index().unwrap(), 20);
        assert_eq!(s.term(20).unwrap(), 4);
        assert_eq!(s.hard_state().commit, 20);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        // Entries from the leader continue right after the snapshot.
        s.append(&[ent(21, 4)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 21);
    }
}
