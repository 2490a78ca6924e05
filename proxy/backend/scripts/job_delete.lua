-- job_delete.lua: delete a finished batch's meta and output lines, atomically against a
-- replay that would make it run again. KEYS: batch out.
-- Returns the output lines deleted, -1 when there is no such batch (or it is still being
-- submitted), -2 when it is running (its records in flight would be orphaned).
local h = redis.call('HMGET', KEYS[1], 'status', 'records', 'ok', 'err')
if not h[1] or h[1] == 'submitting' then return -1 end
if h[1] == 'running' and tonumber(h[3] or 0) + tonumber(h[4] or 0) < tonumber(h[2]) then
  return -2
end
local lines = redis.call('HLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
return lines
