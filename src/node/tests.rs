//! Unit tests of the node: raft nodes wired by hand, and recovered nodes fed inputs.

use std::collections::{BTreeMap, BTreeSet};

use protobuf::Message as _;
use raft::prelude::*;
use raft::StateRole;
use tokio::sync::oneshot;

use super::peer_check::check_peer_message;
use super::reads::ReadBatcher;
use super::recover::conf_change_entry;
use super::snapshot::data_header;
use super::*;
use crate::channels::{Apply, Exit, ReadError, SnapshotSource};

fn discard() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// A raft node of `voters` on an in-memory log, for tests that move messages by hand.
fn mem_node(id: u64, voters: &[u64]) -> RawNode<RaftStorage> {
    let mut store = RaftStorage::default();
    store.set_conf_state(ConfState {
        voters: voters.to_vec(),
        ..Default::default()
    });
    let cfg = raft::Config {
        id,
        election_tick: 10,
        heartbeat_tick: 1,
        ..Default::default()
    };
    RawNode::new(&cfg, store, &discard()).unwrap()
}

fn batcher(id: u64, nonce: u64) -> ReadBatcher {
    ReadBatcher::new(id, nonce)
}

/// Runs Ready rounds and delivers messages until all `nodes` are quiet. Read states go to
/// each node's batcher, and are also returned (by node id) as they came.
fn pump(nodes: &mut BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)>) -> Vec<(u64, ReadState)> {
    let mut seen = Vec::new();
    loop {
        let mut msgs = Vec::new();
        for (id, (n, b)) in nodes.iter_mut() {
            if !n.has_ready() {
                continue;
            }
            let mut rd = n.ready();
            msgs.extend(rd.take_messages());
            let store = n.mut_store();
            store.append(rd.entries()).unwrap();
            if let Some(hs) = rd.hs() {
                store.set_hard_state(hs.clone());
            }
            msgs.extend(rd.take_persisted_messages());
            let states = rd.take_read_states();
            seen.extend(states.iter().map(|s| (*id, s.clone())));
            b.resolve(states, &n.raft);
            let mut light = n.advance(rd);
            msgs.extend(light.take_messages());
            if let Some(c) = light.commit_index() {
                n.mut_store().set_commit(c);
            }
            n.advance_apply();
        }
        if msgs.is_empty() {
            return seen;
        }
        for m in msgs {
            if let Some((n, _)) = nodes.get_mut(&m.to) {
                let _ = n.step(m);
            }
        }
    }
}

/// Three nodes with node 1 elected and its first entry committed everywhere.
fn elected(nonce: u64) -> BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)> {
    let mut nodes: BTreeMap<_, _> = [1, 2, 3]
        .into_iter()
        .map(|id| (id, (mem_node(id, &[1, 2, 3]), batcher(id, nonce))))
        .collect();
    nodes.get_mut(&1).unwrap().0.campaign().unwrap();
    pump(&mut nodes);
    assert_eq!(nodes[&1].0.raft.state, StateRole::Leader);
    assert!(nodes.values().all(|(n, _)| n.raft.leader_id == 1));
    nodes
}

fn read_on(
    nodes: &mut BTreeMap<u64, (RawNode<RaftStorage>, ReadBatcher)>,
    id: u64,
) -> oneshot::Receiver<Result<u64, ReadError>> {
    let (tx, rx) = oneshot::channel();
    let (n, b) = nodes.get_mut(&id).unwrap();
    b.queued.push(tx);
    b.flush(n);
    rx
}

/// Two followers that issue their first ReadIndex round at the same moment are both
/// answered by the leader's one heartbeat exchange: their contexts differ (raft-rs drops a
/// request whose context is already pending, which left one of them waiting for the retry).
#[test]
fn reads_of_two_followers_do_not_collide() {
    // Same nonce on purpose: the node id alone keeps contexts apart.
    let mut nodes = elected(7);
    let mut r2 = read_on(&mut nodes, 2);
    let mut r3 = read_on(&mut nodes, 3);
    let mut r1 = read_on(&mut nodes, 1);
    pump(&mut nodes);
    let commit = nodes[&1].0.raft.raft_log.committed;
    assert_eq!(r2.try_recv().ok(), Some(Ok(commit)), "node 2's read");
    assert_eq!(r3.try_recv().ok(), Some(Ok(commit)), "node 3's read");
    assert_eq!(r1.try_recv().ok(), Some(Ok(commit)), "the leader's read");
}

/// An answer to a read of a previous incarnation of this node (same id, another boot)
/// resolves nothing of the current one, which is answered by its own round.
#[test]
fn answers_for_a_previous_boot_are_ignored() {
    let mut nodes = elected(1);
    let _old = read_on(&mut nodes, 2);
    let states = pump(&mut nodes);
    let old: Vec<ReadState> = states
        .into_iter()
        .filter(|(id, _)| *id == 2)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(old.len(), 1, "the old incarnation's read was answered");
    // Node 2 restarts (a new boot nonce) and issues its first round; the old answer is
    // delivered late.
    nodes.get_mut(&2).unwrap().1 = batcher(2, 2);
    let mut fresh = read_on(&mut nodes, 2);
    let n2 = nodes.get_mut(&2).unwrap();
    n2.1.resolve(old, &n2.0.raft);
    assert!(
        fresh.try_recv().is_err(),
        "a read of this boot took an answer meant for the previous one"
    );
    pump(&mut nodes);
    let commit = nodes[&1].0.raft.raft_log.committed;
    assert_eq!(fresh.try_recv().ok(), Some(Ok(commit)));
}

/// A freshly bootstrapped node 1 of `n` (nothing is sent anywhere: outputs stay in the
/// node).
fn bootstrapped(dir: &std::path::Path, n: u64) -> Node {
    use clap::Parser as _;
    let cluster: Vec<String> = (1..=n).map(|i| format!("http://127.0.0.1:{i}")).collect();
    let cfg = crate::Config::parse_from([
        "raftexample",
        "--cluster",
        &cluster.join(","),
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let boot = Boot::from_config(&cfg, 1, Default::default()).unwrap();
    recover(&boot, &discard()).unwrap().node
}

/// A snapshot installed from the leader is not kept in memory (a joining node held a whole
/// large map twice): the storage keeps its metadata and serves it from the file the WAL
/// writer saves, and the map is then offered that file in place of the copy received.
#[test]
fn installed_snapshot_is_not_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = bootstrapped(dir.path(), 1);
    let members: BTreeMap<u64, String> = [(1, "http://127.0.0.1:1".to_string())].into();
    let kv = crate::kvstore::Captured(crate::kvstore::Map::new());
    let mut data = data_header(&members, &BTreeSet::new(), kv.encoded_len());
    kv.write_to(&mut data).unwrap();
    let mut snap = Snapshot {
        data: data.into(),
        ..Default::default()
    };
    snap.mut_metadata().index = 10;
    snap.mut_metadata().term = 2;
    snap.mut_metadata().mut_conf_state().voters = vec![1];
    let saved = snap.clone();
    node.install_snapshot(snap).unwrap();
    let kept = node.raft.store().last_snapshot();
    assert_eq!(kept.get_metadata().index, 10);
    assert!(kept.data.is_empty(), "{} bytes kept", kept.data.len());
    // Once the writer has saved it, the map is offered the file's copy of its bytes.
    node.snapshotter.save(&saved).unwrap();
    node.adopt_snapshot_file(2, 10);
    match node.out.applies.last() {
        Some(Apply::SnapshotFile {
            index: 10, data, ..
        }) => {
            assert_eq!(data, &crate::kvstore::encode(&crate::kvstore::Map::new()))
        }
        _ => panic!("no SnapshotFile offered"),
    }
}

/// Holds `n` PUTs of `size`-byte values, ids 0..n, as proposers would.
fn hold_puts(node: &mut Node, n: u64, size: usize) {
    let value = vec![7u8; size];
    for id in 0..n {
        let data = crate::kvstore::Put {
            id,
            key: b"/k",
            value: &value,
        }
        .encode();
        node.held.push(crate::channels::Proposal { id, data });
    }
}

fn put_entry(index: u64, id: u64) -> Entry {
    Entry {
        term: 1,
        index,
        data: crate::kvstore::Put {
            id,
            key: b"/k",
            value: b"v",
        }
        .encode()
        .into(),
        ..Default::default()
    }
}

/// A node that applies its own removal stops there, and publishes that index as applied,
/// not the index of the entries after it that it did not apply: a linearizable read
/// served meanwhile would take their absence for the current state.
#[test]
fn own_removal_publishes_the_index_it_stopped_at() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = bootstrapped(dir.path(), 2);
    assert_eq!(node.applied, 2);
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::RemoveNode);
    cc.node_id = 1;
    let entries = vec![put_entry(3, 7), conf_change_entry(&cc, 4), put_entry(5, 8)];
    node.apply_committed(entries);
    assert_eq!(node.exit, Some(Exit::Removed));
    match node.take_output().applies.pop() {
        Some(Apply::Entries { index, data, .. }) => {
            assert_eq!(data.len(), 1, "only the PUT before the removal applies");
            assert_eq!(index, 4, "published index");
        }
        other => panic!("expected entries, got {other:?}"),
    }
    assert_eq!(node.applied, 4);
    let mut st = crate::channels::NodeStatus::default();
    node.status(&mut st);
    assert_eq!(st.applied, 4);
}

/// A follower forwards what it holds to the leader in messages of at most
/// [`PROPOSE_BYTES`] (one entry larger than that goes alone), every PUT once and in
/// order: one message of everything would exceed what the leader's stream accepts in one
/// frame, and the leader would close the stream and lose them all.
#[test]
fn forwarded_proposals_are_split_into_bounded_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = bootstrapped(dir.path(), 2);
    // Node 2 leads at term 2.
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    (hb.from, hb.to, hb.term, hb.commit) = (2, 1, 2, 2);
    node.step(hb);
    assert_eq!(node.raft.raft.leader_id, 2);
    hold_puts(&mut node, 24, 200 << 10);
    node.held.forwarded([put_entry(0, 99)]);
    assert!(
        node.held.propose(&mut node.raft).is_none(),
        "nothing dropped"
    );
    let mut rd = node.raft.ready();
    let mut msgs = rd.take_messages();
    msgs.extend(rd.take_persisted_messages());
    let proposals: Vec<&Message> = msgs
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgPropose)
        .collect();
    assert!(proposals.len() > 1, "one message of ~5 MB");
    for m in &proposals {
        assert_eq!(m.to, 2);
        let size = m.compute_size() as usize;
        assert!(size <= PROPOSE_BYTES + 64, "a message of {size} bytes");
    }
    let mut got: Vec<u64> = Vec::new();
    for e in proposals.iter().flat_map(|m| m.entries.iter()) {
        let puts = crate::kvstore::decode_puts(&e.data).unwrap();
        assert!(puts
            .iter()
            .all(|p| p.value.len() == 200 << 10 || p.id == 99));
        got.extend(puts.iter().map(|p| p.id));
    }
    // The forwarded entry goes with the entries sealed before it.
    let mut want: Vec<u64> = (0..23).collect();
    want.extend([99, 23]);
    assert_eq!(got, want, "every PUT arrives once, in order");
}

/// Proposals raft refuses (no leader known) are all reported, by id, in every message.
#[test]
fn refused_proposals_are_reported_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = bootstrapped(dir.path(), 2);
    hold_puts(&mut node, 24, 200 << 10);
    match node.held.propose(&mut node.raft) {
        Some(Apply::Dropped { ids, .. }) => assert_eq!(ids, (0..24).collect::<Vec<_>>()),
        other => panic!("expected a drop report, got {other:?}"),
    }
}

fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    (m.from, m.to, m.term, m.commit) = (from, to, term, commit);
    m
}

/// Steps `m` into `n` as the raft task does: only if it passes the check.
fn step_checked(n: &mut RawNode<RaftStorage>, mut m: Message) -> bool {
    let ok = check_peer_message(&n.raft, &mut m).is_ok();
    if ok {
        let _ = n.step(m);
    }
    ok
}

/// No peer input panics raft (each of these did, in raft-rs): a heartbeat claiming a commit
/// index beyond this node's log ("to_commit out of range"), from a member or from an id
/// that is no member; a ReadIndex request without its context (an index out of bounds);
/// an append whose entries do not follow its index ("conflict with committed entry").
/// Well-formed messages still pass, and the cluster keeps working.
#[test]
fn peer_input_cannot_panic_raft() {
    let mut nodes = elected(1);
    let (term, committed) = (nodes[&2].0.raft.term, nodes[&2].0.raft.raft_log.committed);
    let f = &mut nodes.get_mut(&2).unwrap().0;
    step_checked(f, heartbeat(99, 2, term, 1_000_000));
    step_checked(f, heartbeat(1, 2, term, 1_000_000));
    assert_eq!(f.raft.raft_log.committed, committed);
    let mut app = Message::default();
    app.set_msg_type(MessageType::MsgAppend);
    (app.from, app.to, app.term) = (1, 2, term);
    (app.index, app.log_term) = (committed, term);
    app.entries = vec![Entry {
        index: 1,
        term: term + 1,
        ..Default::default()
    }]
    .into();
    assert!(!step_checked(f, app));
    let l = &mut nodes.get_mut(&1).unwrap().0;
    let mut read = Message::default();
    read.set_msg_type(MessageType::MsgReadIndex);
    (read.from, read.to, read.term) = (2, 1, term);
    assert!(!step_checked(l, read));
    assert!(
        step_checked(l, heartbeat(2, 1, 0, 0)),
        "a harmless message passes"
    );
    pump(&mut nodes);
    let mut r = read_on(&mut nodes, 3);
    pump(&mut nodes);
    assert!(
        matches!(r.try_recv(), Ok(Ok(_))),
        "the cluster still answers reads"
    );
}

/// A node whose newest snapshot (one it installed from the leader, so its WAL holds no entries
/// up to it) is damaged refuses to start with a message naming its directories: the older
/// snapshot and the log after it do not reach the durable commit. raft-rs panicked instead
/// ("hs.commit 36 is out of range"); the simulator found it (seed 885).
#[test]
fn damaged_installed_snapshot_is_a_refusal_not_a_panic() {
    use crate::wal::{Wal, WalOptions, WalSnapshot};
    let dir = tempfile::tempdir().unwrap();
    drop(bootstrapped(dir.path(), 1));
    use clap::Parser as _;
    let cfg = crate::Config::parse_from([
        "raftexample",
        "--cluster",
        "http://127.0.0.1:1",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    let members: BTreeMap<u64, String> = [(1, "http://127.0.0.1:1".to_string())].into();
    let kv = crate::kvstore::Captured(crate::kvstore::Map::new());
    let snap_at = |index: u64| {
        let mut data = data_header(&members, &BTreeSet::new(), kv.encoded_len());
        kv.write_to(&mut data).unwrap();
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        (snap.mut_metadata().index, snap.mut_metadata().term) = (index, 1);
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        snap
    };
    let snapshotter =
        crate::snap::Snapshotter::new(&cfg.disk, &cfg.snap_dir(), &discard()).unwrap();
    snapshotter.save(&snap_at(18)).unwrap();
    let newest = snapshotter.save(&snap_at(36)).unwrap();
    let (mut wal, _) = Wal::open(&cfg.wal_dir(), WalOptions::default(), &discard()).unwrap();
    let ents: Vec<Entry> = (2..=22)
        .map(|index| Entry {
            index,
            term: 1,
            ..Default::default()
        })
        .collect();
    wal.save(&ents, None, true).unwrap();
    wal.save_snapshot(&WalSnapshot { index: 18, term: 1 })
        .unwrap();
    wal.save_snapshot(&WalSnapshot { index: 36, term: 1 })
        .unwrap();
    let hs = HardState {
        term: 1,
        commit: 36,
        ..Default::default()
    };
    wal.save(&[], Some(&hs), true).unwrap();
    wal.close().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&newest, bytes).unwrap();

    let boot = Boot::from_config(&cfg, 2, Default::default()).unwrap();
    let err = recover(&boot, &discard()).err().expect("a refusal");
    let msg = err.to_string();
    assert!(
        msg.contains("commits index 36") && msg.contains("end at index 22"),
        "{msg}"
    );
}
