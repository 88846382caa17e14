-- KEYS: adapter, pinned, events
-- ARGV: name, now_us, event maxlen, etag ('' = unconditional), "1"/"0"
-- Pinning is idempotent: setting the current value changes nothing and emits no event.
local rec = redis.call('HMGET', KEYS[1], 'state', 'gen', 'create_time', 'pinned', 'version')
if not rec[1] then return {'NOT_FOUND'} end
if ARGV[4] ~= '' and ARGV[4] ~= (rec[3] .. '-' .. rec[2]) then return {'ETAG'} end
if rec[4] == ARGV[5] then return {'OK', ''} end
redis.call('HSET', KEYS[1], 'pinned', ARGV[5], 'update_time', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
if ARGV[5] == '1' then redis.call('ZADD', KEYS[2], 0, ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type',
                      ARGV[5] == '1' and 'PINNED' or 'UNPINNED', 'name', ARGV[1], 'version', rec[5] or '',
                      'time', ARGV[2])
return {'OK', id}
