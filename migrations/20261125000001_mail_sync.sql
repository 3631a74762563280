-- Gmail intake as a worker: a push only records how far the mailbox has
-- changed; a sync worker lists history, keeps progress per message and
-- holds a lease per mailbox, so one bad message never blocks the others and
-- concurrent pushes never repeat the same fetches.

-- gmail_sync.history_id is now how far history has been listed (every
-- message id up to it is in gmail_messages); NULL until the first listing.
ALTER TABLE gmail_sync
    ALTER COLUMN history_id DROP NOT NULL,
    ADD COLUMN notified_history_id numeric(20, 0),
    ADD COLUMN correlation_id      text,
    ADD COLUMN lease_owner         uuid,
    ADD COLUMN lease_until         timestamptz,
    ADD COLUMN failures            integer     NOT NULL DEFAULT 0,
    ADD COLUMN retry_at            timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error          text;

-- Every message the mailbox reported, and what became of it.
--   pending   not taken in yet (next_attempt_at says when to try)
--   accepted  became a ticket message (ticket_id)
--   duplicate was already taken in
--   skipped   not a customer writing in (our own mail, drafts, spam)
--   refused   cannot become a ticket message (reason says why; staff see it)
--   gone      deleted from the mailbox before it could be read
CREATE TABLE gmail_messages
(
    email_address   text        NOT NULL,
    message_id      text        NOT NULL,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    state           text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'accepted', 'duplicate', 'skipped', 'refused', 'gone')),
    reason          text,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    correlation_id  text,
    ticket_id       uuid,
    discovered_at   timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    PRIMARY KEY (email_address, message_id)
);

CREATE INDEX gmail_messages_pending ON gmail_messages (email_address, seq)
    WHERE state = 'pending';
CREATE INDEX gmail_messages_refused ON gmail_messages (discovered_at DESC)
    WHERE state = 'refused';
