//! Linearizable reads: batches the waiting ReadIndex requests into rounds, issues them to raft
//! and answers each request with the read index its round got (or an error).

use std::collections::VecDeque;

use raft::prelude::*;

use crate::channels::{ReadError, ReadRequest};
use crate::storage::RaftStorage;

/// Ticks after which an unanswered ReadIndex round is issued again (the first may have been
/// dropped by a leader change).
const READ_RETRY_TICKS: u32 = 5;
/// Rounds in flight at once. With one, a read arriving just after a round left waits for that
/// round and then a whole one of its own: on a follower a round is two network round trips
/// (to the leader, its heartbeats, back), so reads waited up to four. A second round leaves as
/// soon as reads queue, so a read waits for one round plus the batching; more would cost the
/// leader a heartbeat broadcast each for little gain.
pub const MAX_INFLIGHT: usize = 2;

/// Batches linearizable reads: up to [`MAX_INFLIGHT`] ReadIndex rounds are in flight at a
/// time, and the reads that arrive while that many are out wait for the next round, which they
/// all share (etcd's read loop allows one); under load a round answers many reads for one
/// heartbeat exchange. Any read state for round `c` also answers rounds issued before it, since
/// they started earlier (an index the leader confirmed after a read arrived is good for it).
///
/// On the leader, a follower's ReadIndex request joins the leader's own next round instead of
/// costing a heartbeat broadcast of its own (raft-rs gives each request one): the round's index
/// was read, and confirmed by a quorum, after the request arrived, which is all raft-rs's answer
/// promises. Under follower load the leader thus runs one round for all followers' requests.
///
/// A round's context is `node id | boot nonce | round number` (etcd's is alike): the leader
/// keys pending requests by context and drops one whose context is already pending, so
/// contexts must differ between nodes, and an answer that reaches a restarted node must not
/// resolve the new boot's reads with an index read for the old one.
pub struct ReadBatcher {
    /// Node id and boot nonce, big-endian: the first [`CTX_PREFIX`] bytes of every context.
    prefix: [u8; CTX_PREFIX],
    pub queued: Vec<ReadRequest>,
    /// Followers' `MsgReadIndex` requests waiting for this leader's next round.
    forwarded: Vec<Message>,
    inflight: VecDeque<(u64, Round)>,
    next_ctx: u64,
    idle_ticks: u32,
}

const CTX_PREFIX: usize = 16;

/// What one ReadIndex round answers.
#[derive(Default)]
struct Round {
    reads: Vec<ReadRequest>,
    forwarded: Vec<Message>,
    /// The term the round was issued in: followers are answered only by the leader of that
    /// term, as raft-rs would (its answer's term lets the follower commit the index).
    term: u64,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.forwarded.is_empty()
    }
}

impl ReadBatcher {
    pub fn new(id: u64, nonce: u64) -> ReadBatcher {
        let mut prefix = [0; CTX_PREFIX];
        prefix[..8].copy_from_slice(&id.to_be_bytes());
        prefix[8..].copy_from_slice(&nonce.to_be_bytes());
        ReadBatcher {
            prefix,
            queued: Vec::new(),
            forwarded: Vec::new(),
            inflight: VecDeque::new(),
            next_ctx: 0,
            idle_ticks: 0,
        }
    }

    fn issue(&mut self, node: &mut RawNode<RaftStorage>, mut batch: Round) {
        self.next_ctx += 1;
        let mut ctx = Vec::with_capacity(CTX_PREFIX + 8);
        ctx.extend_from_slice(&self.prefix);
        ctx.extend_from_slice(&self.next_ctx.to_be_bytes());
        node.read_index(ctx);
        batch.term = node.raft.term;
        self.inflight.push_back((self.next_ctx, batch));
        self.idle_ticks = 0;
    }

    /// The round number in `ctx` if this boot of this node issued it.
    pub fn round(&self, ctx: &[u8]) -> Option<u64> {
        let (prefix, n) = ctx.split_at_checked(CTX_PREFIX)?;
        if prefix != self.prefix {
            return None;
        }
        Some(u64::from_be_bytes(n.try_into().ok()?))
    }

    /// A follower's `MsgReadIndex` stepped on this leader.
    pub fn forward(&mut self, m: Message) {
        self.forwarded.push(m);
    }

    pub fn flush(&mut self, node: &mut RawNode<RaftStorage>) {
        let waiting = !self.queued.is_empty() || !self.forwarded.is_empty();
        if !waiting || self.inflight.len() >= MAX_INFLIGHT {
            return;
        }
        let batch = Round {
            reads: std::mem::take(&mut self.queued),
            // No longer the leader: the followers ask the new one when they retry.
            forwarded: std::mem::take(&mut self.forwarded)
                .into_iter()
                .filter(|_| node.raft.state == raft::StateRole::Leader)
                .collect(),
            term: 0,
        };
        if node.raft.leader_id == raft::INVALID_ID {
            for r in batch.reads {
                let _ = r.send(Err(ReadError::NoLeader));
            }
            return;
        }
        self.issue(node, batch);
    }

    pub fn on_tick(&mut self, node: &mut RawNode<RaftStorage>) {
        for (_, batch) in self.inflight.iter_mut() {
            batch.reads.retain(|r| !r.is_closed());
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
            self.issue(node, Round::default());
        }
    }

    /// Answers the rounds `states` resolve; returns the answers to followers' requests, to
    /// send. `node` is this node's raft, for its id and term.
    pub fn resolve(
        &mut self,
        states: Vec<ReadState>,
        node: &raft::Raft<RaftStorage>,
    ) -> Vec<Message> {
        let mut answers = Vec::new();
        for rs in states {
            let Some(ctx) = self.round(&rs.request_ctx) else {
                // Another boot's (or garbage): its index says nothing about our rounds.
                continue;
            };
            while self.inflight.front().is_some_and(|(c, _)| *c <= ctx) {
                let (_, batch) = self.inflight.pop_front().expect("front exists");
                for r in batch.reads {
                    let _ = r.send(Ok(rs.index));
                }
                let leading = node.state == raft::StateRole::Leader && node.term == batch.term;
                for req in batch.forwarded.into_iter().filter(|_| leading) {
                    answers.push(read_index_resp(node, req, rs.index));
                }
            }
        }
        answers
    }

    pub fn fail_all(&mut self, e: ReadError) {
        self.forwarded.clear();
        for (_, batch) in self.inflight.drain(..) {
            for r in batch.reads {
                let _ = r.send(Err(e.clone()));
            }
        }
        for r in self.queued.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
    }
}

/// raft-rs's answer to a follower's `MsgReadIndex` (`handle_ready_read_index`): the request's
/// context back, with the index and the leader's term.
fn read_index_resp(node: &raft::Raft<RaftStorage>, mut req: Message, index: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgReadIndexResp);
    (m.from, m.to, m.term, m.index) = (node.id, req.from, node.term, index);
    m.set_entries(req.take_entries());
    m
}
