//! Deterministic simulation (issue 14): 3 to 5 members of the real code (raft-rs `RawNode`,
//! the node core, the WAL with its replay, torn-tail repair and purge, the snapshot files, the
//! kvstore with its proposal and read logic) in one thread, with time, network and disk
//! simulated and every choice drawn from one seed: client PUTs and linearizable GETs on any
//! member; messages dropped, delayed, duplicated (all but forwarded proposals: see
//! `sim/net.rs`), reordered, one-way and full partitions; SIGKILLs, power cuts of one member
//! or of all and power failing in the middle of a sync (the disk keeps what was synced and any
//! subset of the 4 KiB pages written since), EIO and ENOSPC (the member must fail-stop, and
//! nothing else may stop it), bit flips in synced files (the member must refuse to start, or
//! start with the right data); snapshots every few writes, written while the WAL writer runs,
//! compaction, purge, members added (as learners the leader promotes once caught up) and
//! removed.
//!
//! Checked: at most one leader per term and equal maps at equal applied index (every step);
//! every member restarts unless its data was damaged; after healing, a PUT commits within a
//! bounded simulated time; the whole history (with a final GET of every key on every member)
//! is linearizable, so no acknowledged PUT was lost.
//!
//! `SIM_SEEDS=N` runs N seeds (default 300), `SIM_SEED=S` replays one. The last line is
//! `simulation: <N> seeds, <M> steps, digest <hex>`, the digest a hash of every seed's trace: the
//! same seeds give the same digest on every run. `SIM_LOG=1` prints the nodes' logs.

#[path = "common/linearizability.rs"]
mod checker;
#[path = "sim/net.rs"]
mod net;
#[path = "sim/node.rs"]
mod node;
#[path = "sim/world.rs"]
mod world;

use std::panic::AssertUnwindSafe;

use net::Weather;
use world::{World, KEYS, STEP_MS};

/// Simulated time of the faulty part of a seed.
const RUN_MS: u64 = 20_000;
/// After healing, a PUT must commit within this.
const HEAL_MS: u64 = 30_000;

fn logger() -> slog::Logger {
    use slog::Drain;
    if std::env::var_os("SIM_LOG").is_some() {
        let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
        let drain = slog_term::FullFormat::new(decorator).build().fuse();
        slog::Logger::root(drain, slog::o!())
    } else {
        slog::Logger::root(slog::Discard, slog::o!())
    }
}

/// Draws this step's fault or client action.
fn act(w: &mut World) -> Result<(), String> {
    let roll = w.rng.below(10_000);
    let running = w.running();
    let down = w.down();
    let ids = w.ids();
    match roll {
        0..=599 => {
            if let Some(id) = w.rng.pick(&running) {
                let key = KEYS[w.rng.below(KEYS.len() as u64) as usize];
                w.put(id, key);
            }
        }
        600..=999 => {
            if let Some(id) = w.rng.pick(&running) {
                let key = KEYS[w.rng.below(KEYS.len() as u64) as usize];
                w.get(id, key);
            }
        }
        1000..=1014 => {
            if let Some(id) = w.rng.pick(&running) {
                w.members.get_mut(&id).expect("member").kill();
                w.event(format!("kill {id}"));
            }
        }
        1015..=1024 => {
            if let Some(id) = w.rng.pick(&running) {
                let seed = w.rng.next();
                w.members.get_mut(&id).expect("member").power_cut(seed);
                w.event(format!("power cut {id}"));
            }
        }
        1025..=1026 => {
            for id in ids {
                let seed = w.rng.next();
                w.members.get_mut(&id).expect("member").power_cut(seed);
            }
            w.event("power cut of the whole cluster".into());
        }
        1027..=1099 => {
            if let Some(id) = w.rng.pick(&down) {
                w.start(id)?;
            }
        }
        1100..=1119 => {
            if let Some(id) = w.rng.pick(&ids) {
                let one_way = w.rng.chance(500);
                w.net.isolate(id, &ids, one_way);
                w.event(format!("partition {id} one_way={one_way}"));
            }
        }
        1120..=1149 => {
            w.net.heal();
            w.event("heal the network".into());
        }
        1150..=1164 => {
            w.net.weather = Weather {
                drop_per_mille: w.rng.below(200),
                dup_per_mille: w.rng.below(100),
                max_delay_ms: 1 + w.rng.below(300),
            };
            let weather = w.net.weather;
            w.event(format!("network {weather:?}"));
        }
        1165..=1169 => disk_fault(w),
        1170..=1171 => flip_bit(w),
        1177..=1181 => {
            // The power fails in the middle of one of the next syncs: a group of writes torn
            // part-way, what the sync was to make durable left to chance.
            if let Some(id) = w.rng.pick(&running) {
                let n = w.rng.below(4);
                let m = w.members.get_mut(&id).expect("member");
                m.disk.fail_at_sync(n);
                m.faulted = true;
                w.event(format!("power of {id} fails during its sync {n} from now"));
            }
        }
        1182..=1191 => {
            // The power fails just after a group of writes: between two groups is where a
            // write the next group was to make safe (a HardState behind a purge) is missing.
            if let Some(id) = w.rng.pick(&running) {
                w.members.get_mut(&id).expect("member").cut_after_write = true;
                w.event(format!(
                    "power of {id} fails after its next group of writes"
                ));
            }
        }
        1172..=1176 => {
            let add = w.rng.chance(600);
            w.change_membership(add);
        }
        _ => {}
    }
    Ok(())
}

/// The next few writes or syncs of a running member fail with EIO or ENOSPC.
fn disk_fault(w: &mut World) {
    let Some(id) = w.rng.pick(&w.running()) else {
        return;
    };
    let after = w.rng.below(20);
    let fault = if w.rng.chance(500) {
        raftexample::vfs::sim::Fault::Eio
    } else {
        raftexample::vfs::sim::Fault::NoSpace
    };
    let m = w.members.get_mut(&id).expect("member");
    m.disk.fail_op(after, fault);
    m.faulted = true;
    w.event(format!("disk of {id}: {fault:?} after {after} ops"));
}

/// Flips a bit in a synced file of a member that is down; at most one member per seed, so the
/// others keep a quorum of intact copies.
fn flip_bit(w: &mut World) {
    if w.members.values().any(|m| m.flipped) {
        return;
    }
    let Some(id) = w.rng.pick(&w.down()) else {
        return;
    };
    let pick = w.rng.next();
    let m = w.members.get_mut(&id).expect("member");
    let files = m.disk.synced_files(&node::root());
    let Some((path, len)) =
        (!files.is_empty()).then(|| files[(pick % files.len() as u64) as usize].clone())
    else {
        return;
    };
    let offset = (pick >> 20) % len.max(1);
    if m.disk.flip_bit(&path, offset).is_ok() {
        m.flipped = true;
        w.event(format!("flip a bit of {} at {offset}", path.display()));
    }
}

/// Heals everything, restarts every member that can be, and requires a PUT to commit. Returns
/// false if none could because a member refused its damaged data and the others are no quorum
/// without it (a real loss of quorum: two faults, the damage and one member down or removed).
fn heal(w: &mut World) -> Result<bool, String> {
    w.net.heal();
    w.net.weather = Weather {
        max_delay_ms: 5,
        ..Weather::default()
    };
    for id in w.ids() {
        w.members[&id]
            .disk
            .fail_op(u64::MAX, raftexample::vfs::sim::Fault::Eio);
    }
    w.event("heal everything".into());
    for id in w.down() {
        w.start(id)?;
    }
    let start = w.now;
    let mut put_at = None;
    loop {
        w.follow_membership()?;
        w.step()?;
        for id in w.down() {
            w.start(id)?;
        }
        if put_at.is_none() {
            if let Some(leader) = w.leader() {
                w.put(leader, "/heal");
                put_at = Some(w.history.len() - 1);
            }
        }
        if put_at.is_some_and(|op| w.history[op].ret.is_some()) {
            return Ok(true);
        }
        if put_at.is_some_and(|op| !w.put_pending(op)) {
            // Refused, or its member stopped (a leader change): try again.
            put_at = None;
        }
        if w.now > start + HEAL_MS {
            if w.members.values().any(|m| m.flipped && m.down_for_good) {
                w.event("no quorum without the member with damaged data".into());
                return Ok(false);
            }
            return Err(format!("no PUT committed within {HEAL_MS} ms of healing"));
        }
    }
}

/// A final GET of every key on every running member, once all have applied the same index.
fn final_reads(w: &mut World) -> Result<(), String> {
    let until = w.now + HEAL_MS;
    for id in w.running() {
        for key in KEYS {
            w.get(id, key);
        }
    }
    while w.now < until {
        w.follow_membership()?;
        w.step()?;
        let done = w.history.iter().all(|op| {
            op.ret.is_some() || op.client == usize::MAX || matches!(op.kind, checker::Kind::Put(_))
        });
        if done {
            return Ok(());
        }
    }
    Err("the final reads were not answered".into())
}

fn drive(w: &mut World) -> Result<(), String> {
    for id in w.ids() {
        w.start(id)?;
    }
    while w.now < RUN_MS {
        act(w)?;
        w.follow_membership()?;
        w.step()?;
    }
    if heal(w)? {
        final_reads(w)?;
    } else {
        w.stuck = true;
    }
    let history: Vec<checker::Op> = w
        .history
        .iter()
        .filter(|op| op.client != usize::MAX)
        .cloned()
        .collect();
    // A seed's history is small, but a whole-cluster power cut can leave many PUTs of unknown
    // outcome that GETs saw, which the search must place; a bigger budget than the default's
    // decides those (seed 919 needed more than 20 million steps).
    checker::check_within(&history, 400_000_000).map(|_| ())
}

/// Runs one seed; its world (for the steps and the trace) or why it failed.
fn run_seed(seed: u64) -> Result<World, Box<(World, String)>> {
    let mut w = World::new(seed, 3 + seed % 3, logger());
    if std::env::var_os("SIM_SEED").is_some() {
        // Replaying one seed: its whole story.
        w.keep_events = usize::MAX;
    }
    match std::panic::catch_unwind(AssertUnwindSafe(|| drive(&mut w))) {
        Ok(Ok(())) => Ok(w),
        Ok(Err(e)) => Err(Box::new((w, e))),
        Err(p) => {
            let e = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Box::new((w, format!("panic: {e}"))))
        }
    }
}

/// Seeds that found a defect, run on top of the default range. Seeds replay only the
/// simulator they were found with; the defect's own unit test pins it for good.
const REGRESSIONS: [u64; 1] = [
    // A member that had installed the leader's snapshot, whose newest snapshot file was then
    // damaged: raft-rs panicked at startup (commit beyond the log) instead of a refusal.
    885,
];

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut seeds: Vec<u64> = (1..=n).collect();
    seeds.extend(REGRESSIONS.iter().filter(|&&s| s > n));
    seeds
}

#[test]
fn simulation() {
    let seeds = seeds();
    let (mut steps, mut digest) = (0u64, 0xcbf2_9ce4_8422_2325u64);
    let (mut acked, mut reads, mut restarts, mut stuck) = (0usize, 0usize, 0u64, 0usize);
    let (mut joined, mut promoted) = (0usize, 0usize);
    for &seed in &seeds {
        let w = match run_seed(seed) {
            Ok(w) => w,
            Err(failed) => fail(seed, &failed.1, &failed.0),
        };
        if std::env::var_os("SIM_SEED").is_some() {
            println!(
                "{}",
                w.last_events.iter().cloned().collect::<Vec<_>>().join("\n")
            );
        }
        steps += w.steps;
        stuck += usize::from(w.stuck);
        acked += w
            .history
            .iter()
            .filter(|o| o.ret.is_some() && matches!(o.kind, checker::Kind::Put(_)))
            .count();
        reads += w
            .history
            .iter()
            .filter(|o| o.ret.is_some() && matches!(o.kind, checker::Kind::Get(Some(_))))
            .count();
        restarts += w
            .members
            .values()
            .map(|m| m.boots.saturating_sub(1))
            .sum::<u64>();
        joined += w.members.values().filter(|m| m.join).count();
        promoted += w.promoted.len();
        digest = (digest ^ w.trace_hash).wrapping_mul(0x0100_0000_01b3);
    }
    // Not vacuous: the seeds wrote, read back values, restarted members and promoted learners
    // (one seed alone may do none of that).
    let many = seeds.len() >= 20;
    assert!(
        acked > 0 && reads > 0 && restarts > 0 && (promoted > 0 || !many),
        "{acked} {reads} {restarts} {promoted}"
    );
    println!(
        "acknowledged PUTs {acked}, GETs of a value {reads}, restarts {restarts}, learners \
         added {joined}, promoted {promoted}; seeds left without a quorum by a member's damaged \
         data: {stuck}"
    );
    println!(
        "simulation: {} seeds, {steps} steps, digest {digest:016x}",
        seeds.len()
    );
}

fn fail(seed: u64, e: &str, w: &World) -> ! {
    let events = w.last_events.iter().cloned().collect::<Vec<_>>().join("\n");
    panic!(
        "simulation seed {seed} failed: {e}\nreplay: SIM_SEED={seed} cargo test --test simulation \
         -- --nocapture\nlast events:\n{events}\n(each step is {STEP_MS} ms)\n{}",
        w.describe()
    );
}
