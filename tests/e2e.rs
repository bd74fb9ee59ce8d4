//! End-to-end tests: the real `raftexample` binary, one process per node, driven over HTTP the
//! way the README's curl session drives it, on ephemeral 127.0.0.1 ports and temp data dirs.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{
    delete_member, free_port, get, member_ids, post_member, put, run_to_exit, serves, status,
    wait_until, wait_voters, Cluster, StatusCode, TIMEOUT,
};

/// Walks the README session on a 3-node cluster and proves, in order:
/// - a PUT acknowledged (204) by node 1 is readable on node 1 at once and on nodes 2 and 3;
/// - after node 2 is SIGKILLed the remaining majority still commits writes, and node 2,
///   restarted on the same data dir, recovers and serves the value written while it was down;
/// - `POST /4` adds a member; node 4 started with `--join` catches up, serves the data, and
///   accepts writes itself;
/// - `DELETE /3` removes node 3, which then exits by itself with status 0, and the remaining
///   members keep committing writes.
#[tokio::test(flavor = "multi_thread")]
async fn readme_session() {
    let mut cluster = Cluster::start(3);
    let port = |cluster: &Cluster, id: u64| cluster.node(id).client_port;
    cluster.wait_leader().await;

    // curl -L http://127.0.0.1:12380/my-key -XPUT -d foo
    assert_eq!(
        put(port(&cluster, 1), "my-key", "foo").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        get(port(&cluster, 1), "my-key").await,
        (StatusCode::OK, "foo".into()),
        "a 204 PUT is applied on the node that answered it"
    );
    for id in [2, 3] {
        let p = port(&cluster, id);
        wait_until(TIMEOUT, &format!("node {id} serves my-key=foo"), || {
            serves(p, "my-key", "foo")
        })
        .await;
    }

    // Fault tolerance: node 2 crashes, the majority (1, 3) goes on.
    cluster.node_mut(2).kill9();
    cluster.wait_leader().await;
    assert_eq!(
        put(port(&cluster, 1), "my-key", "bar").await,
        StatusCode::NO_CONTENT
    );
    let p3 = port(&cluster, 3);
    wait_until(TIMEOUT, "node 3 serves my-key=bar", || {
        serves(p3, "my-key", "bar")
    })
    .await;

    // Node 2 restarts on its data dir and catches up.
    cluster.node_mut(2).start(&[]);
    let p2 = port(&cluster, 2);
    wait_until(TIMEOUT, "restarted node 2 serves my-key=bar", || {
        serves(p2, "my-key", "bar")
    })
    .await;

    // Add node 4: POST /4 with its peer URL, then start it with --join.
    let id4 = cluster.add_node();
    assert_eq!(id4, 4);
    let url4 = cluster.node(4).peer_url.clone();
    assert_eq!(
        post_member(port(&cluster, 1), 4, &url4).await,
        StatusCode::NO_CONTENT
    );
    cluster.node_mut(4).start_join();
    let p4 = port(&cluster, 4);
    wait_until(TIMEOUT, "joined node 4 serves my-key=bar", || {
        serves(p4, "my-key", "bar")
    })
    .await;
    assert_eq!(put(p4, "my-key", "baz").await, StatusCode::NO_CONTENT);
    assert_eq!(get(p4, "my-key").await, (StatusCode::OK, "baz".into()));
    let p1 = port(&cluster, 1);
    wait_until(TIMEOUT, "node 1 serves my-key=baz", || {
        serves(p1, "my-key", "baz")
    })
    .await;

    // Node 4 joined as a learner; once the leader has promoted it, no change is pending.
    wait_voters(&cluster.node(1).peer_url, &[1, 2, 3, 4], &[]).await;
    // Remove node 3: it applies its own removal and exits with status 0.
    assert_eq!(delete_member(p1, 3).await, StatusCode::NO_CONTENT);
    let exit = cluster
        .node_mut(3)
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("node 3 exits within 10 s of its removal");
    assert!(
        exit.success(),
        "removed node 3 exits with status 0, got {exit}"
    );
    let members = status(&cluster.node(1).peer_url)
        .await
        .map(|s| member_ids(&s))
        .expect("node 1 answers GET /status");
    assert_eq!(members, vec![1, 2, 4], "members on node 1 after DELETE /3");

    // The remaining members {1, 2, 4} keep working.
    cluster.wait_leader().await;
    assert_eq!(put(p1, "my-key", "qux").await, StatusCode::NO_CONTENT);
    for id in [2, 4] {
        let p = port(&cluster, id);
        wait_until(TIMEOUT, &format!("node {id} serves my-key=qux"), || {
            serves(p, "my-key", "qux")
        })
        .await;
    }
}

/// Proves that bad command-line input (an `--id` outside `--cluster`, a peer URL with a path, a
/// peer or client port already in use) makes the daemon exit non-zero with a one-line error on
/// stderr, instead of panicking like the original.
#[tokio::test(flavor = "multi_thread")]
async fn bad_cli_input_is_one_line_error() {
    let three_urls = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{},http://127.0.0.1:{}",
        free_port(),
        free_port(),
        free_port()
    );
    // Held open for the whole test, so these ports are really in use.
    let busy_peer = TcpListener::bind("127.0.0.1:0").expect("bind a listener to occupy a port");
    let busy_client = TcpListener::bind("127.0.0.1:0").expect("bind a listener to occupy a port");
    let busy_peer_port = busy_peer.local_addr().expect("local_addr").port();
    let busy_client_port = busy_client.local_addr().expect("local_addr").port();

    let free_client_port = free_port().to_string();
    let free_peer_url = format!("http://127.0.0.1:{}", free_port());
    let busy_peer_url = format!("http://127.0.0.1:{busy_peer_port}");
    let busy_client_port = busy_client_port.to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "--id outside --cluster",
            vec![
                "--id",
                "5",
                "--cluster",
                three_urls.as_str(),
                "--port",
                free_client_port.as_str(),
            ],
        ),
        (
            "peer URL with a path",
            vec![
                "--cluster",
                "http://127.0.0.1:1/x",
                "--port",
                free_client_port.as_str(),
            ],
        ),
        (
            "peer port in use",
            vec![
                "--cluster",
                busy_peer_url.as_str(),
                "--port",
                free_client_port.as_str(),
            ],
        ),
        (
            "client port in use",
            vec![
                "--cluster",
                free_peer_url.as_str(),
                "--port",
                busy_client_port.as_str(),
            ],
        ),
    ];

    let mut failures = Vec::new();
    for (case, args) in &cases {
        let (exit, stderr) = run_to_exit(args, Duration::from_secs(10)).await;
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let problem = match exit {
            None => Some("still running after 10 s (killed)".to_string()),
            Some(s) if s.success() => Some(format!("exited with {s}, expected a failure")),
            Some(_) if lines.len() != 1 => {
                Some(format!("wrote {} lines to stderr, expected 1", lines.len()))
            }
            Some(_) if stderr.contains("panicked") || stderr.contains("backtrace") => {
                Some("panicked instead of reporting an error".to_string())
            }
            Some(_) => None,
        };
        if let Some(problem) = problem {
            failures.push(format!(
                "case {case:?} (args {args:?}): {problem}\n--- stderr ---\n{stderr}--- end ---"
            ));
        }
    }
    drop((busy_peer, busy_client));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
