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

    /// Comma-separated peer URLs (http://host:port, or https://host:port with the peer TLS
    /// flags; no path) of every member; the node serves the raft transport and /status on its
    /// own entry.
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

    /// Take a snapshot (and compact the log) after this many applied entries; once snapshots
    /// exceed 4 MiB, also only after the log since the last one is at least as large.
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

    /// Snapshots to keep among those recovery could use; older files are deleted after each new
    /// snapshot, and so is the WAL before the oldest kept. One by default: each snapshot is a
    /// whole copy of the map (etcd's are small because its map lives in one bbolt file, of
    /// which it keeps one), so every extra one, with the WAL it needs, adds about a map's size
    /// to the data dir; a second only helps if the newest is damaged on disk.
    #[arg(long, default_value_t = 1)]
    pub max_snapshots: usize,

    /// Least severe log level written to stderr: critical, error, warning, info, debug, trace.
    /// raft's per-message debug lines are loud while a peer is unreachable.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    pub log_level: slog::Level,

    /// Format of the stderr log: `human` lines, or `json`, one object per line with
    /// timestamp, level, message and every key-value pair as a field.
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Human)]
    pub log_format: crate::logging::LogFormat,

    /// Name of the cluster, sent by peers in the X-Raftexample-Cluster header; peer requests
    /// carrying another (or none) get 412. Not a secret: it keeps two clusters from mixing.
    #[arg(long, default_value = DEFAULT_CLUSTER_TOKEN)]
    pub cluster_token: String,

    /// Certificate (PEM) of the client API: with --key-file, --port serves HTTPS.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) for --cert-file.
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates; used with --client-cert-auth.
    #[arg(long, requires = "client_cert_auth")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Serve only clients that present a certificate signed by --trusted-ca-file.
    #[arg(long, requires_all = ["trusted_ca_file", "cert_file"])]
    pub client_cert_auth: bool,

    /// Certificate (PEM) this node presents to its peers, as server and as client; with
    /// --peer-key-file and --peer-trusted-ca-file, peer URLs are https:// and mutually
    /// authenticated.
    #[arg(long, requires_all = ["peer_key_file", "peer_trusted_ca_file"])]
    pub peer_cert_file: Option<PathBuf>,

    /// Private key (PEM) for --peer-cert-file.
    #[arg(long, requires_all = ["peer_cert_file", "peer_trusted_ca_file"])]
    pub peer_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that must sign every peer's certificate.
    #[arg(long, requires_all = ["peer_cert_file", "peer_key_file"])]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Open connections served at once on each port (client and peer); further connections
    /// wait in the kernel's backlog until one closes.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// Time a connection has to complete its TLS handshake and send a request's headers; an
    /// idle keep-alive connection is closed after it too.
    #[arg(long, default_value_t = 5000)]
    pub header_timeout_ms: u64,

    /// Time a request has to send its body once its headers are in, plus one second per MiB
    /// its Content-Length announces (so large snapshots still get through); then 408.
    #[arg(long, default_value_t = 10_000)]
    pub body_timeout_ms: u64,

    /// Test hook: the WAL fails every write after this many bytes, as a full disk would.
    #[arg(long, hide = true)]
    pub wal_fail_after_bytes: Option<u64>,

    /// Test hook (feature `fault-injection`): a file of transport fault rules, re-read live.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// The disk the WAL and snapshots are on: the OS, or a simulated one in tests.
    #[arg(skip)]
    pub disk: crate::vfs::Disk,
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
    /// Write the data directories of member --id of a NEW cluster (--cluster) from a file
    /// taken with `GET /backup`; run once per member, then start the members as usual.
    Restore {
        /// The backup file.
        #[arg(long)]
        backup: PathBuf,
        /// The member to write: its 1-based position in --cluster.
        #[arg(long)]
        id: u64,
        /// The new cluster's peer URLs, as its members' --cluster.
        #[arg(long)]
        cluster: String,
        /// The member's --data-dir; must not hold its directories yet.
        #[arg(long, default_value = ".")]
        data_dir: PathBuf,
    },
}

/// Largest `--max-request-bytes`: a PUT's entry (value, key, encoding) must fit one WAL
/// record, whose limit this leaves 1 MiB of room under (a key is at most what hyper accepts
/// as a request head, well below that).
pub const MAX_REQUEST_BYTES: usize = crate::wal::MAX_RECORD_LEN - (1 << 20);

/// Largest node id: request ids carry the proposer's id in their top 16 bits
/// ([`crate::kvstore::IdGen`]).
pub const MAX_NODE_ID: u64 = 0xffff;

/// `--cluster-token` when none is given.
pub const DEFAULT_CLUSTER_TOKEN: &str = "raftexample-cluster";

fn parse_level(s: &str) -> std::result::Result<slog::Level, String> {
    s.parse::<slog::Level>()
        .map_err(|()| format!("unknown log level {s:?}"))
}

/// A member's peer URL, checked to be `http://host:port` or `https://host:port` with no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUrl {
    pub url: String,
    /// `host:port`, what the peer listener binds.
    pub authority: String,
}

impl PeerUrl {
    /// Parses either scheme; [`Config::validate`] and the `POST /<id>` handler then check that
    /// the scheme is the one the cluster uses (`https` exactly when peer TLS is configured).
    pub fn parse(s: &str) -> Result<PeerUrl> {
        let bad = |why: &str| Error::Config(format!("peer URL {s:?} {why}"));
        let uri: axum::http::Uri = s.parse().map_err(|_| bad("is not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some(scheme @ ("http" | "https")) => scheme,
            _ => return Err(bad("must start with http:// or https://")),
        };
        let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
        if auth.port_u16().is_none() {
            return Err(bad("has no port"));
        }
        if auth.as_str().contains('@') {
            return Err(bad("must not carry user info"));
        }
        // `http::Uri` reports an absent path as "/", so check the text itself: raftexample's
        // transport rejects any path, a lone trailing "/" included.
        if uri.path_and_query().is_some() && s.trim_end() != format!("{scheme}://{auth}") {
            return Err(bad("must not have a path"));
        }
        Ok(PeerUrl {
            url: format!("{scheme}://{auth}"),
            authority: auth.as_str().to_string(),
        })
    }

    pub fn is_https(&self) -> bool {
        self.url.starts_with("https://")
    }
}

/// The scheme peer URLs must have: `https` exactly when peer TLS is configured.
pub fn peer_scheme(peer_tls: bool) -> &'static str {
    if peer_tls {
        "https"
    } else {
        "http"
    }
}

impl Config {
    /// Peer URLs by id (1-based position in --cluster).
    /// The certificate flags, for [`crate::tls`].
    pub fn tls_files(&self) -> crate::tls::TlsFiles<'_> {
        crate::tls::TlsFiles {
            cert_file: self.cert_file.as_deref(),
            key_file: self.key_file.as_deref(),
            trusted_ca_file: self.trusted_ca_file.as_deref(),
            client_cert_auth: self.client_cert_auth,
            peer_cert_file: self.peer_cert_file.as_deref(),
            peer_key_file: self.peer_key_file.as_deref(),
            peer_trusted_ca_file: self.peer_trusted_ca_file.as_deref(),
        }
    }

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
        if self.id > MAX_NODE_ID {
            return Err(Error::Config(format!(
                "--id must be at most {MAX_NODE_ID} (request ids hold it in 16 bits)"
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
        if self.max_request_bytes > MAX_REQUEST_BYTES {
            return Err(Error::Config(format!(
                "--max-request-bytes must be at most {MAX_REQUEST_BYTES} (a PUT is one WAL \
                 record, at most {} bytes)",
                crate::wal::MAX_RECORD_LEN
            )));
        }
        if self.max_snapshots == 0 {
            return Err(Error::Config("--max-snapshots must be at least 1".into()));
        }
        let scheme = peer_scheme(self.peer_tls());
        if let Some((_, url)) = peers.iter().find(|(_, u)| u.is_https() != self.peer_tls()) {
            let why = if self.peer_tls() {
                "--peer-cert-file is given"
            } else {
                "no --peer-cert-file is given"
            };
            return Err(Error::Config(format!(
                "peer URL {} must start with {scheme}:// since {why}",
                url.url
            )));
        }
        if self.cluster_token.is_empty()
            || axum::http::HeaderValue::from_str(&self.cluster_token).is_err()
        {
            return Err(Error::Config(
                "--cluster-token must be non-empty visible ASCII (it is sent as a header)".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("--max-connections must be at least 1".into()));
        }
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err(Error::Config(
                "--header-timeout-ms and --body-timeout-ms must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Whether peers talk HTTPS with mutual authentication (clap makes the three peer TLS
    /// flags come together).
    pub fn peer_tls(&self) -> bool {
        self.peer_cert_file.is_some()
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

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
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
        let https = PeerUrl::parse("https://127.0.0.1:12379").unwrap();
        assert_eq!(https.url, "https://127.0.0.1:12379");
        assert!(https.is_https());
        for bad in [
            "127.0.0.1:12379",
            "http://127.0.0.1",
            "http://127.0.0.1:1/",
            "http://127.0.0.1:1/x",
            "https://127.0.0.1:1/",
            "https://127.0.0.1",
            "ftp://127.0.0.1:1",
            "http://127.0.0.1:1?x=1",
            "",
        ] {
            assert!(PeerUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    /// https:// peer URLs need the peer TLS flags, and the peer TLS flags need https:// URLs.
    #[test]
    fn peer_scheme_matches_peer_tls() {
        let plain = ["raftexample", "--cluster", "http://a:1,http://b:2"];
        assert!(Config::parse_from(plain).validate().is_ok());
        let https = ["raftexample", "--cluster", "https://a:1,https://b:2"];
        assert!(Config::parse_from(https).validate().is_err());
        let tls = [
            "--peer-cert-file",
            "c.pem",
            "--peer-key-file",
            "k.pem",
            "--peer-trusted-ca-file",
            "ca.pem",
        ];
        let with_tls = |args: &[&str]| Config::parse_from(args.iter().chain(tls.iter()));
        assert!(with_tls(&https).validate().is_ok());
        assert!(with_tls(&plain).validate().is_err());
        let mixed = ["raftexample", "--cluster", "https://a:1,http://b:2"];
        assert!(with_tls(&mixed).validate().is_err());
    }

    /// TLS flags that only make sense together are refused apart.
    #[test]
    fn tls_flags_come_in_sets() {
        let base = ["raftexample", "--cluster", "http://a:1"];
        for extra in [
            &["--cert-file", "c.pem"][..],
            &["--key-file", "k.pem"],
            &["--trusted-ca-file", "ca.pem"],
            &["--client-cert-auth"],
            &["--cert-file", "c", "--key-file", "k", "--client-cert-auth"],
            &["--peer-cert-file", "c.pem", "--peer-key-file", "k.pem"],
            &["--peer-trusted-ca-file", "ca.pem"],
        ] {
            let args = base.iter().chain(extra.iter());
            assert!(Config::try_parse_from(args).is_err(), "{extra:?} accepted");
        }
        let ok = base.iter().chain(
            [
                "--cert-file",
                "c",
                "--key-file",
                "k",
                "--trusted-ca-file",
                "ca",
                "--client-cert-auth",
            ]
            .iter(),
        );
        assert!(Config::try_parse_from(ok).is_ok());
    }

    #[test]
    fn cluster_token_must_be_a_header_value() {
        let mut c = Config::parse_from(["raftexample", "--cluster", "http://a:1"]);
        assert_eq!(c.cluster_token, DEFAULT_CLUSTER_TOKEN);
        c.cluster_token = "line\nbreak".into();
        assert!(c.validate().is_err());
        c.cluster_token = String::new();
        assert!(c.validate().is_err());
    }

    /// One PUT is one raft entry, which must fit one WAL record (and so one stream frame):
    /// a larger limit would let a client write an entry the WAL refuses, which stops the node.
    #[test]
    fn request_limit_fits_a_wal_record() {
        let base = [
            "raftexample",
            "--cluster",
            "http://a:1",
            "--max-request-bytes",
        ];
        let limit = MAX_REQUEST_BYTES.to_string();
        let over = (crate::wal::MAX_RECORD_LEN).to_string();
        let with = |n: &str| Config::parse_from(base.iter().copied().chain([n]));
        assert!(with(&limit).validate().is_ok());
        assert!(with(&over).validate().is_err());
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

    /// Request ids keep the node id in 16 bits: ids 1 and 65537 would share their ids.
    #[test]
    fn id_must_fit_request_ids() {
        let urls: Vec<String> = (0..=MAX_NODE_ID)
            .map(|i| format!("http://h{i}:1"))
            .collect();
        let mut c = Config::parse_from(["raftexample", "--cluster", &urls.join(",")]);
        c.id = MAX_NODE_ID;
        assert!(c.validate().is_ok());
        c.id = MAX_NODE_ID + 1;
        assert!(c.validate().is_err());
    }
}
