//! The clients of the linearizability tests: random PUTs (unique values) and linearizable GETs
//! on random keys and nodes, each recorded as an operation of the history that the checker of
//! `linearizability.rs` (mounted as `checker`) judges.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checker::{check, Clock, Kind, Op};
use crate::common::{http_client, wait_until, Rng, StatusCode};

/// What the clients share with the test body.
pub struct HistoryLoad {
    pub ports: Vec<u16>,
    pub clock: Clock,
    pub stop: AtomicBool,
    /// Operations that completed with a definite answer (204, 200, 404).
    pub completed: AtomicUsize,
    pub started: Instant,
    /// The clients' own request timeout (above the daemons').
    client_timeout: Duration,
    /// How long [`HistoryLoad::wait_more`] waits for progress.
    progress_timeout: Duration,
}

impl HistoryLoad {
    pub fn new(
        ports: Vec<u16>,
        client_timeout: Duration,
        progress_timeout: Duration,
    ) -> HistoryLoad {
        HistoryLoad {
            ports,
            clock: Clock::new(),
            stop: AtomicBool::new(false),
            completed: AtomicUsize::new(0),
            started: Instant::now(),
            client_timeout,
            progress_timeout,
        }
    }

    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    /// Waits until `more` operations beyond the current count have completed.
    pub async fn wait_more(&self, more: usize, what: &str) {
        let target = self.completed() + more;
        wait_until(
            self.progress_timeout,
            &format!("{more} more operations complete {what}"),
            || async move { self.completed() >= target },
        )
        .await;
    }

    /// A client with the clients' timeout, e.g. for the final reads.
    pub fn http(&self) -> reqwest::Client {
        http_client(self.client_timeout)
    }
}

/// One client, until `load.stop` is set; `key` picks the key of each operation. Returns its
/// part of the history.
pub async fn client(
    id: usize,
    load: Arc<HistoryLoad>,
    seed: u64,
    key: impl Fn(&HistoryLoad, &mut Rng) -> String,
) -> Vec<Op> {
    let http = load.http();
    let mut rng = Rng::new(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut history = Vec::new();
    let mut seq = 0usize;
    while !load.stop.load(Ordering::SeqCst) {
        seq += 1;
        let port = load.ports[rng.below(load.ports.len())];
        let key = key(&load, &mut rng);
        let url = format!("http://127.0.0.1:{port}{key}");
        let op = if rng.below(2) == 0 {
            put(&http, id, &url, &key, format!("c{id}-{seq}"), &load.clock).await
        } else {
            get(&http, id, &url, &key, &load.clock).await
        };
        match op {
            Some(op) => {
                if op.ret.is_some() {
                    load.completed.fetch_add(1, Ordering::SeqCst);
                }
                history.push(op);
            }
            // Refused or unreachable: pace, a killed node refuses at once.
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    history
}

/// A PUT as a history operation: with a return time if it got 204, without one if its outcome
/// is unknown (503 other than "not applied", or the connection broke after sending); `None` if
/// it was definitely not applied ("not applied", or never sent).
async fn put(
    http: &reqwest::Client,
    client: usize,
    url: &str,
    key: &str,
    value: String,
    clock: &Clock,
) -> Option<Op> {
    let call = clock.now();
    let ret = match http.put(url).body(value.clone()).send().await {
        Ok(r) if r.status() == StatusCode::NO_CONTENT => Some(clock.now()),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "client {client}: PUT {url}: {body:?}"
            );
            if body.starts_with("not applied") {
                return None; // definitely not applied: no part of the history
            }
            None // may still be applied: unknown outcome
        }
        // Nothing was sent: the node is down or not listening yet.
        Err(e) if e.is_connect() => return None,
        // Sent, then the connection broke or timed out.
        Err(_) => None,
    };
    Some(Op {
        client,
        key: key.to_string(),
        kind: Kind::Put(value),
        call,
        ret,
    })
}

/// A linearizable GET as a history operation; `None` if it failed (a failed read says
/// nothing about the register).
pub async fn get(
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

/// One final linearizable GET of every key on every node (`(id, client port)`; the reader is
/// client `100 + id`), appended to `history`: each must see the key's last write.
pub async fn final_reads(
    http: &reqwest::Client,
    nodes: &[(u64, u16)],
    keys: impl IntoIterator<Item = impl AsRef<str>> + Clone,
    clock: &Clock,
    history: &mut Vec<Op>,
) {
    for &(id, port) in nodes {
        for key in keys.clone() {
            let key = key.as_ref();
            let url = format!("http://127.0.0.1:{port}{key}");
            let op = get(http, 100 + id as usize, &url, key, clock)
                .await
                .unwrap_or_else(|| panic!("final GET {url} failed"));
            history.push(op);
        }
    }
}

/// Runs the checker on `history` and prints one line with its counts, `about` (what ran and
/// what went wrong) and the verdict. A history that is not linearizable is saved as `name`
/// and the test panics naming the file. Returns the counts for the "not vacuous" checks.
pub fn check_or_dump(history: &[Op], name: &str, about: &str) -> Counts {
    let counts = Counts::of(history);
    let Counts {
        completed,
        puts_done,
        unknown,
        reads_of_values,
    } = counts;
    let checked = Instant::now();
    let result = check(history);
    let check_time = checked.elapsed();
    eprintln!(
        "{} operations ({completed} completed: {puts_done} PUTs, {reads_of_values} GETs of a \
         value; {unknown} PUTs of unknown outcome); {about}; checked in {check_time:?}: \
         {result:?}",
        history.len()
    );
    if let Err(e) = result {
        let (path, saved) = save(history, name);
        panic!(
            "history is not linearizable ({about}; whole history in {}: {saved:?}):\n{e}",
            path.display()
        );
    }
    counts
}

/// What a history holds, for the tests' messages and their "not vacuous" checks.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// Operations with a return time.
    pub completed: usize,
    /// PUTs that got 204.
    pub puts_done: usize,
    /// PUTs of unknown outcome.
    pub unknown: usize,
    /// GETs that saw a value.
    pub reads_of_values: usize,
}

impl Counts {
    pub fn of(history: &[Op]) -> Counts {
        let count = |f: &dyn Fn(&Op) -> bool| history.iter().filter(|op| f(op)).count();
        Counts {
            completed: count(&|op| op.ret.is_some()),
            puts_done: count(&|op| matches!(op.kind, Kind::Put(_)) && op.ret.is_some()),
            unknown: count(&|op| op.ret.is_none()),
            reads_of_values: count(&|op| matches!(op.kind, Kind::Get(Some(_)))),
        }
    }
}

/// Writes `history`, sorted by call time, to `<temp dir>/raftexample-<name>.history` for a
/// failure message: the path, and whether the write worked.
pub fn save(history: &[Op], name: &str) -> (PathBuf, std::io::Result<()>) {
    let path = std::env::temp_dir().join(format!("raftexample-{name}.history"));
    let mut sorted: Vec<&Op> = history.iter().collect();
    sorted.sort_by_key(|op| op.call);
    let text: Vec<String> = sorted.iter().map(|op| op.to_string()).collect();
    let saved = std::fs::write(&path, text.join("\n") + "\n");
    (path, saved)
}
