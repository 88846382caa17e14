-- KEYS: adapter, index, events, pinned, artifact refs of the expected version,
--       state:PENDING, state:DOWNLOADING, state:VALIDATING, state:READY, state:FAILED
-- ARGV: name, now_us, event maxlen, etag ('' = unconditional), expected version ('' = none)
-- Returns the number of adapters still referencing the artifact, so the caller knows when to drop it.
local rec = redis.call('HMGET', KEYS[1], 'state', 'gen', 'create_time', 'pinned', 'version')
if not rec[1] then return {'NOT_FOUND'} end
if (rec[5] or '') ~= ARGV[5] then return {'RETRY'} end
if ARGV[4] ~= '' and ARGV[4] ~= (rec[3] .. '-' .. rec[2]) then return {'ETAG'} end
if rec[4] == '1' then return {'PINNED'} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
for i = 6, 10 do redis.call('ZREM', KEYS[i], ARGV[1]) end
local refs = 0
if ARGV[5] ~= '' then
  redis.call('SREM', KEYS[5], ARGV[1])
  refs = redis.call('SCARD', KEYS[5])
end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'type', 'DELETED', 'name', ARGV[1],
                      'version', ARGV[5], 'time', ARGV[2])
return {'OK', id, refs}
