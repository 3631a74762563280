//! Event versions: stored events are never rewritten, so when an event's
//! payload changes shape its stored older versions are brought up to the
//! current shape on the way in, by the upcasters listed here.
//!
//! Every reader goes through [`upcast`] before deserialising a payload: the
//! event store's load path (`casebook_commands::store`), the projectors and
//! every Kafka consumer (`EventEnvelope::decode`), and replay and the audit
//! trail (which decode envelopes too). The stored bytes, and with them the
//! hash chain, stay exactly as written.
//!
//! A version this build does not know (written by a newer build, or not a
//! version at all) is refused with [`UpcastError`], never guessed at.
//!
//! The versioned events so far:
//!
//! | aggregate | event | version | change |
//! | --- | --- | --- | --- |
//! | `ticket` | `TicketUnassigned` | 2 | the person who held the ticket is `previous_assignee` (as in `TicketHandedBackToAi`), was `agent_id` in version 1 |

use std::borrow::Cow;

use serde_json::Value;

/// One step: `from` version of an event to the next.
struct Step {
    aggregate_type: &'static str,
    event_type: &'static str,
    from: &'static str,
    to: &'static str,
    apply: fn(Value) -> Result<Value, String>,
}

const STEPS: &[Step] = &[Step {
    aggregate_type: "ticket",
    event_type: "TicketUnassigned",
    from: "1",
    to: "2",
    apply: ticket_unassigned_v1_to_v2,
}];

/// `TicketUnassigned` v1 `{agent_id, unassigned_by, unassigned_at}` →
/// v2 `{previous_assignee, unassigned_by, unassigned_at}`.
fn ticket_unassigned_v1_to_v2(mut payload: Value) -> Result<Value, String> {
    let fields = payload.as_object_mut().ok_or("payload is not an object")?;
    if fields.contains_key("previous_assignee") {
        return Err("version 1 payload already has previous_assignee".into());
    }
    let held_by = fields
        .remove("agent_id")
        .ok_or("version 1 payload has no agent_id")?;
    fields.insert("previous_assignee".into(), held_by);
    Ok(payload)
}

/// The version this build writes of an event type (what
/// `DomainEvent::event_version` answers): the last step's target, `"1"`
/// for an event never changed.
pub fn current_version(aggregate_type: &str, event_type: &str) -> &'static str {
    STEPS
        .iter()
        .filter(|s| s.aggregate_type == aggregate_type && s.event_type == event_type)
        .map(|s| s.to)
        .next_back()
        .unwrap_or("1")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    #[error("{aggregate_type}/{event_type} version {version:?} is not one this build reads (it reads up to {current})")]
    UnknownVersion {
        aggregate_type: String,
        event_type: String,
        version: String,
        current: &'static str,
    },
    #[error("{aggregate_type}/{event_type} version {from} could not be upcast: {reason}")]
    Malformed {
        aggregate_type: String,
        event_type: String,
        from: &'static str,
        reason: String,
    },
}

/// The payload of a stored event in the shape this build reads: borrowed
/// as it is when already current, else upcast step by step.
pub fn upcast<'a>(
    aggregate_type: &str,
    event_type: &str,
    version: &str,
    payload: &'a Value,
) -> Result<Cow<'a, Value>, UpcastError> {
    let current = current_version(aggregate_type, event_type);
    if version == current {
        return Ok(Cow::Borrowed(payload));
    }
    let mut at = version;
    let mut value: Option<Value> = None;
    // Each step moves one version forward, so this ends after at most
    // `STEPS.len()` rounds.
    for _ in 0..STEPS.len() {
        let Some(step) = STEPS.iter().find(|s| {
            s.aggregate_type == aggregate_type && s.event_type == event_type && s.from == at
        }) else {
            break;
        };
        let input = value.take().unwrap_or_else(|| payload.clone());
        value = Some(
            (step.apply)(input).map_err(|reason| UpcastError::Malformed {
                aggregate_type: aggregate_type.to_string(),
                event_type: event_type.to_string(),
                from: step.from,
                reason,
            })?,
        );
        at = step.to;
        if at == current {
            break;
        }
    }
    match value {
        Some(v) if at == current => Ok(Cow::Owned(v)),
        _ => Err(UpcastError::UnknownVersion {
            aggregate_type: aggregate_type.to_string(),
            event_type: event_type.to_string(),
            version: version.chars().take(20).collect(),
            current,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_version_1_unassignment_reads_as_version_2() {
        let v1 = json!({"type": "TicketUnassigned", "agent_id": "grace", "unassigned_by": "sam",
                        "unassigned_at": "2026-11-24T10:00:00Z"});
        let v2 = upcast("ticket", "TicketUnassigned", "1", &v1).unwrap();
        assert_eq!(
            v2.as_ref(),
            &json!({"type": "TicketUnassigned", "previous_assignee": "grace", "unassigned_by": "sam",
                    "unassigned_at": "2026-11-24T10:00:00Z"})
        );
        assert!(matches!(v2, Cow::Owned(_)));
    }

    #[test]
    fn a_current_event_is_borrowed_untouched() {
        let v2 = json!({"previous_assignee": "grace"});
        assert!(matches!(
            upcast("ticket", "TicketUnassigned", "2", &v2).unwrap(),
            Cow::Borrowed(_)
        ));
        let other = json!({"agent_id": "grace"});
        assert!(matches!(
            upcast("ticket", "TicketAssigned", "1", &other).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn unknown_and_malformed_versions_are_refused() {
        let v1 = json!({"agent_id": "grace"});
        assert!(matches!(
            upcast("ticket", "TicketUnassigned", "3", &v1),
            Err(UpcastError::UnknownVersion { .. })
        ));
        assert!(matches!(
            upcast("ticket", "TicketAssigned", "2", &v1),
            Err(UpcastError::UnknownVersion { .. })
        ));
        assert!(matches!(
            upcast(
                "ticket",
                "TicketUnassigned",
                "1",
                &json!({"unassigned_by": "sam"})
            ),
            Err(UpcastError::Malformed { .. })
        ));
        assert!(matches!(
            upcast("ticket", "TicketUnassigned", "1", &json!("text")),
            Err(UpcastError::Malformed { .. })
        ));
    }

    #[test]
    fn the_versions_written_are_the_versions_read() {
        assert_eq!(current_version("ticket", "TicketUnassigned"), "2");
        assert_eq!(current_version("ticket", "TicketOpened"), "1");
        assert_eq!(current_version("customer", "TicketUnassigned"), "1");
    }
}
