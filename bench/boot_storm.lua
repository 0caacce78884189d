-- wrk script for the boot storm: every request asks for a different node's script.
--
--   wrk -t2 -c64 -d10s -s bench/boot_storm.lua http://127.0.0.1:PORT -- MACS_FILE [SCRIPTS_DIR]
--
-- MACS_FILE: one MAC per line; each request picks one at random (10,000 nodes, so the server
-- cannot answer from a one-entry cache). With SCRIPTS_DIR (one file per MAC holding the exact
-- script that node must get), every response body is checked to be one of those scripts; that
-- check costs wrk CPU, so the timed runs leave it off and a separate check run turns it on.
-- done() prints one JSON line (prefixed "BENCH_JSON ") that bench/boot_storm.py parses.

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

local macs = {}
local expected = nil
bad = 0
checked = 0

local function check_response(status, headers, body)
  checked = checked + 1
  if status ~= 200 or not expected[body] then
    bad = bad + 1
  end
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then macs[#macs + 1] = line end
  end
  if #macs == 0 then error("no MACs in " .. args[1]) end
  math.randomseed(os.time() * 1000 + id)
  if args[2] then
    expected = {}
    for _, mac in ipairs(macs) do
      local f = assert(io.open(args[2] .. "/" .. mac, "rb"))
      expected[f:read("*a")] = true
      f:close()
    end
    response = check_response -- wrk asks for bodies only when `response` exists after init
  end
end

function request()
  return wrk.format("GET", "/ipxe?mac=" .. macs[math.random(#macs)])
end

function done(summary, latency, requests)
  local bad_total, checked_total = 0, 0
  for _, t in ipairs(threads) do
    bad_total = bad_total + (t:get("bad") or 0)
    checked_total = checked_total + (t:get("checked") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "stdev": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}, ' ..
    '"checked": %d, "bad": %d}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    checked_total, bad_total))
end
