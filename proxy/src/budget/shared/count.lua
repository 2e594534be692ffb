-- Counts one request of a tenant that has no rpm limit (whose requests no window records),
-- for the Tenant's status: the operator reads it as usedRpm and lastSeen (see
-- floodgate_crds::redis_keys). On Redis's clock (TIME), like the budgets.
--
-- KEYS[1] the tenant's use (hash: one field per minute of Unix time holding its requests,
--         and `last`, the Unix milliseconds of its latest request)
--
-- Returns the requests counted in the current minute.
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local n = redis.call('HINCRBY', KEYS[1], minute, 1)
redis.call('HSET', KEYS[1], 'last', now)
-- Only this minute and the last are read: older ones go.
redis.call('HDEL', KEYS[1], minute - 2)
redis.call('PEXPIRE', KEYS[1], 86400000)
return n
