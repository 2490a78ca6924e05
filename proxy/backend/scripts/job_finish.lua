-- job_finish.lua: finish a record.
-- KEYS: stream att batch out rate [dlq dlqn]; ARGV: group id recordId line outcome in out
-- [dlq_id dlq_json count_field], then keep_ms (the batch's retention, last).
-- The line is written only if none exists: exactly one per record.
--! include job_lib_finish
return finish(tonumber(ARGV[#ARGV]))
