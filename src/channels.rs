//! The values carried on the channels between the tasks (raftexample's `proposeC`,
//! `confChangeC`, `commitC`, `errorC`, plus the ReadIndex requests and the published status):
//! the one vocabulary both the kvstore and the raft node speak, so neither imports the other.

use std::collections::BTreeMap;

use bytes::Bytes;
use raft::prelude::ConfChange;
use serde::Serialize;
use tokio::sync::oneshot;

/// One proposal for the raft task (the counterpart of raftexample's `proposeC`). Raft reports
/// only a refusal, through [`Apply::Dropped`] with `id`: a PUT then waits on one channel, and
/// its task is woken once, when its entry applies.
#[derive(Debug)]
pub struct Proposal {
    /// The request id of the PUT in `data`, under which its waiter is registered.
    pub id: u64,
    /// An encoded [`crate::kvstore::Put`]: self-delimiting, as raft packs the proposals of a batch into one
    /// entry back to back.
    pub data: Vec<u8>,
}

/// What the raft task sends on `commit_rx`; Go's nil-on-commitC becomes `Snapshot`.
#[derive(Debug)]
pub enum Apply {
    /// Normal entries committed up to `index` (no-ops and conf changes count toward `index` but
    /// carry no data). `applied` fires once all of them are in the map.
    Entries {
        index: u64,
        /// The term of the entry at `index` (for backups, see [`crate::backup`]).
        term: u64,
        data: Vec<Bytes>,
        applied: oneshot::Sender<()>,
    },
    /// Replace the whole map with a snapshot taken at `index`.
    Snapshot { index: u64, term: u64, data: Bytes },
    /// The snapshot at `index` installed from the leader is now durable in its file: `data` is
    /// the same map bytes, mapped and not read (see [`crate::vfs::Vfs::map_unread`]), which the
    /// map may use in place of the copy it received while its base is still that snapshot.
    SnapshotFile {
        index: u64,
        data: Bytes,
        pages: Option<crate::vfs::Pages>,
    },
    /// Proposals raft refused (say, no leader known): they were never appended anywhere.
    Dropped { ids: Vec<u64>, reason: String },
}

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
    #[error("node {0} is already a voter")]
    AlreadyVoter(u64),
    #[error("node {0} is not a learner")]
    NotLearner(u64),
    /// The strict reconfiguration check (see [`crate::node::learners::check_quorum_after`]).
    #[error("refused: {0}")]
    Unsafe(String),
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
    /// Voting members and learners (see [`crate::node::learners`]); learners in
    /// `read_replicas` are never promoted automatically.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub read_replicas: Vec<u64>,
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

/// How the raft task ended without an error.
#[derive(Debug, PartialEq)]
pub enum Exit {
    Shutdown,
    /// This node applied (or was told of) its own removal.
    Removed,
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
    /// What `write_to` wrote, as the snapshot file now durably holds it (mapped, and not read:
    /// its pages come from disk or the page cache when used), with the mapping if it is one.
    /// The state may keep it in place of its own copy.
    fn written(&self, _bytes: bytes::Bytes, _pages: Option<crate::vfs::Pages>) {}
}
