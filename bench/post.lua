-- wrk script: POST one body, built once and read from a file, on every request.
-- usage: wrk ... -s bench/post.lua URL -- BODY_FILE CONTENT_TYPE [ACCEPT]
-- `done` prints one line, "WRK_JSON {...}", that bench/load.py reads; latencies are in microseconds.

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  if args[3] then
    wrk.headers["Accept"] = args[3]
  end
end

function done(summary, latency, requests)
  local percentiles = {}
  for _, p in ipairs({50, 90, 99, 99.9}) do
    percentiles[#percentiles + 1] = string.format('"p%s": %d', p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, %s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, table.concat(percentiles, ", ")))
end
