-- The claim function of the job queue (included by job_claim and job_finish_next).

local function claim(stream, att, group, consumer, lease_ms)
  local id, fields
  local p = redis.call('XPENDING', stream, group, 'IDLE', lease_ms, '-', '+', 1)
  if #p > 0 then
    local c = redis.call('XCLAIM', stream, group, consumer, lease_ms, p[1][1])
    if #c > 0 and c[1] then id = c[1][1]; fields = c[1][2]
    else redis.call('XACK', stream, group, p[1][1]) end
  end
  if not id then
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
    if r and r[1] and #r[1][2] > 0 then id = r[1][2][1][1]; fields = r[1][2][1][2] end
  end
  if not id then return false end
  return {id, fields, redis.call('HINCRBY', att, id, 1)}
end
