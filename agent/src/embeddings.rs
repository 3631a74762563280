//! Sentence embeddings: all-MiniLM-L6-v2 run in-process (candle), or an
//! OpenAI-compatible `/v1/embeddings` endpoint. 384 dimensions, unit length.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use casebook_domain::retry::Backoff;
use serde::Deserialize;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use casebook_commands::metrics::EXTERNAL_CALLS;
use casebook_commands::retry::retry;

pub const DIMENSIONS: usize = 384;
/// The model's training length; longer inputs are truncated.
const MAX_TOKENS: usize = 256;
const API_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3), 4);

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding model files: {0}")]
    Model(String),
    #[error("embedding: {0}")]
    Compute(String),
    #[error("embeddings API: {0}")]
    Api(String),
    #[error("embeddings API: {0}")]
    Transient(String),
}

/// Where embeddings come from (`CASEBOOK_EMBEDDINGS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingSource {
    /// `local:<dir>`: model.safetensors, config.json and tokenizer.json.
    Local(PathBuf),
    /// `openai`: `<base>/embeddings` (base as in `LLM_BASE_URL`, version
    /// included, e.g. `https://api.openai.com/v1`), asking for 384 dimensions.
    OpenAi {
        base_url: String,
        api_key: Option<String>,
        model: String,
    },
}

struct LocalModel {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl LocalModel {
    fn load(dir: &Path) -> Result<Self, EmbedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(EmbedError::Model(format!(
                    "{} is missing (deploy/local/install.sh fetches the model)",
                    path.display()
                )))
            }
        };
        let config: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(read("config.json")?)
                .map_err(|e| EmbedError::Model(e.to_string()))?,
        )
        .map_err(|e| EmbedError::Model(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_file(read("tokenizer.json")?)
            .map_err(|e| EmbedError::Model(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Model(e.to_string()))?;
        let device = Device::Cpu;
        // SAFETY: the weights file is memory-mapped read-only and not
        // modified while the process runs.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[read("model.safetensors")?], DType::F32, &device)
        }
        .map_err(|e| EmbedError::Model(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &config).map_err(|e| EmbedError::Model(e.to_string()))?;
        Ok(Self {
            model,
            tokenizer,
            device,
        })
    }

    /// Mean-pooled over real tokens, L2-normalised.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let compute = |e: candle_core::Error| EmbedError::Compute(e.to_string());
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Compute(e.to_string()))?;
        let ids: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_ids(), &self.device))
            .collect::<Result<_, _>>()
            .map_err(compute)?;
        let masks: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_attention_mask(), &self.device))
            .collect::<Result<_, _>>()
            .map_err(compute)?;
        let ids = Tensor::stack(&ids, 0).map_err(compute)?;
        let mask = Tensor::stack(&masks, 0).map_err(compute)?;
        let token_types = ids.zeros_like().map_err(compute)?;
        let hidden = self
            .model
            .forward(&ids, &token_types, Some(&mask))
            .map_err(compute)?;
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(compute)?
            .unsqueeze(2)
            .map_err(compute)?;
        let summed = hidden
            .broadcast_mul(&mask)
            .map_err(compute)?
            .sum(1)
            .map_err(compute)?;
        let counts = mask.sum(1).map_err(compute)?;
        let mean = summed.broadcast_div(&counts).map_err(compute)?;
        let norm = mean
            .sqr()
            .map_err(compute)?
            .sum_keepdim(1)
            .map_err(compute)?
            .sqrt()
            .map_err(compute)?;
        let unit = mean.broadcast_div(&norm).map_err(compute)?;
        unit.to_vec2::<f32>().map_err(compute)
    }
}

#[derive(Deserialize)]
struct ApiResponse {
    data: Vec<ApiEmbedding>,
}

#[derive(Deserialize)]
struct ApiEmbedding {
    embedding: Vec<f32>,
    index: usize,
}

enum Backend {
    Local(Arc<LocalModel>),
    Api {
        http: reqwest::Client,
        base_url: String,
        api_key: Option<String>,
        model: String,
    },
}

/// Embeds texts, caching recent query embeddings (the same question, word
/// for word, is common: retries, duplicates, the two search attempts).
#[derive(Clone)]
pub struct Embedder {
    backend: Arc<Backend>,
    name: String,
    cache: Arc<Mutex<Lru>>,
}

impl Embedder {
    pub fn new(source: &EmbeddingSource) -> Result<Self, EmbedError> {
        let (backend, name) = match source {
            EmbeddingSource::Local(dir) => (
                Backend::Local(Arc::new(LocalModel::load(dir)?)),
                "all-MiniLM-L6-v2".to_string(),
            ),
            EmbeddingSource::OpenAi {
                base_url,
                api_key,
                model,
            } => (
                Backend::Api {
                    http: reqwest::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()
                        .map_err(|e| EmbedError::Api(e.to_string()))?,
                    base_url: base_url.trim_end_matches('/').to_string(),
                    api_key: api_key.clone(),
                    model: model.clone(),
                },
                model.clone(),
            ),
        };
        Ok(Self {
            backend: Arc::new(backend),
            name,
            cache: Arc::new(Mutex::new(Lru::new(
                NonZeroUsize::new(2048).expect("non-zero"),
            ))),
        })
    }

    /// The model's name, stored with what it embedded.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// The whole words of the local model's tokenizer vocabulary (its
    /// WordPiece entries of letters only: not word pieces, "##…", nor
    /// special tokens, "[…]"): words the model reads as words, which tells
    /// a real word from a typo ("pasta" is one, "pasword" is not). None
    /// for a model behind an API, whose vocabulary is not known here.
    pub fn words(&self) -> Option<std::collections::HashSet<String>> {
        match self.backend.as_ref() {
            Backend::Local(model) => Some(
                model
                    .tokenizer
                    .get_vocab(false)
                    .into_keys()
                    .filter(|w| !w.is_empty() && w.chars().all(char::is_alphabetic))
                    .collect(),
            ),
            Backend::Api { .. } => None,
        }
    }

    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = match self.backend.as_ref() {
            Backend::Local(model) => {
                let model = model.clone();
                let texts = texts.to_vec();
                tokio::task::spawn_blocking(move || model.embed(&texts))
                    .await
                    .map_err(|e| EmbedError::Compute(e.to_string()))?
            }
            Backend::Api {
                http,
                base_url,
                api_key,
                model,
            } => {
                retry(
                    &API_BACKOFF,
                    "embeddings request",
                    |e: &EmbedError| matches!(e, EmbedError::Transient(_)),
                    || async {
                        let mut request =
                            http.post(format!("{base_url}/embeddings"))
                                .json(&serde_json::json!({
                                    "model": model, "input": texts, "dimensions": DIMENSIONS,
                                }));
                        if let Some(key) = api_key {
                            request = request.bearer_auth(key);
                        }
                        let response = request
                            .send()
                            .await
                            .map_err(|e| EmbedError::Transient(e.to_string()))?;
                        let status = response.status();
                        if status.as_u16() == 429 || status.is_server_error() {
                            return Err(EmbedError::Transient(format!("HTTP {status}")));
                        }
                        if !status.is_success() {
                            return Err(EmbedError::Api(format!("HTTP {status}")));
                        }
                        let mut body: ApiResponse = response
                            .json()
                            .await
                            .map_err(|e| EmbedError::Api(e.to_string()))?;
                        body.data.sort_by_key(|d| d.index);
                        if body.data.len() != texts.len()
                            || body.data.iter().any(|d| d.embedding.len() != DIMENSIONS)
                        {
                            return Err(EmbedError::Api(format!(
                                "expected {} embeddings of {DIMENSIONS} dimensions",
                                texts.len()
                            )));
                        }
                        Ok(body.data.into_iter().map(|d| d.embedding).collect())
                    },
                )
                .await
            }
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        EXTERNAL_CALLS
            .with_label_values(&["embeddings", "embed", outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// One text's embedding, from the cache when it was asked for lately.
    pub async fn embed_query(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        if let Some(hit) = self.cache.lock().expect("not poisoned").get(text) {
            return Ok(hit);
        }
        let vector = self
            .embed(&[text.to_string()])
            .await?
            .pop()
            .ok_or_else(|| EmbedError::Compute("no embedding returned".into()))?;
        self.cache
            .lock()
            .expect("not poisoned")
            .put(text.to_string(), vector.clone());
        Ok(vector)
    }
}

/// A small least-recently-used map.
struct Lru {
    capacity: NonZeroUsize,
    entries: std::collections::HashMap<String, (u64, Vec<f32>)>,
    clock: u64,
}

impl Lru {
    fn new(capacity: NonZeroUsize) -> Self {
        Self {
            capacity,
            entries: std::collections::HashMap::new(),
            clock: 0,
        }
    }

    fn get(&mut self, key: &str) -> Option<Vec<f32>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(used, v)| {
            *used = clock;
            v.clone()
        })
    }

    fn put(&mut self, key: String, value: Vec<f32>) {
        self.clock += 1;
        if self.entries.len() >= self.capacity.get() && !self.entries.contains_key(&key) {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (self.clock, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn model_dir() -> Option<PathBuf> {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.casebook/models/all-MiniLM-L6-v2");
        dir.join("model.safetensors").is_file().then_some(dir)
    }

    #[tokio::test]
    async fn the_local_model_ranks_a_matching_passage_first() {
        let Some(dir) = model_dir() else {
            panic!("the embedding model is missing: run deploy/local/install.sh (make test does)");
        };
        let embedder = Embedder::new(&EmbeddingSource::Local(dir)).unwrap();
        let v = embedder
            .embed(&[
                "How do I export my project to CSV?".into(),
                "To export a project, open Settings > Workspace > Export and choose CSV.".into(),
                "Our office dog is called Biscuit and loves long walks.".into(),
            ])
            .await
            .unwrap();
        assert_eq!(v[0].len(), DIMENSIONS);
        let norm: f32 = cosine(&v[0], &v[0]);
        assert!((norm - 1.0).abs() < 1e-4);
        assert!(cosine(&v[0], &v[1]) > 0.5, "match {}", cosine(&v[0], &v[1]));
        assert!(
            cosine(&v[0], &v[2]) < 0.2,
            "unrelated {}",
            cosine(&v[0], &v[2])
        );
        // The cached query embedding equals the computed one.
        let q = embedder
            .embed_query("How do I export my project to CSV?")
            .await
            .unwrap();
        assert!((cosine(&q, &v[0]) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn the_cache_forgets_the_least_recently_used() {
        let mut lru = Lru::new(NonZeroUsize::new(2).unwrap());
        lru.put("a".into(), vec![1.0]);
        lru.put("b".into(), vec![2.0]);
        assert!(lru.get("a").is_some());
        lru.put("c".into(), vec![3.0]);
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some() && lru.get("c").is_some());
    }
}
