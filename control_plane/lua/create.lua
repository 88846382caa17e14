-- KEYS: adapter, index, events, state:PENDING, state:FAILED, pinned
-- ARGV: name, now_us, event maxlen, pinned ("1"/"0"), then field/value pairs
-- A FAILED record may be replaced; any other existing record is a conflict.
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'FAILED' then return {'EXISTS'} end
if state then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])  -- the replaced record's pin goes with it
end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'state', 'PENDING', 'gen', 1, 'create_time', ARGV[2],
           'update_time', ARGV[2], 'pinned', ARGV[4])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
if ARGV[4] == '1' then redis.call('ZADD', KEYS[6], 0, ARGV[1]) end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type', 'CREATED', 'name', ARGV[1],
                      'version', '', 'time', ARGV[2])
if ARGV[4] == '1' then
  -- Watchers learn of pins from PINNED events: a data plane holds the pin until the adapter is READY.
  id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type', 'PINNED', 'name', ARGV[1],
                  'version', '', 'time', ARGV[2])
end
return {'OK', id}
