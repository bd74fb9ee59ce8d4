//! Linearizability of PUT and GET on a cluster of the real binary, under crashes: concurrent
//! clients record a history of their operations, nodes are SIGKILLed and restarted meanwhile,
//! and the Wing–Gong–Lowe checker of `common/linearizability.rs` must find the history
//! linearizable. Also runs the checker's own unit tests.

#[path = "common/linearizability.rs"]
mod checker;
mod common;
use common::{seed, Rng};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use checker::{check, Clock, Kind, Op};
use common::{healthy, poll_until, wait_until, Cluster, StatusCode, TIMEOUT};

const KEYS: [&str; 3] = ["/lin-a", "/lin-b", "/lin-c"];
const CLIENTS: usize = 6;
/// How long the clients run at least.
const LOAD: Duration = Duration::from_secs(10);
/// The daemons' `--request-timeout-ms`, and the clients' own timeout a bit above it.
const DAEMON_TIMEOUT: &str = "2000";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

/// What the clients share with the test body.
struct Load {
    ports: Vec<u16>,
    clock: Clock,
    stop: AtomicBool,
    /// Operations that completed with a definite answer (204, 200, 404).
    completed: AtomicUsize,
    started: Instant,
}

impl Load {
    fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    /// Waits until `more` operations beyond the current count have completed.
    async fn wait_more(&self, more: usize, what: &str) {
        let target = self.completed() + more;
        wait_until(
            TIMEOUT,
            &format!("{more} more operations complete {what}"),
            || async move { self.completed() >= target },
        )
        .await;
    }
}

/// The outcome of one PUT as the history records it.
enum PutOutcome {
    /// 204: applied, returned at this time.
    Done(u64),
    /// May or may not take effect: no return time.
    Unknown,
    /// Definitely not applied (503 "not applied", or the connection was never made): dropped.
    NotApplied,
}

/// One client: random PUTs (unique values) and GETs on random keys and nodes until told to
/// stop. Returns its part of the history.
async fn client(id: usize, load: Arc<Load>, seed: u64) -> Vec<Op> {
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("build a reqwest client");
    let mut rng = Rng::new(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut history = Vec::new();
    for seq in 0..1_000_000usize {
        if load.stop.load(Ordering::SeqCst) {
            break;
        }
        let port = load.ports[rng.below(load.ports.len())];
        let key = KEYS[rng.below(KEYS.len())];
        let url = format!("http://127.0.0.1:{port}{key}");
        if rng.below(2) == 0 {
            let value = format!("c{id}-{seq}");
            let call = load.clock.now();
            let outcome = match http.put(&url).body(value.clone()).send().await {
                Ok(r) if r.status() == StatusCode::NO_CONTENT => PutOutcome::Done(load.clock.now()),
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    if status == StatusCode::SERVICE_UNAVAILABLE && body.starts_with("not applied")
                    {
                        PutOutcome::NotApplied
                    } else if status == StatusCode::SERVICE_UNAVAILABLE {
                        PutOutcome::Unknown
                    } else {
                        panic!("client {id}: PUT {url} answered {status} {body:?}");
                    }
                }
                // Nothing was sent: the node is down or not listening yet.
                Err(e) if e.is_connect() => PutOutcome::NotApplied,
                // Sent, then the connection broke or timed out.
                Err(_) => PutOutcome::Unknown,
            };
            let ret = match outcome {
                PutOutcome::Done(t) => Some(t),
                PutOutcome::Unknown => None,
                PutOutcome::NotApplied => continue,
            };
            if ret.is_some() {
                load.completed.fetch_add(1, Ordering::SeqCst);
            }
            history.push(Op {
                client: id,
                key: key.to_string(),
                kind: Kind::Put(value),
                call,
                ret,
            });
        } else if let Some(op) = get(&http, id, &url, key, &load.clock).await {
            load.completed.fetch_add(1, Ordering::SeqCst);
            history.push(op);
        }
    }
    history
}

/// A linearizable GET as a history operation; `None` if it failed (a failed read says
/// nothing about the register).
async fn get(
    http: &reqwest::Client,
    client: usize,
    url: &str,
    key: &str,
    clock: &Clock,
) -> Option<Op> {
    let call = clock.now();
    let response = http.get(url).send().await.ok()?;
    let kind = match response.status() {
        StatusCode::OK => Kind::Get(Some(response.text().await.ok()?)),
        StatusCode::NOT_FOUND => Kind::Get(None),
        StatusCode::SERVICE_UNAVAILABLE => return None,
        other => panic!("client {client}: GET {url} answered {other}"),
    };
    Some(Op {
        client,
        key: key.to_string(),
        kind,
        call,
        ret: Some(clock.now()),
    })
}

/// Starts `CLIENTS` clients on every node of `cluster`; they run until `Load::stop` is set.
fn start_load(cluster: &Cluster, seed: u64) -> (Arc<Load>, Vec<JoinHandle<Vec<Op>>>) {
    let load = Arc::new(Load {
        ports: cluster.nodes.iter().map(|n| n.client_port).collect(),
        clock: Clock::new(),
        stop: AtomicBool::new(false),
        completed: AtomicUsize::new(0),
        started: Instant::now(),
    });
    let clients = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, load.clone(), seed)))
        .collect();
    (load, clients)
}

/// Lets the load run until `LOAD` has passed, stops the clients, adds one final GET per key
/// and node, and checks the history. `faults` describes what happened, for the messages.
async fn finish_and_check(
    cluster: &Cluster,
    load: Arc<Load>,
    clients: Vec<JoinHandle<Vec<Op>>>,
    seed: u64,
    faults: &str,
) {
    let loaded = poll_until(LOAD + TIMEOUT, || async { load.started.elapsed() >= LOAD }).await;
    assert!(loaded);
    load.stop.store(true, Ordering::SeqCst);
    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await.expect("client task"));
    }
    let load_time = load.started.elapsed();

    // Final reads on every node: each must see the key's last write.
    cluster.wait_leader().await;
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("build a reqwest client");
    for node in &cluster.nodes {
        for key in KEYS {
            let url = format!("http://127.0.0.1:{}{key}", node.client_port);
            let op = get(&http, 100 + node.id as usize, &url, key, &load.clock)
                .await
                .unwrap_or_else(|| panic!("final GET {url} failed"));
            history.push(op);
        }
    }

    let completed = history.iter().filter(|op| op.ret.is_some()).count();
    let puts_done = history
        .iter()
        .filter(|op| matches!(op.kind, Kind::Put(_)) && op.ret.is_some())
        .count();
    let unknown = history.iter().filter(|op| op.ret.is_none()).count();
    let reads_of_values = history
        .iter()
        .filter(|op| matches!(op.kind, Kind::Get(Some(_))))
        .count();
    let checked = Instant::now();
    let result = check(&history);
    let check_time = checked.elapsed();
    eprintln!(
        "{} operations in {load_time:?} ({completed} completed: {puts_done} PUTs, \
         {reads_of_values} GETs of a value; {unknown} PUTs of unknown outcome); {faults}; \
         checked in {check_time:?}: {result:?}",
        history.len()
    );
    if let Err(e) = result {
        let path = std::env::temp_dir().join(format!(
            "raftexample-linearizability-{}-{seed}.history",
            std::process::id()
        ));
        let mut sorted: Vec<&Op> = history.iter().collect();
        sorted.sort_by_key(|op| op.call);
        let text: Vec<String> = sorted.iter().map(|op| op.to_string()).collect();
        let saved = std::fs::write(&path, text.join("\n") + "\n");
        panic!(
            "history is not linearizable ({faults}; seed {seed}; whole history in {}: \
             {saved:?}):\n{e}",
            path.display()
        );
    }
    assert!(completed > 300, "only {completed} operations completed");
    assert!(puts_done > 100, "only {puts_done} PUTs completed");
    assert!(
        reads_of_values > 100,
        "only {reads_of_values} GETs saw a value"
    );
}

/// Six clients run random PUTs (each value unique) and linearizable GETs on three keys against
/// random nodes of a 3-node cluster for at least 10 s, while a random node is SIGKILLed and
/// restarted, twice (the second time the leader, if the first victim was not). Then one GET
/// per key and node. The recorded history, where a PUT with an unknown outcome (503 "outcome
/// unknown", timeout, broken connection) may take effect at any time after its call or never,
/// must be linearizable, and must hold enough completed operations (reads that saw written
/// values included) not to pass vacuously.
#[tokio::test(flavor = "multi_thread")]
async fn history_under_crashes_is_linearizable() {
    let seed = seed();
    eprintln!("crashes: seed {seed} (set RAFTEXAMPLE_TEST_SEED to reuse it)");
    let mut rng = Rng::new(seed);
    let mut cluster = Cluster::start_with(3, &["--request-timeout-ms", DAEMON_TIMEOUT]);
    cluster.wait_leader().await;
    let (load, clients) = start_load(&cluster, seed);

    let mut victims = Vec::new();
    for round in 0..2 {
        load.wait_more(100, &format!("before crash {round}")).await;
        let leader = cluster.leader_among(&[1, 2, 3]).await;
        let hit_leader_before = victims.iter().any(|(_, was_leader)| *was_leader);
        let victim = match leader {
            Some(l) if round == 1 && !hit_leader_before => l,
            _ => rng.below(3) as u64 + 1,
        };
        victims.push((victim, leader == Some(victim)));
        cluster.node_mut(victim).kill9();
        load.wait_more(100, &format!("while node {victim} is down"))
            .await;
        cluster.node_mut(victim).start(&[]);
        let peer = cluster.node(victim).peer_url.clone();
        wait_until(
            TIMEOUT,
            &format!("restarted node {victim} is healthy"),
            || healthy(&peer),
        )
        .await;
    }
    load.wait_more(100, "after the last restart").await;
    let faults = format!("crashed (node, was leader): {victims:?}");
    finish_and_check(&cluster, load, clients, seed, &faults).await;
}

/// The same load while a node is cut off from the others by the transport's fault injection
/// (feature `fault-injection`), twice: first the leader, which keeps running and keeps
/// receiving client requests in its minority of one (the classic stale-leader trap: it must
/// neither acknowledge a write nor serve a read it cannot confirm with a quorum), then a
/// random node. Each partition lasts until the majority has completed 100 operations, then
/// heals and the node catches up. The history must be linearizable.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn history_under_partitions_is_linearizable() {
    let seed = seed();
    eprintln!("partitions: seed {seed} (set RAFTEXAMPLE_TEST_SEED to reuse it)");
    let mut rng = Rng::new(seed);
    let cluster = Cluster::start_with_faults(3, &["--request-timeout-ms", DAEMON_TIMEOUT]);
    cluster.wait_leader().await;
    let (load, clients) = start_load(&cluster, seed);

    let mut isolated = Vec::new();
    for round in 0..2 {
        load.wait_more(100, &format!("before partition {round}"))
            .await;
        let leader = cluster.leader_among(&[1, 2, 3]).await;
        let victim = match leader {
            Some(l) if round == 0 => l,
            _ => rng.below(3) as u64 + 1,
        };
        isolated.push((victim, leader == Some(victim)));
        cluster.isolate(victim).await;
        let majority: Vec<u64> = (1..=3).filter(|id| *id != victim).collect();
        wait_until(
            TIMEOUT,
            &format!("nodes {majority:?} agree on a leader"),
            || {
                let cluster = &cluster;
                let majority = &majority;
                async move { cluster.leader_among(majority).await.is_some() }
            },
        )
        .await;
        load.wait_more(100, &format!("while node {victim} is cut off"))
            .await;
        cluster.heal().await;
        let peer = cluster.node(victim).peer_url.clone();
        wait_until(TIMEOUT, &format!("healed node {victim} is healthy"), || {
            healthy(&peer)
        })
        .await;
    }
    load.wait_more(100, "after the last partition healed").await;
    let faults = format!("isolated (node, was leader): {isolated:?}");
    finish_and_check(&cluster, load, clients, seed, &faults).await;
}
