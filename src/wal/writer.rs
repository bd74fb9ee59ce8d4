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
    /// Delete snapshot files beyond the newest `keep`, then WAL segments wholly before the
    /// oldest snapshot kept. Runs after every earlier marker is durable, so the files removed
    /// are never the ones recovery would reach for.
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
        let mut sync = false;
        let mut number = None;
        let mut messages = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(job) = next {
            taken += 1;
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
                    if sync {
                        wal.sync()?;
                        sync = false;
                    }
                    let snaps = snapshotter.purge(keep)?;
                    let wals = match snapshotter.oldest_index()? {
                        Some(oldest) => wal.release_to(oldest)?,
                        None => 0,
                    };
                    if snaps + wals > 0 {
                        slog::info!(logger, "purged old files"; "snap_files" => snaps, "wal_segments" => wals);
                    }
                }
            }
            // Bounded, so that a steady stream of jobs cannot postpone the fsync forever.
            next = if taken < MAX_GROUP {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if sync {
            let started = Instant::now();
            wal.sync()?;
            crate::metrics::wal_fsync(started.elapsed());
        }
        if let Some(number) = number {
            if done_tx.send(Ok(Persisted { number, messages })).is_err() {
                break;
            }
        }
    }
    wal.close()?;
    Ok(())
}
