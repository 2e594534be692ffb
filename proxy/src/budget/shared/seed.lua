-- Re-writes one replica's own requests on a provider key into its shared budget, after Redis
-- lost them (or never saw them: admitted while Redis was unreachable). Idempotent: members
-- keep the names they were admitted with, so what Redis still holds is not counted twice.
--
-- KEYS[1] request log (sorted set)      KEYS[2] token reservations (sorted set)
-- KEYS[3] token amounts (hash, + `sum`)
-- ARGV[1] window (ms)    ARGV[2] in-flight TTL (ms)    ARGV[3] n, the number of requests
-- then n requests, three arguments each: member, `a` (answered) or `f` (in flight), and its
--   age in ms (since its answer, or since its admission when in flight)
-- then token reservations, three arguments each: member, age in ms, tokens
--
-- Requests are scored as acquire.lua and complete.lua score them (an answer never moves
-- later: LT); a reservation already there takes the replica's amount, which is the newest.
-- Returns the number of arguments read.
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])

local function expire_at_least(key, ms)
  local left = redis.call('PTTL', key)
  -- -1: no expiry yet (just created); -2: no key, and PEXPIRE does nothing.
  if left < ms then redis.call('PEXPIRE', key, ms) end
end

local i = 4
for _ = 1, n do
  local member, kind, age = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local score = now - age
  if kind == 'f' then score = score + ttl end
  redis.call('ZADD', KEYS[1], 'LT', score, member)
  i = i + 3
end
if n > 0 then expire_at_least(KEYS[1], ttl + window) end

local tokens = false
while i + 2 <= #ARGV do
  local member, age, amount = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local old = redis.call('HGET', KEYS[3], member)
  if old then
    redis.call('HINCRBY', KEYS[3], 'sum', amount - tonumber(old))
  else
    redis.call('ZADD', KEYS[2], now - age, member)
    redis.call('HINCRBY', KEYS[3], 'sum', amount)
  end
  redis.call('HSET', KEYS[3], member, amount)
  tokens = true
  i = i + 3
end
if tokens then
  expire_at_least(KEYS[2], 2 * window)
  expire_at_least(KEYS[3], 2 * window)
end
return i - 1
