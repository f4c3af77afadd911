-- Response checker for the server benchmarks.
--
-- Usage: wrk ... -s check.lua URL -- EXPECTED_STATUS EXPECTED_BODY_BYTES [POST_BODY_BYTES]
--
-- Counts every response whose status differs from EXPECTED_STATUS or whose body length differs
-- from EXPECTED_BODY_BYTES (wrk hands response() the de-chunked body), so a fast but wrong
-- answer shows up as errors instead of throughput. With POST_BODY_BYTES, each request is a POST
-- with a body of that many bytes. done() prints one line "BENCH_RESULT {json}" for the harness.
--
-- With the environment variable CHECK_BODIES=0, response() is not defined: wrk 4.1 collects a
-- body for response() in a buffer that grows 1 KiB at a time, which makes it the bottleneck
-- for bodies of a megabyte or more. The harness then checks status codes with wrk's own
-- non-2xx/3xx counter and body sizes in aggregate from the bytes read (see harness/runner.py).

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   expected_status = tonumber(args[1]) or 200
   expected_length = tonumber(args[2]) or -1
   local post_bytes = tonumber(args[3])
   if post_bytes then
      wrk.method = "POST"
      wrk.body = string.rep("x", post_bytes)
      wrk.headers["Content-Type"] = "application/octet-stream"
   end
   bad_status = 0
   bad_length = 0
   last_bad = ""
end

local function check_response(status, headers, body)
   if status ~= expected_status then
      bad_status = bad_status + 1
      last_bad = "status " .. status
   elseif expected_length >= 0 and #body ~= expected_length then
      bad_length = bad_length + 1
      last_bad = "body length " .. #body
   end
end

if os.getenv("CHECK_BODIES") ~= "0" then
   response = check_response
end

function done(summary, latency, requests)
   local n_bad_status = 0
   local n_bad_length = 0
   local sample = ""
   for _, thread in ipairs(threads) do
      n_bad_status = n_bad_status + thread:get("bad_status")
      n_bad_length = n_bad_length + thread:get("bad_length")
      local text = thread:get("last_bad")
      if text ~= "" then
         sample = text
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
         .. '"status_errors": %d, "timeouts": %d, "bad_status": %d, "bad_length": %d, '
         .. '"bad_sample": "%s", "latency_mean_us": %.1f, "latency_max_us": %d, '
         .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout, n_bad_status, n_bad_length, sample,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)))
end
