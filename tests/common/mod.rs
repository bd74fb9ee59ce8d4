//! Harness for multi-process tests: it runs the real `raftexample` binary, one OS process per
//! node, on free 127.0.0.1 ports, each node with its own `TempDir` as `--data-dir`.
//!
//! Typical use:
//! ```ignore
//! let mut cluster = Cluster::start(3);                 // spawns 3 processes
//! let leader = cluster.wait_leader().await;            // polls GET /status on every node
//! assert_eq!(put(cluster.node(1).client_port, "k", "v").await, StatusCode::NO_CONTENT);
//! let port2 = cluster.node(2).client_port;
//! wait_until(TIMEOUT, "node 2 serves k=v", || serves(port2, "k", "v")).await;
//! cluster.node_mut(2).kill9();                         // SIGKILL, same data dir kept
//! cluster.node_mut(2).start(&[]);                      // restart from WAL and snapshot
//! ```
//!
//! - Processes: [`Cluster`] (`start`, `start_with`, `new`, `add_node`, `node`, `node_mut`,
//!   `wait_leader`), [`Node`] (`start`, `start_join`, `kill9`, `sigterm`, `wait_exit`, `log`),
//!   [`run_to_exit`] for one-shot runs, [`free_port`].
//! - HTTP: [`put`], [`get`], [`try_get`], [`serves`], [`post_member`], [`delete_member`],
//!   [`status`], [`member_ids`].
//! - Waiting: [`wait_until`] (panics with a message), [`poll_until`] (returns a bool).
//!
//! Rules (style.md §7.9): no fixed sleeps, every wait is a poll with a deadline; every child is
//! killed when its `Node` drops; when a test panics, each node's captured stdout and stderr (the
//! daemon's slog output) are printed, so the failure can be read from `cargo test` output.
//!
//! Set `RAFTEXAMPLE_TEST_KEEP=1` to keep the nodes' data directories after the test (their paths
//! are printed).

// Each test crate (`tests/*.rs`) compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use reqwest::StatusCode;
use tempfile::TempDir;

/// Path of the daemon binary that Cargo built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_raftexample");

/// Default deadline for a condition to become true (replication, restart, catch-up).
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// Interval between two polls in [`wait_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Per-request timeout of the HTTP helpers. Longer than the daemon's default
/// `--request-timeout-ms` (5 s), so a daemon-side timeout shows up as its 503, not as ours.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Name of the file, inside a node's data dir, that receives the node's stdout and stderr.
const LOG_FILE: &str = "node.log";

/// Ports handed out by [`free_port`] in this test process, so that two nodes never get the same
/// one, and the next candidate to try.
static PORTS: Mutex<Option<PortPicker>> = Mutex::new(None);

/// Lowest port [`free_port`] hands out.
const MIN_PORT: u16 = 15000;

struct PortPicker {
    handed_out: HashSet<u16>,
    /// `[MIN_PORT, end)`: the ports below the kernel's ephemeral range, or empty if that range
    /// starts too low to leave room (then the kernel chooses, with `127.0.0.1:0`).
    end: u16,
    next: u16,
}

impl PortPicker {
    fn new() -> PortPicker {
        let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let end = ephemeral_start.max(MIN_PORT);
        // A random start, so that test processes running at the same time (two `cargo test`s)
        // try different ports.
        let random = RandomState::new().build_hasher().finish();
        let span = u64::from(end - MIN_PORT).max(1);
        PortPicker {
            handed_out: HashSet::new(),
            end,
            next: MIN_PORT + (random % span) as u16,
        }
    }

    /// The next candidate port, or 0 (kernel's choice) if there is no range of our own.
    fn candidate(&mut self) -> u16 {
        if self.end - MIN_PORT < 1000 {
            return 0;
        }
        let port = self.next;
        self.next = if port + 1 >= self.end {
            MIN_PORT
        } else {
            port + 1
        };
        port
    }
}

/// Returns a TCP port that was free on 127.0.0.1 a moment ago.
///
/// The port must be passed to a *different process* on its command line, so this binds it,
/// reads it and drops the listener; there is a tiny race: another process may take the port
/// between this drop and the daemon's bind, and then the daemon exits with "address in use" and
/// the test fails with that node's log. To make that unlikely, ports come from below the kernel's
/// ephemeral range (which `127.0.0.1:0` and every outgoing connection draw from, the daemons' own
/// connections to their peers included), starting at a random point. Ports are never handed out
/// twice within one test process.
pub fn free_port() -> u16 {
    let mut picker = PORTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let picker = picker.get_or_insert_with(PortPicker::new);
    for _ in 0..10_000 {
        let candidate = picker.candidate();
        let Ok(listener) = TcpListener::bind(("127.0.0.1", candidate)) else {
            continue; // in use: try the next one
        };
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        if picker.handed_out.insert(port) {
            return port;
        }
    }
    panic!("found no free TCP port on 127.0.0.1 after 10000 attempts");
}

/// One daemon process (or a slot for one) with its identity, ports and data directory.
pub struct Node {
    /// Raft node id: the 1-based position of `peer_url` in `cluster`.
    pub id: u64,
    /// This node's peer URL, e.g. `http://127.0.0.1:40123`; also serves `GET /status`.
    pub peer_url: String,
    /// Port of the client KV API (`--port`).
    pub client_port: u16,
    /// The node's `--data-dir`; it survives restarts and is removed when the `Node` drops.
    pub dir: TempDir,
    /// The `--cluster` value this node starts with.
    pub cluster: String,
    /// Arguments added to every start of this node (e.g. small snapshot settings).
    pub base_args: Vec<String>,
    /// The running process, if any.
    pub child: Option<Child>,
}

impl Node {
    /// Creates a node slot (no process yet) with a fresh data dir.
    fn new(
        id: u64,
        peer_url: String,
        client_port: u16,
        cluster: String,
        base_args: Vec<String>,
    ) -> Node {
        let keep =
            std::env::var_os("RAFTEXAMPLE_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0");
        let dir = tempfile::Builder::new()
            .prefix(&format!("raftexample-test-node{id}-"))
            .disable_cleanup(keep)
            .tempdir()
            .expect("create a temporary data dir for a test node");
        if keep {
            eprintln!("node {id}: keeping data dir {}", dir.path().display());
        }
        Node {
            id,
            peer_url,
            client_port,
            dir,
            cluster,
            base_args,
            child: None,
        }
    }

    /// Path of the file holding everything this node printed (all its starts, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Contents of [`Node::log_path`], or a note saying why it could not be read.
    pub fn log(&self) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path().display()),
        }
    }

    /// True while a process started by this harness has not been seen to exit.
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the daemon: `--id --cluster --port --data-dir`, then `base_args`, then `extra_args`.
    ///
    /// # Panics
    /// If the node is already running or the binary cannot be spawned.
    pub fn start(&mut self, extra_args: &[&str]) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the node's log file in its data dir");
        let log_for_stdout = log
            .try_clone()
            .expect("clone the log file handle for stdout");
        let mut cmd = Command::new(BIN);
        cmd.arg("--id")
            .arg(self.id.to_string())
            .arg("--cluster")
            .arg(&self.cluster)
            .arg("--port")
            .arg(self.client_port.to_string())
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.base_args)
            .args(extra_args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log_for_stdout)
            .stderr(log);
        kill_when_parent_dies(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN} for node {}: {e}", self.id));
        self.child = Some(child);
    }

    /// Starts the daemon with `--join`, for a node added with [`post_member`].
    pub fn start_join(&mut self) {
        self.start(&["--join"]);
    }

    /// Kills the process with SIGKILL (a crash: no WAL close, no goodbye) and reaps it.
    /// The data dir is kept, so [`Node::start`] restarts the node from its WAL and snapshot.
    ///
    /// # Panics
    /// If the node is not running.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("kill9: node {} is not running", self.id));
        // Child::kill sends SIGKILL on Unix. It fails only if the child was already reaped.
        child.kill().expect("send SIGKILL to the node process");
        child.wait().expect("reap the killed node process");
    }

    /// Sends SIGTERM (graceful shutdown); use [`Node::wait_exit`] to collect the exit status.
    ///
    /// # Panics
    /// If the node is not running.
    pub fn sigterm(&self) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("sigterm: node {} is not running", self.id));
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) node {}: {}",
            self.id,
            std::io::Error::last_os_error()
        );
    }

    /// Polls the process every 50 ms until it exits or `timeout` passes.
    /// Returns its exit status (and forgets the process), or `None` if it is still running.
    ///
    /// # Panics
    /// If the node is not running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let id = self.id;
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("wait_exit: node {id} is not running"));
            if let Some(status) = child.try_wait().expect("try_wait on the node process") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Ignore errors: the process may have exited on its own already.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "\n===== node {} ({}, client port {}) log: {} =====\n{}===== end of node {} log =====",
                self.id,
                self.peer_url,
                self.client_port,
                self.log_path().display(),
                self.log(),
                self.id,
            );
        }
    }
}

/// Asks the kernel to SIGKILL the child if the test process dies (e.g. it is SIGKILLed itself),
/// so that no daemon outlives an aborted test run and keeps its ports.
///
/// Linux only (`PR_SET_PDEATHSIG`). The signal fires when the *thread* that spawned the child exits;
/// the nodes are spawned from the test's body, whose thread lives until the test ends, and the
/// `Drop` of [`Node`] has killed them by then anyway.
fn kill_when_parent_dies(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs the binary once with `args` (and `--data-dir` set to a fresh temp dir unless `args` has
/// one), stdin closed, until it exits or `timeout` passes (then it is killed).
/// Returns the exit status (`None` on timeout) and everything it wrote to stderr.
pub async fn run_to_exit(args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String) {
    let dir = tempfile::Builder::new()
        .prefix("raftexample-test-cli-")
        .tempdir()
        .expect("create a temporary dir for a one-shot run");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = File::create(&stderr_path).expect("create the stderr capture file");
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if !args.contains(&"--data-dir") {
        cmd.arg("--data-dir").arg(dir.path());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    kill_when_parent_dies(&mut cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN} {args:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on a one-shot run") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let stderr = match std::fs::read(&stderr_path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", stderr_path.display()),
    };
    (status, stderr)
}

/// A set of nodes sharing one `--cluster` list; node `i` (1-based) is `nodes[i - 1]`.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// Arguments given to every node, including nodes added later with [`Cluster::add_node`].
    pub base_args: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes with default settings. See [`Cluster::start_with`].
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Starts `n` nodes on fresh ports and data dirs; `args` go to every node (e.g.
    /// `&["--snapshot-count", "4", "--snapshot-catchup-entries", "2"]`).
    pub fn start_with(n: usize, args: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(n, args);
        for node in &mut cluster.nodes {
            node.start(&[]);
        }
        cluster
    }

    /// Like [`Cluster::start_with`] but starts no process: call `node_mut(id).start(..)` yourself.
    pub fn new(n: usize, args: &[&str]) -> Cluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let peer_urls: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let cluster_arg = peer_urls.join(",");
        let base_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let nodes = peer_urls
            .into_iter()
            .enumerate()
            .map(|(i, url)| {
                Node::new(
                    i as u64 + 1,
                    url,
                    free_port(),
                    cluster_arg.clone(),
                    base_args.clone(),
                )
            })
            .collect();
        Cluster { nodes, base_args }
    }

    /// Adds a node slot with id `len + 1` and a fresh peer URL, client port and data dir, and
    /// returns its id. Its `--cluster` lists every existing node's URL followed by its own.
    /// Nothing is started: `post_member(.., id, &peer_url)` then `node_mut(id).start_join()`.
    pub fn add_node(&mut self) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let mut urls: Vec<&str> = self.nodes.iter().map(|n| n.peer_url.as_str()).collect();
        urls.push(&peer_url);
        let cluster_arg = urls.join(",");
        let node = Node::new(
            id,
            peer_url,
            free_port(),
            cluster_arg,
            self.base_args.clone(),
        );
        self.nodes.push(node);
        id
    }

    /// The node with raft id `id`.
    pub fn node(&self, id: u64) -> &Node {
        let index = usize::try_from(id).expect("node id fits in usize");
        assert!(
            index >= 1 && index <= self.nodes.len(),
            "no node with id {id}"
        );
        &self.nodes[index - 1]
    }

    /// The node with raft id `id`, mutably (to start, kill or wait for it).
    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        let index = usize::try_from(id).expect("node id fits in usize");
        assert!(
            index >= 1 && index <= self.nodes.len(),
            "no node with id {id}"
        );
        &mut self.nodes[index - 1]
    }

    /// Waits until every started node reports, on `GET /status`, the same non-zero leader, and
    /// that leader is a started node that reports `"role":"leader"`. Returns the leader's id.
    ///
    /// # Panics
    /// After [`TIMEOUT`], with the last statuses seen.
    pub async fn wait_leader(&self) -> u64 {
        let started: Vec<&Node> = self.nodes.iter().filter(|n| n.is_started()).collect();
        assert!(!started.is_empty(), "wait_leader: no node is running");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut statuses = Vec::new();
            for node in &started {
                statuses.push((node.id, status(&node.peer_url).await));
            }
            if let Some(leader) = agreed_leader(&statuses) {
                return leader;
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> = statuses
                    .iter()
                    .map(|(id, s)| match s {
                        Some(v) => format!("node {id}: {v}"),
                        None => format!("node {id}: unreachable"),
                    })
                    .collect();
                panic!(
                    "no agreed leader among nodes {:?} after {TIMEOUT:?}; last statuses:\n{}",
                    started.iter().map(|n| n.id).collect::<Vec<_>>(),
                    seen.join("\n")
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The leader id all `statuses` agree on, if they all answered, agree, and the leader is among
/// them and calls itself leader.
fn agreed_leader(statuses: &[(u64, Option<serde_json::Value>)]) -> Option<u64> {
    let mut leader = None;
    for (_, status) in statuses {
        let l = status.as_ref()?.get("leader")?.as_u64()?;
        if l == 0 || leader.is_some_and(|prev| prev != l) {
            return None;
        }
        leader = Some(l);
    }
    let leader = leader?;
    let (_, leader_status) = statuses.iter().find(|(id, _)| *id == leader)?;
    let role = leader_status.as_ref()?.get("role")?.as_str()?;
    (role == "leader").then_some(leader)
}

/// Polls `condition` every 50 ms until it returns true.
///
/// # Panics
/// If it is still false after `timeout`, with a message naming `what` was awaited.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_until(timeout, condition).await {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}

/// Polls `condition` every 50 ms until it returns true (→ `true`) or `timeout` passes (→ `false`).
pub async fn poll_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A client for one request. Each `#[tokio::test]` has its own runtime and a reqwest client's
/// connection pool is tied to the runtime that made it, so clients are not shared between tests.
fn client() -> reqwest::Client {
    http_client(HTTP_TIMEOUT)
}

/// A reqwest client whose requests give up after `timeout`. Proxies from the environment are
/// ignored: every URL here is on 127.0.0.1.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    // reqwest (rustls-no-provider) needs a process-wide provider for its own config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("build a reqwest client")
}

/// URL of `key` on the client API; `key` may be given with or without its leading `/`.
/// The daemon stores the path *with* the slash, as the original did.
fn key_url(port: u16, key: &str) -> String {
    format!("http://127.0.0.1:{port}/{}", key.trim_start_matches('/'))
}

/// `PUT /<key>` with `value` as body; returns the status (204 once committed and applied).
///
/// # Panics
/// If the node cannot be reached.
pub async fn put(port: u16, key: &str, value: impl Into<Vec<u8>>) -> StatusCode {
    let url = key_url(port, key);
    let response = client()
        .put(&url)
        .body(value.into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    response.status()
}

/// `GET /<key>`; returns the status and body.
///
/// # Panics
/// If the node cannot be reached. Use [`try_get`] while a node may be down or starting.
pub async fn get(port: u16, key: &str) -> (StatusCode, Bytes) {
    let url = key_url(port, key);
    try_get(port, key)
        .await
        .unwrap_or_else(|| panic!("GET {url}: node unreachable"))
}

/// `GET /<key>`; `None` if the node cannot be reached (not listening yet, killed, ...).
pub async fn try_get(port: u16, key: &str) -> Option<(StatusCode, Bytes)> {
    let response = client().get(key_url(port, key)).send().await.ok()?;
    let status = response.status();
    let body = response.bytes().await.ok()?;
    Some((status, body))
}

/// True if `GET /<key>` on `port` answers 200 with exactly `value`.
pub async fn serves(port: u16, key: &str, value: &str) -> bool {
    try_get(port, key)
        .await
        .is_some_and(|(status, body)| status == StatusCode::OK && body == value.as_bytes())
}

/// `POST /<id>` with `peer_url` as body: adds member `id` (204 once the change is applied).
///
/// # Panics
/// If the node cannot be reached.
pub async fn post_member(port: u16, id: u64, peer_url: &str) -> StatusCode {
    let url = format!("http://127.0.0.1:{port}/{id}");
    client()
        .post(&url)
        .body(peer_url.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .status()
}

/// `DELETE /<id>`: removes member `id` (204 once the change is applied).
///
/// # Panics
/// If the node cannot be reached.
pub async fn delete_member(port: u16, id: u64) -> StatusCode {
    let url = format!("http://127.0.0.1:{port}/{id}");
    client()
        .delete(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DELETE {url}: {e}"))
        .status()
}

/// `GET <peer_url>/status` parsed as JSON, e.g. `{"id":1,"role":"leader","leader":1,"term":2,
/// "commit":10,"applied":10,"members":{"1":"http://127.0.0.1:12379"}}`.
/// `None` if the node cannot be reached or does not answer 200 with JSON.
pub async fn status(peer_url: &str) -> Option<serde_json::Value> {
    let response = client()
        .get(format!("{peer_url}/status"))
        .send()
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body = response.bytes().await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// Ids listed in a status's `members` object, sorted.
pub fn member_ids(status: &serde_json::Value) -> Vec<u64> {
    let mut ids: Vec<u64> = status
        .get("members")
        .and_then(|m| m.as_object())
        .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Ids in a status's `voters`, `learners` or `read_replicas` array, as listed (sorted).
pub fn id_list(status: &serde_json::Value, field: &str) -> Vec<u64> {
    status
        .get(field)
        .and_then(|m| m.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default()
}

/// Waits until node `peer_url` reports exactly `voters` and `learners`.
///
/// # Panics
/// After [`TIMEOUT`], with the last status seen.
pub async fn wait_voters(peer_url: &str, voters: &[u64], learners: &[u64]) {
    let last = std::sync::Mutex::new(None);
    let ok = poll_until(TIMEOUT, || async {
        let st = status(peer_url).await;
        let ok = st
            .as_ref()
            .is_some_and(|s| id_list(s, "voters") == voters && id_list(s, "learners") == learners);
        *last.lock().expect("last lock") = st;
        ok
    })
    .await;
    assert!(
        ok,
        "{peer_url} did not report voters {voters:?} and learners {learners:?} within \
         {TIMEOUT:?}; last status: {:?}",
        last.lock().expect("last lock")
    );
}

// ----- Storage helpers (crash-safety tests): data-dir paths, log slices, wal-dump, PUTs that
// ----- may fail because the node is being killed.

/// The output of one `raftexample wal-dump` run.
#[derive(Debug)]
pub struct WalDump {
    /// Exit status, or `None` if it did not exit within the timeout (it was then killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl WalDump {
    /// True if the tool exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `raftexample wal-dump --data-dir <data_dir> --id <id>` (read-only) and captures its
/// output; it is killed if it has not exited within [`TIMEOUT`].
pub async fn wal_dump(data_dir: &std::path::Path, id: u64) -> WalDump {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("wal-dump")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--id")
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN} wal-dump: {e}"));
    match tokio::time::timeout(TIMEOUT, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("collect the output of wal-dump");
            WalDump {
                status: Some(out.status),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => WalDump {
            status: None,
            stdout: String::new(),
            stderr: format!("<wal-dump did not exit within {TIMEOUT:?}>"),
        },
    }
}

/// The last non-empty line of `text` (trailing whitespace trimmed), or "" if there is none.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .map(str::trim_end)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

/// `PUT /<key>` with `value` on a caller-provided client; `None` if the node could not be
/// reached or the connection broke (killed, not listening yet, exited after a disk error).
pub async fn try_put_with(
    client: &reqwest::Client,
    port: u16,
    key: &str,
    value: impl Into<Vec<u8>>,
) -> Option<StatusCode> {
    let response = client
        .put(key_url(port, key))
        .body(value.into())
        .send()
        .await
        .ok()?;
    let status = response.status();
    // Read the body so that the connection can be reused.
    let _ = response.bytes().await;
    Some(status)
}

/// `GET /<key>` (linearizable) on a caller-provided client; `None` if the node is unreachable.
pub async fn try_get_with(
    client: &reqwest::Client,
    port: u16,
    key: &str,
) -> Option<(StatusCode, Bytes)> {
    let response = client.get(key_url(port, key)).send().await.ok()?;
    let status = response.status();
    let body = response.bytes().await.ok()?;
    Some((status, body))
}

/// A client with a connection pool, for tests that send thousands of requests (one client per
/// request, as [`put`] does, would leave a socket in TIME_WAIT per request). Build one per node
/// start: pooled connections to a killed process are dead.
pub fn pooled_client() -> reqwest::Client {
    http_client(HTTP_TIMEOUT)
}

impl Node {
    /// The node's WAL directory, `<data-dir>/raftexample-<id>/`.
    pub fn wal_dir(&self) -> PathBuf {
        self.dir.path().join(format!("raftexample-{}", self.id))
    }

    /// The node's snapshot directory, `<data-dir>/raftexample-<id>-snap/`.
    pub fn snap_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("raftexample-{}-snap", self.id))
    }

    /// Current length of [`Node::log_path`]; pass it to [`Node::log_since`] to read only what a
    /// later start printed.
    pub fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize)
    }

    /// What the node printed after the log was `offset` bytes long.
    pub fn log_since(&self, offset: usize) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset..).unwrap_or_default()).into_owned()
    }
}

/// Names of the files in `dir` whose name ends with `suffix`, sorted; empty if `dir` is missing.
pub fn files_ending_with(dir: &std::path::Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ----- Helpers of the client-guarantee tests (linearizability, durability, API errors):
// ----- arbitrary requests, serializable reads, the peer listener's routes, leader polling.

/// Sends `method <path>` with `body` to the client API on `port`, with `client`, and returns
/// the status, the headers and the body; `Err` if the request could not be completed (node
/// unreachable, connection broken, client timeout). `path` is sent as given (query included).
pub async fn client_request(
    client: &reqwest::Client,
    port: u16,
    method: reqwest::Method,
    path: &str,
    body: impl Into<Vec<u8>>,
) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), reqwest::Error> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let response = client
        .request(method, &url)
        .body(body.into())
        .send()
        .await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await?;
    Ok((status, headers, body))
}

/// `GET /<key>?consistency=serializable` (this node's own copy) on a caller-provided client;
/// `None` if the node is unreachable.
pub async fn try_get_serializable_with(
    client: &reqwest::Client,
    port: u16,
    key: &str,
) -> Option<(StatusCode, Bytes)> {
    let url = format!("{}?consistency=serializable", key_url(port, key));
    let response = client.get(url).send().await.ok()?;
    let status = response.status();
    let body = response.bytes().await.ok()?;
    Some((status, body))
}

/// `GET <peer_url><path>` on the peer listener (`/health`, `/metrics`, `/status`): the status
/// and the body as text; `None` if the node is unreachable.
pub async fn peer_get(peer_url: &str, path: &str) -> Option<(StatusCode, String)> {
    let response = client()
        .get(format!("{peer_url}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status();
    let body = response.text().await.ok()?;
    Some((status, body))
}

/// True if `GET <peer_url>/health` answers 200 (a leader is known and everything committed
/// is applied).
pub async fn healthy(peer_url: &str) -> bool {
    peer_get(peer_url, "/health")
        .await
        .is_some_and(|(s, _)| s == StatusCode::OK)
}

impl Cluster {
    /// The leader that nodes `ids` all report on `GET /status`, if they all answer, agree on
    /// a non-zero leader, and that leader is one of them and calls itself leader. One round of
    /// polls; wrap it in [`poll_until`] to wait. Unlike [`Cluster::wait_leader`] it ignores the
    /// other nodes (e.g. one that is shutting down).
    pub async fn leader_among(&self, ids: &[u64]) -> Option<u64> {
        let mut statuses = Vec::new();
        for &id in ids {
            statuses.push((id, status(&self.node(id).peer_url).await));
        }
        agreed_leader(&statuses)
    }
}

// ----- Fault-injection helpers (scenario tests; the daemon must be built with the cargo
// ----- feature `fault-injection`, which `cargo test --all-features` does): a fault-rule file
// ----- per node, partitions, and convergence of the replicas.

/// Name of the fault-rule file in a node's data dir (format: `src/faults.rs`).
const FAULT_FILE: &str = "faults";

/// What the daemon logs each time it loads a changed fault-rule file.
const FAULTS_LOADED: &str = "fault rules changed";

/// How long [`wait_converged`] waits: catching up after a partition or a crash can take a
/// snapshot transfer, on a machine shared with other test runs.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// Path of this node's fault-rule file, `<data-dir>/faults`.
    pub fn fault_file(&self) -> PathBuf {
        self.dir.path().join(FAULT_FILE)
    }

    /// Gives this node an empty fault-rule file (no faults) and adds `--fault-file` to its
    /// `base_args`, so that every later start, restarts included, follows that file.
    pub fn enable_fault_file(&mut self) {
        let path = self.fault_file();
        if !path.exists() {
            std::fs::write(&path, b"").expect("create the node's fault-rule file");
        }
        if !self.base_args.iter().any(|a| a == "--fault-file") {
            self.base_args.push("--fault-file".into());
            self.base_args.push(path.display().to_string());
        }
    }

    /// The peers this node's fault file drops messages to (`drop <id>` lines).
    pub fn dropped_peers(&self) -> std::collections::BTreeSet<u64> {
        std::fs::read_to_string(self.fault_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("drop "))
            .filter_map(|id| id.trim().parse().ok())
            .collect()
    }
}

impl Cluster {
    /// Like [`Cluster::new`], but every node has a fault-rule file (empty: no faults) and
    /// starts with `--fault-file` pointing at it; see [`Cluster::isolate`], [`Cluster::cut`],
    /// [`Cluster::heal`].
    pub fn new_with_faults(n: usize, args: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(n, args);
        for node in &mut cluster.nodes {
            node.enable_fault_file();
        }
        cluster
    }

    /// Like [`Cluster::start_with`], with a fault-rule file per node ([`Cluster::new_with_faults`]).
    pub fn start_with_faults(n: usize, args: &[&str]) -> Cluster {
        let mut cluster = Cluster::new_with_faults(n, args);
        for node in &mut cluster.nodes {
            node.start(&[]);
        }
        cluster
    }

    /// [`Cluster::add_node`] with a fault-rule file for the new node (nothing is started).
    pub fn add_node_with_faults(&mut self) -> u64 {
        let id = self.add_node();
        self.node_mut(id).enable_fault_file();
        id
    }

    /// Replaces node `id`'s fault rules with `text`; in force when this returns. See
    /// [`Cluster::set_fault_files`].
    pub async fn set_faults(&self, id: u64, text: &str) {
        self.set_fault_files(&[(id, text.to_string())]).await;
    }

    /// Replaces the fault rules of several nodes at once: writes every file first (a temporary
    /// file renamed over the old one, so a node never reads half a file), then waits until
    /// each running node's log says it loaded a changed rule file (nodes re-read theirs every
    /// 50 ms), so the rules are in force when this returns. A node that is not running reads
    /// its file when it starts.
    ///
    /// # Panics
    /// If a file cannot be written, or a running node does not load it within [`TIMEOUT`].
    pub async fn set_fault_files(&self, files: &[(u64, String)]) {
        let write = |node: &Node, text: &str| {
            let tmp = node.dir.path().join(format!("{FAULT_FILE}.tmp"));
            std::fs::write(&tmp, text.as_bytes()).expect("write the temporary fault-rule file");
            std::fs::rename(&tmp, node.fault_file())
                .expect("rename the fault-rule file into place");
        };
        let mut pending: Vec<(&Node, &str, usize)> = Vec::new();
        for (id, text) in files {
            let node = self.node(*id);
            let offset = node.log_len();
            write(node, text);
            if node.is_started() {
                pending.push((node, text, offset));
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        let mut rewrite_at = Instant::now() + Duration::from_secs(2);
        while !pending.is_empty() {
            pending.retain(|(node, _, offset)| !node.log_since(*offset).contains(FAULTS_LOADED));
            let Some((node, text, _)) = pending.first() else {
                return;
            };
            let now = Instant::now();
            assert!(
                now < deadline,
                "node {} did not load its new fault rules {text:?} within {TIMEOUT:?}",
                node.id
            );
            if now >= rewrite_at {
                // A node notices a change by (mtime, length); a rewrite within the same coarse
                // timestamp tick with the same length would go unnoticed: write again.
                for (node, text, _) in &pending {
                    write(node, text);
                }
                rewrite_at = now + Duration::from_secs(2);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The text of a fault file that drops what is sent to each of `peers`.
    fn drop_rules(peers: &std::collections::BTreeSet<u64>) -> String {
        peers.iter().map(|p| format!("drop {p}\n")).collect()
    }

    /// Makes node `id` drop what it sends to each of `peers` (and nothing else).
    pub async fn set_dropped(&self, id: u64, peers: &std::collections::BTreeSet<u64>) {
        self.set_faults(id, &Cluster::drop_rules(peers)).await;
    }

    /// Adds `drop` rules (`(from, to)`: `from` drops what it sends to `to`) to the current
    /// ones, all at once.
    async fn add_drops(&self, links: &[(u64, u64)]) {
        let mut dropped: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
            std::collections::BTreeMap::new();
        for &(from, to) in links {
            dropped
                .entry(from)
                .or_insert_with(|| self.node(from).dropped_peers())
                .insert(to);
        }
        let files: Vec<(u64, String)> = dropped
            .iter()
            .filter(|(id, peers)| **peers != self.node(**id).dropped_peers())
            .map(|(id, peers)| (*id, Cluster::drop_rules(peers)))
            .collect();
        self.set_fault_files(&files).await;
    }

    /// Cuts the link between `a` and `b` both ways (each drops what it sends to the other),
    /// keeping the other rules. In force when this returns (see [`Cluster::set_fault_files`]).
    pub async fn cut(&self, a: u64, b: u64) {
        self.add_drops(&[(a, b), (b, a)]).await;
    }

    /// Partitions node `id` from every other node of the cluster (started or not), all links
    /// at once. In force when this returns.
    pub async fn isolate(&self, id: u64) {
        let links: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|n| *n != id)
            .flat_map(|other| [(id, other), (other, id)])
            .collect();
        self.add_drops(&links).await;
    }

    /// Removes every fault rule of every node, all at once; in force when this returns.
    pub async fn heal(&self) {
        let files: Vec<(u64, String)> = self
            .nodes
            .iter()
            .filter(|node| {
                std::fs::read_to_string(node.fault_file())
                    .is_ok_and(|t| t.lines().any(|l| !l.trim().is_empty()))
            })
            .map(|node| (node.id, String::new()))
            .collect();
        self.set_fault_files(&files).await;
    }
}

/// The state that [`wait_converged`] found every listed node in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converged {
    pub commit: u64,
    pub kv_applied: u64,
    pub kv_hash: String,
}

/// `(commit, kv_applied, kv_hash)` of one `/status` answer.
fn convergence_point(status: &serde_json::Value) -> Option<Converged> {
    Some(Converged {
        commit: status.get("commit")?.as_u64()?,
        kv_applied: status.get("kv_applied")?.as_u64()?,
        kv_hash: status.get("kv_hash")?.as_str()?.to_string(),
    })
}

/// Polls `GET /status` on nodes `ids` until they all report the same commit index, have
/// applied it to their map (`kv_applied == commit`), and report the same `kv_hash`: their
/// maps are then identical. Call it once writes have stopped. Returns that common state.
///
/// # Panics
/// After [`CONVERGE_TIMEOUT`], with the last statuses seen.
pub async fn wait_converged(cluster: &Cluster, ids: &[u64]) -> Converged {
    assert!(!ids.is_empty(), "wait_converged: no node listed");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let mut statuses = Vec::new();
        for &id in ids {
            statuses.push((id, status(&cluster.node(id).peer_url).await));
        }
        let points: Option<Vec<Converged>> = statuses
            .iter()
            .map(|(_, s)| s.as_ref().and_then(convergence_point))
            .collect();
        if let Some(points) = points {
            let first = &points[0];
            if first.kv_applied == first.commit && points.iter().all(|p| p == first) {
                return first.clone();
            }
        }
        if Instant::now() >= deadline {
            let seen: Vec<String> = statuses
                .iter()
                .map(|(id, s)| match s {
                    Some(v) => format!("node {id}: {v}"),
                    None => format!("node {id}: unreachable"),
                })
                .collect();
            panic!(
                "nodes {ids:?} did not converge (same commit, kv_applied == commit, same \
                 kv_hash) within {CONVERGE_TIMEOUT:?}; last statuses:\n{}",
                seen.join("\n")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A small deterministic PRNG (xorshift64*): a seed reproduces the choices (though not the
/// timing) of a randomised test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// Seeded from `RAFTEXAMPLE_TEST_SEED` or at random; prints the seed so that a failing run
    /// can be replayed.
    pub fn from_env(test: &str) -> Rng {
        let seed = seed();
        eprintln!("{test}: RAFTEXAMPLE_TEST_SEED={seed}");
        Rng::new(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// `RAFTEXAMPLE_TEST_SEED` if set, else a random seed.
pub fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::env::var("RAFTEXAMPLE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        })
}

/// Checks with a linearizable GET on each node of `ids` that every write reads back with its
/// value (four readers per node). Returns the number of reads.
pub async fn assert_all_readable(
    cluster: &Cluster,
    ids: &[u64],
    writes: &[(String, String)],
) -> usize {
    const READERS_PER_NODE: usize = 4;
    let writes: std::sync::Arc<Vec<(String, String)>> = std::sync::Arc::new(writes.to_vec());
    let mut tasks = tokio::task::JoinSet::new();
    for &id in ids {
        let port = cluster.node(id).client_port;
        for part in 0..READERS_PER_NODE {
            let writes = writes.clone();
            tasks.spawn(async move {
                let client = pooled_client();
                let mut reads = 0;
                for (key, value) in writes.iter().skip(part).step_by(READERS_PER_NODE) {
                    let got = try_get_with(&client, port, key).await;
                    assert_eq!(
                        got,
                        Some((StatusCode::OK, value.clone().into())),
                        "node {id}: linearizable GET {key} after its PUT was acknowledged"
                    );
                    reads += 1;
                }
                reads
            });
        }
    }
    let mut reads = 0;
    while let Some(r) = tasks.join_next().await {
        reads += r.expect("reader task");
    }
    reads
}
