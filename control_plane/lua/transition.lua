-- KEYS: adapter, events, state:PENDING, state:DOWNLOADING, state:VALIDATING, state:READY, state:FAILED
-- ARGV: name, now_us, event maxlen, allowed from-states (comma list), to-state, event type ('' = none),
--       lease owner ('' = any), then field/value pairs
-- Moves a record between states only from an allowed state (and only for the lease holder), so a
-- job that lost its record (deleted, replaced, taken over) can never resurrect or overwrite it.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'NOT_FOUND'} end
local allowed = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == state then allowed = true end end
if not allowed then return {'STATE', state} end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[7] then return {'LEASE'} end
local index = {PENDING = 3, DOWNLOADING = 4, VALIDATING = 5, READY = 6, FAILED = 7}
redis.call('ZREM', KEYS[index[state]], ARGV[1])
redis.call('ZADD', KEYS[index[ARGV[5]]], 0, ARGV[1])
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'update_time', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = ''
if ARGV[6] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[6], 'name', ARGV[1],
                  'version', redis.call('HGET', KEYS[1], 'version') or '', 'time', ARGV[2])
end
return {'OK', id}
