//! Linearizability of PUT and GET on a cluster of the real binary, under crashes: concurrent
//! clients record a history of their operations, nodes are SIGKILLed and restarted meanwhile,
//! and the Wing–Gong–Lowe checker of `common/linearizability.rs` must find the history
//! linearizable. Also runs the checker's own unit tests.

#[path = "common/linearizability.rs"]
mod checker;
mod common;
#[path = "common/history.rs"]
mod history;
use common::{seed, Rng};
use history::{check_or_dump, client, final_reads, Counts, HistoryLoad};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use checker::Op;
use common::{healthy, poll_until, wait_until, Cluster, TIMEOUT};

const KEYS: [&str; 3] = ["/lin-a", "/lin-b", "/lin-c"];
const CLIENTS: usize = 6;
/// How long the clients run at least.
const LOAD: Duration = Duration::from_secs(10);
/// The daemons' `--request-timeout-ms`, and the clients' own timeout a bit above it.
const DAEMON_TIMEOUT: &str = "2000";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);

/// Starts `CLIENTS` clients on every node of `cluster`; they run until `HistoryLoad::stop` is set.
fn start_load(cluster: &Cluster, seed: u64) -> (Arc<HistoryLoad>, Vec<JoinHandle<Vec<Op>>>) {
    let ports = cluster.nodes.iter().map(|n| n.client_port).collect();
    let load = Arc::new(HistoryLoad::new(ports, CLIENT_TIMEOUT, TIMEOUT));
    let clients = (0..CLIENTS)
        .map(|c| {
            let key = |_: &HistoryLoad, rng: &mut Rng| KEYS[rng.below(KEYS.len())].to_string();
            tokio::spawn(client(c, load.clone(), seed, key))
        })
        .collect();
    (load, clients)
}

/// Lets the load run until `LOAD` has passed, stops the clients, adds one final GET per key
/// and node, and checks the history. `faults` describes what happened, for the messages.
async fn finish_and_check(
    cluster: &Cluster,
    load: Arc<HistoryLoad>,
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
    let nodes: Vec<(u64, u16)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id, n.client_port))
        .collect();
    final_reads(&load.http(), &nodes, KEYS, &load.clock, &mut history).await;

    let Counts {
        completed,
        puts_done,
        reads_of_values,
        ..
    } = check_or_dump(
        &history,
        &format!("linearizability-{}-{seed}", std::process::id()),
        &format!("load {load_time:?}; {faults}; seed {seed}"),
    );
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
