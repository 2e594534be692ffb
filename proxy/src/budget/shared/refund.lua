-- A request admitted by acquire.lua is given back: the gateway refused it before anything
-- was sent for it (a tenant's request the gateway could not serve), so it leaves the window
-- as if never admitted, and its token reservation with it.
--
-- KEYS[1] request log (sorted set)      KEYS[2] token reservations (sorted set)
-- KEYS[3] token amounts (hash, + `sum`)
-- ARGV[1] member
-- Returns 1 if the member was in the request log or held tokens, 0 if it had left already.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'sum', -tonumber(old))
  removed = 1
end
return removed
