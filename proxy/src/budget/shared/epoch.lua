-- Joins the epoch of a provider key's shared budget (see floodgate_crds::redis_keys): creates
-- it if missing, optionally holding admissions back while the replicas re-write what they
-- admitted (the barrier), and answers the epoch's id.
--
-- KEYS[1] epoch (hash: `id`, `ready`)
-- ARGV[1] id to create the epoch with, if it is missing
-- ARGV[2] barrier (ms) when creating it: 0 for a budget nobody can have used yet
-- ARGV[3] barrier (ms) to extend an existing epoch's with: 0 for none
-- ARGV[4] how long the epoch lives after this call (ms)
--
-- Returns {epoch id, ms until admissions resume (0: now), Redis's TIME in Unix ms}.
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = redis.call('HGET', KEYS[1], 'id')
local ready = tonumber(redis.call('HGET', KEYS[1], 'ready') or '0')
if not id then
  id = ARGV[1]
  ready = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'id', id, 'ready', ready)
elseif tonumber(ARGV[3]) > 0 then
  ready = math.max(ready, now + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'ready', ready)
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return {id, math.max(0, ready - now), now}
