-- wrk script for exitserve: POST raw PNG (or JPEG) bodies to /classify, count responses per status.
--
--   EXITSERVE_WRK_IMAGES=/path/to/pngs \
--     wrk -t1 -c64 -d20s --latency -s loadtest/wrk/classify.lua 'http://127.0.0.1:8000/classify?budget=0.3'
--
-- The path and query come from wrk's URL (wrk.path keeps the query string). Each thread
-- reads every *.png (and *.jpg, *.jpeg: sent as image/jpeg) in $EXITSERVE_WRK_IMAGES at
-- init and cycles through them, each request pre-formatted once. done() prints one line:
--
--   STATUS_COUNTS {"status":{"200":1234,"503":56},"requests":1290,"duration_s":20.0,
--                  "latency_ms":{"p50":..,"p90":..,"p99":..,...},"errors":{...},...}
--
-- "status" sums the per-thread counts gathered through setup(thread) / thread:get().
-- Latency percentiles are wrk's, over every response (fast 503s included).

local threads = {}   -- main Lua state: every thread, collected in setup()

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

-- EXITSERVE_WRK_MULTIPART=1 sends each image as the multipart field "file" instead.
--
-- Per-thread state (each wrk thread has its own Lua state).
counts = {}          -- status code -> responses, read back by done() via thread:get("counts")
local requests = {}  -- pre-formatted HTTP requests, one per image
local next_index = 1

local function list_images(dir)
   local files = {}
   local pipe = io.popen("find '" .. dir:gsub("'", "'\\''") .. "' -maxdepth 1 -type f "
      .. "\\( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \\) | sort")
   for line in pipe:lines() do
      table.insert(files, line)
   end
   pipe:close()
   return files
end

function init(args)
   local dir = os.getenv("EXITSERVE_WRK_IMAGES")
   if dir == nil or dir == "" then
      io.stderr:write("classify.lua: set EXITSERVE_WRK_IMAGES to a directory of PNG or JPEG files\n")
      os.exit(2)
   end
   local multipart = os.getenv("EXITSERVE_WRK_MULTIPART") == "1"
   for _, path in ipairs(list_images(dir)) do
      local png = path:lower():match("%.png$") ~= nil
      local content_type = png and "image/png" or "image/jpeg"
      local f = assert(io.open(path, "rb"))
      local body = f:read("*a")
      f:close()
      if multipart then
         local boundary = "exitserve-wrk-boundary"
         local form = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x."
            .. (png and "png" or "jpg") .. "\"\r\n"
            .. "Content-Type: " .. content_type .. "\r\n\r\n" .. body .. "\r\n--" .. boundary .. "--\r\n"
         table.insert(requests, wrk.format("POST", wrk.path,
            {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, form))
      else
         table.insert(requests, wrk.format("POST", wrk.path, {["Content-Type"] = content_type}, body))
      end
   end
   if #requests == 0 then
      io.stderr:write("classify.lua: no *.png, *.jpg or *.jpeg files in " .. dir .. "\n")
      os.exit(2)
   end
   -- threads start at different images
   next_index = ((id or 0) * 97) % #requests + 1
end

function request()
   local req = requests[next_index]
   next_index = next_index % #requests + 1
   return req
end

function response(status, headers, body)
   counts[status] = (counts[status] or 0) + 1
end

local function json_value(v)
   if type(v) == "table" then
      local parts, is_array = {}, #v > 0
      if is_array then
         for _, item in ipairs(v) do table.insert(parts, json_value(item)) end
         return "[" .. table.concat(parts, ",") .. "]"
      end
      local keys = {}
      for k in pairs(v) do table.insert(keys, k) end
      table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
      for _, k in ipairs(keys) do
         table.insert(parts, string.format("%q:%s", tostring(k), json_value(v[k])))
      end
      return "{" .. table.concat(parts, ",") .. "}"
   elseif type(v) == "number" then
      if v ~= v or v == math.huge or v == -math.huge then return "null" end
      if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
      return string.format("%.6f", v)
   elseif type(v) == "string" then
      return string.format("%q", v)
   end
   return tostring(v)
end

function done(summary, latency, requests)
   local status = {}
   for _, thread in ipairs(threads) do
      local per_thread = thread:get("counts") or {}
      for code, n in pairs(per_thread) do
         local key = tostring(code)
         status[key] = (status[key] or 0) + n
      end
   end
   local us = 1000.0  -- wrk reports microseconds
   local out = {
      status = status,
      requests = summary.requests,
      duration_s = summary.duration / 1e6,
      bytes = summary.bytes,
      threads = #threads,
      errors = {
         connect = summary.errors.connect, read = summary.errors.read, write = summary.errors.write,
         status = summary.errors.status, timeout = summary.errors.timeout,
      },
      latency_ms = {
         p50 = latency:percentile(50) / us, p90 = latency:percentile(90) / us,
         p99 = latency:percentile(99) / us, mean = latency.mean / us, max = latency.max / us,
      },
   }
   io.write("STATUS_COUNTS " .. json_value(out) .. "\n")
end
