//! A cluster's life under one seed: members, network, clients and the checks made at every
//! step (one leader per term, replicas agree at equal applied index). Time is simulated in
//! milliseconds; a step is 5 ms.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft::prelude::{ConfChange, ConfChangeType};
use tokio::sync::oneshot;

use super::checker::{Kind, Op};
use super::net::{Net, Rng};
use super::node::{url, Member, Stop};
use raftexample::channels::{ConfChangeError, ConfChangeRequest, ReadError};

pub const STEP_MS: u64 = 5;
const TICK_MS: u64 = 100;
/// A client gives up on an answer after this long (the outcome of a PUT is then unknown).
const CLIENT_TIMEOUT_MS: u64 = 10_000;
pub const KEYS: [&str; 4] = ["/a", "/b", "/c", "/d"];

struct PendingPut {
    op: usize,
    rx: oneshot::Receiver<Result<(), String>>,
}

struct PendingGet {
    op: usize,
    member: u64,
    rx: oneshot::Receiver<Result<u64, ReadError>>,
    index: Option<u64>,
}

type ConfDone = oneshot::Receiver<Result<(), ConfChangeError>>;

pub struct World {
    pub rng: Rng,
    pub now: u64,
    pub steps: u64,
    pub members: BTreeMap<u64, Member>,
    /// The members the cluster was created with (their `--cluster`).
    initial: Vec<u64>,
    pub net: Net,
    pub history: Vec<Op>,
    puts: Vec<PendingPut>,
    gets: Vec<PendingGet>,
    /// Members that joined as learners and that some member has applied as voters since
    /// (promoted by a leader).
    pub promoted: BTreeSet<u64>,
    /// A membership change in flight: the member it adds (to start once applied) or removes.
    change: Option<(ConfChangeType, u64, ConfDone, u64)>,
    next_value: u64,
    leaders: BTreeMap<u64, u64>,
    digests: BTreeMap<u64, u64>,
    /// Every event, hashed (FNV-1a), and the last ones kept for a failure's message.
    pub trace_hash: u64,
    pub last_events: VecDeque<String>,
    /// How many of the last events to keep.
    pub keep_events: usize,
    /// The seed ended with no quorum (see `heal`).
    pub stuck: bool,
    logger: slog::Logger,
}

impl World {
    pub fn new(seed: u64, n: u64, logger: slog::Logger) -> World {
        let members = (1..=n).map(|id| (id, Member::new(id, false))).collect();
        World {
            rng: Rng(seed),
            now: 0,
            steps: 0,
            members,
            initial: (1..=n).collect(),
            net: Net::default(),
            history: Vec::new(),
            puts: Vec::new(),
            gets: Vec::new(),
            promoted: BTreeSet::new(),
            change: None,
            next_value: 0,
            leaders: BTreeMap::new(),
            digests: BTreeMap::new(),
            trace_hash: 0xcbf2_9ce4_8422_2325,
            last_events: VecDeque::new(),
            keep_events: 40,
            stuck: false,
            logger,
        }
    }

    pub fn event(&mut self, e: String) {
        for b in e.bytes().chain([b'\n']) {
            self.trace_hash = (self.trace_hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.last_events.len() == self.keep_events {
            self.last_events.pop_front();
        }
        self.last_events
            .push_back(format!("{:>8} ms  {e}", self.now));
    }

    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.run.is_some())
            .map(|m| m.id)
            .collect()
    }

    pub fn down(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.run.is_none() && !m.down_for_good)
            .map(|m| m.id)
            .collect()
    }

    pub fn leader(&self) -> Option<u64> {
        self.members
            .values()
            .find(|m| m.run.as_ref().is_some_and(|r| r.node.is_leader()))
            .map(|m| m.id)
    }

    /// Boots a member; a refusal is fine only if its synced data was damaged on purpose.
    pub fn start(&mut self, id: u64) -> Result<(), String> {
        let peers: Vec<u64> = if self.members[&id].join {
            self.ids()
        } else {
            self.initial.clone()
        };
        let m = self.members.get_mut(&id).expect("a member");
        match m.start(&mut self.rng, &peers, &self.logger) {
            Ok(()) => {
                let boots = m.boots;
                self.event(format!("start {id} (boot {boots})"));
                Ok(())
            }
            Err(e) if m.flipped => {
                m.down_for_good = true;
                self.event(format!("start {id} refused, damaged data: {e}"));
                Ok(())
            }
            Err(e) => Err(format!("member {id} does not restart: {e}")),
        }
    }

    /// One step: deliver what is due, let disks and snapshot threads progress, tick, run
    /// every node, answer clients, check.
    pub fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        self.now += STEP_MS;
        let arrivals = self.net.due(self.now);
        for m in arrivals.messages {
            let Some(r) = self.members.get_mut(&m.to).and_then(|m| m.run.as_mut()) else {
                continue;
            };
            if r.removed.read().expect("removed lock").contains(&m.from) {
                // The daemon's transport answers 410, and the sender stops.
                if let Some(s) = self.members.get_mut(&m.from).and_then(|m| m.run.as_mut()) {
                    s.node.removed_by_peer();
                }
                continue;
            }
            r.node.step(m);
        }
        for (from, to, delivered) in arrivals.snapshots {
            if let Some(r) = self.members.get_mut(&from).and_then(|m| m.run.as_mut()) {
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                r.node.report_snapshot(to, status);
            }
        }
        for id in self.running() {
            self.progress(id)?;
        }
        self.answer_clients();
        self.check()
    }

    fn progress(&mut self, id: u64) -> Result<(), String> {
        let phase = id * 17 % TICK_MS;
        let tick = self.now % TICK_MS == phase - phase % STEP_MS;
        let write = self.rng.chance(600);
        let group = 1 + self.rng.below(4) as usize;
        let snap = self.rng.chance(300);
        let m = self.members.get_mut(&id).expect("a member");
        let r = m.run.as_mut().expect("running");
        if tick {
            r.node.tick();
        }
        let mut res = Ok(());
        let mut wrote = false;
        if write && r.queued_jobs() > 0 {
            res = r.write_jobs(group, &self.logger);
            wrote = true;
        }
        if res.is_ok() && snap && r.snapshot_pending() {
            res = r.write_snapshot();
        }
        let msgs = match res {
            Ok(()) => r.process().map_err(|e| format!("member {id}: {e}"))?,
            Err(stop) => return self.stopped(id, stop),
        };
        if r.node.exit().is_some() {
            self.stopped(id, Stop::Removed)?;
        }
        for msg in msgs {
            self.net.send(&mut self.rng, self.now, msg);
        }
        if wrote && self.members[&id].cut_after_write {
            let seed = self.rng.next();
            self.members.get_mut(&id).expect("a member").power_cut(seed);
            self.event(format!(
                "member {id} lost its power after a group of writes"
            ));
        } else if self.members[&id].disk.is_dead() {
            // The power failed during a sync (of the snapshot thread, say, which does not stop
            // the node): the machine is off.
            let seed = self.rng.next();
            self.members.get_mut(&id).expect("a member").power_cut(seed);
            self.event(format!("member {id} lost its power"));
        }
        Ok(())
    }

    /// A member that must fail-stop (a disk error) is down until restarted, with what the
    /// failed disk kept; a removed one is gone.
    fn stopped(&mut self, id: u64, why: Stop) -> Result<(), String> {
        let seed = self.rng.next();
        let m = self.members.get_mut(&id).expect("a member");
        match &why {
            Stop::Disk(e) if !m.faulted => {
                return Err(format!(
                    "member {id} stopped with no disk fault injected: {e}"
                ));
            }
            Stop::Disk(_) => m.power_cut(seed),
            Stop::Removed => {
                m.kill();
                m.down_for_good = true;
            }
        }
        self.event(format!("member {id} stopped: {why:?}"));
        Ok(())
    }

    pub fn put(&mut self, id: u64, key: &str) {
        self.next_value += 1;
        // Now and then a value of a few pages: its WAL record can be torn across pages.
        let pad = if self.rng.chance(120) {
            4096 + self.rng.below(8192) as usize
        } else {
            0
        };
        let value = format!("v{}{}", self.next_value, "x".repeat(pad));
        let Some(r) = self.members.get_mut(&id).and_then(|m| m.run.as_mut()) else {
            return;
        };
        let (p, rx) = r.kv.prepare_put(key.as_bytes(), value.as_bytes());
        r.node.propose(p);
        self.history.push(Op {
            client: id as usize,
            key: key.into(),
            kind: Kind::Put(value.clone()),
            call: self.now * 1_000_000,
            ret: None,
        });
        let op = self.history.len() - 1;
        self.puts.push(PendingPut { op, rx });
        self.event(format!(
            "put {key}=v{} ({} bytes) on {id}",
            self.next_value,
            value.len()
        ));
    }

    /// True while PUT `op` waits for its answer.
    pub fn put_pending(&self, op: usize) -> bool {
        self.puts.iter().any(|p| p.op == op)
    }

    pub fn get(&mut self, id: u64, key: &str) {
        let Some(r) = self.members.get_mut(&id).and_then(|m| m.run.as_mut()) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        r.node.read(tx);
        self.history.push(Op {
            client: id as usize,
            key: key.into(),
            kind: Kind::Get(None),
            call: self.now * 1_000_000,
            ret: None,
        });
        let op = self.history.len() - 1;
        self.gets.push(PendingGet {
            op,
            member: id,
            rx,
            index: None,
        });
        self.event(format!("get {key} on {id}"));
    }

    /// Operations whose answer came: a PUT applied on its node, a GET whose read index the
    /// node's map reached. A PUT raft refused and a failed GET carry no information and leave
    /// the history; an unanswered PUT keeps an unknown outcome.
    fn answer_clients(&mut self) {
        let now = self.now;
        let mut forget = Vec::new();
        let mut answered = Vec::new();
        self.puts.retain_mut(|p| match p.rx.try_recv() {
            Ok(Ok(())) => {
                self.history[p.op].ret = Some(now * 1_000_000);
                answered.push(format!("acked op {}", p.op));
                false
            }
            Ok(Err(_)) => {
                forget.push(p.op);
                false
            }
            Err(oneshot::error::TryRecvError::Closed) => false,
            Err(oneshot::error::TryRecvError::Empty) => {
                now * 1_000_000 - self.history[p.op].call < CLIENT_TIMEOUT_MS * 1_000_000
            }
        });
        let members = &self.members;
        self.gets.retain_mut(|g| {
            let Some(run) = members.get(&g.member).and_then(|m| m.run.as_ref()) else {
                forget.push(g.op);
                return false;
            };
            if g.index.is_none() {
                match g.rx.try_recv() {
                    Ok(Ok(i)) => g.index = Some(i),
                    Err(oneshot::error::TryRecvError::Empty)
                        if now * 1_000_000 - self.history[g.op].call
                            < CLIENT_TIMEOUT_MS * 1_000_000 =>
                    {
                        return true
                    }
                    _ => {
                        forget.push(g.op);
                        return false;
                    }
                }
            }
            if run.kv.applied() < g.index.expect("set above") {
                return true;
            }
            let op = &mut self.history[g.op];
            let value = run.kv.lookup(op.key.as_bytes());
            op.kind = Kind::Get(value.map(|v| String::from_utf8_lossy(&v).into_owned()));
            op.ret = Some(now * 1_000_000);
            let seen = match &op.kind {
                Kind::Get(Some(v)) => v.chars().take(8).collect(),
                _ => "nothing".to_string(),
            };
            answered.push(format!(
                "op {} answered on {}: read index {:?}, applied {}, saw {seen}",
                g.op,
                g.member,
                g.index,
                run.kv.applied(),
            ));
            false
        });
        for a in answered {
            self.event(a);
        }
        // Marked, not removed, so the indexes of pending operations stay valid.
        for op in forget {
            self.history[op].client = usize::MAX;
        }
    }

    /// One leader per term, and every replica's map equal to the others' at the same index.
    fn check(&mut self) -> Result<(), String> {
        let mut promoted = Vec::new();
        for m in self.members.values() {
            let Some(r) = &m.run else { continue };
            promoted.extend(r.node.conf_state().voters.iter().copied().filter(|v| {
                !self.promoted.contains(v) && self.members.get(v).is_some_and(|m| m.join)
            }));
            if r.node.is_leader() {
                let term = r.node.term();
                let first = *self.leaders.entry(term).or_insert(m.id);
                if first != m.id {
                    return Err(format!("two leaders in term {term}: {first} and {}", m.id));
                }
            }
            let (applied, hash) = r.kv.digest();
            let first = *self.digests.entry(applied).or_insert(hash);
            if first != hash {
                return Err(format!(
                    "member {} diverges at applied index {applied}",
                    m.id
                ));
            }
        }
        for id in promoted {
            if self.promoted.insert(id) {
                self.event(format!("{id} promoted to voter"));
            }
        }
        Ok(())
    }

    /// Proposes adding a new member as a learner (started once the change applies; the leader
    /// promotes it once it has caught up) or removing one.
    pub fn change_membership(&mut self, add: bool) {
        let Some(leader) = self.leader() else { return };
        if self.change.is_some() {
            return;
        }
        let voters: Vec<u64> = self
            .members
            .values()
            .filter(|m| !m.down_for_good)
            .map(|m| m.id)
            .collect();
        let mut cc = ConfChange::default();
        let id = if add {
            if self.members.len() >= 5 {
                return;
            }
            cc.set_change_type(ConfChangeType::AddLearnerNode);
            let id = self.members.keys().max().copied().unwrap_or(0) + 1;
            cc.context = url(id).into_bytes().into();
            id
        } else {
            if voters.len() <= 3 {
                return;
            }
            cc.set_change_type(ConfChangeType::RemoveNode);
            self.rng.pick(&voters).expect("voters")
        };
        cc.node_id = id;
        cc.id = self.rng.next();
        let (tx, rx) = oneshot::channel();
        let r = self.members.get_mut(&leader).and_then(|m| m.run.as_mut());
        r.expect("the leader runs")
            .node
            .conf_change(ConfChangeRequest {
                cc: cc.clone(),
                done: tx,
            });
        self.change = Some((cc.get_change_type(), id, rx, self.now));
        self.event(format!(
            "propose {:?} {id} on {leader}",
            cc.get_change_type()
        ));
    }

    /// Starts a member once its addition applied.
    pub fn follow_membership(&mut self) -> Result<(), String> {
        let Some((kind, id, mut rx, at)) = self.change.take() else {
            return Ok(());
        };
        let applied = match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) if self.now < at + CLIENT_TIMEOUT_MS => {
                self.change = Some((kind, id, rx, at));
                return Ok(());
            }
            Ok(Err(e)) => {
                self.event(format!("{kind:?} {id} refused: {e}"));
                return Ok(());
            }
            // Applied, or unknown (the leader went away, or it took too long): the operator
            // starts a new member anyway, and stops one only once its removal applied.
            other => other.is_ok(),
        };
        self.event(format!("{kind:?} {id} done, applied here: {applied}"));
        if kind == ConfChangeType::AddLearnerNode {
            self.members.insert(id, Member::new(id, true));
            self.start(id)?;
        } else if let Some(m) = self.members.get_mut(&id).filter(|_| applied) {
            m.kill();
            m.down_for_good = true;
        }
        Ok(())
    }

    /// One line per member, for a failure's message.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for m in self.members.values() {
            let state = match &m.run {
                Some(r) => format!(
                    "leader={} term={} commit={} applied={} jobs={}",
                    r.node.leader(),
                    r.node.term(),
                    r.node.commit(),
                    r.node.applied(),
                    r.queued_jobs()
                ),
                None if m.down_for_good => "down for good".into(),
                None => "down".into(),
            };
            out += &format!(
                "member {} (join={} flipped={} boots={}): {state}\n",
                m.id, m.join, m.flipped, m.boots
            );
        }
        out
    }
}
