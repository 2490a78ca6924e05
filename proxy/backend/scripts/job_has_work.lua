-- job_has_work.lua: is there anything for a worker to claim?
-- KEYS: stream; ARGV: group lease_ms. 1 when an entry waits after the group's last-delivered
-- id or one is idle past the lease: lets idle workers look without asking admission.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[2], '-', '+', 1) > 0 then return 1 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then
    return #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  end
end
return 0
