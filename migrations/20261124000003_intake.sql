-- Intake bookkeeping that is not part of the domain record.

-- The Gmail history id each mailbox has been read up to.
CREATE TABLE gmail_sync
(
    email_address text PRIMARY KEY,
    history_id    numeric(20, 0) NOT NULL,
    updated_at    timestamptz    NOT NULL DEFAULT now()
);
