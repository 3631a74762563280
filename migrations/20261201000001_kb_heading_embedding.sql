-- A second vector per knowledge base section: its heading path embedded
-- alone. Headings are often the customers' own questions ("How do I export
-- my project data?"), and a question can be near its heading while far
-- from the text, which is written in the product's words. Search reads the
-- larger of the two cosines (`retrieval::Candidate::similarity`) for the
-- candidates the text's vector and the full-text search bring; no index is
-- needed for that.
--
-- Chunks stored before this migration have none (NULL) and are ranked by
-- their text's vector alone; the chunking version moved on with it, so the
-- next ingest of each document embeds its headings.

ALTER TABLE kb_chunks ADD COLUMN heading_embedding vector(384);
