-- The knowledge base by section, searched two ways, embeddings versioned.
--
-- * Every chunk is one section of an article (or a part of a long one) and
--   carries its heading path ("How do I export my project data? › Export a
--   project"), for retrieval and for answers.
-- * Every chunk records the embedding model that made it and the vector's
--   dimension; search reads only the chunks of the model it embeds queries
--   with. `casebook kb reembed` adds a new model's chunks beside the old
--   ones, so search never finds nothing during a switch; the key is
--   (model, chunk_id) for that reason.
-- * A weighted tsvector (title and headings A, body D) with a GIN index for
--   full-text search, fused with the vector ranking by reciprocal rank fusion.

ALTER TABLE kb_chunks
    ADD COLUMN section    text,
    -- Chunks written before this migration were made by their document's model.
    ADD COLUMN model      text NOT NULL DEFAULT 'all-MiniLM-L6-v2',
    ADD COLUMN dimensions integer GENERATED ALWAYS AS (vector_dims(embedding)) STORED,
    ADD COLUMN search_text tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english', title || ' ' || coalesce(section, '')), 'A') ||
        setweight(to_tsvector('english', body), 'D')) STORED;

UPDATE kb_chunks c
SET model = d.model
FROM kb_documents d
WHERE d.document_id = c.document_id
  AND c.model <> d.model;

ALTER TABLE kb_chunks
    DROP CONSTRAINT kb_chunks_pkey,
    ADD PRIMARY KEY (model, chunk_id);

CREATE INDEX kb_chunks_search_text_idx ON kb_chunks USING gin (search_text);
CREATE INDEX kb_chunks_model_document_idx ON kb_chunks (model, document_id, ordinal);
