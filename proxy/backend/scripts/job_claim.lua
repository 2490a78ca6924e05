-- job_claim.lua: claim one record of a stream for a worker.
-- KEYS: stream att; ARGV: group consumer lease_ms. An entry idle past the lease (its worker
-- died) first, else the next new one; the attempt is counted in the same call.
--! include job_lib_claim
return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
