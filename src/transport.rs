//! Peer transport over HTTP(S): `POST /raft` on each node's peer URL carries a batch of
//! length-delimited protobuf raft messages.
//!
//! Outgoing: the raft task calls [`Transport::send`], which never blocks: each peer has a
//! sender task with a bounded queue that puts everything queued for that peer into one request.
//! Failures come back to the raft task on `report_tx` ([`Report`]) so it can call
//! `report_unreachable` / `report_snapshot`. Incoming: the `/raft` handler decodes a batch and
//! forwards it on `raft_msg_tx`; a message from a removed member gets 410 Gone.
//!
//! Every request carries the cluster token (`X-Raftexample-Cluster`); a request without this
//! node's token gets 412 before its body is read ([`require_cluster_token`]). With peer TLS,
//! the [`PeerClient`] speaks HTTPS with a client certificate and the listener requires one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use protobuf::{CodedInputStream, Message as _};
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::peer_client::{PeerClient, PeerError, CLUSTER_HEADER};
use crate::server::Throttle;

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
        source: PeerError,
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
    client: PeerClient,
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
    /// Senders use `client` (cluster token, peer TLS) for every request.
    pub fn new(
        id: u64,
        client: PeerClient,
        report_tx: mpsc::UnboundedSender<Report>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
        logger: &slog::Logger,
    ) -> Transport {
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
            token_rejected: false,
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
    client: PeerClient,
    report_tx: mpsc::UnboundedSender<Report>,
    /// Set while the peer answers 412, so that a token mismatch is logged once, not per batch.
    token_rejected: bool,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::faults::Faults>>,
    logger: slog::Logger,
}

impl PeerSender {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
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
    async fn post(&mut self, batch: &mut Vec<Message>) {
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
        let headers = [
            (
                "content-type",
                HeaderValue::from_static("application/x-protobuf"),
            ),
            ("x-raftexample-from", HeaderValue::from(self.from)),
        ];
        let res = self
            .client
            .post(&self.endpoint, &headers, body, timeout)
            .await;
        let rejected = matches!(&res, Ok((StatusCode::PRECONDITION_FAILED, _)));
        if rejected && !self.token_rejected {
            slog::warn!(
                self.logger,
                "peer rejects this node's cluster token (412): is \
                --cluster-token the same on every member?"
            );
        }
        self.token_rejected = rejected;
        let outcome = match res {
            Ok((status, _)) if status.is_success() => Ok(()),
            Ok((status, _)) if status == StatusCode::GONE => {
                let _ = self.report_tx.send(Report::Removed);
                Err(Error::Status {
                    peer: self.to,
                    status,
                })
            }
            Ok((status, _)) => Err(Error::Status {
                peer: self.to,
                status,
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
    /// `--cluster-token`: requests without it get 412.
    pub cluster_token: HeaderValue,
    pub logger: slog::Logger,
}

/// The `POST /raft` route. Snapshots can exceed axum's 2 MiB default body limit, hence none.
pub fn router(state: PeerState) -> Router {
    let token = state.cluster_token.clone();
    let logger = state.logger.clone();
    let router = Router::new()
        .route("/raft", post(receive))
        .layer(DefaultBodyLimit::disable())
        .with_state(state);
    require_cluster_token(router, token, &logger)
}

#[derive(Clone)]
struct TokenCheck {
    token: HeaderValue,
    /// A misconfigured peer retries many times a second: log its mismatch now and then.
    warn: Arc<Throttle>,
    logger: slog::Logger,
}

/// Answers 412 to any request on `router`'s routes that does not carry `token` in
/// `X-Raftexample-Cluster`, before its body is read, so its messages never reach raft.
/// Routes added to the returned router later are not checked (`/status` and friends).
pub fn require_cluster_token(router: Router, token: HeaderValue, logger: &slog::Logger) -> Router {
    let check = TokenCheck {
        token,
        warn: Arc::new(Throttle::new(Duration::from_secs(10))),
        logger: logger.clone(),
    };
    router.route_layer(axum::middleware::from_fn_with_state(check, check_token))
}

async fn check_token(State(check): State<TokenCheck>, req: Request, next: Next) -> Response {
    // The token names a cluster, it is not a password (TLS authenticates peers), so a plain
    // comparison will do.
    let got = req.headers().get(CLUSTER_HEADER);
    if got == Some(&check.token) {
        return next.run(req).await;
    }
    if check.warn.ready() {
        slog::warn!(check.logger, "rejected peer request with another cluster token";
            "path" => req.uri().path(),
            "token" => got.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            "from" => req.headers().get("x-raftexample-from")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()));
    }
    (
        StatusCode::PRECONDITION_FAILED,
        "cluster token mismatch: this request is for another cluster\n",
    )
        .into_response()
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
