-- wrk script for scripts/bench.sh. Environment:
--   OP=put|get   VSIZE=64   KEYS=1000 (get keyspace: /k-0 .. /k-(KEYS-1))   QUERY="" (e.g. "?consistency=serializable")
--   TARGETS=host:port,host:port  (optional: thread i pinned to target i mod n)
local op = os.getenv("OP") or "put"
local vsize = tonumber(os.getenv("VSIZE") or "64")
local nkeys = tonumber(os.getenv("KEYS") or "1000")
local query = os.getenv("QUERY") or ""
local run = os.getenv("RUN") or tostring(os.time())
local n = 0

function setup(thread)
  n = n + 1
  thread:set("tid", n)
  local targets = os.getenv("TARGETS")
  if targets and targets ~= "" then
    local list = {}
    for t in targets:gmatch("[^,]+") do list[#list + 1] = t end
    local host, port = list[((n - 1) % #list) + 1]:match("^(.*):(%d+)$")
    thread.addr = wrk.lookup(host, port)[1]
  end
end

function init(args)
  counter = 0
  value = string.rep("v", vsize)
  math.randomseed(os.time() + tid * 7919)
end

function request()
  if op == "put" then
    counter = counter + 1
    return wrk.format("PUT", "/b-" .. run .. "-" .. tid .. "-" .. counter, nil, value)
  end
  return wrk.format("GET", "/k-" .. math.random(0, nkeys - 1) .. query)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write + e.timeout, e.status))
end
