-- The finish function of the job queue (included by job_finish and job_finish_next).
-- keep_ms: how long the batch is kept once it finished (server.jobs.retention_hours).

-- A batch whose last record got its line (or one cancelled) expires keep_ms from now, its
-- output with it: Redis deletes it, no sweeper needed, and a restart keeps the expiry.
-- An expiry already set (a cancel's) stands; the output line just written may have
-- created the output hash, so it is given the batch's expiry too.
local function retire(batch, out, keep_ms)
  local h = redis.call('HMGET', batch, 'status', 'records', 'ok', 'err')
  if h[1] ~= 'cancelled' and (h[1] ~= 'running'
      or tonumber(h[3] or 0) + tonumber(h[4] or 0) < tonumber(h[2])) then
    return
  end
  local ttl = redis.call('PTTL', batch)
  if ttl < 0 then
    ttl = keep_ms
    redis.call('PEXPIRE', batch, ttl)
  end
  redis.call('PEXPIRE', out, ttl)
end

local function finish(keep_ms)
local new = 0
-- Only while its batch exists: a record in flight as its batch was deleted (or expired)
-- must not write a line, counters or a dead letter that nothing would ever remove.
if ARGV[5] ~= 'skip' and redis.call('EXISTS', KEYS[3]) == 1 then
  new = redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4])
  if new == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
    redis.call('HINCRBY', KEYS[3], 'in_tok', ARGV[6])
    redis.call('HINCRBY', KEYS[3], 'out_tok', ARGV[7])
    local b = math.floor(tonumber(redis.call('TIME')[1]) / 10)
    redis.call('HINCRBY', KEYS[5], b, 1)
    redis.call('HDEL', KEYS[5], b - 7)
    redis.call('EXPIRE', KEYS[5], 600)
    if #KEYS > 5 then
      redis.call('HSET', KEYS[6], ARGV[8], ARGV[9])
      redis.call('HINCRBY', KEYS[7], ARGV[10], 1)
    end
    retire(KEYS[3], KEYS[4], keep_ms)
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return new
end
