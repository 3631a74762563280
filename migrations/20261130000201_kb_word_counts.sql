-- The knowledge base's words as written (lower-cased, not stemmed), with
-- how many sections of each embedding model hold each: what a question's
-- typo is corrected to (`casebook_domain::spelling`). kb_term_counts has
-- the stems the full-text search matches ("notif" for "notifications"),
-- which are not words a customer meant or the embedding model reads.
--
-- Kept by triggers as chunks are written and removed, in the same
-- transaction, as kb_term_counts is. The triggers are named to fire after
-- kb_chunks_count_* (statement triggers of one event fire in name order),
-- so a writer has locked its models' kb_model_counts rows, in order,
-- before it touches a word: writers of one model take their turn here too.
--
-- Words are the 'simple' configuration's lexemes (lower-cased, never
-- stemmed, stop words kept) made only of letters, of 2 to 32 of them:
-- numbers, versions, addresses and the compound "two-factor" (its parts
-- are words of their own) are left out.

CREATE TABLE kb_word_counts
(
    model    text   NOT NULL,
    word     text   NOT NULL,
    sections bigint NOT NULL CHECK (sections >= 0),
    PRIMARY KEY (model, word)
);

-- Words no section holds any more are removed; this finds them at once.
CREATE INDEX kb_word_counts_unused_idx ON kb_word_counts (model, word) WHERE sections = 0;

CREATE FUNCTION kb_chunk_words(title text, section text, body text) RETURNS SETOF text
    LANGUAGE sql
    IMMUTABLE
    PARALLEL SAFE
AS
$fn$
SELECT t.word
FROM unnest(tsvector_to_array(
        to_tsvector('simple', title || ' ' || coalesce(section, '') || ' ' || body))) AS t(word)
WHERE t.word ~ '^[[:alpha:]]{2,32}$'
$fn$;

CREATE FUNCTION kb_count_words() RETURNS trigger
    LANGUAGE plpgsql
AS
$fn$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM kb_word_counts;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        -- A count going under zero would be a bug: the CHECK refuses it
        -- rather than let the counts drift.
        UPDATE kb_word_counts c
        SET sections = c.sections - o.n
        FROM (SELECT r.model, w.word, count(*) AS n
              FROM old_rows AS r
                       CROSS JOIN LATERAL kb_chunk_words(r.title, r.section, r.body) AS w(word)
              GROUP BY r.model, w.word) AS o
        WHERE c.model = o.model
          AND c.word = o.word;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO kb_word_counts AS c (model, word, sections)
        SELECT n.model, w.word, count(*)
        FROM new_rows AS n
                 CROSS JOIN LATERAL kb_chunk_words(n.title, n.section, n.body) AS w(word)
        GROUP BY n.model, w.word
        ORDER BY n.model, w.word
        ON CONFLICT (model, word) DO UPDATE SET sections = c.sections + EXCLUDED.sections;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        DELETE FROM kb_word_counts c
        USING (SELECT DISTINCT model FROM old_rows) AS m
        WHERE c.model = m.model
          AND c.sections = 0;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER kb_chunks_words_inserted
    AFTER INSERT ON kb_chunks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_words();
CREATE TRIGGER kb_chunks_words_deleted
    AFTER DELETE ON kb_chunks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_words();
CREATE TRIGGER kb_chunks_words_updated
    AFTER UPDATE ON kb_chunks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_words();
CREATE TRIGGER kb_chunks_words_truncated
    AFTER TRUNCATE ON kb_chunks
    FOR EACH STATEMENT EXECUTE FUNCTION kb_count_words();

-- The chunks already stored.
INSERT INTO kb_word_counts (model, word, sections)
SELECT c.model, w.word, count(*)
FROM kb_chunks AS c
         CROSS JOIN LATERAL kb_chunk_words(c.title, c.section, c.body) AS w(word)
GROUP BY c.model, w.word;

-- Staff may read them, as the chunks and the term counts.
SELECT casebook_protect_table('kb_word_counts');
