//! Which representation a client wants: HTML for browsers, JSON for
//! everyone else.
//!
//! The `Accept` header is read with its q-values: each of `text/html` and
//! `application/json` gets the q of the most specific range that matches it
//! (`text/html` over `text/*` over `*/*`). HTML only when it is wanted more
//! than JSON: a browser's `text/html,…,*/*;q=0.8` gets the page, while no
//! header, `*/*`, `application/json` or anything unreadable gets JSON, the
//! contract's default.

use axum::http::{header, HeaderMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Json,
    Html,
}

/// The most ranges of one `Accept` header looked at.
const MAX_RANGES: usize = 32;

/// q of `(kind, sub)` under the ranges, by the most specific match.
fn quality(ranges: &[(String, String, f32)], kind: &str, sub: &str) -> f32 {
    let mut best: Option<(u8, f32)> = None;
    for (k, s, q) in ranges {
        let specificity = match (k.as_str(), s.as_str()) {
            (k, s) if k == kind && s == sub => 3,
            (k, "*") if k == kind => 2,
            ("*", "*") => 1,
            _ => continue,
        };
        if best.is_none_or(|(b, _)| specificity > b) {
            best = Some((specificity, *q));
        }
    }
    best.map_or(0.0, |(_, q)| q)
}

fn parse(value: &str) -> Vec<(String, String, f32)> {
    value
        .split(',')
        .take(MAX_RANGES)
        .filter_map(|range| {
            let mut params = range.split(';');
            let media = params.next()?.trim().to_ascii_lowercase();
            let (kind, sub) = media.split_once('/')?;
            let mut q = 1.0_f32;
            for p in params {
                if let Some((name, value)) = p.split_once('=') {
                    if name.trim().eq_ignore_ascii_case("q") {
                        q = value
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| (0.0..=1.0).contains(q))?;
                    }
                }
            }
            Some((kind.trim().to_string(), sub.trim().to_string(), q))
        })
        .collect()
}

pub fn wanted(headers: &HeaderMap) -> Wanted {
    let ranges: Vec<(String, String, f32)> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse)
        .collect();
    let html = quality(&ranges, "text", "html").max(quality(&ranges, "application", "xhtml+xml"));
    let json = quality(&ranges, "application", "json");
    if html > 0.0 && html > json {
        Wanted::Html
    } else {
        Wanted::Json
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with(accept: &[&str]) -> Wanted {
        let mut h = HeaderMap::new();
        for a in accept {
            h.append(header::ACCEPT, HeaderValue::from_str(a).unwrap());
        }
        wanted(&h)
    }

    #[test]
    fn browsers_get_html_and_api_clients_json() {
        // Chromium's and Firefox's navigation headers.
        assert_eq!(
            with(&["text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"]),
            Wanted::Html
        );
        assert_eq!(
            with(&["text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"]),
            Wanted::Html
        );
        assert_eq!(with(&["text/html"]), Wanted::Html);
        assert_eq!(with(&[]), Wanted::Json);
        assert_eq!(with(&["*/*"]), Wanted::Json);
        assert_eq!(with(&["application/json"]), Wanted::Json);
        assert_eq!(with(&["application/json, text/html"]), Wanted::Json);
        assert_eq!(with(&["text/html;q=0.5, application/json"]), Wanted::Json);
        assert_eq!(with(&["application/json;q=0.2, text/*"]), Wanted::Html);
        assert_eq!(with(&["text/html;q=0", "*/*"]), Wanted::Json);
        assert_eq!(
            with(&["text/html;q=2"]),
            Wanted::Json,
            "an invalid q is ignored"
        );
        assert_eq!(with(&["garbage"]), Wanted::Json);
    }
}
