-- Permissions a user holds beyond their role. The only one so far:
-- `auditor_pii`, which lets an auditor see emails and phone numbers in
-- audit trails unmasked. Read with the role on every request
-- (api/src/session.rs), so a grant or a revocation acts on the next one.
ALTER TABLE users
    ADD COLUMN permissions text[] NOT NULL DEFAULT '{}'
        CONSTRAINT users_known_permissions CHECK (permissions <@ ARRAY['auditor_pii']::text[]);
