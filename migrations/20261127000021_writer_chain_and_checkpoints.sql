-- The writer computes each event's chain hash (commands/src/store.rs): it
-- holds the stream's head, and gives the event its id and time. The trigger
-- that looked up the previous hash and printed the JSON as text now runs
-- only for a row inserted without a hash (an operator's hand-written
-- INSERT), where it still computes the same encoding; the writer's rows skip
-- it in the WHEN clause, without entering PL/pgSQL at all.
DROP TRIGGER events_chain ON events;
CREATE TRIGGER events_chain
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.hash IS NULL)
    EXECUTE FUNCTION casebook_events_chain();

-- Signed checkpoints of the log-wide Merkle tree (domain/src/merkle.rs):
-- the first `size` events in log order (transaction_id, position), the last
-- at (last_transaction_id, last_position), have root `root`. `frontier`
-- holds the roots of the tree's perfect subtrees, so the next checkpoint
-- reads only the events after this one.
CREATE TABLE audit_checkpoints
(
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    size                bigint      NOT NULL CHECK (size >= 0),
    last_transaction_id xid8        NOT NULL,
    last_position       bigint      NOT NULL,
    root                text        NOT NULL,
    frontier            bytea[]     NOT NULL,
    created_at          timestamptz NOT NULL,
    public_key          text        NOT NULL,
    signature           text        NOT NULL,
    published_at        timestamptz
);
CREATE INDEX audit_checkpoints_size_idx ON audit_checkpoints (size);

-- Events that retention purged from the hot table: what the log-wide tree
-- and the stream chains need (the leaf: position and hash; the order:
-- transaction id), and where the content went (archive file and its
-- SHA-256). Rows here are never changed or removed.
CREATE TABLE events_purged
(
    position        bigint      NOT NULL PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL,
    hash            text        NOT NULL,
    archive_file    text        NOT NULL,
    archive_sha256  text        NOT NULL,
    purged_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aggregate_type, aggregate_id, sequence)
);
CREATE INDEX events_purged_log_idx ON events_purged (transaction_id, position);

CREATE TRIGGER events_purged_immutable
    BEFORE UPDATE OR DELETE ON events_purged
    FOR EACH ROW EXECUTE FUNCTION casebook_events_immutable();
CREATE TRIGGER events_purged_no_truncate
    BEFORE TRUNCATE ON events_purged
    FOR EACH STATEMENT EXECUTE FUNCTION casebook_events_immutable();

-- The one way out of `events`: a DELETE passes only for a row already
-- recorded, with the same position and hash, in events_purged. A
-- transaction-local setting or a SECURITY DEFINER function would say who
-- may delete; this says what must be true first: the event stays a leaf of
-- the log and names its archive, so `audit verify` still recomputes the
-- tree and checks the archive. UPDATE and TRUNCATE stay refused.
CREATE OR REPLACE FUNCTION casebook_events_immutable() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'events' AND EXISTS (
        SELECT 1 FROM events_purged p
         WHERE p.position = OLD.position AND p.hash = OLD.hash
           AND p.transaction_id = OLD.transaction_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events are immutable: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
