-- Replaces a token reservation's estimate with the real count, if it is still in the window.
--
-- KEYS[1] token amounts (hash, + `sum`)
-- ARGV[1] member    ARGV[2] real tokens
-- Returns 1 if the reservation was settled, 0 if it had left the window.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'sum', tonumber(ARGV[2]) - tonumber(old))
return 1
