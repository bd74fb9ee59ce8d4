//! The raft task: sole owner of `RawNode`, the WAL (through its writer thread) and the transport.
//!
//! Reads `propose_rx` (PUTs), `conf_change_rx` (membership changes), `read_rx` (ReadIndex
//! requests), `raft_msg_rx` (messages from peers) and `report_rx` (send failures); writes
//! `commit_tx` ([`Apply`] batches for the kvstore). It is a task on the shared runtime and
//! never blocks: the WAL's writes and fsyncs run on the writer thread, snapshots on a snapshot
//! thread. A fatal error (WAL I/O, a leader's snapshot that cannot be saved) ends the task; the
//! caller sees it as the error channel's value. A local snapshot that cannot be written is not
//! one: it is logged and taken again at a later trigger.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::*;
use raft::StateRole;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PeerUrl};
use crate::error::{Error, Result};
use crate::kvstore::{Apply, Proposal};
use crate::snap::Snapshotter;
use crate::storage::RaftStorage;
use crate::transport::{Report, Transport};
use crate::wal::writer::{Job, Persisted, Writer, WriterError};
use crate::wal::{Recovered, Wal, WalOptions};

const TICK: Duration = Duration::from_millis(100);
/// Proposals (or peer messages) taken from a channel before the next Ready: one fsync covers
/// them all.
const DRAIN: usize = 4096;
/// Ticks after which an unanswered ReadIndex round is issued again (the first may have been
/// dropped by a leader change).
const READ_RETRY_TICKS: u32 = 5;
/// Above this size a snapshot is taken only once the log since the last one holds at least
/// as many bytes (as well as `--snapshot-count` entries): each snapshot rewrites the whole
/// map, so with a fixed entry count a growing map makes every snapshot dearer, while this keeps
/// the snapshot work per byte written constant (about one byte rewritten per byte logged; a
/// restart replays at most about a snapshot's worth of log). Small maps keep raftexample's
/// plain count.
const AMORTIZE_ABOVE: u64 = 4 << 20;
/// How long a stopping leader waits for its successor to take over.
const HANDOVER: Duration = Duration::from_secs(1);

/// A membership change from the client API (raftexample's `confChangeC`); `done` fires once it
/// is applied on this node, or with the reason it was refused.
#[derive(Debug)]
pub struct ConfChangeRequest {
    pub cc: ConfChange,
    pub done: oneshot::Sender<Result<(), ConfChangeError>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfChangeError {
    #[error("node {0} is already a member")]
    AlreadyMember(u64),
    #[error("node {0} was removed and its id cannot be reused")]
    Removed(u64),
    #[error("node {0} is not a member")]
    NotMember(u64),
    #[error("another membership change is still pending")]
    Pending,
    #[error("not applied: {0}")]
    Dropped(String),
    /// Only the leader can tell whether another change is pending (raft-rs silently turns a
    /// forwarded change into a no-op when one is), so followers hand the request to it.
    #[error("node {leader} is the leader")]
    NotLeader { leader: u64, url: String },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ReadError {
    #[error("no leader known")]
    NoLeader,
    #[error("node is shutting down")]
    Shutdown,
}

/// A linearizable read waiting for a read index.
pub type ReadRequest = oneshot::Sender<Result<u64, ReadError>>;

/// What the raft task publishes for `/status` and `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    pub id: u64,
    pub role: &'static str,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub members: BTreeMap<u64, String>,
    /// Applied index of the kv map and a hash of the map at that index (see
    /// `KvStore::digest`), filled in by the `/status` handler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_applied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_hash: Option<String>,
    /// See [`crate::cluster_id`]; absent while this node has not learnt it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

/// Snapshot payload: the membership the log no longer holds after compaction, and the map.
/// Laid out as bincode 1.3 lays out `(members, removed, kv as bytes)`.
#[derive(Debug, PartialEq)]
struct SnapshotData {
    members: BTreeMap<u64, String>,
    removed: BTreeSet<u64>,
    /// The state machine's encoding of the map; shares the snapshot's buffer.
    kv: Bytes,
}

/// The payload up to the map: members, removed ids and the map's length. The map follows,
/// streamed by the state machine straight into the `.snap` file.
pub(crate) fn snapshot_data_header(
    members: &BTreeMap<u64, String>,
    removed: &BTreeSet<u64>,
    kv_len: u64,
) -> Vec<u8> {
    let mut buf =
        bincode::serialize(&(members, removed)).expect("serialising ids and strings cannot fail");
    buf.extend_from_slice(&kv_len.to_le_bytes());
    buf
}

fn decode_snapshot_data(data: &Bytes) -> std::result::Result<SnapshotData, String> {
    let (members, removed): (BTreeMap<u64, String>, BTreeSet<u64>) =
        bincode::deserialize(data).map_err(|e| e.to_string())?;
    let at = bincode::serialized_size(&(&members, &removed)).map_err(|e| e.to_string())? as usize;
    let len = data
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or("truncated before the map")?;
    if len != (data.len() - at - 8) as u64 {
        return Err(format!(
            "map length {len} does not match the {} bytes present",
            data.len() - at - 8
        ));
    }
    Ok(SnapshotData {
        members,
        removed,
        kv: data.slice(at + 8..),
    })
}

/// The receiving halves the raft task reads.
pub struct Inputs {
    pub propose_rx: mpsc::Receiver<Proposal>,
    pub conf_change_rx: mpsc::Receiver<ConfChangeRequest>,
    pub read_rx: mpsc::Receiver<ReadRequest>,
    pub raft_msg_rx: mpsc::Receiver<Message>,
    pub report_rx: mpsc::UnboundedReceiver<Report>,
}

/// How the raft task ended without an error.
#[derive(Debug, PartialEq)]
pub enum Exit {
    Shutdown,
    /// This node applied (or was told of) its own removal.
    Removed,
}

/// The writes an entry counts for as raftexample counts entries: its PUTs, or 1 for any other
/// entry (a membership change, a new leader's no-op).
fn entry_writes(e: &Entry) -> u64 {
    match e.get_entry_type() {
        EntryType::EntryNormal if !e.data.is_empty() => crate::kvstore::count_writes(&e.data),
        _ => 1,
    }
}

/// Encoded PUTs packed into one entry; a batch larger than this continues in the next one.
const ENTRY_BYTES: usize = 256 << 10;
/// Largest `MsgPropose` stepped at once (an entry larger than this goes alone), which is also
/// raft's cap on the entries of one `MsgAppend`: on a follower the message is forwarded whole
/// to the leader, and one stream frame must carry it (see `transport::MAX_FRAME`) without
/// holding up the heartbeats behind it for long.
const PROPOSE_BYTES: usize = 1 << 20;
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
struct Held {
    /// Entries ready to propose: packed ones and those followers forwarded (packed there).
    entries: Vec<Entry>,
    /// PUTs packed into the next entry.
    packing: Vec<u8>,
    /// Local proposals and forwarded entries held, which bounds the batch.
    count: usize,
    ids: Vec<u64>,
    /// How many of `ids` each of `entries` carries, and how many `packing` does.
    entry_ids: Vec<usize>,
    packing_ids: usize,
}

impl Held {
    fn push(&mut self, p: Proposal) {
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

    fn forwarded(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for e in entries {
            self.entries.push(e);
            self.entry_ids.push(0);
            self.count += 1;
        }
    }

    fn seal(&mut self) {
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
}

pub struct RaftNode {
    id: u64,
    node: RawNode<RaftStorage>,
    /// Taken by `run`, which hands it to the WAL writer thread.
    wal: Option<Wal>,
    writer: Option<Writer>,
    snapshotter: Snapshotter,
    transport: Transport,
    get_snapshot: GetSnapshot,
    commit_tx: mpsc::Sender<Apply>,
    members: BTreeMap<u64, String>,
    /// Shared with the `/raft` handler, which answers 410 to these ids.
    removed: Arc<RwLock<HashSet<u64>>>,
    /// Index of the last entry handed to the kvstore.
    applied: u64,
    snapshot_index: u64,
    /// Payload size of the newest snapshot, and entry bytes applied since it was taken.
    snapshot_bytes: u64,
    log_bytes: u64,
    /// Writes applied since the last snapshot was taken or installed: PUTs (an entry packs
    /// several) plus other entries, one each, which is what raftexample's entry count meant.
    writes: u64,
    /// Fires when the kvstore has applied the last batch sent (raftexample's `applyDoneC`).
    last_apply_done: Option<oneshot::Receiver<()>>,
    pending_cc: HashMap<u64, oneshot::Sender<Result<(), ConfChangeError>>>,
    reads: ReadBatcher,
    /// A snapshot thread is running; one at a time.
    snapshot_in_flight: bool,
    snapshot_done_tx: mpsc::UnboundedSender<SnapshotDone>,
    snapshot_done_rx: Option<mpsc::UnboundedReceiver<SnapshotDone>>,
    /// Number of a Ready carrying a leader's snapshot that the writer has not yet persisted.
    snapshot_persisting: Option<u64>,
    /// Proposals not yet handed to raft (see [`Self::may_propose`]).
    held: Held,
    /// Number of the last Ready handed to the writer, and of the last it reported durable.
    submitted: u64,
    persisted: u64,
    status: Arc<Mutex<NodeStatus>>,
    members_changed: bool,
    exit: Option<Exit>,
    snapshot_count: u64,
    catchup_entries: u64,
    max_snapshots: usize,
    cluster_id: crate::cluster_id::ClusterId,
    /// Throttles the warning about malformed peer messages.
    peer_warn: crate::server::Throttle,
    logger: slog::Logger,
}

fn writer_error(e: WriterError) -> Error {
    match e {
        WriterError::Wal(e) => Error::Wal(e),
        WriterError::Snap(e) => Error::Snap(e),
    }
}

/// Captures the application state for a snapshot (raftexample's `getSnapshot`); called only
/// once the application has applied every batch sent so far.
///
/// It is split in two: this call runs on the raft loop and must be cheap (e.g. an O(1) clone
/// of a persistent map); the [`SnapshotSource`] it returns does the expensive serialisation on
/// a snapshot thread, straight into the `.snap` file.
pub type GetSnapshot = Box<dyn Fn() -> Box<dyn SnapshotSource> + Send>;

/// Captured application state.
pub trait SnapshotSource: Send {
    /// Exactly how many bytes `write_to` writes.
    fn encoded_len(&self) -> u64;
    fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()>;
}

/// A `.snap` file the snapshot thread wrote: its metadata, path and data size.
struct Written {
    meta: SnapshotMetadata,
    path: std::path::PathBuf,
    data_len: u64,
}

/// A snapshot written by the snapshot thread, or why it could not be.
type SnapshotDone = std::result::Result<Written, crate::snap::Error>;

/// Everything shared between the raft task and the rest of the process.
pub struct Shared {
    pub commit_tx: mpsc::Sender<Apply>,
    pub removed: Arc<RwLock<HashSet<u64>>>,
    pub status: Arc<Mutex<NodeStatus>>,
    pub report_tx: mpsc::UnboundedSender<Report>,
    pub shutdown: CancellationToken,
    /// What the transport sends with: cluster token, peer TLS.
    pub peer_client: crate::peer_client::PeerClient,
}

fn conf_change_entry(cc: &ConfChange, index: u64) -> Entry {
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChange);
    e.term = 1;
    e.index = index;
    e.data = cc
        .write_to_bytes()
        .expect("encoding a ConfChange cannot fail")
        .into();
    e
}

/// raftexample's `processMessages`: a MsgSnapshot carries the ConfState of the moment the
/// snapshot was taken, which may be stale if membership changed since; the receiver would
/// then restore an outdated configuration. Send the current one.
pub fn process_messages(msgs: &mut [Message], cs: &ConfState) {
    for m in msgs {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            m.mut_snapshot().mut_metadata().set_conf_state(cs.clone());
        }
    }
}

/// What raft-rs trusts in a peer's message and would panic on (or corrupt its log with) if it
/// were wrong. A well-behaved peer never sends such a message; a confused or hostile one must
/// not take the node down. `m` may be repaired in place.
fn check_peer_message(
    raft: &raft::Raft<RaftStorage>,
    m: &mut Message,
) -> std::result::Result<(), &'static str> {
    if m.to != raft.id {
        return Err("addressed to another node");
    }
    if m.from == raft.id || m.from == raft::INVALID_ID {
        return Err("claims to come from this node or from no node");
    }
    let log = &raft.raft_log;
    match m.get_msg_type() {
        MessageType::MsgHeartbeat if m.commit > log.last_index() => {
            // A leader sends at most what this node acknowledged. Keep the heartbeat (it
            // still says who leads), not its commit index.
            m.commit = log.committed;
        }
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp if m.entries.len() != 1 => {
            return Err("a read index message without exactly one context");
        }
        MessageType::MsgAppend => {
            let mut term = m.log_term;
            for (i, e) in m.entries.iter().enumerate() {
                if e.index != m.index + 1 + i as u64 || e.term < term || e.term > m.term {
                    return Err("an append whose entries do not follow its index and term");
                }
                term = e.term;
            }
        }
        MessageType::MsgSnapshot if decode_snapshot_data(&m.get_snapshot().data).is_err() => {
            return Err("a snapshot whose payload does not decode");
        }
        // Followers forward PUTs only; membership changes go by /conf-change.
        MessageType::MsgPropose
            if m.entries.is_empty()
                || m.entries
                    .iter()
                    .any(|e| e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty()) =>
        {
            return Err("a forwarded proposal that is empty or not all PUTs");
        }
        _ => {}
    }
    Ok(())
}

impl RaftNode {
    /// Replays the snapshot and WAL (or bootstraps a new member) and builds the node.
    pub fn recover(
        cfg: &Config,
        shared: &Shared,
        get_snapshot: GetSnapshot,
        logger: &slog::Logger,
    ) -> Result<RaftNode> {
        let peers = cfg.peers()?;
        let nonce = crate::nonce::boot_nonce().map_err(|e| Error::Io {
            context: "cannot read a boot nonce from /dev/urandom".into(),
            source: e,
        })?;
        let started = Instant::now();
        let snapshotter = Snapshotter::new(&cfg.disk, &cfg.snap_dir(), logger)?;
        // Now, before any snapshot thread or WAL writer runs, is the only safe time.
        snapshotter.remove_tmp_files()?;
        let (mut wal, rec) = Wal::open(
            &cfg.wal_dir(),
            WalOptions {
                segment_size: cfg.wal_segment_size,
                fail_write_after: cfg.wal_fail_after_bytes,
                disk: cfg.disk.clone(),
            },
            logger,
        )?;
        // A WAL that holds nothing is a first start that a crash interrupted before the
        // bootstrap entries were durable (the empty segment is created first): this node has
        // promised nothing yet, so it bootstraps again.
        let old_wal = rec != Recovered::default();
        let mut storage = RaftStorage::new(cfg.disk.clone());
        let mut members: BTreeMap<u64, String> =
            peers.iter().map(|(id, u)| (*id, u.url.clone())).collect();
        let mut removed = HashSet::new();
        let mut snapshot_index = 0;
        let mut snapshot_bytes = 0;

        // Only a snapshot the WAL vouches for (its marker is at or below the durable commit)
        // matches the log that follows.
        let valid = rec.valid_snapshots();
        if let Some(snap) = snapshotter.load_newest_available(&valid)? {
            let meta = snap.get_metadata();
            snapshot_index = meta.index;
            snapshot_bytes = snap.data.len() as u64;
            let data = decode_snapshot_data(&snap.data).map_err(|e| {
                Error::Recovery(format!(
                    "snapshot at index {} does not decode: {e}",
                    meta.index
                ))
            })?;
            members = data.members;
            removed = data.removed.into_iter().collect();
            shared
                .commit_tx
                .try_send(Apply::Snapshot {
                    index: meta.index,
                    term: meta.term,
                    data: data.kv,
                })
                .map_err(|_| Error::Recovery("the kvstore stopped".into()))?;
            let path = snapshotter.path(meta.term, meta.index);
            storage.apply_snapshot(snap)?;
            storage.release_snapshot_data(path);
        } else if valid.iter().any(|&(_, i)| i > 0) {
            return Err(Error::Recovery(
                "the WAL references snapshots but no matching .snap file is readable".into(),
            ));
        }

        let mut hs = rec.hard_state;
        hs.commit = hs.commit.max(snapshot_index);
        let entries: Vec<Entry> = rec
            .entries
            .into_iter()
            .filter(|e| e.index > snapshot_index)
            .collect();
        if let Some(first) = entries.first() {
            if first.index != snapshot_index + 1 {
                return Err(Error::Recovery(format!(
                    "WAL entries start at index {} but the snapshot ends at {}",
                    first.index, snapshot_index
                )));
            }
        }
        storage.set_hard_state(hs.clone());
        storage.append(&entries)?;

        let mut applied = snapshot_index;
        if !old_wal && !cfg.join {
            // etcd's StartNode: every initial member is an AddNode entry at term 1, committed
            // and already applied, so a node that joins later replays the same membership.
            let mut ents = Vec::new();
            let mut cs = ConfState::default();
            for (id, url) in &peers {
                let mut cc = ConfChange::default();
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = *id;
                cc.context = url.url.clone().into_bytes().into();
                ents.push(conf_change_entry(&cc, *id));
                cs.voters.push(*id);
            }
            let hs = HardState {
                term: 1,
                commit: ents.len() as u64,
                ..Default::default()
            };
            wal.save(&ents, Some(&hs), true)?;
            storage.append(&ents)?;
            storage.set_hard_state(hs);
            storage.set_conf_state(cs);
            applied = ents.len() as u64;
            slog::info!(logger, "bootstrapped new cluster"; "members" => peers.len());
        } else {
            slog::info!(logger, "recovered";
                "snapshot_index" => snapshot_index, "entries" => entries.len(),
                "term" => hs.term, "commit" => hs.commit,
                "ms" => started.elapsed().as_millis() as u64, "join" => cfg.join);
        }

        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: 10,
            heartbeat_tick: 1,
            applied,
            max_size_per_msg: PROPOSE_BYTES as u64,
            max_inflight_msgs: 256,
            // Entries appended while a MsgAppend to a peer is still in the Ready join it: one
            // message (and one response) per peer per Ready.
            batch_append: true,
            max_uncommitted_size: 1 << 30,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        let node = RawNode::new(&raft_cfg, storage, logger)?;

        let mut transport = Transport::new(
            cfg.id,
            shared.peer_client.clone(),
            shared.report_tx.clone(),
            shared.shutdown.clone(),
            logger,
        );
        #[cfg(feature = "fault-injection")]
        if let Some(path) = &cfg.fault_file {
            let faults = Arc::new(crate::faults::Faults::default());
            faults.clone().watch(
                path.clone(),
                shared.shutdown.clone(),
                logger.new(slog::o!("component" => "faults")),
            );
            transport.set_faults(faults);
        }
        for (id, url) in &members {
            if !removed.contains(id) {
                transport.add_peer(*id, url);
            }
        }
        *shared.removed.write().expect("removed-set lock") = removed;

        let (snapshot_done_tx, snapshot_done_rx) = mpsc::unbounded_channel();
        Ok(RaftNode {
            id: cfg.id,
            node,
            wal: Some(wal),
            writer: None,
            snapshotter,
            transport,
            get_snapshot,
            commit_tx: shared.commit_tx.clone(),
            members,
            removed: shared.removed.clone(),
            applied,
            snapshot_index,
            snapshot_bytes,
            log_bytes: 0,
            // The bootstrap's membership entries count, as raftexample counts them.
            writes: applied - snapshot_index,
            last_apply_done: None,
            pending_cc: HashMap::new(),
            reads: ReadBatcher::new(cfg.id, nonce),
            snapshot_in_flight: false,
            snapshot_done_tx,
            snapshot_done_rx: Some(snapshot_done_rx),
            snapshot_persisting: None,
            held: Held::default(),
            submitted: 0,
            persisted: 0,
            status: shared.status.clone(),
            members_changed: true,
            exit: None,
            snapshot_count: cfg.snapshot_count,
            catchup_entries: cfg.snapshot_catchup_entries,
            max_snapshots: cfg.max_snapshots,
            cluster_id: shared.peer_client.cluster_id(),
            peer_warn: crate::server::Throttle::new(Duration::from_secs(10)),
            logger: logger.clone(),
        })
    }

    /// The event loop: a 100 ms ticker plus the input channels, each event followed by as many
    /// Ready rounds as raft has.
    pub async fn run(mut self, mut inp: Inputs, token: CancellationToken) -> Result<Exit> {
        let (persisted_tx, mut persisted_rx) = mpsc::unbounded_channel();
        let wal = self.wal.take().expect("run is called once");
        self.writer = Some(
            Writer::start(wal, self.snapshotter.clone(), persisted_tx, &self.logger).map_err(
                |e| Error::Io {
                    context: "cannot start the WAL writer thread".into(),
                    source: e,
                },
            )?,
        );
        let mut snapshot_done_rx = self.snapshot_done_rx.take().expect("run is called once");
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish_status();
        // Set while a leader hands over before stopping.
        let mut handing_over: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled(), if handing_over.is_none() => {
                    match self.hand_over_leadership() {
                        Some(to) => {
                            slog::info!(self.logger, "shutting down: transferring leadership"; "to" => to);
                            handing_over = Some(Instant::now() + HANDOVER);
                        }
                        None => break,
                    }
                }
                _ = ticker.tick() => {
                    self.node.tick();
                    self.reads.on_tick(&mut self.node);
                }
                Some(m) = inp.raft_msg_rx.recv() => self.step(m),
                Some(p) = persisted_rx.recv() => self.on_persisted(p)?,
                Some(done) = snapshot_done_rx.recv() => self.on_snapshot_written(done)?,
                Some(r) = inp.report_rx.recv() => self.report(r),
                p = inp.propose_rx.recv() => match p {
                    Some(p) => self.held.push(p),
                    // Every proposer gone is raftexample's closed proposeC: stop.
                    None => break,
                },
                Some(r) = inp.read_rx.recv() => self.reads.queued.push(r),
                Some(cc) = inp.conf_change_rx.recv() => self.propose_conf_change(cc),
            }
            // Take whatever else is already queued on every input, so one Ready (and one
            // fsync) covers it all and no input starves another.
            self.drain(&mut inp, &mut persisted_rx)?;
            if self.may_propose() {
                if let Some(dropped) = self.propose() {
                    // Their PUTs fail at once instead of waiting out their deadline.
                    self.send_apply(dropped).await?;
                }
            }
            self.reads.flush(&mut self.node);
            while self.node.has_ready() && self.exit.is_none() {
                if let Err(e) = self.on_ready().await {
                    // A failed submit means the writer stopped; its own error says why.
                    while let Ok(p) = persisted_rx.try_recv() {
                        p.map_err(writer_error)?;
                    }
                    return Err(e);
                }
                // A round just answered lets the reads queued behind it go.
                self.reads.flush(&mut self.node);
            }
            self.publish_status();
            if self.exit.is_some() {
                break;
            }
            if handing_over.is_some_and(|until| {
                self.node.raft.state != StateRole::Leader || Instant::now() >= until
            }) {
                break;
            }
        }
        // A snapshot being written finishes first, so its marker and purge are not lost.
        if self.snapshot_in_flight {
            if let Ok(Some(done)) =
                tokio::time::timeout(HANDOVER * 5, snapshot_done_rx.recv()).await
            {
                self.on_snapshot_written(done)?;
            }
        }
        // Finishes the queued writes, syncs and closes the WAL.
        if let Some(mut w) = self.writer.take() {
            w.close();
        }
        while let Ok(p) = persisted_rx.try_recv() {
            p.map_err(writer_error)?;
        }
        self.reads.fail_all(ReadError::Shutdown);
        let exit = self.exit.take().unwrap_or(Exit::Shutdown);
        slog::info!(self.logger, "raft stopped"; "exit" => ?exit, "applied" => self.applied);
        Ok(exit)
    }

    fn drain(
        &mut self,
        inp: &mut Inputs,
        persisted_rx: &mut mpsc::UnboundedReceiver<Result<Persisted, WriterError>>,
    ) -> Result<()> {
        while let Ok(p) = persisted_rx.try_recv() {
            self.on_persisted(p)?;
        }
        while let Ok(r) = inp.report_rx.try_recv() {
            self.report(r);
        }
        for _ in 0..DRAIN {
            let Ok(m) = inp.raft_msg_rx.try_recv() else {
                break;
            };
            self.step(m);
        }
        for _ in 0..DRAIN {
            let Ok(p) = inp.propose_rx.try_recv() else {
                break;
            };
            self.held.push(p);
        }
        for _ in 0..DRAIN {
            let Ok(r) = inp.read_rx.try_recv() else { break };
            self.reads.queued.push(r);
        }
        Ok(())
    }

    /// A leader about to stop picks the most up-to-date follower and asks it to take over (raft
    /// first catches it up), so the cluster does not wait out an election timeout.
    fn hand_over_leadership(&mut self) -> Option<u64> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        let voters = &self.node.store().conf_state().voters;
        let to = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id && voters.contains(id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id)?;
        self.node.transfer_leader(to);
        Some(to)
    }

    fn step(&mut self, mut m: Message) {
        if let Err(why) = check_peer_message(&self.node.raft, &mut m) {
            if self.peer_warn.ready() {
                slog::warn!(self.logger, "dropped a malformed peer message (more are logged at \
                    debug level for 10 s)"; "why" => why, "from" => m.from,
                    "type" => ?m.get_msg_type());
            } else {
                slog::debug!(self.logger, "dropped a malformed peer message"; "why" => why,
                    "from" => m.from, "type" => ?m.get_msg_type());
            }
            return;
        }
        if m.get_msg_type() == MessageType::MsgPropose && self.node.raft.state == StateRole::Leader
        {
            // Proposals a follower forwarded join the leader's own batch.
            self.held.forwarded(m.take_entries());
            return;
        }
        if let Err(e) = self.node.step(m) {
            // StepPeerNotFound (a removed peer's response) and StepLocalMsg (a local-only type
            // sent over the wire) are expected noise, never fatal.
            slog::debug!(self.logger, "step failed"; "error" => %e);
        }
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Unreachable(id) => self.node.report_unreachable(id),
            Report::Snapshot(id, status) => self.node.report_snapshot(id, status),
            Report::Removed => {
                slog::warn!(
                    self.logger,
                    "a peer says this node was removed from the cluster; shutting down"
                );
                self.exit = Some(Exit::Removed);
            }
        }
    }

    /// A leader holds new proposals (its own and those followers forward) while its last WAL
    /// write is still in flight, and proposes them together when it ends: the disk is busy
    /// anyway, and one batch then costs one Ready, one WAL write with one fsync and one
    /// MsgAppend per follower instead of several. Followers forward at once (the leader
    /// batches), and the hold is bounded in size.
    fn may_propose(&self) -> bool {
        self.node.raft.state != StateRole::Leader
            || self.persisted == self.submitted
            || self.held.count >= DRAIN
    }

    /// Proposes everything held in `MsgPropose`s of up to [`PROPOSE_BYTES`] (what
    /// `RawNode::propose` builds, with many entries instead of one), so raft appends and
    /// replicates them together and a follower forwards them to the leader in few messages.
    /// Returns what to tell the kvstore about the PUTs of the messages raft dropped.
    fn propose(&mut self) -> Option<Apply> {
        if self.held.count == 0 {
            return None;
        }
        self.held.seal();
        let Held {
            entries,
            ids,
            entry_ids,
            ..
        } = std::mem::take(&mut self.held);
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
            m.from = self.id;
            m.set_entries(std::mem::take(&mut chunk).into());
            let res = self.node.step(m);
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

    /// True if a conf change may still be in flight: raft's own check (leader only), one of
    /// ours not yet applied, or one in the unapplied part of the log.
    fn conf_change_pending(&mut self) -> bool {
        self.pending_cc.retain(|_, tx| !tx.is_closed());
        if self.node.raft.has_pending_conf() || !self.pending_cc.is_empty() {
            return true;
        }
        let store = self.node.store();
        let last = store.last_index().unwrap_or(0);
        let lo = self
            .applied
            .max(store.first_index().unwrap_or(1).saturating_sub(1))
            + 1;
        lo <= last
            && store
                .entries(lo, last + 1, None, raft::GetEntriesContext::empty(false))
                .map(|ents| {
                    ents.iter()
                        .any(|e| e.get_entry_type() != EntryType::EntryNormal)
                })
                .unwrap_or(true)
    }

    fn propose_conf_change(&mut self, req: ConfChangeRequest) {
        let id = req.cc.node_id;
        let is_member = self.node.store().conf_state().voters.contains(&id)
            || self.node.store().conf_state().learners.contains(&id);
        let adding = req.cc.get_change_type() != ConfChangeType::RemoveNode;
        let leader = self.node.raft.leader_id;
        let check = match () {
            _ if adding && self.removed.read().expect("removed-set lock").contains(&id) => {
                Err(ConfChangeError::Removed(id))
            }
            _ if adding && is_member => Err(ConfChangeError::AlreadyMember(id)),
            _ if !adding && !is_member => Err(ConfChangeError::NotMember(id)),
            _ if leader == raft::INVALID_ID => {
                Err(ConfChangeError::Dropped("no leader known".into()))
            }
            _ if leader != self.id => match self.members.get(&leader) {
                Some(url) => Err(ConfChangeError::NotLeader {
                    leader,
                    url: url.clone(),
                }),
                None => Err(ConfChangeError::Dropped(
                    "the leader's URL is unknown".into(),
                )),
            },
            _ if self.conf_change_pending() => Err(ConfChangeError::Pending),
            _ => Ok(()),
        };
        if let Err(e) = check {
            let _ = req.done.send(Err(e));
            return;
        }
        let cc_id = req.cc.id;
        match self.node.propose_conf_change(vec![], req.cc) {
            Ok(()) => {
                self.pending_cc.insert(cc_id, req.done);
            }
            Err(e) => {
                let _ = req.done.send(Err(ConfChangeError::Dropped(e.to_string())));
            }
        }
    }

    /// One Ready round, in raft-rs 0.7's order, with persistence handed to the WAL writer
    /// thread (`advance_append_async`): the loop goes on stepping messages and taking
    /// proposals while the disk works, and many Readies share one fsync.
    async fn on_ready(&mut self) -> Result<()> {
        let mut rd = self.node.ready();

        // 1. A leader may send before it persists (Raft thesis 10.2.1): its own disk write then
        // runs in parallel with the followers'.
        self.send(rd.take_messages());

        // 2. Snapshot from the leader: its .snap file, then its WAL record (see `Job::Snapshot`
        // for why in that order), queued before this Ready's entries and HardState.
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.submit(Job::Snapshot(snap.clone()))?;
            self.install_snapshot(snap).await?;
        }

        // 3. Entries committed earlier and already persisted.
        self.apply_committed(rd.take_committed_entries()).await?;

        // 4. Entries, then HardState, to the WAL; raft reads them from storage meanwhile but
        // counts them (and sends the messages that promise them: votes, append responses) only
        // once the writer reports them durable.
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        let store = self.node.mut_store();
        store.append(&entries)?;
        if let Some(hs) = &hs {
            store.set_hard_state(hs.clone());
        }
        let mut messages = rd.take_persisted_messages();
        let nothing_to_persist = entries.is_empty() && hs.is_none() && rd.snapshot().is_empty();
        if nothing_to_persist
            && messages
                .iter()
                .all(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse)
        {
            // A heartbeat response promises nothing about this node's log or vote, so it need
            // not queue behind earlier writes: this keeps a ReadIndex round (heartbeat out,
            // responses back) off the WAL writer thread.
            self.send(std::mem::take(&mut messages));
        }
        let number = rd.number();
        let to_writer = !nothing_to_persist || !messages.is_empty();
        if to_writer {
            self.submitted = number;
            self.submit(Job::Append {
                number,
                entries,
                hs,
                sync: rd.must_sync(),
                messages,
            })?;
        }
        if !rd.snapshot().is_empty() {
            // Behind the Append just queued: its HardState's commit is what makes the leader's
            // snapshot one recovery would use (see `Job::Purge`).
            self.purge()?;
        }

        // 5. Read indexes answered by the leader.
        self.reads.resolve(rd.take_read_states());

        // raft may not count a snapshot as applied before it is persisted (it panics), so after
        // one, applying is reported only once the writer has caught up with this Ready.
        if !rd.snapshot().is_empty() {
            self.snapshot_persisting = Some(rd.number());
        }
        self.node.advance_append_async(rd);
        if !to_writer && self.persisted == self.submitted {
            // Nothing of this Ready to persist and nothing before it pending: it is durable
            // now. (With writes pending, the next one the writer reports covers it.)
            self.node.on_persist_ready(number);
        }
        if self.snapshot_persisting.is_none() {
            self.node.advance_apply();
        }
        self.maybe_trigger_snapshot().await
    }

    fn submit(&mut self, job: Job) -> Result<()> {
        let writer = self
            .writer
            .as_ref()
            .expect("the writer runs while the loop does");
        if writer.submit(job) {
            Ok(())
        } else {
            Err(Error::Recovery("the WAL writer stopped".into()))
        }
    }

    /// The writer made Ready `number` durable: release what waited for it.
    fn on_persisted(&mut self, p: Result<Persisted, WriterError>) -> Result<()> {
        let p = p.map_err(writer_error)?;
        self.persisted = p.number;
        self.send(p.messages);
        self.node.on_persist_ready(p.number);
        if self.snapshot_persisting.is_some_and(|n| n <= p.number) {
            self.snapshot_persisting = None;
            self.node.advance_apply();
        }
        Ok(())
    }

    fn send(&mut self, mut msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        process_messages(&mut msgs, self.node.store().conf_state());
        self.transport.send(msgs);
    }

    /// Installs a snapshot received from the leader: raft storage, membership, then the map
    /// (the nil-on-commitC of raftexample).
    async fn install_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let snap_bytes = snap.data.len() as u64;
        let data = decode_snapshot_data(&snap.data).map_err(|e| {
            Error::Recovery(format!(
                "snapshot at index {index} from the leader does not decode: {e}"
            ))
        })?;
        let path = self.snapshotter.path(snap.get_metadata().term, index);
        self.node.mut_store().apply_snapshot(snap)?;
        // The WAL writer is saving it to `path`; kept in memory, a large snapshot would double
        // a joining node's footprint. Until the file is there, raft is told to ask again.
        self.node.mut_store().release_snapshot_data(path);
        for (id, url) in &data.members {
            if !data.removed.contains(id) {
                self.transport.add_peer(*id, url);
            }
        }
        for id in self.members.keys() {
            if !data.members.contains_key(id) {
                self.transport.remove_peer(*id);
            }
        }
        self.members = data.members;
        self.members_changed = true;
        *self.removed.write().expect("removed-set lock") = data.removed.into_iter().collect();
        slog::info!(self.logger, "installing snapshot from leader"; "index" => index, "bytes" => data.kv.len());
        self.send_apply(Apply::Snapshot {
            index,
            term,
            data: data.kv,
        })
        .await?;
        self.applied = index;
        self.snapshot_index = index;
        self.snapshot_bytes = snap_bytes;
        self.log_bytes = 0;
        self.writes = 0;
        Ok(())
    }

    async fn send_apply(&mut self, a: Apply) -> Result<()> {
        self.commit_tx
            .send(a)
            .await
            .map_err(|_| Error::Recovery("the kvstore stopped".into()))
    }

    async fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        if last <= self.applied {
            return Ok(());
        }
        let mut data: Vec<Bytes> = Vec::new();
        // What is really applied: the batch's last index, unless our own removal stops it.
        let (mut upto, mut upto_term) = (self.applied, 0);
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            (upto, upto_term) = (e.index, e.term);
            self.log_bytes += e.data.len() as u64;
            self.writes += entry_writes(&e);
            match e.get_entry_type() {
                // An empty entry is a new leader's no-op.
                EntryType::EntryNormal if !e.data.is_empty() => data.push(e.data),
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&e.data) {
                    Ok(cc) => self.apply_conf_change(cc),
                    Err(err) => {
                        slog::error!(self.logger, "undecodable conf change skipped"; "index" => e.index, "error" => %err)
                    }
                },
                EntryType::EntryConfChangeV2 => {
                    slog::error!(self.logger, "ConfChangeV2 is never proposed here; skipped"; "index" => e.index)
                }
            }
            if self.exit.is_some() {
                // Our own removal: entries after it are no business of this node.
                break;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.send_apply(Apply::Entries {
            index: upto,
            term: upto_term,
            data,
            applied: tx,
        })
        .await?;
        self.last_apply_done = Some(rx);
        self.applied = upto;
        Ok(())
    }

    fn apply_conf_change(&mut self, cc: ConfChange) {
        let id = cc.node_id;
        let result = match self.node.apply_conf_change(&cc) {
            Ok(cs) => {
                self.node.mut_store().set_conf_state(cs);
                Ok(())
            }
            Err(e) => {
                slog::error!(self.logger, "conf change rejected by raft"; "node" => id, "error" => %e);
                Err(ConfChangeError::Dropped(e.to_string()))
            }
        };
        if result.is_ok() {
            match cc.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    match std::str::from_utf8(&cc.context).map(PeerUrl::parse) {
                        Ok(Ok(url)) => {
                            self.transport.add_peer(id, &url.url);
                            self.members.insert(id, url.url);
                        }
                        _ if cc.context.is_empty() => {}
                        _ => {
                            slog::error!(self.logger, "added member has an invalid peer URL"; "node" => id)
                        }
                    }
                    slog::info!(self.logger, "member added"; "node" => id);
                }
                ConfChangeType::RemoveNode => {
                    self.members.remove(&id);
                    self.removed.write().expect("removed-set lock").insert(id);
                    if id == self.id {
                        slog::info!(
                            self.logger,
                            "this node was removed from the cluster; shutting down"
                        );
                        self.exit = Some(Exit::Removed);
                    } else {
                        self.transport.remove_peer(id);
                        slog::info!(self.logger, "member removed"; "node" => id);
                    }
                }
            }
            self.members_changed = true;
        }
        if let Some(done) = self.pending_cc.remove(&cc.id) {
            let _ = done.send(result);
        }
    }

    /// raftexample's `maybeTriggerSnapshot`: every `snapshot_count` applied entries (for a
    /// large map, see [`AMORTIZE_ABOVE`]), capture the map once it has caught up, and let a
    /// snapshot thread stream it into the `.snap` file; [`Self::on_snapshot_written`] then
    /// compacts the log.
    async fn maybe_trigger_snapshot(&mut self) -> Result<()> {
        let due = self.writes > self.snapshot_count
            && (self.snapshot_bytes < AMORTIZE_ABOVE || self.log_bytes >= self.snapshot_bytes);
        if self.snapshot_in_flight || !due {
            return Ok(());
        }
        self.log_bytes = 0;
        self.writes = 0;
        if let Some(done) = self.last_apply_done.take() {
            // The map must hold exactly the entries up to `applied`.
            let _ = done.await;
        }
        let index = self.applied;
        let term = self.node.store().term(index)?;
        let source = (self.get_snapshot)();
        let members = self.members.clone();
        let removed: BTreeSet<u64> = self
            .removed
            .read()
            .expect("removed-set lock")
            .iter()
            .copied()
            .collect();
        let cs = self.node.store().conf_state().clone();
        let snapshotter = self.snapshotter.clone();
        let done_tx = self.snapshot_done_tx.clone();
        let logger = self.logger.clone();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let kv_len = source.encoded_len();
                let header = snapshot_data_header(&members, &removed, kv_len);
                let data_len = header.len() as u64 + kv_len;
                let mut meta = SnapshotMetadata {
                    index,
                    term,
                    ..Default::default()
                };
                meta.set_conf_state(cs);
                let res = snapshotter
                    .save_with(&meta, data_len, |w| {
                        w.write_all(&header)?;
                        source.write_to(w)
                    })
                    .map(|path| Written {
                        meta,
                        path,
                        data_len,
                    });
                if res.is_ok() {
                    slog::info!(logger, "snapshot written"; "index" => index,
                        "ms" => started.elapsed().as_millis() as u64);
                }
                let _ = done_tx.send(res);
            })
            .map_err(|e| Error::Io {
                context: "cannot start a snapshot thread".into(),
                source: e,
            })?;
        self.snapshot_in_flight = true;
        Ok(())
    }

    /// The snapshot thread made a `.snap` durable: serve it to slow followers, compact the
    /// log, record its WAL marker (only now: a marker must never name a missing file) and
    /// purge what it makes obsolete. Or it failed: logged, and the log stays uncompacted.
    fn on_snapshot_written(&mut self, done: SnapshotDone) -> Result<()> {
        self.snapshot_in_flight = false;
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // Not fatal: the WAL holds everything it would have, and a later one replaces it.
                slog::error!(self.logger, "cannot write a snapshot; trying again at the next trigger";
                    "error" => %e);
                return Ok(());
            }
        };
        let (index, term) = (done.meta.index, done.meta.term);
        if index <= self.snapshot_index {
            // A newer snapshot came from the leader meanwhile.
            return Ok(());
        }
        self.snapshot_bytes = done.data_len;
        // Raft reads the data back from the file if a follower needs it; keeping it in memory
        // would double the peak footprint of a large map.
        self.node
            .mut_store()
            .set_snapshot_on_disk(done.meta, done.path);
        self.snapshot_index = index;
        // Keeps the entries holding the last `catchup_entries` writes for followers slightly
        // behind (raftexample's snapshotCatchUpEntriesN, which counts entries of one write).
        let compact = self
            .node
            .store()
            .catchup_start(index, self.catchup_entries, entry_writes);
        if compact > 0 {
            self.node.mut_store().compact(compact)?;
        }
        self.submit(Job::Marker(crate::wal::WalSnapshot { index, term }))?;
        self.purge()?;
        crate::metrics::snapshot();
        slog::info!(self.logger, "snapshot taken"; "index" => index, "compacted_to" => compact);
        Ok(())
    }

    /// Deletes old snapshot files and WAL segments once the new marker is durable; see
    /// [`Job::Purge`]. Keeping WAL back to the oldest snapshot kept means a corrupt newest
    /// `.snap` still leaves an older one plus the WAL after it to recover from.
    fn purge(&mut self) -> Result<()> {
        self.submit(Job::Purge {
            keep: self.max_snapshots,
        })
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let mut st = self.status.lock().expect("status lock");
        st.id = self.id;
        st.role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre_candidate",
        };
        st.leader = raft.leader_id;
        st.term = raft.term;
        st.commit = raft.raft_log.committed;
        st.applied = self.applied;
        if st.cluster_id.is_none() {
            st.cluster_id = self.cluster_id.get().map(crate::cluster_id::format);
        }
        crate::metrics::indexes(st.commit, st.applied);
        if self.members_changed {
            st.members = self.members.clone();
            self.members_changed = false;
        }
    }
}

/// Batches linearizable reads: one ReadIndex round is in flight at a time, and every read that
/// arrives meanwhile waits for the next, which they all share (as etcd's read loop does); under
/// load a round answers as many reads as there are clients, for one heartbeat exchange. Any
/// read state for round `c` also answers rounds issued before it, since they started earlier.
///
/// A round's context is `node id | boot nonce | round number` (etcd's is alike): the leader
/// keys pending requests by context and drops one whose context is already pending, so
/// contexts must differ between nodes, and an answer that reaches a restarted node must not
/// resolve the new boot's reads with an index read for the old one.
struct ReadBatcher {
    /// Node id and boot nonce, big-endian: the first [`CTX_PREFIX`] bytes of every context.
    prefix: [u8; CTX_PREFIX],
    queued: Vec<ReadRequest>,
    inflight: VecDeque<(u64, Vec<ReadRequest>)>,
    next_ctx: u64,
    idle_ticks: u32,
}

const CTX_PREFIX: usize = 16;

impl ReadBatcher {
    fn new(id: u64, nonce: u64) -> ReadBatcher {
        let mut prefix = [0; CTX_PREFIX];
        prefix[..8].copy_from_slice(&id.to_be_bytes());
        prefix[8..].copy_from_slice(&nonce.to_be_bytes());
        ReadBatcher {
            prefix,
            queued: Vec::new(),
            inflight: VecDeque::new(),
            next_ctx: 0,
            idle_ticks: 0,
        }
    }

    fn issue(&mut self, node: &mut RawNode<RaftStorage>, batch: Vec<ReadRequest>) {
        self.next_ctx += 1;
        let mut ctx = Vec::with_capacity(CTX_PREFIX + 8);
        ctx.extend_from_slice(&self.prefix);
        ctx.extend_from_slice(&self.next_ctx.to_be_bytes());
        node.read_index(ctx);
        self.inflight.push_back((self.next_ctx, batch));
        self.idle_ticks = 0;
    }

    /// The round number in `ctx` if this boot of this node issued it.
    fn round(&self, ctx: &[u8]) -> Option<u64> {
        let (prefix, n) = ctx.split_at_checked(CTX_PREFIX)?;
        if prefix != self.prefix {
            return None;
        }
        Some(u64::from_be_bytes(n.try_into().ok()?))
    }

    fn flush(&mut self, node: &mut RawNode<RaftStorage>) {
        if self.queued.is_empty() || !self.inflight.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.queued);
        if node.raft.leader_id == raft::INVALID_ID {
            for r in batch {
                let _ = r.send(Err(ReadError::NoLeader));
            }
            return;
        }
        self.issue(node, batch);
    }

    fn on_tick(&mut self, node: &mut RawNode<RaftStorage>) {
        for (_, batch) in self.inflight.iter_mut() {
            batch.retain(|r| !r.is_closed());
        }
        while self.inflight.front().is_some_and(|(_, b)| b.is_empty()) {
            self.inflight.pop_front();
        }
        if self.inflight.is_empty() {
            return;
        }
        self.idle_ticks += 1;
        if self.idle_ticks < READ_RETRY_TICKS {
            return;
        }
        if node.raft.leader_id == raft::INVALID_ID {
            self.fail_all(ReadError::NoLeader);
        } else {
            self.issue(node, Vec::new());
        }
    }

    fn resolve(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Some(ctx) = self.round(&rs.request_ctx) else {
                // Another boot's (or garbage): its index says nothing about our rounds.
                continue;
            };
            while self.inflight.front().is_some_and(|(c, _)| *c <= ctx) {
                let (_, batch) = self.inflight.pop_front().expect("front exists");
                for r in batch {
                    let _ = r.send(Ok(rs.index));
                }
            }
        }
    }

    fn fail_all(&mut self, e: ReadError) {
        for (_, batch) in self.inflight.drain(..) {
            for r in batch {
                let _ = r.send(Err(e.clone()));
            }
        }
        for r in self.queued.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        fn as_bytes<S: serde::Serializer>(b: &&[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
        let members: BTreeMap<u64, String> =
            [(1, "http://a".to_string()), (3, "http://c".into())].into();
        let removed: BTreeSet<u64> = [2].into();
        let kv = b"map bytes".to_vec();
        let mut enc = snapshot_data_header(&members, &removed, kv.len() as u64);
        enc.extend_from_slice(&kv);
        let old = bincode::serialize(&Bincode {
            members: &members,
            removed: &removed,
            kv: &kv,
        })
        .unwrap();
        assert_eq!(enc, old);
        let enc = Bytes::from(enc);
        let got = decode_snapshot_data(&enc).unwrap();
        assert_eq!(
            got,
            SnapshotData {
                members,
                removed,
                kv: kv.into()
            }
        );
        for cut in 0..enc.len() {
            assert!(
                decode_snapshot_data(&enc.slice(..cut)).is_err(),
                "prefix of {cut} bytes"
            );
        }
    }

    fn discard() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    /// A raft node of `voters` on an in-memory log, for tests that move messages by hand.
    fn mem_node(id: u64, voters: &[u64]) -> RawNode<RaftStorage> {
        let mut store = RaftStorage::default();
        store.set_conf_state(ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        });
        let cfg = raft::Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            ..Default::default()
        };
        RawNode::new(&cfg, store, &discard()).unwrap()
    }

    fn batcher(id: u64, nonce: u64) -> ReadBatcher {
        ReadBatcher::new(id, nonce)
    }

    /// Runs Ready rounds and delivers messages until all `nodes` are quiet. Read states go to
    /// each node's batcher, and are also returned (by node id) as they came.
    fn pump(
        nodes: &mut BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)>,
    ) -> Vec<(u64, ReadState)> {
        let mut seen = Vec::new();
        loop {
            let mut msgs = Vec::new();
            for (id, (n, b)) in nodes.iter_mut() {
                if !n.has_ready() {
                    continue;
                }
                let mut rd = n.ready();
                msgs.extend(rd.take_messages());
                let store = n.mut_store();
                store.append(rd.entries()).unwrap();
                if let Some(hs) = rd.hs() {
                    store.set_hard_state(hs.clone());
                }
                msgs.extend(rd.take_persisted_messages());
                let states = rd.take_read_states();
                seen.extend(states.iter().map(|s| (*id, s.clone())));
                b.resolve(states);
                let mut light = n.advance(rd);
                msgs.extend(light.take_messages());
                if let Some(c) = light.commit_index() {
                    n.mut_store().set_commit(c);
                }
                n.advance_apply();
            }
            if msgs.is_empty() {
                return seen;
            }
            for m in msgs {
                if let Some((n, _)) = nodes.get_mut(&m.to) {
                    let _ = n.step(m);
                }
            }
        }
    }

    /// Three nodes with node 1 elected and its first entry committed everywhere.
    fn elected(nonce: u64) -> BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)> {
        let mut nodes: BTreeMap<_, _> = [1, 2, 3]
            .into_iter()
            .map(|id| (id, (mem_node(id, &[1, 2, 3]), batcher(id, nonce))))
            .collect();
        nodes.get_mut(&1).unwrap().0.campaign().unwrap();
        pump(&mut nodes);
        assert_eq!(nodes[&1].0.raft.state, StateRole::Leader);
        assert!(nodes.values().all(|(n, _)| n.raft.leader_id == 1));
        nodes
    }

    fn read_on(
        nodes: &mut BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)>,
        id: u64,
    ) -> oneshot::Receiver<Result<u64, ReadError>> {
        let (tx, rx) = oneshot::channel();
        let (n, b) = nodes.get_mut(&id).unwrap();
        b.queued.push(tx);
        b.flush(n);
        rx
    }

    /// Two followers that issue their first ReadIndex round at the same moment are both
    /// answered by the leader's one heartbeat exchange: their contexts differ (raft-rs drops a
    /// request whose context is already pending, which left one of them waiting for the retry).
    #[test]
    fn reads_of_two_followers_do_not_collide() {
        // Same nonce on purpose: the node id alone keeps contexts apart.
        let mut nodes = elected(7);
        let mut r2 = read_on(&mut nodes, 2);
        let mut r3 = read_on(&mut nodes, 3);
        let mut r1 = read_on(&mut nodes, 1);
        pump(&mut nodes);
        let commit = nodes[&1].0.raft.raft_log.committed;
        assert_eq!(r2.try_recv().ok(), Some(Ok(commit)), "node 2's read");
        assert_eq!(r3.try_recv().ok(), Some(Ok(commit)), "node 3's read");
        assert_eq!(r1.try_recv().ok(), Some(Ok(commit)), "the leader's read");
    }

    /// An answer to a read of a previous incarnation of this node (same id, another boot)
    /// resolves nothing of the current one, which is answered by its own round.
    #[test]
    fn answers_for_a_previous_boot_are_ignored() {
        let mut nodes = elected(1);
        let _old = read_on(&mut nodes, 2);
        let states = pump(&mut nodes);
        let old: Vec<ReadState> = states
            .into_iter()
            .filter(|(id, _)| *id == 2)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(old.len(), 1, "the old incarnation's read was answered");
        // Node 2 restarts (a new boot nonce) and issues its first round; the old answer is
        // delivered late.
        nodes.get_mut(&2).unwrap().1 = batcher(2, 2);
        let mut fresh = read_on(&mut nodes, 2);
        nodes.get_mut(&2).unwrap().1.resolve(old);
        assert!(
            fresh.try_recv().is_err(),
            "a read of this boot took an answer meant for the previous one"
        );
        pump(&mut nodes);
        let commit = nodes[&1].0.raft.raft_log.committed;
        assert_eq!(fresh.try_recv().ok(), Some(Ok(commit)));
    }

    /// A freshly bootstrapped node 1 of `n` (its peers' ports are never contacted: nothing is
    /// sent unless a Ready is handled) and the receiving end of its commit channel.
    fn bootstrapped(dir: &std::path::Path, n: u64) -> (RaftNode, mpsc::Receiver<Apply>) {
        use clap::Parser as _;
        let cluster: Vec<String> = (1..=n).map(|i| format!("http://127.0.0.1:{i}")).collect();
        let cfg = Config::parse_from([
            "raftexample",
            "--cluster",
            &cluster.join(","),
            "--data-dir",
            dir.to_str().unwrap(),
        ]);
        let (commit_tx, commit_rx) = mpsc::channel(16);
        let (report_tx, _) = mpsc::unbounded_channel();
        let shared = Shared {
            commit_tx,
            removed: Default::default(),
            status: Default::default(),
            report_tx,
            shutdown: CancellationToken::new(),
            peer_client: crate::peer_client::PeerClient::from_config(
                &cfg,
                crate::cluster_id::ClusterId::unknown(cfg.disk.clone(), cfg.wal_dir()),
            )
            .unwrap(),
        };
        let get_snapshot: GetSnapshot =
            Box::new(|| Box::new(crate::kvstore::Captured(crate::kvstore::Map::new())));
        let node = RaftNode::recover(&cfg, &shared, get_snapshot, &discard()).unwrap();
        (node, commit_rx)
    }

    /// A snapshot installed from the leader is not kept in memory (a joining node held a whole
    /// large map twice): the storage keeps its metadata and serves it from the file the WAL
    /// writer saves.
    #[tokio::test]
    async fn installed_snapshot_is_not_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, _commit_rx) = bootstrapped(dir.path(), 1);
        let members: BTreeMap<u64, String> = [(1, "http://127.0.0.1:1".to_string())].into();
        let kv = crate::kvstore::Captured(crate::kvstore::Map::new());
        let mut data = snapshot_data_header(&members, &BTreeSet::new(), kv.encoded_len());
        kv.write_to(&mut data).unwrap();
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        node.install_snapshot(snap).await.unwrap();
        let kept = node.node.store().last_snapshot();
        assert_eq!(kept.get_metadata().index, 10);
        assert!(kept.data.is_empty(), "{} bytes kept", kept.data.len());
    }

    /// Holds `n` PUTs of `size`-byte values, ids 0..n, as proposers would.
    fn hold_puts(node: &mut RaftNode, n: u64, size: usize) {
        let value = vec![7u8; size];
        for id in 0..n {
            let data = crate::kvstore::Put {
                id,
                key: b"/k",
                value: &value,
            }
            .encode();
            node.held.push(Proposal { id, data });
        }
    }

    fn put_entry(index: u64, id: u64) -> Entry {
        Entry {
            term: 1,
            index,
            data: crate::kvstore::Put {
                id,
                key: b"/k",
                value: b"v",
            }
            .encode()
            .into(),
            ..Default::default()
        }
    }

    /// A node that applies its own removal stops there, and publishes that index as applied,
    /// not the index of the entries after it that it did not apply: a linearizable read
    /// served meanwhile would take their absence for the current state.
    #[tokio::test]
    async fn own_removal_publishes_the_index_it_stopped_at() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, mut commit_rx) = bootstrapped(dir.path(), 2);
        assert_eq!(node.applied, 2);
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = 1;
        let entries = vec![put_entry(3, 7), conf_change_entry(&cc, 4), put_entry(5, 8)];
        node.apply_committed(entries).await.unwrap();
        assert_eq!(node.exit, Some(Exit::Removed));
        match commit_rx.try_recv() {
            Ok(Apply::Entries { index, data, .. }) => {
                assert_eq!(data.len(), 1, "only the PUT before the removal applies");
                assert_eq!(index, 4, "published index");
            }
            other => panic!("expected entries, got {other:?}"),
        }
        assert_eq!(node.applied, 4);
        node.publish_status();
        assert_eq!(node.status.lock().unwrap().applied, 4);
    }

    /// A follower forwards what it holds to the leader in messages of at most
    /// [`PROPOSE_BYTES`] (one entry larger than that goes alone), every PUT once and in
    /// order: one message of everything would exceed what the leader's stream accepts in one
    /// frame, and the leader would close the stream and lose them all.
    #[tokio::test]
    async fn forwarded_proposals_are_split_into_bounded_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, _commit_rx) = bootstrapped(dir.path(), 2);
        // Node 2 leads at term 2.
        let mut hb = Message::default();
        hb.set_msg_type(MessageType::MsgHeartbeat);
        (hb.from, hb.to, hb.term, hb.commit) = (2, 1, 2, 2);
        node.step(hb);
        assert_eq!(node.node.raft.leader_id, 2);
        hold_puts(&mut node, 24, 200 << 10);
        node.held.forwarded([put_entry(0, 99)]);
        assert!(node.propose().is_none(), "nothing dropped");
        let mut rd = node.node.ready();
        let mut msgs = rd.take_messages();
        msgs.extend(rd.take_persisted_messages());
        let proposals: Vec<&Message> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgPropose)
            .collect();
        assert!(proposals.len() > 1, "one message of ~5 MB");
        for m in &proposals {
            assert_eq!(m.to, 2);
            let size = m.compute_size() as usize;
            assert!(size <= PROPOSE_BYTES + 64, "a message of {size} bytes");
        }
        let mut got: Vec<u64> = Vec::new();
        for e in proposals.iter().flat_map(|m| m.entries.iter()) {
            let puts = crate::kvstore::decode_puts(&e.data).unwrap();
            assert!(puts
                .iter()
                .all(|p| p.value.len() == 200 << 10 || p.id == 99));
            got.extend(puts.iter().map(|p| p.id));
        }
        // The forwarded entry goes with the entries sealed before it.
        let mut want: Vec<u64> = (0..23).collect();
        want.extend([99, 23]);
        assert_eq!(got, want, "every PUT arrives once, in order");
    }

    /// Proposals raft refuses (no leader known) are all reported, by id, in every message.
    #[tokio::test]
    async fn refused_proposals_are_reported_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, _commit_rx) = bootstrapped(dir.path(), 2);
        hold_puts(&mut node, 24, 200 << 10);
        match node.propose() {
            Some(Apply::Dropped { ids, .. }) => assert_eq!(ids, (0..24).collect::<Vec<_>>()),
            other => panic!("expected a drop report, got {other:?}"),
        }
    }

    fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term, m.commit) = (from, to, term, commit);
        m
    }

    /// Steps `m` into `n` as the raft task does: only if it passes the check.
    fn step_checked(n: &mut RawNode<RaftStorage>, mut m: Message) -> bool {
        let ok = check_peer_message(&n.raft, &mut m).is_ok();
        if ok {
            let _ = n.step(m);
        }
        ok
    }

    /// No peer input panics raft (each of these did, in raft-rs): a heartbeat claiming a commit
    /// index beyond this node's log ("to_commit out of range"), from a member or from an id
    /// that is no member; a ReadIndex request without its context (an index out of bounds);
    /// an append whose entries do not follow its index ("conflict with committed entry").
    /// Well-formed messages still pass, and the cluster keeps working.
    #[test]
    fn peer_input_cannot_panic_raft() {
        let mut nodes = elected(1);
        let (term, committed) = (nodes[&2].0.raft.term, nodes[&2].0.raft.raft_log.committed);
        let f = &mut nodes.get_mut(&2).unwrap().0;
        step_checked(f, heartbeat(99, 2, term, 1_000_000));
        step_checked(f, heartbeat(1, 2, term, 1_000_000));
        assert_eq!(f.raft.raft_log.committed, committed);
        let mut app = Message::default();
        app.set_msg_type(MessageType::MsgAppend);
        (app.from, app.to, app.term) = (1, 2, term);
        (app.index, app.log_term) = (committed, term);
        app.entries = vec![Entry {
            index: 1,
            term: term + 1,
            ..Default::default()
        }]
        .into();
        assert!(!step_checked(f, app));
        let l = &mut nodes.get_mut(&1).unwrap().0;
        let mut read = Message::default();
        read.set_msg_type(MessageType::MsgReadIndex);
        (read.from, read.to, read.term) = (2, 1, term);
        assert!(!step_checked(l, read));
        assert!(
            step_checked(l, heartbeat(2, 1, 0, 0)),
            "a harmless message passes"
        );
        pump(&mut nodes);
        let mut r = read_on(&mut nodes, 3);
        pump(&mut nodes);
        assert!(
            matches!(r.try_recv(), Ok(Ok(_))),
            "the cluster still answers reads"
        );
    }

    /// raftexample's `TestProcessMessages`: an outgoing MsgSnapshot gets the node's current
    /// ConfState (AutoLeave cleared too), other messages pass unchanged and in order.
    #[test]
    fn process_messages() {
        let stale = ConfState {
            voters: vec![2, 6, 8],
            auto_leave: true,
            ..Default::default()
        };
        let mut snap_msg = Message::default();
        snap_msg.set_msg_type(MessageType::MsgSnapshot);
        snap_msg.to = 8;
        snap_msg.mut_snapshot().mut_metadata().set_conf_state(stale);
        let mut app = Message::default();
        app.set_msg_type(MessageType::MsgAppend);
        app.from = 6;
        app.to = 8;

        let current = ConfState {
            voters: vec![2, 6, 8, 10],
            ..Default::default()
        };
        let mut msgs = vec![snap_msg.clone()];
        super::process_messages(&mut msgs, &current);
        assert_eq!(
            msgs[0].get_snapshot().get_metadata().get_conf_state(),
            &current
        );

        let current = ConfState {
            voters: vec![2, 7, 8, 12],
            ..Default::default()
        };
        let mut msgs = vec![snap_msg, app.clone()];
        super::process_messages(&mut msgs, &current);
        assert_eq!(
            msgs[0].get_snapshot().get_metadata().get_conf_state(),
            &current
        );
        assert_eq!(msgs[1], app);
    }
}
