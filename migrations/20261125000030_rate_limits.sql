-- Rate limits that must hold across API and delivery replicas: one row per
-- counted act (a web-form submission for an address, an automatic email to
-- a recipient). Keys are SHA-256 hashes, never the address itself. Each key
-- keeps at most its limit of rows inside its window; older rows are
-- deleted as the key is used again, and a sweep drops rows of keys no
-- longer used.
CREATE TABLE rate_limit_hits
(
    scope text        NOT NULL,
    key   text        NOT NULL,
    at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX rate_limit_hits_key_idx ON rate_limit_hits (scope, key, at);
CREATE INDEX rate_limit_hits_at_idx ON rate_limit_hits (at);
