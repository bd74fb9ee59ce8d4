//! Issue 17 on the real binary: `GET /backup` under write load, `raftexample restore` into a
//! new cluster (which refuses the old one), damaged backups refused, and machine-readable logs
//! (`--log-format json`) with each key once per line in both formats.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A backup of `peer_url`, saved as `path`; checks that the length announced is the length sent.
async fn take_backup(peer_url: &str, path: &Path) -> raftexample::backup::Header {
    let resp = http_client(Duration::from_secs(30))
        .get(format!("{peer_url}/backup"))
        .send()
        .await
        .expect("GET /backup");
    assert_eq!(resp.status(), StatusCode::OK);
    let announced = resp.content_length().expect("a Content-Length");
    let body = resp.bytes().await.expect("the backup body");
    assert_eq!(body.len() as u64, announced);
    std::fs::write(path, &body).expect("save the backup");
    raftexample::backup::verify(&body)
        .expect("a backup that verifies")
        .header
}

fn restore(backup: &Path, id: u64, cluster: &str, data_dir: &Path) -> Output {
    Command::new(BIN)
        .args(["restore", "--backup"])
        .arg(backup)
        .args(["--id", &id.to_string(), "--cluster", cluster, "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run raftexample restore")
}

fn wipe(node: &Node) {
    for dir in [node.wal_dir(), node.snap_dir()] {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
}

/// PUTs `load-<task>-<i>` until `stop`, recording when each was acknowledged.
fn write_load(
    port: u16,
    task: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = pooled_client();
        for i in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let key = format!("load-{task}-{i}");
            if try_put_with(&client, port, &key, key.clone()).await == Some(StatusCode::NO_CONTENT)
            {
                acked.lock().unwrap().push((key, Instant::now()));
            }
        }
    })
}

/// Fill, back up under write load, kill and wipe every member, restore 3 members and start
/// them: every key acknowledged before the backup was asked for reads back, from a cluster with
/// a new identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_into_a_new_cluster() {
    let mut cluster = Cluster::start_with(3, &["--snapshot-count", "200"]);
    let leader = cluster.wait_leader().await;
    let port = cluster.node(leader).client_port;
    let client = pooled_client();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..400 {
        let (key, value) = (format!("fill-{i}"), format!("{i}-{}", "v".repeat(i % 300)));
        assert_eq!(
            try_put_with(&client, port, &key, value.clone()).await,
            Some(StatusCode::NO_CONTENT)
        );
        acked.insert(key, value);
    }
    let old_id = status(&cluster.node(1).peer_url).await.unwrap()["cluster_id"].clone();

    let stop = Arc::new(AtomicBool::new(false));
    let load_acks = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|t| write_load(port, t, stop.clone(), load_acks.clone()))
        .collect();
    wait_until(TIMEOUT, "the load is being acknowledged", || async {
        load_acks.lock().unwrap().len() >= 50
    })
    .await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let asked = Instant::now();
    let header = take_backup(&cluster.node(follower).peer_url, &file).await;
    // More writes after the backup: they must not matter.
    let after = load_acks.lock().unwrap().len();
    wait_until(TIMEOUT, "writes after the backup", || async {
        load_acks.lock().unwrap().len() >= after + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    for (key, at) in load_acks.lock().unwrap().iter() {
        if *at < asked {
            acked.insert(key.clone(), key.clone());
        }
    }
    assert!(header.index > 400 && header.term >= 2, "{header:?}");

    let urls = cluster.node(1).cluster.clone();
    for id in 1..=3 {
        cluster.node_mut(id).kill9();
        wipe(cluster.node(id));
        let out = restore(&file, id, &urls, cluster.node(id).dir.path());
        assert!(out.status.success(), "{out:?}");
    }
    for id in 1..=3 {
        cluster.node_mut(id).start(&[]);
    }
    let leader = cluster.wait_leader().await;
    let port = cluster.node(leader).client_port;
    let client = pooled_client();
    for (key, value) in &acked {
        let got = try_get_with(&client, port, key).await;
        assert_eq!(
            got,
            Some((StatusCode::OK, value.clone().into())),
            "key {key}"
        );
    }
    let new_id = status(&cluster.node(1).peer_url).await.unwrap()["cluster_id"].clone();
    assert!(
        new_id.is_string() && new_id != old_id,
        "{old_id} -> {new_id}"
    );
    assert_eq!(
        try_put_with(&client, port, "after-restore", "x").await,
        Some(StatusCode::NO_CONTENT)
    );
}

/// A member restored on the URL of an old member (whose data was wiped) is refused by the old
/// cluster's members, and refuses them: their cluster ids differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_member_refuses_the_old_cluster() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader().await;
    assert_eq!(
        put(cluster.node(leader).client_port, "k", "v").await,
        StatusCode::NO_CONTENT
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    take_backup(&cluster.node(leader).peer_url, &file).await;
    let stranger = (1..=3).find(|&id| id != leader).unwrap();
    cluster.node_mut(stranger).kill9();
    wipe(cluster.node(stranger));
    let urls = cluster.node(1).cluster.clone();
    let out = restore(&file, stranger, &urls, cluster.node(stranger).dir.path());
    assert!(out.status.success(), "{out:?}");
    let log_from = cluster.node(leader).log_len();
    cluster.node_mut(stranger).start(&[]);
    let (old, new) = (cluster.node(leader), cluster.node(stranger));
    wait_until(
        TIMEOUT,
        "both sides refuse the other's cluster id",
        || async {
            new.log()
                .contains("rejected peer request from another cluster")
                && old
                    .log_since(log_from)
                    .contains("rejected peer request from another cluster")
        },
    )
    .await;
    let s = status(&new.peer_url)
        .await
        .expect("status of the restored member");
    assert_eq!(s["leader"].as_u64(), Some(0), "{s}");
    assert_eq!(
        put(old.client_port, "k2", "v2").await,
        StatusCode::NO_CONTENT
    );
}

fn damaged(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// One line on stderr, a non-zero exit, and no member directory left behind.
fn assert_refused(out: &Output, data_dir: &Path, id: u64, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{why}: restore succeeded");
    assert_eq!(stderr.lines().count(), 1, "{why}: {stderr}");
    assert!(
        stderr.starts_with("raftexample: restore: "),
        "{why}: {stderr}"
    );
    for sub in [
        format!("raftexample-{id}"),
        format!("raftexample-{id}-snap"),
    ] {
        assert!(!data_dir.join(&sub).exists(), "{why}: {sub} left behind");
    }
    let leftovers = std::fs::read_dir(data_dir).map_or(0, |d| {
        d.filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with('.')
        })
        .count()
    });
    assert_eq!(leftovers, 0, "{why}: a temporary directory was left");
}

/// Truncated and bit-flipped backups, an --id outside --cluster and a data dir that holds a
/// member already are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_backups_and_bad_input_are_refused() {
    let cluster = Cluster::start(1);
    cluster.wait_leader().await;
    for i in 0..20 {
        assert_eq!(
            put(cluster.node(1).client_port, &format!("k{i}"), "v").await,
            StatusCode::NO_CONTENT
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.snap");
    take_backup(&cluster.node(1).peer_url, &good).await;
    let bytes = std::fs::read(&good).unwrap();
    let target = dir.path().join("member");
    let urls = "http://127.0.0.1:1,http://127.0.0.1:2";
    let mut cases = vec![
        ("empty", damaged(dir.path(), "empty", b"")),
        ("header only", damaged(dir.path(), "head", &bytes[..20])),
        (
            "truncated",
            damaged(dir.path(), "short", &bytes[..bytes.len() - 1]),
        ),
        ("missing", dir.path().join("no-such-file")),
    ];
    for at in [0, 15, bytes.len() / 2, bytes.len() - 2] {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x10;
        cases.push((
            "bit flipped",
            damaged(dir.path(), &format!("flip{at}"), &flipped),
        ));
    }
    for (why, file) in &cases {
        assert_refused(&restore(file, 1, urls, &target), &target, 1, why);
    }
    assert!(!target.exists(), "a refused restore created the data dir");
    assert_refused(&restore(&good, 3, urls, &target), &target, 3, "--id 3");
    let out = restore(&good, 1, urls, &target);
    assert!(out.status.success(), "{out:?}");
    let again = restore(&good, 1, urls, &target);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds data"));
    let out = restore(&good, 2, urls, &target);
    assert!(out.status.success(), "{out:?}");
}

/// The keys of one JSON object, duplicates kept (serde_json would keep only the last).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

fn assert_unique(keys: &[String], line: &str) {
    let mut seen = std::collections::HashSet::new();
    for k in keys {
        assert!(seen.insert(k), "key {k:?} repeats in {line}");
    }
}

/// Keys of a human-format line: `<date> <time> <LEVEL> <message>, key: value, ...`. raft-rs
/// writes `key: value` lists in brackets inside its messages (`[logterm: 1, index: 3]`) and
/// in braces inside values (`Configuration { voters: {1} }`): those are left out.
fn human_keys(line: &str) -> Vec<String> {
    let mut depth = 0i32;
    let outside: String = line
        .chars()
        .filter(|&c| {
            match c {
                '[' | '{' => depth += 1,
                ']' | '}' => depth -= 1,
                _ => return depth == 0,
            }
            false
        })
        .collect();
    outside
        .split(", ")
        .skip(1)
        .filter_map(|part| part.split_once(": ").map(|(k, _)| k))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == ' ')
        })
        .map(str::to_string)
        .collect()
}

/// Nodes 1 and 2 log JSON, node 3 the human format; after a start, writes, a backup and a
/// restart, every line of 1 and 2 is a JSON object with timestamp, level and message, and no
/// line of any node repeats a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_have_each_key_once() {
    let mut cluster = Cluster::new(3, &[]);
    cluster.node_mut(1).start(&["--log-format", "json"]);
    cluster.node_mut(2).start(&["--log-format", "json"]);
    cluster.node_mut(3).start(&[]);
    let leader = cluster.wait_leader().await;
    for i in 0..10 {
        let port = cluster.node(leader).client_port;
        assert_eq!(
            put(port, &format!("k{i}"), "v").await,
            StatusCode::NO_CONTENT
        );
    }
    let dir = tempfile::tempdir().unwrap();
    take_backup(&cluster.node(2).peer_url, &dir.path().join("b")).await;
    cluster.node_mut(1).kill9();
    cluster.node_mut(1).start(&["--log-format", "json"]);
    cluster.wait_leader().await;
    let node1 = cluster.node(1);
    wait_until(TIMEOUT, "node 1 serves k9 again", || {
        serves(node1.client_port, "k9", "v")
    })
    .await;

    for id in [1, 2] {
        let log = cluster.node(id).log();
        assert!(log.lines().count() > 10, "node {id} logged little:\n{log}");
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("node {id}: not JSON ({e}): {line}"));
            for field in ["timestamp", "level", "message"] {
                assert!(v[field].is_string(), "node {id}: no {field}: {line}");
            }
            assert_eq!(v["id"], id, "node {id}: {line}");
            let keys: Keys = serde_json::from_str(line).unwrap();
            assert_unique(&keys.0, line);
        }
        assert!(log.contains("\"message\":\"RawNode created with id"));
    }
    let log = cluster.node(3).log();
    assert!(
        log.contains("RawNode created with id 3., id: 3, raft_id: 3\n"),
        "{log}"
    );
    for line in log.lines() {
        assert_unique(&human_keys(line), line);
    }
}
