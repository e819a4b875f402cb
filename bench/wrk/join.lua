-- wrk script for `python -m bench.joins`: every request is a join by a user never seen
-- before. The tokens file (one bearer token a line) is the script's first argument.
local tokens = {}
local next_token = 0

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
end

function request()
  next_token = next_token % #tokens + 1
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. tokens[next_token],
    ["Content-Type"] = "application/json",
  }, '{"quantity":1}')
end

-- Each answer's status, so a run of refusals shows they were refusals (409), not a token
-- the app did not take (401): wrk itself only counts answers that were not 2xx or 3xx.
statuses = {}
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      all[status] = (all[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(all) do
    parts[#parts + 1] = status .. "=" .. n
  end
  table.sort(parts)
  io.write("statuses: " .. table.concat(parts, " ") .. "\n")
end
