//! Correlation ids, request spans and HTTP metrics.

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{register_histogram_vec, HistogramVec};
use tracing::Instrument;
use uuid::Uuid;

pub const CORRELATION_HEADER: &str = "x-correlation-id";

static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_http_request_duration_seconds",
        "HTTP request latency by method, route and status",
        &["method", "route", "status"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    )
    .expect("metric registers once")
});

/// The correlation id of the request being served.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

fn acceptable(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// Takes the caller's `x-correlation-id` (or makes one), runs the request
/// in a span carrying it, so that every log line of the request's work has
/// it, and echoes it on the response.
pub async fn correlation(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let span = tracing::info_span!("request", correlation_id = %id, method = %req.method(), path = %req.uri().path());
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request served"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

/// Records latency per matched route (never per raw path, which would make
/// one series per ticket id), and runs the request in its trace span.
pub async fn http_metrics(req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let span = http_span(&req, &method, &route);
    let started = Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    HTTP_DURATION
        .with_label_values(&[method.as_str(), route.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    if !span.is_disabled() {
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
    response
}

/// The trace's span of one request, named after the matched route (never
/// the raw path, which holds ids). Only the OpenTelemetry layer sees it, so
/// log lines keep the `request` span and its correlation id. It continues
/// the caller's trace when the request carries a well-formed W3C
/// `traceparent`.
fn http_span(req: &Request, method: &str, route: &str) -> tracing::Span {
    let correlation_id = req
        .extensions()
        .get::<CorrelationId>()
        .map(|c| c.0.as_str())
        .unwrap_or_default();
    let span = tracing::info_span!(
        target: casebook_telemetry::TARGET,
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        correlation_id,
    );
    casebook_telemetry::continue_from(&span, |key| {
        req.headers().get(key).and_then(|v| v.to_str().ok())
    });
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tame_correlation_ids_are_echoed() {
        assert!(acceptable("req-123_abc.def:9"));
        assert!(!acceptable(""));
        assert!(!acceptable("has space"));
        assert!(!acceptable(&"x".repeat(129)));
    }
}
