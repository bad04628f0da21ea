-- wrk request script for benches/scripts/overhead.sh.
--
-- Configured through the environment (wrk runs this file once per thread):
--   KILN_METHOD        HTTP method (default POST)
--   KILN_BODY          path of the request body file; unset or empty sends no body
--   KILN_CONTENT_TYPE  Content-Type header, if set
--   KILN_HEADER_LEN    Inference-Header-Content-Length header (KServe v2 binary tensors), if set
--
-- At the end it prints one line, "WRK_JSON {...}", with the totals and the latency
-- percentiles in microseconds, for the script's summary to parse.

local function env(name)
  local v = os.getenv(name)
  if v == nil or v == "" then return nil end
  return v
end

wrk.method = env("KILN_METHOD") or "POST"

local body_path = env("KILN_BODY")
if body_path then
  local f = assert(io.open(body_path, "rb"))
  wrk.body = f:read("*a")
  f:close()
end

local content_type = env("KILN_CONTENT_TYPE")
if content_type then wrk.headers["Content-Type"] = content_type end

local header_len = env("KILN_HEADER_LEN")
if header_len then wrk.headers["Inference-Header-Content-Length"] = header_len end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.2f,"stdev":%.2f,"min":%d,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
