//! `KvStore`: the replicated map, and the task that applies what raft commits to it.
//!
//! Writes `propose_tx` (each PUT as an encoded [`Put`] with its own [`Proposal`]), reads
//! `commit_rx` ([`Apply`] batches from the raft task, and the proposals it dropped), and wakes
//! the PUT that waits on each applied or dropped request id. The applied index is published on
//! a `watch` so that reads can wait for it. Entries and snapshots use bincode 1.3's layout for these types (little-endian u64
//! lengths), written by hand: serde hands a `Vec<u8>` to bincode one byte at a time, which made
//! encoding a snapshot and decoding every entry the most expensive part of the hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot, watch};

pub use crate::channels::{Apply, Proposal};

mod map;
mod run;
pub use map::{decode, encode, Captured, DecodeError, Map, Pair};
use map::{get_bytes, get_u64, put_bytes, put_u64};
use run::RunBuilder;

/// The replicated command: a PUT tagged with an id unique to the proposing node's run, so that
/// only the node that proposed it wakes its client. It borrows its key and value; applying
/// an entry copies nothing (the map keeps slices of the entry, see [`Pair`]).
#[derive(Debug, PartialEq)]
pub struct Put<'a> {
    pub id: u64,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> Put<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(24 + self.key.len() + self.value.len());
        put_u64(&mut buf, self.id)
            .and_then(|()| put_bytes(&mut buf, self.key))
            .and_then(|()| put_bytes(&mut buf, self.value))
            .expect("writing to a Vec cannot fail");
        buf
    }

    /// Exactly one encoded PUT.
    pub fn decode(mut buf: &'a [u8]) -> Result<Put<'a>, DecodeError> {
        let put = Put::decode_next(&mut buf)?;
        if !buf.is_empty() {
            return Err(DecodeError::Trailing(buf.len()));
        }
        Ok(put)
    }

    /// The PUT at the front of `buf`, which is advanced past it.
    fn decode_next(buf: &mut &'a [u8]) -> Result<Put<'a>, DecodeError> {
        let id = get_u64(buf)?;
        let key = get_bytes(buf)?;
        let value = get_bytes(buf)?;
        Ok(Put { id, key, value })
    }
}

/// The PUTs in one entry's data. The raft task packs the proposals of a batch back to back into
/// one entry (one entry per PUT cost an `Entry` in memory, a WAL record and raft bookkeeping
/// each), so the data is one or more encoded [`Put`]s; entries written before packing hold one.
pub fn decode_puts(mut buf: &[u8]) -> Result<Vec<Put<'_>>, DecodeError> {
    let mut puts = Vec::new();
    while !buf.is_empty() {
        puts.push(Put::decode_next(&mut buf)?);
    }
    Ok(puts)
}

/// [`decode_puts`] as each PUT's id and the range of `buf` that holds its key and value with
/// their lengths (a [`Pair`]'s encoding), so the map can take them without a copy.
pub fn decode_pairs(buf: &[u8]) -> Result<Vec<(u64, std::ops::Range<usize>)>, DecodeError> {
    let mut rest = buf;
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let id = get_u64(&mut rest)?;
        let start = buf.len() - rest.len();
        get_bytes(&mut rest)?;
        get_bytes(&mut rest)?;
        pairs.push((id, start..buf.len() - rest.len()));
    }
    Ok(pairs)
}

/// How many writes an entry's data holds, for the snapshot and catch-up counts, which count
/// writes as raftexample's count entries: its PUTs, or 1 for data that does not decode.
pub fn count_writes(mut buf: &[u8]) -> u64 {
    let mut n = 0;
    while !buf.is_empty() {
        if Put::decode_next(&mut buf).is_err() {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// Why a `KvStore::put` did not return Ok.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// Raft refused the entry (no leader known): it was never appended anywhere.
    #[error("not applied: {0}")]
    NotApplied(String),
    /// The entry may or may not be committed later; the client must read to find out.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// Generates request ids that do not repeat across nodes or boots: the top 16 bits are the
/// node id (config validation keeps it below 2^16), the other 48 a counter that starts at a
/// point drawn from this boot's nonce. Not the clock: one stepped back would start the counter
/// where an earlier boot's ids ran, and an entry of that boot replayed at startup would then
/// answer a new PUT with the same id. Two boots' ids meet only if their ranges overlap
/// somewhere in 2^48, about (ids of both) / 2^48: under one in ten million for ten million
/// ids each.
#[derive(Debug)]
pub struct IdGen {
    base: u64,
    next: AtomicU64,
}

const ID_COUNTER_BITS: u32 = 48;
const ID_COUNTER_MASK: u64 = (1 << ID_COUNTER_BITS) - 1;

impl IdGen {
    pub fn new(node_id: u64, nonce: u64) -> IdGen {
        IdGen {
            base: (node_id & crate::config::MAX_NODE_ID) << ID_COUNTER_BITS,
            next: AtomicU64::new(nonce & ID_COUNTER_MASK),
        }
    }

    pub fn next(&self) -> u64 {
        self.base | (self.next.fetch_add(1, Ordering::Relaxed) & ID_COUNTER_MASK)
    }
}

/// Shared by the HTTP handlers and the apply task. The map lock is never held across `.await`.
pub struct KvStore {
    map: RwLock<Map>,
    /// Highest raft index whose effects are in `map`.
    applied_tx: watch::Sender<u64>,
    /// Term of the entry at the applied index; written under the map's write lock.
    applied_term: AtomicU64,
    /// PUTs proposed by this node that wait for their entry to be applied (`Ok`), or learn
    /// that raft dropped it (`Err` with the reason).
    waiters: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    propose_tx: mpsc::Sender<Proposal>,
    ids: IdGen,
    logger: slog::Logger,
}

impl KvStore {
    /// An empty store; the raft task sends the recovered snapshot as its first `Apply`.
    /// `nonce` tells this boot's request ids from every other's ([`IdGen`]).
    pub fn new(
        node_id: u64,
        nonce: u64,
        propose_tx: mpsc::Sender<Proposal>,
        logger: &slog::Logger,
    ) -> Arc<KvStore> {
        let (applied_tx, _) = watch::channel(0);
        Arc::new(KvStore {
            map: RwLock::new(Map::new()),
            applied_tx,
            applied_term: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
            propose_tx,
            ids: IdGen::new(node_id, nonce),
            logger: logger.new(slog::o!("component" => "kvstore")),
        })
    }

    /// The value at `key` in the local map, with no consistency check (a serializable read).
    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map
            .read()
            .expect("the map lock is never held across a panic")
            .get(key)
            .map(<[u8]>::to_vec)
    }

    /// A fresh request id (also used for membership changes).
    pub fn next_id(&self) -> u64 {
        self.ids.next()
    }

    pub fn applied(&self) -> u64 {
        *self.applied_tx.borrow()
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// The map as it is now, in O(1); serialise it later with [`encode`].
    pub fn capture(&self) -> Map {
        self.map.read().expect("map lock").clone()
    }

    /// The map for a snapshot at the applied index, in O(1): its writes are frozen, and
    /// writing the snapshot also builds the map's next base (see [`Map::freeze`]).
    pub fn capture_for_snapshot(self: &Arc<Self>) -> ForSnapshot {
        let mut map = self.map.write().expect("map lock");
        let freeze = map.freeze();
        ForSnapshot {
            map: Captured(map.clone()),
            freeze,
            store: Arc::downgrade(self),
            sizes: std::sync::OnceLock::new(),
            run: Mutex::new(None),
        }
    }

    /// The map with the index and term it is at, in O(1) (for a backup).
    pub fn capture_at(&self) -> (Map, u64, u64) {
        let map = self.map.read().expect("map lock");
        let term = self.applied_term.load(Ordering::Relaxed);
        (map.clone(), self.applied(), term)
    }

    /// `(applied index, hash of the map at that index)`: equal on replicas that converged. The
    /// hash is order-independent (a wrapping sum over pairs) so it needs no sorting.
    pub fn digest(&self) -> (u64, u64) {
        let map = self.map.read().expect("map lock");
        let hash = map.iter().fold(0u64, |acc, (k, v)| {
            let h = (u64::from(crc32c::crc32c(k)) << 32)
                | u64::from(crc32c::crc32c_append(crc32c::crc32c(k), v));
            acc.wrapping_add(h.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        });
        (self.applied(), hash)
    }

    /// The proposal of a PUT, and what tells when it applied (or why it never will): its
    /// waiter is registered before the proposal goes anywhere.
    pub fn prepare_put(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> (Proposal, oneshot::Receiver<Result<(), String>>) {
        let id = self.next_id();
        let data = Put { id, key, value }.encode();
        let (applied_tx, applied_rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(id, applied_tx);
        (Proposal { id, data }, applied_rx)
    }

    /// Proposes `key = value` and waits until this node has applied it, or `deadline`.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<(), PutError> {
        let (Proposal { id, data }, applied_rx) = self.prepare_put(key, value);
        let res = self.propose_and_wait(id, data, applied_rx, deadline).await;
        if res.is_err() {
            self.waiters.lock().expect("waiters lock").remove(&id);
        }
        res
    }

    async fn propose_and_wait(
        &self,
        id: u64,
        data: Vec<u8>,
        applied_rx: oneshot::Receiver<Result<(), String>>,
        deadline: tokio::time::Instant,
    ) -> Result<(), PutError> {
        let outcome = tokio::time::timeout_at(deadline, async {
            self.propose_tx
                .send(Proposal { id, data })
                .await
                .map_err(|_| PutError::NotApplied("node is shutting down".into()))?;
            match applied_rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(PutError::NotApplied(reason)),
                Err(_) => Err(PutError::Unknown("node stopped before applying".into())),
            }
        })
        .await;
        // Past the deadline the proposal may still be queued for raft, or in its log.
        outcome.unwrap_or_else(|_| Err(PutError::Unknown("not applied within the timeout".into())))
    }

    /// Applies one batch from the raft task.
    pub fn apply(&self, apply: Apply) {
        match apply {
            Apply::Entries {
                index,
                term,
                data,
                applied,
            } => {
                let mut woken = Vec::new();
                {
                    let mut map = self.map.write().expect("map lock");
                    // Published under the lock so `digest` sees a map and index that match.
                    self.applied_tx.send_replace(index);
                    self.applied_term.store(term, Ordering::Relaxed);
                    for d in &data {
                        match decode_pairs(d) {
                            Ok(pairs) => {
                                for (id, at) in pairs {
                                    woken.push(id);
                                    map.insert_pair(Pair::in_entry(d.slice(at)));
                                }
                            }
                            // Every node decodes the same entry the same way, so skipping it
                            // (whole, before any of it applies) keeps the replicas identical.
                            Err(e) => {
                                slog::error!(self.logger, "undecodable entry skipped"; "index" => index, "error" => %e)
                            }
                        }
                    }
                }
                self.wake(woken, Ok(()));
                // The raft task may have stopped waiting (it only waits before a snapshot).
                let _ = applied.send(());
            }
            Apply::Dropped { ids, reason } => self.wake(ids, Err(reason)),
            Apply::Snapshot { index, term, data } => match Map::from_encoded(data) {
                Ok(map) => {
                    slog::info!(self.logger, "loaded snapshot"; "index" => index, "keys" => map.len());
                    let mut m = self.map.write().expect("map lock");
                    *m = map;
                    m.installed = Some(index);
                    self.applied_tx.send_replace(index);
                    self.applied_term.store(term, Ordering::Relaxed);
                }
                Err(e) => {
                    // The snapshot passed its CRC, so this is a bug or a foreign format: stop
                    // rather than serve a map that diverges from the cluster.
                    slog::crit!(self.logger, "snapshot does not decode"; "index" => index, "error" => %e);
                    std::process::abort();
                }
            },
            Apply::SnapshotFile { index, data, pages } => {
                if self
                    .map
                    .write()
                    .expect("map lock")
                    .adopt(index, data, pages)
                {
                    slog::info!(self.logger, "map reads the installed snapshot from its file";
                        "index" => index);
                }
            }
        }
    }

    /// Tells the PUTs waiting on `ids` (those this node proposed) how they ended.
    fn wake(&self, ids: Vec<u64>, outcome: Result<(), String>) {
        let mut waiters = self.waiters.lock().expect("waiters lock");
        for id in ids {
            if let Some(w) = waiters.remove(&id) {
                let _ = w.send(outcome.clone());
            }
        }
    }

    /// The apply task: drains `commit_rx` until the raft task drops its sender.
    pub async fn run_apply(self: Arc<Self>, mut commit_rx: mpsc::Receiver<Apply>) {
        while let Some(a) = commit_rx.recv().await {
            self.apply(a);
        }
        // Waiters whose entries never applied learn that the outcome is unknown.
        self.waiters.lock().expect("waiters lock").clear();
    }
}

/// A map frozen for a snapshot ([`KvStore::capture_for_snapshot`]). Writing it also notes
/// where each pair starts, so that once the file is written its bytes become the map's new
/// base, which drops the old base and the frozen layer.
pub struct ForSnapshot {
    map: Captured,
    freeze: u64,
    store: std::sync::Weak<KvStore>,
    /// [`Captured::sizes`], computed once: with layers above the base it is a pass over every
    /// pair, which the length, the run builder and the count in the file all need.
    sizes: std::sync::OnceLock<(u64, usize)>,
    /// Where the pairs start in what [`SnapshotSource::write_to`] wrote.
    run: Mutex<Option<RunBuilder>>,
}

impl ForSnapshot {
    fn sizes(&self) -> (u64, usize) {
        *self.sizes.get_or_init(|| self.map.sizes())
    }
}

impl crate::channels::SnapshotSource for ForSnapshot {
    fn encoded_len(&self) -> u64 {
        self.sizes().0
    }

    fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let (len, pairs) = self.sizes();
        let mut run = RunBuilder::new(len, pairs);
        self.map.write_with(w, pairs, Some(&mut run))?;
        *self.run.lock().expect("run lock") = Some(run);
        Ok(())
    }

    fn written(&self, bytes: bytes::Bytes, pages: Option<crate::vfs::Pages>) {
        let run = self.run.lock().expect("run lock").take();
        let run = run.and_then(|r| r.finish(bytes, pages));
        let (Some(store), Some(run)) = (self.store.upgrade(), run) else {
            // Left as it is, the map reads the same; the next snapshot merges the layer.
            return;
        };
        // The same pairs in another form: no durability is involved, so this need not wait for
        // the file to be renamed into place (the mapping outlives the rename and any purge).
        store
            .map
            .write()
            .expect("map lock")
            .rebase(self.freeze, run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::SnapshotSource;
    use bytes::Bytes;
    use map::WRITE_CHUNK;

    fn store() -> (Arc<KvStore>, mpsc::Receiver<Proposal>) {
        let (tx, rx) = mpsc::channel(8);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        (KvStore::new(1, 0, tx, &log), rx)
    }

    /// The kvstore snapshot round trip (raftexample's `Test_kvstore_snapshot`), with a value
    /// that is not UTF-8: the original's JSON snapshot would corrupt it.
    #[test]
    fn kvstore_snapshot() {
        let (kv, _rx) = store();
        let value = vec![0xff, 0x00, 0xfe, b'b'];
        kv.map.write().unwrap().insert(b"/foo", &value);
        assert_eq!(kv.lookup(b"/foo"), Some(value.clone()));
        let data = encode(&kv.capture());
        *kv.map.write().unwrap() = Map::new();
        assert_eq!(kv.lookup(b"/foo"), None);
        kv.apply(Apply::Snapshot {
            index: 7,
            term: 1,
            data: data.into(),
        });
        assert_eq!(kv.lookup(b"/foo"), Some(value));
        assert_eq!(kv.applied(), 7);
    }

    /// A pair is found by its key alone, a second insert replaces the value, and a capture
    /// taken before keeps the old one.
    #[test]
    fn map_pairs_by_key() {
        let mut map = Map::new();
        map.insert(b"/k", b"v1");
        map.insert(b"", b"empty key");
        map.insert(b"/e", b"");
        let before = map.clone();
        map.insert(b"/k", b"v2");
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(b"/k"), Some(&b"v2"[..]));
        assert_eq!(map.get(b""), Some(&b"empty key"[..]));
        assert_eq!(map.get(b"/e"), Some(&b""[..]));
        assert_eq!(map.get(b"/k/"), None);
        assert_eq!(before.get(b"/k"), Some(&b"v1"[..]));
        assert_ne!(before, map);
        let mut same = before.clone();
        same.insert(b"/k", b"v2");
        assert_eq!(same, map);
    }

    /// Through a freeze and a rebase, in any order with later writes and with a snapshot
    /// that replaces the map meanwhile, the map reads the same as a plain one, and a rebase
    /// for a capture that is no longer the map's is refused.
    #[test]
    fn frozen_writes_become_the_base() {
        let (kv, _rx) = store();
        let put = |k: &str, v: &str| kv.map.write().unwrap().insert(k.as_bytes(), v.as_bytes());
        put("/a", "1");
        put("/b", "1");
        let snap = kv.capture_for_snapshot();
        put("/b", "2");
        put("/c", "2");
        let mut file = Vec::new();
        snap.write_to(&mut file).unwrap();
        assert_eq!(file.len() as u64, snap.encoded_len());
        let want: Vec<(&[u8], &[u8])> = vec![(b"/a", b"1"), (b"/b", b"2"), (b"/c", b"2")];
        // Bytes that are not what was written leave the map as it is; the next snapshot merges
        // the frozen layer too.
        snap.written(Bytes::from(file[..file.len() - 1].to_vec()), None);
        assert!(kv.map.read().unwrap().frozen.is_some(), "not rebased");
        assert!(kv.map.read().unwrap().iter().eq(want.iter().copied()));
        let again = kv.capture_for_snapshot();
        again.write_to(&mut file).unwrap();
        again.written(
            Bytes::from(file.split_off(snap.encoded_len() as usize)),
            None,
        );
        {
            let map = kv.map.read().unwrap();
            assert!(map.frozen.is_none(), "rebased");
            assert_eq!(map.len(), 3);
            assert!(map.iter().eq(want.iter().copied()));
            assert_eq!(map.get(b"/b"), Some(&b"2"[..]));
        }
        // The file holds the map as captured, and loads as a run.
        let loaded = Map::from_encoded(file.into()).unwrap();
        assert!(loaded.iter().eq([(&b"/a"[..], &b"1"[..]), (b"/b", b"1")]));
        assert_eq!(loaded.len(), 2);

        // A failed snapshot leaves its layer; the next freeze covers it and the newer writes.
        let _failed = kv.capture_for_snapshot();
        put("/d", "3");
        let next = kv.capture_for_snapshot();
        put("/a", "4");
        // Replaced by a snapshot from the leader before `next` is written: no rebase.
        kv.apply(Apply::Snapshot {
            index: 9,
            term: 1,
            data: encode(&kv.capture()).into(),
        });
        let before = kv.capture();
        let mut file = Vec::new();
        next.write_to(&mut file).unwrap();
        next.written(file.into(), None);
        let map = kv.map.read().unwrap();
        assert!(map.frozen.is_none() && map.top.is_empty());
        assert_eq!(*map, before);
        assert_eq!(map.get(b"/a"), Some(&b"4"[..]));
        assert_eq!(map.get(b"/d"), Some(&b"3"[..]));
        assert_eq!(map.len(), 4);
    }

    /// A snapshot written to its file makes the file the map's base, mapped in place: it
    /// reads the same, and still does once the file is purged (the mapping outlives it).
    #[test]
    fn written_snapshot_file_becomes_the_base() {
        use crate::node::snapshot::SnapshotTask;
        let dir = tempfile::tempdir().unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let snapshotter =
            crate::snap::Snapshotter::new(&crate::vfs::Disk::default(), dir.path(), &log).unwrap();
        let (kv, _rx) = store();
        // Over a MiB, so the file is mapped rather than read, and over FORGET_EVERY.
        let big: Vec<u8> = (0..900u32 << 10).map(|i| (i % 251) as u8).collect();
        for k in ["/a", "/b", "/c"] {
            kv.map.write().unwrap().insert(k.as_bytes(), &big);
        }
        let before = kv.capture();
        let meta = raft::prelude::SnapshotMetadata {
            index: 5,
            term: 1,
            ..Default::default()
        };
        let task = SnapshotTask {
            meta,
            members: [(1, "http://127.0.0.1:1".to_string())].into(),
            removed: Default::default(),
            kept: Default::default(),
            wait: None,
        };
        let written = task
            .write(&snapshotter, &kv.capture_for_snapshot())
            .unwrap();
        {
            let map = kv.map.read().unwrap();
            assert!(map.frozen.is_none() && map.top.is_empty(), "rebased");
            assert_eq!(map.base.len(), 3);
        }
        assert!(kv.map.read().unwrap().base.is_mapped());
        std::fs::remove_file(&written.path).unwrap();
        assert_eq!(kv.capture(), before);
        // A pass lets the pages behind it go; the bytes read the same after.
        let mut again = Vec::new();
        kv.capture_for_snapshot().write_to(&mut again).unwrap();
        assert_eq!(again, encode(&before));
        assert_eq!(kv.capture(), before);
        assert_eq!(kv.map.read().unwrap().get(b"/b"), Some(&big[..]));
    }

    /// A snapshot installed from the leader is read from its file once that is durable, unless
    /// the base moved on meanwhile; the map reads the same either way.
    #[test]
    fn installed_snapshot_is_read_from_its_file() {
        let (kv, _rx) = store();
        let mut m = Map::new();
        let big: Vec<u8> = (0..700u32 << 10).map(|i| (i % 249) as u8).collect();
        m.insert(b"/a", &big);
        m.insert(b"/b", &big);
        let enc = encode(&m);
        kv.apply(Apply::Snapshot {
            index: 7,
            term: 2,
            data: enc.clone().into(),
        });
        kv.map.write().unwrap().insert(b"/c", b"after");
        let before = kv.capture();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &enc).unwrap();
        let file = || crate::vfs::Disk::default().map_unread(&path).unwrap();
        let adopt = |index: u64| {
            let (data, pages) = file();
            kv.apply(Apply::SnapshotFile { index, data, pages });
            kv.map.read().unwrap().base.is_mapped()
        };
        assert!(!adopt(6), "another snapshot's file");
        assert!(adopt(7));
        assert_eq!(kv.capture(), before);
        assert_eq!(kv.map.read().unwrap().get(b"/b"), Some(&big[..]));
        // After a local snapshot the base is another: a late file changes nothing.
        kv.apply(Apply::Snapshot {
            index: 9,
            term: 2,
            data: enc.clone().into(),
        });
        let snap = kv.capture_for_snapshot();
        let mut out = Vec::new();
        snap.write_to(&mut out).unwrap();
        snap.written(out.into(), None);
        assert!(!adopt(9), "the base was rebased");
        assert_eq!(kv.capture(), m);
    }

    /// The hand-written codecs keep bincode 1.3's layout (so files written before them still
    /// load) and reject truncated or padded input instead of panicking.
    #[test]
    fn codecs_match_bincode_layout() {
        #[derive(serde::Serialize)]
        struct BincodePut {
            id: u64,
            key: Vec<u8>,
            value: Vec<u8>,
        }
        let put = Put {
            id: 42,
            key: b"/k",
            value: &[0, 255, 7],
        };
        let old = bincode::serialize(&BincodePut {
            id: 42,
            key: b"/k".to_vec(),
            value: vec![0, 255, 7],
        })
        .unwrap();
        assert_eq!(put.encode(), old);
        assert_eq!(Put::decode(&old).unwrap(), put);

        let mut map = Map::new();
        map.insert(b"/a", b"1");
        map.insert(b"/b", b"");
        let std: std::collections::HashMap<_, _> =
            map.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(decode(&bincode::serialize(&std).unwrap()).unwrap(), map);
        let enc = encode(&map);
        assert_eq!(enc.len() as u64, Captured(map.clone()).encoded_len());
        assert_eq!(decode(&enc).unwrap(), map);

        for cut in 0..enc.len() {
            assert!(decode(&enc[..cut]).is_err(), "prefix of {cut} bytes");
        }
        // A map larger than one write chunk round-trips too.
        let mut big = Map::new();
        for i in 0..5_000u32 {
            big.insert(format!("/key-{i}").as_bytes(), &[i as u8; 40]);
        }
        let std: std::collections::HashMap<_, _> =
            big.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let enc_big = encode(&big);
        assert!(enc_big.len() > 2 * WRITE_CHUNK);
        assert_eq!(enc_big.len() as u64, Captured(big.clone()).encoded_len());
        assert_eq!(decode(&enc_big).unwrap(), big);
        assert_eq!(decode(&bincode::serialize(&std).unwrap()).unwrap(), big);

        let mut padded = enc.clone();
        padded.push(0);
        assert_eq!(decode(&padded), Err(DecodeError::Trailing(1)));
        let mut huge = put.encode();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Put::decode(&huge), Err(DecodeError::Truncated));
    }

    /// An entry packs several PUTs back to back and applies them in order; one PUT alone (as
    /// entries were written before packing) is a batch of one; a damaged batch applies none.
    #[test]
    fn packed_entry_applies_every_put() {
        let (kv, _rx) = store();
        let puts = [
            Put {
                id: 1,
                key: b"/a",
                value: b"1",
            },
            Put {
                id: 2,
                key: b"/b",
                value: b"",
            },
            Put {
                id: 3,
                key: b"/a",
                value: b"3",
            },
        ];
        let packed: Vec<u8> = puts.iter().flat_map(|p| p.encode()).collect();
        assert_eq!(decode_puts(&packed).unwrap(), puts);
        assert_eq!(count_writes(&packed), 3);
        assert_eq!(count_writes(&puts[0].encode()), 1);
        assert_eq!(count_writes(b"junk"), 1);
        assert!(decode_puts(&packed[..packed.len() - 1]).is_err());
        // Each pair's range is its key and value as a pair encodes them.
        let pairs = decode_pairs(&packed).unwrap();
        assert_eq!(pairs.len(), 3);
        for ((id, at), put) in pairs.into_iter().zip(&puts) {
            assert_eq!(id, put.id);
            assert_eq!(&packed[at], &put.encode()[8..]);
        }
        assert!(decode_pairs(&packed[..packed.len() - 1]).is_err());

        let single = Put {
            id: 4,
            key: b"/c",
            value: b"4",
        }
        .encode();
        let (tx, _) = oneshot::channel();
        kv.apply(Apply::Entries {
            index: 2,
            term: 1,
            data: vec![packed[..packed.len() - 1].to_vec().into(), single.into()],
            applied: tx,
        });
        assert_eq!(kv.lookup(b"/a"), None);
        assert_eq!(kv.lookup(b"/c"), Some(b"4".to_vec()));
        let (tx, _) = oneshot::channel();
        kv.apply(Apply::Entries {
            index: 3,
            term: 1,
            data: vec![packed.into()],
            applied: tx,
        });
        assert_eq!(kv.lookup(b"/a"), Some(b"3".to_vec()));
        assert_eq!(kv.lookup(b"/b"), Some(b"".to_vec()));
    }

    /// Two boots of one node draw disjoint request ids even when their clocks read about the
    /// same at start (a clock stepped back): an id shared with an entry replayed from the
    /// earlier boot would answer a new PUT with the old entry. The node id is in the top bits.
    #[test]
    fn request_ids_of_two_boots_do_not_meet() {
        let boot = || IdGen::new(3, crate::nonce::boot_nonce().unwrap());
        let (first, second) = (boot(), boot());
        let earlier: std::collections::HashSet<u64> =
            (0..1_000_000).map(|_| first.next()).collect();
        assert!((0..1_000_000).all(|_| !earlier.contains(&second.next())));
        assert!(earlier.iter().all(|id| id >> 48 == 3));
    }

    /// A PUT returns only once its own entry is applied, and the applied signal fires.
    #[tokio::test]
    async fn put_waits_for_its_entry() {
        let (kv, mut rx) = store();
        let kv2 = kv.clone();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let put = tokio::spawn(async move { kv2.put(b"/k", b"v", deadline).await });
        let p = rx.recv().await.unwrap();
        assert_eq!(Put::decode(&p.data).unwrap().id, p.id);
        tokio::task::yield_now().await;
        assert!(!put.is_finished());
        let (applied_tx, applied_rx) = oneshot::channel();
        kv.apply(Apply::Entries {
            index: 3,
            term: 1,
            data: vec![p.data.into()],
            applied: applied_tx,
        });
        put.await.unwrap().unwrap();
        applied_rx.await.unwrap();
        assert_eq!(kv.lookup(b"/k"), Some(b"v".to_vec()));
        assert_eq!(kv.applied(), 3);
    }

    /// A proposal raft refuses is reported as definitely not applied.
    #[tokio::test]
    async fn dropped_proposal_is_not_applied() {
        let (kv, mut rx) = store();
        let kv2 = kv.clone();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let put = tokio::spawn(async move { kv2.put(b"/k", b"v", deadline).await });
        let p = rx.recv().await.unwrap();
        kv.apply(Apply::Dropped {
            ids: vec![p.id],
            reason: raft::Error::ProposalDropped.to_string(),
        });
        assert!(matches!(put.await.unwrap(), Err(PutError::NotApplied(_))));
        assert!(kv.waiters.lock().unwrap().is_empty());
    }
}
