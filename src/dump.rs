//! `raftexample wal-dump`: prints, read-only, what a node would recover from its data dir (the
//! snapshot markers and whether their files exist, every WAL record with its file and offset,
//! the final HardState) and reports corruption with its offset, like etcd's dump-logs tool.

use std::io::Write;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfChange, EntryType, HardState};

use crate::error::{Error, Result};
use crate::kvstore::decode_puts;
use crate::wal::{self, Record, WalSnapshot};

/// Writes one line per record to `out`; an error (corruption) is returned for the caller to
/// print as the last line.
pub fn wal_dump(data_dir: &Path, id: u64, out: &mut impl Write) -> Result<()> {
    let wal_dir = data_dir.join(format!("raftexample-{id}"));
    let snap_dir = data_dir.join(format!("raftexample-{id}-snap"));
    let io = |e| Error::Io {
        context: "cannot write the dump".into(),
        source: e,
    };
    if !wal::Wal::exists(&Default::default(), &wal_dir) {
        return Err(Error::Config(format!("no WAL in {}", wal_dir.display())));
    }
    let recs = wal::read_dir_records(&Default::default(), &wal_dir)?;
    let seen = write_records(&recs.records, out)?;
    let Seen {
        hs,
        markers,
        entries,
        first,
        last,
    } = seen;
    if let Some((path, offset)) = &recs.unused {
        writeln!(
            out,
            "unused zeros in {} from offset {offset} (written ahead of the records; startup trims them)",
            path.display()
        )
        .map_err(io)?;
    }
    if let Some((path, offset)) = &recs.torn_tail {
        writeln!(
            out,
            "torn tail in {} at offset {offset}: startup truncates it",
            path.display()
        )
        .map_err(io)?;
    }
    for m in &markers {
        let name = format!("{:016x}-{:016x}.snap", m.term, m.index);
        let present = snap_dir.join(&name).exists();
        writeln!(
            out,
            "snapshot term={} index={} file={name} {}",
            m.term,
            m.index,
            if present { "present" } else { "missing" }
        )
        .map_err(io)?;
    }
    let hs = hs.unwrap_or_default();
    writeln!(
        out,
        "summary: hardstate term={} vote={} commit={}, {entries} entry records ({}..={last}), newest snapshot marker index={}",
        hs.term,
        hs.vote,
        hs.commit,
        first.unwrap_or(0),
        markers.last().map_or(0, |m| m.index)
    )
    .map_err(io)
}

/// What [`write_records`] saw, for the summary.
#[derive(Default)]
struct Seen {
    hs: Option<HardState>,
    markers: Vec<WalSnapshot>,
    entries: u64,
    first: Option<u64>,
    last: u64,
}

/// One line per record, in file and offset order.
fn write_records(records: &[wal::DirRecord], out: &mut impl Write) -> Result<Seen> {
    let io = |e| Error::Io {
        context: "cannot write the dump".into(),
        source: e,
    };
    let mut hs = None;
    let mut markers = Vec::new();
    let mut entries = 0u64;
    let (mut first, mut last) = (None, 0);
    for r in records {
        let at = format!("{}@{}", file_name(&r.path), r.offset);
        let line = match &r.record {
            Record::Header(h) => {
                format!("{at} segment seq={} first_index={}", h.seq, h.first_index)
            }
            Record::HardState(h) => {
                hs = Some(h.clone());
                format!(
                    "{at} hardstate term={} vote={} commit={}",
                    h.term, h.vote, h.commit
                )
            }
            Record::Snapshot(s) => {
                markers.push(*s);
                format!("{at} snapshot-marker term={} index={}", s.term, s.index)
            }
            Record::Entry(e) => {
                entries += 1;
                first.get_or_insert(e.index);
                last = e.index;
                format!(
                    "{at} entry term={} index={} {}",
                    e.term,
                    e.index,
                    describe(e)
                )
            }
        };
        writeln!(out, "{line}").map_err(io)?;
    }
    Ok(Seen {
        hs,
        markers,
        entries,
        first,
        last,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn describe(e: &raft::prelude::Entry) -> String {
    match e.get_entry_type() {
        EntryType::EntryNormal if e.data.is_empty() => "no-op".into(),
        EntryType::EntryNormal => match decode_puts(&e.data) {
            Ok(puts) => {
                let each = puts.iter().map(|p| {
                    format!(
                        "put key={:?} value_bytes={}",
                        String::from_utf8_lossy(p.key),
                        p.value.len()
                    )
                });
                match puts.len() {
                    1 => each.collect(),
                    n => format!("puts n={n}: {}", each.collect::<Vec<_>>().join("; ")),
                }
            }
            Err(_) => format!("normal data_bytes={}", e.data.len()),
        },
        EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&e.data) {
            Ok(cc) => format!(
                "conf-change {:?} node={} context={:?}",
                cc.get_change_type(),
                cc.node_id,
                String::from_utf8_lossy(&cc.context)
            ),
            Err(_) => "conf-change (undecodable)".into(),
        },
        EntryType::EntryConfChangeV2 => "conf-change-v2".into(),
    }
}
