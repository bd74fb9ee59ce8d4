#!/usr/bin/env bash
# Benchmark a 3-node release cluster of raftexample-rs on 127.0.0.1 (issue 15's targets table).
#
#   scripts/bench.sh            # this daemon alone
#   scripts/bench.sh compare    # side by side with etcd 3.4 and Go raftexample (etcd 3.4's), interleaved per case
#
# The load and recovery drivers are the project's shared scripts (SHARED_BENCH, default ../shared/bench; its
# README has the one-time set-up): load.sh (wrk), raftexample_go.sh / etcd_cluster.sh (clusters), recovery.sh
# (fill, SIGKILLed follower restart, 4th member join, RSS, data dir). Cases (CASES, run in this order per rep,
# each case on every system before the next case, so the machine's noise hits all systems alike):
#   put        durable PUT, 64 conns to the leader / 63 conns spread over the 3 nodes / 1 conn; fresh cluster each
#              (Go raftexample's spread run is skipped: its followers drop forwarded proposals, see shared README)
#   get        GET, 64 conns to the leader: linearizable, then serializable (Go: its only, local, GET)
#   follower   linearizable GET, 64 conns over the 2 followers, then the same on that cluster's leader
#              (etcd: linearizable range on the followers; Go: its stale local GET on the followers)
#   small      recovery.sh with KEYS_150K (150000) keys of 64 B
#   scale1.5m  recovery.sh with KEYS_1_5M (1500000) keys of 64 B (Go skipped unless GO_1_5M=1: it never purges
#              a snapshot, ~150 JSON snapshots of up to ~100 MB per node would fill the disk)
#   scale16k   recovery.sh with KEYS_16K (20000) keys of 16 KiB
#   put1, put64, spread, 150k (= small) select one PUT run or the small recovery alone.
# Env: CASES="put get follower small scale16k scale1.5m" REPS=3 DUR=10s SYSTEMS (default rs; compare: "rs etcd raft")
#      KEYS (overrides the three KEYS_*: a quick check) GET_KEYS=1000 FILL_MAX=3600s WAIT_S=60 (per recovery wait; Go: GO_WAIT_S=30)
#      PORT_OFFSET=0 ETCD_CLIENT_BASE=23790 ETCD_PEER_BASE=23800 (passed to every shared script)
#      RAFTEXAMPLE_RS_BIN (default: cargo build --release, target/release/raftexample) RAFTEXAMPLE_GO_BIN
#      OUT (directory for raw outputs, default /tmp/raftexample-bench/<date>) KEEP_DATA=1 (keep recovery data dirs)
# Quick check of ours only:  CASES="put get follower" REPS=1 DUR=3s scripts/bench.sh
# Output: a markdown table of medians (min..max), ratios ours/peer and target met yes/no; raw TAG lines in
# OUT/raw.txt, every step's output in OUT/logs, cluster data and node logs in OUT/data.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-ours}
case $MODE in
  ours) DEF_SYSTEMS=rs ;;
  compare) DEF_SYSTEMS="rs etcd raft" ;;
  -h | --help | help) sed -n '2,/^set -E/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: scripts/bench.sh [compare]   (--help for the environment)" >&2; exit 2 ;;
esac
SYSTEMS=${SYSTEMS:-$DEF_SYSTEMS}
CASES=${CASES:-put get follower small scale16k scale1.5m}
REPS=${REPS:-3}; DUR=${DUR:-10s}; GET_KEYS=${GET_KEYS:-1000}
KEYS_150K=${KEYS:-${KEYS_150K:-150000}}; KEYS_1_5M=${KEYS:-${KEYS_1_5M:-1500000}}; KEYS_16K=${KEYS:-${KEYS_16K:-20000}}
FILL_MAX=${FILL_MAX:-3600s}; WAIT_S=${WAIT_S:-60}; GO_WAIT_S=${GO_WAIT_S:-30}
SHARED=$(cd "${SHARED_BENCH:-$ROOT/../shared/bench}" && pwd)
export PORT_OFFSET=${PORT_OFFSET:-0} ETCD_CLIENT_BASE=${ETCD_CLIENT_BASE:-23790} ETCD_PEER_BASE=${ETCD_PEER_BASE:-23800}
OUT=${OUT:-/tmp/raftexample-bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs" "$OUT/data"; OUT=$(cd "$OUT" && pwd)
RAW=$OUT/raw.txt; : >"$RAW"
STEP="set-up"; STEPLOG=""; CHILD=""; ACTIVE=(); REC_DIRS=()

# ---------- failure reporting and cleanup: every cluster this script (or recovery.sh) started is stopped ----------
on_err() { # only the main shell reports (command substitutions inherit the trap)
  [[ $BASHPID == "$$" ]] || return 0
  echo "bench.sh: FAILED in step: $STEP (line $1)${STEPLOG:+; its output: $STEPLOG}; all logs under $OUT" >&2; }
stop_pidfile() { # pidfile: TERM, then KILL after 5 s
  local pid; [[ -f $1 ]] || return 0
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}
descendants() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
cleanup() {
  local rc=$? e r
  trap - EXIT ERR INT TERM
  if [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null; then
    # the step's process tree (wrk, a recovering node, ...), taken before its parents exit and it is re-parented
    local tree; tree=$(descendants "$CHILD")
    kill -TERM "$CHILD" 2>/dev/null || true   # recovery.sh's own trap stops its cluster
    for _ in $(seq 1 100); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
    for e in $tree; do kill -TERM "$e" 2>/dev/null || true; done
  fi
  for e in "${ACTIVE[@]}"; do ctl "${e%% *}" stop "${e#* }" >/dev/null 2>&1 || true; done
  for e in "${REC_DIRS[@]}"; do
    for r in "${e#* }"/r*; do
      [[ -d $r ]] || continue
      stop_pidfile "$r/node4.pid"; ctl "${e%% *}" stop "$r" >/dev/null 2>&1 || true
    done
  done
  if ((rc != 0)); then
    echo "bench.sh: stopped (exit $rc) in step: $STEP; raw outputs so far: $RAW (table: python3 scripts/bench_table.py $RAW)" >&2
  fi
  exit "$rc"
}
trap 'on_err $LINENO' ERR
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------- systems ----------
if [[ " $SYSTEMS " == *" rs "* ]]; then
  if [[ -z ${RAFTEXAMPLE_RS_BIN:-} ]]; then
    STEP="cargo build --release"; cargo build --release --quiet
    RAFTEXAMPLE_RS_BIN=$ROOT/target/release/raftexample
  fi
  [[ -x $RAFTEXAMPLE_RS_BIN ]] || { echo "no binary $RAFTEXAMPLE_RS_BIN" >&2; exit 1; }
fi
export RAFTEXAMPLE_RS_BIN=${RAFTEXAMPLE_RS_BIN:-}
GO_BIN=${RAFTEXAMPLE_GO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/raftexample-go/raftexample}
if [[ " $SYSTEMS " == *" raft "* && ! -x $GO_BIN ]]; then
  echo "bench.sh: no Go raftexample at $GO_BIN (build it: $SHARED/raftexample_go.sh build); running without it" >&2
  SYSTEMS=$(tr ' ' '\n' <<<"$SYSTEMS" | grep -vx raft | tr '\n' ' ')
fi
for t in wrk curl python3 bc; do command -v "$t" >/dev/null || { echo "bench.sh: needs $t" >&2; exit 1; }; done

ctl() { # system action dir
  case $1 in
    raft) RAFTEXAMPLE_GO_BIN=$GO_BIN "$SHARED/raftexample_go.sh" "$2" "$3" ;;
    rs) RAFTEXAMPLE_GO_BIN=$RAFTEXAMPLE_RS_BIN "$SHARED/raftexample_go.sh" "$2" "$3" ;;
    etcd) "$SHARED/etcd_cluster.sh" "$2" "$3" ;;
  esac
}
api() { [[ $1 == etcd ]] && echo etcd || echo raft; }   # ours speaks raftexample's URL scheme
cport() { # system node -> host:port of its client API
  if [[ $1 == etcd ]]; then echo "127.0.0.1:$((ETCD_CLIENT_BASE + $2))"; else echo "127.0.0.1:$(($2 * 10000 + 2380 + PORT_OFFSET))"; fi
}
all_nodes() { echo "$(cport "$1" 1),$(cport "$1" 2),$(cport "$1" 3)"; }
hwm() { # system dir -> VmHWM kB of the 3 nodes, comma separated
  local r=() f i
  for i in 1 2 3; do
    if [[ $1 == etcd ]]; then f=$2/etcd$i.pid; else f=$2/raftexample$i.pid; fi
    r+=("$(awk '/VmHWM/{print $2}' "/proc/$(cat "$f")/status" 2>/dev/null || echo NA)")
  done
  (IFS=,; echo "${r[*]}")
}

# run_step NAME LOG CMD...: a child in the background, so a signal reaches cleanup at once
run_step() {
  local rc=0
  STEP=$1; STEPLOG=$2; shift 2
  "$@" >"$STEPLOG" 2>&1 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  if ((rc != 0)); then tail -5 "$STEPLOG" >&2; return "$rc"; fi
}

# retry TRIES CLEAN NAME LOG CMD...: run_step, again after CLEAN on failure. A client port above 32767 is in the
# kernel's ephemeral range: some other process's outgoing connection can hold it for a moment ("address in use")
retry() {
  local tries=$1 clean=$2 name=$3 log=$4 n rc; shift 4
  for n in $(seq 1 "$tries"); do
    rc=0; run_step "$name" "$log" "$@" || rc=$?
    ((rc == 0)) && return 0
    ((n < tries)) || return "$rc"
    mv "$log" "$log.try$n"; echo "bench.sh: $name failed (try $n, $log.try$n), again" >&2
    $clean; sleep 2
  done
}
fresh() { # system dir: a new 3-node cluster
  ACTIVE+=("$1 $2")
  FRESH_S=$1 FRESH_D=$2; fresh_clean
  retry 3 fresh_clean "start a $1 cluster in $2" "$OUT/logs/start.${2##*/}.log" ctl "$1" start "$2"
  sleep 1
}
fresh_clean() {
  ctl "$FRESH_S" stop "$FRESH_D" >/dev/null 2>&1 || true
  if [[ -d $FRESH_D ]]; then mkdir -p "$FRESH_D.failed"; cp "$FRESH_D"/*.log "$FRESH_D.failed/" 2>/dev/null || true; fi
  rm -rf "$FRESH_D"; mkdir -p "$FRESH_D"
}
leader_of() { STEP="find the leader of $1 in $2"; LEADER=$(ctl "$1" leader "$2"); }
finish() { # system dir: stop the cluster, drop its data (node logs stay)
  STEP="stop $1 in $2"; ctl "$1" stop "$2" >/dev/null
  [[ ${KEEP_DATA:-0} == 1 ]] || find "$2" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
}

load() { # system case kind op targets conns dir [VAR=value...]: one load.sh run -> a TAG line
  local s=$1 c=$2 k=$3 op=$4 t=$5 n=$6 d=$7 log res; shift 7
  log=$OUT/logs/$c.$k.c$n.$s.r$REP.log
  run_step "$k ($op, $n conns) on $s, rep $REP" "$log" \
    env KEYS="$GET_KEYS" VSIZE=64 "$@" "$SHARED/load.sh" "$(api "$s")" "$op" "$t" "$n" "$DUR"
  res=$(grep '^RESULT' "$log" | tail -1 | sed 's/^RESULT //')
  echo "TAG system=$s case=$c kind=$k rep=$REP $res hwm_kb=$(hwm "$s" "$d")" | tee -a "$RAW"
}

case_put() { # system put64|put1|spread
  local s=$1 c=$2 d=$OUT/data/$2.$1.r$REP
  [[ $s == raft && $c == spread ]] && return 0
  fresh "$s" "$d"
  case $c in
    put64) leader_of "$s" "$d"; load "$s" put put_leader put "$LEADER" 64 "$d" ;;
    put1) leader_of "$s" "$d"; load "$s" put put_leader put "$LEADER" 1 "$d" ;;
    spread) load "$s" put put_spread put "$(all_nodes "$s")" 63 "$d" ;;
  esac
  finish "$s" "$d"
}

case_get() { # system get|follower
  local s=$1 c=$2 d=$OUT/data/$2.$1.r$REP L F
  fresh "$s" "$d"
  leader_of "$s" "$d"; L=$LEADER
  run_step "preload $GET_KEYS keys on $s" "$OUT/logs/$c.preload.$s.r$REP.log" \
    env KEYS="$GET_KEYS" VSIZE=64 "$SHARED/load.sh" "$(api "$s")" preload "$(all_nodes "$s")"
  if [[ $c == get ]]; then
    load "$s" get get_leader get "$L" 64 "$d"
    [[ $s == raft ]] || load "$s" get get_leader_serializable get "$L" 64 "$d" SERIALIZABLE=1
  else
    F=$(tr ',' '\n' <<<"$(all_nodes "$s")" | grep -vx "$L" | paste -sd,)
    load "$s" follower get_followers get "$F" 64 "$d"
    load "$s" follower get_leader get "$L" 64 "$d"
  fi
  finish "$s" "$d"
}

case_recovery() { # system case keys vsize: one recovery.sh rep -> a TAG line
  local s=$1 c=$2 keys=$3 vsize=$4 d=$OUT/data/$2.$1.r$REP log line n rc
  if [[ $s == raft && $c == scale1.5m && ${GO_1_5M:-0} != 1 ]]; then
    echo "TAG system=$s case=$c kind=recovery rep=$REP nkeys=$keys vsize=$vsize skipped=disk" | tee -a "$RAW"
    return 0
  fi
  log=$OUT/logs/$c.recovery.$s.r$REP.log
  rm -rf "$d"; REC_DIRS+=("$s $d"); REC_D=$d
  # recovery.sh's node 4 listens on 42379/42380+PORT_OFFSET, in the ephemeral range: when a node's start failed
  # on "address already in use", the rep is run again (the kernel's next outgoing ports differ)
  for n in 1 2 3; do
    rc=0
    run_step "recovery.sh $s, $keys keys of $vsize B, rep $REP (data in $d)" "$log" \
      env REPS=1 KEYS="$keys" VSIZE="$vsize" CONNS=64 THREADS=2 FILL_MAX="$FILL_MAX" \
      WAIT_S="$([[ $s == raft ]] && echo "$GO_WAIT_S" || echo "$WAIT_S")" \
      RAFTEXAMPLE_GO_BIN="$GO_BIN" "$SHARED/recovery.sh" "$s" "$d" || rc=$?
    if ((rc == 0)) && ! grep -qsi 'address already in use' "$d"/r1/*.log; then break; fi
    ((n < 3)) || { ((rc != 0)) && return "$rc"; break; }
    mv "$log" "$log.try$n"
    echo "bench.sh: recovery.sh $s $c try $n failed (exit $rc or a port in use; $log.try$n), again" >&2
    rec_clean
  done
  line=$(grep '^RUN rep=1 ' "$log")
  line=${line%% fill=\[*}; line=${line#RUN rep=1 system=$s }
  echo "TAG system=$s case=$c kind=recovery rep=$REP nkeys=$keys vsize=$vsize $line" | tee -a "$RAW"
  [[ ${KEEP_DATA:-0} == 1 ]] || find "$d" -mindepth 2 \( -name 'raftexample-*' -o -name '*.etcd' \) -prune -exec rm -rf {} +
}

rec_clean() { # recovery.sh stopped its cluster; keep the logs of the failed try
  [[ -d $REC_D ]] || return 0
  find "$REC_D" -mindepth 2 \( -name 'raftexample-*' -o -name '*.etcd' \) -prune -exec rm -rf {} +
  mv "$REC_D" "$REC_D.failed.$(date +%s)"
}

run_case() { # case system
  case $1 in
    put64 | put1 | spread) case_put "$2" "$1" ;;
    get | follower) case_get "$2" "$1" ;;
    small) case_recovery "$2" small "$KEYS_150K" 64 ;;
    scale1.5m) case_recovery "$2" scale1.5m "$KEYS_1_5M" 64 ;;
    scale16k) case_recovery "$2" scale16k "$KEYS_16K" 16384 ;;
  esac
}

EXPANDED=()
for c in $CASES; do
  case $c in
    put) EXPANDED+=(put64 spread put1) ;;
    150k) EXPANDED+=(small) ;;
    put64 | put1 | spread | get | follower | small | scale1.5m | scale16k) EXPANDED+=("$c") ;;
    *) echo "bench.sh: unknown case '$c' (put put64 spread put1 get follower small scale16k scale1.5m)" >&2; exit 2 ;;
  esac
done
{
  echo "bench.sh $MODE: SYSTEMS='$SYSTEMS' CASES='${EXPANDED[*]}' REPS=$REPS DUR=$DUR PORT_OFFSET=$PORT_OFFSET"
  echo "  etcd ports $ETCD_CLIENT_BASE/$ETCD_PEER_BASE + i; keys 150k-case=$KEYS_150K 1.5m-case=$KEYS_1_5M 16k-case=$KEYS_16K"
  echo "  rs=${RAFTEXAMPLE_RS_BIN:-} ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)) go=$GO_BIN shared=$SHARED"
  echo "  raw outputs: $OUT"
} | tee "$OUT/params.txt"
for REP in $(seq 1 "$REPS"); do
  for c in "${EXPANDED[@]}"; do
    for s in $SYSTEMS; do run_case "$c" "$s"; done
  done
done
STEP="summarize $RAW"
python3 "$ROOT/scripts/bench_table.py" "$RAW" | tee "$OUT/table.md"
echo
echo "raw outputs: $OUT (raw.txt: one TAG line per run; logs/: each step's output; data/: node logs)"
