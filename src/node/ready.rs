//! One Ready round and what follows from it: a leader's snapshot installed, committed entries
//! applied (membership changes included), a local snapshot triggered and, once written,
//! turned into a compaction, a WAL marker and a purge.

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::*;

use super::membership::Applied;
use super::snapshot::{decode_data, entry_writes, SnapshotDone, SnapshotTask};
use super::Node;
use crate::channels::{Apply, Exit};
use crate::error::{Error, Result};
use crate::wal::writer::Job;

impl Node {
    /// One Ready round, in raft-rs 0.7's order, with persistence handed to the WAL writer
    /// (`advance_append_async`): the node goes on stepping messages and taking proposals while
    /// the disk works, and many Readies share one fsync.
    pub(super) fn on_ready(&mut self) -> Result<()> {
        let mut rd = self.raft.ready();

        // 1. A leader may send before it persists (Raft thesis 10.2.1): its own disk write then
        // runs in parallel with the followers'.
        self.send(rd.take_messages());

        // 2. Snapshot from the leader: its .snap file, then its WAL record (see `Job::Snapshot`
        // for why in that order), queued before this Ready's entries and HardState.
        let has_snapshot = !rd.snapshot().is_empty();
        if has_snapshot {
            let snap = rd.snapshot().clone();
            self.out.jobs.push(Job::Snapshot(snap.clone()));
            self.install_snapshot(snap)?;
        }

        // 3. Entries committed earlier and already persisted.
        self.apply_committed(rd.take_committed_entries());

        // 4. Entries, then HardState, to the WAL; raft reads them from storage meanwhile but
        // counts them (and sends the messages that promise them: votes, append responses) only
        // once the writer reports them durable.
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        let store = self.raft.mut_store();
        store.append(&entries)?;
        if let Some(hs) = &hs {
            store.set_hard_state(hs.clone());
        }
        let nothing_to_persist = entries.is_empty() && hs.is_none() && !has_snapshot;
        let messages = self.send_unpromising(rd.take_persisted_messages(), nothing_to_persist);
        let number = rd.number();
        let to_writer = !nothing_to_persist || !messages.is_empty();
        if to_writer {
            self.persist.submitted = number;
            self.out.jobs.push(Job::Append {
                number,
                entries,
                hs,
                sync: rd.must_sync(),
                messages,
            });
        }
        if has_snapshot {
            // Behind the Append just queued: its HardState's commit is what makes the leader's
            // snapshot one recovery would use (see `Job::Purge`).
            self.purge();
            // raft may not count a snapshot as applied before it is persisted (it panics), so
            // after one, applying is reported only once the writer has caught up with this
            // Ready.
            let meta = rd.snapshot().get_metadata();
            self.persist.snapshot_persisting = Some((number, meta.term, meta.index));
        }

        // 5. Read indexes answered by the leader.
        let answers = self.reads.resolve(rd.take_read_states(), &self.raft.raft);
        self.send(answers);

        self.raft.advance_append_async(rd);
        if !to_writer && self.persist.persisted == self.persist.submitted {
            // Nothing of this Ready to persist and nothing before it pending: it is durable
            // now. (With writes pending, the next one the writer reports covers it.)
            self.raft.on_persist_ready(number);
        }
        if self.persist.snapshot_persisting.is_none() {
            self.raft.advance_apply();
        }
        self.maybe_trigger_snapshot()
    }

    /// Sends at once the persisted messages that promise nothing about this node's log or
    /// vote, and returns the rest, which wait for the writer. A follower's ReadIndex request
    /// never does; a heartbeat response does not either, but it carries the Ready's term, so
    /// it goes first only from a Ready with nothing to persist. This keeps a ReadIndex round
    /// (request to the leader, heartbeats out, responses back) off the WAL writer thread: a
    /// follower's reads would otherwise pay two thread hand-offs per round.
    fn send_unpromising(
        &mut self,
        messages: Vec<Message>,
        nothing_to_persist: bool,
    ) -> Vec<Message> {
        let (now, later): (Vec<_>, Vec<_>) = messages.into_iter().partition(|m| {
            m.get_msg_type() == MessageType::MsgReadIndex
                || (nothing_to_persist && m.get_msg_type() == MessageType::MsgHeartbeatResponse)
        });
        self.send(now);
        later
    }

    /// Installs a snapshot received from the leader: raft storage, membership, then the map
    /// (the nil-on-commitC of raftexample).
    pub(super) fn install_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        let snap_bytes = snap.data.len() as u64;
        let data = decode_data(&snap.data).map_err(|e| {
            Error::Recovery(format!(
                "snapshot at index {index} from the leader does not decode: {e}"
            ))
        })?;
        let path = self.snapshotter.path(snap.get_metadata().term, index);
        self.raft.mut_store().apply_snapshot(snap)?;
        // The WAL writer is saving it to `path`; kept in memory, a large snapshot would double
        // a joining node's footprint. Until the file is there, raft is told to ask again.
        self.raft.mut_store().release_snapshot_data(path);
        let changes = self
            .membership
            .restore(data.members, data.removed, data.kept);
        self.out.peers.extend(changes);
        slog::info!(self.logger, "installing snapshot from leader"; "index" => index,
            "bytes" => data.kv.len());
        self.out.applies.push(Apply::Snapshot {
            index,
            term,
            data: data.kv,
        });
        self.applied = index;
        self.policy.reset(index, snap_bytes);
        Ok(())
    }

    /// The leader's snapshot `(term, index)` is durable: the map may now read its pairs from
    /// the file rather than hold the copy received (for a joining member, most of its memory
    /// until its own next snapshot). A file that cannot be mapped or read back leaves the copy.
    pub(super) fn adopt_snapshot_file(&mut self, term: u64, index: u64) {
        let mapped = self
            .snapshotter
            .map_saved(term, index)
            .and_then(|(data, pages)| {
                let kv = decode_data(&data).map_err(|reason| crate::snap::Error::Corrupt {
                    path: self.snapshotter.path(term, index),
                    reason,
                })?;
                Ok((kv.kv, pages))
            });
        match mapped {
            Ok((data, pages)) => self
                .out
                .applies
                .push(Apply::SnapshotFile { index, data, pages }),
            Err(e) => {
                slog::warn!(self.logger, "installed snapshot stays in memory"; "index" => index, "error" => %e)
            }
        }
    }

    pub(super) fn apply_committed(&mut self, entries: Vec<Entry>) {
        if !entries.last().is_some_and(|e| e.index > self.applied) {
            return;
        }
        let mut data: Vec<Bytes> = Vec::new();
        // What is really applied: the batch's last index, unless our own removal stops it.
        let (mut upto, mut upto_term) = (self.applied, 0);
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            (upto, upto_term) = (e.index, e.term);
            self.policy.count(&e);
            match e.get_entry_type() {
                // An empty entry is a new leader's no-op.
                EntryType::EntryNormal if !e.data.is_empty() => data.push(e.data),
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => self.apply_conf_change(e.index, &e.data),
                EntryType::EntryConfChangeV2 => {
                    slog::error!(self.logger, "ConfChangeV2 is never proposed here; skipped";
                        "index" => e.index)
                }
            }
            if self.exit.is_some() {
                // Our own removal: entries after it are no business of this node.
                break;
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.out.applies.push(Apply::Entries {
            index: upto,
            term: upto_term,
            data,
            applied: tx,
        });
        self.last_apply_done = Some(rx);
        self.applied = upto;
    }

    fn apply_conf_change(&mut self, index: u64, data: &[u8]) {
        let cc = match ConfChange::parse_from_bytes(data) {
            Ok(cc) => cc,
            Err(err) => {
                slog::error!(self.logger, "undecodable conf change skipped"; "index" => index,
                    "error" => %err);
                return;
            }
        };
        let applied = self
            .membership
            .apply(&mut self.raft, cc, &mut self.out.peers, &self.logger);
        if applied == Some(Applied::RemovedSelf) {
            self.exit = Some(Exit::Removed);
        }
    }

    /// raftexample's `maybeTriggerSnapshot`: every `snapshot_count` applied entries (for a
    /// large map, see [`super::snapshot::Policy::due`]), ask the shell to capture the map once
    /// it has caught up and stream it into a `.snap` file off the raft loop;
    /// [`Self::snapshot_written`] then compacts the log.
    fn maybe_trigger_snapshot(&mut self) -> Result<()> {
        if !self.policy.due() {
            return Ok(());
        }
        self.policy.log_bytes = 0;
        self.policy.writes = 0;
        let index = self.applied;
        let term = raft::Storage::term(self.raft.store(), index)?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(self.raft.store().conf_state().clone());
        self.out.snapshot = Some(SnapshotTask {
            meta,
            members: self.membership.members.clone(),
            removed: self.membership.removed_ids(),
            kept: self.membership.learners.kept.clone(),
            wait: self.last_apply_done.take(),
        });
        self.policy.in_flight = true;
        Ok(())
    }

    /// A `.snap` is durable: serve it to slow followers, compact the log, record its WAL
    /// marker (only now: a marker must never name a missing file) and purge what it makes
    /// obsolete. Or it failed: logged, and the log stays uncompacted.
    pub fn snapshot_written(&mut self, done: SnapshotDone) -> Result<()> {
        self.policy.in_flight = false;
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // Not fatal: the WAL holds everything it would have, and a later one replaces it.
                slog::error!(self.logger, "cannot write a snapshot; trying again at the next \
                    trigger"; "error" => %e);
                return Ok(());
            }
        };
        let (index, term) = (done.meta.index, done.meta.term);
        if index <= self.policy.index {
            // A newer snapshot came from the leader meanwhile.
            return Ok(());
        }
        self.policy.bytes = done.data_len;
        self.policy.index = index;
        // Raft reads the data back from the file if a follower needs it; keeping it in memory
        // would double the peak footprint of a large map.
        let store = self.raft.mut_store();
        store.set_snapshot_on_disk(done.meta, done.path);
        // Keeps the entries holding the last `catchup_entries` writes for followers slightly
        // behind (raftexample's snapshotCatchUpEntriesN, which counts entries of one write).
        let compact = store.catchup_start(index, self.policy.catchup_entries, entry_writes);
        if compact > 0 {
            store.compact(compact)?;
        }
        self.out
            .jobs
            .push(Job::Marker(crate::wal::WalSnapshot { index, term }));
        self.purge();
        crate::metrics::snapshot();
        slog::info!(self.logger, "snapshot taken"; "index" => index, "compacted_to" => compact);
        Ok(())
    }

    /// Deletes old snapshot files and WAL segments once the new marker is durable; see
    /// [`Job::Purge`]. Keeping WAL back to the oldest snapshot kept means a corrupt newest
    /// `.snap` still leaves an older one plus the WAL after it to recover from.
    fn purge(&mut self) {
        self.out.jobs.push(Job::Purge {
            keep: self.policy.max_snapshots,
        });
    }
}
