//! Who is in the cluster: the members' peer URLs, the ids removed for good, the membership
//! changes proposed here and waiting to apply, the checks a change must pass first, and the
//! leader's promotion of caught-up learners (its policy is [`super::learners`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use raft::prelude::*;

use super::learners::{self, Learners};
use crate::channels::{ConfChangeError, ConfChangeRequest};
use crate::config::PeerUrl;
use crate::storage::RaftStorage;

/// A change the transport must make to its peer set.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerChange {
    Add(u64, String),
    Remove(u64),
}

/// What applying a membership change did to this node.
#[derive(Debug, PartialEq)]
pub enum Applied {
    Changed,
    /// This node itself was removed.
    RemovedSelf,
}

pub struct Membership {
    pub members: BTreeMap<u64, String>,
    /// Shared with the `/raft` handler, which answers 410 to these ids.
    pub removed: Arc<RwLock<HashSet<u64>>>,
    pending: HashMap<u64, tokio::sync::oneshot::Sender<Result<(), ConfChangeError>>>,
    /// The status has not yet seen the current members.
    pub changed: bool,
    /// Read replicas and the leader's view of learners' liveness.
    pub learners: Learners,
}

impl Membership {
    pub fn new(
        members: BTreeMap<u64, String>,
        removed: Arc<RwLock<HashSet<u64>>>,
        kept: BTreeSet<u64>,
    ) -> Membership {
        Membership {
            members,
            removed,
            pending: HashMap::new(),
            changed: true,
            learners: Learners::new(kept),
        }
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.read().expect("removed-set lock").contains(&id)
    }

    pub fn removed_ids(&self) -> BTreeSet<u64> {
        self.removed
            .read()
            .expect("removed-set lock")
            .iter()
            .copied()
            .collect()
    }

    /// The peers to send to: every member not removed, this node excluded by the transport.
    pub fn peers(&self) -> Vec<PeerChange> {
        let removed = self.removed.read().expect("removed-set lock");
        self.members
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .map(|(id, url)| PeerChange::Add(*id, url.clone()))
            .collect()
    }

    /// Takes the membership of a snapshot; returns the peer changes it makes.
    pub fn restore(
        &mut self,
        members: BTreeMap<u64, String>,
        removed: BTreeSet<u64>,
        kept: BTreeSet<u64>,
    ) -> Vec<PeerChange> {
        let mut changes: Vec<PeerChange> = members
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .map(|(id, url)| PeerChange::Add(*id, url.clone()))
            .collect();
        changes.extend(
            self.members
                .keys()
                .filter(|id| !members.contains_key(id))
                .map(|id| PeerChange::Remove(*id)),
        );
        self.members = members;
        self.learners.kept = kept;
        *self.removed.write().expect("removed-set lock") = removed.into_iter().collect();
        self.changed = true;
        changes
    }

    /// True if a conf change may still be in flight: raft's own check (leader only), one of
    /// ours not yet applied, or one in the unapplied part of the log.
    fn pending(&mut self, node: &RawNode<RaftStorage>, applied: u64) -> bool {
        self.pending.retain(|_, tx| !tx.is_closed());
        if node.raft.has_pending_conf() || !self.pending.is_empty() {
            return true;
        }
        let store = node.store();
        let last = raft::Storage::last_index(store).unwrap_or(0);
        let lo = applied.max(
            raft::Storage::first_index(store)
                .unwrap_or(1)
                .saturating_sub(1),
        ) + 1;
        lo <= last
            && raft::Storage::entries(
                store,
                lo,
                last + 1,
                None,
                raft::GetEntriesContext::empty(false),
            )
            .map(|ents| {
                ents.iter()
                    .any(|e| e.get_entry_type() != EntryType::EntryNormal)
            })
            .unwrap_or(true)
    }

    fn check(
        &mut self,
        node: &RawNode<RaftStorage>,
        applied: u64,
        cc: &ConfChange,
    ) -> Result<(), ConfChangeError> {
        let fits =
            learners::check_request(cc, node.store().conf_state(), self.is_removed(cc.node_id));
        let leader = node.raft.leader_id;
        match () {
            _ if fits.is_err() => fits,
            _ if leader == raft::INVALID_ID => {
                Err(ConfChangeError::Dropped("no leader known".into()))
            }
            _ if leader != node.raft.id => match self.members.get(&leader) {
                Some(url) => Err(ConfChangeError::NotLeader {
                    leader,
                    url: url.clone(),
                }),
                None => Err(ConfChangeError::Dropped(
                    "the leader's URL is unknown".into(),
                )),
            },
            _ if self.pending(node, applied) => Err(ConfChangeError::Pending),
            _ => self.learners.check_safe(&node.raft, cc),
        }
    }

    /// Called every tick: on a leader, proposes the promotion of a caught-up learner (see
    /// [`learners::promotion_due`]) unless another membership change is in flight or the
    /// strict check refuses it. Nobody waits for its outcome; a lost one is proposed again.
    pub fn maybe_promote(
        &mut self,
        node: &mut RawNode<RaftStorage>,
        applied: u64,
        logger: &slog::Logger,
    ) {
        let Some((id, matched)) = self.learners.on_tick(&node.raft) else {
            return;
        };
        let cc = learners::promotion(id);
        if self.pending(node, applied) || self.learners.check_safe(&node.raft, &cc).is_err() {
            return;
        }
        let last = node.raft.raft_log.last_index();
        match node.propose_conf_change(vec![], cc) {
            Ok(()) => slog::info!(logger, "promoting caught-up learner"; "node" => id,
                "matched" => matched, "last_index" => last),
            Err(e) => slog::warn!(logger, "cannot propose a promotion"; "node" => id,
                "error" => %e),
        }
    }

    /// Checks a change and proposes it; its requester hears back once it applies.
    pub fn propose(
        &mut self,
        node: &mut RawNode<RaftStorage>,
        applied: u64,
        req: ConfChangeRequest,
    ) {
        if let Err(e) = self.check(node, applied, &req.cc) {
            let _ = req.done.send(Err(e));
            return;
        }
        let cc_id = req.cc.id;
        match node.propose_conf_change(vec![], req.cc) {
            Ok(()) => {
                self.pending.insert(cc_id, req.done);
            }
            Err(e) => {
                let _ = req.done.send(Err(ConfChangeError::Dropped(e.to_string())));
            }
        }
    }

    /// Applies a committed change to raft and to the member list, and answers its requester.
    pub fn apply(
        &mut self,
        node: &mut RawNode<RaftStorage>,
        cc: ConfChange,
        peers: &mut Vec<PeerChange>,
        logger: &slog::Logger,
    ) -> Option<Applied> {
        let id = cc.node_id;
        let was_learner = node.store().conf_state().learners.contains(&id);
        let result = match node.apply_conf_change(&cc) {
            Ok(cs) => {
                node.mut_store().set_conf_state(cs);
                Ok(())
            }
            Err(e) => {
                slog::error!(logger, "conf change rejected by raft"; "node" => id, "error" => %e);
                Err(ConfChangeError::Dropped(e.to_string()))
            }
        };
        let applied = result
            .is_ok()
            .then(|| self.record(node.raft.id, &cc, was_learner, peers, logger));
        if let Some(done) = self.pending.remove(&cc.id) {
            let _ = done.send(result);
        }
        applied
    }

    fn record(
        &mut self,
        own: u64,
        cc: &ConfChange,
        was_learner: bool,
        peers: &mut Vec<PeerChange>,
        logger: &slog::Logger,
    ) -> Applied {
        let id = cc.node_id;
        self.changed = true;
        let promoted = self.learners.applied(cc, was_learner) == learners::Applied::Promoted;
        if promoted {
            crate::metrics::promotion();
            slog::info!(logger, "learner promoted to voter"; "node" => id);
        }
        if cc.get_change_type() == ConfChangeType::RemoveNode {
            self.members.remove(&id);
            self.removed.write().expect("removed-set lock").insert(id);
            if id == own {
                slog::info!(
                    logger,
                    "this node was removed from the cluster; shutting down"
                );
                return Applied::RemovedSelf;
            }
            peers.push(PeerChange::Remove(id));
            slog::info!(logger, "member removed"; "node" => id);
            return Applied::Changed;
        }
        let (url, kept) = learners::parse_context(&cc.context);
        match url.map(PeerUrl::parse) {
            Some(Ok(url)) => {
                peers.push(PeerChange::Add(id, url.url.clone()));
                self.members.insert(id, url.url);
            }
            None if cc.context.is_empty() => {}
            _ => slog::error!(logger, "added member has an invalid peer URL"; "node" => id),
        }
        if !promoted {
            let learner = cc.get_change_type() == ConfChangeType::AddLearnerNode;
            slog::info!(logger, "member added"; "node" => id, "learner" => learner,
                "read_replica" => kept);
        }
        Applied::Changed
    }
}
