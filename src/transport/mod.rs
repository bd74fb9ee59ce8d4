//! Peer transport over HTTP(S), in the manner of etcd's rafthttp: a long-lived **stream** per
//! peer for the steady flow of messages, and one-off `POST /raft` requests for snapshots.
//!
//! Outgoing: the raft task calls [`Transport::send`], which never blocks: each peer has a
//! sender task with a bounded queue. The sender opens `POST /raft/stream` as an HTTP/1.1
//! upgrade; once the peer answers 101 the connection carries length-delimited protobuf raft
//! messages one way, and everything queued for that peer goes out as one write. No request,
//! response or round trip per batch: a heartbeat leaves at once instead of waiting for the
//! previous batch to be answered. A `MsgSnapshot` (large, and raft must learn whether it
//! arrived) goes by `POST /raft` from a task of its own, so it never holds up the stream.
//! Failures come back to the raft task on `report_tx` ([`Report`]) so it can call
//! `report_unreachable` / `report_snapshot`; a broken stream is reopened on the next batch.
//!
//! Incoming: `/raft` decodes a batch and `/raft/stream` decodes frames as they arrive; both
//! forward on `raft_msg_tx`. A message from a removed member gets 410 Gone (a stream is closed,
//! and its reopening gets the 410).
//!
//! Every request carries the cluster token (`X-Raftexample-Cluster`); a request without this
//! node's token gets 412 before its body is read ([`require_cluster_token`]). With peer TLS,
//! the [`PeerClient`] speaks HTTPS with a client certificate and the listener requires one; the
//! upgraded stream stays inside that TLS session.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::BytesMut;
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster_id::{self, Admit, ClusterId};
use crate::peer_client::{PeerClient, PeerError, CLUSTER_HEADER};
use crate::server::Throttle;

mod codec;
mod receive;
pub use codec::{decode_batch, encode_batch};
use codec::{encode_batch_into, next_frame};
pub use receive::{require_cluster_token, router, PeerState};

/// The message stream: `POST` with an HTTP/1.1 upgrade to [`STREAM_PROTOCOL`].
pub const STREAM_PATH: &str = "/raft/stream";
pub const STREAM_PROTOCOL: &str = "raftexample-raft/1";
/// Names the sending member on every peer request.
pub const FROM_HEADER: &str = "x-raftexample-from";
/// A write that cannot finish in this long means a stuck peer (paused, or its raft loop
/// stalled and its socket buffers full): drop the stream and report it unreachable.
const WRITE_STALL: Duration = Duration::from_secs(2);
/// Opening a stream takes a connect and one HTTP exchange.
const STREAM_OPEN: Duration = Duration::from_secs(2);
/// Largest frame a stream accepts. Appends and forwarded proposals are capped at 1 MiB of
/// entries, but one entry may be as large as a client request (`--max-request-bytes`, which
/// config validation keeps below a WAL record, 64 MiB); this only guards against garbage
/// lengths.
pub const MAX_FRAME: usize = 256 << 20;
/// Largest `POST /raft` body: a batch with one snapshot, whose data the snapshot file format
/// caps at 4 GiB (a u32 length), plus room for its metadata. Larger is refused with 413
/// before any of it is read.
pub const MAX_RAFT_BODY: u64 = u32::MAX as u64 + (1 << 20);

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
    #[error("stream frame of {0} bytes exceeds the limit")]
    FrameTooLarge(u64),
    #[error("malformed frame length")]
    BadLength,
    #[error("peer {peer}: stream write stalled for {WRITE_STALL:?}")]
    Stalled { peer: u64 },
    #[error("peer {peer}: stream closed: {source}")]
    Closed {
        peer: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer}: {source}")]
    Send {
        peer: u64,
        #[source]
        source: PeerError,
    },
    #[error("peer {peer} answered {status}")]
    Status { peer: u64, status: StatusCode },
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
        shutdown: CancellationToken,
        logger: &slog::Logger,
    ) -> Transport {
        Transport {
            id,
            client,
            peers: HashMap::new(),
            report_tx,
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
            stream_endpoint: format!("{url}{STREAM_PATH}"),
            client: self.client.clone(),
            report_tx: self.report_tx.clone(),
            token_rejected: false,
            #[cfg(feature = "fault-injection")]
            faults: self.faults.clone(),
            logger: self.logger.new(slog::o!("peer" => id)),
        };
        tokio::spawn(sender.run(rx, stop.clone()));
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
            tokio::spawn(async move {
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

#[derive(Clone)]
struct PeerSender {
    from: u64,
    to: u64,
    endpoint: String,
    stream_endpoint: String,
    client: PeerClient,
    report_tx: mpsc::UnboundedSender<Report>,
    /// Set while the peer answers 412, so that a token or cluster id mismatch is logged once,
    /// not per batch.
    token_rejected: bool,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::faults::Faults>>,
    logger: slog::Logger,
}

/// An open stream to a peer. Its read half only watches for the peer closing the connection
/// (it never writes), so that the next batch opens a new stream instead of being lost.
struct Stream {
    w: tokio::io::WriteHalf<reqwest::Upgraded>,
    closed: CancellationToken,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Ends the watcher, which drops the read half: with both halves gone the connection
        // closes.
        self.closed.cancel();
    }
}

impl PeerSender {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
        // Snapshots wait for nothing but each other.
        let (snap_tx, mut snap_rx) = mpsc::channel::<Message>(4);
        let mut snapshots = self.clone();
        let snap_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = snap_rx.recv() => match m { Some(m) => m, None => return },
                    _ = snap_stop.cancelled() => return,
                };
                snapshots.send_snapshot(m).await;
            }
        });

        let mut stream: Option<Stream> = None;
        let mut batch = Vec::new();
        let mut buf = Vec::new();
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
            batch.retain(|m| {
                if m.get_msg_type() != MessageType::MsgSnapshot {
                    return true;
                }
                if snap_tx.try_send(m.clone()).is_err() {
                    // One is already being sent and more are queued: raft asks again later.
                    let _ = self
                        .report_tx
                        .send(Report::Snapshot(self.to, SnapshotStatus::Failure));
                }
                false
            });
            if batch.is_empty() || self.faulted(&mut batch).await {
                continue;
            }
            buf.clear();
            encode_batch_into(&batch, &mut buf);
            batch.clear();
            if let Err(e) = self.write(&mut stream, &buf).await {
                stream = None;
                slog::debug!(self.logger, "stream send failed"; "error" => %e);
                crate::metrics::peer_send_failure();
                let _ = self.report_tx.send(Report::Unreachable(self.to));
            }
        }
        // The queue closed (peer removed): flush is done, the stream closes on drop.
    }

    /// Writes `buf` to the open stream, opening one first if there is none or the peer
    /// closed it.
    async fn write(&mut self, stream: &mut Option<Stream>, buf: &[u8]) -> Result<(), Error> {
        if stream.as_ref().is_some_and(|s| s.closed.is_cancelled()) {
            *stream = None;
        }
        if stream.is_none() {
            *stream = Some(self.open().await?);
        }
        let s = stream.as_mut().expect("opened above");
        let closed = |source| Error::Closed {
            peer: self.to,
            source,
        };
        match tokio::time::timeout(WRITE_STALL, async {
            s.w.write_all(buf).await?;
            s.w.flush().await
        })
        .await
        {
            Ok(res) => res.map_err(closed),
            Err(_) => Err(Error::Stalled { peer: self.to }),
        }
    }

    async fn open(&mut self) -> Result<Stream, Error> {
        let headers = [
            (
                header::CONNECTION.as_str(),
                HeaderValue::from_static("upgrade"),
            ),
            (
                header::UPGRADE.as_str(),
                HeaderValue::from_static(STREAM_PROTOCOL),
            ),
            (FROM_HEADER, HeaderValue::from(self.from)),
        ];
        let res = self
            .client
            .upgrade(&self.stream_endpoint, &headers, STREAM_OPEN)
            .await;
        let up = match res {
            Ok(Ok(up)) => up,
            Ok(Err(status)) => {
                self.refused(status);
                return Err(Error::Status {
                    peer: self.to,
                    status,
                });
            }
            Err(e) => {
                return Err(Error::Send {
                    peer: self.to,
                    source: e,
                })
            }
        };
        self.token_rejected = false;
        slog::debug!(self.logger, "stream opened");
        let (mut r, w) = tokio::io::split(up);
        let closed = CancellationToken::new();
        let watch = closed.clone();
        tokio::spawn(async move {
            let mut sink = [0u8; 64];
            loop {
                tokio::select! {
                    n = r.read(&mut sink) => if !matches!(n, Ok(n) if n > 0) { break },
                    _ = watch.cancelled() => break,
                }
            }
            watch.cancel();
        });
        Ok(Stream { w, closed })
    }

    /// What a refusal means: 410 is this node's removal, 412 a misconfigured token.
    fn refused(&mut self, status: StatusCode) {
        if status == StatusCode::GONE {
            let _ = self.report_tx.send(Report::Removed);
        }
        let rejected = status == StatusCode::PRECONDITION_FAILED;
        if rejected && !self.token_rejected {
            slog::warn!(
                self.logger,
                "peer rejects this node's cluster token or cluster id (412): is \
                --cluster-token the same on every member, and is the peer a member of this \
                cluster (its --cluster list may name ours by mistake)?"
            );
        }
        self.token_rejected = rejected;
    }

    /// Test hook: drops the batch (a cut link; raft hears the peer is unreachable) or delays
    /// it. True if it was dropped.
    #[cfg(feature = "fault-injection")]
    async fn faulted(&self, batch: &mut Vec<Message>) -> bool {
        let Some(f) = &self.faults else { return false };
        let rule = f.rule(self.to);
        if rule.drop {
            batch.clear();
            let _ = self.report_tx.send(Report::Unreachable(self.to));
            return true;
        }
        if !rule.delay.is_zero() {
            tokio::time::sleep(rule.delay).await;
        }
        false
    }

    #[cfg(not(feature = "fault-injection"))]
    async fn faulted(&self, _batch: &mut Vec<Message>) -> bool {
        false
    }

    /// Sends one snapshot by `POST /raft` and tells raft how it went.
    async fn send_snapshot(&mut self, m: Message) {
        let index = m.get_snapshot().get_metadata().index;
        let mut batch = vec![m];
        let outcome = if self.faulted(&mut batch).await {
            Err(Error::Status {
                peer: self.to,
                status: StatusCode::SERVICE_UNAVAILABLE,
            })
        } else {
            self.post(encode_batch(&batch), index).await
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
        let _ = self.report_tx.send(Report::Snapshot(self.to, status));
    }

    async fn post(&mut self, body: Vec<u8>, index: u64) -> Result<(), Error> {
        let size = body.len();
        let started = Instant::now();
        slog::info!(self.logger, "sending snapshot"; "index" => index, "bytes" => size);
        // A snapshot can be large; give it time proportional to its size.
        let timeout = Duration::from_secs(5) + Duration::from_millis(size as u64 / 10_000);
        let headers = [
            (
                "content-type",
                HeaderValue::from_static("application/x-protobuf"),
            ),
            (FROM_HEADER, HeaderValue::from(self.from)),
        ];
        let res = self
            .client
            .post(&self.endpoint, &headers, body, timeout)
            .await;
        let outcome = match res {
            Ok((status, _)) if status.is_success() => {
                self.token_rejected = false;
                Ok(())
            }
            Ok((status, _)) => {
                self.refused(status);
                Err(Error::Status {
                    peer: self.to,
                    status,
                })
            }
            Err(e) => Err(Error::Send {
                peer: self.to,
                source: e,
            }),
        };
        slog::info!(self.logger, "snapshot sent"; "index" => index, "ok" => outcome.is_ok(),
            "bytes" => size, "ms" => started.elapsed().as_millis() as u64);
        outcome
    }
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
        let got = decode_batch(&encode_batch(&[a.clone(), b.clone()]).into()).unwrap();
        assert_eq!(got, vec![a, b]);
        assert!(decode_batch(&Bytes::from_static(&[0x05, 0x01])).is_err());
        assert!(decode_batch(&Bytes::new()).unwrap().is_empty());
    }

    /// A stream delivers frames in pieces of any size; each message comes out once whole.
    #[test]
    fn stream_frames_survive_any_split() {
        let mut a = Message::default();
        a.set_msg_type(MessageType::MsgAppend);
        a.to = 2;
        a.mut_entries().push(raft::prelude::Entry {
            data: vec![7; 300].into(),
            ..Default::default()
        });
        let mut b = Message::default();
        b.set_msg_type(MessageType::MsgHeartbeat);
        b.context = vec![1, 2, 3].into();
        let wire = encode_batch(&[a.clone(), b.clone(), a.clone()]);
        for step in [1, 2, 7, 300, wire.len()] {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                buf.extend_from_slice(chunk);
                while let Some(m) = next_frame(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, vec![a.clone(), b.clone(), a.clone()], "step {step}");
            assert!(buf.is_empty());
        }
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            next_frame(&mut huge),
            Err(Error::FrameTooLarge(_))
        ));
        let mut endless = BytesMut::from(&[0x80; 11][..]);
        assert!(matches!(next_frame(&mut endless), Err(Error::BadLength)));
        let mut garbage = BytesMut::from(&[0x02, 0xff, 0xff][..]);
        assert!(matches!(next_frame(&mut garbage), Err(Error::Decode(_))));
    }
}
