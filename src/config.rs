//! Command-line configuration (clap): raftexample's `--id --cluster --port --join`, plus the
//! settings the original hard-codes. `Config::validate` turns bad input into one-line errors
//! before anything is bound or written.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::error::{Error, Result};

/// A replicated key-value store: a Rust port of etcd's contrib/raftexample.
///
/// Keys are URL paths on the client port: `curl -L http://127.0.0.1:12380/my-key -XPUT -d hello`.
/// `POST /<id>` with a peer URL as body adds a member, `DELETE /<id>` removes one.
#[derive(Debug, Clone, Parser)]
#[command(name = "raftexample", version, about, long_about = None)]
pub struct Config {
    /// This node's raft id: its 1-based position in --cluster.
    #[arg(long, default_value_t = 1)]
    pub id: u64,

    /// Comma-separated peer URLs (http://host:port, no path) of every member; the node serves the
    /// raft transport and /status on its own entry.
    #[arg(long, default_value = "http://127.0.0.1:9021")]
    pub cluster: String,

    /// Port of the client key-value API.
    #[arg(long, default_value_t = 9121)]
    pub port: u16,

    /// Join an existing cluster (after `POST /<id>` on a member) instead of bootstrapping one.
    #[arg(long)]
    pub join: bool,

    /// Directory holding raftexample-<id>/ (WAL) and raftexample-<id>-snap/ (snapshots).
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,

    /// Host the client API listens on; defaults to the host of this node's peer URL.
    #[arg(long)]
    pub listen_host: Option<String>,

    /// Take a snapshot (and compact the log) after this many applied entries.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_count: u64,

    /// Entries kept in memory after a compaction so slow followers catch up without a snapshot.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_catchup_entries: u64,

    /// How long a PUT, GET or membership change may wait for raft before answering 503.
    #[arg(long, default_value_t = 5000)]
    pub request_timeout_ms: u64,

    /// Largest accepted request body in bytes (larger gets 413); etcd's limit by default.
    #[arg(long, default_value_t = 1_572_864)]
    pub max_request_bytes: usize,

    /// Start a new WAL segment once the current one exceeds this many bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub wal_segment_size: u64,

    /// Snapshot files to keep; older ones are deleted after each new snapshot.
    #[arg(long, default_value_t = 5)]
    pub max_snapshots: usize,

    /// Test hook: the WAL fails every write after this many bytes, as a full disk would.
    #[arg(long, hide = true)]
    pub wal_fail_after_bytes: Option<u64>,

    /// Test hook (feature `fault-injection`): a file of transport fault rules, re-read live.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator tools; without one, the daemon runs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print, read-only, the snapshot markers, HardState and entries a node would recover, one
    /// per line with file and offset; exit non-zero naming the offset of any corruption.
    WalDump {
        /// The node's --data-dir.
        #[arg(long, default_value = ".")]
        data_dir: PathBuf,
        /// The node's --id.
        #[arg(long, default_value_t = 1)]
        id: u64,
    },
}

/// A member's peer URL, checked to be `http://host:port` with no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUrl {
    pub url: String,
    /// `host:port`, what the peer listener binds.
    pub authority: String,
}

impl PeerUrl {
    pub fn parse(s: &str) -> Result<PeerUrl> {
        let bad = |why: &str| Error::Config(format!("peer URL {s:?} {why}"));
        let uri: axum::http::Uri = s.parse().map_err(|_| bad("is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("must start with http://"));
        }
        let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
        if auth.port_u16().is_none() {
            return Err(bad("has no port"));
        }
        if auth.as_str().contains('@') {
            return Err(bad("must not carry user info"));
        }
        // `http::Uri` reports an absent path as "/", so check the text itself: raftexample's
        // transport rejects any path, a lone trailing "/" included.
        if uri.path_and_query().is_some() && s.trim_end() != format!("http://{auth}") {
            return Err(bad("must not have a path"));
        }
        Ok(PeerUrl {
            url: format!("http://{auth}"),
            authority: auth.as_str().to_string(),
        })
    }
}

impl Config {
    /// Peer URLs by id (1-based position in --cluster).
    pub fn peers(&self) -> Result<Vec<(u64, PeerUrl)>> {
        self.cluster
            .split(',')
            .enumerate()
            .map(|(i, s)| Ok((i as u64 + 1, PeerUrl::parse(s.trim())?)))
            .collect()
    }

    /// Checks everything that can be checked without touching the network or the disk.
    pub fn validate(&self) -> Result<()> {
        let peers = self.peers()?;
        if self.id == 0 || self.id as usize > peers.len() {
            return Err(Error::Config(format!(
                "--id {} is not a position in --cluster (1..={})",
                self.id,
                peers.len()
            )));
        }
        if self.snapshot_count == 0 {
            return Err(Error::Config("--snapshot-count must be positive".into()));
        }
        if self.request_timeout_ms == 0 {
            return Err(Error::Config(
                "--request-timeout-ms must be positive".into(),
            ));
        }
        if self.max_snapshots == 0 {
            return Err(Error::Config("--max-snapshots must be at least 1".into()));
        }
        Ok(())
    }

    pub fn own_url(&self) -> Result<PeerUrl> {
        let peers = self.peers()?;
        peers
            .into_iter()
            .find(|(id, _)| *id == self.id)
            .map(|(_, u)| u)
            .ok_or_else(|| Error::Config(format!("--id {} is not in --cluster", self.id)))
    }

    /// Where the client API listens: `--listen-host` (default: this node's peer host) and `--port`.
    pub fn client_addr(&self) -> Result<String> {
        let host = match &self.listen_host {
            Some(h) => h.clone(),
            None => {
                let own = self.own_url()?;
                let (host, _) = own
                    .authority
                    .rsplit_once(':')
                    .expect("a validated authority has a port");
                host.to_string()
            }
        };
        Ok(format!("{host}:{}", self.port))
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join(format!("raftexample-{}", self.id))
    }

    pub fn snap_dir(&self) -> PathBuf {
        self.data_dir.join(format!("raftexample-{}-snap", self.id))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Resolves a `host:port` for binding, with a one-line error.
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| Error::Io {
            context: format!("cannot resolve {addr}"),
            source: e,
        })?
        .next()
        .ok_or_else(|| Error::Config(format!("{addr} resolves to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_checked() {
        assert!(PeerUrl::parse("http://127.0.0.1:12379").is_ok());
        for bad in [
            "127.0.0.1:12379",
            "http://127.0.0.1",
            "http://127.0.0.1:1/",
            "http://127.0.0.1:1/x",
            "ftp://127.0.0.1:1",
            "http://127.0.0.1:1?x=1",
            "",
        ] {
            assert!(PeerUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn id_must_index_cluster() {
        let mut c = Config::parse_from(["raftexample", "--cluster", "http://a:1,http://b:2"]);
        assert!(c.validate().is_ok());
        c.id = 3;
        assert!(c.validate().is_err());
        c.id = 0;
        assert!(c.validate().is_err());
    }
}
