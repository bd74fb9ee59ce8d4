#!/usr/bin/env bash
# Benchmark a 3-node release cluster of raftexample-rs on 127.0.0.1 with wrk.
#
#   scripts/bench.sh            # this daemon alone: PUT, GET, RSS, recovery; prints a table
#   scripts/bench.sh compare    # side by side with Go raftexample and etcd 3.4, using the project's
#                               # shared scripts (../shared/bench, see its README for their one-time set-up)
#
# Needs wrk (apt-get install wrk), curl, python3. Not part of the test suite. Ports: peers
# 12379/22379/32379 (+PORT_OFFSET), clients 12380/22380/32380. Env: DUR=10s VSIZE=64 KEYS=150000.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DUR=${DUR:-10s}; VSIZE=${VSIZE:-64}; RKEYS=${KEYS:-150000}; OFF=${PORT_OFFSET:-0}
BIN=$ROOT/target/release/raftexample
WORK=${WORK:-/tmp/raftexample-bench}
cargo build --release --quiet

if [[ ${1:-} == compare ]]; then
  SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
  out=${OUT:-$WORK/compare.txt}; mkdir -p "$WORK"; : >"$out"
  RAFTEXAMPLE_RS_BIN=$BIN DUR=$DUR "$SHARED/compare.sh" "$out" "rs raft etcd"
  python3 "$SHARED/summarize.py" "$out"
  for s in rs etcd raft; do RAFTEXAMPLE_RS_BIN=$BIN "$SHARED/recovery.sh" "$s" "$WORK/recovery-$s" | grep '^RESULT'; done
  exit 0
fi

PEERS="http://127.0.0.1:$((12379+OFF)),http://127.0.0.1:$((22379+OFF)),http://127.0.0.1:$((32379+OFF))"
cport() { echo $(( $1 * 10000 + 2380 + OFF )); }
pport() { echo $(( $1 * 10000 + 2379 + OFF )); }
start() { # dir: fresh 3-node cluster, waits for a leader
  local d=$1; rm -rf "$d"; mkdir -p "$d"
  for i in 1 2 3; do
    (cd "$d" && exec "$BIN" --id "$i" --cluster "$PEERS" --port "$(cport "$i")" >/dev/null 2>"node$i.log") &
    echo $! >"$d/node$i.pid"
  done
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null -XPUT -d x "http://127.0.0.1:$(cport 1)/ready" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster did not start; see $d/node*.log" >&2; exit 1
}
stop() { for f in "$1"/node*.pid; do kill "$(cat "$f")" 2>/dev/null || true; done; wait 2>/dev/null || true; }
leader() { curl -fsS "http://127.0.0.1:$(pport 1)/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])'; }
rss() { for i in 1 2 3; do awk '/VmHWM/{printf "%d ", $2/1024}' "/proc/$(cat "$1/node$i.pid")/status"; done; }
load() { # name conns targets [env...]
  local name=$1 c=$2 t=$3; shift 3
  local res threads=$(( c < 2 ? c : 2 ))
  [[ $t == *,* ]] && threads=$(tr ',' '\n' <<<"$t" | wc -l)   # spread: one thread per node
  res=$(env "$@" KEYS=1000 TARGETS="$([[ $t == *,* ]] && echo "$t")" VSIZE="$VSIZE" wrk -t"$threads" -c"$c" -d"$DUR" \
        -s "$ROOT/scripts/bench.lua" "http://${t%%,*}/" | grep '^RESULT' | sed 's/^RESULT //')
  printf '| %-34s | %4s | %s | %s MiB |\n' "$name" "$c" "$res" "$(rss "$D")"
}

D=$WORK/cluster
echo "| workload | conns | result | peak RSS per node |"
echo "|---|---|---|---|"
for spec in "put-leader 1" "put-leader 64" "put-spread 63"; do
  set -- $spec
  start "$D"; L=$(leader)
  if [[ $1 == put-leader ]]; then t=127.0.0.1:$(cport "$L"); else t=127.0.0.1:$(cport 1),127.0.0.1:$(cport 2),127.0.0.1:$(cport 3); fi
  load "durable PUT ($1)" "$2" "$t" OP=put
  stop "$D"
done
start "$D"; L=$(leader)
python3 - "$(cport 1)" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for i in range(1000):
    c.request("PUT", f"/k-{i}", body=b"v" * 64); r = c.getresponse(); r.read(); assert r.status == 204
PY
load "linearizable GET (leader)" 64 "127.0.0.1:$(cport "$L")" OP=get
load "serializable GET (leader)" 64 "127.0.0.1:$(cport "$L")" OP=get QUERY='?consistency=serializable'
stop "$D"

# Recovery: fill RKEYS keys, SIGKILL a follower and restart it, then join a 4th node.
start "$D"; L=$(leader); F=$(( L % 3 + 1 ))
t0=$(date +%s.%N)
python3 - "$(cport "$L")" "$RKEYS" "$VSIZE" <<'PY'
import http.client, sys, threading
port, n, vs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def fill(lo, hi):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(lo, hi):
        c.request("PUT", f"/r-{i}", body=b"v" * vs); r = c.getresponse(); r.read(); assert r.status == 204
threads = [threading.Thread(target=fill, args=(t * n // 32, (t + 1) * n // 32)) for t in range(32)]
[t.start() for t in threads]; [t.join() for t in threads]
PY
fill=$(echo "$(date +%s.%N) - $t0" | bc)
last="/r-$((RKEYS - 1))"
wait_key() { # port -> seconds until $last is served
  python3 - "$1" "$last" "$2" <<'PY'
import http.client, sys, time
port, key, t0 = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1); c.request("GET", key)
        r = c.getresponse()
        if r.status == 200 and r.read() == b"v" * 64: break
    except OSError: pass
    time.sleep(0.005)
print(f"{time.time() - t0:.3f}")
PY
}
kill -9 "$(cat "$D/node$F.pid")"; wait "$(cat "$D/node$F.pid")" 2>/dev/null || true
t0=$(date +%s.%N)
(cd "$D" && exec "$BIN" --id "$F" --cluster "$PEERS" --port "$(cport "$F")" >/dev/null 2>>"node$F.log") & echo $! >"$D/node$F.pid"
restart=$(wait_key "$(cport "$F")" "$t0")
curl -fsS -XPOST -d "http://127.0.0.1:$((42379+OFF))" "http://127.0.0.1:$(cport "$L")/4" >/dev/null
mkdir -p "$D/n4"; t0=$(date +%s.%N)
(cd "$D/n4" && exec "$BIN" --id 4 --cluster "$PEERS,http://127.0.0.1:$((42379+OFF))" --port $((42380+OFF)) --join >/dev/null 2>node4.log) & echo $! >"$D/node4.pid"
join=$(wait_key $((42380+OFF)) "$t0")
du_mb=$(for i in 1 2 3; do du -sm "$D"/raftexample-$i "$D"/raftexample-$i-snap | awk '{s+=$1} END {printf "%d ", s}'; done)
echo
echo "| recovery ($RKEYS keys) | fill s | restarted follower serves last key, s | new member serves last key, s | data dir MB per node | peak RSS MiB |"
echo "|---|---|---|---|---|---|"
echo "| raftexample-rs | $fill | $restart | $join | $du_mb | $(rss "$D") |"
stop "$D"
