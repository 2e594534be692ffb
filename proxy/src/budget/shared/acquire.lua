-- Admits one request on a provider key whose budget every replica shares (see
-- floodgate_crds::redis_keys for the layout). Atomic: the whole check-and-record runs as one
-- script, on Redis's clock (TIME), so replicas with skewed clocks still agree.
--
-- KEYS[1] request log (sorted set)      KEYS[2] token reservations (sorted set)
-- KEYS[3] token amounts (hash, + `sum`) KEYS[4] epoch (hash: `id`, `ready`)
-- KEYS[5] pace (string: the theoretical arrival time of the next paced admission, ms)
--
-- ARGV[1] requests per window, -1 for no limit     ARGV[2] tokens per window, -1 for no limit
-- ARGV[3] window (ms)
-- ARGV[4] in-flight TTL (ms): a request not answered by then counts as answered then
-- ARGV[5] member: the request's id, unique across replicas
-- ARGV[6] estimated tokens of the request
-- ARGV[7] poll (ms): when only requests in flight block, how soon to ask again
-- ARGV[8] the epoch id the replica knows (epoch.lua answered it)
-- ARGV[9] how long the epoch lives after an admission (ms)
-- ARGV[10] the class cap: admit only while fewer than this many requests are in the window
--          (a lower queue class leaves the rest of the key's window to the classes above
--          it), -1 for none
-- ARGV[11] the pace (budget::pace), for a request that waited: 0 not paced (nothing is read
--          or written), 1 paced (refused while the key is ahead of its pace, and counted),
--          2 counted only (the priority class: never held back, but the classes below get
--          what is left of the key's sustainable rate)
-- ARGV[12] pace interval (ms, may be fractional): one paced admission per interval
-- ARGV[13] pace tolerance (ms, may be fractional): how far ahead of its pace the key admits
--
-- Returns {admitted, requests in the window (this one included if admitted),
--          ms until a further request could be admitted (0: now), held (when admitted is 0:
--          0 refused by a limit, 1 by the class cap and no limit, 2 by the pace alone; with
--          1 or 2 the key has room for the classes above, and for requests not paced)},
--          where admitted is 1 (yes), 0 (no), or -1: the epoch is not the one the replica
--          knows, so Redis lost this budget; nothing was changed, and the replica re-writes
--          its own requests (epoch.lua, seed.lua) before asking again.
--
-- The script runs in three steps: (1) the epoch, (2) what each limit allows (each limit
-- computes its own wait; the request waits for the longest), then the class cap and the
-- pace, (3) the record of an admitted request. A further limit adds its check to step 2 and
-- its record to step 3.
--
-- The pace is shared so that N replicas together admit paced requests at the key's rate,
-- not N times it (which fills the window early and then leaves a stretch with nothing
-- free). While a limit refuses a paced request no credit is saved: the pace moves up to
-- now + tolerance (Pacer::stalled on one replica).
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local member = ARGV[5]
local tokens = tonumber(ARGV[6])
local poll = tonumber(ARGV[7])
local epoch = ARGV[8]
local epoch_ttl = tonumber(ARGV[9])
local cap = tonumber(ARGV[10] or '-1')
local pace_mode = tonumber(ARGV[11] or '0')
local pace_interval = tonumber(ARGV[12] or '0')
local pace_tolerance = tonumber(ARGV[13] or '0')
local horizon = now - window

local function set_pace(tat)
  redis.call('SET', KEYS[5], string.format('%.3f', tat), 'PX', math.ceil(tat - now + window))
end

-- (1) The epoch: the budget is the one this replica has been admitting on, and no replica
-- is still re-writing its requests into it.
local known = redis.call('HMGET', KEYS[4], 'id', 'ready')
if known[1] ~= epoch then return {-1, 0, 0, 0} end
local ready = tonumber(known[2] or '0')

-- Members are scored with their answer time, or (in flight) with admission + TTL, which is
-- later than any answer time so far. In score order, then, answered requests come first, in
-- the order they leave the window; a member scored after `now` is still in flight.
-- Until fewer than `limit` requests are in the window.
local function request_wait(used, limit)
  local leave = used + 1 - limit
  local e = redis.call('ZRANGE', KEYS[1], leave - 1, leave - 1, 'WITHSCORES')
  if #e == 0 then return poll end
  local score = tonumber(e[2])
  if score > now then return poll end
  return score + window - now
end

local function token_wait(sum, need)
  if sum + need <= tpm then return 0 end
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + (tonumber(redis.call('HGET', KEYS[3], entries[i])) or 0)
    if sum - freed + need <= tpm then return tonumber(entries[i + 1]) + window - now end
  end
  return window
end

-- (2) What each limit allows: `wait` is the longest wait any of them asks for.
local wait = math.max(0, ready - now)

local used = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', horizon)
  used = redis.call('ZCARD', KEYS[1])
  if used >= rpm then wait = math.max(wait, request_wait(used, rpm)) end
end

local sum = 0
if tpm >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', horizon)
  if #old > 0 then
    local freed = 0
    for i = 1, #old do
      freed = freed + (tonumber(redis.call('HGET', KEYS[3], old[i])) or 0)
      redis.call('HDEL', KEYS[3], old[i])
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', horizon)
    redis.call('HINCRBY', KEYS[3], 'sum', -freed)
  end
  sum = tonumber(redis.call('HGET', KEYS[3], 'sum') or '0')
  -- A request larger than the whole limit fits an empty window only.
  wait = math.max(wait, token_wait(sum, math.min(tokens, tpm)))
end

-- The class cap, after every limit: whether it alone refuses tells the replica that the
-- classes above may still find room.
local class_wait = 0
if rpm >= 0 and cap >= 0 and cap < rpm and used >= cap then class_wait = request_wait(used, cap) end

-- The pace, for requests that waited: read only then (the fast path pays nothing for it).
local tat = 0
local pace_wait = 0
if pace_mode > 0 then
  tat = tonumber(redis.call('GET', KEYS[5]) or '0') or 0
  if pace_mode == 1 and tat > now + pace_tolerance then
    pace_wait = math.ceil(tat - pace_tolerance - now)
  end
end

if wait > 0 or class_wait > 0 or pace_wait > 0 then
  local held = 0
  if wait > 0 then
    -- A limit refuses: no pacing credit is saved while the window is full.
    if pace_mode > 0 and tat < now + pace_tolerance then set_pace(now + pace_tolerance) end
  elseif class_wait > 0 then
    held = 1
  else
    held = 2
  end
  return {0, used, math.max(wait, class_wait, pace_wait), held}
end

-- (3) The record of the admitted request.
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now + ttl, member)
  redis.call('PEXPIRE', KEYS[1], ttl + window)
  used = used + 1
end
if tpm >= 0 then
  redis.call('ZADD', KEYS[2], now, member)
  redis.call('HSET', KEYS[3], member, tokens)
  redis.call('HINCRBY', KEYS[3], 'sum', tokens)
  redis.call('PEXPIRE', KEYS[2], 2 * window)
  redis.call('PEXPIRE', KEYS[3], 2 * window)
end
redis.call('PEXPIRE', KEYS[4], epoch_ttl)
if pace_mode > 0 then set_pace(math.max(tat, now) + pace_interval) end

local next_free = 0
if rpm >= 0 and used >= rpm then next_free = request_wait(used, rpm) end
return {1, used, next_free, 0}
