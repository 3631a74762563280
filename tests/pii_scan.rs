//! Searches the logs the end-to-end suite wrote (`CASEBOOK_TEST_LOG_DIR`,
//! set by `make test`) for email addresses and phone numbers that were not
//! masked. `make test` runs it after the suite; on its own it is skipped.
//!
//! The detector is deliberately independent of the masking code: patterns
//! of its own, and masked forms (`a***@example.com`, `+*********67`) are
//! the only ones allowed through.

use std::path::Path;

use regex::Regex;

/// Addresses that are configuration, not a person: our own mailbox.
const ALLOWED_ADDRESSES: &[&str] = &["support@acme.test"];

fn findings(line: &str) -> Vec<String> {
    let email =
        Regex::new(r"[A-Za-z0-9._%+\-*]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
            .unwrap();
    // E.164 (with or without the whatsapp: prefix), and 3-3-4 national forms.
    let phone = Regex::new(r"\+\d[\d\s\-().]{6,18}\d|\b\d{3}[\s.\-]\d{3}[\s.\-]\d{4}\b").unwrap();
    let mut found = Vec::new();
    for m in email.find_iter(line) {
        let value = m.as_str();
        let local = value.split('@').next().unwrap_or_default();
        if local.ends_with("***")
            || ALLOWED_ADDRESSES.contains(&value.to_ascii_lowercase().as_str())
        {
            continue;
        }
        found.push(value.to_string());
    }
    for m in phone.find_iter(line) {
        let digits = m.as_str().chars().filter(char::is_ascii_digit).count();
        if digits >= 7 && !m.as_str().contains('*') {
            found.push(m.as_str().to_string());
        }
    }
    found
}

#[test]
fn the_detector_finds_what_it_must_and_passes_masked_values() {
    assert_eq!(
        findings(r#"{"from":"ada.lovelace@example.com"}"#),
        ["ada.lovelace@example.com"]
    );
    assert_eq!(
        findings("to whatsapp:+15551234567 failed"),
        ["+15551234567"]
    );
    assert_eq!(findings("call 555-123-4567"), ["555-123-4567"]);
    assert!(findings(r#"{"to":"a***@example.com","phone":"whatsapp:+*********67"}"#).is_empty());
    assert!(findings(
        "ticket 0195f0c2-7c1a-7d3e-9a55-1c2d3e4f5a6b at 2026-11-25T10:00:00Z, 1500 events"
    )
    .is_empty());
}

#[test]
#[ignore = "run by `make test` after the suite, over the logs it wrote"]
fn the_suite_logged_no_unmasked_email_or_phone() {
    let dir = std::env::var("CASEBOOK_TEST_LOG_DIR").expect("CASEBOOK_TEST_LOG_DIR is set");
    let mut lines = 0usize;
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir(Path::new(&dir)).expect("the log directory exists") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            lines += 1;
            for found in findings(line) {
                leaks.push(format!(
                    "{}: {found}: {}",
                    path.display(),
                    &line[..line.len().min(300)]
                ));
            }
        }
    }
    println!("scanned {lines} log lines");
    assert!(
        lines > 1000,
        "the suite's logs were captured ({lines} lines)"
    );
    assert!(
        leaks.is_empty(),
        "unmasked personal data in logs:\n{}",
        leaks.join("\n")
    );
}
