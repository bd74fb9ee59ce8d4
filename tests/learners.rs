//! Membership changes that cannot take the cluster down (issue 16), on clusters of the real
//! binary: `POST /<id>` adds a raft learner that the leader promotes once it has caught up;
//! `?learner=true` keeps it a read replica until `POST /<id>/promote`; a removal that would
//! leave the reachable voters short of a quorum gets 409; learners survive snapshots and
//! restarts; and adding and removing members under load keeps the history linearizable.

#[path = "common/linearizability.rs"]
mod checker;
mod common;
#[path = "common/history.rs"]
mod history;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{
    client_request, delete_member, files_ending_with, id_list, member_ids, peer_get, poll_until,
    pooled_client, post_member, put, seed, serves, status, try_get_serializable_with, wait_until,
    wait_voters, Cluster, Rng, StatusCode, TIMEOUT,
};
use history::{check_or_dump, client, final_reads, Counts, HistoryLoad};
use reqwest::Method;

const FAST: &[&str] = &["--request-timeout-ms", "2000"];

/// `method path` with `body` on a client port: status and body text.
async fn send(port: u16, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let client = pooled_client();
    let (status, _, body) = client_request(&client, port, method.clone(), path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of an unlabelled counter on a node's `/metrics`.
async fn counter(peer_url: &str, name: &str) -> u64 {
    let (_, text) = peer_get(peer_url, "/metrics").await.expect("GET /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}"))
}

const PROMOTIONS: &str = "raftexample_learner_promotions_total";

/// Lines of `log` that say member `id` was added (a learner add, or a promotion).
fn adds_of(log: &str, id: u64) -> usize {
    log.lines()
        .filter(|l| l.contains("member added") || l.contains("learner promoted to voter"))
        .filter(|l| l.contains(&format!("node: {id}")))
        .count()
}

/// The session: a single node, `POST /2` (node 2 not started yet) answers 204 and node
/// 2 is a learner, so node 1 alone still takes PUTs and serves GETs (before, node 2 was a
/// voter at once and the cluster stopped). Node 2 started with `--join` catches up and the
/// leader promotes it by itself: both list voters [1, 2], the promotion is counted, it
/// happened once, and the two-voter cluster takes writes on either node.
#[tokio::test(flavor = "multi_thread")]
async fn added_member_is_a_learner_until_it_has_caught_up() {
    let mut cluster = Cluster::start_with(1, FAST);
    cluster.wait_leader().await;
    let p1 = cluster.node(1).client_port;
    let id = cluster.add_node();
    let url2 = cluster.node(id).peer_url.clone();
    assert_eq!(post_member(p1, 2, &url2).await, StatusCode::NO_CONTENT);
    let peer1 = cluster.node(1).peer_url.clone();
    let st = status(&peer1).await.expect("status");
    assert_eq!(
        (id_list(&st, "voters"), id_list(&st, "learners")),
        (vec![1], vec![2]),
        "{st}"
    );
    assert_eq!(member_ids(&st), [1, 2], "{st}");
    assert_eq!(put(p1, "/k", "b").await, StatusCode::NO_CONTENT);
    assert!(serves(p1, "/k", "b").await, "linearizable GET on node 1");
    let http = pooled_client();
    let (code, body) = try_get_serializable_with(&http, p1, "/k")
        .await
        .expect("serializable GET");
    assert_eq!((code, &body[..]), (StatusCode::OK, &b"b"[..]));
    assert_eq!(counter(&peer1, PROMOTIONS).await, 0);

    let started = std::time::Instant::now();
    cluster.node_mut(2).start_join();
    wait_voters(&peer1, &[1, 2], &[]).await;
    eprintln!("node 2 a voter {:?} after its start", started.elapsed());
    wait_voters(&url2, &[1, 2], &[]).await;
    assert_eq!(counter(&peer1, PROMOTIONS).await, 1);
    let p2 = cluster.node(2).client_port;
    assert_eq!(put(p2, "/k", "c").await, StatusCode::NO_CONTENT);
    assert_eq!(put(p1, "/k2", "d").await, StatusCode::NO_CONTENT);
    wait_until(TIMEOUT, "node 2 serves /k2", || serves(p2, "/k2", "d")).await;
    let log = cluster.node(1).log();
    assert_eq!(
        adds_of(&log, 2),
        2,
        "added as a learner, then promoted:\n{log}"
    );
    assert_eq!(
        log.matches("promoting caught-up learner").count(),
        1,
        "{log}"
    );
}

/// `POST /2?learner=true` adds a read replica: it installs a snapshot from the leader (whose
/// payload carries the read replicas: node 2 reports itself as one), serves linearizable and
/// serializable GETs, and stays a learner after catching up (20 leader ticks); promoting it
/// before it runs is refused (409). Node 1,
/// SIGKILLed and restarted from its own snapshot, still knows node 2 is a kept learner. Then
/// `POST /2/promote` (asked on the learner, forwarded to the leader) makes it a voter; a
/// second promote is 409, promoting a non-member 404, a bad `learner=` 400.
#[tokio::test(flavor = "multi_thread")]
async fn read_replica_stays_a_learner_until_promoted() {
    let args = [
        FAST,
        &["--snapshot-count", "10", "--snapshot-catchup-entries", "2"],
    ]
    .concat();
    let mut cluster = Cluster::start_with(1, &args);
    cluster.wait_leader().await;
    let p1 = cluster.node(1).client_port;
    cluster.add_node();
    let url2 = cluster.node(2).peer_url.clone();
    let (code, text) = send(p1, Method::POST, "/2?learner=maybe", &url2).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{text}");
    let (code, text) = send(p1, Method::POST, "/2?learner=true", &url2).await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{text}");
    // Not started: as a voter it would be half of a quorum of two that is down.
    let (code, text) = send(p1, Method::POST, "/2/promote", "").await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "promote before node 2 runs: {text}"
    );
    for i in 0..30 {
        assert_eq!(
            put(p1, &format!("/r{i}"), format!("v{i}")).await,
            StatusCode::NO_CONTENT
        );
    }
    let peer1 = cluster.node(1).peer_url.clone();
    assert!(!files_ending_with(&cluster.node(1).snap_dir(), ".snap").is_empty());

    cluster.node_mut(2).start_join();
    let p2 = cluster.node(2).client_port;
    wait_until(TIMEOUT, "read replica 2 serves /r29", || {
        serves(p2, "/r29", "v29")
    })
    .await;
    let http = pooled_client();
    let (code, body) = try_get_serializable_with(&http, p2, "/r3")
        .await
        .expect("serializable GET");
    assert_eq!((code, &body[..]), (StatusCode::OK, &b"v3"[..]));
    assert!(
        cluster
            .node(2)
            .log()
            .contains("installing snapshot from leader"),
        "node 2 caught up without a snapshot"
    );
    let st2 = status(&url2).await.expect("status of node 2");
    assert_eq!(id_list(&st2, "read_replicas"), [2], "{st2}");
    let promoted = poll_until(Duration::from_secs(2), || async {
        status(&peer1)
            .await
            .is_some_and(|s| id_list(&s, "voters").contains(&2))
    })
    .await;
    assert!(!promoted, "a read replica was promoted automatically");

    cluster.node_mut(1).kill9();
    cluster.node_mut(1).start(&[]);
    cluster.wait_leader().await;
    wait_voters(&peer1, &[1], &[2]).await;
    let st1 = status(&peer1).await.expect("status of node 1");
    assert_eq!(
        id_list(&st1, "read_replicas"),
        [2],
        "after a restart: {st1}"
    );

    let (code, text) = send(p2, Method::POST, "/2/promote", "").await;
    assert_eq!(code, StatusCode::NO_CONTENT, "{text}");
    wait_voters(&peer1, &[1, 2], &[]).await;
    wait_voters(&url2, &[1, 2], &[]).await;
    let st1 = status(&peer1).await.expect("status of node 1");
    assert!(id_list(&st1, "read_replicas").is_empty(), "{st1}");
    let (code, text) = send(p1, Method::POST, "/2/promote", "").await;
    assert_eq!(code, StatusCode::CONFLICT, "{text}");
    let (code, text) = send(p1, Method::POST, "/7/promote", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{text}");
    assert_eq!(put(p2, "/after", "1").await, StatusCode::NO_CONTENT);
}

/// Strict reconfiguration: of three voters only 1 and 2 run. Removing either of them would
/// leave one reachable voter of two, short of a quorum: 409 with the reason, and nothing
/// changes. A learner (never started) may always be removed, and removing the node that is
/// down leaves {1, 2}, both up: 204.
#[tokio::test(flavor = "multi_thread")]
async fn unsafe_removal_is_refused() {
    let mut cluster = Cluster::new(3, FAST);
    cluster.node_mut(1).start(&[]);
    cluster.node_mut(2).start(&[]);
    let leader = cluster.wait_leader().await;
    let port = cluster.node(leader).client_port;
    let peer = cluster.node(leader).peer_url.clone();
    for id in [1, 2] {
        let (code, text) = send(port, Method::DELETE, &format!("/{id}"), "").await;
        assert_eq!(code, StatusCode::CONFLICT, "DELETE /{id}: {text}");
        assert!(text.contains("quorum"), "DELETE /{id}: {text}");
        assert_eq!(text.lines().count(), 1, "{text:?}");
    }
    let st = status(&peer).await.expect("status");
    assert_eq!(id_list(&st, "voters"), [1, 2, 3], "{st}");
    cluster.add_node();
    let url4 = cluster.node(4).peer_url.clone();
    assert_eq!(post_member(port, 4, &url4).await, StatusCode::NO_CONTENT);
    assert_eq!(delete_member(port, 4).await, StatusCode::NO_CONTENT);
    wait_voters(&peer, &[1, 2, 3], &[]).await;
    assert_eq!(delete_member(port, 3).await, StatusCode::NO_CONTENT);
    wait_voters(&peer, &[1, 2], &[]).await;
    assert_eq!(put(port, "/still", "up").await, StatusCode::NO_CONTENT);
}

const KEYS: [&str; 3] = ["/m-a", "/m-b", "/m-c"];

/// Polls a membership change until it is applied (204); 409 (another change, e.g. a
/// promotion, is pending) and 503 (a leader change) are retried.
async fn change(port: u16, method: Method, path: &str, body: &str) {
    let last = std::sync::Mutex::new(String::new());
    let done = poll_until(TIMEOUT, || async {
        let client = pooled_client();
        match client_request(&client, port, method.clone(), path, body).await {
            Ok((StatusCode::NO_CONTENT, ..)) => true,
            Ok((code, _, text)) => {
                *last.lock().expect("lock") = format!("{code} {}", String::from_utf8_lossy(&text));
                false
            }
            Err(e) => {
                *last.lock().expect("lock") = e.to_string();
                false
            }
        }
    })
    .await;
    assert!(done, "{method} {path}: {}", last.lock().expect("lock"));
}

/// Under random PUTs and linearizable GETs from six clients on every node: node 4 is added,
/// started, SIGKILLed as soon as it answers (during or just after its catch-up) and
/// restarted, and becomes a voter; node 1 is removed; node 5 is added, the leader is SIGKILLed
/// before node 5 starts (the new leader promotes it), and the old leader restarts. Every
/// member lists the final configuration, each learner was added and promoted exactly once (a
/// "member added" and a "learner promoted to voter" line on a node that ran throughout), and
/// the history is linearizable.
#[tokio::test(flavor = "multi_thread")]
async fn membership_changes_under_load_stay_linearizable() {
    let seed = seed();
    eprintln!("membership: seed {seed} (set RAFTEXAMPLE_TEST_SEED to reuse it)");
    let mut cluster = Cluster::start_with(3, FAST);
    cluster.wait_leader().await;
    cluster.add_node();
    cluster.add_node();
    let ports = cluster.nodes.iter().map(|n| n.client_port).collect();
    let load = Arc::new(HistoryLoad::new(ports, Duration::from_secs(4), TIMEOUT));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let key = |_: &HistoryLoad, rng: &mut Rng| KEYS[rng.below(KEYS.len())].to_string();
            tokio::spawn(client(c, load.clone(), seed, key))
        })
        .collect();
    load.wait_more(50, "before the first change").await;
    let port = |c: &Cluster, id: u64| c.node(id).client_port;
    let url = |c: &Cluster, id: u64| c.node(id).peer_url.clone();

    change(port(&cluster, 2), Method::POST, "/4", &url(&cluster, 4)).await;
    cluster.node_mut(4).start_join();
    wait_until(TIMEOUT, "node 4 answers", || status_of(&cluster, 4)).await;
    cluster.node_mut(4).kill9();
    load.wait_more(30, "with learner 4 down").await;
    cluster.node_mut(4).start_join();
    wait_voters(&url(&cluster, 2), &[1, 2, 3, 4], &[]).await;
    load.wait_more(30, "with node 4 a voter").await;

    change(port(&cluster, 2), Method::DELETE, "/1", "").await;
    wait_voters(&url(&cluster, 2), &[2, 3, 4], &[]).await;
    change(port(&cluster, 3), Method::POST, "/5", &url(&cluster, 5)).await;
    let leader = cluster.leader_among(&[2, 3, 4]).await.expect("a leader");
    cluster.node_mut(leader).kill9();
    let others: Vec<u64> = [2, 3, 4].into_iter().filter(|i| *i != leader).collect();
    wait_until(TIMEOUT, "a new leader", || async {
        cluster.leader_among(&others).await.is_some()
    })
    .await;
    cluster.node_mut(5).start_join();
    wait_voters(&url(&cluster, others[0]), &[2, 3, 4, 5], &[]).await;
    if leader == 4 {
        cluster.node_mut(leader).start_join();
    } else {
        cluster.node_mut(leader).start(&[]);
    }
    for id in [2, 3, 4, 5] {
        wait_voters(&url(&cluster, id), &[2, 3, 4, 5], &[]).await;
    }
    load.wait_more(50, "after the changes").await;
    load.stop.store(true, Ordering::SeqCst);
    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await.expect("client task"));
    }
    let nodes: Vec<(u64, u16)> = [2, 3, 4, 5].map(|id| (id, port(&cluster, id))).to_vec();
    cluster.leader_among(&[2, 3, 4, 5]).await;
    final_reads(&load.http(), &nodes, KEYS, &load.clock, &mut history).await;
    // Node 4 replayed its log after its restart; 2 and 3 ran throughout unless they led.
    let survivor = if leader == 2 { 3 } else { 2 };
    let log = cluster.node(survivor).log();
    assert_eq!(
        adds_of(&log, 4),
        2,
        "node {survivor}: node 4 added once, promoted once"
    );
    assert_eq!(
        adds_of(&log, 5),
        2,
        "node {survivor}: node 5 added once, promoted once"
    );
    let Counts { completed, .. } = check_or_dump(
        &history,
        &format!("membership-{}-{seed}", std::process::id()),
        &format!("add 4, kill it, remove 1, add 5, kill leader {leader}; seed {seed}"),
    );
    assert!(completed > 200, "only {completed} operations completed");
}

async fn status_of(cluster: &Cluster, id: u64) -> bool {
    status(&cluster.node(id).peer_url).await.is_some()
}
