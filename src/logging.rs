//! JSON logs on stdout, one object per line, with the fields of the spans
//! the event happened in (the request's correlation id among them); and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OpenTelemetry traces exported
//! over OTLP/HTTP.
//!
//! The trace spans (target [`casebook_telemetry::TARGET`]) are for the
//! OpenTelemetry layer only: the log layer filters them out, so log lines
//! keep their spans. With export off there is no OpenTelemetry layer and the
//! log filter turns the trace spans off at their call sites: they cost a
//! branch.

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TracesConfig;

/// How long one export request to the collector may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last spans to be exported.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read (it is a small protobuf message).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The tracer provider while traces are exported; shut it down at the end
/// so that the spans still queued are sent.
#[must_use = "shut the telemetry down so that queued spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter (bounded by
    /// [`FLUSH_TIMEOUT`]). Must run while the runtime is up: the exporter's
    /// requests run on it.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks its caller until the export thread is
        // done; that thread needs the runtime's workers for the request.
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("casebook: traces not flushed at shutdown: {e}"),
            Err(e) => eprintln!("casebook: traces not flushed at shutdown: {e}"),
        }
    }
}

fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"))
        .add_directive(
            format!("{}=off", casebook_telemetry::TARGET)
                .parse()
                .expect("a valid directive"),
        )
}

fn json_layer<S>(to_stdout: bool) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_target(true)
        .with_writer(writer(to_stdout))
}

fn writer(to_stdout: bool) -> impl Fn() -> Box<dyn std::io::Write> + Send + Sync + 'static {
    move || -> Box<dyn std::io::Write> {
        if to_stdout {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::io::stderr())
        }
    }
}

/// `to_stdout`: the service logs to stdout (CONTRACT.md); one-shot commands
/// log to stderr so that what they print stays machine-readable.
/// `traces`: export settings and the roles this process runs (a resource
/// attribute); must be called inside the runtime when set.
pub fn init(to_stdout: bool, traces: Option<(&TracesConfig, &str)>) -> anyhow::Result<Telemetry> {
    let Some((config, roles)) = traces else {
        // Export off: the logs alone, filtered globally, as before traces.
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_span_events(FmtSpan::NONE)
            .with_target(true)
            .with_env_filter(log_filter())
            .with_writer(writer(to_stdout))
            .try_init();
        return Ok(Telemetry { provider: None });
    };
    let provider = tracer_provider(config, roles)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("casebook"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Only the trace spans: no log event (which could quote what a
        // customer wrote) becomes a span event.
        .with_filter(Targets::new().with_target(casebook_telemetry::TARGET, LevelFilter::INFO));
    let _ = tracing_subscriber::registry()
        .with(json_layer(to_stdout).with_filter(log_filter()))
        .with(otel)
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn tracer_provider(config: &TracesConfig, roles: &str) -> anyhow::Result<SdkTracerProvider> {
    let client = RuntimeHttpClient::new(EXPORT_TIMEOUT)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", config.endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: the trace exporter cannot be built")?;
    // The SDK's batch processor: a bounded queue (2,048 spans by default;
    // spans beyond it are dropped, never waited for), batches of up to 512,
    // sent every 5 s; each tunable with the standard OTEL_BSP_* variables.
    let processor = BatchSpanProcessor::builder(exporter).build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("casebook.role", roles.to_string()))
        .with_attribute(KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION").to_string(),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// The exporter's HTTP client: the service's reqwest, its requests run on
/// the tokio runtime. The SDK's batch processor exports from a thread of its
/// own that drives the export future without a reactor, so the request is
/// handed to the runtime and only its outcome awaited there.
#[derive(Debug)]
struct RuntimeHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl RuntimeHttpClient {
    fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the trace exporter's HTTP client")?;
        let runtime = tokio::runtime::Handle::try_current()
            .context("the trace exporter starts inside the runtime")?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        let sent = self.runtime.spawn(async move {
            let mut response = client.execute(request).await?.error_for_status()?;
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err("the collector's answer is too large".into());
                }
                body.extend_from_slice(&chunk);
            }
            let mut answer = http::Response::builder()
                .status(status)
                .body(bytes::Bytes::from(body))?;
            *answer.headers_mut() = headers;
            Ok::<_, opentelemetry_http::HttpError>(answer)
        });
        sent.await?
    }
}
