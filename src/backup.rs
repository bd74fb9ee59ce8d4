//! `GET /backup` on the peer listener: streams a consistent copy of the whole key-value map in
//! the backup format, which [`verify`] checks for `raftexample restore`.
//!
//! The node first confirms a linearizable read index (the path of a linearizable GET) and waits
//! until its map has applied it, so the backup holds every write acknowledged before the
//! request. It then captures the map, an O(1) clone of a persistent map, and serialises it on a
//! blocking thread straight into the response: no second copy of the map, no work on the raft
//! task. Writes go on meanwhile (they copy the few map nodes they change).
//!
//! Format, integers little-endian:
//!
//! ```text
//! magic "RAFTEXBK" | version: u32 | index: u64 | term: u64 | cluster id: u64 | length: u64
//! | map: `length` bytes (the kvstore's snapshot encoding) | crc32c: u32 of all bytes before it
//! ```
//!
//! `index` and `term` are those of the last entry the map holds; `cluster id` is the source
//! cluster's (0 if this node had not learnt it), so that a restore can pick a different one.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body::{Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};

use crate::channels::SnapshotSource;
use crate::cluster_id::{self, ClusterId};
use crate::http_api::{self, ApiState};
use crate::kvstore::Captured;
use crate::peer_client::CLUSTER_HEADER;

pub const MAGIC: &[u8; 8] = b"RAFTEXBK";
pub const VERSION: u32 = 1;
/// Bytes before the map.
pub const HEADER_LEN: usize = 8 + 4 + 8 * 4;
/// Bytes after the map (the checksum).
const TRAILER_LEN: usize = 4;
/// Bytes handed to the connection at once.
const CHUNK: usize = 64 << 10;

/// Where a backup stands in the source cluster's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub index: u64,
    pub term: u64,
    pub cluster_id: u64,
    /// Length of the encoded map.
    pub len: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        for n in [self.index, self.term, self.cluster_id, self.len] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b
    }

    /// Bytes of the whole backup.
    pub fn total_len(&self) -> u64 {
        (HEADER_LEN + TRAILER_LEN) as u64 + self.len
    }
}

/// A backup file that passed every check.
#[derive(Debug)]
pub struct Verified<'a> {
    pub header: Header,
    /// The map in the kvstore's snapshot encoding.
    pub map: &'a [u8],
    /// Pairs in the map.
    pub keys: u64,
    /// The file's checksum.
    pub crc: u32,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("not a raftexample backup (bad magic)")]
    Magic,
    #[error("backup format version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    #[error("truncated or padded: {actual} bytes, the header announces {expected}")]
    Length { actual: u64, expected: u64 },
    #[error("checksum mismatch: the backup is corrupted")]
    Checksum,
    #[error("the map does not decode: {0}")]
    Map(&'static str),
    #[error("taken at index 0: there is nothing to restore")]
    Empty,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks magic, version, length, checksum and the map's framing of a whole backup file.
pub fn verify(file: &[u8]) -> Result<Verified<'_>, FormatError> {
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(FormatError::Magic);
    }
    if file.len() < HEADER_LEN + TRAILER_LEN {
        return Err(FormatError::Length {
            actual: file.len() as u64,
            expected: (HEADER_LEN + TRAILER_LEN) as u64,
        });
    }
    let version = u32::from_le_bytes(file[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let header = Header {
        index: u64_at(file, 12),
        term: u64_at(file, 20),
        cluster_id: u64_at(file, 28),
        len: u64_at(file, 36),
    };
    if header.len.checked_add((HEADER_LEN + TRAILER_LEN) as u64) != Some(file.len() as u64) {
        return Err(FormatError::Length {
            actual: file.len() as u64,
            expected: header.total_len(),
        });
    }
    let (body, crc) = file.split_at(file.len() - TRAILER_LEN);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(FormatError::Checksum);
    }
    if header.index == 0 {
        return Err(FormatError::Empty);
    }
    let map = &body[HEADER_LEN..];
    let keys = check_map(map).map_err(FormatError::Map)?;
    Ok(Verified {
        header,
        map,
        keys,
        crc,
    })
}

/// Walks the map's framing (pair count, then length-prefixed keys and values) without
/// building it; returns the pair count.
fn check_map(mut b: &[u8]) -> Result<u64, &'static str> {
    let count = u64_at(take(&mut b, 8)?, 0);
    for _ in 0..count {
        for _ in 0..2 {
            let len = u64_at(take(&mut b, 8)?, 0);
            take(&mut b, len)?;
        }
    }
    if !b.is_empty() {
        return Err("trailing bytes after the last pair");
    }
    Ok(count)
}

fn take<'a>(b: &mut &'a [u8], n: u64) -> Result<&'a [u8], &'static str> {
    if n > b.len() as u64 {
        return Err("truncated");
    }
    let (head, rest) = b.split_at(n as usize);
    *b = rest;
    Ok(head)
}

/// What the `/backup` route needs.
#[derive(Clone)]
pub struct BackupState {
    /// The read path (read index, applied index, map) and the request timeout.
    pub api: ApiState,
    pub cluster_token: HeaderValue,
    pub cluster_id: ClusterId,
    pub logger: slog::Logger,
    /// Held while a backup streams: one at a time, since each pins the map it captured (and
    /// so every map node a write replaces meanwhile) until its client has read it all.
    pub busy: Arc<tokio::sync::Semaphore>,
}

impl BackupState {
    pub fn new(api: ApiState, logger: slog::Logger) -> BackupState {
        BackupState {
            cluster_token: api.peers.cluster_token(),
            cluster_id: api.peers.cluster_id(),
            api,
            logger,
            busy: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

/// `GET /backup`, to merge into the peer listener's router (so peer TLS applies).
pub fn router(state: BackupState) -> Router {
    Router::new()
        .route("/backup", get(backup))
        .with_state(Arc::new(state))
}

/// A request that names another cluster (token or id) is refused as `/raft` refuses it; one
/// that names none (an operator's `curl`) is served: the token is a cluster's name, not a
/// password, and under peer TLS only a peer certificate reaches this route at all.
fn foreign(st: &BackupState, headers: &HeaderMap) -> Option<Response> {
    let refuse = |why: &'static str| Some((StatusCode::PRECONDITION_FAILED, why).into_response());
    if headers
        .get(CLUSTER_HEADER)
        .is_some_and(|t| t != st.cluster_token)
    {
        return refuse("cluster token mismatch: this request is for another cluster\n");
    }
    let theirs = headers.get(cluster_id::HEADER)?;
    match cluster_id::parse(theirs.as_bytes()) {
        None => Some((StatusCode::BAD_REQUEST, "malformed cluster id\n").into_response()),
        Some(id) if Some(id) == st.cluster_id.get() => None,
        Some(_) => refuse("cluster id mismatch: this request is for another cluster\n"),
    }
}

async fn backup(State(st): State<Arc<BackupState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = foreign(&st, &headers) {
        return refused;
    }
    let Ok(permit) = st.busy.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "another backup is being taken\n",
        )
            .into_response();
    };
    let deadline = tokio::time::Instant::now() + st.api.timeout;
    if let Err(e) = http_api::wait_linearizable(&st.api, deadline).await {
        return e.into_response();
    }
    let (map, index, term) = st.api.kv.capture_at();
    let cluster_id = st.cluster_id.get().unwrap_or(0);
    let (len_tx, len_rx) = oneshot::channel();
    let (chunk_tx, chunk_rx) = mpsc::channel(4);
    let logger = st.logger.clone();
    // Measuring and encoding walk the whole map: a blocking thread, not a runtime worker.
    tokio::task::spawn_blocking(move || {
        let source = Captured(map);
        let header = Header {
            index,
            term,
            cluster_id,
            len: source.encoded_len(),
        };
        if len_tx.send(header.total_len()).is_err() {
            return;
        }
        stream(&source, header, chunk_tx, &logger);
        drop(permit);
    });
    let Ok(total) = len_rx.await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "backup task failed\n").into_response();
    };
    let name = format!("attachment; filename=\"backup-{index:016x}.snap\"");
    let mut resp = Body::new(ChannelBody {
        rx: chunk_rx,
        len: total,
    })
    .into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// Writes the whole backup into `tx`; logs the outcome.
fn stream(
    source: &Captured,
    header: Header,
    tx: mpsc::Sender<io::Result<Bytes>>,
    log: &slog::Logger,
) {
    let started = Instant::now();
    let mut w = ChunkWriter {
        tx,
        buf: Vec::with_capacity(2 * CHUNK),
        crc: 0,
    };
    let res = w
        .write_all(&header.encode())
        .and_then(|()| source.write_to(&mut w))
        .and_then(|()| {
            let crc = w.crc;
            w.buf.extend_from_slice(&crc.to_le_bytes());
            w.flush()
        });
    match res {
        Ok(()) => slog::info!(log, "backup sent"; "index" => header.index, "term" => header.term,
            "keys" => source.0.len(), "bytes" => header.total_len(),
            "ms" => started.elapsed().as_millis() as u64),
        Err(e) => {
            slog::warn!(log, "backup not completed"; "index" => header.index, "error" => %e);
            // Ends the body with an error, so the client cannot take a short file for a whole one.
            let _ = w.tx.blocking_send(Err(e));
        }
    }
}

/// Gathers writes into chunks for the response body, computing the checksum as it goes.
struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    crc: u32,
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(2 * CHUNK),
        ));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client closed the connection",
            )
        })
    }
}

/// The response body: chunks from the encoding thread, of a length known up front.
struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    len: u64,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// A backup of `map` at (`index`, `term`) as `GET /backup` streams it, for tests.
pub fn encode(map: &crate::kvstore::Map, index: u64, term: u64, cluster_id: u64) -> Vec<u8> {
    let source = Captured(map.clone());
    let header = Header {
        index,
        term,
        cluster_id,
        len: source.encoded_len(),
    };
    let mut out = header.encode();
    source
        .write_to(&mut out)
        .expect("writing to a Vec cannot fail");
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::Map;

    fn sample() -> Vec<u8> {
        let mut map = Map::new();
        map.insert(b"/a", b"1");
        map.insert(b"/b", &[0xff, 0]);
        map.insert(b"", b"");
        encode(&map, 42, 3, 7)
    }

    #[test]
    fn round_trip() {
        let file = sample();
        let v = verify(&file).unwrap();
        assert_eq!(
            v.header,
            Header {
                index: 42,
                term: 3,
                cluster_id: 7,
                len: v.map.len() as u64
            }
        );
        assert_eq!(v.keys, 3);
        let map = crate::kvstore::decode(v.map).unwrap();
        assert_eq!(map.get(b"/b"), Some(&[0xff, 0][..]));
        assert_eq!(v.header.total_len(), file.len() as u64);
    }

    /// Every truncation and every single-bit flip is refused, never a panic.
    #[test]
    fn damage_is_refused() {
        let file = sample();
        for n in 0..file.len() {
            assert!(verify(&file[..n]).is_err(), "truncated to {n} accepted");
        }
        let mut padded = file.clone();
        padded.push(0);
        assert!(verify(&padded).is_err());
        for bit in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(verify(&bad).is_err(), "bit {bit} flipped accepted");
        }
    }

    #[test]
    fn framing_is_checked_after_the_checksum() {
        assert_eq!(check_map(&[0; 8]), Ok(0));
        assert_eq!(
            check_map(&[0; 9]),
            Err("trailing bytes after the last pair")
        );
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(check_map(&huge), Err("truncated"));
        assert_eq!(check_map(&[1]), Err("truncated"));
        let empty = encode(&Map::new(), 0, 0, 0);
        assert_eq!(verify(&empty).unwrap_err(), FormatError::Empty);
    }
}
