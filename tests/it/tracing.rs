//! Traces (issue 11): one web form is one trace, from the HTTP request
//! through the event store, the relay's publish and, across Kafka, a
//! projector's and a delivery worker's handling, exported over OTLP/HTTP to
//! a collector fake.
//!
//! Tracing is set up once per process (a global subscriber), and this test
//! binary runs many services side by side; so the service under test is
//! the real `casebook` binary in a process of its own, started with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` as an operator would, and stopped with
//! SIGTERM, which must flush the spans still queued.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::routing::post;
use casebook::app;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

use crate::common::{
    eventually, form, kafka_brokers, test_config, unique_prefix, TestDb, JWT_SECRET, PUBLIC_URL,
};

const WAIT: Duration = Duration::from_secs(60);

/// A span as the collector received it, with its process's resource.
#[derive(Debug, Clone)]
struct Received {
    resource: HashMap<String, String>,
    span: Span,
}

/// An OTLP/HTTP collector in this process: accepts `POST /v1/traces`
/// (protobuf) and keeps every span.
struct Collector {
    endpoint: String,
    received: Arc<Mutex<Vec<Received>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

impl Collector {
    async fn start() -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (store, log) = (received.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let (store, log) = (store.clone(), log.clone());
                async move {
                    let content_type = headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    log.lock().unwrap().push(content_type.clone());
                    if content_type != "application/x-protobuf" {
                        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                    }
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut store = store.lock().unwrap();
                    for resource_spans in request.resource_spans {
                        let resource = resource_spans
                            .resource
                            .map(|r| text(&r.attributes))
                            .unwrap_or_default();
                        for scope in resource_spans.scope_spans {
                            for span in scope.spans {
                                store.push(Received {
                                    resource: resource.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    (
                        StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            endpoint: format!("http://{addr}"),
            received,
            requests,
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// The service binary in a child process, its JSON log lines collected.
struct Service {
    child: tokio::process::Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn start(db_url: &str, prefix: &str, endpoint: &str) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_casebook"));
        command
            .args([
                "serve",
                "--role",
                "api",
                "--role",
                "relay",
                "--role",
                "projector",
                "--role",
                "delivery",
            ])
            .env("DATABASE_URL", db_url)
            .env("KAFKA_BROKERS", kafka_brokers())
            .env("KAFKA_TOPIC_PREFIX", prefix)
            .env("CASEBOOK_JWT_SECRET", JWT_SECRET)
            .env("CASEBOOK_PUBLIC_URL", PUBLIC_URL)
            .env("CASEBOOK_HTTP_ADDR", "127.0.0.1:0")
            .env("CASEBOOK_OPS_ADDR", "127.0.0.1:0")
            .env("CASEBOOK_DB_MAX_CONNECTIONS", "10")
            .env("CASEBOOK_RATE_LIMIT_PER_CLIENT", "0")
            .env(
                "CASEBOOK_EMBEDDINGS",
                format!(
                    "local:{}/.casebook/models/all-MiniLM-L6-v2",
                    env!("CARGO_MANIFEST_DIR")
                ),
            )
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            // Spans leave only when the batch is full or at shutdown: the
            // test sees them only if SIGTERM flushes the queue.
            .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
            .env_remove("LLM_BASE_URL")
            .env_remove("LLM_API_KEY")
            .env_remove("LLM_FALLBACK_API_KEY")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_HEADERS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the casebook binary starts");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, logs) in [
            (
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                logs.clone(),
            ),
            (Box::new(stderr), logs.clone()),
        ] {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        Self { child, logs }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The address of the public listener, from the service's log.
    async fn api_addr(&self) -> String {
        eventually("the api listening", WAIT, || async {
            self.logs.lock().unwrap().iter().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                (line["message"] == "api listening")
                    .then(|| line["addr"].as_str().map(str::to_string))
                    .flatten()
            })
        })
        .await
    }

    /// SIGTERM, then the exit status (a graceful stop exits 0).
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the service stops within a minute of SIGTERM")
            .expect("exit status")
    }
}

/// Waits until the delivery workers' consumer group committed past the one
/// message of the (fresh) web-form outbound topic, the acknowledgement
/// with the confirmation link: its worker has handled it.
async fn delivery_finished_the_acknowledgement(config: &casebook::config::Config) {
    let kafka = app::kafka_settings(config);
    let topic = kafka.topics.outbound(casebook_domain::Channel::Webform);
    let group = kafka.topics.group("delivery");
    let partitions = kafka.partitions;
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut tpl = TopicPartitionList::new();
            for partition in 0..partitions {
                tpl.add_partition(&topic, partition);
            }
            let done = consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .map(|committed| {
                    committed
                        .elements()
                        .iter()
                        .any(|p| matches!(p.offset(), Offset::Offset(at) if at >= 1))
                })
                .unwrap_or(false);
            if done {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the delivery worker never finished the acknowledgement"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_web_form_is_one_trace_from_http_through_kafka_to_a_projector_and_delivery() {
    let collector = Collector::start().await;
    let db = TestDb::create().await;
    let prefix = unique_prefix();
    let config = test_config(&db.url, &prefix, &[]);
    let mut service = Service::start(&db.url, &prefix, &collector.endpoint);
    let addr = service.api_addr().await;

    // The caller is itself traced: the service continues its trace.
    let trace_id = Uuid::new_v4().simple().to_string();
    let caller_span = Uuid::new_v4().simple().to_string()[..16].to_string();
    let email = "ada.trace@example.com";
    let message = "My export fails with a secret word: zebracorn.";
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/support/tickets"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&form(email, message))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 202, "{}", service.logs());
    let correlation_id = response.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let ticket_id: Uuid = response.json::<Value>().await.unwrap()["ticket_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pool = db.pool.clone();
    eventually("the ticket in crm_tickets", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>("SELECT ticket_id FROM crm_tickets WHERE ticket_id = $1")
                .bind(ticket_id)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    delivery_finished_the_acknowledgement(&config).await;
    assert!(
        collector.spans().is_empty(),
        "nothing is exported before the batch is due or the service stops"
    );

    let status = service.terminate().await;
    assert!(status.success(), "{status}: {}", service.logs());
    let kafka = app::kafka_settings(&config);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        casebook_commands::kafka::delete_topics(&kafka, &kafka.topics.all()),
    )
    .await;

    // Flushed at shutdown, as protobuf.
    let received = collector.spans();
    assert!(
        !received.is_empty(),
        "no span exported:\n{}",
        service.logs()
    );
    assert!(collector
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|c| c == "application/x-protobuf"));
    let resource = &received[0].resource;
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some("casebook")
    );
    assert_eq!(
        resource.get("casebook.role").map(String::as_str),
        Some("api+relay+projector+delivery")
    );

    let trace: Vec<&Span> = received
        .iter()
        .map(|r| &r.span)
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    let named =
        |name: &str| -> Vec<&Span> { trace.iter().copied().filter(|s| s.name == name).collect() };
    let ids =
        |spans: &[&Span]| -> HashSet<Vec<u8>> { spans.iter().map(|s| s.span_id.clone()).collect() };

    // HTTP: the server span of the route, a child of the caller's span.
    let http = named("POST /support/tickets");
    assert_eq!(http.len(), 1, "one HTTP span in the trace: {names:?}");
    assert_eq!(hex(&http[0].parent_span_id), caller_span);
    assert_eq!(http[0].kind, SpanKind::Server as i32);
    let http_attributes = text(&http[0].attributes);
    assert_eq!(http_attributes["http.response.status_code"], "202");
    assert_eq!(http_attributes["correlation_id"], correlation_id);

    // The store's appends happen inside the request.
    let appends = named("event_store.append");
    assert!(!appends.is_empty(), "no append in the trace: {names:?}");
    for append in &appends {
        assert_eq!(append.parent_span_id, http[0].span_id, "{names:?}");
    }

    // The relay publishes later, from the store: each publish is a child of
    // the append that stored the event (the context kept in its metadata).
    let publishes = named("relay.publish");
    assert!(!publishes.is_empty(), "no publish in the trace: {names:?}");
    let append_ids = ids(&appends);
    for publish in &publishes {
        assert!(append_ids.contains(&publish.parent_span_id), "{names:?}");
        assert_eq!(publish.kind, SpanKind::Producer as i32);
    }

    // Across Kafka: a projector's handling is a child of a publish (the
    // `traceparent` header), with the request's correlation id.
    let handled = named("projector.handle");
    assert!(
        !handled.is_empty(),
        "no projector handling in the trace: {names:?}"
    );
    let publish_ids = ids(&publishes);
    for handling in &handled {
        assert!(publish_ids.contains(&handling.parent_span_id), "{names:?}");
        assert_eq!(handling.kind, SpanKind::Consumer as i32);
        assert_eq!(text(&handling.attributes)["correlation_id"], correlation_id);
    }
    assert!(
        handled.iter().any(
            |s| text(&s.attributes).get("projector").map(String::as_str) == Some("crm-tickets")
        ),
        "the crm-tickets projector handled the ticket's events: {:?}",
        handled
            .iter()
            .map(|s| text(&s.attributes))
            .collect::<Vec<_>>()
    );

    // The delivery worker's handling of the acknowledgement is a child of
    // a publish too (the same hop, through a worker instead of a projector).
    let workers = named("worker.handle");
    assert!(
        !workers.is_empty(),
        "no worker handling in the trace: {names:?}"
    );
    for worker in &workers {
        assert!(publish_ids.contains(&worker.parent_span_id), "{names:?}");
        assert_eq!(worker.kind, SpanKind::Consumer as i32);
        let attributes = text(&worker.attributes);
        assert_eq!(attributes["correlation_id"], correlation_id);
        assert!(
            attributes["messaging.consumer.group.name"].ends_with("delivery"),
            "{attributes:?}"
        );
    }

    // What the customer wrote never leaves in a span.
    for r in &received {
        let exported = format!("{:?}", r.span);
        for written in [email, "zebracorn"] {
            assert!(
                !exported.contains(written),
                "a span quotes {written:?}: {exported}"
            );
        }
    }
}

#[tokio::test]
async fn a_malformed_collector_endpoint_stops_the_service_at_start_by_name() {
    for endpoint in ["otel-collector:4318", "grpc://otel-collector:4317"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_casebook"))
            .args(["serve", "--role", "api"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("CASEBOOK_JWT_SECRET", JWT_SECRET)
            .env("CASEBOOK_HTTP_ADDR", "127.0.0.1:0")
            .env("CASEBOOK_OPS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .expect("the service gives up at once")
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{endpoint}: {stderr}");
        assert!(
            stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{endpoint}: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "nothing served: {:?}",
            output.stdout
        );
    }
}
