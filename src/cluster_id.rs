//! The cluster id: which cluster a peer request comes from, so that a node of another cluster
//! (started with the same, default, `--cluster-token` and a `--cluster` list that names one of
//! our URLs) is refused with 412 before any of its messages reach raft. Its raft traffic made
//! raft-rs panic: its log matched ours at the bootstrap entries, both term 1.
//!
//! As in etcd, a new cluster's id is a hash of its sorted initial member URLs (and its token),
//! computed by every initial member from `--cluster` at bootstrap. A member added later
//! cannot compute it (its `--cluster` lists itself too, and maybe members added since), so it
//! learns the id from the first peer request that carries one, which comes from the cluster
//! that added it. Each node keeps the id in `cluster-id` in its WAL directory, written durably
//! before the bootstrap WAL or when learnt; a WAL without that file (written before cluster
//! ids existed, or a joiner that never heard from its cluster) learns it the same way.
//!
//! Every peer request carries the id in [`HEADER`] once it is known. A request with another id
//! gets 412; one without is let through (the token still applies), so that a node that does
//! not know the id yet can talk, as can one of a version that sends none.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::HeaderValue;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::vfs::Disk;

/// Header carrying the sender's cluster id, as 16 hex digits.
pub const HEADER: &str = "x-raftexample-cluster-id";
const FILE: &str = "cluster-id";

/// A new cluster's id: 64-bit FNV-1a of its sorted member URLs and its token (etcd hashes
/// its initial members and token with SHA-1; this needs no cryptography, only that two
/// clusters differ). Never 0, which means unknown.
pub fn compute(urls: &[&str], token: &str) -> u64 {
    let mut urls = urls.to_vec();
    urls.sort_unstable();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in urls.join(",").bytes().chain([0]).chain(token.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

pub fn format(id: u64) -> String {
    format!("{id:016x}")
}

/// 16 hex digits, not all zero.
pub fn parse(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    let id = u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()?;
    (id != 0).then_some(id)
}

/// The id kept in `dir`, if any.
pub fn load(disk: &Disk, dir: &Path) -> io::Result<Option<u64>> {
    let path = dir.join(FILE);
    match disk.read(&path) {
        Ok(b) => parse(b.trim_ascii()).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold a cluster id", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps `id` in `dir` (created if missing) durably: a temporary file, fsynced, renamed over
/// the old one, and the directory fsynced.
pub fn store(disk: &Disk, dir: &Path, id: u64) -> io::Result<()> {
    disk.create_dir_durable(dir)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = disk.create(&tmp)?;
    f.write_at(format!("{}\n", format(id)).as_bytes(), 0)?;
    f.sync_all()?;
    disk.rename(&tmp, &dir.join(FILE))?;
    disk.sync_dir(dir)
}

/// This node's cluster id, shared by the transport (which sends it) and the peer listener
/// (which checks it, and learns it while unknown).
#[derive(Clone, Debug)]
pub struct ClusterId {
    id: Arc<AtomicU64>,
    /// Where it is kept: the node's WAL directory.
    dir: Arc<PathBuf>,
    disk: Disk,
}

/// What a peer's cluster id means for its request.
#[derive(Debug, PartialEq)]
pub enum Admit {
    Same,
    /// This node did not know its cluster id; it is now the peer's (to be stored).
    Learned,
    /// Another cluster's.
    Foreign {
        ours: u64,
    },
}

impl ClusterId {
    /// Not known yet, kept in `dir` once learnt.
    pub fn unknown(disk: Disk, dir: PathBuf) -> ClusterId {
        ClusterId {
            id: Arc::new(AtomicU64::new(0)),
            dir: Arc::new(dir),
            disk,
        }
    }

    /// The id `cfg` starts with: the one kept in its WAL directory; for a new cluster (no
    /// WAL, no `--join`) the hash of `--cluster`, stored before the WAL is created; else
    /// unknown, learnt from the cluster.
    pub fn from_config(cfg: &Config, logger: &slog::Logger) -> Result<ClusterId> {
        let dir = cfg.wal_dir();
        let io = |e| Error::Io {
            context: format!("cluster id in {}", dir.display()),
            source: e,
        };
        let id = ClusterId::unknown(cfg.disk.clone(), dir.clone());
        if crate::wal::Wal::exists(&cfg.disk, &dir) {
            match load(&cfg.disk, &dir).map_err(io)? {
                Some(v) => id.id.store(v, Ordering::Relaxed),
                None => slog::info!(
                    logger,
                    "cluster id not known yet: learning it from \
                    the first peer request that carries one"
                ),
            }
        } else if !cfg.join {
            let peers = cfg.peers()?;
            let urls: Vec<&str> = peers.iter().map(|(_, u)| u.url.as_str()).collect();
            let v = compute(&urls, &cfg.cluster_token);
            store(&cfg.disk, &dir, v).map_err(io)?;
            id.id.store(v, Ordering::Relaxed);
        }
        Ok(id)
    }

    pub fn get(&self) -> Option<u64> {
        match self.id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// The value of [`HEADER`] on this node's requests, once the id is known.
    pub fn header(&self) -> Option<HeaderValue> {
        self.get()
            .map(|id| HeaderValue::from_str(&format(id)).expect("hex digits are a header value"))
    }

    /// Checks a peer's id, adopting it if this node has none yet (the first wins).
    pub fn admit(&self, theirs: u64) -> Admit {
        match self
            .id
            .compare_exchange(0, theirs, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Admit::Learned,
            Err(ours) if ours == theirs => Admit::Same,
            Err(ours) => Admit::Foreign { ours },
        }
    }

    /// Stores the id (after [`Admit::Learned`]).
    pub fn store(&self) -> io::Result<()> {
        match self.get() {
            Some(id) => store(&self.disk, &self.dir, id),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id depends on the set of URLs and the token, not on their order.
    #[test]
    fn id_of_the_initial_members() {
        let a = compute(&["http://a:1", "http://b:2", "http://c:3"], "t");
        assert_eq!(a, compute(&["http://c:3", "http://a:1", "http://b:2"], "t"));
        assert_ne!(a, compute(&["http://a:1", "http://b:2", "http://d:3"], "t"));
        assert_ne!(a, compute(&["http://a:1", "http://b:2"], "t"));
        assert_ne!(a, compute(&["http://a:1", "http://b:2", "http://c:3"], "u"));
        assert_eq!(parse(format(a).as_bytes()), Some(a));
        for bad in [&b"0000000000000000"[..], b"123", b"0123456789abcdeg", b""] {
            assert_eq!(parse(bad), None);
        }
    }

    #[test]
    fn stored_and_learnt() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("raftexample-1");
        assert_eq!(load(&Disk::default(), &sub).unwrap(), None);
        let id = ClusterId::unknown(Disk::default(), sub.clone());
        assert_eq!(id.header(), None);
        assert_eq!(id.admit(7), Admit::Learned);
        assert_eq!(id.admit(7), Admit::Same);
        assert_eq!(id.admit(8), Admit::Foreign { ours: 7 });
        id.store().unwrap();
        assert_eq!(load(&Disk::default(), &sub).unwrap(), Some(7));
        std::fs::write(sub.join(FILE), "junk").unwrap();
        assert!(load(&Disk::default(), &sub).is_err());
    }
}
