-- The event store: postgres-es's `events` table, extended with
--   position        a global order (identity),
--   transaction_id  the inserting transaction, for the relay's gap-free read,
--   event_id        a unique id consumers dedupe by,
--   occurred_at     when the event was stored,
--   hash            the per-stream sha-256 chain (see domain/src/audit.rs).
-- postgres-es names its columns on insert, so every extra column is filled
-- by a default or by the trigger below.

CREATE TABLE events
(
    position       bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence >= 1),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    occurred_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    hash           text        NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_position_idx ON events (position);
CREATE UNIQUE INDEX events_event_id_idx ON events (event_id);
-- The relay reads in (transaction_id, position) order.
CREATE INDEX events_relay_idx ON events (transaction_id, position);

-- postgres-es's snapshot table, for aggregates that opt into snapshots.
CREATE TABLE snapshots
(
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- The chain hash: sha256 over the stream's previous hash ('' first) and the
-- event's fields, each length-prefixed as "<bytes>:<value>;". Must match
-- domain::audit::chain_hash byte for byte. Written out in one expression:
-- a trigger runs for every event, and calling helper functions per field
-- doubled its cost.
CREATE FUNCTION casebook_events_chain() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    prev     text := '';
    payload  text := NEW.payload::text;
    metadata text := NEW.metadata::text;
    seq      text := NEW.sequence::text;
    micros   text := ((extract(epoch FROM NEW.occurred_at) * 1000000)::bigint)::text;
BEGIN
    IF NEW.sequence > 1 THEN
        SELECT hash INTO prev
          FROM events
         WHERE aggregate_type = NEW.aggregate_type
           AND aggregate_id = NEW.aggregate_id
           AND sequence = NEW.sequence - 1;
        IF prev IS NULL THEN
            RAISE EXCEPTION 'event %/%/% has no predecessor in its stream',
                NEW.aggregate_type, NEW.aggregate_id, NEW.sequence
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END IF;
    NEW.hash := encode(sha256(convert_to(
           octet_length(prev) || ':' || prev || ';'
        || '36:' || NEW.event_id::text || ';'
        || octet_length(NEW.aggregate_type) || ':' || NEW.aggregate_type || ';'
        || octet_length(NEW.aggregate_id) || ':' || NEW.aggregate_id || ';'
        || octet_length(seq) || ':' || seq || ';'
        || octet_length(NEW.event_type) || ':' || NEW.event_type || ';'
        || octet_length(NEW.event_version) || ':' || NEW.event_version || ';'
        || octet_length(micros) || ':' || micros || ';'
        || octet_length(payload) || ':' || payload || ';'
        || octet_length(metadata) || ':' || metadata || ';', 'UTF8')), 'hex');
    RETURN NEW;
END
$$;

CREATE TRIGGER events_chain
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION casebook_events_chain();

-- Events are immutable: nothing updates, deletes or truncates them.
CREATE FUNCTION casebook_events_immutable() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_immutable
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION casebook_events_immutable();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION casebook_events_immutable();

-- Where each relay (one per topic prefix) has published up to.
CREATE TABLE relay_checkpoints
(
    relay               text PRIMARY KEY,
    last_transaction_id xid8        NOT NULL,
    last_position       bigint      NOT NULL,
    published_total     bigint      NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
