-- job_finish_next.lua: job_finish (without a dead letter) and job_claim of the next record
-- in one round trip, for a worker that already holds the next record's admission.
-- KEYS as job_finish; ARGV as job_finish (no dead letter), then consumer lease_ms keep_ms.
-- Returns {new, claimed or false}.
--! include job_lib_claim
--! include job_lib_finish
local new = finish(tonumber(ARGV[10]))
return {new, claim(KEYS[1], KEYS[2], ARGV[1], ARGV[8], ARGV[9])}
