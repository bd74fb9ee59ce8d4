//! The simulated network and the seed's random numbers: messages in flight with a delivery
//! time, dropped, duplicated or delayed (which reorders them), and partitions.

use std::collections::{BTreeMap, BTreeSet};

use raft::prelude::Message;

/// splitmix64: the simulation's only source of choices, so a seed replays a run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        (!from.is_empty()).then(|| from[self.below(from.len() as u64) as usize])
    }
}

/// How the network misbehaves now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Weather {
    pub drop_per_mille: u64,
    pub dup_per_mille: u64,
    /// Delivery takes 1 ms up to this many.
    pub max_delay_ms: u64,
}

/// What arrives at a step: messages to step, and the outcome of snapshot sends for their
/// senders (the daemon's transport reports each one, and raft waits for it).
#[derive(Default)]
pub struct Arrivals {
    pub messages: Vec<Message>,
    /// `(sender, receiver, delivered)`.
    pub snapshots: Vec<(u64, u64, bool)>,
}

#[derive(Default)]
pub struct Net {
    /// By delivery time, then by send order; `true` if the network lost it (for a snapshot,
    /// whose failure is reported when the send would have ended).
    flights: BTreeMap<(u64, u64), (Message, bool)>,
    seq: u64,
    /// Directed links that deliver nothing.
    pub blocked: BTreeSet<(u64, u64)>,
    pub weather: Weather,
}

impl Net {
    pub fn send(&mut self, rng: &mut Rng, now: u64, m: Message) {
        let lost =
            self.blocked.contains(&(m.from, m.to)) || rng.chance(self.weather.drop_per_mille);
        let snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
        if lost && !snapshot {
            return;
        }
        // Any raft message may arrive twice but a forwarded proposal: raft would append it twice
        // and its PUT would apply twice (a write coming back after a later one). The daemon's
        // transport delivers each message at most once (TCP streams; a failed batch is dropped,
        // never resent), which is what this relies on.
        let proposal = m.get_msg_type() == raft::prelude::MessageType::MsgPropose;
        let dup = rng.chance(self.weather.dup_per_mille);
        if !lost && !proposal && dup {
            let at = now + 1 + rng.below(self.weather.max_delay_ms.max(1));
            self.seq += 1;
            self.flights.insert((at, self.seq), (m.clone(), false));
        }
        let at = now + 1 + rng.below(self.weather.max_delay_ms.max(1));
        self.seq += 1;
        self.flights.insert((at, self.seq), (m, lost));
    }

    /// What is due by `now`, in delivery order; a link cut meanwhile loses it.
    pub fn due(&mut self, now: u64) -> Arrivals {
        let later = self.flights.split_off(&(now + 1, 0));
        let due = std::mem::replace(&mut self.flights, later);
        let mut out = Arrivals::default();
        for (m, lost) in due.into_values() {
            let lost = lost || self.blocked.contains(&(m.from, m.to));
            if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                out.snapshots.push((m.from, m.to, !lost));
            }
            if !lost {
                out.messages.push(m);
            }
        }
        out
    }

    /// Cuts `id` off from `others`, both ways or (if `one_way`) only what it sends.
    pub fn isolate(&mut self, id: u64, others: &[u64], one_way: bool) {
        for &o in others.iter().filter(|&&o| o != id) {
            self.blocked.insert((id, o));
            if !one_way {
                self.blocked.insert((o, id));
            }
        }
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }
}
