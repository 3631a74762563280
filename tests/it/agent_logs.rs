//! The agent's logs (issue 6, items 15 and 16): nothing the customer or
//! the model wrote reaches them, and the agent's line about a message
//! carries that message's correlation id.

use std::io::Write;
use std::sync::{Arc, Mutex};

use casebook::app::Role;
use serde_json::Value;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer};

use crate::agent::{event_of, start_with, whatsapp, Fakes, ScriptedOpenAi, WAIT};
use crate::common::read_topic;

/// Log lines, kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// One thread: every task of the service logs to this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn the_agent_logs_ids_and_kinds_not_what_was_written_inside_the_messages_span() {
    let captured = Captured::default();
    // The service's own format (src/logging.rs): JSON with the current span.
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(EnvFilter::new("info"))
        .with_writer(captured.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    // A draft that quotes someone's contact details, unsure of itself: it
    // waits for approval, with the guardrails' findings.
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "export project data",
            body: "Exports are available in CSV and JSON on all plans. \
                   Please phone Ada Byron privately on +447700900999 or write to ada.private@example.com about the export."
                .into(),
            confidence: 0.5,
        })
        .mount(&llm)
        .await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900601",
        "SMlogs1",
        "How do I export my project data?",
    )
    .await;
    event_of(&app, ticket, "ApprovalRequested").await;
    let kafka = app.kafka();
    let incoming = read_topic(&kafka.brokers, &kafka.topics.tickets_incoming(), 1, WAIT).await;
    let correlation_id = incoming[0].envelope.correlation_id.clone();
    app.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for written in [
        "ada.private@example.com",
        "+447700900999",
        "7700900999",
        "phone Ada Byron",
    ] {
        assert!(
            !logs.contains(written),
            "the logs quote {written:?}:\n{}",
            logs.lines()
                .filter(|l| l.contains(written))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let handled: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "customer message handled")
        .collect();
    assert_eq!(handled.len(), 1, "{logs}");
    assert_eq!(handled[0]["outcome"], "awaiting_approval");
    assert_eq!(
        handled[0]["span"]["correlation_id"],
        correlation_id.as_str()
    );
    assert_eq!(
        handled[0]["span"]["causation_id"],
        incoming[0].envelope.causation_id.as_str()
    );
}
