//! The customer's status link: `CASEBOOK_PUBLIC_URL/ticket/<id>?token=<status token>`.
//!
//! The status token is HMAC-SHA256 over `ticket-status:` and the ticket id,
//! keyed by the JWT secret, its first 24 bytes in base64url (32
//! characters): whoever holds it may read that one ticket's conversation,
//! and nobody can compute it without the secret. One function makes it for
//! everyone: the API (the web form's answer, checking `?token=`) and the
//! delivery worker (the acknowledgement email, the first reply).
//!
//! The first reply on a ticket carries the link. The reply's event records
//! the link without its token (the store, the topics and the read models
//! never hold a token, as with the acknowledgement's links); the delivery
//! worker adds the token to exactly that link as it sends ([`with_token`]).
//! Whether a reply is the first is decided by the ticket itself
//! ([`is_first_reply`]) inside the command that sends it, so two replies
//! racing each other cannot both carry it: the loser's append conflicts and
//! is decided again.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::Ticket;

/// Characters of a status token.
pub const STATUS_TOKEN_LEN: usize = 32;
/// How a token is added to a status link.
pub const TOKEN_PARAM: &str = "?token=";
/// Characters adding the token adds to a link: formatting leaves room.
pub const TOKEN_SUFFIX_LEN: usize = TOKEN_PARAM.len() + STATUS_TOKEN_LEN;

/// The status token of a ticket.
pub fn status_token(secret: &[u8], ticket_id: Uuid) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"ticket-status:");
    mac.update(ticket_id.as_bytes());
    URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..24])
}

/// Whether `token` is the ticket's status token (in constant time).
pub fn check_status_token(secret: &[u8], ticket_id: Uuid, token: &str) -> bool {
    status_token(secret, ticket_id)
        .as_bytes()
        .ct_eq(token.as_bytes())
        .into()
}

/// The status page's path.
pub fn status_path(ticket_id: Uuid) -> String {
    format!("/ticket/{ticket_id}")
}

/// The status page's address under `public_url`, without the token.
pub fn status_link(public_url: &str, ticket_id: Uuid) -> String {
    format!(
        "{}{}",
        public_url.trim_end_matches('/'),
        status_path(ticket_id)
    )
}

/// Whether a reply sent now would be the ticket's first: no reply, by
/// anyone, was recorded on it yet.
pub fn is_first_reply(ticket: &Ticket) -> bool {
    ticket.exists() && ticket.responses.is_empty()
}

/// `text` with `token` added to every occurrence of `link` that stands on
/// its own (not followed by more of a URL, nor already carrying a query).
pub fn with_token(text: &str, link: &str, token: &str) -> String {
    if link.is_empty() || !text.contains(link) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + TOKEN_SUFFIX_LEN);
    let mut rest = text;
    while let Some(at) = rest.find(link) {
        let end = at + link.len();
        out.push_str(&rest[..end]);
        let continues = rest[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || "/?#&=-_%+~".contains(c));
        if !continues {
            out.push_str(TOKEN_PARAM);
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_tokens_are_per_ticket_and_per_secret() {
        let a = Uuid::from_u128(7);
        let token = status_token(b"k", a);
        assert_eq!(token.len(), STATUS_TOKEN_LEN);
        assert!(check_status_token(b"k", a, &token));
        assert!(!check_status_token(b"k", Uuid::from_u128(8), &token));
        assert!(!check_status_token(b"j", a, &token));
        assert!(!check_status_token(b"k", a, &token[..31]));
    }

    #[test]
    fn the_token_goes_on_the_link_and_nowhere_else() {
        let id = Uuid::from_u128(7);
        let link = status_link("https://help.example.com/", id);
        assert_eq!(
            link,
            "https://help.example.com/ticket/00000000-0000-0000-0000-000000000007"
        );
        let text = format!("Follow it: {link} (or reply).\nOther: {link}/x and {link}?token=old");
        let out = with_token(&text, &link, "T");
        assert_eq!(
            out,
            format!("Follow it: {link}?token=T (or reply).\nOther: {link}/x and {link}?token=old")
        );
        assert_eq!(with_token("no link here", &link, "T"), "no link here");
        assert_eq!(with_token(&link, &link, "T"), format!("{link}?token=T"));
    }

    #[test]
    fn only_a_ticket_without_replies_gets_its_first() {
        assert!(!is_first_reply(&Ticket::default()));
        let mut ticket = Ticket {
            id: Some(Uuid::from_u128(1)),
            ..Ticket::default()
        };
        assert!(is_first_reply(&ticket));
        ticket.responses.insert(
            Uuid::from_u128(2),
            crate::ticket::Response {
                channel: crate::Channel::Email,
                delivery: None,
            },
        );
        assert!(!is_first_reply(&ticket));
    }
}
