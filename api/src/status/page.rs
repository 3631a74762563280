//! The status page as HTML (maud: every value is escaped as it is
//! rendered, so a customer's `<script>` is shown as text).
//!
//! No script at all; the one inline stylesheet is allowed by its hash in a
//! strict Content-Security-Policy, and "was this helpful?" is a plain form
//! post, so the page works with JavaScript off. The status token is in the
//! page's URL: `Referrer-Policy: no-referrer` keeps it from leaking to other
//! sites, and `Cache-Control: no-store` out of shared caches.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use casebook_domain::formatting::ticket_reference;
use casebook_projections::queries::{MessageView, TicketSummary};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use casebook_commands::feedback::MAX_COMMENT_CHARS;

const CSS: &str =
    "body{font-family:system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}\
main{max-width:44rem;margin:0 auto;padding:1.5rem}\
h1{font-size:1.4rem}\
.status{background:#fff;border-radius:8px;padding:1rem 1.25rem;border-left:6px solid #3867d6}\
.status strong{font-size:1.2rem}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:.75rem 0 0}\
dt{color:#5b6270}dd{margin:0}\
.msg{background:#fff;border-radius:8px;padding:.75rem 1rem;margin:.75rem 0}\
.msg.outbound{border-left:4px solid #20bf6b}.msg.inbound{border-left:4px solid #a5b1c2}\
.msg header{font-size:.85rem;color:#5b6270;margin-bottom:.35rem}\
.body{white-space:pre-wrap;overflow-wrap:anywhere;margin:0}\
form{background:#fff;border-radius:8px;padding:1rem 1.25rem}\
fieldset{border:0;padding:0;margin:0 0 .75rem}\
textarea{width:100%;box-sizing:border-box;min-height:5rem}\
.note{color:#5b6270}.thanks{background:#e3f9e5;border-radius:8px;padding:.75rem 1rem}";

/// The Content-Security-Policy of every page: nothing but the stylesheet
/// above, and forms only to this origin.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS.as_bytes()));
    HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; form-action 'self'; \
         base-uri 'none'; frame-ancestors 'none'"
    ))
    .expect("a valid header")
});

/// What the page shows of the feedback form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackState {
    /// No reply to rate yet, or no token to post it with.
    Hidden,
    Open,
    /// Just sent (the redirect after the post).
    Thanks,
    /// Given before.
    Given,
}

pub struct Page<'a> {
    pub summary: &'a TicketSummary,
    pub messages: Option<&'a [MessageView]>,
    /// The status token of the URL, to post feedback with.
    pub token: Option<&'a str>,
    pub feedback: FeedbackState,
}

fn status_words(status: &str) -> (&'static str, &'static str) {
    match status {
        "received" => (
            "Received",
            "We have your request and will look at it shortly.",
        ),
        "in_progress" | "awaiting_approval" => ("In progress", "We are working on your request."),
        "escalated" => (
            "With our team",
            "A member of our team is looking into your request.",
        ),
        "responded" => (
            "Answered",
            "We have replied. Answer our message if you need anything else.",
        ),
        "resolved" => ("Resolved", "We consider your request resolved."),
        "closed" => ("Closed", "This request is closed."),
        _ => ("In progress", "We are working on your request."),
    }
}

fn when(at: DateTime<Utc>) -> String {
    at.format("%d %b %Y, %H:%M UTC").to_string()
}

fn layout(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                meta name="robots" content="noindex";
                title { (title) }
                style { (PreEscaped(CSS)) }
            }
            body { main { (content) } }
        }
    }
}

pub fn render(page: &Page<'_>) -> Markup {
    let s = page.summary;
    let reference = ticket_reference(s.ticket_id);
    let (label, explanation) = status_words(&s.status);
    let content = html! {
        h1 { "Your support request " (reference) }
        section.status data-status=(s.status) {
            p { "Status: " strong { (label) } }
            p { (explanation) }
            dl {
                dt { "Reference" } dd { (reference) }
                dt { "Channel" } dd { (s.channel) }
                dt { "Opened" } dd { (when(s.created_at)) }
                dt { "Last update" } dd { (when(s.updated_at)) }
                @if let Some(at) = s.first_response_at {
                    dt { "First answer" } dd { (when(at)) }
                }
                dt { "Messages" } dd { (s.messages_count) }
            }
        }
        @match page.messages {
            Some(messages) => {
                h2 { "Conversation" }
                @if messages.is_empty() {
                    p.note { "No messages yet." }
                }
                @for m in messages {
                    @let outbound = m.direction == "outbound";
                    article class=(if outbound { "msg outbound" } else { "msg inbound" }) {
                        header {
                            (if outbound { "Support" } else { "You" }) " · " (when(m.at))
                        }
                        p.body { (m.body) }
                    }
                }
            }
            None => {
                p.note { "Open the link from our email or message to see the conversation." }
            }
        }
        (feedback(page))
    };
    layout(&format!("Support request {reference}"), content)
}

fn feedback(page: &Page<'_>) -> Markup {
    let action = page
        .token
        .map(|t| format!("/ticket/{}/feedback?token={t}", page.summary.ticket_id));
    html! {
        @match (page.feedback, action) {
            (FeedbackState::Thanks, _) => {
                p.thanks role="status" { "Thank you for your feedback." }
            }
            (FeedbackState::Given, _) => {
                p.note { "Thank you: you already told us whether this was helpful." }
            }
            (FeedbackState::Open, Some(action)) => {
                h2 { "Your feedback" }
                form method="post" action=(action) {
                    fieldset {
                        legend { "Was this helpful?" }
                        label { input type="radio" name="helpful" value="yes" required; " Yes" }
                        " "
                        label { input type="radio" name="helpful" value="no"; " No" }
                    }
                    p {
                        label for="comment" { "Anything you want to add? (optional)" }
                        textarea id="comment" name="comment" maxlength=(MAX_COMMENT_CHARS) {}
                    }
                    button type="submit" { "Send feedback" }
                }
            }
            _ => {}
        }
    }
}

/// An error as a page, for browsers.
pub fn error(status: StatusCode, message: &str) -> Response {
    let heading = match status {
        StatusCode::NOT_FOUND => "We could not find this request",
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => "This link does not work",
        StatusCode::UNPROCESSABLE_ENTITY => "Please check your answer",
        StatusCode::CONFLICT => "That did not work",
        _ => "Something went wrong",
    };
    let markup = layout(
        heading,
        html! {
            h1 { (heading) }
            p { (message) }
            p.note { "Check that you opened the whole link from our email or message." }
        },
    );
    respond(status, markup)
}

/// A page with the headers every page carries.
pub fn respond(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    secure(&mut response);
    response
}

/// The headers of every status page response, HTML or not.
pub fn secure(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    private(response);
}

/// No sniffing, no referrer, no caching: for every answer of these routes.
pub fn private(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.append(header::VARY, HeaderValue::from_static("Accept"));
}

/// Where the browser goes after posting feedback.
pub fn after_feedback(ticket_id: Uuid, token: &str, outcome: &str) -> String {
    format!("/ticket/{ticket_id}?token={token}&feedback={outcome}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> TicketSummary {
        let at = DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        TicketSummary {
            ticket_id: Uuid::from_u128(0xabcdef),
            customer_id: Uuid::from_u128(1),
            status: "responded".into(),
            channel: "webform".into(),
            priority: "medium".into(),
            created_at: at,
            updated_at: at,
            first_response_at: Some(at),
            sla_due_at: at,
            messages_count: 2,
        }
    }

    #[test]
    fn customer_text_is_escaped_and_the_style_matches_its_hash() {
        let s = summary();
        let messages = vec![MessageView {
            direction: "inbound".into(),
            channel: "webform".into(),
            body: "<script>alert(1)</script> \"quoted\" & 'single'".into(),
            at: s.created_at,
        }];
        let html = render(&Page {
            summary: &s,
            messages: Some(&messages),
            token: Some("tok\"><script>"),
            feedback: FeedbackState::Open,
        })
        .into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &quot;quoted&quot; &amp;"));
        assert!(html.contains("Was this helpful?"));
        assert!(html.contains(&format!("<style>{CSS}</style>")));
        let csp = CSP.to_str().unwrap();
        assert!(
            csp.starts_with("default-src 'none'; style-src 'sha256-"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
    }

    #[test]
    fn without_a_token_there_is_no_conversation_and_no_form() {
        let s = summary();
        let html = render(&Page {
            summary: &s,
            messages: None,
            token: None,
            feedback: FeedbackState::Open,
        })
        .into_string();
        assert!(html.contains("Status: <strong>Answered</strong>"), "{html}");
        assert!(!html.contains("<form"));
        assert!(!html.contains("Conversation"));
    }
}
