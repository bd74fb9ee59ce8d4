#!/usr/bin/env python3
"""Issue 15's targets table from scripts/bench.sh's raw TAG lines: medians (min..max), ours/peer, target met."""
import re
import statistics
import sys
from collections import defaultdict

SYSTEMS = ("rs", "etcd", "raft")
NAMES = {"rs": "raftexample-rs", "etcd": "etcd 3.4", "raft": "Go raftexample"}
PEER = {"etcd": "etcd", "raft": "Go"}


def load(path):
    runs = defaultdict(list)  # (system, case, kind, conns) -> [fields]
    for line in open(path):
        if line.startswith("TAG "):
            kv = dict(re.findall(r"(\w+)=(\S+)", line))
            runs[(kv["system"], kv["case"], kv["kind"], kv.get("conns", ""))].append(kv)
    return runs


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# metric specs: (case, kind, conns, field); field is a run's key or one of the derived ones below
def value(run, field):
    if field == "committed":  # Go raftexample answers before commit: load.sh measures what committed
        return num(run.get("committed_rps", run.get("rps")))
    if field == "hwm_max_mib":
        v = [num(x) for x in run.get("hwm_kb", "").split(",")]
        return max(v) / 1024 if v and None not in v else None
    if field == "join_rss_mib":  # a node that never caught up (or died) has no meaningful peak
        if num(run.get("join_caught_up_s")) is None:
            return run.get("join_caught_up_s")
        return num(run.get("join_rss_kb")) / 1024
    if field == "datadir_max_mb":
        v = [num(x) for x in run.get("datadir_kb", "").split(",")]
        return max(v) / 1000 if v and None not in v else None
    if field == "fill_rate":
        k, s = num(run.get("keys")), num(run.get("fill_s"))
        return k / s if k and s else None
    v = run.get(field)
    return num(v) if num(v) is not None else v


def stats(runs, system, spec):
    """-> (median or None, text)"""
    case, kind, conns, field = spec
    rs = runs.get((system, case, kind, conns), [])
    if not rs:
        return None, "not run"
    if rs[0].get("skipped"):
        return None, f"skipped ({rs[0]['skipped']})"
    vals = [value(r, field) for r in rs]
    nums = sorted(v for v in vals if isinstance(v, float))
    other = sorted({str(v) for v in vals if not isinstance(v, float)})
    if not nums:
        return None, ", ".join(other)
    m = statistics.median(nums)
    text = fmt(m, field)
    if len(nums) > 1:
        text += f" ({fmt(nums[0], field)}..{fmt(nums[-1], field)})"
    if other:
        text += f" +{len(vals) - len(nums)}x {','.join(other)}"
    return m, text


def fmt(x, field):
    if field.endswith("_s"):
        return f"{x:.3f}" if x < 10 else f"{x:.1f}"
    if field.endswith("_ms"):
        return f"{x:.2f}"
    if field.endswith(("_mib", "_mb")):
        return f"{x:.0f}" if x >= 10 else f"{x:.1f}"
    return f"{x:,.0f}"


def put(c, field="committed"):
    return ("put", "put_leader", c, field)


def rec(case, field):
    return (case, "recovery", "", field)


# row: (label, {system: spec}, targets, target text); a target (sys, op, factor, row id, peer sys) compares
# this row's value of sys with factor x (row id's value of peer sys); row id None = this row; peer None = absolute
def rows():
    r = [
        ("put64", "durable PUT, 64 conns to the leader, committed/s", {s: put("64") for s in SYSTEMS},
         [("rs", ">=", 3, None, "raft"), ("rs", ">=", 6, None, "etcd")], ">= 3x Go, >= 6x etcd"),
        ("put64p99", "durable PUT, 64 conns to the leader, p99 ms", {s: put("64", "p99_ms") for s in SYSTEMS},
         [("rs", "<=", 10, None, None)], "<= 10 ms"),
        ("spread", "durable PUT spread over 3 nodes, 63 conns, committed/s (Go column: its rate to the leader, "
         "c=64; its spread run loses acknowledged writes)",
         {"rs": ("put", "put_spread", "63", "committed"), "etcd": ("put", "put_spread", "63", "committed"),
          "raft": put("64")}, [("rs", ">=", 2.5, None, "raft")], ">= 2.5x Go"),
        ("spreadp99", "durable PUT spread, 63 conns, p99 ms",
         {s: ("put", "put_spread", "63", "p99_ms") for s in ("rs", "etcd")}, [], ""),
        ("getlin", "linearizable GET, 64 conns, leader, req/s (Go: stale local GET)",
         {s: ("get", "get_leader", "64", "rps") for s in SYSTEMS},
         [("rs", ">=", 1.0, None, "raft"), ("rs", ">=", 7, None, "etcd")], ">= 1.0x Go's stale GET, >= 7x etcd"),
        ("getlinp99", "linearizable GET, 64 conns, leader, p99 ms",
         {s: ("get", "get_leader", "64", "p99_ms") for s in SYSTEMS}, [], ""),
        ("fol", "linearizable GET, 64 conns over the 2 followers, req/s (Go: stale local GET)",
         {s: ("follower", "get_followers", "64", "rps") for s in SYSTEMS},
         [("rs", ">=", 0.9, "folL", "rs")], ">= 0.9x our leader's rate (next row)"),
        ("folL", "  the same, 64 conns on that cluster's leader, req/s",
         {s: ("follower", "get_leader", "64", "rps") for s in SYSTEMS}, [], ""),
        ("folp99", "linearizable GET over the 2 followers, p99 ms",
         {s: ("follower", "get_followers", "64", "p99_ms") for s in SYSTEMS}, [("rs", "<=", 5, None, None)],
         "<= 5 ms"),
        ("ser", "serializable GET, 64 conns, leader, req/s (Go: its local GET)",
         {"rs": ("get", "get_leader_serializable", "64", "rps"),
          "etcd": ("get", "get_leader_serializable", "64", "rps"), "raft": ("get", "get_leader", "64", "rps")},
         [("rs", ">=", 1.3, None, "raft")], ">= 1.3x Go"),
        ("put1", "PUT, 1 conn, p50 ms (Go answers before commit)", {s: put("1", "p50_ms") for s in SYSTEMS},
         [("rs", "<=", 1 / 3, None, "etcd")], ">= 3x faster than etcd"),
        ("rss", "peak RSS per node (largest), PUT 64 conns to the leader, MiB",
         {s: put("64", "hwm_max_mib") for s in SYSTEMS}, [("rs", "<=", 1 / 5, None, "raft")], "<= 1/5 of Go"),
    ]
    scales = [
        ("small", {"restart": 5, "join": 2, "datadir": 1 / 2.5}),
        ("scale1.5m", {"restart": 10, "join": 5, "jrss": 1 / 3, "datadir": 1 / 2}),
        ("scale16k", {"fill": 3, "restart": 3, "join": 3, "jrss": 1 / 2, "datadir": 1 / 2}),
    ]
    for case, t in scales:
        def row(key, label, field, op, text_of):
            f = t.get(key)
            tg = [("rs", op, f if op == ">=" or key in ("jrss", "datadir") else 1 / f, None, "etcd")] if f else []
            return (f"{case}.{key}", f"@{case}: {label}", {s: rec(case, field) for s in SYSTEMS}, tg,
                    text_of(f) if f else "")
        r += [
            row("fill", "fill, keys/s", "fill_rate", ">=", lambda f: f">= {f:g}x etcd's rate"),
            row("restart", "SIGKILLed follower restarted, s to serve the last key", "restart_caught_up_s", "<=",
                lambda f: f">= {f:g}x faster than etcd"),
            row("join", "4th member joined, s to serve the last key", "join_caught_up_s", "<=",
                lambda f: f">= {f:g}x faster than etcd"),
            row("jrss", "peak RSS of the joined node, MiB", "join_rss_mib", "<=",
                lambda f: f"<= 1/{1 / f:g} of etcd"),
            row("datadir", "data dir per node (largest), MB", "datadir_max_mb", "<=",
                lambda f: f"<= 1/{1 / f:g} of etcd"),
        ]
    return r


def main():
    runs = load(sys.argv[1])
    scale_label = {}
    for (s, case, kind, _), rs in runs.items():
        if kind == "recovery":
            vs = int(rs[0]["vsize"])
            size = f"{vs // 1024} KiB" if vs >= 1024 else f"{vs} B"
            scale_label[case] = f"[{case}] {int(rs[0]['nkeys']):,} keys of {size}"
    med, text, table = {}, {}, []
    for rid, label, specs, targets, ttext in rows():
        for s, spec in specs.items():
            med[(rid, s)], text[(rid, s)] = stats(runs, s, spec)
        if all(text.get((rid, s), "not run") == "not run" for s in SYSTEMS):
            continue
        if label.startswith("@"):
            case, rest = label[1:].split(": ", 1)
            label = f"{scale_label.get(case, case)}: {rest}"
        table.append((rid, label, targets, ttext))
    shown = [s for s in SYSTEMS if any(k[0] == s for k in runs)]  # a system never run gets no column
    peers = [s for s in shown if s != "rs"]
    print("| row | " + " | ".join(NAMES[s] for s in shown) + "".join(f" | rs/{PEER[p]}" for p in peers)
          + " | target | met |")
    print("|---" * (len(shown) + len(peers) + 3) + "|")
    for rid, label, targets, ttext in table:
        cells = [text.get((rid, s), "not run") for s in shown]
        ratios = []
        for peer in peers:
            a, b = med.get((rid, "rs")), med.get((rid, peer))
            ratios.append(f"{a / b:.2f}x" if a is not None and b else "-")
        print(f"| {label} | " + " | ".join(cells) + "".join(f" | {x}" for x in ratios)
              + f" | {ttext} | {met(med, rid, targets)} |")


def met(med, rid, targets):
    if not targets:
        return ""
    missing, ok = [], True
    for s, op, factor, other, peer in targets:
        a = med.get((rid, s))
        b = 1.0 if peer is None else med.get((other or rid, peer))
        if a is None and s == "rs":
            return "no (ours has no number)"
        if a is None or b is None:
            missing.append(NAMES.get(peer, peer))
            continue
        ok &= a >= factor * b if op == ">=" else a <= factor * b
    if not ok:
        return "no"
    return f"n/a ({', '.join(missing)} not measured)" if missing else "yes"


if __name__ == "__main__":
    main()
