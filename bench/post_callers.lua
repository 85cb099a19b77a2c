-- wrk: POST a small non-streaming chat completion as one of N callers,
-- in turn: `wrk ... -s bench/post_callers.lua URL -- N`. Every request is
-- formatted once in init, so wrk spends nothing per request on it.
local body = '{"model":"bench-model","messages":[{"role":"user","content":"hello"}]}'
local requests = {}
local n = 1
local at = 0

function init(args)
  n = tonumber(args[1]) or 1
  for i = 0, n - 1 do
    local token = string.format("bench-token-%06d-padding", i)
    requests[i + 1] = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer " .. token,
    }, body)
  end
  -- Threads start at different callers.
  at = math.random(0, n - 1)
end

function request()
  at = at % n + 1
  return requests[at]
end
