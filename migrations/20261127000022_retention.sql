-- Retention (one year): legal holds, the archive files written, and the
-- tickets that left the hot tables. The purge path itself is in
-- 20261127000021 (a DELETE from `events` passes only for a row already
-- recorded in events_purged).

CREATE TABLE legal_holds
(
    ticket_id text PRIMARY KEY,
    held_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per archive file: its SHA-256 and the checkpoint it was cut at
-- (the same facts as the manifest beside the files, and the tombstone).
CREATE TABLE archive_files
(
    file            text PRIMARY KEY,
    sha256          text        NOT NULL,
    tickets         integer     NOT NULL,
    events          bigint      NOT NULL,
    checkpoint_id   bigint      NOT NULL REFERENCES audit_checkpoints (id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE archived_tickets
(
    ticket_id    text PRIMARY KEY,
    archive_file text        NOT NULL REFERENCES archive_files (file),
    archived_at  timestamptz NOT NULL DEFAULT now(),
    -- Set while an investigation has the ticket's events back in `events`.
    restored_at  timestamptz
);
