//! raftexample-rs: a replicated key-value daemon, a Rust port of etcd's `contrib/raftexample`.
//!
//! ```text
//!  client ──HTTP──▶ http_api ──put──▶ kvstore ──propose_tx──▶ ┌──────────────┐ ──POST /raft──▶ peers
//!                      │  ──conf_change_tx───────────────────▶ │ raft_node    │ ◀─raft_msg_tx── transport
//!                      │  ──read_tx (ReadIndex)──────────────▶ │ (I/O shell)  │ ◀─report_tx──── (senders)
//!                      ▼                                       │ ┌──────────┐ │ ─Job─▶ WAL writer thread
//!                   kvstore ◀──commit_tx: Apply::{Entries,     │ │node::Node│ │ ◀─Persisted──
//!                                         Snapshot, Dropped}── │ └──────────┘ │ ─task─▶ snapshot thread
//!                                                              └──────────────┘
//! ```
//!
//! * [`channels`]: what the channels carry, the one vocabulary of both ends.
//! * [`kvstore`]: the map, PUT proposals and their waiters, the apply task.
//! * [`node`]: the deterministic core: every decision of the raft task (RawNode's Ready
//!   handling, proposals, reads, membership and learners, snapshot policy, recovery), with no
//!   clock, socket or thread; its inputs are calls and its effects an [`node::Output`].
//! * [`raft_node`]: the shell that carries the core's effects out: the ticker and channels,
//!   the WAL writer thread ([`wal::writer`]), the snapshot thread, the [`transport`].
//! * [`storage`]: the in-memory raft log (etcd's MemoryStorage semantics); [`wal`] and [`snap`]
//!   the files, over the [`vfs`] interface (the OS, or a simulated disk in tests).
//! * [`transport`]: `POST /raft` in and per-peer batching senders out, with the cluster token.
//! * [`http_api`]: the client routes and `/status`, `/health`, `/metrics`; [`backup`] serves
//!   `GET /backup` on the peer port and [`restore`] writes a new cluster from one.
//! * [`server`]: the accept loop of both ports (connection cap, header and body timeouts,
//!   TLS); [`tls`] builds its rustls configs, [`peer_client`] the client that talks to peers.
//! * [`logging`]: the log formats; [`dump`]: `wal-dump`.
//!
//! [`run`] wires them together; one [`CancellationToken`] stops the daemon.

pub mod backup;
pub mod channels;
pub mod cluster_id;
pub mod config;
pub mod dump;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod http_api;
pub mod kvstore;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod nonce;
pub mod peer_client;
pub mod raft_node;
pub mod restore;
pub mod server;
pub mod snap;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod vfs;
pub mod wal;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use channels::Exit;
pub use config::Config;
pub use error::{Error, Result};

use channels::{ConfChangeRequest, GetSnapshot, NodeStatus, ReadRequest};
use kvstore::KvStore;
use raft_node::{Inputs, RaftNode, Shared};

/// Bound of the proposal, read and peer-message channels: enough to batch many requests into
/// one Ready, small enough to push back on clients when raft falls behind.
pub const CHANNEL: usize = 4096;

/// What [`start_raft`] hands back (raftexample's `newRaftNode` returns commitC and errorC).
pub struct RaftHandle {
    pub commit_rx: mpsc::Receiver<channels::Apply>,
    /// errorC: the raft task's result, once it stops.
    pub error_rx: oneshot::Receiver<Result<Exit>>,
    pub status: Arc<Mutex<NodeStatus>>,
    /// `POST /raft`, for the caller to serve on the peer listener (with more routes if it likes).
    pub peer_router: axum::Router,
    /// Cancelled once the raft loop has stopped: the peer listener and the senders outlive it,
    /// so that a stopping leader can still hand over.
    pub network_stop: CancellationToken,
    /// What the transport sends with (cluster token, peer TLS), for other requests to peers.
    pub peer_client: peer_client::PeerClient,
}

/// Starts the raft task. It replays the snapshot and WAL first; the snapshot it restores is
/// the first message on `commit_rx`. Cancelling `stop` stops raft, then its network.
pub fn start_raft(
    cfg: &Config,
    get_snapshot: GetSnapshot,
    propose_rx: mpsc::Receiver<channels::Proposal>,
    conf_change_rx: mpsc::Receiver<ConfChangeRequest>,
    read_rx: mpsc::Receiver<ReadRequest>,
    logger: &slog::Logger,
    stop: CancellationToken,
) -> Result<RaftHandle> {
    let cluster_id = cluster_id::ClusterId::from_config(cfg, logger)?;
    let peer_client = peer_client::PeerClient::from_config(cfg, cluster_id.clone())?;
    // The token this node sends is the one it requires.
    let cluster_token = peer_client.cluster_token();
    let (raft_msg_tx, raft_msg_rx) = mpsc::channel(CHANNEL);
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let (commit_tx, commit_rx) = mpsc::channel(256);
    let status = Arc::new(Mutex::new(NodeStatus {
        id: cfg.id,
        role: "follower",
        ..Default::default()
    }));
    let removed = Arc::new(RwLock::new(HashSet::new()));
    let (error_tx, error_rx) = oneshot::channel::<Result<Exit>>();
    let network_stop = CancellationToken::new();
    let shared = Shared {
        commit_tx,
        removed: removed.clone(),
        status: status.clone(),
        report_tx,
        shutdown: network_stop.clone(),
        peer_client: peer_client.clone(),
    };
    let inputs = Inputs {
        propose_rx,
        conf_change_rx,
        read_rx,
        raft_msg_rx,
        report_rx,
    };
    tokio::spawn(raft_task(
        cfg.clone(),
        shared,
        get_snapshot,
        inputs,
        stop,
        network_stop.clone(),
        error_tx,
        logger.clone(),
    ));

    let peer_router = transport::router(transport::PeerState {
        raft_msg_tx,
        removed,
        cluster_token,
        cluster_id,
        stop: network_stop.clone(),
        logger: logger.new(slog::o!("component" => "peer-http")),
    });
    Ok(RaftHandle {
        commit_rx,
        error_rx,
        status,
        peer_router,
        network_stop,
        peer_client,
    })
}

/// The raft task: replays the snapshot and WAL, runs the loop, and reports how it ended on
/// `error_tx` (raftexample's errorC) once it has stopped its network.
#[allow(clippy::too_many_arguments)]
async fn raft_task(
    cfg: Config,
    shared: Shared,
    get_snapshot: GetSnapshot,
    inputs: Inputs,
    stop: CancellationToken,
    network_stop: CancellationToken,
    error_tx: oneshot::Sender<Result<Exit>>,
    logger: slog::Logger,
) {
    // Replaying the snapshot and WAL is blocking file I/O: it runs on a blocking thread; the
    // loop itself is a task like any other, so handing it a proposal, a read or a peer message
    // is a task wake-up, not a thread switch.
    let recovered = tokio::task::spawn_blocking(move || {
        RaftNode::recover(&cfg, &shared, get_snapshot, &logger).map(|node| (node, shared))
    })
    .await;
    let res = match recovered {
        Ok(Ok((node, shared))) => {
            let res = node.run(inputs, stop).await;
            // `shared` (with the commit sender) drops here, which ends the apply task.
            drop(shared);
            res
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Error::Recovery(format!("the replay task failed: {e}"))),
    };
    network_stop.cancel();
    let _ = error_tx.send(res);
}

/// Everything the peer listener serves: raft's routes, then `/status` (with the kv digest),
/// the membership changes followers forward (behind the cluster token) and `/backup`.
fn peer_routes(
    raft: axum::Router,
    status: Arc<Mutex<NodeStatus>>,
    api: &http_api::ApiState,
    logger: &slog::Logger,
) -> axum::Router {
    let digest_kv = api.kv.clone();
    raft.merge(http_api::status_router(
        status,
        Some(Arc::new(move || digest_kv.digest())),
    ))
    .merge(transport::require_cluster_token(
        http_api::forwarded_router(api.clone()),
        api.peers.cluster_token(),
        api.peers.cluster_id(),
        logger,
    ))
    .merge(backup::router(backup::BackupState::new(
        api.clone(),
        logger.new(slog::o!("component" => "backup")),
    )))
}

/// Runs one node until `shutdown` is cancelled (SIGINT/SIGTERM), the node is removed from the
/// cluster, or a fatal error. Both listeners are bound by the caller, so a port in use is
/// reported before anything starts.
pub async fn run(
    cfg: Config,
    peer_listener: TcpListener,
    client_listener: TcpListener,
    logger: slog::Logger,
    shutdown: CancellationToken,
) -> Result<Exit> {
    cfg.validate()?;
    // Certificate files are read before anything starts, so that a bad one is a clean error.
    let client_tls = tls::client_api_server(&cfg.tls_files())?;
    let peer_tls = tls::peer_server(&cfg.tls_files())?;
    let limits = server::Limits::from_config(&cfg);
    // Raft outlives the client API during shutdown so that in-flight requests can finish.
    let raft_stop = CancellationToken::new();
    let (api, handle) = start_kv_and_raft(&cfg, &logger, raft_stop.clone())?;
    let RaftHandle {
        commit_rx,
        error_rx,
        status,
        peer_router,
        network_stop,
        ..
    } = handle;
    let kv = api.kv.clone();
    let client_stop = CancellationToken::new();
    let peer_router = peer_routes(peer_router, status, &api, &logger);
    let peer_server = tokio::spawn(server::serve(
        peer_listener,
        peer_router,
        peer_tls,
        limits,
        network_stop.clone(),
        logger.new(slog::o!("listener" => "peer")),
    ));
    let apply_task = tokio::spawn(kv.run_apply(commit_rx));
    let client_router = http_api::client_router(api, cfg.max_request_bytes);
    let https = client_tls.is_some();
    let client_server = tokio::spawn(server::serve(
        client_listener,
        client_router,
        client_tls,
        limits,
        client_stop.clone(),
        logger.new(slog::o!("listener" => "client")),
    ));
    slog::info!(logger, "serving"; "peer" => cfg.own_url()?.url, "client" => cfg.client_addr()?,
        "client_tls" => https, "client_cert_auth" => cfg.client_cert_auth,
        "max_connections" => cfg.max_connections);

    let tasks = Tasks {
        client_server,
        client_stop,
        raft_stop,
        peer_server,
        apply_task,
    };
    tasks
        .finish(error_rx, shutdown, cfg.request_timeout(), &logger)
        .await
}

/// The kvstore and the raft task with the channels between them (raftexample's `main`), and
/// the client API's handle on both.
fn start_kv_and_raft(
    cfg: &Config,
    logger: &slog::Logger,
    raft_stop: CancellationToken,
) -> Result<(http_api::ApiState, RaftHandle)> {
    let (propose_tx, propose_rx) = mpsc::channel(CHANNEL);
    let (conf_change_tx, conf_change_rx) = mpsc::channel(16);
    let (read_tx, read_rx) = mpsc::channel(CHANNEL);
    let nonce = nonce::boot_nonce().map_err(|e| Error::Io {
        context: "cannot read a boot nonce from /dev/urandom".into(),
        source: e,
    })?;
    let kv = KvStore::new(cfg.id, nonce, propose_tx, logger);
    let snap_kv = kv.clone();
    let handle = start_raft(
        cfg,
        Box::new(move || Box::new(snap_kv.capture_for_snapshot())),
        propose_rx,
        conf_change_rx,
        read_rx,
        logger,
        raft_stop,
    )?;
    let api = http_api::ApiState {
        kv,
        conf_change_tx,
        read_tx,
        timeout: cfg.request_timeout(),
        peers: handle.peer_client.clone(),
    };
    Ok((api, handle))
}

/// What [`run`] started, to stop in order.
struct Tasks {
    client_server: tokio::task::JoinHandle<()>,
    client_stop: CancellationToken,
    raft_stop: CancellationToken,
    peer_server: tokio::task::JoinHandle<()>,
    apply_task: tokio::task::JoinHandle<()>,
}

impl Tasks {
    /// Waits for raft to stop on its own or for `shutdown`; then the client API drains first
    /// (raft outlives it so in-flight requests can finish), then raft, then the rest.
    async fn finish(
        self,
        mut error_rx: oneshot::Receiver<Result<Exit>>,
        shutdown: CancellationToken,
        request_timeout: Duration,
        logger: &slog::Logger,
    ) -> Result<Exit> {
        let result = tokio::select! {
            res = &mut error_rx => res,
            _ = shutdown.cancelled() => {
                slog::info!(logger, "shutting down: draining client requests");
                self.client_stop.cancel();
                // In-flight requests end within their timeout.
                let grace = request_timeout + Duration::from_secs(1);
                let _ = tokio::time::timeout(grace, self.client_server).await;
                self.raft_stop.cancel();
                error_rx.await
            }
        };
        self.client_stop.cancel();
        self.raft_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.peer_server).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.apply_task).await;
        result.unwrap_or(Err(Error::Recovery("the raft task died".into())))
    }
}
