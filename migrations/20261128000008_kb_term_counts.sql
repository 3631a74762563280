-- How many sections of each embedding model hold each full-text term, and
-- how many sections each model has: the hybrid search weighs a question's
-- terms by inverse document frequency. Counting the matching rows at query
-- time (one count(*) per term) costs tens of milliseconds once a term is in
-- tens of thousands of sections (`casebook bench kb`, docs/performance.md);
-- these counts are kept by triggers as chunks are written and removed
-- (ingest, re-ingest, re-embed, pruning, a document's delete cascading),
-- in the same transaction, so search reads them as they stand.
--
-- A writer locks its models' rows of kb_model_counts first (every statement
-- takes them, in order, before any term), so writers of one model take
-- their turn instead of deadlocking over the terms they share (terms are
-- counted per model); readers never wait.

CREATE TABLE kb_model_counts
(
    model    text PRIMARY KEY,
    sections bigint NOT NULL CHECK (sections >= 0)
);

CREATE TABLE kb_term_counts
(
    model    text   NOT NULL,
    -- A lexeme of kb_chunks.search_text (stemmed, as to_tsvector makes it).
    lexeme   text   NOT NULL,
    sections bigint NOT NULL CHECK (sections >= 0),
    PRIMARY KEY (model, lexeme)
);

-- Terms no section holds any more are removed; this finds them at once.
CREATE INDEX kb_term_counts_unused_idx ON kb_term_counts (model, lexeme) WHERE sections = 0;

-- Adds the sections of `rows` (+1) or takes them away (-1): one row per
-- changed chunk, as a statement-level trigger's transition table has them.
CREATE FUNCTION kb_count_sections() RETURNS trigger
    LANGUAGE plpgsql
AS
$fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM kb_term_counts;
        DELETE FROM kb_model_counts;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO kb_model_counts AS c (model, sections)
        SELECT model, 0 FROM old_rows GROUP BY model ORDER BY model
        ON CONFLICT (model) DO UPDATE SET sections = c.sections;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO kb_model_counts AS c (model, sections)
        SELECT model, 0 FROM new_rows GROUP BY model ORDER BY model
        ON CONFLICT (model) DO UPDATE SET sections = c.sections;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE kb_model_counts c
        SET sections = c.sections - o.n
        FROM (SELECT model, count(*) AS n FROM old_rows GROUP BY model) AS o
        WHERE c.model = o.model;
        -- A count going under zero would be a bug: the CHECK refuses it
        -- rather than let the counts drift.
        UPDATE kb_term_counts c
        SET sections = c.sections - o.n
        FROM (SELECT r.model, t.lexeme, count(*) AS n
              FROM old_rows AS r
                       CROSS JOIN LATERAL unnest(tsvector_to_array(r.search_text)) AS t(lexeme)
              GROUP BY r.model, t.lexeme) AS o
        WHERE c.model = o.model
          AND c.lexeme = o.lexeme;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        UPDATE kb_model_counts c
        SET sections = c.sections + n.n
        FROM (SELECT model, count(*) AS n FROM new_rows GROUP BY model) AS n
        WHERE c.model = n.model;
        INSERT INTO kb_term_counts AS c (model, lexeme, sections)
        SELECT n.model, t.lexeme, count(*)
        FROM new_rows AS n
                 CROSS JOIN LATERAL unnest(tsvector_to_array(n.search_text)) AS t(lexeme)
        GROUP BY n.model, t.lexeme
        ORDER BY n.model, t.lexeme
        ON CONFLICT (model, lexeme) DO UPDATE SET sections = c.sections + EXCLUDED.sections;
    END IF;
    DELETE FROM kb_term_counts WHERE sections = 0;
    DELETE FROM kb_model_counts WHERE sections = 0;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER kb_chunks_count_inserted
    AFTER INSERT ON kb_chunks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_sections();
CREATE TRIGGER kb_chunks_count_deleted
    AFTER DELETE ON kb_chunks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_sections();
CREATE TRIGGER kb_chunks_count_updated
    AFTER UPDATE ON kb_chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_sections();
CREATE TRIGGER kb_chunks_count_truncated
    AFTER TRUNCATE ON kb_chunks
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_sections();

-- The chunks already stored.
INSERT INTO kb_model_counts (model, sections)
SELECT model, count(*) FROM kb_chunks GROUP BY model;
INSERT INTO kb_term_counts (model, lexeme, sections)
SELECT c.model, t.lexeme, count(*)
FROM kb_chunks AS c
         CROSS JOIN LATERAL unnest(tsvector_to_array(c.search_text)) AS t(lexeme)
GROUP BY c.model, t.lexeme;

-- Staff read them (knowledgeSearch), as the chunks.
SELECT casebook_protect_table('kb_model_counts');
SELECT casebook_protect_table('kb_term_counts');
