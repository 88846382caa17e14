-- KEYS: adapter
-- ARGV: owner, now_ms, lease_ms, force ("1" takes the lease whatever its state),
--       renew ("1": only extend a lease `owner` already holds)
-- Takes or renews the ingest lease of a non-terminal record: only one replica works on an adapter,
-- and a replica that died mid-download loses its lease when it stops renewing.
local rec = redis.call('HMGET', KEYS[1], 'state', 'lease_owner', 'lease_until')
if not rec[1] then return 0 end
if rec[1] == 'READY' or rec[1] == 'FAILED' then return 0 end
if ARGV[5] == '1' and rec[2] ~= ARGV[1] then return 0 end
local now = tonumber(ARGV[2])
if ARGV[4] ~= '1' and rec[2] and rec[2] ~= ARGV[1] and tonumber(rec[3] or '0') > now then return 0 end
redis.call('HSET', KEYS[1], 'lease_owner', ARGV[1], 'lease_until', now + tonumber(ARGV[3]))
return 1
