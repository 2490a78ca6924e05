-- Bucket state shared by admit.lua and settle.lua (included after their `now` and `sunpack`).
-- The pool hash holds a pair of buckets per field (rpm, tpm) as <dddddd>: each its TAT in
-- ms, then the rate per ms and the burst it was written under.

-- model.rebase: a TAT written under (wr, wb) read under (rate, burst). What was used is
-- kept in units, at most one whole burst of the limit in force; a TAT whose limit is not
-- known (wr = 0) is only clamped to that.
local function rebase(tat, rate, burst, wr, wb)
  if tat <= now or (wr == rate and wb == burst) then return tat end
  if wr > 0 then
    local used = (tat - now) * wr
    if used > burst then used = burst end
    return now + used / rate
  end
  local top = now + burst / rate
  if tat > top then return top end
  return tat
end
-- A bucket pair as (rpm TAT, rate, burst, tpm TAT, rate, burst); a value written before
-- limits were stored (<dd>, 16 bytes) has them unknown (0).
local function unpack6(v)
  if not v then return 0, 0, 0, 0, 0, 0 end
  if #v == 16 then
    local a, b = sunpack('<dd', v)
    return a, 0, 0, b, 0, 0
  end
  local a, b, c, d, e, f = sunpack('<dddddd', v)
  return a, b, c, d, e, f
end
