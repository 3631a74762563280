-- A request's session check and its read scope in one round trip.
--
-- The API remembers, per session, the caller its last full check found
-- (api/src/session.rs). The next request of that session opens its read
-- transaction with
--
--   SELECT casebook_session_scope(<sid>, <fingerprint>, <fresh secs>); BEGIN READ ONLY
--
-- which succeeds only when the session and its user are still exactly as
-- remembered (same sub, role, customer, name and permissions; not
-- disabled, revoked, expired, or unseen for longer than the touch
-- interval), and then scopes the transaction as `access::begin_scoped`
-- does. Anything else raises CB401 before the BEGIN, so the connection is
-- left outside any transaction, and the API falls back to the full check:
-- a role change, a disabled user or a deleted session still act on the
-- very next request.

-- What a caller is, as one digest: the API computes the same from the
-- caller it remembers (`session::fingerprint`; a test keeps the two equal).
CREATE FUNCTION casebook_caller_fingerprint(sub text, role text, customer_id uuid, name text,
                                            permissions text[])
    RETURNS text
    LANGUAGE sql
    IMMUTABLE
    PARALLEL SAFE
AS
$$
SELECT encode(sha256(convert_to(
    sub || chr(31) || role || chr(31) || coalesce(customer_id::text, '') || chr(31)
        || coalesce('=' || name, '-') || chr(31) || array_to_string(permissions, chr(30)),
    'UTF8')), 'hex')
$$;

CREATE FUNCTION casebook_session_scope(sid uuid, fingerprint text, fresh_secs double precision)
    RETURNS void
    LANGUAGE plpgsql
AS
$$
DECLARE
    found_role        text;
    found_customer_id uuid;
BEGIN
    SELECT u.role, u.customer_id
      INTO found_role, found_customer_id
      FROM sessions s
               JOIN users u ON u.sub = s.sub
     WHERE s.session_id = sid
       AND u.disabled_at IS NULL
       AND s.revoked_at IS NULL
       AND s.expires_at > now()
       AND s.last_seen_at >= now() - make_interval(secs => fresh_secs)
       AND casebook_caller_fingerprint(u.sub, u.role, u.customer_id, u.name, u.permissions)
           = fingerprint;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the session is not as the API remembers it' USING ERRCODE = 'CB401';
    END IF;
    PERFORM set_config('role', 'casebook_api', true),
            set_config('casebook.role', found_role, true),
            set_config('casebook.customer_id',
                       CASE WHEN found_role = 'customer' THEN found_customer_id::text ELSE '' END,
                       true);
END
$$;

REVOKE ALL ON FUNCTION casebook_session_scope(uuid, text, double precision) FROM PUBLIC;
