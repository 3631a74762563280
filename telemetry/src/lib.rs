//! Trace context across the service's hops (issue 11, OpenTelemetry).
//!
//! The spans that make up a trace (the HTTP request, each event-store
//! append, the relay's publish of each event, each consumer's handling of a
//! message) are `tracing` spans with the target [`TARGET`]. Only the
//! OpenTelemetry layer (installed when `OTEL_EXPORTER_OTLP_ENDPOINT` is set)
//! sees them; the JSON log layer filters them out, so log lines keep the
//! spans they had (with the correlation id) and, with export off, the spans
//! are never even created.
//!
//! Between hops the context travels as W3C `traceparent`/`tracestate`
//! text: HTTP headers, keys of a stored event's metadata (the relay
//! publishes later, from the store), and Kafka headers.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span that belongs to a trace.
pub const TARGET: &str = "casebook::trace";
/// W3C trace context header (and metadata key) names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` accepted or passed on (the W3C limit is 512
/// characters of list members; anything longer is dropped, not cut).
const MAX_TRACESTATE: usize = 512;
/// A `traceparent` of version 00 is exactly 55 characters; later versions
/// may append fields, which the propagator ignores. Anything much longer is
/// hostile.
const MAX_TRACEPARENT: usize = 128;

/// Whether trace spans are recorded at all (an OpenTelemetry layer is
/// installed): a cheap check that lets callers skip parsing headers.
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// The W3C text of a span's context: `traceparent` and, when the trace has
/// one, `tracestate`. `None` when the span records nothing (export off, or
/// the span is disabled).
pub fn headers_of(span: &Span) -> Option<TraceHeaders> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = TraceHeaders::default();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers.traceparent.is_some().then_some(headers)
}

/// The context a remote parent sent in W3C text, read through `get` (a
/// header or metadata lookup). `None` when there is none or it is
/// malformed; hostile values are refused, never half-used.
pub fn remote_context<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Context> {
    let traceparent = get(TRACEPARENT).filter(|v| {
        v.len() <= MAX_TRACEPARENT && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    })?;
    let tracestate = get(TRACESTATE)
        .filter(|v| v.len() <= MAX_TRACESTATE && v.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let carrier = TraceHeaders {
        traceparent: Some(traceparent.to_string()),
        tracestate: tracestate.map(str::to_string),
    };
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the remote context read through `get`, if there
/// is a well-formed one. Returns whether it did. A disabled span (export
/// off) costs nothing: the lookup is not even made.
pub fn continue_from<'a>(span: &Span, get: impl Fn(&str) -> Option<&'a str>) -> bool {
    if span.is_disabled() {
        return false;
    }
    match remote_context(get) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// `traceparent` and `tracestate` as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The value of `traceparent` or `tracestate`.
    pub fn value(&self, key: &str) -> Option<&str> {
        Extractor::get(self, key)
    }

    /// The present values, by their W3C names.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (TRACEPARENT, self.traceparent.as_deref()),
            (TRACESTATE, self.tracestate.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE if !value.is_empty() && value.len() <= MAX_TRACESTATE => {
                self.tracestate = Some(value)
            }
            _ => {}
        }
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.pairs().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
    }

    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_span_continues_the_remote_trace_and_passes_it_on() {
        with_otel(|| {
            let span = tracing::info_span!(target: TARGET, "hop");
            let pairs = [(TRACEPARENT, PARENT), (TRACESTATE, "vendor=x")];
            assert!(continue_from(&span, lookup(&pairs)));
            let out = headers_of(&span).expect("the span has a context");
            let traceparent = out.traceparent.unwrap();
            assert!(traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
            assert!(
                !traceparent.contains("b7ad6b7169203331"),
                "a span id of its own"
            );
            assert_eq!(out.tracestate.as_deref(), Some("vendor=x"));
        });
    }

    #[test]
    fn malformed_or_oversized_context_is_refused() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        ] {
            assert!(
                remote_context(lookup(&[(TRACEPARENT, bad)])).is_none(),
                "{bad:?}"
            );
        }
        let long = format!("{PARENT}-{}", "a".repeat(200));
        assert!(remote_context(lookup(&[(TRACEPARENT, long.as_str())])).is_none());
        assert!(remote_context(lookup(&[])).is_none());
        let state = "k=".to_string() + &"v".repeat(600);
        let cx = remote_context(lookup(&[(TRACEPARENT, PARENT), (TRACESTATE, &state)]))
            .expect("the traceparent alone is good");
        assert!(cx.span().span_context().trace_state().header().is_empty());
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_recorded_or_read() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(target: TARGET, "hop");
            assert!(!continue_from(&span, lookup(&[(TRACEPARENT, PARENT)])));
            assert_eq!(headers_of(&span), None);
        });
        // No subscriber at all: the span is disabled.
        let span = tracing::info_span!(target: TARGET, "hop");
        assert!(!enabled());
        assert_eq!(headers_of(&span), None);
    }
}
