//! The knowledge base for staff: the same search the AI runs (same
//! embeddings, same relevance threshold), and adding a document.

use async_graphql::{Context, Object, SimpleObject, ID};
use casebook_agent::embeddings::{Embedder, EmbeddingSource};
use casebook_agent::knowledge::{
    slug, IngestOutcome, KnowledgeBase, Passage as KbPassage, RELEVANCE_THRESHOLD,
};
use sqlx::PgPool;
use tokio::sync::OnceCell;

use super::context::{bad_input, coded, forbidden, internal, require_staff, viewer};
use crate::auth::Role;

/// Passages `knowledgeSearch` returns by default, and at most.
const DEFAULT_PASSAGES: i32 = 5;
const MAX_PASSAGES: i32 = 20;
/// The longest query, and the largest document, staff may send.
const QUERY_MAX: usize = 1_000;
const TITLE_MAX: usize = 200;
const DOCUMENT_MAX: usize = 200_000;

/// The knowledge base, with its embedding model loaded on first use (an
/// API replica that never searches never loads it).
pub struct LazyKnowledge {
    pool: PgPool,
    source: EmbeddingSource,
    ef_search: u32,
    kb: OnceCell<KnowledgeBase>,
}

impl LazyKnowledge {
    pub fn new(pool: PgPool, source: EmbeddingSource, ef_search: u32) -> Self {
        Self {
            pool,
            source,
            ef_search,
            kb: OnceCell::new(),
        }
    }

    pub async fn get(&self) -> Result<&KnowledgeBase, String> {
        self.kb
            .get_or_try_init(|| async {
                let source = self.source.clone();
                let embedder = tokio::task::spawn_blocking(move || Embedder::new(&source))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(
                    KnowledgeBase::new(self.pool.clone(), embedder).with_ef_search(self.ef_search),
                )
            })
            .await
    }
}

/// One retrieved passage.
#[derive(SimpleObject, Clone, Debug)]
pub struct Passage {
    pub document_id: ID,
    pub title: String,
    /// Where in the article the passage sits: its heading path ("Title ›
    /// Section"), when it has one.
    pub section: Option<String>,
    pub text: String,
    /// How relevant the passage is to the query: its cosine similarity
    /// plus its lexical evidence (on the cosine's scale; above 1 for a
    /// close match in both words and meaning).
    pub score: f64,
}

impl From<KbPassage> for Passage {
    fn from(p: KbPassage) -> Self {
        Self {
            document_id: ID(p.document_id),
            section: p.section.clone(),
            title: p.title,
            text: p.body,
            score: p.score,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct KnowledgeDocument {
    pub id: ID,
    pub title: String,
    /// Passages stored (0 when the same text was already there).
    pub chunks: i32,
    pub unchanged: bool,
}

#[derive(Default)]
pub struct KnowledgeQuery;

#[Object]
impl KnowledgeQuery {
    /// The passages the AI would be given for this query, best first.
    async fn knowledge_search(
        &self,
        ctx: &Context<'_>,
        query: String,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<Passage>> {
        require_staff(ctx, "search the knowledge base")?;
        let query = query.trim();
        if query.is_empty() || query.chars().count() > QUERY_MAX {
            return Err(bad_input(format!(
                "query must have 1 to {QUERY_MAX} characters"
            )));
        }
        let first = first.unwrap_or(DEFAULT_PASSAGES);
        if !(1..=MAX_PASSAGES).contains(&first) {
            return Err(bad_input(format!(
                "first must be between 1 and {MAX_PASSAGES}"
            )));
        }
        let kb = ctx.data::<std::sync::Arc<LazyKnowledge>>()?;
        let kb = kb.get().await.map_err(|e| {
            tracing::error!(error = %e, "embedding model unavailable");
            coded("the knowledge base is unavailable", "UNAVAILABLE")
        })?;
        let passages = kb
            .search(query, first as usize, RELEVANCE_THRESHOLD)
            .await
            .map_err(internal)?;
        Ok(passages.into_iter().map(Passage::from).collect())
    }
}

#[derive(Default)]
pub struct KnowledgeMutation;

#[Object]
impl KnowledgeMutation {
    /// Adds (or replaces, by title) a knowledge base document. Supervisors
    /// only.
    async fn add_knowledge_document(
        &self,
        ctx: &Context<'_>,
        title: String,
        body: String,
    ) -> async_graphql::Result<KnowledgeDocument> {
        if viewer(ctx)?.role != Role::Supervisor {
            return Err(forbidden("manage the knowledge base"));
        }
        let title = title.trim().to_string();
        if title.is_empty() || title.chars().count() > TITLE_MAX {
            return Err(bad_input(format!(
                "title must have 1 to {TITLE_MAX} characters"
            )));
        }
        if body.trim().is_empty() || body.len() > DOCUMENT_MAX {
            return Err(bad_input(format!(
                "body must have 1 to {DOCUMENT_MAX} bytes"
            )));
        }
        let id = slug(&title);
        if id.is_empty() {
            return Err(bad_input("title needs a letter or digit"));
        }
        let kb = ctx.data::<std::sync::Arc<LazyKnowledge>>()?;
        let kb = kb.get().await.map_err(|e| {
            tracing::error!(error = %e, "embedding model unavailable");
            coded("the knowledge base is unavailable", "UNAVAILABLE")
        })?;
        let outcome = kb
            .ingest(&id, &title, &body, "graphql")
            .await
            .map_err(internal)?;
        Ok(KnowledgeDocument {
            id: ID(id),
            title,
            chunks: match outcome {
                IngestOutcome::Unchanged => 0,
                IngestOutcome::Stored { chunks } => chunks as i32,
            },
            unchanged: outcome == IngestOutcome::Unchanged,
        })
    }
}
