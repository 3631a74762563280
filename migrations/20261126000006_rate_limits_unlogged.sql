-- Rate-limit windows are bookkeeping, not records: skip the write-ahead log
-- for them. A web-form submission takes its per-address hit in the same
-- statement that appends its events (the gated commit), so a logged table
-- made every submission write its limit row to the WAL as well. What this
-- gives up: after a crash (or on a failed-over standby) the windows start
-- empty, which lets at most one more window's worth of acts through.
ALTER TABLE rate_limit_windows SET UNLOGGED;
