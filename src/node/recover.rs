//! Recovery from what is on disk: the newest snapshot the WAL vouches for, the log after it and
//! the HardState, or the bootstrap of a new member; builds the [`Node`] and hands back the open
//! WAL for the writer.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::*;

use super::snapshot::{decode_data, Policy};
use super::{membership::Membership, proposals::PROPOSE_BYTES, reads::ReadBatcher, Node};
use crate::channels::Apply;
use crate::config::{Config, PeerUrl};
use crate::error::{Error, Result};
use crate::snap::Snapshotter;
use crate::storage::RaftStorage;
use crate::vfs::Disk;
use crate::wal::{Recovered, Wal, WalOptions};

/// Everything recovery needs to know: where the files are and how the node is configured.
pub struct Boot {
    pub id: u64,
    pub peers: Vec<(u64, PeerUrl)>,
    pub join: bool,
    pub wal_dir: PathBuf,
    pub snap_dir: PathBuf,
    pub wal: WalOptions,
    pub snapshot_count: u64,
    pub catchup_entries: u64,
    pub max_snapshots: usize,
    /// Election timeout in ticks; `None` is raft's randomised 10..20. A fixed one (the
    /// simulator draws it from its seed) makes elections deterministic, as raft-rs draws the
    /// randomised one from a thread-local generator.
    pub election_ticks: Option<usize>,
    /// Read snapshot files for followers on the raft task, not on a thread (the simulator).
    pub inline_snapshot_reads: bool,
    /// Tells this boot's ReadIndex contexts from a previous boot's.
    pub nonce: u64,
    /// Shared with the `/raft` handler.
    pub removed: Arc<RwLock<HashSet<u64>>>,
}

impl Boot {
    pub fn from_config(
        cfg: &Config,
        nonce: u64,
        removed: Arc<RwLock<HashSet<u64>>>,
    ) -> Result<Boot> {
        Ok(Boot {
            id: cfg.id,
            peers: cfg.peers()?,
            join: cfg.join,
            wal_dir: cfg.wal_dir(),
            snap_dir: cfg.snap_dir(),
            wal: WalOptions {
                segment_size: cfg.wal_segment_size,
                fail_write_after: cfg.wal_fail_after_bytes,
                disk: cfg.disk.clone(),
            },
            snapshot_count: cfg.snapshot_count,
            catchup_entries: cfg.snapshot_catchup_entries,
            max_snapshots: cfg.max_snapshots,
            election_ticks: None,
            inline_snapshot_reads: false,
            nonce,
            removed,
        })
    }

    fn disk(&self) -> &Disk {
        &self.wal.disk
    }
}

/// A recovered node, the WAL to hand to its writer and what writes its snapshot files. The
/// node's first output holds the snapshot it restored, for the kvstore.
pub struct Restored {
    pub node: Node,
    pub wal: Wal,
    pub snapshotter: Snapshotter,
}

/// What the snapshot and the log say, before raft is built.
struct Replayed {
    storage: RaftStorage,
    members: BTreeMap<u64, String>,
    removed: HashSet<u64>,
    /// Learners kept as read replicas, from the snapshot.
    kept: BTreeSet<u64>,
    snapshot_index: u64,
    snapshot_bytes: u64,
    applied: u64,
    /// Last index of the log replayed.
    last_index: u64,
    first: Option<Apply>,
}

/// Replays the snapshot and WAL (or bootstraps a new member) and builds the node.
pub fn recover(boot: &Boot, logger: &slog::Logger) -> Result<Restored> {
    let snapshotter = Snapshotter::new(boot.disk(), &boot.snap_dir, logger)?;
    // Now, before any snapshot thread or WAL writer runs, is the only safe time.
    snapshotter.remove_tmp_files()?;
    let (mut wal, rec) = Wal::open(&boot.wal_dir, boot.wal.clone(), logger)?;
    // A WAL that holds nothing is a first start that a crash interrupted before the bootstrap
    // entries were durable (the empty segment is created first): this node has promised
    // nothing yet, so it bootstraps again.
    let old_wal = rec != Recovered::default();
    let mut r = replay(boot, &snapshotter, rec)?;
    if !old_wal && !boot.join {
        bootstrap(boot, &mut wal, &mut r)?;
        slog::info!(logger, "bootstrapped new cluster"; "members" => boot.peers.len());
    } else {
        slog::info!(logger, "recovered"; "snapshot_index" => r.snapshot_index,
            "entries" => r.last_index.saturating_sub(r.snapshot_index),
            "term" => r.storage.hard_state().term, "commit" => r.storage.hard_state().commit,
            "join" => boot.join);
    }
    let raft_cfg = raft::Config {
        id: boot.id,
        election_tick: 10,
        min_election_tick: boot.election_ticks.unwrap_or(0),
        max_election_tick: boot.election_ticks.map_or(0, |t| t + 1),
        heartbeat_tick: 1,
        applied: r.applied,
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
    let raft = RawNode::new(&raft_cfg, r.storage, logger)?;
    *boot.removed.write().expect("removed-set lock") = r.removed;
    let mut node = Node {
        id: boot.id,
        raft,
        membership: Membership::new(r.members, boot.removed.clone(), r.kept),
        held: Default::default(),
        reads: ReadBatcher::new(boot.id, boot.nonce),
        policy: Policy {
            snapshot_count: boot.snapshot_count,
            catchup_entries: boot.catchup_entries,
            max_snapshots: boot.max_snapshots,
            index: r.snapshot_index,
            bytes: r.snapshot_bytes,
            log_bytes: 0,
            // The bootstrap's membership entries count, as raftexample counts them.
            writes: r.applied - r.snapshot_index,
            in_flight: false,
        },
        persist: Default::default(),
        applied: r.applied,
        last_apply_done: None,
        snapshotter: snapshotter.clone(),
        out: Default::default(),
        exit: None,
        ticks: 0,
        warned_at: None,
        logger: logger.clone(),
    };
    node.out.applies.extend(r.first);
    Ok(Restored {
        node,
        wal,
        snapshotter,
    })
}

fn replay(boot: &Boot, snapshotter: &Snapshotter, rec: Recovered) -> Result<Replayed> {
    let mut r = Replayed {
        storage: RaftStorage::new(boot.disk().clone()),
        members: boot
            .peers
            .iter()
            .map(|(id, u)| (*id, u.url.clone()))
            .collect(),
        removed: HashSet::new(),
        kept: BTreeSet::new(),
        snapshot_index: 0,
        snapshot_bytes: 0,
        applied: 0,
        last_index: 0,
        first: None,
    };
    if boot.inline_snapshot_reads {
        r.storage.read_snapshots_inline();
    }
    load_snapshot(snapshotter, &rec, &mut r)?;
    let mut hs = rec.hard_state;
    hs.commit = hs.commit.max(r.snapshot_index);
    let entries: Vec<Entry> = rec
        .entries
        .into_iter()
        .filter(|e| e.index > r.snapshot_index)
        .collect();
    if let Some(first) = entries.first() {
        if first.index != r.snapshot_index + 1 {
            return Err(Error::Recovery(format!(
                "WAL entries start at index {} but the snapshot ends at {}",
                first.index, r.snapshot_index
            )));
        }
    }
    r.last_index = entries.last().map_or(r.snapshot_index, |e| e.index);
    if hs.commit > r.last_index {
        // Entries this node acknowledged are missing: raft would panic, and serving from here
        // could lose committed writes. It happens when the newest snapshot is unreadable and
        // the log after the older one does not reach it (the node had installed it from the
        // leader); the unreadable file was set aside as `.broken`.
        return Err(Error::Recovery(format!(
            "the HardState commits index {} but the snapshot and WAL in {} and {} end at \
             index {}: a snapshot the WAL needs is missing or damaged",
            hs.commit,
            boot.snap_dir.display(),
            boot.wal_dir.display(),
            r.last_index
        )));
    }
    r.storage.set_hard_state(hs);
    r.storage.append(&entries)?;
    r.applied = r.snapshot_index;
    Ok(r)
}

/// The newest snapshot recovery may start from, into the storage and the first apply.
fn load_snapshot(snapshotter: &Snapshotter, rec: &Recovered, r: &mut Replayed) -> Result<()> {
    // Only a snapshot the WAL vouches for (its marker is at or below the durable commit)
    // matches the log that follows.
    let valid = rec.valid_snapshots();
    if let Some(snap) = snapshotter.load_newest_available(&valid)? {
        let meta = snap.get_metadata();
        r.snapshot_index = meta.index;
        r.snapshot_bytes = snap.data.len() as u64;
        let data = decode_data(&snap.data).map_err(|e| {
            Error::Recovery(format!(
                "snapshot at index {} does not decode: {e}",
                meta.index
            ))
        })?;
        r.members = data.members;
        r.removed = data.removed.into_iter().collect();
        r.kept = data.kept;
        r.first = Some(Apply::Snapshot {
            index: meta.index,
            term: meta.term,
            data: data.kv,
        });
        let path = snapshotter.path(meta.term, meta.index);
        r.storage.apply_snapshot(snap)?;
        r.storage.release_snapshot_data(path);
    } else if valid.iter().any(|&(_, i)| i > 0) {
        return Err(Error::Recovery(
            "the WAL references snapshots but no matching .snap file is readable".into(),
        ));
    }
    Ok(())
}

/// etcd's StartNode: every initial member is an AddNode entry at term 1, committed and already
/// applied, so a node that joins later replays the same membership.
fn bootstrap(boot: &Boot, wal: &mut Wal, r: &mut Replayed) -> Result<()> {
    let mut ents = Vec::new();
    let mut cs = ConfState::default();
    for (id, url) in &boot.peers {
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
    r.storage.append(&ents)?;
    r.storage.set_hard_state(hs);
    r.storage.set_conf_state(cs);
    r.applied = ents.len() as u64;
    Ok(())
}

pub(super) fn conf_change_entry(cc: &ConfChange, index: u64) -> Entry {
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
