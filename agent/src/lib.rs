//! Casebook's AI agent: the workflow that answers a customer message within
//! the guardrails or hands it to a person, the language models it drafts
//! with (OpenAI-compatible, Anthropic as the fallback, a built-in local
//! responder), the sentence embeddings and the knowledge base it searches.
//!
//! It writes nothing itself: every step is a command on the ticket,
//! appended through `casebook-commands`' event store.

pub mod embeddings;
pub mod knowledge;
pub mod llm;
pub mod responder;
mod workflow;

pub use workflow::*;
