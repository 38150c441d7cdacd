-- wrk script: offer a fixed request rate instead of as many requests as the
-- server answers. scripts/bench.sh uses it to measure latency at a given
-- load ("p99 at 20,000 requests/s"), where a plain wrk run measures it at
-- saturation, when by Little's law every one of N connections waits about
-- N / throughput on average whatever the server does.
--
--   WRK_RATE=20000 wrk -t1 -c256 -d10s --latency -s scripts/wrk-paced.lua URL
--
-- One schedule of send times 1/WRK_RATE apart serves every connection of
-- the (single) wrk thread: a connection whose response arrived sends its
-- next request at the next free slot. A slot that passes with no connection
-- free is dropped rather than sent late in a burst, so a server that cannot
-- keep up shows it as a lower achieved rate (wrk's Requests/sec), which
-- bench.sh checks. wrk times each request from its send, so latency is the
-- server's, not the time a request waited for a free connection: with far
-- more connections than requests in flight at the offered rate, that wait
-- is rare.
--
-- Needs the LuaJIT build of wrk (Debian's), for ffi and a monotonic clock.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } wrk_paced_timespec;
int clock_gettime(int clk_id, wrk_paced_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("wrk_paced_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local rate = tonumber(os.getenv("WRK_RATE") or "")
if not rate or rate <= 0 then
  error("wrk-paced.lua: set WRK_RATE to the requests/s to offer")
end
local gap = 1000 / rate
local next_slot = nil

-- delay: milliseconds to wait before this connection's next request.
function delay()
  local t = now_ms()
  if next_slot == nil or next_slot < t then
    next_slot = t
  end
  local d = next_slot - t
  next_slot = next_slot + gap
  return d
end
