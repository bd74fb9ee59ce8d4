//! Peer transport over HTTP: `POST /raft` on each node's peer URL carries a batch of
//! length-delimited protobuf raft messages.
//!
//! Outgoing: the raft task calls [`Transport::send`], which never blocks: each peer has a
//! sender task with a bounded queue that puts everything queued for that peer into one request.
//! Failures come back to the raft task on `report_tx` ([`Report`]) so it can call
//! `report_unreachable` / `report_snapshot`. Incoming: the `/raft` handler decodes a batch and
//! forwards it on `raft_msg_tx`; a message from a removed member gets 410 Gone.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use protobuf::{CodedInputStream, Message as _};
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Queue length per peer; beyond it messages are dropped (raft retransmits).
const PEER_QUEUE: usize = 4096;
/// Messages put into one HTTP request at most.
const MAX_BATCH: usize = 1024;

/// What a sender task tells the raft task about a send.
#[derive(Debug, PartialEq)]
pub enum Report {
    Unreachable(u64),
    Snapshot(u64, SnapshotStatus),
    /// A peer answered 410: this node was removed from the cluster.
    Removed,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("undecodable raft message batch: {0}")]
    Decode(#[from] protobuf::ProtobufError),
    #[error("peer {peer}: {source}")]
    Send {
        peer: u64,
        #[source]
        source: reqwest::Error,
    },
    #[error("peer {peer} answered {status}")]
    Status { peer: u64, status: StatusCode },
}

/// Encodes messages as a protobuf length-delimited stream.
pub fn encode_batch(msgs: &[Message]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(msgs.iter().map(|m| m.compute_size() as usize + 5).sum());
    for m in msgs {
        m.write_length_delimited_to_vec(&mut buf)
            .expect("writing a protobuf message to a Vec cannot fail");
    }
    buf
}

pub fn decode_batch(buf: &[u8]) -> Result<Vec<Message>, Error> {
    let mut is = CodedInputStream::from_bytes(buf);
    let mut msgs = Vec::new();
    while !is.eof()? {
        msgs.push(is.read_message::<Message>()?);
    }
    Ok(msgs)
}

struct Peer {
    url: String,
    tx: mpsc::Sender<Message>,
    stop: CancellationToken,
}

/// The raft task's handle on the per-peer sender tasks. Owned by the raft task alone.
pub struct Transport {
    id: u64,
    client: reqwest::Client,
    peers: HashMap<u64, Peer>,
    report_tx: mpsc::UnboundedSender<Report>,
    /// Spawns sender tasks on the multi-threaded runtime, not on the raft thread's own runtime.
    rt: tokio::runtime::Handle,
    shutdown: CancellationToken,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::faults::Faults>>,
    logger: slog::Logger,
}

impl Transport {
    pub fn new(
        id: u64,
        report_tx: mpsc::UnboundedSender<Report>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
        logger: &slog::Logger,
    ) -> Transport {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .expect("a plain-HTTP client with no TLS always builds");
        Transport {
            id,
            client,
            peers: HashMap::new(),
            report_tx,
            rt,
            shutdown,
            #[cfg(feature = "fault-injection")]
            faults: None,
            logger: logger.new(slog::o!("component" => "transport")),
        }
    }

    /// Test hook: senders consult `faults` before each request.
    #[cfg(feature = "fault-injection")]
    pub fn set_faults(&mut self, faults: Arc<crate::faults::Faults>) {
        self.faults = Some(faults);
    }

    pub fn has_peer(&self, id: u64) -> bool {
        self.peers.contains_key(&id)
    }

    /// Starts a sender for `id` (replacing one with another URL).
    pub fn add_peer(&mut self, id: u64, url: &str) {
        if id == self.id || self.peers.get(&id).is_some_and(|p| p.url == url) {
            return;
        }
        self.remove_peer(id);
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let stop = self.shutdown.child_token();
        let sender = PeerSender {
            from: self.id,
            to: id,
            endpoint: format!("{url}/raft"),
            client: self.client.clone(),
            report_tx: self.report_tx.clone(),
            #[cfg(feature = "fault-injection")]
            faults: self.faults.clone(),
            logger: self.logger.new(slog::o!("peer" => id)),
        };
        self.rt.spawn(sender.run(rx, stop.clone()));
        slog::info!(self.logger, "added peer"; "peer" => id, "url" => url);
        self.peers.insert(
            id,
            Peer {
                url: url.to_string(),
                tx,
                stop,
            },
        );
    }

    pub fn remove_peer(&mut self, id: u64) {
        if let Some(p) = self.peers.remove(&id) {
            // Dropping `tx` lets the sender flush what is queued (the commit that tells the
            // removed node about its removal, with luck) before it stops.
            drop(p.tx);
            let stop = p.stop;
            self.rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                stop.cancel();
            });
            slog::info!(self.logger, "removed peer"; "peer" => id);
        }
    }

    /// Queues messages for their peers without waiting.
    pub fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let is_snap = m.get_msg_type() == MessageType::MsgSnapshot;
            let queued = match self.peers.get(&to) {
                Some(p) => p.tx.try_send(m).is_ok(),
                None => false,
            };
            if !queued {
                // Unknown peer (removed, or a joiner not yet told about) or a full queue.
                if is_snap {
                    let _ = self
                        .report_tx
                        .send(Report::Snapshot(to, SnapshotStatus::Failure));
                }
                let _ = self.report_tx.send(Report::Unreachable(to));
            }
        }
    }
}

struct PeerSender {
    from: u64,
    to: u64,
    endpoint: String,
    client: reqwest::Client,
    report_tx: mpsc::UnboundedSender<Report>,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::faults::Faults>>,
    logger: slog::Logger,
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
        let mut batch = Vec::new();
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => break },
                _ = stop.cancelled() => return,
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.post(&mut batch).await;
        }
    }

    /// Sends one batch; on failure reports the peer unreachable and any snapshot failed.
    async fn post(&self, batch: &mut Vec<Message>) {
        let snaps: Vec<u64> = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.get_snapshot().get_metadata().index)
            .collect();
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &self.faults {
            let rule = f.rule(self.to);
            if rule.drop {
                // As a cut link: nothing arrives and raft hears the peer is unreachable.
                batch.clear();
                let _ = self.report_tx.send(Report::Unreachable(self.to));
                for _ in snaps {
                    let _ = self
                        .report_tx
                        .send(Report::Snapshot(self.to, SnapshotStatus::Failure));
                }
                return;
            }
            if !rule.delay.is_zero() {
                tokio::time::sleep(rule.delay).await;
            }
        }
        let body = encode_batch(batch);
        batch.clear();
        let size = body.len();
        let started = Instant::now();
        if !snaps.is_empty() {
            slog::info!(self.logger, "sending snapshot"; "index" => snaps[0], "bytes" => size);
        }
        // A snapshot can be large; give it time proportional to its size.
        let timeout = Duration::from_secs(5) + Duration::from_millis(size as u64 / 10_000);
        let res = self
            .client
            .post(&self.endpoint)
            .header("content-type", "application/x-protobuf")
            .header("x-raftexample-from", self.from)
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let outcome = match res {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) if r.status() == StatusCode::GONE => {
                let _ = self.report_tx.send(Report::Removed);
                Err(Error::Status {
                    peer: self.to,
                    status: r.status(),
                })
            }
            Ok(r) => Err(Error::Status {
                peer: self.to,
                status: r.status(),
            }),
            Err(e) => Err(Error::Send {
                peer: self.to,
                source: e,
            }),
        };
        let status = match &outcome {
            Ok(()) => SnapshotStatus::Finish,
            Err(e) => {
                slog::debug!(self.logger, "send failed"; "error" => %e);
                crate::metrics::peer_send_failure();
                let _ = self.report_tx.send(Report::Unreachable(self.to));
                SnapshotStatus::Failure
            }
        };
        for index in snaps {
            slog::info!(self.logger, "snapshot sent"; "index" => index, "ok" => outcome.is_ok(),
                "bytes" => size, "ms" => started.elapsed().as_millis() as u64);
            let _ = self.report_tx.send(Report::Snapshot(self.to, status));
        }
    }
}

/// What the `/raft` handler needs.
#[derive(Clone)]
pub struct PeerState {
    pub raft_msg_tx: mpsc::Sender<Message>,
    /// Members removed from the cluster; their messages get 410 Gone.
    pub removed: Arc<RwLock<HashSet<u64>>>,
    pub logger: slog::Logger,
}

/// The `POST /raft` route. Snapshots can exceed axum's 2 MiB default body limit, hence none.
pub fn router(state: PeerState) -> Router {
    Router::new()
        .route("/raft", post(receive))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn receive(State(st): State<PeerState>, body: Bytes) -> (StatusCode, &'static str) {
    let msgs = match decode_batch(&body) {
        Ok(m) => m,
        Err(e) => {
            slog::warn!(st.logger, "rejected raft request"; "error" => %e, "bytes" => body.len());
            return (StatusCode::BAD_REQUEST, "undecodable raft message batch\n");
        }
    };
    {
        let removed = st.removed.read().expect("removed-set lock");
        if msgs.iter().any(|m| removed.contains(&m.from)) {
            return (StatusCode::GONE, "member removed from the cluster\n");
        }
    }
    for m in msgs {
        if st.raft_msg_tx.send(m).await.is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n");
        }
    }
    (StatusCode::NO_CONTENT, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip() {
        let mut a = Message::default();
        a.set_msg_type(MessageType::MsgAppend);
        a.to = 2;
        a.from = 1;
        a.term = 3;
        let mut b = Message::default();
        b.set_msg_type(MessageType::MsgSnapshot);
        b.mut_snapshot().data = vec![0xff; 10].into();
        let got = decode_batch(&encode_batch(&[a.clone(), b.clone()])).unwrap();
        assert_eq!(got, vec![a, b]);
        assert!(decode_batch(&[0x05, 0x01]).is_err());
        assert!(decode_batch(&[]).unwrap().is_empty());
    }
}
