-- The writer's append names, for every stream it extends, the head it
-- decided on (sequence and chain hash, commands/src/store.rs). The INSERT
-- takes a KEY SHARE lock on each such head, so a purge deleting it
-- concurrently either finishes first (and the head is gone) or waits for
-- the append; when any head is missing or differs, the statement calls this
-- function, which fails it as a unique violation: to the writer, a stream
-- that moved under it (a later event, a purge, a restore from elsewhere) is
-- the same optimistic-lock conflict as a second event at one sequence, and
-- the command is retried against the stream read afresh. A state kept in
-- memory (the aggregate cache) can therefore never extend a stream it no
-- longer matches, nor resurrect a purged one.
--
-- Called only when a head does not match (a CASE guards it), so appends
-- that match never enter PL/pgSQL.
CREATE FUNCTION casebook_stream_moved() RETURNS boolean
    LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RAISE EXCEPTION 'a stream''s head moved before the append'
        USING ERRCODE = 'unique_violation';
END
$$;
