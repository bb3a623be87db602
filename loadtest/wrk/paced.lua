-- wrk script for offered-load runs: classify.lua's requests, sent at a paced rate.
--
--   EXITSERVE_WRK_IMAGES=/path/to/pngs EXITSERVE_WRK_RATE=1200 \
--     wrk -t1 -c512 -d20s --latency -s loadtest/wrk/paced.lua 'http://127.0.0.1:8000/classify'
--
-- Requests follow one schedule per wrk thread at EXITSERVE_WRK_RATE requests/s (per thread)
-- with exponential gaps (Poisson arrivals): a connection that is free asks for the next
-- slot of the schedule and waits until it comes, or goes at once when the schedule is
-- behind. So the offered rate holds while the server keeps up, and with many connections
-- (more than rate x the worst latency) it holds under overload too: an open-loop load
-- bounded only by the connection count, not a closed loop that slows down with the server.
--
-- done() also prints, after classify.lua's line, the share of responses (any status)
-- answered within EXITSERVE_WRK_OBJECTIVE_MS, from wrk's latency histogram:
--
--   WITHIN_OBJECTIVE {"objective_ms":50,"share":0.993}

local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "classify.lua")

local ffi = require("ffi")
ffi.cdef [[
   typedef struct { long tv_sec; long tv_usec; } exitserve_timeval;
   int gettimeofday(exitserve_timeval *tv, void *tz);
]]
local tv = ffi.new("exitserve_timeval")

local function now_ms()
   ffi.C.gettimeofday(tv, nil)
   return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end

local rate = tonumber(os.getenv("EXITSERVE_WRK_RATE") or "")
if rate == nil or rate <= 0 then
   io.stderr:write("paced.lua: set EXITSERVE_WRK_RATE to the requests per second of each wrk thread\n")
   os.exit(2)
end
local next_send = nil

function delay()
   local now = now_ms()
   if next_send == nil or next_send < now - 1000 then
      next_send = now  -- start, or more than a second behind: do not burst to catch up
   end
   next_send = next_send - math.log(1 - math.random()) * 1000 / rate
   return math.max(0, math.floor(next_send - now))
end

local classify_done = done

function done(summary, latency, requests)
   classify_done(summary, latency, requests)
   local objective = tonumber(os.getenv("EXITSERVE_WRK_OBJECTIVE_MS") or "")
   if objective == nil then return end
   local target_us = objective * 1000
   local lo, hi = 0.0, 100.0  -- percentile p with latency(p) <= objective, by bisection
   if latency.max <= target_us then  -- (percentile(100) is not the maximum in wrk)
      lo = 100.0
   else
      for _ = 1, 40 do
         local mid = (lo + hi) / 2
         if latency:percentile(mid) <= target_us then lo = mid else hi = mid end
      end
   end
   io.write(string.format('WITHIN_OBJECTIVE {"objective_ms":%s,"share":%.6f}\n', objective, lo / 100))
end
