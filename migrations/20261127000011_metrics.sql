-- The metrics projection (`metrics`): buckets per hour and per day, per
-- channel and overall, per AI configuration and overall, and what it
-- remembers of each ticket between events.
--
-- A bucket's figures are one JSON document (counters, counts by reason and
-- kind, and log-bucketed histograms of first-response and resolution
-- times) that merges by addition: the projector reads the buckets a batch
-- touches, adds the batch's observations and writes them back, in the
-- transaction that records the batch's offsets.

CREATE TABLE metrics_buckets
(
    grain      text        NOT NULL CHECK (grain IN ('hour', 'day')),
    channel    text        NOT NULL,  -- 'all', or one channel
    config     text        NOT NULL,  -- 'all', or one AI configuration tag
    start      timestamptz NOT NULL,
    figures    jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grain, channel, config, start)
);

CREATE TABLE metrics_tickets
(
    ticket_id uuid PRIMARY KEY,
    facts     jsonb NOT NULL
);

-- Staff read the buckets (GraphQL narrows it to analysts, supervisors and
-- auditors); customers read nothing.
SELECT casebook_protect_table('metrics_buckets');
SELECT casebook_protect_table('metrics_tickets');
