//! Issue 7, securing a cluster, tested on the real binary (one process per node, 127.0.0.1
//! only, temporary data dirs and certificates): the cluster token on peer requests, 410 for a
//! removed member, TLS on the client API and mutual TLS between peers, and the limits that keep
//! slow or flooding clients from starving a node.
//!
//! HTTPS requests go through hyper's client with rustls (ring), built here from the test's own
//! certificates, so that they check the daemon rather than share its TLS code.

mod common;

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use raft::prelude::{Entry, Message, MessageType};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{get, put, status, wait_until, Cluster, StatusCode, CONVERGE_TIMEOUT, TIMEOUT};

const CLUSTER_HEADER: &str = "X-Raftexample-Cluster";
const DEFAULT_TOKEN: &str = "raftexample-cluster";

// ----- plain-HTTP helpers

fn plain_client() -> reqwest::Client {
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build a reqwest client")
}

/// `POST <peer_url><path>` with an optional cluster token; the status, or panics if the node
/// cannot be reached.
async fn peer_post(peer_url: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> StatusCode {
    let mut req = plain_client()
        .post(format!("{peer_url}{path}"))
        .header("content-type", "application/x-protobuf")
        .body(body);
    if let Some(t) = token {
        req = req.header(CLUSTER_HEADER, t);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("POST {peer_url}{path}: {e}"))
        .status()
}

/// `(term, commit, kv_hash, leader)` from a `/status` answer.
fn raft_state(s: &serde_json::Value) -> (u64, u64, String, u64) {
    (
        s["term"].as_u64().expect("term"),
        s["commit"].as_u64().expect("commit"),
        s["kv_hash"].as_str().expect("kv_hash").to_string(),
        s["leader"].as_u64().expect("leader"),
    )
}

/// A raft batch that would take over a follower if it were stepped: a heartbeat and an append
/// from `from` at a much higher term, the append carrying a PUT of `/forged` right after the
/// follower's commit point and committing it.
fn hostile_batch(from: u64, to: u64, term: u64, commit: u64) -> Vec<u8> {
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.from = from;
    hb.to = to;
    hb.term = term;
    hb.commit = commit;
    let mut app = Message::default();
    app.set_msg_type(MessageType::MsgAppend);
    app.from = from;
    app.to = to;
    app.term = term;
    app.index = commit;
    app.log_term = term;
    app.commit = commit + 1;
    let put = raftexample::kvstore::Put {
        id: 1,
        key: b"/forged",
        value: b"evil",
    };
    let e = Entry {
        term,
        index: commit + 1,
        data: put.encode().into(),
        ..Default::default()
    };
    app.mut_entries().push(e);
    raftexample::transport::encode_batch(&[hb, app])
}

/// Peer requests without this cluster's token get 412 before their body is looked at, and
/// their messages never reach raft: a heartbeat and an append at a far higher term, sent with
/// no token and with another cluster's token, leave the follower's term, leader, commit index
/// and map as they were (no `/forged` key). `/conf-change` checks the token too, an
/// undecodable body with a wrong token is still 412 (the token comes first), and the
/// contrast with the right token (an empty batch is 204, garbage is 400) shows that the token
/// is all that differed.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_or_missing_cluster_token_gets_412_and_changes_nothing() {
    let cluster = Cluster::start_with(3, &["--cluster-token", "blue"]);
    let leader = cluster.wait_leader().await;
    let follower = if leader == 1 { 2 } else { 1 };
    assert_eq!(
        put(cluster.node(leader).client_port, "k", "v").await,
        StatusCode::NO_CONTENT
    );
    let fpeer = cluster.node(follower).peer_url.clone();
    let fport = cluster.node(follower).client_port;
    wait_until(TIMEOUT, "the follower applied k", || {
        common::serves(fport, "k", "v")
    })
    .await;
    let before = status(&fpeer).await.expect("follower status");
    let (term, commit, hash, lead) = raft_state(&before);
    let hostile_term = term + 1000;
    let batch = hostile_batch(leader, follower, hostile_term, commit);

    for token in [None, Some("green"), Some(""), Some("Blue")] {
        assert_eq!(
            peer_post(&fpeer, "/raft", token, batch.clone()).await,
            StatusCode::PRECONDITION_FAILED,
            "/raft with token {token:?}"
        );
        assert_eq!(
            peer_post(&fpeer, "/raft", token, b"\x05garbage".to_vec()).await,
            StatusCode::PRECONDITION_FAILED,
            "undecodable /raft body with token {token:?}: the token is checked first"
        );
        assert_eq!(
            peer_post(&fpeer, "/conf-change", token, b"anything".to_vec()).await,
            StatusCode::PRECONDITION_FAILED,
            "/conf-change with token {token:?}"
        );
    }

    let after = status(&fpeer).await.expect("follower status");
    let (term2, commit2, hash2, lead2) = raft_state(&after);
    assert!(
        term2 < hostile_term,
        "the follower adopted the forged term: {before} -> {after}"
    );
    assert_eq!(
        (term2, commit2, &hash2, lead2),
        (term, commit, &hash, lead),
        "the follower's raft state changed: {before} -> {after}"
    );
    let forged = format!("http://127.0.0.1:{fport}/forged?consistency=serializable");
    let res = plain_client()
        .get(&forged)
        .send()
        .await
        .expect("GET /forged");
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "the forged PUT was applied"
    );

    // The same peer URL with the right token: an empty batch is accepted, garbage is decoded
    // (and refused).
    assert_eq!(
        peer_post(&fpeer, "/raft", Some("blue"), Vec::new()).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        peer_post(&fpeer, "/raft", Some("blue"), b"\x05garbage".to_vec()).await,
        StatusCode::BAD_REQUEST
    );
    // The operator routes stay open without a token.
    assert!(status(&fpeer).await.is_some());
}

/// A node started with another cluster token cannot take part: its peers answer 412 to
/// everything it sends, so the cluster's two members keep their leader and term and the
/// stranger never learns of a leader.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_another_token_cannot_join_the_conversation() {
    let mut cluster = Cluster::new(3, &[]);
    cluster.node_mut(1).start(&[]);
    cluster.node_mut(2).start(&[]);
    cluster.node_mut(3).start(&["--cluster-token", "intruder"]);
    let deadline = Instant::now() + TIMEOUT;
    let leader = loop {
        if let Some(l) = cluster.leader_among(&[1, 2]).await {
            break l;
        }
        assert!(Instant::now() < deadline, "nodes 1 and 2 found no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (term, ..) = raft_state(
        &status(&cluster.node(leader).peer_url)
            .await
            .expect("status"),
    );
    // The stranger campaigns once its election timeout passes; wait until it has been told no.
    let n3 = cluster.node(3);
    wait_until(TIMEOUT, "node 3 logs that its token is refused", || async {
        n3.log().contains("rejects this node's cluster token")
    })
    .await;
    let s3 = status(&cluster.node(3).peer_url)
        .await
        .expect("node 3 status");
    assert_eq!(
        s3["leader"].as_u64(),
        Some(0),
        "node 3 found a leader: {s3}"
    );
    let s = status(&cluster.node(leader).peer_url)
        .await
        .expect("status");
    assert_eq!(
        (s["leader"].as_u64(), s["term"].as_u64()),
        (Some(leader), Some(term)),
        "the stranger's campaigns disturbed the cluster: {s}"
    );
    let s1 = status(&cluster.node(1).peer_url).await.expect("status");
    assert_eq!(
        common::member_ids(&s1),
        vec![1, 2, 3],
        "membership changed: {s1}"
    );
}

/// A member removed with `DELETE` exits with status 0, and a `/raft` request carrying a
/// message from its id gets 410 Gone from the remaining members (with the right token; the
/// token is still checked first).
#[tokio::test(flavor = "multi_thread")]
async fn messages_from_a_removed_member_get_410() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let stays = if leader == 3 { 1 } else { leader };
    assert_eq!(
        common::delete_member(cluster.node(stays).client_port, 3).await,
        StatusCode::NO_CONTENT
    );
    let exit = cluster.node_mut(3).wait_exit(TIMEOUT).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "removed node 3 did not exit 0: {exit:?}"
    );
    let peer = cluster.node(stays).peer_url.clone();
    let (term, commit, ..) = raft_state(&status(&peer).await.expect("status"));
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeatResponse);
    hb.from = 3;
    hb.to = stays;
    hb.term = term;
    hb.commit = commit;
    let batch = raftexample::transport::encode_batch(&[hb]);
    assert_eq!(
        peer_post(&peer, "/raft", Some(DEFAULT_TOKEN), batch.clone()).await,
        StatusCode::GONE
    );
    assert_eq!(
        peer_post(&peer, "/raft", None, batch).await,
        StatusCode::PRECONDITION_FAILED
    );
}

/// A node of another cluster with the same (default) token is refused with 412: cluster B's
/// members 1 and 2 list cluster A's node 3 as their member 3, elect a leader and send it
/// raft traffic; A's node 3 answers 412 (B's nodes log it), keeps following A's leader,
/// serves A's writes and never B's, and A's cluster id (on `/status`) differs from B's. A peer
/// request carrying another cluster id gets 412 even with the right token.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_of_another_cluster_with_the_same_token_gets_412() {
    let a = Cluster::start(3);
    let leader = a.wait_leader().await;
    assert_eq!(
        put(a.node(leader).client_port, "a-key", "a").await,
        StatusCode::NO_CONTENT
    );
    let a3 = a.node(3).peer_url.clone();
    let mut b = Cluster::new(3, &[]);
    let b_cluster = format!("{},{},{a3}", b.node(1).peer_url, b.node(2).peer_url);
    for id in [1, 2] {
        b.node_mut(id).cluster = b_cluster.clone();
        b.node_mut(id).start(&[]);
    }
    let b_leader = loop {
        if let Some(l) = b.leader_among(&[1, 2]).await {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        put(b.node(b_leader).client_port, "b-key", "b").await,
        StatusCode::NO_CONTENT
    );
    let bl = b.node(b_leader);
    wait_until(
        TIMEOUT,
        "B's leader logs that A's node 3 refuses it",
        || async {
            bl.log()
                .contains("rejects this node's cluster token or cluster id")
        },
    )
    .await;
    assert_eq!(
        put(a.node(leader).client_port, "a-key2", "a2").await,
        StatusCode::NO_CONTENT
    );
    let port3 = a.node(3).client_port;
    wait_until(TIMEOUT, "A's node 3 applied a-key2", || {
        common::serves(port3, "a-key2", "a2")
    })
    .await;
    let s3 = status(&a3).await.expect("A's node 3 is up");
    assert_eq!(s3["leader"].as_u64(), Some(leader), "{s3}");
    assert_eq!(get(port3, "b-key").await.0, StatusCode::NOT_FOUND);
    let a_id = s3["cluster_id"].as_str().expect("cluster_id").to_string();
    let sb = status(&b.node(b_leader).peer_url)
        .await
        .expect("B's status");
    assert_ne!(sb["cluster_id"].as_str(), Some(a_id.as_str()));
    for id in 1..=3 {
        let s = status(&a.node(id).peer_url).await.expect("status");
        assert_eq!(s["cluster_id"].as_str(), Some(a_id.as_str()), "{s}");
    }
    let foreign = plain_client()
        .post(format!("{a3}/raft"))
        .header(CLUSTER_HEADER, DEFAULT_TOKEN)
        .header("X-Raftexample-Cluster-Id", "0123456789abcdef")
        .body(Vec::new())
        .send()
        .await
        .expect("POST /raft");
    assert_eq!(foreign.status(), StatusCode::PRECONDITION_FAILED);
}

/// A member added later and started as the README says (`--join`, and a `--cluster` that
/// lists it too) learns the cluster id from the cluster, keeps it across a restart, and
/// takes part: it serves data written before and after.
#[tokio::test(flavor = "multi_thread")]
async fn a_joined_member_learns_the_cluster_id() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let lport = cluster.node(leader).client_port;
    assert_eq!(put(lport, "before", "1").await, StatusCode::NO_CONTENT);
    let id = cluster.add_node();
    let url = cluster.node(id).peer_url.clone();
    assert_eq!(
        common::post_member(lport, id, &url).await,
        StatusCode::NO_CONTENT
    );
    cluster.node_mut(id).start_join();
    let port4 = cluster.node(id).client_port;
    wait_until(
        TIMEOUT,
        "node 4 serves the data written before it joined",
        || common::serves(port4, "before", "1"),
    )
    .await;
    let want = status(&cluster.node(1).peer_url).await.expect("status")["cluster_id"].clone();
    assert!(want.is_string(), "node 1 has no cluster id");
    let s4 = status(&url).await.expect("node 4 status");
    assert_eq!(s4["cluster_id"], want, "{s4}");
    cluster.node_mut(id).kill9();
    cluster.node_mut(id).start_join();
    wait_until(TIMEOUT, "node 4 answers again", || async {
        status(&url).await.is_some()
    })
    .await;
    let s4 = status(&url).await.expect("node 4 status");
    assert_eq!(s4["cluster_id"], want, "after a restart: {s4}");
    // Answering /status comes before hearing from the leader again (503 until then).
    wait_until(TIMEOUT, "node 4 takes a PUT after its restart", || async {
        put(port4, "after", "2").await == StatusCode::NO_CONTENT
    })
    .await;
    let p1 = cluster.node(1).client_port;
    wait_until(TIMEOUT, "node 1 serves node 4's write", || {
        common::serves(p1, "after", "2")
    })
    .await;
}

/// Peer messages that made raft-rs panic (a heartbeat claiming a commit index beyond the
/// receiver's log, from a member and from a stranger; a ReadIndex request without its
/// context) are dropped or repaired: both nodes stay up and the cluster keeps committing.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_peer_messages_do_not_crash_a_node() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    let follower = if leader == 1 { 2 } else { 1 };
    let (lpeer, fpeer) = (
        cluster.node(leader).peer_url.clone(),
        cluster.node(follower).peer_url.clone(),
    );
    let (term, ..) = raft_state(&status(&fpeer).await.expect("status"));
    let hb = |from: u64| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term, m.commit) = (from, follower, term, 1 << 40);
        m
    };
    let batch = raftexample::transport::encode_batch(&[hb(99), hb(leader)]);
    assert_eq!(
        peer_post(&fpeer, "/raft", Some(DEFAULT_TOKEN), batch).await,
        StatusCode::NO_CONTENT
    );
    let mut read = Message::default();
    read.set_msg_type(MessageType::MsgReadIndex);
    (read.from, read.to, read.term) = (follower, leader, term);
    let batch = raftexample::transport::encode_batch(&[read]);
    assert_eq!(
        peer_post(&lpeer, "/raft", Some(DEFAULT_TOKEN), batch).await,
        StatusCode::NO_CONTENT
    );
    let fport = cluster.node(follower).client_port;
    let lport = cluster.node(leader).client_port;
    wait_until(TIMEOUT, "a write is served by the follower", || async {
        put(lport, "k", "v").await == StatusCode::NO_CONTENT
            && common::serves(fport, "k", "v").await
    })
    .await;
    for id in [leader, follower] {
        assert!(
            !cluster.node(id).log().contains("panicked"),
            "node {id} panicked"
        );
    }
}

/// Bad security settings are one-line errors and a non-zero exit, before the node serves:
/// certificate files that do not exist or hold no PEM, an `https://` peer URL without the peer
/// TLS flags, `http://` peer URLs with them, and a token that cannot be a header. (Half a set
/// of TLS flags is a usage error from clap, tested in `src/config.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn bad_security_settings_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write junk");
    let junk = junk.display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let plain = format!("http://127.0.0.1:{}", common::free_port());
    let https = format!("https://127.0.0.1:{}", common::free_port());
    let port = common::free_port().to_string();
    let peer_tls = [
        "--peer-cert-file",
        &junk,
        "--peer-key-file",
        &junk,
        "--peer-trusted-ca-file",
        &junk,
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cert-file", &missing, "--key-file", &junk],
            "missing.pem",
        ),
        (vec!["--cert-file", &junk, "--key-file", &junk], "junk.pem"),
        (vec!["--cluster", &https], "https://"),
        (
            [&["--cluster", plain.as_str()][..], &peer_tls].concat(),
            "http://",
        ),
        (
            [&["--cluster", https.as_str()][..], &peer_tls].concat(),
            "junk.pem",
        ),
        (vec!["--cluster-token", ""], "--cluster-token"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--port", port.as_str()];
        if !extra.contains(&"--cluster") {
            args.extend(["--cluster", plain.as_str()]);
        }
        args.extend(extra.iter().copied());
        let (exit, stderr) = common::run_to_exit(&args, TIMEOUT).await;
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            exit.is_some_and(|s| !s.success()),
            "{extra:?}: exit {exit:?}, stderr {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
        assert_eq!(lines.len(), 1, "{extra:?}: stderr {stderr:?}");
        assert!(
            stderr.contains(expected),
            "{extra:?}: stderr {stderr:?} does not mention {expected}"
        );
    }
}

// ----- limits: slow-loris, floods, slow bodies

/// Opens a TCP connection to the client port of a single node.
async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the client port")
}

/// Whether the server has closed `conn` (EOF or reset) within `within`; any bytes it sends
/// first (an error response) are skipped.
async fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slow-loris: with 40 connections each sending its request headers one byte a second, a
/// normal PUT and GET are still served within a couple of seconds, and the slow connections
/// are cut off by the server once `--header-timeout-ms` has passed.
#[tokio::test(flavor = "multi_thread")]
async fn slow_loris_does_not_starve_other_clients() {
    let cluster = Cluster::start_with(1, &["--header-timeout-ms", "2000"]);
    cluster.wait_leader().await;
    let port = cluster.node(1).client_port;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut lorises = Vec::new();
    for _ in 0..40 {
        let mut conn = connect(port).await;
        let stop = stop.clone();
        lorises.push(tokio::spawn(async move {
            let started = Instant::now();
            for b in b"GET /k HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1111111111111111\r\n".iter() {
                if conn.write_all(&[*b]).await.is_err() {
                    return Some(started.elapsed()); // cut off by the server
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let mut probe = [0u8; 64];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(1), conn.read(&mut probe)).await
                {
                    return Some(started.elapsed());
                }
            }
            None
        }));
    }
    for i in 0..3 {
        assert_eq!(
            put(port, "k", format!("v{i}")).await,
            StatusCode::NO_CONTENT
        );
        let started = Instant::now();
        assert_eq!(
            get(port, "k").await,
            (StatusCode::OK, format!("v{i}").into())
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a GET took {:?} with 40 slow-loris connections open",
            started.elapsed()
        );
    }
    // The slow connections are closed by the server: header timeout 2 s, and they would take
    // 60 s to send their headers.
    for loris in lorises {
        let cut = tokio::time::timeout(Duration::from_secs(20), loris)
            .await
            .expect("a slow-loris connection was not closed within 20 s")
            .expect("slow-loris task");
        let cut = cut.expect("a slow-loris connection was never closed");
        assert!(
            cut < Duration::from_secs(15),
            "a slow-loris connection lived {cut:?}"
        );
    }
    stop.cancel();
}

/// A connection flood beyond `--max-connections` (8) does not lock clients out for good:
/// while 16 silent connections are open, a new client is not served at once (the cap holds),
/// but once the flood's connections hit the header timeout (1 s) and are closed, it is served.
#[tokio::test(flavor = "multi_thread")]
async fn connection_flood_beyond_the_cap_times_out_and_clients_get_served() {
    let cluster = Cluster::start_with(
        1,
        &["--max-connections", "8", "--header-timeout-ms", "1000"],
    );
    cluster.wait_leader().await;
    let port = cluster.node(1).client_port;
    assert_eq!(put(port, "k", "v").await, StatusCode::NO_CONTENT);
    let mut flood = Vec::new();
    for _ in 0..16 {
        flood.push(connect(port).await);
    }
    // The cap holds: the first 8 silent connections take every permit for a second.
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let quick = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(
        quick
            .get(format!(
                "http://127.0.0.1:{port}/k?consistency=serializable"
            ))
            .send()
            .await
            .is_err(),
        "a request was served while 16 silent connections held a cap of 8"
    );
    // Once the flood times out, clients are served again.
    let started = Instant::now();
    assert_eq!(get(port, "k").await, (StatusCode::OK, "v".into()));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "served only after {:?}",
        started.elapsed()
    );
    for (i, conn) in flood.iter_mut().enumerate() {
        assert!(
            closed_by_server(conn, Duration::from_secs(10)).await,
            "flood connection {i} was never closed by the server"
        );
    }
}

/// A request whose body trickles in slower than `--body-timeout-ms` allows gets 408 and its
/// connection is closed; nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_arrives_gets_408() {
    let cluster = Cluster::start_with(1, &["--body-timeout-ms", "1000"]);
    cluster.wait_leader().await;
    let port = cluster.node(1).client_port;
    let mut conn = connect(port).await;
    conn.write_all(b"PUT /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nab")
        .await
        .expect("send the head and part of the body");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the server neither answered nor closed within 10 s")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "unexpected answer: {answer:?}"
    );
    assert_eq!(get(port, "slow").await.0, StatusCode::NOT_FOUND);
}

/// `POST /raft` is bounded: a body announced larger than the largest snapshot a node can
/// write (4 GiB of data) gets 413 at once, before the node reads or buffers any of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_raft_body_larger_than_any_snapshot_gets_413_at_once() {
    let cluster = Cluster::start(1);
    cluster.wait_leader().await;
    let peer = cluster.node(1).peer_url.clone();
    let port: u16 = peer
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("peer port");
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the peer port");
    let head = format!(
        "POST /raft HTTP/1.1\r\nHost: 127.0.0.1\r\n{CLUSTER_HEADER}: {DEFAULT_TOKEN}\r\n\
         Content-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        5u64 << 30
    );
    conn.write_all(head.as_bytes())
        .await
        .expect("send the head");
    conn.write_all(&[0; 1024])
        .await
        .expect("send the start of the body");
    let mut answer = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("no answer within 5 s: the node waits for the 5 GiB body")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "unexpected answer: {answer:?}"
    );
    // The node is unharmed.
    assert_eq!(
        put(cluster.node(1).client_port, "k", "v").await,
        StatusCode::NO_CONTENT
    );
}

// ----- TLS

/// A CA (or a certificate signed by one) written as PEM files in the test's directory.
struct Pki {
    dir: TempDir,
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Clone)]
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::Builder::new()
                .prefix("raftexample-test-pki-")
                .tempdir()
                .expect("temp dir for certificates"),
        }
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    }

    fn ca(&self, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        let pem = self.write(&format!("{name}-ca.pem"), &issuer.pem());
        Ca { issuer, pem }
    }

    /// A certificate for 127.0.0.1 and localhost, good for serving and for client auth.
    fn leaf(&self, ca: &Ca, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &ca.issuer).expect("sign the leaf");
        Leaf {
            cert: self.write(&format!("{name}.pem"), &cert.pem()),
            key: self.write(&format!("{name}-key.pem"), &key.serialize_pem()),
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS-only client trusting `ca`, presenting `identity` if given.
fn https_client(ca: &Path, identity: Option<&Leaf>) -> HttpsClient {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("open CA") {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(leaf) => {
            let certs = CertificateDer::pem_file_iter(&leaf.cert)
                .expect("open cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert PEM");
            let key = PrivateKeyDer::from_pem_file(&leaf.key).expect("key PEM");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One HTTPS request; `Err` with the error chain if it failed (handshake refused, ...).
async fn https(
    client: &HttpsClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(StatusCode, Bytes), String> {
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let exchange = async {
        let res = client.request(req).await.map_err(|e| {
            let mut s = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                s = format!("{s}: {c}");
                cause = c.source();
            }
            s
        })?;
        let status = StatusCode::from_u16(res.status().as_u16()).expect("status");
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// Everything the TLS test needs: certificates and the clients built on them.
struct TlsSetup {
    pki: Pki,
    peer_ca: Ca,
    client_ca: Ca,
    server: Leaf,
    /// A certificate signed by the peer CA, for reading `/status` as an operator.
    operator: Leaf,
    /// A client certificate signed by the client CA.
    user: Leaf,
}

impl TlsSetup {
    fn new() -> TlsSetup {
        let pki = Pki::new();
        let peer_ca = pki.ca("peer");
        let client_ca = pki.ca("client");
        let server = pki.leaf(&client_ca, "server");
        let operator = pki.leaf(&peer_ca, "operator");
        let user = pki.leaf(&client_ca, "user");
        TlsSetup {
            pki,
            peer_ca,
            client_ca,
            server,
            operator,
            user,
        }
    }

    /// Turns node `id` of `cluster` into an HTTPS node with its own peer certificate.
    fn secure(&self, cluster: &mut Cluster, id: u64) {
        let peer = self.pki.leaf(&self.peer_ca, &format!("peer{id}"));
        let node = cluster.node_mut(id);
        node.peer_url = node.peer_url.replace("http://", "https://");
        node.cluster = node.cluster.replace("http://", "https://");
        let path = |p: &Path| p.display().to_string();
        node.base_args.extend([
            "--peer-cert-file".into(),
            path(&peer.cert),
            "--peer-key-file".into(),
            path(&peer.key),
            "--peer-trusted-ca-file".into(),
            path(&self.peer_ca.pem),
            "--cert-file".into(),
            path(&self.server.cert),
            "--key-file".into(),
            path(&self.server.key),
            "--trusted-ca-file".into(),
            path(&self.client_ca.pem),
            "--client-cert-auth".into(),
        ]);
    }

    fn operator_client(&self) -> HttpsClient {
        https_client(&self.peer_ca.pem, Some(&self.operator))
    }

    fn user_client(&self) -> HttpsClient {
        https_client(&self.client_ca.pem, Some(&self.user))
    }
}

/// `/status` of an HTTPS peer listener, read with the operator certificate.
async fn tls_status(c: &HttpsClient, peer_url: &str) -> Option<serde_json::Value> {
    match https(c, "GET", &format!("{peer_url}/status"), &[], Bytes::new()).await {
        Ok((StatusCode::OK, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// The leader nodes `ids` agree on over HTTPS, waiting up to [`TIMEOUT`].
async fn tls_wait_leader(c: &HttpsClient, cluster: &Cluster, ids: &[u64]) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut leaders = Vec::new();
        for &id in ids {
            leaders.push(
                tls_status(c, &cluster.node(id).peer_url)
                    .await
                    .and_then(|s| s["leader"].as_u64()),
            );
        }
        if let Some(Some(l)) = leaders.first() {
            if *l != 0 && leaders.iter().all(|x| *x == Some(*l)) {
                return *l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed leader over HTTPS: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `GET <base>/<key>` over HTTPS answers 200 with `value`.
async fn tls_serves(c: &HttpsClient, port: u16, key: &str, value: &str) -> bool {
    let url = format!("https://127.0.0.1:{port}/{key}");
    matches!(https(c, "GET", &url, &[], Bytes::new()).await,
        Ok((StatusCode::OK, body)) if body == value.as_bytes())
}

/// A TLS cluster (client API over HTTPS with client certificates, peers over mutual TLS):
/// - a PUT over HTTPS on one node is readable over HTTPS on the others (replication over
///   mutual TLS works);
/// - a client without a certificate cannot use the client API, and plain HTTP to the TLS
///   client port gets a 400 and is never served (nothing stored);
/// - a stranger on the peer port — no certificate, a certificate from another CA, or plain
///   HTTP — cannot get a `/raft` request through (the handshake fails), even with the right
///   cluster token, and the node's term stays put;
/// - a membership change sent to a follower is forwarded to the leader over mutual TLS, an
///   `http://` peer URL is refused with 400, and the new member joins over HTTPS.
#[tokio::test(flavor = "multi_thread")]
async fn tls_cluster_serves_https_and_refuses_strangers() {
    let tls = TlsSetup::new();
    let mut cluster = Cluster::new(3, &[]);
    for id in 1..=3 {
        tls.secure(&mut cluster, id);
    }
    for id in 1..=3 {
        cluster.node_mut(id).start(&[]);
    }
    let operator = tls.operator_client();
    let user = tls.user_client();
    let leader = tls_wait_leader(&operator, &cluster, &[1, 2, 3]).await;
    let port = |id: u64| cluster.node(id).client_port;

    // Replication over mutual TLS.
    let url = format!("https://127.0.0.1:{}/my-key", port(leader));
    assert_eq!(
        https(&user, "PUT", &url, &[], "secret").await,
        Ok((StatusCode::NO_CONTENT, Bytes::new()))
    );
    for id in 1..=3 {
        let p = port(id);
        let user = &user;
        wait_until(
            TIMEOUT,
            &format!("node {id} serves my-key over HTTPS"),
            || tls_serves(user, p, "my-key", "secret"),
        )
        .await;
    }

    // Client API: a client certificate is required, plain HTTP is refused.
    let anonymous = https_client(&tls.client_ca.pem, None);
    let res = https(&anonymous, "GET", &url, &[], Bytes::new()).await;
    assert!(res.is_err(), "served without a client certificate: {res:?}");
    let mut conn = TcpStream::connect(("127.0.0.1", port(leader)))
        .await
        .expect("connect");
    conn.write_all(b"PUT /plain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .expect("send plain HTTP");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "plain HTTP on the TLS port got {answer:?}"
    );
    let plain_key = format!("https://127.0.0.1:{}/plain", port(leader));
    assert_eq!(
        https(&user, "GET", &plain_key, &[], Bytes::new())
            .await
            .map(|(s, _)| s),
        Ok(StatusCode::NOT_FOUND),
        "a plain-HTTP PUT was served"
    );

    // Strangers on the peer port.
    let target = if leader == 1 { 2 } else { 1 };
    let peer_url = cluster.node(target).peer_url.clone();
    let (term, ..) = raft_state(&tls_status(&operator, &peer_url).await.expect("status"));
    let batch = hostile_batch(leader, target, term + 1000, 0);
    let raft_url = format!("{peer_url}/raft");
    let rogue_ca = tls.pki.ca("rogue");
    let rogue = tls.pki.leaf(&rogue_ca, "rogue-peer");
    let strangers = [
        ("no certificate", https_client(&tls.peer_ca.pem, None)),
        (
            "a certificate from another CA",
            https_client(&tls.peer_ca.pem, Some(&rogue)),
        ),
        (
            "a client-API certificate",
            https_client(&tls.peer_ca.pem, Some(&tls.user)),
        ),
    ];
    for (what, client) in &strangers {
        let res = https(
            client,
            "POST",
            &raft_url,
            &[(CLUSTER_HEADER, DEFAULT_TOKEN)],
            batch.clone(),
        )
        .await;
        assert!(res.is_err(), "a peer with {what} got an answer: {res:?}");
    }
    let plain_peer = peer_url.replace("https://", "http://");
    let res = plain_client()
        .post(format!("{plain_peer}/raft"))
        .header(CLUSTER_HEADER, DEFAULT_TOKEN)
        .body(batch.clone())
        .send()
        .await;
    if let Ok(r) = &res {
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "plain HTTP to the TLS peer port was served"
        );
    }
    let s = tls_status(&operator, &peer_url).await.expect("status");
    let (term2, ..) = raft_state(&s);
    assert!(term2 < term + 1000, "a stranger's term was adopted: {s}");
    assert!(
        !tls_serves(
            &user,
            port(target),
            "forged?consistency=serializable",
            "evil"
        )
        .await,
        "a stranger's entry was applied"
    );

    // Membership over TLS: POST /4 on a follower is forwarded to the leader.
    let follower = if leader == 1 { 2 } else { 1 };
    let follower_port = port(follower);
    let id4 = cluster.add_node();
    tls.secure(&mut cluster, id4);
    let url4 = cluster.node(id4).peer_url.clone();
    assert!(url4.starts_with("https://"));
    let post = |body: String| {
        let url = format!("https://127.0.0.1:{follower_port}/{id4}");
        let user = &user;
        async move { https(user, "POST", &url, &[], body).await.map(|(s, _)| s) }
    };
    assert_eq!(
        post(url4.replace("https://", "http://")).await,
        Ok(StatusCode::BAD_REQUEST),
        "an http:// member URL in a TLS cluster"
    );
    assert_eq!(post(url4.clone()).await, Ok(StatusCode::NO_CONTENT));
    cluster.node_mut(id4).start_join();
    let p4 = cluster.node(id4).client_port;
    wait_until(CONVERGE_TIMEOUT, "node 4 serves my-key over HTTPS", || {
        tls_serves(&user, p4, "my-key", "secret")
    })
    .await;
}
