//! Configuration from the environment (CONTRACT.md, Configuration). A
//! missing or malformed setting is reported by its variable name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use url::Url;

pub const DEFAULT_DATABASE_URL: &str = "postgres://casebook@127.0.0.1:54329/casebook";
pub const DEFAULT_KAFKA_BROKERS: &str = "127.0.0.1:19092";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_OPS_ADDR: &str = "127.0.0.1:9090";
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:8080";
/// Where `make run` keeps the local stack's generated secret.
pub const LOCAL_JWT_SECRET_FILE: &str = ".casebook/jwt_secret";
pub const JWT_SECRET_MIN_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

fn bad(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        problem: problem.into(),
    }
}

#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub db_max_connections: u32,
    pub kafka_brokers: String,
    pub topic_prefix: String,
    pub kafka_partitions: i32,
    pub http_addr: SocketAddr,
    /// `CASEBOOK_OPS_ADDR`: every role's `/health`, `/ready`, `/metrics`.
    pub ops_addr: SocketAddr,
    pub public_url: String,
    jwt_secret: Option<String>,
    pub twilio_auth_token: Option<String>,
    pub twilio_account_sid: Option<String>,
    pub twilio_whatsapp_from: Option<String>,
    /// `TWILIO_FOLLOWUP_CONTENT_SID`: the approved WhatsApp template for
    /// replies outside the 24-hour window (`HX` and 32 hex digits).
    pub twilio_followup_content_sid: Option<String>,
    pub twilio_api_base: String,
    pub gmail_push_token: Option<String>,
    pub gmail_api_base: String,
    pub gmail_access_token: Option<String>,
    pub gmail_support_address: Option<String>,
    pub llm: Option<LlmConfig>,
    pub llm_fallback: Option<LlmConfig>,
    pub embeddings: EmbeddingsConfig,
    pub support_signature: String,
    pub sla_check_every_secs: u64,
    /// `CASEBOOK_KB_EF_SEARCH`: HNSW candidates per knowledge base search.
    pub kb_ef_search: u32,
    /// `CASEBOOK_AUTO_REPLY_CAP_PER_HOUR`: automatic replies per ticket in a
    /// rolling hour before the agent stays silent and escalates.
    pub auto_reply_cap_per_hour: u32,
    /// `CASEBOOK_RATE_LIMIT_PER_CLIENT`: public requests a minute per client
    /// address; 0 turns it off.
    pub rate_limit_per_client: u32,
    /// `CASEBOOK_GRAPHQL_CONCURRENCY`: GraphQL operations a process runs at
    /// once; more wait their turn, first come first served.
    pub graphql_concurrency: u32,
    /// `CASEBOOK_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: casebook_api::ratelimit::TrustedProxies,
    /// `CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR`: web-form submissions naming one
    /// address an hour; 0 turns it off.
    pub webform_per_email_per_hour: u32,
    /// `CASEBOOK_AGGREGATE_CACHE`: recently written aggregates the event
    /// store keeps in memory, so the next command on one needs no read; 0
    /// turns it off.
    pub aggregate_cache: usize,
    /// `CASEBOOK_APPEND_GROUP`: concurrent appends the event store combines
    /// into one statement and commit at most; 1 appends each alone.
    pub append_group: usize,
    /// `CASEBOOK_AUTO_EMAILS_PER_RECIPIENT_PER_HOUR`: automatic emails
    /// (acknowledgements, AI replies) to one address an hour; 0 turns it off.
    pub auto_emails_per_recipient_per_hour: u32,
    /// `CASEBOOK_WORKER_MAX_ATTEMPTS`: attempts of a failing message before
    /// the dead-letter topic.
    pub worker_max_attempts: u32,
    /// `CASEBOOK_WORKER_MAX_RETRY_SECS`: how long a failing message is
    /// retried before the dead-letter topic.
    pub worker_max_retry_secs: u64,
    /// `CASEBOOK_PROVIDER_TIMEOUT_SECS`: one Twilio or Gmail request.
    pub provider_timeout_secs: u64,
    /// `CASEBOOK_SESSION_IDLE_SECS`: a session unused this long is refused
    /// with `session_expired`.
    pub session_idle_secs: u64,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (and `OTEL_SERVICE_NAME`): where the
    /// service sends its traces; `None` turns export off.
    pub traces: Option<TracesConfig>,
    /// `LLM_PRICE_USD_PER_MTOK_IN`/`_OUT`: the primary model's prices.
    pub llm_price: casebook_domain::ticket::ModelPrice,
    /// `LLM_FALLBACK_PRICE_USD_PER_MTOK_IN`/`_OUT`: the fallback's prices.
    pub llm_fallback_price: casebook_domain::ticket::ModelPrice,
    /// `CASEBOOK_MODEL_BUDGET_USD_PER_YEAR`: the yearly model budget.
    pub model_budget_usd_per_year: f64,
    /// `CASEBOOK_EXPERIMENT`: the label recorded on every AI response.
    pub experiment: Option<String>,
    /// `CASEBOOK_METRICS_SNAPSHOT_SECS`: how often `<prefix>.metrics` gets
    /// a snapshot (60 by default).
    pub metrics_snapshot_secs: u64,
    /// `CASEBOOK_AUDIT_SIGNING_KEY`: the Ed25519 seed (64 hex digits) that
    /// signs audit checkpoints.
    audit_signing_key: Option<String>,
    /// `CASEBOOK_CHECKPOINT_SECS`: how often `serve` writes a checkpoint.
    pub checkpoint_secs: u64,
    /// `CASEBOOK_ARCHIVE_DIR`: where retention writes archives.
    pub archive_dir: PathBuf,
}

/// A number setting within `range`: `default` when unset. `what` names it
/// in the message ("number of seconds"). Every numeric setting goes
/// through here, so each is bounded.
/// Three GraphQL operations per core: enough to keep the cores busy while
/// some wait on Postgres, few enough that they do not crowd each other out.
fn default_graphql_concurrency() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
        .saturating_mul(3)
        .clamp(4, 256)
}

fn number_var<T>(
    src: &Source<'_>,
    name: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
    what: &str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match src.var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<T>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                bad(
                    name,
                    format!("must be a {what} from {} to {}", range.start(), range.end()),
                )
            }),
    }
}

/// A non-negative amount of US dollars: `default` when unset. (NaN and
/// infinity are outside every range.)
fn usd_var(
    src: &Source<'_>,
    name: &'static str,
    default: f64,
    max: f64,
) -> Result<f64, ConfigError> {
    number_var(src, name, default, 0.0..=max, "number of US dollars")
}

/// OpenTelemetry trace export over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracesConfig {
    /// The collector's base URL, without a trailing slash; spans go to
    /// `<endpoint>/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
}

pub const DEFAULT_SERVICE_NAME: &str = "casebook";

fn traces_config(src: &Source<'_>) -> Result<Option<TracesConfig>, ConfigError> {
    const NAME: &str = "OTEL_SERVICE_NAME";
    let service_name = match src.var(NAME) {
        None => DEFAULT_SERVICE_NAME.to_string(),
        Some(v) if v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()) => v,
        Some(_) => {
            return Err(bad(
                NAME,
                "must be 1 to 128 printable characters, no spaces",
            ))
        }
    };
    let Some(endpoint) = src.var("OTEL_EXPORTER_OTLP_ENDPOINT") else {
        return Ok(None);
    };
    let endpoint = http_url("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)?;
    let parsed =
        Url::parse(&endpoint).map_err(|e| bad("OTEL_EXPORTER_OTLP_ENDPOINT", e.to_string()))?;
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err(bad(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "must be the collector's base URL, without credentials, query or fragment",
        ));
    }
    Ok(Some(TracesConfig {
        endpoint,
        service_name,
    }))
}

/// A whole-number limit setting: `default` when unset, 0 (off) to `max`.
fn limit_var(
    src: &Source<'_>,
    name: &'static str,
    default: u32,
    max: u32,
) -> Result<u32, ConfigError> {
    number_var(src, name, default, 0..=max, "number (0 turns it off)")
}

/// A language model endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmConfig {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
}

/// `CASEBOOK_EMBEDDINGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingsConfig {
    Local(std::path::PathBuf),
    OpenAi { model: String },
}

pub const DEFAULT_EMBEDDINGS: &str = "local:.casebook/models/all-MiniLM-L6-v2";

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        f.debug_struct("Config")
            .field("kafka_brokers", &self.kafka_brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("http_addr", &self.http_addr)
            .field("ops_addr", &self.ops_addr)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads a variable through `get` (the environment, or a map in tests).
pub struct Source<'a> {
    get: Lookup<'a>,
    root: PathBuf,
}

impl<'a> Source<'a> {
    pub fn env() -> Source<'static> {
        Source {
            get: Box::new(|k| std::env::var(k).ok()),
            root: PathBuf::from("."),
        }
    }

    pub fn from_fn(get: impl Fn(&str) -> Option<String> + 'a, root: &Path) -> Self {
        Source {
            get: Box::new(get),
            root: root.to_path_buf(),
        }
    }

    fn var(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }
}

fn http_url(name: &'static str, value: &str) -> Result<String, ConfigError> {
    let url = Url::parse(value).map_err(|e| bad(name, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(name, "must be an http(s) URL with a host"));
    }
    Ok(value.trim_end_matches('/').to_string())
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::load(&Source::env())
    }

    pub fn load(src: &Source<'_>) -> Result<Self, ConfigError> {
        let database_url = src
            .var("DATABASE_URL")
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(bad("DATABASE_URL", "must be a postgres:// URL"));
        }
        let db_max_connections =
            number_var(src, "CASEBOOK_DB_MAX_CONNECTIONS", 32, 2..=1000, "number")?;
        let kafka_brokers = src
            .var("KAFKA_BROKERS")
            .unwrap_or_else(|| DEFAULT_KAFKA_BROKERS.into());
        if kafka_brokers.split(',').any(|b| !b.trim().contains(':')) {
            return Err(bad("KAFKA_BROKERS", "must be host:port[,host:port…]"));
        }
        let topic_prefix = src
            .var("KAFKA_TOPIC_PREFIX")
            .unwrap_or_else(|| "fte".into());
        if topic_prefix.len() > 100
            || !topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(bad(
                "KAFKA_TOPIC_PREFIX",
                "must be up to 100 of A-Z a-z 0-9 . _ -",
            ));
        }
        let kafka_partitions = number_var(src, "CASEBOOK_KAFKA_PARTITIONS", 3, 1..=1000, "number")?;
        let http_addr = src
            .var("CASEBOOK_HTTP_ADDR")
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into())
            .parse::<SocketAddr>()
            .map_err(|_| {
                bad(
                    "CASEBOOK_HTTP_ADDR",
                    "must be an address like 127.0.0.1:8080",
                )
            })?;
        let ops_addr = src
            .var("CASEBOOK_OPS_ADDR")
            .unwrap_or_else(|| DEFAULT_OPS_ADDR.into())
            .parse::<SocketAddr>()
            .map_err(|_| {
                bad(
                    "CASEBOOK_OPS_ADDR",
                    "must be an address like 127.0.0.1:9090",
                )
            })?;
        let public_url = http_url(
            "CASEBOOK_PUBLIC_URL",
            &src.var("CASEBOOK_PUBLIC_URL")
                .unwrap_or_else(|| DEFAULT_PUBLIC_URL.into()),
        )?;
        let jwt_secret = match src.var("CASEBOOK_JWT_SECRET") {
            Some(secret) => Some(secret),
            None => std::fs::read_to_string(src.root.join(LOCAL_JWT_SECRET_FILE))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        };
        if let Some(secret) = &jwt_secret {
            if secret.len() < JWT_SECRET_MIN_LEN {
                return Err(bad(
                    "CASEBOOK_JWT_SECRET",
                    format!("must be at least {JWT_SECRET_MIN_LEN} characters"),
                ));
            }
        }
        let twilio_api_base = http_url(
            "TWILIO_API_BASE",
            &src.var("TWILIO_API_BASE")
                .unwrap_or_else(|| "https://api.twilio.com".into()),
        )?;
        let gmail_api_base = http_url(
            "GMAIL_API_BASE",
            &src.var("GMAIL_API_BASE")
                .unwrap_or_else(|| "https://gmail.googleapis.com".into()),
        )?;
        let twilio_whatsapp_from = src.var("TWILIO_WHATSAPP_FROM");
        if let Some(from) = &twilio_whatsapp_from {
            casebook_domain::identity::IdentityKey::whatsapp(from)
                .map_err(|_| bad("TWILIO_WHATSAPP_FROM", "must be whatsapp:+<E.164 number>"))?;
        }
        let twilio_followup_content_sid = src.var("TWILIO_FOLLOWUP_CONTENT_SID");
        if let Some(sid) = &twilio_followup_content_sid {
            let valid = sid.len() == 34
                && sid.starts_with("HX")
                && sid[2..].bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(bad(
                    "TWILIO_FOLLOWUP_CONTENT_SID",
                    "must be a Twilio content SID: HX and 32 hex digits",
                ));
            }
        }
        let gmail_support_address = src.var("GMAIL_SUPPORT_ADDRESS");
        if let Some(address) = &gmail_support_address {
            casebook_domain::identity::normalize_email(address)
                .map_err(|_| bad("GMAIL_SUPPORT_ADDRESS", "must be an email address"))?;
        }
        let llm = match src.var("LLM_BASE_URL") {
            None => None,
            Some(base) => Some(LlmConfig {
                base_url: http_url("LLM_BASE_URL", &base)?,
                api_key: src.var("LLM_API_KEY"),
                model: src
                    .var("LLM_MODEL")
                    .ok_or_else(|| bad("LLM_MODEL", "is required with LLM_BASE_URL"))?,
            }),
        };
        let llm_fallback = match (
            src.var("LLM_FALLBACK_BASE_URL"),
            src.var("LLM_FALLBACK_API_KEY"),
        ) {
            (None, None) => None,
            (base, api_key) => Some(LlmConfig {
                base_url: http_url(
                    "LLM_FALLBACK_BASE_URL",
                    &base.unwrap_or_else(|| "https://api.anthropic.com".into()),
                )?,
                api_key,
                model: src
                    .var("LLM_FALLBACK_MODEL")
                    .unwrap_or_else(|| "claude-3-5-haiku-latest".into()),
            }),
        };
        let embeddings = match src
            .var("CASEBOOK_EMBEDDINGS")
            .unwrap_or_else(|| DEFAULT_EMBEDDINGS.into())
        {
            v if v == "openai" => {
                if llm.is_none() {
                    return Err(bad(
                        "CASEBOOK_EMBEDDINGS",
                        "openai needs LLM_BASE_URL (and usually LLM_API_KEY)",
                    ));
                }
                EmbeddingsConfig::OpenAi {
                    model: src
                        .var("CASEBOOK_EMBEDDINGS_MODEL")
                        .unwrap_or_else(|| "text-embedding-3-small".into()),
                }
            }
            v => match v.strip_prefix("local:") {
                Some(dir) if !dir.is_empty() => EmbeddingsConfig::Local(src.root.join(dir)),
                _ => {
                    return Err(bad(
                        "CASEBOOK_EMBEDDINGS",
                        "must be local:<model dir> or openai",
                    ))
                }
            },
        };
        let sla_check_every_secs = number_var(
            src,
            "CASEBOOK_SLA_CHECK_SECS",
            15,
            1..=3600,
            "number of seconds",
        )?;
        let audit_signing_key = src.var("CASEBOOK_AUDIT_SIGNING_KEY");
        if let Some(key) = &audit_signing_key {
            casebook_domain::checkpoint::signing_key_from_hex(key)
                .map_err(|e| bad("CASEBOOK_AUDIT_SIGNING_KEY", e.to_string()))?;
        }
        let checkpoint_secs = number_var(
            src,
            "CASEBOOK_CHECKPOINT_SECS",
            60,
            1..=86_400,
            "number of seconds",
        )?;
        let archive_dir = src
            .var("CASEBOOK_ARCHIVE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| src.root.join(".casebook/archive"));
        let kb_ef_search = number_var(
            src,
            "CASEBOOK_KB_EF_SEARCH",
            casebook_agent::knowledge::EF_SEARCH,
            10..=1000,
            "number",
        )?;
        let auto_reply_cap_per_hour = number_var(
            src,
            "CASEBOOK_AUTO_REPLY_CAP_PER_HOUR",
            casebook_agent::DEFAULT_AUTO_REPLY_CAP_PER_HOUR,
            1..=casebook_domain::ticket::MAX_AUTO_REPLIES_PER_HOUR,
            "number",
        )?;
        let trusted_proxies = casebook_api::ratelimit::TrustedProxies::parse(
            &src.var("CASEBOOK_TRUSTED_PROXIES").unwrap_or_default(),
        )
        .map_err(|e| bad("CASEBOOK_TRUSTED_PROXIES", e))?;
        let worker_max_attempts =
            number_var(src, "CASEBOOK_WORKER_MAX_ATTEMPTS", 8, 1..=100, "number")?;
        let worker_max_retry_secs = number_var(
            src,
            "CASEBOOK_WORKER_MAX_RETRY_SECS",
            300,
            1..=86_400,
            "number of seconds",
        )?;
        let provider_timeout_secs = number_var(
            src,
            "CASEBOOK_PROVIDER_TIMEOUT_SECS",
            15,
            1..=120,
            "number of seconds",
        )?;
        let session_idle_secs = number_var(
            src,
            "CASEBOOK_SESSION_IDLE_SECS",
            3600,
            60..=604_800,
            "number of seconds",
        )?;
        let traces = traces_config(src)?;
        let price = |input: &'static str, output: &'static str| {
            Ok::<_, ConfigError>(casebook_domain::ticket::ModelPrice {
                usd_per_mtok_in: usd_var(src, input, 0.0, 100_000.0)?,
                usd_per_mtok_out: usd_var(src, output, 0.0, 100_000.0)?,
            })
        };
        let llm_price = price("LLM_PRICE_USD_PER_MTOK_IN", "LLM_PRICE_USD_PER_MTOK_OUT")?;
        let llm_fallback_price = price(
            "LLM_FALLBACK_PRICE_USD_PER_MTOK_IN",
            "LLM_FALLBACK_PRICE_USD_PER_MTOK_OUT",
        )?;
        let model_budget_usd_per_year = usd_var(
            src,
            "CASEBOOK_MODEL_BUDGET_USD_PER_YEAR",
            1000.0,
            1_000_000_000.0,
        )?;
        let experiment = match src.var("CASEBOOK_EXPERIMENT") {
            None => None,
            Some(v)
                if (1..=64).contains(&v.len())
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) =>
            {
                Some(v)
            }
            Some(_) => {
                return Err(bad(
                    "CASEBOOK_EXPERIMENT",
                    "must be 1 to 64 characters of a-z, A-Z, 0-9, '-', '_', '.', ':'",
                ))
            }
        };
        let metrics_snapshot_secs = number_var(
            src,
            "CASEBOOK_METRICS_SNAPSHOT_SECS",
            60,
            1..=3600,
            "number of seconds",
        )?;
        Ok(Self {
            llm_price,
            llm_fallback_price,
            model_budget_usd_per_year,
            experiment,
            metrics_snapshot_secs,
            session_idle_secs,
            traces,
            worker_max_attempts,
            worker_max_retry_secs,
            provider_timeout_secs,
            auto_reply_cap_per_hour,
            rate_limit_per_client: limit_var(src, "CASEBOOK_RATE_LIMIT_PER_CLIENT", 60, 1_000_000)?,
            graphql_concurrency: number_var(
                src,
                "CASEBOOK_GRAPHQL_CONCURRENCY",
                default_graphql_concurrency(),
                1..=10_000,
                "number",
            )?,
            trusted_proxies,
            webform_per_email_per_hour: limit_var(
                src,
                "CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR",
                5,
                1_000_000,
            )?,
            aggregate_cache: number_var(
                src,
                "CASEBOOK_AGGREGATE_CACHE",
                casebook_commands::cache::DEFAULT_CAPACITY,
                0..=casebook_commands::cache::MAX_CAPACITY,
                "number (0 turns it off)",
            )?,
            append_group: number_var(
                src,
                "CASEBOOK_APPEND_GROUP",
                casebook_commands::store::DEFAULT_GROUP,
                1..=casebook_commands::store::MAX_GROUP,
                "number (1 appends each unit of work alone)",
            )?,
            auto_emails_per_recipient_per_hour: limit_var(
                src,
                "CASEBOOK_AUTO_EMAILS_PER_RECIPIENT_PER_HOUR",
                5,
                1_000_000,
            )?,
            kb_ef_search,
            llm,
            llm_fallback,
            embeddings,
            support_signature: src
                .var("CASEBOOK_SUPPORT_SIGNATURE")
                .unwrap_or_else(|| "The Support Team".into()),
            sla_check_every_secs,
            database_url,
            db_max_connections,
            kafka_brokers,
            topic_prefix,
            kafka_partitions,
            http_addr,
            ops_addr,
            public_url,
            jwt_secret,
            twilio_auth_token: src.var("TWILIO_AUTH_TOKEN"),
            twilio_account_sid: src.var("TWILIO_ACCOUNT_SID"),
            twilio_whatsapp_from,
            twilio_followup_content_sid,
            twilio_api_base,
            gmail_push_token: src.var("GMAIL_PUSH_TOKEN"),
            gmail_api_base,
            gmail_access_token: src.var("GMAIL_ACCESS_TOKEN"),
            gmail_support_address,
            audit_signing_key,
            checkpoint_secs,
            archive_dir,
        })
    }

    /// The checkpoint signing key; `audit checkpoint` and `serve`'s
    /// checkpoints need it.
    pub fn audit_signing_key(&self) -> Result<ed25519_dalek::SigningKey, ConfigError> {
        let key = self.audit_signing_key.as_deref().ok_or_else(|| {
            bad(
                "CASEBOOK_AUDIT_SIGNING_KEY",
                "is not set (`casebook audit keygen` prints a new key)",
            )
        })?;
        casebook_domain::checkpoint::signing_key_from_hex(key)
            .map_err(|e| bad("CASEBOOK_AUDIT_SIGNING_KEY", e.to_string()))
    }

    pub fn has_audit_signing_key(&self) -> bool {
        self.audit_signing_key.is_some()
    }

    /// The token signing key; commands that issue or check tokens need it.
    pub fn jwt_secret(&self) -> Result<&str, ConfigError> {
        self.jwt_secret.as_deref().ok_or_else(|| {
            bad(
                "CASEBOOK_JWT_SECRET",
                format!("is not set (the local stack keeps one in {LOCAL_JWT_SECRET_FILE}; `make run` creates it)"),
            )
        })
    }

    pub fn with_jwt_secret(mut self, secret: impl Into<String>) -> Self {
        self.jwt_secret = Some(secret.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = std::env::temp_dir().join(format!("casebook-config-{}", uuid::Uuid::new_v4()));
        Config::load(&Source::from_fn(move |k| map.get(k).cloned(), &dir))
    }

    #[test]
    fn defaults_are_the_local_stack() {
        let c = load(&[]).unwrap();
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.kafka_brokers, DEFAULT_KAFKA_BROKERS);
        assert_eq!(c.topic_prefix, "fte");
        assert_eq!(c.http_addr.to_string(), DEFAULT_HTTP_ADDR);
        assert_eq!(c.gmail_api_base, "https://gmail.googleapis.com");
        assert_eq!(c.jwt_secret().unwrap_err().name, "CASEBOOK_JWT_SECRET");
        assert_eq!(c.worker_max_attempts, 8);
        assert_eq!(c.worker_max_retry_secs, 300);
        assert_eq!(c.provider_timeout_secs, 15);
        assert_eq!(c.session_idle_secs, 3600);
        assert!(c.graphql_concurrency >= 4);
        assert_eq!(
            load(&[("CASEBOOK_GRAPHQL_CONCURRENCY", "12")])
                .unwrap()
                .graphql_concurrency,
            12
        );
    }

    #[test]
    fn malformed_settings_are_named() {
        let cases = [
            ("DATABASE_URL", "mysql://x"),
            ("CASEBOOK_HTTP_ADDR", "localhost"),
            ("CASEBOOK_PUBLIC_URL", "ftp://x"),
            ("KAFKA_TOPIC_PREFIX", "bad prefix"),
            ("KAFKA_BROKERS", "nohostport"),
            ("CASEBOOK_JWT_SECRET", "short"),
            ("GMAIL_API_BASE", "not a url"),
            ("TWILIO_WHATSAPP_FROM", "+1555"),
            ("CASEBOOK_DB_MAX_CONNECTIONS", "0"),
            ("CASEBOOK_GRAPHQL_CONCURRENCY", "0"),
            ("CASEBOOK_GRAPHQL_CONCURRENCY", "10001"),
            ("CASEBOOK_EMBEDDINGS", "remote"),
            ("LLM_BASE_URL", "not a url"),
            ("CASEBOOK_SLA_CHECK_SECS", "0"),
            ("CASEBOOK_AUTO_REPLY_CAP_PER_HOUR", "0"),
            ("CASEBOOK_AUTO_REPLY_CAP_PER_HOUR", "51"),
            ("CASEBOOK_WORKER_MAX_ATTEMPTS", "0"),
            ("CASEBOOK_WORKER_MAX_RETRY_SECS", "forever"),
            ("CASEBOOK_PROVIDER_TIMEOUT_SECS", "0"),
            ("CASEBOOK_SESSION_IDLE_SECS", "59"),
            ("CASEBOOK_SESSION_IDLE_SECS", "604801"),
            ("CASEBOOK_SESSION_IDLE_SECS", "an hour"),
            ("TWILIO_FOLLOWUP_CONTENT_SID", "HX123"),
            (
                "TWILIO_FOLLOWUP_CONTENT_SID",
                "SM0123456789abcdef0123456789abcdef",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://collector:4317"),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://user:pw@collector:4318",
            ),
            ("OTEL_SERVICE_NAME", "two words"),
        ];
        for (name, value) in cases {
            assert_eq!(
                load(&[(name, value)]).unwrap_err().name,
                name,
                "{name}={value}"
            );
        }
    }

    #[test]
    fn appends_are_grouped_by_default_and_the_group_is_bounded() {
        assert_eq!(
            load(&[]).unwrap().append_group,
            casebook_commands::store::DEFAULT_GROUP
        );
        assert_eq!(
            load(&[("CASEBOOK_APPEND_GROUP", "1")])
                .unwrap()
                .append_group,
            1
        );
        for bad in ["0", "-1", "many", "1001"] {
            assert_eq!(
                load(&[("CASEBOOK_APPEND_GROUP", bad)]).unwrap_err().name,
                "CASEBOOK_APPEND_GROUP",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_aggregate_cache_is_on_by_default_and_bounded() {
        assert_eq!(
            load(&[]).unwrap().aggregate_cache,
            casebook_commands::cache::DEFAULT_CAPACITY
        );
        let off = load(&[("CASEBOOK_AGGREGATE_CACHE", "0")]).unwrap();
        assert_eq!(off.aggregate_cache, 0);
        for bad in ["-1", "lots", "65537", "1000000"] {
            assert_eq!(
                load(&[("CASEBOOK_AGGREGATE_CACHE", bad)]).unwrap_err().name,
                "CASEBOOK_AGGREGATE_CACHE",
                "{bad}"
            );
        }
    }

    #[test]
    fn traces_are_exported_only_when_an_endpoint_is_set() {
        assert_eq!(load(&[]).unwrap().traces, None);
        assert_eq!(load(&[("OTEL_SERVICE_NAME", "x")]).unwrap().traces, None);
        let c = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(
            c.traces,
            Some(TracesConfig {
                endpoint: "http://collector:4318".into(),
                service_name: DEFAULT_SERVICE_NAME.into(),
            })
        );
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel.example/base"),
            ("OTEL_SERVICE_NAME", "casebook-eu"),
        ])
        .unwrap();
        let traces = c.traces.unwrap();
        assert_eq!(traces.endpoint, "https://otel.example/base");
        assert_eq!(traces.service_name, "casebook-eu");
    }

    #[test]
    fn a_model_needs_its_name_and_embeddings_default_to_the_local_model() {
        assert_eq!(
            load(&[("LLM_BASE_URL", "http://llm.test/v1")])
                .unwrap_err()
                .name,
            "LLM_MODEL"
        );
        let c = load(&[
            ("LLM_BASE_URL", "http://llm.test/v1"),
            ("LLM_MODEL", "m"),
            ("LLM_FALLBACK_API_KEY", "k"),
        ])
        .unwrap();
        assert_eq!(c.llm.unwrap().model, "m");
        assert_eq!(
            c.llm_fallback.unwrap().base_url,
            "https://api.anthropic.com"
        );
        assert!(
            matches!(c.embeddings, EmbeddingsConfig::Local(ref p) if p.ends_with(".casebook/models/all-MiniLM-L6-v2"))
        );
    }

    #[test]
    fn the_followup_template_is_a_content_sid() {
        let sid = "HX0123456789abcdef0123456789abcdef";
        let c = load(&[("TWILIO_FOLLOWUP_CONTENT_SID", sid)]).unwrap();
        assert_eq!(c.twilio_followup_content_sid.as_deref(), Some(sid));
        assert_eq!(load(&[]).unwrap().twilio_followup_content_sid, None);
    }

    #[test]
    fn the_public_url_loses_its_trailing_slash() {
        let c = load(&[("CASEBOOK_PUBLIC_URL", "https://support.example.com/")]).unwrap();
        assert_eq!(c.public_url, "https://support.example.com");
    }

    #[test]
    fn the_local_secret_file_is_used_when_the_variable_is_unset() {
        let dir = std::env::temp_dir().join(format!("casebook-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join(".casebook")).unwrap();
        std::fs::write(dir.join(LOCAL_JWT_SECRET_FILE), "x".repeat(40)).unwrap();
        let c = Config::load(&Source::from_fn(|_| None, &dir)).unwrap();
        assert_eq!(c.jwt_secret().unwrap().len(), 40);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
