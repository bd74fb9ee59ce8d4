//! raftexample's raft_test.go and kvstore tests, ported: nodes are driven through their channels
//! (proposals in, committed batches out) in this process, on loopback ports.

mod support;

use std::time::Duration;

use raft::prelude::{ConfChange, ConfChangeType};
use raftexample::channels::ConfChangeRequest;
use raftexample::Exit;
use support::*;
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(20);

async fn raw_cluster(
    n: usize,
    extra: &[&str],
) -> (Vec<RawTestNode>, Vec<tempfile::TempDir>, String) {
    let (ls, cluster) = peer_listeners(n).await;
    let dirs: Vec<_> = (0..n)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let nodes = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| RawTestNode::start(config(i as u64 + 1, &cluster, dirs[i].path(), extra), l))
        .collect();
    (nodes, dirs, cluster)
}

/// Every node of a 3-node cluster feeds each committed entry back as a new proposal until it has
/// seen 100 committed batches: proposals are accepted from every node (followers forward them)
/// and keep committing while the commit channel is busy.
#[tokio::test(flavor = "multi_thread")]
async fn propose_on_commit() {
    let (nodes, _dirs, _) = raw_cluster(3, &[]).await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(3);
    let mut stops = Vec::new();
    for mut node in nodes {
        stops.push(node.stop.clone());
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            // Raft drops proposals while no leader is known.
            assert!(
                wait_until(T, || async { node.knows_leader() }).await,
                "no leader to take the first proposal"
            );
            node.propose(0, b"foo").await;
            let mut batches = 0;
            while let Some(apply) = node.handle.commit_rx.recv().await {
                let (data, applied) = match apply {
                    raftexample::kvstore::Apply::Entries { data, applied, .. } => (data, applied),
                    // Dropped by a leader change in between: again.
                    raftexample::kvstore::Apply::Dropped { .. } if batches == 0 => {
                        node.propose(0, b"foo").await;
                        continue;
                    }
                    _ => continue,
                };
                if batches < 100 && !data.is_empty() {
                    batches += 1;
                    // Feed the data back from the commit consumer itself, without waiting:
                    // raft may be busy handing us the next batch, so a blocking send could
                    // deadlock, which is what this test is about. What does not fit in the
                    // proposal queue is dropped, as raft may drop some during an election: the
                    // loop only needs commits to keep flowing, not an ever-growing backlog.
                    let tx = node.propose_tx.as_ref().expect("proposer open");
                    for d in data {
                        let p = raftexample::kvstore::Proposal {
                            id: 0,
                            data: d.to_vec(),
                        };
                        if tx.try_send(p).is_err() {
                            break;
                        }
                    }
                    if batches == 100 {
                        let _ = done_tx.send(()).await;
                    }
                }
                // Like raftexample's test, keep draining after 100 so that this node's raft
                // loop never blocks the others.
                let _ = applied.send(());
            }
        });
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .expect("every node sees 100 committed batches within 60 s")
            .expect("node task alive");
    }
    for s in stops {
        s.cancel();
    }
}

/// Closing the proposal channel right after start (before any replay finished) stops the node
/// cleanly: the error channel yields no error.
#[tokio::test(flavor = "multi_thread")]
async fn close_proposer_before_replay() {
    let (mut nodes, _dirs, _) = raw_cluster(1, &[]).await;
    let mut node = nodes.remove(0);
    node.propose_tx = None;
    let res = tokio::time::timeout(T, &mut node.handle.error_rx)
        .await
        .expect("stops within 20 s")
        .expect("raft task reports");
    assert_eq!(res.expect("no error"), Exit::Shutdown);
}

/// Closing the proposal channel while proposals are in flight: both commit, in order, then
/// the node stops cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn close_proposer_inflight() {
    let (mut nodes, _dirs, _) = raw_cluster(1, &[]).await;
    let mut node = nodes.remove(0);
    assert!(wait_until(T, || async { node.knows_leader() }).await);
    node.propose(1, b"foo").await;
    node.propose(2, b"bar").await;
    // Raft may pack both into one entry (proposals are self-delimiting encoded PUTs).
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let (_, data, applied) = tokio::time::timeout(T, node.next_entries())
            .await
            .expect("commit");
        seen.extend(data.concat());
        let _ = applied.send(());
    }
    assert_eq!(seen, b"foobar");
    node.propose_tx = None;
    let res = tokio::time::timeout(T, &mut node.handle.error_rx)
        .await
        .expect("stops within 20 s")
        .expect("raft task reports");
    assert_eq!(res.expect("no error"), Exit::Shutdown);
}

/// A PUT on the client API of a single node is readable with a GET (the whole process in one).
#[tokio::test(flavor = "multi_thread")]
async fn put_and_get_key_value() {
    let (mut ls, cluster) = peer_listeners(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let node = KvTestNode::start(config(1, &cluster, dir.path(), &[]), ls.remove(0)).await;
    let c = http();
    assert!(
        wait_until(T, || async {
            put(&c, &node.client, "/test-key", b"test-value").await == 204
        })
        .await
    );
    assert_eq!(
        get(&c, &format!("{}/test-key", node.client)).await,
        (200, b"test-value".to_vec())
    );
    node.shutdown().await;
}

/// A 4th node added with a conf change and started with `join` learns the cluster from the
/// log and its proposal commits on node 1. (raftexample adds a voter with AddNode; here a new
/// member is added as a learner, AddLearnerNode, and AddNode is only the promotion of one.)
#[tokio::test(flavor = "multi_thread")]
async fn add_new_node() {
    let (ls, cluster) = peer_listeners(4).await;
    let mut ls = ls.into_iter();
    let urls: Vec<&str> = cluster.split(',').collect();
    let three = urls[..3].join(",");
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let mut nodes: Vec<RawTestNode> = (0..3)
        .map(|i| {
            RawTestNode::start(
                config(i as u64 + 1, &three, dirs[i].path(), &[]),
                ls.next().expect("listener"),
            )
        })
        .collect();
    let cc_txs: Vec<_> = nodes.iter().map(|n| n.conf_change_tx.clone()).collect();
    // Drain nodes 2 and 3 so their raft loops never block on the commit channel.
    for mut n in nodes.drain(1..) {
        tokio::spawn(async move {
            while let Some(a) = n.handle.commit_rx.recv().await {
                if let raftexample::kvstore::Apply::Entries { applied, .. } = a {
                    let _ = applied.send(());
                }
            }
            drop(n);
        });
    }
    let mut n1 = nodes.remove(0);

    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddLearnerNode);
    cc.node_id = 4;
    cc.id = 42;
    cc.context = urls[3].as_bytes().to_vec().into();
    // Only the leader takes membership changes (the client API forwards to it); ask each
    // node in turn until the leader has applied it.
    let added = wait_until(T, || {
        let cc = cc.clone();
        let txs = cc_txs.clone();
        async move {
            for tx in txs {
                let (done, rx) = oneshot::channel();
                let req = ConfChangeRequest {
                    cc: cc.clone(),
                    done,
                };
                tx.send(req).await.expect("raft running");
                if matches!(rx.await, Ok(Ok(()))) {
                    return true;
                }
            }
            false
        }
    });
    // Node 1 must keep consuming its commits while the change is applied.
    let drain = async {
        loop {
            let (_, _, applied) = n1.next_entries().await;
            let _ = applied.send(());
        }
    };
    let added = tokio::select! { a = added => a, _ = drain => unreachable!() };
    assert!(added, "AddLearnerNode 4 not applied");

    let n4 = RawTestNode::start(
        config(4, &cluster, dirs[3].path(), &["--join"]),
        ls.next().expect("listener"),
    );
    assert!(
        wait_until(T, || async { n4.knows_leader() }).await,
        "node 4 never found the leader"
    );
    n4.propose(1, b"foo").await;
    let found = tokio::time::timeout(T, async {
        loop {
            let (_, data, applied) = n1.next_entries().await;
            let _ = applied.send(());
            if data.iter().any(|d| d == b"foo") {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "node 4's proposal never committed on node 1");
    n4.stop.cancel();
    n1.stop.cancel();
}

/// A snapshot waits for the application's apply signal: raft must not capture the state before
/// the batch that crosses the snapshot threshold is applied.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot() {
    let (mut nodes, _dirs, _) = raw_cluster(
        3,
        &["--snapshot-count", "4", "--snapshot-catchup-entries", "4"],
    )
    .await;
    for mut n in nodes.drain(1..) {
        tokio::spawn(async move {
            while let Some(a) = n.handle.commit_rx.recv().await {
                if let raftexample::kvstore::Apply::Entries { applied, .. } = a {
                    let _ = applied.send(());
                }
            }
            drop(n);
        });
    }
    let mut n1 = nodes.remove(0);
    // A single node leads once its election timeout passes; raft drops proposals before.
    assert!(
        wait_until(T, || async { n1.knows_leader() }).await,
        "no leader"
    );
    n1.propose(0, b"foo").await;
    // Bootstrap applied 3 entries; the first batch past index 3 + 4 = ... crosses the
    // threshold of 4 entries since the (empty) last snapshot at index 0.
    let (index, applied) = tokio::time::timeout(T, async {
        loop {
            let (index, _, applied) = n1.next_entries().await;
            if index > 4 {
                return (index, applied);
            }
            let _ = applied.send(());
        }
    })
    .await
    .expect("a batch past index 4");
    assert!(
        n1.snap_files().is_empty(),
        "snapshot taken before batch {index} was applied: {:?}",
        n1.snap_files()
    );
    applied.send(()).expect("raft waits for the signal");
    assert!(
        wait_until(T, || async { !n1.snap_files().is_empty() }).await,
        "no snapshot after the apply signal"
    );
    n1.stop.cancel();
}

/// A snapshot source whose write fails if `fail`, as a full disk would fail the snapshot thread.
struct Flaky {
    inner: raftexample::kvstore::Captured,
    fail: bool,
}

impl raftexample::channels::SnapshotSource for Flaky {
    fn encoded_len(&self) -> u64 {
        self.inner.encoded_len()
    }

    fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        if self.fail {
            return Err(std::io::Error::other("simulated snapshot write failure"));
        }
        self.inner.write_to(w)
    }
}

/// Issue 13 item 2: a local snapshot that cannot be written holds nothing acknowledged (the WAL
/// has it all), so the node logs it and tries again at a later trigger instead of stopping.
#[tokio::test(flavor = "multi_thread")]
async fn failed_snapshot_write_is_retried_not_fatal() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let (mut ls, cluster) = peer_listeners(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = config(
        1,
        &cluster,
        dir.path(),
        &["--snapshot-count", "4", "--snapshot-catchup-entries", "2"],
    );
    let captures = Arc::new(AtomicUsize::new(0));
    let counted = captures.clone();
    let mut node = RawTestNode::start_with_snapshots(
        cfg,
        ls.remove(0),
        Box::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            Box::new(Flaky {
                inner: raftexample::kvstore::Captured(raftexample::kvstore::Map::new()),
                fail: n == 0,
            })
        }),
    );
    assert!(
        wait_until(T, || async { node.knows_leader() }).await,
        "no leader"
    );
    let tx = node.propose_tx.clone().expect("proposer open");
    let retried = tokio::time::timeout(T, async {
        for id in 0..1000u64 {
            if captures.load(Ordering::SeqCst) >= 2 && !node.snap_files().is_empty() {
                return true;
            }
            let p = raftexample::kvstore::Proposal {
                id,
                data: b"foo".to_vec(),
            };
            if tx.send(p).await.is_err() {
                return false;
            }
            loop {
                match node.handle.commit_rx.recv().await {
                    Some(raftexample::kvstore::Apply::Entries { applied, .. }) => {
                        let _ = applied.send(());
                        break;
                    }
                    Some(_) => {}
                    None => return false,
                }
            }
        }
        false
    })
    .await;
    if let Ok(res) = node.handle.error_rx.try_recv() {
        panic!("the node stopped after a failed snapshot write: {res:?}");
    }
    assert_eq!(
        retried,
        Ok(true),
        "no snapshot after the failed one (captures: {})",
        captures.load(Ordering::SeqCst)
    );
    node.stop.cancel();
}
