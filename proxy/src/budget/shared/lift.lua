-- Ends the barrier of a budget's epoch (see epoch.lua) before its bound: every replica that
-- was using the key has re-written its requests into it, as their marks in
-- floodgate:budget:rewritten say (the proxy checks them; see floodgate_crds::redis_keys).
--
-- KEYS[1] epoch (hash: `id`, `ready`)
-- ARGV[1] the id of the epoch whose barrier ends (a newer epoch keeps its own)
--
-- Returns 1 if the barrier was lifted, 0 if the epoch is another one or admits already.
if redis.replicate_commands then pcall(redis.replicate_commands) end -- Redis < 5

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
local ready = tonumber(redis.call('HGET', KEYS[1], 'ready') or '0')
if ready <= now then return 0 end
redis.call('HSET', KEYS[1], 'ready', now)
return 1
