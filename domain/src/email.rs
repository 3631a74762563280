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

/// Plain text from HTML: tags dropped (block tags become line breaks),
/// `<script>`/`<style>` contents skipped, the common entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let Some(end) = after.find('>') else {
            rest = "";
            break;
        };
        let tag = after[1..end].trim().to_ascii_lowercase();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        rest = &after[end + 1..];
        if (name == "script" || name == "style") && !tag.starts_with('/') {
            let close = format!("</{name}");
            match rest.to_ascii_lowercase().find(&close) {
                Some(pos) => {
                    rest = &rest[pos..];
                    if let Some(gt) = rest.find('>') {
                        rest = &rest[gt + 1..];
                    }
                }
                None => rest = "",
            }
            continue;
        }
        if matches!(
            name.as_str(),
            "br" | "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "blockquote"
        ) {
            out.push('\n');
        }
    }
    out.push_str(rest);
    let decoded = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    crate::sanitize::multi_line(&decoded)
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
    fn html_becomes_text() {
        let html = "<html><style>p{}</style><body><p>Hello&nbsp;there</p><div>Export &amp; import<br>fail</div><script>x()</script></body></html>";
        assert_eq!(html_to_text(html), "Hello there\n\nExport & import\nfail");
    }
}
