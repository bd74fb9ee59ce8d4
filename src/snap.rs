//! Snapshot files: one raft `Snapshot` (metadata + state machine data) per
//! file, modelled on etcd's `snap` package.
//!
//! A file is named `%016x-%016x.snap` after `(term, index)` and holds
//! `crc: u32 LE` (CRC-32C of the payload) followed by the payload, the
//! protobuf-encoded `eraftpb.Snapshot`. Files are written as `<name>.tmp`,
//! fsynced, renamed and the directory fsynced, so a visible `.snap` file is
//! always complete. A file that fails its checks on load is renamed to
//! `<name>.broken` and kept for inspection.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use protobuf::Message;
use raft::prelude::{Snapshot, SnapshotMetadata};
use slog::{info, o, warn, Logger};

use crate::vfs::{Appender, Disk, Pages};

const EXT: &str = ".snap";
const TMP_EXT: &str = ".snap.tmp";
const BROKEN_EXT: &str = ".broken";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snap: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("snap: corrupt snapshot file {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("snap: cannot encode snapshot: {reason}")]
    Encode { reason: String },
}

impl Error {
    fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A snapshot written to its `.snap.tmp` file and synced, not yet renamed into place.
#[derive(Debug)]
pub struct TmpSnapshot {
    tmp: PathBuf,
    path: PathBuf,
    index: u64,
    bytes: u64,
    /// Where the snapshot's data starts in the file, and its length.
    data_at: u64,
    data_len: u64,
}

/// What [`Snapshotter::purge`] did.
#[derive(Debug, PartialEq)]
pub struct Purged {
    pub removed: usize,
    /// Index of the oldest valid snapshot kept, from which on recovery needs the WAL; `None`
    /// if no valid snapshot is present.
    pub oldest_kept: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Snapshotter {
    dir: PathBuf,
    disk: Disk,
    logger: Logger,
}

impl Snapshotter {
    /// Uses `dir`, creating it (mode 0750) if missing.
    pub fn new(disk: &Disk, dir: &Path, logger: &Logger) -> Result<Self, Error> {
        // Durably: a crash must not lose the directory, and with it snapshots the WAL has
        // already released entries for.
        disk.create_dir_durable(dir)
            .map_err(|e| Error::io(dir, e))?;
        Ok(Snapshotter {
            dir: dir.to_path_buf(),
            disk: disk.clone(),
            logger: logger.new(o!("component" => "snap")),
        })
    }

    /// Writes the snapshot durably as `%016x-%016x.snap` (term, index). An
    /// empty snapshot (index 0) carries nothing to restore and is not
    /// written, as in etcd.
    pub fn save(&self, snap: &Snapshot) -> Result<PathBuf, Error> {
        self.save_with(snap.get_metadata(), snap.data.len() as u64, |w| {
            w.write_all(&snap.data)
        })
    }

    /// [`Self::save`] for a snapshot whose `data_len` bytes of data `write_data` produces
    /// as it goes, so that a large state is streamed to the file and never held in memory
    /// whole. Returns the file's path (for index 0, where it would be: nothing is written).
    pub fn save_with(
        &self,
        meta: &SnapshotMetadata,
        data_len: u64,
        write_data: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<PathBuf, Error> {
        if meta.index == 0 {
            return Ok(self.path(meta.term, meta.index));
        }
        let tmp = self.write_tmp(meta, data_len, write_data)?;
        self.commit(tmp)
    }

    /// The first half of [`Self::save_with`]: the `.snap.tmp` file, written and synced.
    pub fn write_tmp(
        &self,
        meta: &SnapshotMetadata,
        data_len: u64,
        write_data: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<TmpSnapshot, Error> {
        let name = file_name(meta.term, meta.index);
        let path = self.dir.join(&name);
        let (head, tail) = encode_frame(meta, data_len)?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let write_tmp = || -> io::Result<()> {
            let file = Appender {
                file: self.disk.create(&tmp)?,
                offset: 0,
            };
            // The CRC comes first in the file but is known last.
            let mut w = CrcWriter {
                inner: io::BufWriter::with_capacity(
                    SYNC_EVERY as usize,
                    SyncEvery { file, unsynced: 0 },
                ),
                crc: 0,
                written: 0,
            };
            w.inner.write_all(&[0; 4])?;
            w.write_all(&head)?;
            write_data(&mut w)?;
            let got = w.written - head.len() as u64;
            if got != data_len {
                return Err(io::Error::other(format!(
                    "snapshot data is {got} bytes, {data_len} announced"
                )));
            }
            w.write_all(&tail)?;
            let crc = w.crc;
            let mut f = w.inner.into_inner().map_err(|e| e.into_error())?.file.file;
            f.write_at(&crc.to_le_bytes(), 0)?;
            f.sync_all()
        };
        if let Err(e) = write_tmp() {
            // A partial file must not be mistaken for a snapshot later.
            let _ = self.disk.remove(&tmp);
            return Err(Error::io(&tmp, e));
        }
        Ok(TmpSnapshot {
            tmp,
            path,
            index: meta.index,
            bytes: 4 + head.len() as u64 + data_len + tail.len() as u64,
            data_at: 4 + head.len() as u64,
            data_len,
        })
    }

    /// The snapshot's data as its written file holds it, mapped and not read (see
    /// [`crate::vfs::Vfs::map_unread`]).
    pub fn map_data(&self, t: &TmpSnapshot) -> Result<(Bytes, Option<Pages>), Error> {
        let (file, pages) = self
            .disk
            .map_unread(&t.tmp)
            .map_err(|e| Error::io(&t.tmp, e))?;
        let range = t.data_at as usize..(t.data_at + t.data_len) as usize;
        if file.len() < range.end {
            return Err(Error::Corrupt {
                path: t.tmp.clone(),
                reason: format!("{} bytes, shorter than it was written", file.len()),
            });
        }
        Ok((file.slice(range), pages))
    }

    /// The second half of [`Self::save_with`]: the rename that makes the file a snapshot,
    /// made durable.
    pub fn commit(&self, t: TmpSnapshot) -> Result<PathBuf, Error> {
        self.disk
            .rename(&t.tmp, &t.path)
            .map_err(|e| Error::io(&t.path, e))?;
        self.sync_dir()?;
        info!(self.logger, "saved snapshot"; "index" => t.index, "bytes" => t.bytes);
        Ok(t.path)
    }

    /// The data of the snapshot `(term, index)` that this process has just saved, mapped and
    /// not read: its checksum is not verified again, which would read every page. The
    /// protobuf frame is parsed, which reads only the bytes around the data.
    pub fn map_saved(&self, term: u64, index: u64) -> Result<(Bytes, Option<Pages>), Error> {
        let path = self.path(term, index);
        let (file, pages) = self
            .disk
            .map_unread(&path)
            .map_err(|e| Error::io(&path, e))?;
        let snap =
            decode(&file, term, index, false).map_err(|reason| Error::Corrupt { path, reason })?;
        Ok((snap.data, pages))
    }

    /// Where the snapshot `(term, index)` is (or would be) saved.
    pub fn path(&self, term: u64, index: u64) -> PathBuf {
        self.dir.join(file_name(term, index))
    }

    /// Returns the newest snapshot whose `(term, index)` is one of
    /// `wal_snaps` and which passes its checks. A failing file is renamed
    /// to `<name>.broken` (with a warning) and the next older one is tried.
    /// `Ok(None)` if none qualifies.
    pub fn load_newest_available(
        &self,
        wal_snaps: &[(u64, u64)],
    ) -> Result<Option<Snapshot>, Error> {
        for (term, index, path) in self.list()? {
            if !wal_snaps.contains(&(term, index)) {
                continue;
            }
            let bytes = self
                .disk
                .read_shared(&path)
                .map_err(|e| Error::io(&path, e))?;
            match decode(&bytes, term, index, true) {
                Ok(snap) => {
                    info!(self.logger, "loaded snapshot";
                        "term" => term, "index" => index, "bytes" => bytes.len());
                    return Ok(Some(snap));
                }
                Err(reason) => self.set_aside(&path, &reason)?,
            }
        }
        Ok(None)
    }

    /// Deletes the `.snap` files recovery no longer needs. `valid` names the snapshots
    /// recovery would use (`(term, index)` of the WAL's durable markers at or below its durable
    /// commit): the newest `keep` of them present stay, and so does every file newer than the
    /// newest of those, which may still become valid (its marker or the commit covering it not
    /// yet written). Other files, older, go: no marker will ever name them. Temporary files stay
    /// (one may be a snapshot being written, see [`Self::remove_tmp_files`]), so do `.broken`
    /// ones. A file already gone counts as removed.
    pub fn purge(&self, keep: usize, valid: &[(u64, u64)]) -> Result<Purged, Error> {
        let files = self.list()?;
        let kept: Vec<usize> = files
            .iter()
            .enumerate()
            .filter(|(_, (term, index, _))| valid.contains(&(*term, *index)))
            .map(|(i, _)| i)
            .take(keep)
            .collect();
        let (Some(&newest), Some(&oldest)) = (kept.first(), kept.last()) else {
            return Ok(Purged {
                removed: 0,
                oldest_kept: None,
            });
        };
        let doomed: Vec<&PathBuf> = files
            .iter()
            .enumerate()
            .skip(newest + 1)
            .filter(|(i, _)| !kept.contains(i))
            .map(|(_, (_, _, p))| p)
            .collect();
        for path in &doomed {
            match self.disk.remove(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        if !doomed.is_empty() {
            self.sync_dir()?;
            info!(self.logger, "purged snapshot files"; "removed" => doomed.len(), "kept" => kept.len());
        }
        Ok(Purged {
            removed: doomed.len(),
            oldest_kept: Some(files[oldest].1),
        })
    }

    /// Deletes the temporary files of writes a crash interrupted. For startup only: while the
    /// node runs, one may be a snapshot being written (by the snapshot thread, or by the WAL
    /// writer installing the leader's). Returns how many files were removed.
    pub fn remove_tmp_files(&self) -> Result<usize, Error> {
        let mut removed = 0;
        for name in self.names()? {
            if !name.ends_with(TMP_EXT) {
                continue;
            }
            let path = self.dir.join(&name);
            match self.disk.remove(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
            warn!(self.logger, "removed an unfinished snapshot file"; "file" => path.display());
        }
        if removed > 0 {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// `(term, index, path)` of every `.snap` file, newest first.
    fn list(&self) -> Result<Vec<(u64, u64, PathBuf)>, Error> {
        let mut snaps = Vec::new();
        for name in self.names()? {
            if let Some((term, index)) = parse_name(&name) {
                snaps.push((term, index, self.dir.join(name)));
            }
        }
        snaps.sort_by_key(|&(term, index, _)| std::cmp::Reverse((term, index)));
        Ok(snaps)
    }

    fn set_aside(&self, path: &Path, reason: &str) -> Result<(), Error> {
        let mut broken = path.as_os_str().to_owned();
        broken.push(BROKEN_EXT);
        warn!(self.logger, "snapshot file is unusable; renaming it";
            "file" => path.display(), "reason" => reason, "to" => Path::new(&broken).display());
        self.disk
            .rename(path, Path::new(&broken))
            .map_err(|e| Error::io(path, e))?;
        self.sync_dir()
    }

    fn names(&self) -> Result<Vec<String>, Error> {
        self.disk
            .list(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }

    fn sync_dir(&self) -> Result<(), Error> {
        self.disk
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }
}

fn file_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}{EXT}")
}

/// Accepts exactly `%016x-%016x.snap` (lowercase hex).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (term, index) = name.strip_suffix(EXT)?.split_once('-')?;
    let hex = |s: &str| {
        let ok = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| u64::from_str_radix(s, 16).ok()).flatten()
    };
    Some((hex(term)?, hex(index)?))
}

/// Checks a file's bytes against its CRC (if `check_crc`: reading every byte) and its name.
/// The snapshot's data is a slice of `bytes`: a large map is held once, not twice.
fn decode(bytes: &Bytes, term: u64, index: u64, check_crc: bool) -> Result<Snapshot, String> {
    if bytes.len() < 4 {
        return Err(format!(
            "file is {} bytes, too short for its crc",
            bytes.len()
        ));
    }
    let payload = bytes.slice(4..);
    if check_crc {
        let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let computed = crc32c::crc32c(&payload);
        if stored != computed {
            return Err(format!(
                "crc mismatch (stored {stored:08x}, computed {computed:08x})"
            ));
        }
    }
    let snap =
        Snapshot::parse_from_carllerche_bytes(&payload).map_err(|e| format!("undecodable: {e}"))?;
    let meta = snap.get_metadata();
    if (meta.term, meta.index) != (term, index) {
        return Err(format!(
            "metadata says term {} index {}, name says term {term} index {index}",
            meta.term, meta.index
        ));
    }
    Ok(snap)
}

/// What surrounds the data in the file's protobuf `Snapshot`: field 1's tag and length before
/// it, the metadata field after it. Together with the data, the same bytes as
/// `write_to_bytes()`.
fn encode_frame(meta: &SnapshotMetadata, data_len: u64) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let encode = |e: protobuf::ProtobufError| Error::Encode {
        reason: e.to_string(),
    };
    let mut head = Vec::new();
    if data_len > 0 {
        let len = u32::try_from(data_len).map_err(|_| Error::Encode {
            reason: "snapshot data over 4 GiB".into(),
        })?;
        let mut os = protobuf::CodedOutputStream::vec(&mut head);
        os.write_tag(1, protobuf::wire_format::WireTypeLengthDelimited)
            .and_then(|()| os.write_raw_varint32(len))
            .and_then(|()| os.flush())
            .map_err(encode)?;
    }
    let mut meta_only = Snapshot::default();
    meta_only.set_metadata(meta.clone());
    let tail = meta_only.write_to_bytes().map_err(encode)?;
    Ok((head, tail))
}

/// Bytes of a snapshot file written between two fdatasyncs.
const SYNC_EVERY: u64 = 1 << 20;

/// A snapshot file that is synced every [`SYNC_EVERY`] bytes as it is written (RocksDB's
/// `bytes_per_sync`). Left to the final fsync, a large snapshot puts megabytes in front of the
/// disk at once, and every WAL fsync issued meanwhile waits behind them. Synced as it goes, a
/// WAL fsync waits for one chunk at most: in A/B runs of the PUT benchmark, p99 dropped from
/// 19-27 ms to 11-13 ms.
struct SyncEvery {
    file: Appender,
    unsynced: u64,
}

impl Write for SyncEvery {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Checksums (CRC-32C) and counts what passes through.
struct CrcWriter<W> {
    inner: W,
    crc: u32,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the snapshot file at `path`, named after `(term, index)`, and checks it.
pub fn read(disk: &Disk, path: &Path, term: u64, index: u64) -> Result<Snapshot, Error> {
    let bytes = disk.read_shared(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, term, index, true).map_err(|reason| Error::Corrupt {
        path: path.to_path_buf(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::ConfState;
    use std::fs;
    use tempfile::TempDir;

    fn logger() -> Logger {
        Logger::root(slog::Discard, o!())
    }

    fn snap(term: u64, index: u64) -> Snapshot {
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let meta = SnapshotMetadata {
            term,
            index,
            conf_state: Some(cs).into(),
            ..Default::default()
        };
        Snapshot {
            metadata: Some(meta).into(),
            // Not UTF-8.
            data: vec![0xff, 0x00, 0xfe, index as u8].into(),
            ..Default::default()
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn new_creates_the_dir() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("x/snap");
        Snapshotter::new(&Disk::default(), &dir, &logger()).unwrap();
        assert!(dir.is_dir());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o027, 0, "{mode:o}");
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let tmp = TempDir::new().unwrap();
        let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
        s.save(&snap(2, 0x1f)).unwrap();
        assert_eq!(
            files(tmp.path()),
            ["0000000000000002-000000000000001f.snap"]
        );
        let got = s.load_newest_available(&[(2, 0x1f)]).unwrap().unwrap();
        assert_eq!(got, snap(2, 0x1f));
    }

    /// The file holds exactly the CRC and protobuf encoding, though it is streamed in parts;
    /// a writer that produces other than the announced length leaves no file behind.
    #[test]
    fn streamed_file_is_the_protobuf_encoding() {
        let tmp = TempDir::new().unwrap();
        let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
        let mut big = snap(3, 9);
        big.data = vec![7; 300_000].into();
        let mut no_data = snap(4, 10);
        no_data.data = Default::default();
        for snap in [snap(2, 5), big, no_data] {
            let path = s.save(&snap).unwrap();
            let payload = snap.write_to_bytes().unwrap();
            let mut want = crc32c::crc32c(&payload).to_le_bytes().to_vec();
            want.extend_from_slice(&payload);
            assert_eq!(fs::read(&path).unwrap(), want);
            let meta = snap.get_metadata();
            assert_eq!(
                read(&Disk::default(), &path, meta.term, meta.index).unwrap(),
                snap
            );
        }
        let short = s.save_with(snap(5, 11).get_metadata(), 10, |w| w.write_all(b"abc"));
        assert!(short.is_err());
        assert!(!files(tmp.path())
            .iter()
            .any(|f| f.contains("000000000000000b")));
    }

    #[test]
    fn empty_snapshot_is_not_written() {
        let tmp = TempDir::new().unwrap();
        let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
        s.save(&Snapshot::default()).unwrap();
        assert!(files(tmp.path()).is_empty());
    }

    #[test]
    fn newest_matching_the_wal_is_chosen() {
        let tmp = TempDir::new().unwrap();
        let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
        for (t, i) in [(1, 10), (1, 20), (2, 30)] {
            s.save(&snap(t, i)).unwrap();
        }
        let load = |w: &[(u64, u64)]| s.load_newest_available(w).unwrap();
        assert_eq!(load(&[(1, 10), (1, 20), (2, 30)]), Some(snap(2, 30)));
        assert_eq!(load(&[(1, 10), (1, 20)]), Some(snap(1, 20)));
        assert_eq!(load(&[(1, 10), (2, 20)]), Some(snap(1, 10)));
        assert_eq!(load(&[]), None);
    }

    #[test]
    fn unusable_newest_is_renamed_broken_and_older_returned() {
        type Damage = fn(&mut Vec<u8>);
        let damage: [(&str, Damage); 4] = [
            ("crc", |b| *b.last_mut().unwrap() ^= 1),
            ("short", |b| b.truncate(3)),
            ("garbage", |b| {
                *b = vec![0xff; 9];
                let crc = crc32c::crc32c(&b[4..]);
                b[..4].copy_from_slice(&crc.to_le_bytes());
            }),
            ("wrong metadata", |b| {
                let mut other = snap(9, 9).write_to_bytes().unwrap();
                let mut out = crc32c::crc32c(&other).to_le_bytes().to_vec();
                out.append(&mut other);
                *b = out;
            }),
        ];
        for (what, f) in damage {
            let tmp = TempDir::new().unwrap();
            let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
            s.save(&snap(1, 10)).unwrap();
            s.save(&snap(2, 30)).unwrap();
            let newest = tmp.path().join(file_name(2, 30));
            let mut bytes = fs::read(&newest).unwrap();
            f(&mut bytes);
            fs::write(&newest, bytes).unwrap();

            let got = s.load_newest_available(&[(1, 10), (2, 30)]).unwrap();
            assert_eq!(got, Some(snap(1, 10)), "{what}");
            assert_eq!(
                files(tmp.path()),
                [
                    "0000000000000001-000000000000000a.snap",
                    "0000000000000002-000000000000001e.snap.broken"
                ],
                "{what}"
            );
        }
    }

    #[test]
    fn purge_keeps_the_newest_n_valid_and_leaves_tmp_files() {
        let tmp = TempDir::new().unwrap();
        let s = Snapshotter::new(&Disk::default(), tmp.path(), &logger()).unwrap();
        for i in 1..=5 {
            s.save(&snap(1, i * 10)).unwrap();
        }
        let valid: Vec<(u64, u64)> = (1..=5).map(|i| (1, i * 10)).collect();
        let in_flight = "0000000000000001-0000000000000063.snap.tmp";
        fs::write(tmp.path().join(in_flight), b"x").unwrap();
        fs::write(tmp.path().join("other.txt"), b"x").unwrap();
        let purged = s.purge(2, &valid).unwrap();
        assert_eq!(
            purged,
            Purged {
                removed: 3,
                oldest_kept: Some(40)
            }
        );
        assert_eq!(
            files(tmp.path()),
            [
                "0000000000000001-0000000000000028.snap",
                "0000000000000001-0000000000000032.snap",
                in_flight,
                "other.txt"
            ]
        );
        assert_eq!(s.purge(2, &valid).unwrap().removed, 0);
        // Nothing valid: nothing to measure "old" against, so nothing goes.
        assert_eq!(
            s.purge(1, &[]).unwrap(),
            Purged {
                removed: 0,
                oldest_kept: None
            }
        );
        assert_eq!(files(tmp.path()).len(), 4);

        assert_eq!(s.remove_tmp_files().unwrap(), 1);
        assert_eq!(
            files(tmp.path()),
            [
                "0000000000000001-0000000000000028.snap",
                "0000000000000001-0000000000000032.snap",
                "other.txt"
            ]
        );
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(parse_name(&file_name(3, 0xab)), Some((3, 0xab)));
        for bad in [
            "0000000000000003-00000000000000AB.snap",
            "3-ab.snap",
            "0000000000000003-00000000000000ab.snap.broken",
            "0000000000000003-00000000000000ab.snap.tmp",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
