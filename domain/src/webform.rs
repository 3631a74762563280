//! The public web form: validation with an error for every bad field, and
//! sanitising of what passes.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;

use crate::identity::normalize_email;
use crate::sanitize::{multi_line, single_line};
use crate::{Category, Priority};

pub const NAME_MAX: usize = 100;
pub const SUBJECT_MAX: usize = 200;
pub const MESSAGE_MAX: usize = 5000;
pub const CLIENT_REQUEST_ID_MAX: usize = 128;

/// The form as submitted: every field optional and untyped, so that one pass
/// can name every problem.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawWebForm {
    pub name: Option<String>,
    pub email: Option<String>,
    pub subject: Option<String>,
    pub message: Option<String>,
    pub category: Option<String>,
    pub priority: Option<String>,
    pub client_request_id: Option<String>,
}

/// A submission that passed validation, sanitised and normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct WebFormSubmission {
    pub name: String,
    pub email: String,
    pub subject: String,
    pub message: String,
    pub category: Category,
    pub priority: Priority,
    pub client_request_id: Option<String>,
}

/// How long a repeated `client_request_id` counts as a retry of the same
/// submission. Later, or with anything changed, it is a conflict.
pub const REPLAY_WINDOW_MINUTES: i64 = 10;

/// What the store holds of an earlier submission under the same
/// (email, `client_request_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSubmission {
    pub name: Option<String>,
    pub subject: Option<String>,
    pub message: String,
    pub category: Category,
    pub priority: Priority,
    pub received_at: DateTime<Utc>,
}

/// Whether a repeated `client_request_id` may be answered with the earlier
/// submission's ticket (and its status token): only a byte-identical
/// retry, within [`REPLAY_WINDOW_MINUTES`]. Anyone else who knows the
/// (email, id) pair learns nothing they did not send themselves.
pub fn is_replay(new: &WebFormSubmission, stored: &StoredSubmission, now: DateTime<Utc>) -> bool {
    let fresh = now >= stored.received_at
        && now - stored.received_at <= TimeDelta::minutes(REPLAY_WINDOW_MINUTES);
    fresh
        && stored.name.as_deref() == Some(new.name.as_str())
        && stored.subject.as_deref() == Some(new.subject.as_str())
        && stored.message == new.message
        && stored.category == new.category
        && stored.priority == new.priority
}

/// Field name → what is wrong with it.
pub type FieldErrors = BTreeMap<String, String>;

fn text_field(
    errors: &mut FieldErrors,
    field: &str,
    raw: Option<&str>,
    max: usize,
    clean: fn(&str) -> String,
) -> String {
    match raw {
        None => {
            errors.insert(field.into(), "is required".into());
            String::new()
        }
        Some(raw) => {
            let value = clean(raw);
            let len = value.chars().count();
            if len == 0 {
                errors.insert(field.into(), "must not be empty".into());
            } else if len > max {
                errors.insert(
                    field.into(),
                    format!("must be at most {max} characters (got {len})"),
                );
            }
            value
        }
    }
}

fn one_of<T: std::str::FromStr>(
    errors: &mut FieldErrors,
    field: &str,
    raw: &str,
    allowed: &[&str],
) -> Option<T> {
    match raw.trim().parse::<T>() {
        Ok(value) => Some(value),
        Err(_) => {
            errors.insert(
                field.into(),
                format!("must be one of: {}", allowed.join(", ")),
            );
            None
        }
    }
}

impl RawWebForm {
    pub fn validate(&self) -> Result<WebFormSubmission, FieldErrors> {
        let mut errors = FieldErrors::new();
        let name = text_field(
            &mut errors,
            "name",
            self.name.as_deref(),
            NAME_MAX,
            single_line,
        );
        let subject = text_field(
            &mut errors,
            "subject",
            self.subject.as_deref(),
            SUBJECT_MAX,
            single_line,
        );
        let message = text_field(
            &mut errors,
            "message",
            self.message.as_deref(),
            MESSAGE_MAX,
            multi_line,
        );
        let email = match self.email.as_deref() {
            None => {
                errors.insert("email".into(), "is required".into());
                String::new()
            }
            Some(raw) => normalize_email(raw).unwrap_or_else(|_| {
                errors.insert("email".into(), "must be a valid email address".into());
                String::new()
            }),
        };
        let categories: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
        let category = match self.category.as_deref() {
            None => {
                errors.insert(
                    "category".into(),
                    format!("is required, one of: {}", categories.join(", ")),
                );
                None
            }
            Some(raw) => one_of::<Category>(&mut errors, "category", raw, &categories),
        };
        let priorities: Vec<&str> = Priority::ALL.iter().map(|p| p.as_str()).collect();
        let priority = match self.priority.as_deref().map(str::trim) {
            None | Some("") => Some(Priority::Medium),
            Some(raw) => one_of::<Priority>(&mut errors, "priority", raw, &priorities),
        };
        let client_request_id = match self.client_request_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => {
                let ok = raw.len() <= CLIENT_REQUEST_ID_MAX
                    && raw
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
                if !ok {
                    errors.insert(
                        "client_request_id".into(),
                        format!("must be at most {CLIENT_REQUEST_ID_MAX} characters of A-Z, a-z, 0-9, '-', '_', '.', ':'"),
                    );
                }
                Some(raw.to_string())
            }
        };
        match (errors.is_empty(), category, priority) {
            (true, Some(category), Some(priority)) => Ok(WebFormSubmission {
                name,
                email,
                subject,
                message,
                category,
                priority,
                client_request_id,
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> RawWebForm {
        RawWebForm {
            name: Some("  Ada Lovelace ".into()),
            email: Some("Ada@Example.com".into()),
            subject: Some("Export\nfails".into()),
            message: Some("Hello,\r\nmy export fails.".into()),
            category: Some("technical".into()),
            priority: None,
            client_request_id: Some("req-1".into()),
        }
    }

    #[test]
    fn a_good_form_is_sanitised_and_normalised() {
        let form = good().validate().unwrap();
        assert_eq!(form.name, "Ada Lovelace");
        assert_eq!(form.email, "ada@example.com");
        assert_eq!(form.subject, "Export fails");
        assert_eq!(form.message, "Hello,\nmy export fails.");
        assert_eq!(form.category, Category::Technical);
        assert_eq!(form.priority, Priority::Medium);
        assert_eq!(form.client_request_id.as_deref(), Some("req-1"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let form = RawWebForm {
            name: Some("".into()),
            email: Some("not-an-email".into()),
            subject: Some("x".repeat(201)),
            message: None,
            category: Some("sales".into()),
            priority: Some("asap".into()),
            client_request_id: Some("has spaces".into()),
        };
        let errors = form.validate().unwrap_err();
        let fields: Vec<&str> = errors.keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            vec![
                "category",
                "client_request_id",
                "email",
                "message",
                "name",
                "priority",
                "subject"
            ]
        );
        assert!(errors["subject"].contains("200"));
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let mut form = good();
        form.message = Some("é".repeat(5000));
        assert!(form.validate().is_ok());
        form.message = Some("é".repeat(5001));
        assert!(form.validate().unwrap_err().contains_key("message"));
    }

    #[test]
    fn invisible_only_text_counts_as_empty() {
        let mut form = good();
        form.name = Some("\u{200B}\u{200B}".into());
        assert_eq!(form.validate().unwrap_err()["name"], "must not be empty");
    }

    fn stored(form: &WebFormSubmission, at: DateTime<Utc>) -> StoredSubmission {
        StoredSubmission {
            name: Some(form.name.clone()),
            subject: Some(form.subject.clone()),
            message: form.message.clone(),
            category: form.category,
            priority: form.priority,
            received_at: at,
        }
    }

    #[test]
    fn only_an_identical_retry_soon_after_is_a_replay() {
        let at = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let form = good().validate().unwrap();
        let earlier = stored(&form, at);
        assert!(is_replay(&form, &earlier, at + TimeDelta::minutes(1)));
        assert!(!is_replay(&form, &earlier, at + TimeDelta::minutes(11)));
        let mut changed = form.clone();
        changed.message = "Something else entirely".into();
        assert!(!is_replay(&changed, &earlier, at));
        let mut renamed = form.clone();
        renamed.name = "Eve".into();
        assert!(!is_replay(&renamed, &earlier, at));
        let mut resubjected = form;
        resubjected.subject = "Other".into();
        assert!(!is_replay(&resubjected, &earlier, at));
    }
}
