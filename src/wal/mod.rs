//! Write-ahead log: raft entries, HardStates and snapshot markers, made
//! durable before raft is told they are (modelled on etcd's `wal` package).
//!
//! All calls are synchronous `std::fs` I/O; `save(.., sync = true)` blocks the
//! calling thread for an fdatasync, so the raft task must run on a
//! multi-threaded runtime.
//!
//! # On-disk format
//!
//! A WAL is a directory of *segments* named `%016x-%016x.wal` after
//! `(sequence, first index)`. Sequence numbers start at 0 and must be
//! contiguous. The first segment is `0000000000000000-0000000000000000.wal`
//! (first index 0); a later one is named after the first entry index it
//! expects, `max(last entry index, newest snapshot index) + 1` when it is cut.
//! Old segments may be deleted by [`Wal::release_to`], so the oldest segment
//! on disk need not have sequence 0.
//!
//! A segment is a sequence of records, each framed as
//!
//! ```text
//! +---------------+---------------+---------+-----------------+
//! | len: u32 LE   | crc: u32 LE   | type:u8 | payload         |
//! +---------------+---------------+---------+-----------------+
//!                                 |<------- len bytes ------->|
//! ```
//!
//! `crc` is CRC-32C over `type + payload`, seeded with the previous record's
//! `crc`, so a lost, reordered or foreign record breaks the chain. `len` is at
//! most 64 MiB ([`MAX_RECORD_LEN`]). Record types:
//!
//! | type | name      | payload                                             |
//! |------|-----------|-----------------------------------------------------|
//! | 1    | Header    | `seq: u64 LE, first_index: u64 LE, prev_crc: u32 LE` |
//! | 2    | Entry     | protobuf `eraftpb.Entry`                            |
//! | 3    | HardState | protobuf `eraftpb.HardState`                        |
//! | 4    | Snapshot  | `index: u64 LE, term: u64 LE` (marker only)         |
//!
//! Every segment starts with a Header whose `seq`/`first_index` repeat the
//! file name and whose `prev_crc` is the chain value the previous segment
//! ended with (0 for the first segment). The Header's own CRC is seeded with
//! `prev_crc`, which links segments into one chain and still lets the oldest
//! remaining segment be verified on its own. A segment created by a roll-over
//! then repeats the newest Snapshot marker and the current HardState, so
//! deleting older segments never loses them. Segments are created as
//! `<name>.tmp`, fsynced, renamed and the directory fsynced: a segment never
//! lacks its header.
//!
//! # Replay
//!
//! Entries are applied as a raft follower's log would be: an entry at index
//! `i` first truncates everything at `>= i`. An index gap is only accepted
//! when a snapshot marker already replayed covers it (a follower that
//! installed a snapshot past its log); the older entries are then dropped.
//!
//! The last segment is written over zeros written ahead of the records (see
//! `SegmentFile::append`: an fdatasync that need not change the file's
//! length is much cheaper). A record length of 0 marks where the writer
//! stopped: if only zeros follow, they are unused space, trimmed at startup;
//! anything else after them was never acknowledged and is a torn write. An
//! older segment is trimmed to its last record when the next one is cut, and
//! the last one on a clean stop.
//!
//! A bad record in the *last* segment that a crash explains is a torn write:
//! the file is truncated at that record and a warning logged. A crash explains
//! a record that runs past EOF, one that starts with a zero length, one that
//! fails its CRC with only zeros after it, and one that fails its CRC with a
//! 4 KiB page of zeros inside it. The last is a power cut in the middle of a
//! multi-page write: of the pages written since the last fsync any subset may
//! reach the disk, in any order, and a page that did not reads as the zeros
//! written ahead; everything after it was written later, so unsynced too. Any
//! other bad byte is [`Error::Corrupt`]: damage in an older segment (each is
//! fsynced before the next is cut), a CRC failure with no zero page and more
//! data after it, a length over the limit that still fits in the file (the
//! writer never produces one).

mod dir;
mod error;
mod record;
mod segment;
pub mod writer;

use std::io;
use std::path::{Path, PathBuf};

use raft::prelude::{Entry, HardState};
use slog::{info, o, warn, Logger};

use record::encode;
pub use record::{Record, SegmentHeader, WalSnapshot, MAX_RECORD_LEN};
use segment::{SegmentFile, SegmentName};

use crate::vfs::Disk;
use dir::{list_segments, remove_tmp_files, Replay};

/// Bytes of encoded records [`Wal::save`] writes at a time.
const SAVE_CHUNK: usize = 1 << 20;
pub use dir::{read_dir_records, DirRecord, DirRecords, WalOptions};
pub use error::Error;

/// What [`Wal::open`] read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// The last HardState record (default if none).
    pub hard_state: HardState,
    /// The log, contiguous and in index order. It may start below and end
    /// below the newest snapshot's index: keep only entries above it.
    pub entries: Vec<Entry>,
    /// Every snapshot marker, in write order (repeats dropped).
    pub snapshots: Vec<WalSnapshot>,
}

impl Recovered {
    /// `(term, index)` of the snapshots recovery may start from: only one whose marker is at
    /// or below the durable commit matches the log that follows it.
    pub fn valid_snapshots(&self) -> Vec<(u64, u64)> {
        vouched(&self.snapshots, self.hard_state.commit)
    }
}

fn vouched(markers: &[WalSnapshot], commit: u64) -> Vec<(u64, u64)> {
    markers
        .iter()
        .filter(|m| m.index <= commit)
        .map(|m| (m.term, m.index))
        .collect()
}

/// What the writer must remember to cut a new segment.
#[derive(Debug, Default)]
struct Tail {
    last_index: u64,
    snap_index: u64,
    snapshot: Option<WalSnapshot>,
    hard_state: Option<HardState>,
}

impl Tail {
    fn next_index(&self) -> u64 {
        self.last_index.max(self.snap_index).saturating_add(1)
    }

    fn snapshot(&mut self, s: WalSnapshot) {
        self.snap_index = self.snap_index.max(s.index);
        self.snapshot = Some(s);
    }
}

#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    logger: Logger,
    /// The segment being appended to; always the last of `segments`.
    seg: SegmentFile,
    /// Every segment on disk, oldest first.
    segments: Vec<(SegmentName, PathBuf)>,
    /// CRC chain value after the last record written.
    crc: u32,
    tail: Tail,
    /// The snapshot markers this WAL holds, in write order: replayed, then written, less those
    /// `release_to` may have deleted.
    markers: Vec<WalSnapshot>,
    /// Bytes written since open, for `fail_write_after`.
    written: u64,
    poisoned: bool,
    buf: Vec<u8>,
}

impl Wal {
    /// True if `dir` holds at least one `*.wal` file.
    pub fn exists(disk: &Disk, dir: &Path) -> bool {
        disk.list(dir)
            .map(|names| {
                names
                    .iter()
                    .any(|n| Path::new(n).extension().is_some_and(|x| x == segment::EXT))
            })
            .unwrap_or(false)
    }

    /// Opens (creating the dir and a first segment if missing, dir fsynced),
    /// replays every segment, repairs a torn tail, returns what it read.
    pub fn open(dir: &Path, opts: WalOptions, logger: &Logger) -> Result<(Wal, Recovered), Error> {
        let logger = logger.new(o!("component" => "wal"));
        let disk = opts.disk.clone();
        disk.create_dir_durable(dir)
            .map_err(|e| Error::io(dir, e))?;
        remove_tmp_files(&disk, dir)?;
        let (segments, ignored) = list_segments(&disk, dir)?;
        for name in ignored {
            warn!(logger, "ignoring file with a .wal extension but no segment name"; "file" => name);
        }
        if segments.is_empty() {
            return Self::create(dir, opts, logger);
        }

        let mut replay = Replay::default();
        let mut prev_crc = None;
        for (i, (name, path)) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            let s = segment::read(&disk, path, *name, prev_crc, is_last)?;
            let records = s.records.len();
            for (offset, rec) in s.records {
                replay.apply(rec).map_err(|reason| Error::Corrupt {
                    path: path.clone(),
                    offset,
                    reason,
                })?;
            }
            info!(logger, "replayed wal segment"; "file" => path.display(), "records" => records);
            if let Some(torn) = s.torn {
                if torn.zeros {
                    info!(logger, "trimming unused zeros after the last wal record";
                        "file" => path.display(), "offset" => torn.offset);
                } else {
                    warn!(logger, "truncating torn wal tail";
                        "file" => path.display(), "offset" => torn.offset, "reason" => torn.reason);
                }
                segment::truncate(&disk, path, s.valid_len)?;
            }
            prev_crc = Some(s.end_crc);
        }

        let (name, path) = segments[segments.len() - 1].clone();
        let seg = SegmentFile::open_append(&disk, &path, name)?;
        let recovered = Recovered {
            hard_state: replay.tail.hard_state.clone().unwrap_or_default(),
            entries: replay.entries,
            snapshots: replay.snapshots,
        };
        info!(logger, "wal replay done";
            "segments" => segments.len(),
            "entries" => recovered.entries.len(),
            "first_index" => recovered.entries.first().map_or(0, |e| e.index),
            "last_index" => recovered.entries.last().map_or(0, |e| e.index),
            "snapshots" => recovered.snapshots.len(),
            "term" => recovered.hard_state.term,
            "commit" => recovered.hard_state.commit);
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            logger,
            seg,
            segments,
            crc: prev_crc.unwrap_or(0),
            tail: replay.tail,
            markers: recovered.snapshots.clone(),
            written: 0,
            poisoned: false,
            buf: Vec::new(),
        };
        Ok((wal, recovered))
    }

    fn create(dir: &Path, opts: WalOptions, logger: Logger) -> Result<(Wal, Recovered), Error> {
        let name = SegmentName {
            seq: 0,
            first_index: 0,
        };
        let header = SegmentHeader {
            seq: 0,
            first_index: 0,
            prev_crc: 0,
        };
        let mut buf = Vec::new();
        let crc = encode(&Record::Header(header), 0, &mut buf)?;
        let seg = SegmentFile::create(&opts.disk, dir, name, &buf)?;
        info!(logger, "created wal"; "file" => seg.path.display());
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            logger,
            segments: vec![(name, seg.path.clone())],
            seg,
            crc,
            tail: Tail::default(),
            markers: Vec::new(),
            written: 0,
            poisoned: false,
            buf,
        };
        Ok((wal, Recovered::default()))
    }

    /// Appends entries then (if Some) the HardState as records, in that
    /// order; fdatasync if `sync`. Rolls to a new segment afterwards if the
    /// segment exceeded `segment_size`.
    pub fn save(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), Error> {
        self.check_usable()?;
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.write_records(&mut buf, entries, hs, sync);
        if buf.capacity() > 2 * SAVE_CHUNK {
            // One large record widened it: not kept for the next save.
            buf = Vec::new();
        }
        self.buf = buf;
        self.crc = self.poison_on_err(r)?;
        if let Some(e) = entries.last() {
            self.tail.last_index = e.index;
        }
        if let Some(hs) = hs {
            self.tail.hard_state = Some(hs.clone());
        }
        self.maybe_roll()
    }

    /// Encodes and writes the records of [`Self::save`] in chunks of about [`SAVE_CHUNK`]:
    /// a follower catching up gets hundreds of MB in one Ready, and encoding it whole held a
    /// second copy. Any subset of unsynced pages may be lost anyway, so one write bought no
    /// atomicity. Returns the CRC after the last record.
    fn write_records(
        &mut self,
        buf: &mut Vec<u8>,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<u32, Error> {
        buf.clear();
        let mut crc = self.crc;
        for e in entries {
            // Entry data is `Bytes`, so the clone does not copy it.
            crc = encode(&Record::Entry(e.clone()), crc, buf)?;
            if buf.len() >= SAVE_CHUNK {
                self.write(buf)?;
                buf.clear();
            }
        }
        if let Some(hs) = hs {
            crc = encode(&Record::HardState(hs.clone()), crc, buf)?;
        }
        self.write(buf)?;
        if sync {
            self.seg.sync()?;
        }
        Ok(crc)
    }

    /// Appends a snapshot marker and fsyncs.
    pub fn save_snapshot(&mut self, snap: &WalSnapshot) -> Result<(), Error> {
        self.check_usable()?;
        let mut buf = Vec::new();
        let crc = encode(&Record::Snapshot(*snap), self.crc, &mut buf)?;
        let r = self.write(&buf).and_then(|()| self.seg.sync());
        self.poison_on_err(r)?;
        self.crc = crc;
        self.tail.snapshot(*snap);
        if self.markers.last() != Some(snap) {
            self.markers.push(*snap);
        }
        self.maybe_roll()
    }

    /// Deletes the segments recovery no longer needs once a snapshot at
    /// `index` is durable (its file saved and its marker in this WAL).
    /// Keeps the newest segment whose first index is `<= index` and every
    /// later one, so recovery still yields the latest HardState, every
    /// marker at `>= index` and every entry above `index`. Never deletes the
    /// current segment. Returns the number of files removed.
    pub fn release_to(&mut self, index: u64) -> Result<usize, Error> {
        let keep_from = self
            .segments
            .iter()
            .rposition(|(n, _)| n.first_index <= index)
            .unwrap_or(0);
        let mut removed = 0;
        // Oldest first, each removal made durable before the next: a crash part-way, or a
        // power cut that brings back any unsynced removal, still leaves a contiguous run.
        while removed < keep_from {
            let path = &self.segments[0].1;
            match self.opts.disk.remove(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            segment::sync_dir(&self.opts.disk, &self.dir)?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            // Only those at or above `index` are sure to remain.
            self.markers.retain(|m| m.index >= index);
            info!(self.logger, "released wal segments";
                "index" => index, "removed" => removed, "remaining" => self.segments.len());
        }
        Ok(removed)
    }

    /// `(term, index)` of the snapshots recovery would use if the process stopped now, once
    /// what was written is synced: the markers held at or below the last HardState's commit
    /// (the rule of `RaftNode::recover`).
    pub fn recoverable_snapshots(&self) -> Vec<(u64, u64)> {
        let commit = self.tail.hard_state.as_ref().map_or(0, |hs| hs.commit);
        vouched(&self.markers, commit)
    }

    /// Syncs and cuts the zeros written ahead off, for a clean stop.
    pub fn close(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        let r = self.seg.sync().and_then(|()| self.seg.trim());
        self.poison_on_err(r)
    }

    /// fdatasyncs the current segment.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        let r = self.seg.sync();
        self.poison_on_err(r)
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// After a failed write or fsync the file's tail is unknown (a partial
    /// record, or pages the kernel dropped), so appending more would bury it
    /// mid-file where replay reports corruption.
    fn poison_on_err<T>(&mut self, r: Result<T, Error>) -> Result<T, Error> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), Error> {
        if let Some(room) = self.room_left(buf.len()) {
            // Like a full disk: what fits lands, then the write fails.
            self.seg.append(&buf[..room])?;
            self.written += room as u64;
            return Err(Error::simulated_enospc(&self.seg.path));
        }
        self.seg.append(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    /// `Some(bytes that still fit)` if `fail_write_after` forbids writing `n`.
    fn room_left(&self, n: usize) -> Option<usize> {
        let limit = self.opts.fail_write_after?;
        let room = limit.saturating_sub(self.written);
        // room < n, so it fits in usize.
        (n as u64 > room).then_some(room as usize)
    }

    fn maybe_roll(&mut self) -> Result<(), Error> {
        if self.seg.size <= self.opts.segment_size {
            return Ok(());
        }
        let r = self.roll();
        self.poison_on_err(r)
    }

    fn roll(&mut self) -> Result<(), Error> {
        // The new segment is durable once created; the old one's tail must
        // be too, or a crash would leave a torn record mid-WAL. Its zeros
        // written ahead go: only the last segment may end in unused space.
        self.seg.sync()?;
        self.seg.trim()?;
        let name = SegmentName {
            seq: self.seg.name.seq + 1,
            first_index: self.tail.next_index(),
        };
        let header = SegmentHeader {
            seq: name.seq,
            first_index: name.first_index,
            prev_crc: self.crc,
        };
        let mut buf = Vec::new();
        let mut crc = encode(&Record::Header(header), self.crc, &mut buf)?;
        if let Some(s) = self.tail.snapshot {
            crc = encode(&Record::Snapshot(s), crc, &mut buf)?;
        }
        if let Some(hs) = &self.tail.hard_state {
            crc = encode(&Record::HardState(hs.clone()), crc, &mut buf)?;
        }
        if self.room_left(buf.len()).is_some() {
            return Err(Error::simulated_enospc(&self.dir.join(name.file_name())));
        }
        let seg = SegmentFile::create(&self.opts.disk, &self.dir, name, &buf)?;
        self.written += buf.len() as u64;
        info!(self.logger, "cut new wal segment";
            "file" => seg.path.display(), "first_index" => name.first_index);
        self.segments.push((name, seg.path.clone()));
        self.seg = seg;
        self.crc = crc;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;
    use tempfile::TempDir;

    fn logger() -> Logger {
        Logger::root(slog::Discard, o!())
    }

    /// Records every log line's level, message and keys.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<LogLine>>>);

    type LogLine = (slog::Level, String, Vec<String>);

    impl slog::Drain for Capture {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, r: &slog::Record, kv: &slog::OwnedKVList) -> Result<(), slog::Never> {
            struct Keys(Vec<String>);
            impl slog::Serializer for Keys {
                fn emit_arguments(
                    &mut self,
                    key: slog::Key,
                    _: &std::fmt::Arguments,
                ) -> slog::Result {
                    self.0.push(key.to_string());
                    Ok(())
                }
            }
            let mut keys = Keys(Vec::new());
            let _ = slog::KV::serialize(&r.kv(), r, &mut keys);
            let _ = slog::KV::serialize(kv, r, &mut keys);
            let line = (r.level(), r.msg().to_string(), keys.0);
            self.0.lock().unwrap().push(line);
            Ok(())
        }
    }

    impl Capture {
        fn logger(&self) -> Logger {
            Logger::root(self.clone(), o!())
        }

        fn has(&self, level: slog::Level, msg: &str, keys: &[&str]) -> bool {
            let lines = self.0.lock().unwrap();
            lines.iter().any(|(l, m, k)| {
                *l == level && m == msg && keys.iter().all(|key| k.iter().any(|x| x == key))
            })
        }
    }

    fn ents(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes
            .map(|index| Entry {
                index,
                term,
                // Not UTF-8, and varied, so a mix-up shows.
                data: vec![0xff, 0xfe, index as u8, term as u8].into(),
                ..Default::default()
            })
            .collect()
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 1,
            commit,
            ..Default::default()
        }
    }

    fn open(dir: &Path) -> Result<(Wal, Recovered), Error> {
        Wal::open(dir, WalOptions::default(), &logger())
    }

    fn small(segment_size: u64) -> WalOptions {
        WalOptions {
            segment_size,
            ..Default::default()
        }
    }

    fn wal_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        v.sort();
        v
    }

    fn last_record(dir: &Path) -> DirRecord {
        read_dir_records(&Disk::default(), dir)
            .unwrap()
            .records
            .pop()
            .unwrap()
    }

    /// Writes a fixed history: entries, hard states, two markers, an overwrite.
    fn write_history(w: &mut Wal) {
        for i in 0..20 {
            let lo = i * 5 + 1;
            w.save(&ents(lo..=lo + 4, 1), Some(&hs(1, lo + 4)), i % 2 == 0)
                .unwrap();
            if i == 7 {
                w.save_snapshot(&WalSnapshot { index: 30, term: 1 })
                    .unwrap();
            }
            if i == 14 {
                w.save_snapshot(&WalSnapshot { index: 60, term: 1 })
                    .unwrap();
            }
        }
        w.save(&ents(96..=97, 2), Some(&hs(2, 96)), true).unwrap();
    }

    fn expected_history() -> Recovered {
        let mut entries = ents(1..=95, 1);
        entries.extend(ents(96..=97, 2));
        Recovered {
            hard_state: hs(2, 96),
            entries,
            snapshots: vec![
                WalSnapshot { index: 30, term: 1 },
                WalSnapshot { index: 60, term: 1 },
            ],
        }
    }

    #[test]
    fn new_dir_gets_first_segment() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("a/wal");
        assert!(!Wal::exists(&Disk::default(), &dir));
        let (_w, rec) = open(&dir).unwrap();
        assert_eq!(rec, Recovered::default());
        assert!(Wal::exists(&Disk::default(), &dir));
        assert_eq!(
            wal_files(&dir),
            [dir.join("0000000000000000-0000000000000000.wal")]
        );
    }

    #[test]
    fn save_and_reopen_round_trip() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        write_history(&mut w);
        drop(w);
        let (mut w, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec, expected_history());

        // Appending after a reopen continues the CRC chain.
        w.save(&ents(98..=98, 2), None, true).unwrap();
        drop(w);
        let (_, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec.entries.last().unwrap().index, 98);
        assert_eq!(rec.hard_state, hs(2, 96));
    }

    #[test]
    fn later_entries_overwrite_the_tail() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        w.save(&ents(1..=5, 1), Some(&hs(1, 2)), true).unwrap();
        w.save(&ents(3..=4, 2), Some(&hs(2, 2)), true).unwrap();
        drop(w);
        let (_, rec) = open(tmp.path()).unwrap();
        let mut want = ents(1..=2, 1);
        want.extend(ents(3..=4, 2));
        assert_eq!(rec.entries, want);
        assert_eq!(rec.hard_state, hs(2, 2));
    }

    #[test]
    fn snapshot_marker_bridges_an_index_gap() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        w.save(&ents(1..=3, 1), None, true).unwrap();
        w.save_snapshot(&WalSnapshot { index: 10, term: 2 })
            .unwrap();
        w.save(&ents(11..=12, 2), None, true).unwrap();
        drop(w);
        assert_eq!(open(tmp.path()).unwrap().1.entries, ents(11..=12, 2));
    }

    #[test]
    fn index_gap_without_marker_is_corrupt() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        w.save(&ents(1..=3, 1), None, true).unwrap();
        w.save(&ents(5..=5, 1), None, true).unwrap();
        drop(w);
        let want_off = last_record(tmp.path()).offset;
        match open(tmp.path()) {
            Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, want_off),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn roll_over_splits_segments_and_recovers_the_same() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = Wal::open(tmp.path(), small(300), &logger()).unwrap();
        write_history(&mut w);
        drop(w);
        let files = wal_files(tmp.path());
        assert!(files.len() > 5, "{files:?}");
        let (_, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec, expected_history());

        // Names: contiguous sequence; first index is the next expected entry.
        let dump = read_dir_records(&Disk::default(), tmp.path()).unwrap();
        let mut max_seen = 0;
        for r in &dump.records {
            match &r.record {
                Record::Header(h) => {
                    let name =
                        SegmentName::parse(r.path.file_name().unwrap().to_str().unwrap()).unwrap();
                    assert_eq!((h.seq, h.first_index), (name.seq, name.first_index));
                    if h.seq > 0 {
                        assert_eq!(h.first_index, max_seen + 1);
                    }
                }
                Record::Entry(e) => max_seen = e.index,
                _ => {}
            }
        }
    }

    #[test]
    fn release_to_deletes_files_and_keeps_what_recovery_needs() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = Wal::open(tmp.path(), small(300), &logger()).unwrap();
        write_history(&mut w);
        let before = wal_files(tmp.path()).len();
        let removed = w.release_to(60).unwrap();
        assert!(removed > 0);
        assert_eq!(wal_files(tmp.path()).len(), before - removed);
        // Idempotent, and never removes the current segment.
        assert_eq!(w.release_to(60).unwrap(), 0);
        let all = w.release_to(u64::MAX).unwrap();
        assert_eq!(wal_files(tmp.path()).len(), before - removed - all);
        assert!(!wal_files(tmp.path()).is_empty());

        w.save(&ents(98..=98, 2), Some(&hs(2, 98)), true).unwrap();
        drop(w);
        let (_, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec.hard_state, hs(2, 98));
        assert_eq!(
            rec.snapshots.last(),
            Some(&WalSnapshot { index: 60, term: 1 })
        );
        assert_eq!(rec.entries.last().unwrap().index, 98);
    }

    #[test]
    fn release_to_keeps_entries_above_the_index_and_newer_markers() {
        let want = expected_history();
        for index in [0, 1, 29, 30, 31, 59, 60, 61, 90, 97] {
            let tmp = TempDir::new().unwrap();
            let (mut w, _) = Wal::open(tmp.path(), small(300), &logger()).unwrap();
            write_history(&mut w);
            w.release_to(index).unwrap();
            drop(w);
            let (_, rec) = open(tmp.path()).unwrap();
            assert_eq!(rec.hard_state, want.hard_state, "index {index}");
            let above: Vec<_> = rec.entries.iter().filter(|e| e.index > index).collect();
            let want_above: Vec<_> = want.entries.iter().filter(|e| e.index > index).collect();
            assert_eq!(above, want_above, "index {index}");
            for s in want.snapshots.iter().filter(|s| s.index >= index) {
                assert!(rec.snapshots.contains(s), "index {index}: {s:?}");
            }
            assert_eq!(rec.snapshots.last(), want.snapshots.last());
        }
    }

    /// Copies the single-segment WAL in `src` to a new dir with the last
    /// file cut to `len` bytes (or extended with `extra`).
    fn damaged_copy(src: &Path, len: usize, extra: &[u8]) -> (TempDir, PathBuf) {
        let tmp = TempDir::new().unwrap();
        let file = wal_files(src).pop().unwrap();
        let dst = tmp.path().join(file.file_name().unwrap());
        let mut bytes = fs::read(&file).unwrap();
        bytes.truncate(len);
        bytes.extend_from_slice(extra);
        fs::write(&dst, bytes).unwrap();
        (tmp, dst)
    }

    #[test]
    fn torn_last_record_is_truncated_at_every_offset() {
        let src = TempDir::new().unwrap();
        let (mut w, _) = open(src.path()).unwrap();
        w.save(&ents(1..=3, 1), Some(&hs(1, 3)), true).unwrap();
        let boundary = w.seg.size as usize;
        let mut big = ents(4..=4, 1);
        big[0].data = vec![0xab; 100].into();
        w.save(&big, None, true).unwrap();
        let end = w.seg.size as usize;
        drop(w);

        for cut in boundary..end {
            let (tmp, file) = damaged_copy(src.path(), cut, &[]);
            let (mut w, rec) = open(tmp.path()).unwrap();
            assert_eq!(rec.entries, ents(1..=3, 1), "cut at {cut}");
            assert_eq!(rec.hard_state, hs(1, 3));
            assert_eq!(fs::metadata(&file).unwrap().len(), boundary as u64);
            // The repaired WAL accepts writes and replays them.
            w.save(&ents(4..=4, 2), None, true).unwrap();
            drop(w);
            assert_eq!(open(tmp.path()).unwrap().1.entries.len(), 4);
        }
    }

    #[test]
    fn zero_filled_tail_is_truncated() {
        let src = TempDir::new().unwrap();
        let (mut w, _) = open(src.path()).unwrap();
        w.save(&ents(1..=3, 1), Some(&hs(1, 3)), true).unwrap();
        let end = w.seg.size as usize;
        drop(w);
        let (tmp, file) = damaged_copy(src.path(), end, &[0; 4096]);
        let log = Capture::default();
        let (_, rec) = Wal::open(tmp.path(), WalOptions::default(), &log.logger()).unwrap();
        // Zeros after the last record are the space the writer fills ahead: no warning.
        assert!(log.has(
            slog::Level::Info,
            "trimming unused zeros after the last wal record",
            &["file", "offset"]
        ));
        assert!(!log.has(slog::Level::Warning, "truncating torn wal tail", &[]));
        assert!(log.has(
            slog::Level::Info,
            "replayed wal segment",
            &["file", "records"]
        ));
        assert_eq!(rec.entries, ents(1..=3, 1));
        assert_eq!(fs::metadata(&file).unwrap().len(), end as u64);
    }

    /// Records land on zeros written ahead (a quarter of the bytes in use); replay stops at
    /// the first zero length and trims the rest; a cut segment and a clean close end at the
    /// last record.
    #[test]
    fn records_are_written_over_zeros_written_ahead() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = Wal::open(tmp.path(), small(4096), &logger()).unwrap();
        let mut big = ents(1..=1, 1);
        big[0].data = vec![0xab; 1000].into();
        w.save(&big, Some(&hs(1, 1)), true).unwrap();
        let file = w.seg.path.clone();
        let len = fs::metadata(&file).unwrap().len();
        assert_eq!(len, w.seg.size + w.seg.size / 4);
        // Appends within the zeros leave the length alone.
        w.save(&ents(2..=2, 1), None, true).unwrap();
        assert!(w.seg.size < len);
        assert_eq!(fs::metadata(&file).unwrap().len(), len);
        let in_use = w.seg.size;
        drop(w);

        let (mut w, rec) = Wal::open(tmp.path(), small(4096), &logger()).unwrap();
        assert_eq!(rec.entries.len(), 2);
        assert_eq!(rec.hard_state, hs(1, 1));
        assert_eq!(fs::metadata(&file).unwrap().len(), in_use);
        // Past the segment size: the next segment is cut and this one trimmed.
        for i in 3..=6 {
            let mut e = ents(i..=i, 1);
            e[0].data = vec![0xcd; 1000].into();
            w.save(&e, None, true).unwrap();
        }
        let files = wal_files(tmp.path());
        assert_eq!(files.len(), 2, "{files:?}");
        let full = read_dir_records(&Disk::default(), tmp.path()).unwrap();
        let first_end = full.records.iter().rfind(|r| r.path == files[0]).unwrap();
        let first_len = fs::metadata(&files[0]).unwrap().len();
        assert!(first_end.offset < first_len);
        assert_eq!(
            segment::scan(&fs::read(&files[0]).unwrap(), None, false)
                .unwrap()
                .valid_len,
            first_len
        );
        w.save(&ents(7..=7, 1), None, true).unwrap();
        assert!(fs::metadata(&files[1]).unwrap().len() > w.seg.size);
        w.close().unwrap();
        assert_eq!(fs::metadata(&files[1]).unwrap().len(), w.seg.size);
        drop(w);
        assert_eq!(open(tmp.path()).unwrap().1.entries.len(), 7);
    }

    /// Bytes after zeros that follow the last record were never acknowledged (a write torn
    /// into the space written ahead): the newest segment is cut at the zeros, with a warning.
    /// In an older segment the same bytes are corruption.
    #[test]
    fn data_after_unused_zeros_is_a_torn_tail() {
        let src = TempDir::new().unwrap();
        let (mut w, _) = open(src.path()).unwrap();
        w.save(&ents(1..=3, 1), Some(&hs(1, 3)), true).unwrap();
        let end = w.seg.size as usize;
        drop(w);
        let mut extra = vec![0; 100];
        extra.extend_from_slice(b"garbage");
        let (tmp, file) = damaged_copy(src.path(), end, &extra);
        let log = Capture::default();
        let (_, rec) = Wal::open(tmp.path(), WalOptions::default(), &log.logger()).unwrap();
        assert!(log.has(
            slog::Level::Warning,
            "truncating torn wal tail",
            &["file", "offset"]
        ));
        assert_eq!(rec.entries, ents(1..=3, 1));
        assert_eq!(fs::metadata(&file).unwrap().len(), end as u64);

        let buf = fs::read(src.path().join(file.file_name().unwrap())).unwrap();
        let mut damaged = buf[..end].to_vec();
        damaged.extend_from_slice(&extra);
        assert_eq!(
            segment::scan(&damaged, None, false).unwrap_err().0,
            end as u64
        );
    }

    /// A last record whose write stopped partway (its end still the zeros written ahead) is
    /// a torn write: truncated.
    #[test]
    fn last_record_cut_short_is_torn() {
        let src = TempDir::new().unwrap();
        let (mut w, _) = open(src.path()).unwrap();
        w.save(&ents(1..=3, 1), None, true).unwrap();
        let end = w.seg.size as usize;
        drop(w);
        let (tmp, file) = damaged_copy(src.path(), end - 3, &[0, 0, 0, 0]);
        let (_, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec.entries, ents(1..=2, 1));
        assert!(fs::metadata(&file).unwrap().len() < end as u64);
    }

    /// A last record that was written whole but fails its CRC was damaged after the write
    /// (it may have been synced and acknowledged): refused, not truncated, even with only
    /// zeros after it. The simulator found this (seed 450 of `tests/simulation.rs`): the
    /// truncation dropped a synced entry and the replicas diverged.
    #[test]
    fn damaged_last_record_followed_by_zeros_is_refused() {
        let src = TempDir::new().unwrap();
        let (mut w, _) = open(src.path()).unwrap();
        w.save(&ents(1..=3, 1), None, true).unwrap();
        let end = w.seg.size as usize;
        drop(w);
        let (tmp, _) = damaged_copy(src.path(), end - 1, &[0x55, 0, 0, 0]);
        let err = open(tmp.path()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn flipped_byte_in_a_middle_record_is_corrupt() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        w.save(&ents(1..=5, 1), Some(&hs(1, 5)), true).unwrap();
        drop(w);
        let dump = read_dir_records(&Disk::default(), tmp.path()).unwrap();
        let victim = &dump.records[3]; // entry 3
        let mut bytes = fs::read(&victim.path).unwrap();
        bytes[victim.offset as usize + 12] ^= 0x40;
        fs::write(&victim.path, &bytes).unwrap();

        let err = open(tmp.path()).unwrap_err();
        match &err {
            Error::Corrupt { path, offset, .. } => {
                assert_eq!((path, *offset), (&victim.path, victim.offset));
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&victim.path.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("at offset {}: crc mismatch", victim.offset)),
            "{msg}"
        );
        // Nothing was "repaired".
        assert_eq!(fs::read(&victim.path).unwrap(), bytes);
    }

    #[test]
    fn torn_tail_in_an_older_segment_is_corrupt() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = Wal::open(tmp.path(), small(40), &logger()).unwrap();
        for i in 1..=4 {
            w.save(&ents(i..=i, 1), None, true).unwrap();
        }
        drop(w);
        let first = &wal_files(tmp.path())[0];
        let len = fs::metadata(first).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(first)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(matches!(open(tmp.path()), Err(Error::Corrupt { path, .. }) if &path == first));
    }

    #[test]
    fn missing_middle_segment_is_corrupt() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = Wal::open(tmp.path(), small(40), &logger()).unwrap();
        for i in 1..=4 {
            w.save(&ents(i..=i, 1), None, true).unwrap();
        }
        drop(w);
        let files = wal_files(tmp.path());
        assert!(files.len() >= 3, "{files:?}");
        fs::remove_file(&files[1]).unwrap();
        let err = open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
    }

    #[test]
    fn fail_write_after_fails_save_and_reopen_repairs() {
        let tmp = TempDir::new().unwrap();
        let opts = WalOptions {
            fail_write_after: Some(200),
            ..Default::default()
        };
        let (mut w, _) = Wal::open(tmp.path(), opts, &logger()).unwrap();
        w.save(&ents(1..=2, 1), Some(&hs(1, 2)), true).unwrap();
        let mut saved = 2;
        let err = loop {
            match w.save(&ents(saved + 1..=saved + 1, 1), None, true) {
                Ok(()) => saved += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(matches!(w.save(&[], None, true), Err(Error::Poisoned)));
        drop(w);
        let (_, rec) = open(tmp.path()).unwrap();
        assert_eq!(rec.entries, ents(1..=saved, 1));
    }

    #[test]
    fn read_dir_records_lists_everything_read_only() {
        let tmp = TempDir::new().unwrap();
        let (mut w, _) = open(tmp.path()).unwrap();
        w.save(&ents(1..=2, 1), Some(&hs(1, 2)), true).unwrap();
        let end = w.seg.size;
        drop(w);
        let file = wal_files(tmp.path()).pop().unwrap();
        let mut bytes = fs::read(&file).unwrap();
        bytes.extend_from_slice(&[1, 0, 0]);
        fs::write(&file, &bytes).unwrap();

        let dump = read_dir_records(&Disk::default(), tmp.path()).unwrap();
        let kinds: Vec<_> = dump
            .records
            .iter()
            .map(|r| match r.record {
                Record::Header(_) => 'H',
                Record::Entry(_) => 'E',
                Record::HardState(_) => 'S',
                Record::Snapshot(_) => 'M',
            })
            .collect();
        assert_eq!(kinds, ['H', 'E', 'E', 'S']);
        assert_eq!(dump.torn_tail, Some((file.clone(), end)));
        assert_eq!(fs::read(&file).unwrap(), bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the segment holds, open returns Ok or Err, never panics.
        #[test]
        fn open_never_panics_on_arbitrary_segment(
            valid_header: bool,
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let tmp = TempDir::new().unwrap();
            let mut bytes = Vec::new();
            if valid_header {
                let h = SegmentHeader { seq: 0, first_index: 0, prev_crc: 0 };
                encode(&Record::Header(h), 0, &mut bytes).unwrap();
            }
            bytes.extend_from_slice(&tail);
            let name = SegmentName { seq: 0, first_index: 0 };
            fs::write(tmp.path().join(name.file_name()), &bytes).unwrap();
            let _ = open(tmp.path());
        }
    }
}
