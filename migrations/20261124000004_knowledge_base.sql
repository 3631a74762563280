-- The knowledge base: documents, and their chunks embedded for similarity
-- search (pgvector, cosine distance, HNSW).

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE kb_documents
(
    document_id  text PRIMARY KEY,
    title        text        NOT NULL,
    source       text        NOT NULL,
    -- sha-256 of the title and body: re-ingesting an unchanged document
    -- changes nothing.
    content_hash text        NOT NULL,
    body         text        NOT NULL,
    -- The embedding model the chunks were made with.
    model        text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kb_chunks
(
    chunk_id    text PRIMARY KEY,
    document_id text        NOT NULL REFERENCES kb_documents (document_id) ON DELETE CASCADE,
    ordinal     integer     NOT NULL,
    title       text        NOT NULL,
    body        text        NOT NULL,
    embedding   vector(384) NOT NULL
);

CREATE INDEX kb_chunks_document_idx ON kb_chunks (document_id, ordinal);
CREATE INDEX kb_chunks_embedding_idx ON kb_chunks USING hnsw (embedding vector_cosine_ops)
    WITH (m = 16, ef_construction = 64);
