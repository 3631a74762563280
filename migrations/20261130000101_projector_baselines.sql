-- A rebuilt read model's per-stream sequences as one row instead of one
-- row per stream.
--
-- A rebuild applies every event of the projector's aggregate types up to a
-- point in (transaction_id, position) order, each once; so for every stream
-- of those types, the sequence it reached there is the stream's highest
-- sequence at or before that point, which the event store already holds.
-- Writing it out again as a `projector_streams` row per stream (a million
-- rows for a million streams, twice: into the shadow, then into the live
-- table) was most of a rebuild's time. A projector's `projector_streams`
-- rows now record what it applied after its baseline; a stream without a
-- row has reached what its baseline implies (`projections::projector`).
CREATE TABLE projector_baselines
(
    projector       text     PRIMARY KEY,
    aggregate_types text[]   NOT NULL,
    transaction_id  xid8     NOT NULL,
    last_position   bigint   NOT NULL,
    set_at          timestamptz NOT NULL DEFAULT now()
);

-- Every projector's sequence for every stream it has applied: its rows,
-- and what its baseline implies (the greater of the two). For audits,
-- tests and operators; the projectors ask for the few streams of a batch.
CREATE VIEW projector_stream_sequences AS
SELECT projector, aggregate_type, aggregate_id, max(last_sequence) AS last_sequence
  FROM (SELECT projector, aggregate_type, aggregate_id, last_sequence FROM projector_streams
        UNION ALL
        SELECT b.projector, e.aggregate_type, e.aggregate_id, max(e.sequence)
          FROM projector_baselines b
          JOIN events e ON e.aggregate_type = ANY (b.aggregate_types)
                       AND (e.transaction_id, e.position) <= (b.transaction_id, b.last_position)
         GROUP BY b.projector, e.aggregate_type, e.aggregate_id) s
 GROUP BY projector, aggregate_type, aggregate_id;
