//! In-process helpers: nodes started through the library (`start_raft` / `run`) on listeners
//! bound to 127.0.0.1:0, each with its own temporary data directory.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use raftexample::channels::{ConfChangeRequest, GetSnapshot, ReadRequest};
use raftexample::kvstore::{Apply, Captured, Map, Proposal};
use raftexample::{start_raft, Config, RaftHandle};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub fn logger() -> slog::Logger {
    if std::env::var_os("TEST_LOG").is_some() {
        use slog::Drain;
        let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
        let drain = slog_term::FullFormat::new(decorator).build().fuse();
        slog::Logger::root(std::sync::Mutex::new(drain).fuse(), slog::o!())
    } else {
        slog::Logger::root(slog::Discard, slog::o!())
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Binds `n` peer listeners on loopback and returns them with the `--cluster` value.
pub async fn peer_listeners(n: usize) -> (Vec<TcpListener>, String) {
    let mut ls = Vec::new();
    for _ in 0..n {
        ls.push(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback"),
        );
    }
    let cluster = ls
        .iter()
        .map(|l| format!("http://{}", l.local_addr().expect("bound listener")))
        .collect::<Vec<_>>()
        .join(",");
    (ls, cluster)
}

pub fn config(id: u64, cluster: &str, dir: &std::path::Path, extra: &[&str]) -> Config {
    let id = id.to_string();
    let dir = dir.to_str().expect("utf-8 temp dir");
    let mut args = vec![
        "raftexample",
        "--id",
        &id,
        "--cluster",
        cluster,
        "--data-dir",
        dir,
    ];
    args.extend_from_slice(extra);
    Config::parse_from(args)
}

/// A raft node driven through its channels, as raftexample's raft_test.go drives `newRaftNode`.
pub struct RawTestNode {
    pub cfg: Config,
    pub propose_tx: Option<mpsc::Sender<Proposal>>,
    pub conf_change_tx: mpsc::Sender<ConfChangeRequest>,
    pub read_tx: mpsc::Sender<ReadRequest>,
    pub handle: RaftHandle,
    pub stop: CancellationToken,
    pub dir: PathBuf,
}

impl RawTestNode {
    pub fn start(cfg: Config, listener: TcpListener) -> RawTestNode {
        Self::start_with_snapshots(cfg, listener, Box::new(|| Box::new(Captured(Map::new()))))
    }

    /// [`Self::start`] with the state machine's snapshot source replaced by `get_snapshot`.
    pub fn start_with_snapshots(
        cfg: Config,
        listener: TcpListener,
        get_snapshot: GetSnapshot,
    ) -> RawTestNode {
        let (propose_tx, propose_rx) = mpsc::channel(64);
        let (conf_change_tx, conf_change_rx) = mpsc::channel(4);
        let (read_tx, read_rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let handle = start_raft(
            &cfg,
            get_snapshot,
            propose_rx,
            conf_change_rx,
            read_rx,
            &logger(),
            stop.clone(),
        )
        .expect("start raft");
        let router = handle.peer_router.clone();
        let network_stop = handle.network_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(network_stop.cancelled_owned())
                .await
        });
        RawTestNode {
            dir: cfg.snap_dir(),
            cfg,
            propose_tx: Some(propose_tx),
            conf_change_tx,
            read_tx,
            handle,
            stop,
        }
    }

    /// True once this node knows a leader (before that, raft drops proposals).
    pub fn knows_leader(&self) -> bool {
        self.handle.status.lock().expect("status lock").leader != 0
    }

    /// Proposes `data`. Raft reports only a drop, as `Apply::Dropped` on `commit_rx`.
    pub async fn propose(&self, id: u64, data: &[u8]) {
        let tx = self.propose_tx.as_ref().expect("proposer still open");
        tx.send(Proposal {
            id,
            data: data.to_vec(),
        })
        .await
        .expect("raft running");
    }

    /// Next batch of committed entries, acknowledging snapshots and empty batches on the way.
    pub async fn next_entries(&mut self) -> (u64, Vec<Vec<u8>>, oneshot::Sender<()>) {
        loop {
            match self
                .handle
                .commit_rx
                .recv()
                .await
                .expect("commit channel open")
            {
                Apply::Entries {
                    index,
                    data,
                    applied,
                    ..
                } => return (index, data.iter().map(|b| b.to_vec()).collect(), applied),
                Apply::Snapshot { .. } | Apply::SnapshotFile { .. } | Apply::Dropped { .. } => {}
            }
        }
    }

    pub fn snap_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".snap"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// A full node (kvstore, raft, client API) run in this process through `raftexample::run`.
pub struct KvTestNode {
    pub client: String,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<raftexample::Result<raftexample::Exit>>,
}

impl KvTestNode {
    pub async fn start(cfg: Config, peer: TcpListener) -> KvTestNode {
        let client_l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let client = format!("http://{}", client_l.local_addr().expect("bound"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(raftexample::run(
            cfg,
            peer,
            client_l,
            logger(),
            stop.clone(),
        ));
        KvTestNode { client, stop, task }
    }

    /// Stops the node as SIGTERM would and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let res = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("node stops within 15 s")
            .expect("node task did not panic");
        res.expect("clean shutdown");
    }
}

pub fn http() -> reqwest::Client {
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

pub async fn put(c: &reqwest::Client, base: &str, key: &str, value: &[u8]) -> u16 {
    match c
        .put(format!("{base}{key}"))
        .body(value.to_vec())
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// (status, body); status 0 if the request itself failed.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    match c.get(url).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
        }
        Err(_) => (0, Vec::new()),
    }
}
