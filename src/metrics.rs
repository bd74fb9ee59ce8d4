//! Process-wide Prometheus metrics (the `prometheus` crate's default registry), served as text
//! on the peer listener's `GET /metrics`. Components record through the small functions below
//! so that metric names live in one place.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    Histogram, IntCounter, IntCounterVec, IntGauge, TextEncoder,
};

static PROPOSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "raftexample_proposals_total",
        "Proposals handed to raft, by outcome (accepted or dropped).",
        &["outcome"]
    )
    .expect("metric registered once")
});
static COMMIT_INDEX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "raftexample_commit_index",
        "Highest raft index known committed."
    )
    .expect("metric registered once")
});
static APPLIED_INDEX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "raftexample_applied_index",
        "Highest raft index handed to the key-value store."
    )
    .expect("metric registered once")
});
static APPLY_LAG: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "raftexample_apply_lag_entries",
        "Committed entries not yet applied (commit index minus applied index)."
    )
    .expect("metric registered once")
});
static WAL_FSYNC: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "raftexample_wal_fsync_duration_seconds",
        "Latency of WAL writes that end in an fsync.",
        vec![0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024]
    )
    .expect("metric registered once")
});
static SNAPSHOTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "raftexample_snapshots_total",
        "Snapshots taken by this node."
    )
    .expect("metric registered once")
});
static PROMOTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "raftexample_learner_promotions_total",
        "Learners promoted to voters, counted as this node applied the promotions."
    )
    .expect("metric registered once")
});
static PEER_SEND_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "raftexample_peer_send_failures_total",
        "Batches of raft messages that could not be delivered to a peer."
    )
    .expect("metric registered once")
});

/// `n` proposals that raft accepted or dropped together.
pub fn proposals(accepted: bool, n: usize) {
    PROPOSALS
        .with_label_values(&[if accepted { "accepted" } else { "dropped" }])
        .inc_by(n as u64);
}

pub fn indexes(commit: u64, applied: u64) {
    COMMIT_INDEX.set(commit as i64);
    APPLIED_INDEX.set(applied as i64);
    APPLY_LAG.set(commit.saturating_sub(applied) as i64);
}

pub fn wal_fsync(d: Duration) {
    WAL_FSYNC.observe(d.as_secs_f64());
}

pub fn snapshot() {
    SNAPSHOTS.inc();
}

pub fn promotion() {
    PROMOTIONS.inc();
}

pub fn peer_send_failure() {
    PEER_SEND_FAILURES.inc();
}

/// Every metric in the Prometheus text exposition format.
pub fn render() -> String {
    // Touch each metric (and label) so it is listed even before its first event.
    for outcome in ["accepted", "dropped"] {
        PROPOSALS.with_label_values(&[outcome]);
    }
    LazyLock::force(&COMMIT_INDEX);
    LazyLock::force(&APPLIED_INDEX);
    LazyLock::force(&APPLY_LAG);
    LazyLock::force(&WAL_FSYNC);
    LazyLock::force(&SNAPSHOTS);
    LazyLock::force(&PEER_SEND_FAILURES);
    LazyLock::force(&PROMOTIONS);
    TextEncoder::new()
        .encode_to_string(&prometheus::gather())
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}
