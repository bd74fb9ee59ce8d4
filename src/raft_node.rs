//! The raft task: the I/O shell around the deterministic [`crate::node::Node`].
//!
//! Reads `propose_rx` (PUTs), `conf_change_rx` (membership changes), `read_rx` (ReadIndex
//! requests), `raft_msg_rx` (messages from peers) and `report_rx` (send failures), plus a
//! 100 ms ticker; writes `commit_tx` ([`Apply`] batches for the kvstore). Each input is handed
//! to the node, and what the node asks for is carried out: messages to the transport, jobs to
//! the WAL writer thread, batches to the kvstore, snapshots to a snapshot thread. The task never
//! blocks on the disk. A fatal error (WAL I/O, a leader's snapshot that cannot be saved) ends
//! it; the caller sees it as the error channel's value. A local snapshot that cannot be written
//! is not one: the node logs it and takes one again at a later trigger.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::channels::{
    Apply, ConfChangeRequest, Exit, GetSnapshot, NodeStatus, Proposal, ReadError, ReadRequest,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::node::{self, Node, Output, PeerChange, SnapshotDone, SnapshotTask, DRAIN};
use crate::snap::Snapshotter;
use crate::transport::{Report, Transport};
use crate::wal::writer::{Persisted, Writer, WriterError};
use crate::wal::Wal;

const TICK: Duration = Duration::from_millis(100);
/// How long a stopping leader waits for its successor to take over.
const HANDOVER: Duration = Duration::from_secs(1);

/// The receiving halves the raft task reads.
pub struct Inputs {
    pub propose_rx: mpsc::Receiver<Proposal>,
    pub conf_change_rx: mpsc::Receiver<ConfChangeRequest>,
    pub read_rx: mpsc::Receiver<ReadRequest>,
    pub raft_msg_rx: mpsc::Receiver<Message>,
    pub report_rx: mpsc::UnboundedReceiver<Report>,
}

/// Everything shared between the raft task and the rest of the process.
pub struct Shared {
    pub commit_tx: mpsc::Sender<Apply>,
    pub removed: Arc<RwLock<HashSet<u64>>>,
    pub status: Arc<Mutex<NodeStatus>>,
    pub report_tx: mpsc::UnboundedSender<Report>,
    pub shutdown: CancellationToken,
    /// What the transport sends with: cluster token, peer TLS.
    pub peer_client: crate::peer_client::PeerClient,
}

type PersistedRx = mpsc::UnboundedReceiver<std::result::Result<Persisted, WriterError>>;

pub struct RaftNode {
    node: Node,
    /// Taken by `run`, which hands it to the WAL writer thread.
    wal: Option<Wal>,
    writer: Option<Writer>,
    snapshotter: Snapshotter,
    transport: Transport,
    get_snapshot: GetSnapshot,
    commit_tx: mpsc::Sender<Apply>,
    snapshot_done_tx: mpsc::UnboundedSender<SnapshotDone>,
    snapshot_done_rx: Option<mpsc::UnboundedReceiver<SnapshotDone>>,
    status: Arc<Mutex<NodeStatus>>,
    cluster_id: crate::cluster_id::ClusterId,
    logger: slog::Logger,
}

fn writer_error(e: WriterError) -> Error {
    match e {
        WriterError::Wal(e) => Error::Wal(e),
        WriterError::Snap(e) => Error::Snap(e),
    }
}

impl RaftNode {
    /// Replays the snapshot and WAL (or bootstraps a new member) and builds the node.
    pub fn recover(
        cfg: &Config,
        shared: &Shared,
        get_snapshot: GetSnapshot,
        logger: &slog::Logger,
    ) -> Result<RaftNode> {
        let nonce = crate::nonce::boot_nonce().map_err(|e| Error::Io {
            context: "cannot read a boot nonce from /dev/urandom".into(),
            source: e,
        })?;
        let started = Instant::now();
        let boot = node::Boot::from_config(cfg, nonce, shared.removed.clone())?;
        let node::Restored {
            node,
            wal,
            snapshotter,
        } = node::recover(&boot, logger)?;
        slog::info!(logger, "replayed"; "ms" => started.elapsed().as_millis() as u64);
        #[allow(unused_mut)]
        let mut transport = Transport::new(
            cfg.id,
            shared.peer_client.clone(),
            shared.report_tx.clone(),
            shared.shutdown.clone(),
            logger,
        );
        #[cfg(feature = "fault-injection")]
        if let Some(path) = &cfg.fault_file {
            let faults = Arc::new(crate::faults::Faults::default());
            faults.clone().watch(
                path.clone(),
                shared.shutdown.clone(),
                logger.new(slog::o!("component" => "faults")),
            );
            transport.set_faults(faults);
        }
        let (snapshot_done_tx, snapshot_done_rx) = mpsc::unbounded_channel();
        let mut raft_node = RaftNode {
            node,
            wal: Some(wal),
            writer: None,
            snapshotter,
            transport,
            get_snapshot,
            commit_tx: shared.commit_tx.clone(),
            snapshot_done_tx,
            snapshot_done_rx: Some(snapshot_done_rx),
            status: shared.status.clone(),
            cluster_id: shared.peer_client.cluster_id(),
            logger: logger.clone(),
        };
        raft_node.change_peers(raft_node.node.peers());
        // The restored snapshot, if any, is the kvstore's first message.
        for a in raft_node.node.take_output().applies {
            raft_node
                .commit_tx
                .try_send(a)
                .map_err(|_| Error::Recovery("the kvstore stopped".into()))?;
        }
        Ok(raft_node)
    }

    /// The event loop: a 100 ms ticker plus the input channels, each event followed by as many
    /// Ready rounds as raft has.
    pub async fn run(mut self, mut inp: Inputs, token: CancellationToken) -> Result<Exit> {
        let (persisted_tx, mut persisted_rx) = mpsc::unbounded_channel();
        let wal = self.wal.take().expect("run is called once");
        let writer = Writer::start(wal, self.snapshotter.clone(), persisted_tx, &self.logger);
        self.writer = Some(writer.map_err(|e| Error::Io {
            context: "cannot start the WAL writer thread".into(),
            source: e,
        })?);
        let mut snapshot_done_rx = self.snapshot_done_rx.take().expect("run is called once");
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish_status();
        // Set while a leader hands over before stopping.
        let mut handing_over: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled(), if handing_over.is_none() => {
                    match self.node.hand_over_leadership() {
                        Some(to) => {
                            slog::info!(self.logger, "shutting down: transferring leadership"; "to" => to);
                            handing_over = Some(Instant::now() + HANDOVER);
                        }
                        None => break,
                    }
                }
                _ = ticker.tick() => self.node.tick(),
                Some(m) = inp.raft_msg_rx.recv() => self.node.step(m),
                Some(p) = persisted_rx.recv() => self.node.persisted(p.map_err(writer_error)?),
                Some(done) = snapshot_done_rx.recv() => self.node.snapshot_written(done)?,
                Some(r) = inp.report_rx.recv() => self.report(r),
                p = inp.propose_rx.recv() => match p {
                    Some(p) => self.node.propose(p),
                    // Every proposer gone is raftexample's closed proposeC: stop.
                    None => break,
                },
                Some(r) = inp.read_rx.recv() => self.node.read(r),
                Some(cc) = inp.conf_change_rx.recv() => self.node.conf_change(cc),
            }
            // Take whatever else is already queued on every input, so one Ready (and one
            // fsync) covers it all and no input starves another.
            self.drain(&mut inp, &mut persisted_rx)?;
            if let Err(e) = self.process().await {
                // A failed submit means the writer stopped; its own error says why.
                while let Ok(p) = persisted_rx.try_recv() {
                    p.map_err(writer_error)?;
                }
                return Err(e);
            }
            self.publish_status();
            if self.node.exit().is_some() {
                break;
            }
            if handing_over.is_some_and(|until| !self.node.is_leader() || Instant::now() >= until) {
                break;
            }
        }
        self.stop(snapshot_done_rx, persisted_rx).await
    }

    async fn stop(
        mut self,
        mut snapshot_done_rx: mpsc::UnboundedReceiver<SnapshotDone>,
        mut persisted_rx: PersistedRx,
    ) -> Result<Exit> {
        // A snapshot being written finishes first, so its marker and purge are not lost.
        if self.node.snapshot_in_flight() {
            if let Ok(Some(done)) =
                tokio::time::timeout(HANDOVER * 5, snapshot_done_rx.recv()).await
            {
                self.node.snapshot_written(done)?;
                let out = self.node.take_output();
                self.submit_all(out.jobs)?;
            }
        }
        // Finishes the queued writes, syncs and closes the WAL.
        if let Some(mut w) = self.writer.take() {
            w.close();
        }
        while let Ok(p) = persisted_rx.try_recv() {
            p.map_err(writer_error)?;
        }
        self.node.fail_reads(ReadError::Shutdown);
        let exit = self.node.take_exit().unwrap_or(Exit::Shutdown);
        slog::info!(self.logger, "raft stopped"; "exit" => ?exit, "applied" => self.node.applied());
        Ok(exit)
    }

    fn drain(&mut self, inp: &mut Inputs, persisted_rx: &mut PersistedRx) -> Result<()> {
        while let Ok(p) = persisted_rx.try_recv() {
            self.node.persisted(p.map_err(writer_error)?);
        }
        while let Ok(r) = inp.report_rx.try_recv() {
            self.report(r);
        }
        for _ in 0..DRAIN {
            let Ok(m) = inp.raft_msg_rx.try_recv() else {
                break;
            };
            self.node.step(m);
        }
        for _ in 0..DRAIN {
            let Ok(p) = inp.propose_rx.try_recv() else {
                break;
            };
            self.node.propose(p);
        }
        for _ in 0..DRAIN {
            let Ok(r) = inp.read_rx.try_recv() else { break };
            self.node.read(r);
        }
        Ok(())
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Unreachable(id) => self.node.report_unreachable(id),
            Report::Snapshot(id, status) => self.node.report_snapshot(id, status),
            Report::Removed => self.node.removed_by_peer(),
        }
    }

    /// Runs the node until it has nothing more to do, carrying out what it asks for.
    async fn process(&mut self) -> Result<()> {
        // What the inputs released already (the votes and append responses the writer just
        // made durable) goes out before the next Readies are built: a follower's response is
        // what lets the leader commit.
        let released = self.node.take_output();
        if !released.is_empty() {
            self.carry_out(released).await?;
        }
        loop {
            self.node.process()?;
            let out = self.node.take_output();
            if out.is_empty() {
                return Ok(());
            }
            self.carry_out(out).await?;
            if !self.node.has_ready() {
                return Ok(());
            }
        }
    }

    async fn carry_out(&mut self, out: Output) -> Result<()> {
        let Output {
            messages,
            jobs,
            applies,
            snapshot,
            peers,
        } = out;
        self.change_peers(peers);
        if !messages.is_empty() {
            self.transport.send(messages);
        }
        self.submit_all(jobs)?;
        for a in applies {
            self.commit_tx
                .send(a)
                .await
                .map_err(|_| Error::Recovery("the kvstore stopped".into()))?;
        }
        if let Some(task) = snapshot {
            self.take_snapshot(task).await?;
        }
        Ok(())
    }

    fn change_peers(&mut self, peers: Vec<PeerChange>) {
        for p in peers {
            match p {
                PeerChange::Add(id, url) => self.transport.add_peer(id, &url),
                PeerChange::Remove(id) => self.transport.remove_peer(id),
            }
        }
    }

    fn submit_all(&mut self, jobs: Vec<crate::wal::writer::Job>) -> Result<()> {
        let writer = self
            .writer
            .as_ref()
            .expect("the writer runs while the loop does");
        for job in jobs {
            if !writer.submit(job) {
                return Err(Error::Recovery("the WAL writer stopped".into()));
            }
        }
        Ok(())
    }

    /// Captures the map once the kvstore has applied everything up to the snapshot's index,
    /// and lets a snapshot thread stream it into the `.snap` file.
    async fn take_snapshot(&mut self, mut task: SnapshotTask) -> Result<()> {
        if let Some(done) = task.wait.take() {
            // The map must hold exactly the entries up to the snapshot's index.
            let _ = done.await;
        }
        let source = (self.get_snapshot)();
        let snapshotter = self.snapshotter.clone();
        let done_tx = self.snapshot_done_tx.clone();
        let logger = self.logger.clone();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let index = task.meta.index;
                let res = task.write(&snapshotter, source.as_ref());
                if res.is_ok() {
                    slog::info!(logger, "snapshot written"; "index" => index,
                        "ms" => started.elapsed().as_millis() as u64);
                }
                let _ = done_tx.send(res);
            })
            .map_err(|e| Error::Io {
                context: "cannot start a snapshot thread".into(),
                source: e,
            })?;
        Ok(())
    }

    fn publish_status(&mut self) {
        let mut st = self.status.lock().expect("status lock");
        self.node.status(&mut st);
        if st.cluster_id.is_none() {
            st.cluster_id = self.cluster_id.get().map(crate::cluster_id::format);
        }
        crate::metrics::indexes(st.commit, st.applied);
    }
}
