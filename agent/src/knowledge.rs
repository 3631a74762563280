//! The knowledge base: articles split into sections (each with its heading
//! path), embedded (the section's text, and its heading path alone),
//! stored in pgvector with a weighted tsvector, and searched both ways: the
//! sections nearest the question's embedding and those sharing its words
//! are the candidates, ranked by relevance (the larger of the text's and
//! the heading path's cosine similarity, plus the idf-weighted share of
//! the question's words each holds, in headings or text, plus its
//! article's support, read against how near the question is to the
//! knowledge base as a whole: `casebook_domain::retrieval`); a passage
//! must be at least [`RELEVANCE_THRESHOLD`] relevant to count.
//!
//! Every chunk records the model that embedded it (and the vector's
//! dimension): search reads only the chunks of the model it embeds the
//! question with. [`KnowledgeBase::reembed`] adds a new model's chunks
//! beside the old ones, so search never finds nothing during a switch;
//! [`KnowledgeBase::prune_other_models`] removes the old ones afterwards.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use casebook_domain::knowledge::{sections, title_of, Section};
use casebook_domain::retrieval::{
    has_synonyms, rank, relevant, strip_pleasantries, synonyms, Candidate, CandidateSet, QueryTerm,
    RankingParams, TermMatch, CLOSENESS_NEIGHBOURS,
};
use casebook_domain::spelling::{self, Vocabulary};
use pgvector::Vector;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::sync::atomic::Ordering;

use crate::embeddings::{EmbedError, Embedder};
use casebook_commands::metrics::KB_SEARCH;

/// Most words per section chunk (a longer section is cut between blocks).
pub const CHUNK_WORDS: usize = 180;
/// Passages less relevant than this to the question do not count: the
/// knowledge-gap line, calibrated on the tuning split of `kb/eval` for the
/// ranking's weights (`RankingParams::default`; `casebook bench answers`,
/// docs/performance.md).
pub const RELEVANCE_THRESHOLD: f64 = 0.589;
/// How far under [`RELEVANCE_THRESHOLD`] (or the line a search asks for)
/// passages still come with the best one, once that is over it: the other
/// sections an answer may need. About the part the lexical evidence and
/// the article's support add to a section of the right article.
pub const CONTEXT_BAND: f64 = 0.12;
/// Candidates each ranking contributes, at least: the nearest by
/// embedding are also what a question's closeness to the knowledge base is
/// measured over (`retrieval::closeness`).
const MIN_CANDIDATES: usize = CLOSENESS_NEIGHBOURS;
/// Words of a question used for full-text search.
const MAX_QUERY_WORDS: usize = 32;
/// Synonyms of a question's words searched for, at most.
const MAX_SYNONYMS: usize = 16;
/// Characters of a question read for its words.
const MAX_QUERY_CHARS: usize = 2_000;
/// Sections the full-text side ranks (ts_rank) for one question, at most:
/// those holding the question's rarer terms (`text_pool`). Ranking every
/// section holding a common word ("project": half of them) would cost
/// tens of milliseconds at 100,000 sections (`casebook bench kb`).
pub const TEXT_POOL: i64 = 2_000;
/// Words of the knowledge base's vocabulary a typo may be corrected to, at
/// most: its most frequent (`kb_word_counts`). Bounds the memory a
/// vocabulary takes and the time a correction does.
pub const MAX_VOCABULARY: usize = 50_000;
/// How long a vocabulary read from the store serves before it is read
/// again: other processes may have ingested meanwhile (this one's own
/// writes drop it at once).
const VOCABULARY_TTL: Duration = Duration::from_secs(60);
/// Words of a question checked against the knowledge base's stems, and
/// words corrected, at most.
const MAX_TYPOS: usize = 4;
/// What the chunking is: a change re-chunks unchanged documents.
/// "sections-v2": each section's heading path is embedded alone too.
const CHUNKING: &str = "sections-v2";
/// HNSW candidates examined per search: recall against latency. On
/// 100,000 chunks 400 finds the exact ten nearest for questions near a
/// topic (as questions about the product are) and keeps recall@10 above
/// 0.9 overall, leaving room in 20 ms for the full-text side of the hybrid
/// search; pgvector's most, 1000, takes about 15 ms alone
/// (docs/performance.md, `casebook bench kb`).
pub const EF_SEARCH: u32 = 400;

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
    /// How relevant the passage is to the question: its cosine similarity
    /// plus its lexical evidence (`casebook_domain::retrieval`), on the
    /// cosine's scale.
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

/// The candidate sections for a question ([`KnowledgeBase::candidates`]),
/// to rank.
#[derive(Debug, Clone)]
pub struct Candidates {
    pub set: CandidateSet,
    rows: Vec<Row>,
}

impl Candidates {
    /// The `limit` most relevant passages, best first, when the best is at
    /// least `min_score` relevant: it and those within [`CONTEXT_BAND`]
    /// under that line. Each passage's score is its relevance.
    pub fn ranked(&self, params: &RankingParams, limit: usize, min_score: f64) -> Vec<Passage> {
        relevant(rank(&self.set, params), min_score, CONTEXT_BAND)
            .into_iter()
            .take(limit)
            .map(|r| {
                let mut row = self.rows[r.candidate].clone();
                row.5 = r.relevance;
                passage(row)
            })
            .collect()
    }
}

/// A section's two vectors: its text's and its heading path's.
struct SectionVectors {
    text: Vec<f32>,
    heading: Vec<f32>,
}

/// What a re-embedding did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReembedReport {
    pub documents: usize,
    pub chunks: usize,
}

fn content_hash(model: &str, title: &str, body: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{CHUNKING}\u{0}{model}\u{0}{title}\u{0}{body}").as_bytes(),
    ))
}

type Row = (String, String, String, Option<String>, String, f64);
/// A [`Row`], the question's cosine to the section's heading path (None
/// for a chunk stored without its vector) and the question's terms it
/// holds ([`held`]).
type HeldRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    f64,
    Option<f64>,
    Vec<String>,
);

/// The column of a candidate query that says which of the question's
/// terms (`terms`, a text[] parameter) the row of `table` holds and where:
/// each as two flags, in the heading path ('1' or '0', weight A) and in the
/// text (weight D), then the lexeme. Read with the row: no second
/// statement.
fn held(table: &str, terms: &str) -> String {
    format!(
        "ARRAY(SELECT CASE WHEN 'A' = ANY(u.weights) THEN '1' ELSE '0' END
                      || CASE WHEN 'D' = ANY(u.weights) THEN '1' ELSE '0' END
                      || u.lexeme
                 FROM unnest({table}.search_text) AS u
                WHERE u.lexeme = ANY({terms}::text[])) AS held"
    )
}

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

/// Whether a question's typos are corrected, and where the correction goes
/// (`casebook bench answers` measured each; docs/performance.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpellingCorrection {
    /// The question as the customer wrote it.
    Off,
    /// The corrected words join the full-text search and the lexical
    /// share; the question is embedded as written.
    Words,
    /// The corrected question is searched for and embedded.
    WordsAndEmbedding,
}

/// What spelling correction keeps between searches.
#[derive(Default)]
struct Spelling {
    /// Real words: the embedding model's whole words (None: a model
    /// behind an API; no word can be told to be a typo, none is corrected).
    dictionary: OnceLock<Option<HashSet<String>>>,
    /// The knowledge base's words, and when they were read.
    vocabulary: Mutex<Option<(Instant, Arc<Vocabulary>)>>,
    /// Moved on by every change this process makes to the knowledge base:
    /// a read begun before one is not kept after it.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct KnowledgeBase {
    pool: PgPool,
    embedder: Embedder,
    ef_search: u32,
    ranking: RankingParams,
    correction: SpellingCorrection,
    spelling: Arc<Spelling>,
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
            ranking: RankingParams::default(),
            correction: SpellingCorrection::WordsAndEmbedding,
            spelling: Arc::new(Spelling::default()),
        }
    }

    /// Corrects typos otherwise (for measuring it: `casebook bench
    /// answers`).
    pub fn with_spelling_correction(mut self, correction: SpellingCorrection) -> Self {
        self.correction = correction;
        self
    }

    /// Candidates the HNSW search examines (more: better recall, slower).
    pub fn with_ef_search(mut self, ef_search: u32) -> Self {
        self.ef_search = ef_search.clamp(1, 1000);
        self
    }

    /// Ranks with other weights (for tuning them: `casebook bench answers`).
    pub fn with_ranking(mut self, ranking: RankingParams) -> Self {
        self.ranking = ranking;
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
        self.forget_vocabulary();
        Ok(IngestOutcome::Stored {
            chunks: chunks.len(),
        })
    }

    /// An article's sections with their vectors: each section's text
    /// ([`Section::embedding_text`]) and its heading path alone (each
    /// distinct path once: the parts of a long section share theirs, and
    /// two sections may have the same headings).
    async fn embed_sections(
        &self,
        title: &str,
        body: &str,
    ) -> Result<(Vec<Section>, Vec<SectionVectors>), KnowledgeError> {
        let chunks = sections(title, body, CHUNK_WORDS);
        let mut headings: Vec<&str> = chunks.iter().map(|c| c.heading.as_str()).collect();
        headings.sort_unstable();
        headings.dedup();
        let texts: Vec<String> = chunks
            .iter()
            .map(Section::embedding_text)
            .chain(headings.iter().map(|h| h.to_string()))
            .collect();
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(16) {
            vectors.extend(self.embedder.embed(batch).await?);
        }
        let heading_vectors = vectors.split_off(chunks.len());
        let by_heading: std::collections::HashMap<&str, &Vec<f32>> =
            headings.iter().copied().zip(&heading_vectors).collect();
        let paired = chunks
            .iter()
            .zip(vectors)
            .map(|(c, text)| SectionVectors {
                text,
                heading: by_heading[c.heading.as_str()].clone(),
            })
            .collect();
        Ok((chunks, paired))
    }

    async fn insert_chunks(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        document_id: &str,
        title: &str,
        chunks: &[Section],
        vectors: Vec<SectionVectors>,
    ) -> Result<(), KnowledgeError> {
        for (c, v) in chunks.iter().zip(vectors) {
            sqlx::query(
                "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, section, body, embedding, heading_embedding, model)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(format!("{document_id}#{}", c.ordinal))
            .bind(document_id)
            .bind(c.ordinal as i32)
            .bind(title)
            .bind(&c.heading)
            .bind(&c.text)
            .bind(Vector::from(v.text))
            .bind(Vector::from(v.heading))
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
            self.forget_vocabulary();
            report.documents += 1;
            report.chunks += chunks.len();
        }
        Ok(report)
    }

    /// Removes the chunks of every model but this one (after a re-embed,
    /// once every process embeds questions with this model). Returns how
    /// many were removed.
    pub async fn prune_other_models(&self) -> Result<u64, KnowledgeError> {
        let removed = sqlx::query("DELETE FROM kb_chunks WHERE model <> $1")
            .bind(self.embedder.model_name())
            .execute(&self.pool)
            .await?
            .rows_affected();
        self.forget_vocabulary();
        Ok(removed)
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
    /// candidates ranked by relevance), at least `min_score` relevant.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let started = Instant::now();
        let result = async {
            let found = self.find(query, limit).await?;
            Ok(found.ranked(&self.ranking, limit.clamp(1, 100), min_score))
        }
        .await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        KB_SEARCH
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The candidates for a customer's question: its greetings and
    /// signature left out (`retrieval::strip_pleasantries`), embedded, and
    /// looked up both ways.
    pub async fn find(&self, question: &str, limit: usize) -> Result<Candidates, KnowledgeError> {
        let query: String = strip_pleasantries(question)
            .chars()
            .take(MAX_QUERY_CHARS)
            .collect();
        let corrections = self.typos(&query).await?;
        let corrected = spelling::apply(&query, &corrections);
        let embedded = match self.correction {
            SpellingCorrection::WordsAndEmbedding => &corrected,
            SpellingCorrection::Words | SpellingCorrection::Off => &query,
        };
        let vector = self.embedder.embed_query(embedded).await?;
        self.candidates(&corrected, &vector, limit).await
    }

    /// The typos of `query` and their corrections
    /// (`casebook_domain::spelling`): its words of at least four letters
    /// that are not real words (the embedding model's whole words, the
    /// synonym table's), not words of the knowledge base, and not a form
    /// of one (their stem is not one of its terms: "exporting"), each with
    /// the nearest word of the knowledge base within the distance its
    /// length allows; at most [`MAX_TYPOS`]. None when correction is off
    /// or the model's words are not known.
    pub async fn typos(&self, query: &str) -> Result<Vec<(String, String)>, KnowledgeError> {
        if self.correction == SpellingCorrection::Off {
            return Ok(Vec::new());
        }
        // As much of it as a search reads.
        let query = match query.char_indices().nth(MAX_QUERY_CHARS) {
            Some((end, _)) => &query[..end],
            None => query,
        };
        let Some(dictionary) = self
            .spelling
            .dictionary
            .get_or_init(|| self.embedder.words())
        else {
            return Ok(Vec::new());
        };
        let real = |w: &str| dictionary.contains(w) || has_synonyms(w);
        // The model's words first (in memory): most questions have no
        // other, and the vocabulary need not be read.
        let unknown = spelling::unknown_words(query, MAX_QUERY_WORDS, &Vocabulary::default(), real);
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let vocabulary = self.vocabulary().await?;
        // Corrections first (in memory): only a word that has one is
        // looked up as a possible form of a knowledge base word.
        let candidates: Vec<(String, String)> = unknown
            .into_iter()
            .filter(|w| !vocabulary.contains(w))
            .filter_map(|typo| {
                let correction = vocabulary.correction(&typo)?.word.to_string();
                Some((typo, correction))
            })
            .take(MAX_TYPOS)
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let words: Vec<&str> = candidates.iter().map(|(typo, _)| typo.as_str()).collect();
        let held: Vec<bool> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1
                              FROM unnest(tsvector_to_array(to_tsvector('english', q.word))) AS l(lexeme)
                                   JOIN kb_term_counts c ON c.model = $1 AND c.lexeme = l.lexeme)
               FROM unnest($2::text[]) WITH ORDINALITY AS q(word, i)
              ORDER BY q.i",
        )
        .bind(self.embedder.model_name())
        .bind(&words)
        .fetch_all(&self.pool)
        .await?;
        // One answer per word, in order (a word with none is left as it is).
        Ok(candidates
            .into_iter()
            .zip(held)
            .filter(|(_, held)| !held)
            .map(|(pair, _)| pair)
            .collect())
    }

    /// The knowledge base's words (`kb_word_counts`, the [`MAX_VOCABULARY`]
    /// most frequent), as read at most [`VOCABULARY_TTL`] ago.
    async fn vocabulary(&self) -> Result<Arc<Vocabulary>, KnowledgeError> {
        if let Some((read, vocabulary)) = self
            .spelling
            .vocabulary
            .lock()
            .expect("not poisoned")
            .as_ref()
        {
            if read.elapsed() < VOCABULARY_TTL {
                return Ok(vocabulary.clone());
            }
        }
        let read = Instant::now();
        let generation = self.spelling.generation.load(Ordering::SeqCst);
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT word, sections FROM kb_word_counts WHERE model = $1
              ORDER BY sections DESC, word LIMIT $2",
        )
        .bind(self.embedder.model_name())
        .bind(MAX_VOCABULARY as i64)
        .fetch_all(&self.pool)
        .await?;
        let vocabulary = Arc::new(Vocabulary::new(
            rows.into_iter().map(|(w, n)| (w, n.max(0) as u64)),
            MAX_VOCABULARY,
        ));
        let mut kept = self.spelling.vocabulary.lock().expect("not poisoned");
        // Read across a change this process made: used once, not kept.
        if self.spelling.generation.load(Ordering::SeqCst) == generation {
            *kept = Some((read, vocabulary.clone()));
        }
        Ok(vocabulary)
    }

    /// Drops the vocabulary read: this process changed the knowledge base.
    fn forget_vocabulary(&self) {
        let mut kept = self.spelling.vocabulary.lock().expect("not poisoned");
        self.spelling.generation.fetch_add(1, Ordering::SeqCst);
        *kept = None;
    }

    /// Hybrid search with the question's embedding already made: the
    /// candidates ([`KnowledgeBase::candidates`]) ranked by relevance
    /// (`casebook_domain::retrieval`).
    pub async fn search_hybrid(
        &self,
        query: &str,
        vector: &[f32],
        limit: usize,
        min_score: f64,
    ) -> Result<Vec<Passage>, KnowledgeError> {
        let limit = limit.clamp(1, 100);
        let found = self.candidates(query, vector, limit).await?;
        Ok(found.ranked(&self.ranking, limit, min_score))
    }

    /// The sections worth ranking for a question: the nearest by embedding
    /// and those sharing most of its words (at least [`MIN_CANDIDATES`]
    /// each), with which of the question's terms each holds and where, and
    /// how many sections hold each term.
    pub async fn candidates(
        &self,
        query: &str,
        vector: &[f32],
        limit: usize,
    ) -> Result<Candidates, KnowledgeError> {
        let per_ranking = (limit.clamp(1, 100) * 4).max(MIN_CANDIDATES) as i64;
        let model = self.embedder.model_name();
        let vector = Vector::from(vector.to_vec());
        let query: String = query.chars().take(MAX_QUERY_CHARS).collect();
        let mut tx = self.pool.begin().await?;
        // The question's terms as the index has them (stemmed, without
        // stop words), in the order they come.
        let terms: Vec<String> = sqlx::query_scalar(
            "SELECT lexeme FROM (
                 SELECT lexeme, min(position) AS first
                   FROM unnest(to_tsvector('english', $1)) AS t(lexeme, positions, weights),
                        unnest(positions) AS position
                  GROUP BY lexeme) AS words
              ORDER BY first, lexeme LIMIT $2",
        )
        .bind(&query)
        .bind(MAX_QUERY_WORDS as i64)
        .fetch_all(&mut *tx)
        .await?;
        // Their synonyms (`retrieval::synonyms`), stemmed alike: each
        // stands for the question's word it was found for.
        let pairs = synonyms(&query, MAX_SYNONYMS);
        let (words, alternatives): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
        let stemmed: Vec<(String, String)> = if words.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT w.lexeme, a.lexeme
                   FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS p(word, alternative, i)
                        CROSS JOIN LATERAL unnest(to_tsvector('english', p.word)) AS w
                        CROSS JOIN LATERAL unnest(to_tsvector('english', p.alternative)) AS a
                  ORDER BY p.i",
            )
            .bind(&words)
            .bind(&alternatives)
            .fetch_all(&mut *tx)
            .await?
        };
        let mut stands_for: Vec<Option<usize>> = vec![None; terms.len()];
        let mut terms = terms;
        for (word, alternative) in stemmed {
            let Some(i) = terms.iter().position(|t| *t == word) else {
                continue;
            };
            if stands_for[i].is_none() && !terms.contains(&alternative) {
                terms.push(alternative);
                stands_for.push(Some(i));
            }
        }
        // How many sections hold each term, and how many there are, as
        // the triggers on kb_chunks keep them (migration kb_term_counts).
        // The HNSW search's candidates are set for the transaction here
        // too (one round trip less than a SET LOCAL of its own).
        let (total, counts, _): (i64, Vec<i64>, String) = sqlx::query_as(
            "SELECT coalesce((SELECT sections FROM kb_model_counts WHERE model = $1), 0),
                    ARRAY(SELECT coalesce(c.sections, 0)
                            FROM unnest($2::text[]) WITH ORDINALITY AS t(l, i)
                                 LEFT JOIN kb_term_counts c ON c.model = $1 AND c.lexeme = t.l
                           ORDER BY t.i),
                    set_config('hnsw.ef_search', $3, true)",
        )
        .bind(model)
        .bind(&terms)
        .bind(self.ef_search.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let by_vector: Vec<HeldRow> = sqlx::query_as(&format!(
            "SELECT chunk_id, document_id, title, section, body, 1 - (embedding <=> $1) AS score,
                    1 - (heading_embedding <=> $1) AS heading_score, {}
               FROM kb_chunks WHERE model = $2 ORDER BY embedding <=> $1 LIMIT $3",
            held("kb_chunks", "$4")
        ))
        .bind(&vector)
        .bind(model)
        .bind(per_ranking)
        .bind(&terms)
        .fetch_all(&mut *tx)
        .await?;
        let pooled = text_pool(&terms, &counts, TEXT_POOL);
        let by_text: Vec<HeldRow> = if pooled.is_empty() {
            Vec::new()
        } else {
            // Sections with any of the terms, those with the most (in
            // headings first) ranked first; among the (at most TEXT_POOL)
            // sections holding the rarer terms (`text_pool`). The LIMIT
            // holds the bound should the counts have moved meanwhile.
            sqlx::query_as(&format!(
                "WITH pool AS (
                     SELECT chunk_id, search_text
                       FROM kb_chunks
                      WHERE model = $3
                        AND search_text @@ CAST(array_to_string(ARRAY(SELECT quote_literal(l) FROM unnest($5::text[]) AS l), ' | ') AS tsquery)
                      LIMIT $6),
                 q AS (
                     SELECT CAST(array_to_string(ARRAY(SELECT quote_literal(l) FROM unnest($2::text[]) AS l), ' | ') AS tsquery) AS q),
                 best AS (
                     SELECT chunk_id, ts_rank(search_text, q.q) AS r
                       FROM pool, q
                      ORDER BY r DESC, chunk_id
                      LIMIT $4)
                 SELECT c.chunk_id, c.document_id, c.title, c.section, c.body, 1 - (c.embedding <=> $1) AS score,
                        1 - (c.heading_embedding <=> $1) AS heading_score, {}
                   FROM best JOIN kb_chunks c ON c.model = $3 AND c.chunk_id = best.chunk_id
                  ORDER BY best.r DESC, best.chunk_id",
                held("c", "$2")
            ))
            .bind(&vector)
            .bind(&terms)
            .bind(model)
            .bind(per_ranking)
            .bind(&pooled)
            .bind(TEXT_POOL)
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        let term_index: std::collections::HashMap<&str, usize> = terms
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        // Each section once (both sides may bring it), with the evidence
        // the ranking reads and the row its passage is made from.
        let mut seen: HashSet<String> = HashSet::with_capacity(by_vector.len() + by_text.len());
        let mut candidates: Vec<Candidate> = Vec::with_capacity(seen.capacity());
        let mut rows: Vec<Row> = Vec::with_capacity(seen.capacity());
        for (chunk_id, document_id, title, section, body, score, heading_score, terms_held) in
            by_vector.into_iter().chain(by_text)
        {
            if !seen.insert(chunk_id.clone()) {
                continue;
            }
            let matches = terms_held
                .iter()
                .filter_map(|h| {
                    let (flags, lexeme) = (h.get(..2)?, h.get(2..)?);
                    Some(TermMatch {
                        term: *term_index.get(lexeme)?,
                        in_heading: flags.starts_with('1'),
                        in_body: flags.ends_with('1'),
                    })
                })
                .collect();
            candidates.push(Candidate {
                id: chunk_id.clone(),
                document: document_id.clone(),
                cosine: score,
                heading_cosine: heading_score,
                matches,
            });
            rows.push((chunk_id, document_id, title, section, body, score));
        }
        let set = CandidateSet {
            total_sections: total.max(0) as u64,
            terms: terms
                .iter()
                .zip(counts.iter().chain(std::iter::repeat(&0)))
                .zip(&stands_for)
                .map(|((lexeme, n), stands_for)| QueryTerm {
                    lexeme: lexeme.clone(),
                    sections_with: (*n).max(0) as u64,
                    stands_for: *stands_for,
                })
                .collect(),
            candidates,
        };
        Ok(Candidates { set, rows })
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

/// The terms whose sections the full-text side ranks: the rarest first
/// (`counts[i]` sections hold `terms[i]`), as long as at most `pool`
/// sections hold them together. Terms no section holds are left out, and so
/// are terms more than `pool` sections hold: such a word (in thousands of
/// sections) cannot pick a few out; it still counts, by its idf, in the
/// ranking of the candidates the rarer words and the embedding bring. When
/// every held term fits, these are all of them: the full-text side ranks
/// every section holding any, as it would without a bound.
fn text_pool(terms: &[String], counts: &[i64], pool: i64) -> Vec<String> {
    let mut order: Vec<usize> = (0..terms.len())
        .filter(|i| counts.get(*i).copied().unwrap_or(0) > 0)
        .collect();
    order.sort_by_key(|i| (counts[*i], *i));
    let mut pooled = Vec::new();
    let mut sections = 0i64;
    for i in order {
        sections = sections.saturating_add(counts[i]);
        if sections > pool {
            break;
        }
        pooled.push(terms[i].clone());
    }
    pooled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_pool_takes_the_rarer_terms_while_they_fit() {
        let terms: Vec<String> = ["project", "export", "csv", "zzz", "large"]
            .map(String::from)
            .to_vec();
        // Every held term fits: all of them, rarest first.
        assert_eq!(
            text_pool(&terms, &[50, 20, 5, 0, 30], 1_000),
            ["csv", "export", "large", "project"]
        );
        // "project" would take the pool over its bound.
        assert_eq!(
            text_pool(&terms, &[50_000, 800, 100, 0, 1_200], 2_000),
            ["csv", "export"]
        );
        // Even the rarest is over it: none of them picks candidates.
        assert!(text_pool(&terms, &[50_000, 9_000, 4_000, 0, 30_000], 2_000).is_empty());
        // Exactly at the bound still fits.
        assert_eq!(
            text_pool(&terms, &[50_000, 1_500, 500, 0, 30_000], 2_000),
            ["csv", "export"]
        );
        // Nothing held, or no terms: nothing to rank.
        assert!(text_pool(&terms, &[0, 0, 0, 0, 0], 2_000).is_empty());
        assert!(text_pool(&[], &[], 2_000).is_empty());
    }

    #[test]
    fn slugs_are_stable_ids() {
        assert_eq!(slug("15-Export project DATA"), "15-export-project-data");
        assert_eq!(slug("  How do I export?  "), "how-do-i-export");
    }
}
