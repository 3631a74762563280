-- Users and their sessions. Every authenticated request reads its session
-- row (and the user's current role), so an idle session, a role change, a
-- disabled user or a deleted session act on the very next request.

CREATE TABLE users
(
    sub         text PRIMARY KEY CHECK (length(sub) BETWEEN 1 AND 200),
    role        text        NOT NULL
        CHECK (role IN ('customer', 'agent', 'supervisor', 'analyst', 'auditor')),
    name        text CHECK (length(name) <= 200),
    -- Whose tickets a customer user may read; staff have none.
    customer_id uuid,
    disabled_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_customer_needs_customer_id
        CHECK (role <> 'customer' OR customer_id IS NOT NULL),
    CONSTRAINT users_staff_have_no_customer_id
        CHECK (role = 'customer' OR customer_id IS NULL)
);

-- One row per issued token (its `sid` claim). `last_seen_at` is touched at
-- most once a minute per session (api/src/session.rs), so checking a
-- session costs one indexed read and, now and then, one small update; the
-- fill factor leaves room for those updates to stay HOT (last_seen_at is in
-- no index).
CREATE TABLE sessions
(
    session_id   uuid PRIMARY KEY,
    sub          text        NOT NULL REFERENCES users (sub) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
) WITH (fillfactor = 80);
CREATE INDEX sessions_sub_idx ON sessions (sub);
-- Issuing a token deletes sessions long expired: the table stays bounded.
CREATE INDEX sessions_expires_idx ON sessions (expires_at);
