//! Learner policy: which requests may change the configuration, when the leader promotes a
//! caught-up learner to a voter, which learners stay read replicas, and whether a removal would
//! leave the cluster without a quorum of members that are up. Decisions are functions over
//! plain data (ids, match indexes, liveness); [`Learners`] keeps the little state they need
//! and adapts raft's progress tracker to them.

use std::collections::{BTreeSet, HashMap};

use raft::prelude::{ConfChange, ConfChangeType, ConfState};

use crate::channels::ConfChangeError;

/// Appended to a learner's ConfChange context (after its peer URL) when it was added with
/// `?learner=true`: the leader never promotes it by itself. It travels in the log, so every
/// member (and any future leader) knows it.
const KEEP_FLAG: &str = " read-replica";

/// The context of an `AddLearnerNode`: the peer URL, and whether the learner is kept.
pub fn learner_context(url: &str, keep: bool) -> Vec<u8> {
    let mut ctx = url.as_bytes().to_vec();
    if keep {
        ctx.extend_from_slice(KEEP_FLAG.as_bytes());
    }
    ctx
}

/// The peer URL of a ConfChange context (None if empty or not UTF-8) and the keep flag.
pub fn parse_context(ctx: &[u8]) -> (Option<&str>, bool) {
    let Ok(s) = std::str::from_utf8(ctx) else {
        return (None, false);
    };
    let (url, keep) = match s.strip_suffix(KEEP_FLAG) {
        Some(url) => (url, true),
        None => (s, false),
    };
    ((!url.is_empty()).then_some(url), keep)
}

/// Where a peer stands, as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerProgress {
    pub id: u64,
    /// Highest index known replicated on the peer (0: nothing acknowledged yet).
    pub matched: u64,
    /// The peer answered within about an election timeout.
    pub active: bool,
}

/// The learner the leader should promote now, if any: not a kept read replica, answering, and
/// caught up, i.e. it acknowledged an entry and its match index is within `window` of the
/// leader's last index (a voter that far behind catches up from the log quickly, so promoting
/// it does not hold up commits for long). Lowest id first, one at a time.
pub fn promotion_due(
    learners: &[PeerProgress],
    kept: &BTreeSet<u64>,
    last_index: u64,
    window: u64,
) -> Option<u64> {
    learners
        .iter()
        .filter(|p| !kept.contains(&p.id) && p.active && p.matched > 0)
        .filter(|p| p.matched.saturating_add(window) >= last_index)
        .map(|p| p.id)
        .min()
}

/// Whether the requested change makes sense for the current configuration: add a learner that
/// is new, promote (AddNode) a learner, remove a member.
pub fn check_request(
    cc: &ConfChange,
    cs: &ConfState,
    removed: bool,
) -> Result<(), ConfChangeError> {
    let id = cc.node_id;
    let voter = cs.voters.contains(&id);
    let learner = cs.learners.contains(&id);
    match cc.get_change_type() {
        ConfChangeType::AddLearnerNode | ConfChangeType::AddNode if removed => {
            Err(ConfChangeError::Removed(id))
        }
        ConfChangeType::AddLearnerNode if voter || learner => {
            Err(ConfChangeError::AlreadyMember(id))
        }
        ConfChangeType::AddNode if voter => Err(ConfChangeError::AlreadyVoter(id)),
        ConfChangeType::AddNode if !learner => Err(ConfChangeError::NotLearner(id)),
        ConfChangeType::RemoveNode if !voter && !learner => Err(ConfChangeError::NotMember(id)),
        _ => Ok(()),
    }
}

/// etcd's strict reconfiguration check, for a change the leader is about to propose: after it,
/// the voters that are up must still be a quorum of the new voter set, or the cluster would
/// stop. Removing a learner never changes the voters and is always fine; promoting one adds a
/// voter that must then be up too.
pub fn check_quorum_after(
    cc: &ConfChange,
    voters: &[u64],
    reachable: impl Fn(u64) -> bool,
) -> Result<(), ConfChangeError> {
    let id = cc.node_id;
    let mut new: BTreeSet<u64> = voters.iter().copied().collect();
    match cc.get_change_type() {
        ConfChangeType::RemoveNode if !new.remove(&id) => return Ok(()),
        ConfChangeType::RemoveNode => {}
        ConfChangeType::AddNode => {
            new.insert(id);
        }
        ConfChangeType::AddLearnerNode => return Ok(()),
    }
    if new.is_empty() {
        return Err(ConfChangeError::Unsafe(format!(
            "removing node {id} would leave no voter"
        )));
    }
    let quorum = new.len() / 2 + 1;
    let up = new.iter().filter(|v| reachable(**v)).count();
    if up < quorum {
        return Err(ConfChangeError::Unsafe(format!(
            "after this change {up} of {} voters are reachable, a quorum needs {quorum}",
            new.len()
        )));
    }
    Ok(())
}

/// When the leader last saw each peer active, in ticks. raft's `recent_active` is reset every
/// election timeout (check-quorum), so right after a reset it says nothing; sampled every tick,
/// "active within the last election timeout" is steady.
#[derive(Debug, Default)]
pub struct Liveness {
    tick: u64,
    seen: HashMap<u64, u64>,
}

impl Liveness {
    /// Records one tick: `active` lists the peers raft currently counts as recently active.
    pub fn observe(&mut self, active: impl IntoIterator<Item = u64>) {
        self.tick += 1;
        for id in active {
            self.seen.insert(id, self.tick);
        }
    }

    /// Active in the last `window` ticks.
    pub fn recent(&self, id: u64, window: u64) -> bool {
        self.seen
            .get(&id)
            .is_some_and(|t| self.tick.saturating_sub(*t) <= window)
    }

    /// Forgets everything: what a former leadership saw says nothing now.
    pub fn clear(&mut self) {
        self.seen.clear();
    }
}

/// Ticks within which a peer must have been seen active to count as up: raft's election
/// timeout (10 ticks here) plus two of slack for the reset.
pub const ACTIVE_TICKS: u64 = 12;

/// How far (in entries) a learner's match index may trail the leader's last index for it to
/// count as caught up. Entries hold up to 256 KiB of PUTs each, so this is at most a few MB a
/// promoted voter still has to fetch, and it is far above the few entries a follower that
/// keeps up trails by under load. A learner that never gets this close stays a learner until
/// promoted explicitly (`POST /<id>/promote`).
pub const PROMOTION_WINDOW: u64 = 64;

/// The learner state a node keeps beside raft's ConfState.
#[derive(Debug, Default)]
pub struct Learners {
    /// Learners added as read replicas (never promoted automatically); part of the snapshot.
    pub kept: BTreeSet<u64>,
    liveness: Liveness,
}

/// What applying a conf change meant, for the log and metrics.
#[derive(Debug, PartialEq)]
pub enum Applied {
    Promoted,
    Other,
}

impl Learners {
    pub fn new(kept: BTreeSet<u64>) -> Learners {
        Learners {
            kept,
            liveness: Liveness::default(),
        }
    }

    /// Tracks the read replicas as `cc` is applied; `was_learner` is the ConfState before it.
    pub fn applied(&mut self, cc: &ConfChange, was_learner: bool) -> Applied {
        let id = cc.node_id;
        match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => {
                if parse_context(&cc.context).1 {
                    self.kept.insert(id);
                }
                Applied::Other
            }
            ConfChangeType::AddNode => {
                self.kept.remove(&id);
                if was_learner {
                    Applied::Promoted
                } else {
                    Applied::Other
                }
            }
            ConfChangeType::RemoveNode => {
                self.kept.remove(&id);
                Applied::Other
            }
        }
    }

    /// Called every tick. On a leader: samples liveness and returns the learner due for
    /// promotion with its match index (the caller proposes it if no other change is pending).
    pub fn on_tick<T: raft::Storage>(&mut self, raft: &raft::Raft<T>) -> Option<(u64, u64)> {
        if raft.state != raft::StateRole::Leader {
            self.liveness.clear();
            return None;
        }
        let prs = raft.prs();
        self.liveness.observe(
            prs.iter()
                .filter(|(_, p)| p.recent_active)
                .map(|(id, _)| *id),
        );
        let learners: Vec<PeerProgress> = prs
            .conf()
            .to_conf_state()
            .learners
            .iter()
            .filter_map(|id| {
                prs.get(*id).map(|p| PeerProgress {
                    id: *id,
                    matched: p.matched,
                    active: p.recent_active || self.liveness.recent(*id, ACTIVE_TICKS),
                })
            })
            .collect();
        let last = raft.raft_log.last_index();
        let id = promotion_due(&learners, &self.kept, last, PROMOTION_WINDOW)?;
        let matched = learners.iter().find(|p| p.id == id).map(|p| p.matched);
        Some((id, matched.unwrap_or(0)))
    }

    /// The strict reconfiguration check on the leader, with reachability from raft's progress.
    pub fn check_safe<T: raft::Storage>(
        &self,
        raft: &raft::Raft<T>,
        cc: &ConfChange,
    ) -> Result<(), ConfChangeError> {
        let prs = raft.prs();
        let voters = prs.conf().to_conf_state().voters;
        check_quorum_after(cc, &voters, |id| {
            // raft marks a peer it has just added as active; a learner being promoted must
            // also have acknowledged an entry, which one that never started has not.
            id == raft.id
                || prs.get(id).is_some_and(|p| {
                    (p.recent_active || self.liveness.recent(id, ACTIVE_TICKS))
                        && (p.matched > 0 || voters.contains(&id))
                })
        })
    }
}

/// The promotion a leader proposes for `id`.
pub fn promotion(id: u64) -> ConfChange {
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddNode);
    cc.node_id = id;
    cc
}

/// `(voters, learners)` of a ConfState, sorted, for `/status`.
pub fn voters_and_learners(cs: &ConfState) -> (Vec<u64>, Vec<u64>) {
    let mut voters = cs.voters.clone();
    let mut learners = cs.learners.clone();
    voters.sort_unstable();
    learners.sort_unstable();
    (voters, learners)
}

/// The snapshot payload's optional trailer (after the map): the kept learners. Snapshots
/// written before learners existed end with the map, which decodes as none kept.
pub fn encode_trailer(kept: &BTreeSet<u64>) -> Vec<u8> {
    bincode::serialize(kept).expect("serialising ids cannot fail")
}

pub fn decode_trailer(bytes: &[u8]) -> Result<BTreeSet<u64>, String> {
    if bytes.is_empty() {
        return Ok(BTreeSet::new());
    }
    let kept: BTreeSet<u64> = bincode::deserialize(bytes).map_err(|e| e.to_string())?;
    let used = bincode::serialized_size(&kept).map_err(|e| e.to_string())?;
    if used != bytes.len() as u64 {
        return Err(format!(
            "{} bytes after the kept learners",
            bytes.len() as u64 - used
        ));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64, matched: u64, active: bool) -> PeerProgress {
        PeerProgress {
            id,
            matched,
            active,
        }
    }

    fn cc(t: ConfChangeType, id: u64) -> ConfChange {
        let mut cc = ConfChange::default();
        cc.set_change_type(t);
        cc.node_id = id;
        cc
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        }
    }

    /// Only an active learner that acknowledged something within the window is due; kept ones
    /// never are; of several, the lowest id.
    #[test]
    fn promotion_needs_an_active_caught_up_learner() {
        let none = BTreeSet::new();
        assert_eq!(promotion_due(&[peer(2, 0, true)], &none, 10, 64), None);
        assert_eq!(promotion_due(&[peer(2, 935, true)], &none, 1000, 64), None);
        assert_eq!(
            promotion_due(&[peer(2, 936, true)], &none, 1000, 64),
            Some(2)
        );
        assert_eq!(
            promotion_due(&[peer(2, 1000, false)], &none, 1000, 64),
            None
        );
        let kept: BTreeSet<u64> = [2].into();
        assert_eq!(promotion_due(&[peer(2, 1000, true)], &kept, 1000, 64), None);
        let both = [peer(5, 1000, true), peer(3, 990, true), peer(2, 1000, true)];
        assert_eq!(promotion_due(&both, &kept, 1000, 64), Some(3));
    }

    #[test]
    fn requests_are_checked_against_the_configuration() {
        use ConfChangeType::*;
        let cs = conf(&[1, 2], &[3]);
        let check = |t, id, removed| check_request(&cc(t, id), &cs, removed);
        assert_eq!(check(AddLearnerNode, 4, false), Ok(()));
        assert_eq!(
            check(AddLearnerNode, 4, true),
            Err(ConfChangeError::Removed(4))
        );
        assert_eq!(
            check(AddLearnerNode, 2, false),
            Err(ConfChangeError::AlreadyMember(2))
        );
        assert_eq!(
            check(AddLearnerNode, 3, false),
            Err(ConfChangeError::AlreadyMember(3))
        );
        assert_eq!(check(AddNode, 3, false), Ok(()));
        assert_eq!(
            check(AddNode, 2, false),
            Err(ConfChangeError::AlreadyVoter(2))
        );
        assert_eq!(
            check(AddNode, 4, false),
            Err(ConfChangeError::NotLearner(4))
        );
        assert_eq!(check(RemoveNode, 3, false), Ok(()));
        assert_eq!(check(RemoveNode, 1, false), Ok(()));
        assert_eq!(
            check(RemoveNode, 4, false),
            Err(ConfChangeError::NotMember(4))
        );
    }

    /// etcd's strict check: with node 3 down, removing 2 from {1,2,3} leaves 1 of {1,3} up
    /// (a quorum needs 2), removing 3 leaves {1,2} both up; learners may always go; the last
    /// voter may not; promoting a learner that is down into {1} would stop the cluster.
    #[test]
    fn removals_must_leave_a_reachable_quorum() {
        use ConfChangeType::*;
        let up = |id: u64| id != 3;
        let voters = [1, 2, 3];
        let unsafe_ = check_quorum_after(&cc(RemoveNode, 2), &voters, up);
        assert!(
            matches!(&unsafe_, Err(ConfChangeError::Unsafe(why)) if why.contains("1 of 2")),
            "{unsafe_:?}"
        );
        assert_eq!(check_quorum_after(&cc(RemoveNode, 3), &voters, up), Ok(()));
        assert_eq!(
            check_quorum_after(&cc(RemoveNode, 4), &voters, |_| false),
            Ok(())
        );
        assert!(check_quorum_after(&cc(RemoveNode, 1), &[1], |_| true).is_err());
        assert!(check_quorum_after(&cc(AddNode, 3), &[1], up).is_err());
        assert_eq!(check_quorum_after(&cc(AddNode, 2), &[1], up), Ok(()));
        assert_eq!(check_quorum_after(&cc(AddLearnerNode, 3), &[1], up), Ok(()));
    }

    #[test]
    fn liveness_remembers_an_election_timeout() {
        let mut l = Liveness::default();
        l.observe([2]);
        for _ in 0..ACTIVE_TICKS {
            l.observe([]);
        }
        assert!(l.recent(2, ACTIVE_TICKS));
        l.observe([]);
        assert!(!l.recent(2, ACTIVE_TICKS));
        assert!(!l.recent(3, ACTIVE_TICKS));
        l.observe([3]);
        l.clear();
        assert!(!l.recent(3, ACTIVE_TICKS));
    }

    /// The keep flag rides in the context and survives a plain URL parse of the rest; old
    /// contexts (a bare URL) and empty ones still decode.
    #[test]
    fn context_carries_the_keep_flag() {
        let kept = learner_context("http://127.0.0.1:42379", true);
        assert_eq!(parse_context(&kept), (Some("http://127.0.0.1:42379"), true));
        let plain = learner_context("http://127.0.0.1:42379", false);
        assert_eq!(
            parse_context(&plain),
            (Some("http://127.0.0.1:42379"), false)
        );
        assert_eq!(parse_context(b""), (None, false));
        assert_eq!(parse_context(&[0xff]), (None, false));
    }

    /// Applying changes keeps the read-replica set, and a promotion is only an AddNode of a
    /// node that was a learner.
    #[test]
    fn kept_set_follows_applied_changes() {
        use ConfChangeType::*;
        let mut m = Learners::default();
        let mut add = cc(AddLearnerNode, 4);
        add.context = learner_context("http://h:1", true).into();
        assert_eq!(m.applied(&add, false), Applied::Other);
        assert_eq!(m.applied(&cc(AddLearnerNode, 5), false), Applied::Other);
        assert_eq!(m.kept, [4].into());
        assert_eq!(m.applied(&cc(AddNode, 4), true), Applied::Promoted);
        assert!(m.kept.is_empty());
        assert_eq!(m.applied(&cc(AddNode, 1), false), Applied::Other);
        m.applied(&add, false);
        m.applied(&cc(RemoveNode, 4), true);
        assert!(m.kept.is_empty());
    }

    #[test]
    fn trailer_round_trip() {
        let kept: BTreeSet<u64> = [2, 7].into();
        assert_eq!(decode_trailer(&encode_trailer(&kept)), Ok(kept));
        assert_eq!(decode_trailer(&[]), Ok(BTreeSet::new()));
        let mut long = encode_trailer(&[1].into());
        long.push(0);
        assert!(decode_trailer(&long).is_err());
    }
}

/// The adapter over raft's progress tracker, on a real raft-rs leader.
#[cfg(test)]
mod raft_tests {
    use super::*;
    use raft::prelude::{Message, MessageType};
    use raft::storage::MemStorage;

    /// Leader 1 of voters `voters` plus `learners`, elected at term 2.
    fn leader(voters: Vec<u64>, learners: Vec<u64>) -> raft::RawNode<MemStorage> {
        let store = MemStorage::new_with_conf_state((voters, learners));
        let cfg = raft::Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 1,
            check_quorum: true,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut n = raft::RawNode::new(&cfg, store, &logger).unwrap();
        n.raft.become_candidate();
        n.raft.become_leader();
        n
    }

    fn append_response(from: u64, index: u64, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppendResponse);
        (m.from, m.to, m.term, m.index) = (from, 1, term, index);
        m
    }

    /// A learner that has acknowledged nothing is not promoted, automatically or explicitly;
    /// once it acknowledges the leader's last index it is, unless kept.
    #[test]
    fn a_learner_is_promoted_once_it_acknowledges_the_log() {
        let mut n = leader(vec![1], vec![2]);
        let mut m = Learners::default();
        assert_eq!(m.on_tick(&n.raft), None);
        let promote = promotion(2);
        assert!(
            m.check_safe(&n.raft, &promote).is_err(),
            "an explicit promotion of a learner that never answered would stop the cluster"
        );
        let (last, term) = (n.raft.raft_log.last_index(), n.raft.term);
        n.step(append_response(2, last, term)).unwrap();
        assert_eq!(m.on_tick(&n.raft), Some((2, last)));
        assert_eq!(m.check_safe(&n.raft, &promote), Ok(()));
        m.kept.insert(2);
        assert_eq!(m.on_tick(&n.raft), None);
    }

    /// Of voters 1, 2, 3 only 2 answers: removing 2 would leave 1 of {1, 3} up, removing 3
    /// leaves {1, 2} both up, and learner 4 (silent) may always go.
    #[test]
    fn reachability_comes_from_the_progress() {
        let mut n = leader(vec![1, 2, 3], vec![4]);
        let mut m = Learners::default();
        // Raft marks peers it just added as active; one check-quorum round clears that (node
        // 2 answering keeps the leader in office).
        let (last, term) = (n.raft.raft_log.last_index(), n.raft.term);
        for _ in 0..10 {
            n.step(append_response(2, last, term)).unwrap();
            n.tick();
        }
        assert_eq!(n.raft.state, raft::StateRole::Leader);
        n.step(append_response(2, last, term)).unwrap();
        m.on_tick(&n.raft);
        let remove = |id| {
            let mut cc = promotion(id);
            cc.set_change_type(ConfChangeType::RemoveNode);
            cc
        };
        assert!(m.check_safe(&n.raft, &remove(2)).is_err());
        assert_eq!(m.check_safe(&n.raft, &remove(3)), Ok(()));
        assert_eq!(m.check_safe(&n.raft, &remove(4)), Ok(()));
    }
}
