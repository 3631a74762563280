-- Events the relay could never publish (too large for the broker, or
-- refused as invalid): recorded here, counted and alerted on, and skipped,
-- so that one such event never stops publishing for everyone behind it.
CREATE TABLE relay_set_aside
(
    relay        text        NOT NULL,
    position     bigint      NOT NULL,
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    error        text        NOT NULL,
    size_bytes   bigint      NOT NULL,
    set_aside_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relay, position, topic)
);
