-- A request admitted by acquire.lua was answered: from now on it counts for one window.
-- The new score never moves a request later (LT), so a request whose in-flight TTL has run
-- out stays counted as answered then.
--
-- KEYS[1] request log (sorted set)
-- ARGV[1] member    ARGV[2] window (ms)
-- Returns 1 if the member was re-scored, 0 if it was not there or already answered earlier.
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local changed = redis.call('ZADD', KEYS[1], 'XX', 'LT', 'CH', now, ARGV[1])
-- Nothing in flight any more: every member leaves within a window, so may the key.
if redis.call('ZCOUNT', KEYS[1], string.format('(%d', now), '+inf') == 0 then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
return changed
