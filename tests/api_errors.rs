//! The client API's error answers (400, 404, 405, 409, 413) and the peer listener's operator
//! routes (`/status`, `/health`, `/metrics`), on clusters of the real binary.

mod common;

use common::{
    client_request, delete_member, free_port, healthy, member_ids, peer_get, pooled_client,
    post_member, status, try_get_serializable_with, wait_until, Cluster, StatusCode, TIMEOUT,
};
use reqwest::Method;

/// Sends `method path` with `body` to `port`; the status and the body as text.
///
/// # Panics
/// If the node cannot be reached.
async fn send(
    port: u16,
    method: Method,
    path: &str,
    body: impl Into<Vec<u8>>,
) -> (StatusCode, String) {
    let client = pooled_client();
    let (status, _, body) = client_request(&client, port, method.clone(), path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A member id that is not a positive integer, and a peer URL that is not `http://host:port`,
/// get 400 without changing the membership; a missing key and the removal of a non-member get
/// 404; an unknown method gets 405 with an `Allow` header listing the four methods; a body over
/// `--max-request-bytes` (default 1.5 MiB) gets 413 while a 1 MiB value is accepted; adding an
/// existing member gets 409.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_conflicting_requests_get_4xx() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let follower = if leader == 1 { 2 } else { 1 };
    // A follower forwards nothing for these: each answer is decided where the request lands,
    // so try both the leader and a follower.
    for id in [leader, follower] {
        let port = cluster.node(id).client_port;
        let free_url = format!("http://127.0.0.1:{}", free_port());
        let bad = [
            ("/abc", free_url.clone()),
            ("/0", free_url.clone()),
            ("/-4", free_url.clone()),
            ("/4.5", free_url.clone()),
            ("/4/5", free_url.clone()),
            ("/4", "not a url".to_string()),
            ("/4", "http://127.0.0.1:1/path".to_string()),
            ("/4", "ftp://127.0.0.1:1".to_string()),
            ("/4", "http://127.0.0.1".to_string()),
            ("/4", String::new()),
        ];
        for (path, body) in bad {
            let (status, text) = send(port, Method::POST, path, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "node {id}: POST {path} {body:?} answered {text:?}"
            );
        }
        for path in ["/abc", "/0"] {
            let (status, text) = send(port, Method::DELETE, path, "").await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "node {id}: DELETE {path}: {text:?}"
            );
        }

        // 404: a key never written (linearizable and serializable), a non-member's removal.
        let (status, text) = send(port, Method::GET, "/never-written", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "node {id}: GET: {text:?}");
        let got = try_get_serializable_with(&pooled_client(), port, "/never-written").await;
        assert_eq!(
            got.map(|(s, _)| s),
            Some(StatusCode::NOT_FOUND),
            "node {id}"
        );
        let (status, text) = send(port, Method::DELETE, "/9", "").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "node {id}: DELETE /9: {text:?}"
        );

        // 409: adding an existing member, under its own URL or another one.
        let url2 = cluster.node(2).peer_url.clone();
        for body in [url2, free_url.clone()] {
            let (status, text) = send(port, Method::POST, "/2", body).await;
            assert_eq!(status, StatusCode::CONFLICT, "node {id}: POST /2: {text:?}");
        }

        // 405 with Allow.
        for method in [Method::PATCH, Method::OPTIONS, Method::HEAD] {
            let client = pooled_client();
            let (status, headers, _) =
                client_request(&client, port, method.clone(), "/some-key", "x")
                    .await
                    .unwrap_or_else(|e| panic!("{method} on node {id}: {e}"));
            if method == Method::HEAD && status != StatusCode::METHOD_NOT_ALLOWED {
                // axum may answer HEAD with the GET handler; that is GET semantics, not an error.
                continue;
            }
            assert_eq!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "node {id}: {method}"
            );
            let allow = headers
                .get(reqwest::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("node {id}: 405 to {method} without Allow"));
            let mut allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
            allowed.sort_unstable();
            assert_eq!(allowed, ["DELETE", "GET", "POST", "PUT"], "Allow: {allow}");
        }

        // 413 over the default --max-request-bytes (1.5 MiB); 1 MiB is fine.
        let key = format!("/big-{id}");
        let (status, text) = send(port, Method::PUT, &key, vec![b'x'; 2 << 20]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "node {id}: {text:?}");
        let (status, text) = send(port, Method::GET, &key, "").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a 413 PUT was applied: {text:?}"
        );
        let (status, text) = send(port, Method::PUT, &key, vec![b'y'; 1 << 20]).await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "node {id}: 1 MiB PUT: {text:?}"
        );
        let (status, text) = send(port, Method::POST, "/4", vec![b'h'; 2 << 20]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "node {id}: {text:?}");
    }

    // None of the rejected changes touched the membership.
    for id in 1..=3 {
        let st = status(&cluster.node(id).peer_url).await.expect("status");
        assert_eq!(member_ids(&st), [1, 2, 3], "node {id}: {st}");
    }
}

/// A removed member's id is never reused: after `DELETE /3` (node 3 exits 0), `POST /3` with
/// any URL answers 409, on the leader and on the remaining follower.
#[tokio::test(flavor = "multi_thread")]
async fn removed_id_cannot_be_added_again() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader().await;
    let port1 = cluster.node(1).client_port;
    assert_eq!(delete_member(port1, 3).await, StatusCode::NO_CONTENT);
    let exit = cluster.node_mut(3).wait_exit(TIMEOUT).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "removed node 3 should exit 0, got {exit:?}"
    );
    for id in [1, 2] {
        let port = cluster.node(id).client_port;
        // Node 2 answers once it has applied the removal itself.
        let peer = cluster.node(id).peer_url.clone();
        wait_until(TIMEOUT, &format!("node {id} lists members 1, 2"), || {
            let peer = peer.clone();
            async move {
                status(&peer)
                    .await
                    .is_some_and(|s| member_ids(&s) == [1, 2])
            }
        })
        .await;
        for url in [
            cluster.node(3).peer_url.clone(),
            format!("http://127.0.0.1:{}", free_port()),
        ] {
            let (status, text) = send(port, Method::POST, "/3", url).await;
            assert_eq!(status, StatusCode::CONFLICT, "node {id}: POST /3: {text:?}");
        }
        // Removing it again: it is not a member (404 in the README's table) and it was removed
        // (409 for POST); the daemon answers 409. Either is a refusal that changes nothing.
        let (status, text) = send(port, Method::DELETE, "/3", "").await;
        assert!(
            status == StatusCode::CONFLICT || status == StatusCode::NOT_FOUND,
            "node {id}: DELETE /3 again: {status} {text:?}"
        );
        let st = common::status(&cluster.node(id).peer_url)
            .await
            .expect("status");
        assert_eq!(member_ids(&st), [1, 2], "node {id}: {st}");
    }
}

/// Two membership changes sent at the same time never both proceed while the other is
/// pending: the statuses of two concurrent `POST`s (of members that are never started) are
/// (204, 409), (409, 204), or (204, 204) if the first was applied before the second arrived;
/// and over 10 attempts at least one 409 is seen. Both go to the same node, where the
/// check is deterministic (see `concurrent_membership_changes_on_two_nodes` for two nodes).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_membership_change_gets_409() {
    let cluster = Cluster::start(3);
    let mut conflicts = 0;
    let mut next_id = 4;
    for attempt in 0..10 {
        // Every node has applied the previous attempt's changes: nothing is pending.
        wait_members(&cluster, &[1, 2, 3]).await;
        let leader = cluster.wait_leader().await;
        // Alternate between the leader and a follower as the target.
        let target = if attempt % 2 == 0 {
            leader
        } else {
            leader % 3 + 1
        };
        let port = cluster.node(target).client_port;
        let (a, b) = (next_id, next_id + 1);
        next_id += 2;
        let url_a = format!("http://127.0.0.1:{}", free_port());
        let url_b = format!("http://127.0.0.1:{}", free_port());
        let (sa, sb) = tokio::join!(post_member(port, a, &url_a), post_member(port, b, &url_b));
        assert!(
            matches!(
                (sa.as_u16(), sb.as_u16()),
                (204, 409) | (409, 204) | (204, 204)
            ),
            "attempt {attempt} on node {target}: POST /{a} -> {sa}, POST /{b} -> {sb}"
        );
        if sa == StatusCode::CONFLICT || sb == StatusCode::CONFLICT {
            conflicts += 1;
        }
        let added = [(a, sa), (b, sb)]
            .into_iter()
            .filter(|(_, s)| *s == StatusCode::NO_CONTENT)
            .map(|(id, _)| id);
        remove_added(&cluster, added.collect()).await;
    }
    eprintln!("{conflicts} of 10 pairs of concurrent POSTs got a 409");
    assert!(
        conflicts > 0,
        "10 pairs of concurrent POSTs never got a 409"
    );
}

/// Removes the members `added` (beyond 1, 2, 3), one change at a time, each applied on every
/// node before the next, so that the three running nodes stay a quorum and nothing is left
/// pending.
async fn remove_added(cluster: &Cluster, added: Vec<u64>) {
    let mut members = vec![1, 2, 3];
    members.extend(added);
    wait_members(cluster, &members).await;
    while members.len() > 3 {
        let id = members.pop().expect("an added member");
        let leader_port = cluster.node(cluster.wait_leader().await).client_port;
        assert_eq!(
            delete_member(leader_port, id).await,
            StatusCode::NO_CONTENT,
            "DELETE /{id}"
        );
        wait_members(cluster, &members).await;
    }
}

/// Waits until every node of `cluster` lists exactly the members `ids` (any order) on
/// `/status`, i.e. has applied every membership change so far.
async fn wait_members(cluster: &Cluster, ids: &[u64]) {
    let mut want = ids.to_vec();
    want.sort_unstable();
    for node in &cluster.nodes {
        let (peer, want) = (&node.peer_url, &want);
        wait_until(
            TIMEOUT,
            &format!("node {} lists members {want:?}", node.id),
            || async move { status(peer).await.is_some_and(|s| member_ids(&s) == *want) },
        )
        .await;
    }
}

/// `/status` has the documented fields with consistent values, `/health` is 200 on every
/// node of a healthy cluster, and `/metrics` serves the documented metrics (the proposal
/// counter on the node that proposed).
#[tokio::test(flavor = "multi_thread")]
async fn status_health_and_metrics() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let port = cluster.node(leader).client_port;
    for i in 0..5 {
        let (status, text) = send(port, Method::PUT, &format!("/m{i}"), "v").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{text:?}");
    }
    for id in 1..=3 {
        let node = cluster.node(id);
        wait_until(TIMEOUT, &format!("node {id} is healthy"), || {
            healthy(&node.peer_url)
        })
        .await;
        let st = status(&node.peer_url).await.expect("status");
        let field = |name: &str| {
            st.get(name)
                .unwrap_or_else(|| panic!("node {id}: /status has no {name:?}: {st}"))
        };
        assert_eq!(field("id").as_u64(), Some(id), "{st}");
        let role = field("role").as_str().expect("role is a string");
        let want_role = if id == leader { "leader" } else { "follower" };
        assert_eq!(role, want_role, "{st}");
        assert_eq!(field("leader").as_u64(), Some(leader), "{st}");
        assert!(field("term").as_u64().is_some_and(|t| t >= 1), "{st}");
        let commit = field("commit").as_u64().expect("commit is a number");
        let applied = field("applied").as_u64().expect("applied is a number");
        // At least the 5 PUTs and the leader's no-op; healthy means all of it is applied.
        assert!(commit >= 6 && applied == commit, "{st}");
        let members = field("members").as_object().expect("members is an object");
        assert_eq!(members.len(), 3, "{st}");
        for m in 1..=3 {
            assert_eq!(
                members.get(&m.to_string()).and_then(|u| u.as_str()),
                Some(cluster.node(m).peer_url.as_str()),
                "{st}"
            );
        }

        let (code, metrics) = peer_get(&node.peer_url, "/metrics").await.expect("metrics");
        assert_eq!(code, StatusCode::OK);
        let mut names = ALWAYS_LISTED.to_vec();
        if id == leader {
            names.push(PROPOSALS);
        }
        for name in names {
            assert!(
                has_metric(&metrics, name),
                "node {id}: /metrics has no {name}:\n{metrics}"
            );
        }
        let commit_gauge = metrics
            .lines()
            .find_map(|l| l.strip_prefix("raftexample_commit_index "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("node {id}: no raftexample_commit_index sample"));
        assert!(
            commit_gauge >= 6.0,
            "node {id}: commit index gauge {commit_gauge}"
        );
    }
    let (_, metrics) = peer_get(&cluster.node(leader).peer_url, "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics.contains("raftexample_proposals_total{outcome=\"accepted\"} "),
        "the leader counted no accepted proposal:\n{metrics}"
    );
}

/// The proposal counter, labelled by outcome.
const PROPOSALS: &str = "raftexample_proposals_total";
/// The documented metrics that need no label.
const ALWAYS_LISTED: [&str; 7] = [
    "raftexample_learner_promotions_total",
    "raftexample_commit_index",
    "raftexample_applied_index",
    "raftexample_apply_lag_entries",
    "raftexample_wal_fsync_duration_seconds",
    "raftexample_snapshots_total",
    "raftexample_peer_send_failures_total",
];

/// True if the Prometheus text `metrics` declares metric `name`.
fn has_metric(metrics: &str, name: &str) -> bool {
    metrics
        .lines()
        .any(|l| l.starts_with(&format!("# TYPE {name} ")))
}

/// Every documented metric is listed on every node from the start, before its first event, as
/// `metrics::render` intends ("Touch each metric so it is listed even before its first
/// event"), so that dashboards and alerts see a 0 rather than no series.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_lists_every_metric_before_its_first_event() {
    let cluster = Cluster::start(3);
    cluster.wait_leader().await;
    for id in 1..=3 {
        let (code, metrics) = peer_get(&cluster.node(id).peer_url, "/metrics")
            .await
            .expect("metrics");
        assert_eq!(code, StatusCode::OK);
        for name in ALWAYS_LISTED.iter().chain([&PROPOSALS]) {
            assert!(
                has_metric(&metrics, name),
                "node {id}: /metrics has no {name}:\n{metrics}"
            );
        }
    }
}

/// Two membership changes sent at the same time to two different nodes: the one that loses
/// the race is refused with 409 like on a single node (its conf change is dropped by the
/// leader, which turns it into an empty entry), rather than left waiting for the request
/// timeout and answered 503 "outcome unknown" when its outcome is known.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_membership_changes_on_two_nodes() {
    let cluster = Cluster::start_with(3, &["--request-timeout-ms", "2000"]);
    let leader = cluster.wait_leader().await;
    let f1 = leader % 3 + 1;
    let f2 = f1 % 3 + 1;
    let client = pooled_client();
    let mut next_id = 4;
    for (x, y) in [(leader, f1), (f1, f2), (f2, leader)] {
        let (a, b) = (next_id, next_id + 1);
        next_id += 2;
        let (path_a, path_b) = (format!("/{a}"), format!("/{b}"));
        let url_a = format!("http://127.0.0.1:{}", free_port());
        let url_b = format!("http://127.0.0.1:{}", free_port());
        let (ra, rb) = tokio::join!(
            client_request(
                &client,
                cluster.node(x).client_port,
                Method::POST,
                &path_a,
                url_a
            ),
            client_request(
                &client,
                cluster.node(y).client_port,
                Method::POST,
                &path_b,
                url_b
            )
        );
        let (sa, _, body_a) = ra.expect("POST on the first node");
        let (sb, _, body_b) = rb.expect("POST on the second node");
        assert!(
            matches!(
                (sa.as_u16(), sb.as_u16()),
                (204, 409) | (409, 204) | (204, 204)
            ),
            "node {x}: POST /{a} -> {sa} {:?}; node {y}: POST /{b} -> {sb} {:?}",
            String::from_utf8_lossy(&body_a),
            String::from_utf8_lossy(&body_b)
        );
        let added = [(a, sa), (b, sb)]
            .into_iter()
            .filter(|(_, s)| *s == StatusCode::NO_CONTENT)
            .map(|(id, _)| id);
        remove_added(&cluster, added.collect()).await;
    }
}
