//! What a 204 promises, on clusters of the real binary: acknowledged writes survive the crash
//! of the leader, a read on any node sees every write acknowledged before it, a node without a
//! quorum refuses in time instead of hanging, and a leader stopped with SIGTERM hands over.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    client_request, healthy, poll_until, pooled_client, status, try_get_serializable_with,
    try_get_with, try_put_with, wait_until, Cluster, StatusCode, TIMEOUT,
};
use reqwest::Method;

/// Daemon request timeout for these tests, so that refusals come quickly.
const REQUEST_TIMEOUT_MS: u64 = 2000;
const FAST: &[&str] = &["--request-timeout-ms", "2000"];

/// Counts and records the writes that got a 204.
#[derive(Default)]
struct Acked {
    writes: Mutex<Vec<(String, String)>>,
    count: AtomicUsize,
    stop: AtomicBool,
}

impl Acked {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until `more` writes beyond the current count were acknowledged.
    async fn wait_more(&self, more: usize, what: &str) {
        let target = self.count() + more;
        wait_until(
            TIMEOUT,
            &format!("{more} more writes are acknowledged {what}"),
            || async move { self.count() >= target },
        )
        .await;
    }
}

/// Writes unique keys, round-robin over `ports`, until told to stop; records every 204.
async fn writer(client_id: usize, ports: Vec<u16>, acked: Arc<Acked>) {
    let client = pooled_client();
    for seq in 0..100_000usize {
        if acked.stop.load(Ordering::SeqCst) {
            return;
        }
        let port = ports[(client_id + seq) % ports.len()];
        let key = format!("/durable-{client_id}-{seq}");
        let value = format!("value-{client_id}-{seq}");
        if try_put_with(&client, port, &key, value.clone()).await == Some(StatusCode::NO_CONTENT) {
            acked.writes.lock().expect("acked lock").push((key, value));
            acked.count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Checks on every node that each acknowledged write reads back, with a linearizable GET and,
/// once the node has caught up, with a serializable one. Returns the number of reads done.
async fn assert_all_readable(cluster: &Cluster, writes: &[(String, String)]) -> usize {
    let mut reads = common::assert_all_readable(cluster, &[1, 2, 3], writes).await;
    // Serializable reads answer from the node's own copy: wait until each has applied
    // everything, then every acknowledged write must be in it.
    for id in 1..=3u64 {
        let node = cluster.node(id);
        let port = node.client_port;
        let client = pooled_client();
        wait_until(
            TIMEOUT,
            &format!("node {id} serves every write locally"),
            || {
                let (client, writes) = (&client, &writes);
                async move {
                    for (key, value) in writes.iter() {
                        let got = try_get_serializable_with(client, port, key).await;
                        if got != Some((StatusCode::OK, value.clone().into())) {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
        reads += writes.len();
    }
    reads
}

/// No write that got a 204 is lost when the leader crashes: six clients write unique keys
/// round-robin to all three nodes, the leader is SIGKILLed in the middle of the load and
/// restarted on its data dir, and afterwards every acknowledged key reads back with its value
/// on every node (linearizable GET, then serializable GET once the node has caught up).
#[tokio::test(flavor = "multi_thread")]
async fn no_acknowledged_write_lost_when_leader_killed() {
    let mut cluster = Cluster::start_with(3, FAST);
    let leader = cluster.wait_leader().await;
    let ports: Vec<u16> = (1..=3).map(|id| cluster.node(id).client_port).collect();
    let acked = Arc::new(Acked::default());
    let writers: Vec<_> = (0..6)
        .map(|c| tokio::spawn(writer(c, ports.clone(), acked.clone())))
        .collect();

    acked.wait_more(150, "before the crash").await;
    let at_kill = acked.count();
    cluster.node_mut(leader).kill9();
    acked
        .wait_more(150, "by the two survivors after the leader crashed")
        .await;
    cluster.node_mut(leader).start(&[]);
    let peer = cluster.node(leader).peer_url.clone();
    wait_until(
        TIMEOUT,
        &format!("restarted node {leader} is healthy"),
        || healthy(&peer),
    )
    .await;
    acked.wait_more(100, "after the old leader restarted").await;
    acked.stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer task");
    }

    let new_leader = cluster.wait_leader().await;
    let writes = acked.writes.lock().expect("acked lock").clone();
    assert!(
        writes.len() >= 400,
        "only {} writes acknowledged",
        writes.len()
    );
    let reads = assert_all_readable(&cluster, &writes).await;
    eprintln!(
        "{} writes acknowledged ({at_kill} before node {leader}, the leader, was killed; node \
         {new_leader} leads now), {reads} reads checked",
        writes.len()
    );
}

/// No write that got a 204 is lost when every node crashes at once (a power cut, as far as
/// SIGKILL can tell: the data a node wrote before dying is in the page cache): six clients
/// write unique keys to all nodes, all three are SIGKILLed back to back in the middle of the
/// load and restarted on their data dirs, and every acknowledged key reads back everywhere.
/// A 204 needs the entry in the WAL of a majority, so at least two WALs hold each one.
#[tokio::test(flavor = "multi_thread")]
async fn no_acknowledged_write_lost_when_all_nodes_killed() {
    let mut cluster = Cluster::start_with(3, FAST);
    cluster.wait_leader().await;
    let ports: Vec<u16> = (1..=3).map(|id| cluster.node(id).client_port).collect();
    let acked = Arc::new(Acked::default());
    let writers: Vec<_> = (0..6)
        .map(|c| tokio::spawn(writer(c, ports.clone(), acked.clone())))
        .collect();

    acked.wait_more(200, "before the crash").await;
    for id in 1..=3 {
        cluster.node_mut(id).kill9();
    }
    let at_kill = acked.count();
    for id in 1..=3 {
        cluster.node_mut(id).start(&[]);
    }
    cluster.wait_leader().await;
    acked.wait_more(100, "after the restart").await;
    acked.stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer task");
    }

    let writes = acked.writes.lock().expect("acked lock").clone();
    let reads = assert_all_readable(&cluster, &writes).await;
    eprintln!(
        "{} writes acknowledged ({at_kill} before all nodes were killed), {reads} reads checked",
        writes.len()
    );
}

/// A 204 from the leader is visible at once on the followers: each of 50 new values, written
/// to the leader, is returned by the very next linearizable GET on a follower, with no wait
/// in between (the follower's ReadIndex waits until it has applied the leader's commit).
#[tokio::test(flavor = "multi_thread")]
async fn follower_read_after_leader_ack() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let leader_port = cluster.node(leader).client_port;
    let client = pooled_client();
    for i in 0..50 {
        let value = format!("value-{i}");
        let put = try_put_with(&client, leader_port, "/read-your-write", value.clone()).await;
        assert_eq!(put, Some(StatusCode::NO_CONTENT), "PUT #{i} on the leader");
        let follower = followers[i % 2];
        let got = try_get_with(
            &client,
            cluster.node(follower).client_port,
            "/read-your-write",
        )
        .await;
        assert_eq!(
            got,
            Some((StatusCode::OK, value.into())),
            "GET on follower {follower} right after PUT #{i} was acknowledged by the leader"
        );
    }
}

/// A 204 means applied on the node that answered it, whichever node that is: a PUT sent to a
/// follower (which forwards it to the leader) is at once in that follower's own copy (a
/// serializable GET there sees it) and visible to a linearizable GET on the other follower.
#[tokio::test(flavor = "multi_thread")]
async fn put_is_applied_where_acknowledged() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let client = pooled_client();
    for i in 0..30 {
        let (writer, reader) = (followers[i % 2], followers[(i + 1) % 2]);
        let (wport, rport) = (
            cluster.node(writer).client_port,
            cluster.node(reader).client_port,
        );
        let value = format!("value-{i}");
        let put = try_put_with(&client, wport, "/applied-here", value.clone()).await;
        assert_eq!(
            put,
            Some(StatusCode::NO_CONTENT),
            "PUT #{i} on follower {writer}"
        );
        let local = try_get_serializable_with(&client, wport, "/applied-here").await;
        assert_eq!(
            local,
            Some((StatusCode::OK, value.clone().into())),
            "serializable GET on follower {writer} right after its own 204 for PUT #{i}"
        );
        let other = try_get_with(&client, rport, "/applied-here").await;
        assert_eq!(
            other,
            Some((StatusCode::OK, value.into())),
            "linearizable GET on follower {reader} right after PUT #{i} on {writer}"
        );
    }
}

/// Sends `method /key` (with a body for PUT) to `port` and returns the status, the body text
/// and how long the answer took.
async fn timed(port: u16, method: Method, key: &str) -> (StatusCode, String, Duration) {
    let client = pooled_client();
    let started = Instant::now();
    let body = if method == Method::PUT { "v" } else { "" };
    let (status, _, body) = client_request(&client, port, method.clone(), key, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {key} on port {port}: {e}"));
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        started.elapsed(),
    )
}

/// Kills the two nodes other than `survivor`, then checks that PUT and GET on the survivor
/// answer 503 within the request timeout: first right after the crash, while the survivor
/// still believes in a leader (itself or the dead one), then once it knows no leader.
async fn survivor_answers_503(survivor_was_leader: bool) {
    let mut cluster = Cluster::start_with(3, FAST);
    let leader = cluster.wait_leader().await;
    let survivor = if survivor_was_leader {
        leader
    } else {
        leader % 3 + 1
    };
    let port = cluster.node(survivor).client_port;
    let client = pooled_client();
    assert_eq!(
        try_put_with(&client, port, "/k", "before").await,
        Some(StatusCode::NO_CONTENT)
    );
    for id in (1..=3).filter(|id| *id != survivor) {
        cluster.node_mut(id).kill9();
    }
    let limit = Duration::from_millis(REQUEST_TIMEOUT_MS + 1000);

    let check = |phase: &'static str, (status, body, took): (StatusCode, String, Duration)| {
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{phase}: node {survivor} answered {body:?}"
        );
        assert!(
            took <= limit,
            "{phase}: node {survivor} took {took:?} to answer 503 {body:?}"
        );
        body
    };
    // Right after the crash: the PUT may be appended (by a leader survivor) or forwarded to the
    // dead leader, so it times out with an unknown outcome, or is refused if raft already
    // knows there is no leader.
    let (put, get) = tokio::join!(
        timed(port, Method::PUT, "/k"),
        timed(port, Method::GET, "/k")
    );
    let body = check("PUT right after the crash", put);
    assert!(
        body.starts_with("not applied") || body.starts_with("outcome unknown"),
        "PUT right after the crash: {body:?}"
    );
    check("GET right after the crash", get);

    // Once it knows there is no leader (a follower's election timeout, or a leader's
    // check-quorum), the PUT is refused at once: raft never appended it.
    let peer = cluster.node(survivor).peer_url.clone();
    wait_until(TIMEOUT, &format!("node {survivor} knows no leader"), || {
        let peer = peer.clone();
        async move {
            status(&peer)
                .await
                .is_some_and(|s| s.get("leader").and_then(|l| l.as_u64()) == Some(0))
        }
    })
    .await;
    let (put, get) = tokio::join!(
        timed(port, Method::PUT, "/k"),
        timed(port, Method::GET, "/k")
    );
    let body = check("PUT without a leader", put);
    assert!(
        body.starts_with("not applied"),
        "PUT without a leader: {body:?}"
    );
    check("GET without a leader", get);
    // A serializable read still answers from the local copy.
    let got = try_get_serializable_with(&client, port, "/k").await;
    assert_eq!(got, Some((StatusCode::OK, "before".into())));
}

/// A follower left alone (the leader and the other follower SIGKILLed) answers PUT and GET
/// with 503 within `--request-timeout-ms` (+1 s), and the PUT says "not applied" or "outcome
/// unknown"; once it knows no leader, the PUT says "not applied".
#[tokio::test(flavor = "multi_thread")]
async fn survivor_answers_503_without_quorum() {
    survivor_answers_503(false).await;
}

/// The same for a leader left alone (both followers SIGKILLed): it cannot commit or confirm
/// a read, answers 503 in time, and steps down (check-quorum), after which PUT is refused.
#[tokio::test(flavor = "multi_thread")]
async fn lone_leader_answers_503_without_quorum() {
    survivor_answers_503(true).await;
}

/// SIGTERM on the leader: it hands leadership to a follower (its log says so), the other two
/// nodes agree on a new leader within 3 s, the old leader exits with status 0, and the
/// cluster keeps its data and accepts writes.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_leader_hands_over() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let client = pooled_client();
    let leader_port = cluster.node(leader).client_port;
    assert_eq!(
        try_put_with(&client, leader_port, "/k", "before").await,
        Some(StatusCode::NO_CONTENT)
    );
    let log_start = cluster.node(leader).log_len();

    let started = Instant::now();
    cluster.node(leader).sigterm();
    let handed_over = poll_until(Duration::from_secs(3), || async {
        cluster
            .leader_among(&others)
            .await
            .is_some_and(|l| l != leader)
    })
    .await;
    let took = started.elapsed();
    assert!(
        handed_over,
        "no new leader among nodes {others:?} within 3 s of SIGTERM to leader {leader}"
    );
    let exit = cluster.node_mut(leader).wait_exit(TIMEOUT).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "old leader {leader} should exit 0 after SIGTERM, got {exit:?}"
    );
    let log = cluster.node(leader).log_since(log_start);
    assert!(
        log.contains("transferring leadership"),
        "old leader {leader} did not hand over:\n{log}"
    );
    let new_leader = cluster.leader_among(&others).await.expect("a leader");
    eprintln!("node {new_leader} took over from node {leader} {took:?} after SIGTERM");
    let port = cluster.node(new_leader).client_port;
    assert_eq!(
        try_get_with(&client, port, "/k").await,
        Some((StatusCode::OK, "before".into()))
    );
    assert_eq!(
        try_put_with(&client, port, "/k", "after").await,
        Some(StatusCode::NO_CONTENT)
    );
}

/// The handover is what makes a SIGTERM cheap: the leader's successor takes over well before
/// any follower's election timeout (10 ticks of 100 ms at least) could fire. Three times in a
/// row (the stopped node restarts in between), a new leader is agreed on within 500 ms of the
/// SIGTERM; without a working handover each takes 1 to 3 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_handover_beats_the_election_timeout() {
    let mut cluster = Cluster::start(3);
    for round in 0..3 {
        let leader = cluster.wait_leader().await;
        let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        let log_start = cluster.node(leader).log_len();
        let started = Instant::now();
        cluster.node(leader).sigterm();
        let handed_over = poll_until(Duration::from_secs(3), || async {
            cluster
                .leader_among(&others)
                .await
                .is_some_and(|l| l != leader)
        })
        .await;
        let took = started.elapsed();
        let exit = cluster.node_mut(leader).wait_exit(TIMEOUT).await;
        let log = cluster.node(leader).log_since(log_start);
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("transfer")
                    || l.contains("MsgTimeoutNow")
                    || l.contains("unreachable")
                    || l.contains("raft stopped")
            })
            .take(12)
            .collect();
        assert!(
            handed_over && took < Duration::from_millis(500),
            "round {round}: after SIGTERM to leader {leader}, nodes {others:?} agreed on a new \
             leader after {took:?} (handed over: {handed_over}); old leader's log:\n{}",
            interesting.join("\n")
        );
        assert!(exit.is_some_and(|s| s.success()), "round {round}: {exit:?}");
        cluster.node_mut(leader).start(&[]);
        let peer = cluster.node(leader).peer_url.clone();
        wait_until(
            TIMEOUT,
            &format!("restarted node {leader} is healthy"),
            || healthy(&peer),
        )
        .await;
    }
}
