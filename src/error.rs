//! The crate's top-level error: what `run` and startup can fail with. Each layer (WAL,
//! snapshotter, transport, client API) has its own enum; this one wraps them so that `main` can
//! print one line and exit non-zero.

use std::path::PathBuf;

/// Everything that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Wal(#[from] crate::wal::Error),
    #[error(transparent)]
    Snap(#[from] crate::snap::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("recovery: {0}")]
    Recovery(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
