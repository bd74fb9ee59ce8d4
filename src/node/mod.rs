//! The raft node as a deterministic state machine: every decision of the raft task (Ready
//! handling, proposal packing and holding, ReadIndex batching, membership checks, snapshot
//! policy, recovery from what is on disk) with no clock, socket, thread or channel wait of its
//! own.
//!
//! Inputs are method calls (a tick, a peer message, a proposal, a read, a membership change,
//! "persisted up to Ready N", "snapshot written"); each call leaves its effects in an
//! [`Output`]: messages to send, jobs for the WAL writer, batches for the kvstore, a snapshot
//! to take and peers to add or remove. The daemon's shell ([`crate::raft_node`]) moves those
//! between tokio channels, the writer thread and the transport; the simulator
//! (`tests/simulation.rs`) moves them itself, one seed at a time.

pub mod learners;
mod membership;
mod peer_check;
mod proposals;
#[cfg(test)]
mod read_tests;
mod reads;
mod ready;
pub mod recover;
pub mod snapshot;
#[cfg(test)]
mod tests;

use raft::prelude::*;
use raft::StateRole;

use crate::channels::{ConfChangeRequest, Exit, NodeStatus, Proposal, ReadError, ReadRequest};
use crate::error::Result;
use crate::storage::RaftStorage;
use crate::wal::writer::{Job, Persisted};

pub use membership::PeerChange;
pub use peer_check::process_messages;
pub use proposals::PROPOSE_BYTES;
pub use recover::{recover, Boot, Restored};
pub use snapshot::{SnapshotDone, SnapshotTask};

/// Proposals (or peer messages) taken from a channel before the next Ready: one fsync covers
/// them all. A leader also stops holding proposals at this many.
pub const DRAIN: usize = 4096;
/// Ticks between two warnings about malformed peer messages.
const WARN_TICKS: u64 = 100;

/// What the node asks its shell to do, in this order: send, persist, apply, then snapshot.
#[derive(Default)]
pub struct Output {
    /// To send now.
    pub messages: Vec<Message>,
    /// For the WAL writer, in order.
    pub jobs: Vec<Job>,
    /// For the kvstore, in order.
    pub applies: Vec<crate::channels::Apply>,
    /// To take once `applies` are sent; the node stops handling Readies until then.
    pub snapshot: Option<SnapshotTask>,
    pub peers: Vec<PeerChange>,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.jobs.is_empty()
            && self.applies.is_empty()
            && self.snapshot.is_none()
            && self.peers.is_empty()
    }
}

/// Which Readies the WAL writer has been handed and has made durable.
#[derive(Default)]
struct Persistence {
    /// Number of the last Ready handed to the writer, and of the last it reported durable.
    submitted: u64,
    persisted: u64,
    /// Number of a Ready carrying a leader's snapshot that the writer has not yet persisted,
    /// and the snapshot's term and index.
    snapshot_persisting: Option<(u64, u64, u64)>,
}

pub struct Node {
    id: u64,
    raft: RawNode<RaftStorage>,
    membership: membership::Membership,
    held: proposals::Held,
    reads: reads::ReadBatcher,
    policy: snapshot::Policy,
    persist: Persistence,
    /// Index of the last entry handed to the kvstore.
    applied: u64,
    /// Fires when the kvstore has applied the last batch sent.
    last_apply_done: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Names snapshot files (for storage to read them back from) and writes them.
    snapshotter: crate::snap::Snapshotter,
    out: Output,
    exit: Option<Exit>,
    ticks: u64,
    /// Tick of the last warning about a malformed peer message.
    warned_at: Option<u64>,
    logger: slog::Logger,
}

impl Node {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn is_leader(&self) -> bool {
        self.raft.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> u64 {
        self.raft.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raft.raft.term
    }

    pub fn commit(&self) -> u64 {
        self.raft.raft.raft_log.committed
    }

    /// The applied configuration: voters and learners.
    pub fn conf_state(&self) -> &ConfState {
        self.raft.store().conf_state()
    }

    pub fn exit(&self) -> Option<&Exit> {
        self.exit.as_ref()
    }

    pub fn take_exit(&mut self) -> Option<Exit> {
        self.exit.take()
    }

    pub fn snapshot_in_flight(&self) -> bool {
        self.policy.in_flight
    }

    /// The members this node sends to, for the shell's first transport set-up.
    pub fn peers(&self) -> Vec<PeerChange> {
        self.membership.peers()
    }

    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raft.tick();
        self.reads.on_tick(&mut self.raft);
        self.membership
            .maybe_promote(&mut self.raft, self.applied, &self.logger);
    }

    pub fn propose(&mut self, p: Proposal) {
        self.held.push(p);
    }

    pub fn read(&mut self, r: ReadRequest) {
        self.reads.queued.push(r);
    }

    pub fn conf_change(&mut self, req: ConfChangeRequest) {
        self.membership.propose(&mut self.raft, self.applied, req);
    }

    pub fn report_unreachable(&mut self, id: u64) {
        self.raft.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: u64, status: raft::SnapshotStatus) {
        self.raft.report_snapshot(id, status);
    }

    /// A peer answered that this node was removed.
    pub fn removed_by_peer(&mut self) {
        slog::warn!(
            self.logger,
            "a peer says this node was removed from the cluster; shutting down"
        );
        self.exit = Some(Exit::Removed);
    }

    pub fn step(&mut self, mut m: Message) {
        if let Err(why) = peer_check::check_peer_message(&self.raft.raft, &mut m) {
            let warn = !self.warned_at.is_some_and(|t| self.ticks < t + WARN_TICKS);
            if warn {
                self.warned_at = Some(self.ticks);
                slog::warn!(self.logger, "dropped a malformed peer message (more are logged at \
                    debug level for 10 s)"; "why" => why, "from" => m.from,
                    "type" => ?m.get_msg_type());
            } else {
                slog::debug!(self.logger, "dropped a malformed peer message"; "why" => why,
                    "from" => m.from, "type" => ?m.get_msg_type());
            }
            return;
        }
        if m.get_msg_type() == MessageType::MsgPropose && self.is_leader() {
            // Proposals a follower forwarded join the leader's own batch.
            self.held.forwarded(m.take_entries());
            return;
        }
        if m.get_msg_type() == MessageType::MsgReadIndex && self.is_leader() {
            // Joins the leader's own next ReadIndex round (see `reads::ReadBatcher`).
            self.reads.forward(m);
            return;
        }
        if let Err(e) = self.raft.step(m) {
            // StepPeerNotFound (a removed peer's response) and StepLocalMsg (a local-only type
            // sent over the wire) are expected noise, never fatal.
            slog::debug!(self.logger, "step failed"; "error" => %e);
        }
    }

    /// The writer made Ready `number` durable: release what waited for it.
    pub fn persisted(&mut self, p: Persisted) {
        self.persist.persisted = p.number;
        self.send(p.messages);
        self.raft.on_persist_ready(p.number);
        if let Some((n, term, index)) = self.persist.snapshot_persisting {
            if n <= p.number {
                self.persist.snapshot_persisting = None;
                self.raft.advance_apply();
                self.adopt_snapshot_file(term, index);
            }
        }
    }

    /// Proposes what may be proposed and handles Readies until there are none, or until one
    /// asks for a snapshot (the shell must take it before the map moves on). Call it after
    /// every batch of inputs, and again while [`Self::has_ready`] says so.
    pub fn process(&mut self) -> Result<()> {
        if self.may_propose() {
            if let Some(dropped) = self.held.propose(&mut self.raft) {
                // Their PUTs fail at once instead of waiting out their deadline.
                self.out.applies.push(dropped);
            }
        }
        self.reads.flush(&mut self.raft);
        while self.raft.has_ready() && self.exit.is_none() && self.out.snapshot.is_none() {
            self.on_ready()?;
            // A round just answered lets the reads queued behind it go.
            self.reads.flush(&mut self.raft);
        }
        Ok(())
    }

    pub fn has_ready(&self) -> bool {
        self.exit.is_none() && self.raft.has_ready()
    }

    /// A leader holds new proposals (its own and those followers forward) while its last WAL
    /// write is still in flight, and proposes them together when it ends: the disk is busy
    /// anyway, and one batch then costs one Ready, one WAL write with one fsync and one
    /// MsgAppend per follower instead of several. Followers forward at once (the leader
    /// batches), and the hold is bounded in size.
    fn may_propose(&self) -> bool {
        !self.is_leader()
            || self.persist.persisted == self.persist.submitted
            || self.held.count >= DRAIN
    }

    /// A leader about to stop picks the most up-to-date follower and asks it to take over (raft
    /// first catches it up), so the cluster does not wait out an election timeout.
    pub fn hand_over_leadership(&mut self) -> Option<u64> {
        let raft = &self.raft.raft;
        if raft.state != StateRole::Leader {
            return None;
        }
        let voters = &self.raft.store().conf_state().voters;
        let to = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id && voters.contains(id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id)?;
        self.raft.transfer_leader(to);
        Some(to)
    }

    pub fn fail_reads(&mut self, e: ReadError) {
        self.reads.fail_all(e);
    }

    fn send(&mut self, mut msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        process_messages(&mut msgs, self.raft.store().conf_state());
        self.out.messages.extend(msgs);
    }

    /// Fills in what the node knows of `st`.
    pub fn status(&mut self, st: &mut NodeStatus) {
        let raft = &self.raft.raft;
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
        if self.membership.changed {
            st.members = self.membership.members.clone();
            (st.voters, st.learners) =
                learners::voters_and_learners(self.raft.store().conf_state());
            st.read_replicas = self.membership.learners.kept.iter().copied().collect();
            self.membership.changed = false;
        }
    }
}
