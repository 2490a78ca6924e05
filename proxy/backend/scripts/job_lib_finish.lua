-- The finish function of the job queue (included by job_finish and job_finish_next).

local function finish()
local new = 0
if ARGV[5] ~= 'skip' then
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
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return new
end
