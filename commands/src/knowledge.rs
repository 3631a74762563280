//! The knowledge base: documents chunked with overlap, embedded, stored in
//! pgvector and searched by cosine similarity with a relevance threshold.

use std::path::{Path, PathBuf};
use std::time::Instant;

use casebook_domain::knowledge::{chunk, title_of};
use pgvector::Vector;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::embeddings::{EmbedError, Embedder};
use crate::metrics::KB_SEARCH;

/// Words per chunk and words shared with the next one.
pub const CHUNK_WORDS: usize = 120;
pub const CHUNK_OVERLAP: usize = 30;
/// Passages less similar than this to the question are not relevant.
pub const RELEVANCE_THRESHOLD: f64 = 0.35;
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

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Passage {
    pub chunk_id: String,
    pub document_id: String,
    pub title: String,
    pub body: String,
    pub score: f64,
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
        let hash = hex::encode(Sha256::digest(
            format!("{}\u{0}{title}\u{0}{body}", self.embedder.model_name()).as_bytes(),
        ));
        let stored: Option<String> =
            sqlx::query_scalar("SELECT content_hash FROM kb_documents WHERE document_id = $1")
                .bind(document_id)
                .fetch_optional(&self.pool)
                .await?;
        if stored.as_deref() == Some(hash.as_str()) {
            return Ok(IngestOutcome::Unchanged);
        }
        let chunks = chunk(title, body, CHUNK_WORDS, CHUNK_OVERLAP);
        let mut vectors = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(16) {
            let texts: Vec<String> = batch.iter().map(|c| c.text.clone()).collect();
            vectors.extend(self.embedder.embed(&texts).await?);
        }
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
        sqlx::query("DELETE FROM kb_chunks WHERE document_id = $1")
            .bind(document_id)
            .execute(&mut *tx)
            .await?;
        for (c, v) in chunks.iter().zip(vectors) {
            sqlx::query(
                "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, body, embedding) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(format!("{document_id}#{}", c.ordinal))
            .bind(document_id)
            .bind(c.ordinal as i32)
            .bind(title)
            .bind(&c.text)
            .bind(Vector::from(v))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(IngestOutcome::Stored {
            chunks: chunks.len(),
        })
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

    /// The passages most similar to `query`, best first, at least
    /// `min_score` similar.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let started = Instant::now();
        let result = async {
            let vector = self.embedder.embed_query(query).await?;
            self.search_vector(&vector, limit, min_score).await
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        KB_SEARCH
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Approximate nearest neighbours of an embedding (HNSW).
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
        let rows: Vec<(String, String, String, String, f64)> = sqlx::query_as(
            "SELECT chunk_id, document_id, title, body, 1 - (embedding <=> $1) AS score
               FROM kb_chunks ORDER BY embedding <=> $1 LIMIT $2",
        )
        .bind(Vector::from(vector.to_vec()))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .filter(|r| r.4 >= min_score)
            .map(|(chunk_id, document_id, title, body, score)| Passage {
                chunk_id,
                document_id,
                title,
                body,
                score,
            })
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
}
