//! Reading a WAL directory: listing its segments (contiguous by sequence number), replaying
//! their records into the log and latest state, and the read-only dump of every record.

use std::path::{Path, PathBuf};

use raft::prelude::Entry;

use super::record::{Record, WalSnapshot};
use super::segment::{self, SegmentName};
use super::{Error, Tail};
use crate::vfs::Disk;

/// Rebuilds the raft log and the latest state from records in write order.
#[derive(Debug, Default)]
pub(super) struct Replay {
    pub(super) entries: Vec<Entry>,
    pub(super) snapshots: Vec<WalSnapshot>,
    pub(super) tail: Tail,
}

impl Replay {
    pub(super) fn apply(&mut self, rec: Record) -> Result<(), String> {
        match rec {
            Record::Entry(e) => self.entry(e)?,
            Record::HardState(hs) => self.tail.hard_state = Some(hs),
            Record::Snapshot(s) => {
                // Roll-overs repeat the newest marker at each segment head.
                if self.snapshots.last() != Some(&s) {
                    self.snapshots.push(s);
                }
                self.tail.snapshot(s);
            }
            Record::Header(_) => return Err("header record in the middle of a segment".into()),
        }
        Ok(())
    }

    fn entry(&mut self, e: Entry) -> Result<(), String> {
        let index = e.index;
        match self.entries.first().map(|f| f.index) {
            Some(first) if index > first => {
                let pos = index - first;
                if pos <= self.entries.len() as u64 {
                    self.entries.truncate(pos as usize);
                } else if self.tail.snap_index.saturating_add(1) >= index {
                    self.entries.clear();
                } else {
                    return Err(format!(
                        "entry {index} follows entry {} and no snapshot marker covers the gap",
                        self.tail.last_index
                    ));
                }
            }
            _ => self.entries.clear(),
        }
        self.entries.push(e);
        self.tail.last_index = index;
        Ok(())
    }
}

/// A record as read back by [`read_dir_records`].
#[derive(Clone, Debug, PartialEq)]
pub struct DirRecord {
    pub path: PathBuf,
    pub offset: u64,
    pub record: Record,
}

/// Everything in a WAL directory, read-only, for inspection tools.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirRecords {
    /// Every record (segment headers included) in file and offset order.
    pub records: Vec<DirRecord>,
    /// Where a torn tail starts, if the last segment has one (`open` would
    /// truncate it there).
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Where the zeros written ahead start, if the last segment ends in them
    /// (`open` trims them).
    pub unused: Option<(PathBuf, u64)>,
}

/// Reads every record of every segment in `dir` without modifying anything.
/// Corruption is returned as [`Error::Corrupt`], as `open` would.
pub fn read_dir_records(disk: &Disk, dir: &Path) -> Result<DirRecords, Error> {
    let (segments, _) = list_segments(disk, dir)?;
    let mut out = DirRecords::default();
    let mut prev_crc = None;
    for (i, (name, path)) in segments.iter().enumerate() {
        let s = segment::read(disk, path, *name, prev_crc, i + 1 == segments.len())?;
        out.records.push(DirRecord {
            path: path.clone(),
            offset: 0,
            record: Record::Header(s.header),
        });
        out.records
            .extend(s.records.into_iter().map(|(offset, record)| DirRecord {
                path: path.clone(),
                offset,
                record,
            }));
        match s.torn {
            Some(t) if t.zeros => out.unused = Some((path.clone(), t.offset)),
            Some(t) => out.torn_tail = Some((path.clone(), t.offset)),
            None => {}
        }
        prev_crc = Some(s.end_crc);
    }
    Ok(out)
}

pub(super) type Segments = Vec<(SegmentName, PathBuf)>;

/// Lists segments by sequence number, checking that they are contiguous.
/// Also returns `*.wal` names that are not segment names.
pub(super) fn list_segments(disk: &Disk, dir: &Path) -> Result<(Segments, Vec<String>), Error> {
    let mut segments = Vec::new();
    let mut ignored = Vec::new();
    for file_name in disk.list(dir).map_err(|e| Error::io(dir, e))? {
        match SegmentName::parse(&file_name) {
            Some(n) => segments.push((n, dir.join(&file_name))),
            None if file_name.ends_with(".wal") => ignored.push(file_name),
            None => {}
        }
    }
    segments.sort_by_key(|(n, _)| n.seq);
    for w in segments.windows(2) {
        if w[1].0.seq != w[0].0.seq + 1 {
            return Err(Error::Corrupt {
                path: w[1].1.clone(),
                offset: 0,
                reason: format!(
                    "segment sequence is not contiguous: {:016x} follows {:016x}",
                    w[1].0.seq, w[0].0.seq
                ),
            });
        }
    }
    Ok((segments, ignored))
}

pub(super) fn remove_tmp_files(disk: &Disk, dir: &Path) -> Result<(), Error> {
    for name in disk.list(dir).map_err(|e| Error::io(dir, e))? {
        if segment::is_tmp(&name) {
            let path = dir.join(&name);
            disk.remove(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// How a [`super::Wal`] lays out and writes its segments.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Roll over to a new segment once the current one exceeds this size.
    pub segment_size: u64,
    /// Test hook simulating a full disk: once this many bytes have been
    /// written through this `Wal`, the write that would pass the limit
    /// writes the bytes that fit and then fails with an I/O error.
    #[doc(hidden)]
    pub fail_write_after: Option<u64>,
    /// Where the segments live: the OS, or a simulated disk in tests.
    pub disk: Disk,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 << 20,
            fail_write_after: None,
            disk: Disk::default(),
        }
    }
}
