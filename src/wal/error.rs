//! The WAL's errors: I/O with the file it happened on, and damage with file and offset.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wal: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wal: corrupt record in {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("wal: cannot encode record: {reason}")]
    Encode { reason: String },
    /// A write or sync failed earlier, so the file's tail is unknown;
    /// reopening repairs it.
    #[error("wal: unusable after an earlier write or sync failure; reopen to repair")]
    Poisoned,
}

impl Error {
    /// What `WalOptions::fail_write_after` fails with.
    pub(super) fn simulated_enospc(path: &Path) -> Self {
        Error::io(
            path,
            io::Error::other("simulated ENOSPC: WalOptions::fail_write_after reached"),
        )
    }

    pub(super) fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<super::record::EncodeError> for Error {
    fn from(e: super::record::EncodeError) -> Self {
        Error::Encode {
            reason: e.to_string(),
        }
    }
}
