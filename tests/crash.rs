//! Crash-safe storage, end to end (issue 4): the real `raftexample` binary, SIGKILLed, its data
//! directory damaged the way crashes and disks damage files, then restarted on it. Proves that a
//! torn WAL tail is repaired, that real corruption stops the node loudly (one line naming file
//! and offset), that a broken snapshot is set aside, that a failing disk stops the node without
//! acknowledging a write it did not persist, that no acknowledged write is lost across repeated
//! SIGKILLs under load, that old WAL segments and snapshots are purged, and what `wal-dump` prints.
//!
//! The record-level cases (truncation at every offset, flipped bytes, decoder fuzzing) are unit
//! tests in `src/wal`; these tests go through the process, its flags and its data directory.

mod common;
use common::Rng;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    files_ending_with, last_line, pooled_client, try_get_with, try_put_with, wal_dump, Cluster,
    Node, StatusCode, TIMEOUT,
};
use tokio::task::JoinSet;

/// How long a node that must refuse to start (or must stop on a disk error) may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `(key, value)` pairs whose PUT was acknowledged with 204.
type Acked = Vec<(String, String)>;

// ----- helpers -------------------------------------------------------------------------------

/// Starts a one-node cluster with `args` on every start and waits until it is leader.
async fn single(args: &[&str]) -> Cluster {
    let cluster = Cluster::start_with(1, args);
    cluster.wait_leader().await;
    cluster
}

/// Restarts node 1 (with its base args only) and waits until it leads again.
async fn restart(cluster: &mut Cluster) {
    cluster.node_mut(1).start(&[]);
    cluster.wait_leader().await;
}

/// PUTs `n` keys `/<prefix>-<i>` from `clients` concurrent clients, asserting each gets 204.
async fn put_keys(port: u16, prefix: &str, n: usize, clients: usize, acked: &mut Acked) {
    let client = pooled_client();
    let mut set = JoinSet::new();
    for c in 0..clients {
        let client = client.clone();
        let prefix = prefix.to_string();
        set.spawn(async move {
            let mut done = Vec::new();
            for i in (c..n).step_by(clients) {
                let key = format!("/{prefix}-{i}");
                let value = format!("value of {key}");
                let got = try_put_with(&client, port, &key, value.clone()).await;
                assert_eq!(got, Some(StatusCode::NO_CONTENT), "PUT {key}");
                done.push((key, value));
            }
            done
        });
    }
    while let Some(done) = set.join_next().await {
        acked.extend(done.expect("PUT task"));
    }
}

/// The keys of `kvs` that `port` does not serve with their value (linearizable GET). A 503 or
/// an unreachable node is retried for a while; a 404 or another value is a lost write.
async fn not_served(port: u16, kvs: &[(String, String)]) -> Vec<String> {
    if kvs.is_empty() {
        return Vec::new();
    }
    let client = pooled_client();
    let mut set = JoinSet::new();
    for chunk in kvs.chunks(kvs.len().div_ceil(8)) {
        let chunk = chunk.to_vec();
        let client = client.clone();
        set.spawn(async move {
            let mut bad = Vec::new();
            for (key, value) in chunk {
                // Retry only while the node cannot answer (503, unreachable).
                let deadline = Instant::now() + TIMEOUT;
                let got = loop {
                    let got = try_get_with(&client, port, &key).await;
                    let retry = match &got {
                        None => true,
                        Some((s, _)) => *s == StatusCode::SERVICE_UNAVAILABLE,
                    };
                    if !retry || Instant::now() >= deadline {
                        break got;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let served = got
                    .as_ref()
                    .is_some_and(|(s, b)| *s == StatusCode::OK && b.as_ref() == value.as_bytes());
                if !served {
                    bad.push(format!("{key}: want {value:?}, got {got:?}"));
                }
            }
            bad
        });
    }
    let mut bad = Vec::new();
    while let Some(b) = set.join_next().await {
        bad.extend(b.expect("GET task"));
    }
    bad.sort();
    bad
}

/// Asserts that `port` serves every pair of `kvs`.
async fn assert_serves_all(port: u16, kvs: &[(String, String)], when: &str) {
    let bad = not_served(port, kvs).await;
    assert!(
        bad.is_empty(),
        "{when}: {} of {} acknowledged keys are not served:\n{}",
        bad.len(),
        kvs.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One `<file>@<offset> <what>` line of `wal-dump`.
#[derive(Debug, Clone)]
struct DumpRecord {
    file: String,
    offset: u64,
    what: String,
}

/// The record lines of a `wal-dump` output, in order.
fn dump_records(stdout: &str) -> Vec<DumpRecord> {
    stdout
        .lines()
        .filter_map(|line| {
            let (at, what) = line.split_once(' ')?;
            let (file, offset) = at.rsplit_once('@')?;
            if !file.ends_with(".wal") {
                return None;
            }
            Some(DumpRecord {
                file: file.to_string(),
                offset: offset.parse().ok()?,
                what: what.to_string(),
            })
        })
        .collect()
}

/// Runs `wal-dump` on node `node`, asserts it exits 0, returns its record lines and stdout.
async fn dump_ok(node: &Node) -> (Vec<DumpRecord>, String) {
    let d = wal_dump(node.dir.path(), node.id).await;
    assert!(
        d.ok(),
        "wal-dump failed: {:?}\nstderr:\n{}\nstdout:\n{}",
        d.status,
        d.stderr,
        d.stdout
    );
    (dump_records(&d.stdout), d.stdout)
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(bytes)
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
    f.sync_all().expect("fsync the damaged file");
}

/// Cuts `path` to `len` bytes, durably.
fn cut(path: &Path, len: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_len(len).expect("truncate the segment");
    f.sync_all().expect("fsync the cut file");
}

/// The offset `wal-dump` reports the zeros written ahead in `file` to start at, if any.
fn unused_from(stdout: &str, file: &str) -> Option<u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("unused zeros in ") && l.contains(file))?;
    let (_, rest) = line.split_once(" from offset ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// Starts node 1 again and asserts it starts after repairing the torn tail that begins at
/// `offset` in `segment`: it leads, logged the repair naming the file and offset, and serves
/// every acknowledged key.
async fn restart_expecting_repair(
    cluster: &mut Cluster,
    segment: &Path,
    offset: u64,
    acked: &Acked,
) {
    let log_from = cluster.node(1).log_len();
    restart(cluster).await;
    let log = cluster.node(1).log_since(log_from);
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    let warning = log
        .lines()
        .find(|l| l.contains("truncating torn wal tail"))
        .unwrap_or_else(|| panic!("no repair warning in the restart log:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains(&name),
        "the repair warning does not name {name}: {warning}"
    );
    assert!(
        warning.contains(&format!("offset: {offset}")),
        "the repair warning does not name offset {offset}: {warning}"
    );
    assert_serves_all(cluster.node(1).client_port, acked, "after the repair").await;
}

/// Newest WAL segment (highest sequence number) of `node`.
fn newest_segment(node: &Node) -> PathBuf {
    let segs = files_ending_with(&node.wal_dir(), ".wal");
    node.wal_dir()
        .join(segs.last().expect("the WAL dir holds a segment"))
}

/// Waits for a node that must not start to exit; returns what it printed in this start.
async fn expect_refusal(node: &mut Node, log_from: usize) -> String {
    let status = node.wait_exit(EXIT_TIMEOUT).await;
    let log = node.log_since(log_from);
    let status = status
        .unwrap_or_else(|| panic!("the node did not exit within {EXIT_TIMEOUT:?}; log:\n{log}"));
    assert!(!status.success(), "exited with {status}; log:\n{log}");
    assert!(!log.contains("panicked"), "the node panicked:\n{log}");
    log
}

// ----- tests ---------------------------------------------------------------------------------

/// A crash can leave the newest WAL segment ending in a torn record. Proves, three times on
/// one data dir, that startup truncates each kind of torn tail (logging a warning that names
/// the segment file and the offset), serves every acknowledged key, and appends correctly after
/// the cut (the next crash and restart still read the whole WAL):
/// 1. a prefix of the last entry record re-appended (the frame runs past EOF);
/// 2. a copy of the last entry record after 4 KiB of zeros (a write torn in the zeros the
///    WAL writes ahead of its records: its first blocks never reached the disk);
/// 3. a complete copy of the last entry record (its CRC does not chain) followed by zeros.
///
/// The damage is written where the records end, over the zeros written ahead. `wal-dump`
/// reports each torn tail without modifying the file.
#[tokio::test(flavor = "multi_thread")]
async fn torn_tail_is_repaired_at_startup() {
    let mut cluster = single(&[]).await;
    let mut acked = Acked::new();
    type Damage = fn(&[u8]) -> Vec<u8>;
    // (A whole record after the end whose CRC does not chain is not a torn write: no write
    // of the WAL's stops there. It is refused as damage; see `wal::tests`.)
    let damages: [(&str, Damage); 2] = [
        ("the last entry record without its last 3 bytes", |last| {
            last[..last.len() - 3].to_vec()
        }),
        ("the last entry record after 4 KiB of zeros", |last| {
            let mut v = vec![0; 4096];
            v.extend_from_slice(last);
            v
        }),
    ];
    for (round, (what, damage)) in damages.into_iter().enumerate() {
        let port = cluster.node(1).client_port;
        put_keys(port, &format!("torn{round}"), 10, 2, &mut acked).await;
        cluster.node_mut(1).kill9();

        let (records, stdout) = dump_ok(cluster.node(1)).await;
        assert!(
            !stdout.contains("torn tail"),
            "the WAL of an idle node killed with SIGKILL already has a torn tail:\n{stdout}"
        );
        let last = records.last().expect("the WAL has records").clone();
        let segment = cluster.node(1).wal_dir().join(&last.file);
        assert_eq!(segment, newest_segment(cluster.node(1)));
        let bytes = fs::read(&segment).expect("read the newest segment");
        // The records end where the zeros written ahead start.
        let torn_at = unused_from(&stdout, &last.file).unwrap_or(bytes.len() as u64);
        // The last entry record of the segment, as written (it is followed by a HardState).
        let e = records
            .iter()
            .rposition(|r| r.file == last.file && r.what.starts_with("entry "))
            .unwrap_or_else(|| panic!("no entry in the newest segment:\n{stdout}"));
        let end = records.get(e + 1).map_or(torn_at, |r| r.offset);
        let garbage = damage(&bytes[records[e].offset as usize..end as usize]);
        cut(&segment, torn_at);
        append(&segment, &garbage);

        let d = wal_dump(cluster.node(1).dir.path(), 1).await;
        assert!(d.ok(), "{what}: wal-dump failed on a torn tail: {d:?}");
        assert!(
            d.stdout.lines().any(|l| l.starts_with("torn tail in ")
                && l.contains(&last.file)
                && l.contains(&format!("at offset {torn_at}"))),
            "{what}: wal-dump does not report the torn tail at {torn_at}:\n{}",
            d.stdout
        );
        assert_eq!(
            file_len(&segment),
            torn_at + garbage.len() as u64,
            "{what}: wal-dump modified the file"
        );

        restart_expecting_repair(&mut cluster, &segment, torn_at, &acked).await;
    }
    // The last repair left a WAL that later writes extend cleanly: every key is in the dump.
    let port = cluster.node(1).client_port;
    put_keys(port, "after", 5, 1, &mut acked).await;
    cluster.node_mut(1).kill9();
    let (records, stdout) = dump_ok(cluster.node(1)).await;
    assert!(!stdout.contains("torn tail"), "{stdout}");
    for (key, _) in &acked {
        let needle = format!("put key={key:?} ");
        assert!(
            records.iter().any(|r| r.what.contains(&needle)),
            "{key} is not in the dump:\n{stdout}"
        );
    }
}

/// A flipped byte in a record in the middle of a segment is corruption, not a torn write. Proves
/// that the node refuses to start: it exits non-zero within 10 s, without a panic, its last
/// stderr line names the segment file and the record's offset, and the file is left as it was
/// (not "repaired" by truncating acknowledged writes). `wal-dump` also exits non-zero naming the
/// file and offset.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_middle_record_refuses_to_start() {
    let mut cluster = single(&[]).await;
    let mut acked = Acked::new();
    put_keys(cluster.node(1).client_port, "k", 10, 1, &mut acked).await;
    cluster.node_mut(1).kill9();

    let (records, stdout) = dump_ok(cluster.node(1)).await;
    let i = records
        .iter()
        .position(|r| r.what.contains("put key=\"/k-5\""))
        .unwrap_or_else(|| panic!("no record for /k-5:\n{stdout}"));
    let (rec, next) = (&records[i], &records[i + 1]);
    assert_eq!(
        rec.file, next.file,
        "the record is not followed in its segment"
    );
    let segment = cluster.node(1).wal_dir().join(&rec.file);
    let mut bytes = fs::read(&segment).expect("read the segment");
    // Frame: len (4) crc (4) type (1) payload; flip a payload byte.
    let flip_at = (rec.offset + 9 + (next.offset - rec.offset - 9) / 2) as usize;
    bytes[flip_at] ^= 0x40;
    fs::write(&segment, &bytes).expect("write the damaged segment");

    let node = cluster.node_mut(1);
    let log_from = node.log_len();
    node.start(&[]);
    let log = expect_refusal(node, log_from).await;
    let line = last_line(&log);
    assert!(
        line.contains(&rec.file) && line.contains(&format!("at offset {}:", rec.offset)),
        "the last line does not name {} and offset {}: {line:?}\nlog:\n{log}",
        rec.file,
        rec.offset
    );
    assert_eq!(
        fs::read(&segment).expect("read the segment"),
        bytes,
        "the refused start modified the corrupt segment"
    );

    let d = wal_dump(cluster.node(1).dir.path(), 1).await;
    assert!(
        d.status.is_some_and(|s| !s.success()),
        "wal-dump did not fail: {d:?}"
    );
    let line = last_line(&d.stderr);
    assert!(
        line.contains(&rec.file) && line.contains(&format!("at offset {}:", rec.offset)),
        "wal-dump's last line does not name {} and offset {}: {line:?}",
        rec.file,
        rec.offset
    );
    assert!(!d.stderr.contains("panicked"), "{}", d.stderr);
}

/// A torn tail is only a crash artefact in the *newest* segment: an older segment was fsynced
/// before the next one was created, so a short one means lost data. Proves that cutting bytes
/// off the end of a non-newest segment makes the node refuse to start, with a last stderr line
/// naming that file and the offset of the cut record, instead of truncating and carrying on; and that once that
/// segment is deleted altogether, the gap in the sequence is refused the same way (naming the
/// segment after the gap, offset 0). Neither refused start touches the files.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_older_segment_refuses_to_start() {
    let mut cluster = single(&["--wal-segment-size", "1024"]).await;
    let mut acked = Acked::new();
    put_keys(cluster.node(1).client_port, "k", 60, 2, &mut acked).await;
    cluster.node_mut(1).kill9();

    let segs = files_ending_with(&cluster.node(1).wal_dir(), ".wal");
    assert!(segs.len() >= 3, "expected several segments, got {segs:?}");
    // The record the cut will damage: the last one of the second segment.
    let (records, stdout) = dump_ok(cluster.node(1)).await;
    let last_of_victim = records
        .iter()
        .rfind(|r| r.file == segs[1])
        .unwrap_or_else(|| panic!("no record in {}:\n{stdout}", segs[1]))
        .offset;
    let victim = cluster.node(1).wal_dir().join(&segs[1]);
    let len = file_len(&victim);
    OpenOptions::new()
        .write(true)
        .open(&victim)
        .and_then(|f| f.set_len(len - 5))
        .expect("truncate the segment");

    let node = cluster.node_mut(1);
    let log_from = node.log_len();
    node.start(&[]);
    let log = expect_refusal(node, log_from).await;
    let line = last_line(&log);
    assert!(
        line.contains(&segs[1]) && line.contains(&format!("at offset {last_of_victim}:")),
        "the last line does not name {} and offset {last_of_victim}: {line:?}\nlog:\n{log}",
        segs[1]
    );
    assert_eq!(
        file_len(&victim),
        len - 5,
        "the refused start modified the segment"
    );

    // A segment deleted from the middle (an operator's mistake) is a gap in the sequence.
    fs::remove_file(&victim).expect("delete the damaged segment");
    let node = cluster.node_mut(1);
    let log_from = node.log_len();
    node.start(&[]);
    let log = expect_refusal(node, log_from).await;
    let line = last_line(&log);
    assert!(
        line.contains(&segs[2]) && line.contains("at offset 0:"),
        "the last line does not name {} (after the gap) at offset 0: {line:?}\nlog:\n{log}",
        segs[2]
    );
    assert_eq!(
        files_ending_with(&cluster.node(1).wal_dir(), ".wal").len(),
        segs.len() - 1,
        "the refused start deleted or created segments"
    );
}

/// Snapshot files damaged on disk (the newest the WAL references with a flipped byte, the
/// second newest cut in half) are renamed `<name>.broken`, a warning names each, and the node
/// recovers from the newest intact snapshot the WAL references (the third newest) plus the WAL
/// entries after it: it serves every acknowledged key. (One WAL segment, so no entry after the
/// intact snapshot was released.)
#[tokio::test(flavor = "multi_thread")]
async fn broken_snapshot_is_set_aside() {
    let args = [
        "--snapshot-count",
        "5",
        "--snapshot-catchup-entries",
        "2",
        "--max-snapshots",
        "3",
    ];
    let mut cluster = single(&args).await;
    let mut acked = Acked::new();
    put_keys(cluster.node(1).client_port, "s", 30, 1, &mut acked).await;
    let node = cluster.node_mut(1);
    node.sigterm();
    let status = node.wait_exit(EXIT_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );

    let snap_dir = cluster.node(1).snap_dir();
    let (_, dump) = dump_ok(cluster.node(1)).await;
    let snaps = present_snapshots(&dump);
    assert!(
        snaps.len() >= 3,
        "expected 3 snapshot files the WAL references: {snaps:?}\n{dump}"
    );
    let oldest_intact = &snaps[snaps.len() - 3];
    let (newest, second) = (&snaps[snaps.len() - 1], &snaps[snaps.len() - 2]);
    flip_middle_byte(&snap_dir.join(newest));
    let bytes = fs::read(snap_dir.join(second)).expect("read the second snapshot");
    fs::write(snap_dir.join(second), &bytes[..bytes.len() / 2]).expect("cut the second snapshot");

    let log_from = cluster.node(1).log_len();
    restart(&mut cluster).await;
    let log = cluster.node(1).log_since(log_from);
    for name in [newest, second] {
        assert!(
            snap_dir.join(format!("{name}.broken")).is_file(),
            "{name} was not renamed .broken: {:?}",
            files_ending_with(&snap_dir, "")
        );
        assert!(
            log.lines()
                .any(|l| l.contains("snapshot file is unusable") && l.contains(name.as_str())),
            "no warning names {name}:\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("loaded snapshot")
            && l.contains(&format!("index: {},", index_of(oldest_intact)))),
        "the newest intact snapshot {oldest_intact} was not loaded:\n{log}"
    );
    assert_serves_all(cluster.node(1).client_port, &acked, "after setting aside").await;
}

/// Distinct `.snap` file names that `wal-dump` lists as referenced by a WAL marker and present,
/// oldest first.
fn present_snapshots(dump: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in dump.lines() {
        let Some(rest) = line.strip_prefix("snapshot term=") else {
            continue;
        };
        if !rest.ends_with(" present") {
            continue;
        }
        let name = rest
            .split(' ')
            .find_map(|w| w.strip_prefix("file="))
            .unwrap_or_else(|| panic!("no file= in {line:?}"));
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// Raft index encoded in a `%016x-%016x.snap` name.
fn index_of(snap_name: &str) -> u64 {
    let hex = snap_name
        .trim_end_matches(".snap")
        .split_once('-')
        .expect("term-index")
        .1;
    u64::from_str_radix(hex, 16).expect("hex index")
}

/// Like [`broken_snapshot_is_set_aside`], but with small WAL segments, so that snapshots
/// release WAL segments (the first segment is gone), then two restarts:
/// 1. only the newest `.snap` is corrupt: the node never silently serves a partial state:
///    either it serves every acknowledged key (falling back to an older snapshot and the WAL
///    after it), or it exits non-zero (no panic) with one last line about the snapshot/WAL
///    mismatch. Which one happened is printed (`OUTCOME:`).
/// 2. every `.snap` is corrupt, and the WAL no longer starts at index 1: recovery is impossible,
///    so the node must exit non-zero, without a panic, with a last line about the snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn broken_snapshot_after_wal_release_is_loud_or_recovers() {
    let args = [
        "--snapshot-count",
        "5",
        "--snapshot-catchup-entries",
        "2",
        "--max-snapshots",
        "3",
        "--wal-segment-size",
        "256",
    ];
    let mut cluster = single(&args).await;
    let mut acked = Acked::new();
    put_keys(cluster.node(1).client_port, "s", 30, 1, &mut acked).await;
    cluster.node_mut(1).kill9();

    let snap_dir = cluster.node(1).snap_dir();
    let (_, dump) = dump_ok(cluster.node(1)).await;
    let snaps = present_snapshots(&dump);
    assert!(snaps.len() >= 2, "{snaps:?}\n{dump}");
    // The newest snapshot recovery would use: its file exists and the WAL has its marker.
    let newest = snaps.last().unwrap().clone();
    flip_middle_byte(&snap_dir.join(&newest));
    eprintln!(
        "snapshots {snaps:?}; segments {:?}\n{}",
        files_ending_with(&cluster.node(1).wal_dir(), ".wal"),
        dump.lines()
            .filter(|l| l.starts_with("snapshot ") || l.starts_with("summary"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let log_from = cluster.node(1).log_len();
    match start_or_refuse(cluster.node_mut(1), log_from).await {
        Ok(()) => {
            eprintln!("OUTCOME 1 (newest .snap corrupt): the node started; checking every key");
            assert_serves_all(cluster.node(1).client_port, &acked, "after setting aside").await;
        }
        Err(line) => {
            eprintln!("OUTCOME 1 (newest .snap corrupt): the node refused to start: {line}");
            assert!(
                line.contains("snapshot") || line.contains("WAL") || line.contains("wal"),
                "the last line does not explain the snapshot/WAL mismatch: {line:?}"
            );
            return;
        }
    }
    assert!(
        snap_dir.join(format!("{newest}.broken")).is_file(),
        "{newest} was not renamed .broken"
    );

    // More snapshots, then every .snap file damaged.
    put_keys(cluster.node(1).client_port, "t", 12, 1, &mut acked).await;
    cluster.node_mut(1).kill9();
    let (records, dump) = dump_ok(cluster.node(1)).await;
    let first_entry = records.iter().find(|r| r.what.starts_with("entry "));
    assert!(
        first_entry.is_some_and(|r| !r.what.contains(" index=1 ")),
        "the WAL still starts at index 1, nothing was released:\n{dump}"
    );
    let snaps = files_ending_with(&snap_dir, ".snap");
    for s in &snaps {
        flip_middle_byte(&snap_dir.join(s));
    }
    // Recovery tries (and sets aside) only the files the WAL references.
    let referenced = present_snapshots(&dump);
    assert!(!referenced.is_empty(), "no snapshot referenced:\n{dump}");
    let log_from = cluster.node(1).log_len();
    match start_or_refuse(cluster.node_mut(1), log_from).await {
        Ok(()) => panic!(
            "the node started although every snapshot ({snaps:?}) is corrupt and the WAL starts \
             after index 1; log:\n{}",
            cluster.node(1).log_since(log_from)
        ),
        Err(line) => {
            eprintln!("OUTCOME 2 (every .snap corrupt): the node refused to start: {line}");
            assert!(line.contains("snapshot"), "{line:?}");
        }
    }
    for s in &referenced {
        assert!(
            snap_dir.join(format!("{s}.broken")).is_file(),
            "{s} was not renamed .broken"
        );
    }
}

/// Flips one bit in the middle of `path`.
fn flip_middle_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Starts `node` (one node cluster) and waits until it either leads (`Ok`) or exits. An exit
/// must be non-zero, without a panic, and with a last line starting `raftexample: `, which is
/// returned as `Err`.
async fn start_or_refuse(node: &mut Node, log_from: usize) -> Result<(), String> {
    node.start(&[]);
    let peer_url = node.peer_url.clone();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = node
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            node.child = None;
            let log = node.log_since(log_from);
            assert!(!status.success(), "exited with {status}; log:\n{log}");
            assert!(!log.contains("panicked"), "the node panicked:\n{log}");
            let line = last_line(&log).to_string();
            assert!(
                line.starts_with("raftexample: "),
                "the last line is not the one-line error: {line:?}\nlog:\n{log}"
            );
            return Err(line);
        }
        let leads = common::status(&peer_url)
            .await
            .is_some_and(|s| s.get("role").and_then(|r| r.as_str()) == Some("leader"));
        if leads {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the node neither led nor exited within {TIMEOUT:?}; log:\n{}",
            node.log_since(log_from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WAL write that fails (a full disk, simulated by `--wal-fail-after-bytes`) stops the node:
/// it exits non-zero within 10 s, its last stderr line is the one-line `wal: <segment>: ..`
/// error and it did not panic. The WAL it leaves is readable (`wal-dump` exits 0); if the failed
/// write left a partial record, the restart repairs it as a torn tail at the offset `wal-dump`
/// reported. Restarted on the same dir without the failpoint, the node serves every key that got
/// a 204 (no write was acknowledged that had not reached the disk) and takes writes again.
#[tokio::test(flavor = "multi_thread")]
async fn disk_error_fails_stop() {
    let mut cluster = Cluster::new(1, &[]);
    cluster
        .node_mut(1)
        .start(&["--wal-fail-after-bytes", "20000"]);
    cluster.wait_leader().await;
    let port = cluster.node(1).client_port;
    let log_from = cluster.node(1).log_len();

    let client = pooled_client();
    let mut set = JoinSet::new();
    for c in 0..4 {
        let client = client.clone();
        set.spawn(async move {
            let mut acked = Acked::new();
            let mut refused = None;
            // 20000 bytes hold a few hundred PUTs; the bound only stops a runaway loop.
            for i in 0..5_000 {
                let key = format!("/disk-{c}-{i}");
                let value = format!("value of {key}");
                match try_put_with(&client, port, &key, value.clone()).await {
                    Some(StatusCode::NO_CONTENT) => acked.push((key, value)),
                    // Not acknowledged; the node may still be running.
                    Some(StatusCode::SERVICE_UNAVAILABLE) => {}
                    other => {
                        refused = Some(format!("{key}: {other:?}"));
                        break;
                    }
                }
            }
            (acked, refused)
        });
    }
    let mut acked = Acked::new();
    while let Some(r) = set.join_next().await {
        let (a, refused) = r.expect("PUT task");
        assert!(refused.is_some(), "5000 PUTs ran and the node is still up");
        acked.extend(a);
    }
    assert!(!acked.is_empty(), "no PUT succeeded before the failpoint");

    let failed_log = expect_refusal(cluster.node_mut(1), log_from).await;

    let (_, dump) = dump_ok(cluster.node(1)).await;
    let torn = dump
        .lines()
        .find(|l| l.starts_with("torn tail in "))
        .map(|l| {
            let offset = l
                .split_once("at offset ")
                .and_then(|(_, rest)| rest.split(':').next())
                .and_then(|o| o.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no offset in {l:?}"));
            (l.to_string(), offset)
        });

    let log_from = cluster.node(1).log_len();
    restart(&mut cluster).await;
    if let Some((line, offset)) = torn {
        let log = cluster.node(1).log_since(log_from);
        assert!(
            log.lines().any(|l| l.contains("truncating torn wal tail")
                && l.contains(&format!("offset: {offset}"))),
            "wal-dump reported {line:?} but the restart did not repair it:\n{log}"
        );
    }
    assert_serves_all(cluster.node(1).client_port, &acked, "after the disk error").await;
    // And it takes writes again.
    put_keys(cluster.node(1).client_port, "again", 5, 1, &mut acked).await;

    // Checked last, so that a failure here still tells that no write was lost. The error itself,
    // naming the segment it failed on; not a consequence such as "the WAL writer stopped".
    let line = last_line(&failed_log);
    assert!(
        line.starts_with("raftexample: wal: ")
            && line.contains(&cluster.node(1).wal_dir().display().to_string())
            && line.contains(".wal"),
        "the last line of the failed node is not the one-line wal error naming the segment: \
         {line:?}\nlog:\n{failed_log}"
    );
}

/// Load generator for the SIGKILL loops: `clients` tasks PUT unique keys `/<tag>-c<i>-<n>` to
/// the ports in `ports` (round robin) until `stop` is set, and return the acknowledged pairs.
fn start_load(
    ports: Vec<u16>,
    tag: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> JoinSet<Acked> {
    let client = pooled_client();
    let mut set = JoinSet::new();
    for c in 0..clients {
        let (client, ports, tag, stop) = (client.clone(), ports.clone(), tag.clone(), stop.clone());
        set.spawn(async move {
            let mut acked = Acked::new();
            // Bounded: a PUT takes at least a round trip and an fsync.
            for n in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("/{tag}-c{c}-{n}");
                let value = format!("{n}@{tag}");
                let port = ports[(c + n) % ports.len()];
                if try_put_with(&client, port, &key, value.clone()).await
                    == Some(StatusCode::NO_CONTENT)
                {
                    acked.push((key, value));
                }
            }
            acked
        });
    }
    set
}

async fn collect_load(mut set: JoinSet<Acked>) -> Acked {
    let mut acked = Acked::new();
    while let Some(a) = set.join_next().await {
        acked.extend(a.expect("load task"));
    }
    acked
}

/// Flags for the SIGKILL-under-load tests: snapshots, segment roll-overs and purges every few
/// dozen writes, so that kills land across all of them.
const CHURN: [&str; 8] = [
    "--snapshot-count",
    "50",
    "--snapshot-catchup-entries",
    "10",
    "--wal-segment-size",
    "8192",
    "--max-snapshots",
    "2",
];

/// `n` pairs of `kvs` chosen at random (all of them if there are fewer).
fn sample(rng: &mut Rng, kvs: &[(String, String)], n: usize) -> Acked {
    if kvs.len() <= n {
        return kvs.to_vec();
    }
    (0..n)
        .map(|_| kvs[rng.next() as usize % kvs.len()].clone())
        .collect()
}

/// The longest test (about 55 s: 31 starts of a one-node cluster, each waiting out raft's
/// randomized 1–2 s election timeout). libtest starts tests in name order, as many at a time as
/// there are CPUs, so this module's name makes it start first and the file takes about as long
/// as this one test.
mod a_slow {
    use super::*;

    /// 30 times: start a node on the same data dir, run 4 concurrent PUT clients, SIGKILL the node
    /// at a random moment 100–400 ms into the load, restart. Small `--snapshot-count` and
    /// `--wal-segment-size` make snapshots, segment roll-overs and purges happen across the kills.
    /// Proves no acknowledged write is ever lost: after each restart the previous round's
    /// acknowledged keys and a random sample of 100 older ones are served, and at the end every key
    /// acknowledged in any round is.
    #[tokio::test(flavor = "multi_thread")]
    async fn kill9_under_write_load_30_times() {
        let mut rng = Rng::from_env("kill9_under_write_load_30_times");
        let mut cluster = single(&CHURN).await;
        let port = cluster.node(1).client_port;
        let started = Instant::now();
        let mut all = Acked::new();
        let mut last_round = Acked::new();
        for round in 0..30 {
            if round > 0 {
                restart(&mut cluster).await;
                assert_serves_all(port, &last_round, &format!("round {round}: previous round"))
                    .await;
                let older = sample(&mut rng, &all, 100);
                assert_serves_all(port, &older, &format!("round {round}: older rounds")).await;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let load = start_load(vec![port], format!("r{round}"), 4, stop.clone());
            let ms = rng.range(100, 400);
            // The crash moment itself, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(ms)).await;
            cluster.node_mut(1).kill9();
            stop.store(true, Ordering::Relaxed);
            last_round = collect_load(load).await;
            all.extend(last_round.iter().cloned());
        }
        restart(&mut cluster).await;
        assert_serves_all(port, &all, "after 30 SIGKILLs").await;
        let snaps = files_ending_with(&cluster.node(1).snap_dir(), ".snap");
        let segs = files_ending_with(&cluster.node(1).wal_dir(), ".wal");
        eprintln!(
            "{} acknowledged writes over 30 kills in {:?}; {} snapshots, {} segments on disk",
            all.len(),
            started.elapsed(),
            snaps.len(),
            segs.len()
        );
        assert!(
            all.len() >= 30,
            "the load barely ran ({} writes acknowledged)",
            all.len()
        );
    }
}

/// The 3-node variant: 10 times, under PUT load spread over all nodes, SIGKILL a random node
/// at a random moment and restart it. Proves that every acknowledged write survives (checked
/// through the restarted node, which must also catch up) while snapshots, segment roll-overs
/// and purges happen on every node.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_random_node_of_three_under_write_load() {
    let mut rng = Rng::from_env("kill9_random_node_of_three_under_write_load");
    let mut cluster = Cluster::start_with(3, &CHURN);
    cluster.wait_leader().await;
    let ports: Vec<u16> = (1..=3).map(|id| cluster.node(id).client_port).collect();
    let mut all = Acked::new();
    for round in 0..10 {
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(ports.clone(), format!("r{round}"), 4, stop.clone());
        let victim = rng.range(1, 3);
        tokio::time::sleep(Duration::from_millis(rng.range(100, 400))).await;
        cluster.node_mut(victim).kill9();
        stop.store(true, Ordering::Relaxed);
        let acked = collect_load(load).await;
        all.extend(acked.iter().cloned());
        cluster.node_mut(victim).start(&[]);
        cluster.wait_leader().await;
        let port = cluster.node(victim).client_port;
        assert_serves_all(
            port,
            &acked,
            &format!("round {round}: node {victim}, this round"),
        )
        .await;
        let older = sample(&mut rng, &all, 30);
        assert_serves_all(
            port,
            &older,
            &format!("round {round}: node {victim}, older"),
        )
        .await;
    }
    for id in 1..=3 {
        assert_serves_all(
            cluster.node(id).client_port,
            &all,
            &format!("node {id} at the end"),
        )
        .await;
    }
}

/// With frequent snapshots and small segments, the data dir stays bounded: after 600 writes the
/// snapshot dir holds at most `--max-snapshots` (2) `.snap` files and the WAL dir at most 3
/// segments (from the one holding the oldest kept snapshot's index on: about 40 entries, under
/// 3 KiB), the first segment is gone, and no temporary file is left. Then proves that what was
/// kept is enough: restarted, the node serves all 600 keys; and that leftovers of a crash
/// mid-write (a `.wal.tmp` and a `.snap.tmp` planted before the restart) are cleaned up, the dir
/// still bounded after 60 more writes.
#[tokio::test(flavor = "multi_thread")]
async fn purge_keeps_recovery_and_bounds_the_data_dir() {
    let args = [
        "--snapshot-count",
        "20",
        "--snapshot-catchup-entries",
        "5",
        "--max-snapshots",
        "2",
        "--wal-segment-size",
        "4096",
    ];
    let mut cluster = single(&args).await;
    let mut acked = Acked::new();
    put_keys(cluster.node(1).client_port, "p", 600, 4, &mut acked).await;

    let check_bounded = |node: &Node, when: &str| {
        let snaps = files_ending_with(&node.snap_dir(), ".snap");
        let segs = files_ending_with(&node.wal_dir(), ".wal");
        let tmp = files_ending_with(&node.snap_dir(), ".tmp")
            .into_iter()
            .chain(files_ending_with(&node.wal_dir(), ".tmp"))
            .collect::<Vec<_>>();
        assert!(
            (1..=2).contains(&snaps.len()),
            "{when}: snapshots {snaps:?}"
        );
        assert!((1..=3).contains(&segs.len()), "{when}: segments {segs:?}");
        assert!(
            !segs[0].starts_with("0000000000000000-"),
            "{when}: the first segment was never released: {segs:?}"
        );
        assert!(tmp.is_empty(), "{when}: temporary files left: {tmp:?}");
    };

    let node = cluster.node_mut(1);
    node.sigterm();
    let status = node.wait_exit(EXIT_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );
    check_bounded(cluster.node(1), "after 600 writes");

    // What a crash while creating a segment or writing a snapshot leaves behind.
    let stale_wal = cluster
        .node(1)
        .wal_dir()
        .join("00000000000000ff-00000000000000ff.wal.tmp");
    let stale_snap = cluster
        .node(1)
        .snap_dir()
        .join("0000000000000001-0000000000000001.snap.tmp");
    fs::write(&stale_wal, b"half a segment").expect("plant a .wal.tmp");
    fs::write(&stale_snap, b"half a snapshot").expect("plant a .snap.tmp");

    restart(&mut cluster).await;
    assert_serves_all(cluster.node(1).client_port, &acked, "after restart").await;
    put_keys(cluster.node(1).client_port, "q", 60, 4, &mut acked).await;
    let node = cluster.node_mut(1);
    node.sigterm();
    let status = node.wait_exit(EXIT_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );
    // A snapshot may still be in flight (its file written, the purge that follows its WAL
    // marker not yet done): the bound holds once it lands.
    let node = cluster.node(1);
    common::poll_until(Duration::from_secs(5), || async {
        files_ending_with(&node.snap_dir(), ".snap").len() <= 2
    })
    .await;
    check_bounded(node, "after the restart and 60 more writes");
}

/// `raftexample wal-dump` on a stopped node's data dir exits 0 and prints: a `segment` line
/// first, one `<file>@<offset> entry term=.. index=.. put key="/k<i>"` line per written key
/// (each exactly once, indexes increasing), offsets increasing within the file, a `snapshot
/// term=.. index=.. file=.. present` line per marker (`missing` once the file is deleted), and a
/// last `summary:` line whose commit covers every put.
#[tokio::test(flavor = "multi_thread")]
async fn wal_dump_lists_records() {
    let mut cluster = single(&["--snapshot-count", "4"]).await;
    let port = cluster.node(1).client_port;
    let client = pooled_client();
    for i in 1..=8 {
        let got = try_put_with(&client, port, &format!("/k{i}"), format!("v{i}")).await;
        assert_eq!(got, Some(StatusCode::NO_CONTENT), "PUT /k{i}");
    }
    let node = cluster.node_mut(1);
    node.sigterm();
    let status = node.wait_exit(EXIT_TIMEOUT).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}"
    );

    let (records, stdout) = dump_ok(cluster.node(1)).await;
    assert!(
        records
            .first()
            .is_some_and(|r| r.offset == 0 && r.what == "segment seq=0 first_index=0"),
        "{stdout}"
    );
    for w in records.windows(2) {
        if w[0].file == w[1].file {
            assert!(
                w[0].offset < w[1].offset,
                "offsets not increasing:\n{stdout}"
            );
        }
    }
    let mut last_index = 0;
    for i in 1..=8 {
        let needle = format!(" put key=\"/k{i}\" value_bytes=2");
        let lines: Vec<_> = records
            .iter()
            .filter(|r| r.what.ends_with(&needle))
            .collect();
        assert_eq!(lines.len(), 1, "/k{i} lines: {lines:?}\n{stdout}");
        let words: Vec<&str> = lines[0].what.split(' ').collect();
        assert_eq!(words[0], "entry", "{:?}", lines[0]);
        assert!(words[1].starts_with("term="), "{:?}", lines[0]);
        let index: u64 = words[2]
            .strip_prefix("index=")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no index in {:?}", lines[0]));
        assert!(index > last_index, "/k{i} at index {index}:\n{stdout}");
        last_index = index;
    }
    let snapshot_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("snapshot term="))
        .collect();
    assert!(!snapshot_lines.is_empty(), "no snapshot line:\n{stdout}");
    // The newest is on disk; older markers may name files `--max-snapshots` (1) deleted.
    let (newest, older) = snapshot_lines.split_last().expect("not empty");
    assert!(newest.ends_with(" present"), "{newest}\n{stdout}");
    for l in older {
        assert!(l.ends_with(" present") || l.ends_with(" missing"), "{l}");
    }
    let summary = last_line(&stdout);
    assert!(summary.starts_with("summary: hardstate term="), "{stdout}");
    let commit: u64 = summary
        .split_once("commit=")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no commit in {summary}"));
    assert!(
        commit >= last_index,
        "commit {commit} < {last_index}: {summary}"
    );

    // Without the snapshot files the markers are reported as missing.
    for f in files_ending_with(&cluster.node(1).snap_dir(), ".snap") {
        fs::remove_file(cluster.node(1).snap_dir().join(f)).expect("remove a snapshot");
    }
    let (_, stdout) = dump_ok(cluster.node(1)).await;
    let missing = stdout
        .lines()
        .filter(|l| l.starts_with("snapshot term=") && l.ends_with(" missing"))
        .count();
    assert_eq!(missing, snapshot_lines.len(), "{stdout}");
}

/// Issue 13 item 2: with a snapshot every few writes, a purge queued after one snapshot's marker
/// used to delete the next snapshot's `.snap.tmp` while it was being written (or fail on it
/// with NotFound), and the node exited with `snap: ...snap: No such file or directory`. Under 64
/// concurrent PUT clients on the leader of 3 nodes for a few seconds, no node may exit, every
/// node keeps taking snapshots, and afterwards each still serves acknowledged writes.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_purge_never_stops_a_node_under_load() {
    const LOAD: Duration = Duration::from_secs(6);
    let mut rng = Rng::from_env("snapshot_purge_never_stops_a_node_under_load");
    let mut cluster = Cluster::start_with(
        3,
        &["--snapshot-count", "4", "--snapshot-catchup-entries", "2"],
    );
    let leader = cluster.wait_leader().await;
    let logs_from: Vec<usize> = (1..=3).map(|id| cluster.node(id).log_len()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(
        vec![cluster.node(leader).client_port],
        "purge".into(),
        64,
        stop.clone(),
    );

    // Polls for an exit while the load runs; the load's length is the test's exposure, not a
    // wait for some condition.
    let deadline = Instant::now() + LOAD;
    let mut died = None;
    while died.is_none() && Instant::now() < deadline {
        for id in 1..=3 {
            if let Some(status) = cluster.node_mut(id).wait_exit(Duration::ZERO).await {
                died = Some((id, status));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let acked = collect_load(load).await;
    if let Some((id, status)) = died {
        panic!(
            "node {id} exited ({status}) under load with frequent snapshots; its log ends:\n{}",
            cluster
                .node(id)
                .log()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        acked.len() >= 200,
        "the load barely ran ({} writes acknowledged)",
        acked.len()
    );
    for id in 1..=3 {
        let taken = cluster
            .node(id)
            .log_since(logs_from[id as usize - 1])
            .matches("snapshot taken")
            .count();
        assert!(
            taken >= 10,
            "node {id} took only {taken} snapshots: the race was hardly exercised"
        );
    }
    let some = sample(&mut rng, &acked, 100);
    for id in 1..=3 {
        assert_serves_all(
            cluster.node(id).client_port,
            &some,
            &format!("node {id} after the load"),
        )
        .await;
    }
}
