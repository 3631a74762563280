-- Rate limits that must hold across API and delivery replicas: one row per
-- limited key (a web-form address, an automatic email's recipient), holding
-- the times of its counted acts inside the window. Keys are SHA-256
-- hashes, never the address itself. One statement takes a hit (the row
-- lock orders concurrent ones); a sweep drops keys no longer used.
CREATE TABLE rate_limit_windows
(
    scope      text          NOT NULL,
    key        text          NOT NULL,
    hits       timestamptz[] NOT NULL,
    allowed    boolean       NOT NULL,
    updated_at timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX rate_limit_windows_updated_idx ON rate_limit_windows (updated_at);
