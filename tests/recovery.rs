//! Restart and catch-up: a node rebuilt from its snapshot and WAL, and a follower that was down
//! while the leader compacted its log past it.

mod support;

use std::time::Duration;

use support::*;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(20);
const SMALL_SNAPSHOTS: &[&str] = &["--snapshot-count", "5", "--snapshot-catchup-entries", "2"];

/// A node restarted on its data dir recovers every acknowledged write from the newest
/// snapshot plus the WAL after it, twice in a row (the second restart starts from a snapshot
/// the first restart took).
#[tokio::test(flavor = "multi_thread")]
async fn restart_from_wal_and_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = http();
    let (mut ls, cluster) = peer_listeners(1).await;
    let addr = ls[0].local_addr().expect("bound");
    let cfg = config(1, &cluster, dir.path(), SMALL_SNAPSHOTS);
    let mut node = KvTestNode::start(cfg.clone(), ls.remove(0)).await;
    let mut written = 0;
    for round in 0..2 {
        for i in written..written + 23 {
            let key = format!("/key-{i}");
            let value = format!("value-{i}-\u{00ff}");
            assert!(
                wait_until(T, || async {
                    put(&c, &node.client, &key, value.as_bytes()).await == 204
                })
                .await,
                "PUT {key} in round {round}"
            );
        }
        written += 23;
        node.shutdown().await;
        let snaps = std::fs::read_dir(cfg.snap_dir()).expect("snap dir").count();
        assert!(snaps > 0, "no snapshot was taken");

        let peer = TcpListener::bind(addr).await.expect("rebind the peer port");
        node = KvTestNode::start(cfg.clone(), peer).await;
        for i in 0..written {
            let url = format!("{}/key-{i}", node.client);
            let want = format!("value-{i}-\u{00ff}").into_bytes();
            assert!(
                wait_until(T, || async { get(&c, &url).await == (200, want.clone()) }).await,
                "key-{i} lost after restart {round}"
            );
        }
    }
    node.shutdown().await;
}

/// A follower that was down while the leader took snapshots and compacted its log beyond the
/// follower's last entry catches up (raft can only send it a snapshot) and serves every write.
#[tokio::test(flavor = "multi_thread")]
async fn follower_behind_compaction_catches_up_by_snapshot() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let c = http();
    let (ls, cluster) = peer_listeners(3).await;
    let addr3 = ls[2].local_addr().expect("bound");
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        nodes.push(
            KvTestNode::start(
                config(i as u64 + 1, &cluster, dirs[i].path(), SMALL_SNAPSHOTS),
                l,
            )
            .await,
        );
    }
    assert!(
        wait_until(T, || async {
            put(&c, &nodes[0].client, "/first", b"1").await == 204
        })
        .await
    );
    let third = nodes.pop().expect("three nodes");
    third.shutdown().await;

    for i in 0..40 {
        let key = format!("/k{i}");
        assert!(
            wait_until(T, || async {
                put(&c, &nodes[0].client, &key, b"v").await == 204
            })
            .await,
            "PUT {key} with one node down"
        );
    }
    assert!(
        wait_until(T, || async {
            put(&c, &nodes[1].client, "/last", b"done").await == 204
        })
        .await
    );

    let cfg3 = config(3, &cluster, dirs[2].path(), SMALL_SNAPSHOTS);
    let peer = TcpListener::bind(addr3)
        .await
        .expect("rebind node 3's peer port");
    let third = KvTestNode::start(cfg3, peer).await;
    let url = format!("{}/last?consistency=serializable", third.client);
    assert!(
        wait_until(T, || async {
            get(&c, &url).await == (200, b"done".to_vec())
        })
        .await,
        "node 3 never caught up"
    );
    for i in 0..40 {
        let url = format!("{}/k{i}?consistency=serializable", third.client);
        assert_eq!(
            get(&c, &url).await,
            (200, b"v".to_vec()),
            "k{i} missing on node 3"
        );
    }
    third.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}
