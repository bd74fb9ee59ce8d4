//! One simulated member: the real node core, kvstore, WAL and snapshotter on a simulated disk,
//! with the WAL writer's job queue and the snapshot thread replaced by steps the seed chooses.

use std::collections::HashSet;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use raftexample::config::PeerUrl;
use raftexample::kvstore::{ForSnapshot, KvStore};
use raftexample::node::{self, Boot, Node, Output, SnapshotTask};
use raftexample::snap::Snapshotter;
use raftexample::vfs::sim::SimDisk;
use raftexample::vfs::Disk;
use raftexample::wal::writer::{run_group, Job};
use raftexample::wal::{Wal, WalOptions};

use super::net::Rng;

/// The snapshot thread's progress.
enum Snap {
    Captured(SnapshotTask, ForSnapshot),
    Begun(node::snapshot::Begun),
}

/// A member's process while it runs.
pub struct Running {
    pub node: Node,
    /// Ids this member knows were removed (the daemon's `/raft` handler answers them 410).
    pub removed: Arc<RwLock<HashSet<u64>>>,
    pub kv: Arc<KvStore>,
    wal: Wal,
    snapshotter: Snapshotter,
    /// Jobs handed to the "writer thread", not yet written.
    jobs: VecDeque<Job>,
    /// A snapshot being "written": the task and the map captured for it, then its synced
    /// `.snap.tmp` waiting for the rename.
    snapshot: Option<Snap>,
}

pub struct Member {
    pub id: u64,
    pub disk: SimDisk,
    pub run: Option<Running>,
    /// Started with `--join` (added after the cluster was created).
    pub join: bool,
    /// Synced data was damaged on purpose: the member may refuse to start, and then stays down.
    pub flipped: bool,
    pub down_for_good: bool,
    pub boots: u64,
    /// An EIO or ENOSPC was injected into this run: a fail-stop is then expected.
    pub faulted: bool,
    /// The power fails right after the writer's next group: no later write or sync of this
    /// run reaches the disk.
    pub cut_after_write: bool,
}

pub fn root() -> PathBuf {
    PathBuf::from("/sim")
}

fn wal_dir(id: u64) -> PathBuf {
    root().join(format!("raftexample-{id}"))
}

fn snap_dir(id: u64) -> PathBuf {
    root().join(format!("raftexample-{id}-snap"))
}

pub fn url(id: u64) -> String {
    format!("http://127.0.0.1:{id}")
}

/// Why a member stopped on its own.
#[derive(Debug)]
pub enum Stop {
    /// A disk error: it must fail-stop, as the daemon does.
    Disk(#[allow(dead_code)] String),
    Removed,
}

impl Member {
    pub fn new(id: u64, join: bool) -> Member {
        Member {
            id,
            disk: SimDisk::with_dir(&root()),
            run: None,
            join,
            flipped: false,
            down_for_good: false,
            boots: 0,
            faulted: false,
            cut_after_write: false,
        }
    }

    /// Boots the member from what its disk holds, as the daemon's recovery does.
    pub fn start(
        &mut self,
        rng: &mut Rng,
        peers: &[u64],
        logger: &slog::Logger,
    ) -> Result<(), String> {
        self.boots += 1;
        self.faulted = false;
        self.cut_after_write = false;
        // An injected EIO, ENOSPC or power failure was a fault of the previous run; it passed.
        self.disk
            .fail_op(u64::MAX, raftexample::vfs::sim::Fault::Eio);
        self.disk.fail_at_sync(u64::MAX);
        let nonce = rng.next();
        let (propose_tx, _) = tokio::sync::mpsc::channel(1);
        let kv = KvStore::new(self.id, nonce, propose_tx, logger);
        let boot = Boot {
            id: self.id,
            peers: peers
                .iter()
                .map(|&p| (p, PeerUrl::parse(&url(p)).expect("a valid URL")))
                .collect(),
            join: self.join,
            wal_dir: wal_dir(self.id),
            snap_dir: snap_dir(self.id),
            wal: WalOptions {
                segment_size: 16 << 10,
                fail_write_after: None,
                disk: Disk::new(Arc::new(self.disk.clone())),
            },
            snapshot_count: 5 + rng.below(30),
            catchup_entries: rng.below(10),
            max_snapshots: 1 + rng.below(3) as usize,
            election_ticks: Some(10 + rng.below(10) as usize),
            inline_snapshot_reads: true,
            nonce,
            removed: Default::default(),
        };
        let removed = boot.removed.clone();
        let node::Restored {
            mut node,
            wal,
            snapshotter,
        } = node::recover(&boot, logger).map_err(|e| e.to_string())?;
        for a in node.take_output().applies {
            kv.apply(a);
        }
        self.run = Some(Running {
            node,
            removed,
            kv,
            wal,
            snapshotter,
            jobs: VecDeque::new(),
            snapshot: None,
        });
        Ok(())
    }

    /// SIGKILL: the process and its queues are gone; what it wrote stays in the page cache.
    pub fn kill(&mut self) {
        self.run = None;
    }

    /// The member's power fails: of what it wrote since the last sync, the seed decides.
    pub fn power_cut(&mut self, seed: u64) {
        self.run = None;
        self.disk = self.disk.power_cut(seed);
    }
}

impl Running {
    /// Carries out what the node asked for; messages are returned for the network.
    pub fn carry_out(&mut self, out: Output) -> Vec<raft::prelude::Message> {
        self.jobs.extend(out.jobs);
        for a in out.applies {
            self.kv.apply(a);
        }
        if let Some(task) = out.snapshot {
            // Every batch before it is applied: the map is exactly the snapshot's.
            self.snapshot = Some(Snap::Captured(task, self.kv.capture_for_snapshot()));
        }
        out.messages
    }

    /// Runs the node until it has nothing more to do.
    pub fn process(&mut self) -> Result<Vec<raft::prelude::Message>, String> {
        let mut msgs = Vec::new();
        loop {
            self.node.process().map_err(|e| e.to_string())?;
            let out = self.node.take_output();
            let done = out.is_empty();
            msgs.extend(self.carry_out(out));
            if done || !self.node.has_ready() {
                return Ok(msgs);
            }
        }
    }

    /// The writer thread writes the first `n` queued jobs as one group.
    pub fn write_jobs(&mut self, n: usize, logger: &slog::Logger) -> Result<(), Stop> {
        let n = n.min(self.jobs.len());
        let group: Vec<Job> = self.jobs.drain(..n).collect();
        match run_group(&mut self.wal, &self.snapshotter, group.into_iter(), logger) {
            Ok(Some(p)) => self.node.persisted(p),
            Ok(None) => {}
            Err(e) => return Err(Stop::Disk(e.to_string())),
        }
        Ok(())
    }

    pub fn queued_jobs(&self) -> usize {
        self.jobs.len()
    }

    pub fn snapshot_pending(&self) -> bool {
        self.snapshot.is_some()
    }

    /// The snapshot thread writes its file, or (the next time) renames it into place.
    pub fn write_snapshot(&mut self) -> Result<(), Stop> {
        let done = match self.snapshot.take() {
            None => return Ok(()),
            Some(Snap::Captured(task, map)) => match task.begin(&self.snapshotter, &map) {
                Ok(begun) => {
                    self.snapshot = Some(Snap::Begun(begun));
                    return Ok(());
                }
                Err(e) => Err(e),
            },
            Some(Snap::Begun(begun)) => begun.finish(&self.snapshotter),
        };
        self.node
            .snapshot_written(done)
            .map_err(|e| Stop::Disk(e.to_string()))
    }
}
