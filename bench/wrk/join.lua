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
