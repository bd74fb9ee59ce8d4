//! Unit tests of the read path across three whole node cores: how a follower's linearizable
//! read travels (no tick, no disk) and how the leader batches followers' requests.

use std::collections::BTreeMap;

use raft::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::wal::writer::Job;

fn discard() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Member `id` of a new 3-node cluster, bootstrapped in `dir`.
fn member(dir: &std::path::Path, id: u64) -> Node {
    use clap::Parser as _;
    let cfg = crate::Config::parse_from([
        "raftexample",
        "--id",
        &id.to_string(),
        "--cluster",
        "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let boot = Boot::from_config(&cfg, id, Default::default()).unwrap();
    recover(&boot, &discard()).unwrap().node
}

/// Runs the cores as their shells would, with no tick, until nothing moves: messages are
/// delivered at once, and the WAL writer's jobs finish at once unless `disk_stalled`, when
/// they never do (and nothing they hold is released).
fn run_cores(nodes: &mut BTreeMap<u64, Node>, disk_stalled: bool) {
    loop {
        let mut msgs = Vec::new();
        for node in nodes.values_mut() {
            node.process().unwrap();
            let out = node.take_output();
            msgs.extend(out.messages);
            for job in out.jobs {
                if let (
                    Job::Append {
                        number, messages, ..
                    },
                    false,
                ) = (job, disk_stalled)
                {
                    node.persisted(crate::wal::writer::Persisted { number, messages });
                }
            }
            msgs.extend(node.take_output().messages);
        }
        if msgs.is_empty() && !nodes.values().any(|n| n.has_ready()) {
            return;
        }
        for m in msgs {
            nodes.get_mut(&m.to).unwrap().step(m);
        }
    }
}

fn read_rx(node: &mut Node) -> oneshot::Receiver<Result<u64, ReadError>> {
    let (tx, rx) = oneshot::channel();
    node.read(tx);
    rx
}

/// A follower's linearizable read is answered after one exchange with the leader (request,
/// the leader's heartbeats and their responses, the answer) with no tick and without its
/// WAL writer: neither the ReadIndex request nor the heartbeat responses queue behind the
/// disk. Through the writer, a follower's reads paid two thread hand-offs a round and
/// waited behind its fsyncs. And a read arriving while a round is out gets a second round at
/// once rather than waiting for the first to come back. The leader serves the followers'
/// requests with one round of its own, not one heartbeat broadcast each.
#[test]
fn follower_reads_need_neither_tick_nor_disk() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: BTreeMap<u64, Node> = (1..=3)
        .map(|id| (id, member(dirs[id as usize - 1].path(), id)))
        .collect();
    nodes.get_mut(&1).unwrap().raft.campaign().unwrap();
    run_cores(&mut nodes, false);
    assert!(nodes[&1].is_leader());
    let commit = nodes[&1].commit();
    assert!(commit > 0 && nodes.values().all(|n| n.leader() == 1));

    let f = nodes.get_mut(&2).unwrap();
    let mut first = read_rx(f);
    f.process().unwrap();
    let mut second = read_rx(f);
    f.process().unwrap();
    let sent = f.take_output().messages;
    let requests = sent
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgReadIndex)
        .count();
    assert_eq!(
        requests, 2,
        "each read must send its own ReadIndex request at once, not via the writer"
    );
    let f3 = nodes.get_mut(&3).unwrap();
    let mut third = read_rx(f3);
    f3.process().unwrap();
    let sent = sent.into_iter().chain(f3.take_output().messages);
    // The leader answers all three requests with one heartbeat broadcast, its own round.
    let leader = nodes.get_mut(&1).unwrap();
    sent.for_each(|m| leader.step(m));
    leader.process().unwrap();
    let out = leader.take_output().messages;
    let beats = out
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgHeartbeat);
    assert_eq!(
        beats.count(),
        2,
        "one heartbeat per follower for the three requests"
    );
    for m in out {
        nodes.get_mut(&m.to).unwrap().step(m);
    }
    run_cores(&mut nodes, true);
    for (name, rx) in [
        ("2's first", &mut first),
        ("2's second", &mut second),
        ("3's", &mut third),
    ] {
        assert_eq!(rx.try_recv().ok(), Some(Ok(commit)), "node {name} read");
    }
}
