//! The knowledge base's term counts (how many sections of each model hold
//! each full-text term, and how many sections each model has), which the
//! hybrid search weighs terms by: kept right by triggers through ingest,
//! re-ingest, re-embed, a document's delete, pruning and truncation; and a
//! common word in thousands of sections leaves the rare one deciding.

use std::path::PathBuf;

use casebook_agent::embeddings::{Embedder, EmbeddingSource, DIMENSIONS};
use casebook_agent::knowledge::{IngestOutcome, KnowledgeBase, TEXT_POOL};
use sqlx::PgPool;

use crate::common::TestDb;

fn demo(article: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("kb/demo/{article}.md"))
}

/// Sections per (model, lexeme), per model, and per (model, word as written).
pub(crate) type Counts = (
    Vec<(String, String, i64)>,
    Vec<(String, i64)>,
    Vec<(String, String, i64)>,
);

/// The counts the triggers keep, and the counts recomputed from the chunks.
async fn kept_and_recomputed(pool: &PgPool) -> (Counts, Counts) {
    let kept_terms =
        sqlx::query_as("SELECT model, lexeme, sections FROM kb_term_counts ORDER BY model, lexeme")
            .fetch_all(pool)
            .await
            .unwrap();
    let kept_models = sqlx::query_as("SELECT model, sections FROM kb_model_counts ORDER BY model")
        .fetch_all(pool)
        .await
        .unwrap();
    let terms = sqlx::query_as(
        "SELECT c.model, t.lexeme, count(*)
           FROM kb_chunks c CROSS JOIN LATERAL unnest(tsvector_to_array(c.search_text)) AS t(lexeme)
          GROUP BY c.model, t.lexeme ORDER BY c.model, t.lexeme",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let models =
        sqlx::query_as("SELECT model, count(*) FROM kb_chunks GROUP BY model ORDER BY model")
            .fetch_all(pool)
            .await
            .unwrap();
    let kept_words =
        sqlx::query_as("SELECT model, word, sections FROM kb_word_counts ORDER BY model, word")
            .fetch_all(pool)
            .await
            .unwrap();
    let words = sqlx::query_as(
        "SELECT c.model, w.word, count(*) FROM kb_chunks c
                CROSS JOIN LATERAL kb_chunk_words(c.title, c.section, c.body) AS w(word)
          GROUP BY c.model, w.word ORDER BY c.model, w.word",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (
        (kept_terms, kept_models, kept_words),
        (terms, models, words),
    )
}

/// The counts the triggers keep, checked against the chunks.
pub(crate) async fn assert_counts_right(pool: &PgPool, after: &str) -> Counts {
    let (kept, recomputed) = kept_and_recomputed(pool).await;
    assert_eq!(kept, recomputed, "term or word counts wrong after {after}");
    kept
}

fn sections_with(counts: &Counts, model: &str, lexeme: &str) -> i64 {
    counts
        .0
        .iter()
        .find(|(m, l, _)| m == model && l == lexeme)
        .map_or(0, |r| r.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_counts_stay_right_through_ingest_reingest_reembed_delete_and_prune() {
    let db = TestDb::create().await;
    let local = KnowledgeBase::new(
        db.pool.clone(),
        Embedder::new(&EmbeddingSource::Local(PathBuf::from(
            crate::agent::model_dir(),
        )))
        .expect("the embedding model is installed (deploy/local/install.sh)"),
    );
    let model = local.embedder().model_name().to_string();
    for article in [
        "15-export-project-data",
        "16-import-from-csv-and-other-tools",
        "02-log-in-and-reset-password",
    ] {
        local.ingest_path(&demo(article)).await.unwrap();
    }
    let counts = assert_counts_right(&db.pool, "ingest").await;
    assert!(sections_with(&counts, &model, "export") > 1, "{counts:?}");
    assert_eq!(sections_with(&counts, &model, "zebra"), 0);

    // A changed document: its old chunks go, its new ones come.
    let changed = || {
        local.ingest(
            "02-log-in-and-reset-password",
            "How do I log in?",
            "## Log in\n\nOpen the zebra page and log in.\n\n## Reset\n\nAsk for a new password.",
            "test",
        )
    };
    let outcome = changed().await.unwrap();
    assert!(matches!(outcome, IngestOutcome::Stored { chunks: 2 }));
    let counts = assert_counts_right(&db.pool, "re-ingest").await;
    assert_eq!(sections_with(&counts, &model, "zebra"), 1, "{counts:?}");
    // Ingesting it unchanged changes nothing.
    let outcome = changed().await.unwrap();
    assert_eq!(outcome, IngestOutcome::Unchanged);
    assert_eq!(
        assert_counts_right(&db.pool, "an unchanged ingest").await,
        counts
    );

    // A second model's chunks beside the first's, counted apart.
    let (_api, hashed) =
        crate::retrieval::remote_kb(&db.pool, crate::retrieval::BagOfWords, "hashed").await;
    let report = hashed.reembed().await.unwrap();
    assert_eq!(report.documents, 3);
    let counts = assert_counts_right(&db.pool, "re-embed").await;
    assert_eq!(counts.1.len(), 2, "{counts:?}");
    assert_eq!(counts.1[0].1, counts.1[1].1, "{counts:?}");
    assert_eq!(sections_with(&counts, "hashed", "zebra"), 1, "{counts:?}");
    // Re-embedding again replaces the model's chunks: the counts stay.
    hashed.reembed().await.unwrap();
    assert_eq!(
        assert_counts_right(&db.pool, "a second re-embed").await,
        counts
    );

    // Deleting a document takes its chunks of every model away.
    sqlx::query("DELETE FROM kb_documents WHERE document_id = '02-log-in-and-reset-password'")
        .execute(&db.pool)
        .await
        .unwrap();
    let counts = assert_counts_right(&db.pool, "a document's delete").await;
    assert_eq!(sections_with(&counts, &model, "zebra"), 0, "{counts:?}");
    assert_eq!(sections_with(&counts, "hashed", "zebra"), 0, "{counts:?}");

    // Pruning leaves only the new model's.
    assert!(hashed.prune_other_models().await.unwrap() > 0);
    let counts = assert_counts_right(&db.pool, "pruning").await;
    assert_eq!(counts.1.len(), 1, "{counts:?}");
    assert_eq!(counts.1[0].0, "hashed");
    assert_eq!(sections_with(&counts, &model, "export"), 0);

    // An update of a section's text moves its terms.
    sqlx::query(
        "UPDATE kb_chunks SET body = body || ' okapi' WHERE chunk_id = '15-export-project-data#0'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let counts = assert_counts_right(&db.pool, "an update").await;
    assert_eq!(sections_with(&counts, "hashed", "okapi"), 1, "{counts:?}");

    sqlx::query("TRUNCATE kb_chunks")
        .execute(&db.pool)
        .await
        .unwrap();
    let counts = assert_counts_right(&db.pool, "truncation").await;
    assert!(counts.0.is_empty() && counts.1.is_empty(), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_word_in_thousands_of_sections_leaves_the_rare_one_deciding() {
    let db = TestDb::create().await;
    // Search is given the question's vector: the embeddings API is never
    // called.
    let kb = KnowledgeBase::new(
        db.pool.clone(),
        Embedder::new(&EmbeddingSource::OpenAi {
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: None,
            model: "fixed".into(),
        })
        .unwrap(),
    );
    let common = TEXT_POOL + 1_000;
    sqlx::query(
        "INSERT INTO kb_documents (document_id, title, source, content_hash, body, model)
         VALUES ('settings', 'Project settings', 'test', '-', '-', 'fixed'),
                ('crossing', 'Crossings', 'test', '-', '-', 'fixed')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Every section holds "project" (in its text); the one about zebras
    // comes last, with the same vector as all the others.
    sqlx::query(
        "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, section, body, embedding, model)
         SELECT 'settings#' || n, 'settings', n, 'Project settings', 'Project settings › Part ' || n,
                'Open the project and change part ' || n || ' of its settings.',
                array_fill(0.05::real, ARRAY[384])::vector, 'fixed'
           FROM generate_series(1, $1) AS n
         UNION ALL
         SELECT 'crossing#0', 'crossing', 0, 'Crossings', 'Crossings › Zebra crossings',
                'A project may draw a zebra crossing.', array_fill(0.05::real, ARRAY[384])::vector, 'fixed'",
    )
    .bind(common)
    .execute(&db.pool)
    .await
    .unwrap();
    let vector = vec![0.05f32; DIMENSIONS];

    let found = kb
        .search_hybrid("zebra project", &vector, 5, -1.0)
        .await
        .unwrap();
    assert_eq!(found[0].chunk_id, "crossing#0", "{found:#?}");
    assert!(found[0].score > found[1].score, "{found:#?}");

    // Only the common word (in more sections than the full-text side
    // ranks): the embedding brings the candidates.
    let found = kb.search_hybrid("project", &vector, 5, -1.0).await.unwrap();
    assert_eq!(found.len(), 5, "{found:#?}");
}
