-- wrk script: signed GitHub deliveries, each with its own X-GitHub-Delivery.
-- Env: BENCH_REQUESTS (file of "<signature>\t<body>" lines), BENCH_PATH, BENCH_DELAY_MS (pacing per
-- connection, for "half load"), BENCH_BAD_SIG=1 (flip the signature: the refusal path).
local bodies, sigs, n = {}, {}, 0
local counter, tid = 0, 0
local path = os.getenv("BENCH_PATH") or "/webhook"
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local bad = os.getenv("BENCH_BAD_SIG") == "1"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  tid = wrk.thread:get("tid") or 0
  for line in io.lines(os.getenv("BENCH_REQUESTS")) do
    local sig, body = line:match("^([^\t]+)\t(.*)$")
    n = n + 1
    if bad then sig = "sha256=" .. string.rep("0", 64) end
    sigs[n], bodies[n] = sig, body
  end
end

function request()
  counter = counter + 1
  local k = (counter % n) + 1
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "create",
    ["X-GitHub-Delivery"] = string.format("bench-%d-%d-%d", tid, counter, os.time()),
    ["X-Hub-Signature-256"] = sigs[k],
  }, bodies[k])
end

if delay_ms > 0 then
  function delay() return delay_ms end
end

function done(summary, latency, requests)
  local s = summary
  io.write(string.format(
    "BENCH_JSON {\"requests\": %d, \"duration_us\": %d, \"non2xx\": %d, \"connect_errors\": %d, " ..
    "\"read_errors\": %d, \"timeouts\": %d, \"p50_us\": %d, \"p90_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    s.requests, s.duration, s.errors.status, s.errors.connect, s.errors.read, s.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
