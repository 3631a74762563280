//! How sure the agent is of a draft, and when a human must approve it.
//!
//! `confidence = 0.5 × retrieval + 0.5 × support`, capped by the model's
//! own confidence when it states one:
//!
//! - retrieval: the best passage's cosine similarity to the question,
//!   mapped linearly from 0.30 (unrelated, → 0) to 0.70 (a close match,
//!   → 1);
//! - support: the share of the draft's substantive sentences whose content
//!   words the retrieved passages contain (see `guardrails::support`); a
//!   draft with no substantive sentence gets 0.5.
//!
//! A draft below [`APPROVAL_THRESHOLD`] waits for a human.

pub const APPROVAL_THRESHOLD: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfidenceInputs {
    pub top_similarity: Option<f64>,
    pub supported_sentences: usize,
    pub judged_sentences: usize,
    pub model_confidence: Option<f64>,
}

pub fn draft_confidence(i: &ConfidenceInputs) -> f64 {
    let retrieval = i
        .top_similarity
        .map(|s| ((s - 0.30) / 0.40).clamp(0.0, 1.0))
        .unwrap_or(0.0);
    let support = if i.judged_sentences == 0 {
        0.5
    } else {
        i.supported_sentences as f64 / i.judged_sentences as f64
    };
    let combined = 0.5 * retrieval + 0.5 * support;
    let capped = match i.model_confidence {
        Some(m) if m.is_finite() => combined.min(m.clamp(0.0, 1.0)),
        _ => combined,
    };
    (capped * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(top: f64, supported: usize, judged: usize) -> ConfidenceInputs {
        ConfidenceInputs {
            top_similarity: Some(top),
            supported_sentences: supported,
            judged_sentences: judged,
            model_confidence: None,
        }
    }

    #[test]
    fn a_close_match_fully_supported_is_sent() {
        assert!(draft_confidence(&inputs(0.75, 3, 3)) >= APPROVAL_THRESHOLD);
    }

    #[test]
    fn a_weak_match_or_unsupported_draft_waits() {
        assert!(draft_confidence(&inputs(0.45, 3, 3)) < APPROVAL_THRESHOLD);
        assert!(draft_confidence(&inputs(0.80, 1, 3)) < APPROVAL_THRESHOLD);
        assert_eq!(
            draft_confidence(&ConfidenceInputs {
                top_similarity: None,
                supported_sentences: 0,
                judged_sentences: 0,
                model_confidence: None
            }),
            0.25
        );
    }

    #[test]
    fn the_model_can_only_lower_it() {
        let mut i = inputs(0.9, 2, 2);
        i.model_confidence = Some(0.6);
        assert_eq!(draft_confidence(&i), 0.6);
        i.model_confidence = Some(1.0);
        assert_eq!(draft_confidence(&i), 1.0);
    }
}
