//! Pure helpers for inbound email text: the new part of a reply, and plain
//! text from an HTML-only message.

/// Cuts the quoted history off a reply: everything from an attribution line
/// ("On Tue, 24 Nov 2026 at 10:00, Ada <ada@example.com> wrote:"), an
/// Outlook-style "-----Original Message-----" or "From: …" header block, or a
/// trailing block of `>`-quoted lines. If nothing would remain, the text is
/// returned unchanged.
pub fn strip_quoted_reply(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut cut = lines.len();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let attribution = t.starts_with("On ") && t.ends_with("wrote:");
        let outlook = t.starts_with("-----Original Message-----")
            || (t.starts_with("From: ")
                && lines
                    .get(i + 1)
                    .is_some_and(|n| n.trim().starts_with("Sent: ")));
        if attribution || outlook {
            cut = i;
            break;
        }
    }
    // A trailing run of quoted lines (and blank lines between them).
    let mut end = cut;
    while end > 0 {
        let t = lines[end - 1].trim();
        if t.starts_with('>') || t.is_empty() {
            end -= 1;
        } else {
            break;
        }
    }
    let kept = lines[..end].join("\n").trim().to_string();
    if kept.is_empty() {
        text.trim().to_string()
    } else {
        kept
    }
}

/// Most HTML read from one message part, in bytes; the rest is cut before
/// parsing, so one message can never make parsing expensive.
pub const HTML_MAX_BYTES: usize = 512 * 1024;

/// Plain text from HTML, by a real HTML parser (html5ever through
/// `html2text`): block elements become line breaks, `<script>`/`<style>`
/// contents and markup are dropped, entities are decoded. The input is cut
/// at [`HTML_MAX_BYTES`]. Linear in its input, but CPU work: callers on an
/// async runtime run it on a blocking thread.
pub fn html_to_text(html: &str) -> String {
    let mut cut = html.len().min(HTML_MAX_BYTES);
    while !html.is_char_boundary(cut) {
        cut -= 1;
    }
    let html = &html[..cut];
    let text = html2text::config::plain_no_decorate()
        .raw_mode(true)
        .allow_width_overflow()
        .no_link_wrapping()
        .string_from_read(html.as_bytes(), 10_000)
        .unwrap_or_default()
        .replace('\u{a0}', " ");
    crate::sanitize::multi_line(&text)
}

/// Why a message must not be answered automatically, or `None` for a
/// person writing: an auto-reply or out-of-office (`Auto-Submitted` other
/// than `no`, `X-Autoreply`, `X-Autorespond`), bulk or list mail
/// (`Precedence: bulk|list|junk`, `List-Id`, `List-Unsubscribe`), or a
/// bounce (a mailer-daemon or postmaster sender). Answering any of these
/// risks two robots talking to each other forever (RFC 3834).
pub fn automated_reason<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    from_address: &str,
) -> Option<&'static str> {
    let local = from_address
        .rsplit_once('@')
        .map_or(from_address, |(l, _)| l)
        .to_ascii_lowercase();
    if matches!(
        local.as_str(),
        "mailer-daemon" | "postmaster" | "mail-daemon" | "mailerdaemon"
    ) {
        return Some("bounce");
    }
    if let Some(value) = header("Auto-Submitted") {
        if !value.trim().eq_ignore_ascii_case("no") {
            return Some("auto_submitted");
        }
    }
    if header("X-Autoreply").is_some() || header("X-Autorespond").is_some() {
        return Some("auto_submitted");
    }
    if let Some(value) = header("Precedence") {
        let value = value.trim().to_ascii_lowercase();
        if matches!(value.as_str(), "bulk" | "list" | "junk" | "auto_reply") {
            return Some(if value == "list" {
                "mailing_list"
            } else {
                "bulk"
            });
        }
    }
    if header("List-Id").is_some() || header("List-Unsubscribe").is_some() {
        return Some("mailing_list");
    }
    if header("Content-Type").is_some_and(|c| c.to_ascii_lowercase().contains("multipart/report")) {
        return Some("bounce");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_lose_their_quoted_history() {
        let body = "Thanks, that worked!\n\nOn Tue, 24 Nov 2026 at 10:00, Support <help@acme.test> wrote:\n> Go to Settings.\n> Best";
        assert_eq!(strip_quoted_reply(body), "Thanks, that worked!");
        let outlook = "Still broken.\n-----Original Message-----\nFrom: Support";
        assert_eq!(strip_quoted_reply(outlook), "Still broken.");
        let trailing = "New question here\n\n> old\n> older";
        assert_eq!(strip_quoted_reply(trailing), "New question here");
    }

    #[test]
    fn a_fully_quoted_message_is_kept() {
        assert_eq!(strip_quoted_reply("> only quotes"), "> only quotes");
    }

    #[test]
    fn deeply_nested_or_huge_html_is_cheap_and_bounded() {
        // Many script tags once made stripping quadratic.
        let many = "<script>x</script>a".repeat(20_000);
        let text = html_to_text(&many);
        assert!(
            text.starts_with('a') && !text.contains('x'),
            "{}",
            &text[..20]
        );
        let huge = format!("<p>{}</p>", "word ".repeat(400_000));
        assert!(html_to_text(&huge).len() <= HTML_MAX_BYTES);
        let nested = format!("{}deep{}", "<div>".repeat(5_000), "</div>".repeat(5_000));
        let text = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || html_to_text(&nested))
            .unwrap()
            .join()
            .expect("no stack overflow on a blocking thread's stack");
        assert_eq!(text, "deep");
    }

    #[test]
    fn an_images_only_message_has_no_text() {
        assert_eq!(html_to_text("<div><img src=\"cid:1\"></div>"), "");
    }

    #[test]
    fn robots_are_recognised_and_people_are_not() {
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| *v)
            }
        };
        let person = "ada@example.com";
        assert_eq!(automated_reason(headers(&[]), person), None);
        assert_eq!(
            automated_reason(headers(&[("Auto-Submitted", "no")]), person),
            None
        );
        assert_eq!(
            automated_reason(headers(&[("auto-submitted", "auto-replied")]), person),
            Some("auto_submitted")
        );
        assert_eq!(
            automated_reason(headers(&[("Precedence", "Bulk")]), person),
            Some("bulk")
        );
        assert_eq!(
            automated_reason(headers(&[("Precedence", "list")]), person),
            Some("mailing_list")
        );
        assert_eq!(
            automated_reason(headers(&[("List-Id", "<dev.lists.example.com>")]), person),
            Some("mailing_list")
        );
        assert_eq!(
            automated_reason(headers(&[]), "MAILER-DAEMON@mx.example.com"),
            Some("bounce")
        );
        assert_eq!(
            automated_reason(headers(&[]), "postmaster@example.com"),
            Some("bounce")
        );
    }

    #[test]
    fn html_becomes_text() {
        let html = "<html><style>p{}</style><body><p>Hello&nbsp;there</p><div>Export &amp; import<br>fail</div><script>x()</script></body></html>";
        assert_eq!(html_to_text(html), "Hello there\n\nExport & import\nfail");
    }
}
