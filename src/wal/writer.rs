//! The WAL writer thread: takes persistence jobs from the raft task in order, writes them, and
//! fsyncs once for everything it found queued (group commit), then reports the highest Ready
//! number made durable together with the messages that were waiting for it.
//!
//! Reads a std `mpsc` of [`Job`]s; writes [`Persisted`] (or the first error, after which it
//! stops) on a tokio unbounded channel the raft task selects on. The raft loop therefore never
//! blocks on the disk, and the leader's fsync overlaps the followers' and the next batch.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use raft::prelude::{Entry, HardState, Message, Snapshot};
use tokio::sync::mpsc;

use super::{Error, Wal, WalSnapshot};
use crate::snap::Snapshotter;

/// Jobs written before one fsync at most.
const MAX_GROUP: usize = 1024;

/// One unit of work, executed in submission order.
pub enum Job {
    /// A Ready's entries and HardState; `messages` may be sent once they are durable.
    Append {
        number: u64,
        entries: Vec<Entry>,
        hs: Option<HardState>,
        sync: bool,
        messages: Vec<Message>,
    },
    /// A snapshot: its `.snap` file, then its WAL marker. The file goes first: a .snap with
    /// no WAL record is simply ignored at restart, but a WAL record whose .snap is missing
    /// could not be recovered. Written here so that the raft loop never waits for it.
    Snapshot(Snapshot),
    /// The WAL marker of a snapshot whose `.snap` file is already durable.
    Marker(WalSnapshot),
    /// Delete snapshot files beyond the newest `keep` that recovery would use, then WAL
    /// segments wholly before the oldest of those kept (see [`crate::snap::Snapshotter::purge`]
    /// for what else stays). Syncs first and counts only the markers written before it at or
    /// below the commit of the last HardState written before it: a snapshot counts only once a
    /// crash could no longer make recovery ignore it.
    Purge { keep: usize },
}

/// Ready `number` and everything before it are durable.
pub struct Persisted {
    pub number: u64,
    pub messages: Vec<Message>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Wal(#[from] Error),
    #[error(transparent)]
    Snap(#[from] crate::snap::Error),
}

pub struct Writer {
    tx: Option<std_mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(
        wal: Wal,
        snapshotter: Snapshotter,
        done_tx: mpsc::UnboundedSender<Result<Persisted, WriterError>>,
        logger: &slog::Logger,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = std_mpsc::channel();
        let logger = logger.new(slog::o!("component" => "wal-writer"));
        let thread = std::thread::Builder::new()
            .name("wal".into())
            .spawn(move || {
                if let Err(e) = run(wal, &snapshotter, &rx, &done_tx, &logger) {
                    slog::crit!(logger, "WAL writer stopped"; "error" => %e);
                    let _ = done_tx.send(Err(e));
                }
                // Only now may `submit` fail: the error is already on the done channel.
                drop(rx);
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a job; false if the writer already stopped (its error is on the done channel).
    pub fn submit(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Finishes every queued job, syncs and closes the WAL.
    pub fn close(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.close();
    }
}

fn run(
    mut wal: Wal,
    snapshotter: &Snapshotter,
    rx: &std_mpsc::Receiver<Job>,
    done_tx: &mpsc::UnboundedSender<Result<Persisted, WriterError>>,
    logger: &slog::Logger,
) -> Result<(), WriterError> {
    while let Ok(first) = rx.recv() {
        // Jobs queued while the group is written join it; bounded, so that a steady stream of
        // jobs cannot postpone the fsync forever.
        let more = std::iter::from_fn(|| rx.try_recv().ok()).take(MAX_GROUP - 1);
        let group = std::iter::once(first).chain(more);
        if let Some(p) = run_group(&mut wal, snapshotter, group, logger)? {
            if done_tx.send(Ok(p)).is_err() {
                break;
            }
        }
    }
    wal.close()?;
    Ok(())
}

/// Executes `jobs` in order and then fsyncs once if any of them asked for it (group commit);
/// returns what became durable, if the group held a Ready. The writer thread's body, and what
/// the simulator runs in its place.
pub fn run_group(
    wal: &mut Wal,
    snapshotter: &Snapshotter,
    jobs: impl Iterator<Item = Job>,
    logger: &slog::Logger,
) -> Result<Option<Persisted>, WriterError> {
    let mut sync = false;
    let mut number = None;
    let mut messages = Vec::new();
    for job in jobs {
        match job {
            Job::Append {
                number: n,
                entries,
                hs,
                sync: s,
                messages: m,
            } => {
                if !entries.is_empty() || hs.is_some() {
                    wal.save(&entries, hs.as_ref(), false)?;
                }
                sync |= s;
                number = Some(n);
                messages.extend(m);
            }
            Job::Snapshot(snap) => {
                let meta = snap.get_metadata();
                snapshotter.save(&snap)?;
                wal.save_snapshot(&WalSnapshot {
                    index: meta.index,
                    term: meta.term,
                })?;
            }
            Job::Marker(marker) => wal.save_snapshot(&marker)?,
            Job::Purge { keep } => {
                // Unconditionally: a commit-only HardState is written without a sync.
                wal.sync()?;
                sync = false;
                purge(wal, snapshotter, keep, logger)?;
            }
        }
    }
    if sync {
        let started = Instant::now();
        wal.sync()?;
        crate::metrics::wal_fsync(started.elapsed());
    }
    Ok(number.map(|number| Persisted { number, messages }))
}

/// [`Job::Purge`] once the WAL is synced. A snapshot file that cannot be deleted is only
/// disk space: logged, not fatal, and the WAL it may need is kept.
fn purge(
    wal: &mut Wal,
    snapshotter: &Snapshotter,
    keep: usize,
    logger: &slog::Logger,
) -> Result<(), WriterError> {
    let purged = match snapshotter.purge(keep, &wal.recoverable_snapshots()) {
        Ok(p) => p,
        Err(e) => {
            slog::error!(logger, "cannot purge old snapshot files; keeping the WAL too"; "error" => %e);
            return Ok(());
        }
    };
    let wals = match purged.oldest_kept {
        Some(oldest) => wal.release_to(oldest)?,
        None => 0,
    };
    if purged.removed + wals > 0 {
        slog::info!(logger, "purged old files"; "snap_files" => purged.removed, "wal_segments" => wals);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use raft::prelude::{ConfState, SnapshotMetadata};
    use tempfile::TempDir;

    use super::*;
    use crate::wal::WalOptions;

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    fn snap(term: u64, index: u64) -> Snapshot {
        let meta = SnapshotMetadata {
            term,
            index,
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        Snapshot {
            metadata: Some(meta).into(),
            data: vec![0xff, index as u8].into(),
            ..Default::default()
        }
    }

    fn snap_name(term: u64, index: u64) -> String {
        format!("{term:016x}-{index:016x}.snap")
    }

    /// A writer on `<dir>/wal` and `<dir>/snap`, with small segments so that releases show.
    struct Harness {
        writer: Writer,
        done: mpsc::UnboundedReceiver<Result<Persisted, WriterError>>,
        number: u64,
    }

    impl Harness {
        fn start(dir: &Path) -> Harness {
            let opts = WalOptions {
                segment_size: 300,
                ..Default::default()
            };
            let (wal, _) = Wal::open(&dir.join("wal"), opts, &logger()).unwrap();
            let (tx, done) = mpsc::unbounded_channel();
            let snapper =
                Snapshotter::new(&crate::vfs::Disk::default(), &dir.join("snap"), &logger())
                    .unwrap();
            let writer = Writer::start(wal, snapper, tx, &logger()).unwrap();
            Harness {
                writer,
                done,
                number: 0,
            }
        }

        /// Queues `job` and waits until the writer has run it (and everything before it).
        fn run(&mut self, job: Job) {
            assert!(self.writer.submit(job), "the writer stopped");
            self.number += 1;
            let barrier = Job::Append {
                number: self.number,
                entries: Vec::new(),
                hs: None,
                sync: false,
                messages: Vec::new(),
            };
            assert!(self.writer.submit(barrier), "the writer stopped");
            loop {
                let p = self.done.blocking_recv().expect("the writer reports");
                let p = p.unwrap_or_else(|e| panic!("the writer stopped: {e}"));
                if p.number == self.number {
                    return;
                }
            }
        }

        /// Entries `indexes` at term 1 and a HardState committing `commit`, synced.
        fn append(&mut self, indexes: std::ops::RangeInclusive<u64>, commit: u64) {
            let entries = indexes
                .map(|index| Entry {
                    index,
                    term: 1,
                    data: vec![0xab; 8].into(),
                    ..Default::default()
                })
                .collect();
            self.run(Job::Append {
                number: 0,
                entries,
                hs: Some(HardState {
                    term: 1,
                    vote: 1,
                    commit,
                    ..Default::default()
                }),
                sync: true,
                messages: Vec::new(),
            });
        }
    }

    /// What `RaftNode::recover` would start from: the WAL and the newest snapshot whose marker
    /// is at or below the durable commit.
    fn recover(dir: &Path) -> (super::super::Recovered, Option<Snapshot>) {
        let (_, rec) = Wal::open(&dir.join("wal"), WalOptions::default(), &logger()).unwrap();
        let valid = rec.valid_snapshots();
        let s =
            Snapshotter::new(&crate::vfs::Disk::default(), &dir.join("snap"), &logger()).unwrap();
        let snap = s.load_newest_available(&valid).unwrap();
        (rec, snap)
    }

    fn index(snap: &Option<Snapshot>) -> Option<u64> {
        snap.as_ref().map(|s| s.get_metadata().index)
    }

    fn snap_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join("snap"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// Issue 13 item 2: a purge (queued after the previous snapshot's marker) runs while the
    /// snapshot thread is writing the next `.snap.tmp`; the file must survive, the save succeed
    /// and the writer go on.
    #[test]
    fn purge_leaves_a_snapshot_being_written_alone() {
        let tmp = TempDir::new().unwrap();
        let mut h = Harness::start(tmp.path());
        h.append(1..=10, 10);
        h.run(Job::Snapshot(snap(1, 5)));
        // The snapshot thread's own Snapshotter, as in `maybe_trigger_snapshot`.
        let s = Snapshotter::new(
            &crate::vfs::Disk::default(),
            &tmp.path().join("snap"),
            &logger(),
        )
        .unwrap();
        let saved = s.save_with(snap(1, 10).get_metadata(), 8, |w| {
            w.write_all(&[1; 4])?;
            h.run(Job::Purge { keep: 1 });
            w.write_all(&[2; 4])
        });
        let path = saved.expect("the snapshot being written survives the purge");
        assert!(path.is_file());
        h.run(Job::Marker(WalSnapshot { index: 10, term: 1 }));
        h.run(Job::Purge { keep: 1 });
        assert_eq!(snap_files(tmp.path()), [snap_name(1, 10)]);
    }

    /// Issue 13 item 3: a follower installs the leader's snapshot at 20 and `install_snapshot`
    /// queues a purge before the Ready's HardState (commit 20) is written. A crash then must
    /// still leave the older valid snapshot for recovery; once the commit is durable, the next
    /// purge may drop it.
    #[test]
    fn purge_before_the_covering_hard_state_keeps_the_valid_snapshot() {
        let tmp = TempDir::new().unwrap();
        let mut h = Harness::start(tmp.path());
        h.append(1..=10, 10);
        h.run(Job::Snapshot(snap(1, 10)));
        h.run(Job::Snapshot(snap(1, 20)));
        h.run(Job::Purge { keep: 1 });
        drop(h);

        let (_, got) = recover(tmp.path());
        assert_eq!(index(&got), Some(10), "files: {:?}", snap_files(tmp.path()));

        let mut h = Harness::start(tmp.path());
        h.append(21..=21, 21);
        h.run(Job::Purge { keep: 1 });
        drop(h);
        assert_eq!(snap_files(tmp.path()), [snap_name(1, 20)]);
        let (rec, got) = recover(tmp.path());
        assert_eq!(index(&got), Some(20));
        assert_eq!(rec.entries.last().map(|e| e.index), Some(21));
    }

    /// `.snap` files recovery would not use (no marker, e.g. a local snapshot superseded by the
    /// leader's or whose marker a crash prevented) neither count towards `keep` nor set how far
    /// the WAL is released. A newer one stays (it may still get its marker), an older one goes.
    #[test]
    fn orphan_snapshots_never_push_out_the_only_valid_one() {
        let tmp = TempDir::new().unwrap();
        let mut h = Harness::start(tmp.path());
        // In small writes, so that several segments end below index 20.
        for first in (1..=40).step_by(4) {
            h.append(first..=first + 3, first + 3);
            if first + 3 == 20 {
                h.run(Job::Snapshot(snap(1, 20)));
            }
        }
        let s = Snapshotter::new(
            &crate::vfs::Disk::default(),
            &tmp.path().join("snap"),
            &logger(),
        )
        .unwrap();
        s.save(&snap(1, 15)).unwrap();
        s.save(&snap(1, 30)).unwrap();
        h.run(Job::Purge { keep: 1 });
        assert_eq!(snap_files(tmp.path()), [snap_name(1, 20), snap_name(1, 30)]);
        let wal_files = || {
            let mut v: Vec<String> = std::fs::read_dir(tmp.path().join("wal"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert!(
            !wal_files().contains(&"0000000000000000-0000000000000000.wal".to_string()),
            "segments before the valid snapshot were not released: {:?}",
            wal_files()
        );
        let (rec, got) = recover(tmp.path());
        assert_eq!(index(&got), Some(20));
        assert!(rec.entries.first().is_some_and(|e| e.index <= 21));
        assert_eq!(rec.entries.last().map(|e| e.index), Some(40));

        // Its marker makes the newer file valid: now it is the one kept.
        h.run(Job::Marker(WalSnapshot { index: 30, term: 1 }));
        h.run(Job::Purge { keep: 1 });
        drop(h);
        assert_eq!(snap_files(tmp.path()), [snap_name(1, 30)]);
        assert_eq!(index(&recover(tmp.path()).1), Some(30));
    }
}
