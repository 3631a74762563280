//! The knowledge base: articles split into sections (each with its heading
//! path), embedded, stored in pgvector with a weighted tsvector, and
//! searched both ways: the cosine ranking and the full-text ranking are
//! fused by reciprocal rank fusion, and a passage must be at least
//! [`RELEVANCE_THRESHOLD`] similar to the question to count.
//!
//! Every chunk records the model that embedded it (and the vector's
//! dimension): search reads only the chunks of the model it embeds the
//! question with. [`KnowledgeBase::reembed`] adds a new model's chunks
//! beside the old ones, so search never finds nothing during a switch;
//! [`KnowledgeBase::prune_other_models`] removes the old ones afterwards.

use std::path::{Path, PathBuf};
use std::time::Instant;

use casebook_domain::knowledge::{sections, title_of, weighted_reciprocal_rank_fusion, RRF_K};
use pgvector::Vector;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::embeddings::{EmbedError, Embedder};
use casebook_commands::metrics::KB_SEARCH;

/// Most words per section chunk (a longer section is cut between blocks).
pub const CHUNK_WORDS: usize = 180;
/// Passages less similar than this to the question are not relevant: the
/// knowledge-gap line, calibrated on the tuning split of `kb/eval`
/// (`casebook bench answers`, docs/performance.md).
pub const RELEVANCE_THRESHOLD: f64 = 0.47;
/// The full-text ranking's weight in the fusion (the cosine ranking's is
/// 1): a little more, so that when the two rankings disagree symmetrically
/// the question's words decide ("export" and "import" are close in
/// meaning, far apart in what the customer wants). Checked on the tuning
/// split of `kb/eval` (`casebook bench answers`, docs/performance.md).
pub const FULL_TEXT_WEIGHT: f64 = 1.1;
/// Candidates each ranking contributes to the fusion, at least.
const MIN_CANDIDATES: usize = 20;
/// Words of a question used for full-text search.
const MAX_QUERY_WORDS: usize = 32;
/// What the chunking is: a change re-chunks unchanged documents.
const CHUNKING: &str = "sections-v1";
/// HNSW candidates examined per search: recall against latency. pgvector's
/// most; on 100,000 chunks it keeps recall@10 above 0.95 even for queries
/// that fall between topics, at about 15 ms (docs/performance.md).
pub const EF_SEARCH: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("knowledge base database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("a document needs a title and a body")]
    Empty,
}

/// One retrieved passage: a section of an article.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Passage {
    pub chunk_id: String,
    pub document_id: String,
    /// The article's title.
    pub title: String,
    /// The section's Markdown.
    pub body: String,
    /// Cosine similarity to the question.
    pub score: f64,
    /// The heading path, "Title › Section" (None for chunks stored before
    /// sections).
    pub section: Option<String>,
}

impl Passage {
    /// The passage as the guardrails judge a draft against: heading path
    /// (or title) and text.
    pub fn grounding_text(&self) -> String {
        format!(
            "{}\n{}",
            self.section.as_deref().unwrap_or(&self.title),
            self.body
        )
    }
}

/// What a re-embedding did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReembedReport {
    pub documents: usize,
    pub chunks: usize,
}

/// The full-text query for a question: its words, any of which may match
/// (`websearch_to_tsquery` syntax; ranking favours chunks matching more,
/// and in titles and headings).
pub fn full_text_query(question: &str) -> String {
    let mut seen = std::collections::BTreeSet::new();
    question
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() > 1 && !matches!(w.as_str(), "or" | "and" | "not"))
        .filter(|w| seen.insert(w.clone()))
        .take(MAX_QUERY_WORDS)
        .collect::<Vec<_>>()
        .join(" or ")
}

fn content_hash(model: &str, title: &str, body: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{CHUNKING}\u{0}{model}\u{0}{title}\u{0}{body}").as_bytes(),
    ))
}

type Row = (String, String, String, Option<String>, String, f64);

fn passage((chunk_id, document_id, title, section, body, score): Row) -> Passage {
    Passage {
        chunk_id,
        document_id,
        title,
        body,
        score,
        section,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    Unchanged,
    Stored { chunks: usize },
}

#[derive(Clone)]
pub struct KnowledgeBase {
    pool: PgPool,
    embedder: Embedder,
    ef_search: u32,
}

/// A document id from a title or file name: lower-case words joined by '-'.
pub fn slug(text: &str) -> String {
    let s: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

impl KnowledgeBase {
    pub fn new(pool: PgPool, embedder: Embedder) -> Self {
        Self {
            pool,
            embedder,
            ef_search: EF_SEARCH,
        }
    }

    /// Candidates the HNSW search examines (more: better recall, slower).
    pub fn with_ef_search(mut self, ef_search: u32) -> Self {
        self.ef_search = ef_search.clamp(1, 1000);
        self
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Stores a document and its embedded chunks, replacing an older
    /// version; an unchanged document (same title, body and model) is left
    /// as it is.
    pub async fn ingest(
        &self,
        document_id: &str,
        title: &str,
        body: &str,
        source: &str,
    ) -> Result<IngestOutcome, KnowledgeError> {
        let title = title.trim();
        let body = body.trim();
        if title.is_empty() || body.is_empty() {
            return Err(KnowledgeError::Empty);
        }
        let hash = content_hash(self.embedder.model_name(), title, body);
        let stored: Option<String> =
            sqlx::query_scalar("SELECT content_hash FROM kb_documents WHERE document_id = $1")
                .bind(document_id)
                .fetch_optional(&self.pool)
                .await?;
        if stored.as_deref() == Some(hash.as_str()) {
            return Ok(IngestOutcome::Unchanged);
        }
        let (chunks, vectors) = self.embed_sections(title, body).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO kb_documents (document_id, title, source, content_hash, body, model) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (document_id) DO UPDATE SET title = EXCLUDED.title, source = EXCLUDED.source,
                content_hash = EXCLUDED.content_hash, body = EXCLUDED.body, model = EXCLUDED.model, updated_at = now()",
        )
        .bind(document_id)
        .bind(title)
        .bind(source)
        .bind(&hash)
        .bind(body)
        .bind(self.embedder.model_name())
        .execute(&mut *tx)
        .await?;
        // The document changed: every model's chunks of it are stale.
        sqlx::query("DELETE FROM kb_chunks WHERE document_id = $1")
            .bind(document_id)
            .execute(&mut *tx)
            .await?;
        self.insert_chunks(&mut tx, document_id, title, &chunks, vectors)
            .await?;
        tx.commit().await?;
        Ok(IngestOutcome::Stored {
            chunks: chunks.len(),
        })
    }

    async fn embed_sections(
        &self,
        title: &str,
        body: &str,
    ) -> Result<(Vec<casebook_domain::knowledge::Section>, Vec<Vec<f32>>), KnowledgeError> {
        let chunks = sections(title, body, CHUNK_WORDS);
        let mut vectors = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(16) {
            let texts: Vec<String> = batch.iter().map(|c| c.embedding_text()).collect();
            vectors.extend(self.embedder.embed(&texts).await?);
        }
        Ok((chunks, vectors))
    }

    async fn insert_chunks(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        document_id: &str,
        title: &str,
        chunks: &[casebook_domain::knowledge::Section],
        vectors: Vec<Vec<f32>>,
    ) -> Result<(), KnowledgeError> {
        for (c, v) in chunks.iter().zip(vectors) {
            sqlx::query(
                "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, section, body, embedding, model)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(format!("{document_id}#{}", c.ordinal))
            .bind(document_id)
            .bind(c.ordinal as i32)
            .bind(title)
            .bind(&c.heading)
            .bind(&c.text)
            .bind(Vector::from(v))
            .bind(self.embedder.model_name())
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Embeds every document again with this knowledge base's model, one
    /// document per transaction, beside the chunks other models made:
    /// searches with the old model keep finding its chunks meanwhile.
    /// Documents then record the new model.
    pub async fn reembed(&self) -> Result<ReembedReport, KnowledgeError> {
        let model = self.embedder.model_name().to_string();
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT document_id FROM kb_documents ORDER BY document_id")
                .fetch_all(&self.pool)
                .await?;
        let mut report = ReembedReport {
            documents: 0,
            chunks: 0,
        };
        for document_id in ids {
            let Some((title, body)): Option<(String, String)> =
                sqlx::query_as("SELECT title, body FROM kb_documents WHERE document_id = $1")
                    .bind(&document_id)
                    .fetch_optional(&self.pool)
                    .await?
            else {
                continue;
            };
            let (chunks, vectors) = self.embed_sections(&title, &body).await?;
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM kb_chunks WHERE document_id = $1 AND model = $2")
                .bind(&document_id)
                .bind(&model)
                .execute(&mut *tx)
                .await?;
            self.insert_chunks(&mut tx, &document_id, &title, &chunks, vectors)
                .await?;
            sqlx::query(
                "UPDATE kb_documents SET model = $2, content_hash = $3, updated_at = now() WHERE document_id = $1",
            )
            .bind(&document_id)
            .bind(&model)
            .bind(content_hash(&model, &title, &body))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            report.documents += 1;
            report.chunks += chunks.len();
        }
        Ok(report)
    }

    /// Removes the chunks of every model but this one (after a re-embed,
    /// once every process embeds questions with this model). Returns how
    /// many were removed.
    pub async fn prune_other_models(&self) -> Result<u64, KnowledgeError> {
        Ok(sqlx::query("DELETE FROM kb_chunks WHERE model <> $1")
            .bind(self.embedder.model_name())
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Ingests Markdown and text files (a directory: every `.md` and `.txt`
    /// in it, sorted). The document id is the file name without extension.
    pub async fn ingest_path(
        &self,
        path: &Path,
    ) -> Result<Vec<(PathBuf, IngestOutcome)>, KnowledgeError> {
        let file_error = |reason: String| KnowledgeError::File {
            path: path.display().to_string(),
            reason,
        };
        let mut files = Vec::new();
        if path.is_dir() {
            for entry in std::fs::read_dir(path).map_err(|e| file_error(e.to_string()))? {
                let p = entry.map_err(|e| file_error(e.to_string()))?.path();
                if p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("md" | "txt" | "markdown")
                    )
                {
                    files.push(p);
                }
            }
            files.sort();
        } else if path.is_file() {
            files.push(path.to_path_buf());
        } else {
            return Err(file_error("no such file or directory".into()));
        }
        let mut outcomes = Vec::with_capacity(files.len());
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| KnowledgeError::File {
                path: file.display().to_string(),
                reason: e.to_string(),
            })?;
            let stem = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("document");
            let title = title_of(&text).unwrap_or_else(|| stem.replace(['-', '_'], " "));
            let body = match text.trim_start().strip_prefix('#') {
                // The heading is the title; the chunks carry it already.
                Some(_) => text
                    .trim_start()
                    .split_once('\n')
                    .map(|(_, rest)| rest)
                    .unwrap_or(""),
                None => &text,
            };
            let outcome = self
                .ingest(&slug(stem), &title, body, &file.display().to_string())
                .await?;
            outcomes.push((file, outcome));
        }
        Ok(outcomes)
    }

    /// The passages for `query`, best first (the cosine and full-text
    /// rankings fused), at least `min_score` similar to it.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let started = Instant::now();
        let result = async {
            let vector = self.embedder.embed_query(query).await?;
            self.search_hybrid(query, &vector, limit, min_score).await
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        KB_SEARCH
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Hybrid search with the question's embedding already made.
    pub async fn search_hybrid(
        &self,
        query: &str,
        vector: &[f32],
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let limit = limit.clamp(1, 100);
        let candidates = (limit * 4).max(MIN_CANDIDATES) as i64;
        let model = self.embedder.model_name();
        let vector = Vector::from(vector.to_vec());
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!("SET LOCAL hnsw.ef_search = {}", self.ef_search))
            .execute(&mut *tx)
            .await?;
        let by_vector: Vec<Row> = sqlx::query_as(
            "SELECT chunk_id, document_id, title, section, body, 1 - (embedding <=> $1) AS score
               FROM kb_chunks WHERE model = $2 ORDER BY embedding <=> $1 LIMIT $3",
        )
        .bind(&vector)
        .bind(model)
        .bind(candidates)
        .fetch_all(&mut *tx)
        .await?;
        let text_query = full_text_query(query);
        let by_text: Vec<Row> = if text_query.is_empty() {
            Vec::new()
        } else {
            // Chunks with any of the words; those with all of them (the
            // question as websearch_to_tsquery reads it) first.
            sqlx::query_as(
                "SELECT chunk_id, document_id, title, section, body, 1 - (embedding <=> $1) AS score
                   FROM kb_chunks, websearch_to_tsquery('english', $2) AS q,
                        websearch_to_tsquery('english', $5) AS all_words
                  WHERE model = $3 AND search_text @@ q
                  ORDER BY search_text @@ all_words DESC, ts_rank_cd(search_text, q) DESC, chunk_id
                  LIMIT $4",
            )
            .bind(&vector)
            .bind(&text_query)
            .bind(model)
            .bind(candidates)
            .bind(query.chars().take(2_000).collect::<String>())
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        let vector_ids: Vec<String> = by_vector.iter().map(|r| r.0.clone()).collect();
        let text_ids: Vec<String> = by_text.iter().map(|r| r.0.clone()).collect();
        let fused = weighted_reciprocal_rank_fusion(
            &[(&vector_ids, 1.0), (&text_ids, FULL_TEXT_WEIGHT)],
            RRF_K,
        );
        let mut rows: std::collections::HashMap<String, Row> = by_vector
            .into_iter()
            .chain(by_text)
            .map(|r| (r.0.clone(), r))
            .collect();
        Ok(fused
            .into_iter()
            .filter_map(|(id, _)| rows.remove(id))
            .filter(|r| r.5 >= min_score)
            .take(limit)
            .map(passage)
            .collect())
    }

    /// Approximate nearest neighbours of an embedding (HNSW), among the
    /// chunks of this knowledge base's model.
    pub async fn search_vector(
        &self,
        vector: &[f32],
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!("SET LOCAL hnsw.ef_search = {}", self.ef_search))
            .execute(&mut *tx)
            .await?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT chunk_id, document_id, title, section, body, 1 - (embedding <=> $1) AS score
               FROM kb_chunks WHERE model = $3 ORDER BY embedding <=> $1 LIMIT $2",
        )
        .bind(Vector::from(vector.to_vec()))
        .bind(limit as i64)
        .bind(self.embedder.model_name())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .filter(|r| r.5 >= min_score)
            .map(passage)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_stable_ids() {
        assert_eq!(slug("15-Export project DATA"), "15-export-project-data");
        assert_eq!(slug("  How do I export?  "), "how-do-i-export");
    }

    #[test]
    fn the_full_text_query_is_any_of_the_words() {
        assert_eq!(
            full_text_query("How do I export my tasks to CSV? Export!"),
            "how or do or export or my or tasks or to or csv"
        );
        assert_eq!(full_text_query("or AND not -- ?"), "");
        assert_eq!(full_text_query(&"word ".repeat(100)), "word");
        let many: String = (0..100).map(|i| format!("w{i} ")).collect();
        assert_eq!(
            full_text_query(&many).split(" or ").count(),
            MAX_QUERY_WORDS
        );
    }
}
