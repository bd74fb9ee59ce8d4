//! A linearizability checker for histories of a key-value store seen as one register per key:
//! Wing & Gong's search with Lowe's memoization (the algorithm of Porcupine and Knossos' "wgl").
//!
//! A history is a list of [`Op`]s: who called, on which key, a PUT of a value or a GET that saw
//! a value (or no value: 404), the call time and the return time. An operation whose outcome is
//! unknown (a PUT that got 503 "outcome unknown", timed out, or lost its connection) has no
//! return time: it may take effect at any point after its call, or never. Failed GETs and PUTs
//! that are known not to be applied carry no information and must be left out of the history.
//!
//! [`check`] splits the history by key (linearizability is local: a history is linearizable iff
//! each key's sub-history is) and searches, for each key, an order of the operations that
//! respects real time (an operation that returned before another was called comes first) and
//! the register's semantics (a GET returns the value of the latest PUT before it, or `None`).
//!
//! The search (Lowe, "Testing for linearizability", 2017): walk a list of call and return
//! events sorted by time; at a call, try to linearize that operation now (if the register
//! allows it) and restart from the head; at a return whose operation is not yet linearized,
//! undo the last choice (backtrack). A cache of (set of linearized operations, register state)
//! configurations already explored cuts the search from exponential to, in practice, linear.
//!
//! Unknown-outcome PUTs whose value no GET returned are dropped before the search: placing
//! such a PUT at the end of any linearization of the others keeps it valid (no GET depends on
//! its value), and it keeps the search from trying all subsets of them.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Instant;

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `PUT key value`.
    Put(String),
    /// `GET key` returned this value (`None`: 404, the key was never written).
    Get(Option<String>),
}

/// One client operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Who issued it (for messages only; a client's operations need not be sequential).
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    /// When the request was sent, in nanoseconds on one clock shared by all clients ([`Clock`]).
    pub call: u64,
    /// When the answer came back; `None` if the outcome is unknown.
    pub ret: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            Kind::Put(v) => format!("PUT {} {v:?}", self.key),
            Kind::Get(Some(v)) => format!("GET {} -> {v:?}", self.key),
            Kind::Get(None) => format!("GET {} -> not found", self.key),
        };
        let ms = |t: u64| t as f64 / 1e6;
        match self.ret {
            Some(ret) => write!(
                f,
                "client {:>2} [{:>10.3} ms, {:>10.3} ms] {what}",
                self.client,
                ms(self.call),
                ms(ret)
            ),
            None => write!(
                f,
                "client {:>2} [{:>10.3} ms,   (unknown)  ] {what}",
                self.client,
                ms(self.call)
            ),
        }
    }
}

/// A monotonic clock in nanoseconds since its creation, shared by all clients of a history.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).expect("a test runs for less than 584 years")
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Configurations the search may visit per key before it gives up (and reports that, rather
/// than run for ever on a pathological history).
const MAX_STEPS: u64 = 20_000_000;

/// What [`check`] looked at, for the test's own sanity assertions and messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub keys: usize,
    /// Operations in the search (after unobserved unknown-outcome PUTs were dropped).
    pub ops: usize,
    /// Unknown-outcome PUTs dropped because no GET saw their value.
    pub unobserved_unknown_puts: usize,
    /// Search steps over all keys.
    pub steps: u64,
}

/// Checks that `history` is linearizable for a map of registers that start absent.
///
/// # Errors
/// A description of the first key whose sub-history is not linearizable (or too hard to
/// decide within [`MAX_STEPS`]), with the operations around the point where the search got
/// stuck.
pub fn check(history: &[Op]) -> Result<Summary, String> {
    check_within(history, MAX_STEPS)
}

/// [`check`] with another search budget per key (the simulator's seeds may pile up many
/// operations of unknown outcome after a whole-cluster power cut).
pub fn check_within(history: &[Op], max_steps: u64) -> Result<Summary, String> {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in history {
        if let Some(ret) = op.ret {
            assert!(ret >= op.call, "operation returns before its call: {op}");
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    let mut summary = Summary {
        keys: keys.len(),
        ..Summary::default()
    };
    for key in keys {
        let ops = &by_key[key];
        let observed: HashSet<&str> = ops
            .iter()
            .filter_map(|op| match &op.kind {
                Kind::Get(Some(v)) => Some(v.as_str()),
                _ => None,
            })
            .collect();
        let kept: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|op| match (&op.kind, op.ret) {
                (Kind::Put(v), None) => observed.contains(v.as_str()),
                // A GET without an answer says nothing.
                (Kind::Get(_), None) => false,
                _ => true,
            })
            .collect();
        summary.unobserved_unknown_puts += ops
            .iter()
            .filter(|op| matches!(op.kind, Kind::Put(_)) && op.ret.is_none())
            .count()
            - kept
                .iter()
                .filter(|op| matches!(op.kind, Kind::Put(_)) && op.ret.is_none())
                .count();
        summary.ops += kept.len();
        summary.steps += check_key(key, &kept, max_steps)?;
    }
    Ok(summary)
}

/// An event of the search list: the call or the return of operation `op`.
#[derive(Clone, Copy, Debug)]
struct Event {
    op: usize,
    is_call: bool,
    /// `u64::MAX` for the return of an unknown-outcome operation.
    time: u64,
}

/// A set of operation indexes, hashable for the cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Searches a linearization of one key's operations; returns the number of steps it took.
fn check_key<'a>(key: &str, ops: &[&'a Op], max_steps: u64) -> Result<u64, String> {
    let n = ops.len();
    // Register states are interned values: 0 is "absent", value i is state i + 1.
    let mut interned: HashMap<&str, u32> = HashMap::new();
    let mut value_id = |v: &'a str| -> u32 {
        let next = u32::try_from(interned.len() + 1).expect("fewer than 4e9 values");
        *interned.entry(v).or_insert(next)
    };
    // What each operation does to the register: Put(v) sets state v; Get(v) requires state v.
    let effects: Vec<(bool, u32)> = ops
        .iter()
        .map(|op| match &op.kind {
            Kind::Put(v) => (true, value_id(v)),
            Kind::Get(Some(v)) => (false, value_id(v)),
            Kind::Get(None) => (false, 0),
        })
        .collect();

    let mut events: Vec<Event> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push(Event {
            op: i,
            is_call: true,
            time: op.call,
        });
        events.push(Event {
            op: i,
            is_call: false,
            time: op.ret.unwrap_or(u64::MAX),
        });
    }
    // At equal times a call sorts before a return: the two operations count as concurrent,
    // the more permissive reading of a tie.
    events.sort_by_key(|e| (e.time, !e.is_call, e.op));

    // A doubly linked list over events 1..=2n with the head sentinel 0; NIL ends it.
    const NIL: usize = usize::MAX;
    let m = events.len();
    let mut next: Vec<usize> = (0..=m).map(|i| if i < m { i + 1 } else { NIL }).collect();
    let mut prev: Vec<usize> = (0..=m).map(|i| i.wrapping_sub(1)).collect();
    prev[0] = NIL;
    // The list node of each operation's return event.
    let mut ret_node = vec![0; n];
    for (i, e) in events.iter().enumerate() {
        if !e.is_call {
            ret_node[e.op] = i + 1;
        }
    }
    let event = |node: usize| events[node - 1];
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = nx;
        if nx != NIL {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, nx) = (prev[node], next[node]);
        next[p] = node;
        if nx != NIL {
            prev[nx] = node;
        }
    };

    let mut linearized = BitSet::new(n);
    let mut cache: HashSet<(BitSet, u32)> = HashSet::new();
    // Linearized calls, with the register state before each.
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut state: u32 = 0;
    let mut node = next[0];
    let mut steps: u64 = 0;
    // For the failure message: the deepest point reached and the return that stopped it.
    let mut deepest: (usize, usize) = (0, 0);
    while next[0] != NIL {
        steps += 1;
        if steps > max_steps {
            return Err(format!(
                "key {key}: gave up after {max_steps} steps over {n} operations \
                 (neither a linearization nor a proof that none exists)"
            ));
        }
        let e = event(node);
        if e.is_call {
            let (is_put, v) = effects[e.op];
            let after = if is_put {
                Some(v)
            } else if v == state {
                Some(state)
            } else {
                None
            };
            if let Some(after) = after {
                linearized.set(e.op);
                if cache.insert((linearized.clone(), after)) {
                    stack.push((node, state));
                    state = after;
                    unlink(&mut next, &mut prev, node);
                    unlink(&mut next, &mut prev, ret_node[e.op]);
                    node = next[0];
                    continue;
                }
                linearized.clear(e.op);
            }
            node = next[node];
        } else {
            if e.time == u64::MAX {
                // Only unknown-outcome operations are left: they may never take effect.
                return Ok(steps);
            }
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), e.op);
            }
            // Operation `e.op` must take effect before it returns, and cannot: backtrack.
            let Some((call, before)) = stack.pop() else {
                return Err(failure(key, ops, deepest));
            };
            let op = event(call).op;
            linearized.clear(op);
            state = before;
            relink(&mut next, &mut prev, ret_node[op]);
            relink(&mut next, &mut prev, call);
            node = next[call];
        }
    }
    Ok(steps)
}

/// The message for a key with no linearization: the operation that could not be placed at
/// the deepest point of the search, and every operation that overlaps the second before it.
fn failure(key: &str, ops: &[&Op], (depth, stuck): (usize, usize)) -> String {
    let stuck_op = ops[stuck];
    let from = stuck_op.call.saturating_sub(1_000_000_000);
    let to = stuck_op.ret.unwrap_or(u64::MAX);
    let mut around: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|op| op.call <= to && op.ret.map_or(true, |r| r >= from))
        .collect();
    around.sort_by_key(|op| op.call);
    let shown = around.len().min(200);
    let lines: Vec<String> = around[around.len() - shown..]
        .iter()
        .map(|op| format!("  {op}"))
        .collect();
    format!(
        "key {key}: not linearizable ({} operations). The search placed at most {depth} \
         operations before it could not place\n  {stuck_op}\n\
         operations overlapping the second before it (last {shown} by call time):\n{}",
        ops.len(),
        lines.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: usize, v: &str, call: u64, ret: Option<u64>) -> Op {
        Op {
            client,
            key: "/k".into(),
            kind: Kind::Put(v.into()),
            call,
            ret,
        }
    }

    fn get(client: usize, v: Option<&str>, call: u64, ret: u64) -> Op {
        Op {
            client,
            key: "/k".into(),
            kind: Kind::Get(v.map(String::from)),
            call,
            ret: Some(ret),
        }
    }

    fn on(key: &str, mut op: Op) -> Op {
        op.key = key.into();
        op
    }

    /// One client, one operation at a time: every read sees the latest write.
    #[test]
    fn sequential_history_is_accepted() {
        let h = [
            get(0, None, 0, 1),
            put(0, "a", 2, Some(3)),
            get(0, Some("a"), 4, 5),
            put(0, "b", 6, Some(7)),
            get(0, Some("b"), 8, 9),
            get(0, Some("b"), 10, 11),
        ];
        let s = check(&h).unwrap();
        assert_eq!((s.keys, s.ops), (1, 6));
    }

    /// Overlapping operations may take effect in either order; the search must backtrack from
    /// its first guess (it tries the earliest call, "a", first).
    #[test]
    fn concurrent_history_is_accepted() {
        let h = [
            put(0, "a", 0, Some(100)),
            put(1, "b", 10, Some(90)),
            get(2, None, 5, 15),
            get(2, Some("b"), 20, 30),
            get(3, Some("a"), 40, 50),
            get(3, Some("a"), 110, 120),
        ];
        check(&h).unwrap();
    }

    /// A read of an old value after a newer write completed is a stale read: rejected.
    #[test]
    fn stale_read_is_rejected() {
        let h = [
            put(0, "a", 0, Some(10)),
            put(1, "b", 20, Some(30)),
            get(2, Some("a"), 40, 50),
        ];
        let err = check(&h).unwrap_err();
        assert!(err.contains("not linearizable"), "{err}");
        assert!(err.contains("GET /k -> \"a\""), "{err}");
    }

    /// A read must not go back in time either: once a read saw the newer value, a later read
    /// may not see the older one, even while the newer write has not returned.
    #[test]
    fn read_going_back_in_time_is_rejected() {
        let h = [
            put(0, "a", 0, Some(10)),
            put(1, "b", 20, Some(1000)),
            get(2, Some("b"), 30, 40),
            get(3, Some("a"), 50, 60),
        ];
        check(&h).unwrap_err();
    }

    /// A read of a value nobody wrote is rejected, with and without earlier writes.
    #[test]
    fn read_of_never_written_value_is_rejected() {
        check(&[put(0, "a", 0, Some(10)), get(1, Some("zzz"), 20, 30)]).unwrap_err();
        check(&[get(1, Some("zzz"), 0, 10)]).unwrap_err();
        // "Not found" after a completed write is a lost write.
        check(&[put(0, "a", 0, Some(10)), get(1, None, 20, 30)]).unwrap_err();
    }

    /// A PUT with unknown outcome may take effect long after its call: a later read that sees
    /// it is fine, and so are reads of the old value before that.
    #[test]
    fn unknown_put_later_observed_is_accepted() {
        let h = [
            put(0, "a", 0, Some(10)),
            put(1, "b", 20, None),
            get(2, Some("a"), 30, 40),
            get(2, Some("a"), 1_000, 1_010),
            get(3, Some("b"), 5_000, 5_010),
            get(3, Some("b"), 6_000, 6_010),
        ];
        let s = check(&h).unwrap();
        assert_eq!(s.unobserved_unknown_puts, 0);
    }

    /// ...but it takes effect at most once and not before its call: the old value cannot come
    /// back after the unknown PUT was observed, and the value cannot be read before the call.
    #[test]
    fn unknown_put_respects_its_call_and_takes_effect_once() {
        check(&[
            put(0, "a", 0, Some(10)),
            put(1, "b", 20, None),
            get(3, Some("b"), 30, 40),
            get(3, Some("a"), 50, 60),
        ])
        .unwrap_err();
        check(&[
            put(0, "a", 0, Some(10)),
            get(3, Some("b"), 20, 30),
            put(1, "b", 40, None),
        ])
        .unwrap_err();
    }

    /// A PUT with unknown outcome that nobody observed may never have happened.
    #[test]
    fn unknown_put_never_observed_is_accepted() {
        let h = [
            put(0, "a", 0, Some(10)),
            put(1, "b", 20, None),
            put(1, "c", 25, None),
            get(2, Some("a"), 30, 40),
            get(2, Some("a"), 1_000, 1_010),
        ];
        let s = check(&h).unwrap();
        assert_eq!(s.unobserved_unknown_puts, 2);
        assert_eq!(s.ops, 3);
    }

    /// Keys are independent registers, and the message names the key that failed.
    #[test]
    fn history_is_partitioned_by_key() {
        let h = [
            on("/x", put(0, "a", 0, Some(10))),
            on("/y", get(1, None, 20, 30)),
            on("/x", get(1, Some("a"), 40, 50)),
            on("/y", put(0, "b", 60, Some(70))),
            on("/y", put(0, "c", 80, Some(90))),
            on("/y", get(2, Some("b"), 100, 110)),
        ];
        let err = check(&h).unwrap_err();
        assert!(err.starts_with("key /y:"), "{err}");
        check(&h[..5]).unwrap();
    }

    /// Many overlapping writes, more than the clients of the real test ever have: reads in
    /// their window force the search to undo early guesses; the cache keeps that fast.
    #[test]
    fn many_concurrent_writes_are_checked_quickly() {
        let mut h: Vec<Op> = (0..14)
            .map(|i| put(i, &format!("v{i}"), i as u64, Some(1_000 + i as u64)))
            .collect();
        for (j, i) in [13, 3, 9, 0, 5].iter().enumerate() {
            let t = 100 + 10 * j as u64;
            h.push(get(99, Some(&format!("v{i}")), t, t + 5));
        }
        h.push(get(99, Some("v5"), 2_000, 2_010));
        let started = Instant::now();
        let s = check(&h).unwrap();
        assert!(s.steps < 1_000_000, "{s:?}");
        assert!(started.elapsed().as_secs() < 5);
        // Each write takes effect once: "v3", seen before "v9", cannot be seen after it.
        h.push(get(99, Some("v3"), 200, 210));
        check(&h).unwrap_err();
    }
}
