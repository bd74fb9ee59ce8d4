//! `raftexample restore`: writes the data directories of one member of a new cluster from a
//! backup ([`crate::backup`]), in the layout and formats a start recovers from.
//!
//! A member gets a snapshot at the backup's (term, index) whose membership is the new
//! `--cluster`, a WAL holding that snapshot's marker and a HardState committing it, and a
//! `cluster-id` file. The id is derived from the backup (its checksum, index, term and source
//! cluster) and the new member URLs, so every member restored from the same file with the same
//! `--cluster` computes the same one, and it differs from the source cluster's even when the
//! URLs are the same: the old cluster's peers are refused with 412.
//!
//! Everything is checked before anything is written; the directories are then written in a
//! temporary directory beside them and renamed into place, so a failure leaves no partial data.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use raft::prelude::{HardState, SnapshotMetadata};

use crate::backup::{self, Verified};
use crate::config::{PeerUrl, MAX_NODE_ID};
use crate::vfs::Disk;
use crate::wal::{Wal, WalOptions, WalSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Args(String),
    #[error("backup {}: {reason}", path.display())]
    Backup { path: PathBuf, reason: String },
    #[error("{} already holds data: restore only into a new data directory", path.display())]
    NotEmpty { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Wal(#[from] crate::wal::Error),
    #[error(transparent)]
    Snap(#[from] crate::snap::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What one restore run was asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub backup: PathBuf,
    pub id: u64,
    /// The new cluster's peer URLs, comma-separated, as its members' `--cluster`.
    pub cluster: String,
    pub data_dir: PathBuf,
}

/// What a restore wrote.
#[derive(Debug)]
pub struct Restored {
    pub index: u64,
    pub term: u64,
    pub keys: u64,
    pub cluster_id: u64,
    pub wal_dir: PathBuf,
    pub snap_dir: PathBuf,
}

/// Members by id, checked as the daemon checks `--cluster` and `--id`.
fn members(cluster: &str, id: u64) -> Result<BTreeMap<u64, String>, Error> {
    let mut members = BTreeMap::new();
    for (i, s) in cluster.split(',').enumerate() {
        let url = PeerUrl::parse(s.trim()).map_err(|e| Error::Args(e.to_string()))?;
        if members.values().any(|u| *u == url.url) {
            return Err(Error::Args(format!(
                "{} appears twice in --cluster",
                url.url
            )));
        }
        members.insert(i as u64 + 1, url.url);
    }
    if members.values().any(|u| u.starts_with("https://"))
        && members.values().any(|u| u.starts_with("http://"))
    {
        return Err(Error::Args(
            "--cluster mixes http:// and https:// URLs".into(),
        ));
    }
    if id == 0 || id as usize > members.len() || id > MAX_NODE_ID {
        return Err(Error::Args(format!(
            "--id {id} is not a position in --cluster (1..={})",
            members.len()
        )));
    }
    Ok(members)
}

/// The restored cluster's id: a hash of its URLs salted with what identifies the backup, never
/// the source cluster's.
pub fn new_cluster_id(members: &BTreeMap<u64, String>, v: &Verified<'_>) -> u64 {
    let urls: Vec<&str> = members.values().map(String::as_str).collect();
    let h = &v.header;
    let salt = format!(
        "restored from {:016x} at {}/{} crc {:08x}",
        h.cluster_id, h.term, h.index, v.crc
    );
    let id = crate::cluster_id::compute(&urls, &salt);
    if id == h.cluster_id {
        id.wrapping_add(1).max(1)
    } else {
        id
    }
}

/// Refuses a target that exists, unless it is an empty directory.
fn check_free(path: &Path) -> Result<(), Error> {
    match std::fs::read_dir(path).map(|mut entries| entries.next().is_none()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(true) => Ok(()),
        _ => Err(Error::NotEmpty {
            path: path.to_path_buf(),
        }),
    }
}

/// Runs one restore: checks, then writes member `req.id`'s directories.
pub fn restore(req: &Request) -> Result<Restored, Error> {
    let members = members(&req.cluster, req.id)?;
    let file = std::fs::read(&req.backup).map_err(|e| Error::Backup {
        path: req.backup.clone(),
        reason: e.to_string(),
    })?;
    let v = backup::verify(&file).map_err(|e| Error::Backup {
        path: req.backup.clone(),
        reason: e.to_string(),
    })?;
    let disk = Disk::default();
    let wal_dir = req.data_dir.join(format!("raftexample-{}", req.id));
    let snap_dir = req.data_dir.join(format!("raftexample-{}-snap", req.id));
    check_free(&wal_dir)?;
    check_free(&snap_dir)?;
    let cluster_id = new_cluster_id(&members, &v);

    disk.create_dir_durable(&req.data_dir)
        .map_err(io_err(&req.data_dir))?;
    let tmp = req
        .data_dir
        .join(format!(".raftexample-{}-restore.tmp", req.id));
    // Named after this member, so a leftover is a restore that was interrupted.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    disk.create_dir_durable(&tmp).map_err(io_err(&tmp))?;
    let names = (
        wal_dir.file_name().expect("joined a name").to_owned(),
        snap_dir.file_name().expect("joined a name").to_owned(),
    );
    let written = write_member(
        &disk,
        &tmp.join(&names.0),
        &tmp.join(&names.1),
        &members,
        &v,
        cluster_id,
    )
    .and_then(|()| {
        // The WAL first: without its snapshot file it refuses to start, while a snapshot
        // directory alone would be ignored by a start that bootstraps an empty cluster.
        disk.rename(&tmp.join(&names.0), &wal_dir)
            .map_err(io_err(&wal_dir))?;
        disk.rename(&tmp.join(&names.1), &snap_dir)
            .map_err(io_err(&snap_dir))?;
        disk.sync_dir(&req.data_dir).map_err(io_err(&req.data_dir))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = disk.sync_dir(&req.data_dir);
    written?;
    Ok(Restored {
        index: v.header.index,
        term: v.header.term,
        keys: v.keys,
        cluster_id,
        wal_dir,
        snap_dir,
    })
}

/// Writes the snapshot, the WAL and the cluster id of a member into the given directories.
fn write_member(
    disk: &Disk,
    wal_dir: &Path,
    snap_dir: &Path,
    members: &BTreeMap<u64, String>,
    v: &Verified<'_>,
    cluster_id: u64,
) -> Result<(), Error> {
    let quiet = slog::Logger::root(slog::Discard, slog::o!());
    let (index, term) = (v.header.index, v.header.term);
    let mut meta = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    meta.mut_conf_state().voters = members.keys().copied().collect();
    let head = crate::node::snapshot::data_header(members, &BTreeSet::new(), v.map.len() as u64);
    let snapshotter = crate::snap::Snapshotter::new(disk, snap_dir, &quiet)?;
    snapshotter.save_with(
        &meta,
        (head.len() + v.map.len()) as u64,
        |w: &mut dyn Write| {
            w.write_all(&head)?;
            w.write_all(v.map)
        },
    )?;

    let opts = WalOptions {
        disk: disk.clone(),
        ..WalOptions::default()
    };
    let (mut wal, _) = Wal::open(wal_dir, opts, &quiet)?;
    wal.save_snapshot(&WalSnapshot { index, term })?;
    let hs = HardState {
        term,
        vote: 0,
        commit: index,
        ..Default::default()
    };
    wal.save(&[], Some(&hs), true)?;
    wal.close()?;
    crate::cluster_id::store(disk, wal_dir, cluster_id).map_err(io_err(wal_dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::Map;

    fn backup_file(dir: &Path) -> PathBuf {
        let mut map = Map::new();
        map.insert(b"/k", b"v");
        let path = dir.join("b.snap");
        std::fs::write(&path, backup::encode(&map, 9, 2, 5)).unwrap();
        path
    }

    fn req(dir: &Path, id: u64) -> Request {
        Request {
            backup: backup_file(dir),
            id,
            cluster: "http://a:1,http://b:2".into(),
            data_dir: dir.join("data"),
        }
    }

    /// The WAL, snapshot and cluster id recovery reads; every member computes the same id.
    #[test]
    fn writes_what_recovery_reads() {
        let dir = tempfile::tempdir().unwrap();
        let r1 = restore(&req(dir.path(), 1)).unwrap();
        let r2 = restore(&req(dir.path(), 2)).unwrap();
        assert_eq!(r1.cluster_id, r2.cluster_id);
        assert_ne!(r1.cluster_id, 5);
        let disk = Disk::default();
        assert_eq!(
            crate::cluster_id::load(&disk, &r1.wal_dir).unwrap(),
            Some(r1.cluster_id)
        );
        let quiet = slog::Logger::root(slog::Discard, slog::o!());
        let (_, rec) = Wal::open(&r1.wal_dir, WalOptions::default(), &quiet).unwrap();
        assert_eq!(rec.valid_snapshots(), vec![(2, 9)]);
        let snap = crate::snap::Snapshotter::new(&disk, &r1.snap_dir, &quiet)
            .unwrap()
            .load_newest_available(&rec.valid_snapshots())
            .unwrap()
            .unwrap();
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 4, "{leftovers:?}");
    }

    #[test]
    fn bad_requests_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req(dir.path(), 3);
        assert!(matches!(restore(&r), Err(Error::Args(_))));
        r.id = 1;
        r.cluster = "http://a:1,https://b:2".into();
        assert!(matches!(restore(&r), Err(Error::Args(_))));
        r.cluster = "http://a:1,http://a:1".into();
        assert!(matches!(restore(&r), Err(Error::Args(_))));
        r.cluster = "http://a:1".into();
        std::fs::write(&r.backup, b"RAFTEXBK").unwrap();
        assert!(matches!(restore(&r), Err(Error::Backup { .. })));
        assert!(!r.data_dir.exists());
        let good = req(dir.path(), 1);
        restore(&good).unwrap();
        assert!(matches!(restore(&good), Err(Error::NotEmpty { .. })));
    }
}
