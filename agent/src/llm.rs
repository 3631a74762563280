//! Language models: an OpenAI-compatible chat-completions client and the
//! Anthropic Messages API, both with tool calls, each behind timeouts,
//! retries with backoff and a circuit breaker, tried in that order.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use casebook_domain::retry::Backoff;
use casebook_domain::ticket::ModelPrice;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use casebook_commands::metrics::LLM_CALLS;
use casebook_commands::retry::retry;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const LLM_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(4), 3);
/// Consecutive failed calls that open a provider's circuit, and how long it
/// then stays open before one call may try again.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_COOL_DOWN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{provider}: {detail}")]
    Transient {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider}: {detail}")]
    Permanent {
        provider: &'static str,
        detail: String,
    },
    #[error("{0}: circuit open after repeated failures")]
    CircuitOpen(&'static str),
}

impl LlmError {
    fn is_transient(&self) -> bool {
        matches!(self, LlmError::Transient { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

/// A provider-neutral conversation turn.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatMessage {
    User(String),
    Assistant {
        text: Option<String>,
        tool_calls: Vec<ToolCall>,
    },
    ToolResult {
        call_id: String,
        name: String,
        content: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatReply {
    pub text: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// The tokens the provider reported for this call, if it did.
    pub usage: Option<TokenUsage>,
}

/// Tokens one call used, as the provider reported them (OpenAI
/// `usage.prompt_tokens` / `completion_tokens`, Anthropic
/// `usage.input_tokens` / `output_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub tokens_in: u64,
    pub tokens_out: u64,
}

/// The most tokens one call is believed to report: a provider's number
/// beyond it is treated as garbage, not billed.
pub const MAX_TOKENS_PER_CALL: u64 = 10_000_000;

fn usage_of(usage: &Value, input: &str, output: &str) -> Option<TokenUsage> {
    let count = |key: &str| usage[key].as_u64().filter(|n| *n <= MAX_TOKENS_PER_CALL);
    match (count(input), count(output)) {
        (None, None) => None,
        (i, o) => Some(TokenUsage {
            tokens_in: i.unwrap_or(0),
            tokens_out: o.unwrap_or(0),
        }),
    }
}

#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
}

/// One remote model with its breaker.
pub struct Provider {
    kind: ProviderKind,
    settings: ProviderSettings,
    http: reqwest::Client,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    price: ModelPrice,
}

impl Provider {
    pub fn new(kind: ProviderKind, settings: ProviderSettings) -> Result<Self, LlmError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| LlmError::Permanent {
                provider: "llm",
                detail: e.to_string(),
            })?;
        Ok(Self {
            kind,
            settings: ProviderSettings {
                base_url: settings.base_url.trim_end_matches('/').to_string(),
                ..settings
            },
            http,
            failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            price: ModelPrice::default(),
        })
    }

    /// Prices its calls at `price` (`LLM_PRICE_USD_PER_MTOK_IN`/`_OUT`, or
    /// the fallback's); unpriced, they cost nothing.
    pub fn with_price(mut self, price: ModelPrice) -> Self {
        self.price = price;
        self
    }

    pub fn price(&self) -> ModelPrice {
        self.price
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }

    pub fn model(&self) -> &str {
        &self.settings.model
    }

    fn circuit_open(&self) -> bool {
        let mut open = self.open_until.lock().expect("not poisoned");
        match *open {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                // Half-open: let this call through; a failure re-opens.
                *open = None;
                false
            }
            None => false,
        }
    }

    fn record(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
        } else if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_THRESHOLD {
            *self.open_until.lock().expect("not poisoned") =
                Some(Instant::now() + BREAKER_COOL_DOWN);
            self.failures.store(0, Ordering::Relaxed);
            tracing::warn!(provider = self.name(), "circuit opened");
        }
    }

    /// One chat turn: retried on transient failures; counted against the
    /// breaker once, whatever the retries.
    pub async fn chat(
        &self,
        system: &str,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<ChatReply, LlmError> {
        if self.circuit_open() {
            LLM_CALLS
                .with_label_values(&[self.name(), "circuit_open"])
                .observe(0.0);
            return Err(LlmError::CircuitOpen(self.name()));
        }
        let started = Instant::now();
        let result = retry(
            &LLM_BACKOFF,
            self.name(),
            LlmError::is_transient,
            || async {
                match self.kind {
                    ProviderKind::OpenAi => self.openai(system, messages, tools).await,
                    ProviderKind::Anthropic => self.anthropic(system, messages, tools).await,
                }
            },
        )
        .await;
        self.record(result.is_ok());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        LLM_CALLS
            .with_label_values(&[self.name(), outcome])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn post(
        &self,
        url: String,
        headers: &[(&str, String)],
        body: Value,
    ) -> Result<Value, LlmError> {
        let provider = self.name();
        let mut request = self.http.post(url).json(&body);
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        let response = request.send().await.map_err(|e| LlmError::Transient {
            provider,
            detail: if e.is_timeout() {
                "timed out".into()
            } else {
                e.to_string()
            },
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| LlmError::Transient {
            provider,
            detail: e.to_string(),
        })?;
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(LlmError::Transient {
                provider,
                detail: format!("HTTP {status}"),
            });
        }
        if !status.is_success() {
            let detail: String = text.chars().take(200).collect();
            return Err(LlmError::Permanent {
                provider,
                detail: format!("HTTP {status}: {detail}"),
            });
        }
        serde_json::from_str(&text).map_err(|e| LlmError::Permanent {
            provider,
            detail: format!("unreadable response: {e}"),
        })
    }

    async fn openai(
        &self,
        system: &str,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<ChatReply, LlmError> {
        let mut wire = vec![json!({"role": "system", "content": system})];
        for m in messages {
            wire.push(match m {
                ChatMessage::User(text) => json!({"role": "user", "content": text}),
                ChatMessage::Assistant { text, tool_calls } => {
                    let mut msg = json!({"role": "assistant", "content": text});
                    if !tool_calls.is_empty() {
                        msg["tool_calls"] = tool_calls
                            .iter()
                            .map(|c| {
                                json!({"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments.to_string()}})
                            })
                            .collect();
                    }
                    msg
                }
                ChatMessage::ToolResult {
                    call_id, content, ..
                } => {
                    json!({"role": "tool", "tool_call_id": call_id, "content": content})
                }
            });
        }
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
            .collect();
        let body = json!({"model": self.settings.model, "messages": wire, "tools": tools, "tool_choice": "auto", "temperature": 0.2});
        let mut headers = Vec::new();
        if let Some(key) = &self.settings.api_key {
            headers.push(("authorization", format!("Bearer {key}")));
        }
        let response = self
            .post(
                format!("{}/chat/completions", self.settings.base_url),
                &headers,
                body,
            )
            .await?;
        let message = &response["choices"][0]["message"];
        if message.is_null() {
            return Err(LlmError::Permanent {
                provider: "openai",
                detail: "response without choices".into(),
            });
        }
        let tool_calls = message["tool_calls"]
            .as_array()
            .map(|calls| {
                calls
                    .iter()
                    .filter_map(|c| {
                        let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                        Some(ToolCall {
                            id: c["id"].as_str()?.to_string(),
                            name: c["function"]["name"].as_str()?.to_string(),
                            arguments: serde_json::from_str(args).unwrap_or(Value::Null),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(ChatReply {
            text: message["content"]
                .as_str()
                .map(str::to_string)
                .filter(|t| !t.trim().is_empty()),
            tool_calls,
            usage: usage_of(&response["usage"], "prompt_tokens", "completion_tokens"),
        })
    }

    async fn anthropic(
        &self,
        system: &str,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<ChatReply, LlmError> {
        let mut wire: Vec<Value> = Vec::new();
        for m in messages {
            match m {
                ChatMessage::User(text) => {
                    wire.push(json!({"role": "user", "content": [{"type": "text", "text": text}]}))
                }
                ChatMessage::Assistant { text, tool_calls } => {
                    let mut blocks = Vec::new();
                    if let Some(text) = text {
                        blocks.push(json!({"type": "text", "text": text}));
                    }
                    for c in tool_calls {
                        blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}));
                    }
                    wire.push(json!({"role": "assistant", "content": blocks}));
                }
                ChatMessage::ToolResult {
                    call_id, content, ..
                } => {
                    let block =
                        json!({"type": "tool_result", "tool_use_id": call_id, "content": content});
                    // Consecutive tool results share one user turn.
                    match wire.last_mut() {
                        Some(last)
                            if last["role"] == "user"
                                && last["content"][0]["type"] == "tool_result" =>
                        {
                            last["content"]
                                .as_array_mut()
                                .expect("content is an array")
                                .push(block)
                        }
                        _ => wire.push(json!({"role": "user", "content": [block]})),
                    }
                }
            }
        }
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
        let body = json!({"model": self.settings.model, "max_tokens": 1024, "system": system, "messages": wire, "tools": tools});
        let mut headers = vec![("anthropic-version", "2023-06-01".to_string())];
        if let Some(key) = &self.settings.api_key {
            headers.push(("x-api-key", key.clone()));
        }
        let response = self
            .post(
                format!("{}/v1/messages", self.settings.base_url),
                &headers,
                body,
            )
            .await?;
        let Some(blocks) = response["content"].as_array() else {
            return Err(LlmError::Permanent {
                provider: "anthropic",
                detail: "response without content".into(),
            });
        };
        let mut reply = ChatReply::default();
        let mut text = String::new();
        for b in blocks {
            match b["type"].as_str() {
                Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
                Some("tool_use") => reply.tool_calls.push(ToolCall {
                    id: b["id"].as_str().unwrap_or_default().to_string(),
                    name: b["name"].as_str().unwrap_or_default().to_string(),
                    arguments: b["input"].clone(),
                }),
                _ => {}
            }
        }
        reply.text = Some(text).filter(|t| !t.trim().is_empty());
        reply.usage = usage_of(&response["usage"], "input_tokens", "output_tokens");
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn tools() -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "search_knowledge_base",
            description: "search",
            parameters: json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
        }]
    }

    #[tokio::test]
    async fn openai_tool_calls_are_read() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .and(header("authorization", "Bearer k"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "c1", "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                  "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "search_knowledge_base", "arguments": "{\"query\":\"export csv\"}"}}]}}],
                "usage": {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290}
            })))
            .mount(&server)
            .await;
        let p = Provider::new(
            ProviderKind::OpenAi,
            ProviderSettings {
                base_url: format!("{}/v1", server.uri()),
                api_key: Some("k".into()),
                model: "m".into(),
            },
        )
        .unwrap();
        let reply = p
            .chat("sys", &[ChatMessage::User("hi".into())], &tools())
            .await
            .unwrap();
        assert_eq!(reply.tool_calls[0].name, "search_knowledge_base");
        assert_eq!(reply.tool_calls[0].arguments["query"], "export csv");
        assert_eq!(
            reply.usage,
            Some(TokenUsage {
                tokens_in: 1234,
                tokens_out: 56
            })
        );
    }

    #[tokio::test]
    async fn anthropic_text_and_tool_use_are_read() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/messages"))
            .and(header("x-api-key", "a"))
            .and(header("anthropic-version", "2023-06-01"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "tool_use",
                "content": [{"type": "text", "text": "Searching."},
                            {"type": "tool_use", "id": "toolu_1", "name": "search_knowledge_base", "input": {"query": "sso"}}],
                "usage": {"input_tokens": 900, "output_tokens": 40}
            })))
            .mount(&server)
            .await;
        let p = Provider::new(
            ProviderKind::Anthropic,
            ProviderSettings {
                base_url: server.uri(),
                api_key: Some("a".into()),
                model: "claude".into(),
            },
        )
        .unwrap();
        let reply = p
            .chat("sys", &[ChatMessage::User("hi".into())], &tools())
            .await
            .unwrap();
        assert_eq!(reply.text.as_deref(), Some("Searching."));
        assert_eq!(reply.tool_calls[0].arguments["query"], "sso");
        assert_eq!(
            reply.usage,
            Some(TokenUsage {
                tokens_in: 900,
                tokens_out: 40
            })
        );
    }

    #[test]
    fn usage_beyond_belief_or_absent_is_not_counted() {
        assert_eq!(
            usage_of(&json!(null), "prompt_tokens", "completion_tokens"),
            None
        );
        assert_eq!(
            usage_of(
                &json!({"prompt_tokens": -3, "completion_tokens": "7"}),
                "prompt_tokens",
                "completion_tokens"
            ),
            None
        );
        assert_eq!(
            usage_of(
                &json!({"input_tokens": 20_000_000u64, "output_tokens": 5}),
                "input_tokens",
                "output_tokens"
            ),
            Some(TokenUsage {
                tokens_in: 0,
                tokens_out: 5
            })
        );
    }

    #[tokio::test]
    async fn repeated_failures_open_the_circuit() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let p = Provider::new(
            ProviderKind::OpenAi,
            ProviderSettings {
                base_url: server.uri(),
                api_key: None,
                model: "m".into(),
            },
        )
        .unwrap();
        for _ in 0..BREAKER_THRESHOLD {
            assert!(matches!(
                p.chat("s", &[], &tools()).await,
                Err(LlmError::Transient { .. })
            ));
        }
        let calls = server.received_requests().await.unwrap().len();
        assert_eq!(calls as u32, BREAKER_THRESHOLD * LLM_BACKOFF.max_attempts);
        assert!(matches!(
            p.chat("s", &[], &tools()).await,
            Err(LlmError::CircuitOpen(_))
        ));
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            calls,
            "no call while open"
        );
    }
}
